r"""Training a model-error correction from sparse sensors: data, losses, protocols.

The data are windows of sparse, noisy sensor records and nothing else. Every
protocol starts from the same **analyses**: weak-constraint 4D-Var of each window
with the physics model (:func:`analyse_windows`), which gives the state
$x^a_j$ at the start of each sub-window and the free model-error forcing
$\eta^a_j$ of that sub-window, both estimated from the sensors alone.

Three protocols train the same hybrid model on the same data at the same budget
(optimizer steps):

* **one-step** (no solver in the graph): fit the hybrid's extra tendency at each
  analysis state to the forcing the weak-constraint analysis needed there,
  $$ \ell = \frac1{n}\sum_j \big\| F_\theta(x^a_j) - F_{\text{phys}}(x^a_j)
     - \eta^a_j \big\|^2 / s^2, $$
  the *reverse diagnostic*: the free forcings of weak-constraint 4D-Var over many
  windows as a training signal ($F$ is the model's full right-hand side, so a
  physical parameter of the hybrid is fitted too; $s$ a tendency scale).
* **stop-gradient rollouts**: roll the hybrid out from the analyses over $m$ steps
  and score the sensor misfit, with every solver output stop-gradiented
  (:func:`assimilation.learn.rollout` with ``gradient="stop_gradient"``).
* **solver in the loop**: the same rollouts and loss, differentiated through the
  implicit steps' transposed solves and the checkpointed loop, with a rollout-length
  curriculum $m = 5, 10, 20, 40$ (the budget split evenly over the stages).

The rollout loss is the mean squared whitened sensor misfit
$$ \ell_m = \frac1{|\mathcal O|}\sum_{(k,s)\in\mathcal O}
   \Big(\frac{H_s(x_\theta(t_k)) - y_{k,s}}{\sigma_s}\Big)^2 $$
over the observations $\mathcal O$ inside the rollouts (non-overlapping segments of
$m$ steps starting at analysis times), optionally restricted to a sensor subset (held
out from the analyses for validation). Dense truths appear only in the twin
diagnostics (:func:`forecast_rmse`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax

import dphys

from .._control import Control, InitialState, ModelError
from .._cost import FourDVar
from .._methods import GaussNewton
from .._minimize import minimize
from ._hybrid import SubwindowForcing, rollout
from ._train import fit
from ._windows import _check_cost, with_obs


PROTOCOLS = ("one_step", "stop_gradient", "solver")


class ModelErrorData(eqx.Module):
    """Training data of the model-error protocols (leading window axis).

    Attributes:
        obs: sensor records ``(n_windows, n_times, n_sensors)`` (NaN = missing).
        analyses: weak-constraint analysis states at ``analysis_steps`` (state
            pytree, leaves ``(n_windows, n_analyses, *grid)``).
        forcings: the analysed free forcings $\\eta^a_j$ of the sub-windows
            (``(n_windows, n_analyses - 1, *grid)``), in state units per time unit.
        analysis_steps: the model steps of ``analyses`` from the window start
            (static): the sub-window boundaries, ``0`` and ``n_steps`` included.
    """

    obs: jax.Array
    analyses: Any
    forcings: Any
    analysis_steps: tuple[int, ...] = eqx.field(static=True)

    @property
    def n_windows(self) -> int:
        return int(self.obs.shape[0])

    def __getitem__(self, index) -> ModelErrorData:
        return jtu.tree_map(lambda x: x[index], self)

    def analysis_at(self, step: int):
        """The analysis states at model step ``step`` (one of ``analysis_steps``)."""
        if step not in self.analysis_steps:
            raise ValueError(
                f"`step` = {step} is not an analysis step; the analyses are at "
                f"{self.analysis_steps}."
            )
        i = self.analysis_steps.index(step)
        axis = self.obs.ndim - 2
        return jtu.tree_map(lambda x: jnp.take(x, i, axis=axis), self.analyses)


# --------------------------------------------------------------------- analyses


def weak_constraint_cost(cost: FourDVar, model_error_cov, n_subwindows: int):
    """The template cost with a weak-constraint control (initial state + forcings).

    Args:
        cost: a strong-constraint template :class:`assimilation.FourDVar` whose
            control holds the initial state.
        model_error_cov: $Q$, the covariance of each sub-window's forcing.
        n_subwindows: the number of sub-windows (divides ``cost.n_steps``).
    """
    _check_cost(cost)
    if cost.control.initial_state is None:
        raise ValueError(
            "`cost` must control the initial state (an InitialState in its Control): "
            "the analyses start the rollouts."
        )
    control = Control(
        initial_state=InitialState(cost.control.initial_state.covariance),
        model_error=ModelError(model_error_cov, n_windows=n_subwindows),
    )
    return FourDVar(
        cost.model,
        cost.stepper,
        cost.state0,
        cost.obs,
        control,
        dt=cost.dt,
        n_steps=cost.n_steps,
        t0=cost.t0,
        adjoint=cost.adjoint,
        obs_op=cost.obs_op,
        throw=False,
    )


class _Analyser(eqx.Module):
    cost: FourDVar
    method: Any
    n_iterations: int = eqx.field(static=True)

    def __call__(self, values):
        cost = with_obs(self.cost, values)
        v, _ = minimize(cost, self.method, n_iterations=self.n_iterations)
        x0 = cost.initial_state(v)
        eta = cost.forcings(v)
        n_sub = cost.control.model_error.n_windows
        m = cost.n_steps // n_sub
        states, x = [x0], x0
        model = cost.model_at(v)
        for j in range(n_sub):
            forced = dphys.Augmented(
                model, forcing=jtu.tree_map(lambda f, j=j: f[j], eta)
            )
            x = dphys.simulate(
                forced,
                cost.stepper,
                x,
                dt=cost.dt,
                n_steps=m,
                t0=cost.t0 + j * m * cost.dt,
                throw=False,
            ).final
            states.append(x)
        analyses = jtu.tree_map(lambda *xs: jnp.stack(xs), *states)
        return analyses, eta


@eqx.filter_jit
def _analyse_chunk(analyser, values):
    return jax.vmap(analyser)(values)


def analyse_windows(
    cost: FourDVar,
    obs,
    *,
    model_error_cov,
    n_subwindows: int,
    method=None,
    n_iterations: int = 1,
    chunk_size: int = 16,
) -> ModelErrorData:
    r"""Weak-constraint 4D-Var analyses of many windows with the physics model.

    For each window's record ``obs[i]``, minimises
    $J(v) = \tfrac12\|v_x\|^2 + \tfrac12\sum_j\|w_j\|^2 + J_o$ over the initial
    state $x_0 = x_b + B^{1/2}v_x$ and one constant forcing $\eta_j = Q^{1/2}w_j$
    per sub-window (``n_subwindows`` of them), with ``n_iterations`` iterations of
    ``method`` (Gauss-Newton by default: one iteration solves a linear model's
    quadratic problem up to its CG tolerance). Windows are vmapped in chunks.

    Args:
        cost: the strong-constraint template cost (see
            :func:`weak_constraint_cost`).
        obs: ``(n_windows, n_times, n_sensors)`` records (e.g. ``Windows.obs``).
        model_error_cov: $Q$.
        n_subwindows: sub-windows per window.
        method: an :class:`assimilation.AbstractMethod` (default
            ``GaussNewton(inner_max_steps=60, inner_rtol=1e-6)``).
        n_iterations: outer iterations (static).
        chunk_size: windows per compiled vmapped chunk.

    Returns:
        A :class:`ModelErrorData` with the analyses at the sub-window boundaries
        and the analysed forcings.
    """
    obs = jnp.asarray(obs)
    if obs.ndim != 3 or obs.shape[1:] != cost.obs.values.shape:
        raise ValueError(
            "`obs` must have shape (n_windows, n_times, n_sensors) with the "
            f"template's (n_times, n_sensors) = {cost.obs.values.shape}, got "
            f"{obs.shape}."
        )
    n_subwindows = int(n_subwindows)
    if n_subwindows < 1 or cost.n_steps % n_subwindows:
        raise ValueError(
            f"`n_subwindows` must divide the window's {cost.n_steps} steps, got "
            f"{n_subwindows}."
        )
    method = (
        GaussNewton(inner_max_steps=60, inner_rtol=1e-6) if method is None else method
    )
    wc = weak_constraint_cost(cost, model_error_cov, n_subwindows)
    analyser = _Analyser(wc, method, int(n_iterations))
    n = obs.shape[0]
    chunk = min(int(chunk_size), n)
    parts = []
    for start in range(0, n, chunk):
        values = obs[start : start + chunk]
        m = values.shape[0]
        if m < chunk:
            pad = jnp.broadcast_to(values[:1], (chunk - m, *values.shape[1:]))
            values = jnp.concatenate([values, pad])
        out = _analyse_chunk(analyser, values)
        parts.append(jtu.tree_map(lambda x, m=m: x[:m], out))
    analyses, forcings = (
        parts[0]
        if len(parts) == 1
        else jtu.tree_map(lambda *x: jnp.concatenate(x), *parts)
    )
    m = cost.n_steps // n_subwindows
    return ModelErrorData(
        obs=obs,
        analyses=analyses,
        forcings=forcings,
        analysis_steps=tuple(j * m for j in range(n_subwindows + 1)),
    )


# ------------------------------------------------------------------------- losses


class _Observe(eqx.Module):
    obs_op: Any

    def __call__(self, t, state):
        return self.obs_op(state)


@dataclasses.dataclass(frozen=True)
class _Segment:
    start: int  # model step of the analysis it starts from
    index: int  # position of that analysis in analysis_steps
    save: tuple[int, ...]  # saved steps, relative to start
    rows: np.ndarray  # observation rows scored
    lo: np.ndarray  # per row: position in `save` of the earlier bracketing step
    hi: np.ndarray
    alpha: np.ndarray


def _segments(cost, analysis_steps, horizon: int) -> tuple[_Segment, ...]:
    sampling = cost.sampling
    steps = np.asarray(sampling.steps)
    lo_step = steps[np.asarray(sampling.lo)]
    hi_step = steps[np.asarray(sampling.hi)]
    alpha = np.asarray(sampling.alpha)
    out = []
    for i, s in enumerate(analysis_steps):
        if s % horizon or s + horizon > cost.n_steps:
            continue
        rows = np.flatnonzero((lo_step > s) & (hi_step <= s + horizon))
        if rows.size == 0:
            continue
        save = tuple(sorted({*(lo_step[rows] - s), *(hi_step[rows] - s)}))
        pos = {k: j for j, k in enumerate(save)}
        out.append(
            _Segment(
                start=int(s),
                index=i,
                save=tuple(int(k) for k in save),
                rows=rows,
                lo=np.asarray([pos[k - s] for k in lo_step[rows]]),
                hi=np.asarray([pos[k - s] for k in hi_step[rows]]),
                alpha=alpha[rows],
            )
        )
    if not out:
        raise ValueError(
            f"No rollout of {horizon} steps from the analyses "
            f"{tuple(analysis_steps)} reaches an observation: use a horizon that "
            "divides an analysis step and spans an observation time."
        )
    return tuple(out)


def rollout_misfit(
    model,
    cost,
    example: ModelErrorData,
    *,
    horizon: int,
    gradient: str = "solver",
    sensors=None,
):
    r"""Whitened sensor misfits of rollouts of ``model`` from one window's analyses.

    The rollouts start at the analysis times that are multiples of ``horizon`` and
    run ``horizon`` steps (non-overlapping segments), scored at every observation
    time inside them (time interpolation as in the template cost).

    Args:
        model: the hybrid (a :class:`dphys.AbstractModel` or a
            :class:`assimilation.learn.SubwindowForcing`).
        cost: the template cost (sensors, times, $\sigma_s$, stepper, window).
        example: one window of :class:`ModelErrorData` (no leading axis).
        horizon: rollout length in steps (static).
        gradient: ``"solver"`` or ``"stop_gradient"`` (see
            :func:`assimilation.learn.rollout`).
        sensors: optional ``(n_sensors,)`` booleans: the sensors scored.

    Returns:
        ``(residuals, weights)``: whitened residuals of the scored observations
        (zero where missing or not scored) and their 0/1 weights, flattened.
    """
    segments = _segments(cost, example.analysis_steps, int(horizon))
    observe = _Observe(cost.obs_op)
    sigma = cost.obs.sigma
    res, wts = [], []
    for seg in segments:
        x = jtu.tree_map(lambda a, i=seg.index: a[i], example.analyses)
        ys = rollout(
            model,
            cost.stepper,
            x,
            dt=cost.dt,
            n_steps=int(horizon),
            t0=cost.t0 + seg.start * cost.dt,
            save_steps=seg.save,
            observe=observe,
            gradient=gradient,
            adjoint=cost.adjoint,
            throw=False,
        )
        a = jnp.asarray(seg.alpha, ys.dtype)[:, None]
        hx = (1 - a) * ys[seg.lo] + a * ys[seg.hi]
        y = example.obs[seg.rows].astype(hx.dtype)
        valid = ~jnp.isnan(y)
        if sensors is not None:
            valid = valid & jnp.asarray(sensors)[None, :]
        r = jnp.where(valid, (hx - jnp.where(valid, y, 0)) / sigma.astype(hx.dtype), 0)
        res.append(r.ravel())
        wts.append(valid.ravel().astype(hx.dtype))
    return jnp.concatenate(res), jnp.concatenate(wts)


def rollout_loss(
    cost, *, horizon: int, gradient: str = "solver", sensors=None
) -> Callable:
    """``loss_fn(model, example, key)`` for :func:`assimilation.learn.fit`: the mean
    squared whitened sensor misfit of :func:`rollout_misfit` (about 1 at the noise
    level), with ``{"misfit": ...}`` as a diagnostic."""

    def loss_fn(model, example, key):
        r, w = rollout_misfit(
            model, cost, example, horizon=horizon, gradient=gradient, sensors=sensors
        )
        value = jnp.sum(r**2) / jnp.maximum(jnp.sum(w), 1)
        return value, {"misfit": value}

    return loss_fn


def one_step_loss(physics: dphys.AbstractModel, *, scale: float = 1.0, t0=0.0, dt=1.0):
    r"""``loss_fn(model, example, key)``: the one-step (tendency) loss.

    $\frac1n\sum_j\|F_\theta(x^a_j) - F_{\text{phys}}(x^a_j) - \eta^a_j\|^2/s^2$ with
    $n$ the number of entries, $F$ the right-hand side
    (:meth:`dphys.AbstractModel.vector_field`) at the sub-window starts
    $t_j$ = ``t0 + analysis_steps[j] * dt`` and $s$ = ``scale``. No solver in the
    graph.
    """

    def loss_fn(model, example, key):
        if isinstance(model, SubwindowForcing):
            raise TypeError(
                "The one-step protocol trains per-step hybrids (dphys.Augmented); "
                "train a SubwindowForcing with rollouts."
            )
        steps = example.analysis_steps[:-1]
        total, count = 0.0, 0
        for j, s in enumerate(steps):
            t = t0 + s * dt
            x = jtu.tree_map(lambda a, j=j: a[j], example.analyses)
            eta = jtu.tree_map(lambda a, j=j: a[j], example.forcings)
            d = jtu.tree_map(
                lambda fm, fp, e: (fm - fp - e) / scale,
                model.vector_field(t, x),
                _stop_tree(physics.vector_field(t, x)),
                eta,
            )
            total = total + sum(jnp.sum(v**2) for v in jtu.tree_leaves(d))
            count += sum(v.size for v in jtu.tree_leaves(d))
        value = total / count
        return value, {"tendency": value}

    return loss_fn


def _stop_tree(tree):
    return jtu.tree_map(jax.lax.stop_gradient, tree)


# ---------------------------------------------------------------------- training


class ProtocolResult(eqx.Module):
    """What :func:`train_correction` returns.

    Attributes:
        model: the trained hybrid (``build(params)``).
        params: the trained parameters (the best of the last stage).
        history: ``{"stage", "horizon", "step", "train_loss", "time_s"}`` lists,
            one entry per epoch over all stages, plus ``"stability"`` (one
            :class:`assimilation.learn.Stability` per stage when checked).
        stats: ``train_s`` (wall time, compilation included), ``steps``,
            ``step_memory_bytes`` (largest compiled training step), ``protocol``.
    """

    model: Any
    params: Any
    history: dict
    stats: dict


def _identity(x):
    return x


def _built(loss_fn, build):
    if build is _identity:
        return loss_fn
    return lambda params, example, key: loss_fn(build(params), example, key)


def train_correction(
    params,
    data: ModelErrorData,
    cost,
    *,
    protocol: str,
    n_steps: int,
    key,
    build: Callable | None = None,
    physics: dphys.AbstractModel | None = None,
    optimizer: optax.GradientTransformation | None = None,
    batch_size: int = 8,
    curriculum: Sequence[int] | None = None,
    trainable=eqx.is_inexact_array,
    tendency_scale: float = 1.0,
    sensors=None,
    stability_check: Callable | None = None,
    report_memory: bool = True,
    progress: bool = False,
) -> ProtocolResult:
    r"""Train a hybrid with one of the three protocols, at a budget of ``n_steps``.

    Args:
        params: the trainable parameters (initial values): the hybrid itself (e.g.
            ``dphys.Augmented(physics, explicit=LocalTendency(...),
            forcing=FourierField(...))``), or any pytree that ``build`` turns into
            one.
        data: the :class:`ModelErrorData` of the training windows.
        cost: the template cost (sensors, times, stepper, window).
        protocol: ``"one_step"``, ``"stop_gradient"`` or ``"solver"``.
        n_steps: the budget: optimizer steps in total (split evenly over the
            curriculum stages).
        key: PRNG key (shuffling).
        build: ``build(params) -> model``, e.g. to train $\log\kappa$ rather than
            $\kappa$ (default: ``params`` is the model).
        physics: the physics model of the analyses (``"one_step"`` only).
        optimizer: default ``optax.adam(1e-2)``; a fresh state per stage.
        batch_size: windows per step.
        curriculum: rollout lengths, one stage each (default: the doublings of
            the first sub-window length up to the window, e.g. 5, 10, 20, 40).
            Ignored by ``"one_step"``.
        trainable: :func:`assimilation.learn.fit`'s filter (e.g. to freeze a
            physical parameter).
        tendency_scale: $s$ of the one-step loss.
        sensors: the scored sensors of the rollout losses.
        stability_check: ``stability_check(model) -> Stability`` run after each
            stage (recorded in the history).
        report_memory: record the compiled memory of a training step.
        progress: a progress bar per stage.

    Returns:
        A :class:`ProtocolResult`.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"`protocol` must be one of {PROTOCOLS}, got {protocol!r}.")
    if protocol == "one_step" and physics is None:
        raise ValueError("`protocol='one_step'` needs `physics` (the analyses' model).")
    optimizer = optax.adam(1e-2) if optimizer is None else optimizer
    build = _identity if build is None else build
    if protocol == "one_step":
        stages = [(None, n_steps)]
    else:
        if curriculum is None:
            first = data.analysis_steps[1]
            curriculum, h = [], first
            while h <= cost.n_steps:
                curriculum.append(h)
                h *= 2
            if curriculum[-1] != cost.n_steps and cost.n_steps % first == 0:
                curriculum.append(cost.n_steps)
        curriculum = [int(h) for h in curriculum]
        per = max(1, n_steps // len(curriculum))
        stages = [(h, per) for h in curriculum]
        stages[-1] = (stages[-1][0], n_steps - per * (len(curriculum) - 1))
    history = {"stage": [], "horizon": [], "step": [], "train_loss": [], "time_s": []}
    history["stability"] = []
    t_start = time.perf_counter()
    memory, done = 0, 0
    for i, (h, steps) in enumerate(stages):
        if steps <= 0:
            continue
        if protocol == "one_step":
            loss = one_step_loss(physics, scale=tendency_scale, t0=cost.t0, dt=cost.dt)
        else:
            loss = rollout_loss(cost, horizon=h, gradient=protocol, sensors=sensors)
        res = fit(
            params,
            _built(loss, build),
            data,
            optimizer=optimizer,
            key=jax.random.fold_in(key, i),
            batch_size=min(batch_size, data.n_windows),
            n_steps=steps,
            trainable=trainable,
            report_memory=report_memory,
            progress=progress,
        )
        params = res.best_model
        memory = max(memory, int(res.stats.get("step_memory_bytes", 0) or 0))
        for e, loss_e, t_e in zip(
            res.history["epoch"],
            res.history["train_loss"],
            res.history["time_s"],
            strict=True,
        ):
            history["stage"].append(i)
            history["horizon"].append(h)
            history["step"].append(done + e * res.stats["steps_per_epoch"])
            history["train_loss"].append(loss_e)
            history["time_s"].append(t_e)
        done += res.stats["steps"]
        if res.result == "non_finite_loss":
            break
        if stability_check is not None:
            history["stability"].append(stability_check(build(params)))
    stats = {
        "protocol": protocol,
        "train_s": time.perf_counter() - t_start,
        "steps": done,
        "step_memory_bytes": memory,
    }
    return ProtocolResult(
        model=build(params), params=params, history=history, stats=stats
    )


# -------------------------------------------------------------------- evaluation


def forecast_rmse(
    model,
    stepper: dphys.AbstractStepper,
    states0,
    truths: dict[int, Any],
    *,
    dt,
    t0=0.0,
    chunk_size: int = 16,
) -> dict[int, float]:
    """Root-mean-square forecast error against dense truths (a twin diagnostic).

    Args:
        model: the (hybrid) model or :class:`assimilation.learn.SubwindowForcing`.
        stepper: the stepper.
        states0: forecast initial states (leading window axis), e.g. the analyses
            at the end of the test windows.
        truths: ``{lead (steps): true states}`` with the same leading axis.
        dt, t0: the step and the forecasts' initial time.

    Returns:
        ``{lead: RMSE over windows and grid points}`` (``inf`` if a forecast is not
        finite).
    """
    leads = tuple(sorted(int(k) for k in truths))
    n = leads[-1]
    if isinstance(model, SubwindowForcing) and n % model.steps_per_window:
        n += model.steps_per_window - n % model.steps_per_window

    @eqx.filter_jit
    def run(model, x0s):
        f = lambda x: rollout(
            model, stepper, x, dt=dt, n_steps=n, t0=t0, save_steps=leads, throw=False
        )
        return jax.vmap(f)(x0s)

    n_w = jtu.tree_leaves(states0)[0].shape[0]
    sq = {lead: 0.0 for lead in leads}
    for start in range(0, n_w, chunk_size):
        x0 = jtu.tree_map(lambda a, s=start: a[s : s + chunk_size], states0)
        ys = run(model, x0)
        for i, lead in enumerate(leads):
            truth = jtu.tree_map(lambda a, s=start: a[s : s + chunk_size], truths[lead])
            for p, q in zip(jtu.tree_leaves(ys), jtu.tree_leaves(truth), strict=True):
                sq[lead] += float(jnp.sum((p[:, i] - q) ** 2))
    count = sum(a.size for a in jtu.tree_leaves(truths[leads[0]]))
    return {
        lead: float(np.sqrt(v / count)) if np.isfinite(v) else float("inf")
        for lead, v in sq.items()
    }
