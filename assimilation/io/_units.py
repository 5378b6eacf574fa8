"""Units: known exact conversions (temperature, length, time), nothing guessed."""

from __future__ import annotations

import logging

import xarray as xr

from ._errors import (
    UnitsError,
)


logger = logging.getLogger(__name__)


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
