"""Proximal methods: convergence rates, residuals, a common minimiser, gradients."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import assimilation.learn as L
import dphys.testing as dt


def _rate_problem(n=20000):
    """f(x) = 1/2 sum_i l_i (x_i - x*_i)^2, l_i uniform on (0, 1], l_i x*_i^2 = 1/n.

    Every mode carries the same initial error energy, so gradient descent leaves
    F_k - F* = (1/2n) sum (1 - l_i)^{2k} ~ 1/(4k): the O(1/k) worst-case rate
    (and FISTA its O(1/k^2)) is attained for k well below sqrt(n).
    """
    lam = jnp.arange(1, n + 1) / n
    x_star = 1.0 / jnp.sqrt(n * lam)
    f = lambda x: 0.5 * jnp.sum(lam * (x - x_star) ** 2)
    return f, x_star


@pytest.mark.parametrize(
    "method, slope_range, bound",
    [
        (L.ISTA(step_size=1.0), (-1.15, -0.85), lambda r2, k: r2 / (2 * k)),
        (L.FISTA(step_size=1.0), (-2.3, -1.7), lambda r2, k: 2 * r2 / (k + 1) ** 2),
    ],
    ids=["ISTA", "FISTA"],
)
def test_objective_decay_rates(method, slope_range, bound):
    f, x_star = _rate_problem()
    # The non-negativity prior is inactive at the minimiser (x* > 0) but acts on
    # FISTA's overshooting iterates: a genuinely composite problem with F* = 0.
    cost = L.CompositeCost(f, L.NonNegative())
    n_steps = 100
    _, objs = eqx.filter_jit(
        lambda c: L.unroll(c, method, jnp.zeros_like(x_star), n_steps=n_steps)
    )(cost)
    gap = np.asarray(objs)
    k = np.arange(n_steps + 1)
    sel = k >= 10
    slope = np.polyfit(np.log(k[sel]), np.log(gap[sel]), 1)[0]
    assert slope_range[0] < slope < slope_range[1], slope
    # The theorem's bound with L = 1, x0 = 0 holds at every step.
    r2 = float(jnp.sum(x_star**2))
    assert np.all(gap[1:] <= bound(r2, k[1:]))


def _lasso(key, m=30, n=60, k=6):
    ka, kx, kn = jr.split(key, 3)
    A = jr.normal(ka, (m, n)) / jnp.sqrt(m)
    x = jnp.zeros(n).at[jr.choice(kx, n, (k,), replace=False)].set(jr.normal(kx, (k,)))
    y = A @ x + 0.01 * jr.normal(kn, (m,))
    return A, y


ALL_METHODS = {
    "ISTA": L.ISTA(),
    "FISTA": L.FISTA(),
    "FISTA-backtracking": L.FISTA(backtrack=True),
    "ISTA-continuation": L.ISTA(continuation=L.Continuation(20.0, 0.8)),
    "ADMM": L.ADMM(rho=1.0),
    "ChambollePock": L.ChambollePock(),
}


@eqx.filter_jit
def _solve(cost, method, x0, rtol=1e-11):
    return L.solve(cost, method, x0, max_steps=3000, rtol=rtol)


def test_all_methods_reach_the_same_lasso_minimiser(getkey):
    A, y = _lasso(getkey())
    cost = L.CompositeCost(L.LeastSquares(lx.MatrixLinearOperator(A), y), L.L1(0.02))
    x0 = jnp.zeros(A.shape[1])
    sols = {name: _solve(cost, m, x0) for name, m in ALL_METHODS.items()}
    for name, sol in sols.items():
        assert sol.result == L.RESULTS.successful, name
    ref = sols["FISTA"].value
    # KKT conditions of the LASSO at the reference: |A^T(y - Ax)| <= lam, with
    # equality and the sign of x on the support.
    corr = A.T @ (y - A @ ref)
    on = ref != 0
    assert jnp.all(jnp.abs(corr) <= 0.02 + 1e-9)
    assert jnp.allclose(corr[on], 0.02 * jnp.sign(ref[on]), atol=1e-9)
    for name, sol in sols.items():
        # Each method to its own tolerance of 1e-11 relative step length.
        assert dt.tree_allclose(sol.value, ref, rtol=0, atol=1e-7), name
        assert float(sol.state.cost) == pytest.approx(
            float(cost.value(ref)), rel=1e-9
        ), name


@pytest.mark.slow  # inner TV solves to 1e-11 in every FISTA step: ~10-40 s each
def test_tv_least_squares_fista_and_chambolle_pock_agree(getkey):
    """FISTA with the (inner, dual) TV prox and Chambolle-Pock with the analysis
    form of TV (no inner solve) minimise the same TV-regularised cost."""
    shape = (6, 6)
    iy, ix = np.indices(shape)
    truth = jnp.asarray(1.0 * (iy + ix > 5) + 0.5 * (ix > 3))
    B = jr.normal(getkey(), (24, 36)) / jnp.sqrt(24)
    op = lx.FunctionLinearOperator(
        lambda u: B @ u.ravel(), jax.ShapeDtypeStruct(shape, jnp.float64)
    )
    y = B @ truth.ravel() + 0.01 * jr.normal(getkey(), (24,))
    for iso in (True, False):
        prior = L.TV(0.05, isotropic=iso, rtol=1e-11)
        cost = L.CompositeCost(L.LeastSquares(op, y), prior)
        x0 = jnp.zeros(shape)
        a = _solve(cost, L.FISTA(), x0, rtol=1e-10)
        # Chambolle-Pock converges at O(1/k): a looser stop, a looser comparison.
        b = _solve(cost, L.ChambollePock(), x0, rtol=1e-7)
        assert a.result == L.RESULTS.successful
        assert b.result == L.RESULTS.successful
        assert dt.tree_allclose(a.value, b.value, rtol=0, atol=1e-5)
        assert float(b.state.cost) == pytest.approx(float(a.state.cost), rel=1e-6)


def test_admm_primal_and_dual_residuals_vanish(getkey):
    A, y = _lasso(getkey())
    cost = L.CompositeCost(L.LeastSquares(lx.MatrixLinearOperator(A), y), L.L1(0.02))
    sol = _solve(cost, L.ADMM(rho=1.0), jnp.zeros(A.shape[1]))
    # The primal and dual residuals of the step that produced the final iterate.
    nxt = sol.state.opt_state
    r0 = L.ADMM(rho=1.0)._step(cost, L.ADMM(rho=1.0)._init(cost, jnp.zeros(60)))
    r, s = float(nxt.residual), float(nxt.dual_residual)
    assert r < 1e-10 and s < 1e-10
    # Both decay by orders of magnitude (not necessarily monotonically).
    assert r < 1e-6 * float(r0.residual) and s < 1e-6 * float(r0.dual_residual)
    # The engine's residual (both, in gradient units) fell by the tolerance.
    g = np.asarray(sol.history["grad_norm"])
    n = int(sol.stats["num_iterations"])
    assert g[n] <= 1e-11 * g[0] and np.all(g[n:] == g[n])


def test_hqs_approaches_the_minimiser_with_a_growing_penalty(getkey):
    A, y = _lasso(getkey())
    cost = L.CompositeCost(L.LeastSquares(lx.MatrixLinearOperator(A), y), L.L1(0.02))
    x0 = jnp.zeros(A.shape[1])
    ref = _solve(cost, L.FISTA(), x0).value
    errs = []
    for n_steps in (10, 40):
        x, _ = eqx.filter_jit(
            lambda c, n=n_steps: L.unroll(c, L.HQS(rho=0.05), x0, n_steps=n)
        )(cost)
        errs.append(float(jnp.linalg.norm(x - ref)))
    assert errs[1] < 0.2 * errs[0]


def test_unrolled_iterations_are_differentiable_in_the_prior_weight(getkey):
    A, y = _lasso(getkey())
    target = jr.normal(getkey(), (A.shape[1],))
    op = lx.MatrixLinearOperator(A)

    @jax.jit
    def loss(log_lam):
        cost = L.CompositeCost(L.LeastSquares(op, y), L.L1(jnp.exp(log_lam)))
        x, _ = L.unroll(cost, L.FISTA(step_size=0.2), jnp.zeros(A.shape[1]), n_steps=30)
        return jnp.sum((x - target) ** 2)

    p0 = jnp.log(0.05)
    g = jax.grad(loss)(p0)
    res = dt.taylor_test(loss, p0, grad=g, direction=jnp.asarray(1.0), eps0=1e-3)
    assert res.passed and res.rate > 1.9, str(res)
    bad = dt.taylor_test(loss, p0, grad=1.1 * g, direction=jnp.asarray(1.0), eps0=1e-3)
    assert not bad.passed


def test_solve_under_vmap_matches_a_loop(getkey):
    A, _ = _lasso(getkey())
    ys = jr.normal(getkey(), (3, A.shape[0]))
    op = lx.MatrixLinearOperator(A)

    def one(y):
        cost = L.CompositeCost(L.LeastSquares(op, y), L.L1(0.05))
        return L.solve(
            cost, L.FISTA(), jnp.zeros(A.shape[1]), max_steps=3000, rtol=1e-10
        ).value

    batched = jax.jit(jax.vmap(one))(ys)
    single = jax.jit(one)
    for y, b in zip(ys, batched, strict=True):
        assert dt.tree_allclose(b, single(y), atol=1e-12)


def test_result_codes_and_throw(getkey):
    A, y = _lasso(getkey())
    cost = L.CompositeCost(L.LeastSquares(lx.MatrixLinearOperator(A), y), L.L1(0.02))
    x0 = jnp.zeros(A.shape[1])
    sol = L.solve(cost, L.ISTA(), x0, max_steps=3)
    assert sol.result == L.RESULTS.max_iterations_reached
    assert int(sol.stats["num_iterations"]) == 3
    diverging = L.solve(cost, L.ISTA(step_size=50.0), x0, max_steps=2000)
    assert diverging.result == L.RESULTS.nonfinite_cost
    assert bool(jnp.all(jnp.isfinite(diverging.value)))
    with pytest.raises(Exception, match="reached `max_iterations`"):
        L.solve(cost, L.ISTA(), x0, max_steps=3, throw=True)


def test_bad_arguments_raise(getkey):
    A, y = _lasso(getkey())
    op = lx.MatrixLinearOperator(A)
    with pytest.raises(TypeError, match="`operator` must be a lineax"):
        L.LeastSquares(A, y)
    with pytest.raises(ValueError, match="`target` must have the shape"):
        L.LeastSquares(op, y[:-1])
    with pytest.raises(TypeError, match="`prior` must be an assimilation.learn prior"):
        L.CompositeCost(L.LeastSquares(op, y), lambda x: 0.0)
    smooth = L.CompositeCost(lambda x: jnp.sum(x**2), L.L1(0.1))
    with pytest.raises(TypeError, match="needs `cost.smooth` to be a LeastSquares"):
        L.solve(smooth, L.ADMM(), jnp.zeros(3))
    with pytest.raises(ValueError, match="`max_steps` must be an int >= 1"):
        L.solve(smooth, L.FISTA(), jnp.zeros(3), max_steps=0)
    with pytest.raises(ValueError, match="`rho` must be > 0"):
        L.ADMM(rho=0.0)
    with pytest.raises(ValueError, match="`factor` must lie in"):
        L.Continuation(10.0, 1.5)
    with pytest.raises(TypeError, match="`cost` must be an assimilation.learn"):
        L.solve(lambda x: x, L.FISTA(), jnp.zeros(3))
