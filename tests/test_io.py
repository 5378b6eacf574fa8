"""dphys.io: Grid/Trajectory <-> xarray/netCDF, exact round trips and clear errors."""

import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import xarray as xr

import dphys
import dphys.io as dio
import pdes


class Fields(eqx.Module):
    """A multi-field state like shallow water's (eta, u, v)."""

    eta: jax.Array
    u: jax.Array
    v: jax.Array


GRIDS = [
    dphys.Grid(12, lengths=2.0, boundary="periodic", origin=-1.0),
    dphys.Grid(9, lengths=1.0, boundary="dirichlet"),
    dphys.Grid(
        (6, 10),
        lengths=(1.0, 3.0),
        boundary=("neumann", "periodic"),
        origin=(0.25, -0.5),
    ),
]


def _assert_traj_equal(a, b):
    for la, lb in zip(
        jax.tree_util.tree_leaves((a.ts, a.ys, a.final)),
        jax.tree_util.tree_leaves((b.ts, b.ys, b.final)),
        strict=True,
    ):
        assert la.dtype == lb.dtype
        np.testing.assert_array_equal(np.asarray(la), np.asarray(lb))
    assert jax.tree_util.tree_structure(a.ys) == jax.tree_util.tree_structure(b.ys)
    assert bool(a.result == b.result)
    assert a.stats.keys() == b.stats.keys()
    for k in a.stats:
        assert type(a.stats[k]) is type(b.stats[k]) or (
            isinstance(a.stats[k], jax.Array) and isinstance(b.stats[k], jax.Array)
        )
        np.testing.assert_array_equal(np.asarray(a.stats[k]), np.asarray(b.stats[k]))


@pytest.mark.parametrize(
    "grid, dtype",
    [(GRIDS[0], jnp.float32), (GRIDS[1], jnp.float64), (GRIDS[2], jnp.float64)],
    ids=["periodic-f32", "dirichlet-f64", "neumann-periodic-2d-f64"],
)
def test_trajectory_netcdf_round_trip_is_exact(grid, dtype, tmp_path):
    model = pdes.Heat(grid, kappa=jnp.asarray(0.05, dtype))
    coords = grid.coords
    u0 = jnp.sin(3.0 * coords[-1]) + (coords[0] ** 2 if grid.ndim == 2 else 0.0)
    traj = dphys.simulate(
        model,
        dphys.CrankNicolson(),
        u0.astype(dtype),
        dt=0.01,
        n_steps=6,
        saveat=dphys.SaveAt(t0=True, every=3),
    )
    ds = dio.to_dataset(traj, grid, units="K", time_units="s", length_units="m")
    path = dio.write_netcdf(ds, tmp_path / "traj.nc")
    back_ds = dio.read_netcdf(path)
    back = dio.from_dataset(back_ds)
    _assert_traj_equal(traj, back)
    assert dio.grid_from_dataset(back_ds) == grid
    # CF metadata
    assert back_ds.attrs["Conventions"] == dio.CONVENTIONS
    assert back_ds["u"].dims == (dio.TIME_DIM, *dio.spatial_dims(grid.ndim))
    assert back_ds["u"].attrs["units"] == "K"
    assert back_ds[dio.TIME_DIM].attrs["units"] == "s"
    assert back_ds[dio.X_DIM].attrs["axis"] == "X"
    assert back_ds[dio.X_DIM].attrs["units"] == "m"
    assert back_ds[dio.X_DIM].attrs["boundary"] == grid.boundary[-1]
    np.testing.assert_array_equal(
        back_ds[dio.X_DIM].values, grid.axis_coords(grid.ndim - 1)
    )


