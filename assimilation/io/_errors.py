"""The data-assimilation input errors (all ``ValueError`` subclasses)."""

from dphys.io import (
    DataError as DataError,
    DomainError as DomainError,
    GridMismatchError as GridMismatchError,
    MissingVariableError as MissingVariableError,
    TimeAxisError as TimeAxisError,
    UnitsError as UnitsError,
)
