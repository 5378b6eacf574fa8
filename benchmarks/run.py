"""Benchmarks of benchmarks/README.md: heat suite (P1, P2, P6) and P5 gradients.

Usage::

    python benchmarks/run.py [--problem P1 P2 P5 P6 limits] [--quick] [--tiny]
                             [--dtype float64|float32] [--repeats R]
    python benchmarks/run.py --problem S1 S2 [--quick] [--tiny]
    python benchmarks/run.py --problem L2 [--quick] [--tiny]   # model-error learning

S1 (sparse recovery: ISTA/FISTA/AMP/state evolution/learned networks,
``benchmarks/_s1_sparse.py``), S2 (heat-equation source identification,
``benchmarks/_s2_source.py``) and L2 (model-error learning and bilevel calibration,
``benchmarks/_l2_model_error.py``) run only when named; their summaries join the final
``summary`` row under ``"S1"``/``"S2"``/``"L2"``.

Prints one JSON object per line: the machine's limits per grid, one line per
(problem, implementation), the P5 memory lines, and a final ``{"summary": ...}`` with
dphys's speed-up over the fastest peer of each problem and whether each target is met.
Every line carries its own answer check (``error``: relative L2 error against the exact
solution of the discrete scheme, the PDE, or a converged reference, see ``error_ref``).

``--quick`` keeps a full run under ~10 minutes on a 2-core CPU: 3 repeats, slow peers at
fewer steps with per-step extrapolation (``extrapolated_from_steps``). ``--tiny`` runs
toy sizes (seconds; used by the smoke test). Progress goes to stderr.

The unrolled-assimilation problems (``--problem L1 L1b L3 L1-depth``, see
``benchmarks/_l1_unrolled.py``) train assimilators and run only when named; their
rows carry ``method, K, loss, analysis_rmse, final_rmse, model_sweeps, analysis_s,
train_s, mem_mb`` and each problem ends with a ``method: "summary"`` row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from typing import Any


if __package__ in (None, ""):  # `python benchmarks/run.py` from the repository root
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402

from . import _impls, _measure  # noqa: E402
from ._problems import N_OBS, Problem, make_problem, rel_l2  # noqa: E402


ALL_PROBLEMS = ("limits", "P1", "P2", "P6", "P3", "P4", "P5")
# Learning and sparse-recovery problems: run only when named (`--problem S1 S2 L2`).
LEARNING_PROBLEMS = ("S1", "S2", "L2")
# Unrolled-assimilation problems (``benchmarks/_l1_unrolled.py``): also only
# when named (`--problem L1`); they train.
UNROLLED_PROBLEMS = ("L1", "L1b", "L3", "L1-depth")
TARGET_SPEEDUP = 2.0  # forward and gradient >= 2x the fastest peer (P1-P4)
TARGET_FFT_MULTIPLE = 1.5  # P2 stepwise: <= 1.5 FFT pairs per step
# value_and_grad / cost of the headline path: heat suite <= 2.5 (core issue),
# advection and shallow water <= 3 (their issue).
TARGET_GRAD_RATIO = {"P1": 2.5, "P2": 2.5, "P3": 3.0, "P4": 3.0, "P4-nonlinear": 3.0}
TARGET_MEM_GROWTH = 4.0  # memory(4000 steps) / memory(250 steps)


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and budgets of one benchmark run."""

    size: str = "full"  # "full" or "tiny"
    repeats: int = 5
    slow_s: float = 20.0
    quick: bool = False
    dtype: str = "float64"
    only: tuple[str, ...] | None = None  # restrict implementations (tests)
    rss: bool = True  # P5: peak-RSS probes in subprocesses

    def steps(self, peer: str, problem: Problem) -> dict[str, int]:
        """Steps at which a slow peer is measured (the rest extrapolated per step)."""
        full = problem.steps
        if self.size == "tiny":
            return {"steps": full, "grad_steps": full}
        table = {
            # (quick forward, quick grad, full forward, full grad)
            ("diffrax", "P1"): (200, 2, 1000, 4),
            ("diffrax", "P2"): (40, None, 200, None),
            ("diffrax", "P6"): (20, None, 200, None),
            ("diffrax@64", "P2"): (None, 2, None, 4),
            ("dense-lu", "P1"): (50, None, 1000, 2),
        }
        q_f, q_g, f_f, f_g = table.get((peer, problem.name), (full, full, full, full))
        fwd, grad = (q_f, q_g) if self.quick else (f_f, f_g)
        return {"steps": fwd, "grad_steps": grad}

    def wants(self, name: str) -> bool:
        return self.only is None or name in self.only


