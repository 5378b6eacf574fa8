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

from .._checks import EDGE_RTOL, check_positive, sensors_in_domain
from .._observation import Observations
from ._errors import (
    DataError,
    DomainError,
    MissingVariableError,
    TimeAxisError,
)
from ._geo import (
    TangentPlane,
    _coord_kind,
    _to_length,
    check_not_curvilinear,
    spatial_map,
    to_model_axes,
)
from ._names import SIGMA_NAME, STATION_DIM
from ._readers import _rename_time, _time_coord, _variable, opened
from ._time import _apply_window, _check_time_axis, model_times
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
    geometry: TangentPlane | None = None,
) -> Observations:
    r"""Read sensor records or a gridded field into :class:`assimilation.Observations`.

    Two layouts: sensors, ``(time, station)`` with positions on ``station``; or a
    gridded field ``(time, y, x)`` (``(time, x)`` in 1D), e.g. a satellite analysis,
    whose every grid point becomes a sensor at that point (it need not be the model
    grid). NaN is missing; a grid point missing at every time (land) or outside the
    model domain is never assimilated (logged with counts). Dimensions and
    positions named ``lat``/``latitude``/``lon``/``longitude`` (or with CF ``axis``
    / ``standard_name``) are recognised; degrees need ``geometry``.

    Args:
        source: a netCDF path or an :class:`xarray.Dataset` (see the module
            docstring).
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
        geometry: a :class:`TangentPlane` to read positions in degrees.

    Returns:
        :class:`Observations` in model units and model time (NaN values kept).

    Raises:
        MissingVariableError, UnitsError, TimeAxisError, DomainError, DataError: see
        the module docstring.
    """
    if closed not in ("both", "right"):
        raise ValueError(f"`closed` must be 'both' or 'right', got {closed!r}.")
    with opened(source) as ds:
        da = _variable(ds, variable, "observations")
        ds, da = _rename_time(ds, da)
        if STATION_DIM in da.dims and TIME_DIM in da.dims and da.ndim == 2:
            t, values, positions, sig, data_units = _read_stations(
                ds,
                da,
                grid,
                variable=variable,
                sigma=sigma,
                units=units,
                length_units=length_units,
                time_units=time_units,
                reference=reference,
                window=window,
                outside=outside,
                closed=closed,
                position_names=position_names,
                geometry=geometry,
            )
        elif (
            TIME_DIM in da.dims
            and da.ndim == 1 + grid.ndim
            and _has_spatial_dims(da, grid)
        ):
            t, values, positions, sig, data_units = _read_gridded(
                ds,
                da,
                grid,
                variable=variable,
                sigma=sigma,
                units=units,
                length_units=length_units,
                time_units=time_units,
                reference=reference,
                window=window,
                outside=outside,
                closed=closed,
                geometry=geometry,
            )
        else:
            raise MissingVariableError(
                f"observations `{variable}` must have dims ({TIME_DIM!r}, "
                f"{STATION_DIM!r}) (sensors) or ({TIME_DIM!r}, "
                f"{', '.join(map(repr, spatial_dims(grid.ndim)))}) (a gridded field "
                f"such as a satellite analysis), got {tuple(map(str, da.dims))}; "
                f"rename yours, e.g. `ds.rename({{'site': '{STATION_DIM}'}})`."
            )
    if np.any(np.isinf(values)):
        raise DataError(
            f"observations `{variable}` contain {int(np.isinf(values).sum())} infinite "
            "value(s); mark missing values with NaN (or the variable's _FillValue)."
        )
    n_missing = int(np.isnan(values).sum())
    if n_missing:
        logger.info(
            "`%s`: %d missing (NaN) values kept as missing", variable, n_missing
        )
    if values.shape[0] == 0:
        raise TimeAxisError(
            f"observations `{variable}`: no time is left inside the window {window}."
        )
    dtype = jnp.result_type(float)
    if field is None and "field" in da.attrs:
        field = str(da.attrs["field"])
    return Observations(
        times=jnp.asarray(t, dtype=dtype),
        values=jnp.asarray(values, dtype=dtype),
        positions=jnp.asarray(positions, dtype=dtype),
        sigma=jnp.asarray(sig, dtype=dtype),
        field=field,
    )


def _has_spatial_dims(da, grid) -> bool:
    try:
        spatial_map(da, grid.ndim, "")
    except MissingVariableError:
        return False
    return True


