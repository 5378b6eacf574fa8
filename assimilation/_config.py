r"""Run configurations: a TOML schema, its validation, and building a run from it.

A configuration describes one assimilation run of the ``dphys`` command (and one case
of a batch). It is plain TOML; every key is checked before anything is computed:
unknown keys (with a "did you mean"), wrong types, missing sections and bad values
all raise :class:`ConfigError` (a ``ValueError``) naming the key, what was received
and what is allowed.

.. code-block:: toml

    [model]
    name = "heat"                     # heat | advection | shallow_water
    units = "K"                       # units of the state (observations converted)
    length_units = "m"
    time_units = "s"
    grid = { shape = [64], lengths = 1.0, boundary = "periodic", origin = 0.0 }
    parameters = { kappa = 1e-3 }     # model constructor values (the background)

    [time]
    dt = 0.02
    n_steps = 100
    t0 = 0.0                          # model time of the window start
    reference = "2000-01-01T00:00"    # optional: the date of t0 (CF-dated data)
    stepper = "crank_nicolson"        # backward_euler | crank_nicolson | bdf2 | imex

    [observations]                    # or [twin] for synthetic observations
    path = "obs.nc"                   # relative to this file
    variable = "u"
    sigma = 0.02                      # optional if the file has `sigma`
    outside = "error"                 # or "drop" times outside the window

    [background]                      # the first guess of the initial state
    value = 0.0                       # or path = "background.nc", variable = "u"
    std = 0.5                         # B: standard deviation ...
    length_scale = 0.1                # ... and correlation length (0: diagonal)

    [control]
    initial_state = true
    [control.parameters.kappa]        # one table per calibrated parameter
    transform = "log"                 # identity | log | softplus | bounded
    sigma = 1.0                       # prior std of the transformed value
    field = false                     # a scalar, or a field on the grid

    [solver]
    method = "gauss_newton"           # or "lbfgs"
    max_iterations = 20

    [output]
    path = "analysis.nc"
    figure = "analysis.png"           # optional

    [twin]                            # synthetic observations from a seeded truth
    seed = 0
    n_sensors = 8
    obs_every = 5                     # model steps between observation times
    sigma = 0.02
    truth = { kappa = 2e-3 }          # true parameters (others: the background)

In a twin experiment the true initial state is the background plus a draw from
$\mathcal N(0, B)$, and a field parameter's truth is its value times
$\exp(\xi)$, $\xi$ drawn from its prior (both from ``seed``), so the truth is a
sample of the prior the analysis assumes.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import pathlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


__all__ = [
    "ConfigError",
    "MODELS",
    "SCHEMA",
    "load_config",
    "validate_config",
]


class ConfigError(ValueError):
    """A configuration is invalid; the message names the key and how to fix it."""


# ----------------------------------------------------------------------------- schema
_REQUIRED = object()


@dataclasses.dataclass(frozen=True)
class Key:
    """One configuration value: its type, default, allowed values and a check."""

    kind: str  # "float", "int", "bool", "str", "floats", "ints", "strs", "any"
    default: Any = _REQUIRED
    choices: tuple | None = None
    check: Callable[[Any], str | None] | None = None
    help: str = ""


@dataclasses.dataclass(frozen=True)
class Section:
    """A TOML table with a fixed set of keys."""

    keys: Mapping[str, Any]
    required: bool = True
    help: str = ""


@dataclasses.dataclass(frozen=True)
class MapOf:
    """A TOML table whose keys the user chooses (e.g. parameter names)."""

    item: Any
    help: str = ""


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "float": (_is_number, "a number"),
    "int": (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "floats": (
        lambda v: (
            _is_number(v)
            or (isinstance(v, list) and v != [] and all(_is_number(x) for x in v))
        ),
        "a number or a list of numbers",
    ),
    "ints": (
        lambda v: (
            (isinstance(v, int) and not isinstance(v, bool))
            or (
                isinstance(v, list)
                and v != []
                and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            )
        ),
        "an integer or a list of integers",
    ),
    "strs": (
        lambda v: (
            isinstance(v, str)
            or (isinstance(v, list) and v != [] and all(isinstance(x, str) for x in v))
        ),
        "a string or a list of strings",
    ),
    "float_or_table": (
        lambda v: (
            _is_number(v)
            or (
                isinstance(v, dict)
                and v != {}
                and all(_is_number(x) for x in v.values())
            )
        ),
        "a number or a table of numbers per state field",
    ),
    "float_or_str": (
        lambda v: _is_number(v) or isinstance(v, str),
        "a number or a string",
    ),
    "any": (lambda v: True, "anything"),
}


def _positive(v):
    vals = (
        v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
    )
    if not all(np.isfinite(x) and x > 0 for x in vals):
        return "must be positive and finite"
    return None


def _non_negative(v):
    vals = (
        v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
    )
    if not all(np.isfinite(x) and x >= 0 for x in vals):
        return "must be non-negative and finite"
    return None


def _at_least(n):
    return lambda v: None if v >= n else f"must be >= {n}"


def _fraction(v):
    return None if 0.0 <= v < 1.0 else "must lie in [0, 1)"


def _finite(v):
    vals = (
        v if isinstance(v, list) else list(v.values()) if isinstance(v, dict) else [v]
    )
    return None if all(np.isfinite(x) for x in vals) else "must be finite"


STEPPERS = ("backward_euler", "crank_nicolson", "bdf2", "imex")
TRANSFORMS = ("identity", "log", "softplus", "bounded")

SCHEMA = Section(
    {
        "model": Section(
            {
                "name": Key(
                    "str",
                    choices=("heat", "advection", "shallow_water"),
                    help="which PDE",
                ),
                "units": Key("str", default=None, help="units of the state"),
                "length_units": Key("str", default=None),
                "time_units": Key("str", default=None),
                "grid": Section(
                    {
                        "shape": Key("ints"),
                        "lengths": Key("floats", default=1.0, check=_positive),
                        "boundary": Key("strs", default="periodic"),
                        "origin": Key("floats", default=0.0, check=_finite),
                    }
                ),
                "parameters": MapOf(Key("any"), help="model constructor values"),
            }
        ),
        "time": Section(
            {
                "dt": Key("float", check=_positive),
                "n_steps": Key("int", check=_at_least(1)),
                "t0": Key("float", default=0.0, check=_finite),
                "reference": Key("str", default=None),
                "calendar": Key("str", default="standard"),
                "stepper": Key("str", default="crank_nicolson", choices=STEPPERS),
            }
        ),
        "observations": Section(
            {
                "path": Key("str"),
                "variable": Key("str", default="u"),
                "sigma": Key("float", default=None, check=_positive),
                "outside": Key("str", default="error", choices=("error", "drop")),
                "field": Key("str", default=None),
            },
            required=False,
        ),
        "background": Section(
            {
                "path": Key("str", default=None),
                "variable": Key("str", default="u"),
                "value": Key("float_or_table", default=0.0, check=_finite),
                "std": Key("float_or_table", default=1.0, check=_positive),
                "length_scale": Key("float", default=0.0, check=_non_negative),
            },
            required=False,
        ),
        "control": Section(
            {
                "initial_state": Key("bool", default=True),
                "parameters": MapOf(
                    Section(
                        {
                            "transform": Key(
                                "str", default="identity", choices=TRANSFORMS
                            ),
                            "sigma": Key("float", check=_positive),
                            "background": Key("float", default=None, check=_finite),
                            "field": Key("bool", default=False),
                            "length_scale": Key(
                                "float", default=0.0, check=_non_negative
                            ),
                            "lower": Key("float", default=None, check=_finite),
                            "upper": Key("float", default=None, check=_finite),
                        }
                    )
                ),
            },
            required=False,
        ),
        "solver": Section(
            {
                "method": Key(
                    "str", default="gauss_newton", choices=("gauss_newton", "lbfgs")
                ),
                "max_iterations": Key("int", default=20, check=_at_least(0)),
                "gtol": Key("float", default=1e-6, check=_non_negative),
                "ftol": Key("float", default=1e-12, check=_non_negative),
                "uncertainty": Key("bool", default=True),
            },
            required=False,
        ),
        "output": Section(
            {
                "path": Key("str", default="analysis.nc"),
                "figure": Key("str", default=None),
            },
            required=False,
        ),
        "twin": Section(
            {
                "seed": Key("int", default=0),
                "n_sensors": Key("int", default=8, check=_at_least(1)),
                "obs_every": Key("int", default=5, check=_at_least(1)),
                "sigma": Key("float", default=0.05, check=_positive),
                "missing": Key("float", default=0.0, check=_fraction),
                "truth": MapOf(Key("float", check=_finite)),
                "field": Key("str", default=None),
            },
            required=False,
        ),
        "batch": Section(
            {
                "cases": Key("any", default=None),
                "window_length": Key("float", default=None, check=_positive),
                "n_windows": Key("int", default=None, check=_at_least(1)),
                "seeds": Key("ints", default=None),
                "keep_going": Key("bool", default=False),
                "workers": Key("int", default=None, check=_at_least(1)),
                "scheduler": Key("str", default=None),
                "out_dir": Key("str", default="batch"),
            },
            required=False,
        ),
    }
)


# Per model: constructor keyword -> (kind, default, controllable as a Parameter).
MODELS: dict[str, dict[str, tuple[str, Any, bool]]] = {
    "heat": {"kappa": ("float", _REQUIRED, True), "source": ("float", None, True)},
    "advection": {
        "velocity": ("floats", _REQUIRED, False),
        "kappa": ("float", None, True),
        "scheme": ("str", "centered", False),
    },
    "shallow_water": {
        "depth": ("float", _REQUIRED, True),
        "g": ("float", 9.81, True),
        "f0": ("float", 0.0, True),
        "drag": ("float", 0.0, True),
        "nonlinear": ("bool", False, False),
    },
}
STATE_FIELDS = {"heat": None, "advection": None, "shallow_water": ("eta", "u", "v")}


def _suggest(name: str, allowed) -> str:
    close = difflib.get_close_matches(name, list(allowed), n=1)
    return f" Did you mean `{close[0]}`?" if close else ""


def _describe(value) -> str:
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{type(value).__name__} {text}"


def _validate(data, spec, path: str):
    where = f"[{path}]" if path else "the top level"
    if isinstance(spec, Key):
        if data is None and spec.default is None:
            return None  # an optional key left unset (re-validating a config)
        ok, what = _KINDS[spec.kind]
        if not ok(data):
            raise ConfigError(f"`{path}` must be {what}, got {_describe(data)}.")
        if spec.choices is not None and data not in spec.choices:
            raise ConfigError(
                f"`{path}` must be one of {list(spec.choices)}, got {data!r}."
                + (_suggest(data, spec.choices) if isinstance(data, str) else "")
            )
        if spec.check is not None and data is not None:
            msg = spec.check(data)
            if msg:
                raise ConfigError(f"`{path}` {msg}, got {data!r}.")
        if spec.kind == "float" and isinstance(data, int):
            data = float(data)
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a table, got {_describe(data)}.")
    if isinstance(spec, MapOf):
        return {k: _validate(v, spec.item, f"{path}.{k}") for k, v in data.items()}
    out = {}
    for key in data:
        if key not in spec.keys:
            raise ConfigError(
                f"unknown key `{key}` in {where}.{_suggest(key, spec.keys)} Allowed "
                f"keys: {', '.join(sorted(spec.keys))}."
            )
    for key, sub in spec.keys.items():
        sub_path = f"{path}.{key}" if path else key
        if key in data and data[key] is not None:
            out[key] = _validate(data[key], sub, sub_path)
        elif isinstance(sub, Key):
            if sub.default is _REQUIRED:
                raise ConfigError(
                    f"missing key `{key}` in {where}"
                    + (f" ({sub.help})" if sub.help else "")
                    + "."
                )
            out[key] = copy.deepcopy(sub.default)
        elif isinstance(sub, MapOf):
            out[key] = {}
        elif sub.required:
            raise ConfigError(f"missing section [{sub_path}].")
        else:
            out[key] = None
    return out


def validate_config(config: Mapping[str, Any], *, base_dir=None) -> dict[str, Any]:
    """Check a configuration against :data:`SCHEMA` and fill in defaults.

    Args:
        config: the parsed TOML (a ``dict``).
        base_dir: directory that relative paths are relative to (the config file's
            directory); paths are made absolute.

    Returns:
        A new ``dict`` with every key present (defaults filled in; absent optional
        sections are ``None``).

    Raises:
        ConfigError: unknown keys, wrong types, missing sections or bad values.
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"a configuration must be a table, got {_describe(config)}.")
    cfg = _validate(dict(config), SCHEMA, "")
    model = cfg["model"]
    # the grid: every per-axis list has one entry per axis
    grid = model["grid"]
    shape = grid["shape"] if isinstance(grid["shape"], list) else [grid["shape"]]
    if len(shape) not in (1, 2) or any(n < 3 for n in shape):
        raise ConfigError(
            f"`model.grid.shape` must have 1 or 2 entries, each >= 3, got {shape}."
        )
    for key in ("lengths", "boundary", "origin"):
        value = grid[key]
        if isinstance(value, list) and len(value) != len(shape):
            raise ConfigError(
                f"`model.grid.{key}` has {len(value)} entries but the grid has "
                f"{len(shape)} axes (shape {shape}); give one per axis or a single "
                "value."
            )
    for b in (
        grid["boundary"] if isinstance(grid["boundary"], list) else [grid["boundary"]]
    ):
        if b not in ("periodic", "dirichlet", "neumann"):
            raise ConfigError(
                f"`model.grid.boundary` must be 'periodic', 'dirichlet' or 'neumann', "
                f"got {b!r}.{_suggest(b, ('periodic', 'dirichlet', 'neumann'))}"
            )
    # model parameters: known names and types for this model
    known = MODELS[model["name"]]
    params = {}
    for name, value in model["parameters"].items():
        if name not in known:
            raise ConfigError(
                f"unknown key `{name}` in [model.parameters] for model "
                f"{model['name']!r}.{_suggest(name, known)} Allowed: "
                f"{', '.join(sorted(known))}."
            )
        params[name] = _validate(
            value,
            Key(known[name][0], default=known[name][1]),
            f"model.parameters.{name}",
        )
    for name, (_, default, _) in known.items():
        if name not in params:
            if default is _REQUIRED:
                raise ConfigError(
                    f"missing key `{name}` in [model.parameters] (model "
                    f"{model['name']!r} needs it)."
                )
            params[name] = default
    model["parameters"] = params
    # observations come from a file or from a twin experiment, not both
    if (cfg["observations"] is None) == (cfg["twin"] is None):
        raise ConfigError(
            "give exactly one of [observations] (read from a file) and [twin] "
            "(synthetic observations from a seeded truth)"
            + (", not both." if cfg["observations"] is not None else ".")
        )
    for section in ("background", "control", "solver", "output"):
        if cfg[section] is None:
            cfg[section] = _validate({}, SCHEMA.keys[section], section)
    control = cfg["control"]
    controllable = [n for n, (_, _, ok) in known.items() if ok]
    for name, spec in control["parameters"].items():
        if name not in controllable:
            raise ConfigError(
                f"[control.parameters.{name}]: model {model['name']!r} has no "
                f"calibratable parameter `{name}`.{_suggest(name, controllable)} "
                f"Calibratable: {', '.join(controllable)}."
            )
        if params.get(name) is None and spec["background"] is None:
            raise ConfigError(
                f"[control.parameters.{name}]: give `background` or set "
                f"`model.parameters.{name}`, the first guess of the calibration."
            )
        if spec["transform"] == "bounded":
            lo, hi = spec["lower"], spec["upper"]
            if lo is None or hi is None or not lo < hi:
                raise ConfigError(
                    f"[control.parameters.{name}]: transform 'bounded' needs `lower` < "
                    f"`upper`, got lower={lo!r}, upper={hi!r}."
                )
        elif spec["lower"] is not None or spec["upper"] is not None:
            raise ConfigError(
                f"[control.parameters.{name}]: `lower`/`upper` apply only to "
                f"transform = 'bounded' (got transform = {spec['transform']!r})."
            )
    if not control["initial_state"] and not control["parameters"]:
        raise ConfigError(
            "[control] controls nothing: set `initial_state = true` or add a "
            "[control.parameters.<name>] table."
        )
    twin = cfg["twin"]
    if twin is not None:
        for name in twin["truth"]:
            if name not in control["parameters"]:
                raise ConfigError(
                    f"`twin.truth.{name}`: `{name}` is not a calibrated parameter; "
                    f"calibrated: {sorted(control['parameters']) or 'none'}."
                )
    fields = STATE_FIELDS[model["name"]]
    bg = cfg["background"]
    for key in ("value", "std"):
        if isinstance(bg[key], dict):
            if fields is None:
                raise ConfigError(
                    f"`background.{key}` is a table but model {model['name']!r} has a "
                    "single-field state; give a number."
                )
            extra = sorted(set(bg[key]) - set(fields))
            if extra:
                raise ConfigError(
                    f"`background.{key}` has unknown field(s) {extra}; the state "
                    f"fields are {list(fields)}."
                )
    obs_field = (cfg["observations"] or twin or {}).get("field")
    if fields is not None and obs_field not in fields:
        src = "observations" if cfg["observations"] is not None else "twin"
        raise ConfigError(
            f"`{src}.field` must name the observed state field of model "
            f"{model['name']!r}, one of {list(fields)}; got {obs_field!r}."
        )
    if fields is None and obs_field is not None:
        src = "observations" if cfg["observations"] is not None else "twin"
        raise ConfigError(
            f"`{src}.field` is only for multi-field states; model "
            f"{model['name']!r} has one field."
        )
    if base_dir is not None:
        base = pathlib.Path(base_dir)
        for section, key in (
            ("observations", "path"),
            ("background", "path"),
            ("output", "path"),
            ("output", "figure"),
        ):
            sec = cfg.get(section)
            if sec is not None and sec.get(key):
                sec[key] = str((base / sec[key]).resolve())
        if cfg["batch"] is not None:
            cfg["batch"]["out_dir"] = str((base / cfg["batch"]["out_dir"]).resolve())
    return cfg


