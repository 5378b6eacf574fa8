r"""Spatial coordinates of real files: names, orientation, precision, lat-lon geometry.

Gridded products name and store their axes in many ways. Here they are mapped onto
the model grid's dimensions (``x`` in 1D; ``y, x`` in 2D, array order):

* **names**: a dimension is the model's ``y`` if it is called ``y``, ``lat``,
  ``latitude``, ``rlat``, ``nav_lat`` or its coordinate has CF ``axis = "Y"`` or a
  ``standard_name`` of ``latitude``, ``grid_latitude`` or
  ``projection_y_coordinate`` (likewise ``x`` with ``lon``, ``longitude``, ...);
* **orientation**: a descending axis (latitudes stored north to south) is flipped
  to ascending, and the flip is logged;
* **precision**: coordinates stored in float32 are compared with the grid's points
  to a few float32 ulps (:func:`dphys.io.coordinate_tolerance`);
* **geometry**: latitudes and longitudes in degrees become model lengths through
  :class:`TangentPlane`, a local tangent-plane (equirectangular) projection about a
  reference point; without one, degrees are refused as lengths;
* **curvilinear grids** (2-D ``lat(j, i)``/``lon(j, i)`` coordinates, ocean-model
  grids) are refused with :class:`CurvilinearGridError` naming those coordinates:
  dphys grids are uniform and rectilinear.
"""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import xarray as xr

import dphys
from dphys.io import coordinate_tolerance, spatial_dims

from ._errors import GridMismatchError, MissingVariableError, UnitsError
from ._units import _parse, _registry, convert_units


logger = logging.getLogger(__name__)

EARTH_RADIUS = 6_371_000.0  # m, mean radius (IUGG)

_NAMES = {
    "y": ("y", "lat", "latitude", "rlat", "nav_lat", "lat_rho", "yc"),
    "x": ("x", "lon", "longitude", "rlon", "nav_lon", "lon_rho", "xc"),
}
_STANDARD = {
    "y": ("latitude", "grid_latitude", "projection_y_coordinate"),
    "x": ("longitude", "grid_longitude", "projection_x_coordinate"),
}
_DEGREES_NORTH = ("degrees_north", "degree_north", "degrees_n", "degree_n")
_DEGREES_EAST = ("degrees_east", "degree_east", "degrees_e", "degree_e")


class CurvilinearGridError(GridMismatchError):
    """The data lie on a curvilinear grid (2-D latitude/longitude coordinates)."""


@dataclasses.dataclass(frozen=True)
class TangentPlane:
    r"""Latitude/longitude in degrees to lengths on a local tangent plane.

    $$ x = R\cos\varphi_0\,(\lambda - \lambda_0)\,\tfrac{\pi}{180}, \qquad
       y = R\,(\varphi - \varphi_0)\,\tfrac{\pi}{180} $$

    in metres ($R$ the Earth's radius), with $\lambda - \lambda_0$ wrapped into
    $[-180°, 180°)$. The map is linear in each coordinate, so a regular lat-lon grid
    becomes a uniform grid of the model exactly. The metric is exact at latitude
    $\varphi_0$; east-west lengths are off by $\cos\varphi/\cos\varphi_0 - 1$
    elsewhere ($-1.5\%$ at $10°$ of latitude away from a reference at $0°$, $-3.9\%$
    at $45°$ from $40°$): fit for regional domains of a few hundred kilometres, not
    for basin-scale ones (which need spherical metric terms in the model).

    Attributes:
        lat0: reference latitude $\varphi_0$ (degrees north), where model
            ``y = 0``.
        lon0: reference longitude $\lambda_0$ (degrees east), where model
            ``x = 0``.
        radius: the sphere's radius in metres.
    """

    lat0: float
    lon0: float
    radius: float = EARTH_RADIUS

    def __post_init__(self):
        if not (math.isfinite(self.lat0) and -90.0 < self.lat0 < 90.0):
            raise ValueError(f"`lat0` must lie in (-90, 90) degrees, got {self.lat0}.")
        if not math.isfinite(self.lon0):
            raise ValueError(f"`lon0` must be finite, got {self.lon0}.")
        if not (math.isfinite(self.radius) and self.radius > 0):
            raise ValueError(f"`radius` must be positive, got {self.radius}.")

    def metres_per_degree(self, axis: str) -> float:
        """Metres per degree along ``axis`` (``"y"``: latitude, ``"x"``: longitude)."""
        per = self.radius * math.pi / 180.0
        return per if axis == "y" else per * math.cos(math.radians(self.lat0))

    def to_metres(self, axis: str, degrees):
        """Positions in degrees along ``axis`` to metres from the reference point."""
        d = np.asarray(degrees, dtype=np.float64)
        if axis == "y":
            return (d - self.lat0) * self.metres_per_degree("y")
        wrapped = (d - self.lon0 + 180.0) % 360.0 - 180.0
        return wrapped * self.metres_per_degree("x")


