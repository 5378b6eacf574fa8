r"""Minimising 4D-Var costs: incremental Gauss-Newton, L-BFGS, posterior uncertainty.

Two methods minimise a :class:`assimilation.FourDVar` cost over the whitened control
$v$:

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

:func:`assimilate` runs either one from Python, one jitted iteration at a time, with
stopping criteria, a convergence history and a progress ``callback``, and returns an
:class:`Analysis`. :func:`minimize` runs a fixed number of iterations entirely in JAX
(jit- and vmap-able, e.g. over noise seeds). :func:`posterior` gives the Laplace
(Gauss-Newton) approximation of the posterior: $\mathrm{Cov}(v) \approx
(I + J_o^\top J_o)^{-1}$, mapped to parameter standard deviations and correlations.

References:
    P. Courtier, J.-N. Thépaut and A. Hollingsworth (1994), "A strategy for
    operational implementation of 4D-Var, using an incremental approach", Q. J. R.
    Meteorol. Soc. 120, 1367-1387.
    J. Nocedal and S. J. Wright (2006), "Numerical Optimization", 2nd ed.,
    chapters 7 (L-BFGS) and 10 (Gauss-Newton).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optax

from ._control import INITIAL_STATE, MODEL_ERROR
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
        if isinstance(self.max_iterations, bool) or not isinstance(
            self.max_iterations, int
        ) or self.max_iterations < 0:
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
        solver = lx.CG(
            rtol=self.inner_rtol, atol=0.0, max_steps=self.inner_max_steps
        )
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


# ------------------------------------------------------------------ pure JAX path


def minimize(cost: FourDVar, method: AbstractMethod | None = None, *, n_iterations: int,
             v0=None):
    """Run exactly ``n_iterations`` iterations of ``method`` in JAX (jit/vmap-able).

    No stopping test: iterations after convergence leave ``v`` (numerically)
    unchanged for Gauss-Newton. Use this inside ``jax.vmap`` (e.g. over noise
    seeds, with ``FourDVar(throw=False)``); use :func:`assimilate` for stopping
    criteria, progress and an :class:`Analysis`.

    Args:
        cost: the :class:`FourDVar` cost.
        method: :class:`GaussNewton` (default) or :class:`LBFGS`.
        n_iterations: number of (outer) iterations, a static int.
        v0: starting whitened control (default: the background, ``cost.init()``).

    Returns:
        ``(v, history)``: the final whitened control and a dict of arrays of length
        ``n_iterations + 1``: ``cost``, ``background_cost``, ``obs_cost``,
        ``grad_norm`` (index 0 is the start).
    """
    method = GaussNewton() if method is None else method
    v = cost.init() if v0 is None else v0
    state = method.init(cost, v)

    def body(s, _):
        s = method.step(cost, s)
        return s, (s.cost, s.background_cost, s.obs_cost, s.grad_norm)

    s0 = state
    state, rows = jax.lax.scan(body, state, None, length=n_iterations)
    names = ("cost", "background_cost", "obs_cost", "grad_norm")
    history = {
        n: jnp.concatenate([getattr(s0, n)[None], r]) for n, r in zip(names, rows)
    }
    return state.v, history


# ------------------------------------------------------------------ posterior


class Posterior(eqx.Module):
    r"""Laplace (Gauss-Newton) approximation of the posterior at an analysis.

    In the whitened space $\mathrm{Cov}(v) \approx A^{-1}$, $A = I + J_o^\top J_o$,
    so the unconstrained parameters $z = z_b + Uv$ have covariance
    $U A^{-1}_{pp} U^\top$, and physical parameters $p = T(z)$ the delta-method
    standard deviation $|T'(z)|\,\sigma_z$.

    Attributes:
        labels: one label per scalar parameter entry, in control order: the
            parameter name for scalars, ``name[i]`` / ``name[i,j]`` for fields.
        names: parameter names (static), and ``sizes`` their number of entries.
        mean_unconstrained: $z$ at the analysis, flattened, ``(n_p,)``.
        covariance_unconstrained: ``(n_p, n_p)`` covariance of $z$.
        std_unconstrained: ``(n_p,)``.
        std: ``(n_p,)`` physical standard deviations (delta method).
        correlation: ``(n_p, n_p)`` correlation matrix (same for $z$ and, to first
            order, for $p$).
        initial_state_std: posterior standard deviation of the initial state (an
            array of the state's shape) when the state is controlled, is a single
            array and the dense method was used; else ``None``.
        method: ``"dense"`` or ``"cg"``.
    """

    labels: tuple[str, ...] = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)
    sizes: tuple[int, ...] = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    mean_unconstrained: jax.Array
    covariance_unconstrained: jax.Array
    std_unconstrained: jax.Array
    std: jax.Array
    correlation: jax.Array
    initial_state_std: Any
    method: str = eqx.field(static=True)

    def split(self, flat) -> dict:
        """Split a flat ``(n_p,)`` array into ``{name: array of the parameter shape}``."""
        out, start = {}, 0
        for name, size, shape in zip(self.names, self.sizes, self.shapes):
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out


def _labels(name, shape):
    if shape == ():
        return [name]
    return [f"{name}[{','.join(str(i) for i in idx)}]" for idx in np.ndindex(*shape)]


def _dense_sqrt(cov, size, shape, dtype):
    eye = jnp.eye(size, dtype=dtype)
    return jax.vmap(lambda e: cov.sqrt(e.reshape(shape)).reshape(-1))(eye).T


def posterior(cost: FourDVar, v, *, method: str = "auto", max_dense: int = 3000):
    r"""Gauss-Newton (Laplace) posterior of the parameters at the analysis ``v``.

    ``method="dense"`` forms the whole whitened Hessian $A = I + J_o^\top J_o$ from
    one tangent-linear run per control entry (``jax.jacfwd``) and inverts it; it
    also gives the initial-state standard deviation. ``method="cg"`` solves
    $A x = e_i$ by CG for each parameter entry $i$ only (matrix-free: the parameter
    block of $A^{-1}$, i.e. the inverse of the Schur complement, without forming
    $A$). ``"auto"`` is dense when the control has at most ``max_dense`` entries.
    Pure JAX: jit- and vmap-able.

    Args:
        cost: the :class:`FourDVar` cost.
        v: the whitened control at the analysis.
        method: ``"auto"``, ``"dense"`` or ``"cg"``.
        max_dense: size limit for ``"auto"``.

    Returns:
        A :class:`Posterior`.
    """
    if method not in ("auto", "dense", "cg"):
        raise ValueError(f"`method` must be 'auto', 'dense' or 'cg', got {method!r}.")
    flat, unravel = jfu.ravel_pytree(v)
    n = flat.size
    dtype = flat.dtype
    if method == "auto":
        method = "dense" if n <= max_dense else "cg"
    # Where each control entry sits in the flat vector.
    index_tree = unravel(jnp.arange(n, dtype=dtype))
    params = cost.control.parameters
    p_idx = [
        jnp.ravel(index_tree[p.name]).astype(jnp.int32) for p in params
    ]
    p_idx_all = (
        jnp.concatenate(p_idx) if p_idx else jnp.zeros((0,), jnp.int32)
    )
    n_p = int(p_idx_all.size)

    def residual_flat(f):
        return jnp.ravel(cost.obs_residual(unravel(f)))

    state_std = None
    if method == "dense":
        jac = jax.jacfwd(residual_flat)(flat)
        a = jnp.eye(n, dtype=dtype) + jnp.matmul(jac.T, jac, precision="highest")
        chol = jnp.linalg.cholesky(a)
        cov_v = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n, dtype=dtype))
        cov_pp = cov_v[p_idx_all][:, p_idx_all]
        ctrl_state = cost.control.initial_state
        if ctrl_state is not None and isinstance(
            cost.state0, jax.Array | np.ndarray
        ):
            x_idx = jnp.ravel(index_tree[INITIAL_STATE]).astype(jnp.int32)
            shape = jnp.shape(cost.state0)
            size = math.prod(shape)
            u = _dense_sqrt(ctrl_state.covariance, size, shape, dtype)
            uc = jnp.matmul(u, cov_v[x_idx][:, x_idx], precision="highest")
            state_std = jnp.sqrt(jnp.sum(uc * u, axis=1)).reshape(shape)
    else:
        _, vjp_fn = jax.vjp(residual_flat, flat)

        def hvp(p):
            _, jp = jax.jvp(residual_flat, (flat,), (p,))
            return p + vjp_fn(jp)[0]

        op = lx.FunctionLinearOperator(
            hvp,
            jax.ShapeDtypeStruct((n,), dtype),
            tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        )
        solver = lx.CG(rtol=1e-10, atol=0.0, max_steps=max(10 * n, 100))

        def column(i):
            e = jnp.zeros(n, dtype).at[i].set(1.0)
            return lx.linear_solve(op, e, solver, throw=False).value

        cols = jax.lax.map(column, p_idx_all) if n_p else jnp.zeros((0, n), dtype)
        cov_pp = cols[:, p_idx_all]
        cov_pp = 0.5 * (cov_pp + cov_pp.T)

    # Map the whitened block to the unconstrained parameters: z = z_b + U v.
    blocks, means, derivs = [], [], []
    for p in params:
        shape = jnp.shape(p.background)
        size = math.prod(shape)
        blocks.append(_dense_sqrt(p.covariance, size, shape, dtype))
        z = p.unconstrained(v[p.name])
        means.append(jnp.ravel(z))
        derivs.append(jnp.ravel(p.transform.derivative(z)))
    if params:
        u_p = jax.scipy.linalg.block_diag(*blocks)
        cov_z = u_p @ cov_pp @ u_p.T
        mean_z = jnp.concatenate(means)
        deriv = jnp.concatenate(derivs)
    else:
        cov_z = jnp.zeros((0, 0), dtype)
        mean_z = deriv = jnp.zeros((0,), dtype)
    std_z = jnp.sqrt(jnp.diagonal(cov_z))
    corr = cov_z / jnp.outer(std_z, std_z)
    labels, names, sizes, shapes = [], [], [], []
    for p in params:
        shape = tuple(jnp.shape(p.background))
        labels += _labels(p.name, shape)
        names.append(p.name)
        sizes.append(math.prod(shape))
        shapes.append(shape)
    return Posterior(
        labels=tuple(labels),
        names=tuple(names),
        sizes=tuple(sizes),
        shapes=tuple(shapes),
        mean_unconstrained=mean_z,
        covariance_unconstrained=cov_z,
        std_unconstrained=std_z,
        std=jnp.abs(deriv) * std_z,
        correlation=corr,
        initial_state_std=state_std,
        method=method,
    )


# ------------------------------------------------------------------ driver


class History(eqx.Module):
    """Convergence history of :func:`assimilate`, one entry per iteration.

    Entry 0 is the starting point (the background unless ``v0`` was given).

    Attributes:
        cost, background_cost, obs_cost: $J$, $J_b$, $J_o$ (``(n_iterations+1,)``).
        grad_norm: $\\|\\nabla J\\|_2$ in the whitened control space.
        step_norm: $\\|v_k - v_{k-1}\\|_2$ (0 at entry 0).
        inner_iterations: CG steps (Gauss-Newton) or line-search steps (L-BFGS)
            spent in each iteration (0 at entry 0).
        elapsed: wall-clock seconds since the start, at each entry.
        parameters: ``{name: array (n_iterations+1, *shape)}`` physical values.
    """

    cost: np.ndarray
    background_cost: np.ndarray
    obs_cost: np.ndarray
    grad_norm: np.ndarray
    step_norm: np.ndarray
    inner_iterations: np.ndarray
    elapsed: np.ndarray
    parameters: dict

    @property
    def n_iterations(self) -> int:
        return len(self.cost) - 1


class Analysis(eqx.Module):
    r"""The result of :func:`assimilate` (all arrays concrete; physical units).

    Control and model:
        control: the whitened analysis control $v_a$ (``dict``, see
            :class:`assimilation.Control`).
        initial_state: analysed initial state $x_a(t_0)$ (the background if the
            state is not controlled).
        background_state: the background initial state $x_b$.
        final_state: forecast from the analysis at the end of the window.
        background_final_state: forecast from the background at the end of the
            window.
        parameters: ``{name: analysed physical value}``.
        background_parameters: ``{name: background physical value}``.
        increments: ``{"initial_state": x_a - x_b, name: p_a - p_b, ...}`` for the
            controlled quantities (``"model_error"``: the analysed forcings).
        model_error: analysed forcings, shape ``(n_windows, *state shape)``, or
            ``None`` (strong constraint).
        model: the model with the analysed parameters.

    Uncertainty (Gauss-Newton/Laplace, see :func:`posterior`; ``None`` if
    ``uncertainty=False``):
        parameter_std: ``{name: physical std}`` (delta method).
        parameter_std_unconstrained: ``{name: std of the unconstrained value}``
            (e.g. of $\log\kappa$ for ``Log()``).
        parameter_correlation: ``(n_p, n_p)`` correlation between all scalar
            parameter entries, rows labelled by ``parameter_labels``.
        parameter_labels: tuple of ``n_p`` strings.
        initial_state_std: posterior std of the initial state, or ``None``.

    Fit to the observations (shape ``(n_times, n_sensors)``, NaN where missing,
    observation minus model):
        obs_times: the observation times.
        obs_minus_background: $y - H(x^b(t_k))$.
        obs_minus_analysis: $y - H(x^a(t_k))$.

    Convergence:
        history: the :class:`History`.
        cost_background, cost_analysis: $J$ at the start and at the end.
        n_iterations: iterations performed.
        converged: whether a tolerance was met.
        termination: ``"gradient_tolerance"``, ``"cost_tolerance"``,
            ``"max_iterations"``, ``"callback"`` or ``"nonfinite"``.
        message: a one-line human-readable summary.
        method: the method's class name (``"GaussNewton"``, ``"LBFGS"``).
    """

    control: dict
    initial_state: Any
    background_state: Any
    final_state: Any
    background_final_state: Any
    parameters: dict
    background_parameters: dict
    increments: dict
    model_error: Any
    model: Any
    parameter_std: dict | None
    parameter_std_unconstrained: dict | None
    parameter_correlation: Any
    parameter_labels: tuple[str, ...] = eqx.field(static=True)
    initial_state_std: Any
    obs_times: Any
    obs_minus_background: Any
    obs_minus_analysis: Any
    history: History
    cost_background: float
    cost_analysis: float
    n_iterations: int
    converged: bool
    termination: str = eqx.field(static=True)
    message: str = eqx.field(static=True)
    method: str = eqx.field(static=True)

    def summary(self) -> str:
        """A short multi-line text summary (parameters with their std)."""
        lines = [self.message]
        for name, value in self.parameters.items():
            value = np.asarray(value)
            bg = np.asarray(self.background_parameters[name])
            if value.ndim == 0:
                std = (
                    ""
                    if self.parameter_std is None
                    else f" +/- {float(self.parameter_std[name]):.4g}"
                )
                lines.append(f"  {name}: {float(value):.6g}{std} (background {float(bg):.6g})")
            else:
                lines.append(
                    f"  {name}: field {value.shape}, mean {value.mean():.6g} "
                    f"(background mean {bg.mean():.6g})"
                )
        return "\n".join(lines)


def _info(cost, s):
    return {
        "cost": s.cost,
        "background_cost": s.background_cost,
        "obs_cost": s.obs_cost,
        "grad_norm": s.grad_norm,
        "step_norm": s.step_norm,
        "inner_iterations": s.inner_iterations,
        "parameters": cost.parameters(s.v),
    }


def _strong(tree):
    """Drop weak types so that the state of every iteration has one signature."""
    return jtu.tree_map(lambda x: x.astype(x.dtype) if eqx.is_array(x) else x, tree)


@eqx.filter_jit
def _init_jit(method, cost, v):
    s = _strong(method.init(cost, v))
    return s, _info(cost, s)


@eqx.filter_jit
def _step_jit(method, cost, state):
    s = _strong(method.step(cost, state))
    return s, _info(cost, s)


@eqx.filter_jit
def _forecast_jit(cost, v):
    return cost.forecast(v)


_posterior_jit = eqx.filter_jit(posterior)


def _step_config(method):
    """``method`` with the stopping options neutralised: they never enter the
    jitted iteration, so changing them must not trigger a recompilation."""
    return dataclasses.replace(method, max_iterations=0, gtol=0.0, ftol=0.0)


_SCALARS = ("cost", "background_cost", "obs_cost", "grad_norm", "step_norm")


def _np_tree(tree):
    return jtu.tree_map(np.asarray, tree)


def assimilate(
    cost: FourDVar,
    method: AbstractMethod | None = None,
    *,
    v0=None,
    callback: Callable[[int, dict], Any] | None = None,
    uncertainty: bool = True,
) -> Analysis:
    r"""Minimise a 4D-Var cost and return the :class:`Analysis`.

    Runs ``method`` (default :class:`GaussNewton`) one jitted iteration at a time
    from Python, stopping at the first of: $\|\nabla J\| \le$ ``gtol``
    $\cdot\|\nabla J_0\|$ (``"gradient_tolerance"``), $J_{k-1}-J_k \le$ ``ftol``
    $\cdot J_k$ (``"cost_tolerance"``), ``max_iterations`` (``"max_iterations"``),
    a non-finite cost (``"nonfinite"``; the last finite iterate is kept) or the
    callback returning ``True`` (``"callback"``). Then computes the Gauss-Newton
    posterior (:func:`posterior`) if ``uncertainty``.

    Args:
        cost: a :class:`FourDVar`.
        method: :class:`GaussNewton` or :class:`LBFGS`.
        v0: starting whitened control (default: the background, $v = 0$).
        callback: ``callback(iteration, info)`` called after the start (iteration
            0) and after every iteration, with ``info`` a dict of Python floats /
            NumPy arrays: ``cost``, ``background_cost``, ``obs_cost``,
            ``grad_norm``, ``step_norm``, ``inner_iterations``, ``elapsed``,
            ``parameters`` (``{name: physical value}``). Return ``True`` to stop.
        uncertainty: compute the posterior parameter std and correlation.

    Returns:
        An :class:`Analysis`.

    Raises:
        TypeError: if ``cost`` or ``method`` has the wrong type.
        ValueError: if ``v0`` does not match the control.

    Example:
        >>> analysis = assimilate(cost, GaussNewton(max_iterations=10))  # doctest: +SKIP
        >>> print(analysis.summary())  # doctest: +SKIP
    """
    if not isinstance(cost, FourDVar):
        raise TypeError(f"`cost` must be a FourDVar, got {type(cost).__name__}.")
    method = GaussNewton() if method is None else method
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be assimilation.GaussNewton() or assimilation.LBFGS(), got "
            f"{type(method).__name__}."
        )
    v_start = cost.init() if v0 is None else v0
    cost.control.check_control(v_start, cost.state0)
    start = time.perf_counter()
    rows: list[dict] = []

    def record(raw):
        # One device-to-host transfer per iteration.
        raw = jax.device_get(raw)
        info = {k: float(raw[k]) for k in _SCALARS}
        info["inner_iterations"] = int(raw["inner_iterations"])
        info["elapsed"] = time.perf_counter() - start
        info["parameters"] = {k: np.asarray(x) for k, x in raw["parameters"].items()}
        rows.append(info)
        return info

    core = _step_config(method)
    state, raw = _init_jit(core, cost, v_start)
    info = record(raw)
    stop = bool(callback(0, info)) if callback is not None else False
    g0 = info["grad_norm"]
    termination = "callback" if stop else None
    if termination is None and not math.isfinite(info["cost"]):
        termination = "nonfinite"
    if termination is None and g0 == 0.0:
        termination = "gradient_tolerance"
    it = 0
    while termination is None:
        if it >= method.max_iterations:
            termination = "max_iterations"
            break
        new, raw = _step_jit(core, cost, state)
        raw = jax.device_get(raw)
        if not (math.isfinite(float(raw["cost"])) and math.isfinite(
            float(raw["grad_norm"])
        )):
            termination = "nonfinite"
            break
        j_prev = rows[-1]["cost"]
        state = new
        it += 1
        info = record(raw)
        if callback is not None and callback(it, info):
            termination = "callback"
        elif info["grad_norm"] <= method.gtol * g0:
            termination = "gradient_tolerance"
        elif 0.0 <= j_prev - info["cost"] <= method.ftol * abs(info["cost"]):
            termination = "cost_tolerance"

    v_a = state.v
    history = History(
        cost=np.array([r["cost"] for r in rows]),
        background_cost=np.array([r["background_cost"] for r in rows]),
        obs_cost=np.array([r["obs_cost"] for r in rows]),
        grad_norm=np.array([r["grad_norm"] for r in rows]),
        step_norm=np.array([r["step_norm"] for r in rows]),
        inner_iterations=np.array([r["inner_iterations"] for r in rows]),
        elapsed=np.array([r["elapsed"] for r in rows]),
        parameters={
            name: np.stack([r["parameters"][name] for r in rows])
            for name in cost.control.parameter_names
        },
    )
    return _make_analysis(cost, v_a, history, termination, method, uncertainty)


def _make_analysis(cost, v_a, history, termination, method, uncertainty):
    v_b = cost.init()
    hx_b, final_b = _forecast_jit(cost, v_b)
    hx_a, final_a = _forecast_jit(cost, v_a)
    y = cost.obs.values
    omb = jnp.where(jnp.isnan(y), jnp.nan, y - hx_b)
    oma = jnp.where(jnp.isnan(y), jnp.nan, y - hx_a)
    x_b = cost.state0
    x_a = cost.initial_state(v_a)
    params_a = cost.parameters(v_a)
    params_b = cost.parameters(v_b)
    increments = {}
    if cost.control.initial_state is not None:
        increments[INITIAL_STATE] = jtu.tree_map(jnp.subtract, x_a, x_b)
    for name in cost.control.parameter_names:
        increments[name] = params_a[name] - params_b[name]
    forcings = cost.forcings(v_a)
    if forcings is not None:
        increments[MODEL_ERROR] = forcings

    p_std = p_std_z = corr = state_std = None
    labels: tuple[str, ...] = ()
    if uncertainty:
        post = _posterior_jit(cost, v_a)
        labels = post.labels
        if post.names:
            p_std = _np_tree(post.split(post.std))
            p_std_z = _np_tree(post.split(post.std_unconstrained))
            corr = np.asarray(post.correlation)
        state_std = None if post.initial_state_std is None else np.asarray(
            post.initial_state_std
        )
    converged = termination in ("gradient_tolerance", "cost_tolerance")
    n_it = history.n_iterations
    reason = {
        "gradient_tolerance": f"gradient norm reduced below gtol={method.gtol:g}",
        "cost_tolerance": f"relative cost decrease below ftol={method.ftol:g}",
        "max_iterations": f"reached max_iterations={method.max_iterations}",
        "callback": "stopped by the callback",
        "nonfinite": "the cost became non-finite; kept the last finite iterate",
    }[termination]
    message = (
        f"{type(method).__name__}: {'converged' if converged else 'stopped'} after "
        f"{n_it} iteration(s) ({reason}); J {history.cost[0]:.6g} -> "
        f"{history.cost[-1]:.6g}"
    )
    return Analysis(
        control=_np_tree(v_a),
        initial_state=_np_tree(x_a),
        background_state=_np_tree(x_b),
        final_state=_np_tree(final_a),
        background_final_state=_np_tree(final_b),
        parameters=_np_tree(params_a),
        background_parameters=_np_tree(params_b),
        increments=_np_tree(increments),
        model_error=None if forcings is None else _np_tree(forcings),
        model=cost.model_at(v_a),
        parameter_std=p_std,
        parameter_std_unconstrained=p_std_z,
        parameter_correlation=corr,
        parameter_labels=tuple(labels),
        initial_state_std=state_std,
        obs_times=np.asarray(cost.obs.times),
        obs_minus_background=np.asarray(omb),
        obs_minus_analysis=np.asarray(oma),
        history=history,
        cost_background=float(history.cost[0]),
        cost_analysis=float(history.cost[-1]),
        n_iterations=n_it,
        converged=converged,
        termination=termination,
        message=message,
        method=type(method).__name__,
    )
