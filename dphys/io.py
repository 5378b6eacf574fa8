r"""Grids, states and trajectories to and from xarray / netCDF, with CF attributes.

This is one of the few modules that import :mod:`xarray`: the numerical core works on
arrays and pytrees, and data meet the outside world only here (and in
:mod:`assimilation`'s data, batch and command-line modules).

Layout of a dataset written by :func:`to_dataset`:

* dimensions ``time`` (when states are time-stacked) and the spatial dimensions
  ``x`` (1D) or ``y, x`` (2D, array order), named by the module-level constants
  :data:`TIME_DIM`, :data:`X_DIM`, :data:`Y_DIM`;
* coordinate variables ``x`` (and ``y``) holding :meth:`dphys.Grid.axis_coords`
  exactly, with ``units``, ``axis``, ``long_name`` and the axis's boundary kind;
* one data variable per state field: a single-array state is called ``u`` (or the
  ``name`` you pass); a multi-field state such as shallow water's ``(eta, u, v)``
  gives the variables ``eta``, ``u`` and ``v``;
* for a :class:`dphys.Trajectory`, the saved states ``ys`` on ``(time, y, x)`` and the
  final state as ``<field>_final`` on ``(y, x)``, with ``result`` and ``stats`` as
  attributes;
* the grid as global attributes ``grid_shape``, ``grid_lengths``, ``grid_boundary``
  (space-separated kinds) and ``grid_origin``, so :func:`grid_from_dataset` rebuilds
  the exact :class:`dphys.Grid`.

Everything round-trips exactly: ``from_dataset(to_dataset(traj, grid))`` returns the
same arrays (bit for bit, same dtype), the same grid and the same stats, also through
a netCDF file (:func:`write_netcdf` / :func:`read_netcdf`).

Example:
    >>> import dphys, dphys.io, jax.numpy as jnp
    >>> grid = dphys.Grid(16, lengths=1.0, boundary="neumann")
    >>> ds = dphys.io.to_dataset(jnp.zeros(16), grid, units="K")
    >>> ds["u"].dims
    ('x',)
    >>> dphys.io.grid_from_dataset(ds) == grid
    True
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import sys
import tempfile
import threading
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import xarray as xr

from ._grid import Grid
from ._results import RESULTS
from ._simulate import Trajectory


__all__ = [
    "CONVENTIONS",
    "DataError",
    "GridMismatchError",
    "MissingVariableError",
    "TIME_DIM",
    "X_DIM",
    "atomic_write",
    "Y_DIM",
    "check_grid_coords",
    "coordinate_tolerance",
    "from_dataset",
    "grid_attrs",
    "grid_coords",
    "grid_from_attrs",
    "grid_from_dataset",
    "netcdf_lock",
    "open_netcdf",
    "read_netcdf",
    "spatial_dims",
    "to_dataset",
    "write_netcdf",
]

logger = logging.getLogger(__name__)


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


# Read once at import: changing the umask to read it is not thread-safe, and files
# are written from worker threads in batch runs.
_UMASK = _read_umask()

# netCDF-C and HDF5 are not thread-safe: two threads opening or reading files at the
# same time crash the process (segmentation faults in `open_store_variable`). Every
# netCDF access of dphys goes through this one re-entrant lock; batches run their
# cases in worker *processes* by default, each with its own copy of the libraries.
_NETCDF_LOCK = threading.RLock()


def netcdf_lock() -> threading.RLock:
    """The process-wide lock around every netCDF open, read and write of dphys.

    Hold it (``with dphys.io.netcdf_lock(): ...``) around your own netCDF4/xarray
    file access when it can run in threads next to dphys's (e.g. a threaded Dask
    cluster): the netCDF-C and HDF5 libraries are not thread-safe.
    """
    return _NETCDF_LOCK


# -- names: every xarray name used by dphys lives here ---------------------------------
TIME_DIM = "time"
X_DIM = "x"
Y_DIM = "y"
DEFAULT_NAME = "u"
FINAL_SUFFIX = "_final"
CONVENTIONS = "CF-1.8"
GRID_SHAPE_ATTR = "grid_shape"
GRID_LENGTHS_ATTR = "grid_lengths"
GRID_BOUNDARY_ATTR = "grid_boundary"
GRID_ORIGIN_ATTR = "grid_origin"
KIND_ATTR = "dphys_kind"  # "states" or "trajectory"
FIELDS_ATTR = "dphys_fields"  # space-separated state field names, in pytree order
STATE_TYPE_ATTR = "dphys_state_type"  # "module.QualName" of a multi-field state
RESULT_ATTR = "dphys_result"
STATS_ATTR = "dphys_stats"  # JSON: {key: [kind, value, dtype]}
_AXIS_LETTERS = {X_DIM: "X", Y_DIM: "Y"}


# -- errors ----------------------------------------------------------------------------
class DataError(ValueError):
    """Base class of every input-data error (a ``ValueError``).

    The command line turns these into a one-line message and exit status 2.
    """


class MissingVariableError(DataError):
    """A required variable, coordinate, dimension or attribute is absent."""


class GridMismatchError(DataError):
    """Coordinates or shapes in the data do not match the model's grid."""


