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

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx

from ._checks import describe, static_bool, static_int, static_real
from ._model import AbstractModel
from ._results import RESULTS
from ._solver import FFT, AbstractLinearSolver, Auto, FactoredSymbol, resolve_solver
from ._solver._krylov import _PytreeKrylov


def _axpy(a, x, y):
    """``a*x + y`` over pytrees (``x`` may be None, meaning zero)."""
    if x is None:
        return y
    return jtu.tree_map(lambda xi, yi: a * xi + yi, x, y)


def _add(x, y):
    if x is None:
        return y
    if y is None:
        return x
    return jtu.tree_map(jnp.add, x, y)


def _scale(a, x):
    return None if x is None else jtu.tree_map(lambda v: a * v, x)


def _select(pred, a, b):
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


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

    Subclasses implement ``init(model, t0, dt, state0) -> stepper_state`` and
    ``step(model, t, dt, state, stepper_state) -> (state, stepper_state, result,
    iterations)``; ``order`` gives the formal order in time. A stepper state from
    ``init`` belongs to that ``dt``: steppers may precompute solver work for it (see
    :meth:`dphys.AbstractLinearSolver.factor`), so ``step`` must be called with the
    same ``dt`` (as :func:`dphys.simulate` does).
    """

    @abc.abstractmethod
    def init(self, model: AbstractModel, t0, dt, state0): ...

    @abc.abstractmethod
    def step(self, model: AbstractModel, t, dt, state, stepper_state): ...

    @property
    @abc.abstractmethod
    def order(self) -> int: ...

    def check(self, model: AbstractModel, state0) -> None:
        """Static compatibility check; raise ``ValueError`` with a fix if it fails."""

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


class _AbstractLinearImplicit(AbstractStepper):
    solver: eqx.AbstractVar[AbstractLinearSolver]

    def __check_init__(self):
        if not isinstance(self.solver, AbstractLinearSolver):
            raise TypeError(
                "`solver` must be a dphys linear solver (dphys.Auto(), dphys.FFT(), "
                f"dphys.Tridiagonal() or dphys.Krylov()), got {describe(self.solver)}; "
                f"e.g. `{type(self).__name__}(solver=dphys.Krylov())`."
            )

    def _solver(self, model, like):
        return resolve_solver(self.solver, model, like)

    def check(self, model, state0):
        self._solver(model, state0)

    def _structure(self, model, t, like, stored):
        if model.autonomous:
            return stored
        return self._solver(model, like).init(model, t, like)

    def _init_structure(self, model, t0, state0, gamma=None):
        # With gamma (constant through the run) the solver may factor now: the FFT
        # solver's per-mode inverse is then built and differentiated once per run
        # (reverse mode otherwise rebuilds and transposes it at every step).
        if model.autonomous:
            solver = self._solver(model, state0)
            structure = solver.init(model, t0, state0)
            if gamma is not None:
                structure = solver.factor(structure, gamma)
            return structure
        return None

    def _theta_solve(self, model, t, dt, theta, state, explicit, structure):
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
        factored = 0.0 < theta < 1.0 and isinstance(structure, FactoredSymbol)
        if factored:
            rhs = jtu.tree_map(lambda u: u / theta, state)
        elif theta != 1.0:
            rhs = _axpy((1.0 - theta) * dt, model.linear(t, state), state)
        else:
            rhs = state
        rhs = _add(explicit, rhs)
        rhs = _axpy(theta * dt, model.forcing(t1), rhs)
        if theta != 1.0:
            rhs = _axpy((1.0 - theta) * dt, model.forcing(t), rhs)
        new, result, iters = self._solver(model, state).solve(
            model, t1, theta * dt, rhs, structure
        )
        if factored:
            new = _axpy(-(1.0 - theta) / theta, state, new)
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
        return self._init_structure(model, t0, state0, self.theta * dt)

    def split_state(self, stepper_state):
        return stepper_state, None

    def join_state(self, constant, varying):
        return constant

    def step(self, model, t, dt, state, stepper_state):
        if self.can_propagate(model, state):
            # Pure linear and FFT-diagonal: apply the one-step amplification G_k in
            # Fourier space. Same discrete answer to round-off, but the explicit half
            # (1 + (1-θ)Δt S_k) costs a multiply instead of a stencil pass, so a step
            # is one FFT pair (see docs/design.md).
            new = self.propagate(model, t, dt, state, stepper_state, 1)
            return new, stepper_state, RESULTS.successful, jnp.asarray(0)
        structure = self._structure(model, t + dt, state, stepper_state)
        n_now = model.explicit(t, state)
        explicit = None if n_now is None else jtu.tree_map(lambda a: dt * a, n_now)
        new, result, iters = self._theta_solve(
            model, t, dt, self.theta, state, explicit, structure
        )
        return new, stepper_state, result, iters

    def can_propagate(self, model, state0):
        return (
            isinstance(self._solver(model, state0), FFT)
            and model.autonomous
            and model.explicit(0.0, state0) is None
            and model.forcing(0.0) is None
        )

    def propagator(self, model, t, dt, state, stepper_state, n: int):
        solver = self._solver(model, state)
        return solver.propagator(dt, self.theta, n, stepper_state)

    def propagate(self, model, t, dt, state, stepper_state, n: int, propagator=None):
        if propagator is None:
            propagator = self.propagator(model, t, dt, state, stepper_state, n)
        return self._solver(model, state).apply_propagator(model, propagator, state)


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
        return (self._init_structure(model, t0, state0, 0.5 * dt), n0)

    def split_state(self, stepper_state):
        return stepper_state[0], stepper_state[1:]

    def join_state(self, constant, varying):
        return (constant, *varying)

    def step(self, model, t, dt, state, stepper_state):
        stored, n_prev = stepper_state
        structure = self._structure(model, t + dt, state, stored)
        n_now = model.explicit(t, state)
        explicit = None
        if n_now is not None:
            explicit = jtu.tree_map(
                lambda a, b: dt * (1.5 * a - 0.5 * b), n_now, n_prev
            )
        new, result, iters = self._theta_solve(
            model, t, dt, 0.5, state, explicit, structure
        )
        return new, (stored, n_now), result, iters


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
        return (self._init_structure(model, t0, state0), state0, n0, jnp.asarray(True))

    def split_state(self, stepper_state):
        return stepper_state[0], stepper_state[1:]

    def join_state(self, constant, varying):
        return (constant, *varying)

    def step(self, model, t, dt, state, stepper_state):
        stored, prev, n_prev, first = stepper_state
        t1 = t + dt
        bdf = jtu.tree_map(lambda u, v: (4.0 * u - v) / 3.0, state, prev)
        rhs = _select(first, state, bdf)
        n_now = model.explicit(t, state)
        if n_now is not None:
            extrap = jtu.tree_map(lambda a, b: 2.0 * a - b, n_now, n_prev)
            n_eff = _select(first, n_now, extrap)
            rhs = _axpy(jnp.where(first, dt, 2.0 * dt / 3.0), n_eff, rhs)
        f1 = model.forcing(t1)
        rhs = _axpy(jnp.where(first, dt, 2.0 * dt / 3.0), f1, rhs)
        gamma = jnp.where(first, dt, 2.0 * dt / 3.0)
        structure = self._structure(model, t1, state, stored)
        new, result, iters = self._solver(model, state).solve(
            model, t1, gamma, rhs, structure
        )
        return new, (stored, state, n_now, jnp.asarray(False)), result, iters


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

    def step(self, model, t, dt, state, stepper_state):
        theta = self.theta
        t1 = t + dt
        rhs = state
        if theta != 1.0:
            rhs = _axpy((1.0 - theta) * dt, model.vector_field(t, state), rhs)

        def residual(v, args):
            m, r = args
            return jtu.tree_map(
                lambda vi, fi, ri: vi - theta * dt * fi - ri,
                v,
                m.vector_field(t1, v),
                r,
            )

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
]
