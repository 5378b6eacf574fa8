"""Tests for dphys.testing: the gradient-verification tools must pass correct
derivatives and fail wrong ones (every check has a negative control)."""

import math

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import dphys.testing as dt


jax.config.update("jax_enable_x64", True)

EPS64 = float(jnp.finfo(jnp.float64).eps)


@jax.jit  # jitted only to keep the suite fast; the checks work eagerly too
def cost(x):
    """A smooth nonlinear scalar function of a dict of arrays (and a 0-d leaf)."""
    u, k, c = x["u"], x["k"], x["c"]
    return (
        jnp.sum(jnp.sin(u) * k[:3] ** 2)
        + jnp.exp(0.3 * c) * jnp.sum(k**2)
        + jnp.sum(u**3) * c
    )


def point():
    return {
        "u": jnp.linspace(0.1, 1.2, 3),
        "k": jnp.array([1.0, -2.0, 0.5, 3.0]),
        "c": jnp.asarray(0.7),
    }


def scaled(tree, s):
    return jtu.tree_map(lambda leaf: s * leaf, tree)


def hvp_of(f, x):
    return lambda v: jax.jvp(jax.grad(f), (x,), (v,))[1]


# --------------------------------------------------------------------------------------
# taylor_test
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_taylor_passes_for_correct_gradient(seed):
    res = dt.taylor_test(cost, point(), key=jr.key(seed))
    assert res.passed
    assert 1.9 <= res.rate <= 2.2
    assert res.rate == res.rate1
    assert abs(res.rate0 - 1.0) < 0.1
    assert res.remainder2 is None and res.rates2 is None and res.rate2 is None
    # Every step was above round-off, so every rate counted.
    assert np.all(res.remainder1 > res.roundoff)
    assert np.all(np.abs(res.rates1 - 2.0) < 0.1)
    assert "PASSED" in str(res)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_taylor_fails_for_slightly_wrong_gradient(seed):
    # A 0.1% error in the gradient: the first-order remainder keeps an O(eps) term.
    x = point()
    wrong = scaled(jax.grad(cost)(x), 1.0 + 1e-3)
    res = dt.taylor_test(cost, x, grad=wrong, key=jr.key(seed))
    assert not res.passed
    assert abs(res.rate - 1.0) < 0.2
    assert "FAILED" in str(res)


@pytest.mark.parametrize("factor", [0.1, 0.25, 0.7])
def test_taylor_rates_use_the_step_factor(factor):
    # Rates are log(r_i / r_{i+1}) / log(1 / factor): 1 for r0 and 2 for r1 of a
    # correct gradient at any factor, and 1 for r1 of a 0.1%-wrong one. Computed
    # with log 2 instead, the rates at factor 0.25 would double (a wrong gradient
    # would then pass with rate 2).
    x = point()
    grad = jax.grad(cost)(x)
    n_eps = 4 if factor < 0.5 else 8  # comparable span of steps
    res = dt.taylor_test(cost, x, grad=grad, factor=factor, n_eps=n_eps)
    assert res.passed and abs(res.rate1 - 2.0) < 0.1, str(res)
    assert abs(res.rate0 - 1.0) < 0.1, str(res)
    np.testing.assert_allclose(res.eps[1:] / res.eps[:-1], factor, rtol=1e-14)
    # The reported rates are the successive log-ratios over log(1/factor).
    expect = np.log(res.remainder1[:-1] / res.remainder1[1:]) / np.log(1 / factor)
    np.testing.assert_allclose(res.rates1, expect, rtol=1e-12)
    wrong = scaled(grad, 1.0 + 1e-3)
    bad = dt.taylor_test(cost, x, grad=wrong, factor=factor, n_eps=n_eps)
    assert not bad.passed and abs(bad.rate1 - 1.0) < 0.2, str(bad)


def test_taylor_fails_for_wrong_sign():
    x = point()
    res = dt.taylor_test(cost, x, grad=scaled(jax.grad(cost)(x), -1.0))
    assert not res.passed
    assert abs(res.rate - 1.0) < 0.05


def test_taylor_with_hvp_reaches_third_order():
    x = point()
    res = dt.taylor_test(cost, x, hvp=hvp_of(cost, x))
    assert res.passed
    assert res.rate2 is not None and res.rate == res.rate2
    assert res.rate >= 2.9
    assert res.rate1 >= 1.9


def test_taylor_fails_for_wrong_hvp():
    x = point()
    hvp = hvp_of(cost, x)
    res = dt.taylor_test(cost, x, hvp=lambda v: scaled(hvp(v), 1.01))
    assert not res.passed
    assert res.rate1 >= 1.9  # the gradient is still right...
    assert res.rate2 is not None and res.rate2 < 2.2  # ...the Hessian is not


