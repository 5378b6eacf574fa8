r"""Unrolled assimilators: $K$ iterations on the 4D-Var cost with learned parameters.

An :class:`UnrolledAssimilator` maps a cost $J$ (a :class:`assimilation.FourDVar`)
and a first guess $v_0$ (the background $v = 0$, or a network's guess from the
observations) to an analysis $v_K$ by $K$ iterations

$$ z_{k+1} = T_k(\theta_k, z_k), $$

each of which evaluates $J$ and $\nabla J$ with the model (one forward and one
adjoint sweep over the window; Gauss-Newton steps add tangent-linear/adjoint pairs)
and updates the control with its own *untied* parameters $\theta_k$ (or one tied
$\theta$ for all, as a deep-equilibrium layer needs). The iterations available:

* :class:`GradientStep`: $v_{k+1} = y_k - \alpha_k\,d_k$ with a learned step
  $\alpha_k = e^{a_k} > 0$; Nesterov/FISTA momentum $y_k = v_k +
  \beta_k(v_k - v_{k-1})$, $\beta_k = \mathrm{sigmoid}(b_k)$; optionally a
  learned gradient modulator (a :class:`~assimilation.learn.GridCNN` on the grid
  taking the gradient, the state and the innovations mapped to the grid, as the
  4DVarNet solver does) $d_k = g_k + \mathrm{rms}(g_k)\,N_k(\cdot)$, and a
  state-conditioned step-size network $\alpha_k \leftarrow \alpha_k
  e^{m_k(\log J_b, \log J_o, \log\|g\|^2)}$.
* :class:`GaussNewtonStep`: $(\lambda_k I + J_o^\top J_o + \mu_k I)\,\delta =
  -\nabla J_{\lambda_k}$ by a fixed number of conjugate-gradient iterations (the
  CG iterations are layers of the network), learned damping $\mu_k =
  \mathrm{softplus}(c_k)$.
* :class:`LearnedContinuation`: background weights
  $\lambda_1 \ge \dots \ge \lambda_K > 0$
  (monotone by construction) in $J_\lambda = \lambda J_b + J_o$.
* a learned prior (:class:`NetworkPrior`: a network energy added to the cost;
  :class:`LearnedSquareRoot`: a learned factor of $B^{1/2}$);
* :class:`FirstGuess`: a network's first guess from the observations, with
  ``guard=True`` never returning a refinement whose $J$ exceeds that of the guess.

Every layer's $\nabla J$ is ``jax.vjp`` through :func:`dphys.simulate` (transposed
implicit solves, checkpointed time loop); training differentiates through the
layers (second order through the model's adjoint). How the iteration loop is
differentiated is the assimilator's ``adjoint``
(:class:`~assimilation.learn.FullUnroll`, :class:`~assimilation.learn.Truncated`,
:class:`~assimilation.learn.OneStep`, :class:`~assimilation.learn.Implicit`).

References:
    V. Monga, Y. Li and Y. C. Eldar (2021), "Algorithm unrolling: interpretable,
    efficient deep learning for signal and image processing", IEEE Signal
    Process. Mag. 38(2).
    R. Fablet et al. (2021), "Learning variational data assimilation models and
    solvers", J. Adv. Model. Earth Syst. 13 (4DVarNet).
    A. Beck and M. Teboulle (2009), "A fast iterative shrinkage-thresholding
    algorithm for linear inverse problems", SIAM J. Imaging Sci. 2(1).
"""

from __future__ import annotations

import abc
import math
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax.tree_utils as otu
from jax import lax

from dphys._tree import axpy
from dphys.testing import tree_dot

from . import _problem as P
from ._modes import AbstractIterationAdjoint, FullUnroll, Implicit, contraction_of
from ._networks import GridCNN, ScalarMLP, from_channels, rms, to_channels


def _safe_div(num, den):
    # Double `where`: a zero denominator (a converged CG) gives 0, and neither the
    # value nor the derivative becomes NaN.
    ok = den > 0
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# ------------------------------------------------------------------------ priors


class AbstractLearnedPrior(eqx.Module):
    r"""A learned prior: a change of control variable and/or an energy term.

    The objective the iterations minimise is
    $J_\theta(v) = \lambda\tfrac12\|v\|^2 + J_o(S_\theta(v)) + E_\theta(v)$
    with $S_\theta$ = :meth:`transform` (identity by default) and
    $E_\theta$ = :meth:`energy` (zero by default); the analysis control in the
    cost's own coordinates is $S_\theta(v)$.
    """

    def transform(self, cost, v):
        """$S_\\theta(v)$: the cost's whitened control (default: ``v``)."""
        return v

    def energy(self, cost, v):
        """$E_\\theta(v)$, a scalar (default 0)."""
        return jnp.zeros(())


