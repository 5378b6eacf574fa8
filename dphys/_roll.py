r"""A periodic shift whose derivative rules stay shifts.

``jnp.roll`` lowers to a slice and a concatenate; reverse-mode autodiff transposes
those into zero-pads plus adds, which XLA's CPU backend fuses poorly, so the
vector-Jacobian product of stencil code written with ``jnp.roll`` (the C-grid
shallow-water tendencies of ``pdes``) costs markedly more than with the shifts below
(``python benchmarks/roll_vjp.py`` measures both: 8.9x vs 5.0x the tendency's
cost at 128x128). The transpose of a periodic shift by ``s`` is the shift by ``-s``
(a permutation matrix is orthogonal), so :func:`roll` is a linear primitive whose
tangent is a shift and whose transpose is the opposite shift; vmap shifts the same
axis of the batched array.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir


_roll_p = Primitive("dphys_roll")


def roll(a, shift: int, axis: int):
    r"""Periodic shift $b_i = a_{(i - s) \bmod n}$ along ``axis`` (as ``jnp.roll``).

    Same values as ``jnp.roll(a, shift, axis)``; differs only in its derivative
    rules: the tangent of a shift is the same shift and its transpose (reverse mode)
    is the shift by ``-shift``, so gradients of stencil code cost about what the
    stencil costs.

    Args:
        a: array.
        shift: static integer number of places (positive moves values to higher
            indices).
        axis: static axis, negative counts from the end.
    """
    a = jnp.asarray(a)
    if not isinstance(shift, int) or not isinstance(axis, int):
        raise TypeError(
            f"`shift` and `axis` must be Python ints, got {shift!r} and {axis!r}."
        )
    if not -a.ndim <= axis < a.ndim:
        raise ValueError(f"`axis` {axis} is out of range for a {a.ndim}-d array.")
    axis = axis % a.ndim
    n = a.shape[axis]
    shift = shift % n if n else 0
    if shift == 0:
        return a
    return _roll_p.bind(a, shift=shift, axis=axis)


def _impl(a, *, shift, axis):
    return jnp.roll(a, shift, axis=axis)


_roll_p.def_impl(_impl)
_roll_p.def_abstract_eval(lambda a, *, shift, axis: a)
mlir.register_lowering(_roll_p, mlir.lower_fun(_impl, multiple_results=False))


def _transpose(ct, a, *, shift, axis):
    return [_roll_p.bind(ct, shift=(-shift) % ct.shape[axis], axis=axis)]


ad.deflinear2(_roll_p, _transpose)


def _batch(args, dims, *, shift, axis):
    (a,), (d,) = args, dims
    if d is None:
        return _roll_p.bind(a, shift=shift, axis=axis), d
    return _roll_p.bind(a, shift=shift, axis=axis + (d <= axis)), d


batching.primitive_batchers[_roll_p] = _batch