def test_taylor_linear_function_is_exact_to_roundoff():
    # r1 of a linear function is pure round-off: documented as rate inf, passed.
    c = jnp.array([0.5, -1.0, 2.0])
    f = lambda x: jnp.dot(c, x)
    res = dt.taylor_test(f, jnp.ones(3))
    assert res.passed
    assert res.rate1 == math.inf
    assert np.all(res.remainder1 <= res.roundoff)
    # ... but a wrong gradient of a linear function is not round-off.
    assert not dt.taylor_test(f, jnp.ones(3), grad=1.01 * c).passed


@pytest.mark.parametrize("x0", [0.7, np.float64(0.7), jnp.asarray(0.7)])
def test_taylor_scalar_input(x0):
    res = dt.taylor_test(lambda x: jnp.exp(x) * jnp.cos(x), x0)
    assert res.passed
    assert 1.9 <= res.rate <= 2.2


def test_taylor_zero_curvature_gives_third_order():
    # (e^x cos x)'' = 0 at x = 0: r1 falls like eps^3; the step rule measures that
    # and keeps the remainders above round-off, so the rate is 3, not undecidable.
    f = lambda x: jnp.exp(x) * jnp.cos(x)
    res = dt.taylor_test(f, 0.0)
    assert res.passed and abs(res.rate - 3.0) < 0.1
    assert np.all(res.remainder1[:4] > res.roundoff[:4])
    assert not dt.taylor_test(f, 0.0, grad=jnp.asarray(1.001)).passed


def test_taylor_roundoff_cannot_hide_a_wrong_gradient():
    # With a far too small eps0 every remainder is round-off: undecidable, not a pass.
    x = point()
    wrong = scaled(jax.grad(cost)(x), 1.0 + 1e-3)
    with pytest.warns(UserWarning, match="collapsed"):
        res = dt.taylor_test(cost, x, grad=wrong, eps0=1e-13)
    assert np.all(res.remainder1 <= res.roundoff)
    assert not res.passed and math.isnan(res.rate)
    assert res.collapsed and "larger `eps0`" in str(res)


def test_taylor_quadratic_with_hvp_is_exact_to_roundoff():
    Q = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    f = jax.jit(lambda x: 0.5 * x @ Q @ x + jnp.sum(x))
    x = jnp.array([0.3, -1.2])
    res = dt.taylor_test(f, x, hvp=lambda v: Q @ v)
    assert res.passed and res.rate2 == math.inf and 1.9 <= res.rate1 <= 2.2
    assert not dt.taylor_test(f, x, hvp=lambda v: 1.01 * Q @ v).passed


def test_taylor_zero_leaf_and_user_gradient_without_jax():
    # f is plain NumPy (not traceable by JAX): the user supplies the gradient.
    f = lambda x: float(np.sum(np.asarray(x["a"]) ** 3) + np.asarray(x["b"]) ** 2)
    x = {"a": jnp.array([0.5, 1.0, 1.5]), "b": jnp.asarray(0.0)}
    grad = {"a": 3.0 * x["a"] ** 2, "b": 2.0 * x["b"]}
    assert dt.taylor_test(f, x, grad=grad).passed
    bad = {"a": grad["a"], "b": jnp.asarray(0.1)}  # wrong only in the zero leaf
    assert not dt.taylor_test(f, x, grad=bad).passed


def test_taylor_honours_direction():
    x = point()
    grad = jax.grad(cost)(x)
    bad = dict(grad, k=1.1 * grad["k"])  # only the "k" block is wrong
    only_u = {"u": jnp.ones(3), "k": jnp.zeros(4), "c": jnp.asarray(0.0)}
    only_k = {"u": jnp.zeros(3), "k": jnp.ones(4), "c": jnp.asarray(0.0)}
    assert dt.taylor_test(cost, x, grad=bad, direction=only_u).passed
    assert not dt.taylor_test(cost, x, grad=bad, direction=only_k).passed