def _times(ds, da, variable, time_units, reference, window, outside, closed):
    t = model_times(
        _time_coord(ds, da, variable), time_units=time_units, reference=reference
    )
    _check_time_axis(t, TIME_DIM)
    keep, t = _apply_window(t, window, outside, variable, closed)
    return np.flatnonzero(keep), t[keep]


def _read_stations(
    ds,
    da,
    grid,
    *,
    variable,
    sigma,
    units,
    length_units,
    time_units,
    reference,
    window,
    outside,
    closed,
    position_names,
    geometry,
):
    da = da.transpose(TIME_DIM, STATION_DIM)
    keep, t = _times(ds, da, variable, time_units, reference, window, outside, closed)
    data_units = _checked_units(da, variable, units)
    values = np.asarray(da.isel({TIME_DIM: keep}).values, dtype=np.float64)
    values = convert_units(values, data_units, units, variable=variable)

    # positions: named as the model's axes, or recognised (lat/lon, CF attributes)
    names = tuple(position_names or spatial_dims(grid.ndim))
    if len(names) != grid.ndim:
        raise ValueError(
            f"`position_names` must name {grid.ndim} coordinate(s), got {names}."
        )
    cols, pnames = [], []
    for axis, pname in enumerate(names):
        if pname not in ds.variables and position_names is None:
            pname = _find_position(ds, spatial_dims(grid.ndim)[axis]) or pname
        if pname not in ds.variables:
            raise MissingVariableError(
                f"observations: no sensor position variable `{pname}`; a {grid.ndim}D "
                f"grid needs {names} (or latitude/longitude with a geometry) on the "
                f"`{STATION_DIM}` dimension (found {sorted(map(str, ds.variables))})."
            )
        p = ds[pname]
        if p.dims != (STATION_DIM,):
            raise MissingVariableError(
                f"sensor positions `{pname}` must have dims ({STATION_DIM!r},), got "
                f"{p.dims}."
            )
        stored = np.asarray(p.values)
        pos, _ = _to_length(
            p,
            stored,
            spatial_dims(grid.ndim)[axis],
            f"sensor positions `{pname}`",
            length_units,
            geometry,
        )
        cols.append(pos)
        pnames.append(pname)
    labels = ds[STATION_DIM].values if STATION_DIM in ds.coords else None
    positions, wrapped, snapped = sensors_in_domain(
        np.stack(cols, axis=-1),
        grid,
        pnames,
        labels=labels,
        error=DomainError,
        fix="remove them, or fix the grid's `origin`/`lengths` or the positions' units",
    )
    for pname, n in wrapped.items():
        logger.warning(
            "wrapped %d sensor position(s) `%s` into the periodic domain", n, pname
        )
    for pname, n in snapped.items():
        logger.info("snapped %d sensor position(s) `%s` onto the domain edge", n, pname)
    sig = _read_sigma(ds, da, variable, sigma, values.shape[1], data_units, units)
    return t, values, positions, sig, data_units


def _find_position(ds, dim):
    """A variable on the station dimension that is the model's ``dim`` axis."""
    for n, v in ds.variables.items():
        if v.dims == (STATION_DIM,) and _coord_kind(str(n), v) == dim:
            return str(n)
    return None