class NetworkPrior(AbstractLearnedPrior):
    r"""A network energy on the initial state: $E(v) = \tfrac{w}{2}\,\|N(x_0(v))\|^2$
    divided by the number of grid values.

    Attributes:
        network: a :class:`GridCNN` from the state's fields (channels) to any
            number of channels.
        log_weight: $\log w$ (learned).
    """

    network: GridCNN
    log_weight: jax.Array

    def energy(self, cost, v):
        x0 = P.initial_state(cost, v)
        out = self.network(to_channels(x0))
        return 0.5 * jnp.exp(self.log_weight) * jnp.mean(jnp.square(out))


class LearnedSquareRoot(AbstractLearnedPrior):
    r"""A learned square root of $B$: $B_\theta^{1/2} = B^{1/2}(I + C_\theta)$.

    $C_\theta$ is a convolution on the grid (:class:`GridCNN` with zero-initialised
    output: $B_\theta = B$ before training) applied to the initial-state part of
    the whitened control: $S_\theta(v)_x = v_x + C_\theta(v_x)$, so the analysis
    is $x_0 = x_b + B^{1/2}(v_x + C_\theta v_x)$ and the background term stays
    $\tfrac12\|v\|^2$.

    Attributes:
        network: the convolution $C_\theta$ (state fields to state fields).
    """

    network: GridCNN

    def transform(self, cost, v):
        vx = P.state_control(v)
        dx = from_channels(self.network(to_channels(vx)), vx)
        return P.with_state_control(v, jtu.tree_map(jnp.add, vx, dx))


# --------------------------------------------------------------------- objective


class Point(eqx.Module):
    """The objective at one control: value, gradient and named terms."""

    value: jax.Array
    grad: Any
    background: jax.Array
    observations: jax.Array
    prior: jax.Array
    residual: jax.Array


class Objective(eqx.Module):
    r"""$J_\lambda(v) = \lambda J_b(v) + J_o(S(v)) + E(v)$ for a cost and a prior."""

    cost: Any
    prior: AbstractLearnedPrior | None

    def control(self, v):
        """The cost's whitened control of the objective's ``v``."""
        return v if self.prior is None else self.prior.transform(self.cost, v)

    def evaluate(self, v, weight=1.0, residual_map=None) -> Point:
        """Value and gradient: one forward and one adjoint sweep (the adjoint of
        ``residual_map(r)`` when given, see :func:`_problem.evaluate`)."""
        if self.prior is None:
            ev = P.evaluate(self.cost, v, residual_map)
            g_o, jo, r = ev.grad_observations, ev.observations, ev.residual
            e, g_e = jnp.zeros_like(jo), None
        else:
            u, vjp_s = jax.vjp(lambda w: self.prior.transform(self.cost, w), v)
            ev = P.evaluate(self.cost, u, residual_map)
            (g_o,) = vjp_s(ev.grad_observations)
            jo, r = ev.observations, ev.residual
            e, g_e = jax.value_and_grad(lambda w: self.prior.energy(self.cost, w))(v)
        jb = 0.5 * sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(v))
        grad = jtu.tree_map(lambda b, o: weight * b + o, v, g_o)
        if g_e is not None:
            grad = jtu.tree_map(jnp.add, grad, g_e)
        return Point(weight * jb + jo + e, grad, jb, jo, e, r)

    def value(self, v, weight=1.0):
        """$J_\\lambda(v)$: one forward sweep."""
        jb = 0.5 * sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(v))
        u = self.control(v)
        jo = P.cost_value(self.cost, u) - 0.5 * sum(
            jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(u)
        )
        e = 0.0 if self.prior is None else self.prior.energy(self.cost, v)
        return weight * jb + jo + e

    def gauss_newton(self, v, weight=1.0):
        r"""``(mv, point)``: $p \mapsto \lambda p + J^\top J p\ (+\nabla^2E\,p)$ with
        $J = \partial r(S(v))/\partial v$ (one tangent-linear and one adjoint sweep
        per product) and the :class:`Point` at ``v``."""
        res = lambda w: self.cost.obs_residual(self.control(w))
        r, vjp_r = jax.vjp(res, v)
        (g_o,) = vjp_r(r)
        jb = 0.5 * sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(v))
        jo = 0.5 * jnp.sum(jnp.square(r))
        grad = jtu.tree_map(lambda b, o: weight * b + o, v, g_o)
        e = jnp.zeros_like(jo)
        grad_e = None
        if self.prior is not None:
            grad_e = jax.grad(lambda w: self.prior.energy(self.cost, w))
            e = self.prior.energy(self.cost, v)
            grad = jtu.tree_map(jnp.add, grad, grad_e(v))

        def mv(p):
            _, jp = jax.jvp(res, (v,), (p,))
            (jtjp,) = vjp_r(jp)
            out = jtu.tree_map(lambda a, b: weight * a + b, p, jtjp)
            if grad_e is not None:
                out = jtu.tree_map(jnp.add, out, jax.jvp(grad_e, (v,), (p,))[1])
            return out

        return mv, Point(weight * jb + jo + e, grad, jb, jo, e, r)


