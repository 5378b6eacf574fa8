"""The errors of observation data: units, time axes, sensor positions.

They are :class:`dphys.io.DataError` subclasses (so ``ValueError`` s): the command
line turns every one into a one-line message and exit status 2. The core keeps its
own I/O errors (:class:`dphys.io.DataError`, :class:`dphys.io.MissingVariableError`,
:class:`dphys.io.GridMismatchError`), re-exported here so that the whole vocabulary
of data errors can be imported from :mod:`assimilation.io`.
"""

from dphys.io import (
    DataError as DataError,
    GridMismatchError as GridMismatchError,
    MissingVariableError as MissingVariableError,
)


class UnitsError(DataError):
    """A ``units`` attribute differs from the model's and cannot be converted."""


class TimeAxisError(DataError):
    """A time axis is non-monotonic, has duplicates or lies outside the window."""


class DomainError(DataError):
    """Positions (e.g. sensors) lie outside a non-periodic domain."""
