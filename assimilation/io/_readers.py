"""Opening datasets and finding their variables (shared by the readers)."""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib

import xarray as xr

from dphys.io import (
    TIME_DIM,
    open_netcdf,
    read_netcdf,
)

from ._errors import (
    MissingVariableError,
)
from ._names import STATION_DIM


logger = logging.getLogger(__name__)

# Time dimension names of real products, recognised as the model's `time`.
TIME_NAMES = ("time", "t", "time_counter", "valid_time", "Time")


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


@contextlib.contextmanager
def opened(source: str | os.PathLike | xr.Dataset):
    """``source`` as a dataset: a file is opened lazily (dask chunks) for the
    duration of the block, so the readers load only the part they select."""
    if isinstance(source, xr.Dataset):
        yield source
        return
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(
            f"`source` must be a path or an xarray.Dataset, got "
            f"{type(source).__name__}."
        )
    with open_netcdf(pathlib.Path(source), chunks={}) as ds:
        yield ds


def _variable(ds: xr.Dataset, name: str, what: str) -> xr.DataArray:
    if name not in ds.variables:
        raise MissingVariableError(
            f"{what}: no variable `{name}` in the dataset; it has data variables "
            f"{sorted(map(str, ds.data_vars))} and coordinates "
            f"{sorted(map(str, ds.coords))}. Set the variable name (e.g. `variable=` "
            "or the config's `variable` key)."
        )
    return ds[name]


def _rename_time(ds: xr.Dataset, da: xr.DataArray):
    """Rename a time dimension called e.g. ``time_counter`` or ``valid_time`` (or
    whose coordinate has ``axis = "T"`` / ``standard_name = "time"``) to ``time``."""
    if TIME_DIM in da.dims:
        return ds, da
    for d in da.dims:
        c = ds.variables.get(d)
        attrs = c.attrs if c is not None else {}
        if (
            d in TIME_NAMES
            or attrs.get("axis") == "T"
            or (attrs.get("standard_name") == "time")
        ):
            logger.info("`%s`: dimension `%s` taken as time", da.name, d)
            return ds.rename({d: TIME_DIM}), da.rename({d: TIME_DIM})
    return ds, da


def _time_coord(ds: xr.Dataset, da: xr.DataArray, name: str) -> xr.DataArray:
    if TIME_DIM not in da.dims:
        raise MissingVariableError(
            f"`{name}` has no `{TIME_DIM}` dimension (dims {da.dims}); observations "
            f"need dims ({TIME_DIM!r}, {STATION_DIM!r}) or ({TIME_DIM!r}, y, x)."
        )
    if TIME_DIM in ds.coords or TIME_DIM in ds.variables:
        return ds[TIME_DIM]
    raise MissingVariableError(
        f"`{name}` has a `{TIME_DIM}` dimension but the dataset has no `{TIME_DIM}` "
        "coordinate variable holding the times; add one (with CF `units`)."
    )