def _stats(point: Point, step, inner=0):
    return {
        "cost": point.value,
        "background_cost": point.background,
        "obs_cost": point.observations,
        "grad_norm": otu.tree_norm(point.grad),
        "step_norm": otu.tree_norm(step),
        "inner_iterations": jnp.asarray(inner, jnp.int32),
    }


# ------------------------------------------------------------------------ layers


class AbstractLayer(eqx.Module):
    """One iteration of an unrolled assimilator with its own parameters.

    Subclasses implement ``init(objective, v0) -> carry``,
    ``step(objective, carry, weight) -> (carry, stats)`` and
    ``output(carry) -> v``, and ``sweeps`` (the model sweeps of one iteration:
    forward, tangent-linear or adjoint runs over the window).
    """

    @abc.abstractmethod
    def init(self, objective: Objective, v0): ...

    @abc.abstractmethod
    def step(self, objective: Objective, carry, weight): ...

    def output(self, carry):
        return carry["v"]

    @property
    @abc.abstractmethod
    def sweeps(self) -> int: ...


def _grid_features(objective: Objective, v, point: Point):
    """Channels for the gradient modulator: gradient, state, innovations on the grid."""
    cost = objective.cost
    g = P.state_control(point.grad)
    x0 = P.initial_state(cost, objective.control(v))
    innov = P.to_grid(cost, -point.residual).sum(axis=0)  # whitened, H^T(y - Hx)/sigma
    gc, xc = to_channels(g), to_channels(x0)
    xc = xc - jnp.mean(xc, axis=tuple(range(1, xc.ndim)), keepdims=True)
    feats = jnp.concatenate(
        [gc / rms(gc), xc / rms(xc), (innov / rms(innov))[None].astype(gc.dtype)]
    )
    return feats, g


class GradientStep(AbstractLayer):
    r"""$v_{k+1} = y_k - \alpha_k d_k$, $y_k = v_k + \beta_k(v_k - v_{k-1})$.

    Model sweeps per iteration: 2 (the forward run and the adjoint run of
    $\nabla J(y_k)$).

    Attributes:
        log_step: $\log\alpha_k$ (the step is positive by construction).
        momentum: $b_k$ with $\beta_k = \mathrm{sigmoid}(b_k)$, or ``None`` (plain
            gradient steps).
        modulator: a :class:`GridCNN` with $2n_f + 1$ input channels (gradient and
            state fields, whitened innovations on the grid) and $n_f$ outputs
            (the state fields), or ``None``. Acts on the initial-state part:
            $d_x = g_x + \mathrm{rms}(g_x)\,N(\cdot)$.
        step_net: a :class:`ScalarMLP` from $(\log J_b, \log J_o, \log\|g\|^2)$ to
            a log-multiplier of $\alpha_k$, or ``None``.
        gain: a learned observation-space preconditioner $C_k$, an
            ``(n_obs, n_obs)`` matrix over the flattened ``(n_times, n_sensors)``
            residuals, or ``None``: the observation part of the direction becomes
            $J_o^\top C_k r$ (same two sweeps). For a fixed sensor network and a
            linear model, one step from the background with $C =
            (I + J_oJ_o^\top)^{-1}$ and $\alpha = 1$ is the exact analysis
            $J_o^\top(I + J_oJ_o^\top)^{-1}d$ (the dual, observation-space form of
            4D-Var), so $C_k$ learns what the iterations cannot reach.
    """

    log_step: jax.Array
    momentum: jax.Array | None = None
    modulator: GridCNN | None = None
    step_net: ScalarMLP | None = None
    gain: jax.Array | None = None

    @property
    def sweeps(self) -> int:
        return 2

    def init(self, objective, v0):
        if self.momentum is None:
            return {"v": v0}
        return {"v": v0, "prev": v0}

    def step(self, objective, carry, weight):
        v = carry["v"]
        if self.momentum is None:
            y = v
        else:
            beta = jax.nn.sigmoid(self.momentum)
            y = axpy(beta, otu.tree_sub(v, carry["prev"]), v)
        if self.gain is None:
            point = objective.evaluate(y, weight)
        else:
            gain = self.gain
            point = objective.evaluate(
                y, weight, lambda r: (gain @ r.reshape(-1)).reshape(r.shape)
            )
        d = point.grad
        if self.modulator is not None:
            feats, g = _grid_features(objective, y, point)
            corr = from_channels(self.modulator(feats), g)
            scale = rms(to_channels(g))
            d = P.with_state_control(d, axpy(scale, corr, g))
        alpha = jnp.exp(self.log_step)
        if self.step_net is not None:
            tiny = jnp.finfo(point.value.dtype).tiny
            feats = jnp.stack(
                [
                    jnp.log(point.background + tiny),
                    jnp.log(point.observations + tiny),
                    jnp.log(jnp.square(otu.tree_norm(point.grad)) + tiny),
                ]
            )
            alpha = alpha * jnp.exp(5.0 * jnp.tanh(self.step_net(feats)[0] / 5.0))
        new = axpy(-alpha, d, y)
        out = {"v": new} if self.momentum is None else {"v": new, "prev": v}
        return out, _stats(point, otu.tree_sub(new, v))


