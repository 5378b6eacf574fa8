"""The ``dphys`` command.

.. code-block:: text

    dphys demo [--out DIR] [--seed N] [--quick] [--kappa-field]
    dphys init MODEL [-o CONFIG.toml]
    dphys assimilate CONFIG.toml [--out FILE] [--figure FILE]
    dphys batch CONFIG.toml [--out-dir DIR] [--workers N | --scheduler ADDR]
                [--keep-going]
    dphys --version

The command is thin: it parses its arguments and a TOML configuration
(:mod:`assimilation.runs`), runs the library, and writes netCDF with CF
attributes, the full configuration and a ``history`` entry. Bad input (a missing
file, an invalid configuration, data that fail validation) ends with one line
``dphys: error: ...`` on stderr and exit status 2, and no output file is left under
its final name (outputs are written to a temporary file and renamed). A failed run
(e.g. a batch case, with ``--keep-going`` unset) exits with status 1.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import pathlib
import shlex
import sys
import time
import warnings
from collections.abc import Sequence
from typing import Any


PROG = "dphys"
logger = logging.getLogger("assimilation.cli")


class _UsageError(Exception):
    """Raised by the parser instead of printing usage and exiting."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _UsageError(f"{message} (see `{self.prog} --help`)")


def _version() -> str:
    import dphys

    return dphys.__version__


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


def _runtime_reason(err: BaseException) -> str:
    """The reason of an error raised inside jitted code, without its stack dumps."""
    for line in str(err).splitlines():
        if line.startswith("equinox.EquinoxRuntimeError:"):
            return line.split(":", 1)[1].strip()
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    return lines[-1] if lines else type(err).__name__


def _progress(quiet: bool, n_max: int):
    """A progress line per iteration on stderr (no extra dependency)."""
    if quiet:
        return None

    def callback(i, info):
        params = "  ".join(
            f"{k} = {float(v):.5g}"
            if getattr(v, "ndim", 0) == 0
            else f"mean {k} = {float(v.mean()):.5g}"
            for k, v in info["parameters"].items()
        )
        print(
            f"  iteration {i:3d}/{n_max}  J = {info['cost']:.6e}  "
            f"|grad J| = {info['grad_norm']:.3e}  {params}  "
            f"({info['elapsed']:.1f} s)",
            file=sys.stderr,
            flush=True,
        )
        return False

    return callback


# ------------------------------------------------------------------------ demo
def demo_config(
    *,
    seed: int = 0,
    quick: bool = False,
    kappa_field: bool = False,
    out: str = "dphys-demo",
) -> dict[str, Any]:
    """The configuration of ``dphys demo``: a seeded heat-equation twin experiment.

    A 1D periodic rod of length 1 m (insulated ends with ``kappa_field``); the truth
    has diffusivity 2e-3 m^2/s (a field with ``kappa_field``) and an initial
    temperature anomaly drawn from the background-error covariance (std 0.5 K,
    correlation length 0.1 m). Ten sensors (eight with ``quick``) at seeded random
    positions record every 5 steps (0.1 s) for 3 s (2 s) with noise 0.02 K. The
    analysis starts from a zero anomaly and kappa = 1e-3 m^2/s (a factor 2 off; prior
    std of
    log kappa 1) and estimates both.
    """
    # Compilation dominates the run time, so the quick run keeps the data and
    # differs by a coarser grid and fewer iterations allowed.
    n_points, n_sensors, n_steps = (64, 8, 100) if quick else (128, 10, 150)
    kappa = {"transform": "log", "sigma": 1.0}
    boundary = "periodic"
    if kappa_field:
        # A field breaks the FFT diagonalisation. On a periodic rod every step would be
        # a CG solve whose tangent/adjoint solves can fail to converge for the rough
        # fields met early in the minimisation; insulated (Neumann) ends keep the
        # operator tridiagonal, solved directly. The posterior has one parameter per
        # grid point: use the coarser grid.
        n_points = 64
        boundary = "neumann"
        kappa.update(field=True, sigma=0.5, length_scale=0.25)
    return {
        "model": {
            "name": "heat",
            "units": "K",
            "length_units": "m",
            "time_units": "s",
            "grid": {"shape": [n_points], "lengths": 1.0, "boundary": boundary},
            "parameters": {"kappa": 1e-3},
        },
        "time": {
            "dt": 0.02,
            "n_steps": n_steps,
            "stepper": "crank_nicolson",
            "reference": "2000-01-01T00:00:00",
        },
        "background": {"value": 0.0, "std": 0.5, "length_scale": 0.1},
        "control": {"initial_state": True, "parameters": {"kappa": kappa}},
        "solver": {"method": "gauss_newton", "max_iterations": 12 if quick else 20},
        "output": {
            "path": str(pathlib.Path(out) / "analysis.nc"),
            "figure": str(pathlib.Path(out) / "demo.png"),
        },
        "twin": {
            "seed": seed,
            "n_sensors": n_sensors,
            "obs_every": 5,
            "sigma": 0.02,
            "truth": {"kappa": 2e-3},
        },
    }


