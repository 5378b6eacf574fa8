"""Learned unrolled solvers (LISTA, ALISTA) and physics operators."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import pytest

import assimilation as da
import assimilation.learn as L
import dphys
import dphys.testing as dt
import pdes


def _problem(key, m=20, n=40, k=4):
    ka, kx, kw = jr.split(key, 3)
    A = jr.normal(ka, (m, n)) / jnp.sqrt(m)
    x = jnp.zeros(n).at[jr.choice(kx, n, (k,), replace=False)].set(1.0)
    return A, A @ x + 0.01 * jr.normal(kw, (m,)), x


def test_untrained_networks_are_ista(getkey):
    A, y, _ = _problem(getkey())
    op = lx.MatrixLinearOperator(A)
    lip = float(jnp.linalg.norm(A, 2) ** 2)
    cost = L.CompositeCost(L.LeastSquares(op, y), L.L1(0.05))
    ista, _ = L.unroll(cost, L.ISTA(step_size=1.0 / lip), jnp.zeros(40), n_steps=6)
    alista = L.ALISTA(op, 6, step=1.0 / lip, lam=0.05)
    lista = L.LISTA(A, 6, lam=0.05)
    assert dt.tree_allclose(alista(y), ista, rtol=1e-12, atol=1e-14)
    assert dt.tree_allclose(lista(y), ista, rtol=1e-10, atol=1e-12)
    layers = alista(y, all_layers=True)
    assert layers.shape == (7, 40) and dt.tree_allclose(layers[-1], ista, atol=1e-14)
    assert dt.tree_allclose(alista(y, n_layers=0), jnp.zeros(40))


@pytest.mark.parametrize("kind", ["ALISTA", "LISTA"])
def test_gradients_of_learned_steps_and_thresholds(kind, getkey):
    A, y, x = _problem(getkey())
    support = L.support_schedule(5, 0.05, 0.2)
    if kind == "ALISTA":
        net = L.ALISTA(
            lx.MatrixLinearOperator(A),
            5,
            step=0.2,
            lam=0.05,
            support=support,
            nonnegative=True,
        )
    else:
        net = L.LISTA(A, 5, lam=0.05, support=support)
    params, static = eqx.partition(net, L.learned_leaves(net))
    loss = jax.jit(
        lambda p: (
            jnp.sum((eqx.combine(p, static)(y) - x) ** 2)
            + jnp.sum(jnp.sin(eqx.combine(p, static)(y)))
        )
    )
    g = jax.grad(loss)(params)
    direction = jax.tree_util.tree_map(
        lambda a: 1e-2 * jr.normal(getkey(), a.shape), params
    )
    res = dt.taylor_test(loss, params, grad=g, direction=direction, eps0=1e-2)
    assert res.passed and res.rate > 1.9, str(res)
    wrong = jax.tree_util.tree_map(lambda a: 1.1 * a + 1e-3, g)
    assert not dt.taylor_test(
        loss, params, grad=wrong, direction=direction, eps0=1e-2
    ).passed


def test_learned_leaves_exclude_the_operator(getkey):
    A, _, _ = _problem(getkey())
    spec = L.learned_leaves(L.ALISTA(lx.MatrixLinearOperator(A), 3, step=0.1, lam=0.1))
    assert spec.steps and spec.thresholds
    assert not any(jax.tree_util.tree_leaves(spec.operator))
    assert not L.learned_leaves(L.LISTA(A, 3)).matrix


def test_fit_unrolled_improves_alista_beyond_ista(getkey):
    A, _, _ = _problem(getkey())
    op = lx.MatrixLinearOperator(A)
    lip = float(jnp.linalg.norm(A, 2) ** 2)

    def sample(key, batch=16):
        kx, ks, kw = jr.split(key, 3)
        x = jr.normal(kx, (batch, 40)) * (jr.uniform(ks, (batch, 40)) < 0.1)
        return x @ A.T + 0.01 * jr.normal(kw, (batch, 20)), x

    def loss(model, batch):
        y, x = batch
        return jnp.mean(jnp.sum((jax.vmap(model)(y) - x) ** 2, axis=-1))

    net = L.ALISTA(op, 6, step=1.0 / lip, lam=0.05)
    test = sample(jr.key(7), 256)
    before = float(loss(net, test))
    fit = L.fit_unrolled(
        net,
        sample(jr.key(8), 512),
        key=getkey(),
        n_steps=150,
        batch_size=16,
        learning_rate=1e-2,
    )
    trained = fit.model
    assert fit.stats["steps"] == 150
    assert float(loss(trained, test)) < 0.7 * before
    # Only the steps and thresholds moved; the operator is untouched.
    assert dt.tree_allclose(trained.operator.matrix, A, rtol=0, atol=0)
    assert not dt.tree_allclose(trained.steps, net.steps)


def test_analytic_weight(getkey):
    A, _, _ = _problem(getkey())
    W = L.analytic_weight(A)
    gram = W.T @ A
    assert dt.tree_allclose(jnp.diagonal(gram), jnp.ones(40), rtol=1e-12)
    # Each column is the constrained minimiser: any feasible perturbation (one
    # that keeps w_i . a_i = 1) increases ||W^T A||_F.
    d = jr.normal(getkey(), W.shape)
    d = d - A * jnp.sum(d * A, axis=0) / jnp.sum(A * A, axis=0)
    base = jnp.sum(gram**2)
    assert float(jnp.sum(((W + 1e-3 * d).T @ A) ** 2)) > float(base)


def _heat_source_operator(n=16, kappa=1e-2):
    grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
    obs_op = da.Interpolation(grid, np.random.default_rng(0).uniform(0, 1, (6, 2)))

    def forward(f):
        model = pdes.Heat(grid, kappa=kappa, source=f)
        return dphys.simulate(
            model,
            dphys.CrankNicolson(),
            jnp.zeros((n, n)),
            dt=0.05,
            n_steps=8,
            saveat=dphys.SaveAt(t1=False, steps=(4, 8), fn=lambda t, u: obs_op(u)),
        ).ys

    return L.physics_operator(forward, jnp.zeros((n, n)))


def test_physics_operator_dot_test_and_adjoint_is_the_vjp(getkey):
    op = _heat_source_operator()
    x = jnp.zeros((16, 16))
    fwd = jax.jit(lambda v: op.mv(v))
    adj = jax.jit(lambda w: op.transpose().mv(w))
    res = dt.dot_test(fwd, adj, x, key=getkey())
    assert res.passed and res.rel_error < 1e-12, str(res)
    wrong = jax.jit(lambda w: 1.01 * op.transpose().mv(w))
    assert not dt.dot_test(fwd, wrong, x).passed
    y = jr.normal(getkey(), (2, 6))
    _, vjp = jax.vjp(op.mv, x)
    assert dt.tree_allclose(op.transpose().mv(y), vjp(y)[0], rtol=1e-12, atol=1e-15)


def test_alista_on_a_physics_operator_under_vmap(getkey):
    op = _heat_source_operator()
    net = L.ALISTA(op, 3, step=1.0, lam=0.01, nonnegative=True)
    ys = jr.normal(getkey(), (3, 2, 6))
    out = eqx.filter_jit(jax.vmap(net))(ys)
    assert out.shape == (3, 16, 16) and bool(jnp.all(out >= 0))
    one = eqx.filter_jit(net)
    assert dt.tree_allclose(out[1], one(ys[1]), atol=1e-14)


def test_bad_arguments(getkey):
    A, _, _ = _problem(getkey())
    op = lx.MatrixLinearOperator(A)
    with pytest.raises(ValueError, match="`n_layers` must be an int >= 1"):
        L.ALISTA(op, 0, step=0.1, lam=0.1)
    with pytest.raises(ValueError, match="`support` must give one fraction per layer"):
        L.LISTA(A, 3, support=(0.1, 0.2))
    with pytest.raises(TypeError, match="`operator` must be a lineax"):
        L.ALISTA(A, 3, step=0.1, lam=0.1)
    with pytest.raises(ValueError, match="`n_layers` must lie in"):
        L.LISTA(A, 3)(jnp.zeros(20), n_layers=5)
    with pytest.raises(TypeError, match="`fn` must be a callable"):
        L.physics_operator(3, jnp.zeros(2))
