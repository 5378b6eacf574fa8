r"""Geometric multigrid for $(I-\gamma L)x = b$ on the project's grids.

**Hierarchy.** Every axis is coarsened by two, as far as its boundary kind allows
(:func:`coarse_shape`): on a periodic axis coarse point $I$ is fine point $2I$
(even lengths only); on a Dirichlet axis (nodes, $u = 0$ beyond both ends) coarse
points are the odd fine points; on a Neumann axis (cell centres, zero flux) the even
ones. Prolongation $P$ is linear interpolation along each axis (tensor product), with
zero beyond a Dirichlet end and constant extrapolation at a Neumann end; restriction
is its transpose, $R = P^T$ (full weighting up to a factor $2^d$, which a Galerkin
hierarchy does not see).

**Coarse operators by Galerkin projection.** $L_{\ell+1} = R L_\ell P$ and
$E_{\ell+1} = R E_\ell P$ ($E_0 = I$), so $A_\ell = E_\ell - \gamma L_\ell$ is
exactly $R A_{\ell-1} P$ for every $\gamma$ and only the model's matrix-free $L$ is
ever needed: the fine stencil is probed from it (:func:`dphys._solver._stencil.
probe_stencil`) and each coarse stencil is probed from the composition $R L P$.
With linear interpolation and 3-point-per-axis fine stencils every coarse stencil
stays within the $3^d$ box (two coarse points apart couple only through fine points
more than one apart). Variable coefficients and boundary closures are inherited
from the fine operator, with no model-specific coarsening.

**Cycle.** A V-cycle with $\nu$ damped-Jacobi sweeps before and after the coarse
correction and a dense solve on the coarsest level. Jacobi is symmetric and $R =
P^T$, so the cycle is a symmetric positive definite preconditioner whenever $A$ is
SPD (what CG needs). Its transpose, needed by the adjoint solve of a non-symmetric
system, is the V-cycle of $A^T$ with the same smoother, which JAX derives exactly
from the linear cycle (``jax.linear_transpose``).

References:
    Trottenberg, Oosterlee & Schüller (2001), "Multigrid", Academic Press, ch. 2
    (V-cycle, damped Jacobi, full weighting) and sec. 7.7 (Galerkin coarse grids).
    Briggs, Henson & McCormick (2000), "A Multigrid Tutorial", 2nd ed., SIAM.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp

from ._stencil import Stencil, box_offsets, probe_stencil


def coarse_length(n: int, kind: str) -> int | None:
    """The coarse length of an axis of ``n`` points, or ``None`` if it cannot halve."""
    if kind == "periodic":
        return n // 2 if n % 2 == 0 and n // 2 >= 3 else None
    if kind == "dirichlet":
        return n // 2 if n // 2 >= 2 else None
    return (n + 1) // 2 if n >= 4 else None


def coarse_shape(shape, boundary) -> tuple[int, ...] | None:
    """The next coarser grid shape (axes that cannot halve keep their length), or
    ``None`` when no axis can halve."""
    out = []
    for n, kind in zip(shape, boundary, strict=True):
        c = coarse_length(n, kind)
        out.append(n if c is None else c)
    out = tuple(out)
    return None if out == tuple(shape) else out


def hierarchy(shape, boundary, max_coarse: int) -> list[tuple[int, ...]]:
    """Grid shapes from fine to coarse, until at most ``max_coarse`` points."""
    shapes = [tuple(shape)]
    while math.prod(shapes[-1]) > max_coarse:
        nxt = coarse_shape(shapes[-1], boundary)
        if nxt is None:
            break
        shapes.append(nxt)
    return shapes


# ----------------------------------------------------------- transfer, one axis
def _interleave(even, odd, ax):
    """``[even0, odd0, even1, odd1, ...]`` along ``ax`` (``even`` may be one longer)."""
    n_odd = odd.shape[ax]
    head = jax.lax.slice_in_dim(even, 0, n_odd, axis=ax)
    pairs = jnp.stack([head, odd], axis=ax + 1)
    shape = list(head.shape)
    shape[ax] = 2 * n_odd
    out = pairs.reshape(shape)
    if even.shape[ax] > n_odd:
        out = jnp.concatenate(
            [out, jax.lax.slice_in_dim(even, n_odd, n_odd + 1, axis=ax)], axis=ax
        )
    return out


def _pad(x, ax, lo, hi, mode="constant"):
    widths = [(0, 0)] * x.ndim
    widths[ax] = (lo, hi)
    return jnp.pad(x, widths, mode=mode)


def _sl(x, ax, start, stop, step=1):
    return jax.lax.slice_in_dim(x, start, stop, step, axis=ax)


def prolong_axis(c, ax: int, kind: str, n_fine: int):
    """Linear interpolation from the coarse to the fine points along axis ``ax``."""
    n_c = c.shape[ax]
    if kind == "periodic":
        odd = 0.5 * (c + jnp.roll(c, -1, axis=ax))
        return _interleave(c, odd, ax)
    if kind == "dirichlet":
        n_even = (n_fine + 1) // 2
        cp = _pad(c, ax, 1, 1)
        even = 0.5 * (_sl(cp, ax, 0, n_even) + _sl(cp, ax, 1, n_even + 1))
        # fine = [even0, c0, even1, c1, ...]
        return _interleave(even, c, ax)
    n_odd = n_fine // 2
    cp = _pad(c, ax, 0, 1, mode="edge")
    odd = 0.5 * (_sl(cp, ax, 0, n_odd) + _sl(cp, ax, 1, n_odd + 1))
    del n_c
    return _interleave(c, odd, ax)


def restrict_axis(f, ax: int, kind: str, n_coarse: int):
    """The transpose of :func:`prolong_axis` (from ``f`` on the fine points)."""
    n_f = f.shape[ax]
    even = _sl(f, ax, 0, n_f, 2)
    odd = _sl(f, ax, 1, n_f, 2)
    if kind == "periodic":
        return even + 0.5 * (odd + jnp.roll(odd, 1, axis=ax))
    if kind == "dirichlet":
        # coarse I = fine 2I+1 (odd) + half of fine 2I and 2I+2 (even).
        ep = _pad(even, ax, 0, n_coarse + 1 - even.shape[ax])
        return odd + 0.5 * (_sl(ep, ax, 0, n_coarse) + _sl(ep, ax, 1, n_coarse + 1))
    n_odd = odd.shape[ax]
    a = _pad(odd, ax, 0, n_coarse - n_odd)
    b = _pad(odd, ax, 1, 0)  # b[J] = odd[J - 1]
    if b.shape[ax] > n_coarse:  # even n_f: the last odd point extrapolates c[-1]
        last = _sl(b, ax, n_coarse, n_coarse + 1)
        b = _sl(b, ax, 0, n_coarse)
        b = b + _pad(last, ax, n_coarse - 1, 0)
    return even + 0.5 * (a + b)


def prolong(c, fine_shape, boundary):
    """Tensor-product linear interpolation of a coarse field to ``fine_shape``."""
    ndim = len(boundary)
    for a, (n_f, kind) in enumerate(zip(fine_shape, boundary, strict=True)):
        ax = c.ndim - ndim + a
        if c.shape[ax] != n_f:
            c = prolong_axis(c, ax, kind, n_f)
    return c


def restrict(f, coarse_shape_, boundary):
    """$P^T$: the transpose of :func:`prolong`."""
    ndim = len(boundary)
    for a, (n_c, kind) in enumerate(zip(coarse_shape_, boundary, strict=True)):
        ax = f.ndim - ndim + a
        if f.shape[ax] != n_c:
            f = restrict_axis(f, ax, kind, n_c)
    return f


# ----------------------------------------------------------------- the hierarchy
class Hierarchy(eqx.Module):
    r"""The $\gamma$-independent multigrid structure of $L$: per level the Galerkin
    stencils of $L_\ell$ and of $E_\ell$ (the projected identity).

    Attributes:
        operators: $L_\ell$ per level, fine to coarse.
        masses: $E_\ell$ per level (``None`` on the finest, where it is $I$).
        shapes: grid shape per level (static).
    """

    operators: list[Stencil]
    masses: list[Stencil | None]
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    @property
    def boundary(self):
        return self.operators[0].boundary

    def cycle(self, gamma, *, sweeps: int = 2, omega: float | None = None) -> Cycle:
        r"""The V-cycle of $I - \gamma L$ (damped Jacobi, ``omega`` default 2/3 in
        1D and 4/5 in 2D), a linear map on fields of the finest grid."""
        if omega is None:
            omega = 2.0 / 3.0 if len(self.shapes[0]) == 1 else 0.8
        return make_cycle(self, gamma, sweeps=sweeps, omega=omega)


def multigrid_hierarchy(
    apply, like, boundary, *, offsets=None, max_coarse: int = 64
) -> Hierarchy:
    r"""The Galerkin multigrid hierarchy of a linear map $L$ on one grid field.

    Probes ``apply`` (a function from a field of ``like``'s shape to one of the same
    shape, linear) into its stencil and builds the coarse operators $R L P$ (see the
    module docstring). ``Hierarchy.cycle(gamma)`` is then one V-cycle for
    $I - \gamma L$: a preconditioner for any solve with that matrix.

    Args:
        apply: the linear map (matrix-free).
        like: a field with the grid's shape and dtype (values unused).
        boundary: boundary kind per grid axis.
        offsets: the stencil's offsets (default: the $3^d$ box, exact for every
            3-point-per-axis operator; a preconditioner only needs it approximately).
        max_coarse: coarsen until at most this many points (solved densely).

    Example:
        >>> grid = dphys.Grid((32, 32), boundary="neumann")
        >>> lap = lambda u: dphys.operators.laplacian(u, grid)
        >>> h = dphys.multigrid_hierarchy(lap, jnp.zeros((32, 32)), grid.boundary)
        >>> h.shapes[-1]
        (8, 8)
        >>> x = h.cycle(1e-3)(jnp.ones((32, 32)))  # approximately (I - 1e-3 L)^{-1} 1
    """
    if offsets is None:
        offsets = box_offsets(len(boundary))
    fine = probe_stencil(lambda f: [apply(f[0])], [like], tuple(boundary), offsets)
    return build_hierarchy(fine, max_coarse)


def build_hierarchy(fine: Stencil, max_coarse: int) -> Hierarchy:
    """Galerkin hierarchy of a single-field fine stencil (see the module docstring)."""
    boundary = fine.boundary
    shapes = hierarchy(fine.shape, boundary, max_coarse)
    operators: list[Stencil] = [fine]
    masses: list[Stencil | None] = [None]
    dtype = fine.coefficients.dtype
    for fine_shape, shape in zip(shapes[:-1], shapes[1:], strict=True):
        lop, mass = operators[-1], masses[-1]

        def galerkin(op, fine_shape=fine_shape, shape=shape):
            def apply(fields):
                x = prolong(fields[0], fine_shape, boundary)
                y = x if op is None else op.mv([x])[0]
                return [restrict(y, shape, boundary)]

            return apply

        like = [jnp.zeros(shape, dtype)]
        box = box_offsets(len(shape))
        operators.append(probe_stencil(galerkin(lop), like, boundary, box))
        masses.append(probe_stencil(galerkin(mass), like, boundary, box))
    return Hierarchy(operators, masses, tuple(shapes))


class Cycle(eqx.Module):
    r"""The $\gamma$-specific V-cycle data: $A_\ell = E_\ell - \gamma L_\ell$, the
    damped inverse diagonals and the coarsest level's dense inverse.

    Attributes:
        operators: $A_\ell$ per level (assembled stencils).
        smoothers: $\omega / \mathrm{diag}(A_\ell)$ per level but the coarsest.
        coarse_inverse: dense $A_L^{-1}$ of the coarsest level.
        shapes: grid shapes per level (static).
        sweeps: Jacobi sweeps before and after each coarse correction (static).
    """

    operators: list[Stencil]
    smoothers: list[jax.Array]
    coarse_inverse: jax.Array
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    sweeps: int = eqx.field(static=True)

    def __call__(self, r):
        """One V-cycle applied to the residual ``r`` (approximately $A^{-1}r$)."""
        return self._cycle(0, r)

    def _cycle(self, level, r):
        if level == len(self.shapes) - 1:
            return (self.coarse_inverse @ r.ravel()).reshape(r.shape)
        a, w = self.operators[level], self.smoothers[level]
        boundary = a.boundary
        x = w * r
        for _ in range(self.sweeps - 1):
            x = x + w * (r - a.mv([x])[0])
        rc = restrict(r - a.mv([x])[0], self.shapes[level + 1], boundary)
        x = x + prolong(self._cycle(level + 1, rc), self.shapes[level], boundary)
        for _ in range(self.sweeps):
            x = x + w * (r - a.mv([x])[0])
        return x


def make_cycle(h: Hierarchy, gamma, *, sweeps: int, omega: float) -> Cycle:
    """The V-cycle of $E - \\gamma L$ from a :class:`Hierarchy`."""
    ops = []
    for lop, mass in zip(h.operators, h.masses, strict=True):
        ops.append(lop.scale_add(-gamma, mass))
    smoothers = [omega / op.center()[0, 0] for op in ops[:-1]]
    coarse = jnp.linalg.inv(ops[-1].dense())
    return Cycle(ops, smoothers, coarse, h.shapes, sweeps)
