r"""Implicit and implicit-explicit time steppers.

All steppers advance $du/dt = L(t)u + N(t,u) + f(t)$ (see :class:`AbstractModel`)
with the stiff linear part $L$ implicit. Each one follows the ``init``/``step``
pattern of diffrax solvers and optax transforms: ``init`` returns the stepper state
(the factorised structure of $L$, previous values for multistep methods) and
``step`` is a pure function of ``(model, t, dt, state, stepper_state)``; nothing
lives on ``self``.

| stepper | implicit part | explicit part | order |
|---|---|---|---|
| :class:`BackwardEuler` | $L$ | forward Euler | 1 |
| :class:`CrankNicolson` | $L$ (trapezoidal) | forward Euler | 2 if $N = 0$ |
| :class:`Theta` | $\theta$-weighted $L$ | forward Euler | 2 if $\theta=\frac12$, $N=0$ |
| :class:`IMEX` | CN on $L$ | Adams-Bashforth 2 (CNAB2) | 2 |
| :class:`BDF2` | BDF2 on $L$ | extrapolated (SBDF2) | 2 |
| :class:`FullyImplicit` | $\theta$-method on all of $L+N+f$, Newton-Krylov | - | 1 or 2 |

References:
    Ascher, Ruuth & Wetton (1995), "Implicit-explicit methods for time-dependent
    partial differential equations", SIAM J. Numer. Anal. 32(3) (CNAB2, SBDF2).
"""

from __future__ import annotations

import abc
import functools
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax.tree_utils as otu
import optimistix as optx

from ._checks import describe, static_bool, static_int, static_real
from ._model import AbstractModel
from ._results import RESULTS
from ._solver import (
    FFT,
    AbstractLinearSolver,
    Auto,
    FactoredSymbol,
    probe_diagonal,
    resolve_solver,
)
from ._solver._krylov import _PytreeKrylov
from ._tree import add, axpy, scale


def _check_theta(theta: float, allow_unstable: bool, owner: str) -> None:
    r"""The θ-method is A-stable exactly for θ >= 1/2.

    Below 1/2 the amplification factor $(1 + (1-\theta)z)/(1 - \theta z)$ of a mode
    with $z = \Delta t\,\lambda$ real and negative exceeds 1 in modulus once
    $|z| > 2/(1-2\theta)$, so a diffusive (stiff) problem blows up at any practical
    ``dt``; running it needs an explicit opt-in.
    """
    if not 0.0 <= theta <= 1.0:
        raise ValueError(
            f"`theta` must lie in [0, 1] (1: backward Euler, 1/2: Crank-Nicolson, "
            f"0: explicit Euler), got {theta!r}. Use theta in [0.5, 1] for an A-stable "
            "scheme."
        )
    if theta < 0.5 and not allow_unstable:
        raise ValueError(
            f"`theta` = {theta!r} < 1/2 is not A-stable: a mode with dt*|lambda| > "
            f"2/(1 - 2*theta) grows at every step, so a stiff (e.g. diffusive) problem "
            "blows up unless dt is tiny. Use theta in [0.5, 1] (1/2: Crank-Nicolson, "
            f"1: backward Euler), or pass `{owner}(..., allow_unstable=True)` to run "
            "a conditionally stable scheme on purpose."
        )