class GaussNewtonStep(AbstractLayer):
    r"""One Gauss-Newton step with ``n_cg`` conjugate-gradient iterations:

    $$ (\lambda I + J_o^\top J_o + \mu_k I)\,\delta = -\nabla J_\lambda(v_k),
       \qquad v_{k+1} = v_k + \delta, $$

    CG from $\delta = 0$ for exactly ``n_cg`` iterations (the iterations are layers
    of the network and are differentiated as such), learned damping
    $\mu_k = \mathrm{softplus}(c_k)$ (Levenberg-Marquardt). Model sweeps per
    iteration: $2 + 2\,n_\mathrm{cg}$ (the linearisation's forward run and the
    gradient's adjoint run, then one tangent-linear and one adjoint run per CG
    iteration).

    Attributes:
        damping: $c_k$.
        n_cg: CG iterations (static).
    """

    damping: jax.Array
    n_cg: int = eqx.field(static=True, default=10)

    def __check_init__(self):
        if (
            isinstance(self.n_cg, bool)
            or not isinstance(self.n_cg, int)
            or (self.n_cg < 1)
        ):
            raise ValueError(f"`n_cg` must be an integer >= 1, got {self.n_cg!r}.")

    @property
    def sweeps(self) -> int:
        return 2 + 2 * self.n_cg

    def init(self, objective, v0):
        return {"v": v0}

    def step(self, objective, carry, weight):
        v = carry["v"]
        mv0, point = objective.gauss_newton(v, weight)
        mu = jax.nn.softplus(self.damping)
        mv = lambda p: axpy(mu, p, mv0(p))
        b = jtu.tree_map(jnp.negative, point.grad)
        dot = tree_dot

        def body(c, _):
            x, r, p, rr = c
            ap = mv(p)
            a = _safe_div(rr, dot(p, ap))
            x = axpy(a, p, x)
            r = axpy(-a, ap, r)
            rr_new = dot(r, r)
            p = axpy(_safe_div(rr_new, rr), p, r)
            return (x, r, p, rr_new), None

        zero = jtu.tree_map(jnp.zeros_like, b)
        (delta, _, _, _), _ = lax.scan(
            body, (zero, b, b, dot(b, b)), None, length=self.n_cg
        )
        new = jtu.tree_map(jnp.add, v, delta)
        return {"v": new}, _stats(point, delta, self.n_cg)


# ------------------------------------------------------------------ continuation


class LearnedContinuation(eqx.Module):
    r"""Background weights $\lambda_1 \ge \lambda_2 \ge \dots \ge \lambda_K > 0$.

    $\lambda_k = \lambda_\min + \sum_{j \ge k}\mathrm{softplus}(c_j)$: monotone
    non-increasing and positive for any parameters $c$.

    Attributes:
        raw: $c$, shape ``(K,)``.
        floor: $\lambda_\min \ge 0$ (static).
    """

    raw: jax.Array
    floor: float = eqx.field(static=True, default=0.0)

    @classmethod
    def geometric(cls, n_iterations: int, start: float = 10.0, end: float = 1.0):
        """A schedule from ``start`` to ``end`` in equal ratios (before training)."""
        if not (start >= end > 0):
            raise ValueError(f"Need start >= end > 0, got {start} and {end}.")
        lam = np.geomspace(start, end, n_iterations)
        inc = np.append(lam[:-1] - lam[1:], lam[-1])
        inc = np.maximum(inc, 1e-8)
        raw = inc + np.log(-np.expm1(-inc))  # softplus^{-1}
        return cls(jnp.asarray(raw, jnp.result_type(float)))

    def weights(self):
        inc = jax.nn.softplus(self.raw)
        return self.floor + jnp.cumsum(inc[::-1])[::-1]


