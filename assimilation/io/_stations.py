"""Sparse sensor (station) records into :class:`assimilation.Observations`."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import xarray as xr

import dphys
from dphys.io import (
    TIME_DIM,
    spatial_dims,
)

from .._observation import Observations
from ._errors import (
    DataError,
    DomainError,
    MissingVariableError,
    TimeAxisError,
)
from ._names import SIGMA_NAME, STATION_DIM
from ._readers import _time_coord, _variable, open_dataset
from ._time import _EDGE_RTOL, _apply_window, _check_time_axis, model_times
from ._units import _checked_units, convert_units


logger = logging.getLogger(__name__)


def read_observations(
    source: str | os.PathLike | xr.Dataset,
    grid: dphys.Grid,
    *,
    variable: str = "u",
    sigma: float | Sequence[float] | None = None,
    units: str | None = None,
    length_units: str | None = None,
    time_units: str | None = None,
    reference=None,
    window: tuple[float, float] | None = None,
    outside: str = "error",
    closed: str = "both",
    position_names: Sequence[str] | None = None,
    field: str | None = None,
) -> Observations:
    r"""Read sparse sensor records into :class:`assimilation.Observations`.

    Args:
        source: a netCDF path or an :class:`xarray.Dataset` with dims
            ``(time, station)`` (see the module docstring).
        grid: the model grid; positions must lie in its domain.
        variable: the observed variable's name.
        sigma: observation-error standard deviation (scalar or per station, in the
            model's ``units``). ``None`` reads a ``sigma(station)`` variable or the
            variable's ``sigma`` attribute.
        units: the model's units of ``variable`` (``None``: no check).
        length_units: the model's length unit (positions are converted to it).
        time_units: the model's time unit.
        reference: the date of model time 0 (usually the window start).
        window: ``(start, end)`` of the assimilation window in model time.
        outside: ``"error"`` (default) or ``"drop"`` (logged with a count) for times
            outside ``window``.
        closed: ``"both"``: ``window`` is $[t_0, t_1]$; ``"right"``: $(t_0, t_1]$
            (consecutive windows then share no observation).
        position_names: names of the position coordinates in array-axis order;
            default ``("x",)`` in 1D, ``("y", "x")`` in 2D.
        field: for multi-field states, the observed field (passed on to
            :class:`Observations`); default: the ``field`` attribute of ``variable``
            if present.

    Returns:
        :class:`Observations` in model units and model time (NaN values kept).

    Raises:
        MissingVariableError, UnitsError, TimeAxisError, DomainError, DataError: see
        the module docstring.
    """
    ds = open_dataset(source)
    da = _variable(ds, variable, "observations")
    if STATION_DIM not in da.dims or TIME_DIM not in da.dims or da.ndim != 2:
        raise MissingVariableError(
            f"observations `{variable}` must have dims ({TIME_DIM!r}, {STATION_DIM!r}),"
            f" got {da.dims}; rename yours, e.g. `ds.rename({{'site': "
            f"'{STATION_DIM}'}})`."
        )
    da = da.transpose(TIME_DIM, STATION_DIM)
    t = model_times(
        _time_coord(ds, da, variable), time_units=time_units, reference=reference
    )
    _check_time_axis(t, TIME_DIM)
    keep, t = _apply_window(t, window, outside, variable, closed)

    data_units = _checked_units(da, variable, units)
    values = np.asarray(da.values, dtype=np.float64)
    values = convert_units(values, data_units, units, variable=variable)
    if np.any(np.isinf(values)):
        raise DataError(
            f"observations `{variable}` contain {int(np.isinf(values).sum())} infinite "
            "value(s); mark missing values with NaN (or the variable's _FillValue)."
        )

    # positions
    names = tuple(position_names or spatial_dims(grid.ndim))
    if len(names) != grid.ndim:
        raise ValueError(
            f"`position_names` must name {grid.ndim} coordinate(s), got {names}."
        )
    cols = []
    for axis, pname in enumerate(names):
        if pname not in ds.variables:
            raise MissingVariableError(
                f"observations: no sensor position variable `{pname}`; a {grid.ndim}D "
                f"grid needs {names} on the `{STATION_DIM}` dimension (found "
                f"{sorted(map(str, ds.variables))})."
            )
        p = ds[pname]
        if p.dims != (STATION_DIM,):
            raise MissingVariableError(
                f"sensor positions `{pname}` must have dims ({STATION_DIM!r},), got "
                f"{p.dims}."
            )
        pu = _checked_units(p, pname, length_units)
        pos = convert_units(
            np.asarray(p.values, dtype=np.float64), pu, length_units, variable=pname
        )
        cols.append(_check_positions(pos, grid, axis, pname, ds))
    positions = np.stack(cols, axis=-1)

    sig = _read_sigma(ds, da, variable, sigma, values.shape[1], data_units, units)

    n_missing = int(np.isnan(values[keep]).sum())
    if n_missing:
        logger.info(
            "`%s`: %d missing (NaN) values kept as missing", variable, n_missing
        )
    if not np.any(keep):
        raise TimeAxisError(
            f"observations `{variable}`: no time is left inside the window {window}."
        )
    dtype = jnp.result_type(float)
    if field is None and "field" in da.attrs:
        field = str(da.attrs["field"])
    return Observations(
        times=jnp.asarray(t[keep], dtype=dtype),
        values=jnp.asarray(values[keep], dtype=dtype),
        positions=jnp.asarray(positions, dtype=dtype),
        sigma=jnp.asarray(sig, dtype=dtype),
        field=field,
    )


def _check_positions(pos, grid, axis, name, ds):
    if not np.all(np.isfinite(pos)):
        raise DataError(f"sensor positions `{name}` contain NaN/Inf values.")
    lo = grid.origin[axis]
    hi = lo + grid.lengths[axis]
    if grid.boundary[axis] == "periodic":
        wrapped = lo + np.mod(pos - lo, grid.lengths[axis])
        n = int(
            np.sum(~np.isclose(wrapped, pos, rtol=0, atol=1e-12 * grid.lengths[axis]))
        )
        if n:
            logger.warning(
                "wrapped %d sensor position(s) `%s` into the periodic domain [%g, %g)",
                n,
                name,
                lo,
                hi,
            )
        return wrapped
    tol = _EDGE_RTOL * grid.lengths[axis]
    near = ((pos < lo) & (pos >= lo - tol)) | ((pos > hi) & (pos <= hi + tol))
    if np.any(near):
        logger.info(
            "snapped %d sensor position(s) `%s` onto the domain edge",
            int(near.sum()),
            name,
        )
        pos = np.where(near, np.clip(pos, lo, hi), pos)
    bad = (pos < lo) | (pos > hi)
    if np.any(bad):
        idx = np.flatnonzero(bad)
        label = ds[STATION_DIM].values[idx[:3]] if STATION_DIM in ds.coords else idx[:3]
        raise DomainError(
            f"{idx.size} sensor(s) lie outside the {grid.boundary[axis]} domain "
            f"[{lo:g}, {hi:g}] along `{name}`: station(s) "
            f"{np.ravel(label).tolist()} at {[float(v) for v in pos[idx[:3]]]}. "
            "Remove them, or fix the grid's "
            "`origin`/`lengths` or the positions' units."
        )
    return pos


def _read_sigma(ds, da, variable, sigma, n_sensors, data_units, units):
    if sigma is None:
        if SIGMA_NAME in ds.variables:
            s = ds[SIGMA_NAME]
            if s.dims not in ((STATION_DIM,), ()):
                raise MissingVariableError(
                    f"`{SIGMA_NAME}` must have dims ({STATION_DIM!r},), got {s.dims}."
                )
            sig = np.asarray(s.values, dtype=np.float64)
            s_units = s.attrs.get("units", data_units)
        elif SIGMA_NAME in da.attrs:
            sig = np.asarray(da.attrs[SIGMA_NAME], dtype=np.float64)
            s_units = data_units
        else:
            raise MissingVariableError(
                f"observations `{variable}` have no error standard deviation: add a "
                f"`{SIGMA_NAME}({STATION_DIM})` variable or a `{SIGMA_NAME}` "
                "attribute, "
                "or pass `sigma=` (config key `observations.sigma`)."
            )
        sig = convert_units(sig, s_units, units, variable=SIGMA_NAME, difference=True)
    else:
        sig = np.asarray(sigma, dtype=np.float64)
    sig = np.broadcast_to(sig, (n_sensors,)) if sig.ndim == 0 else sig
    if sig.shape != (n_sensors,):
        raise ValueError(
            f"`sigma` must be a scalar or have one value per sensor ({n_sensors}), got "
            f"shape {sig.shape}."
        )
    if not np.all(np.isfinite(sig) & (sig > 0)):
        raise DataError(
            f"`sigma` must be positive and finite for every sensor, got min "
            f"{np.min(sig):.3g}; observation errors cannot be zero or negative."
        )
    return np.array(sig)
