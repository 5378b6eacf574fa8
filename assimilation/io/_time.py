"""Time axes: CF dates in any calendar to model time; order and window checks."""

from __future__ import annotations

import datetime as _dt
import logging
import re

import cftime
import numpy as np
import xarray as xr

from dphys.io import (
    TIME_DIM,
)

from .._checks import check_time_axis, times_in_window
from ._errors import (
    TimeAxisError,
    UnitsError,
)
from ._units import convert_units, time_unit_seconds


logger = logging.getLogger(__name__)


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
        seconds = time_unit_seconds(time_units)
        if seconds is None:
            raise UnitsError(
                f"`{name}` holds dates but the model's `time_units` is "
                f"{time_units!r}, not a time unit; set `time_units` (e.g. 's', 'h', "
                "'days') so dates can be converted to model time."
            )
        return seconds

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
        # Any CF "<unit> since <date>" (microseconds to days, any calendar) is
        # decoded by cftime itself, then counted in seconds from the reference.
        unit_word, since = _SINCE.match(str(units)).groups()
        if time_unit_seconds(unit_word) is None:
            raise UnitsError(
                f"`{name}` has units {units!r}; {unit_word!r} is not a unit of time "
                "(e.g. milliseconds, seconds, minutes, hours, days)."
            )
        ref = _reference_date(since if reference is None else reference, calendar)
        try:
            dates = cftime.num2date(
                np.asarray(values, dtype=np.float64),
                str(units),
                calendar=calendar,
                only_use_cftime_datetimes=True,
            )
            seconds = cftime.date2num(
                dates,
                f"seconds since {ref.isoformat().replace('T', ' ')}",
                calendar=calendar,
            )
        except (ValueError, TypeError) as err:
            raise TimeAxisError(
                f"`{name}`: cannot decode units {units!r} in the {calendar!r} "
                f"calendar: {err}"
            ) from err
        out = np.asarray(seconds, dtype=np.float64) / model_seconds()
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
    check_time_axis(
        t,
        name,
        fix_duplicates=f"merge or drop them, e.g. `ds.drop_duplicates('{name}')`",
        fix_order=f"sort the data, e.g. `ds.sortby('{name}')`",
        error=TimeAxisError,
        unit=" (model time)",
    )


def _apply_window(t: np.ndarray, window, outside: str, name: str, closed="both"):
    """``(keep, t)``: a mask of the times to keep and the times, with those within
    round-off of an edge snapped onto it; raise or log for times outside.

    ``closed="both"``: the window is $[t_0, t_1]$; ``"right"``: $(t_0, t_1]$, so that
    consecutive windows share no observation (a time on $t_0$ belongs to the
    window before)."""
    if outside not in ("error", "drop"):
        raise ValueError(f"`outside` must be 'error' or 'drop', got {outside!r}.")
    if window is None:
        return np.ones(t.shape, dtype=bool), t
    keep, t, n_snapped = times_in_window(
        t,
        window,
        name,
        outside=outside,
        fix="select the window's data first (`ds.sel(time=slice(...))`), widen the "
        "window, or drop them with `outside='drop'`",
        error=TimeAxisError,
        closed=closed,
    )
    if n_snapped:
        logger.info("snapped %d time(s) of `%s` onto the window edges", n_snapped, name)
    n_out = int(np.sum(~keep))
    if n_out:
        logger.warning(
            "dropped %d of %d times of `%s` outside the window [%g, %g]",
            n_out,
            t.size,
            name,
            *window,
        )
    return keep, t
