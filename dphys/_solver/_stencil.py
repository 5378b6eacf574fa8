r"""Assembled stencils: a matrix-free $L$ probed once into per-point coefficients.

A linear operator on grid fields whose output at point $i$ depends on its input
only within ``reach`` points along each axis is a *box stencil*:

$$ (L u)_a[i] = \sum_b \sum_{e \in \{-r..r\}^d} c_{a b e}[i]\; u_b[i + e], $$

with $c_{abe}[i] = L_{(a,i),(b,i+e)}$ (fields $a, b$; $i+e$ wraps on periodic axes,
and couplings that would leave a non-periodic axis are zero). :func:`probe_stencil`
extracts every coefficient with $(2r+1)^d$ comb probes per input field (comb points
at least $2r+1$ apart, across periodic wraps too, so each output sees one probe).
The assembled form is the structure the multigrid hierarchy (Galerkin coarse
operators $RLP$, Jacobi diagonals, the coarsest dense matrix) and the Fourier
preconditioner (the translation-averaged stencil) are built from, and applying it is
one fused pass over the coefficients, cheaper than most model code (the variable-κ
Laplacian of :func:`dphys.operators.laplacian` recomputes its face coefficients on
every call).

The probed coefficients are differentiable functions of the model's parameters
(probing is linear in $L$), so a solve that iterates with the stencil still has the
right derivative; a stencil that does not reproduce the model (a reach set too small)
is caught by :func:`stencil_mismatch`.
"""

from __future__ import annotations

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from .._roll import roll


def comb_strides(shape, boundary, width: int) -> list[int]:
    """Comb spacing per axis: ``width`` apart, also across periodic wraps.

    On a periodic axis of length ``n`` the comb ``i = r (mod s)`` has two points
    ``n mod s`` apart across the wrap; unless the comb tiles the axis they must be
    ``>= width`` apart too, so the spacing grows until they are.
    """
    strides = []
    for n, kind in zip(shape, boundary, strict=True):
        s = width
        if kind == "periodic":
            while 0 < n % s < width:
                s += 1
        strides.append(min(s, n) if kind != "periodic" else s)
    return strides


def box_offsets(ndim: int, reach: int = 1) -> tuple[tuple[int, ...], ...]:
    """All offsets of a box stencil, ``{-reach..reach}^ndim``, in C order."""
    return tuple(itertools.product(range(-reach, reach + 1), repeat=ndim))


def cross_offsets(ndim: int, reach: int = 1) -> tuple[tuple[int, ...], ...]:
    """Offsets along one axis at a time (the 3-, 5-point stencils for reach 1), in C
    order: what operators built axis by axis (``dphys.operators``) couple."""
    return tuple(e for e in box_offsets(ndim, reach) if sum(x != 0 for x in e) <= 1)


def check_offsets(offsets, ndim: int, owner: str) -> tuple[tuple[int, ...], ...]:
    """``offsets`` as a sorted tuple of ``ndim``-tuples holding the zero offset."""
    try:
        out = tuple(sorted({tuple(int(x) for x in e) for e in offsets}))
    except TypeError:
        out = None
    if not out or any(len(e) != ndim for e in out) or (0,) * ndim not in out:
        raise ValueError(
            f"`{owner}` must be a collection of offsets, each a tuple of {ndim} "
            f"integers, including the zero offset {(0,) * ndim}; got {offsets!r}."
        )
    return out


def shift(x, e, ndim: int):
    """``x[i + e]`` on the trailing ``ndim`` axes (periodic wrap; see :class:`Stencil`).

    Uses :func:`dphys.operators.roll`, whose transpose is the opposite shift.
    """
    for a, ea in enumerate(e):
        if ea:
            x = roll(x, -ea, a - ndim)
    return x