class AbstractStepper(eqx.Module):
    """Base class of time steppers.

    Subclasses implement ``init(model, t0, dt, state0) -> stepper_state``,
    ``step(model, t, dt, state, stepper_state) -> (state, stepper_state, result,
    iterations)`` and :meth:`residual` (the step's implicit relation); ``order`` gives
    the formal order in time. A stepper state from ``init`` belongs to that ``dt``:
    steppers may precompute solver work for it (see
    :meth:`dphys.AbstractLinearSolver.factor`), so ``step`` must be called with the
    same ``dt`` (as :func:`dphys.simulate` does). Steppers with a linear implicit
    part keep their resolved solver in the stepper state
    (:class:`LinearSolveState`), so a run resolves :class:`dphys.Auto` once.
    """

    @abc.abstractmethod
    def init(self, model: AbstractModel, t0, dt, state0): ...

    @abc.abstractmethod
    def step(self, model: AbstractModel, t, dt, state, stepper_state): ...

    @abc.abstractmethod
    def residual(self, model: AbstractModel, t, dt, state, new_state, stepper_state):
        r"""The implicit relation of one step, as a pure function.

        Returns a pytree like the state that is zero exactly when ``new_state`` is
        the answer of ``step(model, t, dt, state, stepper_state)`` (called with the
        same ``stepper_state``, i.e. the one *before* the step). For the steppers
        with a linear implicit part it is

        $$ r = (I - \gamma L(t+\Delta t))\,u^{n+1} - b, $$

        the residual of the linear system the step solves, in the state's units,
        with the $\gamma$ and right-hand side $b$ given in each stepper's
        docstring; :class:`FullyImplicit` returns the residual of its nonlinear
        equation. The step's own output makes it zero up to the solver tolerance
        (direct solvers: round-off; Krylov solvers: $\|r\|_2 \le
        \mathrm{atol} + \mathrm{rtol}\,\|b\|_2$). Differentiable with respect to
        every argument (model parameters, states, ``dt``): a physics-residual loss
        for learned states or steps.
        """

    @property
    @abc.abstractmethod
    def order(self) -> int: ...

    def check(self, model: AbstractModel, state0) -> None:
        """Static compatibility check; raise ``ValueError`` with a fix if it fails."""

    def resolve(self, model: AbstractModel, state0) -> AbstractStepper:
        """This stepper with its choices made for ``model`` (static).

        :func:`dphys.simulate` calls it once per run, before tracing: a
        :class:`dphys.Auto` solver is replaced by the concrete solver it stands
        for, after checking that it fits (``ValueError`` otherwise), so nothing
        downstream resolves it again. Default: :meth:`check`, then ``self``.
        """
        self.check(model, state0)
        return self

    def check_run(self, model: AbstractModel, state0, dt, t0=0.0) -> None:
        """Warn (``warnings.warn``) about a valid but likely unintended run, e.g. a
        scheme that is not monotone at this ``dt``. Called by :func:`dphys.simulate`
        before tracing; skipped for traced values. Default: nothing."""

    def split_state(self, stepper_state):
        """``(constant, varying)`` parts of a stepper state; see :meth:`join_state`.

        The constant part (e.g. a factored operator) is returned unchanged by every
        ``step``, so :func:`dphys.simulate` closes over it instead of carrying it
        through the time loop: reverse mode then neither stores it per step nor
        carries its cotangent through every step (for the FFT solver's per-mode 3x3
        inverse that traffic cost more than the step itself). Default: nothing
        constant.
        """
        return None, stepper_state

    def join_state(self, constant, varying):
        """Inverse of :meth:`split_state`."""
        return varying

    def can_propagate(self, model: AbstractModel, state0) -> bool:
        """True if :meth:`propagate` can apply many steps at once, exactly."""
        return False

    def propagator(self, model, t, dt, state, stepper_state, n: int):
        """What :meth:`propagate` needs for ``n`` steps, or None.

        :func:`dphys.simulate` computes it once, before the time loop, so reverse mode
        differentiates it once per run instead of once per saved segment.
        """
        return None

    def propagate(self, model, t, dt, state, stepper_state, n: int, propagator=None):
        raise NotImplementedError


class LinearSolveState(eqx.Module):
    r"""The part of a stepper state that belongs to the implicit linear solve.

    Built once per run by the stepper's ``init``: the solver is resolved there (a
    :class:`dphys.Auto` becomes the concrete solver it stands for) and every step
    reads it from here, never resolving it again.

    Attributes:
        solver: the concrete :class:`dphys.AbstractLinearSolver`.
        structure: what ``solver.init`` extracted from $L$ (possibly factored for
            the run's fixed $\gamma$, see :meth:`AbstractLinearSolver.factor`), or
            ``None`` when $L$ depends on time and is probed at every step.
    """

    solver: AbstractLinearSolver
    structure: Any