def _summary(out) -> str:
    """Truth vs estimate ± σ, RMSEs and convergence, as printed by the CLI."""
    import numpy as np

    a = out.analysis
    lines = []
    truth = (out.truth or {}).get("parameters", {})
    inside = (out.scores or {}).get("within_2sigma", {})

    def cell(v, spec):
        return f"{'-':>12}" if v is None else f"{float(v):>12{spec}}"

    if a.parameters:
        head = f"  {'parameter':<10}" + (f" {'truth':>12}" if truth else "")
        head += f" {'background':>12} {'analysis':>12} {'± σ':>12}"
        lines.append(head + ("  truth within ±2σ" if inside else ""))
    for name, value in a.parameters.items():
        value = np.asarray(value)
        bg = np.asarray(a.background_parameters[name])
        std = None if a.parameter_std is None else np.asarray(a.parameter_std[name])
        t = truth.get(name)
        if value.ndim == 0:
            row = f"  {name:<10}" + (f" {cell(t, '.5g')}" if truth else "")
            row += f" {cell(bg, '.5g')} {cell(value, '.5g')} {cell(std, '.3g')}"
            if name in inside:
                row += f"  {'yes' if inside[name] == 1.0 else 'NO'}"
        else:
            rel = (
                f", relative error {np.linalg.norm(value - t) / np.linalg.norm(t):.1%}"
                if t is not None
                else ""
            )
            row = (
                f"  {name:<10} field of {value.size} values: mean analysis "
                f"{value.mean():.5g} (background {bg.mean():.5g}"
                + (f", truth {np.mean(t):.5g}" if t is not None else "")
                + (f", mean σ {std.mean():.3g}" if std is not None else "")
                + f"{rel})"
            )
            if name in inside:
                row += f"; truth within ±2σ at {inside[name]:.0%} of points"
        lines.append(row)
    s = out.scores
    if s:
        lines.append(
            f"  initial-state RMSE: background {s['rmse_initial_background']:.4g}"
            f" -> analysis {s['rmse_initial_analysis']:.4g}"
        )
        lines.append(
            f"  final-state RMSE:   background {s['rmse_final_background']:.4g}"
            f" -> analysis {s['rmse_final_analysis']:.4g}"
        )
    lines.append("  " + a.message)
    return "\n".join(lines)


def _provenance(cfg: dict, argv: Sequence[str]) -> dict[str, Any]:
    version = _version()
    now = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    command = " ".join([PROG, *map(shlex.quote, argv)])
    return {
        "source": f"dphys {version}",
        "history": f"{now.isoformat()}: {command} (dphys {version})",
        "dphys_version": version,
        "dphys_command": command,
        "dphys_config": json.dumps(cfg, sort_keys=True, default=str),
    }


def _write_outputs(out, cfg: dict, argv: Sequence[str], *, figure: bool = True):
    """Write the analysis netCDF (atomically) and the figure; return their paths."""
    from dphys.io import write_netcdf

    from .runs import output_dataset

    ds = output_dataset(out, _provenance(cfg, argv))
    paths = [write_netcdf(ds, cfg["output"]["path"])]
    if figure and cfg["output"]["figure"]:
        from .runs import plot_analysis
        from .runs._build import figure_labels

        plot_analysis(
            out.analysis,
            out.setup.grid,
            out.obs,
            cfg["output"]["figure"],
            truth=out.truth,
            **figure_labels(cfg["model"], out.obs),
        )
        paths.append(pathlib.Path(cfg["output"]["figure"]))
    return paths


