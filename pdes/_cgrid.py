r"""Arakawa C-grid stencils: shifts, averages, differences and face masks.

Every field has the grid's shape; staggering is an index convention (cell (j, i),
its east face u[j, i], its north face v[j, i]). A shift by one cell is a roll; on
an axis with walls the roll wraps around, but every value it brings across the
boundary is either multiplied by a zero wall-face velocity or lands on a wall face
that is masked afterwards, so the same code serves periodic and walled axes. This
also makes each averaging operator the exact transpose of its partner (avg_fwd of
avg_bwd), which is what makes the discrete gravity-wave and Coriolis terms
energy-conserving.

Each axis of the grid is ``"periodic"`` or ``"neumann"`` (:data:`WALL`: walls with
zero normal velocity). Grid axes are negative array axes (``-1`` is $x$, ``-2`` is
$y$).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dphys import Grid
from dphys.operators import roll


WALL = "neumann"
"""The boundary kind that means walls (zero normal velocity) on a C-grid axis."""


def fwd(a, ax):
    """``a[i+1]`` along grid axis ``ax`` (negative array axis)."""
    return roll(a, -1, ax)


def bwd(a, ax):
    """``a[i-1]`` along grid axis ``ax``."""
    return roll(a, 1, ax)


def avg_fwd(a, ax):
    """Average of cell i and i+1: cell centre -> face (or face -> corner)."""
    return 0.5 * (a + fwd(a, ax))


def avg_bwd(a, ax):
    """Average of i-1 and i: face -> cell centre (or corner -> face)."""
    return 0.5 * (a + bwd(a, ax))


def face_masks(grid: Grid):
    """Masks (1 active, 0 wall) of the u and v faces, NumPy, grid-shaped."""
    mask_u = np.ones(grid.shape)
    mask_v = np.ones(grid.shape)
    if grid.boundary[-1] == WALL:
        mask_u[..., -1] = 0.0
    if grid.ndim == 2 and grid.boundary[0] == WALL:
        mask_v[-1, :] = 0.0
    return mask_u, mask_v


def laplacian_eigenvalues(grid: Grid):
    """Eigenvalues of the C-grid Laplacian $D\\,G$ on the transform's modes.

    Periodic axes: $-\\frac{4}{\\Delta^2}\\sin^2(\\pi k/N)$ on ``rfftn`` modes (the
    last periodic axis is the half spectrum). Wall axes (cell-centred Neumann):
    $-\\frac{4}{\\Delta^2}\\sin^2(\\pi k/2N)$ on DCT-II modes.
    """
    periodic = [a for a in range(grid.ndim) if grid.boundary[a] == "periodic"]
    lam = np.zeros(())
    for a, (n, d) in enumerate(zip(grid.shape, grid.spacing, strict=True)):
        if grid.boundary[a] == "periodic":
            k = np.fft.rfftfreq(n) * n if a == periodic[-1] else np.fft.fftfreq(n) * n
            s = -(4.0 / d**2) * np.sin(np.pi * k / n) ** 2
        else:
            k = np.arange(n)
            s = -(4.0 / d**2) * np.sin(np.pi * k / (2 * n)) ** 2
        shape = [1] * grid.ndim
        shape[a] = s.size
        lam = lam + s.reshape(shape)
    return lam


def gradient(grid: Grid, eta, masks):
    r"""Face gradient $G\eta$: $(\eta_{i+1}-\eta_i)/\Delta$ on u (and v) faces."""
    gx = (fwd(eta, -1) - eta) / grid.spacing[-1] * masks[0]
    if grid.ndim == 2:
        gy = (fwd(eta, -2) - eta) / grid.spacing[0] * masks[1]
    else:
        gy = jnp.zeros_like(eta)
    return gx, gy


def divergence(grid: Grid, fx, fy, masks):
    r"""Cell divergence $D\mathbf F$ of face fluxes; $D = -G^T$."""
    fx = fx * masks[0]
    out = (fx - bwd(fx, -1)) / grid.spacing[-1]
    if grid.ndim == 2:
        fy = fy * masks[1]
        out = out + (fy - bwd(fy, -2)) / grid.spacing[0]
    return out


def v_to_u(grid: Grid, a):
    """Average from v points to u points (2D: four points; 1D: two)."""
    a = avg_bwd(a, -2) if grid.ndim == 2 else a
    return avg_fwd(a, -1)


def u_to_v(grid: Grid, a):
    """Average from u points to v points (the transpose of :func:`v_to_u`)."""
    a = avg_bwd(a, -1)
    return avg_fwd(a, -2) if grid.ndim == 2 else a