# ------------------------------------------------------------------- first guess


class FirstGuess(eqx.Module):
    r"""A network's first guess $v_0 = N(\text{observations})$ of the state control.

    Input channels, per observation time $t_k$: $H^\top(y_k/\sigma)$ and
    $H^\top m_k$ (the mask of observed values), scattered onto the grid by the
    adjoint interpolation (no model run); output: the whitened initial-state
    control (one channel per state field). Other control entries start at 0.

    Attributes:
        network: a :class:`GridCNN` with ``2 * n_times`` inputs and ``n_fields``
            outputs.
    """

    network: GridCNN

    def __call__(self, cost):
        y, sigma = P.observed_values(cost)
        mask = ~jnp.isnan(y)
        z = jnp.where(mask, y / sigma, 0.0)
        feats = jnp.concatenate(
            [P.to_grid(cost, z), P.to_grid(cost, mask.astype(z.dtype))]
        )
        v0 = P.background(cost)
        vx = P.state_control(v0)
        out = from_channels(self.network(feats.astype(z.dtype)), vx)
        return P.with_state_control(v0, out)


# ------------------------------------------------------------------- assimilator


class UnrolledResult(eqx.Module):
    """The output of an :class:`UnrolledAssimilator`.

    Attributes:
        control: the analysis in the cost's whitened control (``dict``).
        first_guess: the starting control (cost coordinates).
        history: per-iteration arrays (leading axis $K$; empty for
            :class:`Implicit`): ``cost``, ``background_cost``, ``obs_cost``,
            ``grad_norm`` at the point each iteration evaluated, ``step_norm``,
            ``inner_iterations``.
        info: the gradient mode's diagnostics (``mode``; the fixed-point residual,
            iterations and convergence for :class:`Implicit`; ``accepted`` with a
            guard).
        sweeps: model sweeps spent (forward, tangent-linear or adjoint runs of the
            window); a traced count for :class:`Implicit`.
    """

    control: Any
    first_guess: Any
    history: Any
    info: dict
    sweeps: Any


def _iteration(theta, k, carry):
    # theta = (assimilator, cost): everything differentiable, each array once.
    assim, cost = theta
    objective = Objective(cost, assim.prior)
    return assim.layer_at(k).step(objective, carry, assim.weight_at(k))


