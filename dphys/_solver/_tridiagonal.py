"""Direct banded solves in 1D."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._results import RESULTS
from ._base import AbstractLinearSolver
from ._probes import probe_tridiagonal


class Tridiagonal(AbstractLinearSolver):
    """Direct banded solve in 1D with Dirichlet/Neumann boundaries (any coefficients).

    Uses ``lax.linalg.tridiagonal_solve`` (LAPACK ``gtsv`` on CPU, cuSPARSE on GPU),
    whose derivative is one transposed tridiagonal solve.
    """

    def check(self, model, like):
        leaves = jtu.tree_leaves(like)
        if model.grid.ndim != 1 or len(leaves) != 1 or model.grid.periodic:
            raise ValueError(
                "`solver=Tridiagonal()` needs a 1D grid with Dirichlet or Neumann "
                f"boundaries and a single field; got grid shape {model.grid.shape}, "
                f"boundary={model.grid.boundary}, {len(leaves)} field(s). Use "
                "`dphys.FFT()` for periodic grids or `dphys.Krylov()`."
            )

    def init(self, model, t, like):
        return probe_tridiagonal(model, t, like)

    def solve(self, model, t, gamma, rhs, structure):
        lower, diag, upper = structure
        x = jax.lax.linalg.tridiagonal_solve(
            -gamma * lower, 1.0 - gamma * diag, -gamma * upper, rhs[:, None]
        )[:, 0]
        return x, RESULTS.successful, jnp.asarray(0)