def _run_and_report(
    cfg, argv, *, quiet: bool, figure: bool = True, verbose: bool = False
) -> int:
    from .runs import build_run, run

    start = time.perf_counter()
    setup = build_run(cfg)  # reads and validates every input first
    if not quiet:
        print("  (the first iterations include JIT compilation)", file=sys.stderr)
    # A progress bar of the iterations and a line per phase (the posterior is the
    # long one after the last iteration); with -v also a line per iteration.
    callback = _progress(quiet or not verbose, cfg["solver"]["max_iterations"])
    out = run(cfg, callback=callback, setup=setup, progress=not quiet)
    if not quiet:
        print("  writing outputs ...", file=sys.stderr, flush=True)
    paths = _write_outputs(out, cfg, argv, figure=figure)
    print(_summary(out))
    print(
        f"wrote {', '.join(str(p) for p in paths)} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


def _cmd_demo(args, argv) -> int:
    from .runs import validate_config

    cfg = validate_config(
        demo_config(
            seed=args.seed, quick=args.quick, kappa_field=args.kappa_field, out=args.out
        )
    )
    twin = cfg["twin"]
    n_obs = cfg["time"]["n_steps"] // twin["obs_every"]
    what = "a diffusivity field" if args.kappa_field else "the diffusivity"
    print(
        f"dphys demo: heat-equation twin experiment (seed {args.seed}"
        f"{', quick' if args.quick else ''}): estimating {what} and the initial "
        f"state on {cfg['model']['grid']['shape'][0]} grid points from "
        f"{twin['n_sensors']} sensors x {n_obs} times (noise {twin['sigma']} K)"
    )
    return _run_and_report(
        cfg, argv, quiet=args.quiet, figure=not args.no_figure, verbose=args.verbose
    )


def _cmd_assimilate(args, argv) -> int:
    from .runs import load_config

    cfg = load_config(args.config)
    if args.out is not None:
        cfg["output"]["path"] = str(pathlib.Path(args.out).resolve())
    if args.figure is not None:  # an empty string means no figure
        cfg["output"]["figure"] = (
            str(pathlib.Path(args.figure).resolve()) if args.figure else None
        )
    print(f"dphys assimilate: {args.config} ({cfg['model']['name']} model)")
    return _run_and_report(
        cfg, argv, quiet=args.quiet, figure=not args.no_figure, verbose=args.verbose
    )


def _cmd_batch(args, argv) -> int:
    from .runs import ConfigError, config_cases, load_config, run_batch, run_config_case

    cfg = load_config(args.config)
    if cfg["batch"] is None:
        raise ConfigError(
            f"{pathlib.Path(args.config).name}: `dphys batch` needs a [batch] section "
            "(cases, seeds or windows)."
        )
    batch = cfg["batch"]
    out_dir = args.out_dir or batch["out_dir"]
    workers = args.workers if args.workers is not None else batch["workers"]
    scheduler = args.scheduler if args.scheduler is not None else batch["scheduler"]
    if workers is not None and scheduler is not None:
        raise ConfigError("give either --workers or --scheduler, not both.")
    out_dir = str(pathlib.Path(out_dir).resolve())
    devices, fraction = batch["devices"], batch["memory_fraction"]
    if devices is not None and scheduler is not None:
        raise ConfigError(
            "`batch.devices` starts local workers: give either it or --scheduler."
        )
    if batch["cycle"] and (
        workers is not None or scheduler is not None or devices is not None
    ):
        logger.warning("cycled windows depend on each other: running them serially")
        workers = scheduler = devices = fraction = None
    cases = config_cases(
        cfg,
        provenance=_provenance(cfg, argv),
        base_dir=pathlib.Path(args.config).resolve().parent,
        out_dir=out_dir,
    )
    print(f"dphys batch: {len(cases)} case(s) -> {out_dir}")

    def progress(res, done, total):
        extra = f": {res.error}" if res.error else ""
        print(
            f"  [{done}/{total}] {res.name}: {res.status} ({res.seconds:.1f} s){extra}",
            file=sys.stderr,
            flush=True,
        )

    report = run_batch(
        cases,
        run_config_case,
        out_dir,
        keep_going=args.keep_going or batch["keep_going"],
        workers=workers,
        scheduler=scheduler,
        progress=progress,
        devices=devices,
        memory_fraction=fraction,
    )
    print(report.table())
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_init(args, argv) -> int:
    from .runs import init_config

    text = init_config(args.model)
    if args.out in (None, "-"):
        print(text, end="")
        return 0
    path = pathlib.Path(args.out)
    if path.exists() and not args.force:
        raise FileExistsError(
            f"{str(path)!r} exists; pass --force to overwrite it, or choose another "
            "name."
        )
    from dphys.io import atomic_write

    with atomic_write(path) as tmp:
        tmp.write_text(text)
    print(
        f"wrote {path}: a {args.model} twin experiment. Run `dphys assimilate {path}`"
        f" or `dphys batch {path}`; every key is in docs/config.md."
    )
    return 0


EPILOG = (
    "Configuration files: `dphys init MODEL` writes a complete, commented one; every "
    "key is documented in docs/config.md (generated from the schema)."
)


def _parser() -> _Parser:
    parser = _Parser(
        prog=PROG,
        description="Differentiable-physics data assimilation.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log data corrections and conversions in detail",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    demo = sub.add_parser("demo", help="seeded twin experiment: calibrate a heat model")
    demo.add_argument(
        "--out", default="dphys-demo", help="output directory (default: dphys-demo)"
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.add_argument(
        "--quick", action="store_true", help="a shorter window and fewer iterations"
    )
    demo.add_argument(
        "--kappa-field",
        action="store_true",
        help="estimate a spatially varying diffusivity (slower)",
    )
    demo.add_argument("--no-figure", action="store_true", help="skip the PNG")
    demo.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    init = sub.add_parser(
        "init",
        help="write a complete, commented configuration for MODEL",
        epilog=EPILOG,
    )
    init.add_argument("model", choices=("heat", "advection", "shallow_water"))
    init.add_argument("-o", "--out", help="file to write (default: print it on stdout)")
    init.add_argument("--force", action="store_true", help="overwrite --out")

    assim = sub.add_parser(
        "assimilate", help="run the assimilation in CONFIG.toml", epilog=EPILOG
    )
    assim.add_argument("config", help="TOML configuration file")
    assim.add_argument("--out", help="analysis netCDF (overrides output.path)")
    assim.add_argument("--figure", help="figure PNG (overrides output.figure)")
    assim.add_argument("--no-figure", action="store_true", help="skip the figure")
    assim.add_argument("-q", "--quiet", action="store_true", help="no progress lines")

    batch = sub.add_parser(
        "batch", help="run the cases of CONFIG.toml's [batch]", epilog=EPILOG
    )
    batch.add_argument("config", help="TOML configuration file with a [batch] section")
    batch.add_argument("--out-dir", help="output directory (overrides batch.out_dir)")
    batch.add_argument(
        "--workers", type=int, help="run on a local Dask cluster with N workers"
    )
    batch.add_argument("--scheduler", help="address of a running Dask scheduler")
    batch.add_argument(
        "--keep-going",
        action="store_true",
        help="record failing cases and run the others",
    )
    return parser


_OWN_LOGGERS = ("assimilation", "dphys", "pdes")


def _configure_logging(verbose: bool) -> None:
    """Configure only the package's own loggers (never the root logger, so Dask's
    and JAX's loggers keep their own settings)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{PROG}: %(levelname)s: %(message)s"))
    handler._dphys_cli = True  # type: ignore[attr-defined]
    for name in _OWN_LOGGERS:
        log = logging.getLogger(name)
        for old in [h for h in log.handlers if getattr(h, "_dphys_cli", False)]:
            log.removeHandler(old)
        log.addHandler(handler)
        log.setLevel(logging.INFO if verbose else logging.WARNING)


def _log_warning(message, category, filename, lineno, file=None, line=None):
    logger.warning("%s", message)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dphys`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except SystemExit as exit_:  # --help and --version
        return int(exit_.code or 0)
    _configure_logging(args.verbose)
    if os.environ.get("JAX_ENABLE_X64") is None:
        # Analyses, posterior variances and netCDF outputs are double precision.
        import jax

        jax.config.update("jax_enable_x64", True)
    commands = {
        "demo": _cmd_demo,
        "init": _cmd_init,
        "assimilate": _cmd_assimilate,
        "batch": _cmd_batch,
    }
    import equinox as eqx

    from dphys import SimulationError

    from .runs import BatchError

    try:
        with warnings.catch_warnings():
            # Library warnings (a scheme far from monotone at this dt, a window
            # without observations) go to the same log as the CLI's own messages,
            # one line each.
            warnings.showwarning = _log_warning
            return commands[args.command](args, argv)
    except (
        FileNotFoundError,
        FileExistsError,
        IsADirectoryError,
        PermissionError,
    ) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except (SimulationError, BatchError) as err:
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except eqx.EquinoxRuntimeError as err:  # a check inside jitted code failed
        print(f"{PROG}: error: the run failed: {_runtime_reason(err)}", file=sys.stderr)
        return 1
    except ValueError as err:  # ConfigError and every DataError are ValueErrors
        print(f"{PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
