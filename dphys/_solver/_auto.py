"""The automatic choice of solver from a model's static structure."""

from __future__ import annotations

import math

import jax.tree_util as jtu

from .._model import AbstractModel
from ._base import AbstractLinearSolver
from ._fft import FFT
from ._krylov import Krylov
from ._tridiagonal import Tridiagonal
from ._vcycle import hierarchy


class Auto(AbstractLinearSolver):
    """Pick the fastest correct solver from the model's structure (static choice).

    In order: :class:`FFT` for periodic translation-invariant operators; the
    model's own choice, :meth:`dphys.AbstractModel.preferred_solver`, if it makes
    one (e.g. ``pdes.ShallowWater`` picks its Helmholtz-preconditioned GMRES);
    :class:`Tridiagonal` for 1D non-periodic single fields; otherwise
    :class:`Krylov`: CG if the model is symmetric, else GMRES, preconditioned
    according to the structure hints (only static facts: the values of the
    coefficients are unknown when the choice is made):

    * a fully periodic grid: none. On P6 (``benchmarks/README.md``, 256², one run
      at load average 22) plain CG took 5.1 iterations per step and 8.2 s forward
      against 2.0 and 17.0 s with ``"fourier"`` (one FFT pair per iteration costs
      several stencil passes on a CPU) and 1.3 and 24.8 s with ``"multigrid"``
      (``docs/design.md``, section 16). Ask for ``"fourier"`` on larger or stiffer
      grids (plain CG's count doubles per refinement: 13.6 against 3.2 at 512²) and
      for ``"multigrid"`` at large coefficient contrasts (4.1 against 16.9 with
      Fourier at 400-fold).
    * otherwise a symmetric single-field operator on a grid that halves down to at
      most 4096 points: ``"multigrid"``, whose iterations do not grow with the grid
      size, the contrast or the stiffness, where plain CG's count grows without
      bound (no convergence in 500 iterations at diffusion number 330,
      ``docs/design.md`` section 10; walls and Dirichlet boundaries have no Fourier
      inverse). At mild diffusion numbers it is slower than plain CG (see above).
    * otherwise none (non-symmetric operators on bounded domains: Jacobi smoothing
      does not converge for advection at Courant numbers above one).
    """

    def resolve(self, model: AbstractModel, like) -> AbstractLinearSolver:
        if model.grid.periodic and model.translation_invariant:
            return FFT()
        preferred = model.preferred_solver(like)
        if preferred is not None:
            if not isinstance(preferred, AbstractLinearSolver) or isinstance(
                preferred, Auto
            ):
                raise TypeError(
                    f"`{type(model).__name__}.preferred_solver` must return a concrete "
                    "dphys.AbstractLinearSolver (not Auto) or None, got "
                    f"{type(preferred).__name__}."
                )
            return preferred
        if (
            model.grid.ndim == 1
            and not any(b == "periodic" for b in model.grid.boundary)
            and len(jtu.tree_leaves(like)) == 1
        ):
            return Tridiagonal()
        return Krylov(preconditioner=_preconditioner(model, like))

    def init(self, model, t, like):
        return self.resolve(model, like).init(model, t, like)

    def solve(self, model, t, gamma, rhs, structure, guess=None):
        return self.resolve(model, rhs).solve(model, t, gamma, rhs, structure, guess)


def _preconditioner(model: AbstractModel, like) -> str | None:
    """The Krylov preconditioner :class:`Auto` picks (see its docstring)."""
    if model.grid.periodic:
        return None
    if model.symmetric and len(jtu.tree_leaves(like)) == 1:
        shapes = hierarchy(model.grid.shape, model.grid.boundary, 64)
        if math.prod(shapes[-1]) <= 4096 and len(shapes) > 1:
            return "multigrid"
    return None


def resolve_solver(solver: AbstractLinearSolver, model, like) -> AbstractLinearSolver:
    """The concrete solver that ``solver`` stands for, after checking it fits."""
    if isinstance(solver, Auto):
        solver = solver.resolve(model, like)
    solver.check(model, like)
    return solver
