r"""How the iterations of an unrolled assimilator are differentiated.

An unrolled assimilator applies $K$ iterations $z_{k+1} = T_k(\theta, z_k)$ (each a
step on the 4D-Var cost, whose own gradient comes from the model's adjoint).
Training needs $\partial\ell(z_K)/\partial\theta$. As :func:`dphys.simulate` offers
:class:`dphys.Checkpointed` and :class:`dphys.Unrolled` for its time loop, the
iteration loop offers:

* :class:`FullUnroll`: exact reverse mode through every iteration, checkpointed over
  iterations with :func:`dphys.nested_scan` (``levels`` $L$: memory
  $O(L K^{1/L})$ iterates, $L-1$ recomputations; ``levels=1`` stores all).
* :class:`Truncated`: reverse mode through the last $k$ iterations only; the first
  $K-k$ run without a derivative. Near a fixed point with contraction $\rho$ the
  dropped terms are $O(\rho^k)$, so ``Truncated.from_contraction(rho, eps)``
  takes the smallest $k$ with $\rho^k \le \varepsilon$ (measure $\rho$ with
  :func:`contraction`).
* :class:`OneStep`: the Jacobian-free gradient (Fung et al. 2022): the last
  iteration only.
* :class:`Implicit`: a deep-equilibrium layer (Bai, Kolter & Koltun 2019) for
  assimilators with tied parameters: the fixed point $z^* = T(\theta, z^*)$ is found
  by fixed-point or Anderson iteration and differentiated by the implicit function
  theorem, one adjoint linear solve
  $$ (I - \partial_z T^\top)\,w = \bar z, \qquad
     \bar\theta = \partial_\theta T^\top w $$
  by GMRES (:func:`dphys.krylov_solve`), memory independent of the number of
  iterations. It is **convergence-gated**: if the fixed-point residual or the
  adjoint solve's residual misses its tolerance, the gradient falls back to the
  truncated Neumann series $w = \sum_{j<k}(\partial_z T^\top)^j\bar z$ (what
  :class:`Truncated` with $k$ iterations gives at the fixed point).

Memory is predicted before a run from XLA's compiled memory analysis
(:func:`gradient_memory`, with :func:`assimilation.learn.predict_memory`), and
:func:`within_budget` picks the most exact mode that fits a budget.

References:
    S. Bai, J. Z. Kolter and V. Koltun (2019), "Deep equilibrium models", NeurIPS.
    S. W. Fung et al. (2022), "JFB: Jacobian-free backpropagation for implicit
    networks", AAAI.
    H. F. Walker and P. Ni (2011), "Anderson acceleration for fixed-point
    iterations", SIAM J. Numer. Anal. 49(4).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
from jax import lax

import dphys

from ._memory import MemoryBudgetError, predict_memory


# Codes written into `Implicit.report`'s cotangent (see `Implicit`).
REPORT_FIELDS = (
    "implicit",
    "fixed_point_residual",
    "adjoint_residual",
    "adjoint_iterations",
)


def _norm(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(tree)))


def _sub(a, b):
    return jtu.tree_map(jnp.subtract, a, b)


def _stop(tree):
    return jtu.tree_map(
        lambda x: lax.stop_gradient(x) if eqx.is_inexact_array(x) else x, tree
    )


def _static_int(name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}.")
    return value


def _scan(step, theta, carry, k0: int, n: int, levels: int):
    """``n`` iterations ``k0 .. k0+n-1`` of ``step``, checkpointed with ``levels``."""

    def body(c):
        k, z = c
        z, stats = step(theta, k, z)
        return (k + 1, z), stats

    if n == 0:
        return carry, None
    (_, carry), stats = dphys.nested_scan(body, (jnp.asarray(k0), carry), n, levels)
    return carry, stats


def _concat(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return jtu.tree_map(lambda x, y: jnp.concatenate([x, y]), a, b)


class AbstractIterationAdjoint(eqx.Module):
    """How the iteration loop of an unrolled assimilator is differentiated.

    ``run(step, theta, carry0, n_iterations, tied)`` applies
    ``carry, stats = step(theta, k, carry)`` for ``k = 0 .. n_iterations-1`` and
    returns ``(carry, stats, info)``, ``stats`` stacked over iterations and ``info``
    a dict of diagnostics. ``theta`` holds everything differentiable.
    """

    @abc.abstractmethod
    def run(self, step: Callable, theta, carry0, n_iterations: int, tied: bool): ...


class FullUnroll(AbstractIterationAdjoint):
    """Reverse mode through every iteration, checkpointed over iterations.

    Attributes:
        levels: nesting depth of the checkpointing (:func:`dphys.nested_scan`): 1
            stores every iteration's residuals (fastest, memory linear in $K$), 2
            stores $O(\\sqrt K)$ iterates at one extra forward pass; each iteration's
            own time loop keeps its cost's checkpointing.
    """

    levels: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        _static_int("levels", self.levels, 1)

    def run(self, step, theta, carry0, n_iterations, tied):
        carry, stats = _scan(step, theta, carry0, 0, n_iterations, self.levels)
        return carry, stats, {"mode": "full"}


class Truncated(AbstractIterationAdjoint):
    r"""Reverse mode through the last ``k`` iterations only.

    The first $K-k$ iterations run without a derivative (no memory), so the
    parameters of those iterations get no gradient. Near a fixed point with
    contraction $\rho$ the neglected part of the gradient is $O(\rho^k)$.

    Attributes:
        k: iterations differentiated (clipped to $K$).
        levels: checkpointing of those ``k`` iterations (as :class:`FullUnroll`).
    """

    k: int = eqx.field(static=True)
    levels: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        _static_int("k", self.k, 1)
        _static_int("levels", self.levels, 1)

    @classmethod
    def from_contraction(cls, rho: float, eps: float = 1e-3, *, levels: int = 2):
        r"""The smallest $k$ with $\rho^k \le \varepsilon$ for a measured $\rho < 1$."""
        rho, eps = float(rho), float(eps)
        if not (0.0 <= rho < 1.0):
            raise ValueError(
                f"`rho` must lie in [0, 1) (a contraction), got {rho}; the iteration "
                "does not contract, so truncation error does not decay: use "
                "FullUnroll()."
            )
        if not (0.0 < eps < 1.0):
            raise ValueError(f"`eps` must lie in (0, 1), got {eps}.")
        k = 1 if rho == 0.0 else max(1, math.ceil(math.log(eps) / math.log(rho)))
        return cls(k=k, levels=levels)

    def run(self, step, theta, carry0, n_iterations, tied):
        k = min(self.k, n_iterations)
        n_free = n_iterations - k
        stats0 = None
        carry = carry0
        if n_free:
            carry, stats0 = _scan(step, _stop(theta), _stop(carry0), 0, n_free, 1)
            carry, stats0 = _stop(carry), _stop(stats0)
        carry, stats1 = _scan(step, theta, carry, n_free, k, self.levels)
        return carry, _concat(stats0, stats1), {"mode": "truncated", "k": k}


class OneStep(AbstractIterationAdjoint):
    """Jacobian-free backpropagation: differentiate the last iteration only.

    Equal to ``Truncated(k=1)``: the cheapest gradient (one iteration's memory),
    exact only for parameters of the last iteration at a fixed point of a tied
    assimilator in the limit of a strongly contracting map.
    """

    def run(self, step, theta, carry0, n_iterations, tied):
        carry, stats, _ = Truncated(k=1, levels=1).run(
            step, theta, carry0, n_iterations, tied
        )
        return carry, stats, {"mode": "one_step", "k": 1}


# ---------------------------------------------------------------------- implicit


class Implicit(AbstractIterationAdjoint):
    r"""Deep-equilibrium gradient through the fixed point of a tied iteration.

    Forward: from the first guess, iterate $z \leftarrow T(\theta, z)$ (or its
    Anderson acceleration) until $\|T(z) - z\| \le$ ``tol`` $\cdot\max(\|z\|, 1)$ or
    ``max_iterations``. Backward: solve $(I - \partial_z T^\top)w = \bar z$ by GMRES
    to ``adjoint_rtol`` and return $\bar\theta = \partial_\theta T^\top w$. The
    gate: when the forward residual missed ``tol``, or the adjoint residual
    $\|(I-\partial_zT^\top)w - \bar z\|/\|\bar z\|$ missed ``adjoint_tol`` (or
    anything is non-finite), $w$ is the truncated Neumann sum of ``fallback_k``
    terms instead (the :class:`Truncated` gradient at the fixed point).

    With ``report=jnp.zeros(4)``, which branch ran is written into the
    *cotangent* of ``report`` (an array the forward pass never reads): in the
    gradient of a loss with respect to the assimilator, ``grads.adjoint.report``
    holds ``(implicit, fixed_point_residual, adjoint_residual,
    adjoint_iterations)`` with ``implicit`` 1.0 for the
    implicit-function-theorem gradient and 0.0 for the fallback (read it with
    :func:`implicit_report`). The forward result's ``info`` holds the fixed-point
    residual, the iteration count and whether it converged.

    Attributes:
        tol: relative fixed-point tolerance.
        max_iterations: cap on forward iterations (each one step of the assimilator:
            its model sweeps).
        anderson: Anderson acceleration memory ``m`` (0: plain fixed-point
            iteration).
        damping: Anderson mixing $\beta \in (0, 1]$.
        adjoint_rtol, adjoint_max_steps: GMRES tolerance and cap of the adjoint
            solve.
        adjoint_tol: the gate on the adjoint solve's true relative residual.
        fallback_k: Neumann terms of the fallback gradient.
        report: ``None`` (default), or ``jnp.zeros(4)`` to receive the gate's
            record in its cotangent (see above). Its "gradient" is a diagnostic,
            not a derivative: leave it out of optimiser updates and gradient
            checks.
    """

    tol: float = eqx.field(static=True, default=1e-10)
    max_iterations: int = eqx.field(static=True, default=200)
    anderson: int = eqx.field(static=True, default=5)
    damping: float = eqx.field(static=True, default=1.0)
    adjoint_rtol: float = eqx.field(static=True, default=1e-10)
    adjoint_max_steps: int = eqx.field(static=True, default=200)
    adjoint_tol: float = eqx.field(static=True, default=1e-6)
    fallback_k: int = eqx.field(static=True, default=10)
    report: jax.Array | None = None

    def __check_init__(self):
        _static_int("max_iterations", self.max_iterations, 1)
        _static_int("anderson", self.anderson, 0)
        _static_int("adjoint_max_steps", self.adjoint_max_steps, 1)
        _static_int("fallback_k", self.fallback_k, 1)
        for name in ("tol", "adjoint_rtol", "adjoint_tol"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0):
                raise ValueError(f"`{name}` must be a number > 0, got {value!r}.")
        if not (0.0 < self.damping <= 1.0):
            raise ValueError(f"`damping` must lie in (0, 1], got {self.damping!r}.")

    def run(self, step, theta, carry0, n_iterations, tied):
        if not tied:
            raise ValueError(
                "`adjoint=Implicit()` needs an assimilator with tied parameters (one "
                "step map T applied until its fixed point); build it with "
                "`tied=True`, or use FullUnroll()/Truncated() for untied layers."
            )
        # The options travel as static data; the report array (if any) rides with
        # the differentiated arguments, where its cotangent is written.
        cfg = eqx.tree_at(lambda m: m.report, self, None, is_leaf=_is_none)
        z, info = _equilibrium((theta, self.report, carry0), step, cfg)
        info = {"mode": "implicit", **info}
        return z, None, info


def _anderson_solve(f, z0, cfg: Implicit):
    """Fixed point of ``f`` on pytrees: plain or Anderson iteration (no derivative)."""
    flat0, unravel = jfu.ravel_pytree(z0)
    n = flat0.size
    m = cfg.anderson
    dtype = flat0.dtype

    def g(x):
        return jfu.ravel_pytree(f(unravel(x)))[0]

    def residual_ok(x, fx):
        res = jnp.linalg.norm(fx - x)
        return res, res <= cfg.tol * jnp.maximum(jnp.linalg.norm(x), 1.0)

    if m == 0:

        def cond(c):
            i, x, fx, res, ok = c
            return (i < cfg.max_iterations) & ~ok & jnp.isfinite(res)

        def body(c):
            i, _, fx, _, _ = c
            x = fx
            fx = g(x)
            res, ok = residual_ok(x, fx)
            return i + 1, x, fx, res, ok

        fx0 = g(flat0)
        res0, ok0 = residual_ok(flat0, fx0)
        i, x, fx, res, ok = lax.while_loop(cond, body, (1, flat0, fx0, res0, ok0))
        return unravel(x), i, res, ok

    # Anderson type II with memory m (Walker & Ni 2011), least squares on the
    # differences of residuals, Tikhonov-regularised for stability.
    xs = jnp.zeros((m, n), dtype)
    fs = jnp.zeros((m, n), dtype)
    fx0 = g(flat0)
    res0, ok0 = residual_ok(flat0, fx0)

    def cond(c):
        i, x, fx, xs, fs, res, ok = c
        return (i < cfg.max_iterations) & ~ok & jnp.isfinite(res)

    def body(c):
        i, x, fx, xs, fs, _, _ = c
        slot = (i - 1) % m
        xs = xs.at[slot].set(x)
        fs = fs.at[slot].set(fx)
        filled = jnp.minimum(i, m)
        valid = jnp.arange(m) < filled
        gres = jnp.where(valid[:, None], fs - xs, 0.0)  # residuals f(x_j) - x_j
        # Minimise ||sum_j a_j r_j|| subject to sum_j a_j = 1.
        gram = gres @ gres.T
        gram = gram + (1e-10 * jnp.trace(gram) / m + 1e-300) * jnp.eye(m, dtype=dtype)
        gram = jnp.where(valid[:, None] & valid[None, :], gram, jnp.eye(m, dtype=dtype))
        ones = valid.astype(dtype)
        sol = jnp.linalg.solve(gram, ones)
        alpha = jnp.where(valid, sol, 0.0)
        alpha = alpha / jnp.sum(alpha)
        x_new = cfg.damping * (alpha @ fs) + (1 - cfg.damping) * (alpha @ xs)
        fx_new = g(x_new)
        res, ok = residual_ok(x_new, fx_new)
        return i + 1, x_new, fx_new, xs, fs, res, ok

    i, x, fx, _, _, res, ok = lax.while_loop(
        cond, body, (1, flat0, fx0, xs, fs, res0, ok0)
    )
    return unravel(x), i, res, ok


def neumann_vjp(step, theta, z, cotangent, k: int):
    r"""The truncated Neumann gradient at ``z``:
    $\bar\theta = \partial_\theta T^\top\sum_{j<k}(\partial_z T^\top)^j\,\bar z$.

    For a fixed point of ``step(theta, 0, z)``; at an
    exact fixed point it equals reverse mode through ``k`` iterations started there.
    Returns ``(theta_bar, w)``, ``theta_bar`` holding ``None`` where ``theta`` has
    no floating-point array.
    """
    vjp = _theta_z_vjp(step, theta, z)

    def body(_, c):
        term, acc = c
        term = vjp(term)[1]
        return term, jtu.tree_map(jnp.add, acc, term)

    _, w = lax.fori_loop(0, k - 1, body, (cotangent, cotangent))
    return vjp(w)[0], w


def _theta_z_vjp(step, theta, z):
    """``w -> (theta_bar, z_bar)`` of ``z -> step(theta, 0, z)`` (floating leaves of
    ``theta`` only)."""
    diff, rest = eqx.partition(theta, eqx.is_inexact_array)
    _, vjp = jax.vjp(lambda t, x: step(eqx.combine(t, rest), 0, x)[0], diff, z)
    return vjp


@eqx.filter_custom_vjp
def _equilibrium(args, step, cfg):
    theta, _, z0 = args
    z, i, res, ok = _anderson_solve(lambda x: step(theta, 0, x)[0], z0, cfg)
    return z, {"iterations": i, "fixed_point_residual": res, "converged": ok}


@_equilibrium.def_fwd
def _equilibrium_fwd(perturbed, args, step, cfg):
    out = _equilibrium.fn(args, step, cfg)
    z, info = out
    return out, (z, info["converged"], info["fixed_point_residual"])


@_equilibrium.def_bwd
def _equilibrium_bwd(residuals, grad_obj, perturbed, args, step, cfg):
    # The fixed point does not depend on where the iteration started: z0 gets a
    # zero cotangent.
    z, fp_ok, fp_res = residuals
    theta, report, z0 = args
    z0_bar = eqx.filter(jtu.tree_map(jnp.zeros_like, z0), eqx.is_inexact_array)
    zbar = grad_obj[0]
    zbar = jtu.tree_map(
        lambda c, x: jnp.zeros_like(x) if c is None else c, zbar, z, is_leaf=_is_none
    )
    vjp = _theta_z_vjp(step, theta, z)

    def matvec(w):
        return _sub(w, vjp(w)[1])

    w, _, iters = dphys.krylov_solve(
        matvec,
        zbar,
        method="gmres",
        rtol=cfg.adjoint_rtol,
        max_steps=cfg.adjoint_max_steps,
    )
    zbar_norm = _norm(zbar)
    adj_res = _norm(_sub(matvec(w), zbar)) / jnp.where(zbar_norm > 0, zbar_norm, 1.0)
    ok = fp_ok & (adj_res <= cfg.adjoint_tol) & jnp.isfinite(adj_res)

    def neumann():
        def body(_, c):
            term, acc = c
            term = vjp(term)[1]
            return term, jtu.tree_map(jnp.add, acc, term)

        return lax.fori_loop(0, cfg.fallback_k - 1, body, (zbar, zbar))[1]

    w = lax.cond(ok, lambda: w, neumann)
    theta_bar = vjp(w)[0]
    if report is None:
        return theta_bar, None, z0_bar
    dtype = report.dtype
    report_bar = jnp.stack(
        [
            ok.astype(dtype),
            fp_res.astype(dtype),
            adj_res.astype(dtype),
            iters.astype(dtype),
        ]
    )
    return theta_bar, report_bar, z0_bar


def _is_none(x):
    return x is None


def implicit_report(grads) -> dict | None:
    """The gate's record from the gradient of a loss w.r.t. an assimilator.

    Returns ``{"mode": "implicit" | "truncated", "fixed_point_residual",
    "adjoint_residual", "adjoint_iterations"}`` read from
    ``grads.adjoint.report`` (see :class:`Implicit`), or ``None`` when the
    assimilator does not use :class:`Implicit`. Under ``vmap`` the fields are
    summed over the batch, so ``implicit`` counts the members that used it.
    """
    adjoint = getattr(grads, "adjoint", None)
    report = getattr(adjoint, "report", None)
    if report is None:
        return None
    values = [float(x) for x in jax.device_get(report)]
    out = dict(zip(REPORT_FIELDS, values, strict=True))
    out["mode"] = "implicit" if out.pop("implicit") >= 1.0 else "truncated"
    return out


# ---------------------------------------------------------------------- contraction


def contraction_of(step, theta, z, *, n_power: int = 30, key=None):
    r"""Spectral radius of $\partial_z T$ at ``z`` by power iteration (``n_power``
    Jacobian-vector products through the step, each one tangent-linear iteration).
    """
    key = jax.random.key(0) if key is None else key
    flat, unravel = jfu.ravel_pytree(z)
    u = jax.random.normal(key, flat.shape, flat.dtype)
    u = u / jnp.linalg.norm(u)
    f = lambda x: jfu.ravel_pytree(step(theta, 0, unravel(x))[0])[0]
    _, lin = jax.linearize(f, flat)

    def body(_, c):
        u, _ = c
        w = lin(u)
        nrm = jnp.linalg.norm(w)
        return w / jnp.where(nrm > 0, nrm, 1.0), nrm

    _, rho = lax.fori_loop(0, n_power, body, (u, jnp.zeros((), flat.dtype)))
    return rho


# -------------------------------------------------------------------------- memory


def gradient_memory(assimilator, loss, cost, truth=None) -> float:
    """Predicted memory (MB) of one gradient of ``loss`` w.r.t. ``assimilator`` on
    one window (:func:`assimilation.learn.predict_memory`: compiled, not run)."""

    def grad_fn(a, c, t):
        return eqx.filter_grad(lambda a_: loss(a_, c, truth=t))(a)

    return predict_memory(grad_fn, assimilator, cost, truth) / 2**20


def within_budget(
    assimilator,
    loss,
    cost,
    truth=None,
    *,
    budget_mb: float,
    candidates: Sequence[AbstractIterationAdjoint] | None = None,
):
    """The assimilator with the most exact gradient mode whose predicted memory fits.

    Tries ``candidates`` in order (default: ``FullUnroll(levels=1)``,
    ``FullUnroll(levels=2)``, ``FullUnroll(levels=3)``, ``Truncated(k)`` for
    ``k = K/2, K/4, ..``, ``OneStep()``), predicting each one's gradient memory
    with :func:`gradient_memory`, and returns ``(assimilator, table)`` with
    ``table`` the ``[(mode, mb), ...]`` tried.

    Raises:
        MemoryBudgetError: if no candidate fits ``budget_mb`` (a ``ValueError``).
    """
    if not (isinstance(budget_mb, int | float) and budget_mb > 0):
        raise ValueError(f"`budget_mb` must be a positive number, got {budget_mb!r}.")
    if candidates is None:
        K = assimilator.n_iterations
        candidates = [FullUnroll(levels=1), FullUnroll(levels=2), FullUnroll(levels=3)]
        k = K // 2
        while k >= 2:
            candidates.append(Truncated(k=k))
            k //= 2
        candidates.append(OneStep())
    table: list[tuple[Any, float]] = []
    for mode in candidates:
        trial = eqx.tree_at(lambda a: a.adjoint, assimilator, mode)
        mb = gradient_memory(trial, loss, cost, truth)
        table.append((mode, mb))
        if mb <= budget_mb:
            return trial, table
    tried = ", ".join(f"{type(m).__name__}: {mb:.1f} MB" for m, mb in table)
    raise MemoryBudgetError(
        f"No gradient mode fits `budget_mb`={budget_mb} MB ({tried}); raise the "
        "budget, use fewer iterations or a smaller batch."
    )