def emit(obj: dict[str, Any], out=None) -> None:
    out = sys.stdout if out is None else out
    print(json.dumps(_measure.clean(obj)), file=out, flush=True)


log = _measure.logger("bench")


def device_info() -> dict[str, Any]:
    import jax

    return {
        "device": _measure.device_name(),
        "cpu_count": os.cpu_count(),
        "jax": jax.__version__,
        "machine": platform.machine(),
    }


# --------------------------------------------------------------------- problem data
class Data:
    """Arrays of one problem: true/evaluation parameters, answers, observations."""

    def __init__(self, problem: Problem, dtype):
        import jax.numpy as jnp

        self.problem = problem
        self.dtype = dtype
        self.u0 = jnp.asarray(problem.u0(), dtype=dtype)
        self.kappa = jnp.asarray(problem.kappa, dtype=dtype)
        self.u0_eval = jnp.asarray(problem.u0() + problem.perturbation(), dtype=dtype)
        self.kappa_eval = 1.5 * self.kappa
        self.reference_states: dict[int, np.ndarray] = {}
        self.reference_info: dict[str, Any] = {}

    def exact(self, n_steps: int, ref: str) -> np.ndarray:
        p = self.problem
        if ref == "discrete":
            return p.exact_discrete(p.u0(), n_steps)
        if ref == "pde":
            return p.exact_pde(n_steps * p.dt)
        return self.reference_states[n_steps]

    def observations(self, n_steps: int):
        import jax.numpy as jnp

        p = self.problem
        if p.variable:
            y = p.observations(n_steps, reference=lambda s: self.reference_states[s])
        else:
            y = p.observations(n_steps)
        return jnp.asarray(y, dtype=self.dtype)

    def build_reference(self, step_counts, cfg: Config) -> None:
        """P6: a converged (rtol = 1e-13) dphys Krylov run with the true κ."""
        import jax

        import dphys
        import pdes

        p = self.problem
        wanted = set(step_counts)
        for n in list(wanted):
            wanted.update(p.obs_steps(n))
        wanted = sorted(wanted)
        grid = dphys.Grid(p.shape, lengths=1.0, boundary="periodic")
        solver = dphys.Krylov(method="cg", rtol=1e-13, atol=1e-14, max_steps=1000)
        t = time.perf_counter()
        traj = jax.jit(
            lambda u, k: dphys.simulate(
                pdes.Heat(grid, k),
                dphys.CrankNicolson(solver=solver),
                u,
                dt=p.dt,
                n_steps=max(wanted),
                saveat=dphys.SaveAt(t1=False, steps=wanted),
            )
        )(self.u0, self.kappa)
        ys = np.asarray(jax.block_until_ready(traj.ys))
        self.reference_states = {s: ys[i] for i, s in enumerate(wanted)}
        self.reference_info = {
            "reference": "dphys CrankNicolson + Krylov(cg, rtol=1e-13)",
            "reference_s": time.perf_counter() - t,
            "reference_cg_iterations": int(traj.stats["linear_iterations"]),
        }


