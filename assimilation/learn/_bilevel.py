r"""Bilevel calibration: shared parameters above per-window analyses.

For windows $i = 1..n$ with records $y_i$ and shared parameters $\theta$ (physical
parameters, background/observation-error hyperparameters such as B's length scale
and R, network weights), the **inner problem** is the analysis of each window,

$$ v_i^\star(\theta) = \arg\min_v J_i(v;\theta), $$

(a 4D-Var cost built from a template by ``apply(theta, cost)``, minimised to
convergence by Gauss-Newton or L-BFGS, or unrolled for a fixed number of
iterations), and the **outer problem** minimises a validation loss

$$ \mathcal L(\theta) = \tfrac12\sum_i \|\rho_i(v_i^\star(\theta), \theta)\|^2, $$

with $\rho_i$ the whitened misfit of the analysis at *held-out* observations (other
sensors, or later times: a forecast misfit), or, with no held-out set, the inner
cost's own whitened residual at its optimum (the profile cost, whose minimiser is
the joint estimate).

**Hypergradients.** ``gradient="implicit"`` differentiates $v^\star(\theta)$ by
the implicit function theorem at the inner optimum,
$$ \frac{dv^\star}{d\theta} = -H^{-1}\,\partial_\theta\nabla_v J, $$
with $H$ the exact Hessian $\nabla^2_v J$ (Hessian-vector products by
forward-over-reverse AD, ``hessian="exact"``) or the Gauss-Newton matrix
$J_r^\top J_r$ of :func:`assimilation.gauss_newton_operator` (with the matching
mixed term $J_r^\top\partial_\theta r$, ``hessian="gauss_newton"``), solved by a
Krylov method (``lineax``; CG by default: both are symmetric, positive definite at
a minimum). The rule is a ``custom_jvp``, so forward mode (``jax.jacfwd``, the
outer Gauss-Newton's Jacobian) and reverse mode (``jax.grad``, training with
:func:`assimilation.learn.fit`) both work. It is **convergence-gated**: a
hypergradient is refused (an error at run time) unless the inner stopping rule
was met. ``gradient="unrolled"`` differentiates through ``n_unroll`` iterations of
the inner method instead (no gate; converges to the implicit hypergradient as the
iterations converge).

**Outer solution and uncertainty.** :func:`calibrate` runs Gauss-Newton
(Levenberg-Marquardt damped) on $\theta$ with the Jacobian of the stacked outer
residuals, and returns the Laplace covariance
$\big(J_\theta^\top J_\theta + P\big)^{-1}$ of $\theta$ ($P$ a prior precision):
the outer problem's Gauss-Newton Hessian. For the profile cost and the
Gauss-Newton hypergradient this is exactly the marginal posterior of $\theta$ of
the joint problem (the Schur complement of its Gauss-Newton Hessian).

**Joint estimation** (:func:`joint_estimate`) is the simple alternative: $\theta$
in the 4D-Var control of every window, one Gauss-Newton minimisation over
$(\theta, v_1, \dots, v_n)$.

References:
    Domke (2012), "Generic methods for optimization-based modeling", AISTATS
    (implicit vs unrolled hypergradients). Blondel et al. (2022), "Efficient and
    modular implicit differentiation", NeurIPS.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
from jax.flatten_util import ravel_pytree

from .._cost import AbstractCost, gauss_newton_operator
from .._methods import AbstractMethod, GaussNewton
from .._minimize import minimize
from .._stopping import RESULTS, StoppingRule
from ._windows import with_obs


GRADIENT_MODES = ("implicit", "unrolled")
HESSIANS = ("exact", "gauss_newton")


def _stop(tree):
    arrays, rest = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(jax.lax.stop_gradient(arrays), rest)


def _ravel_norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(tree)))


class InnerSolveError(RuntimeError):
    """An implicit hypergradient was asked of an unconverged inner problem."""


class Bilevel(eqx.Module):
    r"""A bilevel calibration problem over many windows (see the module docstring).

    Attributes:
        cost: the template inner cost of one window (an
            :class:`assimilation.AbstractCost` such as :class:`assimilation.FourDVar`
            whose observation values are swapped per window).
        apply: ``apply(theta, cost) -> cost``: the template with the shared
            parameters set (e.g. ``eqx.tree_at(lambda c: c.model.kappa, c,
            jnp.exp(theta["log_kappa"]))``), static.
        inner_mask: ``(n_times, n_sensors)`` booleans of the observations the
            inner analysis uses (``None``: all).
        outer_mask: the observations of the validation loss (``None``: the profile
            cost, the inner residual at its optimum).
        method: the inner :class:`assimilation.AbstractMethod`.
        stop: the inner :class:`assimilation.StoppingRule` (the convergence gate
            of the implicit hypergradient).
        gradient: ``"implicit"`` or ``"unrolled"`` (static).
        hessian: ``"exact"`` or ``"gauss_newton"`` (static, implicit mode).
        linear_solver: the ``lineax`` solver of the implicit system.
        n_unroll: inner iterations differentiated through (unrolled mode, static).
    """

    cost: AbstractCost
    apply: Callable = eqx.field(static=True)
    inner_mask: Any
    outer_mask: Any
    method: AbstractMethod
    stop: StoppingRule
    linear_solver: lx.AbstractLinearSolver
    gradient: str = eqx.field(static=True)
    hessian: str = eqx.field(static=True)
    n_unroll: int = eqx.field(static=True)

    def __init__(
        self,
        cost: AbstractCost,
        apply: Callable,
        *,
        inner_mask=None,
        outer_mask=None,
        method: AbstractMethod | None = None,
        stop: StoppingRule | None = None,
        gradient: str = "implicit",
        hessian: str = "exact",
        linear_solver: lx.AbstractLinearSolver | None = None,
        n_unroll: int = 10,
    ):
        if not isinstance(cost, AbstractCost):
            raise TypeError(
                "`cost` must be an assimilation.AbstractCost (e.g. FourDVar), got "
                f"{type(cost).__name__}."
            )
        if not callable(apply):
            raise TypeError(
                "`apply` must be a function `apply(theta, cost) -> cost`, got "
                f"{type(apply).__name__}."
            )
        if gradient not in GRADIENT_MODES:
            raise ValueError(
                f"`gradient` must be one of {GRADIENT_MODES}, got {gradient!r}."
            )
        if hessian not in HESSIANS:
            raise ValueError(f"`hessian` must be one of {HESSIANS}, got {hessian!r}.")
        shape = cost.obs.values.shape
        masks = {}
        for name, mask in (("inner_mask", inner_mask), ("outer_mask", outer_mask)):
            if mask is not None:
                mask = np.asarray(mask)
                if mask.dtype != bool or mask.shape != shape:
                    raise ValueError(
                        f"`{name}` must be booleans of the observations' shape "
                        f"(n_times, n_sensors) = {shape}, got dtype {mask.dtype} and "
                        f"shape {mask.shape}."
                    )
                mask = jnp.asarray(mask)
            masks[name] = mask
        if isinstance(n_unroll, bool) or not isinstance(n_unroll, int) or n_unroll < 1:
            raise ValueError(f"`n_unroll` must be an int >= 1, got {n_unroll!r}.")
        self.cost = cost
        self.apply = apply
        self.inner_mask = masks["inner_mask"]
        self.outer_mask = masks["outer_mask"]
        self.method = GaussNewton() if method is None else method
        self.stop = self.method.stopping_rule() if stop is None else stop
        self.gradient = gradient
        self.hessian = hessian
        self.linear_solver = (
            lx.CG(rtol=1e-10, atol=0.0, max_steps=1000)
            if linear_solver is None
            else linear_solver
        )
        self.n_unroll = n_unroll

    # ---------------------------------------------------------------- the costs

    def inner_cost(self, theta, values) -> AbstractCost:
        """The inner cost of a window: the template with ``theta`` and the record
        ``values`` (the outer observations set missing)."""
        if self.inner_mask is not None:
            values = jnp.where(self.inner_mask, values, jnp.nan)
        return with_obs(self.apply(theta, self.cost), values)

    def analysis(self, theta, values):
        r"""$v^\star(\theta)$ for one window, differentiable in ``theta``."""
        if self.gradient == "unrolled":
            cost = self.inner_cost(theta, values)
            sol = minimize(cost, self.method, n_iterations=self.n_unroll, throw=False)
            return sol.control
        return _implicit_analysis(theta, values, problem=self)

    def solve(self, theta, values):
        """The inner minimisation without derivatives: a
        :class:`assimilation.Solution` (``result`` says whether it converged)."""
        cost = self.inner_cost(_stop(theta), values)
        return minimize(cost, self.method, stop=self.stop, throw=False)

    def residual(self, theta, values):
        r"""The whitened outer residual $\rho(v^\star(\theta), \theta)$ of a window.

        With ``outer_mask``: $(H(x(v^\star)) - y)/\sigma_s$ at the held-out
        observations (zero elsewhere and where missing), $\sigma_s$ the template's
        (not ``theta``'s, so that a trained R cannot shrink the score).
        Without: the inner cost's whitened residual at $v^\star$ (profile cost).
        """
        v = self.analysis(theta, values)
        cost = self.inner_cost(theta, values)
        if self.outer_mask is None:
            return ravel_pytree(cost.residual(v))[0]
        hx = cost.forecast(v)[0]
        y = jnp.asarray(values, hx.dtype)
        valid = self.outer_mask & ~jnp.isnan(y)
        sigma = self.cost.obs.sigma.astype(hx.dtype)
        r = jnp.where(valid, (hx - jnp.where(valid, y, 0)) / sigma, 0)
        return r.ravel()

    def loss(self, theta, values):
        r"""$\tfrac12\|\rho\|^2$ of one window (a per-example loss for ``fit``:
        ``lambda th, ex, key: problem.loss(th, ex.obs)``)."""
        return 0.5 * jnp.sum(self.residual(theta, values) ** 2)


# --------------------------------------------------- the implicit hypergradient


def _gate(problem: Bilevel, sol):
    ok = sol.result == RESULTS.successful
    return eqx.error_if(
        sol.control,
        ~ok,
        "The inner problem did not converge (its stopping rule was not met), so "
        "the implicit-function hypergradient would be wrong: raise the inner "
        "`max_iterations`, loosen `gtol`, or use `gradient='unrolled'`.",
    )


def _grad_v(problem: Bilevel, theta, values, v):
    cost = problem.inner_cost(theta, values)
    return jax.grad(lambda w: cost(w))(v)


@eqx.filter_custom_jvp
def _implicit_analysis(theta, values, *, problem: Bilevel):
    return problem.solve(theta, values).control


@_implicit_analysis.def_jvp
def _implicit_analysis_jvp(primals, tangents, *, problem: Bilevel):
    theta, values = primals
    t_theta, _ = tangents
    sol = problem.solve(theta, values)
    v = _gate(problem, sol)
    if t_theta is None:
        return v, jtu.tree_map(jnp.zeros_like, v)
    # Only the floating leaves of theta have tangents; the rest is closed over.
    arrays, static = eqx.partition(theta, eqx.is_inexact_array)
    t_arrays = eqx.filter(t_theta, eqx.is_inexact_array)
    t_arrays = jtu.tree_map(
        lambda a, t: t if t is not None else (None if a is None else jnp.zeros_like(a)),
        arrays,
        t_arrays,
        is_leaf=lambda x: x is None,
    )
    v0 = jax.lax.stop_gradient(v)
    if problem.hessian == "exact":
        g = lambda a, w: _grad_v(problem, eqx.combine(a, static), values, w)
        _, b = jax.jvp(lambda a: g(a, v0), (arrays,), (t_arrays,))
        operator = lx.FunctionLinearOperator(
            lambda p: jax.jvp(lambda w: g(arrays, w), (v0,), (p,))[1],
            jax.eval_shape(lambda: v0),
            tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        )
    else:
        res = lambda a, w: problem.inner_cost(eqx.combine(a, static), values).residual(
            w
        )
        _, dr = jax.jvp(lambda a: res(a, v0), (arrays,), (t_arrays,))
        _, vjp = jax.vjp(lambda w: res(arrays, w), v0)
        (b,) = vjp(dr)
        operator = gauss_newton_operator(
            problem.inner_cost(eqx.combine(arrays, static), values), v0
        )
    rhs = jtu.tree_map(jnp.negative, b)
    dv = lx.linear_solve(operator, rhs, problem.linear_solver).value
    return v, dv


# ----------------------------------------------------------- outer Gauss-Newton


class Calibration(eqx.Module):
    """What :func:`calibrate` returns.

    Attributes:
        theta: the calibrated parameters.
        cov: the Laplace covariance of the floating leaves of ``theta`` (in
            ``jax.flatten_util.ravel_pytree`` order), ``(J^T J + P)^{-1}``.
        std: the standard deviations, a pytree shaped like ``theta``.
        loss: the outer loss $\\tfrac12\\sum_i\\|\\rho_i\\|^2$ at ``theta``.
        history: per outer iteration: ``loss``, ``step_norm``, ``damping``,
            ``elapsed``.
        converged: whether the relative loss decrease fell below ``ftol``.
    """

    theta: Any
    cov: jax.Array
    std: Any
    loss: float
    history: dict
    converged: bool


def _stacked_residual(problem: Bilevel, theta, obs):
    return jax.vmap(lambda y: problem.residual(theta, y))(obs).ravel()


def calibrate(
    problem: Bilevel,
    theta0,
    obs,
    *,
    n_iterations: int = 10,
    prior_precision=0.0,
    damping: float = 1e-3,
    ftol: float = 1e-8,
    callback: Callable | None = None,
) -> Calibration:
    r"""Solve the outer problem by Levenberg-Marquardt Gauss-Newton; Laplace std.

    With the stacked outer residual $\rho(\theta)$ of every window and its Jacobian
    $J_\theta$ (``jax.jacfwd`` through the hypergradient, one tangent per entry of
    $\theta$: meant for a few physical parameters or hyperparameters), each
    iteration solves $(J^\top J + P + \mu\,\mathrm{diag}(J^\top J))\,\delta =
    -(J^\top\rho + P(\theta - \theta_0))$, accepts the step if the loss decreases
    (then $\mu \leftarrow \mu/3$) and otherwise retries with $\mu \leftarrow 10\mu$.
    $P$ (``prior_precision``, a scalar or a vector over the entries) is a Gaussian
    prior $\mathcal N(\theta_0, P^{-1})$ on the floating leaves.

    Args:
        problem: the :class:`Bilevel` problem.
        theta0: the starting (and prior mean) parameters, a pytree.
        obs: ``(n_windows, n_times, n_sensors)`` records.
        n_iterations: outer iterations.
        prior_precision: $P$.
        damping: initial $\mu$.
        ftol: stop when the relative loss decrease is below it.
        callback: ``callback(k, theta, loss)`` after each accepted iteration.

    Returns:
        A :class:`Calibration` with the Laplace covariance
        $(J^\top J + P)^{-1}$ at the solution.
    """
    arrays0, static = eqx.partition(theta0, eqx.is_inexact_array)
    flat0, unravel = ravel_pytree(arrays0)
    obs = jnp.asarray(obs)
    prior = jnp.broadcast_to(jnp.asarray(prior_precision, flat0.dtype), flat0.shape)

    @jax.jit
    def residual(flat):
        return _stacked_residual(problem, eqx.combine(unravel(flat), static), obs)

    @jax.jit
    def linearise(flat):
        r = residual(flat)
        jac = jax.jacfwd(residual)(flat)
        return r, jac

    def total(flat, r):
        d = flat - flat0
        return 0.5 * float(jnp.sum(r**2)) + 0.5 * float(jnp.sum(prior * d**2))

    flat = flat0
    r, jac = linearise(flat)
    loss = total(flat, r)
    mu = float(damping)
    hist = {"loss": [loss], "step_norm": [0.0], "damping": [mu], "elapsed": [0.0]}
    t0 = time.perf_counter()
    converged = False
    for k in range(int(n_iterations)):
        jtj = jac.T @ jac
        g = jac.T @ r + prior * (flat - flat0)
        accepted = False
        for _ in range(10):
            a = jtj + jnp.diag(prior) + mu * jnp.diag(jnp.diag(jtj))
            step = -jnp.linalg.solve(a, g)
            trial = flat + step
            r_trial = residual(trial)
            loss_trial = total(trial, r_trial)
            if np.isfinite(loss_trial) and loss_trial <= loss:
                accepted = True
                break
            mu *= 10.0
        if not accepted:
            break
        decrease = loss - loss_trial
        flat, loss = trial, loss_trial
        mu = max(mu / 3.0, 1e-12)
        r, jac = linearise(flat)
        hist["loss"].append(loss)
        hist["step_norm"].append(float(jnp.linalg.norm(step)))
        hist["damping"].append(mu)
        hist["elapsed"].append(time.perf_counter() - t0)
        if callback is not None:
            callback(k + 1, eqx.combine(unravel(flat), static), loss)
        if decrease <= ftol * max(abs(loss), 1e-300):
            converged = True
            break
    cov = jnp.linalg.inv(jac.T @ jac + jnp.diag(prior))
    std = unravel(jnp.sqrt(jnp.clip(jnp.diag(cov), 0)))
    return Calibration(
        theta=eqx.combine(unravel(flat), static),
        cov=cov,
        std=std,
        loss=float(loss),
        history=hist,
        converged=converged,
    )


def laplace(
    residual_fn: Callable,
    params,
    data,
    *,
    prior_precision=0.0,
    scale_by_residual: bool = False,
    chunk_size: int = 8,
):
    r"""Laplace (Gauss-Newton) covariance of trained parameters.

    With the whitened residuals $r_i(\theta)$ = ``residual_fn(params, example_i)``
    of every example, $\Sigma = (\sum_i J_i^\top J_i + P)^{-1}$ over the floating
    leaves of ``params`` (dense: meant for up to a few thousand entries; each
    example costs one forward-mode pass per entry). With ``scale_by_residual`` the
    covariance is multiplied by $s^2 = \sum_i\|r_i\|^2/(n - p)$ (the residuals'
    own variance, for residuals that are not exactly whitened noise; entries that
    are exactly zero, as missing or unscored observations are, are not counted).

    Returns:
        ``(cov, std)``: the covariance (``ravel_pytree`` order) and the standard
        deviations shaped like ``params`` (``None`` at non-floating leaves).
    """
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    flat, unravel = ravel_pytree(arrays)
    prior = jnp.broadcast_to(jnp.asarray(prior_precision, flat.dtype), flat.shape)

    @eqx.filter_jit
    def chunk_normal(flat, batch):
        def one(example):
            f = lambda p: residual_fn(eqx.combine(unravel(p), static), example)
            r = f(flat)
            jac = jax.jacfwd(f)(flat)
            return jac.T @ jac, jnp.sum(r**2), jnp.sum(r != 0)

        jtj, rss, n = jax.vmap(one)(batch)
        return jnp.sum(jtj, 0), jnp.sum(rss), jnp.sum(n)

    n_ex = jtu.tree_leaves(data)[0].shape[0]
    normal = jnp.zeros((flat.size, flat.size), flat.dtype)
    rss, count = 0.0, 0
    for s in range(0, n_ex, chunk_size):
        batch = jtu.tree_map(lambda x, s=s: x[s : s + chunk_size], data)
        a, b, c = chunk_normal(flat, batch)
        normal, rss, count = normal + a, rss + float(b), count + int(c)
    cov = jnp.linalg.inv(normal + jnp.diag(prior))
    if scale_by_residual:
        cov = cov * rss / max(count - flat.size, 1)
    std = unravel(jnp.sqrt(jnp.clip(jnp.diag(cov), 0)))
    return cov, std


# --------------------------------------------------------------- joint estimation


class _JointCost(AbstractCost):
    """The costs of every window with the shared parameters in the control."""

    problem: Bilevel
    obs: jax.Array
    theta0: Any
    prior_std: Any
    control: None = None

    def _theta(self, w):
        arrays, static = eqx.partition(self.theta0, eqx.is_inexact_array)
        flat, unravel = ravel_pytree(arrays)
        return eqx.combine(unravel(flat + self.prior_std * w), static)

    def init(self):
        flat = ravel_pytree(eqx.filter(self.theta0, eqx.is_inexact_array))[0]
        theta = self.theta0
        v = jax.vmap(lambda y: self.problem.inner_cost(theta, y).init())(self.obs)
        return {"theta": jnp.zeros_like(flat), "windows": v}

    def _costs(self, control):
        theta = self._theta(control["theta"])
        return theta, lambda y: self.problem.inner_cost(theta, y)

    def residual(self, control):
        theta, cost_of = self._costs(control)
        r = jax.vmap(lambda y, v: cost_of(y).residual(v))(self.obs, control["windows"])
        return {"theta": control["theta"], "windows": r}

    def terms(self, control):
        theta, cost_of = self._costs(control)
        terms = jax.vmap(lambda y, v: cost_of(y).terms(v))(self.obs, control["windows"])
        out = {k: jnp.sum(v) for k, v in terms.items()}
        out["background"] = out.get("background", 0.0) + 0.5 * jnp.sum(
            control["theta"] ** 2
        )
        return out

    def innovations(self, control):
        theta, cost_of = self._costs(control)
        return jax.vmap(lambda y, v: cost_of(y).innovations(v))(
            self.obs, control["windows"]
        )


def joint_estimate(
    problem: Bilevel,
    theta0,
    obs,
    *,
    prior_std=1.0,
    method: AbstractMethod | None = None,
    stop: StoppingRule | None = None,
):
    r"""Joint estimation: $\theta$ in the 4D-Var control of every window.

    Minimises $\tfrac12\|w\|^2 + \sum_i J_i(v_i;\theta_0 + \sigma_\theta w)$ over
    $(w, v_1,\dots,v_n)$ in one Gauss-Newton run (every observation of every window
    is used; ``problem``'s masks are ignored except ``inner_mask``). The marginal
    Laplace std of $\theta$ is the Schur complement of the joint Gauss-Newton
    Hessian (one CG solve per window and entry of $\theta$).

    Returns:
        ``(theta, std, solution)``: the estimate, its marginal std (pytree like
        ``theta0``) and the :class:`assimilation.Solution`.
    """
    arrays, static = eqx.partition(theta0, eqx.is_inexact_array)
    flat0, unravel = ravel_pytree(arrays)
    prior_std = jnp.broadcast_to(jnp.asarray(prior_std, flat0.dtype), flat0.shape)
    obs = jnp.asarray(obs)
    cost = _JointCost(problem, obs, theta0, prior_std)
    method = GaussNewton() if method is None else method
    sol = minimize(cost, method, stop=stop, throw=False)
    w = sol.control["theta"]
    theta = eqx.combine(unravel(flat0 + prior_std * w), static)
    precision = _schur_precision(cost, sol.control, unravel, static)
    cov_w = jnp.linalg.inv(precision)
    std = unravel(prior_std * jnp.sqrt(jnp.clip(jnp.diag(cov_w), 0)))
    return theta, std, sol


@eqx.filter_jit
def _schur_precision(cost: _JointCost, control, unravel, static):
    r"""Marginal Gauss-Newton precision of the whitened $w$ of the joint problem:
    $I + \sum_i (J_{w,i}^\top J_{w,i} - B_i^\top A_i^{-1} B_i)$ with
    $A_i = J_{v,i}^\top J_{v,i}$ (window $i$'s Gauss-Newton matrix in its own
    control), $B_i = J_{v,i}^\top J_{w,i}$: the Schur complement of the joint
    matrix, one CG solve per window and entry of $w$."""
    w = control["theta"]
    solver = lx.CG(rtol=1e-11, atol=0.0, max_steps=10_000)

    def window(y, v):
        def res(w_, v_):
            return cost.problem.inner_cost(cost._theta(w_), y).residual(v_)

        r0, unravel_r = ravel_pytree(res(w, v))
        jw = jax.jacfwd(lambda w_: ravel_pytree(res(w_, v))[0])(w)
        _, vjp = jax.vjp(lambda v_: res(w, v_), v)
        op = gauss_newton_operator(cost.problem.inner_cost(cost._theta(w), y), v)
        cols = jax.vmap(lambda c: vjp(unravel_r(c))[0])(jw.T)
        sols = jax.vmap(lambda b: lx.linear_solve(op, b, solver).value)(cols)
        flat_b = jax.vmap(lambda b: ravel_pytree(b)[0])(cols)
        flat_x = jax.vmap(lambda x: ravel_pytree(x)[0])(sols)
        return jw.T @ jw - flat_b @ flat_x.T

    parts = jax.vmap(window)(cost.obs, control["windows"])
    return jnp.eye(w.size, dtype=w.dtype) + jnp.sum(parts, 0)
