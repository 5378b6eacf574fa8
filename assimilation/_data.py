r"""Observations and gridded fields from xarray / netCDF, validated at the boundary.

Data enter the package here and nowhere else. Everything that can be wrong with a
file is checked before any number reaches a cost function, and every problem ends in
a :class:`~dphys.io.DataError` (a ``ValueError``) that names the variable, says what
was received and how to fix it, or in a documented correction that is logged (module
logger ``assimilation._data``) with a count:

| problem | default | correction (opt-in) |
|---|---|---|
| missing variable / coordinate / dimension | :class:`MissingVariableError` | - |
| grid coordinates differ from the model grid | :class:`GridMismatchError` | - |
| ``units`` differ from the model's | converted if known, else :class:`UnitsError` | - |
| no ``units`` attribute | assumed to be the model's (logged) | - |
| times not strictly increasing | :class:`TimeAxisError` | - |
| times outside the assimilation window | :class:`TimeAxisError` | ``outside="drop"`` |
| sensor outside a non-periodic axis | :class:`DomainError` | - |
| sensor outside a periodic axis | wrapped into the domain (logged) | - |
| NaN values | kept: NaN means missing and is masked in the cost | - |

Known unit conversions: K and degC; m, km, cm, mm; s, min, h, day (with the usual
spellings, e.g. ``"hours"``, ``"celsius"``). Anything else must match exactly.

Observation files hold one sensor (station) dimension:

.. code-block:: text

    dimensions: time, station
    variables:  u(time, station)                  # any name; NaN = missing
                x(station) [, y(station)]          # sensor positions
                time(time)  units = "days since 2000-01-01", calendar = "noleap"
                sigma(station) or u:sigma           # optional error std

Times are converted to model time: ``(t - reference)`` in the model's ``time_units``,
for every CF calendar (``standard``, ``noleap``, ``360_day``, ...) through
:mod:`cftime`. Gridded fields (backgrounds, truths) are ``(time, y, x)`` or
``(y, x)`` arrays whose coordinates must be the model grid's points.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import cftime
import jax.numpy as jnp
import numpy as np
import xarray as xr

import dphys
from dphys.io import (
    TIME_DIM,
    DataError,
    DomainError,
    GridMismatchError,
    MissingVariableError,
    TimeAxisError,
    UnitsError,
    check_grid_coords,
    read_netcdf,
    spatial_dims,
)

from ._observation import Observations


__all__ = [
    "STATION_DIM",
    "DataError",
    "DomainError",
    "GridMismatchError",
    "MissingVariableError",
    "TimeAxisError",
    "UnitsError",
    "convert_units",
    "model_times",
    "observations_to_dataset",
    "open_dataset",
    "read_field",
    "read_observations",
    "unit_conversion",
]

logger = logging.getLogger(__name__)

STATION_DIM = "station"
SIGMA_NAME = "sigma"

# -- units -----------------------------------------------------------------------------
# canonical name -> (quantity, scale, offset): value_in_base = value * scale + offset,
# with bases K, m, s. Only exact, unambiguous conversions are listed; anything else
# is refused rather than guessed.
_UNITS: dict[str, tuple[str, float, float]] = {
    "K": ("temperature", 1.0, 0.0),
    "degC": ("temperature", 1.0, 273.15),
    "m": ("length", 1.0, 0.0),
    "km": ("length", 1e3, 0.0),
    "cm": ("length", 1e-2, 0.0),
    "mm": ("length", 1e-3, 0.0),
    "s": ("time", 1.0, 0.0),
    "min": ("time", 60.0, 0.0),
    "h": ("time", 3600.0, 0.0),
    "d": ("time", 86400.0, 0.0),
    "1": ("dimensionless", 1.0, 0.0),
}
_ALIASES: dict[str, str] = {
    **{a: "K" for a in ("k", "kelvin", "kelvins", "degk", "deg_k")},
    **{
        a: "degC"
        for a in (
            "degc",
            "deg_c",
            "celsius",
            "°c",
            "c",
            "degree_celsius",
            "degrees_celsius",
            "degree_c",
            "degrees_c",
        )
    },
    **{a: "m" for a in ("m", "meter", "meters", "metre", "metres")},
    **{a: "km" for a in ("km", "kilometer", "kilometers", "kilometre", "kilometres")},
    **{a: "cm" for a in ("cm", "centimeter", "centimeters", "centimetre")},
    **{a: "mm" for a in ("mm", "millimeter", "millimeters", "millimetre")},
    **{a: "s" for a in ("s", "sec", "secs", "second", "seconds")},
    **{a: "min" for a in ("min", "mins", "minute", "minutes")},
    **{a: "h" for a in ("h", "hr", "hrs", "hour", "hours")},
    **{a: "d" for a in ("d", "day", "days")},
    **{a: "1" for a in ("1", "", "-", "dimensionless")},
}


def _canonical(units: str) -> str:
    key = str(units).strip()
    return _ALIASES.get(key.lower(), key)


def unit_conversion(from_units: str, to_units: str, *, variable: str = "data"):
    """``(scale, offset)`` with ``value_to = value_from * scale + offset``.

    Known units: K and degC; m, km, cm, mm; s, min, h, day (with the usual aliases,
    e.g. ``"hours"``, ``"celsius"``, ``"metres"``); ``"1"`` (dimensionless). Identical
    strings always match.

    Raises:
        UnitsError: the units are of different quantities or unknown.
    """
    a, b = _canonical(from_units), _canonical(to_units)
    if a == b:
        return 1.0, 0.0
    if a in _UNITS and b in _UNITS and _UNITS[a][0] == _UNITS[b][0]:
        _, sa, oa = _UNITS[a]
        _, sb, ob = _UNITS[b]
        return sa / sb, (oa - ob) / sb
    raise UnitsError(
        f"`{variable}` has units {from_units!r} but the model uses {to_units!r} and "
        "there is no known conversion between them. Convert the data to "
        f"{to_units!r} (and set its `units` attribute), or set the model's units to "
        f"{from_units!r}."
    )


def convert_units(
    values,
    from_units: str | None,
    to_units: str | None,
    *,
    variable: str = "data",
    difference: bool = False,
):
    """Convert ``values`` between units (see :func:`unit_conversion`).

    ``difference=True`` converts a difference or a standard deviation (scale only,
    no offset: 1 degC of error is 1 K of error). ``None`` on either side means
    "unknown": the values are returned unchanged (and the assumption is logged).
    """
    if from_units is None or to_units is None:
        return values
    scale, offset = unit_conversion(from_units, to_units, variable=variable)
    if scale == 1.0 and (offset == 0.0 or difference):
        return values
    logger.info("converted `%s` from %r to %r", variable, from_units, to_units)
    return values * scale if difference else values * scale + offset


def _checked_units(da: xr.DataArray, name: str, model_units: str | None) -> str | None:
    """The data's ``units`` attribute, or the model's (logged) when absent."""
    got = da.attrs.get("units")
    if got is None:
        if model_units is not None:
            logger.warning(
                "`%s` has no `units` attribute; assuming the model's units %r",
                name,
                model_units,
            )
        return model_units
    return str(got)


# -- time axes -------------------------------------------------------------------------
_SINCE = re.compile(r"^\s*(\w+)\s+since\s+(.+?)\s*$")


def _reference_date(reference, calendar: str):
    """``reference`` (ISO string, datetime or cftime) as a date in ``calendar``."""
    if isinstance(reference, cftime.datetime):
        text = reference.isoformat()
    elif isinstance(reference, (_dt.datetime, _dt.date)):
        text = reference.isoformat()
    elif isinstance(reference, np.datetime64):
        text = str(np.datetime_as_string(reference, unit="s"))
    else:
        text = str(reference)
    text = text.replace("T", " ")
    try:
        return cftime.num2date(0, f"seconds since {text}", calendar=calendar)
    except (ValueError, TypeError) as err:
        raise TimeAxisError(
            f"`reference` {reference!r} is not a valid date in the {calendar!r} "
            f"calendar ({err}); give an ISO date such as '2000-01-01T00:00:00'."
        ) from err


def model_times(
    time: xr.DataArray,
    *,
    time_units: str | None,
    reference=None,
    name: str = TIME_DIM,
) -> np.ndarray:
    r"""Convert a time coordinate to model time, float64 numbers in ``time_units``.

    Handles, in this order:

    * CF-encoded numbers, ``units = "<unit> since <date>"`` with an optional
      ``calendar`` attribute (any cftime calendar: ``standard``/``gregorian``,
      ``proleptic_gregorian``, ``noleap``/``365_day``, ``all_leap``, ``360_day``,
      ``julian``): $t = (\text{date} - \text{reference})$ in ``time_units``, counted in
      that calendar. ``reference=None`` uses the ``since`` date.
    * already decoded ``datetime64`` or cftime objects (needs ``reference``);
    * plain numbers with ``units`` such as ``"s"``, ``"hours"``, ``"days"``
      (converted), no ``units`` (taken as model time, logged) or ``"1"``.

    Args:
        time: the time coordinate.
        time_units: the model's time unit (``"s"``, ``"h"``, ``"d"``, ...); ``"1"``
            for dimensionless model time; ``None`` to take plain numbers as they are
            (no unit check).
        reference: the date of model time 0 (e.g. the window start).
        name: the variable name used in error messages.

    Raises:
        UnitsError: dates given but the model time unit is dimensionless/unknown.
        TimeAxisError: a bad reference date, or non-finite times.
    """
    values = time.values
    units = time.attrs.get("units", time.encoding.get("units"))
    calendar = str(
        time.attrs.get("calendar", time.encoding.get("calendar", "standard"))
    )

    def model_seconds():
        unit = _canonical(time_units or "1")
        if unit not in _UNITS or _UNITS[unit][0] != "time":
            raise UnitsError(
                f"`{name}` holds dates but the model's `time_units` is "
                f"{time_units!r}, not a time unit; set `time_units` (e.g. 's', 'h', "
                "'days') so dates can be converted to model time."
            )
        return _UNITS[unit][1]

    if np.issubdtype(values.dtype, np.datetime64):
        if reference is None:
            raise TimeAxisError(
                f"`{name}` holds decoded dates; pass `reference` (the date of model "
                "time 0, e.g. the window start) to convert them to model time."
            )
        ref = np.datetime64(_reference_date(reference, "standard").isoformat())
        seconds = (values - ref) / np.timedelta64(1, "s")
        out = np.asarray(seconds, dtype=np.float64) / model_seconds()
    elif values.dtype == object:
        if values.size == 0 or not isinstance(values.flat[0], cftime.datetime):
            raise TimeAxisError(
                f"`{name}` has object dtype but does not hold cftime dates "
                f"(first value {values.flat[0] if values.size else None!r})."
            )
        if reference is None:
            raise TimeAxisError(
                f"`{name}` holds decoded dates; pass `reference` (the date of model "
                "time 0, e.g. the window start) to convert them to model time."
            )
        cal = values.flat[0].calendar
        ref = _reference_date(reference, cal)
        seconds = cftime.date2num(
            values, f"seconds since {ref.isoformat()}", calendar=cal
        )
        out = np.asarray(seconds, dtype=np.float64) / model_seconds()
    elif units is not None and _SINCE.match(str(units)):
        unit_word, since = _SINCE.match(str(units)).groups()
        try:
            unit_seconds = _UNITS[_canonical(unit_word)][1]
            if _UNITS[_canonical(unit_word)][0] != "time":
                raise KeyError(unit_word)
        except KeyError:
            raise UnitsError(
                f"`{name}` has units {units!r}; its time unit {unit_word!r} is not one "
                "of seconds, minutes, hours, days."
            ) from None
        ref = _reference_date(since if reference is None else reference, calendar)
        try:
            ref_num = cftime.date2num(ref, str(units), calendar=calendar)
        except ValueError as err:
            raise TimeAxisError(
                f"`{name}`: cannot decode units {units!r}: {err}"
            ) from err
        out = (np.asarray(values, dtype=np.float64) - float(ref_num)) * (
            unit_seconds / model_seconds()
        )
    else:
        if units is None:
            logger.warning(
                "`%s` has no `units` attribute; taking it as model time (%s)",
                name,
                time_units or "dimensionless",
            )
        numbers = np.asarray(values, dtype=np.float64)
        out = convert_units(numbers, units, time_units, variable=name, difference=True)
        if reference is not None and units is not None:
            raise TimeAxisError(
                f"`{name}` holds plain numbers ({units!r}), not dates, so `reference` "
                f"{reference!r} cannot apply; drop `reference` or encode the times as "
                "'<unit> since <date>'."
            )
    out = np.asarray(out, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(out)):
        bad = int(np.sum(~np.isfinite(out)))
        raise TimeAxisError(f"`{name}` has {bad} non-finite time value(s).")
    return out


def _check_time_axis(t: np.ndarray, name: str) -> None:
    diffs = np.diff(t)
    if np.any(diffs == 0):
        i = int(np.argmax(diffs == 0))
        raise TimeAxisError(
            f"`{name}` has duplicate times: entries {i} and {i + 1} are both "
            f"{t[i]:.6g} (model time); merge or drop them, e.g. "
            f"`ds.drop_duplicates('{name}')`."
        )
    if np.any(diffs < 0):
        i = int(np.argmax(diffs < 0))
        raise TimeAxisError(
            f"`{name}` is not increasing: entry {i + 1} ({t[i + 1]:.6g}) comes after "
            f"entry {i} ({t[i]:.6g}) (model time); sort the data, e.g. "
            f"`ds.sortby('{name}')`."
        )


# Times and positions within this fraction of the window length / domain length
# outside it are snapped onto its edge (logged) rather than refused: values stored
# as float32, or converted between units, miss an edge by a few ulps.
_EDGE_RTOL = 1e-6


def _apply_window(t: np.ndarray, window, outside: str, name: str):
    """``(keep, t)``: a mask of the times to keep and the times, with those within
    round-off of an edge snapped onto it; raise or log for times outside."""
    if outside not in ("error", "drop"):
        raise ValueError(f"`outside` must be 'error' or 'drop', got {outside!r}.")
    keep = np.ones(t.shape, dtype=bool)
    if window is None:
        return keep, t
    t0, t1 = (float(w) for w in window)
    if not t1 >= t0:
        raise ValueError(
            f"`window` must be (start, end) with end >= start, got {window}."
        )
    tol = _EDGE_RTOL * max(t1 - t0, 1e-3 * max(abs(t0), abs(t1), 1.0))
    near = ((t < t0) & (t >= t0 - tol)) | ((t > t1) & (t <= t1 + tol))
    if np.any(near):
        logger.info(
            "snapped %d time(s) of `%s` within %.3g of the window edges onto them",
            int(near.sum()),
            name,
            tol,
        )
        t = np.where(near, np.clip(t, t0, t1), t)
    keep = (t >= t0) & (t <= t1)
    n_out = int(np.sum(~keep))
    if n_out and outside == "error":
        first = float(t[~keep][0])
        raise TimeAxisError(
            f"`{name}` has {n_out} of {t.size} times outside the assimilation window "
            f"[{t0:.6g}, {t1:.6g}] (model time), e.g. {first:.6g}. Select the window's "
            "data first (`ds.sel(time=slice(...))`), widen the window, or drop them "
            "with `outside='drop'`."
        )
    if n_out:
        logger.warning(
            "dropped %d of %d times of `%s` outside the window [%g, %g]",
            n_out,
            t.size,
            name,
            t0,
            t1,
        )
    return keep, t


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
    keep, t = _apply_window(t, window, outside, variable)

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


# -- writing ---------------------------------------------------------------------------
def observations_to_dataset(
    obs: Observations,
    *,
    variable: str = "u",
    units: str | None = None,
    length_units: str | None = None,
    time_units: str | None = None,
    reference=None,
    calendar: str = "standard",
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    """Observations as a CF dataset in the layout :func:`read_observations` reads.

    With ``reference`` (a date) the times are written CF-encoded as
    ``"<time_units> since <reference>"`` in ``calendar``; otherwise as model time.
    """
    ndim = int(np.shape(obs.positions)[1])
    pos = np.asarray(obs.positions)
    t = np.asarray(obs.times, dtype=np.float64)
    time_attrs: dict[str, Any] = {"standard_name": "time", "axis": "T"}
    if reference is not None:
        if (
            time_units is None
            or _canonical(time_units) not in _UNITS
            or _UNITS[_canonical(time_units)][0] != "time"
        ):
            raise UnitsError(
                f"`time_units` must be a time unit to write dates, got {time_units!r}."
            )
        word = {"s": "seconds", "min": "minutes", "h": "hours", "d": "days"}[
            _canonical(time_units)
        ]
        ref = _reference_date(reference, calendar)
        time_attrs.update(
            units=f"{word} since {ref.isoformat().replace('T', ' ')}", calendar=calendar
        )
    else:
        time_attrs.update(units=time_units or "1", long_name="model time")
    value_attrs = {"long_name": f"observed {variable}"}
    if getattr(obs, "field", None) is not None:
        value_attrs["field"] = obs.field
    if units is not None:
        value_attrs["units"] = units
    pos_attrs = {"units": length_units or "1"}
    coords = {
        TIME_DIM: xr.DataArray(t, dims=(TIME_DIM,), attrs=time_attrs),
        STATION_DIM: xr.DataArray(
            np.arange(pos.shape[0]),
            dims=(STATION_DIM,),
            attrs={"long_name": "sensor index"},
        ),
    }
    for axis, name in enumerate(spatial_dims(ndim)):
        coords[name] = xr.DataArray(
            pos[:, axis],
            dims=(STATION_DIM,),
            attrs={**pos_attrs, "long_name": f"sensor {name} position"},
        )
    data = {
        variable: xr.DataArray(
            np.asarray(obs.values), dims=(TIME_DIM, STATION_DIM), attrs=value_attrs
        ),
        SIGMA_NAME: xr.DataArray(
            np.asarray(obs.sigma),
            dims=(STATION_DIM,),
            attrs={
                "long_name": "observation error standard deviation",
                **({"units": units} if units is not None else {}),
            },
        ),
    }
    return xr.Dataset(
        data, coords=coords, attrs={"Conventions": "CF-1.8", **(attrs or {})}
    )


# -- analysis output -------------------------------------------------------------------
ITERATION_DIM = "iteration"
PARAMETER_DIM = "parameter"


def _state_vars(prefix, state, grid, units, long_name):
    """One variable per state field: ``prefix`` (single array) or ``prefix_<field>``."""
    from dphys.io import to_dataset

    ds = to_dataset(state, grid, name=prefix, units=units)
    out = {}
    for name in ds.data_vars:
        new = name if name == prefix else f"{prefix}_{name}"
        da = ds[name].drop_vars(list(ds[name].coords))
        da.attrs["long_name"] = long_name + ("" if name == prefix else f" ({name})")
        out[new] = da
    return out


def _time_coordinate(times, time_units, reference, calendar):
    attrs: dict[str, Any] = {"standard_name": "time", "axis": "T"}
    unit = _canonical(time_units) if time_units else None
    if reference is not None and unit in ("s", "min", "h", "d"):
        word = {"s": "seconds", "min": "minutes", "h": "hours", "d": "days"}[unit]
        ref = _reference_date(reference, calendar)
        attrs.update(
            units=f"{word} since {ref.isoformat().replace('T', ' ')}", calendar=calendar
        )
    else:
        attrs.update(units=time_units or "1", long_name="model time")
    return xr.DataArray(
        np.asarray(times, dtype=np.float64), dims=(TIME_DIM,), attrs=attrs
    )


def analysis_to_dataset(
    analysis,
    grid: dphys.Grid,
    obs: Observations,
    *,
    units: str | None = None,
    length_units: str | None = None,
    time_units: str | None = None,
    reference=None,
    calendar: str = "standard",
    truth: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    parameter_units: Mapping[str, str] | None = None,
) -> xr.Dataset:
    r"""An :class:`assimilation.Analysis` as a CF-1.8 dataset.

    Variables (single-field states; a multi-field state gets one variable per field,
    ``analysis_eta``, ``analysis_u``, ...):

    * ``analysis``, ``background``, ``increment`` ($x_a - x_b$) at the window start;
      ``analysis_std`` (posterior std, when available); ``analysis_final``,
      ``background_final`` (forecasts at the window end); ``truth``,
      ``truth_final`` for twin experiments;
    * per calibrated parameter ``p``: ``p`` (analysis), ``p_background``,
      ``p_increment``, ``p_std`` and ``p_std_unconstrained`` (Laplace posterior),
      ``p_truth`` (twin), ``p_history(iteration, ...)``;
      ``parameter_correlation(parameter, parameter2)`` between all scalar entries;
    * convergence ``cost``, ``background_cost``, ``obs_cost``, ``grad_norm``,
      ``step_norm``, ``inner_iterations``, ``elapsed`` on ``iteration``;
    * the observations ``obs(time, station)``, ``sigma(station)``, sensor positions
      ``station_x`` (``station_y``), and the residuals ``obs_minus_background`` and
      ``obs_minus_analysis`` (NaN where missing).

    Global attributes: the grid (as :func:`dphys.io.grid_attrs`), the method,
    termination reason and message, costs, twin scores, and whatever ``attrs``
    holds (the CLI adds ``history``, ``source`` and the full configuration).
    """
    from dphys.io import grid_attrs, grid_coords

    data: dict[str, xr.DataArray] = {}
    data.update(
        _state_vars(
            "analysis", analysis.initial_state, grid, units, "analysis initial state"
        )
    )
    data.update(
        _state_vars(
            "background",
            analysis.background_state,
            grid,
            units,
            "background initial state",
        )
    )
    if "initial_state" in analysis.increments:
        data.update(
            _state_vars(
                "increment",
                analysis.increments["initial_state"],
                grid,
                units,
                "analysis increment of the initial state",
            )
        )
    if analysis.initial_state_std is not None:
        data.update(
            _state_vars(
                "analysis_std",
                analysis.initial_state_std,
                grid,
                units,
                "posterior standard deviation of the initial state",
            )
        )
    data.update(
        _state_vars(
            "analysis_final",
            analysis.final_state,
            grid,
            units,
            "forecast from the analysis at the window end",
        )
    )
    data.update(
        _state_vars(
            "background_final",
            analysis.background_final_state,
            grid,
            units,
            "forecast from the background at the window end",
        )
    )
    if truth is not None:
        data.update(
            _state_vars("truth", truth["state0"], grid, units, "true initial state")
        )
        data.update(
            _state_vars(
                "truth_final",
                truth["final"],
                grid,
                units,
                "true state at the window end",
            )
        )

    sdims = spatial_dims(grid.ndim)

    def param_dims(value, lead=()):
        shape = np.shape(value)[len(lead) :]
        if shape == ():
            return lead
        if shape == grid.shape:
            return (*lead, *sdims)
        raise ValueError(f"parameter of shape {shape} is neither scalar nor a field")

    for name, value in analysis.parameters.items():
        value = np.asarray(value)
        pu = (parameter_units or {}).get(name)
        pu = {"units": pu} if pu else {}
        data[name] = xr.DataArray(
            value,
            dims=param_dims(value),
            attrs={"long_name": f"analysis of parameter {name}", **pu},
        )
        bg = np.asarray(analysis.background_parameters[name])
        data[f"{name}_background"] = xr.DataArray(
            bg, dims=param_dims(bg), attrs={"long_name": f"background {name}", **pu}
        )
        inc = np.asarray(analysis.increments.get(name, value - bg))
        data[f"{name}_increment"] = xr.DataArray(
            inc,
            dims=param_dims(inc),
            attrs={"long_name": f"analysis increment of {name}", **pu},
        )
        if analysis.parameter_std is not None:
            s = np.asarray(analysis.parameter_std[name])
            data[f"{name}_std"] = xr.DataArray(
                s,
                dims=param_dims(s),
                attrs={
                    "long_name": f"posterior standard deviation of {name} (Laplace, "
                    "delta method)",
                    **pu,
                },
            )
            su = np.asarray(analysis.parameter_std_unconstrained[name])
            data[f"{name}_std_unconstrained"] = xr.DataArray(
                su,
                dims=param_dims(su),
                attrs={
                    "long_name": f"posterior standard deviation of the "
                    f"transformed (unconstrained) {name}"
                },
            )
        if truth is not None and name in truth.get("parameters", {}):
            tv = np.asarray(truth["parameters"][name])
            data[f"{name}_truth"] = xr.DataArray(
                tv, dims=param_dims(tv), attrs={"long_name": f"true {name}", **pu}
            )
        hist = np.asarray(analysis.history.parameters[name])
        data[f"{name}_history"] = xr.DataArray(
            hist,
            dims=param_dims(hist, (ITERATION_DIM,)),
            attrs={"long_name": f"{name} at each iteration", **pu},
        )
    if analysis.parameter_correlation is not None and analysis.parameter_labels:
        data["parameter_correlation"] = xr.DataArray(
            np.asarray(analysis.parameter_correlation),
            dims=(PARAMETER_DIM, PARAMETER_DIM + "2"),
            coords={
                PARAMETER_DIM: list(analysis.parameter_labels),
                PARAMETER_DIM + "2": list(analysis.parameter_labels),
            },
            attrs={
                "long_name": "posterior correlation between parameter entries",
                "units": "1",
            },
        )

    hist = analysis.history
    for key, long_name, u in (
        ("cost", "4D-Var cost J = Jb + Jo", "1"),
        ("background_cost", "background term Jb", "1"),
        ("obs_cost", "observation term Jo", "1"),
        ("grad_norm", "norm of the gradient in the whitened control space", "1"),
        ("step_norm", "norm of the control step", "1"),
        ("inner_iterations", "inner (CG or line-search) iterations", "1"),
        ("elapsed", "wall-clock time since the start", "s"),
    ):
        data[key] = xr.DataArray(
            np.asarray(getattr(hist, key)),
            dims=(ITERATION_DIM,),
            attrs={"long_name": long_name, "units": u},
        )

    pos = np.asarray(obs.positions)
    station = {
        STATION_DIM: xr.DataArray(
            np.arange(pos.shape[0]),
            dims=(STATION_DIM,),
            attrs={"long_name": "sensor index"},
        )
    }
    for axis, dim in enumerate(sdims):
        data[f"station_{dim}"] = xr.DataArray(
            pos[:, axis],
            dims=(STATION_DIM,),
            attrs={"long_name": f"sensor {dim} position", "units": length_units or "1"},
        )
    value_attrs = {"units": units} if units is not None else {}
    for key, values, long_name in (
        ("obs", obs.values, "observed values (NaN: missing)"),
        (
            "obs_minus_background",
            analysis.obs_minus_background,
            "observation minus background forecast",
        ),
        (
            "obs_minus_analysis",
            analysis.obs_minus_analysis,
            "observation minus analysis forecast",
        ),
    ):
        data[key] = xr.DataArray(
            np.asarray(values),
            dims=(TIME_DIM, STATION_DIM),
            attrs={"long_name": long_name, **value_attrs},
        )
    data["sigma"] = xr.DataArray(
        np.asarray(obs.sigma),
        dims=(STATION_DIM,),
        attrs={"long_name": "observation error standard deviation", **value_attrs},
    )

    coords = {
        **grid_coords(grid, length_units=length_units),
        **station,
        TIME_DIM: _time_coordinate(obs.times, time_units, reference, calendar),
        ITERATION_DIM: xr.DataArray(
            np.arange(hist.n_iterations + 1),
            dims=(ITERATION_DIM,),
            attrs={"long_name": "iteration (0: start)"},
        ),
    }
    gattrs: dict[str, Any] = {
        "Conventions": "CF-1.8",
        "title": "dphys 4D-Var analysis",
        **grid_attrs(grid),
        "method": analysis.method,
        "termination": analysis.termination,
        "converged": int(bool(analysis.converged)),
        "n_iterations": int(analysis.n_iterations),
        "cost_background": float(analysis.cost_background),
        "cost_analysis": float(analysis.cost_analysis),
        "message": analysis.message,
    }
    for key, value in (scores or {}).items():
        if isinstance(value, Mapping):
            for name, v in value.items():
                gattrs[f"{key}_{name}"] = float(v)
        else:
            gattrs[key] = float(value)
    if attrs:
        gattrs.update(attrs)
    return xr.Dataset(data, coords=coords, attrs=gattrs)
