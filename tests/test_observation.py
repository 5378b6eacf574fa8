"""Sensor observations: interpolation in space and time, adjoints, masks, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import assimilation as da
import dphys
import dphys.testing as dtest
import pdes


BOUNDARIES = ["periodic", "dirichlet", "neumann"]


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_linear_profile_is_reproduced_1d(boundary):
    # Linear interpolation is exact for linear functions between unknowns.
    grid = dphys.Grid(10, lengths=2.0, boundary=boundary, origin=-1.0)
    (x,) = grid.coords
    xs = np.asarray(grid.axis_coords(0))
    pos = np.linspace(xs[0], xs[-1], 13)
    H = da.Interpolation(grid, pos)
    np.testing.assert_allclose(H(3.0 * x - 0.5), 3.0 * pos - 0.5, rtol=1e-13, atol=1e-13)


def test_bilinear_is_exact_for_bilinear_functions_2d():
    grid = dphys.Grid((6, 8), lengths=(1.0, 2.0), boundary=("neumann", "dirichlet"))
    y, x = grid.coords
    ys, xs = grid.axis_coords(0), grid.axis_coords(1)
    rng = np.random.default_rng(0)
    pos = np.stack(
        [rng.uniform(ys[0], ys[-1], 20), rng.uniform(xs[0], xs[-1], 20)], axis=1
    )
    f = lambda y, x: 1.0 + 2.0 * y - 0.5 * x + 3.0 * x * y
    H = da.Interpolation(grid, pos)
    np.testing.assert_allclose(H(f(y, x)), f(pos[:, 0], pos[:, 1]), rtol=1e-12)


def test_boundary_treatment_near_walls():
    # Dirichlet: the wall carries u = 0, so a sensor on the wall reads 0 and one
    # half-way to the first unknown reads half of it. Neumann: constant in the half
    # cell next to the wall. Periodic: wraps around.
    u = jnp.arange(1.0, 9.0)
    g_d = dphys.Grid(8, lengths=9.0, boundary="dirichlet")  # unknowns at 1..8
    H = da.Interpolation(g_d, [0.0, 0.5, 9.0, 8.5])
    np.testing.assert_allclose(H(u), [0.0, 0.5, 0.0, 4.0], atol=1e-14)
    g_n = dphys.Grid(8, lengths=8.0, boundary="neumann")  # unknowns at 0.5..7.5
    H = da.Interpolation(g_n, [0.0, 0.25, 8.0, 7.9])
    np.testing.assert_allclose(H(u), [1.0, 1.0, 8.0, 8.0], atol=1e-14)
    g_p = dphys.Grid(8, lengths=8.0, boundary="periodic")  # unknowns at 0..7
    H = da.Interpolation(g_p, [7.5, -0.5, 15.5, 3.0])
    np.testing.assert_allclose(H(u), [4.5, 4.5, 4.5, 4.0], atol=1e-14)


@pytest.mark.parametrize("boundary", BOUNDARIES)
@pytest.mark.parametrize("shape", [(11,), (7, 9)])
def test_interpolation_adjoint_dot_test(boundary, shape, getkey):
    grid = dphys.Grid(shape, lengths=1.0, boundary=boundary)
    pos = jax.random.uniform(getkey(), (15, grid.ndim), minval=0.0, maxval=1.0)
    H = da.Interpolation(grid, pos)
    res = dtest.dot_test(H, H.transpose, jnp.zeros(shape), key=getkey())
    assert res.passed, str(res)
    assert res.rel_error < 1e-12


def test_time_interpolation_adjoint_and_values(getkey):
    ti = da.TimeInterpolation([0.0, 0.25, 0.3, 1.0], t0=0.0, dt=0.1, n_steps=10)
    assert ti.steps == (0, 2, 3, 10)
    saved = jnp.arange(4.0)[:, None] * jnp.ones((1, 2))
    # 0.25 is half-way between steps 2 and 3 (rows 1 and 2); 0.3 is on step 3.
    np.testing.assert_allclose(ti(saved)[:, 0], [0.0, 1.5, 2.0, 3.0], atol=1e-12)
    res = dtest.dot_test(ti, ti.transpose, jnp.zeros((4, 3)), key=getkey())
    assert res.rel_error < 1e-12, str(res)


def test_observation_between_steps_interpolates_the_trajectory():
    grid = dphys.Grid(16, lengths=1.0, boundary="periodic")
    model = pdes.Heat(grid, kappa=0.05)
    (x,) = grid.coords
    u0 = jnp.sin(2 * jnp.pi * x)
    stepper = dphys.CrankNicolson()
    pos = [0.1, 0.37]
    obs = da.make_observations(
        model, stepper, u0, positions=pos, times=[0.23], sigma=1.0, dt=0.1, n_steps=5
    )
    traj = dphys.simulate(model, stepper, u0, dt=0.1, n_steps=5, saveat=dphys.SaveAt(
        steps=(2, 3), t1=False))
    H = da.Interpolation(grid, pos)
    expect = 0.7 * H(traj.ys[0]) + 0.3 * H(traj.ys[1])
    np.testing.assert_allclose(obs.values[0], expect, rtol=1e-12)


def test_observations_accept_1d_positions_scalar_sigma_and_mask():
    obs = da.Observations([0.1, 0.2], [[1.0, jnp.nan], [2.0, 3.0]], [0.2, 0.4], 0.5)
    assert obs.positions.shape == (2, 1)
    assert obs.sigma.tolist() == [0.5, 0.5]
    assert obs.mask.tolist() == [[True, False], [True, True]]
    assert (obs.n_times, obs.n_sensors) == (2, 2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(times=[0.2, 0.1]), "strictly increasing"),
        (dict(times=[0.1, 0.1]), "duplicate"),
        (dict(times=[0.1, 0.2, 0.3]), "values"),
        (dict(positions=[[0.1], [0.2], [0.3]]), "positions"),
        (dict(sigma=[0.1, 0.0]), "sigma"),
        (dict(sigma=[0.1, -1.0]), "sigma"),
        (dict(sigma=[0.1, 0.2, 0.3]), "sigma"),
        (dict(values=[[1.0, jnp.inf], [1.0, 2.0]]), "infinities"),
        (dict(positions=[[0.1], [jnp.nan]]), "finite"),
    ],
)
def test_observations_bad_input(kwargs, match):
    base = dict(
        times=[0.1, 0.2], values=[[1.0, 2.0], [3.0, 4.0]], positions=[[0.1], [0.2]],
        sigma=[0.1, 0.1],
    )
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        da.Observations(**base)


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann"])
def test_sensor_outside_domain_raises(boundary):
    grid = dphys.Grid(8, lengths=1.0, boundary=boundary)
    with pytest.raises(ValueError, match=f"outside the {boundary} domain"):
        da.Interpolation(grid, [0.5, 1.2])
    grid2 = dphys.Grid((5, 5), boundary=("periodic", boundary))
    da.Interpolation(grid2, [[3.0, 0.5]])  # periodic axis wraps
    with pytest.raises(ValueError, match="axis 1"):
        da.Interpolation(grid2, [[0.5, -0.1]])


def test_times_outside_window_raise():
    with pytest.raises(ValueError, match="outside the assimilation window"):
        da.TimeInterpolation([0.5, 1.2], t0=0.0, dt=0.1, n_steps=10)
    with pytest.raises(ValueError, match="outside the assimilation window"):
        da.TimeInterpolation([-0.01, 0.5], t0=0.0, dt=0.1, n_steps=10)


def test_multi_field_state_needs_field_name():
    grid = dphys.Grid(8, boundary="periodic")
    H = da.Interpolation(grid, [0.3], field="h")

    class State(dict):
        pass

    s = type("S", (), {"h": jnp.arange(8.0)})()
    np.testing.assert_allclose(H(s), [2.4])
    with pytest.raises(TypeError, match="field"):
        da.Interpolation(grid, [0.3])({"h": jnp.zeros(8)})


@pytest.mark.parametrize(
    "module", ["_observation", "_covariance", "_control", "_cost"]
)
def test_docstring_examples(module):
    import doctest
    import importlib

    mod = importlib.import_module(f"assimilation.{module}")
    result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
    assert result.failed == 0 and result.attempted > 0


def test_one_edge_tolerance_for_sensors_and_times():
    """The maths and the file readers share one check per rule with one tolerance
    (1e-6 of the domain or window length): round-off past an edge is accepted
    everywhere, a real miss refused everywhere."""
    import assimilation.io as aio

    grid = dphys.Grid(10, lengths=1.0, boundary="neumann")
    near, far = 1.0 + 5e-7, 1.0 + 2e-6
    da.Interpolation(grid, [0.5, near])
    with pytest.raises(ValueError, match="outside the neumann domain"):
        da.Interpolation(grid, [0.5, far])
    obs = da.Observations([0.5], [[1.0, 2.0]], [0.5, 0.9], 0.1)
    for pos, ok in ((near, True), (far, False)):
        ds = aio.observations_to_dataset(
            eqx.tree_at(lambda o: o.positions, obs, jnp.array([[0.5], [pos]]))
        )
        if ok:
            assert float(aio.read_observations(ds, grid).positions[1, 0]) == 1.0
        else:
            with pytest.raises(aio.DomainError, match="outside the neumann domain"):
                aio.read_observations(ds, grid)
    # Observation times: the window [0, 1] of 10 steps.
    da.TimeInterpolation([0.5, 1.0 + 5e-7], t0=0.0, dt=0.1, n_steps=10)
    with pytest.raises(ValueError, match="outside the assimilation window"):
        da.TimeInterpolation([0.5, 1.0 + 2e-6], t0=0.0, dt=0.1, n_steps=10)
    for t_last, ok in ((1.0 + 5e-7, True), (1.0 + 2e-6, False)):
        ds = aio.observations_to_dataset(
            da.Observations([0.5, t_last], [[1.0, 2.0]] * 2, [0.5, 0.9], 0.1)
        )
        if ok:
            read = aio.read_observations(ds, grid, window=(0.0, 1.0))
            assert float(read.times[-1]) == 1.0
        else:
            with pytest.raises(aio.TimeAxisError, match="outside the assimilation"):
                aio.read_observations(ds, grid, window=(0.0, 1.0))