class Stencil(eqx.Module):
    r"""A linear map on a list of grid fields, as box-stencil coefficients.

    $(Lu)_a[i] = \sum_b\sum_e c_{abe}[i]\,u_b[i+e]$ with $e$ over
    :attr:`offsets`; $i + e$ wraps around every axis, and coefficients that would
    couple across a non-periodic boundary are zero, so wrapping never adds anything
    there.

    Attributes:
        coefficients: ``(n_out, n_in, n_offsets, *shape)`` array.
        boundary: boundary kind per grid axis (static).
        offsets: the offsets $e$, sorted, holding the zero offset (static).
    """

    coefficients: jax.Array
    boundary: tuple[str, ...] = eqx.field(static=True)
    offsets: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.coefficients.shape[3:])

    @property
    def ndim(self) -> int:
        return len(self.boundary)

    @property
    def reach(self) -> int:
        return max(max(abs(x) for x in e) for e in self.offsets)

    @property
    def _zero(self) -> int:
        return self.offsets.index((0,) * self.ndim)

    @property
    def n_fields(self) -> int:
        return self.coefficients.shape[0]

    def mv(self, fields: list) -> list:
        """Apply to a list of ``n_in`` fields; returns a list of ``n_out`` fields."""
        c = self.coefficients
        out = []
        for a in range(c.shape[0]):
            acc = None
            for b in range(c.shape[1]):
                for k, e in enumerate(self.offsets):
                    term = c[a, b, k] * shift(fields[b], e, self.ndim)
                    acc = term if acc is None else acc + term
            out.append(acc)
        return out

    def transpose(self) -> Stencil:
        r"""The stencil of $L^T$: $c^T_{abe}[i] = c_{ba(-e)}[i+e]$."""
        offsets = self.offsets
        index = {e: k for k, e in enumerate(offsets)}
        if any(tuple(-x for x in e) not in index for e in offsets):
            offsets = tuple(
                sorted(set(offsets) | {tuple(-x for x in e) for e in offsets})
            )
            return self.with_offsets(offsets).transpose()
        c = self.coefficients
        rows = []
        for a in range(c.shape[1]):
            cols = []
            for b in range(c.shape[0]):
                cols.append(
                    jnp.stack(
                        [
                            shift(c[b, a, index[tuple(-x for x in e)]], e, self.ndim)
                            for e in offsets
                        ]
                    )
                )
            rows.append(jnp.stack(cols))
        return Stencil(jnp.stack(rows), self.boundary, offsets)

    def with_offsets(self, offsets) -> Stencil:
        """The same operator on a superset of offsets (new ones zero)."""
        c = self.coefficients
        zero = jnp.zeros_like(c[:, :, 0])
        index = {e: k for k, e in enumerate(self.offsets)}
        missing = set(self.offsets) - set(offsets)
        assert not missing, missing
        parts = [c[:, :, index[e]] if e in index else zero for e in offsets]
        return Stencil(jnp.stack(parts, axis=2), self.boundary, tuple(offsets))

    def center(self) -> jax.Array:
        """The per-point ``(n_out, n_in, *shape)`` block of the zero offset."""
        return self.coefficients[:, :, self._zero]

    def scale_add(self, alpha, other: Stencil | None = None) -> Stencil:
        r"""$\alpha L$ (+ ``other``), same layout; ``other=None`` means the identity."""
        c = alpha * self.coefficients
        if other is None:
            n = c.shape[0]
            eye = jnp.eye(n, dtype=c.dtype).reshape((n, n) + (1,) * (c.ndim - 3))
            return Stencil(c.at[:, :, self._zero].add(eye), *self._meta())
        if other.offsets != self.offsets:
            both = tuple(sorted(set(self.offsets) | set(other.offsets)))
            return self.with_offsets(both).scale_add(alpha, other.with_offsets(both))
        return Stencil(c + other.coefficients, *self._meta())

    def _meta(self):
        return self.boundary, self.offsets

    def dense(self) -> jax.Array:
        """The ``(n_out N, n_in N)`` dense matrix (field-major), for small grids."""
        shape = self.shape
        size = int(np.prod(shape))
        idx = np.arange(size).reshape(shape)
        c = self.coefficients
        n_out, n_in = c.shape[:2]
        mat = jnp.zeros((n_out * size, n_in * size), c.dtype)
        for k, e in enumerate(self.offsets):
            cols = idx
            for a, ea in enumerate(e):
                cols = np.roll(cols, -ea, axis=a)  # cols[i] = index of i + e
            for a in range(n_out):
                for b in range(n_in):
                    mat = mat.at[a * size + idx.ravel(), b * size + cols.ravel()].add(
                        c[a, b, k].ravel()
                    )
        return mat


