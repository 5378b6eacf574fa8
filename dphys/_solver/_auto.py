"""The automatic choice of solver from a model's static structure."""

from __future__ import annotations

import jax.tree_util as jtu

from .._model import AbstractModel
from ._base import AbstractLinearSolver
from ._fft import FFT
from ._krylov import Krylov
from ._tridiagonal import Tridiagonal


class Auto(AbstractLinearSolver):
    """Pick the fastest correct solver from the model's structure (static choice).

    In order: :class:`FFT` for periodic translation-invariant operators; the
    model's own choice, :meth:`dphys.AbstractModel.preferred_solver`, if it makes
    one (e.g. ``pdes.ShallowWater`` picks its Helmholtz-preconditioned GMRES);
    :class:`Tridiagonal` for 1D non-periodic single fields; otherwise
    :class:`Krylov` (CG if symmetric, else GMRES).
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
        return Krylov()

    def init(self, model, t, like):
        return self.resolve(model, like).init(model, t, like)

    def solve(self, model, t, gamma, rhs, structure):
        return self.resolve(model, rhs).solve(model, t, gamma, rhs, structure)


def resolve_solver(solver: AbstractLinearSolver, model, like) -> AbstractLinearSolver:
    """The concrete solver that ``solver`` stands for, after checking it fits."""
    if isinstance(solver, Auto):
        solver = solver.resolve(model, like)
    solver.check(model, like)
    return solver