def _is_degrees(units) -> bool:
    if units is None:
        return False
    u = str(units).strip().lower()
    if u in _DEGREES_NORTH or u in _DEGREES_EAST or u in ("degree", "degrees", "deg"):
        return True
    return False


def _coord_kind(name: str, var: xr.DataArray | None) -> str | None:
    """``"y"``/``"x"`` if a dimension or coordinate of this name is that axis."""
    attrs = var.attrs if var is not None else {}
    axis = str(attrs.get("axis", "")).upper()
    if axis in ("Y", "X"):
        return axis.lower()
    std = str(attrs.get("standard_name", ""))
    units = str(attrs.get("units", "")).strip().lower()
    for kind in ("y", "x"):
        if std in _STANDARD[kind]:
            return kind
    if units in _DEGREES_NORTH:
        return "y"
    if units in _DEGREES_EAST:
        return "x"
    lname = name.lower()
    for kind in ("y", "x"):
        if lname in _NAMES[kind]:
            return kind
    return None


def check_not_curvilinear(ds: xr.Dataset, da: xr.DataArray, name: str) -> None:
    """Refuse a variable whose horizontal coordinates are 2-D (curvilinear grid)."""
    candidates = dict(da.coords)
    for ref in str(da.attrs.get("coordinates", "")).split():
        if ref in ds.variables:
            candidates[ref] = ds[ref]
    for n, v in ds.variables.items():
        if n not in candidates and _coord_kind(str(n), v) is not None:
            candidates[n] = v
    bad = {}
    for n, v in candidates.items():
        kind = _coord_kind(str(n), v)
        dims_in = [d for d in v.dims if d in da.dims]
        if kind is not None and v.ndim >= 2 and len(dims_in) >= 2:
            bad[str(n)] = v.dims
    if bad:
        listed = ", ".join(f"`{n}{tuple(map(str, dims))}`" for n, dims in bad.items())
        raise CurvilinearGridError(
            f"{name} lies on a curvilinear grid: its horizontal coordinates "
            f"{listed} are 2-D, so its points are not a uniform rectilinear grid and "
            "cannot be matched to a dphys.Grid. Regrid it to a regular latitude-"
            "longitude or x-y grid first (e.g. with xESMF or `xarray.Dataset.interp`)."
        )


def spatial_map(da: xr.DataArray, ndim: int, name: str) -> dict[str, str]:
    """``{data dim: model dim}`` for the spatial dimensions of ``da``.

    Raises:
        MissingVariableError: an axis is not found, or found twice.
    """
    want = spatial_dims(ndim)
    found: dict[str, str] = {}
    for d in da.dims:
        d = str(d)
        kind = _coord_kind(d, da.coords.get(d))
        if kind is None or kind not in want:
            continue
        if kind in found.values():
            other = next(k for k, v in found.items() if v == kind)
            raise MissingVariableError(
                f"{name} has two dimensions for the model's `{kind}` axis: "
                f"`{other}` and `{d}`; select one of them (e.g. `.isel({d}=0)`)."
            )
        found[d] = kind
    missing = [k for k in want if k not in found.values()]
    if missing:
        raise MissingVariableError(
            f"{name} has dims {tuple(map(str, da.dims))} (missing {missing}): no "
            f"dimension is the model's {missing} axis. Spatial dimensions are "
            "recognised by name "
            f"({', '.join(_NAMES[missing[0]][:5])}) or by CF attributes of their "
            "coordinate (`axis`, `standard_name`, `units = degrees_north/east`); "
            f"rename yours, e.g. `ds.rename({{'old': '{missing[0]}'}})`."
        )
    return found