class UnrolledAssimilator(eqx.Module):
    r"""$K$ learned iterations on a 4D-Var cost (see the module docstring).

    Call it as ``assimilator(cost, v0=None)`` to get an :class:`UnrolledResult`;
    :func:`to_analysis` turns that into an :class:`assimilation.Analysis`. Pure JAX:
    jit-, vmap- and grad-able (the gradient with respect to the assimilator's
    arrays is what training uses).

    Attributes:
        layers: an :class:`AbstractLayer` whose arrays carry a leading axis of
            length ``n_iterations`` (untied: one set per iteration; build with
            :func:`stack_layers`), or a single layer used at every iteration
            (``tied=True``).
        n_iterations: $K$ (static).
        tied: whether ``layers`` is one layer for all iterations (static).
        continuation: a :class:`LearnedContinuation` (untied only) or ``None``
            ($\lambda_k = 1$).
        prior: an :class:`AbstractLearnedPrior` or ``None``.
        first_guess: a :class:`FirstGuess` or ``None`` (start from the background).
        guard: return the first guess instead of the refinement when the
            refinement's $J$ is larger (one more forward sweep; static).
        adjoint: how the iteration loop is differentiated
            (:class:`~assimilation.learn.FullUnroll` by default).

    Raises:
        TypeError, ValueError: bad fields, with what was received and the fix.
    """

    layers: AbstractLayer
    n_iterations: int = eqx.field(static=True)
    tied: bool = eqx.field(static=True, default=False)
    continuation: LearnedContinuation | None = None
    prior: AbstractLearnedPrior | None = None
    first_guess: FirstGuess | None = None
    guard: bool = eqx.field(static=True, default=False)
    adjoint: AbstractIterationAdjoint = FullUnroll()

    def __check_init__(self):
        if not isinstance(self.layers, AbstractLayer):
            raise TypeError(
                "`layers` must be an AbstractLayer (e.g. GradientStep or "
                f"GaussNewtonStep), got {type(self.layers).__name__}."
            )
        K = self.n_iterations
        if isinstance(K, bool) or not isinstance(K, int) or K < 1:
            raise ValueError(f"`n_iterations` must be an integer >= 1, got {K!r}.")
        if not self.tied:
            for leaf in jtu.tree_leaves(self.layers):
                if eqx.is_array(leaf) and (leaf.ndim == 0 or leaf.shape[0] != K):
                    raise ValueError(
                        f"Untied `layers` need a leading axis of length n_iterations="
                        f"{K} on every array; got an array of shape {leaf.shape}. "
                        "Build them with `stack_layers`, or pass `tied=True`."
                    )
        if self.continuation is not None:
            if self.tied:
                raise ValueError(
                    "`continuation` changes the weight at every iteration, which a "
                    "tied (fixed-point) assimilator cannot; use tied=False."
                )
            if self.continuation.raw.shape != (K,):
                raise ValueError(
                    f"`continuation.raw` must have shape ({K},), got "
                    f"{self.continuation.raw.shape}."
                )
        if not isinstance(self.adjoint, AbstractIterationAdjoint):
            raise TypeError(
                "`adjoint` must be FullUnroll(), Truncated(k), OneStep() or "
                f"Implicit(), got {type(self.adjoint).__name__}."
            )
        for name, cls in (
            ("prior", AbstractLearnedPrior),
            ("first_guess", FirstGuess),
            ("continuation", LearnedContinuation),
        ):
            value = getattr(self, name)
            if value is not None and not isinstance(value, cls):
                raise TypeError(
                    f"`{name}` must be a {cls.__name__} or None, got "
                    f"{type(value).__name__}."
                )

    def layer_at(self, k) -> AbstractLayer:
        """The parameters of iteration ``k`` (an int or a traced index)."""
        if self.tied:
            return self.layers
        return jtu.tree_map(lambda x: x[k] if eqx.is_array(x) else x, self.layers)

    def iterations(self, start: int, stop: int) -> UnrolledAssimilator:
        """The assimilator made of iterations ``start .. stop-1`` (0-based).

        Untied layers (and a continuation schedule) are sliced; a tied assimilator
        just runs ``stop - start`` iterations. A first guess is kept only when
        ``start == 0``.
        """
        K = self.n_iterations
        if not (isinstance(start, int) and isinstance(stop, int)) or not (
            0 <= start < stop and (self.tied or stop <= K)
        ):
            raise ValueError(
                f"Need integers 0 <= start < stop <= n_iterations={K} (any stop for "
                f"a tied assimilator), got start={start!r}, stop={stop!r}."
            )
        cut = lambda x: x[start:stop] if eqx.is_array(x) else x
        layers = self.layers if self.tied else jtu.tree_map(cut, self.layers)
        cont = self.continuation
        if cont is not None:
            cont = LearnedContinuation(cont.raw[start:stop], cont.floor)
        return UnrolledAssimilator(
            layers,
            stop - start,
            tied=self.tied,
            continuation=cont,
            prior=self.prior,
            first_guess=self.first_guess if start == 0 else None,
            guard=self.guard,
            adjoint=self.adjoint,
        )

    def weight_at(self, k):
        if self.continuation is None:
            return 1.0
        return self.continuation.weights()[k]

    @property
    def sweeps_per_iteration(self) -> int:
        return self.layers.sweeps

    def sweeps(self) -> int:
        """Model sweeps of one analysis (static; for :class:`Implicit`, per
        iteration times ``max_iterations``, an upper bound)."""
        n = self.n_iterations
        mi = getattr(self.adjoint, "max_iterations", None)
        if mi is not None:
            n = mi
        return n * self.layers.sweeps + (1 if self.guard else 0)

    def __call__(self, cost, v0=None) -> UnrolledResult:
        P.check_cost(cost)
        if (
            self.first_guess is not None
            or isinstance(self.prior, NetworkPrior | LearnedSquareRoot)
            or _has_modulator(self.layers)
        ) and not P.has_state_control(cost):
            raise ValueError(
                "This assimilator has grid networks, which act on the initial-state "
                "control, but the cost does not control the initial state; declare "
                "`Control(initial_state=InitialState(B), ...)`."
            )
        objective = Objective(cost, self.prior)
        if v0 is None:
            v0 = (
                P.background(cost)
                if self.first_guess is None
                else self.first_guess(cost)
            )
        else:
            cost.control.check_control(v0, cost.state0)
        carry0 = self.layer_at(0).init(objective, v0)
        theta = (self, cost)
        carry, history, info = self.adjoint.run(
            _iteration, theta, carry0, self.n_iterations, self.tied
        )
        v = self.layers.output(carry)
        if "iterations" in info:
            sweeps = info["iterations"] * self.layers.sweeps
        else:
            sweeps = jnp.asarray(self.n_iterations * self.layers.sweeps)
        if self.guard:
            # J at the first guess is what the first iteration evaluated, unless a
            # continuation weighted it differently: then one more forward sweep.
            if history is not None and self.continuation is None:
                j0 = history["cost"][0]
            else:
                j0 = objective.value(v0)
                sweeps = sweeps + 1
            accepted = objective.value(v) <= j0
            v = jtu.tree_map(lambda a, b: jnp.where(accepted, a, b), v, v0)
            info = {**info, "accepted": accepted}
            sweeps = sweeps + 1
        return UnrolledResult(
            control=objective.control(v),
            first_guess=objective.control(v0),
            history=history,
            info=info,
            sweeps=sweeps,
        )