def _residual(model, t1, gamma, new_state, rhs):
    r"""$(I - \gamma L(t_1))u - b$."""
    return otu.tree_sub(axpy(-gamma, model.linear(t1, new_state), new_state), rhs)

def _traced(*trees) -> bool:
    return any(
        isinstance(leaf, jax.core.Tracer)
        for tree in trees
        for leaf in jtu.tree_leaves(eqx.filter(tree, eqx.is_array_like))
    )


# Warn when the grid-scale modes of a θ-step flip sign and keep more than 2/3 of
# their amplitude per step, (1-θ) dt max|L_ii| > 5 (Crank-Nicolson heat: diffusion
# number kappa dt / dx^2 > 5 in 1D). Between 1 and 5 the step is already not
# monotone, but such steps are routine (smooth data, oscillations damped by 3x per
# step or more); beyond 5 the oscillations of a steep profile persist for many steps.
OSCILLATION_LIMIT = 5.0


def warn_if_not_monotone(model, state0, dt, t0, theta: float, name: str) -> None:
    r"""Warn if a θ-step is far from monotone at this ``dt``.

    A θ-step is $u^{n+1} = (I - \theta\Delta t L)^{-1}(I + (1-\theta)\Delta t L)
    u^n$. For diffusion and upwind advection $L$ has non-negative off-diagonal
    entries, so $(I - \theta\Delta t L)^{-1}$ is non-negative and the step is
    monotone (no new extrema, positivity kept) exactly when $I + (1-\theta)\Delta t
    L$ has a non-negative diagonal: $\rho = (1-\theta)\Delta t\,\max_i|L_{ii}|
    \le 1$ (Crank-Nicolson: diffusion number $\kappa\Delta t/\Delta x^2 \le 1$ in
    1D, upwind Courant number $\le 2$). Beyond it the grid-scale modes flip sign
    every step with $|G| \approx (\rho - 1)/(\rho + 1)$ ($\theta = \tfrac12$): a
    steep profile oscillates and overshoots. This warns when $\rho >$
    :data:`OSCILLATION_LIMIT` (5: the oscillations keep more than 2/3 of their
    amplitude per step). :class:`BackwardEuler` is monotone at any ``dt``. The
    diagonal of $L$ at ``t0`` is probed (:func:`dphys.probe_diagonal`); traced
    values are skipped.
    """
    if theta >= 1.0 or _traced(model, state0, dt, t0):
        return
    diag = probe_diagonal(model, t0, state0)
    worst = max(
        (float(jnp.max(-d)) for d in jtu.tree_leaves(diag) if d.size), default=0.0
    )
    rho = (1.0 - theta) * float(dt) * worst
    if rho <= OSCILLATION_LIMIT:
        return
    gain = abs(1.0 - rho) / (1.0 + theta / (1.0 - theta) * rho)
    warnings.warn(
        f"{name} with dt={float(dt):.6g} is far from monotone: (1-theta) dt "
        f"max|L_ii| = {rho:.3g} (monotone up to 1; for diffusion it is (1-theta) "
        "times twice the diffusion number kappa dt/dx^2 summed over axes, for "
        "upwind advection (1-theta) times the Courant number). The grid-scale "
        f"modes flip sign every step and keep {gain:.2f} of their amplitude, so "
        "steep profiles oscillate and overshoot. BackwardEuler stays monotone at "
        f"any dt (BDF2 also damps the grid-scale modes); or keep {name} with "
        f"dt <= {1.0 / ((1.0 - theta) * worst):.3g} (monotone).",
        stacklevel=5,  # the caller of dphys.simulate
    )


