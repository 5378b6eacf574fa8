"""Opening datasets and finding their variables (shared by the readers)."""

from __future__ import annotations

import logging
import os
import pathlib

import xarray as xr

from dphys.io import (
    TIME_DIM,
    read_netcdf,
)

from ._errors import (
    MissingVariableError,
)
from ._names import STATION_DIM


logger = logging.getLogger(__name__)


# -- reading ---------------------------------------------------------------------------
def open_dataset(source: str | os.PathLike | xr.Dataset) -> xr.Dataset:
    """``source`` itself if it is a Dataset, else the netCDF file loaded into memory.

    Times are not decoded (the readers convert them, calendar-aware).
    """
    if isinstance(source, xr.Dataset):
        return source
    if isinstance(source, (str, os.PathLike)):
        return read_netcdf(pathlib.Path(source))
    raise TypeError(
        f"`source` must be a path or an xarray.Dataset, got {type(source).__name__}."
    )


def _variable(ds: xr.Dataset, name: str, what: str) -> xr.DataArray:
    if name not in ds.variables:
        raise MissingVariableError(
            f"{what}: no variable `{name}` in the dataset; it has data variables "
            f"{sorted(map(str, ds.data_vars))} and coordinates "
            f"{sorted(map(str, ds.coords))}. Set the variable name (e.g. `variable=` "
            "or the config's `variable` key)."
        )
    return ds[name]


def _time_coord(ds: xr.Dataset, da: xr.DataArray, name: str) -> xr.DataArray:
    if TIME_DIM not in da.dims:
        raise MissingVariableError(
            f"`{name}` has no `{TIME_DIM}` dimension (dims {da.dims}); observations "
            f"need dims ({TIME_DIM!r}, {STATION_DIM!r})."
        )
    if TIME_DIM in ds.coords:
        return ds[TIME_DIM]
    raise MissingVariableError(
        f"`{name}` has a `{TIME_DIM}` dimension but the dataset has no `{TIME_DIM}` "
        "coordinate variable holding the times; add one (with CF `units`)."
    )
