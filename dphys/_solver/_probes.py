"""Structure of a matrix-free $L$ from a few probes: symbol, diagonal, bands.

Nothing model-specific is hand-coded: applying ``model.linear`` to impulse or comb
vectors extracts what the direct solvers and the Jacobi preconditioner need.
"""

from __future__ import annotations

import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._model import AbstractModel


def probe_symbol(model: AbstractModel, t, like):
    r"""Fourier symbol of a translation-invariant $L$: ``S[a, b, *k]``.

    $L$ restricted to field $b \to a$ is a circular convolution with the impulse
    response $h_{ab} = (L\,\delta_b)_a$, so $\widehat{(Lu)}_a = \sum_b \hat h_{ab}\,
    \hat u_b$ with ``rfftn`` over the grid axes.
    """
    leaves, treedef = jtu.tree_flatten(like)
    n = len(leaves)
    axes = tuple(range(-model.grid.ndim, 0))
    cols = []
    for b in range(n):
        delta = [jnp.zeros_like(leaf) for leaf in leaves]
        idx = (0,) * model.grid.ndim
        delta[b] = delta[b].at[idx].set(1)
        out = jtu.tree_leaves(model.linear(t, jtu.tree_unflatten(treedef, delta)))
        cols.append(jnp.stack([jnp.fft.rfftn(o, axes=axes) for o in out]))
    return jnp.stack(cols, axis=1)  # (n_out, n_in, *modes)


def _comb_strides(model: AbstractModel, shape, stride: int) -> list[int]:
    # On a periodic axis of length n the comb i = r (mod s) has two probes n mod s
    # apart across the wrap; unless the comb tiles the axis (n mod s = 0) they must be
    # >= stride apart, or their stencils overlap and the probed diagonal is wrong
    # there (e.g. n = 4096, s = 3). A Jacobi preconditioner wrong at two points costs
    # 5x the CG iterations on smooth data (benchmarks/run.py P1, dphys-krylov).
    strides = []
    lead = len(shape) - model.grid.ndim
    for axis, n in enumerate(shape):
        s = stride
        if axis >= lead and model.grid.boundary[axis - lead] == "periodic":
            while 0 < n % s < stride:
                s += 1
        strides.append(s)
    return strides


def probe_diagonal(model: AbstractModel, t, like, stride: int = 3):
    """Diagonal of $L$ (pytree like ``like``) from about ``stride**ndim`` comb probes.

    Exact for stencils that reach at most ``stride - 1`` points along each axis; the
    default of 3 covers every 3-point-per-axis stencil (5- and 9-point in 2D). On a
    periodic axis whose length is not a multiple of ``stride`` the comb spacing grows
    until probes stay ``stride`` apart across the wrap too.
    """
    leaves, treedef = jtu.tree_flatten(like)
    diag = [jnp.zeros_like(leaf) for leaf in leaves]
    for b, leaf in enumerate(leaves):
        strides = _comb_strides(model, leaf.shape, stride)
        for offset in np.ndindex(*strides):
            comb = np.zeros(leaf.shape, dtype=bool)
            comb[
                tuple(slice(o, None, s) for o, s in zip(offset, strides, strict=True))
            ] = True
            comb = jnp.asarray(comb)
            probe = [jnp.zeros_like(v) for v in leaves]
            probe[b] = comb.astype(leaf.dtype)
            out = jtu.tree_leaves(model.linear(t, jtu.tree_unflatten(treedef, probe)))
            diag[b] = jnp.where(comb, out[b], diag[b])
    return jtu.tree_unflatten(treedef, diag)


def probe_tridiagonal(model: AbstractModel, t, like):
    """Bands ``(lower, diag, upper)`` of a 1D 3-point $L$ (scalar field), 3 probes.

    ``lower[0]`` and ``upper[-1]`` are zero, as ``lax.linalg.tridiagonal_solve``
    expects.
    """
    n = like.shape[-1]
    idx = np.arange(n)
    lower = jnp.zeros_like(like)
    diag = jnp.zeros_like(like)
    upper = jnp.zeros_like(like)
    for r in range(3):
        comb = jnp.asarray(idx % 3 == r).astype(like.dtype)
        out = model.linear(t, comb)
        is_col = jnp.asarray(idx % 3 == r)
        # Row i sees column i (diag), i-1 (lower) and i+1 (upper).
        diag = jnp.where(is_col, out, diag)
        lower = jnp.where(jnp.asarray((idx - 1) % 3 == r) & (idx > 0), out, lower)
        upper = jnp.where(jnp.asarray((idx + 1) % 3 == r) & (idx < n - 1), out, upper)
    return lower, diag, upper
