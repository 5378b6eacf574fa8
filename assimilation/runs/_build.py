"""Building a run (model, background, control, observations) from a configuration."""

from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Any

import numpy as np

from ._schema import COMPONENTS, STATE_FIELDS, ConfigError, component_value


logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RunSetup:
    """Everything a configured run needs, built by :func:`build_run`.

    ``truth_model``/``truth_state0``/``twin_key`` are set only for twin experiments,
    whose observations are made by :func:`run` from the truth.
    """

    config: dict
    grid: Any
    model: Any
    stepper: Any
    state0: Any
    control: Any
    method: Any
    dt: float
    n_steps: int
    t0: float
    obs: Any = None
    truth_model: Any = None
    truth_state0: Any = None
    twin_key: Any = None
    obs_positions: Any = None
    obs_times: Any = None


def set_precision(precision: str) -> None:
    """Run in ``precision`` (``"float64"``: switch on JAX's x64 mode, logged).

    Configured runs are double precision by default (``[solver] precision``), in
    every process that runs them (Dask workers included): posterior variances and
    gradient tolerances need it. ``"float32"`` keeps JAX's default and warns when
    x64 is already on (arrays are then float64 anyway).
    """
    import jax

    on = bool(jax.config.jax_enable_x64)
    if precision == "float64" and not on:
        logger.info("switching on JAX's float64 mode ([solver] precision)")
        jax.config.update("jax_enable_x64", True)
    elif precision == "float32" and on:
        warnings.warn(
            "`solver.precision` is 'float32' but JAX's x64 mode is already on in "
            "this process; the run uses float64.",
            stacklevel=2,
        )


def state_units(model: dict):
    """CF units of the state: a string (single-field) or ``{field: units}``.

    Shallow water: ``eta`` in ``length_units`` and ``u``, ``v`` in
    ``"<length_units> <time_units>-1"`` unless ``model.units`` says otherwise (a
    string: the units of ``eta``; a table: per field).
    """
    units = model["units"]
    fields = STATE_FIELDS[model["name"]]
    if fields is None:
        return units
    length, t = model["length_units"], model["time_units"]
    speed = f"{length} {t}-1" if length and t else None
    out = {"eta": length, "u": speed, "v": speed}
    if isinstance(units, str):
        out["eta"] = units
    elif isinstance(units, dict):
        out.update(units)
    out = {k: v for k, v in out.items() if v is not None}
    return out or None


def figure_labels(model: dict, obs) -> dict:
    """The units keywords of :func:`plot_analysis` for a run of ``model``."""
    units = state_units(model)
    fields = units if isinstance(units, dict) else {}
    return dict(
        units=fields.get(obs.field) if fields else units,
        length_units=model["length_units"],
        time_units=model["time_units"],
        speed_units=fields.get("u"),
    )


def geometry(model: dict):
    """The :class:`assimilation.io.TangentPlane` of ``model.grid.geographic_origin``
    (or None)."""
    origin = model["grid"].get("geographic_origin")
    if origin is None:
        return None
    from ..io import TangentPlane

    if not isinstance(origin, list) or len(origin) != 2:
        raise ConfigError(
            "`model.grid.geographic_origin` must be [lat0, lon0] in degrees, got "
            f"{origin!r}."
        )
    try:
        return TangentPlane(float(origin[0]), float(origin[1]))
    except ValueError as err:
        raise ConfigError(f"`model.grid.geographic_origin`: {err}") from err


def _field_units(model: dict, field: str | None):
    units = state_units(model)
    return units.get(field) if isinstance(units, dict) else units


def _grid(cfg):
    import dphys

    g = cfg["model"]["grid"]
    shape = g["shape"] if isinstance(g["shape"], list) else [g["shape"]]
    try:
        return dphys.Grid(
            tuple(shape),
            lengths=_tuple(g["lengths"]),
            boundary=_tuple(g["boundary"]),
            origin=_tuple(g["origin"]),
        )
    except ValueError as err:
        raise ConfigError(f"[model.grid]: {err}") from err


def _tuple(v):
    return tuple(v) if isinstance(v, list) else v


