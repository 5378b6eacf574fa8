"""Configured batches: the cases of a configuration's ``[batch]`` section."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pathlib

import xarray as xr

from ._batch import Case, split_windows
from ._config import PATH_KEYS, set_dotted, validate_config
from ._schema import ConfigError


# ------------------------------------------------------------ configured batches
def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as err:  # the case will fail with a clear error when it runs
        return f"unreadable: {type(err).__name__}"
    return h.hexdigest()


def config_key(cfg: dict, *, previous: str | None = None) -> str:
    """SHA-256 of what a configured run's output depends on.

    The resolved configuration (every default filled in, paths absolute), the
    contents of its input files (observations, background) and the package version:
    a batch recomputes a case when any of them changed, and only then.
    """
    import dphys

    h = hashlib.sha256()
    h.update(json.dumps(cfg, sort_keys=True, default=str).encode())
    for section in ("observations", "background"):
        path = (cfg.get(section) or {}).get("path")
        if section == "background" and previous is not None:
            # a cycled window's background is the previous window's output, which is
            # a function of the previous key: chain the keys instead
            h.update(f"previous:{previous}".encode())
        elif path:
            h.update(f"{section}:{path}:{_file_digest(path)}".encode())
    h.update(f"dphys {dphys.__version__}".encode())
    return h.hexdigest()


def config_cases(
    cfg: dict,
    *,
    provenance: dict | None = None,
    base_dir: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
) -> list[Case]:
    """The cases of a configuration's ``[batch]`` section.

    Exactly one of:

    * ``seeds = [0, 1, ...]``: one twin experiment per seed (``case seed-<n>``);
    * ``n_windows = N`` and ``window_length = L`` (model time): consecutive windows
      starting at ``time.t0``, each with ``n_steps = L / dt`` and observations
      outside it dropped (``window-000``, ...). Windows are half-open,
      $(t_0, t_0 + L]$, except the first, $[t_0, t_0 + L]$: an observation on a
      boundary belongs to the window it ends, never to two;
      With ``cycle = true`` the analysis forecast at the end of each window is the
      background of the next (``background.path`` is the previous window's output),
      so the windows must run one after another;
    * ``cases = [{name = "...", set = {"dotted.key" = value, ...}}, ...]``:
      explicit cases overriding keys of the base configuration. Relative paths in
      ``set`` (``observations.path``, ``background.path``, ...) are relative to
      ``base_dir``, the configuration file's folder, like every other path.

    Every case's configuration is validated before anything runs, and gets a key
    (:func:`config_key`) so that :func:`run_batch` recomputes it exactly when its
    configuration, inputs or the package version changed. With ``out_dir`` and an
    ``[output] figure``, each case also draws ``<out_dir>/<name>.png``.

    Raises:
        ConfigError: an invalid ``[batch]`` section or case configuration.
    """
    batch = cfg["batch"]
    given = [k for k in ("seeds", "n_windows", "cases") if batch[k] is not None]
    if len(given) != 1:
        raise ConfigError(
            "[batch] needs exactly one of `seeds`, `n_windows` (with "
            f"`window_length`) or `cases`; got {given or 'none'}."
        )
    overrides: list[tuple[str, dict]] = []
    if batch["cycle"] and batch["n_windows"] is None:
        raise ConfigError("`batch.cycle` applies to `n_windows` batches only.")
    if batch["seeds"] is not None:
        if cfg["twin"] is None:
            raise ConfigError("`batch.seeds` needs a [twin] section to reseed.")
        seeds = batch["seeds"] if isinstance(batch["seeds"], list) else [batch["seeds"]]
        overrides = [(f"seed-{s}", {"twin.seed": s}) for s in seeds]
    elif batch["n_windows"] is not None:
        length = batch["window_length"]
        if length is None:
            raise ConfigError("`batch.n_windows` needs `batch.window_length`.")
        dt, t0 = cfg["time"]["dt"], cfg["time"]["t0"]
        n_steps = round(length / dt)
        if n_steps < 1 or abs(n_steps * dt - length) > 1e-9 * max(length, 1.0):
            raise ConfigError(
                f"`batch.window_length` = {length} must be a whole number of time "
                f"steps (time.dt = {dt})."
            )
        if batch["cycle"] and out_dir is None:
            raise ConfigError("`batch.cycle` needs the batch's output folder.")
        for k, (a, _) in enumerate(
            split_windows(t0, t0 + batch["n_windows"] * length, length)
        ):
            sets = {"time.t0": a, "time.n_steps": n_steps}
            if batch["cycle"] and k > 0:
                # the analysis forecast at the end of window k-1 (= the start of
                # window k) is window k's background
                sets["background.path"] = str(
                    pathlib.Path(out_dir) / f"window-{k - 1:03d}.nc"
                )
                sets["background.variable"] = "analysis_final"
            if cfg["observations"] is not None:
                sets["observations.outside"] = "drop"
                if k > 0:
                    sets["observations.window"] = "open_start"
            overrides.append((f"window-{k:03d}", sets))
    else:
        raw = batch["cases"]
        if not isinstance(raw, list) or not raw:
            raise ConfigError("`batch.cases` must be a non-empty array of tables.")
        for i, item in enumerate(raw):
            if (
                not isinstance(item, dict)
                or set(item) - {"name", "set"}
                or ("name" not in item)
            ):
                raise ConfigError(
                    f"`batch.cases[{i}]` must be a table with `name` and optional "
                    f"`set` (dotted keys to override), got {item!r}."
                )
            sets = item.get("set", {})
            if not isinstance(sets, dict):
                raise ConfigError(f"`batch.cases[{i}].set` must be a table.")
            overrides.append((str(item["name"]), _flatten(sets)))
    cases = []
    want_figure = bool(cfg["output"]["figure"]) and out_dir is not None
    previous = None
    for name, sets in overrides:
        case_cfg = copy.deepcopy(cfg)
        case_cfg["batch"] = None
        for key, value in sets.items():
            if key in PATH_KEYS and isinstance(value, str) and base_dir is not None:
                value = str((pathlib.Path(base_dir) / value).resolve())
            set_dotted(case_cfg, key, value)
        try:
            case_cfg = validate_config(case_cfg)
            payload = {"config": case_cfg, "attrs": dict(provenance or {})}
            if want_figure:
                payload["figure"] = str(pathlib.Path(out_dir) / f"{name}.png")
            chained = previous if "background.variable" in sets else None
            case = Case(name, payload, key=config_key(case_cfg, previous=chained))
            previous = case.key
        except ValueError as err:
            raise ConfigError(f"batch case {name!r}: {err}") from None
        cases.append(case)
    return cases


def _flatten(table: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in table.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_config_case(case: Case) -> xr.Dataset:
    """Run the configured assimilation of ``case`` (from :func:`config_cases`) and
    return its output dataset. Module-level so that Dask workers can run it."""
    from ._run import output_dataset, run

    out = run(case.payload["config"])
    figure = case.payload.get("figure")
    if figure:
        from ._build import figure_labels
        from ._plot import plot_analysis

        plot_analysis(
            out.analysis,
            out.setup.grid,
            out.obs,
            figure,
            truth=out.truth,
            **figure_labels(out.setup.config["model"], out.obs),
        )
    return output_dataset(out, case.payload.get("attrs"))
