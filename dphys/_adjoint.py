r"""How a trajectory is differentiated.

Each implicit step is differentiated by its solver (one transposed solve, see
:mod:`dphys._linear_solve`). What remains is the time loop: reverse mode needs the
states of the forward pass in reverse order. :class:`Checkpointed` stores only a few
of them and recomputes the rest:

With ``levels = L`` the $n$ steps are split into $\lceil n^{1/L}\rceil$ chunks whose
start states are stored; during the backward pass each chunk is recomputed and split
again, recursively. Memory is $O(L\,n^{1/L})$ states instead of $O(n)$, at the price
of $L-1$ extra forward sweeps. ``levels=2`` is the classical $\sqrt n$ scheme;
``levels=3`` makes 4000 steps cost about 3 x 16 stored states.

:class:`Unrolled` stores every step (fastest backward pass, linear memory); it is the
reference the checkpointed gradient is tested against.

References:
    Griewank (1992), "Achieving logarithmic growth of temporal and spatial complexity
    in reverse automatic differentiation", Optim. Methods Softw. 1(1).
"""

from __future__ import annotations

import abc
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax


def _concat(a, b):
    if a is None:
        return b
    return jtu.tree_map(lambda x, y: jnp.concatenate([x, y]), a, b)


def nested_scan(body, init, length: int, levels: int):
    """``lax.scan(lambda c, _: body(c), init, None, length)`` with nested remat.

    ``body: carry -> (carry, y)``; returns ``(carry, ys)`` with ys stacked on a
    leading axis of size ``length`` (``None`` if ``body`` returns ``y=None``).
    """
    if levels <= 1 or length <= 3:
        return lax.scan(lambda c, _: body(c), init, None, length=length)
    chunk = math.ceil(length ** ((levels - 1) / levels))
    n_chunks, rest = divmod(length, chunk)

    @jax.checkpoint
    def run_chunk(c):
        return nested_scan(body, c, chunk, levels - 1)

    carry, ys = lax.scan(lambda c, _: run_chunk(c), init, None, length=n_chunks)
    ys = jtu.tree_map(lambda y: y.reshape((n_chunks * chunk,) + y.shape[2:]), ys)
    if rest:
        carry, ys_rest = nested_scan(body, carry, rest, levels - 1)
        ys = _concat(ys, ys_rest)
    return carry, ys


class AbstractAdjoint(eqx.Module):
    """How :func:`dphys.simulate` runs its time loop for reverse-mode AD."""

    @abc.abstractmethod
    def loop(self, body, init, length: int):
        """Run ``body`` ``length`` times; same contract as :func:`nested_scan`."""


class Unrolled(AbstractAdjoint):
    """Store every step for the backward pass: fastest, memory linear in steps."""

    def loop(self, body, init, length: int):
        return lax.scan(lambda c, _: body(c), init, None, length=length)


class Checkpointed(AbstractAdjoint):
    """Nested (multi-level) checkpointing: memory $O(L n^{1/L})$, L-1 recomputations.

    Attributes:
        levels: nesting depth $L \\geq 1$; 1 means no checkpointing.
    """

    levels: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not (isinstance(self.levels, int) and self.levels >= 1):
            raise ValueError(f"`levels` must be an integer >= 1, got {self.levels!r}.")

    def loop(self, body, init, length: int):
        return nested_scan(body, init, length, self.levels)