def _read_gridded(
    ds,
    da,
    grid,
    *,
    variable,
    sigma,
    units,
    length_units,
    time_units,
    reference,
    window,
    outside,
    closed,
    geometry,
):
    """A gridded field of observations (e.g. a satellite analysis) as sensors.

    Every grid point of the data is a sensor at that point; NaN is missing, and a
    point missing at every time (land in an ocean product) or outside the model
    domain is dropped (logged with counts): it is never assimilated.
    """
    what = f"observations `{variable}`"
    check_not_curvilinear(ds, da, what)
    da, coords = to_model_axes(
        da, grid, name=what, length_units=length_units, geometry=geometry
    )
    sdims = spatial_dims(grid.ndim)
    missing = [d for d in sdims if d not in coords]
    if missing:
        raise MissingVariableError(
            f"{what} are gridded but have no coordinate values for {missing}; the "
            "positions of the points are needed. Add coordinate variables (with "
            "`units`)."
        )
    da = da.transpose(TIME_DIM, *sdims)
    keep, t = _times(ds, da, variable, time_units, reference, window, outside, closed)
    data_units = _checked_units(da, variable, units)
    raw = np.asarray(da.isel({TIME_DIM: keep}).values, dtype=np.float64)
    n_t = raw.shape[0]
    values = raw.reshape(n_t, -1)
    axes = np.meshgrid(*(coords[d][0] for d in sdims), indexing="ij")
    positions = np.stack([a.ravel() for a in axes], axis=-1)

    sig = _gridded_sigma(ds, da, variable, sigma, sdims, data_units, units, keep)
    sig = np.broadcast_to(sig, raw.shape[1:]).reshape(-1)

    use = ~np.all(np.isnan(values), axis=0) if n_t else np.zeros(values.shape[1], bool)
    n_never = int(np.sum(~use))
    inside = np.ones(positions.shape[0], dtype=bool)
    for axis in range(grid.ndim):
        lo = grid.origin[axis]
        hi = lo + grid.lengths[axis]
        if grid.boundary[axis] == "periodic":
            positions[:, axis] = lo + np.mod(
                positions[:, axis] - lo, grid.lengths[axis]
            )
        else:
            tol = EDGE_RTOL * grid.lengths[axis]
            positions[:, axis] = np.where(
                (positions[:, axis] >= lo - tol) & (positions[:, axis] <= hi + tol),
                np.clip(positions[:, axis], lo, hi),
                positions[:, axis],
            )
            inside &= (positions[:, axis] >= lo) & (positions[:, axis] <= hi)
    n_outside = int(np.sum(use & ~inside))
    use &= inside
    if n_never:
        logger.info(
            "%s: %d of %d grid point(s) missing at every time (e.g. land) are not "
            "assimilated",
            what,
            n_never,
            values.shape[1],
        )
    if n_outside:
        logger.warning(
            "%s: %d grid point(s) outside the model domain are not assimilated",
            what,
            n_outside,
        )
    if not np.any(use):
        raise DataError(
            f"{what}: no grid point is both observed and inside the model domain "
            f"({n_never} always missing, {n_outside} outside); check the domain, "
            "the geometry and the window."
        )
    values = convert_units(values[:, use], data_units, units, variable=variable)
    return t, values, positions[use], sig[use], data_units


def _gridded_sigma(ds, da, variable, sigma, sdims, data_units, units, keep):
    if sigma is not None:
        sig = np.asarray(sigma, dtype=np.float64)
        if sig.ndim != 0:
            raise ValueError(
                f"`sigma` of gridded observations must be a scalar, got shape "
                f"{sig.shape}; put a per-point `{SIGMA_NAME}` variable in the file."
            )
    elif SIGMA_NAME in ds.variables:
        s = ds[SIGMA_NAME]
        if s.ndim and TIME_DIM in s.dims:
            raise MissingVariableError(
                f"`{SIGMA_NAME}` must not vary in time (dims {s.dims}); give one "
                "error standard deviation per grid point or a scalar."
            )
        if s.ndim:
            s = s.rename(
                {d: m for d, m in spatial_map(s, len(sdims), SIGMA_NAME).items()}
            )
            s = (
                s.transpose(*sdims).reindex_like(da.isel({TIME_DIM: 0}), method=None)
                if all(d in s.coords for d in sdims)
                else s.transpose(*sdims)
            )
        sig = np.asarray(s.values, dtype=np.float64)
        sig = convert_units(
            sig,
            s.attrs.get("units", data_units),
            units,
            variable=SIGMA_NAME,
            difference=True,
        )
    elif SIGMA_NAME in da.attrs:
        sig = np.asarray(da.attrs[SIGMA_NAME], dtype=np.float64)
        sig = convert_units(
            sig, data_units, units, variable=SIGMA_NAME, difference=True
        )
    else:
        raise MissingVariableError(
            f"observations `{variable}` have no error standard deviation: add a "
            f"`{SIGMA_NAME}` variable or attribute, or pass `sigma=` (config key "
            "`observations.sigma`)."
        )
    ok = np.isfinite(sig) & (sig > 0)
    if not np.all(ok):
        raise DataError(
            f"`sigma` must be positive and finite at every point, got min "
            f"{np.nanmin(sig):.3g}; observation errors cannot be zero or negative."
        )
    return sig


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
    check_positive(
        sig,
        "sigma",
        fix="Observation errors cannot be zero or negative.",
        error=DataError,
    )
    return np.array(sig)
