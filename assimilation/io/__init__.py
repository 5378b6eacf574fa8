r"""Observations and gridded fields from xarray / netCDF, validated at the boundary.

Data enter the package here and nowhere else. Everything that can be wrong with a
file is checked before any number reaches a cost function, and every problem ends in
a :class:`~dphys.io.DataError` (a ``ValueError``) that names the variable, says what
was received and how to fix it, or in a documented correction that is logged (module
logger ``assimilation.io``) with a count:

| problem | default | correction (opt-in) |
|---|---|---|
| missing variable / coordinate / dimension | :class:`MissingVariableError` | - |
| grid coordinates differ from the model grid | :class:`GridMismatchError` | - |
| 2-D (curvilinear) latitude/longitude | :class:`CurvilinearGridError` | - |
| axes lat/latitude/lon/longitude, time_counter | recognised (name, CF attrs) | - |
| descending axis (north to south) | flipped (logged) | - |
| float32 coordinates | compared to float32 precision | - |
| coordinates in degrees | :class:`UnitsError` | ``geometry=TangentPlane(...)`` |
| ``units`` differ from the model's | converted (pint), else :class:`UnitsError` | - |
| no ``units`` attribute | assumed to be the model's (logged) | - |
| times not strictly increasing | :class:`TimeAxisError` | - |
| times outside the assimilation window | :class:`TimeAxisError` | ``outside="drop"`` |
| sensor outside a non-periodic axis | :class:`DomainError` | - |
| sensor outside a periodic axis | wrapped into the domain (logged) | - |
| NaN observations | kept: NaN means missing and is masked in the cost | - |
| gridded point always NaN (land) or outside | not assimilated (logged) | - |
| NaN in a background field | :class:`DataError` naming it | fill it first |

Units are CF/UDUNITS strings (``"m s-1"``, ``"kg m-3"``, ``"degC"``) converted by
pint: any two units of the same dimension. Times are any CF ``"<unit> since
<date>"`` (milliseconds to days) in any calendar, decoded by cftime.

Observation files hold one sensor (station) dimension, or are gridded fields:

.. code-block:: text

    dimensions: time, station
    variables:  u(time, station)                  # any name; NaN = missing
                x(station) [, y(station)]          # sensor positions (or lat/lon)
                time(time)  units = "days since 2000-01-01", calendar = "noleap"
                sigma(station) or u:sigma           # optional error std

    dimensions: time, lat, lon                     # a gridded field, e.g. SST
    variables:  sst(time, lat, lon)                # every point a sensor

Times are converted to model time: ``(t - reference)`` in the model's ``time_units``,
for every CF calendar (``standard``, ``noleap``, ``360_day``, ...) through
:mod:`cftime`. Gridded fields (backgrounds, truths) are ``(time, y, x)`` or
``(y, x)`` arrays whose coordinates must be the model grid's points. Files are
opened lazily: only the window's times are read.
"""

from __future__ import annotations

from ._errors import (
    DataError as DataError,
    DomainError as DomainError,
    GridMismatchError as GridMismatchError,
    MissingVariableError as MissingVariableError,
    TimeAxisError as TimeAxisError,
    UnitsError as UnitsError,
)
from ._geo import (
    EARTH_RADIUS as EARTH_RADIUS,
    CurvilinearGridError as CurvilinearGridError,
    TangentPlane as TangentPlane,
)
from ._gridded import read_field as read_field
from ._names import (
    ITERATION_DIM as ITERATION_DIM,
    PARAMETER_DIM as PARAMETER_DIM,
    SIGMA_NAME as SIGMA_NAME,
    STANDARD_NAME_UNITS as STANDARD_NAME_UNITS,
    STATION_DIM as STATION_DIM,
)
from ._readers import open_dataset as open_dataset
from ._stations import read_observations as read_observations
from ._time import model_times as model_times
from ._units import (
    check_standard_name as check_standard_name,
    convert_units as convert_units,
    time_unit_seconds as time_unit_seconds,
    unit_conversion as unit_conversion,
)
from ._writers import (
    analysis_to_dataset as analysis_to_dataset,
    observations_to_dataset as observations_to_dataset,
)