class _AbstractLinearImplicit(AbstractStepper):
    solver: eqx.AbstractVar[AbstractLinearSolver]

    def __check_init__(self):
        if not isinstance(self.solver, AbstractLinearSolver):
            raise TypeError(
                "`solver` must be a dphys linear solver (dphys.Auto(), dphys.FFT(), "
                f"dphys.Tridiagonal() or dphys.Krylov()), got {describe(self.solver)}; "
                f"e.g. `{type(self).__name__}(solver=dphys.Krylov())`."
            )

    def check(self, model, state0):
        resolve_solver(self.solver, model, state0)

    def resolve(self, model, state0):
        solver = resolve_solver(self.solver, model, state0)
        return eqx.tree_at(lambda s: s.solver, self, solver)

    def _concrete_solver(self, model, like):
        # Static and cheap; only does work on a stepper not yet resolved.
        if isinstance(self.solver, Auto):
            return self.solver.resolve(model, like)
        return self.solver

    def _init_solve(self, model, t0, state0, gamma=None) -> LinearSolveState:
        # The one place a run resolves its solver (a no-op but the check when
        # `simulate` already did). With gamma (constant through the run) the solver
        # may factor now: the FFT solver's per-mode inverse is then built and
        # differentiated once per run (reverse mode otherwise rebuilds and
        # transposes it at every step).
        solver = resolve_solver(self.solver, model, state0)
        structure = None
        if model.autonomous:
            structure = solver.init(model, t0, state0)
            if gamma is not None:
                structure = solver.factor(structure, gamma)
        return LinearSolveState(solver, structure)

    @staticmethod
    def _structure(model, t, like, solve: LinearSolveState):
        if model.autonomous:
            return solve.structure
        return solve.solver.init(model, t, like)

    @staticmethod
    def _theta_rhs(model, t, dt, theta, state, explicit, *, factored=False):
        r"""Right-hand side of the θ-step (see :meth:`_theta_solve`)."""
        if factored:
            rhs = jtu.tree_map(lambda u: u / theta, state)
        elif theta != 1.0:
            rhs = axpy((1.0 - theta) * dt, model.linear(t, state), state)
        else:
            rhs = state
        rhs = add(explicit, rhs)
        rhs = axpy(theta * dt, model.forcing(t + dt), rhs)
        if theta != 1.0:
            rhs = axpy((1.0 - theta) * dt, model.forcing(t), rhs)
        return rhs

    def _theta_solve(self, model, t, dt, theta, state, explicit, solve):
        r"""Solve the θ-step for $u^{n+1}$; returns ``(state, result, iterations)``.

        $(I-\theta\Delta t L)u^{n+1} = u^n + (1-\theta)\Delta t\,L u^n + E
        + \Delta t[\theta f(t+\Delta t) + (1-\theta) f(t)]$, ``explicit`` being $E$
        (or ``None``).

        With a factored solve (constant $L$ and $A = I-\theta\Delta t L$, θ in
        (0, 1)), $u + (1-\theta)\Delta t\,Lu = u/\theta - \frac{1-\theta}{\theta}Au$,
        so $u^{n+1} = A^{-1}(u/\theta + \dots) - \frac{1-\theta}{\theta}u$: no
        stencil pass for $Lu$ in the step nor in its transpose. θ = 1 has no
        explicit half and θ = 0 (nothing to solve) would divide by θ.
        """
        t1 = t + dt
        structure = self._structure(model, t1, state, solve)
        factored = 0.0 < theta < 1.0 and isinstance(structure, FactoredSymbol)
        rhs = self._theta_rhs(model, t, dt, theta, state, explicit, factored=factored)
        new, result, iters = solve.solver.solve(model, t1, theta * dt, rhs, structure)
        if factored:
            new = axpy(-(1.0 - theta) / theta, state, new)
        return new, result, iters