def _component_axis(name: str, grid) -> tuple[str, int] | None:
    """``("velocity", axis)`` for a component control name, else None."""
    for vec, comps in COMPONENTS.items():
        if name == vec and grid.ndim == 1:
            return vec, 0
        if name in comps and grid.ndim == 2:
            return vec, comps.index(name)
    return None


def _where(name, grid):
    """How a control name selects its model leaf (None: the attribute ``name``)."""
    comp = _component_axis(name, grid)
    if comp is None:
        return None
    vec, axis = comp
    return _Component(vec, axis)


class _Component:
    """``model.<vec>[axis]``, picklable (configured cases run in worker processes)."""

    def __init__(self, vec, axis):
        self.vec, self.axis = vec, axis

    def __call__(self, model):
        return getattr(model, self.vec)[self.axis]

    def __eq__(self, other):
        return isinstance(other, _Component) and (self.vec, self.axis) == (
            other.vec,
            other.axis,
        )

    def __hash__(self):
        return hash((self.vec, self.axis))


def _merge_components(grid, values: dict) -> dict:
    """Put component values (``velocity_x = ...``) back into their vector."""
    out = dict(values)
    for key in list(values):
        comp = _component_axis(key, grid)
        if comp is None or key == comp[0]:
            if comp is not None:  # 1D: `velocity` itself is the component
                vec = out[key]
                out[key] = [vec] if not isinstance(vec, list) else vec
            continue
        vec, axis = comp
        current = out.get(vec)
        current = (
            list(current)
            if isinstance(current, (list, tuple))
            else ([current] * grid.ndim)
        )
        current[axis] = out.pop(key)
        out[vec] = current
    return out


def _make_model(name, grid, values):
    import jax.numpy as jnp

    import pdes

    values = _merge_components(grid, values)

    try:
        if name == "heat":
            return pdes.Heat(grid, values["kappa"], source=values.get("source"))
        if name == "advection":
            vel = values["velocity"]
            vel = tuple(vel) if isinstance(vel, (list, tuple)) else (vel,) * grid.ndim
            if len(vel) == 1 and grid.ndim == 2 and jnp.ndim(vel[0]) == 0:
                vel = vel * 2
            if len(vel) != grid.ndim:
                raise ConfigError(
                    f"`model.parameters.velocity` needs {grid.ndim} component(s) (one "
                    f"per grid axis, array order), got {list(vel)}."
                )
            return pdes.Advection(
                grid,
                velocity=vel,
                kappa=values.get("kappa"),
                scheme=values.get("scheme", "centered"),
            )
        return pdes.ShallowWater(
            grid,
            values["depth"],
            g=values["g"],
            f0=values["f0"],
            beta=values.get("beta"),
            drag=values["drag"],
            quadratic_drag=values.get("quadratic_drag"),
            nonlinear=values["nonlinear"],
        )
    except (ValueError, TypeError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"[model] {name}: {err}") from err


def _stepper(name):
    import dphys

    return {
        "backward_euler": dphys.BackwardEuler,
        "crank_nicolson": dphys.CrankNicolson,
        "bdf2": dphys.BDF2,
        "imex": dphys.IMEX,
    }[name]()


def _covariance(grid, std, length_scale):
    from .._covariance import Diagonal, Diffusion

    if length_scale > 0:
        return Diffusion(grid, length_scale, std=std)
    return Diagonal(std, shape=grid.shape)


def _per_field(value, field, default):
    """A per-field setting: a number for every field, or a table (missing: default)."""
    return float(value.get(field, default) if isinstance(value, dict) else value)


