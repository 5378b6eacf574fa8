r"""Proximal methods for costs with a non-smooth prior.

The cost is composite,

$$ F(x) = f(x) + g(x), $$

with $f$ smooth (an :class:`assimilation.AbstractCost` such as a 4D-Var cost, a
least-squares misfit $\tfrac12\|(Ax - y)/\sigma\|^2$ through a linear operator
$A$, or any differentiable function) and $g$ a prior with a proximal operator
(:class:`assimilation.learn.AbstractPrior`). :class:`CompositeCost` is an
:class:`assimilation.AbstractCost` whose terms are $f$'s and $g$'s, and the methods
are :class:`assimilation.AbstractMethod` state machines, ``init(cost, v) ->
IterationState`` and ``step(cost, state) -> IterationState``: the same iteration
engine as 4D-Var runs them (:func:`assimilation.minimize`, jittable, vmappable,
differentiable; :func:`assimilation.assimilate` for an analysis), with the same
:class:`assimilation.StoppingRule`, history and result codes. 4D-Var + L1/TV is
just a cost with a non-smooth term. :func:`solve` and :func:`unroll` are
shorthands for the engine.

* :class:`ISTA` — proximal gradient, $x_{k+1} = \operatorname{prox}_{tg}(x_k -
  t\nabla f(x_k))$: $F(x_k) - F^\star \le \|x_0 - x^\star\|^2/(2tk)$.
* :class:`FISTA` — with Nesterov momentum (Beck & Teboulle 2009):
  $F(x_k) - F^\star \le 2\|x_0 - x^\star\|^2/(t(k+1)^2)$.
* :class:`ADMM` — scaled ADMM on $f(x) + g(z)$, $x = z$; the data step solves the
  normal equations $(A^\top A/\sigma^2 + \rho I)x = A^\top y/\sigma^2 + \rho(z - u)$
  by conjugate gradients (matrix-free: one forward and one adjoint sweep of the
  physics per CG step). ``dual=False`` with a growing penalty is half-quadratic
  splitting (:class:`HQS`).
* :class:`ChambollePock` — primal-dual hybrid gradient for
  $\tfrac12\|(Ax - y)/\sigma\|^2 + h(Kx) + g_0(x)$ with the analysis form
  $g = h\circ K$ of the prior (TV: $K = D$), never an inner TV solve.

The step of ISTA/FISTA is ``1/L`` with $L \ge \|A\|^2/\sigma^2$ from a power
iteration (least squares), or found by backtracking (any smooth $f$). A
continuation multiplies the prior by a factor $s_k = \max(1, s_0 q^k)$ that decays
to one (warm-started large weights first), see :class:`Continuation`.

Work is counted in *sweeps*: one application of $A$ or $A^\top$ (for a PDE
operator, one forward or one adjoint run of the model). With a least-squares $f$
ISTA, FISTA and Chambolle-Pock spend two sweeps per iteration, keeping $Ax$ in
their state so that the objective comes for free.

References:
    A. Beck and M. Teboulle (2009), "A fast iterative shrinkage-thresholding
    algorithm for linear inverse problems", SIAM J. Imaging Sci. 2(1), 183-202.
    S. Boyd, N. Parikh, E. Chu, B. Peleato and J. Eckstein (2011), "Distributed
    optimization and statistical learning via the alternating direction method of
    multipliers", Found. Trends Mach. Learn. 3(1) (section 3.3: residuals).
    A. Chambolle and T. Pock (2011), "A first-order primal-dual algorithm for convex
    problems with applications to imaging", J. Math. Imaging Vis. 40, 120-145.
    T. Goldstein, M. Li, X. Yuan, E. Esser and R. Baraniuk (2013), "Adaptive
    primal-dual hybrid gradient methods for saddle-point problems",
    arXiv:1305.0546 (primal and dual residuals).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
from jax import lax

from .._cost import _total
from .._methods import AbstractMethod, IterationState
from .._minimize import Solution as Solution, minimize
from .._stopping import RESULTS as RESULTS, StoppingRule
from ._composite import (
    CompositeCost,
    LeastSquares,
    _add,
    _check_operator,
    _dot,
    _dtype,
    _lin,
    _norm,
    _sub,
)
from ._prox import AbstractPrior, Zero


SMOOTH = "smooth"
PRIOR = "prior"


# ------------------------------------------------------------------ helpers


def operator_norm_squared(operator, *, key=None, n_iter: int = 100) -> jax.Array:
    r"""Power-iteration estimate of $\|A\|_2^2 = \lambda_{\max}(A^\top A)$.

    A lower bound that converges from below; use ``1.01 * estimate`` (or more for few
    iterations) as a Lipschitz constant. Costs ``2 * n_iter`` sweeps.

    Args:
        operator: a ``lineax.AbstractLinearOperator``.
        key: PRNG key of the start vector (default ``jax.random.key(0)``).
        n_iter: iterations (static).
    """
    _check_operator(operator)
    key = jr.key(0) if key is None else key
    struct = operator.in_structure()
    leaves, treedef = jtu.tree_flatten(struct)
    keys = jr.split(key, len(leaves))
    v = jtu.tree_unflatten(
        treedef,
        [jr.normal(k, s.shape, s.dtype) for k, s in zip(keys, leaves, strict=True)],
    )
    at = operator.transpose()

    def body(_, carry):
        v, _ = carry
        v = _lin(1.0 / _norm(v), v)
        w = at.mv(operator.mv(v))
        return w, _dot(v, w)

    _, est = lax.fori_loop(0, n_iter, body, (v, jnp.zeros((), _dtype(v))))
    return est


class Continuation(eqx.Module):
    r"""Continuation on the prior weight: the prior is scaled by
    $s_k = \max(1, s_0 q^k)$ at iteration $k$ (large weights first, decaying to the
    target weight). Speeds up sparse solvers from a zero start (Hale, Yin & Zhang
    2008).

    Attributes:
        start: $s_0 \ge 1$.
        factor: $q \in (0, 1]$.
    """

    start: float = eqx.field(static=True, default=10.0)
    factor: float = eqx.field(static=True, default=0.9)

    def __check_init__(self):
        if not self.start >= 1.0:
            raise ValueError(f"`start` must be >= 1, got {self.start!r}.")
        if not 0.0 < self.factor <= 1.0:
            raise ValueError(f"`factor` must lie in (0, 1], got {self.factor!r}.")

    def scale(self, k, dtype):
        k = jnp.asarray(k, dtype)
        return jnp.maximum(1.0, self.start * jnp.asarray(self.factor, dtype) ** k)


# ------------------------------------------------------------------ the state


class ProximalState(eqx.Module):
    """The state of one proximal iteration (the method's own, carried in the
    engine's :class:`assimilation.IterationState` as ``opt_state``).

    Attributes:
        x: the current estimate (feasible for the prior).
        objective: $F(x)$ (with the target prior weight, not the continued one).
        terms: the named terms of $F(x)$ (``cost.terms(x)``, from the evaluations
            the step made anyway).
        residual: the primal residual: the length of the last proximal-gradient
            step (ISTA/FISTA), $\\|x - z\\|$ (ADMM), or the PDHG primal residual.
        dual_residual: $\\rho\\|z_k - z_{k-1}\\|$ (ADMM), the PDHG dual residual,
            or 0.
        step: the current step $t$ (or ADMM penalty $\\rho$).
        scale: the continuation factor on the prior at this step.
        num_steps: steps taken.
        sweeps: applications of $A$ or $A^\\top$ so far (evaluations of $f$ and
            of its gradient for a general smooth part).
        aux: the method's own variables (momentum, ADMM splitting, dual).
    """

    x: Any
    objective: jax.Array
    terms: dict
    residual: jax.Array
    dual_residual: jax.Array
    step: jax.Array
    scale: jax.Array
    num_steps: jax.Array
    sweeps: jax.Array
    aux: Any


class AbstractProximalMethod(AbstractMethod):
    r"""A proximal method as a method of the iteration engine: run it with
    :func:`assimilation.minimize` (or :func:`assimilation.assimilate`) on a
    :class:`CompositeCost`, with a :class:`assimilation.StoppingRule`, its history
    and result codes.

    In the engine's :class:`assimilation.IterationState`: ``v`` is the iterate
    $x_k$, ``cost`` and ``terms`` are $F(x_k)$ and its parts, ``grad`` is the
    method's optimality residual of the iteration that produced $x_k$ (a pytree
    like $x$, zero exactly at a fixed point, i.e. a minimiser; see each method)
    with ``grad_norm`` its size, so the rule's ``gtol`` is a relative residual
    tolerance; ``inner_iterations`` counts the sweeps (applications of $A$ or
    $A^\top$, or evaluations of $f$/$\nabla f$) of the iteration; ``opt_state``
    is the method's :class:`ProximalState`. At the start there is no previous
    iteration: ``init`` runs one (and discards it) to measure the starting
    residual that ``gtol`` is relative to.

    Subclasses implement the method's own state machine, ``_init(cost, x0) ->
    ProximalState`` and ``_step(cost, state) -> ProximalState``, and
    ``_residual(previous, new) -> (grad, grad_norm)``.

    Attributes:
        max_iterations, gtol, ftol: the default :class:`assimilation.StoppingRule`
            (``ftol=None``: no cost test; near a minimiser $F$ stalls in working
            precision long before the iterate does).
    """

    max_iterations: int = eqx.field(static=True, default=1000, kw_only=True)
    gtol: float = eqx.field(static=True, default=1e-8, kw_only=True)
    ftol: float | None = eqx.field(static=True, default=None, kw_only=True)

    def stopping_rule(self) -> StoppingRule:
        return StoppingRule(self.max_iterations, self.gtol, self.ftol)

    @abc.abstractmethod
    def _init(self, cost: CompositeCost, x0) -> ProximalState: ...

    @abc.abstractmethod
    def _step(self, cost: CompositeCost, state: ProximalState) -> ProximalState: ...

    @abc.abstractmethod
    def _residual(self, previous: ProximalState, new: ProximalState): ...

    def _iteration(self, state, grad, grad_norm, work, step_norm):
        return IterationState(
            v=state.x,
            cost=state.objective,
            terms=state.terms,
            grad=grad,
            grad_norm=grad_norm,
            inner_iterations=jnp.asarray(work, jnp.int32),
            step_norm=step_norm,
            opt_state=state,
        )

    def init(self, cost, v):
        _check_cost(cost)
        start = self._init(cost, v)
        probe = self._step(cost, start)
        grad, grad_norm = self._residual(start, probe)
        zero = jnp.zeros((), start.objective.dtype)
        return self._iteration(start, grad, grad_norm, probe.sweeps, zero)

    def step(self, cost, state):
        previous = state.opt_state
        new = self._step(cost, previous)
        grad, grad_norm = self._residual(previous, new)
        return self._iteration(
            new,
            grad,
            grad_norm,
            new.sweeps - previous.sweeps,
            _norm(_sub(new.x, previous.x)),
        )


def _check_cost(cost):
    if not isinstance(cost, CompositeCost):
        raise TypeError(
            "`cost` must be an assimilation.learn.CompositeCost(smooth, prior), got "
            f"{type(cost).__name__}."
        )


def _zero(dtype):
    return jnp.zeros((), dtype)


def _int(v):
    return jnp.asarray(v, jnp.int32)


# ------------------------------------------------------------------ ISTA / FISTA


class _ProxGradAux(eqx.Module):
    ax: Any  # A x (least squares) or None
    y: Any  # the extrapolated point (FISTA) or x
    ay: Any  # A y or None
    fy: Any  # f(y) (backtracking) or None
    gy: Any  # grad f(y) (backtracking) or None
    t: Any  # FISTA momentum scalar


class _ProximalGradient(AbstractProximalMethod):
    step_size: float | None = eqx.field(static=True, default=None)
    backtrack: bool | None = eqx.field(static=True, default=None)
    shrink: float = eqx.field(static=True, default=0.5)
    continuation: Continuation | None = None
    lipschitz_iters: int = eqx.field(static=True, default=50)

    def __check_init__(self):
        if self.step_size is not None and not self.step_size > 0:
            raise ValueError(f"`step_size` must be > 0, got {self.step_size!r}.")
        if not 0.0 < self.shrink < 1.0:
            raise ValueError(f"`shrink` must lie in (0, 1), got {self.shrink!r}.")

    momentum: ClassVar[bool] = False

    def _linear(self, cost):
        return isinstance(cost.smooth, LeastSquares) and not self._backtracking(cost)

    def _backtracking(self, cost):
        if self.backtrack is not None:
            return self.backtrack
        return self.step_size is None and not isinstance(cost.smooth, LeastSquares)

    def _scale(self, k, dtype):
        if self.continuation is None:
            return jnp.ones((), dtype)
        return self.continuation.scale(k, dtype)

    def _residual(self, previous, new):
        # The gradient mapping G = (y_{k-1} - x_k)/t at the point the step started
        # from (y = x for ISTA). It bounds the distance of 0 from the
        # subdifferential of F at x_k by (1 + tL)|G|.
        grad = _lin(1.0 / new.step, _sub(previous.aux.y, new.x))
        return grad, _norm(grad)

    def _init(self, cost, x0):
        dtype = _dtype(x0)
        f = cost.smooth
        sweeps = 0
        if self.step_size is not None:
            t = jnp.asarray(self.step_size, dtype)
        elif isinstance(f, LeastSquares) and not self._backtracking(cost):
            lip = operator_norm_squared(f.operator, n_iter=self.lipschitz_iters)
            s2 = jnp.square(jnp.asarray(f.sigma, dtype))
            # The power iteration approaches ||A||^2 from below: a 2% margin.
            t = (s2 / (1.02 * lip)).astype(dtype)
            sweeps += 2 * self.lipschitz_iters
        else:
            t = jnp.ones((), dtype)
        if self._linear(cost):
            ax = f.forward(x0)
            f_terms = f.terms_from(ax)
            aux = _ProxGradAux(ax, x0, ax, None, None, jnp.ones((), dtype))
            sweeps += 1
        else:
            f_terms, gx = f.terms_and_grad(x0)
            aux = _ProxGradAux(None, x0, None, _total(f_terms), gx, jnp.ones((), dtype))
            sweeps += 2
        terms = cost.terms_from(f_terms, x0)
        return ProximalState(
            x=x0,
            objective=_total(terms),
            terms=terms,
            residual=jnp.asarray(jnp.inf, dtype),
            dual_residual=_zero(dtype),
            step=t,
            scale=self._scale(0, dtype),
            num_steps=_int(0),
            sweeps=_int(sweeps),
            aux=aux,
        )

    def _step(self, cost, state):
        f, g = cost.smooth, cost.prior
        dtype = _dtype(state.x)
        aux = state.aux
        scale = self._scale(state.num_steps, dtype)
        t = state.step
        sweeps = state.sweeps
        y = aux.y
        if self._linear(cost):
            grad = f.grad_from(aux.ay)
            x_new = g.prox(_sub(y, _lin(t, grad)), t * scale)
            ax_new = f.forward(x_new)
            f_terms = f.terms_from(ax_new)
            sweeps = sweeps + 2
        else:
            fy, gy = aux.fy, aux.gy

            def trial(t):
                xn = g.prox(_sub(y, _lin(t, gy)), t * scale)
                d = _sub(xn, y)
                terms = f.terms(xn)
                fn = _total(terms)
                # Sufficient decrease up to round-off in f. Near a minimiser both
                # sides are a few ulps of f (f itself carries the round-off of the
                # forward run), and an exact test would halve t down to nothing
                # (x_{k+1} = y_k: a false zero residual).
                slack = 128 * jnp.finfo(dtype).eps * (jnp.abs(fy) + jnp.abs(fn))
                ok = fn - fy - _dot(gy, d) <= 0.5 * _dot(d, d) / t + slack
                return xn, terms, ok | ~jnp.isfinite(fy)

            if self._backtracking(cost):

                def cond(c):
                    t, _, _, ok, n = c
                    return ~ok & (n < 60)

                def body(c):
                    t, _, _, _, n = c
                    t = t * self.shrink
                    xn, fn, ok = trial(t)
                    return t, xn, fn, ok, n + 1

                xn, fn, ok = trial(t)
                t, x_new, f_terms, _, n_bt = lax.while_loop(
                    cond, body, (t, xn, fn, ok, _int(0))
                )
                sweeps = sweeps + 1 + n_bt
            else:
                x_new = g.prox(_sub(y, _lin(t, gy)), t * scale)
                f_terms = f.terms(x_new)
                sweeps = sweeps + 1
            ax_new = None
        residual = _norm(_sub(x_new, y))
        # Momentum (FISTA) or none (ISTA).
        if self.momentum:
            t_m = aux.t
            t_next = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t_m * t_m))
            beta = (t_m - 1.0) / t_next
            y_new = _lin(1.0 + beta, x_new, -beta, state.x)
            ay_new = None if ax_new is None else _lin(1.0 + beta, ax_new, -beta, aux.ax)
        else:
            t_next = aux.t
            y_new, ay_new = x_new, ax_new
        if ax_new is None:
            if self.momentum:
                fy_new, gy_new = f.value_and_grad(y_new)
                sweeps = sweeps + 2
            else:
                # ISTA: y = x, whose value is known; one gradient evaluation.
                fy_new, gy_new = f.value_and_grad(y_new)
                sweeps = sweeps + 1
        else:
            fy_new = gy_new = None
        terms = cost.terms_from(f_terms, x_new)
        aux = _ProxGradAux(ax_new, y_new, ay_new, fy_new, gy_new, t_next)
        return ProximalState(
            x=x_new,
            objective=_total(terms),
            terms=terms,
            residual=residual,
            dual_residual=_zero(dtype),
            step=t,
            scale=scale,
            num_steps=state.num_steps + 1,
            sweeps=sweeps,
            aux=aux,
        )


class ISTA(_ProximalGradient):
    r"""Proximal gradient (iterative shrinkage-thresholding):
    $x_{k+1} = \operatorname{prox}_{t s_k g}(x_k - t\nabla f(x_k))$.

    $F(x_k) - F^\star = O(1/k)$ for convex $F$ with $t \le 1/L$.

    Attributes:
        step_size: a fixed step $t$; ``None``: $t = 1/L$ from a power iteration
            (least squares) or backtracking (other smooth parts).
        backtrack: force (``True``) or forbid (``False``) the backtracking line
            search (sufficient decrease, Beck & Teboulle 2009, with step halving
            by ``shrink``); ``None`` chooses as above.
        shrink: the backtracking factor.
        continuation: an optional :class:`Continuation` of the prior weight.
        lipschitz_iters: power iterations for $L$.
        max_iterations, gtol, ftol: the default :class:`assimilation.StoppingRule`
            of :func:`assimilation.minimize` (keyword-only).

    In the engine, ``grad`` is the gradient mapping of the step that produced
    $x_k$, $G_t(x_{k-1}) = (x_{k-1} - x_k)/t$, zero exactly at a minimiser; each
    iteration costs two sweeps (least squares).

    Example:
        >>> import jax.numpy as jnp, lineax as lx
        >>> import assimilation as da, assimilation.learn as L
        >>> A = lx.MatrixLinearOperator(jnp.array([[1.0, 0.5], [0.0, 1.0]]))
        >>> cost = L.CompositeCost(L.LeastSquares(A, jnp.array([1.0, 0.0])),
        ...                        L.L1(0.1))
        >>> sol = da.minimize(cost, L.ISTA(max_iterations=2000))
        >>> sol.termination
        'gradient_tolerance'
    """

    momentum = False


class FISTA(_ProximalGradient):
    r"""FISTA: proximal gradient at the extrapolated point
    $y_{k+1} = x_{k+1} + \frac{t_k - 1}{t_{k+1}}(x_{k+1} - x_k)$,
    $t_{k+1} = \tfrac12(1 + \sqrt{1 + 4t_k^2})$.

    $F(x_k) - F^\star = O(1/k^2)$ for convex $F$ with a step $\le 1/L$ (the
    objective need not decrease monotonically). Same attributes as :class:`ISTA`;
    in the engine, ``grad`` is the gradient mapping at the extrapolated point
    the step started from, $(y_{k-1} - x_k)/t$.
    """

    momentum = True


# ------------------------------------------------------------------ ADMM / HQS


class _ADMMAux(eqx.Module):
    z: Any
    u: Any
    aty: Any  # A^T y / sigma^2
    az: Any  # A z


class _Splitting(AbstractProximalMethod):
    rho: float = eqx.field(static=True, default=1.0)
    rho_factor: float = eqx.field(static=True, default=1.0)
    cg_rtol: float = eqx.field(static=True, default=1e-10)
    cg_max_steps: int = eqx.field(static=True, default=100)
    dual: ClassVar[bool] = True

    def __check_init__(self):
        if not self.rho > 0:
            raise ValueError(f"`rho` must be > 0, got {self.rho!r}.")
        if not self.rho_factor >= 1.0:
            raise ValueError(f"`rho_factor` must be >= 1, got {self.rho_factor!r}.")

    def _check(self, cost):
        _check_cost(cost)
        if not isinstance(cost.smooth, LeastSquares):
            raise TypeError(
                f"{type(self).__name__} solves its data step with the normal equations "
                "and needs `cost.smooth` to be a LeastSquares misfit, got "
                f"{type(cost.smooth).__name__}. Use FISTA (with backtracking) for a "
                "general smooth part."
            )

    def _residual(self, previous, new):
        rho = previous.step
        if self.dual:
            # rho (z_{k-1} - z_k) lies in grad f(x_k) + dg(z_k); with the primal
            # residual in the same units (the change of the unscaled dual
            # variable), both vanish at a minimiser (Boyd et al. 2011, 3.3).
            grad = _lin(rho, _sub(previous.x, new.x))
            return grad, jnp.sqrt(_dot(grad, grad) + jnp.square(rho * new.residual))
        # No dual variable: the step in z and the splitting gap |x - z| both vanish
        # as the penalty grows (rho (x - z) tends to a subgradient of g instead).
        grad = _sub(previous.x, new.x)
        return grad, jnp.sqrt(_dot(grad, grad) + jnp.square(new.residual))

    def _init(self, cost, x0):
        self._check(cost)
        f = cost.smooth
        dtype = _dtype(x0)
        s2 = jnp.square(jnp.asarray(f.sigma, dtype))
        aty = _lin(1.0 / s2, f.adjoint(f.target))
        z = cost.prior.prox(x0, jnp.asarray(1.0 / self.rho, dtype))
        az = f.forward(z)
        terms = cost.terms_from(f.terms_from(az), z)
        u = jtu.tree_map(jnp.zeros_like, x0)
        return ProximalState(
            x=z,
            objective=_total(terms),
            terms=terms,
            residual=jnp.asarray(jnp.inf, dtype),
            dual_residual=jnp.asarray(jnp.inf, dtype),
            step=jnp.asarray(self.rho, dtype),
            scale=jnp.ones((), dtype),
            num_steps=_int(0),
            sweeps=_int(2),
            aux=_ADMMAux(z, u, aty, az),
        )

    def _step(self, cost, state):
        f, g = cost.smooth, cost.prior
        dtype = _dtype(state.x)
        rho = state.step
        z, u = state.aux.z, state.aux.u
        s2 = jnp.square(jnp.asarray(f.sigma, dtype))
        normal = lx.FunctionLinearOperator(
            lambda v: _add(_lin(1.0 / s2, f.adjoint(f.forward(v))), _lin(rho, v)),
            f.operator.in_structure(),
            tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        )
        rhs = _add(state.aux.aty, _lin(rho, _sub(z, u)))
        sol = lx.linear_solve(
            normal,
            rhs,
            lx.CG(rtol=self.cg_rtol, atol=0.0, max_steps=self.cg_max_steps),
            options={"y0": _sub(z, u)},
            throw=False,
        )
        x = sol.value
        n_cg = jnp.asarray(sol.stats["num_steps"], jnp.int32)
        v = _add(x, u) if self.dual else x
        z_new = g.prox(v, 1.0 / rho)
        u_new = _add(u, _sub(x, z_new)) if self.dual else u
        az = f.forward(z_new)
        terms = cost.terms_from(f.terms_from(az), z_new)
        r = _norm(_sub(x, z_new))
        s = rho * _norm(_sub(z_new, z))
        rho_next = rho * self.rho_factor
        # Scaled dual variable u = y/rho: rescale when rho changes.
        u_new = _lin(rho / rho_next, u_new)
        return ProximalState(
            x=z_new,
            objective=_total(terms),
            terms=terms,
            residual=r,
            dual_residual=s,
            step=rho_next,
            scale=state.scale,
            num_steps=state.num_steps + 1,
            # CG: two sweeps per step and two for its initial residual; one for A z.
            sweeps=state.sweeps + 2 * n_cg + 3,
            aux=_ADMMAux(z_new, u_new, state.aux.aty, az),
        )


class ADMM(_Splitting):
    r"""Scaled ADMM on $\min f(x) + g(z)$ s.t. $x = z$:

    $$ x_{k+1} = (A^\top A/\sigma^2 + \rho I)^{-1}(A^\top y/\sigma^2 +
       \rho(z_k - u_k)),\quad z_{k+1} = \operatorname{prox}_{g/\rho}(x_{k+1} + u_k),
       \quad u_{k+1} = u_k + x_{k+1} - z_{k+1}. $$

    The data step is solved by CG (``lineax.CG``) warm-started at $z_k - u_k$.
    Residuals (Boyd et al. 2011, 3.3): primal $\|x_{k+1} - z_{k+1}\|$, dual
    $\rho\|z_{k+1} - z_k\|$; both tend to zero.

    Attributes:
        rho: the penalty $\rho > 0$.
        rho_factor: multiply $\rho$ by this each step (1: fixed).
        cg_rtol, cg_max_steps: the inner CG solve.
        max_iterations, gtol, ftol: the default :class:`assimilation.StoppingRule`
            (keyword-only).

    In the engine, ``grad`` is the dual residual $\rho(z_{k-1} - z_k)$ (an
    element of $\nabla f(x_k) + \partial g(z_k)$) and ``grad_norm``
    $= \sqrt{\|\rho(z_{k-1} - z_k)\|^2 + \|\rho(x_k - z_k)\|^2}$
    joins the primal residual; ``inner_iterations`` counts sweeps (two per CG
    step).
    """

    dual = True


class HQS(_Splitting):
    r"""Half-quadratic splitting: ADMM without the dual update, with a growing
    penalty $\rho_{k+1} = \rho_k\cdot$ ``rho_factor`` (so $x - z \to 0$ by the
    penalty alone). The usual splitting of plug-and-play schemes. Same attributes
    as :class:`ADMM` (default ``rho_factor=1.2``). In the engine, ``grad`` is the
    step $z_{k-1} - z_k$ and ``grad_norm``
    $= \sqrt{\|z_{k-1} - z_k\|^2 + \|x_k - z_k\|^2}$.
    """

    rho_factor: float = eqx.field(static=True, default=1.2)
    dual = False


# ------------------------------------------------------------------ Chambolle-Pock


class _CPAux(eqx.Module):
    q: Any  # dual of the data term
    p: Any  # dual of the prior's analysis term
    ax: Any
    x_bar: Any
    ax_bar: Any


class ChambollePock(AbstractProximalMethod):
    r"""Primal-dual hybrid gradient (Chambolle & Pock 2011, algorithm 1, $\theta=1$)
    for $\tfrac12\|(Ax-y)/\sigma\|^2 + h(Kx) + g_0(x)$.

    With $L = [A; K]$ and the dual variables $(q, p)$:

    $$ (q, p)_{k+1} = \operatorname{prox}_{\varsigma F^*}((q,p)_k + \varsigma L\bar
       x_k),\quad x_{k+1} = \operatorname{prox}_{\tau g_0}(x_k - \tau L^\top
       (q,p)_{k+1}),\quad \bar x_{k+1} = 2x_{k+1} - x_k, $$

    where $g = h\circ K$ is the prior's :meth:`~AbstractPrior.analysis` form, and
    $\operatorname{prox}_{\varsigma f^*}(v) = (v - \varsigma y)/(1 + \varsigma
    \sigma^2)$ for the data term. Converges for $\tau\varsigma\|L\|^2 < 1$; the
    default balances $\tau = \varsigma = 0.99/\|L\|$ (power iteration). Residuals
    as in Goldstein et al. (2013).

    Attributes:
        tau, sigma_dual: step sizes (``None``: as above).
        primal_prior: $g_0$ (e.g. :class:`NonNegative`), default none.
        lipschitz_iters: power iterations for $\|L\|$.
        max_iterations, gtol, ftol: the default :class:`assimilation.StoppingRule`
            (keyword-only).

    In the engine, ``grad`` is the primal residual $(x_{k-1} - x_k)/\tau$ and
    ``grad_norm`` joins the dual residual (Goldstein et al. 2013).
    """

    tau: float | None = eqx.field(static=True, default=None)
    sigma_dual: float | None = eqx.field(static=True, default=None)
    primal_prior: AbstractPrior = Zero()
    lipschitz_iters: int = eqx.field(static=True, default=50)

    def _check(self, cost):
        _check_cost(cost)
        if not isinstance(cost.smooth, LeastSquares):
            raise TypeError(
                "ChambollePock needs `cost.smooth` to be a LeastSquares misfit (its "
                f"operator enters the primal-dual splitting), got "
                f"{type(cost.smooth).__name__}."
            )

    def _steps(self, cost, x0):
        dtype = _dtype(x0)
        if self.tau is not None and self.sigma_dual is not None:
            return jnp.asarray(self.tau, dtype), jnp.asarray(self.sigma_dual, dtype), 0
        f = cost.smooth
        k, kt, _ = cost.prior.analysis()
        lip = _stacked_norm_squared(f, k, kt, x0, self.lipschitz_iters)
        norm = jnp.sqrt(1.02 * lip)
        step = (0.99 / norm).astype(dtype)
        return step, step, 2 * self.lipschitz_iters

    def _residual(self, previous, new):
        # Goldstein et al. (2013): the primal and dual optimality gaps of the
        # update, (x_{k-1} - x_k)/tau and the dual one (kept in `dual_residual`).
        tau, sig = new.step, new.scale
        grad = _lin(1.0 / tau, _sub(previous.x, new.x))
        dual = new.dual_residual / sig
        return grad, jnp.sqrt(_dot(grad, grad) + jnp.square(dual))

    def _init(self, cost, x0):
        self._check(cost)
        f = cost.smooth
        dtype = _dtype(x0)
        k, _, _ = cost.prior.analysis()
        tau, sig, sweeps = self._steps(cost, x0)
        ax = f.forward(x0)
        q = jtu.tree_map(jnp.zeros_like, ax)
        p = jtu.tree_map(jnp.zeros_like, k(x0))
        terms = cost.terms_from(f.terms_from(ax), x0)
        return ProximalState(
            x=x0,
            objective=_total(terms),
            terms=terms,
            residual=jnp.asarray(jnp.inf, dtype),
            dual_residual=jnp.asarray(jnp.inf, dtype),
            step=tau,
            scale=sig,  # the dual step, carried in `scale`
            num_steps=_int(0),
            sweeps=_int(sweeps + 1),
            aux=_CPAux(q, p, ax, x0, ax),
        )

    def _step(self, cost, state):
        f = cost.smooth
        k, kt, h = cost.prior.analysis()
        dtype = _dtype(state.x)
        tau, sig = state.step, state.scale
        s2 = jnp.square(jnp.asarray(f.sigma, dtype))
        aux = state.aux
        x = state.x
        # Dual ascent.
        q_new = _lin(
            1.0 / (1.0 + sig * s2),
            _sub(_add(aux.q, _lin(sig, aux.ax_bar)), _lin(sig, f.target)),
        )
        p_new = h.conjugate_prox(_add(aux.p, _lin(sig, k(aux.x_bar))), sig)
        # Primal descent.
        lt = _add(f.adjoint(q_new), kt(p_new))
        x_new = self.primal_prior.prox(_sub(x, _lin(tau, lt)), tau)
        ax_new = f.forward(x_new)
        x_bar = _lin(2.0, x_new, -1.0, x)
        ax_bar = _lin(2.0, ax_new, -1.0, aux.ax)
        # Residuals (Goldstein et al. 2013): the optimality gaps of the two updates.
        dx, dq, dp = _sub(x, x_new), _sub(aux.q, q_new), _sub(aux.p, p_new)
        primal = _norm(_lin(1.0 / tau, dx))
        dual = jnp.sqrt(
            jnp.square(_norm(_lin(1.0 / sig, dq)))
            + jnp.square(_norm(_lin(1.0 / sig, dp)))
        )
        terms = cost.terms_from(f.terms_from(ax_new), x_new)
        return ProximalState(
            x=x_new,
            objective=_total(terms),
            terms=terms,
            residual=primal * tau,
            dual_residual=dual * sig,
            step=tau,
            scale=sig,
            num_steps=state.num_steps + 1,
            sweeps=state.sweeps + 2,
            aux=_CPAux(q_new, p_new, ax_new, x_bar, ax_bar),
        )


def _stacked_norm_squared(f, k, kt, x0, n_iter):
    """Power iteration on $A^\\top A + K^\\top K$."""
    v = jtu.tree_map(
        lambda a: jnp.ones_like(a) + 0.1 * jnp.cos(jnp.arange(a.size).reshape(a.shape)),
        x0,
    )

    def body(_, carry):
        v, _ = carry
        v = _lin(1.0 / _norm(v), v)
        w = _add(f.adjoint(f.forward(v)), kt(k(v)))
        return w, _dot(v, w)

    _, est = lax.fori_loop(0, n_iter, body, (v, jnp.zeros((), _dtype(v))))
    return est


# ------------------------------------------------------------------ drivers


def solve(
    cost: CompositeCost,
    method: AbstractProximalMethod,
    x0,
    *,
    max_steps: int = 1000,
    rtol: float = 1e-8,
    ftol: float | None = None,
    throw: bool = False,
) -> Solution:
    r"""Run ``method`` on ``cost`` from ``x0`` until its residual is small: a
    shorthand for :func:`assimilation.minimize` with
    ``stop=StoppingRule(max_steps, gtol=rtol, ftol=ftol)``.

    Stops at the first iterate whose optimality residual (``grad_norm``, see
    :class:`AbstractProximalMethod`) is at most ``rtol`` times the starting one
    (``"gradient_tolerance"``), or, with ``ftol``, where
    $0 \le F_{k-1} - F_k \le \mathrm{ftol}\,|F_k|$; else after ``max_steps``
    (``RESULTS.max_iterations_reached``). A non-finite objective stops with
    ``RESULTS.nonfinite_cost`` and keeps the last finite iterate. Jittable,
    vmappable and differentiable (the engine's loop is a ``lax.scan``).

    Args:
        cost: a :class:`CompositeCost`.
        method: :class:`ISTA`, :class:`FISTA`, :class:`ADMM`, :class:`HQS` or
            :class:`ChambollePock`.
        x0: the starting point (pytree like the cost's argument).
        max_steps: maximum number of steps (static).
        rtol: relative residual tolerance.
        ftol: optional relative objective-decrease tolerance.
        throw: raise unless the result is ``successful``.

    Returns:
        The engine's :class:`assimilation.Solution` (``value``, ``result``,
        ``state``, ``history``, ``stats``).

    Raises:
        TypeError: if ``cost`` or ``method`` has the wrong type.
        ValueError: if ``max_steps`` is not an int >= 1.
    """
    _check_cost(cost)
    _check_method(method)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an int >= 1, got {max_steps!r}.")
    stop = StoppingRule(max_steps, gtol=rtol, ftol=ftol)
    return minimize(cost, method, stop=stop, v0=x0, throw=throw)


def unroll(cost: CompositeCost, method: AbstractProximalMethod, x0, *, n_steps: int):
    """Exactly ``n_steps`` steps of ``method`` (:func:`assimilation.minimize` with
    ``n_iterations=n_steps``), differentiable with ``jax.grad`` through every step
    (e.g. with respect to the prior's weight, or to the data, for bilevel
    learning).

    Returns:
        ``(x, objectives)``: the final iterate and $F$ at steps ``0..n_steps``.
    """
    _check_cost(cost)
    _check_method(method)
    sol = minimize(cost, method, n_iterations=int(n_steps), v0=x0, throw=False)
    return sol.control, sol.history["cost"]


def _check_method(method):
    if not isinstance(method, AbstractProximalMethod):
        raise TypeError(
            "`method` must be ISTA(), FISTA(), ADMM(), HQS() or ChambollePock(), got "
            f"{type(method).__name__}."
        )
