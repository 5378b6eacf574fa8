"""Plug-and-play priors: a learned denoiser, RED, unrolled HQS (learned penalties)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import pytest

import assimilation.learn as L
import dphys
import dphys.testing as dt
import pdes


def _fields(key, n_fields, n=16):
    """Smooth fields of a heat model's state distribution: white noise diffused over
    a length sqrt(2 kappa t) = 0.2 (3 cells)."""
    grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
    model = pdes.Heat(grid, kappa=2e-2)
    run = lambda u0: (
        dphys.simulate(model, dphys.CrankNicolson(), u0, dt=0.1, n_steps=10).final
    )
    return jax.jit(jax.vmap(run))(jr.normal(key, (n_fields, n, n)))


def test_trained_denoiser_removes_noise_and_is_a_pnp_prox(getkey):
    train = _fields(getkey(), 256)
    test = _fields(getkey(), 32)
    scale = float(jnp.std(train))
    sigma = 0.3 * scale
    net = L.DenoisingCNN(key=getkey(), width=8, depth=3)
    assert dt.tree_allclose(net(train[0]), train[0])  # the identity before training
    fit = L.train_denoiser(
        net,
        train,
        key=getkey(),
        noise_std=sigma,
        n_steps=300,
        batch_size=16,
        learning_rate=1e-2,
    )
    den = fit.model
    noisy = test + sigma * jr.normal(getkey(), test.shape)
    before = float(jnp.mean((noisy - test) ** 2))
    after = float(jnp.mean((jax.vmap(den)(noisy) - test) ** 2))
    assert after < 0.5 * before, (before, after)
    prior = L.PnP(den)
    assert dt.tree_allclose(prior.prox(noisy[0], 0.3), den(noisy[0]))


def _smoother(n, key, symmetric=True):
    m = jr.uniform(key, (n, n))
    m = 0.5 * (m + m.T) if symmetric else m
    return m / (1.1 * jnp.max(jnp.sum(jnp.abs(m), axis=1)))


def test_red_gradient_rule(getkey):
    """For a symmetric linear denoiser the RED gradient lam (x - Dx) is the exact
    gradient of lam/2 <x, x - Dx>; for a non-symmetric one it is not."""
    A = jr.normal(getkey(), (6, 10))
    y = jr.normal(getkey(), (6,))
    data = L.LeastSquares(lx.MatrixLinearOperator(A), y)
    x = jr.normal(getkey(), (10,))
    for symmetric in (True, False):
        S = _smoother(10, getkey(), symmetric)
        red = L.RED(data, lambda v, S=S: S @ v, 0.7)
        _, g = red.value_and_grad(x)
        exact = jax.grad(red.value)(x)
        assert dt.tree_allclose(g, exact, rtol=1e-10) == symmetric


def test_unrolled_hqs_gradient_in_the_penalties(getkey):
    n = 8
    B = jr.normal(getkey(), (30, n * n)) / 6.0
    op = lx.FunctionLinearOperator(
        lambda u: B @ u.ravel(), jax.ShapeDtypeStruct((n, n), jnp.float64)
    )
    net = L.UnrolledHQS(
        op,
        L.DenoisingCNN(key=getkey(), width=4, depth=2),
        jnp.array([0.5, 1.0, 2.0]),
        cg_steps=10,
    )
    truth = _fields(getkey(), 1, n)[0]
    y = B @ truth.ravel()
    params, static = eqx.partition(net, L.unrolled_hqs_leaves(net, denoiser=False))
    loss = jax.jit(lambda p: jnp.sum((eqx.combine(p, static)(y) - truth) ** 2))
    g = jax.grad(loss)(params)
    h = jax.tree_util.tree_map(lambda a: jr.normal(getkey(), a.shape), params)
    res = dt.taylor_test(loss, params, grad=g, direction=h, eps0=1e-2)
    assert res.passed and res.rate > 1.9, str(res)
    bad = jax.tree_util.tree_map(lambda a: 1.2 * a, g)
    assert not dt.taylor_test(loss, params, grad=bad, direction=h, eps0=1e-2).passed


def test_pnp_bad_arguments(getkey):
    with pytest.raises(ValueError, match="`depth` must be >= 2"):
        L.DenoisingCNN(key=getkey(), depth=1)
    with pytest.raises(TypeError, match="`data` must be an AbstractSmooth"):
        L.RED(lambda x: 0.0, lambda x: x, 1.0)
    with pytest.raises(TypeError, match="`operator` must be a lineax"):
        L.UnrolledHQS(jnp.eye(3), lambda x: x, jnp.ones(2))