def probe_stencil(apply, fields: list, boundary, offsets) -> Stencil:
    r"""The stencil of a linear map on a list of grid fields, by comb probes.

    Exact when output $i$ of the map depends on input $i + e$ only for $e$ in
    ``offsets`` and the map does not couple across non-periodic boundaries. Costs
    $\prod_a s_a$ applications per input field ($s_a = 2r+1$ with $r$ the largest
    offset, more on a periodic axis whose length it does not divide; see
    :func:`comb_strides`).

    Args:
        apply: the linear map, a function from a list of fields to a list of fields
            (same number, same shapes).
        fields: example fields (values unused), each of the grid's shape.
        boundary: boundary kind per axis.
        offsets: the stencil's offsets (see :func:`box_offsets`,
            :func:`cross_offsets`).
    """
    shape = tuple(fields[0].shape)
    ndim = len(shape)
    dtype = fields[0].dtype
    offsets = check_offsets(offsets, ndim, "offsets")
    reach = max(max(abs(x) for x in e) for e in offsets)
    width = 2 * reach + 1
    for n, kind in zip(shape, boundary, strict=True):
        if kind == "periodic" and n < width:
            raise ValueError(
                f"a stencil of reach {reach} needs at least {width} points along a "
                f"periodic axis, got grid shape {shape}."
            )
    strides = comb_strides(shape, boundary, width)
    combs = list(itertools.product(*(range(s) for s in strides)))
    n_in = len(fields)
    # outs[b]: (n_probes, n_out, *shape)
    outs = []
    grids = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    for b in range(n_in):
        per_probe = []
        for comb in combs:
            mask = np.ones(shape, dtype=bool)
            for a, (o, s) in enumerate(zip(comb, strides, strict=True)):
                mask &= grids[a] % s == o
            probe = [jnp.zeros(shape, dtype) for _ in range(n_in)]
            probe[b] = jnp.asarray(mask, dtype)
            per_probe.append(jnp.stack(apply(probe)))
        outs.append(jnp.stack(per_probe))
    n_out = outs[0].shape[1]
    coefficients = []
    for e in offsets:
        # The probe whose comb holds i + e, and whether i + e is inside the domain.
        which = np.zeros(shape, dtype=np.int32)
        valid = np.ones(shape, dtype=bool)
        for a, (ea, s, n, kind) in enumerate(
            zip(e, strides, shape, boundary, strict=True)
        ):
            j = grids[a] + ea
            if kind == "periodic":
                j = j % n
            else:
                valid &= (j >= 0) & (j < n)
            which = which * s + np.where(valid, j, 0) % s
        sel = jnp.asarray(which)[None, None]
        keep = jnp.asarray(valid, dtype)
        per_b = []
        for b in range(n_in):
            idx = jnp.broadcast_to(sel, (1, n_out) + shape)
            per_b.append(jnp.take_along_axis(outs[b], idx, axis=0)[0] * keep)
        coefficients.append(jnp.stack(per_b, axis=1))  # (n_out, n_in, *shape)
    return Stencil(jnp.stack(coefficients, axis=2), tuple(boundary), offsets)


def model_stencil(model, t, like, offsets) -> tuple[Stencil, object]:
    """The stencil of ``model.linear(t, .)`` on states like ``like``, and treedef."""
    leaves, treedef = jtu.tree_flatten(like)

    def apply(fields):
        return jtu.tree_leaves(model.linear(t, jtu.tree_unflatten(treedef, fields)))

    return probe_stencil(apply, leaves, model.grid.boundary, offsets), treedef


def test_field(shape, dtype, seed: int = 0):
    """A deterministic field with no structure a stencil could hide behind."""
    idx = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape)
    vals = np.sin(12.9898 * idx + 78.233 * seed) * 43758.5453
    return jnp.asarray(vals - np.floor(vals) - 0.5, dtype)


def stencil_mismatch(apply, stencil: Stencil, fields: list):
    r"""Relative difference $\|Lz - Sz\| / \|Lz\|$ on deterministic test fields $z$."""
    z = [test_field(f.shape, f.dtype, seed=k) for k, f in enumerate(fields)]
    ref = apply(z)
    got = stencil.mv(z)
    num = sum(jnp.sum((a - b) ** 2) for a, b in zip(ref, got, strict=True))
    den = sum(jnp.sum(a**2) for a in ref)
    return jnp.sqrt(num / jnp.where(den > 0, den, 1.0))
