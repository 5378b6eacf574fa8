"""dphys.Augmented: a model plus an explicit tendency and/or a forcing, forwarding
every AbstractModel hook (a new hook that is not forwarded fails here)."""

import inspect

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import pdes
from dphys._solver import resolve_solver


def _hooks():
    """Every public method and property AbstractModel defines."""
    names = []
    for name, value in vars(dphys.AbstractModel).items():
        if name.startswith("_"):
            continue
        if isinstance(value, property) or inspect.isfunction(value):
            names.append(name)
    return sorted(names)


def test_hook_list_is_not_empty():
    hooks = _hooks()
    for expected in ("linear", "explicit", "forcing", "preferred_solver", "validate"):
        assert expected in hooks


@pytest.mark.parametrize("name", _hooks())
def test_every_hook_is_forwarded(name):
    """Augmented overrides each hook itself (inheriting the default would silently
    drop what the wrapped model says, e.g. its preferred solver)."""
    assert name in vars(dphys.Augmented), (
        f"dphys.Augmented does not forward AbstractModel.{name}; add it."
    )


def _closed_basin(n=16):
    grid = dphys.Grid((n, n), lengths=(n * 10e3, n * 10e3), boundary="neumann")
    y, x = grid.coords
    depth = 1000.0 * (1.0 + 0.2 * jnp.cos(jnp.pi * x / grid.lengths[1]))
    return pdes.ShallowWater(grid, depth, f0=1e-4)


def test_closed_basin_keeps_its_preferred_solver_and_messages():
    model = _closed_basin()
    state = model.rest_state(0.0)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state)
    wrapped = dphys.Augmented(model, forcing=zeros)
    direct = resolve_solver(dphys.Auto(), model, state)
    through = resolve_solver(dphys.Auto(), wrapped, state)
    assert type(direct) is pdes.HelmholtzKrylov
    assert type(through) is type(direct)
    assert wrapped.invalid_state_message == model.invalid_state_message
    assert wrapped.invalid_state_message is not None


def test_zero_terms_reproduce_the_model_and_forcing_adds():
    model = _closed_basin()
    y, x = model.grid.coords
    eta = jnp.exp(-((x - 80e3) ** 2 + (y - 80e3) ** 2) / (30e3) ** 2)
    state = model.rest_state(eta)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, state)
    run = lambda m: dphys.simulate(m, dphys.CrankNicolson(), state, dt=600.0, n_steps=6)
    ref = run(model).final
    out = run(dphys.Augmented(model, forcing=zeros, explicit=lambda t, s: zeros)).final
    for a, b in zip(
        jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(out), strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # The model's own diagnostics are reachable through the wrapper.
    wrapped = dphys.Augmented(model, forcing=zeros)
    assert float(wrapped.mass(state)) == pytest.approx(float(model.mass(state)))


def test_explicit_term_matches_a_hand_written_imex_step():
    grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
    heat = pdes.Heat(grid, kappa=1e-2)
    (x,) = grid.coords
    u0 = jnp.sin(2 * jnp.pi * x)
    gamma = 0.7
    model = dphys.Augmented(heat, explicit=lambda t, u: -gamma * u)
    dt = 0.01
    out = dphys.simulate(model, dphys.BackwardEuler(), u0, dt=dt, n_steps=1).final
    # Backward Euler on L, forward Euler on E: (I - dt L) u1 = u0 + dt E(u0).
    lam = -4 * 1e-2 / grid.spacing[0] ** 2 * jnp.sin(jnp.pi * 1 / 32) ** 2
    expected = (u0 - dt * gamma * u0) / (1 - dt * lam)
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-14)


class _Linear(eqx.Module):
    weight: jax.Array

    def __call__(self, t, u):
        return self.weight * u


def test_module_term_weights_are_differentiable():
    grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
    heat = pdes.Heat(grid, kappa=1e-2)
    (x,) = grid.coords
    u0 = jnp.sin(2 * jnp.pi * x)

    def loss(w):
        m = dphys.Augmented(heat, explicit=_Linear(w))
        traj = dphys.simulate(m, dphys.IMEX(), u0, dt=0.01, n_steps=5)
        return jnp.sum(traj.final**2)

    g = jax.grad(loss)(jnp.asarray(-0.3))
    eps = 1e-6
    fd = (loss(jnp.asarray(-0.3 + eps)) - loss(jnp.asarray(-0.3 - eps))) / (2 * eps)
    np.testing.assert_allclose(g, fd, rtol=1e-6)


def test_bad_arguments():
    grid = dphys.Grid(8, boundary="periodic")
    heat = pdes.Heat(grid, kappa=1e-2)
    with pytest.raises(TypeError, match="`model`"):
        dphys.Augmented("heat", forcing=0.0)
    with pytest.raises(TypeError, match="`explicit`"):
        dphys.Augmented(heat, explicit=3.0)
    with pytest.raises(ValueError, match="at least one"):
        dphys.Augmented(heat)