def load_config(path: str | os.PathLike) -> dict[str, Any]:
    """Read and validate a TOML configuration file.

    Relative paths inside it are taken relative to the file's directory.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ConfigError: invalid TOML or an invalid configuration.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such configuration file: {str(path)!r}")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path.name} is not valid TOML: {err}") from err
    try:
        return validate_config(data, base_dir=path.parent)
    except ConfigError as err:
        raise ConfigError(f"{path.name}: {err}") from None


def set_dotted(config: dict, dotted: str, value) -> None:
    """Set ``config["a"]["b"] = value`` for ``dotted = "a.b"`` (creating tables)."""
    parts = dotted.split(".")
    node = config
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set `{dotted}`: `{part}` is not a table.")
    node[parts[-1]] = value


# ------------------------------------------------------------------ building a run
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


def _make_model(name, grid, values):
    import pdes

    try:
        if name == "heat":
            return pdes.Heat(grid, values["kappa"], source=values.get("source"))
        if name == "advection":
            vel = values["velocity"]
            vel = tuple(vel) if isinstance(vel, list) else (vel,) * grid.ndim
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
            drag=values["drag"],
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
    from ._covariance import Diagonal, Diffusion

    if length_scale > 0:
        return Diffusion(grid, length_scale, std=std)
    return Diagonal(std, shape=grid.shape)


def _per_field(value, field, default):
    """A per-field setting: a number for every field, or a table (missing: default)."""
    return float(value.get(field, default) if isinstance(value, dict) else value)


def _background_state(cfg, grid):
    import jax.numpy as jnp
    import jax.tree_util as jtu

    from ._data import TimeAxisError, read_field

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
            units=model["units"],
            length_units=model["length_units"],
            time_units=model["time_units"],
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

    arrays = {f: one(f, f) for f in fields}
    covs = {
        f: _covariance(grid, _per_field(bg["std"], f, 1.0), bg["length_scale"])
        for f in fields
    }
    state0 = pdes.SWState(**arrays)
    cov = jtu.tree_map(
        lambda f: covs[f], pdes.SWState(*fields), is_leaf=lambda x: isinstance(x, str)
    )
    return state0, cov


def _transform(spec):
    from ._control import Bounded, Identity, Log, Softplus

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

    from ._control import Control, InitialState, Parameter
    from ._data import read_observations
    from ._variational import LBFGS, GaussNewton

    grid = _grid(cfg)
    model_cfg = cfg["model"]
    values = dict(model_cfg["parameters"])
    control_cfg = cfg["control"]
    dtype = jnp.result_type(float)

    params, backgrounds = [], {}
    for name, spec in control_cfg["parameters"].items():
        value = spec["background"] if spec["background"] is not None else values[name]
        try:
            transform = _transform(spec)
            if spec["field"]:
                bg = jnp.full(grid.shape, float(value), dtype)
                cov = _covariance(grid, spec["sigma"], spec["length_scale"])
                params.append(
                    Parameter(name, background=bg, transform=transform, covariance=cov)
                )
            else:
                bg = jnp.asarray(float(value), dtype)
                params.append(
                    Parameter(
                        name, background=bg, transform=transform, sigma=spec["sigma"]
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
            units=model_cfg["units"],
            length_units=model_cfg["length_units"],
            time_units=model_cfg["time_units"],
            reference=time_cfg["reference"],
            window=(t0, t0 + n_steps * dt),
            outside=obs_cfg["outside"],
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

        from ._covariance import AbstractCovariance

        covs = jtu.tree_leaves(
            leaves_cov, is_leaf=lambda c: isinstance(c, AbstractCovariance)
        )
        keys = jr.split(k_state, len(covs))
        draws = [c.sample(key=k) for c, k in zip(covs, keys, strict=True)]
        noise = jtu.tree_unflatten(jtu.tree_structure(state0), draws)
        setup.truth_state0 = jtu.tree_map(jnp.add, state0, noise)
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


def _rmse(a, b) -> float:
    import jax.tree_util as jtu

    d = np.concatenate(
        [
            np.ravel(np.asarray(x) - np.asarray(y))
            for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
        ]
    )
    return float(np.sqrt(np.mean(d**2)))


def run(cfg: dict, *, callback=None, setup: RunSetup | None = None) -> RunOutput:
    """Build (unless ``setup`` is given) and run a configured assimilation.

    For a twin experiment, synthetic observations are made from the truth first
    (:func:`assimilation.make_observations`) and the analysis is scored against the
    truth.

    Args:
        cfg: a validated configuration.
        callback: progress callback passed to :func:`assimilation.assimilate`.
        setup: a prebuilt :class:`RunSetup`.

    Returns:
        A :class:`RunOutput`.
    """
    import time

    import dphys

    from ._cost import FourDVar
    from ._twin import make_observations
    from ._variational import assimilate

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
        cost, setup.method, callback=callback, uncertainty=cfg["solver"]["uncertainty"]
    )
    out = RunOutput(setup, analysis, setup.obs)
    if twin is not None:
        truth_final = dphys.simulate(
            setup.truth_model,
            setup.stepper,
            setup.truth_state0,
            dt=setup.dt,
            n_steps=setup.n_steps,
            t0=setup.t0,
        ).final
        truth_params = {
            p.name: np.asarray(p.select(setup.truth_model))
            for p in cost.control.parameters
        }
        out.truth = {
            "state0": setup.truth_state0,
            "final": truth_final,
            "parameters": truth_params,
        }
        scores = {
            "rmse_initial_background": _rmse(
                analysis.background_state, setup.truth_state0
            ),
            "rmse_initial_analysis": _rmse(analysis.initial_state, setup.truth_state0),
            "rmse_final_background": _rmse(
                analysis.background_final_state, truth_final
            ),
            "rmse_final_analysis": _rmse(analysis.final_state, truth_final),
            "within_2sigma": {},
        }
        if analysis.parameter_std_unconstrained is not None:
            import jax.numpy as jnp

            for p in cost.control.parameters:
                z_t = np.asarray(p.transform.inverse(jnp.asarray(truth_params[p.name])))
                z_a = np.asarray(
                    p.transform.inverse(jnp.asarray(analysis.parameters[p.name]))
                )
                s = np.asarray(analysis.parameter_std_unconstrained[p.name])
                scores["within_2sigma"][p.name] = float(
                    np.mean(np.abs(z_t - z_a) <= 2 * s)
                )
        out.scores = scores
    out.seconds = time.perf_counter() - start
    return out


def output_dataset(out: RunOutput, attrs: Mapping[str, Any] | None = None):
    """The CF dataset of a :class:`RunOutput` (see :func:`analysis_to_dataset`)."""
    from ._data import analysis_to_dataset

    cfg = out.setup.config
    model = cfg["model"]
    return analysis_to_dataset(
        out.analysis,
        out.setup.grid,
        out.obs,
        units=model["units"],
        length_units=model["length_units"],
        time_units=model["time_units"],
        reference=cfg["time"]["reference"],
        calendar=cfg["time"]["calendar"],
        truth=out.truth,
        scores=out.scores,
        attrs=attrs,
        parameter_units=parameter_units(model),
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
    if u and t:
        out["source"] = f"{u} {t}-1"
    return out