class _AbstractTheta(_AbstractLinearImplicit):
    r"""θ-method on $L$, forward Euler on $N$:

    $$ (I - \theta\Delta t L^{n+1})u^{n+1} = u^n + (1-\theta)\Delta t L^n u^n
       + \Delta t\,N(t_n,u^n) + \Delta t\,[\theta f^{n+1} + (1-\theta) f^n]. $$
    """

    # Subclasses provide ``theta`` (a static field or a property).

    @property
    def order(self) -> int:
        return 2 if self.theta == 0.5 else 1

    def init(self, model, t0, dt, state0):
        return self._init_solve(model, t0, state0, self.theta * dt)

    def check_run(self, model, state0, dt, t0=0.0):
        warn_if_not_monotone(model, state0, dt, t0, self.theta, type(self).__name__)

    def split_state(self, stepper_state):
        return stepper_state, None

    def join_state(self, constant, varying):
        return constant

    def step(self, model, t, dt, state, stepper_state):
        if _propagates(stepper_state.solver, model):
            # Pure linear and FFT-diagonal: apply the one-step amplification G_k in
            # Fourier space. Same discrete answer to round-off, but the explicit half
            # (1 + (1-θ)Δt S_k) costs a multiply instead of a stencil pass, so a step
            # is one FFT pair (see docs/design.md).
            new = self.propagate(model, t, dt, state, stepper_state, 1)
            return new, stepper_state, RESULTS.successful, jnp.asarray(0)
        explicit = scale(dt, model.explicit(t, state))
        new, result, iters = self._theta_solve(
            model, t, dt, self.theta, state, explicit, stepper_state
        )
        return new, stepper_state, result, iters

    def residual(self, model, t, dt, state, new_state, stepper_state):
        r"""$(I-\theta\Delta t L^{n+1})u^{n+1} - [u^n + (1-\theta)\Delta t L^n u^n
        + \Delta t\,N(t_n,u^n) + \Delta t(\theta f^{n+1} + (1-\theta) f^n)]$
        (see :meth:`AbstractStepper.residual`)."""
        explicit = scale(dt, model.explicit(t, state))
        rhs = self._theta_rhs(model, t, dt, self.theta, state, explicit)
        return _residual(model, t + dt, self.theta * dt, new_state, rhs)

    def can_propagate(self, model, state0):
        # Static: the solver's kind and the model's structure hints, never an
        # evaluation of the model.
        return _propagates(self._concrete_solver(model, state0), model)

    def propagator(self, model, t, dt, state, stepper_state, n: int):
        solve = stepper_state
        return solve.solver.propagator(dt, self.theta, n, solve.structure)

    def propagate(self, model, t, dt, state, stepper_state, n: int, propagator=None):
        if propagator is None:
            propagator = self.propagator(model, t, dt, state, stepper_state, n)
        return stepper_state.solver.apply_propagator(model, propagator, state)


def _propagates(solver, model) -> bool:
    """Whether θ-steps of ``model`` are exact per-mode products (all static)."""
    return (
        isinstance(solver, FFT)
        and model.autonomous
        and not model.has_explicit
        and not model.has_forcing
    )


class Theta(_AbstractTheta):
    """θ-method with a user-chosen ``theta`` in [1/2, 1] (A-stable there).

    Attributes:
        theta: implicitness; 1 is backward Euler, 1/2 Crank-Nicolson. Values in
            [0, 1/2) (0 is explicit Euler on $L$) are only conditionally stable and
            need ``allow_unstable=True``.
        solver: linear solver for $(I-\\theta\\Delta t L)x=b$ (default :class:`Auto`).
        allow_unstable: accept ``theta < 1/2`` (for stability studies); default False.

    Raises:
        TypeError: ``theta`` is not a real number (or is traced: it is static),
            ``solver`` is not a dphys solver, ``allow_unstable`` is not a bool.
        ValueError: ``theta`` outside [0, 1], or below 1/2 without
            ``allow_unstable=True``.
    """

    theta: float = eqx.field(static=True)
    solver: AbstractLinearSolver
    allow_unstable: bool = eqx.field(static=True)

    def __init__(
        self,
        theta: float,
        solver: AbstractLinearSolver = Auto(),
        *,
        allow_unstable: bool = False,
    ):
        self.theta = static_real("theta", theta)
        self.solver = solver
        self.allow_unstable = static_bool(
            "allow_unstable", allow_unstable, why="it is a construction option"
        )

    def __check_init__(self):
        _check_theta(self.theta, self.allow_unstable, "dphys.Theta")


class BackwardEuler(_AbstractTheta):
    """Backward (implicit) Euler on $L$; first order, L-stable."""

    solver: AbstractLinearSolver = Auto()

    @property
    def theta(self) -> float:
        return 1.0


class CrankNicolson(_AbstractTheta):
    """Crank-Nicolson (trapezoidal) on $L$; second order, A-stable, not L-stable."""

    solver: AbstractLinearSolver = Auto()

    @property
    def theta(self) -> float:
        return 0.5