# --------------------------------------------------------------- implementations
def build_impls(problem: Problem, data: Data, cfg: Config) -> list[_impls.Impl]:
    import dphys

    full = problem.steps
    y_full = data.observations(full)
    impls: list[_impls.Impl] = []

    def add(label, fn):
        if cfg.wants(label):
            impls.append(fn())

    ref = "reference" if problem.variable else "discrete"
    if problem.variable:
        add(
            "dphys",
            lambda: _impls.dphys_impl(
                "dphys",
                problem,
                full,
                full,
                y_full,
                error_ref=ref,
                notes={"path": "Auto -> Krylov(cg, Jacobi), lineax IFT adjoint"},
            ),
        )
        add(
            "dphys-noprec",
            lambda: _impls.dphys_impl(
                "dphys-noprec",
                problem,
                full,
                full,
                y_full,
                error_ref=ref,
                solver=dphys.Krylov(preconditioner=None),
                notes={"path": "Krylov(cg, no preconditioner), lineax IFT adjoint"},
            ),
        )
    else:
        add(
            "dphys",
            lambda: _impls.dphys_impl(
                "dphys",
                problem,
                full,
                full,
                y_full,
                notes={"path": "fast_forward: exact G^m between saves"},
            ),
        )
        add(
            "dphys-stepwise",
            lambda: _impls.dphys_impl(
                "dphys-stepwise",
                problem,
                full,
                full,
                y_full,
                fast_forward=False,
                notes={"path": "one FFT pair per step, Checkpointed(levels=2)"},
            ),
        )
        add(
            "dphys-stepwise-unrolled",
            lambda: _impls.dphys_impl(
                "dphys-stepwise-unrolled",
                problem,
                full,
                full,
                y_full,
                fast_forward=False,
                adjoint=dphys.Unrolled(),
                notes={"path": "one FFT pair per step, every step stored"},
            ),
        )
        if not cfg.quick:
            add(
                "dphys-krylov",
                lambda: _impls.dphys_impl(
                    "dphys-krylov",
                    problem,
                    full,
                    full,
                    y_full,
                    solver=dphys.Krylov(),
                    notes={"path": "Krylov(cg, Jacobi) per step, lineax IFT adjoint"},
                ),
            )
    add("jax-cg", lambda: _impls.cg_impl(problem, full, full, y_full, error_ref=ref))

    if cfg.wants("diffrax") and cfg.size != "tiny":
        s = cfg.steps("diffrax", problem)
        g = s["grad_steps"]
        impl = _impls.diffrax_impl(
            problem,
            s["steps"],
            g if g else s["steps"],
            data.observations(g) if g else data.observations(s["steps"]),
            error_ref=ref,
        )
        if g is None:
            n = problem.n**problem.ndim
            impl.cost = None
            impl.notes["grad_skip"] = (
                f"infeasible: the backward pass materialises the dense {n}x{n} "
                f"Jacobian ({n * n * 8 / 1e9:.1f} GB) and LU-factorises it per stage"
            )
        impls.append(impl)
        if problem.name == "P2" and not cfg.quick:
            s64 = cfg.steps("diffrax@64", problem)
            small = dataclasses.replace(problem, n=64)
            small_data = Data(small, data.dtype)
            impl64 = _impls.diffrax_impl(
                small,
                s64["grad_steps"],
                s64["grad_steps"],
                small_data.observations(s64["grad_steps"]),
                notes={
                    "comparable": False,
                    "why": "largest 2D grid whose gradient "
                    "fits: 64x64 (dense Jacobian 4096^2); shows its per-step cost",
                },
            )
            impl64.name = "diffrax@64x64"
            impl64.forward = None
            impl64.notes["data"] = small_data
            impls.append(impl64)

    if cfg.wants("dense-lu") and cfg.size != "tiny":
        s = cfg.steps("dense-lu", problem)
        fit = max(2, s["steps"] // 5) if s["steps"] < full else None
        g = s["grad_steps"]
        impl = _impls.dense_lu_impl(
            problem,
            s["steps"],
            g or s["steps"],
            data.observations(g or s["steps"]),
            fit_steps=fit,
        )
        if g is None and impl.skip is None:
            impl.cost = None
            impl.notes["grad_skip"] = (
                "not run with --quick: one gradient call (LU factorisation and its "
                "derivative, 4096^2) takes over 30 s; run without --quick"
            )
        impls.append(impl)
    add("exponax", lambda: _impls.exponax_impl(problem, full, full, y_full))
    return impls


# -------------------------------------------------------------------- measurement
def measure_problem(problem: Problem, cfg: Config, limits: dict | None) -> list[dict]:
    """Run every implementation of ``problem``; return their JSON rows."""
    import jax
    import jax.numpy as jnp

    dtype = jnp.dtype(cfg.dtype)
    data = Data(problem, dtype)
    if problem.variable:
        counts = {problem.steps}
        for peer in ("diffrax",):
            counts.add(cfg.steps(peer, problem)["steps"])
        log(f"{problem.name}: converged reference run")
        data.build_reference(sorted(counts), cfg)

    impls = build_impls(problem, data, cfg)
    rows: list[dict] = []
    jobs: list[tuple[_impls.Impl, dict[str, _measure.Compiled]]] = []
    for impl in impls:
        if impl.skip:
            rows.append(_row_base(problem, impl, cfg) | {"skipped": impl.skip})
            continue
        d = impl.notes.pop("data", data)
        log(f"{problem.name}: compiling {impl.name}")
        fns: dict[str, _measure.Compiled] = {}
        try:
            if impl.forward is not None:
                fns["forward"] = _measure.Compiled(impl.forward, (d.u0, d.kappa))
                if impl.forward_small is not None:
                    fns["forward_small"] = _measure.Compiled(
                        impl.forward_small, (d.u0, d.kappa)
                    )
            if impl.cost is not None:
                fns["cost"] = _measure.Compiled(impl.cost, (d.u0_eval, d.kappa_eval))
                vg = jax.value_and_grad(impl.cost, argnums=(0, 1))
                fns["grad"] = _measure.Compiled(vg, (d.u0_eval, d.kappa_eval))
        except Exception as err:  # noqa: BLE001 - a peer failing is a result
            rows.append(
                _row_base(problem, impl, cfg)
                | {"failed": f"{type(err).__name__}: {str(err)[:300]}"}
            )
            continue
        impl.notes["_data"] = d
        jobs.append((impl, fns))

    limit_jobs = _measure.limit_loops(problem.shape, dtype, problem.steps)
    all_jobs = [c for _, fns in jobs for c in fns.values()] + list(limit_jobs.values())
    log(f"{problem.name}: timing {len(all_jobs)} functions, {cfg.repeats} rounds")
    _measure.interleaved(all_jobs, cfg.repeats, cfg.slow_s)
    limits = _measure.limit_row({}, limit_jobs, problem.steps)
    rows.append(
        _row_base(problem, _impls.Impl("limit", problem, problem.steps, None), cfg)
        | limits
    )

    grads = {}
    for impl, fns in jobs:
        row = _finish_row(problem, impl, fns, cfg, limits)
        if "grad" in fns:
            grads[impl.name] = (impl, fns["grad"].out[1])
        rows.append(row)
    _cross_check_grads(rows, grads)
    if problem.variable:
        for row in rows:
            row.setdefault("reference_info", data.reference_info)
    return rows


def _row_base(problem: Problem, impl: _impls.Impl, cfg: Config) -> dict:
    info = device_info()
    return {
        "problem": problem.name,
        "impl": impl.name,
        "n": impl.problem.n,
        "ndim": problem.ndim,
        "steps": problem.steps,
        "dtype": cfg.dtype,
        "device": info["device"],
    }


def _finish_row(problem, impl, fns, cfg, limits) -> dict:
    d = impl.notes.pop("_data")
    p = impl.problem
    row = _row_base(problem, impl, cfg)
    notes = {k: v for k, v in impl.notes.items()}
    row["forward_s"] = row["grad_s"] = row["grad_ratio"] = None
    row["compile_s"] = row["mem_mb"] = row["error"] = None

    full = problem.steps
    per_step_fwd = None
    if "forward" in fns:
        f = fns["forward"]
        t = f.median
        if impl.steps < full:
            row["extrapolated_from_steps"] = impl.steps
            row["measured_forward_s"] = t
            if "forward_small" in fns and impl.fit_steps:
                ts = fns["forward_small"].median
                per_step_fwd = max((t - ts) / (impl.steps - impl.fit_steps), 0.0)
                fixed = max(t - per_step_fwd * impl.steps, 0.0)
                row["forward_s"] = fixed + per_step_fwd * full
                row["extrapolation"] = (
                    f"affine: t({impl.fit_steps})={ts:.4g}s, t({impl.steps})={t:.4g}s "
                    f"-> fixed {fixed:.4g}s + {per_step_fwd:.4g}s/step"
                )
            else:
                per_step_fwd = t / impl.steps
                row["forward_s"] = per_step_fwd * full
                row["extrapolation"] = "per step: t * steps / extrapolated_from_steps"
        else:
            row["forward_s"] = t
            per_step_fwd = t / full
        row["forward_min_s"] = f.minimum * (row["forward_s"] / t) if t else None
        row["compile_s"] = f.compile_s
        row["forward_repeats"] = _measure.n_repeats(f)
        out = np.asarray(f.out)
        row["error"] = rel_l2(out, d.exact(impl.steps, impl.error_ref))
        row["error_ref"] = impl.error_ref
        if not p.variable:
            row["error_pde"] = rel_l2(out, p.exact_pde(impl.steps * p.dt))
        if limits is not None:
            row["step_s"] = row["forward_s"] / full
            row["step_over_fft_pair"] = row["step_s"] / limits["fft_pair_s"]
            row["step_over_axpy"] = row["step_s"] / limits["axpy_s"]

    if "grad" in fns:
        g, c = fns["grad"], fns["cost"]
        gs = impl.grad_steps
        tg, tc = g.median, c.median
        row["grad_steps"] = gs
        if gs < full:
            row["grad_extrapolated_from_steps"] = gs
            row["measured_grad_s"] = tg
            row["measured_cost_s"] = tc
            if impl.fit_steps and per_step_fwd is not None:
                # Step-independent part (factorisation and its derivative) measured;
                # each further step costs at least one solve forward and one back.
                row["grad_s"] = tg + (full - gs) * 2 * per_step_fwd
                row["cost_s"] = tc + (full - gs) * per_step_fwd
                row["grad_extrapolation"] = (
                    "grad(s) + (steps - s) * 2 * forward_per_step (a lower bound)"
                )
            else:
                row["grad_s"] = tg * full / gs
                row["cost_s"] = tc * full / gs
                row["grad_extrapolation"] = "per step: t * steps / s"
        else:
            row["grad_s"], row["cost_s"] = tg, tc
        row["grad_min_s"] = g.minimum * (row["grad_s"] / tg) if tg else None
        row["grad_ratio"] = tg / tc
        row["grad_ratio_min"] = g.minimum / c.minimum
        row["grad_compile_s"] = g.compile_s
        row["grad_repeats"] = _measure.n_repeats(g)
        row["mem_mb"] = g.temp_bytes / _measure.MB if g.temp_bytes is not None else None
        row["mem_kind"] = "xla_temp_bytes of value_and_grad (excl. args/outputs)"
        row["grad_fd_relerr"] = _fd_check(impl, fns, d)
        value = float(g.out[0])
        row["cost"] = value
        row["cost_vs_value_relerr"] = abs(value - float(c.out)) / abs(value)
    elif impl.notes.get("grad_skip"):
        row["grad_skip"] = impl.notes["grad_skip"]
    for k, v in notes.items():
        if k != "grad_skip":
            row.setdefault(k, v)
    return row


def _fd_check(impl, fns, d) -> float:
    """Directional derivative of the cost: central difference vs <grad, direction>."""
    import jax.numpy as jnp

    rng = np.random.default_rng(1)
    du = jnp.asarray(rng.standard_normal(np.shape(d.u0_eval)), dtype=d.dtype)
    du = du * float(jnp.sqrt(jnp.mean(d.u0_eval**2)))
    dk = (
        jnp.asarray(rng.standard_normal(np.shape(d.kappa_eval)), dtype=d.dtype)
        * d.kappa_eval
    )
    eps = 1e-4 if d.dtype == jnp.float64 else 1e-2
    cost = fns["cost"].compiled

    def central(h):
        jp = float(cost(d.u0_eval + h * du, d.kappa_eval + h * dk))
        jm = float(cost(d.u0_eval - h * du, d.kappa_eval - h * dk))
        return (jp - jm) / (2 * h)

    # Richardson extrapolation of two central differences: truncation O(eps^4), so
    # the check sees the gradient's error, not the cost's curvature in κ.
    fd = (4 * central(eps / 2) - central(eps)) / 3
    gu, gk = fns["grad"].out[1]
    ad = float(jnp.sum(gu * du) + jnp.sum(gk * dk))
    return abs(ad - fd) / max(abs(fd), 1e-300)


def _cross_check_grads(rows, grads) -> None:
    """Relative difference of each gradient to dphys's (same cost, same steps)."""
    import jax.numpy as jnp

    if "dphys" not in grads:
        return
    base_impl, (bu, bk) = grads["dphys"]
    for row in rows:
        entry = grads.get(row["impl"])
        if entry is None or row["impl"] == "dphys":
            continue
        impl, (gu, gk) = entry
        if (
            impl.grad_steps != base_impl.grad_steps
            or impl.problem.n != base_impl.problem.n
        ):
            continue
        num = jnp.sqrt(jnp.sum((gu - bu) ** 2) + jnp.sum((gk - bk) ** 2))
        den = jnp.sqrt(jnp.sum(bu**2) + jnp.sum(bk**2))
        row["grad_rel_diff_vs_dphys"] = float(num / den)


# ------------------------------------------------------------------------------ P5
P5_CONFIGS = ("dphys", "dphys-stepwise-L2", "dphys-stepwise-L3")


def _p5_impl(label: str, n_steps: int, cfg: Config):
    import jax.numpy as jnp

    import dphys

    kw = {
        "dphys": dict(fast_forward=None),
        "dphys-stepwise-L2": dict(fast_forward=False, adjoint=dphys.Checkpointed(2)),
        "dphys-stepwise-L3": dict(fast_forward=False, adjoint=dphys.Checkpointed(3)),
    }[label]
    p = dataclasses.replace(make_problem("P2", size=cfg.size), steps=n_steps)
    data = Data(p, jnp.dtype(cfg.dtype))
    impl = _impls.dphys_impl(
        label, p, n_steps, n_steps, data.observations(n_steps), **kw
    )
    return p, data, impl, kw


def rss_probe(label: str, n_steps: int, cfg: Config) -> dict:
    """In this (fresh) process: peak RSS above the baseline during one gradient call.

    Run by :func:`rss_in_subprocess` with ``MALLOC_MMAP_THRESHOLD_`` fixed, so every
    large buffer is mmapped and returned to the OS when freed and the resident set
    follows XLA's live memory.
    """
    import jax

    jax.config.update("jax_enable_x64", cfg.dtype == "float64")
    p, data, impl, _ = _p5_impl(label, n_steps, cfg)
    vg = _measure.Compiled(
        jax.value_and_grad(impl.cost, argnums=(0, 1)), (data.u0_eval, data.kappa_eval)
    )
    return {"rss_delta_mb": _measure.rss_delta_mb(vg)}


def rss_in_subprocess(label: str, n_steps: int, cfg: Config) -> float | None:
    import subprocess

    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.run",
        "--rss-probe",
        label,
        str(n_steps),
        "--dtype",
        cfg.dtype,
    ] + (["--tiny"] if cfg.size == "tiny" else [])
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        res = subprocess.run(
            cmd,
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
            check=True,
        )
        return json.loads(res.stdout.strip().splitlines()[-1])["rss_delta_mb"]
    except Exception as err:  # noqa: BLE001 - RSS is optional, say why it is missing
        log(f"rss probe {label} {n_steps} failed: {type(err).__name__}: {err}")
        return None


