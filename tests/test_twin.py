"""Twin experiments: synthetic observations, full assimilation, scores."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import assimilation as da
import dphys
import pdes


def _heat_setup():
    grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    truth = pdes.Heat(grid, kappa=0.01)
    u0 = jnp.sin(2 * jnp.pi * x) + 0.5 * jnp.cos(6 * jnp.pi * x)
    return grid, truth, u0, dphys.CrankNicolson()


def test_make_observations_noise_and_missing():
    grid, truth, u0, stepper = _heat_setup()
    kw = dict(positions=[0.1, 0.5, 0.8], times=jnp.linspace(0.1, 2.0, 200), sigma=0.1,
              dt=0.1, n_steps=20)
    clean = da.make_observations(truth, stepper, u0, **kw)
    a = da.make_observations(truth, stepper, u0, key=jax.random.key(0), **kw)
    b = da.make_observations(truth, stepper, u0, key=jax.random.key(0), **kw)
    c = da.make_observations(truth, stepper, u0, key=jax.random.key(1), **kw)
    np.testing.assert_array_equal(a.values, b.values)  # seeded
    assert not np.allclose(a.values, c.values)
    noise = np.asarray(a.values - clean.values)
    assert abs(noise.std() - 0.1) < 0.01 and abs(noise.mean()) < 0.01
    m = da.make_observations(truth, stepper, u0, key=jax.random.key(0), missing=0.3,
                             **kw)
    assert 0.25 < float(jnp.mean(jnp.isnan(m.values))) < 0.35
    with pytest.raises(ValueError, match="missing"):
        da.make_observations(truth, stepper, u0, key=jax.random.key(0), missing=1.0,
                             **kw)


def test_twin_experiment_heat_state_and_kappa():
    grid, truth, u0, stepper = _heat_setup()
    B = da.Diffusion(grid, 0.1, std=0.3)
    control = da.Control(
        initial_state=da.InitialState(B),
        parameters=[
            da.Parameter("kappa", background=0.02, transform=da.Log(), sigma=1.0)
        ],
    )
    # Default (checkpointed) adjoint, one missing value in ten.
    res = da.twin_experiment(
        truth, stepper, u0, control,
        positions=jnp.linspace(0.03, 0.97, 8), times=jnp.linspace(0.25, 5.0, 20),
        sigma=0.005, dt=0.1, n_steps=50, key=jax.random.key(11),
        background_state0=u0 + B.sample(key=jax.random.key(12)), missing=0.1,
    )
    print(res.summary())
    a = res.analysis
    assert a.converged
    assert res.rmse_initial_analysis < 0.5 * res.rmse_initial_background
    assert res.rmse_final_analysis < 0.05 * res.rmse_final_background
    assert res.parameter_relative_error["kappa"] < 0.02
    assert res.within_2sigma["kappa"] == 1.0
    assert np.isnan(a.obs_minus_background).sum() == np.isnan(res.obs.values).sum() > 0
    assert "kappa: truth 0.01" in res.summary()


def test_twin_experiment_bad_input():
    grid, truth, u0, stepper = _heat_setup()
    kw = dict(positions=[0.5], times=[1.0], sigma=0.1, dt=0.1, n_steps=10,
              key=jax.random.key(0))
    no_bg = da.Control(parameters=[da.Parameter("kappa", transform=da.Log(), sigma=1.0)])
    with pytest.raises(ValueError, match="explicit `background`"):
        da.twin_experiment(truth, stepper, u0, no_bg, **kw)
    state = da.Control(initial_state=da.InitialState(da.Diagonal(1.0, grid.shape)))
    with pytest.raises(ValueError, match="background_state0"):
        da.twin_experiment(truth, stepper, u0, state, **kw)


@pytest.mark.slow
def test_advection_velocity_and_diffusivity_twin():
    """Uniform velocity (unconstrained) and log-diffusivity, plus the initial state."""
    grid = dphys.Grid(64, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    truth = pdes.Advection(grid, velocity=0.3, kappa=1e-3)
    u0 = jnp.exp(-(((x - 0.3) / 0.08) ** 2)) + 0.5 * jnp.exp(-(((x - 0.7) / 0.05) ** 2))
    B = da.Diffusion(grid, 0.05, std=0.2)
    control = da.Control(
        initial_state=da.InitialState(B),
        parameters=[
            da.Parameter("velocity", where=lambda m: m.velocity[0], background=0.2,
                         sigma=0.2),
            da.Parameter("kappa", background=2e-3, transform=da.Log(), sigma=1.0),
        ],
    )
    res = da.twin_experiment(
        truth, dphys.CrankNicolson(), u0, control,
        positions=jnp.linspace(0.05, 0.95, 6), times=jnp.linspace(0.1, 2.0, 20),
        sigma=0.01, dt=0.02, n_steps=100, key=jax.random.key(0),
        background_state0=u0 + B.sample(key=jax.random.key(1)),
    )
    print(res.summary())
    assert res.analysis.converged
    assert res.parameter_relative_error["velocity"] < 0.01
    assert res.parameter_relative_error["kappa"] < 0.1
    assert res.within_2sigma["velocity"] == 1.0
    assert res.rmse_final_analysis < 0.05 * res.rmse_final_background


@pytest.mark.slow
def test_shallow_water_bathymetry_and_drag_twin():
    """Log-depth field (diffusion prior) and log linear drag from sea-level gauges."""
    L = 100e3
    grid = dphys.Grid(40, lengths=L, boundary="neumann")  # closed basin
    (x,) = grid.coords
    depth_true = 50.0 * (1 + 0.4 * jnp.sin(2 * jnp.pi * x / L))
    truth = pdes.ShallowWater(grid, depth=depth_true, drag=2e-4)
    eta0 = jnp.exp(-(((x - 0.3 * L) / (0.08 * L)) ** 2))
    state0 = pdes.SWState(eta0, jnp.zeros_like(x), jnp.zeros_like(x))
    control = da.Control(
        parameters=[
            da.Parameter(
                "depth",
                background=jnp.full(grid.shape, 50.0),
                transform=da.Log(),
                covariance=da.Diffusion(grid, 0.15 * L, std=0.5),
            ),
            da.Parameter("drag", background=1e-4, transform=da.Log(), sigma=1.0),
        ]
    )
    res = da.twin_experiment(
        truth, dphys.CrankNicolson(solver=pdes.HelmholtzKrylov()), state0, control,
        positions=jnp.linspace(0.05 * L, 0.95 * L, 8),
        times=jnp.linspace(500.0, 20000.0, 40), sigma=0.005, dt=100.0, n_steps=200,
        key=jax.random.key(0), field="eta",
    )
    log_d = np.log(res.analysis.parameters["depth"])
    corr = float(np.corrcoef(log_d, np.log(depth_true))[0, 1])
    print(res.summary(), f"\n  depth correlation with the truth: {corr:.4f}")
    assert res.analysis.converged
    assert corr > 0.9
    assert res.parameter_relative_error["drag"] < 0.05
    assert res.parameter_relative_error["depth"] < 0.05
    assert res.rmse_final_analysis < 0.1 * res.rmse_final_background
