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
    def solve(self, model: AbstractModel, t, gamma, rhs, structure):
        """Return ``(x, result, iterations)``."""

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
