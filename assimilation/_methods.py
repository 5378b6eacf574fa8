r"""Minimisation methods for 4D-Var costs: incremental Gauss-Newton and L-BFGS.

Both minimise a :class:`assimilation.FourDVar` cost over the whitened control $v$:

* :class:`GaussNewton` (incremental 4D-Var; Courtier, Thépaut & Hollingsworth 1994).
  With the whitened residual map $r(v) = [v;\ R^{-1/2}(H(M(x(v))) - y)]$, $J =
  \tfrac12\|r\|^2$, each *outer* iteration re-linearises $r$ at $v_k$ and the
  *inner* loop solves the quadratic problem
  $$ (I + J_o^\top J_o)\,\delta = -\nabla J(v_k), \qquad
     J_o = \partial r_o/\partial v, $$
  by conjugate gradients (``lineax.CG``) on matrix-free Hessian-vector products:
  $J_o p$ from the tangent-linear model (``jax.jvp`` through
  :func:`dphys.simulate`), $J_o^\top q$ from the adjoint (``jax.vjp``). The
  Gauss-Newton Hessian $I + J_o^\top J_o \succeq I$ is symmetric positive definite.
  If a full step increases $J$ it is halved (at most ``max_backtracks`` times).
* :class:`LBFGS`: ``optax.lbfgs`` with a zoom line search (strong Wolfe), on
  $J$ and $\nabla J$ from the adjoint.

Each is a state machine, ``init(cost, v) -> IterationState`` and
``step(cost, state) -> IterationState``, written against
:class:`assimilation.AbstractCost`: the terms come from ``cost.terms`` and the
Gauss-Newton system from :func:`assimilation.gauss_newton_operator`, never
re-derived here. They are driven by :func:`assimilation.minimize` (pure JAX) or
:func:`assimilation.assimilate` (from Python); when to stop is a separate
:class:`assimilation.StoppingRule`.

References:
    P. Courtier, J.-N. Thépaut and A. Hollingsworth (1994), "A strategy for
    operational implementation of 4D-Var, using an incremental approach", Q. J. R.
    Meteorol. Soc. 120, 1367-1387.
    J. Nocedal and S. J. Wright (2006), "Numerical Optimization", 2nd ed.,
    chapters 7 (L-BFGS) and 10 (Gauss-Newton).
"""

from __future__ import annotations

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import optax
import optax.tree_utils as otu

from ._cost import BACKGROUND, OBSERVATION, AbstractCost, _total, gauss_newton_operator
from ._stopping import StoppingRule


class IterationState(eqx.Module):
    """The state of one minimisation, carried from iteration to iteration.

    Attributes:
        v: the whitened control.
        cost: $J$ at ``v``.
        terms: the named terms of $J$ at ``v`` (``cost.terms(v)``).
        grad: $\\nabla J(v)$ (same structure as ``v``).
        grad_norm: $\\|\\nabla J(v)\\|_2$.
        inner_iterations: work in the last iteration: CG steps (Gauss-Newton) or
            line-search steps (L-BFGS).
        step_norm: $\\|v_{k} - v_{k-1}\\|$ of the last iteration.
        opt_state: the method's own state (L-BFGS memory), or ``None``.
    """

    v: Any
    cost: jax.Array
    terms: dict
    grad: Any
    grad_norm: jax.Array
    inner_iterations: jax.Array
    step_norm: jax.Array
    opt_state: Any

    @property
    def background_cost(self):
        """The ``"background"`` term (0 if the cost has none)."""
        return self.terms.get(BACKGROUND, jnp.zeros_like(self.cost))

    @property
    def obs_cost(self):
        """The ``"observation"`` term (0 if the cost has none)."""
        return self.terms.get(OBSERVATION, jnp.zeros_like(self.cost))


def evaluate(cost: AbstractCost, v):
    """``(J, terms, grad)`` at ``v``: one forward and one adjoint run."""

    def f(v):
        terms = cost.terms(v)
        return _total(terms), terms

    (j, terms), g = jax.value_and_grad(f, has_aux=True)(v)
    return j, terms, g


def _start(cost, v, opt_state=None):
    j, terms, g = evaluate(cost, v)
    zero = jnp.zeros((), jnp.int32)
    return IterationState(
        v, j, terms, g, otu.tree_norm(g), zero, jnp.zeros_like(j), opt_state
    )


class AbstractMethod(eqx.Module):
    """A minimisation method for :func:`assimilate` and :func:`minimize`.

    Subclasses implement ``init(cost, v) -> IterationState`` and
    ``step(cost, state) -> IterationState`` as pure JAX functions of an
    :class:`assimilation.AbstractCost`. A method may carry a default stopping rule
    (:meth:`stopping_rule`); the step itself never looks at it.
    """

    @abc.abstractmethod
    def init(self, cost: AbstractCost, v) -> IterationState: ...

    @abc.abstractmethod
    def step(self, cost: AbstractCost, state: IterationState) -> IterationState: ...

    def stopping_rule(self) -> StoppingRule:
        """The rule used when :func:`assimilate`/:func:`minimize` get none."""
        return StoppingRule()


def _stop_gradient(tree):
    arrays, rest = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(jax.lax.stop_gradient(arrays), rest)


