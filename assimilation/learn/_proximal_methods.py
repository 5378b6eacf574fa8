r"""Proximal methods for costs with a non-smooth prior.

The cost is composite,

$$ F(x) = f(x) + g(x), $$

with $f$ smooth (:class:`AbstractSmooth`: a least-squares misfit
$\tfrac12\|(Ax - y)/\sigma\|^2$ through a linear operator $A$, or any
differentiable function such as a 4D-Var cost) and $g$ a prior with a proximal
operator (:class:`assimilation.learn.AbstractPrior`). The methods are state machines
in the style of optax/diffrax, ``init(cost, x0) -> state`` and ``step(cost, state)
-> state``, pure and jittable; the stopping rules live in the drivers
(:func:`solve`: ``lax.while_loop`` with tolerances, a history and a
:class:`RESULTS` code; :func:`unroll`: a fixed number of steps, differentiable).

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
from collections.abc import Callable
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import lineax as lx
from jax import lax

from ._prox import AbstractPrior, Zero


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


# ------------------------------------------------------------------ result codes


class RESULTS(eqx.Enumeration):
    """Outcome of :func:`solve`. ``successful`` is the only success code."""

    successful = ""
    max_steps_reached = (
        "The proximal method stopped at `max_steps` before meeting its tolerances. "
        "Increase `max_steps`, loosen `rtol`/`atol`, or use a faster method (FISTA "
        "instead of ISTA, a continuation)."
    )
    nonfinite = (
        "The iterate or the objective became non-finite (NaN or Inf). The step is too "
        "large for the smooth part (pass a smaller `step`, or `backtrack=True`), or "
        "the cost is not defined at the iterate."
    )


# ------------------------------------------------------------------ the smooth part


class AbstractSmooth(eqx.Module):
    """The smooth part $f$ of a composite cost."""

    @abc.abstractmethod
    def value(self, x) -> jax.Array:
        """$f(x)$, a scalar."""

    def value_and_grad(self, x):
        r"""$(f(x), \nabla f(x))$; by default by reverse-mode AD (for a 4D-Var
        cost, through the model's adjoint)."""
        return jax.value_and_grad(self.value)(x)


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
    solves of the core, see :func:`assimilation.learn.physics_operator`).

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


class SmoothFunction(AbstractSmooth):
    """Any differentiable scalar function ``fn(x)`` as the smooth part (e.g. a 4D-Var
    cost $J(v)$), differentiated by ``jax.value_and_grad``.

    Attributes:
        fn: the function.
    """

    fn: Callable

    def value(self, x):
        return self.fn(x)


