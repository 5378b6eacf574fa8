"""Proximal methods as methods of the iteration engine: 4D-Var + L1 is a cost with a
non-smooth term, minimised by `assimilation.minimize` and `assimilate`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import assimilation as da
import assimilation.learn as L
import dphys
import dphys.testing as dt
import pdes


N = 16
LAM = 0.3


def _four_d_var():
    """Heat on a periodic line, the initial state controlled (whitened, sigma_b = 1),
    six sensors at three times (sigma_o = 0.5, so that J is well conditioned
    and FISTA converges in a few hundred iterations): J(v) is quadratic in v."""
    grid = dphys.Grid(N, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    truth = jnp.where(jnp.abs(x - 0.3) < 0.05, 2.0, 0.0) + jnp.where(
        jnp.abs(x - 0.7) < 0.04, -1.5, 0.0
    )
    model = pdes.Heat(grid, kappa=2e-3)
    stepper = dphys.CrankNicolson()
    positions = np.linspace(0.05, 0.95, 6)
    obs_op = da.Interpolation(grid, positions)
    traj = dphys.simulate(
        model,
        stepper,
        truth,
        dt=0.02,
        n_steps=6,
        saveat=dphys.SaveAt(t1=False, steps=(2, 4, 6), fn=lambda t, u: obs_op(u)),
    )
    rng = np.random.default_rng(3)
    y = traj.ys + 0.05 * jnp.asarray(rng.normal(size=traj.ys.shape))
    obs = da.Observations([0.04, 0.08, 0.12], y, positions, 0.5)
    control = da.Control(initial_state=da.InitialState(da.Diagonal(1.0, shape=(N,))))
    return da.FourDVar(model, stepper, jnp.zeros(N), obs, control, dt=0.02, n_steps=6)


def _reference(cost, lam):
    """The exact minimiser of the quadratic J(v) + lam |v|_1 by coordinate descent
    on the dense Hessian (an independent solver)."""
    v0 = cost.init()
    flat = lambda u: cost({"initial_state": u})
    u0 = v0["initial_state"]
    hess = np.asarray(jax.hessian(flat)(u0))
    b = -np.asarray(jax.grad(flat)(u0))  # J(u) = J(0) - b.u + u.H.u/2
    u = np.zeros(N)
    for _ in range(5000):
        for i in range(N):
            r = b[i] - hess[i] @ u + hess[i, i] * u[i]
            u[i] = np.sign(r) * max(abs(r) - lam, 0.0) / hess[i, i]
    return {"initial_state": jnp.asarray(u)}


@pytest.fixture(scope="module")
def problem():
    cost = _four_d_var()
    prior = L.Select("initial_state", L.L1(LAM))
    return cost, L.CompositeCost(cost, prior), _reference(cost, LAM)


def test_fista_through_minimize_on_4dvar_plus_l1(problem):
    cost, composite, ref = problem
    stop = da.StoppingRule(1500, gtol=1e-10, ftol=None)
    sol = da.minimize(composite, L.FISTA(), stop=stop)
    assert sol.result == da.RESULTS.successful
    assert sol.termination == "gradient_tolerance"
    # The converged reference (independent solver), and the KKT conditions.
    assert dt.tree_allclose(sol.control, ref, rtol=0, atol=1e-8)
    u = sol.control["initial_state"]
    g = jax.grad(lambda w: cost({"initial_state": w}))(u)
    assert float(jnp.max(jnp.abs(g))) <= LAM + 1e-7
    on = jnp.abs(u) > 1e-10
    assert int(on.sum()) >= 2 and int(on.sum()) < N
    assert jnp.allclose(g[on], -LAM * jnp.sign(u[on]), atol=1e-7)

    # The standalone FISTA iteration (the method's own state machine, run by a
    # plain loop) takes the very same iterates.
    method = L.FISTA()
    n = int(sol.stats["num_iterations"])

    @jax.jit
    def standalone(composite):
        s = method._init(composite, composite.init())
        return jax.lax.fori_loop(0, n, lambda _, s: method._step(composite, s), s).x

    assert dt.tree_allclose(standalone(composite), sol.control, rtol=0, atol=1e-13)

    # The history: J and its named parts, the residual falls by the tolerance.
    h = sol.history
    assert list(h["terms"]) == ["background", "observation", "prior"]
    total = h["terms"]["background"] + h["terms"]["observation"] + h["terms"]["prior"]
    np.testing.assert_allclose(h["cost"], total, rtol=1e-13)
    np.testing.assert_array_equal(h["background_cost"], h["terms"]["background"])
    np.testing.assert_array_equal(h["obs_cost"], h["terms"]["observation"])
    np.testing.assert_allclose(h["terms"]["prior"][n], LAM * jnp.sum(jnp.abs(u)))
    assert h["grad_norm"][n] <= 1e-10 * h["grad_norm"][0]
    assert np.all(h["inner_iterations"][1 : n + 1] >= 2)  # f and grad f at least
    # FISTA's objective is not monotone, but it ends at the minimum and far below
    # where it started; entries after the stop repeat the final values.
    f_star = float(composite(ref))
    assert h["cost"][n] == pytest.approx(f_star, rel=1e-12)
    assert h["cost"][0] > f_star + 1.0
    assert np.all(h["cost"][n:] == h["cost"][n])


def test_ista_objective_decreases_and_methods_share_the_minimiser(problem):
    _, composite, ref = problem
    sol = da.minimize(composite, L.ISTA(), stop=da.StoppingRule(3000, 1e-10, None))
    cost = np.asarray(sol.history["cost"])
    # ISTA with a step 1/L (backtracking) decreases F monotonically.
    assert np.all(np.diff(cost) <= 1e-13 * abs(cost[-1]))
    assert sol.result == da.RESULTS.successful
    assert dt.tree_allclose(sol.control, ref, rtol=0, atol=1e-6)


def test_assimilate_runs_a_proximal_method(problem):
    _, composite, ref = problem
    analysis = da.assimilate(
        composite,
        L.FISTA(max_iterations=1500, gtol=1e-10),
        uncertainty=False,
    )
    assert analysis.converged and analysis.method == "FISTA"
    assert dt.tree_allclose(
        {"initial_state": jnp.asarray(analysis.control["initial_state"])},
        ref,
        rtol=0,
        atol=1e-8,
    )
    # The analysed state is the decoded control (sigma_b = 1, zero background).
    np.testing.assert_allclose(analysis.initial_state, ref["initial_state"], atol=1e-8)
    assert set(analysis.history.terms) == {"background", "observation", "prior"}
    # The same rule stops `minimize` and `assimilate` at the same iterate.
    sol = da.minimize(composite, L.FISTA(max_iterations=1500, gtol=1e-10))
    assert analysis.n_iterations == int(sol.stats["num_iterations"])


def test_negative_controls(problem):
    cost, composite, ref = problem
    # Without the non-smooth term the engine finds the Gaussian (4D-Var) answer,
    # far from the sparse minimiser: the comparison above can fail.
    gauss = da.minimize(
        L.CompositeCost(cost, L.Zero()), L.FISTA(), stop=da.StoppingRule(1500, 1e-10)
    )
    assert not dt.tree_allclose(gauss.control, ref, rtol=0, atol=1e-2)
    # Too few iterations: the rule's tolerance is not met.
    few = da.minimize(
        composite, L.FISTA(), stop=da.StoppingRule(5, gtol=1e-10), throw=False
    )
    assert few.result == da.RESULTS.max_iterations_reached
    assert not dt.tree_allclose(few.control, ref, rtol=0, atol=1e-6)
    with pytest.raises(Exception, match="reached `max_iterations`"):
        da.minimize(composite, L.FISTA(), stop=da.StoppingRule(5, gtol=1e-10))
    # A step far beyond 1/L diverges: the last finite iterate is kept.
    bad = da.minimize(
        composite, L.ISTA(step_size=50.0), stop=da.StoppingRule(2000), throw=False
    )
    assert bad.result == da.RESULTS.nonfinite_cost
    assert bool(jnp.all(jnp.isfinite(bad.control["initial_state"])))
    # A proximal method needs a composite cost (its prior's prox).
    with pytest.raises(TypeError, match="CompositeCost"):
        da.minimize(cost, L.FISTA())