def test_taylor_step_rule():
    # The documented default: one trial step moving x by 1%, then the smallest step
    # where the remainder is 10x the round-off level 1e3 * eps_mach * |f(x)|.
    x = point()
    h = {"u": jnp.array([1.0, -2.0, 0.5]), "k": jnp.ones(4), "c": jnp.asarray(-1.0)}
    res = dt.taylor_test(cost, x, direction=h, n_eps=5, factor=0.25)
    rms = lambda a: math.sqrt(float(jnp.mean(a**2)))
    eps_t = 0.01 * min(rms(x[k]) / rms(h[k]) for k in x)  # no leaf moves > 1%
    x_t = jtu.tree_map(lambda a, b: a + eps_t * b, x, h)
    f0 = float(cost(x))
    r_t = abs(float(cost(x_t)) - f0 - eps_t * float(dt.tree_dot(jax.grad(cost)(x), h)))
    eps_end = eps_t * math.sqrt(1e4 * EPS64 * abs(f0) / r_t)
    assert res.eps[-1] == pytest.approx(eps_end, rel=1e-6)
    np.testing.assert_allclose(res.eps[1:] / res.eps[:-1], 0.25, rtol=1e-14)
    assert res.rates1.shape == (4,)
    assert res.remainder1[-1] == pytest.approx(1e4 * EPS64 * abs(f0), rel=0.2)
    assert res.passed
    # Scale invariance: multiplying f by a constant does not change the steps.
    res_big = dt.taylor_test(
        lambda y: 1e6 * cost(y), x, direction=h, n_eps=5, factor=0.25
    )
    np.testing.assert_allclose(res_big.eps, res.eps, rtol=1e-8)
    assert res_big.passed


def test_taylor_gradient_dominated_by_a_small_parameter():
    # A cost whose gradient is dominated by a tiny parameter (like a diffusivity):
    # large g entries meet small h entries, so |<g, h>| << ||g|| ||h||. A step rule
    # based on ||g|| ||h|| / |f| put every remainder into round-off here.
    @jax.jit  # for speed only
    def f(p):
        u, kappa = p["u"], p["kappa"]
        return 800.0 + jnp.sum(jnp.sin(u) ** 2) * (1.0 + 3e3 * kappa) + 1e6 * kappa**2

    x = {"u": jnp.linspace(0.5, 2.0, 50) + 1.0, "kappa": jnp.asarray(2e-3)}
    grad = jax.grad(f)(x)
    wrong = scaled(grad, 1.0 + 1e-3)
    res = dt.taylor_test(f, x, grad=grad)
    assert res.passed and 1.9 <= res.rate <= 2.2
    assert not dt.taylor_test(f, x, grad=wrong).passed
    # Along the gradient's kappa block only (h_kappa ~ 1e5 >> kappa): the steps
    # must be set by kappa's size, not by the size of x as a whole.
    along = {"u": jnp.zeros(50), "kappa": grad["kappa"]}
    res = dt.taylor_test(f, x, grad=grad, direction=along)
    assert res.passed and 1.9 <= res.rate <= 2.2
    assert res.eps[0] * abs(float(grad["kappa"])) <= 0.1 * 2e-3 * (1 + 1e-12)
    bad = dt.taylor_test(f, x, grad=wrong, direction=along)
    assert not bad.passed and abs(bad.rate - 1.0) < 0.2


def test_taylor_collapsed_steps_suggest_eps0():
    # At an exact minimum where f is ~1e-25 the default rule takes |f| as the
    # round-off scale and shrinks the steps until x + eps h == x: the test fails
    # without saying anything about the gradient. It must say so and suggest eps0.
    a = jnp.array([[2.0, 1.0, 0.0], [0.5, 3.0, 1.0], [0.0, 1.0, 4.0], [1.0, 1.0, 1.0]])
    x_min = jnp.array([0.3, -0.7, 1.1])
    f = jax.jit(lambda x: 0.5 * jnp.sum((a @ (x - x_min)) ** 2))
    x = x_min + 1e-13
    with pytest.warns(UserWarning, match="collapsed"):
        res = dt.taylor_test(f, x)
    assert not res.passed and res.collapsed
    assert res.relative_step < 1e-8
    assert "hint" in str(res) and "eps0" in str(res)
    # The suggested step (0.1% of x) verifies the same gradient.
    suggested = float(res.hint.split("`eps0` = ")[1].split(" ")[0])
    good = dt.taylor_test(f, x, eps0=suggested)
    assert good.passed and abs(good.rate1 - 2.0) < 0.1, str(good)
    assert not good.collapsed and good.hint is None
    # A genuinely wrong gradient on sensible steps fails without the hint.
    bad = dt.taylor_test(cost, point(), grad=scaled(jax.grad(cost)(point()), 1.001))
    assert not bad.passed and not bad.collapsed and "hint" not in str(bad)


def test_taylor_explicit_eps0_and_determinism():
    x = point()
    res = dt.taylor_test(cost, x, eps0=1e-3, key=jr.key(3))
    assert res.eps[0] == 1e-3
    again = dt.taylor_test(cost, x, eps0=1e-3, key=jr.key(3))
    np.testing.assert_array_equal(res.remainder1, again.remainder1)
    other = dt.taylor_test(cost, x, eps0=1e-3, key=jr.key(4))
    assert not np.array_equal(res.remainder1, other.remainder1)


