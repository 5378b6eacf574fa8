"""Gradient modes of unrolled assimilators: Taylor tests through the physics,
implicit vs full unroll, Neumann sums at the fixed point, the convergence gate,
memory prediction."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from _learn_twin import advection_twin

from assimilation import learn
from assimilation.learn import _unrolled as U
from dphys.testing import taylor_test


def _params(assim):
    return eqx.partition(assim, eqx.is_inexact_array)


def _rel(a, b):
    fa, fb = (
        jnp.concatenate([jnp.ravel(x) for x in jtu.tree_leaves(t)]) for t in (a, b)
    )
    return float(jnp.linalg.norm(fa - fb) / jnp.linalg.norm(fb))


def _taylor(loss_fn, assim, grad=None, **kw):
    params, static = _params(assim)
    f = eqx.filter_jit(lambda p: loss_fn(eqx.combine(p, static)))
    if grad is None:
        grad = eqx.filter_jit(
            eqx.filter_grad(lambda p: loss_fn(eqx.combine(p, static)))
        )(params)
    return taylor_test(f, params, grad=grad, key=jr.key(3), **kw)


@pytest.fixture(scope="module")
def twin():
    return advection_twin(sigma=0.2)


def _assimilator(cost, K, adjoint, **kw):
    a = learn.unrolled_gradient(
        cost,
        K,
        step_size=0.01,
        modulator=True,
        step_net=True,
        width=4,
        depth=1,
        key=jr.key(1),
        **kw,
    )
    # Non-zero networks, so that every learned component carries a derivative.
    a = eqx.tree_at(
        lambda a: a.layers.modulator.layers[-1].weight,
        a,
        0.05 * jr.normal(jr.key(2), a.layers.modulator.layers[-1].weight.shape),
    )
    a = eqx.tree_at(
        lambda a: a.layers.step_net.mlp.layers[-1].weight,
        a,
        0.1 * jr.normal(jr.key(4), a.layers.step_net.mlp.layers[-1].weight.shape),
    )
    return eqx.tree_at(lambda a: a.adjoint, a, adjoint)


def test_full_unroll_taylor_with_negative_control(twin):
    cost, truth = twin
    K = 3
    assim = _assimilator(cost, K, learn.FullUnroll())
    loss = lambda a: learn.Supervised()(a, cost, truth=truth)
    result = _taylor(loss, assim)
    assert result.passed, str(result)
    assert result.rate1 > 1.9
    # Negative control: the one-step (Jacobian-free) gradient is not the gradient
    # of the full loss, and the same test must reject it.
    params, static = _params(assim)
    one_step = lambda a: eqx.tree_at(lambda a: a.adjoint, a, learn.OneStep())
    wrong = eqx.filter_grad(lambda p: loss(one_step(eqx.combine(p, static))))(params)
    bad = _taylor(loss, assim, grad=wrong)
    assert not bad.passed
    assert bad.rate1 < 1.5


def test_checkpointed_iterations_equal_stored(twin):
    cost, truth = twin
    loss = lambda a: learn.Supervised()(a, cost, truth=truth)
    grads = []
    for levels in (1, 2, 3):
        # 20 iterations: long enough for two- and three-level checkpointing to
        # differ from storing every iteration (dphys.nested_scan).
        assim = learn.unrolled_gradient(
            cost, 20, step_size=1e-3, momentum=True, adjoint=learn.FullUnroll(levels)
        )
        params, static = _params(assim)
        f = lambda p, static=static: loss(eqx.combine(p, static))
        grads.append(eqx.filter_grad(f)(params))
    assert _rel(grads[1], grads[0]) < 1e-12
    assert _rel(grads[2], grads[0]) < 1e-12


@pytest.mark.parametrize(
    "mode", ["truncated", pytest.param("one_step", marks=pytest.mark.slow)]
)
def test_truncated_modes_are_exact_gradients_of_the_last_iterations(twin, mode):
    # Truncated(k) differentiates exactly the last k iterations started from the
    # (frozen) iterate K-k: Taylor-test that function against the mode's gradient.
    cost, truth = twin
    K, k = 4, (2 if mode == "truncated" else 1)
    adjoint = learn.Truncated(k=k) if mode == "truncated" else learn.OneStep()
    assim = _assimilator(cost, K, adjoint)
    loss = learn.Supervised()
    params, static = _params(assim)
    g_mode = eqx.filter_grad(lambda p: loss(eqx.combine(p, static), cost, truth=truth))(
        params
    )
    head = eqx.tree_at(
        lambda a: a.adjoint, assim.iterations(0, K - k), learn.FullUnroll()
    )
    v_mid = head(cost).control

    def tail(a):
        a = eqx.tree_at(lambda a: a.adjoint, a.iterations(K - k, K), learn.FullUnroll())
        return loss.evaluate(a(cost, v_mid), cost, truth)

    result = _taylor(tail, assim, grad=g_mode)
    assert result.passed, str(result)
    # The first K-k layers get no gradient at all.
    assert float(jnp.max(jnp.abs(g_mode.layers.log_step[: K - k]))) == 0.0
    assert float(jnp.max(jnp.abs(g_mode.layers.log_step[K - k :]))) > 0.0


def test_truncation_depth_from_contraction():
    assert learn.Truncated.from_contraction(0.5, 1e-3).k == 10
    assert learn.Truncated.from_contraction(0.9, 1e-2).k == 44
    assert learn.Truncated.from_contraction(0.0).k == 1
    with pytest.raises(ValueError, match="contraction"):
        learn.Truncated.from_contraction(1.2)
    with pytest.raises(ValueError, match="eps"):
        learn.Truncated.from_contraction(0.5, 2.0)


# ------------------------------------------------------------------------ implicit


@pytest.fixture(scope="module")
def deq_twin():
    # sigma = 0.5: the whitened Hessian's spectrum is [1, 12.8], so gradient steps
    # of 0.14 contract by about 0.85 per iteration.
    return advection_twin(sigma=0.5)


def _deq(cost, adjoint, **kw):
    grid = cost.model.grid
    net = learn.GridCNN(grid, 1, 2, width=4, depth=1, zero_init=False, key=jr.key(7))
    prior = learn.NetworkPrior(net, jnp.asarray(0.0))
    a = learn.unrolled_gradient(cost, 1, step_size=0.14, tied=True, **kw)
    a = eqx.tree_at(lambda a: a.prior, a, prior, is_leaf=lambda x: x is None)
    return eqx.tree_at(lambda a: a.adjoint, a, adjoint)


def _implicit(**kw):
    opts = dict(tol=1e-13, max_iterations=300, adjoint_rtol=1e-13, adjoint_tol=1e-8)
    opts.update(kw)
    return learn.Implicit(**opts)


def test_implicit_taylor_and_converged(deq_twin):
    cost, truth = deq_twin
    assim = _deq(cost, _implicit())
    res = assim(cost)
    assert bool(res.info["converged"])
    assert float(res.info["fixed_point_residual"]) < 1e-12
    loss = lambda a: learn.Supervised()(a, cost, truth=truth)
    result = _taylor(loss, assim)
    assert result.passed, str(result)


def test_implicit_equals_full_unroll_to_convergence(deq_twin):
    cost, truth = deq_twin
    loss = learn.Supervised()
    imp = _deq(cost, _implicit())
    params, static = _params(imp)
    g_imp = eqx.filter_jit(
        eqx.filter_grad(lambda p: loss(eqx.combine(p, static), cost, truth=truth))
    )(params)
    full = eqx.tree_at(lambda a: a.adjoint, imp, learn.FullUnroll(levels=2))
    full = full.iterations(0, 250)
    params_f, static_f = _params(full)
    g_full = eqx.filter_jit(
        eqx.filter_grad(lambda p: loss(eqx.combine(p, static_f), cost, truth=truth))
    )(params_f)
    g_imp = eqx.filter(g_imp, eqx.is_inexact_array)
    assert _rel(g_imp.prior, g_full.prior) < 1e-6
    # The step size does not move the fixed point: both gradients vanish there.
    assert abs(float(g_imp.layers.log_step)) < 1e-8 * _norm(g_imp.prior)


def _norm(tree):
    return float(jnp.sqrt(sum(jnp.sum(x**2) for x in jtu.tree_leaves(tree))))


def test_unrolled_jacobian_at_fixed_point_is_the_neumann_sum(deq_twin):
    cost, truth = deq_twin
    assim = _deq(cost, _implicit())
    z_star = assim(cost).control
    K = 7
    cot = jtu.tree_map(lambda x: jr.normal(jr.key(9), x.shape), z_star)
    theta = (assim, cost)
    carry = {"v": z_star}

    def unrolled(theta):
        z = carry
        for _ in range(K):
            z, _ = U._iteration(theta, 0, z)
        return z

    _, vjp = jax.vjp(unrolled, theta)
    (g_unrolled,) = vjp({"v": cot})
    g_neumann, _ = learn.neumann_vjp(U._iteration, theta, carry, {"v": cot}, K)
    a = eqx.filter(g_unrolled[0], eqx.is_inexact_array)
    b = eqx.filter(g_neumann[0], eqx.is_inexact_array)
    assert _rel(a.prior, b.prior) < 1e-12
    # d T / d(step) = -grad J, zero at the fixed point: both are round-off there.
    diff = abs(float(a.layers.log_step - b.layers.log_step))
    assert diff < 1e-10 * _norm(b.prior)


def _grads(assim, cost, truth):
    params, static = _params(assim)
    g = eqx.filter_grad(
        lambda p: learn.Supervised()(eqx.combine(p, static), cost, truth=truth)
    )(params)
    return g


def test_gate_falls_back_when_the_fixed_point_has_not_converged(deq_twin):
    cost, truth = deq_twin
    mode = _implicit(max_iterations=4, anderson=0, fallback_k=3, report=jnp.zeros(4))
    assim = _deq(cost, mode)
    res = assim(cost)
    assert not bool(res.info["converged"])
    g = _grads(assim, cost, truth)
    report = learn.implicit_report(g)
    assert report["mode"] == "truncated"
    assert report["fixed_point_residual"] > 1e-6
    # The fallback is the 3-term Neumann gradient at the returned iterate.
    z = {"v": res.control}
    x_a = cost.initial_state(res.control)
    cot = jax.grad(lambda x: jnp.mean((x - truth) ** 2))(x_a)
    vbar = jax.vjp(lambda v: cost.initial_state(v), res.control)[1](cot)[0]
    expected, _ = learn.neumann_vjp(U._iteration, (assim, cost), z, {"v": vbar}, 3)
    assert _rel(g.prior, eqx.filter(expected[0].prior, eqx.is_inexact_array)) < 1e-10
    # Converged, the same mode reports the implicit gradient.
    ok = _deq(cost, _implicit(report=jnp.zeros(4)))
    assert learn.implicit_report(_grads(ok, cost, truth))["mode"] == "implicit"


def test_gate_falls_back_when_the_adjoint_solve_fails(deq_twin):
    cost, truth = deq_twin
    mode = _implicit(adjoint_max_steps=1, report=jnp.zeros(4))
    assim = _deq(cost, mode)
    assert bool(assim(cost).info["converged"])
    report = learn.implicit_report(_grads(assim, cost, truth))
    assert report["mode"] == "truncated"
    assert report["adjoint_residual"] > 1e-8


def test_anderson_converges_faster_than_plain_iteration(deq_twin):
    cost, _ = deq_twin
    plain = _deq(cost, _implicit(anderson=0, tol=1e-10))(cost).info
    anderson = _deq(cost, _implicit(anderson=5, tol=1e-10))(cost).info
    assert bool(plain["converged"]) and bool(anderson["converged"])
    assert int(anderson["iterations"]) < int(plain["iterations"])


def test_implicit_needs_tied_parameters(twin):
    cost, _ = twin
    assim = learn.unrolled_gradient(cost, 3, step_size=0.01, adjoint=learn.Implicit())
    with pytest.raises(ValueError, match="tied"):
        assim(cost)


def test_measured_contraction_matches_the_spectrum(deq_twin):
    cost, _ = deq_twin
    # Tied plain gradient steps: T(v) = v - a grad J(v), so rho = max|1 - a lambda|
    # over the whitened Hessian's eigenvalues.
    a = 0.1
    assim = learn.unrolled_gradient(cost, 30, step_size=a, tied=True)
    rho = float(learn.contraction(assim, cost, n_power=200))
    hess = jax.hessian(lambda x: cost({"initial_state": x}))(jnp.zeros(16))
    lam = np.linalg.eigvalsh(np.asarray(hess))
    expected = np.max(np.abs(1 - a * lam))
    assert rho == pytest.approx(expected, rel=1e-3)


# -------------------------------------------------------------------------- memory


def test_memory_budget_picks_a_mode_that_fits(twin):
    cost, truth = twin
    assim = learn.unrolled_gradient(cost, 4, step_size=0.01)
    loss = learn.Supervised()
    full = learn.gradient_memory(
        eqx.tree_at(lambda a: a.adjoint, assim, learn.FullUnroll(levels=1)),
        loss,
        cost,
        truth,
    )
    one = learn.gradient_memory(
        eqx.tree_at(lambda a: a.adjoint, assim, learn.OneStep()), loss, cost, truth
    )
    assert one < full
    chosen, table = learn.within_budget(assim, loss, cost, truth, budget_mb=full * 1.01)
    assert isinstance(chosen.adjoint, learn.FullUnroll)
    assert table[0][1] == pytest.approx(full)
    chosen, table = learn.within_budget(
        assim, loss, cost, truth, budget_mb=0.5 * (one + full)
    )
    assert table[-1][1] <= 0.5 * (one + full)
    with pytest.raises(ValueError, match="budget_mb"):
        learn.within_budget(assim, loss, cost, truth, budget_mb=one * 1e-3)