def measure_p5(cfg: Config) -> list[dict]:
    """Gradient memory and cost at 250, 1000, 4000 steps on the P2 grid."""
    import jax

    counts = (20, 80) if cfg.size == "tiny" else (250, 1000, 4000)
    rows = []
    for label in P5_CONFIGS:
        if not cfg.wants(label):
            continue
        for n_steps in counts:
            p, data, impl, kw = _p5_impl(label, n_steps, cfg)
            dtype = data.dtype
            log(f"P5: {label} at {n_steps} steps")
            cost = _measure.Compiled(impl.cost, (data.u0_eval, data.kappa_eval))
            vg = _measure.Compiled(
                jax.value_and_grad(impl.cost, argnums=(0, 1)),
                (data.u0_eval, data.kappa_eval),
            )
            # --quick: the 4000-step stepwise gradients (~10 s a call) are timed once.
            time_it = not (cfg.quick and n_steps > 1000 and label != "dphys")
            _measure.interleaved([cost, vg], cfg.repeats if time_it else 0, cfg.slow_s)
            rss = None
            if cfg.rss and (not cfg.quick or n_steps in (min(counts), max(counts))):
                rss = rss_in_subprocess(label, n_steps, cfg)
            row = {
                "problem": "P5",
                "impl": label,
                "n": p.n,
                "ndim": 2,
                "steps": n_steps,
                "dtype": cfg.dtype,
                "device": device_info()["device"],
                "cost_s": cost.median,
                "grad_s": vg.median,
                "grad_ratio": vg.median / cost.median,
                "grad_ratio_min": vg.minimum / cost.minimum,
                "compile_s": cost.compile_s,
                "grad_compile_s": vg.compile_s,
                "repeats": _measure.n_repeats(vg),
                "mem_mb": vg.temp_bytes / _measure.MB,
                "mem_kind": "xla_temp_bytes of value_and_grad (excl. args/outputs)",
                "mem_args_out_mb": (vg.arg_bytes + vg.out_bytes) / _measure.MB,
                "rss_delta_mb": rss,
                "rss_kind": "peak RSS during one call above the RSS before it, fresh "
                "process, MALLOC_MMAP_THRESHOLD_=65536",
                "state_mb": float(np.prod(p.shape)) * dtype.itemsize / _measure.MB,
                "obs_every": p.obs_every(n_steps),
                "n_obs": N_OBS,
                "adjoint": impl.notes["adjoint"],
                "fast_forward": kw.get("fast_forward"),
            }
            rows.append(row)
    return rows