def test_multi_field_state_one_variable_per_field(tmp_path):
    grid = GRIDS[2]
    y, x = grid.coords
    state = Fields(eta=jnp.sin(x) * y, u=jnp.cos(x), v=y + 0 * x)
    stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, 2 * a, 3 * a]), state)
    ts = jnp.asarray([0.0, 0.5, 1.0])
    ds = dio.to_dataset(stacked, grid, ts=ts, units={"eta": "m", "u": "m s-1"})
    assert set(ds.data_vars) == {"eta", "u", "v"}
    assert ds["eta"].dims == ("time", "y", "x")
    assert ds["eta"].attrs["units"] == "m" and "units" not in ds["v"].attrs
    dio.write_netcdf(ds, tmp_path / "f.nc")
    back = dio.from_dataset(dio.read_netcdf(tmp_path / "f.nc"))
    # the class is importable (this module is loaded), so it is rebuilt by name
    assert isinstance(back, Fields)
    for a, b in zip(
        jax.tree_util.tree_leaves(stacked), jax.tree_util.tree_leaves(back), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # with `like` the structure comes from the example; without a known class, a dict
    back_like = dio.from_dataset(ds, like=state)
    assert jax.tree_util.tree_structure(back_like) == jax.tree_util.tree_structure(
        state
    )
    anon = ds.assign_attrs({dio.STATE_TYPE_ATTR: "not_imported_module.Thing"})
    assert set(dio.from_dataset(anon)) == {"eta", "u", "v"}


def test_multi_field_trajectory_round_trip(tmp_path):
    # A trajectory whose states are (eta, u, v): each field a variable, final too.
    grid = GRIDS[0]
    (x,) = grid.coords
    final = Fields(eta=jnp.sin(x), u=jnp.cos(x), v=x)
    ys = jax.tree_util.tree_map(lambda a: jnp.stack([a, -a]), final)
    traj = dphys.Trajectory(
        ts=jnp.asarray([0.5, 1.0]),
        ys=ys,
        final=final,
        result=dphys.RESULTS.successful,
        stats={"n_steps": 4, "fast_forward": True},
    )
    ds = dio.to_dataset(traj, grid)
    assert {"eta", "u", "v", "eta_final", "u_final", "v_final"} == set(ds.data_vars)
    dio.write_netcdf(ds, tmp_path / "t.nc")
    _assert_traj_equal(traj, dio.from_dataset(dio.read_netcdf(tmp_path / "t.nc")))


def test_trajectory_without_saves_and_with_observation_hook(tmp_path):
    grid = GRIDS[1]
    model = pdes.Heat(grid, kappa=0.1)
    (x,) = grid.coords
    u0 = jnp.sin(jnp.pi * x)
    none = dphys.simulate(
        model,
        dphys.BackwardEuler(),
        u0,
        dt=0.01,
        n_steps=3,
        saveat=dphys.SaveAt(t1=False),
    )
    assert none.ys is None
    dio.write_netcdf(dio.to_dataset(none, grid), tmp_path / "a.nc")
    _assert_traj_equal(none, dio.from_dataset(dio.read_netcdf(tmp_path / "a.nc")))

    hook = dphys.simulate(
        model,
        dphys.BackwardEuler(),
        u0,
        dt=0.01,
        n_steps=4,
        saveat=dphys.SaveAt(every=2, fn=lambda t, u: u[:3]),
    )
    ds = dio.to_dataset(hook, grid, name="sensors")
    assert ds["sensors"].dims == ("time", "sensors_dim0")
    dio.write_netcdf(ds, tmp_path / "b.nc")
    _assert_traj_equal(hook, dio.from_dataset(dio.read_netcdf(tmp_path / "b.nc")))


def test_single_state_without_time():
    grid = GRIDS[2]
    u = jnp.arange(60.0).reshape(6, 10)
    ds = dio.to_dataset(u, grid, name="temperature", units="degC")
    assert ds["temperature"].dims == ("y", "x")
    np.testing.assert_array_equal(np.asarray(dio.from_dataset(ds)), np.asarray(u))


def test_to_dataset_rejects_wrong_shapes():
    grid = GRIDS[0]
    with pytest.raises(ValueError, match=r"has shape \(5,\); expected \(12,\)"):
        dio.to_dataset(jnp.zeros(5), grid)
    with pytest.raises(
        ValueError, match=r"`ts` has shape \(3,\) but the states have 2"
    ):
        dio.to_dataset(jnp.zeros((2, 12)), grid, ts=jnp.zeros(3))
    with pytest.raises(TypeError, match="`grid` must be a dphys.Grid"):
        dio.to_dataset(jnp.zeros(12), "grid")


def test_grid_mismatch_is_detected_explicitly():
    grid = GRIDS[2]
    ds = dio.to_dataset(jnp.zeros(grid.shape), grid)
    other = dphys.Grid(
        (6, 10),
        lengths=(1.0, 3.0),
        boundary=("neumann", "periodic"),
        origin=(0.25, 0.0),
    )
    with pytest.raises(dio.GridMismatchError, match="`x` coordinate does not match"):
        dio.check_grid_coords(ds, other)
    smaller = dphys.Grid(
        (6, 8),
        lengths=(1.0, 3.0),
        boundary=("neumann", "periodic"),
        origin=(0.25, -0.5),
    )
    with pytest.raises(dio.GridMismatchError, match="`x` has 10 points but the model"):
        dio.check_grid_coords(ds, smaller)
    with pytest.raises(dio.MissingVariableError, match="no dimension `y`"):
        dio.check_grid_coords(ds.isel(y=0), grid)
    # tampered attributes disagree with the coordinates
    bad = ds.assign_attrs(grid_origin=np.asarray([0.25, 0.0]))
    with pytest.raises(dio.GridMismatchError):
        dio.grid_from_dataset(bad)


def test_foreign_datasets_give_clear_errors(tmp_path):
    foreign = xr.Dataset({"t": ("x", np.zeros(3))})
    with pytest.raises(dio.MissingVariableError, match="no grid attribute"):
        dio.grid_from_dataset(foreign)
    with pytest.raises(dio.MissingVariableError, match="not written by dphys.io"):
        dio.from_dataset(foreign)
    ds = dio.to_dataset(jnp.zeros(12), GRIDS[0])
    with pytest.raises(dio.MissingVariableError, match=r"lacks variable\(s\) \['u'\]"):
        dio.from_dataset(ds.drop_vars("u"))
    with pytest.raises(dio.GridMismatchError, match="disagree on the number of axes"):
        dio.grid_from_attrs({**dio.grid_attrs(GRIDS[2]), "grid_boundary": "periodic"})
    with pytest.raises(FileNotFoundError, match="no such file"):
        dio.read_netcdf(tmp_path / "missing.nc")
    junk = tmp_path / "junk.nc"
    junk.write_text("not a netCDF file")
    with pytest.raises(dio.DataError, match="cannot read"):
        dio.read_netcdf(junk)
    assert issubclass(dio.DataError, ValueError)


def test_write_netcdf_is_atomic(tmp_path, monkeypatch):
    ds = dio.to_dataset(jnp.zeros(12), GRIDS[0])
    target = tmp_path / "out.nc"

    def explode(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", explode)
    with pytest.raises(RuntimeError, match="disk full"):
        dio.write_netcdf(ds, target)
    assert list(tmp_path.iterdir()) == []  # neither the final name nor a temp file
    monkeypatch.undo()
    dio.write_netcdf(ds, target)
    assert [p.name for p in tmp_path.iterdir()] == ["out.nc"]


def test_atomic_write_puts_its_temporary_file_beside_the_target(tmp_path, monkeypatch):
    # os.replace is an atomic rename only within one file system: the temporary
    # file must live in the target's own directory (not in the system's temporary
    # directory), under a hidden name, and the target appears only at the end.
    ds = dio.to_dataset(jnp.zeros(12), GRIDS[0])
    target = tmp_path / "runs" / "out.nc"
    written = []
    real = xr.Dataset.to_netcdf

    def spy(self, path, *args, **kwargs):
        written.append(pathlib.Path(path))
        assert not target.exists()
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(xr.Dataset, "to_netcdf", spy)
    dio.write_netcdf(ds, target)
    (tmp,) = written
    assert tmp.parent == target.parent and tmp != target
    assert tmp.name.startswith(".out.nc.") and tmp.name.endswith(".tmp")
    assert not tmp.exists() and target.exists()
    with dio.atomic_write(target) as tmp:
        assert tmp.parent == target.parent and tmp.exists() and tmp != target
        tmp.write_text("replaced")
    assert target.read_text() == "replaced"
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.nc"]