class IMEX(_AbstractLinearImplicit):
    r"""Crank-Nicolson / Adams-Bashforth 2 (CNAB2), second order:

    $$ (I-\tfrac{\Delta t}{2}L)u^{n+1} = (I+\tfrac{\Delta t}{2}L)u^n
       + \Delta t\,(\tfrac32 N^n - \tfrac12 N^{n-1}) + \tfrac{\Delta t}{2}(f^n+f^{n+1}). $$

    The first step uses $N^{-1} = N^0$ (local error $O(\Delta t^2)$, global order
    kept). The explicit part is stable only below its own CFL limit.
    """

    solver: AbstractLinearSolver = Auto()

    @property
    def order(self) -> int:
        return 2

    def init(self, model, t0, dt, state0):
        n0 = model.explicit(t0, state0)
        return (self._init_solve(model, t0, state0, 0.5 * dt), n0)

    def check_run(self, model, state0, dt, t0=0.0):
        warn_if_not_monotone(model, state0, dt, t0, 0.5, "IMEX (Crank-Nicolson on L)")

    def split_state(self, stepper_state):
        return stepper_state[0], stepper_state[1:]

    def join_state(self, constant, varying):
        return (constant, *varying)

    @staticmethod
    def _explicit(model, t, dt, state, n_prev):
        n_now = model.explicit(t, state)
        if n_now is None:
            return None, None
        explicit = jtu.tree_map(lambda a, b: dt * (1.5 * a - 0.5 * b), n_now, n_prev)
        return n_now, explicit

    def step(self, model, t, dt, state, stepper_state):
        solve, n_prev = stepper_state
        n_now, explicit = self._explicit(model, t, dt, state, n_prev)
        new, result, iters = self._theta_solve(
            model, t, dt, 0.5, state, explicit, solve
        )
        return new, (solve, n_now), result, iters

    def residual(self, model, t, dt, state, new_state, stepper_state):
        r"""$(I-\tfrac{\Delta t}{2}L^{n+1})u^{n+1} - [(I+\tfrac{\Delta t}{2}L^n)u^n
        + \Delta t(\tfrac32 N^n - \tfrac12 N^{n-1})
        + \tfrac{\Delta t}{2}(f^n+f^{n+1})]$, $N^{n-1}$ from ``stepper_state``
        (see :meth:`AbstractStepper.residual`)."""
        _, n_prev = stepper_state
        _, explicit = self._explicit(model, t, dt, state, n_prev)
        rhs = self._theta_rhs(model, t, dt, 0.5, state, explicit)
        return _residual(model, t + dt, 0.5 * dt, new_state, rhs)