# ------------------------------------------------------------------------- summary
def summarize(rows: list[dict], cfg: Config) -> dict:
    out: dict[str, Any] = {}
    by_problem: dict[str, list[dict]] = {}
    for r in rows:
        by_problem.setdefault(r.get("problem"), []).append(r)
    limits = {r["n"]: r for r in by_problem.get("limits", [])}
    for name in ("P1", "P2", "P6", "P3", "P4", "P4-nonlinear"):
        rs = by_problem.get(name)
        if not rs:
            continue
        s = _measure.problem_summary(
            rs,
            target_speedup=TARGET_SPEEDUP if name != "P6" else None,
            target_grad_ratio=TARGET_GRAD_RATIO.get(name),
            extra_keys=P4_SUMMARY_KEYS if name.startswith("P4") else (),
        )
        lim = [r for r in rs if r["impl"] == "limit"]
        if lim:
            s["fft_pair_s_in_run"] = lim[0]["fft_pair_s"]
        if name == "P2" and "dphys-stepwise" in s:
            m = s["dphys-stepwise"].get("step_over_fft_pair")
            if m is not None:
                s.setdefault("targets_met", {})["stepwise_step_le_1.5_fft_pair"] = (
                    m <= TARGET_FFT_MULTIPLE
                )
        out[name] = s
    for name in UNROLLED_PROBLEMS:
        for r in by_problem.get(name, []):
            if r.get("method") == "summary":
                out[name] = {k: v for k, v in r.items() if k not in ("impl", "method")}
    for name in ("P5-P3", "P5-P4"):
        if by_problem.get(name):
            out[name] = {
                r["impl"]: {
                    k: v
                    for k, v in r.items()
                    if k.startswith("mem_") and k != "mem_kind"
                }
                for r in by_problem[name]
            }
    p5 = by_problem.get("P5", [])
    if p5:
        s5: dict[str, Any] = {}
        for label in sorted({r["impl"] for r in p5}):
            rs = sorted((r for r in p5 if r["impl"] == label), key=lambda r: r["steps"])
            mem = {r["steps"]: r["mem_mb"] for r in rs}
            e = {
                "mem_mb": mem,
                "rss_delta_mb": {r["steps"]: r["rss_delta_mb"] for r in rs},
                "grad_ratio": {r["steps"]: r["grad_ratio"] for r in rs},
            }
            lo, hi = min(mem), max(mem)
            if mem[lo]:
                e["mem_growth"] = mem[hi] / mem[lo]
                e["targets_met"] = {
                    f"mem_{hi}_le_4x_mem_{lo}": e["mem_growth"] <= TARGET_MEM_GROWTH,
                    "grad_ratio_le_2.5": all(
                        v is not None and v <= TARGET_GRAD_RATIO["P2"]
                        for v in e["grad_ratio"].values()
                    ),
                }
            s5[label] = e
        out["P5"] = s5
    out["limits"] = {
        n: {
            "fft_pair_s": r["fft_pair_s"],
            "axpy_s": r["axpy_s"],
            "bandwidth_gbs": r["bandwidth_gbs"],
        }
        for n, r in limits.items()
    }
    out["quick"] = cfg.quick
    return out


