"""The solver interface: :class:`AbstractLinearSolver` and :class:`FactoredSymbol`."""

from __future__ import annotations

import abc

import equinox as eqx
import jax

from .._model import AbstractModel


class AbstractLinearSolver(eqx.Module):
    """Solves $(I-\\gamma L(t))\\,x = b$ for a model's implicit operator $L$."""

    @abc.abstractmethod
    def init(self, model: AbstractModel, t, like):
        """Structure of $L(t)$ needed by :meth:`solve` (computed once if autonomous)."""

    @abc.abstractmethod
    def solve(self, model: AbstractModel, t, gamma, rhs, structure, guess=None):
        """Return ``(x, result, iterations)``.

        ``guess`` is ``None`` or a starting point for iterative solvers (a state
        pytree, e.g. extrapolated from previous steps by the stepper); it never
        changes the answer beyond the solver's tolerance and carries no derivative.
        Direct solvers ignore it.
        """

    def is_factored(self, structure) -> bool:
        r"""Whether ``structure`` came from :meth:`factor`: a constant $L$ with
        everything for one $\gamma$ ready. θ-steps then solve
        $A^{-1}(u/\theta + \dots) - \frac{1-\theta}{\theta}u$ and skip the stencil
        pass of the explicit half (see ``dphys.Theta``). Default False."""
        return False

    @property
    def uses_guess(self) -> bool:
        """Whether :meth:`solve` starts from a ``guess`` (iterative solvers), so a
        stepper should carry previous states to extrapolate one. Default False."""
        return False

    def check(self, model: AbstractModel, like) -> None:
        """Raise ``ValueError`` if this solver cannot handle ``model``."""

    def factor(self, structure, gamma):
        r"""``structure`` made ready for repeated solves with this ``gamma``.

        Steppers whose $\gamma$ is fixed for a run (θ-method, IMEX) call this once
        in ``init``, so work that depends only on $L$ and $\gamma$ (e.g. the FFT
        solver's per-mode inverse) is done, and differentiated, once per run instead
        of once per step. The result may only be used with the same ``gamma``.
        Default: ``structure`` unchanged.
        """
        return structure


class FactoredSymbol(eqx.Module):
    r"""A Fourier symbol with its per-mode inverse for one $\gamma$ (see
    :meth:`FFT.factor`): ``symbol`` $S_k$ and ``inverse`` $(I-\gamma S_k)^{-1}$, both
    ``(n, n, *modes)``. Only valid for solves with that $\gamma$."""

    symbol: jax.Array
    inverse: jax.Array