def _background_state(cfg, grid):
    import jax.numpy as jnp
    import jax.tree_util as jtu

    from ..io import TimeAxisError, read_field

    model = cfg["model"]
    bg = cfg["background"]
    fields = STATE_FIELDS[model["name"]]
    dtype = jnp.result_type(float)

    def one(field, variable):
        if bg["path"] is None:
            return jnp.full(grid.shape, _per_field(bg["value"], field, 0.0), dtype)
        times, values = read_field(
            bg["path"],
            variable,
            grid,
            units=_field_units(model, field),
            length_units=model["length_units"],
            time_units=model["time_units"],
            geometry=geometry(model),
            reference=cfg["time"]["reference"],
        )
        if times is None:
            return jnp.asarray(values, dtype)
        t0 = cfg["time"]["t0"]
        hit = np.flatnonzero(
            np.isclose(np.asarray(times), t0, rtol=0, atol=1e-9 * max(1.0, abs(t0)))
        )
        if hit.size == 0:
            raise TimeAxisError(
                f"background `{variable}` in {bg['path']!r} has no time equal to the "
                f"window start t0 = {t0:g} (its times: {np.asarray(times)[:5]}...); "
                "give the background at t0, or a file without a time dimension."
            )
        return jnp.asarray(values[int(hit[0])], dtype)

    if fields is None:
        state0 = one(None, bg["variable"])
        cov = _covariance(grid, bg["std"], bg["length_scale"])
        return state0, cov
    import pdes

    # multi-field: the variables are the field names, or `<variable>_<field>` when
    # `background.variable` is set (e.g. "analysis_final" in a cycled batch)
    prefix = bg["variable"] if bg["variable"] not in (None, "u") else None
    arrays = {f: one(f, f if prefix is None else f"{prefix}_{f}") for f in fields}
    covs = {
        f: _covariance(grid, _per_field(bg["std"], f, 1.0), bg["length_scale"])
        for f in fields
    }
    state0 = _zero_walls(pdes.SWState(**arrays), grid)
    cov = jtu.tree_map(
        lambda f: covs[f], pdes.SWState(*fields), is_leaf=lambda x: isinstance(x, str)
    )
    return state0, cov


def _zero_walls(state, grid):
    """A shallow-water state with zero normal velocity on closed-basin walls.

    The wall faces are the last ``u`` column (walls across the last axis) and the
    last ``v`` row (2D, walls across the first axis), as
    :class:`pdes.ShallowWater` lays out its C-grid; a draw from B or a constant
    background is not zero there, and the model refuses such an initial state.
    """
    import jax.numpy as jnp

    u, v = state.u, state.v
    if grid.boundary[-1] != "periodic":
        u = u.at[..., -1].set(0.0)
    if grid.ndim == 2 and grid.boundary[0] != "periodic":
        v = v.at[-1, :].set(0.0)
    return type(state)(eta=state.eta, u=jnp.asarray(u), v=jnp.asarray(v))


def _transform(spec):
    from .._transforms import Bounded, Identity, Log, Softplus

    return {
        "identity": Identity,
        "log": Log,
        "softplus": Softplus,
        "bounded": lambda: Bounded(spec["lower"], spec["upper"]),
    }[spec["transform"]]()