class BDF2(_AbstractLinearImplicit):
    r"""Second-order backward differentiation (SBDF2 for the explicit part):

    $$ (I-\tfrac23\Delta t L)u^{n+1} = \tfrac13(4u^n - u^{n-1})
       + \tfrac23\Delta t\,(2N^n - N^{n-1}) + \tfrac23\Delta t f^{n+1}. $$

    The first step is one backward-Euler step (local error $O(\Delta t^2)$, so the
    global order stays 2). L-stable.
    """

    solver: AbstractLinearSolver = Auto()

    @property
    def order(self) -> int:
        return 2

    def init(self, model, t0, dt, state0):
        n0 = model.explicit(t0, state0)
        return (self._init_solve(model, t0, state0), state0, n0, jnp.asarray(True))

    def split_state(self, stepper_state):
        return stepper_state[0], stepper_state[1:]

    def join_state(self, constant, varying):
        return (constant, *varying)

    @staticmethod
    def _system(model, t, dt, state, stepper_state):
        r"""``(gamma, rhs, n_now)`` of the step's system $(I-\gamma L)u^{n+1} = b$."""
        _, prev, n_prev, first = stepper_state
        bdf = jtu.tree_map(lambda u, v: (4.0 * u - v) / 3.0, state, prev)
        rhs = otu.tree_where(first, state, bdf)
        gamma = jnp.where(first, dt, 2.0 * dt / 3.0)
        n_now = model.explicit(t, state)
        if n_now is not None:
            extrap = jtu.tree_map(lambda a, b: 2.0 * a - b, n_now, n_prev)
            n_eff = otu.tree_where(first, n_now, extrap)
            rhs = axpy(gamma, n_eff, rhs)
        rhs = axpy(gamma, model.forcing(t + dt), rhs)
        return gamma, rhs, n_now

    def step(self, model, t, dt, state, stepper_state):
        solve = stepper_state[0]
        t1 = t + dt
        gamma, rhs, n_now = self._system(model, t, dt, state, stepper_state)
        structure = self._structure(model, t1, state, solve)
        new, result, iters = solve.solver.solve(model, t1, gamma, rhs, structure)
        return new, (solve, state, n_now, jnp.asarray(False)), result, iters

    def residual(self, model, t, dt, state, new_state, stepper_state):
        r"""$(I-\gamma L^{n+1})u^{n+1} - b$ with $\gamma = \tfrac23\Delta t$ and
        $b = \tfrac13(4u^n - u^{n-1}) + \gamma(2N^n - N^{n-1} + f^{n+1})$; on the
        first step (``stepper_state`` from ``init``) the backward-Euler system,
        $\gamma = \Delta t$, $b = u^n + \gamma(N^n + f^{n+1})$ (see
        :meth:`AbstractStepper.residual`)."""
        gamma, rhs, _ = self._system(model, t, dt, state, stepper_state)
        return _residual(model, t + dt, gamma, new_state, rhs)


