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
    check_grid_coords,
    spatial_dims,
)

from ._errors import (
    MissingVariableError,
)
from ._readers import _time_coord, _variable, open_dataset
from ._time import _apply_window, _check_time_axis, model_times
from ._units import _checked_units, convert_units


logger = logging.getLogger(__name__)


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
):
    r"""Read a gridded field ``(time, y, x)`` or ``(y, x)`` on the model grid.

    The spatial coordinates are converted to ``length_units`` and compared with the
    grid's points explicitly (:func:`dphys.io.check_grid_coords`): a field on another
    grid is an error, never silently aligned to an overlap.

    Returns:
        ``(times, values)``: ``times`` in model time (``None`` without a time
        dimension) and ``values`` as a JAX array of shape ``(n_times, *grid.shape)``
        or ``grid.shape``, in the model's ``units``.

    Raises:
        MissingVariableError, GridMismatchError, UnitsError, TimeAxisError.
    """
    ds = open_dataset(source)
    da = _variable(ds, variable, "field")
    sdims = spatial_dims(grid.ndim)
    allowed = {TIME_DIM, *sdims}
    extra = [d for d in da.dims if d not in allowed]
    missing = [d for d in sdims if d not in da.dims]
    if extra or missing:
        raise MissingVariableError(
            f"field `{variable}` must have dims {(TIME_DIM, *sdims)} or {sdims}, got "
            f"{da.dims}"
            + (f" (missing {missing})" if missing else "")
            + (
                f" (unexpected {extra}; select one value, e.g. `.isel({extra[0]}=0)`)"
                if extra
                else ""
            )
            + "."
        )
    has_time = TIME_DIM in da.dims
    da = da.transpose(*((TIME_DIM,) if has_time else ()), *sdims)

    # Coordinates in model length units, then an explicit comparison with the grid.
    coords = {}
    for dim in sdims:
        if dim in da.coords:
            c = da[dim]
            cu = _checked_units(c, dim, length_units)
            coords[dim] = convert_units(
                np.asarray(c.values, dtype=np.float64), cu, length_units, variable=dim
            )
    probe = xr.DataArray(
        np.zeros([da.sizes[d] for d in sdims], dtype=np.int8),
        dims=sdims,
        coords={d: (d, v) for d, v in coords.items()},
    )
    check_grid_coords(probe, grid, what=f"field `{variable}`")

    data_units = _checked_units(da, variable, units)
    values = convert_units(np.asarray(da.values), data_units, units, variable=variable)
    times = None
    if has_time:
        times = model_times(
            _time_coord(ds, da, variable), time_units=time_units, reference=reference
        )
        _check_time_axis(times, TIME_DIM)
        keep, times = _apply_window(times, window, outside, variable)
        times, values = times[keep], values[keep]
        times = jnp.asarray(times, dtype=jnp.result_type(float))
    return times, jnp.asarray(values)
