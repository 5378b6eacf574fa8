r"""Minimisation methods for 4D-Var costs: incremental Gauss-Newton and L-BFGS.

Both minimise a :class:`assimilation.FourDVar` cost over the whitened control $v$:

* :class:`GaussNewton` (incremental 4D-Var; Courtier, Thépaut & Hollingsworth 1994).
  With the whitened residual map $r(v) = [v;\ R^{-1/2}(H(M(x(v))) - y)]$, $J =
  \tfrac12\|r\|^2$, each *outer* iteration re-linearises $r$ at $v_k$ and the
  *inner* loop solves the quadratic problem
  $$ (I + J_o^\top J_o)\,\delta = -\nabla J(v_k), \qquad
     J_o = \partial r_o/\partial v, $$
  by conjugate gradients (the core's :func:`dphys.krylov_solve`, stopping on the
  2-norm of the true residual) on matrix-free Hessian-vector products:
  $J_o p$ from the tangent-linear model (``jax.jvp`` through
  :func:`dphys.simulate`), $J_o^\top q$ from the adjoint (``jax.vjp``). The
  Gauss-Newton Hessian $I + J_o^\top J_o \succeq I$ is symmetric positive definite.
  If a full step increases $J$ it is halved (at most ``max_backtracks`` times);
  if none decreases $J$ the iterate is kept and the run ends (``"no_decrease"``).
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
import optax
import optax.tree_utils as otu

import dphys

from ._cost import BACKGROUND, OBSERVATION, AbstractCost, _total, gauss_newton_operator
from ._stopping import INNER_CONVERGED, INNER_MAX_STEPS, INNER_NONFINITE, StoppingRule


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
        inner_residual: the last inner solve's relative true residual
            $\\|A\\delta + \\nabla J\\|_2 / \\|\\nabla J\\|_2$ (Gauss-Newton; 0
            otherwise).
        inner_result: how the last inner solve ended, an index into
            :data:`assimilation.INNER_RESULTS` (``"converged"``, ``"max_steps"``,
            ``"nonfinite"``).
        failed: the last step found no decrease of $J$ and was not taken
            (``v`` is the previous iterate): the run ends with ``"no_decrease"``.
    """

    v: Any
    cost: jax.Array
    terms: dict
    grad: Any
    grad_norm: jax.Array
    inner_iterations: jax.Array
    step_norm: jax.Array
    opt_state: Any
    inner_residual: Any = None
    inner_result: Any = None
    failed: Any = None

    def __post_init__(self):
        # Every iteration has the same signature (lax.scan/cond need it).
        dtype = jnp.result_type(self.cost)
        if self.inner_residual is None:
            self.inner_residual = jnp.zeros((), dtype)
        if self.inner_result is None:
            self.inner_result = jnp.zeros((), jnp.int32)
        if self.failed is None:
            self.failed = jnp.zeros((), bool)

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
    $A$ of :func:`assimilation.gauss_newton_operator` by the core's CG
    (:func:`dphys.krylov_solve`, from $\delta_0 = 0$), which stops when the true
    residual meets

    $$ \|A\delta + \nabla J(v_k)\|_2 \le \mathtt{inner\_rtol}\,\|\nabla J(v_k)\|_2 $$

    (a 2-norm test over the whole control: exact zeros in the gradient, where
    no sensor looks, are harmless, and the solve never runs past convergence). A
    solve that reaches ``inner_max_steps`` first gives a truncated CG step, still
    a descent direction (CG from 0 decreases the quadratic model at every step),
    and is recorded as ``"max_steps"`` in ``inner_result``; a non-finite
    increment is never used. The step is halved while it does not decrease $J$
    (up to ``max_backtracks`` times; an increase within $16\varepsilon|J|$, the
    rounding of $J$ itself, counts as no increase); if none decreases $J$ the
    iterate is kept, ``failed`` is set and the run ends with ``"no_decrease"``
    (if the last trial cost is non-finite, that iterate is returned and the
    driver rejects it as ``"nonfinite"``; if even the predicted decrease
    $-\nabla J\cdot\delta$ is below the rounding of $J$, the iterate is kept
    without failing: it is the optimum to working precision).
    The step size is chosen without differentiating through the search (its
    inputs are ``stop_gradient``-ed), so the iteration can be differentiated
    (unrolled) through $v_k$ and $\delta$ (the inner solve by the implicit
    function theorem).

    Attributes:
        max_iterations, gtol, ftol: the default :class:`assimilation.StoppingRule`
            (maximum outer iterations, relative gradient and cost tolerances).
        inner_max_steps: maximum CG iterations per outer iteration.
        inner_rtol: relative tolerance on the 2-norm of the inner true residual
            (raised to 10 machine epsilons, see :func:`dphys.krylov_solve`).
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
        rtol = self.inner_rtol
        if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not rtol > 0:
            raise ValueError(
                f"`inner_rtol` must be a number > 0 (e.g. 1e-10), got {rtol!r}."
            )
        m = self.max_backtracks
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"`max_backtracks` must be an integer >= 0, got {m!r}.")

    def stopping_rule(self) -> StoppingRule:
        return StoppingRule(self.max_iterations, self.gtol, self.ftol)

    def init(self, cost, v):
        return _start(cost, v)

    def solve_increment(self, cost, v, grad=None):
        """One inner loop: the Gauss-Newton increment $\\delta$ at ``v``.

        Solves $A\\delta = -\\nabla J(v)$ by CG on the true residual's 2-norm.
        ``grad`` is $\\nabla J(v)$ when already known.

        Returns:
            ``(delta, cg_steps, residual, code)``: the increment, the CG
            iterations, the relative true residual
            $\\|A\\delta + \\nabla J\\|_2/\\|\\nabla J\\|_2$ (recomputed with one more
            product with $A$; 0 when $\\nabla J = 0$) and an index into
            :data:`assimilation.INNER_RESULTS`.
        """
        if grad is None:
            grad = evaluate(cost, v)[2]
        op = gauss_newton_operator(cost, v)
        rhs = otu.tree_scale(-1.0, grad)
        delta, result, steps = dphys.krylov_solve(
            op.mv,
            rhs,
            method="cg",
            rtol=self.inner_rtol,
            atol=0.0,
            max_steps=self.inner_max_steps,
            initial_guess="zero",
        )
        b_norm = otu.tree_norm(rhs)
        r_norm = otu.tree_norm(otu.tree_sub(rhs, op.mv(delta)))
        residual = r_norm / jnp.where(b_norm > 0, b_norm, 1.0)
        finite = jnp.isfinite(otu.tree_norm(delta)) & jnp.isfinite(residual)
        code = jnp.where(
            ~finite,
            INNER_NONFINITE,
            jnp.where(
                result == dphys.RESULTS.successful, INNER_CONVERGED, INNER_MAX_STEPS
            ),
        ).astype(jnp.int32)
        return delta, jnp.asarray(steps, jnp.int32), residual, code

    def step(self, cost, state):
        v, j = state.v, state.cost
        delta, n_cg, residual, code = self.solve_increment(cost, v, state.grad)
        usable = code != INNER_NONFINITE
        # A non-finite increment is replaced by 0 (and then rejected below), so
        # that no NaN reaches the iterate or its derivative.
        delta = jax.tree_util.tree_map(
            lambda d: jnp.where(usable, d, jnp.zeros_like(d)), delta
        )

        # Backtracking: halve the step while it does not decrease J (beyond the
        # rounding of J). The loop starts at k = -1 so that the cost is traced
        # once, in the body.
        c, v0, d0, j0 = _stop_gradient((cost, v, delta, j))
        slack = 16 * jnp.finfo(j0.dtype).eps * jnp.abs(j0)

        def ok(j_new):
            return jnp.isfinite(j_new) & (j_new <= j0 + slack)

        def cond(carry):
            k, j_new = carry
            return (k < 0) | (~ok(j_new) & (k < self.max_backtracks))

        def body(carry):
            k, _ = carry
            return k + 1, _total(c.terms(otu.tree_add_scale(v0, 0.5 ** (k + 1), d0)))

        k, j_new = jax.lax.while_loop(cond, body, (-1, jnp.asarray(jnp.inf, j.dtype)))
        accepted = usable & ok(j_new)
        # A trial cost that stayed non-finite is passed on as such (the driver
        # rejects the iterate and reports "nonfinite"); a finite increase is
        # never taken: the iterate is kept and the step is marked failed.
        nonfinite = usable & ~jnp.isfinite(j_new)
        # At the optimum to rounding the predicted decrease -g.delta is itself
        # below the rounding of J: staying put is convergence, not a failure
        # (the stopping rule sees a zero decrease).
        meaningful = -otu.tree_vdot(_stop_gradient(state.grad), d0) > slack
        scale = jnp.where(accepted | nonfinite, jnp.asarray(0.5, j.dtype) ** k, 0.0)
        v_new = otu.tree_add_scale(v, scale, delta)
        new = _start(cost, v_new)
        step = otu.tree_norm(otu.tree_sub(v_new, v))
        return eqx.tree_at(
            lambda s: (
                s.inner_iterations,
                s.step_norm,
                s.inner_residual,
                s.inner_result,
                s.failed,
            ),
            new,
            (
                n_cg,
                step,
                residual.astype(j.dtype),
                code,
                ~accepted & ~nonfinite & (meaningful | ~usable),
            ),
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
