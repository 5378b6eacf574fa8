"""Gauss-Newton's inner solves: they stop on the true residual, report when they do
not converge, and the outer loop reaches the optimum L-BFGS (and a dense solve)
finds, with the default and with tight inner tolerances, and with exact zeros in
the gradient.

Three failures of a CG whose stopping test divides each residual component by
rtol |b_i| are rebuilt here: a 100-unknown linear-advection window where it always
ran to `inner_max_steps`; the same window at `inner_rtol=1e-13`, where it diverged
past convergence (J 109 -> 1e108) and the outer loop accepted the increase; and a
periodic-shift model whose gradient has exact zeros (0/0 in that test), where it
"converged" after one step and Gauss-Newton stalled far from the optimum.
"""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

import assimilation as da
import dphys
import pdes


N, DT, N_STEPS = 100, 0.01, 50


def _advection_window():
    """Linear advection of a bump on 100 cells: an initial-state control, 10
    sensors, 5 times, 2% noise: a linear least-squares problem."""
    grid = dphys.Grid(N, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    model = pdes.Advection(grid, 1.0, kappa=1e-4, scheme="centered")
    stepper = dphys.CrankNicolson()
    truth0 = jnp.exp(-(((x - 0.3) / 0.08) ** 2))
    B = da.Diffusion(grid, 0.05, std=0.5)
    obs = da.make_observations(
        model,
        stepper,
        truth0,
        positions=jnp.linspace(0.05, 0.95, 10),
        times=jnp.linspace(0.1, 0.5, 5),
        sigma=0.02,
        dt=DT,
        n_steps=N_STEPS,
        key=jax.random.key(0),
    )
    control = da.Control(initial_state=da.InitialState(B))
    background = truth0 + B.sample(key=jax.random.key(1))
    return da.FourDVar(
        model,
        stepper,
        background,
        obs,
        control,
        dt=DT,
        n_steps=N_STEPS,
        adjoint=dphys.Unrolled(),
    )


class PeriodicShift(dphys.AbstractModel):
    """A user-written model that moves the state one cell per step (explicit part
    (roll(u) - u) / dt with backward Euler, no implicit part): in a short window
    most grid points never reach a sensor, so the gradient is exactly zero there."""

    grid: dphys.Grid
    dt: float = eqx.field(static=True)

    def linear(self, t, state):
        return jnp.zeros_like(state)

    def explicit(self, t, state):
        return (jnp.roll(state, 1) - state) / self.dt

    @property
    def symmetric(self):
        return True

    @property
    def translation_invariant(self):
        return True


def _shift_window():
    grid = dphys.Grid(24, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    dt = 0.1
    model = PeriodicShift(grid, dt)
    # L = 0: the Krylov solve of I x = b is exact (its initial guess is b), so
    # unobserved points get an exactly zero gradient (an FFT solve would leave
    # round-off there).
    stepper = dphys.BackwardEuler(solver=dphys.Krylov(method="cg"))
    truth0 = jnp.sin(2 * jnp.pi * x) + 0.5
    # Two sensors between grid points (each reads two neighbours), steps 1..6: the
    # window sees 14 of the 24 initial values, several of them more than once and
    # with different weights; the other 9 have an exactly zero gradient.
    dx = grid.spacing[0]
    obs = da.make_observations(
        model,
        stepper,
        truth0,
        positions=jnp.array([5.3 * dx, 16.6 * dx]),
        times=dt * jnp.arange(1, 7),
        sigma=jnp.array([0.05, 0.1]),
        dt=dt,
        n_steps=6,
        key=jax.random.key(2),
    )
    std = 0.3 * (1.0 + 0.5 * jnp.cos(2 * jnp.pi * x))
    control = da.Control(initial_state=da.InitialState(da.Diagonal(std)))
    return da.FourDVar(model, stepper, truth0 + 0.2, obs, control, dt=dt, n_steps=6)


def _dense_optimum(cost):
    """The exact minimum of the (linear least-squares) cost: one dense solve."""
    flat0, unravel = jax.flatten_util.ravel_pytree(cost.init())
    f = jax.jit(lambda z: cost(unravel(z)))
    g = jax.grad(f)(flat0)
    h = jax.jit(jax.hessian(f))(flat0)
    return float(f(flat0 - jnp.linalg.solve(h, g)))


@pytest.fixture(scope="module")
def advection():
    cost = _advection_window()
    lbfgs = da.assimilate(
        cost, da.LBFGS(max_iterations=2000, gtol=1e-11), uncertainty=False
    )
    return cost, lbfgs.cost_analysis, _dense_optimum(cost)


@pytest.mark.parametrize(
    "inner",
    [{}, {"inner_rtol": 1e-13, "inner_max_steps": 2000}],
    ids=["default", "tight"],
)
def test_gauss_newton_reaches_the_lbfgs_optimum(advection, inner):
    cost, j_lbfgs, j_exact = advection
    np.testing.assert_allclose(j_lbfgs, j_exact, rtol=1e-10)
    a = da.assimilate(
        cost, da.GaussNewton(max_iterations=5, gtol=1e-10, **inner), uncertainty=False
    )
    np.testing.assert_allclose(a.cost_analysis, j_exact, rtol=1e-10)
    assert a.converged, a.message
    # J never increases, and every inner solve converged before its cap.
    assert np.all(np.diff(a.history.cost) <= 1e-12 * a.history.cost[0])
    cap = inner.get("inner_max_steps", 200)
    assert np.all(a.history.inner_iterations[1:] < cap), a.history.inner_iterations


def test_gauss_newton_with_exact_zeros_in_the_gradient():
    cost = _shift_window()
    g = jax.grad(cost)(cost.init())["initial_state"]
    assert int(jnp.sum(g == 0)) == 9  # exact zeros where no sensor looks
    j_exact = _dense_optimum(cost)
    lbfgs = da.assimilate(
        cost, da.LBFGS(max_iterations=500, gtol=1e-11), uncertainty=False
    )
    np.testing.assert_allclose(lbfgs.cost_analysis, j_exact, rtol=1e-10)
    a = da.assimilate(cost, da.GaussNewton(gtol=1e-10), uncertainty=False)
    np.testing.assert_allclose(a.cost_analysis, j_exact, rtol=1e-10)
    assert a.converged and a.n_iterations <= 3, a.message


class _WrongCurvature(da.AbstractCost):
    r"""$J(v) = \tfrac12\|v - 1\|^2$ but a residual scaled by ``c``: the
    Gauss-Newton operator $c^2 I$ is wrong, so its step $-\nabla J / c^2$
    overshoots by $1/c^2$ and no halving (8 allowed) decreases $J$."""

    c: float
    control: None = None

    def init(self):
        return jnp.zeros(4)

    def residual(self, v):
        return {"background": self.c * (v - 1.0)}

    def terms(self, v):
        return {"background": 0.5 * jnp.sum((v - 1.0) ** 2)}

    def innovations(self, v):
        return jnp.zeros(0)


def test_a_step_that_increases_j_is_never_taken():
    cost = _WrongCurvature(1e-3)
    sol = da.minimize(cost, da.GaussNewton(), n_iterations=3, throw=False)
    assert sol.termination == "no_decrease"
    assert sol.result == da.RESULTS.no_decrease
    assert int(sol.stats["num_iterations"]) == 0
    np.testing.assert_array_equal(sol.control, cost.init())
    np.testing.assert_array_equal(sol.history["cost"], 2.0)  # J never moved
    with pytest.raises(eqx.EquinoxRuntimeError, match="decreased the cost"):
        da.minimize(cost, da.GaussNewton(), n_iterations=3)
    # The same cost with the right curvature converges in one step (control).
    sol = da.minimize(_WrongCurvature(1.0), da.GaussNewton(), n_iterations=2)
    np.testing.assert_allclose(sol.control, 1.0, rtol=1e-12)
    assert sol.termination == "running"


def test_truncated_inner_solves_are_reported(advection):
    """An inner cap below what CG needs: each step is a truncated CG step (still a
    descent direction, J decreases), and the history and the message say the
    solves did not converge, with their residuals."""
    cost, _, _ = advection
    a = da.assimilate(
        cost,
        da.GaussNewton(max_iterations=3, gtol=1e-10, inner_max_steps=5),
        uncertainty=False,
    )
    h = a.history
    assert h.inner_result[1:] == ("max_steps",) * 3
    np.testing.assert_array_equal(h.inner_iterations[1:], 5)
    assert np.all(h.inner_residual[1:] > 1e-3)
    assert np.all(np.diff(h.cost) < 0)
    assert "3 of 3 inner solve(s) did not converge (max_steps" in a.message
    # The same history inside JAX.
    sol = da.minimize(
        cost, da.GaussNewton(inner_max_steps=5), n_iterations=1, throw=False
    )
    assert int(sol.history["inner_result"][1]) == 1  # INNER_RESULTS[1]
    assert da.INNER_RESULTS[1] == "max_steps"
    np.testing.assert_allclose(
        sol.history["inner_residual"][1], h.inner_residual[1], rtol=1e-8
    )
