"""Running a configured assimilation and writing its output dataset."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._build import RunSetup, build_run, state_units
from ._schema import STATE_FIELDS, ConfigError


@dataclasses.dataclass
class RunOutput:
    """The result of :func:`run`: the analysis, the observations used and, for a
    twin experiment, the truth and the scores."""

    setup: RunSetup
    analysis: Any
    obs: Any
    truth: dict | None = None
    scores: dict | None = None
    seconds: float = 0.0


def run(
    cfg: dict,
    *,
    callback=None,
    setup: RunSetup | None = None,
    progress: bool = False,
) -> RunOutput:
    """Build (unless ``setup`` is given) and run a configured assimilation.

    For a twin experiment, synthetic observations are made from the truth first
    (:func:`assimilation.make_observations`) and the analysis is scored against the
    truth.

    Args:
        cfg: a validated configuration.
        callback: progress callback passed to :func:`assimilation.assimilate`.
        setup: a prebuilt :class:`RunSetup`.
        progress: progress bar and phase lines on stderr (see
            :func:`assimilation.assimilate`).

    Returns:
        A :class:`RunOutput`.
    """
    import time

    from .._assimilate import assimilate
    from .._cost import FourDVar
    from .._twin import make_observations, score, truth_of

    start = time.perf_counter()
    setup = build_run(cfg) if setup is None else setup
    twin = cfg["twin"]
    if twin is not None:
        setup.obs = make_observations(
            setup.truth_model,
            setup.stepper,
            setup.truth_state0,
            positions=setup.obs_positions,
            times=setup.obs_times,
            sigma=twin["sigma"],
            dt=setup.dt,
            n_steps=setup.n_steps,
            t0=setup.t0,
            key=setup.twin_key,
            missing=twin["missing"],
            field=twin["field"],
        )
    try:
        cost = FourDVar(
            setup.model,
            setup.stepper,
            setup.state0,
            setup.obs,
            setup.control,
            dt=setup.dt,
            n_steps=setup.n_steps,
            t0=setup.t0,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"cannot set up the 4D-Var cost: {err}") from err
    analysis = assimilate(
        cost,
        setup.method,
        callback=callback,
        uncertainty=cfg["solver"]["uncertainty"],
        progress=progress,
    )
    out = RunOutput(setup, analysis, setup.obs)
    if twin is not None:
        out.truth = truth_of(
            cost.control,
            setup.truth_model,
            setup.stepper,
            setup.truth_state0,
            dt=setup.dt,
            n_steps=setup.n_steps,
            t0=setup.t0,
        )
        scores = score(analysis, cost.control, out.truth)
        # The dataset records the state RMSEs, each parameter's error (analysis
        # minus truth; its RMS for a field) and the 2-sigma coverage.
        out.scores = {k: v for k, v in scores.items() if k.startswith("rmse_")}
        fields = STATE_FIELDS[cfg["model"]["name"]]
        if fields is not None:
            # the pooled RMSE mixes units (m and m s-1): also one per field
            pairs = {
                "initial_background": (analysis.background_state, "state0"),
                "initial_analysis": (analysis.initial_state, "state0"),
                "final_background": (analysis.background_final_state, "final"),
                "final_analysis": (analysis.final_state, "final"),
            }
            for which, (state, key) in pairs.items():
                for field in fields:
                    d = np.asarray(getattr(state, field)) - np.asarray(
                        getattr(out.truth[key], field)
                    )
                    out.scores[f"rmse_{which}_{field}"] = float(np.sqrt(np.mean(d**2)))
        out.scores["error"] = {
            name: float(e) if np.ndim(e) == 0 else float(np.sqrt(np.mean(e**2)))
            for name, e in scores["parameter_error"].items()
        }
        out.scores["within_2sigma"] = scores["within_2sigma"] or {}
    out.seconds = time.perf_counter() - start
    return out


def output_dataset(out: RunOutput, attrs: Mapping[str, Any] | None = None):
    """The CF dataset of a :class:`RunOutput` (see :func:`analysis_to_dataset`)."""
    from ..io import analysis_to_dataset

    cfg = out.setup.config
    model = cfg["model"]
    return analysis_to_dataset(
        out.analysis,
        out.setup.grid,
        out.obs,
        units=state_units(model),
        length_units=model["length_units"],
        time_units=model["time_units"],
        reference=cfg["time"]["reference"],
        calendar=cfg["time"]["calendar"],
        truth=out.truth,
        scores=out.scores,
        attrs=attrs,
        parameter_units=parameter_units(model),
        standard_names=model["standard_names"],
    )


def parameter_units(model: Mapping[str, Any]) -> dict[str, str]:
    """CF ``units`` of each model parameter from the model's units (when known)."""
    u, length, t = model["units"], model["length_units"], model["time_units"]
    out = {}
    if length and t:
        out.update(
            kappa=f"{length}2 {t}-1", g=f"{length} {t}-2", f0=f"{t}-1", drag=f"{t}-1"
        )
    if length:
        out["depth"] = length
    if isinstance(u, str) and t:
        out["source"] = f"{u} {t}-1"
    if length and t:
        out["velocity"] = f"{length} {t}-1"
    return out
