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
``step(cost, state) -> IterationState``, driven by :func:`assimilation.minimize`
(pure JAX) or :func:`assimilation.assimilate` (from Python, with stopping rules).

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
import jax.tree_util as jtu
import lineax as lx
import optax

from ._cost import FourDVar


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(tree)))


def _add(a, b, scale=1.0):
    return jtu.tree_map(lambda x, y: x + scale * y, a, b)


class IterationState(eqx.Module):
    """The state of one minimisation, carried from iteration to iteration.

    Attributes:
        v: the whitened control.
        cost, background_cost, obs_cost: $J$, $J_b$, $J_o$ at ``v``.
        grad: $\\nabla J(v)$ (same structure as ``v``).
        grad_norm: $\\|\\nabla J(v)\\|_2$.
        inner_iterations: work in the last iteration: CG steps (Gauss-Newton) or
            line-search steps (L-BFGS).
        step_norm: $\\|v_{k} - v_{k-1}\\|$ of the last iteration.
        opt_state: the method's own state (L-BFGS memory), or ``None``.
    """

    v: Any
    cost: jax.Array
    background_cost: jax.Array
    obs_cost: jax.Array
    grad: Any
    grad_norm: jax.Array
    inner_iterations: jax.Array
    step_norm: jax.Array
    opt_state: Any


def _evaluate(cost: FourDVar, v):
    def f(v):
        j, jb, jo = cost.costs(v)
        return j, (jb, jo)

    (j, (jb, jo)), g = jax.value_and_grad(f, has_aux=True)(v)
    return j, jb, jo, g


class AbstractMethod(eqx.Module):
    """A minimisation method for :func:`assimilate` and :func:`minimize`.

    Subclasses implement ``init(cost, v) -> IterationState`` and
    ``step(cost, state) -> IterationState`` as pure JAX functions, plus the
    stopping options ``max_iterations``, ``gtol`` and ``ftol``.
    """

    max_iterations: eqx.AbstractVar[int]
    gtol: eqx.AbstractVar[float]
    ftol: eqx.AbstractVar[float]

    @abc.abstractmethod
    def init(self, cost: FourDVar, v) -> IterationState: ...

    @abc.abstractmethod
    def step(self, cost: FourDVar, state: IterationState) -> IterationState: ...

    def _check(self):
        if (
            isinstance(self.max_iterations, bool)
            or not isinstance(self.max_iterations, int)
            or self.max_iterations < 0
        ):
            raise ValueError(
                f"`max_iterations` must be an integer >= 0, got {self.max_iterations!r}."
            )
        for name in ("gtol", "ftol"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value >= 0):
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")