class CompositeCost(eqx.Module):
    r"""$F(x) = f(x) + g(x)$: a smooth part and a prior.

    Attributes:
        smooth: $f$, an :class:`AbstractSmooth` (a plain callable is wrapped in
            :class:`SmoothFunction`).
        prior: $g$, an :class:`assimilation.learn.AbstractPrior`.

    Example:
        >>> import jax.numpy as jnp, lineax as lx
        >>> import assimilation.learn as L
        >>> A = jnp.array([[1.0, 0.5], [0.0, 1.0], [1.0, 1.0]])
        >>> cost = L.CompositeCost(L.LeastSquares(lx.MatrixLinearOperator(A),
        ...                                       jnp.array([1.0, 0.0, 1.0])),
        ...                        L.L1(0.1))
        >>> sol = L.solve(cost, L.FISTA(), jnp.zeros(2), max_steps=500)
        >>> bool(sol.result == L.RESULTS.successful)
        True
    """

    smooth: AbstractSmooth
    prior: AbstractPrior

    def __init__(self, smooth, prior: AbstractPrior):
        if not isinstance(smooth, AbstractSmooth):
            if not callable(smooth):
                raise TypeError(
                    "`smooth` must be an AbstractSmooth (e.g. LeastSquares) or a "
                    f"callable f(x) -> scalar, got {type(smooth).__name__}."
                )
            smooth = SmoothFunction(smooth)
        if not isinstance(prior, AbstractPrior):
            raise TypeError(
                "`prior` must be an assimilation.learn prior (e.g. L1(0.1), TV(0.1)), "
                f"got {type(prior).__name__}."
            )
        self.smooth = smooth
        self.prior = prior

    def terms(self, x) -> dict:
        """The named terms ``{"smooth": f(x), "prior": g(x)}``."""
        return {"smooth": self.smooth.value(x), "prior": self.prior.value(x)}

    def value(self, x):
        """$F(x)$."""
        return self.smooth.value(x) + self.prior.value(x)

    def __call__(self, x):
        return self.value(x)


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
    """The state of a proximal method, carried from step to step.

    Attributes:
        x: the current estimate (feasible for the prior).
        objective: $F(x)$ (with the target prior weight, not the continued one).
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
    residual: jax.Array
    dual_residual: jax.Array
    step: jax.Array
    scale: jax.Array
    num_steps: jax.Array
    sweeps: jax.Array
    aux: Any


class AbstractProximalMethod(eqx.Module):
    """A proximal method: ``init(cost, x0) -> state``, ``step(cost, state) ->
    state`` (pure JAX, jit/vmap-able). Stopping rules live in :func:`solve`."""

    @abc.abstractmethod
    def init(self, cost: CompositeCost, x0) -> ProximalState: ...

    @abc.abstractmethod
    def step(self, cost: CompositeCost, state: ProximalState) -> ProximalState: ...


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

    def init(self, cost, x0):
        _check_cost(cost)
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
            fx = f.misfit(ax)
            aux = _ProxGradAux(ax, x0, ax, None, None, jnp.ones((), dtype))
            sweeps += 1
        else:
            fx, gx = f.value_and_grad(x0)
            aux = _ProxGradAux(None, x0, None, fx, gx, jnp.ones((), dtype))
            sweeps += 2
        obj = fx + cost.prior.value(x0)
        return ProximalState(
            x=x0,
            objective=obj,
            residual=jnp.asarray(jnp.inf, dtype),
            dual_residual=_zero(dtype),
            step=t,
            scale=self._scale(0, dtype),
            num_steps=_int(0),
            sweeps=_int(sweeps),
            aux=aux,
        )

    def step(self, cost, state):
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
            fx_new = f.misfit(ax_new)
            sweeps = sweeps + 2
        else:
            fy, gy = aux.fy, aux.gy

            def trial(t):
                xn = g.prox(_sub(y, _lin(t, gy)), t * scale)
                d = _sub(xn, y)
                fn = f.value(xn)
                ok = fn <= fy + _dot(gy, d) + 0.5 * _dot(d, d) / t
                return xn, fn, ok | ~jnp.isfinite(fy)

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
                t, x_new, fx_new, _, n_bt = lax.while_loop(
                    cond, body, (t, xn, fn, ok, _int(0))
                )
                sweeps = sweeps + 1 + n_bt
            else:
                x_new = g.prox(_sub(y, _lin(t, gy)), t * scale)
                fx_new = f.value(x_new)
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
        obj = fx_new + g.value(x_new)
        aux = _ProxGradAux(ax_new, y_new, ay_new, fy_new, gy_new, t_next)
        return ProximalState(
            x=x_new,
            objective=obj,
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
    """

    momentum = False