def _has_modulator(layer):
    return getattr(layer, "modulator", None) is not None


# ------------------------------------------------------------------ constructors


def stack_layers(make, n_iterations: int, *, key):
    """Untied layers: ``make(key) -> AbstractLayer`` called for ``n_iterations``
    keys and stacked along a leading axis (with ``equinox.filter_vmap``)."""
    keys = jr.split(key, n_iterations)
    return eqx.filter_vmap(make)(keys)


def _n_fields(cost):
    return len(jtu.tree_leaves(cost.state0))


def unrolled_gradient(
    cost,
    n_iterations: int,
    *,
    step_size: float,
    momentum: bool = False,
    modulator: bool = False,
    step_net: bool = False,
    obs_gain: bool = False,
    continuation: LearnedContinuation | None = None,
    tied: bool = False,
    width: int = 16,
    depth: int = 2,
    adjoint: AbstractIterationAdjoint | None = None,
    key=None,
) -> UnrolledAssimilator:
    r"""An assimilator of ``n_iterations`` :class:`GradientStep` iterations.

    Starts (before training) as gradient descent with step ``step_size`` on the
    whitened control (FISTA's momentum schedule $\beta_k = (t_k - 1)/t_{k+1}$ with
    ``momentum``; zero networks with ``modulator``/``step_net``; the identity
    observation-space gain with ``obs_gain``), so training starts from a classical
    method. ``cost`` gives the grid and the number of state fields
    for the networks (any window of the problem).
    """
    step_size = float(step_size)
    if not (step_size > 0 and math.isfinite(step_size)):
        raise ValueError(f"`step_size` must be positive and finite, got {step_size}.")
    key = jr.key(0) if key is None else key
    dtype = jnp.result_type(float)
    n_f = _n_fields(cost)
    grid = P.grid_of(cost)
    n_obs = cost.obs.n_times * cost.obs.n_sensors
    beta0 = _fista_momentum(n_iterations)

    def make(k_and_beta):
        k, beta = k_and_beta
        k1, k2 = jr.split(k)
        return GradientStep(
            log_step=jnp.asarray(math.log(step_size), dtype),
            momentum=(jnp.log(beta) - jnp.log1p(-beta)) if momentum else None,
            modulator=(
                GridCNN(grid, 2 * n_f + 1, n_f, width=width, depth=depth, key=k1)
                if modulator
                else None
            ),
            step_net=ScalarMLP(3, 1, width=width, key=k2) if step_net else None,
            gain=jnp.eye(n_obs, dtype=dtype) if obs_gain else None,
        )

    keys = jr.split(key, n_iterations)
    betas = jnp.asarray(beta0, dtype)
    if tied:
        layers = make((keys[0], jnp.asarray(0.5, dtype)))
    else:
        layers = eqx.filter_vmap(make)((keys, betas))
    return UnrolledAssimilator(
        layers,
        n_iterations,
        tied=tied,
        continuation=continuation,
        adjoint=FullUnroll() if adjoint is None else adjoint,
    )


def unrolled_gauss_newton(
    cost,
    n_iterations: int,
    *,
    n_cg: int = 10,
    damping: float = 1e-3,
    tied: bool = False,
    adjoint: AbstractIterationAdjoint | None = None,
) -> UnrolledAssimilator:
    r"""An assimilator of ``n_iterations`` :class:`GaussNewtonStep` iterations with
    ``n_cg`` CG iterations each and initial damping $\mu$ = ``damping``."""
    damping = float(damping)
    if not damping > 0:
        raise ValueError(f"`damping` must be > 0, got {damping}.")
    raw = damping + math.log(-math.expm1(-damping))  # softplus^{-1}
    dtype = jnp.result_type(float)
    shape = () if tied else (n_iterations,)
    layer = GaussNewtonStep(jnp.full(shape, raw, dtype), n_cg=n_cg)
    return UnrolledAssimilator(
        layer,
        n_iterations,
        tied=tied,
        adjoint=FullUnroll() if adjoint is None else adjoint,
    )


