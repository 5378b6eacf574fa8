"""The configuration reference (docs/config.md) and `dphys init`, from the schema.

Both are generated from :data:`SCHEMA` and :data:`HELP`, so the documentation, the
commented starting configurations and the validation can never disagree: a test
checks that ``docs/config.md`` is :func:`config_reference`'s output.
"""

from __future__ import annotations

import json
from typing import Any

from ._schema import _REQUIRED, MODELS, SCHEMA, STATE_FIELDS, Key, MapOf, Section


SECTIONS = {
    "model": "The PDE, its grid, units and parameters (the background values).",
    "model.grid": "A uniform grid of 1 or 2 axes (array order: `[y, x]`).",
    "time": "The assimilation window: `n_steps` steps of `dt` from `t0`.",
    "observations": "Observations read from a netCDF file (or use [twin]).",
    "background": "The first guess of the initial state and its error covariance B.",
    "control": "What the assimilation estimates.",
    "solver": "The minimisation and the posterior.",
    "output": "Where `dphys assimilate` writes.",
    "twin": "Synthetic observations from a seeded truth (instead of [observations]).",
    "batch": "`dphys batch`: many cases of this configuration.",
}

HELP: dict[str, str] = {
    "model.name": "which PDE: heat (diffusion), advection (-diffusion) or shallow "
    "water",
    "model.units": "CF units of the state (data are converted to them); for "
    "shallow water a table per field, default eta in `length_units` and u, v in "
    "`length_units time_units-1`",
    "model.standard_names": "CF standard name written on the state variables of "
    "the outputs (a string, or a table per field for shallow water, e.g. eta = "
    '"sea_surface_height_above_geoid", u = "eastward_sea_water_velocity", v = '
    '"northward_sea_water_velocity" when x is east); checked against the units; '
    "default: none (dphys does not guess what a field is)",
    "model.length_units": 'units of lengths and positions (e.g. "m", "km")',
    "model.time_units": 'units of model time (e.g. "s", "h", "days")',
    "model.grid.shape": "points per axis, each >= 3",
    "model.grid.lengths": "domain length per axis (in `length_units`)",
    "model.grid.boundary": "periodic | dirichlet | neumann, per axis (shallow water: "
    "neumann = closed basin walls)",
    "model.grid.origin": "coordinate of the domain's start per axis",
    "model.grid.geographic_origin": "[lat0, lon0] in degrees: model lengths are "
    "distances from this point on its local tangent plane (y north, x east), so "
    "files with latitude/longitude in degrees can be read",
    "model.parameters": "the model's constructor values (see the table below)",
    "time.dt": "time step (in `time_units`)",
    "time.n_steps": "number of steps in the window",
    "time.t0": "model time of the window start",
    "time.reference": 'the date of `t0` (ISO, e.g. "2000-01-01T00:00:00"), for '
    "files whose times are dates",
    "time.calendar": "CF calendar of the dates (standard, noleap, 360_day, ...)",
    "time.stepper": "implicit time stepper",
    "observations.path": "netCDF file: sensors (time, station) or a gridded field "
    "(time, y, x)/(time, lat, lon); relative to this file",
    "observations.variable": "the observed variable's name in the file",
    "observations.sigma": "observation-error std (model units); default: the file's "
    "`sigma` variable or attribute",
    "observations.outside": "times outside the window: refuse (error) or drop",
    "observations.window": "closed: [t0, t1]; open_start: (t0, t1] (set by batch "
    "windows so no observation is used twice)",
    "observations.field": "the observed state field (shallow water: eta, u or v)",
    "background.path": "netCDF file of the background (at t0, or without time); "
    "default: the constant `value`",
    "background.variable": "its variable name (shallow water: the field names "
    "eta, u, v, or <variable>_<field> when set)",
    "background.value": "constant background (a table per field for shallow water)",
    "background.std": "background-error std (a table per field for shallow water)",
    "background.length_scale": "correlation length of B (0: uncorrelated)",
    "control.initial_state": "estimate the initial state",
    "control.parameters": "one table per calibrated parameter (see below)",
    "control.parameters.*.transform": "identity | log | softplus | bounded (a "
    "positive parameter: log)",
    "control.parameters.*.sigma": "prior std of the transformed value (log: a "
    "factor e^sigma)",
    "control.parameters.*.background": "first guess (default: the model's value)",
    "control.parameters.*.field": "a field on the grid instead of a scalar",
    "control.parameters.*.length_scale": "correlation length of a field's prior",
    "control.parameters.*.lower": "lower bound (transform = bounded)",
    "control.parameters.*.upper": "upper bound (transform = bounded)",
    "solver.method": "Gauss-Newton (with the Laplace posterior) or L-BFGS",
    "solver.max_iterations": "maximum outer iterations",
    "solver.gtol": "stop when |grad J| <= gtol |grad J_0|",
    "solver.ftol": "stop when the relative cost decrease <= ftol",
    "solver.uncertainty": "compute posterior standard deviations and correlations",
    "solver.precision": "float64 (default) or float32 arithmetic",
    "output.path": "the analysis netCDF (CF-1.8)",
    "output.figure": "a PNG summary figure (batch: one per case, <case>.png)",
    "twin.seed": "random seed of the truth, the sensors and the noise",
    "twin.n_sensors": "number of sensors at random positions",
    "twin.obs_every": "model steps between observation times",
    "twin.sigma": "observation-noise std",
    "twin.missing": "fraction of observations dropped at random",
    "twin.truth": "true parameter values (others: the background)",
    "twin.field": "the observed state field (shallow water: eta, u or v)",
    "batch.cases": 'explicit cases: [{name = "a", set = {"dotted.key" = value}}]',
    "batch.window_length": "with n_windows: consecutive windows of this length",
    "batch.n_windows": "number of consecutive windows from time.t0",
    "batch.cycle": "with n_windows: cycle, the analysis at the end of each window "
    "is the background of the next (windows then run one after another)",
    "batch.seeds": "one twin experiment per seed",
    "batch.keep_going": "record failing cases and run the others",
    "batch.workers": "local Dask worker processes (default: serial)",
    "batch.scheduler": "address of a running Dask scheduler",
    "batch.devices": "GPUs: one local worker process per listed device, started "
    "with CUDA_VISIBLE_DEVICES set to it (docs/config.md: GPU batches)",
    "batch.memory_fraction": "with devices: XLA_PYTHON_CLIENT_MEM_FRACTION of every "
    "worker (default: JAX's 0.75)",
    "batch.out_dir": "output folder, one <case>.nc per case; relative to this file",
}