class GaussNewton(AbstractMethod):
    r"""Incremental 4D-Var: Gauss-Newton outer loops, CG inner loops.

    Each step solves $A\,\delta = -\nabla J(v_k)$ with the Gauss-Newton operator
    $A$ of :func:`assimilation.gauss_newton_operator` by ``lineax.CG``, then halves
    the step while it does not decrease $J$. The step size is chosen without
    differentiating through the search (its inputs are ``stop_gradient``-ed), so
    the iteration can be differentiated (unrolled) through $v_k$ and $\delta$.

    Attributes:
        max_iterations, gtol, ftol: the default :class:`assimilation.StoppingRule`
            (maximum outer iterations, relative gradient and cost tolerances).
        inner_max_steps: maximum CG iterations per outer iteration (a truncated
            CG step is used as is, as usual in incremental 4D-Var).
        inner_rtol: CG relative residual tolerance.
        max_backtracks: step halvings allowed when a full step increases $J$.
    """

    max_iterations: int = eqx.field(static=True, default=20)
    gtol: float = eqx.field(static=True, default=1e-6)
    ftol: float = eqx.field(static=True, default=1e-12)
    inner_max_steps: int = eqx.field(static=True, default=200)
    inner_rtol: float = eqx.field(static=True, default=1e-10)
    max_backtracks: int = eqx.field(static=True, default=8)

    def __check_init__(self):
        self.stopping_rule()  # validates max_iterations, gtol, ftol
        if not (isinstance(self.inner_max_steps, int) and self.inner_max_steps >= 1):
            raise ValueError(
                f"`inner_max_steps` must be an integer >= 1, got "
                f"{self.inner_max_steps!r}."
            )

    def stopping_rule(self) -> StoppingRule:
        return StoppingRule(self.max_iterations, self.gtol, self.ftol)

    def init(self, cost, v):
        return _start(cost, v)

    def solve_increment(self, cost, v, grad=None):
        """One inner loop: the Gauss-Newton increment $\\delta$ at ``v``.

        Solves $A\\,\\delta = -\\nabla J(v)$ by CG. ``grad`` is $\\nabla J(v)$
        when already known. Returns ``(delta, cg_steps)``.
        """
        if grad is None:
            grad = evaluate(cost, v)[2]
        op = gauss_newton_operator(cost, v)
        solver = lx.CG(rtol=self.inner_rtol, atol=0.0, max_steps=self.inner_max_steps)
        sol = lx.linear_solve(op, otu.tree_scale(-1.0, grad), solver, throw=False)
        return sol.value, jnp.asarray(sol.stats["num_steps"], jnp.int32)

    def step(self, cost, state):
        v, j = state.v, state.cost
        delta, n_cg = self.solve_increment(cost, v, state.grad)

        # Backtracking: halve the step while it does not decrease J. The loop starts
        # at k = -1 so that the cost is traced once, in the body.
        c, v0, d0, j0 = _stop_gradient((cost, v, delta, j))

        def cond(carry):
            k, j_new = carry
            bad = ~(j_new <= j0) | ~jnp.isfinite(j_new)
            return (k < 0) | (bad & (k < self.max_backtracks))

        def body(carry):
            k, _ = carry
            return k + 1, _total(c.terms(otu.tree_add_scale(v0, 0.5 ** (k + 1), d0)))

        k, _ = jax.lax.while_loop(cond, body, (-1, jnp.asarray(jnp.inf, j.dtype)))
        v_new = otu.tree_add_scale(v, jnp.asarray(0.5, j.dtype) ** k, delta)
        new = _start(cost, v_new)
        step = otu.tree_norm(otu.tree_sub(v_new, v))
        return eqx.tree_at(
            lambda s: (s.inner_iterations, s.step_norm), new, (n_cg, step)
        )


class LBFGS(AbstractMethod):
    r"""Limited-memory BFGS with a zoom (strong Wolfe) line search (``optax.lbfgs``).

    Attributes:
        max_iterations, gtol, ftol: the default :class:`assimilation.StoppingRule`.
        memory: number of stored correction pairs.
        max_linesearch_steps: cap on cost evaluations per line search.
    """

    max_iterations: int = eqx.field(static=True, default=500)
    gtol: float = eqx.field(static=True, default=1e-6)
    ftol: float = eqx.field(static=True, default=1e-12)
    memory: int = eqx.field(static=True, default=10)
    max_linesearch_steps: int = eqx.field(static=True, default=20)

    def __check_init__(self):
        self.stopping_rule()

    def stopping_rule(self) -> StoppingRule:
        return StoppingRule(self.max_iterations, self.gtol, self.ftol)

    def _optimizer(self):
        return optax.lbfgs(
            memory_size=self.memory,
            linesearch=optax.scale_by_zoom_linesearch(
                max_linesearch_steps=self.max_linesearch_steps
            ),
        )

    def init(self, cost, v):
        return _start(cost, v, self._optimizer().init(v))

    def step(self, cost, state):
        opt = self._optimizer()
        value_fn = lambda w: _total(cost.terms(w))
        v = state.v
        updates, opt_state = opt.update(
            state.grad,
            state.opt_state,
            v,
            value=state.cost,
            grad=state.grad,
            value_fn=value_fn,
        )
        v_new = optax.apply_updates(v, updates)
        # The line search already evaluated J and its gradient at the new point;
        # the named terms are the cost's own (a forward run, no adjoint).
        j, g = optax.value_and_grad_from_state(value_fn)(v_new, state=opt_state)
        terms = cost.terms(v_new)
        n_ls = otu.tree_get(opt_state, "num_linesearch_steps")
        n_ls = jnp.asarray(0 if n_ls is None else n_ls, jnp.int32)
        return IterationState(
            v_new,
            j,
            terms,
            g,
            otu.tree_norm(g),
            n_ls,
            otu.tree_norm(updates),
            opt_state,
        )
