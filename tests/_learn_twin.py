"""Tiny twin problems shared by the tests of :mod:`assimilation.learn`."""

import jax.numpy as jnp
import jax.random as jr

import assimilation as da
import dphys
import pdes


def advection_twin(
    *,
    n=16,
    sigma=0.05,
    n_sensors=6,
    times=(0.05, 0.1),
    n_steps=10,
    seed=0,
    model_error=False,
    stepper=None,
    diagonal_b=False,
):
    """A 1D periodic advection-diffusion twin: ``(cost, truth_state0)``.

    Crank-Nicolson (FFT solves), background 0 with a diffusion covariance, the truth
    drawn from that covariance, ``n_sensors`` sensors at ``times``. With
    ``diagonal_b`` B is diagonal (std 0.5) instead: the Laplace posterior of a cost
    with the FFT-based ``da.Diffusion`` covariance currently fails in XLA's CPU FFT
    (a layout RET_CHECK in fft_thunk.cc), in ``assimilate(..., uncertainty=True)``
    too, so the tests that need posterior standard deviations use this.
    """
    grid = dphys.Grid(n, lengths=1.0, boundary="periodic")
    model = pdes.Advection(grid, velocity=(1.0,), kappa=5e-3)
    stepper = dphys.CrankNicolson() if stepper is None else stepper
    B = (
        da.Diagonal(0.5, shape=grid.shape)
        if diagonal_b
        else da.Diffusion(grid, 0.1, std=1.0)
    )
    k1, k2 = jr.split(jr.key(seed))
    truth = B.sample(key=k1)
    pos = jnp.linspace(0.03, 0.97, n_sensors)
    obs = da.make_observations(
        model,
        stepper,
        truth,
        positions=pos,
        times=jnp.asarray(times),
        sigma=sigma,
        dt=0.01,
        n_steps=n_steps,
        key=k2,
    )
    control = da.Control(
        initial_state=da.InitialState(B),
        model_error=da.ModelError(da.Diagonal(0.5, shape=grid.shape), n_windows=2)
        if model_error
        else None,
    )
    cost = da.FourDVar(
        model, stepper, jnp.zeros(grid.shape), obs, control, dt=0.01, n_steps=n_steps
    )
    return cost, truth
