r"""How a trajectory is differentiated.

Each implicit step is differentiated by its solver (one transposed solve, see
:mod:`dphys._solver`). What remains is the time loop: reverse mode needs the
states of the forward pass in reverse order. :class:`Checkpointed` stores only a few
of them and recomputes the rest:

With ``levels = L`` the $n$ steps are split into $\lceil n^{1/L}\rceil$ chunks whose
start states are stored; during the backward pass each chunk is recomputed and split
again, recursively. Memory is $O(L\,n^{1/L})$ states instead of $O(n)$, at the price
of $L-1$ extra forward sweeps. ``levels=2`` is the classical $\sqrt n$ scheme;
``levels=3`` makes 4000 steps cost about 3 x 16 stored states. When the run is cut
into observation segments, steps and segments share this one hierarchy
(:func:`segmented_scan`), and loops too short for checkpointing to halve their memory
(16 steps or fewer) are stored whole.

:class:`Unrolled` stores every step (fastest backward pass, linear memory); it is the
reference the checkpointed gradient is tested against.

References:
    Griewank (1992), "Achieving logarithmic growth of temporal and spatial complexity
    in reverse automatic differentiation", Optim. Methods Softw. 1(1).
"""

from __future__ import annotations

import abc
import functools
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

from ._checks import static_int


def _concat(a, b):
    if a is None:
        return b
    return jtu.tree_map(lambda x, y: jnp.concatenate([x, y]), a, b)


def _too_short(length: int, levels: int) -> bool:
    # Checkpointing stores about 2 L n^(1/L) states instead of n and costs L-1 extra
    # forward sweeps; below n = 2 L n^(1/L) (n <= 16 for L = 2..4) it saves less than
    # half the memory, so the loop is stored whole (e.g. the 10 fast-forward segments
    # of a 10-observation cost: value_and_grad drops from ~3x to ~2x the cost).
    return length <= 2 * levels * length ** (1.0 / levels)


def nested_scan(body, init, length: int, levels: int):
    """``lax.scan(lambda c, _: body(c), init, None, length)`` with nested remat.

    ``body: carry -> (carry, y)``; returns ``(carry, ys)`` with ys stacked on a
    leading axis of size ``length`` (``None`` if ``body`` returns ``y=None``).
    """
    if levels <= 1 or _too_short(length, levels):
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


def _plain_segments(body, emit, init, n_seg: int, seg: int):
    def segment(c, _):
        c, _ = lax.scan(lambda c2, _: body(c2), c, None, length=seg)
        return c, emit(c)

    return lax.scan(segment, init, None, length=n_seg)


def segmented_scan(body, emit, init, n_seg: int, seg: int, levels: int):
    r"""``n_seg`` segments of ``seg`` steps of ``body``, ``emit(carry)`` after each.

    ``body: carry -> (carry, None)``; returns ``(carry, ys)`` with the ``emit``
    outputs stacked over segments. Checkpointing counts levels over the whole run of
    $n$ = ``n_seg * seg`` steps, not per segment: checkpointing the segments and,
    separately, the steps inside them would nest two hierarchies and recompute every
    step twice at ``levels=2``. The top level stores the start of every chunk of about
    $c = n^{(L-1)/L}$ steps (a segment is split into chunks when longer than $c$,
    segments are grouped when shorter) and each chunk recurses with $L-1$ levels, so
    a step is recomputed $L-1$ times and memory is $O(L\,n^{1/L})$ states (plus the
    segment ends, where the observations are taken).
    """
    n = n_seg * seg
    if levels <= 1 or _too_short(n, levels):
        return _plain_segments(body, emit, init, n_seg, seg)
    c_star = n ** ((levels - 1) / levels)
    if seg >= c_star:
        chunk = max(1, round(c_star))
        n_chunks, rest = divmod(seg, chunk)

        @jax.checkpoint
        def run_chunk(c):
            return nested_scan(body, c, chunk, levels - 1)[0]

        @jax.checkpoint
        def run_rest(c):
            return nested_scan(body, c, rest, levels - 1)[0]

        def segment(c, _):
            c, _ = lax.scan(lambda c2, _: (run_chunk(c2), None), c, None, n_chunks)
            if rest:
                c = run_rest(c)
            return c, emit(c)

        return lax.scan(segment, init, None, length=n_seg)
    per_group = max(1, round(c_star / seg))
    n_groups, rest = divmod(n_seg, per_group)

    @jax.checkpoint
    def run_group(c):
        return segmented_scan(body, emit, c, per_group, seg, levels - 1)

    carry, ys = lax.scan(lambda c, _: run_group(c), init, None, length=n_groups)
    ys = jtu.tree_map(lambda y: y.reshape((n_groups * per_group,) + y.shape[2:]), ys)
    if rest:
        carry, ys_rest = jax.checkpoint(
            lambda c: segmented_scan(body, emit, c, rest, seg, levels - 1)
        )(carry)
        ys = _concat(ys, ys_rest)
    return carry, ys


class AbstractAdjoint(eqx.Module):
    """How :func:`dphys.simulate` runs its time loop for reverse-mode AD."""

    @abc.abstractmethod
    def loop(self, body, init, length: int):
        """Run ``body`` ``length`` times; same contract as :func:`nested_scan`."""

    def segments(self, body, emit, init, n_seg: int, seg: int):
        """Run ``n_seg`` segments of ``seg`` steps; contract of :func:`segmented_scan`."""
        return _plain_segments(body, emit, init, n_seg, seg)


class Unrolled(AbstractAdjoint):
    """Store every step for the backward pass: fastest, memory linear in steps."""

    def loop(self, body, init, length: int):
        return lax.scan(lambda c, _: body(c), init, None, length=length)


class Checkpointed(AbstractAdjoint):
    """Nested (multi-level) checkpointing: memory $O(L n^{1/L})$, L-1 recomputations.

    Attributes:
        levels: nesting depth $L \\geq 1$; 1 means no checkpointing.
    """

    levels: int = eqx.field(
        static=True,
        default=2,
        converter=functools.partial(
            static_int, "levels", why="it fixes the nesting of the time loop"
        ),
    )

    def __check_init__(self):
        if self.levels < 1:
            raise ValueError(
                f"`levels` must be an integer >= 1, got {self.levels!r}: 1 stores "
                "every step (no checkpointing), 2 stores O(sqrt(n)) states, 3 "
                "O(n^(1/3))."
            )

    def loop(self, body, init, length: int):
        return nested_scan(body, init, length, self.levels)

    def segments(self, body, emit, init, n_seg: int, seg: int):
        return segmented_scan(body, emit, init, n_seg, seg, self.levels)
