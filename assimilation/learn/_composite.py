r"""Composite costs $F(x) = f(x) + g(x)$: a smooth part and a non-smooth prior.

$f$ is an :class:`assimilation.AbstractCost` (e.g. a 4D-Var cost, wrapped by
:class:`SmoothCost`), a least-squares misfit $\tfrac12\|(Ax - y)/\sigma\|^2$ through a
linear operator (:class:`LeastSquares`) or any differentiable function
(:class:`SmoothFunction`); $g$ is an :class:`assimilation.learn.AbstractPrior` with a
proximal operator. :class:`CompositeCost` is the cost the proximal methods
(``_proximal_methods.py``) and the iteration engine run on; its terms are $f$'s and
$g$'s. Also the pytree arithmetic both modules share.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
from jax import lax

from .._cost import BACKGROUND, OBSERVATION, AbstractCost, _total
from .._minimize import Solution as Solution
from .._stopping import RESULTS as RESULTS
from ._prox import AbstractPrior


SMOOTH = "smooth"
PRIOR = "prior"


# ------------------------------------------------------------------ tree arithmetic


def _dot(a, b):
    leaves = [
        jnp.vdot(x, y, precision=lax.Precision.HIGHEST)
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    ]
    return sum(leaves[1:], leaves[0])


def _norm(a):
    return jnp.sqrt(_dot(a, a))


def _lin(a, x, b=None, y=None):
    """``a*x + b*y`` on pytrees (``b*y`` omitted when ``y`` is None)."""
    if y is None:
        return jtu.tree_map(lambda u: a * u, x)
    return jtu.tree_map(lambda u, v: a * u + b * v, x, y)


def _sub(x, y):
    return jtu.tree_map(jnp.subtract, x, y)


def _add(x, y):
    return jtu.tree_map(jnp.add, x, y)


def _dtype(tree):
    return jnp.result_type(*jtu.tree_leaves(tree))


def _select(pred, a, b):
    return jtu.tree_map(lambda u, v: jnp.where(pred, u, v), a, b)


# ------------------------------------------------------------------ the smooth part


class AbstractSmooth(eqx.Module):
    """The smooth part $f$ of a composite cost.

    Subclasses implement :meth:`value` (and may override :meth:`value_and_grad`
    and :meth:`terms`, the named parts of $f$ that the engine's history reports).
    """

    @abc.abstractmethod
    def value(self, x) -> jax.Array:
        """$f(x)$, a scalar."""

    def value_and_grad(self, x):
        r"""$(f(x), \nabla f(x))$; by default by reverse-mode AD (for a 4D-Var
        cost, through the model's adjoint)."""
        return jax.value_and_grad(self.value)(x)

    def terms(self, x) -> dict:
        """The named parts of $f(x)$ (default ``{"smooth": f(x)}``)."""
        return {SMOOTH: self.value(x)}

    def terms_and_grad(self, x):
        r"""``(terms, grad)``: :meth:`terms` and $\nabla f$ in one evaluation."""
        value, grad = self.value_and_grad(x)
        return {SMOOTH: value}, grad


def _operator_structures(operator):
    return operator.in_structure(), operator.out_structure()


def _check_operator(operator, name="operator"):
    if not isinstance(operator, lx.AbstractLinearOperator):
        raise TypeError(
            f"`{name}` must be a lineax.AbstractLinearOperator (e.g. "
            "lx.MatrixLinearOperator(A) for a matrix, or "
            "assimilation.learn.physics_operator(fn, x) for a model), got "
            f"{type(operator).__name__}."
        )


class LeastSquares(AbstractSmooth):
    r"""$f(x) = \tfrac12\|(Ax - y)/\sigma\|_2^2$ through a linear operator $A$.

    $\nabla f(x) = A^\top (Ax - y)/\sigma^2$: one forward and one adjoint sweep.
    $A^\top$ is ``operator.transpose()`` (for a model: the transposed implicit
    solves of the core, see :func:`assimilation.learn.physics_operator`). Its one
    term is ``"observation"``.

    Attributes:
        operator: $A$, a ``lineax.AbstractLinearOperator``.
        target: $y$, shaped like the operator's output.
        sigma: noise standard deviation $\sigma > 0$ (scalar), in the units of $y$.
    """

    operator: lx.AbstractLinearOperator
    target: Any
    sigma: Any = 1.0

    def __check_init__(self):
        _check_operator(self.operator)
        want = jtu.tree_map(lambda s: s.shape, self.operator.out_structure())
        got = jtu.tree_map(jnp.shape, self.target)
        if want != got:
            raise ValueError(
                f"`target` must have the shape of the operator's output {want}, got "
                f"{got}."
            )

    def forward(self, x):
        """$Ax$ (one sweep)."""
        return self.operator.mv(x)

    def adjoint(self, r):
        r"""$A^\top r$ (one sweep)."""
        return self.operator.transpose().mv(r)

    def misfit(self, ax):
        r"""$\tfrac12\|(Ax - y)/\sigma\|^2$ from a known $Ax$."""
        r = _sub(ax, self.target)
        return 0.5 * _dot(r, r) / jnp.square(jnp.asarray(self.sigma, _dtype(r)))

    def grad_from(self, ax):
        r"""$\nabla f$ from a known $Ax$ (one adjoint sweep)."""
        s2 = jnp.square(jnp.asarray(self.sigma, _dtype(ax)))
        return _lin(1.0 / s2, self.adjoint(_sub(ax, self.target)))

    def value(self, x):
        return self.misfit(self.forward(x))

    def value_and_grad(self, x):
        ax = self.forward(x)
        return self.misfit(ax), self.grad_from(ax)

    def terms_from(self, ax) -> dict:
        """:meth:`terms` from a known $Ax$."""
        return {OBSERVATION: self.misfit(ax)}

    def terms(self, x):
        return self.terms_from(self.forward(x))

    def terms_and_grad(self, x):
        ax = self.forward(x)
        return self.terms_from(ax), self.grad_from(ax)


class SmoothFunction(AbstractSmooth):
    """Any differentiable scalar function ``fn(x)`` as the smooth part, differentiated
    by ``jax.value_and_grad``.

    Attributes:
        fn: the function.
    """

    fn: Callable

    def value(self, x):
        return self.fn(x)


class SmoothCost(AbstractSmooth):
    r"""An :class:`assimilation.AbstractCost` (e.g. a :class:`assimilation.FourDVar`)
    as the smooth part: $f = J$, with the cost's own named terms and its gradient
    by reverse-mode AD (the model's adjoint). :class:`CompositeCost` wraps a cost in
    it and forwards everything else (control, model runs, residual) to the cost.

    Attributes:
        cost: the cost.
    """

    cost: AbstractCost

    def terms(self, x):
        return self.cost.terms(x)

    def value(self, x):
        return _total(self.terms(x))

    def terms_and_grad(self, x):
        def f(x):
            terms = self.cost.terms(x)
            return _total(terms), terms

        (_, terms), grad = jax.value_and_grad(f, has_aux=True)(x)
        return terms, grad

    def value_and_grad(self, x):
        terms, grad = self.terms_and_grad(x)
        return _total(terms), grad


class CompositeCost(AbstractCost):
    r"""$F(x) = f(x) + g(x)$: a smooth part and a non-smooth prior, as a cost of the
    iteration engine.

    The terms are the smooth part's (a :class:`assimilation.FourDVar`'s
    ``"background"`` and ``"observation"``; ``"observation"`` for
    :class:`LeastSquares`; ``"smooth"`` for a plain function) plus the prior's
    value under ``name``: so :func:`assimilation.minimize` and
    :func:`assimilation.assimilate`, running a proximal method (:class:`FISTA`,
    ...), report $J$ and each of its parts. **4D-Var + L1/TV is
    ``CompositeCost(four_d_var, L1(lam))``**: the control, the model runs
    (``decode``, ``forecast``), the innovations and the least-squares ``residual``
    (Gauss-Newton curvature and the Laplace posterior of the smooth terms only,
    see :meth:`assimilation.AbstractCost.residual`) are the 4D-Var cost's.

    The prior enters only through its proximal operator: gradient methods
    (:class:`assimilation.GaussNewton`, :class:`assimilation.LBFGS`) do not apply
    to a non-smooth $g$.

    Attributes:
        smooth: $f$: an :class:`assimilation.AbstractCost` (wrapped in
            :class:`SmoothCost`), an :class:`AbstractSmooth` (e.g.
            :class:`LeastSquares`) or a plain callable (wrapped in
            :class:`SmoothFunction`).
        prior: $g$, an :class:`assimilation.learn.AbstractPrior`.
        name: the name of the prior's term (static, default ``"prior"``).

    Example:
        >>> import jax.numpy as jnp, lineax as lx
        >>> import assimilation as da, assimilation.learn as L
        >>> A = jnp.array([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]])
        >>> cost = L.CompositeCost(L.LeastSquares(lx.MatrixLinearOperator(A),
        ...                                       jnp.array([1.0, 0.0, 1.0])),
        ...                        L.L1(0.1))
        >>> sol = da.minimize(cost, L.FISTA(), stop=da.StoppingRule(500, gtol=1e-8))
        >>> bool(sol.result == da.RESULTS.successful), sorted(sol.history["terms"])
        (True, ['observation', 'prior'])
    """

    smooth: AbstractSmooth
    prior: AbstractPrior
    name: str = eqx.field(static=True)

    def __init__(self, smooth, prior: AbstractPrior, *, name: str = PRIOR):
        if isinstance(smooth, AbstractCost):
            smooth = SmoothCost(smooth)
        elif not isinstance(smooth, AbstractSmooth):
            if not callable(smooth):
                raise TypeError(
                    "`smooth` must be an assimilation.AbstractCost (e.g. FourDVar), "
                    "an AbstractSmooth (e.g. LeastSquares) or a callable f(x) -> "
                    f"scalar, got {type(smooth).__name__}."
                )
            smooth = SmoothFunction(smooth)
        if not isinstance(prior, AbstractPrior):
            raise TypeError(
                "`prior` must be an assimilation.learn prior (e.g. L1(0.1), TV(0.1)), "
                f"got {type(prior).__name__}."
            )
        if not isinstance(name, str) or name in (BACKGROUND, OBSERVATION, SMOOTH):
            raise ValueError(
                "`name` must be a string other than the smooth part's term names "
                f"('background', 'observation', 'smooth'), got {name!r}."
            )
        self.smooth = smooth
        self.prior = prior
        self.name = name

    # --------------------------------------------------------- the engine's cost

    @property
    def cost(self) -> AbstractCost | None:
        """The smooth :class:`assimilation.AbstractCost`, or ``None``."""
        return self.smooth.cost if isinstance(self.smooth, SmoothCost) else None

    @property
    def control(self):  # type: ignore[override]
        return None if self.cost is None else self.cost.control

    def init(self):
        """The smooth cost's starting control (its background), or zeros of the
        operator's input for :class:`LeastSquares`."""
        if self.cost is not None:
            return self.cost.init()
        if isinstance(self.smooth, LeastSquares):
            return jtu.tree_map(
                lambda s: jnp.zeros(s.shape, s.dtype),
                self.smooth.operator.in_structure(),
            )
        raise TypeError(
            f"The smooth part {type(self.smooth).__name__} defines no starting point: "
            "pass `v0=` to assimilation.minimize (or `x0` to solve)."
        )

    def check(self, control) -> None:
        if self.cost is not None:
            self.cost.check(control)
        elif isinstance(self.smooth, LeastSquares):
            super().check(control)

    def terms(self, x) -> dict:
        """The smooth part's terms and ``{name: g(x)}``."""
        return self.terms_from(self.smooth.terms(x), x)

    def terms_from(self, smooth_terms: dict, x) -> dict:
        """:meth:`terms` from the smooth part's known terms (no model run)."""
        return {**smooth_terms, self.name: self.prior.value(x)}

    def value(self, x):
        """$F(x)$."""
        return _total(self.terms(x))

    def __call__(self, x):
        return self.value(x)

    def _forwarded(self, what: str):
        if self.cost is None:
            raise TypeError(
                f"CompositeCost.{what} needs the smooth part to be an "
                f"assimilation.AbstractCost, got {type(self.smooth).__name__}."
            )
        return getattr(self.cost, what)

    def innovations(self, control):
        return self._forwarded("innovations")(control)

    def residual(self, control):
        """The smooth cost's whitened residual (the prior is not least-squares)."""
        return self._forwarded("residual")(control)

    def decode(self, control):
        return self._forwarded("decode")(control)

    def forecast(self, control):
        return self._forwarded("forecast")(control)

    @property
    def obs(self):
        """The smooth 4D-Var cost's observations (what the analysis reports)."""
        return self._forwarded("obs")
