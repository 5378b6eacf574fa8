"""Units: conversions by pint, from CF/UDUNITS strings; nothing guessed.

CF ``units`` attributes are UDUNITS strings (``"m s-1"``, ``"kg m-3"``, ``"degC"``,
``"days"``). They are rewritten into pint's syntax (``"m s-1"`` -> ``"m * s**-1"``)
and converted by a :class:`pint.UnitRegistry`: every conversion pint knows between
units of the same dimension works (``g m-3`` to ``kg m-3``, ``km h-1`` to
``m s-1``, ``degF`` to ``K``); units of different dimensions, or unknown ones, are
refused with a :class:`UnitsError`.
"""

from __future__ import annotations

import functools
import logging
import re

import xarray as xr

from ._errors import (
    UnitsError,
)


logger = logging.getLogger(__name__)


# CF spellings pint does not read as such; everything else goes to pint as written.
_ALIASES: dict[str, str] = {
    **dict.fromkeys(("1", "", "-", "dimensionless", "none"), "dimensionless"),
    **dict.fromkeys(
        (
            "degc",
            "deg_c",
            "celsius",
            "°c",
            "c",
            "degree_celsius",
            "degrees_celsius",
            "degree_c",
            "degrees_c",
        ),
        "degC",
    ),
    **dict.fromkeys(("k", "kelvins", "degk", "deg_k"), "kelvin"),
    **dict.fromkeys(
        ("degrees_north", "degree_north", "degrees_n", "degree_n", "degreesn"),
        "degree",
    ),
    **dict.fromkeys(
        ("degrees_east", "degree_east", "degrees_e", "degree_e", "degreese"), "degree"
    ),
    **dict.fromkeys(("hrs",), "hour"),
    **dict.fromkeys(("secs",), "second"),
    **dict.fromkeys(("mins",), "minute"),
}

# UDUNITS writes powers as trailing integers ("m2 s-1") and products with spaces or
# dots; pint wants "**" and "*".
_POWER = re.compile(r"^([A-Za-z_°]+)\^?(-?\d+)$")
_PRODUCT = re.compile(r"\s+|(?<=[A-Za-z\d])\.(?=[A-Za-z])")


@functools.lru_cache(maxsize=1)
def _registry():
    import pint

    ureg = pint.UnitRegistry(autoconvert_offset_to_baseunit=True)
    # CF's "day" is exactly 86400 s, as in pint; "d" is pint's day too
    return ureg


def _pint_text(units: str) -> str:
    text = str(units).strip()
    alias = _ALIASES.get(text.lower())
    if alias is not None:
        return alias
    parts = [p for p in _PRODUCT.split(text) if p]
    parts = [_ALIASES.get(p.lower(), _POWER.sub(r"\1**\2", p)) for p in parts]
    return " * ".join(parts)


@functools.lru_cache(maxsize=256)
def _parse(units: str):
    """The pint unit of a CF units string, or None if pint does not know it."""
    import pint

    try:
        return _registry().Unit(_pint_text(units))
    except (pint.errors.PintError, AttributeError, TypeError, ValueError, SyntaxError):
        return None


def _same(a: str, b: str) -> bool:
    return str(a).strip() == str(b).strip() or (
        _pint_text(a) == _pint_text(b) and _parse(a) is not None
    )


@functools.lru_cache(maxsize=256)
def unit_conversion(from_units: str, to_units: str, *, variable: str = "data"):
    """``(scale, offset)`` with ``value_to = value_from * scale + offset``.

    Any two units of the same dimension that pint knows, written as in CF/UDUNITS
    (``"m s-1"``, ``"kg m-3"``, ``"degC"``, ``"hours"``, ``"1"``). Identical strings
    always match, known or not.

    Raises:
        UnitsError: the units are of different quantities or unknown.
    """
    if _same(from_units, to_units):
        return 1.0, 0.0
    a, b = _parse(from_units), _parse(to_units)
    if a is not None and b is not None and a.dimensionality == b.dimensionality:
        q = _registry().Quantity
        zero = float(q(0.0, a).to(b).magnitude)
        one = float(q(1.0, a).to(b).magnitude)
        return one - zero, zero
    unknown = [u for u, p in ((from_units, a), (to_units, b)) if p is None]
    why = (
        f" ({' and '.join(repr(u) for u in unknown)} not a unit pint knows)"
        if unknown
        else f" ({a.dimensionality} vs {b.dimensionality})"
    )
    raise UnitsError(
        f"`{variable}` has units {from_units!r} but the model uses {to_units!r} and "
        f"there is no known conversion between them{why}. Convert the data to "
        f"{to_units!r} (and set its `units` attribute), or set the model's units to "
        f"{from_units!r}."
    )


def time_unit_seconds(units: str | None) -> float | None:
    """Seconds in one ``units`` if it is a unit of time (``"ms"``, ``"hours"``,
    ``"days"``, ...), else None."""
    if units is None:
        return None
    u = _parse(units)
    if u is None or u.dimensionality != _registry().second.dimensionality:
        return None
    return float(_registry().Quantity(1.0, u).to("second").magnitude)


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


_STANDARD_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def check_standard_name(name: str, units: str | None, *, variable: str) -> str:
    """``name`` if it can be the CF ``standard_name`` of data in ``units``.

    The name must be well formed (lower case, digits, underscores). For the
    names in :data:`STANDARD_NAME_UNITS` the units must be of the same quantity as
    the canonical units of the CF table (``sea_surface_height_above_geoid`` is a
    length, ``eastward_sea_water_velocity`` a speed).

    Raises:
        UnitsError: a malformed name, no units, or units of another quantity.
    """
    from ._names import STANDARD_NAME_UNITS

    if not isinstance(name, str) or not _STANDARD_NAME.match(name):
        raise UnitsError(
            f"`{variable}` standard name must be a CF standard name (lower case "
            f"letters, digits and underscores, e.g. 'sea_surface_temperature'), got "
            f"{name!r}."
        )
    if units is None:
        raise UnitsError(
            f"`{variable}` has standard name {name!r} but no units; CF requires the "
            "units of a standard-named variable. Set the model's units."
        )
    canonical = STANDARD_NAME_UNITS.get(name)
    if canonical is not None:
        try:
            unit_conversion(units, canonical, variable=variable)
        except UnitsError:
            raise UnitsError(
                f"`{variable}` has units {units!r}, which cannot be the units of CF "
                f"standard name {name!r} (canonical units {canonical!r}). Give the "
                "standard name of the quantity the field holds, or none."
            ) from None
    return name