class FISTA(_ProximalGradient):
    r"""FISTA: proximal gradient at the extrapolated point
    $y_{k+1} = x_{k+1} + \frac{t_k - 1}{t_{k+1}}(x_{k+1} - x_k)$,
    $t_{k+1} = \tfrac12(1 + \sqrt{1 + 4t_k^2})$.

    $F(x_k) - F^\star = O(1/k^2)$ for convex $F$ with a step $\le 1/L$. Same
    attributes as :class:`ISTA`.
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

    def init(self, cost, x0):
        self._check(cost)
        f = cost.smooth
        dtype = _dtype(x0)
        s2 = jnp.square(jnp.asarray(f.sigma, dtype))
        aty = _lin(1.0 / s2, f.adjoint(f.target))
        z = cost.prior.prox(x0, jnp.asarray(1.0 / self.rho, dtype))
        az = f.forward(z)
        obj = f.misfit(az) + cost.prior.value(z)
        u = jtu.tree_map(jnp.zeros_like, x0)
        return ProximalState(
            x=z,
            objective=obj,
            residual=jnp.asarray(jnp.inf, dtype),
            dual_residual=jnp.asarray(jnp.inf, dtype),
            step=jnp.asarray(self.rho, dtype),
            scale=jnp.ones((), dtype),
            num_steps=_int(0),
            sweeps=_int(2),
            aux=_ADMMAux(z, u, aty, az),
        )

    def step(self, cost, state):
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
        obj = f.misfit(az) + g.value(z_new)
        r = _norm(_sub(x, z_new))
        s = rho * _norm(_sub(z_new, z))
        rho_next = rho * self.rho_factor
        # Scaled dual variable u = y/rho: rescale when rho changes.
        u_new = _lin(rho / rho_next, u_new)
        return ProximalState(
            x=z_new,
            objective=obj,
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
    """

    dual = True