# ------------------------------------------------------------------------- P3, P4
def _run_p3(cfg: Config) -> list[dict]:
    from ._p3_advection import run_p3

    n = 32 if cfg.size == "tiny" else 256
    return run_p3(cfg.quick, n=n, repeats=cfg.repeats, slow_s=cfg.slow_s, only=cfg.only)


def _run_p4(cfg: Config) -> list[dict]:
    from ._p4_shallow_water import run_p4

    kw = dict(n=32, steps=20) if cfg.size == "tiny" else {}
    return run_p4(
        cfg.quick, repeats=cfg.repeats, slow_s=cfg.slow_s, only=cfg.only, **kw
    )


def _run_l2(*, size: str, quick: bool) -> tuple[list[dict], dict]:
    """L2 rows and summary, in the S1/S2 runners' shape."""
    from ._l2_model_error import run_l2

    rows = run_l2(quick=quick, tiny=size == "tiny")
    return rows[:-1], rows[-1]["summary"]


OPTIONAL_RUNNERS = {"P3": _run_p3, "P4": _run_p4}
P4_SUMMARY_KEYS = ("mass_rel_change", "energy_rel_change")


# ---------------------------------------------------------------------------- main
def run(problems, cfg: Config, out=None) -> list[dict]:
    """Run ``problems`` with ``cfg``; print and return every JSON row (summary last)."""
    import jax

    jax.config.update("jax_enable_x64", cfg.dtype == "float64")
    rows: list[dict] = []
    limits_by_problem: dict[str, dict] = {}
    t_start = time.perf_counter()
    want = list(problems)
    grid_problems = [p for p in ("P1", "P2", "P6") if p in want]
    if "limits" in want or grid_problems:
        shapes = {}
        for name in ("P1", "P2"):
            if name in want or "limits" in want or ("P6" in want and name == "P2"):
                shapes[name] = make_problem(name, size=cfg.size).shape
        for name, shape in shapes.items():
            log(f"limits at {shape}")
            lim = _measure.measure_limits(shape, cfg.dtype, cfg.repeats)
            row = {
                "problem": "limits",
                "impl": "machine",
                "n": shape[0],
                "ndim": len(shape),
                "dtype": cfg.dtype,
                **device_info(),
                **lim,
                "loadavg": os.getloadavg()[0],
            }
            limits_by_problem[name] = lim
            rows.append(row)
            emit(row, out)
    for name in grid_problems:
        problem = make_problem(name, size=cfg.size)
        lim = limits_by_problem.get("P2" if name == "P6" else name)
        for row in measure_problem(problem, cfg, lim):
            row["loadavg"] = os.getloadavg()[0]
            rows.append(row)
            emit(row, out)
        if name == "P1" and cfg.wants("diffrax") and cfg.size != "tiny":
            row = diffrax_pitfalls(problem)
            rows.append(row)
            emit(row, out)
    for name in ("P3", "P4"):
        if name in want:
            for row in OPTIONAL_RUNNERS[name](cfg):
                rows.append(row)
                emit(row, out)
    if "P5" in want:
        for row in measure_p5(cfg):
            rows.append(row)
            emit(row, out)
    learning = {}
    for name in LEARNING_PROBLEMS:
        if name in want:
            if name == "S1":
                from ._s1_sparse import run_s1 as runner
            elif name == "S2":
                from ._s2_source import run_s2 as runner
            else:
                runner = _run_l2
            t = time.perf_counter()
            new_rows, learning[name] = runner(size=cfg.size, quick=cfg.quick)
            learning[name]["wall_s"] = time.perf_counter() - t
            for row in new_rows:
                row["loadavg"] = os.getloadavg()[0]
                rows.append(row)
                emit(row, out)
    unrolled = [p for p in UNROLLED_PROBLEMS if p in want]
    if unrolled:
        from . import _l1_unrolled

        size = cfg.size if cfg.size == "tiny" else "quick" if cfg.quick else "full"

        def emit_learning(row):
            row = {"impl": row.get("method"), **row}
            rows.append(row)
            emit(row, out)

        for name in unrolled:
            _l1_unrolled.RUNNERS[name](size, emit=emit_learning)
    summary = summarize(rows, cfg)
    summary.update(learning)
    summary["wall_s"] = time.perf_counter() - t_start
    emit({"summary": summary}, out)
    rows.append({"summary": summary})
    return rows


