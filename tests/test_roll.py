"""`dphys.operators.roll`: a periodic shift with shift-valued derivative rules."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys.testing
from dphys.operators import roll


@pytest.mark.parametrize("shift", [-3, -1, 1, 2, 9])
@pytest.mark.parametrize("axis", [0, 1, -1, -2])
def test_values_jit_vmap_match_jnp_roll(getkey, shift, axis):
    a = jax.random.normal(getkey(), (5, 6, 7))
    np.testing.assert_array_equal(roll(a, shift, axis), jnp.roll(a, shift, axis))
    f = jax.jit(lambda x: roll(x, shift, axis))
    np.testing.assert_array_equal(f(a), jnp.roll(a, shift, axis))
    for batch_axis in (0, 1, 2):
        got = jax.vmap(lambda x: roll(x, shift, axis), in_axes=batch_axis)(a)
        want = jax.vmap(lambda x: jnp.roll(x, shift, axis), in_axes=batch_axis)(a)
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("shift,axis", [(1, 0), (-1, -1), (4, 1)])
def test_derivatives(getkey, shift, axis):
    a = jax.random.normal(getkey(), (6, 8))
    w = jax.random.normal(getkey(), (6, 8))
    lin = lambda x: roll(x, shift, axis)
    # tangent: the same shift; transpose: passes the dot-product test
    _, t = jax.jvp(lin, (a,), (w,))
    np.testing.assert_array_equal(t, jnp.roll(w, shift, axis))
    assert dphys.testing.dot_test(lin, None, a, key=getkey()).rel_error < 1e-14
    # a nonlinear function of shifts: gradient equals that of jnp.roll's
    f = lambda x, r: jnp.sum(w * jnp.sin(x * r(x, shift, axis)))
    g = jax.grad(f)(a, roll)
    g_ref = jax.grad(f)(a, lambda x, s, ax: jnp.roll(x, s, ax))
    np.testing.assert_allclose(g, g_ref, rtol=1e-13, atol=1e-15)
    # second order (forward over reverse)
    h = jax.jacfwd(jax.grad(f))(a, roll)
    h_ref = jax.jacfwd(jax.grad(f))(a, lambda x, s, ax: jnp.roll(x, s, ax))
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-14)


def test_float32_and_trivial_shift():
    a = jnp.arange(12, dtype=jnp.float32).reshape(3, 4)
    assert roll(a, 1, 1).dtype == jnp.float32
    np.testing.assert_array_equal(roll(a, 4, 1), a)


def test_bad_arguments():
    a = jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="axis"):
        roll(a, 1, 2)
    with pytest.raises(TypeError, match="shift"):
        roll(a, 1.5, 0)