class HQS(_Splitting):
    r"""Half-quadratic splitting: ADMM without the dual update, with a growing
    penalty $\rho_{k+1} = \rho_k\cdot$ ``rho_factor`` (so $x - z \to 0$ by the
    penalty alone). The usual splitting of plug-and-play schemes. Same attributes
    as :class:`ADMM` (default ``rho_factor=1.2``).
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

    def init(self, cost, x0):
        self._check(cost)
        f = cost.smooth
        dtype = _dtype(x0)
        k, _, _ = cost.prior.analysis()
        tau, sig, sweeps = self._steps(cost, x0)
        ax = f.forward(x0)
        q = jtu.tree_map(jnp.zeros_like, ax)
        p = jtu.tree_map(jnp.zeros_like, k(x0))
        obj = f.misfit(ax) + cost.prior.value(x0)
        return ProximalState(
            x=x0,
            objective=obj,
            residual=jnp.asarray(jnp.inf, dtype),
            dual_residual=jnp.asarray(jnp.inf, dtype),
            step=tau,
            scale=sig,  # the dual step, carried in `scale`
            num_steps=_int(0),
            sweeps=_int(sweeps + 1),
            aux=_CPAux(q, p, ax, x0, ax),
        )

    def step(self, cost, state):
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
        obj = f.misfit(ax_new) + cost.prior.value(x_new)
        return ProximalState(
            x=x_new,
            objective=obj,
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


class History(eqx.Module):
    """Per-step history of :func:`solve` (entry 0: the start; NaN after the stop).

    Attributes:
        objective: $F(x_k)$.
        residual, dual_residual: the method's residuals.
        step: the step size (or penalty).
        sweeps: cumulative sweeps of $A$/$A^\\top$ (or evaluations of $f$/$\\nabla f$).
    """

    objective: jax.Array
    residual: jax.Array
    dual_residual: jax.Array
    step: jax.Array
    sweeps: jax.Array


class Solution(eqx.Module):
    """The result of :func:`solve`.

    Attributes:
        value: the estimate $x$.
        result: a :class:`RESULTS` code.
        state: the final :class:`ProximalState`.
        history: the :class:`History`.
        stats: ``{"num_steps", "sweeps"}``.
    """

    value: Any
    result: RESULTS
    state: ProximalState
    history: History
    stats: dict


def _row(state):
    return (state.objective, state.residual, state.dual_residual, state.step)


def solve(
    cost: CompositeCost,
    method: AbstractProximalMethod,
    x0,
    *,
    max_steps: int = 1000,
    rtol: float = 1e-8,
    atol: float = 0.0,
    ftol: float | None = None,
    throw: bool = False,
) -> Solution:
    r"""Run ``method`` on ``cost`` from ``x0`` until its residuals are small.

    Stops at the first step where
    $\text{residual} \le \mathrm{atol} + \mathrm{rtol}\,\|x\|$ and
    $\text{dual residual} \le \mathrm{atol} + \mathrm{rtol}\,\|x\|$ (methods
    without a dual residual report 0), or, with ``ftol``, where
    $|F_k - F_{k-1}| \le \mathrm{ftol}\,|F_k|$; else after ``max_steps``
    (``RESULTS.max_steps_reached``). A non-finite objective stops with
    ``RESULTS.nonfinite`` and keeps the last finite iterate. A
    ``lax.while_loop``: jittable and vmappable (not reverse-differentiable; use
    :func:`unroll` to differentiate through the iterations).

    Args:
        cost: a :class:`CompositeCost`.
        method: :class:`ISTA`, :class:`FISTA`, :class:`ADMM`, :class:`HQS` or
            :class:`ChambollePock`.
        x0: the starting point (pytree like the cost's argument).
        max_steps: maximum number of steps (static).
        rtol, atol: residual tolerances.
        ftol: optional relative objective-change tolerance.
        throw: raise (``eqx.error_if``) unless the result is ``successful``.

    Returns:
        A :class:`Solution`.

    Raises:
        TypeError: if ``cost`` or ``method`` has the wrong type.
        ValueError: if ``max_steps`` is not an int >= 1.
    """
    _check_cost(cost)
    if not isinstance(method, AbstractProximalMethod):
        raise TypeError(
            "`method` must be ISTA(), FISTA(), ADMM(), HQS() or ChambollePock(), got "
            f"{type(method).__name__}."
        )
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an int >= 1, got {max_steps!r}.")
    state0 = method.init(cost, x0)
    dtype = _dtype(state0.objective)
    nan = jnp.full((max_steps + 1,), jnp.nan, dtype)
    hist0 = tuple(h.at[0].set(v) for h, v in zip((nan,) * 4, _row(state0), strict=True))
    sweeps0 = jnp.full((max_steps + 1,), -1, jnp.int32).at[0].set(state0.sweeps)

    def cond(c):
        state, _, _, done, _ = c
        return ~done & (state.num_steps < max_steps)

    def body(c):
        state, hist, sweeps, _, _ = c
        new = method.step(cost, state)
        finite = jnp.isfinite(new.objective)
        k = new.num_steps
        hist = tuple(h.at[k].set(v) for h, v in zip(hist, _row(new), strict=True))
        sweeps = sweeps.at[k].set(new.sweeps)
        tol = atol + rtol * _norm(new.x)
        conv = (new.residual <= tol) & (new.dual_residual <= tol)
        if ftol is not None:
            conv = conv | (
                jnp.abs(new.objective - state.objective)
                <= ftol * jnp.abs(new.objective)
            )
        keep = jtu.tree_map(
            lambda a, b: jnp.where(finite, a, b) if eqx.is_array(a) else a, new, state
        )
        keep = eqx.tree_at(lambda s: s.num_steps, keep, new.num_steps)
        return keep, hist, sweeps, conv | ~finite, ~finite

    state, hist, sweeps, done, bad = lax.while_loop(
        cond, body, (state0, hist0, sweeps0, jnp.asarray(False), jnp.asarray(False))
    )
    result = RESULTS.where(
        bad,
        RESULTS.nonfinite,
        RESULTS.where(done, RESULTS.successful, RESULTS.max_steps_reached),
    )
    if throw:
        state = result.error_if(state, result != RESULTS.successful)
    history = History(*hist, sweeps=sweeps)
    return Solution(
        value=state.x,
        result=result,
        state=state,
        history=history,
        stats={"num_steps": state.num_steps, "sweeps": state.sweeps},
    )


def unroll(cost: CompositeCost, method: AbstractProximalMethod, x0, *, n_steps: int):
    """Exactly ``n_steps`` steps of ``method`` (``lax.scan``), differentiable with
    ``jax.grad`` through every step (e.g. with respect to the prior's weight, or to
    the data, for bilevel learning).

    Returns:
        ``(x, objectives)``: the final iterate and $F$ at steps ``0..n_steps``.
    """
    _check_cost(cost)
    state = method.init(cost, x0)

    def body(s, _):
        s = method.step(cost, s)
        return s, s.objective

    final, objs = lax.scan(body, state, None, length=int(n_steps))
    return final.x, jnp.concatenate([state.objective[None], objs])