def test_taylor_nonfinite_function_does_not_raise():
    f = lambda x: jnp.sum(x) * jnp.nan
    res = dt.taylor_test(f, jnp.ones(3), grad=jnp.ones(3))
    assert not res.passed
    assert math.isnan(res.rate)
    assert "FAILED" in str(res)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_eps": 2}, "n_eps"),
        ({"factor": 1.0}, "factor"),
        ({"eps0": -1.0}, "eps0"),
        ({"grad": {"u": jnp.ones(3)}}, "grad"),
        ({"grad": dict(point(), u=jnp.ones(4))}, "grad"),
        ({"direction": scaled(point(), 0.0)}, "direction"),
    ],
)
def test_taylor_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dt.taylor_test(cost, point(), **kwargs)


def test_taylor_rejects_nonscalar_and_integer_input():
    with pytest.raises(ValueError, match="scalar"):
        dt.taylor_test(lambda x: x**2, jnp.ones(3))
    with pytest.raises(TypeError, match="floating"):
        dt.taylor_test(lambda x: jnp.sum(x), jnp.arange(3))


# --------------------------------------------------------------------------------------
# dot_test and dot_test_vjp
# --------------------------------------------------------------------------------------


@pytest.fixture
def matrices():
    ka, kb = jr.split(jr.key(7))
    return jr.normal(ka, (6, 4), jnp.float64), jr.normal(kb, (6, 4), jnp.float64)


def test_dot_test_matrix_and_transpose(matrices):
    A, _ = matrices
    res = dt.dot_test(lambda v: A @ v, lambda w: A.T @ w, jnp.zeros(4))
    assert res.passed
    assert res.rel_error < 1e-12
    # The example x is zero, but random vectors are used: the test is not 0 = 0.
    assert abs(res.lhs) > 1e-3
    assert "PASSED" in str(res)


def test_dot_test_linear_transpose_adjoint(matrices):
    A, _ = matrices
    res = dt.dot_test(lambda v: A @ v, None, jnp.zeros(4))
    assert res.passed and res.rel_error < 1e-12


def test_dot_test_fails_for_wrong_adjoint(matrices):
    A, B = matrices
    res = dt.dot_test(lambda v: A @ v, lambda w: B.T @ w, jnp.zeros(4))
    assert not res.passed
    assert res.rel_error > 1e-3
    assert "FAILED" in str(res)


def test_dot_test_on_pytrees(matrices):
    A, _ = matrices
    c = jnp.linspace(1.0, 2.0, 6)

    def forward(x):  # dict -> tuple
        return (A @ x["v"] + c * x["s"], 2.0 * x["s"])

    def adjoint(y):
        y0, y1 = y
        return {"v": A.T @ y0, "s": jnp.dot(c, y0) + 2.0 * y1}

    def wrong(y):
        y0, y1 = y
        return {"v": A.T @ y0, "s": jnp.dot(c, y0) - 2.0 * y1}

    x = {"v": jnp.zeros(4), "s": 0.0}
    assert dt.dot_test(forward, adjoint, x).passed
    assert dt.dot_test(forward, None, x).passed
    assert not dt.dot_test(forward, wrong, x).passed
    # Structures only: ShapeDtypeStructs and an explicit output example work too.
    x_struct = jax.eval_shape(lambda t: t, x)
    y_example = (jnp.zeros(6), jnp.asarray(0.0))
    assert dt.dot_test(forward, adjoint, x_struct, y_example, key=jr.key(5)).passed


def test_dot_test_rejects_mismatched_adjoint(matrices):
    A, _ = matrices
    with pytest.raises(ValueError, match="adjoint"):
        dt.dot_test(lambda v: A @ v, lambda w: (A.T @ w)[:3], jnp.zeros(4))
    with pytest.raises(ValueError, match="forward"):
        dt.dot_test(lambda v: A @ v, lambda w: A.T @ w, jnp.zeros(4), jnp.zeros(5))


def test_dot_test_vjp_nonlinear():
    def f(x):
        return {"a": jnp.sin(x["u"]) * x["u"][::-1], "b": jnp.sum(x["u"] ** 3) * x["c"]}

    x = {"u": jnp.linspace(0.2, 1.0, 5), "c": jnp.asarray(1.5)}
    res = dt.dot_test_vjp(f, x, key=jr.key(2))
    assert res.passed and res.rel_error < 1e-12
    assert abs(res.lhs) > 1e-3