PARAMETER_HELP = {
    "kappa": "diffusivity (length^2 / time)",
    "source": "constant heat source (units / time)",
    "velocity": "advection velocity, one component per axis (length / time); "
    "calibrated as `velocity` (1D) or `velocity_y`, `velocity_x` (2D)",
    "scheme": "centered | upwind | upwind3",
    "depth": "mean depth H (length)",
    "g": "gravity (length / time^2)",
    "f0": "Coriolis parameter (1 / time)",
    "beta": "beta-plane df/dy (1 / (length time))",
    "drag": "linear drag (1 / time)",
    "quadratic_drag": "quadratic drag coefficient",
    "nonlinear": "nonlinear shallow water",
}


def _default(spec: Key) -> str:
    if spec.default is _REQUIRED:
        return "**required**"
    if spec.default is None:
        return "-"
    return f"`{json.dumps(spec.default)}`"


def _rows(section: Section, path: str):
    rows, subs = [], []
    for key, spec in section.keys.items():
        dotted = f"{path}.{key}" if path else key
        if isinstance(spec, Section):
            subs.append((dotted, spec))
        elif isinstance(spec, MapOf):
            rows.append((f"`{key}`", "table", "-", HELP.get(dotted, spec.help)))
            if isinstance(spec.item, Section):
                subs.append((f"{dotted}.<name>", spec.item))
        else:
            kind = spec.kind.replace("_", " ")
            if spec.choices:
                kind += ": " + " \\| ".join(map(str, spec.choices))
            rows.append((f"`{key}`", kind, _default(spec), HELP.get(dotted, spec.help)))
    return rows, subs