def to_model_axes(
    da: xr.DataArray,
    grid: dphys.Grid,
    *,
    name: str,
    length_units: str | None,
    geometry: TangentPlane | None,
) -> tuple[xr.DataArray, dict[str, tuple]]:
    """Rename ``da``'s spatial dims to the model's, flip descending axes, and convert
    their coordinates to model lengths.

    Returns:
        ``(da, coords)``: ``da`` with model dimension names and ascending axes;
        ``coords[dim] = (values in model length units, stored dtype, tolerance in
        model length units)`` for each dimension that has a coordinate.
    """
    mapping = spatial_map(da, grid.ndim, name)
    da = da.rename({d: m for d, m in mapping.items() if d != m})
    coords = {}
    for dim in spatial_dims(grid.ndim):
        if dim not in da.coords:
            continue
        c = da[dim]
        stored = np.asarray(c.values)
        if stored.size > 1 and np.all(np.diff(stored.astype(np.float64)) < 0):
            logger.info("%s: flipped descending axis `%s` to ascending", name, dim)
            da = da.isel({dim: slice(None, None, -1)})
            c = da[dim]
            stored = np.asarray(c.values)
        values, scale = _to_length(c, stored, dim, name, length_units, geometry)
        spacing = (
            float(np.median(np.abs(np.diff(stored.astype(np.float64)))))
            if stored.size > 1
            else 1.0
        )
        tol = coordinate_tolerance(stored.dtype, stored, spacing) * abs(scale)
        coords[dim] = (values, stored.dtype, tol)
    return da, coords


def _to_length(c, stored, dim, name, length_units, geometry):
    """Coordinate values in model length units and d(model)/d(stored)."""
    units = c.attrs.get("units")
    values = stored.astype(np.float64)
    if _is_degrees(units) or (
        geometry is not None
        and units is None
        and str(c.attrs.get("standard_name", "")) in ("latitude", "longitude")
    ):
        if geometry is None:
            raise UnitsError(
                f"{name}: the `{dim}` coordinate is in {units!r}: degrees are not "
                "lengths. Give the model a lat-lon geometry (config key "
                "`model.grid.geographic_origin = [lat0, lon0]`, or "
                "`geometry=TangentPlane(lat0, lon0)`): model lengths are then "
                "distances from that point on its tangent plane."
            )
        metres = geometry.to_metres(dim, values)
        scale = geometry.metres_per_degree(dim)
        if length_units is not None:
            to_m = convert_units(1.0, "m", length_units, variable=dim)
            metres = metres * to_m
            scale *= to_m
        return metres, scale
    from ._units import _checked_units

    cu = _checked_units(c, dim, length_units)
    out = convert_units(values, cu, length_units, variable=dim)
    scale = 1.0
    if cu is not None and length_units is not None:
        a, b = _parse(cu), _parse(length_units)
        if a is not None and b is not None and a.dimensionality == b.dimensionality:
            scale = float(_registry().Quantity(1.0, a).to(b).magnitude)
    return np.asarray(out, dtype=np.float64), scale


def check_axis(values, tol, grid: dphys.Grid, axis: int, what: str, dtype) -> None:
    """Raise unless ``values`` are the grid's points along ``axis`` to ``tol``."""
    dim = spatial_dims(grid.ndim)[axis]
    expect = grid.axis_coords(axis)
    if values.size != expect.size:
        raise GridMismatchError(
            f"{what}'s `{dim}` has {values.size} points but the model grid has "
            f"{expect.size} ({grid.boundary[axis]} axis, length "
            f"{grid.lengths[axis]}); regrid the data or fix the grid's shape."
        )
    tol = max(tol, 1e-9 * grid.spacing[axis])
    diff = np.abs(values - expect)
    err = float(np.max(diff)) if diff.size else 0.0
    if not err <= tol:
        i = int(np.argmax(diff))
        raise GridMismatchError(
            f"{what}'s `{dim}` coordinate does not match the model grid: got "
            f"[{values[0]:.10g}, ..., {values[-1]:.10g}], expected "
            f"[{expect[0]:.10g}, ..., {expect[-1]:.10g}] (point {i}: "
            f"{values[i]:.10g} vs {expect[i]:.10g}; max difference {err:.3g}, "
            f"tolerance {tol:.3g} for {np.dtype(dtype)} coordinates; "
            f"{grid.boundary[axis]} points, spacing {grid.spacing[axis]:.6g}). Check "
            "the grid's origin, lengths and boundary kind (Dirichlet grids store "
            "interior points, Neumann grids cell centres)."
        )
