r"""Pytree algebra for states and tendencies: the parts ``optax.tree_utils`` lacks.

Arithmetic between pytrees of arrays is ``optax.tree_utils`` everywhere in
:mod:`dphys` and :mod:`pdes` (``tree_add``, ``tree_sub``, ``tree_scale``,
``tree_add_scale``, ``tree_mul``, ``tree_vdot``, ``tree_norm``, ``tree_where``,
``tree_zeros_like``). What it lacks, and the steppers need, is arithmetic with
*absent* terms: :meth:`dphys.AbstractModel.explicit` and
:meth:`dphys.AbstractModel.forcing` return ``None`` for "no such term", and the
helpers here treat ``None`` as zero while keeping a sum of absent terms ``None``, so
nothing is computed (or differentiated) for a term a model does not have.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import jax.tree_util as jtu
import optax.tree_utils as otu


def add(*trees):
    """Sum of pytrees, skipping ``None`` ones; ``None`` if every one is ``None``."""
    present = [tree for tree in trees if tree is not None]
    if not present:
        return None
    if len(present) == 1:
        return present[0]
    return otu.tree_add(*present)


def axpy(a, x, y):
    r"""$a\,x + y$ for pytrees ``x`` and ``y`` and a scalar ``a``; ``x=None`` is zero.

    Computed as ``y + a * x`` leaf by leaf (``optax.tree_utils.tree_add_scale``).
    """
    if x is None:
        return y
    return otu.tree_add_scale(y, a, x)


def scale(a, x):
    """``a * x`` for a pytree ``x``; ``None`` stays ``None``."""
    return None if x is None else otu.tree_scale(a, x)


def all_finite(tree):
    """Boolean scalar: every entry of every leaf is finite."""
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jtu.tree_leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.asarray(True))