def config_reference() -> str:
    """The configuration reference in Markdown (the text of ``docs/config.md``)."""
    out = [
        "# Configuration reference",
        "",
        "<!-- generated by assimilation.runs.config_reference(); do not edit: run",
        "     python -c 'from assimilation.runs import config_reference as r; "
        'print(r(), end="")\' > docs/config.md -->',
        "",
        "A run of `dphys assimilate CONFIG.toml` or `dphys batch CONFIG.toml` is "
        "described by one TOML file. `dphys init MODEL` writes a complete, commented "
        "one that runs as is. Every key is checked before anything runs: unknown keys "
        '(with a "did you mean"), wrong types and bad values are one-line errors. '
        "Relative paths are relative to the configuration file, everywhere "
        "(also in `[batch]` cases). Exactly one of `[observations]` and `[twin]`.",
        "",
    ]

    def section(dotted, spec):
        rows, subs = _rows(spec, dotted.replace(".<name>", ".*"))
        title = dotted
        out.append(f"## [{title}]")
        out.append("")
        if dotted in SECTIONS:
            out.extend([SECTIONS[dotted], ""])
        if not spec.required and "." not in dotted:
            out.extend(["Optional section.", ""])
        if rows:
            out.extend(["| key | type | default | meaning |", "|---|---|---|---|"])
            out.extend(f"| {k} | {t} | {d} | {h} |" for k, t, d, h in rows)
            out.append("")
        for sub_dotted, sub in subs:
            section(sub_dotted, sub)

    for key, spec in SCHEMA.keys.items():
        section(key, spec)
    out += [
        "## Model parameters",
        "",
        "`[model.parameters]` holds the constructor values of the model; those "
        "marked calibratable can be estimated with a `[control.parameters.<name>]` "
        "table (and given a truth in `[twin.truth]`).",
        "",
        "| model | parameter | type | default | calibratable | meaning |",
        "|---|---|---|---|---|---|",
    ]
    for model, params in MODELS.items():
        for name, (kind, default, ok) in params.items():
            d = (
                "**required**"
                if default is _REQUIRED
                else ("-" if default is None else f"`{json.dumps(default)}`")
            )
            out.append(
                f"| {model} | `{name}` | {kind} | {d} | {'yes' if ok else 'no'} | "
                f"{PARAMETER_HELP.get(name, '')} |"
            )
    out += [
        "",
        "State fields: "
        + "; ".join(
            f"{m}: {', '.join(f) if f else 'one field'}"
            for m, f in STATE_FIELDS.items()
        )
        + ".",
        "",
        "## GPU batches",
        "",
        "JAX takes the first GPU it sees and preallocates 75% of its memory, so "
        "several workers on one machine must each see only their own device. Run "
        "one worker process per device:",
        "",
        "```toml",
        "[batch]",
        "seeds = [0, 1, 2, 3, 4, 5, 6, 7]",
        "devices = [0, 1]            # one worker process per GPU",
        "memory_fraction = 0.9       # XLA_PYTHON_CLIENT_MEM_FRACTION per worker",
        "```",
        "",
        "`dphys batch run.toml` then starts a local Dask cluster with one "
        "single-threaded worker process per entry, started with "
        "`CUDA_VISIBLE_DEVICES=<entry>` and, when set, "
        "`XLA_PYTHON_CLIENT_MEM_FRACTION=<memory_fraction>`; cases go to whichever "
        "worker is free. `--workers` must then be left out or equal the number of "
        "devices, and `--scheduler` cannot be combined with it. Across machines, "
        "start the workers yourself with the same variables:",
        "",
        "```sh",
        "dask scheduler --port 8786 &",
        "CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \\",
        "    dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1 &",
        "CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \\",
        "    dask worker tcp://HOST:8786 --nworkers 1 --nthreads 1 &",
        "dphys batch run.toml --scheduler tcp://HOST:8786",
        "```",
        "",
        "`XLA_PYTHON_CLIENT_PREALLOCATE=false` instead lets several workers share "
        "one device, each allocating what it needs (slower, but no worker is "
        "refused memory another reserved). Cycled windows run serially in the "
        "`dphys` process (set `CUDA_VISIBLE_DEVICES` for it). Every worker uses "
        "the persistent compilation cache, so workers compile each program once.",
        "",
    ]
    return "\n".join(out)


