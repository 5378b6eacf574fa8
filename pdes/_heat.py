r"""The heat (diffusion) equation."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import dphys
from dphys._checks import check_positive
from dphys.operators import laplacian


class Heat(dphys.AbstractModel):
    r"""Heat equation $u_t = \nabla\cdot(\kappa\nabla u) + f$ in 1D or 2D.

    Discretised in conservative finite-volume form (see
    :func:`dphys.operators.laplacian`): second order in space, symmetric, and for
    Neumann/periodic boundaries the total heat $\sum_i u_i\Delta V$ changes only by
    the source. With a scalar ``kappa`` on a periodic grid the operator is
    diagonalised by the FFT and :class:`dphys.Auto` solves exactly in one FFT pair.

    Attributes:
        grid: the :class:`dphys.Grid` (any boundary kinds).
        kappa: diffusivity, a positive scalar or a positive field of ``grid.shape``
            [length^2 / time]; differentiable.
        source: constant source $f$, ``None``, a scalar or a field [u / time];
            differentiable.
        source_fn: optional time-dependent source ``source_fn(t) -> field`` (static;
            added to ``source``).

    Example:
        >>> grid = dphys.Grid((32, 32), lengths=1.0, boundary="neumann")
        >>> model = Heat(grid, kappa=1e-2)
    """

    grid: dphys.Grid
    kappa: jax.Array
    source: jax.Array | None = None
    source_fn: Callable | None = eqx.field(static=True, default=None)

    def __init__(self, grid, kappa, source=None, source_fn=None):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        grid.check_field(kappa, "kappa")
        check_positive(kappa, "kappa")
        if source is not None:
            grid.check_field(source, "source")
        self.grid = grid
        self.kappa = jnp.asarray(kappa) if not isinstance(kappa, jax.Array) else kappa
        self.source = None if source is None else jnp.asarray(source)
        self.source_fn = source_fn

    def linear(self, t, state):
        return laplacian(state, self.grid, self.kappa)

    def forcing(self, t):
        f = self.source
        if self.source_fn is not None:
            g = self.source_fn(t)
            f = g if f is None else f + g
        if f is not None and jnp.shape(f) != self.grid.shape:
            f = jnp.broadcast_to(f, self.grid.shape)
        return f

    @property
    def has_forcing(self) -> bool:
        return self.source is not None or self.source_fn is not None

    @property
    def translation_invariant(self) -> bool:
        return jnp.ndim(self.kappa) == 0

    @property
    def symmetric(self) -> bool:
        return True

    @property
    def autonomous(self) -> bool:
        return True

    def symbol(self):
        r"""Eigenvalues of the discrete operator on ``rfftn`` modes (periodic, scalar κ):

        $\lambda_k = -\kappa\sum_a \frac{4}{\Delta x_a^2}\sin^2(\pi k_a / N_a)$.
        """
        if not self.translation_invariant or not self.grid.periodic:
            raise ValueError("`symbol` needs a periodic grid and a scalar `kappa`.")
        lam = 0.0
        shape = self.grid.shape
        for a, (n, dx) in enumerate(zip(shape, self.grid.spacing)):
            k = np.fft.rfftfreq(n) * n if a == len(shape) - 1 else np.fft.fftfreq(n) * n
            s = -(4.0 / dx**2) * np.sin(np.pi * k / n) ** 2
            bshape = [1] * len(shape)
            bshape[a] = s.size
            lam = lam + s.reshape(bshape)
        return self.kappa * jnp.asarray(lam)