def _fista_momentum(n):
    t, out = 1.0, []
    for _ in range(n):
        t_next = (1 + math.sqrt(1 + 4 * t * t)) / 2
        out.append(min(max((t - 1) / t_next, 1e-3), 0.999))
        t = t_next
    return out


def first_guess_network(cost, *, width: int = 32, depth: int = 3, key) -> FirstGuess:
    """A :class:`FirstGuess` sized for ``cost``'s observations and state."""
    n_times = cost.obs.n_times
    net = GridCNN(
        P.grid_of(cost),
        2 * n_times,
        _n_fields(cost),
        width=width,
        depth=depth,
        kernel_size=5,
        zero_init=True,
        key=key,
    )
    return FirstGuess(net)


# ------------------------------------------------------------------------ analysis


def to_analysis(
    assimilator: UnrolledAssimilator,
    cost,
    *,
    v0=None,
    uncertainty: bool = False,
):
    r"""Run ``assimilator`` on ``cost`` and return an :class:`assimilation.Analysis`.

    The same object :func:`assimilation.assimilate` returns: analysed state and
    parameters, forecasts, observation-minus-analysis, the per-iteration
    :class:`assimilation.History` (entry 0 the first guess, entry $k$ the point
    iteration $k$ evaluated, the last entry the analysis) and, with
    ``uncertainty``, the Gauss-Newton (Laplace) posterior at the analysis, so
    plots, netCDF output and posterior tools work unchanged. The history and
    analysis are evaluated after the run (one more forward and adjoint sweep).
    """
    start = time.perf_counter()
    result = eqx.filter_jit(lambda a, c, v: a(c, v))(assimilator, cost, v0)
    v = result.control
    final = eqx.filter_jit(P.evaluate)(cost, v)
    elapsed = time.perf_counter() - start
    h = result.history
    keys = ("cost", "background_cost", "obs_cost", "grad_norm", "step_norm")
    last = {
        "cost": final.value(),
        "background_cost": final.background,
        "obs_cost": final.observations,
        "grad_norm": otu.tree_norm(final.grad()),
        "step_norm": jnp.zeros(()),
    }
    if h is None:
        start_ev = eqx.filter_jit(P.evaluate)(cost, result.first_guess)
        first = {
            "cost": start_ev.value(),
            "background_cost": start_ev.background,
            "obs_cost": start_ev.observations,
            "grad_norm": otu.tree_norm(start_ev.grad()),
            "step_norm": jnp.zeros(()),
        }
        history = {k: np.array([first[k], last[k]]) for k in keys}
        history["inner_iterations"] = np.array([0, int(result.info["iterations"])])
    else:
        history = {k: np.append(np.asarray(h[k]), np.asarray(last[k])) for k in keys}
        history["inner_iterations"] = np.append(np.asarray(h["inner_iterations"]), 0)
    n = len(history["cost"])
    history["elapsed"] = np.full(n, elapsed)
    termination = "max_iterations"
    if "converged" in result.info and bool(result.info["converged"]):
        termination = "gradient_tolerance"
    return P.make_analysis(
        cost,
        v,
        history,
        method=type(assimilator).__name__,
        termination=termination,
        uncertainty=uncertainty,
    )


def contraction(assimilator: UnrolledAssimilator, cost, v0=None, *, n_power: int = 30):
    r"""The contraction $\rho$ of the assimilator's last iteration at its output.

    The spectral radius of $\partial_z T_K$ at the final iterate, by ``n_power``
    steps of power iteration (each a tangent-linear pass through one iteration).
    Near a fixed point, truncating the gradient after $k$ iterations drops terms of
    order $\rho^k$: pass it to :meth:`Truncated.from_contraction`.
    """
    P.check_cost(cost)
    objective = Objective(cost, assimilator.prior)
    if v0 is None:
        v0 = (
            P.background(cost)
            if assimilator.first_guess is None
            else assimilator.first_guess(cost)
        )
    carry0 = assimilator.layer_at(0).init(objective, v0)
    theta = (assimilator, cost)
    K = assimilator.n_iterations
    if isinstance(assimilator.adjoint, Implicit):
        carry, _, _ = assimilator.adjoint.run(_iteration, theta, carry0, K, True)
    else:
        carry, _, _ = FullUnroll(levels=1).run(_iteration, theta, carry0, K, False)
    last = K - 1
    step = lambda t, k, z: _iteration(t, last, z)
    return contraction_of(step, theta, carry, n_power=n_power)