# --------------------------------------------------------------------------------------
# fd_check
# --------------------------------------------------------------------------------------


def test_fd_check_agrees_for_smooth_function():
    res = dt.fd_check(cost, point())
    assert res.passed
    assert res.rel_error < 1e-8
    # Default step: the cube root of machine epsilon, relative to x (||h|| = ||x||).
    assert res.eps == pytest.approx(EPS64 ** (1 / 3), rel=1e-12)
    assert "PASSED" in str(res)


@pytest.mark.parametrize("s", [1.0 + 1e-4, -1.0])
def test_fd_check_fails_for_wrong_gradient(s):
    x = point()
    res = dt.fd_check(cost, x, grad=scaled(jax.grad(cost)(x), s))
    assert not res.passed
    assert res.rel_error > 5e-5
    assert "FAILED" in str(res)


def test_fd_check_explicit_direction_and_scalar():
    res = dt.fd_check(lambda x: jnp.exp(2.0 * x), 0.3, direction=1.0)
    assert res.passed
    assert res.ad == pytest.approx(2.0 * math.exp(0.6), rel=1e-14)
    with pytest.raises(ValueError, match="eps"):
        dt.fd_check(lambda x: jnp.exp(x), 0.3, eps=0.0)


# --------------------------------------------------------------------------------------
# Pytree helpers
# --------------------------------------------------------------------------------------


def test_tree_dot_matches_numpy():
    a = {"u": jnp.arange(3.0), "k": 2.0, "m": jnp.ones((2, 2))}
    b = {"u": jnp.array([1.0, -1.0, 4.0]), "k": jnp.asarray(3.0), "m": jnp.eye(2)}
    assert float(dt.tree_dot(a, b)) == 0.0 - 1.0 + 8.0 + 6.0 + 2.0
    assert float(jax.jit(dt.tree_dot)(a, b)) == 15.0
    assert float(dt.tree_dot({}, {})) == 0.0


def test_tree_dot_mixed_precision_under_strict_promotion():
    a = {"x": jnp.ones(3, jnp.float32), "y": jnp.ones(2, jnp.float64)}
    with jax.numpy_dtype_promotion("strict"):
        out = dt.tree_dot(a, a)
    assert out.dtype == jnp.float64
    assert float(out) == 5.0


def test_tree_dot_rejects_mismatch():
    with pytest.raises(ValueError, match="structure"):
        dt.tree_dot({"u": jnp.ones(2)}, {"v": jnp.ones(2)})
    with pytest.raises(ValueError, match="shape"):
        dt.tree_dot({"u": jnp.ones(2)}, {"u": jnp.ones(3)})


def test_tree_random_like():
    tree = {
        "u": jnp.zeros((3, 2), jnp.float32),
        "k": 1.0,
        "s": jax.ShapeDtypeStruct((4,), jnp.float64),
    }
    z = dt.tree_random_like(jr.key(0), tree)
    assert z["u"].shape == (3, 2) and z["u"].dtype == jnp.float32
    assert z["k"].shape == () and z["k"].dtype == jnp.float64
    assert z["s"].shape == (4,) and z["s"].dtype == jnp.float64
    assert dt.tree_allclose(z, dt.tree_random_like(jr.key(0), tree), rtol=0, atol=0)
    assert not dt.tree_allclose(z, dt.tree_random_like(jr.key(1), tree))
    assert float(jnp.std(z["s"])) > 0.0
    with pytest.raises(TypeError, match="floating"):
        dt.tree_random_like(jr.key(0), {"i": jnp.arange(3)})


def test_tree_allclose():
    a = {"u": jnp.ones(3), "k": 2.0}
    assert dt.tree_allclose(a, {"u": jnp.ones(3) + 1e-9, "k": 2.0})
    assert not dt.tree_allclose(a, {"u": jnp.ones(3) + 1e-3, "k": 2.0})
    assert dt.tree_allclose(a, {"u": jnp.ones(3) + 1e-3, "k": 2.0}, rtol=1e-2)
    assert not dt.tree_allclose(a, {"u": jnp.ones(4), "k": 2.0})
    assert not dt.tree_allclose(a, {"u": jnp.ones(3)})
    assert not dt.tree_allclose({"u": jnp.nan}, {"u": jnp.nan})


def test_nonfinite_values_fail_without_raising():
    f = lambda x: jnp.sum(x) * jnp.nan
    res = dt.fd_check(f, jnp.ones(3), grad=jnp.ones(3))
    assert not res.passed and math.isnan(res.fd)
    res = dt.dot_test(lambda v: v * jnp.nan, lambda w: w, jnp.ones(3))
    assert not res.passed and math.isnan(res.rel_error)
