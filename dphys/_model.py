r"""The model abstraction: a semi-discrete PDE split into implicit and explicit parts.

A model describes the method-of-lines system

$$ \frac{du}{dt} = L(t)\,u + N(t, u) + f(t), $$

where $L(t)$ is linear in the state (the stiff part, treated implicitly), $N$ is the
rest (treated explicitly by IMEX steppers, or implicitly with Newton-Krylov by
:class:`dphys.FullyImplicit`), and $f$ is a state-independent forcing. The state is a
pytree of arrays; physical parameters are array leaves of the model, so
``jax.grad`` differentiates with respect to them.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING

import equinox as eqx
import jax
import jax.numpy as jnp

from ._grid import Grid
from ._tree import add


if TYPE_CHECKING:
    from ._solver import AbstractLinearSolver


class AbstractModel(eqx.Module):
    """Base class of every PDE model.

    Subclasses implement :meth:`linear` and may override :meth:`explicit`,
    :meth:`forcing` and the structure hints below, which let the structured solvers
    (FFT, tridiagonal, preconditioned Krylov) pick the fastest correct method.

    Structure hints (plain properties, static):

    * ``translation_invariant``: $L$ commutes with grid shifts on a fully periodic grid
      (constant coefficients), so it is diagonalised by the FFT.
    * ``symmetric``: $L$ is symmetric negative semi-definite, so $I-\\gamma L$ is SPD
      and CG applies.
    * ``autonomous``: $L$ does not depend on $t$ (its factorisation is reused).
    * ``has_explicit``, ``has_forcing``: whether :meth:`explicit`, :meth:`forcing`
      can return a term (default: whether the class overrides them). Steppers
      choose their structure from these, never by evaluating the model.
    """

    grid: eqx.AbstractVar[Grid]

    @abc.abstractmethod
    def linear(self, t, state):
        """Apply the implicit linear operator: return $L(t)\\,u$ (same pytree as u)."""

    def explicit(self, t, state):
        """Explicit tendency $N(t, u)$, or ``None`` when the model has none."""
        return None

    def forcing(self, t):
        """State-independent forcing $f(t)$, or ``None``."""
        return None

    @property
    def has_explicit(self) -> bool:
        """Static hint: :meth:`explicit` may return a tendency (``False``: it always
        returns ``None``).

        Default: whether the model's class overrides :meth:`explicit`, decided
        without evaluating the model. Override it when the explicit part depends on
        a static option (``pdes.ShallowWater``'s linear model without quadratic
        drag has none). Steppers use it to choose their structure (e.g. the exact
        per-mode propagation of a purely linear run), so it must be ``True``
        whenever :meth:`explicit` can return something; :func:`dphys.simulate`
        checks that before a run.
        """
        return type(self).explicit is not AbstractModel.explicit

    @property
    def has_forcing(self) -> bool:
        """Static hint: :meth:`forcing` may return a forcing (``False``: always
        ``None``). Default: whether the class overrides :meth:`forcing`; override
        it when the forcing depends on a static option or an optional field (see
        :attr:`has_explicit`)."""
        return type(self).forcing is not AbstractModel.forcing

    @property
    def translation_invariant(self) -> bool:
        return False

    @property
    def symmetric(self) -> bool:
        return False

    @property
    def autonomous(self) -> bool:
        return True

    def preferred_solver(self, like) -> AbstractLinearSolver | None:
        """The implicit solver :class:`dphys.Auto` should use, or ``None`` (default).

        A hook for models that know a better solver than the generic rules, e.g. a
        Krylov method preconditioned by an exact inverse of a simplified operator.
        :class:`dphys.Auto` consults it after the FFT check (a periodic,
        translation-invariant operator is always solved exactly by FFT) and before
        its generic choices (tridiagonal in 1D, otherwise :class:`dphys.Krylov`).
        The solver returned must be concrete (not :class:`dphys.Auto`); its
        ``check`` still runs.

        Args:
            like: a state (pytree of arrays) with the shapes and dtypes to solve for.
        """
        return None

    def check_state(self, state) -> None:
        """Raise ``ValueError`` if ``state`` does not fit this model (static check)."""
        leaves = jax.tree_util.tree_leaves(state)
        if not leaves:
            raise ValueError("`state0` has no array leaves.")
        for leaf in leaves:
            if jnp.shape(leaf) != self.grid.shape:
                raise ValueError(
                    f"`state0` has a leaf of shape {jnp.shape(leaf)} but the model's "
                    f"grid has shape {self.grid.shape}; build the initial state on the "
                    "model's grid (e.g. from `model.grid.coords`)."
                )

    def check_run(self, state, dt) -> None:
        """Static checks before a run (e.g. explicit-part stability). Default: none."""

    def validate(self, state):
        """Run-time invariant check inside the loop (e.g. positive depth).

        Returns ``(state, ok)`` where ``ok`` is a boolean scalar; default checks only
        finiteness, which :func:`dphys.simulate` does itself.
        """
        return state, jnp.asarray(True)

    @property
    def invalid_state_message(self) -> str | None:
        """What :func:`dphys.simulate` reports when :meth:`validate` fails.

        ``None`` (default) uses the generic ``RESULTS.invalid_state`` message; models
        with a run-time invariant say which one was violated.
        """
        return None

    @property
    def unwrapped(self) -> AbstractModel:
        """The model that defines the implicit operator $L$: ``self``, or for a
        wrapper such as :class:`Augmented` the innermost wrapped model.

        Model-specific solvers (e.g. ``pdes.HelmholtzKrylov``) read the coefficients
        of $L$ from it, so they keep working when terms are added around the model.
        """
        return self

    def vector_field(self, t, state):
        """The full right-hand side $L u + N(u) + f$."""
        out = add(self.linear(t, state), self.explicit(t, state))
        return add(out, self.forcing(t))


class Augmented(AbstractModel):
    r"""Any model plus an extra explicit tendency and/or an extra forcing.

    $$ \frac{du}{dt} = L(t)u + \big[N(t,u) + E(t,u)\big] + \big[f(t) + g(t)\big], $$

    where $L, N, f$ are ``model``'s and $E$ (``explicit``) and $g$ (``forcing``) are
    the added terms. The implicit part $L$ is untouched, so every structured solver
    of ``model`` (FFT, tridiagonal, the model's preferred solver) still applies and
    IMEX/BDF2 steppers treat $E$ explicitly. This is how a weak-constraint
    model-error forcing, a learned correction (an ``eqx.Module`` with weights is a
    valid ``explicit``: its array leaves are differentiable leaves of this model)
    or a known source is added to a model without writing a new class.

    Every :class:`AbstractModel` hook is forwarded to ``model`` (a test checks that
    none is missed), and any other attribute (``mass``, ``energy``, ``rest_state``,
    physical parameters) is looked up on ``model``, so diagnostics and solvers that
    need the wrapped model's internals keep working.

    Attributes:
        model: the wrapped model.
        explicit_term: ``E(t, state) -> tendency`` (same pytree as the state, in
            state units per time unit), or ``None``.
        forcing_term: ``g``: a constant pytree with the state's structure, a
            callable ``g(t) -> pytree``, or ``None``.

    Example:
        >>> import dphys, pdes, jax.numpy as jnp
        >>> grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
        >>> damped = dphys.Augmented(pdes.Heat(grid, kappa=1e-2),
        ...                          explicit=lambda t, u: -0.5 * u**3)
        >>> damped.has_explicit
        True
    """

    model: AbstractModel
    explicit_term: object
    forcing_term: object

    def __init__(self, model: AbstractModel, *, explicit=None, forcing=None):
        if not isinstance(model, AbstractModel):
            raise TypeError(
                f"`model` must be a dphys.AbstractModel (e.g. pdes.Heat), got "
                f"{type(model).__name__}."
            )
        if explicit is not None and not callable(explicit):
            raise TypeError(
                "`explicit` must be a function `explicit(t, state) -> tendency` (an "
                f"equinox Module with `__call__` is fine) or None, got "
                f"{type(explicit).__name__}."
            )
        if explicit is None and forcing is None:
            raise ValueError(
                "`Augmented` needs at least one of `explicit=` or `forcing=`; without "
                "them use the model itself."
            )
        self.model = model
        self.explicit_term = explicit
        self.forcing_term = forcing

    @property
    def grid(self) -> Grid:
        return self.model.grid

    # -- the added terms
    def linear(self, t, state):
        return self.model.linear(t, state)

    def explicit(self, t, state):
        extra = None if self.explicit_term is None else self.explicit_term(t, state)
        return add(self.model.explicit(t, state), extra)

    def forcing(self, t):
        g = self.forcing_term
        if g is not None and callable(g):
            g = g(t)
        return add(self.model.forcing(t), g)

    # -- every other hook is the wrapped model's (the two term hints combined)
    @property
    def has_explicit(self) -> bool:
        return self.explicit_term is not None or self.model.has_explicit

    @property
    def has_forcing(self) -> bool:
        return self.forcing_term is not None or self.model.has_forcing

    @property
    def translation_invariant(self) -> bool:
        return self.model.translation_invariant

    @property
    def symmetric(self) -> bool:
        return self.model.symmetric

    @property
    def autonomous(self) -> bool:
        # Only L's time dependence matters here (solver factorisation reuse); a
        # time-dependent forcing is handled by every stepper at every step.
        return self.model.autonomous

    def preferred_solver(self, like):
        return self.model.preferred_solver(like)

    @property
    def unwrapped(self) -> AbstractModel:
        return self.model.unwrapped

    def check_state(self, state) -> None:
        return self.model.check_state(state)

    def check_run(self, state, dt) -> None:
        return self.model.check_run(state, dt)

    def validate(self, state):
        return self.model.validate(state)

    @property
    def invalid_state_message(self) -> str | None:
        return self.model.invalid_state_message

    def vector_field(self, t, state):
        out = self.model.vector_field(t, state)
        if self.explicit_term is not None:
            out = add(out, self.explicit_term(t, state))
        g = self.forcing_term
        if g is not None:
            out = add(out, g(t) if callable(g) else g)
        return out

    def __getattr__(self, name):
        # Only reached when normal lookup fails: model-specific attributes
        # (diagnostics such as `mass`, parameters such as `kappa`) of the wrapped
        # model. Dunder names and the field itself are never forwarded, so copying
        # and unpickling (which probe attributes before `model` is set) still work.
        if name.startswith("__") or name == "model":
            raise AttributeError(name)
        try:
            model = object.__getattribute__(self, "model")
        except AttributeError:
            raise AttributeError(name) from None
        return getattr(model, name)