# The errors of observation data (units, time axes, sensor positions) belong to the
# data-assimilation layer: `assimilation.io.UnitsError`, `TimeAxisError`, `DomainError`.
_MOVED = {
    "UnitsError": "assimilation.io.UnitsError",
    "TimeAxisError": "assimilation.io.TimeAxisError",
    "DomainError": "assimilation.io.DomainError",
}


def __getattr__(name):
    # The core never imports the assimilation layer, so the moved classes are not
    # re-exported: an old import fails with a message naming the new location. An
    # ImportError (not AttributeError, which `from dphys.io import X` would replace
    # with a generic "cannot import name") so that both spellings show it.
    if name in _MOVED:
        raise ImportError(
            f"`dphys.io.{name}` moved to the data-assimilation layer: use "
            f"`{_MOVED[name]}` (also `assimilation.{name}`)."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- grids -----------------------------------------------------------------------------
def spatial_dims(ndim: int) -> tuple[str, ...]:
    """Dimension names of an ``ndim``-dimensional grid, in array order."""
    if ndim == 1:
        return (X_DIM,)
    if ndim == 2:
        return (Y_DIM, X_DIM)
    raise ValueError(f"`ndim` must be 1 or 2, got {ndim}.")


def grid_attrs(grid: Grid) -> dict[str, Any]:
    """The grid as netCDF-storable attributes (numbers, arrays and strings only)."""
    return {
        GRID_SHAPE_ATTR: np.asarray(grid.shape, dtype=np.int64),
        GRID_LENGTHS_ATTR: np.asarray(grid.lengths, dtype=np.float64),
        GRID_BOUNDARY_ATTR: " ".join(grid.boundary),
        GRID_ORIGIN_ATTR: np.asarray(grid.origin, dtype=np.float64),
    }


def grid_from_attrs(attrs: Mapping[str, Any], *, source: str = "dataset") -> Grid:
    """Rebuild a :class:`dphys.Grid` from attributes written by :func:`grid_attrs`.

    Raises:
        MissingVariableError: a ``grid_*`` attribute is absent.
        GridMismatchError: the attributes are inconsistent (e.g. different lengths).
    """
    names = (GRID_SHAPE_ATTR, GRID_LENGTHS_ATTR, GRID_BOUNDARY_ATTR, GRID_ORIGIN_ATTR)
    missing = [n for n in names if n not in attrs]
    if missing:
        raise MissingVariableError(
            f"{source} has no grid attribute(s) {missing}; it was not written by "
            "dphys.io.to_dataset. Pass the grid explicitly (e.g. `grid=` or the "
            "config's [model.grid] section)."
        )
    shape = tuple(int(n) for n in np.atleast_1d(attrs[GRID_SHAPE_ATTR]))
    lengths = tuple(float(v) for v in np.atleast_1d(attrs[GRID_LENGTHS_ATTR]))
    origin = tuple(float(v) for v in np.atleast_1d(attrs[GRID_ORIGIN_ATTR]))
    boundary = tuple(str(attrs[GRID_BOUNDARY_ATTR]).split())
    if not len(shape) == len(lengths) == len(origin) == len(boundary):
        raise GridMismatchError(
            f"{source}'s grid attributes disagree on the number of axes: "
            f"shape={shape}, "
            f"lengths={lengths}, origin={origin}, boundary={boundary}."
        )
    try:
        return Grid(shape, lengths=lengths, boundary=boundary, origin=origin)
    except ValueError as err:
        raise GridMismatchError(
            f"{source}'s grid attributes are invalid: {err}"
        ) from err


def grid_coords(
    grid: Grid, *, length_units: str | None = None
) -> dict[str, xr.DataArray]:
    """Coordinate variables of ``grid``: ``{"x": ...}`` or ``{"y": ..., "x": ...}``."""
    coords = {}
    for axis, dim in enumerate(spatial_dims(grid.ndim)):
        coords[dim] = xr.DataArray(
            grid.axis_coords(axis),
            dims=(dim,),
            attrs={
                "units": length_units or "1",
                "axis": _AXIS_LETTERS[dim],
                "long_name": f"{dim} coordinate of the grid points",
                "boundary": grid.boundary[axis],
            },
        )
    return coords


def grid_from_dataset(ds: xr.Dataset) -> Grid:
    """The :class:`dphys.Grid` stored in ``ds``'s attributes, checked against coords.

    Raises:
        MissingVariableError: no grid attributes.
        GridMismatchError: the coordinates in ``ds`` are not the grid's points.
    """
    grid = grid_from_attrs(ds.attrs)
    check_grid_coords(ds, grid)
    return grid


def check_grid_coords(
    ds: xr.Dataset | xr.DataArray,
    grid: Grid,
    *,
    rtol: float = 1e-9,
    what: str = "dataset",
) -> None:
    """Raise unless the spatial coordinates of ``ds`` are exactly ``grid``'s points.

    Coordinates are compared explicitly (size, then values to ``rtol`` of the
    spacing), never by xarray alignment, which would silently inner-join two
    mismatched grids to their overlap.

    Raises:
        MissingVariableError: a spatial dimension of the grid is absent from ``ds``.
        GridMismatchError: a coordinate has the wrong size or values.
    """
    for axis, dim in enumerate(spatial_dims(grid.ndim)):
        if dim not in ds.dims:
            raise MissingVariableError(
                f"{what} has no dimension `{dim}` (dims: {tuple(ds.dims)}); a "
                f"{grid.ndim}D field needs dims {spatial_dims(grid.ndim)}. Rename "
                f"yours with `ds.rename({{'old': '{dim}'}})`."
            )
        n = ds.sizes[dim]
        expect = grid.axis_coords(axis)
        if n != expect.size:
            raise GridMismatchError(
                f"{what}'s `{dim}` has {n} points but the model grid has "
                f"{expect.size} ({grid.boundary[axis]} axis, length "
                f"{grid.lengths[axis]}); regrid the data or fix the grid's shape."
            )
        if dim not in ds.coords:
            continue  # sizes agree and there is nothing else to compare
        stored = np.asarray(ds[dim].values)
        got = stored.astype(np.float64)
        err = np.max(np.abs(got - expect)) if n else 0.0
        tol = coordinate_tolerance(stored.dtype, expect, grid.spacing[axis], rtol)
        if not err <= tol:
            i = int(np.argmax(np.abs(got - expect)))
            raise GridMismatchError(
                f"{what}'s `{dim}` coordinate does not match the model grid: got "
                f"[{got[0]:.10g}, ..., {got[-1]:.10g}], expected [{expect[0]:.10g}, "
                f"..., {expect[-1]:.10g}] (point {i}: {got[i]:.10g} vs "
                f"{expect[i]:.10g}; max difference {err:.3g}, tolerance {tol:.3g} for "
                f"{stored.dtype} coordinates; {grid.boundary[axis]} points, spacing "
                f"{grid.spacing[axis]:.6g}). Check the grid's origin, "
                "lengths and boundary kind (Dirichlet grids store interior points, "
                "Neumann grids cell centres)."
            )


def coordinate_tolerance(dtype, expect, spacing: float, rtol: float = 1e-9) -> float:
    """How far stored coordinates may lie from the grid's points.

    ``rtol`` of the spacing for float64 coordinates; for lower precision (float32
    coordinates are common in satellite and reanalysis products) a few ulps of the
    largest coordinate magnitude too, since rounding to float32 moves a point by up
    to half an ulp of its value, whatever the spacing.
    """
    tol = rtol * float(spacing)
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating) and dtype.itemsize < 8:
        scale = float(np.max(np.abs(expect))) if np.size(expect) else 0.0
        tol = max(tol, 4.0 * float(np.finfo(dtype).eps) * max(scale, float(spacing)))
    return tol