def diffrax_pitfalls(problem: Problem) -> dict:
    """The two diffrax pitfalls of benchmarks/README.md, checked on this install."""
    import diffrax

    log("diffrax pitfalls")
    row = {
        "problem": "diffrax-pitfalls",
        "impl": "diffrax",
        "diffrax": diffrax.__version__,
        "verychord_gmres": _impls.diffrax_verychord_pitfall(problem),
    }
    row.update(_impls.diffrax_dense_adjoint_pitfall(problem))
    return row


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--problem",
        nargs="+",
        default=list(ALL_PROBLEMS),
        choices=list(ALL_PROBLEMS + LEARNING_PROBLEMS + UNROLLED_PROBLEMS),
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--impl",
        nargs="+",
        default=None,
        help="only these implementations (e.g. dphys jax-cg)",
    )
    parser.add_argument(
        "--no-rss", action="store_true", help="P5: skip the peak-RSS subprocess probes"
    )
    parser.add_argument(
        "--rss-probe", nargs=2, metavar=("LABEL", "STEPS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.rss_probe:
        cfg = Config(size="tiny" if args.tiny else "full", dtype=args.dtype)
        print(json.dumps(rss_probe(args.rss_probe[0], int(args.rss_probe[1]), cfg)))
        return
    repeats = args.repeats or (1 if args.tiny else 3 if args.quick else 5)
    cfg = Config(
        size="tiny" if args.tiny else "full",
        repeats=repeats,
        slow_s=8.0 if args.quick else 20.0,
        quick=args.quick,
        dtype=args.dtype,
        only=tuple(args.impl) if args.impl else None,
        rss=not args.no_rss,
    )
    run(args.problem, cfg)


if __name__ == "__main__":
    main()