class GaussNewton(AbstractMethod):
    r"""Incremental 4D-Var: Gauss-Newton outer loops, CG inner loops.

    Attributes:
        max_iterations: maximum number of outer (re-linearisation) iterations.
        gtol: stop when $\|\nabla J\| \le$ ``gtol`` $\cdot\|\nabla J(v_0)\|$.
        ftol: stop when $J_{k-1} - J_k \le$ ``ftol`` $\cdot J_k$.
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
        self._check()
        if not (isinstance(self.inner_max_steps, int) and self.inner_max_steps >= 1):
            raise ValueError(
                f"`inner_max_steps` must be an integer >= 1, got "
                f"{self.inner_max_steps!r}."
            )

    def init(self, cost, v):
        j, jb, jo, g = _evaluate(cost, v)
        zero = jnp.zeros((), jnp.int32)
        return IterationState(v, j, jb, jo, g, _norm(g), zero, jnp.zeros_like(j), None)

    def solve_increment(self, cost, v, grad=None):
        """One inner loop: the Gauss-Newton increment $\\delta$ at ``v``.

        Solves $(I + J_o^\\top J_o)\\,\\delta = -\\nabla J(v)$ by CG. ``grad`` is
        $\\nabla J(v)$ when already known. Returns ``(delta, cg_steps)``.
        """
        # The primal run here is the linearisation point; `vjp_fn` is the adjoint
        # model J_o^T (checkpointed as the cost is), `jax.jvp` the tangent linear J_o.
        res, vjp_fn = jax.vjp(cost.obs_residual, v)
        if grad is None:
            grad = _add(v, vjp_fn(res)[0])

        def hvp(p):
            _, jp = jax.jvp(cost.obs_residual, (v,), (p,))
            (jt_jp,) = vjp_fn(jp)
            return _add(p, jt_jp)

        op = lx.FunctionLinearOperator(
            hvp,
            jax.eval_shape(lambda: v),
            tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        )
        solver = lx.CG(rtol=self.inner_rtol, atol=0.0, max_steps=self.inner_max_steps)
        rhs = jtu.tree_map(jnp.negative, grad)
        sol = lx.linear_solve(op, rhs, solver, throw=False)
        return sol.value, jnp.asarray(sol.stats["num_steps"], jnp.int32)

    def step(self, cost, state):
        v, j = state.v, state.cost
        delta, n_cg = self.solve_increment(cost, v, state.grad)

        def trial(k):
            return _add(v, delta, 0.5**k)

        # Backtracking: halve the step while it does not decrease J. The loop starts
        # at k = -1 so that the cost is traced once, in the body.
        def cond(carry):
            k, j_new = carry
            bad = ~(j_new <= j) | ~jnp.isfinite(j_new)
            return (k < 0) | (bad & (k < self.max_backtracks))

        def body(carry):
            k, _ = carry
            return k + 1, cost.costs(trial(k + 1))[0]

        k, _ = jax.lax.while_loop(cond, body, (-1, jnp.asarray(jnp.inf, j.dtype)))
        v_new = trial(k)
        j, jb, jo, g = _evaluate(cost, v_new)
        step = _norm(_add(v_new, v, -1.0))
        return IterationState(v_new, j, jb, jo, g, _norm(g), n_cg, step, None)


class LBFGS(AbstractMethod):
    r"""Limited-memory BFGS with a zoom (strong Wolfe) line search (``optax.lbfgs``).

    Attributes:
        max_iterations: maximum number of iterations (one line search each).
        gtol: stop when $\|\nabla J\| \le$ ``gtol`` $\cdot\|\nabla J(v_0)\|$.
        ftol: stop when $J_{k-1} - J_k \le$ ``ftol`` $\cdot J_k$.
        memory: number of stored correction pairs.
        max_linesearch_steps: cap on cost evaluations per line search.
    """

    max_iterations: int = eqx.field(static=True, default=500)
    gtol: float = eqx.field(static=True, default=1e-6)
    ftol: float = eqx.field(static=True, default=1e-12)
    memory: int = eqx.field(static=True, default=10)
    max_linesearch_steps: int = eqx.field(static=True, default=20)

    def __check_init__(self):
        self._check()

    def _optimizer(self):
        return optax.lbfgs(
            memory_size=self.memory,
            linesearch=optax.scale_by_zoom_linesearch(
                max_linesearch_steps=self.max_linesearch_steps
            ),
        )

    def init(self, cost, v):
        j, jb, jo, g = _evaluate(cost, v)
        opt_state = self._optimizer().init(v)
        zero = jnp.zeros((), jnp.int32)
        return IterationState(
            v, j, jb, jo, g, _norm(g), zero, jnp.zeros_like(j), opt_state
        )

    def step(self, cost, state):
        opt = self._optimizer()
        value_fn = lambda w: cost.costs(w)[0]
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
        # The line search already evaluated J and its gradient at the new point.
        j, g = optax.value_and_grad_from_state(value_fn)(v_new, state=opt_state)
        jb = 0.5 * _norm(v_new) ** 2
        jo = j - jb
        n_ls = optax.tree_utils.tree_get(opt_state, "num_linesearch_steps")
        n_ls = jnp.asarray(0 if n_ls is None else n_ls, jnp.int32)
        step = _norm(updates)
        return IterationState(v_new, j, jb, jo, g, _norm(g), n_ls, step, opt_state)
