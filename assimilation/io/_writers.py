"""CF-1.8 datasets of observations and analyses (the writers)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import xarray as xr

import dphys
from dphys.io import (
    TIME_DIM,
    spatial_dims,
)

from .._observation import Observations
from ._errors import (
    UnitsError,
)
from ._names import (
    ITERATION_DIM,
    PARAMETER_DIM,
    SIGMA_NAME,
    STANDARD_ERROR,
    STATION_DIM,
)
from ._time import _reference_date
from ._units import check_standard_name, time_unit_seconds


logger = logging.getLogger(__name__)


# -- writing ---------------------------------------------------------------------------
def observations_to_dataset(
    obs: Observations,
    *,
    variable: str = "u",
    units: str | None = None,
    length_units: str | None = None,
    time_units: str | None = None,
    reference=None,
    calendar: str = "standard",
    attrs: Mapping[str, Any] | None = None,
    standard_name: str | None = None,
) -> xr.Dataset:
    """Observations as a CF dataset in the layout :func:`read_observations` reads.

    With ``reference`` (a date) the times are written CF-encoded as
    ``"<time_units> since <reference>"`` in ``calendar``; otherwise as model time.
    ``standard_name`` (checked against ``units``, see :func:`check_standard_name`)
    is the CF standard name of the observed quantity.
    """
    ndim = int(np.shape(obs.positions)[1])
    pos = np.asarray(obs.positions)
    t = np.asarray(obs.times, dtype=np.float64)
    time_attrs: dict[str, Any] = {}
    if reference is not None:
        word = _time_word(time_units)
        if word is None:
            raise UnitsError(
                f"`time_units` must be a time unit to write dates, got {time_units!r}."
            )
        ref = _reference_date(reference, calendar)
        time_attrs.update(
            units=f"{word} since {ref.isoformat().replace('T', ' ')}",
            calendar=calendar,
            standard_name="time",
            axis="T",
        )
    else:
        time_attrs.update(units=time_units or "1", long_name="model time")
    value_attrs = {"long_name": f"observed {variable}"}
    if getattr(obs, "field", None) is not None:
        value_attrs["field"] = obs.field
    if units is not None:
        value_attrs["units"] = units
    if standard_name is not None:
        value_attrs["standard_name"] = check_standard_name(
            standard_name, units, variable=variable
        )
    pos_attrs = {"units": length_units or "1"}
    coords = {
        TIME_DIM: xr.DataArray(t, dims=(TIME_DIM,), attrs=time_attrs),
        STATION_DIM: xr.DataArray(
            np.arange(pos.shape[0]),
            dims=(STATION_DIM,),
            attrs={
                "long_name": "sensor index",
                "units": "1",
                "cf_role": "timeseries_id",
            },
        ),
    }
    for axis, name in enumerate(spatial_dims(ndim)):
        coords[name] = xr.DataArray(
            pos[:, axis],
            dims=(STATION_DIM,),
            attrs={**pos_attrs, "long_name": f"sensor {name} position"},
        )
    data = {
        variable: xr.DataArray(
            np.asarray(obs.values), dims=(TIME_DIM, STATION_DIM), attrs=value_attrs
        ),
        SIGMA_NAME: xr.DataArray(
            np.asarray(obs.sigma),
            dims=(STATION_DIM,),
            attrs={
                "long_name": "observation error standard deviation",
                **({"units": units} if units is not None else {}),
            },
        ),
    }
    return xr.Dataset(
        data,
        coords=coords,
        attrs={"Conventions": "CF-1.8", "featureType": "timeSeries", **(attrs or {})},
    )


# -- analysis output -------------------------------------------------------------------
def _standard_names(standard_names, units) -> dict[str | None, str]:
    """Checked ``{field: standard name}`` (``None`` the key of a single field)."""
    if standard_names is None:
        return {}
    if isinstance(standard_names, str):
        if isinstance(units, Mapping):
            raise ValueError(
                "`standard_names` is a string but the state has several fields "
                f"({sorted(units)}); give a mapping field -> standard name."
            )
        return {None: check_standard_name(standard_names, units, variable="analysis")}
    if not isinstance(units, Mapping) and units is not None:
        raise ValueError(
            "`standard_names` is a mapping but the state is a single field; give "
            f"one standard name, got {dict(standard_names)!r}."
        )
    return {
        field: check_standard_name(
            name, (units or {}).get(field), variable=f"analysis_{field}"
        )
        for field, name in standard_names.items()
    }


def _state_vars(
    prefix, state, grid, units, long_name, standard_names=None, *, modifier=None
):
    """One variable per state field: ``prefix`` (single array) or ``prefix_<field>``.

    ``standard_names`` (from :func:`_standard_names`) gives the CF standard name of
    a field, written with ``modifier`` (``"standard_error"``) when given.
    """
    from dphys.io import to_dataset

    ds = to_dataset(state, grid, name=prefix, units=units)
    out = {}
    for name in ds.data_vars:
        field = None if name == prefix else name
        new = name if field is None else f"{prefix}_{name}"
        da = ds[name].drop_vars(list(ds[name].coords))
        da.attrs["long_name"] = long_name + ("" if field is None else f" ({name})")
        std = (standard_names or {}).get(field)
        if std is not None:
            da.attrs["standard_name"] = std if modifier is None else f"{std} {modifier}"
        out[new] = da
    return out


_TIME_WORDS = {
    1e-6: "microseconds",
    1e-3: "milliseconds",
    1.0: "seconds",
    60.0: "minutes",
    3600.0: "hours",
    86400.0: "days",
}


def _time_word(time_units) -> str | None:
    """The CF word of a time unit (``"h"`` -> ``"hours"``), None if not one."""
    seconds = time_unit_seconds(time_units)
    return None if seconds is None else _TIME_WORDS.get(seconds)


def _time_coordinate(times, time_units, reference, calendar):
    attrs: dict[str, Any] = {}
    word = _time_word(time_units) if time_units else None
    if reference is not None and word is not None:
        ref = _reference_date(reference, calendar)
        attrs.update(
            units=f"{word} since {ref.isoformat().replace('T', ' ')}",
            calendar=calendar,
            standard_name="time",
            axis="T",
        )
    else:
        attrs.update(units=time_units or "1", long_name="model time")
    return xr.DataArray(
        np.asarray(times, dtype=np.float64), dims=(TIME_DIM,), attrs=attrs
    )


def analysis_to_dataset(
    analysis,
    grid: dphys.Grid,
    obs: Observations,
    *,
    units: str | None = None,
    length_units: str | None = None,
    time_units: str | None = None,
    reference=None,
    calendar: str = "standard",
    truth: Mapping[str, Any] | None = None,
    scores: Mapping[str, Any] | None = None,
    attrs: Mapping[str, Any] | None = None,
    parameter_units: Mapping[str, str] | None = None,
    standard_names: str | Mapping[str, str] | None = None,
) -> xr.Dataset:
    r"""An :class:`assimilation.Analysis` as a CF-1.8 dataset.

    Variables (single-field states; a multi-field state gets one variable per field,
    ``analysis_eta``, ``analysis_u``, ...):

    * ``analysis``, ``background``, ``increment`` ($x_a - x_b$) at the window start;
      ``analysis_std`` (posterior std, when available); ``analysis_final``,
      ``background_final`` (forecasts at the window end); ``truth``,
      ``truth_final`` for twin experiments;
    * per calibrated parameter ``p``: ``p`` (analysis), ``p_background``,
      ``p_increment``, ``p_std`` and ``p_std_unconstrained`` (Laplace posterior),
      ``p_truth`` (twin), ``p_history(iteration, ...)``;
      ``parameter_correlation(parameter, parameter2)`` between all scalar entries;
    * convergence ``cost``, ``background_cost``, ``obs_cost``, ``grad_norm``,
      ``step_norm``, ``inner_iterations``, ``inner_residual``, ``elapsed`` on
      ``iteration`` (and ``<name>_cost`` for any other named term of the cost);
    * the observations ``obs(time, station)``, ``sigma(station)``, sensor positions
      ``station_x`` (``station_y``), and the residuals ``obs_minus_background`` and
      ``obs_minus_analysis`` (NaN where missing).

    With ``standard_names`` (one CF standard name, or ``{field: name}`` for a
    multi-field state, e.g. ``{"eta": "sea_surface_height_above_geoid", "u":
    "eastward_sea_water_velocity", "v": "northward_sea_water_velocity"}``) the
    states (analysis, background, forecasts, truth) and the observations of a
    named field carry ``standard_name``; ``analysis_std`` carries it with the CF
    modifier ``standard_error``. Increments and residuals carry none (CF has no
    name for a difference of two states). Each name is checked against the
    field's units (:func:`check_standard_name`); without ``standard_names`` no
    state carries one (dphys does not guess what a field is).

    Global attributes: the grid (as :func:`dphys.io.grid_attrs`), the method,
    termination reason and message, costs, twin scores, and whatever ``attrs``
    holds (the CLI adds ``history``, ``source`` and the full configuration).
    """
    from dphys.io import grid_attrs, grid_coords

    names = _standard_names(standard_names, units)
    data: dict[str, xr.DataArray] = {}
    data.update(
        _state_vars(
            "analysis",
            analysis.initial_state,
            grid,
            units,
            "analysis initial state",
            names,
        )
    )
    data.update(
        _state_vars(
            "background",
            analysis.background_state,
            grid,
            units,
            "background initial state",
            names,
        )
    )
    if "initial_state" in analysis.increments:
        data.update(
            _state_vars(
                "increment",
                analysis.increments["initial_state"],
                grid,
                units,
                "analysis increment of the initial state",
            )
        )
    if analysis.initial_state_std is not None:
        data.update(
            _state_vars(
                "analysis_std",
                analysis.initial_state_std,
                grid,
                units,
                "posterior standard deviation of the initial state",
                names,
                modifier=STANDARD_ERROR,
            )
        )
    data.update(
        _state_vars(
            "analysis_final",
            analysis.final_state,
            grid,
            units,
            "forecast from the analysis at the window end",
            names,
        )
    )
    data.update(
        _state_vars(
            "background_final",
            analysis.background_final_state,
            grid,
            units,
            "forecast from the background at the window end",
            names,
        )
    )
    if truth is not None:
        data.update(
            _state_vars(
                "truth", truth["state0"], grid, units, "true initial state", names
            )
        )
        data.update(
            _state_vars(
                "truth_final",
                truth["final"],
                grid,
                units,
                "true state at the window end",
                names,
            )
        )

    sdims = spatial_dims(grid.ndim)

    def param_dims(value, lead=()):
        shape = np.shape(value)[len(lead) :]
        if shape == ():
            return lead
        if shape == grid.shape:
            return (*lead, *sdims)
        raise ValueError(f"parameter of shape {shape} is neither scalar nor a field")

    for name, value in analysis.parameters.items():
        value = np.asarray(value)
        pu = (parameter_units or {}).get(name)
        pu = {"units": pu} if pu else {}
        data[name] = xr.DataArray(
            value,
            dims=param_dims(value),
            attrs={"long_name": f"analysis of parameter {name}", **pu},
        )
        bg = np.asarray(analysis.background_parameters[name])
        data[f"{name}_background"] = xr.DataArray(
            bg, dims=param_dims(bg), attrs={"long_name": f"background {name}", **pu}
        )
        inc = np.asarray(analysis.increments.get(name, value - bg))
        data[f"{name}_increment"] = xr.DataArray(
            inc,
            dims=param_dims(inc),
            attrs={"long_name": f"analysis increment of {name}", **pu},
        )
        if analysis.parameter_std is not None:
            s = np.asarray(analysis.parameter_std[name])
            data[f"{name}_std"] = xr.DataArray(
                s,
                dims=param_dims(s),
                attrs={
                    "long_name": f"posterior standard deviation of {name} (Laplace, "
                    "delta method)",
                    **pu,
                },
            )
            su = np.asarray(analysis.parameter_std_unconstrained[name])
            data[f"{name}_std_unconstrained"] = xr.DataArray(
                su,
                dims=param_dims(su),
                attrs={
                    "long_name": f"posterior standard deviation of the "
                    f"transformed (unconstrained) {name}",
                    "units": "1",
                },
            )
        if truth is not None and name in truth.get("parameters", {}):
            tv = np.asarray(truth["parameters"][name])
            data[f"{name}_truth"] = xr.DataArray(
                tv, dims=param_dims(tv), attrs={"long_name": f"true {name}", **pu}
            )
        hist = np.asarray(analysis.history.parameters[name])
        data[f"{name}_history"] = xr.DataArray(
            hist,
            dims=param_dims(hist, (ITERATION_DIM,)),
            attrs={"long_name": f"{name} at each iteration", **pu},
        )
    if analysis.parameter_correlation is not None and analysis.parameter_labels:
        # CF coordinate variables are numeric: the entries are indexed, and their
        # labels are auxiliary (character) coordinates.
        labels = np.asarray(analysis.parameter_labels, dtype=str)
        index = np.arange(labels.size, dtype=np.int32)
        p2 = PARAMETER_DIM + "2"
        data["parameter_correlation"] = xr.DataArray(
            np.asarray(analysis.parameter_correlation),
            dims=(PARAMETER_DIM, p2),
            coords={
                PARAMETER_DIM: (
                    PARAMETER_DIM,
                    index,
                    {"long_name": "index of a scalar parameter entry", "units": "1"},
                ),
                p2: (
                    p2,
                    index,
                    {"long_name": "index of a scalar parameter entry", "units": "1"},
                ),
                "parameter_label": (
                    PARAMETER_DIM,
                    labels,
                    {"long_name": "name of the parameter entry"},
                ),
            },
            attrs={
                "long_name": "posterior correlation between parameter entries",
                "units": "1",
            },
        )

    hist = analysis.history
    for key, long_name, u in (
        ("cost", "4D-Var cost J = Jb + Jo", "1"),
        ("background_cost", "background term Jb", "1"),
        ("obs_cost", "observation term Jo", "1"),
        ("grad_norm", "norm of the gradient in the whitened control space", "1"),
        ("step_norm", "norm of the control step", "1"),
        ("inner_iterations", "inner (CG or line-search) iterations", "1"),
        (
            "inner_residual",
            "relative true residual of the Gauss-Newton inner solve",
            "1",
        ),
        ("elapsed", "wall-clock time since the start", "s"),
    ):
        if getattr(hist, key) is None:
            continue
        data[key] = xr.DataArray(
            np.asarray(getattr(hist, key)),
            dims=(ITERATION_DIM,),
            attrs={"long_name": long_name, "units": u},
        )
    # Terms beyond the background and observation ones (a prior, a model-error
    # penalty of another cost) as `<name>_cost`.
    for name, values in hist.terms.items():
        if name not in ("background", "observation"):
            data[f"{name}_cost"] = xr.DataArray(
                np.asarray(values),
                dims=(ITERATION_DIM,),
                attrs={"long_name": f"cost term {name!r}", "units": "1"},
            )

    pos = np.asarray(obs.positions)
    station = {
        STATION_DIM: xr.DataArray(
            np.arange(pos.shape[0]),
            dims=(STATION_DIM,),
            attrs={
                "long_name": "sensor index",
                "units": "1",
                "cf_role": "timeseries_id",
            },
        )
    }
    for axis, dim in enumerate(sdims):
        data[f"station_{dim}"] = xr.DataArray(
            pos[:, axis],
            dims=(STATION_DIM,),
            attrs={"long_name": f"sensor {dim} position", "units": length_units or "1"},
        )
    obs_units = (
        units.get(getattr(obs, "field", None)) if isinstance(units, Mapping) else units
    )
    value_attrs = {"units": obs_units} if obs_units is not None else {}
    obs_name = names.get(getattr(obs, "field", None))
    for key, values, long_name in (
        ("obs", obs.values, "observed values (NaN: missing)"),
        (
            "obs_minus_background",
            analysis.obs_minus_background,
            "observation minus background forecast",
        ),
        (
            "obs_minus_analysis",
            analysis.obs_minus_analysis,
            "observation minus analysis forecast",
        ),
    ):
        data[key] = xr.DataArray(
            np.asarray(values),
            dims=(TIME_DIM, STATION_DIM),
            attrs={"long_name": long_name, **value_attrs},
        )
        if key == "obs" and obs_name is not None:
            data[key].attrs["standard_name"] = obs_name
    data["sigma"] = xr.DataArray(
        np.asarray(obs.sigma),
        dims=(STATION_DIM,),
        attrs={"long_name": "observation error standard deviation", **value_attrs},
    )

    coords = {
        **grid_coords(grid, length_units=length_units),
        **station,
        TIME_DIM: _time_coordinate(obs.times, time_units, reference, calendar),
        ITERATION_DIM: xr.DataArray(
            np.arange(hist.n_iterations + 1),
            dims=(ITERATION_DIM,),
            attrs={"long_name": "iteration (0: start)", "units": "1"},
        ),
    }
    gattrs: dict[str, Any] = {
        "Conventions": "CF-1.8",
        # the observations and residuals are station time series (the gridded
        # analysis fields share the file)
        "featureType": "timeSeries",
        "title": "dphys 4D-Var analysis",
        **grid_attrs(grid),
        "method": analysis.method,
        "termination": analysis.termination,
        "converged": int(bool(analysis.converged)),
        "n_iterations": int(analysis.n_iterations),
        "cost_background": float(analysis.cost_background),
        "cost_analysis": float(analysis.cost_analysis),
        "message": analysis.message,
    }
    # Scores are scalar variables (not global attributes): they survive
    # `open_mfdataset` over a batch's outputs, one value per case.
    score_names = []

    def score(name, value, long_name, units="1"):
        attrs_ = {"long_name": long_name}
        if units is not None:
            attrs_["units"] = units
        data[name] = xr.DataArray(np.float64(value), attrs=attrs_)
        score_names.append(name)

    y = np.asarray(obs.values)
    sig = np.asarray(obs.sigma)
    for which, d in (
        ("background", analysis.obs_minus_background),
        ("analysis", analysis.obs_minus_analysis),
    ):
        z2 = (np.asarray(d) / sig) ** 2
        valid = ~np.isnan(y)
        score(
            f"chi2_{which}",
            float(np.mean(z2[valid])) if valid.any() else np.nan,
            f"mean squared normalised innovation ((y - H x_{which[0]}) / sigma)^2 "
            "(1 for a consistent R)",
        )
    state_units = units if isinstance(units, str) else None
    for key, value in (scores or {}).items():
        if isinstance(value, Mapping):
            for name, v in value.items():
                if key == "error":
                    pu = (parameter_units or {}).get(name)
                    score(f"{name}_error", v, f"{name}: analysis minus truth", pu)
                else:
                    score(f"{key}_{name}", v, f"{key.replace('_', ' ')} of {name}")
        else:
            u = state_units if key.startswith("rmse") else "1"
            if key.startswith("rmse") and isinstance(units, Mapping):
                u = units.get(key.rsplit("_", 1)[-1])
                if u is None:
                    # pooled over fields of different units: no CF units exist;
                    # the per-field scores (`rmse_..._<field>`) are written
                    continue
            score(
                key, value, key.replace("_", " ").replace("rmse", "RMSE vs truth,"), u
            )
    gattrs["dphys_scores"] = " ".join(score_names)
    if attrs:
        gattrs.update(attrs)
    return xr.Dataset(data, coords=coords, attrs=gattrs)