# -- states ----------------------------------------------------------------------------
def _key_name(key) -> str:
    for attr in ("name", "key", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _field_names(state, name: str) -> list[str]:
    """One variable name per leaf of ``state``: its field path joined by ``_``."""
    paths = [path for path, _ in jtu.tree_flatten_with_path(state)[0]]
    if len(paths) == 1 and not paths[0]:
        return [name]
    names = ["_".join(_key_name(k) for k in path) for path in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"state fields {names} give duplicate variable names.")
    return names


def _state_type(state) -> str | None:
    if isinstance(state, (jax.Array, np.ndarray, dict, list, tuple)) or state is None:
        return None
    cls = type(state)
    return f"{cls.__module__}.{cls.__qualname__}"


def _units_for(units, field: str) -> str | None:
    if units is None or isinstance(units, str):
        return units
    return units.get(field)


def _to_numpy(leaf) -> np.ndarray:
    return np.asarray(jax.device_get(leaf))


def _data_vars(tree, names, dims_for, units, long_name_suffix=""):
    out = {}
    for name, leaf in zip(names, jtu.tree_leaves(tree), strict=True):
        arr = _to_numpy(leaf)
        attrs = {"long_name": f"{name}{long_name_suffix}"}
        u = _units_for(units, name)
        if u is not None:
            attrs["units"] = u
        out[name] = xr.DataArray(arr, dims=dims_for(name, arr), attrs=attrs)
    return out


def to_dataset(
    obj,
    grid: Grid,
    *,
    ts=None,
    name: str = DEFAULT_NAME,
    units: str | Mapping[str, str] | None = None,
    time_units: str | None = None,
    length_units: str | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> xr.Dataset:
    r"""Convert a state, a time-stacked state or a :class:`dphys.Trajectory` to xarray.

    Args:
        obj: one of

            * a :class:`dphys.Trajectory` (its ``ys`` on ``(time, ...)``, its ``final``
              state, ``result`` and ``stats``);
            * a state (an array of ``grid.shape`` or a pytree of such arrays) when
              ``ts`` is ``None``;
            * time-stacked states (leading axis time) when ``ts`` is given.
        grid: the grid the states live on (or a model with a ``grid`` attribute).
        ts: times of time-stacked states, shape ``(n_times,)``.
        name: variable name of a single-array state (multi-field states use their
            field names).
        units: ``units`` attribute of the state variables: one string, or a mapping
            ``{field: units}``.
        time_units: ``units`` of the time coordinate (default ``"1"``: model time).
        length_units: ``units`` of the spatial coordinates (default ``"1"``).
        attrs: extra global attributes.

    Returns:
        An :class:`xarray.Dataset` with CF attributes and the grid in its attributes.

    Raises:
        ValueError: a leaf's trailing shape is not ``grid.shape``, or ``ts`` does not
            match the leading axis.
    """
    grid = getattr(grid, "grid", grid)
    if not isinstance(grid, Grid):
        raise TypeError(
            f"`grid` must be a dphys.Grid or a model with a `.grid`, got "
            f"{type(grid).__name__}."
        )
    sdims = spatial_dims(grid.ndim)
    gattrs: dict[str, Any] = {"Conventions": CONVENTIONS, **grid_attrs(grid)}
    coords: dict[str, Any] = dict(grid_coords(grid, length_units=length_units))
    time_attrs = {"units": time_units or "1", "long_name": "model time"}
    if " since " in str(time_units):
        # CF: a `time` standard name needs a reference date in its units
        time_attrs.update(axis="T", standard_name="time")

    def check_leaf(label, arr, lead):
        if arr.shape[lead:] != grid.shape or arr.ndim != lead + grid.ndim:
            raise ValueError(
                f"`{label}` has shape {arr.shape}; expected "
                f"{'(n_times, ) + ' if lead else ''}{grid.shape} to match the grid."
            )

    if isinstance(obj, Trajectory):
        final = obj.final
        names = _field_names(final, name)
        for n in names:
            if n in sdims or n == TIME_DIM:
                raise ValueError(f"state field `{n}` clashes with a dimension name.")
        data = {}
        for n, leaf in zip(names, jtu.tree_leaves(final), strict=True):
            check_leaf(f"traj.final ({n})", _to_numpy(leaf), 0)
        data.update(
            _data_vars(
                final,
                [n + FINAL_SUFFIX for n in names],
                lambda n, a: sdims,
                _prefixless(units, FINAL_SUFFIX),
                " (final state)",
            )
        )
        if obj.ys is not None:
            ts_arr = _to_numpy(obj.ts)
            ys_names = _field_names(obj.ys, name)

            def ys_dims(n, arr):
                if arr.shape[1:] == grid.shape:
                    return (TIME_DIM, *sdims)
                return (TIME_DIM, *(f"{n}_dim{i}" for i in range(arr.ndim - 1)))

            data.update(_data_vars(obj.ys, ys_names, ys_dims, units))
            coords[TIME_DIM] = xr.DataArray(ts_arr, dims=(TIME_DIM,), attrs=time_attrs)
            gattrs[FIELDS_ATTR] = " ".join(ys_names)
            stype = _state_type(obj.ys)
        else:
            # ts still carries the saved-time dtype; keep it so the round trip is exact
            gattrs["dphys_ts_dtype"] = str(_to_numpy(obj.ts).dtype)
            gattrs[FIELDS_ATTR] = ""
            stype = None
        gattrs["dphys_final_fields"] = " ".join(names)
        final_type = _state_type(final)
        if final_type is not None:
            gattrs["dphys_final_type"] = final_type
        gattrs[KIND_ATTR] = "trajectory"
        gattrs[RESULT_ATTR] = _result_name(obj.result)
        gattrs[STATS_ATTR] = _stats_to_json(obj.stats)
    else:
        names = _field_names(obj, name)
        for n in names:
            if n in sdims or n == TIME_DIM:
                raise ValueError(f"state field `{n}` clashes with a dimension name.")
        lead = 0 if ts is None else 1
        for n, leaf in zip(names, jtu.tree_leaves(obj), strict=True):
            check_leaf(n if n == name else f"state field {n}", _to_numpy(leaf), lead)
        dims = sdims if ts is None else (TIME_DIM, *sdims)
        data = _data_vars(obj, names, lambda n, a: dims, units)
        if ts is not None:
            ts_arr = np.atleast_1d(_to_numpy(ts))
            n_t = _to_numpy(jtu.tree_leaves(obj)[0]).shape[0]
            if ts_arr.shape != (n_t,):
                raise ValueError(
                    f"`ts` has shape {ts_arr.shape} but the states have {n_t} times."
                )
            coords[TIME_DIM] = xr.DataArray(ts_arr, dims=(TIME_DIM,), attrs=time_attrs)
        gattrs[KIND_ATTR] = "states"
        gattrs[FIELDS_ATTR] = " ".join(names)
        stype = _state_type(obj)
    if stype is not None:
        gattrs[STATE_TYPE_ATTR] = stype
    if attrs:
        gattrs.update(attrs)
    return xr.Dataset(data, coords=coords, attrs=gattrs)


def _prefixless(units, suffix):
    if units is None or isinstance(units, str):
        return units
    return {k + suffix: v for k, v in units.items()}


def _result_name(result) -> str:
    # eqx.Enumeration has no public name lookup; compare against every member.
    for member in RESULTS._name_to_item:  # noqa: SLF001
        if bool(result == getattr(RESULTS, member)):
            return member
    raise ValueError(f"unknown result code {result!r}")


def _stats_to_json(stats: Mapping[str, Any]) -> str:
    out = {}
    for key, value in stats.items():
        if isinstance(value, bool):
            out[key] = ["bool", value, None]
        elif isinstance(value, int):
            out[key] = ["int", value, None]
        elif isinstance(value, float):
            out[key] = ["float", value, None]
        else:
            arr = _to_numpy(value)
            out[key] = ["array", arr.tolist(), str(arr.dtype)]
    return json.dumps(out)


def _stats_from_json(text: str) -> dict[str, Any]:
    out = {}
    for key, (kind, value, dtype) in json.loads(text).items():
        if kind == "bool":
            out[key] = bool(value)
        elif kind == "int":
            out[key] = int(value)
        elif kind == "float":
            out[key] = float(value)
        else:
            out[key] = jnp.asarray(np.asarray(value, dtype=dtype))
    return out


def _resolve_state_type(qualname: str | None):
    """The class named ``qualname`` if its module is already imported, else None.

    Modules are never imported on behalf of a file: a dataset must not be able to run
    code. Import the model package (e.g. ``import pdes``) first, or pass ``like=``.
    """
    if not qualname:
        return None
    module_name, _, cls_name = qualname.rpartition(".")
    module = sys.modules.get(module_name)
    obj = module
    for part in cls_name.split("."):
        obj = getattr(obj, part, None)
    return obj if isinstance(obj, type) else None


def _assemble(arrays: dict[str, Any], fields: list[str], like, qualname):
    """Rebuild a state pytree from its field arrays."""
    if like is not None:
        like_names = _field_names(like, fields[0] if len(fields) == 1 else DEFAULT_NAME)
        if len(like_names) == 1 and len(fields) == 1:
            return jtu.tree_unflatten(jtu.tree_structure(like), [arrays[fields[0]]])
        missing = [n for n in like_names if n not in arrays]
        if missing:
            raise MissingVariableError(
                f"dataset has no variable(s) {missing} needed by `like` (fields "
                f"{like_names}); it holds {sorted(arrays)}."
            )
        return jtu.tree_unflatten(
            jtu.tree_structure(like), [arrays[n] for n in like_names]
        )
    if len(fields) == 1 and not qualname:
        return arrays[fields[0]]
    cls = _resolve_state_type(qualname)
    if cls is not None:
        try:
            return cls(**{f: arrays[f] for f in fields})
        except TypeError:
            pass
    logger.info(
        "state type %r not available (import its package or pass `like=`); "
        "returning a dict of fields %s",
        qualname,
        fields,
    )
    return {f: arrays[f] for f in fields}


def from_dataset(ds: xr.Dataset, *, like=None):
    """Inverse of :func:`to_dataset`.

    Args:
        ds: a dataset written by :func:`to_dataset` (possibly read back from netCDF).
        like: an example state whose pytree structure to rebuild (needed for
            multi-field states whose class is not importable by name; without it a
            multi-field state whose module is already imported is rebuilt by calling
            its class with the fields as keywords, else returned as a dict).

    Returns:
        A :class:`dphys.Trajectory` if ``ds`` holds one, otherwise the (time-stacked)
        state. Arrays are JAX arrays of the stored dtype.

    Raises:
        MissingVariableError: a field named in the attributes is absent.
    """
    kind = ds.attrs.get(KIND_ATTR)
    if kind not in ("states", "trajectory"):
        raise MissingVariableError(
            f"dataset has no `{KIND_ATTR}` attribute (got {kind!r}); it was not "
            "written by dphys.io.to_dataset. Read its variables with xarray directly, "
            "or with assimilation.read_field."
        )

    def arrays_of(names):
        missing = [n for n in names if n not in ds.data_vars]
        if missing:
            raise MissingVariableError(
                f"dataset lacks variable(s) {missing}; it has {sorted(ds.data_vars)}."
            )
        return {n: jnp.asarray(np.asarray(ds[n].values)) for n in names}

    fields = [f for f in str(ds.attrs.get(FIELDS_ATTR, "")).split() if f]
    if kind == "states":
        return _assemble(arrays_of(fields), fields, like, ds.attrs.get(STATE_TYPE_ATTR))

    final_fields = str(ds.attrs["dphys_final_fields"]).split()
    finals = arrays_of([f + FINAL_SUFFIX for f in final_fields])
    finals = {f: finals[f + FINAL_SUFFIX] for f in final_fields}
    final = _assemble(finals, final_fields, like, ds.attrs.get("dphys_final_type"))
    if fields:
        ys = _assemble(
            arrays_of(fields),
            fields,
            like if fields == final_fields else None,
            ds.attrs.get(STATE_TYPE_ATTR),
        )
        ts = jnp.asarray(np.asarray(ds[TIME_DIM].values))
    else:
        ys = None
        ts = jnp.zeros((0,), dtype=np.dtype(ds.attrs["dphys_ts_dtype"]))
    result = getattr(RESULTS, str(ds.attrs[RESULT_ATTR]))
    stats = _stats_from_json(str(ds.attrs[STATS_ATTR]))
    return Trajectory(ts=ts, ys=ys, final=final, result=result, stats=stats)


# -- files -----------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_write(path: str | os.PathLike):
    """Context manager giving a temporary path that becomes ``path`` on success.

    The temporary file is created in the same directory (so the final
    :func:`os.replace` is an atomic rename on POSIX file systems) and removed if
    the block raises: a reader never sees a partial file under the final name.

    Example:
        >>> with atomic_write("out.txt") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("done")
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = pathlib.Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; use the usual mode
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_netcdf(ds: xr.Dataset, path: str | os.PathLike) -> pathlib.Path:
    """Write ``ds`` to ``path`` atomically (see :func:`atomic_write`).

    The file is written to a temporary name in the same directory and renamed with
    :func:`os.replace`, so a reader (or a resumed batch) never sees a partial file
    under the final name, even if the writer is killed. The write holds
    :func:`netcdf_lock`, so it is safe next to reads in other threads.

    Returns:
        The final path.
    """
    path = pathlib.Path(path)
    ds = ds.load()
    # CF: coordinates have no fill value (xarray gives float ones NaN by default);
    # text goes out as character arrays, which every netCDF reader understands.
    encoding = {}
    for name, var in ds.variables.items():
        enc = {}
        if name in ds.coords and "_FillValue" not in var.encoding:
            enc["_FillValue"] = None
        if var.dtype.kind == "U" and "dtype" not in var.encoding:
            enc["dtype"] = "S1"
        if enc:
            encoding[name] = enc
    with atomic_write(path) as tmp, _NETCDF_LOCK:
        ds.to_netcdf(tmp, engine="netcdf4", encoding=encoding)
    return path


def _check_readable(path: pathlib.Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r}")


def read_netcdf(path: str | os.PathLike, *, decode_times: bool = False) -> xr.Dataset:
    """Load a netCDF file fully into memory (the file is closed on return).

    Times are left numeric by default (``decode_times=False``): model time is a
    number, and calendar-aware conversion is done by :mod:`assimilation`'s readers.
    The read holds :func:`netcdf_lock` (netCDF-C/HDF5 are not thread-safe).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: the file is not a readable netCDF file.
    """
    path = pathlib.Path(path)
    _check_readable(path)
    try:
        with _NETCDF_LOCK:
            return xr.load_dataset(path, decode_times=decode_times, engine="netcdf4")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read {str(path)!r} as netCDF: {err}") from err


@contextlib.contextmanager
def open_netcdf(
    path: str | os.PathLike,
    *,
    decode_times: bool = False,
    chunks: Mapping[str, int] | str | None = None,
):
    """Open a netCDF file lazily; load only what you select, then it is closed.

    A context manager yielding the lazily opened dataset (``chunks`` as for
    :func:`xarray.open_dataset`: ``{}`` for the file's own chunks, ``"auto"``, or a
    mapping). Everything inside the block holds :func:`netcdf_lock`, and dask reads
    run on the calling thread, so select the part you need and ``.load()`` it inside
    the block: a batch case then reads its window of a large file, not the file.

    Example:
        >>> with open_netcdf("sst.nc", chunks={}) as ds:  # doctest: +SKIP
        ...     window = ds.isel(time=slice(0, 24)).load()

    Raises:
        FileNotFoundError: ``path`` does not exist.
        DataError: the file is not a readable netCDF file.
    """
    path = pathlib.Path(path)
    _check_readable(path)
    with _NETCDF_LOCK:
        try:
            ds = xr.open_dataset(
                path, decode_times=decode_times, engine="netcdf4", chunks=chunks
            )
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {str(path)!r} as netCDF: {err}") from err
        try:
            if chunks is None:
                yield ds
            else:
                import dask

                with dask.config.set(scheduler="synchronous"):
                    yield ds
        finally:
            ds.close()
