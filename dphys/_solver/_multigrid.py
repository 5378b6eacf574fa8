r"""The multigrid solver: V-cycles iterated to a tolerance (:class:`Multigrid`)."""

from __future__ import annotations

import equinox as eqx

from . import _structure
from ._base import AbstractLinearSolver
from ._krylov import _check_tolerances, krylov_solve


class Multigrid(AbstractLinearSolver):
    r"""Geometric multigrid for $(I-\gamma L)x = b$: V-cycles until converged.

    Each iteration is $x \leftarrow x + V(b - Ax)$ with $V$ one V-cycle (see
    :mod:`dphys._solver._vcycle`): on every level $\nu$ damped-Jacobi sweeps, the
    residual restricted by full weighting, the correction from the next coarser
    level interpolated back, $\nu$ more sweeps; Galerkin coarse operators $R L P$
    probed from the model's matrix-free $L$; a dense solve on the coarsest level.
    Iterations stop when $\|b - Ax\|_2 \le \mathrm{atol} + \mathrm{rtol}\,\|b\|_2$
    (true residual). Convergence per cycle is independent of the grid size: about
    0.05-0.2 for diffusion on every boundary kind, with coefficients varying
    400-fold (``tests/test_multigrid.py``). It converges for diffusion-dominated
    operators; for advection at Courant numbers above about one, Jacobi does not
    smooth and the cycle diverges: use :class:`Krylov` with GMRES there.

    The same cycle preconditions :class:`Krylov` (``preconditioner="multigrid"``
    or ``preconditioner=Multigrid(...)``, which uses this object's cycle settings),
    usually the faster choice: CG's acceleration saves cycles.

    Derivatives: the implicit function theorem through ``lineax.linear_solve``, one
    transposed multigrid solve per step (the transposed cycle is the cycle of
    $A^T$; the hierarchy carries no derivative), memory independent of the number
    of cycles. An unconverged adjoint solve raises.

    Needs a single-field state whose grid halves (periodic axes: even lengths) down
    to at most 4096 points.

    Attributes:
        rtol, atol: stopping tolerances, as for :class:`Krylov`.
        max_steps: cap on V-cycles per solve (``RESULTS.linear_solve_failed``).
        sweeps: damped-Jacobi sweeps before and after each coarse correction.
        omega: Jacobi damping; ``None`` picks 2/3 in 1D and 4/5 in 2D, the best
            smoothing factors for the 3- and 5-point Laplacians.
        max_coarse: coarsen until a level has at most this many points; that
            level is solved densely.
        assemble: iterate with the probed stencil of $L$ when the model declares
            one (see :class:`Krylov`).

    Example:
        >>> grid = dphys.Grid((32, 32), lengths=1.0, boundary="neumann")
        >>> y, x = grid.coords
        >>> model = pdes.Heat(grid, kappa=1e-2 * jnp.exp(2 * jnp.sin(6 * x)))
        >>> stepper = dphys.BackwardEuler(solver=dphys.Multigrid())
        >>> traj = dphys.simulate(model, stepper, jnp.cos(3 * x), dt=0.1, n_steps=5)
        >>> bool(traj.stats["linear_iterations"] <= 5 * 6)
        True

    References:
        Trottenberg, Oosterlee & Schüller (2001), "Multigrid", Academic Press.
    """

    rtol: float = eqx.field(static=True, default=1e-10)
    atol: float = eqx.field(static=True, default=0.0)
    max_steps: int = eqx.field(static=True, default=100)
    sweeps: int = eqx.field(static=True, default=2)
    omega: float | None = eqx.field(static=True, default=None)
    max_coarse: int = eqx.field(static=True, default=64)
    assemble: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        _check_tolerances(self.rtol, self.atol, self.max_steps, 1)
        if (
            not isinstance(self.sweeps, int)
            or isinstance(self.sweeps, bool)
            or (self.sweeps < 1)
        ):
            raise ValueError(
                f"`sweeps` must be a positive integer, got {self.sweeps!r}."
            )
        if self.omega is not None and not (
            isinstance(self.omega, (int, float)) and 0 < self.omega < 2
        ):
            raise ValueError(
                f"`omega` must be None or a number in (0, 2), got {self.omega!r}; "
                "damped Jacobi diverges outside it."
            )
        if (
            not isinstance(self.max_coarse, int)
            or isinstance(self.max_coarse, bool)
            or not 1 <= self.max_coarse <= 4096
        ):
            raise ValueError(
                f"`max_coarse` must be an integer in [1, 4096] (the coarsest level is "
                f"solved densely), got {self.max_coarse!r}."
            )
        if not isinstance(self.assemble, bool):
            raise TypeError(
                f"`assemble` must be a bool, got {type(self.assemble).__name__}."
            )

    @property
    def cycle(self) -> _structure.CycleOptions:
        return _structure.CycleOptions(self.sweeps, self.omega, self.max_coarse)

    def check(self, model, like):
        _structure.check(model, like, "multigrid", self.cycle, "Multigrid")

    def init(self, model, t, like):
        return _structure.build(
            model, t, like, kind="multigrid", assemble=self.assemble, cycle=self.cycle
        )

    def factor(self, structure, gamma):
        return _structure.factor(structure, gamma, self.cycle)

    def is_factored(self, structure) -> bool:
        return isinstance(structure, _structure.LinearStructure) and structure.factored

    @property
    def uses_guess(self) -> bool:
        return True

    def solve(self, model, t, gamma, rhs, structure, guess=None):
        structure = self.factor(structure, gamma)
        return krylov_solve(
            _structure.operator(model, t, gamma, structure),
            rhs,
            method="richardson",
            preconditioner=_structure.preconditioner(model, structure),
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            initial_guess="preconditioned",
            guess=guess,
        )