def build_run(cfg: dict) -> RunSetup:
    """Build the model, background, control and observations of a configuration.

    Args:
        cfg: a configuration validated by :func:`validate_config`.

    Raises:
        ConfigError: values the model or covariance constructors refuse.
        DataError: observation or background files that fail validation.
    """
    import jax.numpy as jnp
    import jax.random as jr

    from .._control import Control, InitialState, Parameter
    from .._methods import LBFGS, GaussNewton
    from ..io import read_observations

    set_precision(cfg["solver"]["precision"])
    grid = _grid(cfg)
    model_cfg = cfg["model"]
    values = dict(model_cfg["parameters"])
    control_cfg = cfg["control"]
    dtype = jnp.result_type(float)

    params, backgrounds = [], {}
    for name, spec in control_cfg["parameters"].items():
        value = (
            spec["background"]
            if spec["background"] is not None
            else component_value(values, name)
        )
        try:
            transform = _transform(spec)
            if spec["field"]:
                bg = jnp.full(grid.shape, float(value), dtype)
                cov = _covariance(grid, spec["sigma"], spec["length_scale"])
                params.append(
                    Parameter(
                        name,
                        background=bg,
                        transform=transform,
                        covariance=cov,
                        where=_where(name, grid),
                    )
                )
            else:
                bg = jnp.asarray(float(value), dtype)
                params.append(
                    Parameter(
                        name,
                        background=bg,
                        transform=transform,
                        sigma=spec["sigma"],
                        where=_where(name, grid),
                    )
                )
        except ValueError as err:
            raise ConfigError(f"[control.parameters.{name}]: {err}") from err
        backgrounds[name] = bg
    model = _make_model(model_cfg["name"], grid, {**values, **backgrounds})
    state0, b_cov = _background_state(cfg, grid)
    try:
        control = Control(
            initial_state=InitialState(b_cov) if control_cfg["initial_state"] else None,
            parameters=params,
        )
    except (ValueError, TypeError) as err:
        raise ConfigError(f"[control]: {err}") from err

    solver = cfg["solver"]
    opts = dict(
        max_iterations=solver["max_iterations"],
        gtol=solver["gtol"],
        ftol=solver["ftol"],
    )
    method = (
        GaussNewton(**opts) if solver["method"] == "gauss_newton" else LBFGS(**opts)
    )

    time_cfg = cfg["time"]
    dt, n_steps, t0 = time_cfg["dt"], time_cfg["n_steps"], time_cfg["t0"]
    setup = RunSetup(
        cfg,
        grid,
        model,
        _stepper(time_cfg["stepper"]),
        state0,
        control,
        method,
        dt,
        n_steps,
        t0,
    )
    twin = cfg["twin"]
    if twin is None:
        obs_cfg = cfg["observations"]
        setup.obs = read_observations(
            obs_cfg["path"],
            grid,
            variable=obs_cfg["variable"],
            sigma=obs_cfg["sigma"],
            units=_field_units(model_cfg, obs_cfg["field"]),
            length_units=model_cfg["length_units"],
            time_units=model_cfg["time_units"],
            geometry=geometry(model_cfg),
            reference=time_cfg["reference"],
            window=(t0, t0 + n_steps * dt),
            outside=obs_cfg["outside"],
            closed="right" if obs_cfg["window"] == "open_start" else "both",
            field=obs_cfg["field"],
        )
        return setup

    # Twin experiment: a truth drawn from the prior, seeded.
    key = jr.key(twin["seed"])
    k_state, k_param, k_pos, k_obs = jr.split(key, 4)
    truth_values = dict(values)
    for i, p in enumerate(params):
        true = twin["truth"].get(p.name)
        base = (
            backgrounds[p.name]
            if true is None
            else jnp.full(jnp.shape(backgrounds[p.name]), float(true), dtype)
        )
        if jnp.ndim(base) and control_cfg["parameters"][p.name]["field"]:
            xi = p.covariance.sample(key=jr.fold_in(k_param, i))
            base = base * jnp.exp(xi)
        truth_values[p.name] = base
    setup.truth_model = _make_model(model_cfg["name"], grid, truth_values)
    leaves_cov = b_cov
    if STATE_FIELDS[model_cfg["name"]] is None:
        setup.truth_state0 = state0 + leaves_cov.sample(key=k_state)
    else:
        import jax.tree_util as jtu
        import optax.tree_utils as otu

        from .._covariance import AbstractCovariance

        covs = jtu.tree_leaves(
            leaves_cov, is_leaf=lambda c: isinstance(c, AbstractCovariance)
        )
        keys = jr.split(k_state, len(covs))
        draws = [c.sample(key=k) for c, k in zip(covs, keys, strict=True)]
        noise = jtu.tree_unflatten(jtu.tree_structure(state0), draws)
        setup.truth_state0 = _zero_walls(otu.tree_add(state0, noise), grid)
    lo = jnp.asarray(grid.origin, dtype)
    hi = lo + jnp.asarray(grid.lengths, dtype)
    pos = lo + (hi - lo) * jr.uniform(k_pos, (twin["n_sensors"], grid.ndim), dtype)
    if grid.ndim == 1:
        pos = jnp.sort(pos, axis=0)
    setup.obs_positions = pos
    every = twin["obs_every"]
    if every > n_steps:
        raise ConfigError(
            f"`twin.obs_every` = {every} is larger than `time.n_steps` = {n_steps}; "
            "there would be no observation time."
        )
    setup.obs_times = t0 + dt * jnp.arange(every, n_steps + 1, every, dtype=dtype)
    setup.twin_key = k_obs
    return setup