class FullyImplicit(AbstractStepper):
    r"""θ-method on the whole right-hand side, solved by Newton-Krylov.

    $$ u^{n+1} - \theta\Delta t F(t_{n+1}, u^{n+1}) = u^n
       + (1-\theta)\Delta t F(t_n, u^n), \qquad F = Lu + N(u) + f. $$

    Newton's linear systems are solved matrix-free with GMRES (Jacobian-vector
    products by forward-mode AD). The step is differentiated by the implicit function
    theorem (``optimistix.ImplicitAdjoint`` with the same matrix-free GMRES, never a
    dense Jacobian), so reverse mode costs one transposed linear solve per step.

    Attributes:
        theta: in [1/2, 1]: 1 (backward Euler), 1/2 (Crank-Nicolson) or anything in
            between; [0, 1/2) needs ``allow_unstable=True`` (as for :class:`Theta`).
        rtol, atol: Newton tolerances on the update (``>= 0``, not both zero,
            ``rtol < 1``).
        max_steps: Newton iteration cap, ``>= 1`` (failure gives
            ``nonlinear_solve_failed``).
        linear_rtol, linear_max_steps: GMRES tolerance in (0, 1) and iteration cap
            (``>= 1``) for Newton and adjoint solves.
        allow_unstable: accept ``theta < 1/2``; default False.

    Raises:
        TypeError: an option of the wrong type, or traced (all options are static).
        ValueError: an option out of range (see above).
    """

    theta: float = eqx.field(
        static=True, default=1.0, converter=functools.partial(static_real, "theta")
    )
    rtol: float = eqx.field(
        static=True, default=1e-10, converter=functools.partial(static_real, "rtol")
    )
    atol: float = eqx.field(
        static=True, default=1e-12, converter=functools.partial(static_real, "atol")
    )
    max_steps: int = eqx.field(
        static=True, default=30, converter=functools.partial(static_int, "max_steps")
    )
    linear_rtol: float = eqx.field(
        static=True,
        default=1e-11,
        converter=functools.partial(static_real, "linear_rtol"),
    )
    linear_max_steps: int = eqx.field(
        static=True,
        default=500,
        converter=functools.partial(static_int, "linear_max_steps"),
    )
    allow_unstable: bool = eqx.field(
        static=True,
        default=False,
        converter=functools.partial(
            static_bool, "allow_unstable", why="it is a construction option"
        ),
    )

    def __check_init__(self):
        _check_theta(self.theta, self.allow_unstable, "dphys.FullyImplicit")
        if self.rtol < 0 or self.atol < 0:
            raise ValueError(
                f"`rtol` and `atol` must be >= 0, got rtol={self.rtol!r}, "
                f"atol={self.atol!r}; e.g. the defaults rtol=1e-10, atol=1e-12."
            )
        if self.rtol == 0 and self.atol == 0:
            raise ValueError(
                "`rtol` and `atol` are both 0, so Newton could only stop on an exact "
                "zero update and would always report `nonlinear_solve_failed`; give "
                "at least one a positive value (defaults rtol=1e-10, atol=1e-12)."
            )
        if self.rtol >= 1:
            raise ValueError(
                f"`rtol` must be < 1 (a relative tolerance on the Newton update), got "
                f"{self.rtol!r}; e.g. rtol=1e-10."
            )
        if self.max_steps < 1:
            raise ValueError(
                f"`max_steps` must be >= 1 (the Newton iteration cap), got "
                f"{self.max_steps!r}; e.g. max_steps=30."
            )
        if not 0 < self.linear_rtol < 1:
            raise ValueError(
                f"`linear_rtol` must lie in (0, 1) (the GMRES relative tolerance), got "
                f"{self.linear_rtol!r}; e.g. linear_rtol=1e-11."
            )
        if self.linear_max_steps < 1:
            raise ValueError(
                f"`linear_max_steps` must be >= 1 (the GMRES iteration cap), got "
                f"{self.linear_max_steps!r}; e.g. linear_max_steps=500."
            )

    @property
    def order(self) -> int:
        return 2 if self.theta == 0.5 else 1

    def _linear_solver(self):
        # Our GMRES (see dphys.krylov_solve): stops on the 2-norm of the true
        # residual as soon as it is small, where lineax's tests once per restart
        # cycle; restart 10 as for dphys.Krylov.
        return _PytreeKrylov(
            method="gmres",
            rtol=self.linear_rtol,
            atol=0.0,
            max_steps=self.linear_max_steps,
            restart=10,
            initial_guess="rhs",
        )

    def init(self, model, t0, dt, state0):
        return None

    def _rhs(self, model, t, dt, state):
        if self.theta == 1.0:
            return state
        return axpy((1.0 - self.theta) * dt, model.vector_field(t, state), state)

    def residual(self, model, t, dt, state, new_state, stepper_state):
        r"""$u^{n+1} - \theta\Delta t F(t_{n+1}, u^{n+1}) - u^n
        - (1-\theta)\Delta t F(t_n, u^n)$, $F = Lu + N(u) + f$; Newton makes it
        small to about ``rtol`` times the step's size (see
        :meth:`AbstractStepper.residual`)."""
        rhs = self._rhs(model, t, dt, state)
        return self._newton_residual(model, t + dt, dt, new_state, rhs)

    def _newton_residual(self, model, t1, dt, v, rhs):
        theta = self.theta
        return jtu.tree_map(
            lambda vi, fi, ri: vi - theta * dt * fi - ri,
            v,
            model.vector_field(t1, v),
            rhs,
        )

    def step(self, model, t, dt, state, stepper_state):
        t1 = t + dt
        rhs = self._rhs(model, t, dt, state)

        def residual(v, args):
            m, r = args
            return self._newton_residual(m, t1, dt, v, r)

        newton = optx.Newton(
            rtol=self.rtol, atol=self.atol, linear_solver=self._linear_solver()
        )
        sol = optx.root_find(
            residual,
            newton,
            state,
            args=(model, rhs),
            max_steps=self.max_steps,
            adjoint=optx.ImplicitAdjoint(linear_solver=self._linear_solver()),
            throw=False,
        )
        result = RESULTS.where(
            sol.result == optx.RESULTS.successful,
            RESULTS.successful,
            RESULTS.nonlinear_solve_failed,
        )
        return sol.value, stepper_state, result, jnp.asarray(sol.stats["num_steps"])


def default_stepper() -> AbstractStepper:
    return CrankNicolson()


__all__ = [
    "AbstractStepper",
    "BackwardEuler",
    "CrankNicolson",
    "Theta",
    "IMEX",
    "BDF2",
    "FullyImplicit",
    "LinearSolveState",
]
