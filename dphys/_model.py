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


if TYPE_CHECKING:
    from ._linear_solve import AbstractLinearSolver


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

    def vector_field(self, t, state):
        """The full right-hand side $L u + N(u) + f$."""
        out = self.linear(t, state)
        n = self.explicit(t, state)
        if n is not None:
            out = jax.tree_util.tree_map(jnp.add, out, n)
        f = self.forcing(t)
        if f is not None:
            out = jax.tree_util.tree_map(jnp.add, out, f)
        return out
