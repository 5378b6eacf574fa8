"""Validating and loading TOML run configurations against the schema."""

from __future__ import annotations

import copy
import difflib
import os
import pathlib
import sys
from collections.abc import Mapping
from typing import Any


if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

from ._schema import (
    _KINDS,
    _REQUIRED,
    MODELS,
    SCHEMA,
    STATE_FIELDS,
    ConfigError,
    Key,
    MapOf,
    component_value as _model_value,
    control_names,
)


# Keys holding file paths: relative values are relative to the configuration file,
# also inside `[batch] cases ... set = {...}`.
PATH_KEYS = (
    "observations.path",
    "background.path",
    "output.path",
    "output.figure",
    "batch.out_dir",
)


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
    controllable = control_names(model["name"], len(shape))
    for name, spec in control["parameters"].items():
        if name not in controllable:
            raise ConfigError(
                f"[control.parameters.{name}]: model {model['name']!r} has no "
                f"calibratable parameter `{name}`.{_suggest(name, controllable)} "
                f"Calibratable: {', '.join(controllable)}."
            )
        if _model_value(params, name) is None and spec["background"] is None:
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
    if isinstance(model["units"], dict):
        if fields is None:
            raise ConfigError(
                f"`model.units` is a table but model {model['name']!r} has a "
                'single-field state; give a string (e.g. units = "K").'
            )
        extra = sorted(set(model["units"]) - set(fields))
        if extra:
            raise ConfigError(
                f"`model.units` has unknown field(s) {extra}; the state fields are "
                f"{list(fields)}."
            )
    _check_standard_names(model, fields)
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
        for dotted in PATH_KEYS:
            section, key = dotted.split(".")
            sec = cfg.get(section)
            if sec is not None and sec.get(key):
                sec[key] = str((base / sec[key]).resolve())
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


def _check_standard_names(model: dict, fields) -> None:
    """``model.standard_names``: one per field of the state, each a CF standard
    name that fits the field's units."""
    from ..io import UnitsError, check_standard_name
    from ._build import state_units

    names = model["standard_names"]
    if names is None:
        return
    if isinstance(names, dict):
        if fields is None:
            raise ConfigError(
                f"`model.standard_names` is a table but model {model['name']!r} has "
                "a single-field state; give a string (e.g. standard_names = "
                '"sea_surface_temperature").'
            )
        extra = sorted(set(names) - set(fields))
        if extra:
            raise ConfigError(
                f"`model.standard_names` has unknown field(s) {extra}; the state "
                f"fields are {list(fields)}."
            )
    elif fields is not None:
        raise ConfigError(
            f"`model.standard_names` is a string but model {model['name']!r} has "
            f"fields {list(fields)}; give a table, e.g. standard_names = {{ eta = "
            '"sea_surface_height_above_geoid" }.'
        )
    units = state_units(model)
    items = names.items() if isinstance(names, dict) else [(None, names)]
    for field, name in items:
        key = "model.standard_names" + ("" if field is None else f".{field}")
        u = units if field is None else (units or {}).get(field)
        try:
            check_standard_name(name, u, variable=key)
        except UnitsError as err:
            raise ConfigError(str(err)) from None
