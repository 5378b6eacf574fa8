"""Gridded fields (backgrounds, truths) on the model grid."""

from __future__ import annotations

import logging
import os

import jax.numpy as jnp
import numpy as np
import xarray as xr

import dphys
from dphys.io import (
    TIME_DIM,
    spatial_dims,
)

from ._errors import (
    DataError,
    MissingVariableError,
)
from ._geo import (
    TangentPlane,
    check_axis,
    check_not_curvilinear,
    spatial_map,
    to_model_axes,
)
from ._readers import _rename_time, _time_coord, _variable, opened
from ._time import _apply_window, _check_time_axis, model_times
from ._units import _checked_units, convert_units


logger = logging.getLogger(__name__)


def _check_dims(da: xr.DataArray, grid: dphys.Grid, variable: str) -> None:
    """Only time and the spatial axes; a clear hint for anything else."""
    sdims = spatial_dims(grid.ndim)
    mapping = spatial_map(da, grid.ndim, f"field `{variable}`")
    extra = [str(d) for d in da.dims if d != TIME_DIM and d not in mapping]
    if extra:
        raise MissingVariableError(
            f"field `{variable}` must have dims {(TIME_DIM, *sdims)} or {sdims} "
            f"(after recognising {dict(mapping)}), got {tuple(map(str, da.dims))} "
            f"(unexpected {extra}; select one value, e.g. `.isel({extra[0]}=0)`)."
        )


def read_field(
    source: str | os.PathLike | xr.Dataset,
    variable: str,
    grid: dphys.Grid,
    *,
    units: str | None = None,
    length_units: str | None = None,
    time_units: str | None = None,
    reference=None,
    window: tuple[float, float] | None = None,
    outside: str = "error",
    geometry: TangentPlane | None = None,
    nan: str = "error",
):
    r"""Read a gridded field ``(time, y, x)`` or ``(y, x)`` on the model grid.

    The file is taken as it comes (see :mod:`assimilation.io._geo`): spatial
    dimensions are recognised by name or CF attributes (``lat``/``latitude``/``lon``/
    ``longitude``/``x``/``y``, ``axis``, ``standard_name``), a time dimension such as
    ``time_counter`` is recognised by its attributes, descending axes are flipped
    (logged), coordinates are converted to ``length_units`` (degrees through
    ``geometry``) and compared with the grid's points explicitly, to a tolerance fit
    for their stored precision: a field on another grid is an error, never silently
    aligned to an overlap. A file is opened lazily and only the window's times are
    read.

    Args:
        source: a netCDF path or an :class:`xarray.Dataset`.
        variable: the field's name.
        grid: the model grid.
        units, length_units, time_units: the model's units (data are converted).
        reference: the date of model time 0.
        window: keep the times in ``[start, end]`` (model time).
        outside: ``"error"`` or ``"drop"`` for times outside ``window``.
        geometry: a :class:`TangentPlane` to read latitude/longitude coordinates.
        nan: ``"error"`` (default: a background or initial state must be defined
            everywhere) or ``"keep"``.

    Returns:
        ``(times, values)``: ``times`` in model time (``None`` without a time
        dimension) and ``values`` as a JAX array of shape ``(n_times, *grid.shape)``
        or ``grid.shape``, in the model's ``units``.

    Raises:
        MissingVariableError, GridMismatchError (:class:`CurvilinearGridError` for
        2-D coordinates), UnitsError, TimeAxisError, DataError (NaN values).
    """
    if nan not in ("error", "keep"):
        raise ValueError(f"`nan` must be 'error' or 'keep', got {nan!r}.")
    with opened(source) as ds:
        da = _variable(ds, variable, "field")
        ds, da = _rename_time(ds, da)
        check_not_curvilinear(ds, da, f"field `{variable}`")
        _check_dims(da, grid, variable)
        what = f"field `{variable}`"
        da, coords = to_model_axes(
            da,
            grid,
            name=what,
            length_units=length_units,
            geometry=geometry,
        )
        sdims = spatial_dims(grid.ndim)
        has_time = TIME_DIM in da.dims
        da = da.transpose(*((TIME_DIM,) if has_time else ()), *sdims)
        for axis, dim in enumerate(sdims):
            if dim in coords:
                values, dtype, tol = coords[dim]
                check_axis(values, tol, grid, axis, what, dtype)
            elif da.sizes[dim] != grid.shape[axis]:
                check_axis(np.zeros(da.sizes[dim]), 0.0, grid, axis, what, float)
        times = None
        if has_time:
            times = model_times(
                _time_coord(ds, da, variable),
                time_units=time_units,
                reference=reference,
            )
            _check_time_axis(times, TIME_DIM)
            keep, times = _apply_window(times, window, outside, variable)
            times = times[keep]
            da = da.isel({TIME_DIM: np.flatnonzero(keep)})
        data_units = _checked_units(da, variable, units)
        raw = np.asarray(da.values)  # reads only the selected part of a file
    if nan == "error" and np.isnan(raw).any():
        bad = np.isnan(raw)
        idx = np.unravel_index(int(np.argmax(bad)), raw.shape)
        where = ", ".join(
            f"{d}={i}" for d, i in zip(da.dims, map(int, idx), strict=True)
        )
        raise DataError(
            f"field `{variable}` has {int(bad.sum())} NaN value(s) of {raw.size} "
            f"(first at {where}): a background or initial state must be defined at "
            "every grid point, and NaN (e.g. land in an ocean product) would make "
            "every model step fail. Fill them first (e.g. "
            "`ds.fillna(value)` or `ds.interpolate_na(...)`), or choose a domain "
            "without them."
        )
    values = convert_units(raw, data_units, units, variable=variable)
    if times is not None:
        times = jnp.asarray(times, dtype=jnp.result_type(float))
    return times, jnp.asarray(values)