# ---------------------------------------------------------------- dphys init
_INIT: dict[str, dict[str, Any]] = {
    "heat": {
        "model": {
            "name": "heat",
            "units": "K",
            "length_units": "m",
            "time_units": "s",
            "grid": {"shape": [32], "lengths": 1.0, "boundary": "periodic"},
            "parameters": {"kappa": 1e-3},
        },
        "time": {"dt": 0.02, "n_steps": 20, "reference": "2000-01-01T00:00:00"},
        "background": {"value": 0.0, "std": 0.5, "length_scale": 0.1},
        "control": {
            "initial_state": True,
            "parameters": {"kappa": {"transform": "log", "sigma": 1.0}},
        },
        "twin": {"truth": {"kappa": 2e-3}, "sigma": 0.02},
    },
    "advection": {
        "model": {
            "name": "advection",
            "units": "K",
            "length_units": "m",
            "time_units": "s",
            "grid": {"shape": [32], "lengths": 1.0, "boundary": "periodic"},
            "parameters": {"velocity": 0.1, "kappa": 1e-3},
        },
        "time": {"dt": 0.02, "n_steps": 20, "reference": "2000-01-01T00:00:00"},
        "background": {"value": 0.0, "std": 0.5, "length_scale": 0.1},
        "control": {
            "initial_state": True,
            "parameters": {"velocity": {"transform": "identity", "sigma": 0.1}},
        },
        "twin": {"truth": {"velocity": 0.15}, "sigma": 0.02},
    },
    "shallow_water": {
        "model": {
            "name": "shallow_water",
            "length_units": "m",
            "time_units": "s",
            # a closed channel: walls at both ends (neumann)
            "grid": {"shape": [32], "lengths": 3.2e5, "boundary": "neumann"},
            "parameters": {"depth": 100.0},
        },
        "time": {"dt": 60.0, "n_steps": 10, "reference": "2000-01-01T00:00:00"},
        "background": {
            "value": 0.0,
            "std": {"eta": 0.1, "u": 0.01, "v": 0.01},
            "length_scale": 2e4,
        },
        "control": {
            "initial_state": True,
            "parameters": {"depth": {"transform": "log", "sigma": 0.3}},
        },
        "twin": {"truth": {"depth": 120.0}, "sigma": 0.01, "field": "eta"},
    },
}


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(v)


def init_config(model: str) -> str:
    """A complete, commented configuration for ``model`` that runs as is.

    A twin experiment (synthetic observations from a seeded truth) with every key
    of every section written out with its value and meaning, and a ``[batch]``
    section of three seeds for ``dphys batch``. Replace ``[twin]`` by
    ``[observations]`` to assimilate a file.
    """
    if model not in _INIT:
        raise ValueError(f"`model` must be one of {sorted(_INIT)}, got {model!r}.")
    base = _INIT[model]
    lines = [
        f"# dphys configuration: {model} twin experiment.",
        "# Run it: `dphys assimilate THIS.toml`; many cases: `dphys batch THIS.toml`.",
        "# Every key is documented in docs/config.md. Commented keys show defaults.",
    ]

    def emit(path, spec, values):
        for key, sub in spec.keys.items():
            dotted = f"{path}.{key}"
            if isinstance(sub, (Section, MapOf)):
                continue
            help_ = HELP.get(dotted, sub.help)
            if key in values:
                lines.append(f"{key} = {_toml_value(values[key])}  # {help_}")
            elif sub.default is _REQUIRED:
                continue
            elif sub.default is None:
                lines.append(f"# {key} =  # {help_}")
            else:
                lines.append(f"# {key} = {_toml_value(sub.default)}  # {help_}")

    for section in (
        "model",
        "time",
        "background",
        "control",
        "solver",
        "output",
        "twin",
        "batch",
    ):
        spec = SCHEMA.keys[section]
        values = dict(base.get(section, {}))
        if section == "solver":
            values = {"method": "gauss_newton", "max_iterations": 5}
        if section == "output":
            values = {"path": f"{model}-analysis.nc", "figure": f"{model}.png"}
        if section == "batch":
            values = {"seeds": [0, 1, 2], "out_dir": f"{model}-batch"}
        lines += ["", f"# {SECTIONS[section]}", f"[{section}]"]
        emit(section, spec, values)
        if section == "model":
            lines += ["", f"# {SECTIONS['model.grid']}", "[model.grid]"]
            emit("model.grid", spec.keys["grid"], values["grid"])
            lines += [
                "",
                "# constructor values (docs/config.md: Model parameters)",
                "[model.parameters]",
            ]
            for name, (_, default, _) in MODELS[model].items():
                text = PARAMETER_HELP.get(name, "")
                if name in values["parameters"]:
                    lines.append(
                        f"{name} = {_toml_value(values['parameters'][name])}  # {text}"
                    )
                elif default is not _REQUIRED and default is not None:
                    lines.append(f"# {name} = {_toml_value(default)}  # {text}")
                else:
                    lines.append(f"# {name} =  # {text}")
        if section == "control":
            for name, pspec in values.get("parameters", {}).items():
                lines += ["", f"[control.parameters.{name}]"]
                emit(
                    "control.parameters.*",
                    spec.keys["parameters"].item,
                    pspec,
                )
        if section == "twin":
            lines += ["", "[twin.truth]  # true parameter values"]
            for name, value in values.get("truth", {}).items():
                lines.append(f"{name} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"
