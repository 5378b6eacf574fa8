r"""Twin experiments: synthetic observations from a known truth, then assimilation.

A twin experiment checks a whole assimilation system against a truth that is known
by construction:

1. run the *truth* model from the true initial state;
2. sample it at the sensors (:func:`make_observations`) and add Gaussian noise
   $\varepsilon\sim\mathcal N(0, \sigma_s^2)$ drawn from ``key`` (optionally
   dropping a random fraction of the values as missing);
3. assimilate from the background (:func:`assimilate`);
4. score the analysis: RMSE of the initial and final states against the truth
   (background and analysis), parameter errors, and whether each true parameter
   lies within the posterior $\pm2\sigma$ interval.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

import dphys

from ._assimilate import Analysis, assimilate
from ._control import Control
from ._cost import FourDVar, _ObservationHook, _saveat
from ._methods import AbstractMethod
from ._observation import Interpolation, Observations, TimeInterpolation


def make_observations(
    model: dphys.AbstractModel,
    stepper: dphys.AbstractStepper,
    state0,
    *,
    positions,
    times,
    sigma,
    dt: float,
    n_steps: int,
    key=None,
    t0: float = 0.0,
    missing: float = 0.0,
    field: str | None = None,
    adjoint: dphys.AbstractAdjoint = dphys.Checkpointed(),
) -> Observations:
    r"""Synthetic sensor records $y = H(x(t_k)) + \varepsilon$ from a model run.

    Sampling follows the cost exactly (bilinear interpolation in space, linear
    interpolation in time between the bracketing steps), so a noise-free record
    gives a zero observation term at the truth.

    Args:
        model, stepper, state0: the truth run.
        positions: ``(n_sensors, ndim)`` sensor coordinates (``(n_sensors,)`` in 1D).
        times: ``(n_times,)`` observation times, strictly increasing, inside the
            window ``[t0, t0 + n_steps*dt]``.
        sigma: noise standard deviation per sensor (or a scalar), > 0.
        dt, n_steps, t0: the model time axis.
        key: PRNG key for the noise and the missing-value pattern (keyword-only);
            ``None`` gives noise-free values.
        missing: fraction of values to replace by NaN (missing), in ``[0, 1)``.
        field: observed field for multi-field states.
        adjoint: passed to :func:`dphys.simulate`.

    Returns:
        :class:`Observations` with the noisy values and ``sigma``.
    """
    if not 0.0 <= float(missing) < 1.0:
        raise ValueError(f"`missing` must lie in [0, 1), got {missing!r}.")
    obs_op = Interpolation(model.grid, positions, field=field)
    sampling = TimeInterpolation(times, t0=t0, dt=dt, n_steps=n_steps)
    traj = dphys.simulate(
        model,
        stepper,
        state0,
        dt=dt,
        n_steps=n_steps,
        t0=t0,
        saveat=_saveat(sampling.steps, _ObservationHook(obs_op)),
        adjoint=adjoint,
    )
    clean = sampling(traj.ys)
    sigma = jnp.broadcast_to(jnp.asarray(sigma, clean.dtype), (clean.shape[1],))
    values = clean
    if key is not None:
        k_noise, k_miss = jr.split(key)
        values = clean + sigma * jr.normal(k_noise, clean.shape, clean.dtype)
        if missing > 0:
            drop = jr.uniform(k_miss, clean.shape) < missing
            values = jnp.where(drop, jnp.nan, values)
    return Observations(times, values, obs_op.positions, sigma, field=field)


class TwinResult(eqx.Module):
    """The outcome of :func:`twin_experiment` (arrays are NumPy, floats Python).

    Attributes:
        analysis: the :class:`Analysis`.
        obs: the synthetic :class:`Observations`.
        truth_state0, truth_final_state: the true initial and final states.
        truth_parameters: ``{name: true physical value}``.
        rmse_initial_background, rmse_initial_analysis: RMSE of the initial state
            against the truth (all state entries).
        rmse_final_background, rmse_final_analysis: the same at the end of the
            window.
        parameter_error: ``{name: analysis - truth}``.
        parameter_relative_error: ``{name: ||analysis - truth|| / ||truth||}``.
        within_2sigma: ``{name: fraction of entries whose true unconstrained value
            (e.g. log kappa) lies within the posterior mean +/- 2 std}`` (1.0 or 0.0
            for scalars), or ``None`` without uncertainty.
    """

    analysis: Analysis
    obs: Observations
    truth_state0: Any
    truth_final_state: Any
    truth_parameters: dict
    rmse_initial_background: float
    rmse_initial_analysis: float
    rmse_final_background: float
    rmse_final_analysis: float
    parameter_error: dict
    parameter_relative_error: dict
    within_2sigma: dict | None

    def summary(self) -> str:
        lines = [
            self.analysis.message,
            f"  initial-state RMSE: background {self.rmse_initial_background:.4g}, "
            f"analysis {self.rmse_initial_analysis:.4g}",
            f"  final-state RMSE:   background {self.rmse_final_background:.4g}, "
            f"analysis {self.rmse_final_analysis:.4g}",
        ]
        for name, truth in self.truth_parameters.items():
            a = np.asarray(self.analysis.parameters[name])
            rel = self.parameter_relative_error[name]
            inside = (
                ""
                if self.within_2sigma is None
                else f", truth within 2 sigma: {self.within_2sigma[name]:.0%}"
            )
            if a.ndim == 0:
                std = self.analysis.parameter_std
                pm = "" if std is None else f" +/- {float(std[name]):.3g}"
                lines.append(
                    f"  {name}: truth {float(truth):.5g}, analysis {float(a):.5g}{pm} "
                    f"(relative error {rel:.2%}{inside})"
                )
            else:
                lines.append(f"  {name}: field, relative error {rel:.2%}{inside}")
        return "\n".join(lines)


def _rmse(a, b) -> float:
    diffs = [
        np.ravel(np.asarray(x) - np.asarray(y))
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    ]
    d = np.concatenate(diffs)
    return float(np.sqrt(np.mean(d**2)))


def truth_of(
    control: Control,
    truth_model: dphys.AbstractModel,
    stepper: dphys.AbstractStepper,
    truth_state0,
    *,
    dt: float,
    n_steps: int,
    t0: float = 0.0,
    adjoint: dphys.AbstractAdjoint = dphys.Checkpointed(),
) -> dict:
    """What a twin experiment scores against: ``{"state0", "final",
    "parameters"}``, the true initial and final states and the true value of every
    calibrated parameter (read from ``truth_model``)."""
    final = dphys.simulate(
        truth_model,
        stepper,
        truth_state0,
        dt=dt,
        n_steps=n_steps,
        t0=t0,
        adjoint=adjoint,
    ).final
    return {
        "state0": truth_state0,
        "final": final,
        "parameters": {
            p.name: np.asarray(p.select(truth_model)) for p in control.parameters
        },
    }


def score(analysis: Analysis, control: Control, truth: dict) -> dict:
    r"""Scores of an analysis against the truth of a twin experiment.

    Args:
        analysis: the :class:`Analysis`.
        control: the control it was computed with (for the parameters' transforms).
        truth: ``{"state0", "final", "parameters"}`` (see :func:`truth_of`).

    Returns:
        ``{"rmse_initial_background", "rmse_initial_analysis",
        "rmse_final_background", "rmse_final_analysis"}`` (RMSE of the initial and
        final states over all state entries), ``"parameter_error"`` (analysis minus
        truth), ``"parameter_relative_error"`` ($\|p_a - p_t\|/\|p_t\|$) and
        ``"within_2sigma"`` (per parameter, the fraction of entries whose true
        unconstrained value lies within the posterior mean $\pm 2\sigma$; ``None``
        without uncertainty).
    """
    err, rel, inside = {}, {}, {}
    std_z = analysis.parameter_std_unconstrained
    for p in control.parameters:
        a = np.asarray(analysis.parameters[p.name])
        t = np.asarray(truth["parameters"][p.name])
        err[p.name] = a - t
        rel[p.name] = float(
            np.linalg.norm(np.ravel(a - t)) / np.linalg.norm(np.ravel(t))
        )
        if std_z is not None:
            z_t = np.asarray(p.to_unconstrained(t))
            z_a = np.asarray(p.to_unconstrained(a))
            inside[p.name] = float(np.mean(np.abs(z_t - z_a) <= 2 * std_z[p.name]))
    return {
        "rmse_initial_background": _rmse(analysis.background_state, truth["state0"]),
        "rmse_initial_analysis": _rmse(analysis.initial_state, truth["state0"]),
        "rmse_final_background": _rmse(analysis.background_final_state, truth["final"]),
        "rmse_final_analysis": _rmse(analysis.final_state, truth["final"]),
        "parameter_error": err,
        "parameter_relative_error": rel,
        "within_2sigma": inside if std_z is not None else None,
    }


def twin_experiment(
    truth_model: dphys.AbstractModel,
    stepper: dphys.AbstractStepper,
    truth_state0,
    control: Control,
    *,
    positions,
    times,
    sigma,
    dt: float,
    n_steps: int,
    key,
    background_state0=None,
    t0: float = 0.0,
    missing: float = 0.0,
    field: str | None = None,
    method: AbstractMethod | None = None,
    adjoint: dphys.AbstractAdjoint = dphys.Checkpointed(),
    callback: Callable[[int, dict], Any] | None = None,
) -> TwinResult:
    r"""Truth run, noisy sparse observations, 4D-Var, and scores.

    The background model is ``truth_model`` with every controlled parameter set to
    its :class:`Parameter` ``background`` (which must therefore be given
    explicitly); the background initial state is ``background_state0`` (required
    when the initial state is controlled; otherwise the truth is used, i.e. the
    initial state is known).

    Args:
        truth_model, stepper, truth_state0: the truth.
        control: the :class:`Control` (parameter backgrounds explicit).
        positions, times, sigma, dt, n_steps, t0, missing, field: see
            :func:`make_observations`.
        key: PRNG key for the observation noise (keyword-only, required).
        background_state0: the background initial state $x_b$.
        method: :class:`GaussNewton` (default) or :class:`LBFGS`.
        adjoint: passed to :func:`dphys.simulate`.
        callback: progress callback passed to :func:`assimilate`.

    Returns:
        A :class:`TwinResult`.

    Raises:
        ValueError: if a parameter has no explicit background, or the initial state
            is controlled but ``background_state0`` is missing.
    """
    if not isinstance(control, Control):
        raise TypeError(f"`control` must be a Control, got {type(control).__name__}.")
    missing_bg = [p.name for p in control.parameters if p.background is None]
    if missing_bg:
        raise ValueError(
            f"Parameters {missing_bg} have no explicit `background`; a twin experiment "
            "needs the background to differ from the truth, so give "
            "`Parameter(name, background=...)`."
        )
    if control.initial_state is not None and background_state0 is None:
        raise ValueError(
            "The initial state is controlled, so `background_state0` is required (the "
            "first guess the analysis starts from)."
        )
    if background_state0 is None:
        background_state0 = truth_state0
    obs = make_observations(
        truth_model,
        stepper,
        truth_state0,
        positions=positions,
        times=times,
        sigma=sigma,
        dt=dt,
        n_steps=n_steps,
        key=key,
        t0=t0,
        missing=missing,
        field=field,
        adjoint=adjoint,
    )
    background_model = truth_model
    for p in control.parameters:
        background_model = p.apply(background_model, p.background)
    cost = FourDVar(
        background_model,
        stepper,
        background_state0,
        obs,
        control,
        dt=dt,
        n_steps=n_steps,
        t0=t0,
        adjoint=adjoint,
    )
    analysis = assimilate(cost, method, callback=callback)
    truth = truth_of(
        cost.control,
        truth_model,
        stepper,
        truth_state0,
        dt=dt,
        n_steps=n_steps,
        t0=t0,
        adjoint=adjoint,
    )
    return TwinResult(
        analysis=analysis,
        obs=obs,
        truth_state0=jtu.tree_map(np.asarray, truth_state0),
        truth_final_state=jtu.tree_map(np.asarray, truth["final"]),
        truth_parameters=truth["parameters"],
        **score(analysis, cost.control, truth),
    )
