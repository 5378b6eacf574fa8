r"""Matrix-free second-order finite-difference / finite-volume stencils.

All operators act on the trailing ``grid.ndim`` axes of an array, so a leading batch
or field axis passes through untouched. Boundary conditions are imposed through one
layer of ghost values (see :class:`dphys.Grid` for where unknowns sit):

* periodic: the ghost is the value on the opposite side;
* Dirichlet: the ghost is the boundary node itself, where $u = 0$;
* Neumann: the ghost mirrors the first unknown, so the boundary face carries no flux.

Every operator here is linear in ``u`` and differentiable in its coefficients.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from ._grid import Grid


def pad_axis(u, grid: Grid, axis: int, *, coefficient: bool = False):
    """Add one ghost value on each side of grid axis ``axis`` (a non-negative index).

    With ``coefficient=True`` the ghost is the edge value for every non-periodic
    boundary (used for face averages of coefficient fields).
    """
    ax = u.ndim - grid.ndim + axis
    b = grid.boundary[axis]
    if b == "periodic":
        mode = "wrap"
    elif coefficient or b == "neumann":
        mode = "edge"
    else:
        mode = "constant"
    widths = [(0, 0)] * u.ndim
    widths[ax] = (1, 1)
    return jnp.pad(u, widths, mode=mode)


def _shift_slices(ndim_total: int, ax: int):
    lo = [slice(None)] * ndim_total
    hi = [slice(None)] * ndim_total
    lo[ax] = slice(None, -1)
    hi[ax] = slice(1, None)
    return tuple(lo), tuple(hi)


def face_flux(u, grid: Grid, axis: int, kappa=None):
    r"""Diffusive flux $-\kappa\,\partial u/\partial x$ on every face along ``axis``.

    Returns an array one longer than ``u`` along ``axis`` (``n+1`` faces, boundary
    faces included). ``kappa`` is ``None`` (one), a scalar or a field; a field is
    averaged arithmetically onto interior faces. Neumann boundary faces carry zero
    flux. On a Dirichlet boundary face, half a cell outside the first unknown, the
    field is extrapolated log-linearly, $\kappa_{-1/2} = \kappa_0\sqrt{\kappa_0 /
    \kappa_1}$: a second-order face value that stays positive whenever the field is.
    (Copying $\kappa_0$ would be first order there and leave an $O(1)$ truncation
    error in the boundary row of :func:`laplacian`; with the extrapolation it is
    $O(\Delta x)$ in that row, $O(\Delta x^2)$ elsewhere, and solutions converge at
    second order.)
    """
    ax = u.ndim - grid.ndim + axis
    up = pad_axis(u, grid, axis)
    lo, hi = _shift_slices(up.ndim, ax)
    grad = (up[hi] - up[lo]) / grid.spacing[axis]
    if kappa is not None and jnp.ndim(kappa) > 0:
        kp = pad_axis(jnp.broadcast_to(kappa, u.shape), grid, axis, coefficient=True)
        kface = 0.5 * (kp[hi] + kp[lo])
        if grid.boundary[axis] == "dirichlet":
            n = kp.shape[ax]
            at = lambda m: lax.slice_in_dim(kp, m, m + 1, axis=ax)
            inner = lax.slice_in_dim(kface, 1, kface.shape[ax] - 1, axis=ax)
            k0, k1, kn, km = at(1), at(2), at(n - 2), at(n - 3)
            kface = jnp.concatenate(
                [k0 * jnp.sqrt(k0 / k1), inner, kn * jnp.sqrt(kn / km)], axis=ax
            )
    else:
        kface = 1.0 if kappa is None else kappa
    return -kface * grad


def laplacian(u, grid: Grid, kappa=None):
    r"""Conservative diffusion operator $\nabla\cdot(\kappa\nabla u)$.

    $$ (\nabla\cdot\kappa\nabla u)_i = \sum_{\text{axes}} \frac{1}{\Delta x}
       \left[\kappa_{i+1/2}\frac{u_{i+1}-u_i}{\Delta x}
            -\kappa_{i-1/2}\frac{u_i-u_{i-1}}{\Delta x}\right],
       \qquad \kappa_{i+1/2} = \tfrac12(\kappa_i + \kappa_{i+1}). $$

    With constant ``kappa`` this is the 3-point (1D) / 5-point (2D) Laplacian times
    ``kappa``. Symmetric (self-adjoint in the plain Euclidean inner product) for every
    boundary kind. Units: ``[kappa][u]/[length]^2``.

    Args:
        u: array whose trailing axes are ``grid.shape``.
        grid: the grid.
        kappa: ``None``, a positive scalar, or a positive field of shape ``grid.shape``.
    """
    out = jnp.zeros_like(u)
    for axis in range(grid.ndim):
        ax = u.ndim - grid.ndim + axis
        flux = face_flux(u, grid, axis, kappa)
        lo, hi = _shift_slices(flux.ndim, ax)
        out = out - (flux[hi] - flux[lo]) / grid.spacing[axis]
    return out


def gradient(u, grid: Grid):
    r"""Centred gradient $(\partial u/\partial x_a)_i = (u_{i+1}-u_{i-1})/(2\Delta x_a)$.

    Returns a tuple with one array per grid axis (array-axis order).
    """
    result = []
    for axis in range(grid.ndim):
        ax = u.ndim - grid.ndim + axis
        up = pad_axis(u, grid, axis)
        n = up.shape[ax]
        hi = [slice(None)] * up.ndim
        lo = [slice(None)] * up.ndim
        hi[ax] = slice(2, n)
        lo[ax] = slice(0, n - 2)
        result.append((up[tuple(hi)] - up[tuple(lo)]) / (2 * grid.spacing[axis]))
    return tuple(result)


def divergence(fields, grid: Grid):
    r"""Centred divergence $\sum_a \partial F_a/\partial x_a$ of a tuple of fields."""
    if len(fields) != grid.ndim:
        raise ValueError(
            f"`fields` must have one component per grid axis ({grid.ndim}), got "
            f"{len(fields)}."
        )
    return sum(gradient(f, grid)[a] for a, f in enumerate(fields))
