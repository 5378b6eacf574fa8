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

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np


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
    "str_or_table": (
        lambda v: (
            isinstance(v, str)
            or (
                isinstance(v, dict)
                and v != {}
                and all(isinstance(x, str) for x in v.values())
            )
        ),
        "a string or a table of strings per state field",
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


def _device_list(v):
    ok = (
        isinstance(v, list)
        and v != []
        and all(
            (isinstance(x, int) and not isinstance(x, bool) and x >= 0)
            or (isinstance(x, str) and x.strip() and "," not in x)
            for x in v
        )
        and len({str(x).strip() for x in v}) == len(v)
    )
    return None if ok else "must be a list of distinct device indices, e.g. [0, 1]"


def _memory_fraction(v):
    return None if 0.0 < v <= 1.0 else "must lie in (0, 1]"


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
                "units": Key(
                    "str_or_table",
                    default=None,
                    help="units of the state, or a table of units per state field",
                ),
                "standard_names": Key(
                    "str_or_table",
                    default=None,
                    help="CF standard name of the state, or a table per field",
                ),
                "length_units": Key("str", default=None),
                "time_units": Key("str", default=None),
                "grid": Section(
                    {
                        "shape": Key("ints"),
                        "lengths": Key("floats", default=1.0, check=_positive),
                        "boundary": Key("strs", default="periodic"),
                        "origin": Key("floats", default=0.0, check=_finite),
                        "geographic_origin": Key(
                            "floats",
                            default=None,
                            check=_finite,
                            help="[lat0, lon0] in degrees: model lengths are "
                            "distances from this point on its local tangent plane "
                            "(x east, y north), so latitude/longitude coordinates "
                            "of files convert to model lengths",
                        ),
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
                "window": Key(
                    "str", default="closed", choices=("closed", "open_start")
                ),
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
                "precision": Key(
                    "str",
                    default="float64",
                    choices=("float64", "float32"),
                    help="floating-point precision of the run",
                ),
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
                "cycle": Key("bool", default=False),
                "seeds": Key("ints", default=None),
                "keep_going": Key("bool", default=False),
                "workers": Key("int", default=None, check=_at_least(1)),
                "scheduler": Key("str", default=None),
                "devices": Key("any", default=None, check=_device_list),
                "memory_fraction": Key("float", default=None, check=_memory_fraction),
                "out_dir": Key("str", default="batch"),
            },
            required=False,
        ),
    }
)


# Per model: constructor keyword -> (kind, default, controllable as a Parameter).
# Every differentiable (array) parameter of a model is controllable.
MODELS: dict[str, dict[str, tuple[str, Any, bool]]] = {
    "heat": {"kappa": ("float", _REQUIRED, True), "source": ("float", None, True)},
    "advection": {
        "velocity": ("floats", _REQUIRED, True),
        "kappa": ("float", None, True),
        "scheme": ("str", "centered", False),
    },
    "shallow_water": {
        "depth": ("float", _REQUIRED, True),
        "g": ("float", 9.81, True),
        "f0": ("float", 0.0, True),
        "beta": ("float", None, True),
        "drag": ("float", 0.0, True),
        "quadratic_drag": ("float", None, True),
        "nonlinear": ("bool", False, False),
    },
}
# A vector parameter is calibrated per component: `velocity` on a 1D grid,
# `velocity_y` and `velocity_x` on a 2D grid (array order).
COMPONENTS = {"velocity": ("velocity_y", "velocity_x")}


def control_names(model: str, ndim: int) -> list[str]:
    """The names ``[control.parameters.<name>]`` accepts for ``model``."""
    out = []
    for name, (_, _, ok) in MODELS[model].items():
        if not ok:
            continue
        if name in COMPONENTS and ndim == 2:
            out.extend(COMPONENTS[name])
        else:
            out.append(name)
    return out


STATE_FIELDS = {"heat": None, "advection": None, "shallow_water": ("eta", "u", "v")}


def component_value(values: dict, name: str):
    """A model value by control name (``velocity_x`` is a component of
    ``velocity``); None if unset."""
    for vec, comps in COMPONENTS.items():
        if name in comps:
            v = values.get(vec)
            if v is None:
                return None
            v = v if isinstance(v, list) else [v] * len(comps)
            return v[comps.index(name)] if len(v) == len(comps) else None
    v = values.get(name)
    if isinstance(v, list) and len(v) == 1:
        return v[0]
    return v
