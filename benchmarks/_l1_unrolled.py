"""L1, L1b and L3 of ``benchmarks/README.md``: unrolled assimilation against the
classical methods, a nonlinear variant, and the gradient modes of a DEQ assimilator.

* **L1**: the 64x64 advection-diffusion windows of ``benchmarks/_learning_problems.py``.
  Classical rows: Gauss-Newton (CG to convergence, and stopped after j CG
  iterations), L-BFGS, fixed-step gradient descent with the best fixed step (grid
  search on the training set). Learned rows: unrolled gradient steps with learned
  per-iteration step sizes and momentum (K = 1, 2, 3, 5, 10), with the learned CNN
  gradient modulator, and a warm start (first-guess CNN from the observations, then
  K = 2 with the J guard), each trained supervised (truth initial states) and
  self-supervised (held-out sensors, no truth, also for validation). Then a
  ``summary`` row.
* **L1b**: nonlinear shallow water on a 32x32 periodic f-plane from 16 sea-level
  gauges (IMEX: Crank-Nicolson gravity waves, explicit nonlinear terms), where the
  classical methods must re-linearise (Gauss-Newton outer iterations).
* **L3**: a trained deep-equilibrium assimilator (a tied Gauss-Newton step with 5 CG
  iterations and a learned network prior) on L1 windows: the implicit
  hypergradient against full unroll at K = 10, 50, 100, 200, 400 (relative error and
  compiled memory), truncated mode's error against $\\rho^k$.

Model sweeps are counted per analysis: one forward, tangent-linear or adjoint run of
the window each. A gradient of J costs 2 (forward and adjoint), a Gauss-Newton step
with j CG iterations 2 + 2j (the linearisation's forward run, the gradient's adjoint
run, one tangent-linear and one adjoint run per CG iteration), an L-BFGS iteration 2
per line-search evaluation, the J guard of a warm start 1. Networks cost no sweeps.

Run ``python benchmarks/run.py --problem L1 [--quick]`` (``L1b``, ``L3``,
``L1-depth`` likewise).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax

import assimilation as da
import dphys
import pdes
from assimilation import learn
from assimilation.learn import _problem as P

from ._learning_problems import make_l1


TARGET_RMSE_RATIO = 1.05  # learned within 5% of the converged RMSE
TARGET_SWEEPS_RATIO = 5.0  # with >= 5x fewer sweeps than the classical method
TARGET_SELFSUP = 1.10  # self-supervised within 10% of supervised
LEARNED_METHODS = ("unrolled", "unrolled_cnn", "unrolled_gain", "warm_start")


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and budgets of one learning-benchmark run."""

    size: str = "full"  # "full", "quick" or "tiny"
    seed: int = 0
    epochs: int = 30
    batch_size: int = 16
    patience: int = 5
    lr: float = 0.05  # step sizes and momenta (log/logit parameters)
    lr_net: float = 3e-3  # networks
    lr_gain: float = (
        1e-2  # observation-space gains (entries of an n_obs x n_obs matrix)
    )
    ks_gain: tuple[int, ...] = (1, 2)
    selfsup_gain: tuple[int, ...] = (1, 2)
    ks: tuple[int, ...] = (1, 2, 3, 5, 10)
    ks_cnn: tuple[int, ...] = (1, 2, 3, 5, 10)
    selfsup_ks: tuple[int, ...] = (1, 2, 3, 5, 10)
    selfsup_cnn: bool = True
    warm_start: bool = True
    selfsup_warm: bool = True
    gn_cg: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
    lbfgs_iterations: int = 60
    fixed_steps: int = 16  # grid of fixed step sizes
    width: int = 16
    depth: int = 2
    held_out: float = 0.2
    n_splits: int = 2
    # Windows used from the generated sets (None: all of them).
    n_windows: tuple[int | None, int | None, int | None] = (None, None, None)

    @classmethod
    def for_size(cls, size: str) -> Config:
        if size == "quick":
            # Sized for a loaded 2-core CPU (well under 20 minutes): the 64x64
            # problem, 32/8/16 windows, 3 epochs, K in (1, 2, 5), one learned
            # observation-space gain, one self-supervised run per kind.
            return cls(
                size="quick",
                epochs=3,
                batch_size=8,
                patience=2,
                ks=(1, 2, 5),
                ks_cnn=(),
                selfsup_ks=(2,),
                selfsup_cnn=False,
                ks_gain=(1,),
                selfsup_gain=(1,),
                warm_start=False,
                selfsup_warm=False,
                gn_cg=(1, 2, 4, 8, 16, 32, 64),
                lbfgs_iterations=25,
                fixed_steps=6,
                width=8,
                depth=1,
                n_windows=(32, 8, 16),
            )
        if size == "tiny":
            return cls(
                size="tiny",
                epochs=2,
                batch_size=4,
                patience=2,
                ks=(1, 2),
                ks_cnn=(2,),
                selfsup_ks=(2,),
                selfsup_cnn=False,
                ks_gain=(1,),
                selfsup_gain=(),
                warm_start=True,
                selfsup_warm=False,
                gn_cg=(1, 4, 16),
                lbfgs_iterations=5,
                fixed_steps=4,
                width=4,
                depth=1,
            )
        return cls()


def _subset(problem, cfg: Config):
    """``problem`` with the first ``cfg.n_windows`` train/val/test windows."""
    n_tr, n_va, n_te = cfg.n_windows
    return dataclasses.replace(
        problem,
        train=problem.train if n_tr is None else problem.train[:n_tr],
        val=problem.val if n_va is None else problem.val[:n_va],
        test=problem.test if n_te is None else problem.test[:n_te],
    )


def _log(msg: str) -> None:
    import sys

    print(f"[L1] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------ scoring


def _x0_batch(cost, controls):
    return jax.vmap(lambda v: P.initial_state(cost, v))(controls)


def _rmse(a, b) -> float:
    sq = [
        jnp.mean(jnp.square(x - y))
        for x, y in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    ]
    return float(jnp.sqrt(sum(sq) / len(sq)))


@eqx.filter_jit
def _finals(cost, controls, obs):
    return jax.vmap(lambda v, o: learn.with_obs(cost, o).final_state(v))(controls, obs)


def score(cost, data, controls) -> dict:
    """Analysis and end-of-window RMSE of a batch of analyses against the truth."""
    x0 = _x0_batch(cost, controls)
    finals = _finals(cost, controls, data.obs)
    return {
        "analysis_rmse": _rmse(x0, data.truth_x0),
        "final_rmse": _rmse(finals, data.truth_final),
    }


def _timed_batch(fn, *args, repeats: int = 3):
    """(result, seconds per call) of a jitted batched call, compilation excluded."""
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return out, float(np.median(times))


@eqx.filter_jit
def _analyse(assim, cost, obs):
    return jax.vmap(lambda o: assim(learn.with_obs(cost, o)).control)(obs)


def _analyser(assim, cost):
    """A batched analysis: observation values (batch) -> controls. Assimilators of
    one structure share one compilation (their arrays are traced)."""
    return lambda obs: _analyse(assim, cost, obs)


def _memory_mb(fn, *args) -> float:
    try:
        return learn.predict_memory(fn, *args) / 2**20
    except RuntimeError:  # backends without a compiled memory analysis
        return float("nan")


# ---------------------------------------------------------------------- classical


def gauss_newton_curve(cost, data, cg_counts):
    """One Gauss-Newton step with j CG iterations for each j: what the classical
    inner loop reaches after j iterations (CG from 0, no damping)."""
    rows = []
    for j in cg_counts:
        assim = learn.unrolled_gauss_newton(cost, 1, n_cg=j, damping=1e-30)
        fn = _analyser(assim, cost)
        controls, dt = _timed_batch(fn, data.obs, repeats=1)
        rows.append(
            {
                "cg": j,
                "model_sweeps": 2 + 2 * j,
                "analysis_s": dt / data.n_windows,
                **score(cost, data, controls),
            }
        )
    return rows


def gauss_newton_converged(cost, data, n_outer: int):
    """``assimilation.GaussNewton`` (CG to a relative residual of 1e-10) for
    ``n_outer`` outer iterations, batched over the windows.

    Sweeps: 2 to start (J and its gradient), then per outer iteration 1 (the
    linearisation's forward run), 2 per CG iteration, at least 1 for the step's
    acceptance test and 2 for J and the gradient at the new point.
    """
    method = da.GaussNewton(inner_rtol=1e-10, inner_max_steps=2000)

    def run(o):
        c = learn.with_obs(cost, o)
        s = method.init(c, c.init())
        g0 = s.grad_norm
        sweeps = jnp.asarray(2)
        for _ in range(n_outer):
            s = method.step(c, s)
            sweeps = sweeps + 4 + 2 * s.inner_iterations
        return s.v, sweeps, s.grad_norm / g0

    fn = eqx.filter_jit(jax.vmap(run))
    (controls, sweeps, ratio), dt = _timed_batch(fn, data.obs, repeats=1)
    return {
        "controls": controls,
        "model_sweeps": float(jnp.mean(sweeps)),
        "grad_norm_reduction": float(jnp.max(ratio)),
        "analysis_s": dt / data.n_windows,
        "mem_mb": _memory_mb(lambda o: run(o)[0], data.obs[0]),
        **score(cost, data, controls),
    }


def _grad_norm_ratio(cost, data, controls):
    def one(o, v):
        c = learn.with_obs(cost, o)
        g0 = P.evaluate(c, c.init()).grad()
        g = P.evaluate(c, v).grad()
        n = lambda t: jnp.sqrt(sum(jnp.sum(x**2) for x in jtu.tree_leaves(t)))
        return n(g) / n(g0)

    return float(jnp.max(eqx.filter_jit(jax.vmap(one))(data.obs, controls)))


def lbfgs_curve(cost, data, n_iterations: int):
    """L-BFGS (``assimilation.LBFGS``) iterates: RMSE and sweeps per iteration."""
    method = da.LBFGS()

    def run(o):
        c = learn.with_obs(cost, o)
        s = method.init(c, c.init())

        def body(s, _):
            s = method.step(c, s)
            return s, (s.v, s.inner_iterations)

        _, (vs, n_ls) = jax.lax.scan(body, s, None, length=n_iterations)
        return vs, n_ls

    (vs, n_ls), elapsed = _timed_batch(
        eqx.filter_jit(jax.vmap(run)), data.obs, repeats=1
    )
    # 2 sweeps at the start (J and its gradient), 2 per line-search evaluation.
    sweeps = 2 + 2 * np.cumsum(np.asarray(n_ls).mean(axis=0))
    rows = []
    for k in range(n_iterations):
        controls = jtu.tree_map(lambda x, k=k: x[:, k], vs)
        rows.append(
            {
                "iteration": k + 1,
                "model_sweeps": float(sweeps[k]),
                **score(cost, data, controls),
            }
        )
    return rows, elapsed / data.n_windows


def fixed_step_rows(cost, problem, ks, n_steps, lam_max):
    """Gradient descent with the best fixed step (grid search on the training set)."""
    rows = []
    steps = np.geomspace(0.05, 2.0, n_steps) / lam_max
    for K in ks:
        best = None
        for a in steps:
            assim = learn.unrolled_gradient(cost, K, step_size=float(a))
            controls = _analyser(assim, cost)(problem.train.obs)
            r = score(cost, problem.train, controls)["analysis_rmse"]
            if best is None or r < best[0]:
                best = (r, float(a))
        assim = learn.unrolled_gradient(cost, K, step_size=best[1])
        controls, dt = _timed_batch(_analyser(assim, cost), problem.test.obs)
        rows.append(
            {
                "method": "gd_fixed",
                "K": K,
                "loss": "grid_search_train",
                "step_size": best[1],
                "step_size_lam": best[1] * lam_max,
                "model_sweeps": 2 * K,
                "analysis_s": dt / problem.test.n_windows,
                "train_s": 0.0,
                **score(cost, problem.test, controls),
            }
        )
    return rows


def lambda_max(cost, obs, n_iter: int = 60) -> float:
    """Largest eigenvalue of the whitened Gauss-Newton Hessian (power iteration)."""
    c = learn.with_obs(cost, obs)
    mv = eqx.filter_jit(lambda c, u: P.gauss_newton_operator(c, c.init())[0].mv(u))
    u = jtu.tree_map(lambda x: jr.normal(jr.key(0), x.shape, x.dtype), c.init())
    lam = 1.0
    for _ in range(n_iter):
        w = mv(c, u)
        lam = float(jnp.sqrt(sum(jnp.sum(x**2) for x in jtu.tree_leaves(w))))
        u = jtu.tree_map(lambda x, lam=lam: x / lam, w)
    return lam


# ------------------------------------------------------------------------ learned


def _losses(cfg: Config, cost):
    sup = learn.Supervised()
    held = learn.HeldOutSensors(cfg.held_out, n_splits=cfg.n_splits)

    def supervised(m, ex, key):
        return sup(m, learn.with_obs(cost, ex.obs), truth=ex.truth_x0)

    def selfsup(m, ex, key):
        return held(m, learn.with_obs(cost, ex.obs), key=key)

    return {"supervised": supervised, "selfsup": selfsup}


def _optimizer(cfg: Config, model):
    # Log-step and logit-momentum parameters move by O(0.1) per step; network
    # weights need a smaller rate.
    def label(path, leaf):
        names = [getattr(p, "name", "") for p in path]
        if "gain" in names:
            return "gain"
        nets = ("modulator", "step_net", "first_guess", "network")
        return "net" if any(n in nets for n in names) else "schedule"

    labels = jtu.tree_map_with_path(label, eqx.filter(model, eqx.is_inexact_array))
    return optax.multi_transform(
        {
            "schedule": optax.adam(cfg.lr),
            "net": optax.adam(cfg.lr_net),
            "gain": optax.adam(cfg.lr_gain),
        },
        lambda _: labels,  # a function: the labels tree is itself a callable Module
    )


def train_row(
    problem, cfg: Config, method: str, K: int, loss: str, make: Callable, *, key
):
    """Train one learned assimilator and score it on the test set."""
    cost = problem.cost
    model = make(key)
    loss_fn = _losses(cfg, cost)[loss]
    _log(f"train {method} K={K} ({loss})")
    res = learn.fit(
        model,
        loss_fn,
        problem.train,
        optimizer=_optimizer(cfg, model),
        key=jr.fold_in(key, 1),
        batch_size=cfg.batch_size,
        n_epochs=cfg.epochs,
        val_data=problem.val,
        patience=cfg.patience,
        report_memory=True,
    )
    best = res.best_model
    controls, dt = _timed_batch(_analyser(best, cost), problem.test.obs)
    infer_mem = _memory_mb(
        lambda o: best(learn.with_obs(cost, o)).control, problem.test.obs[0]
    )
    row = {
        "method": method,
        "K": K,
        "loss": loss,
        "model_sweeps": int(best.sweeps()),
        "analysis_s": dt / problem.test.n_windows,
        "train_s": float(res.stats["train_s"]),
        "compile_s": float(res.stats["compile_s"]),
        "epochs": int(res.stats["epochs"]),
        "best_epoch": int(res.stats["best_epoch"]),
        "mem_mb": float(res.stats.get("step_memory_bytes") or float("nan")) / 2**20,
        "infer_mem_mb": infer_mem,
        "val_loss": float(res.stats["best_loss"]),
        **score(cost, problem.test, controls),
    }
    if method.startswith("unrolled"):
        row["step_sizes"] = [float(x) for x in jnp.exp(best.layers.log_step)]
        if best.layers.momentum is not None:
            row["momenta"] = [float(x) for x in jax.nn.sigmoid(best.layers.momentum)]
    if best.guard:
        acc = eqx.filter_jit(
            jax.vmap(lambda o: best(learn.with_obs(cost, o)).info["accepted"])
        )(problem.test.obs)
        row["guard_accepted"] = float(jnp.mean(acc))
    return row, best


def _makers(cost, cfg: Config, step0: float):
    def unrolled(K, modulator=False, obs_gain=False):
        return lambda key: learn.unrolled_gradient(
            cost,
            K,
            step_size=step0,
            momentum=True,
            modulator=modulator,
            obs_gain=obs_gain,
            width=cfg.width,
            depth=cfg.depth,
            key=key,
        )

    def warm(K):
        def make(key):
            k1, k2 = jr.split(key)
            a = learn.unrolled_gradient(cost, K, step_size=step0, momentum=True, key=k1)
            first = learn.first_guess_network(
                cost, width=cfg.width, depth=cfg.depth + 1, key=k2
            )
            return dataclasses.replace(a, first_guess=first, guard=True)

        return make

    return unrolled, warm


# ------------------------------------------------------------------------ the runs


def run_l1(
    size: str = "quick", *, emit: Callable[[dict], Any] | None = None
) -> list[dict]:
    """The L1 rows (classical, learned, summary), each passed to ``emit`` when done."""
    out = emit
    cfg = Config.for_size(size)
    t_start = time.perf_counter()
    problem = _subset(
        make_l1(quick=size == "quick", tiny=size == "tiny", seed=cfg.seed), cfg
    )
    cost = problem.cost
    base = {
        "problem": "L1",
        "n_windows": [
            problem.train.n_windows,
            problem.val.n_windows,
            problem.test.n_windows,
        ],
        "size": size,
        "dtype": str(jnp.result_type(float)),
        **_device(),
    }
    rows: list[dict] = []

    def emit(row):
        row = {**base, **row}
        rows.append(row)
        if out is not None:
            out(row)
        return row

    lam = lambda_max(cost, problem.train.obs[0])
    _log(f"lambda_max of the whitened GN Hessian: {lam:.4g}")
    # ---- classical
    _log("Gauss-Newton to convergence")
    # The cost is quadratic: one outer iteration with CG to convergence is the
    # minimum (grad_norm_reduction checks it).
    conv = gauss_newton_converged(cost, problem.test, n_outer=1)
    converged_rmse = conv["analysis_rmse"]
    emit(
        {
            "method": "gauss_newton",
            "K": 1,
            "loss": "none",
            "grad_norm_reduction": conv["grad_norm_reduction"],
            "model_sweeps": conv["model_sweeps"],
            "analysis_s": conv["analysis_s"],
            "train_s": 0.0,
            "mem_mb": conv["mem_mb"],
            "analysis_rmse": conv["analysis_rmse"],
            "final_rmse": conv["final_rmse"],
        }
    )
    _log("Gauss-Newton stopped after j CG iterations")
    for r in gauss_newton_curve(cost, problem.test, cfg.gn_cg):
        emit(
            {
                "method": "gauss_newton_cg",
                "K": 1,
                "loss": "none",
                "cg_iterations": r["cg"],
                "model_sweeps": r["model_sweeps"],
                "analysis_s": r["analysis_s"],
                "train_s": 0.0,
                "analysis_rmse": r["analysis_rmse"],
                "final_rmse": r["final_rmse"],
            }
        )
    _log("L-BFGS curve")
    lb, lb_s = lbfgs_curve(cost, problem.test, cfg.lbfgs_iterations)
    for r in lb:
        emit(
            {
                "method": "lbfgs",
                "K": r["iteration"],
                "loss": "none",
                "train_s": 0.0,
                "analysis_s": lb_s * r["iteration"] / cfg.lbfgs_iterations,
                **{k: v for k, v in r.items() if k != "iteration"},
            }
        )
    _log("fixed-step gradient descent")
    for r in fixed_step_rows(cost, problem, cfg.ks, cfg.fixed_steps, lam):
        emit(r)
    # ---- learned
    unrolled, warm = _makers(cost, cfg, 1.0 / lam)
    key = jr.key(cfg.seed + 100)
    plan = []
    for K in cfg.ks:
        plan.append(("unrolled", K, "supervised", unrolled(K)))
    for K in cfg.selfsup_ks:
        plan.append(("unrolled", K, "selfsup", unrolled(K)))
    for K in cfg.ks_cnn:
        plan.append(("unrolled_cnn", K, "supervised", unrolled(K, True)))
        if cfg.selfsup_cnn:
            plan.append(("unrolled_cnn", K, "selfsup", unrolled(K, True)))
    for K in cfg.ks_gain:
        plan.append(("unrolled_gain", K, "supervised", unrolled(K, obs_gain=True)))
    for K in cfg.selfsup_gain:
        plan.append(("unrolled_gain", K, "selfsup", unrolled(K, obs_gain=True)))
    if cfg.warm_start:
        plan.append(("warm_start", 2, "supervised", warm(2)))
        if cfg.selfsup_warm:
            plan.append(("warm_start", 2, "selfsup", warm(2)))
    for i, (method, K, loss, make) in enumerate(plan):
        row, _ = train_row(problem, cfg, method, K, loss, make, key=jr.fold_in(key, i))
        emit(row)
    summary = summarize(rows, converged_rmse)
    summary["wall_s"] = time.perf_counter() - t_start
    emit({"method": "summary", **summary})
    return rows


def _matching_sweeps(curve, target):
    ok = [r["model_sweeps"] for r in curve if r["analysis_rmse"] <= target]
    return min(ok) if ok else None


def summarize(rows, converged_rmse) -> dict:
    target = TARGET_RMSE_RATIO * converged_rmse
    gn = [
        r
        for r in rows
        if r.get("method") in ("gauss_newton_cg", "gauss_newton_outer", "gauss_newton")
    ]
    lb = [r for r in rows if r.get("method") == "lbfgs"]
    candidates = [
        s
        for s in (_matching_sweeps(gn, target), _matching_sweeps(lb, target))
        if s is not None
    ]
    classical = min(candidates) if candidates else None
    learned = [r for r in rows if r.get("method") in LEARNED_METHODS]
    sup = [r for r in learned if r["loss"] == "supervised"]
    selfsup = [r for r in learned if r["loss"] == "selfsup"]
    best = min(learned, key=lambda r: r["analysis_rmse"]) if learned else None
    within = [r for r in learned if r["analysis_rmse"] <= target]
    cheapest = min(within, key=lambda r: r["model_sweeps"]) if within else None
    out = {
        "converged_rmse": converged_rmse,
        "classical_sweeps_to_match": classical,
        "best_learned": None
        if best is None
        else f"{best['method']} K={best['K']} {best['loss']}",
        "best_learned_rmse_over_converged": None
        if best is None
        else best["analysis_rmse"] / converged_rmse,
        # Only a learned assimilator within 5% of the converged RMSE has a sweeps
        # ratio at that accuracy (None otherwise: see the ratio at the best learned
        # RMSE below).
        "sweeps_ratio": None
        if (cheapest is None or classical is None)
        else classical / cheapest["model_sweeps"],
        "cheapest_learned_within_5pct": None
        if cheapest is None
        else f"{cheapest['method']} K={cheapest['K']} {cheapest['loss']}",
        "selfsup_over_supervised": (
            min(r["analysis_rmse"] for r in selfsup)
            / min(r["analysis_rmse"] for r in sup)
            if sup and selfsup
            else None
        ),
    }
    # At equal accuracy: the fewest classical sweeps reaching the best learned RMSE.
    if best is not None:
        at_best = [
            s
            for s in (
                _matching_sweeps(gn, best["analysis_rmse"]),
                _matching_sweeps(lb, best["analysis_rmse"]),
            )
            if s is not None
        ]
        out["classical_sweeps_to_match_best_learned"] = (
            min(at_best) if at_best else None
        )
        out["sweeps_ratio_at_best_learned_rmse"] = (
            min(at_best) / best["model_sweeps"] if at_best else None
        )
    out["target_within_5pct_and_5x_fewer_sweeps"] = bool(
        cheapest is not None
        and classical is not None
        and classical / cheapest["model_sweeps"] >= TARGET_SWEEPS_RATIO
    )
    out["target_selfsup_within_10pct"] = (
        None
        if out["selfsup_over_supervised"] is None
        else out["selfsup_over_supervised"] <= TARGET_SELFSUP
    )
    ablation = {}
    for r in rows:
        if r.get("method") != "gd_fixed":
            continue
        K = r["K"]
        lr = [x for x in sup if x["method"] == "unrolled" and x["K"] == K]
        if lr:
            ablation[f"K={K}"] = {
                "fixed": r["analysis_rmse"],
                "learned": lr[0]["analysis_rmse"],
            }
    out["learned_vs_best_fixed"] = ablation
    out["target_learned_beats_fixed"] = bool(ablation) and all(
        v["learned"] < v["fixed"] for v in ablation.values()
    )
    return out


def _device() -> dict:
    d = jax.devices()[0]
    return {"device": f"{d.platform}:{d.device_kind}", "loadavg": os.getloadavg()[0]}


# -------------------------------------------------------------------- depth study


def run_depth_study(
    size: str = "quick",
    *,
    emit: Callable[[dict], Any] | None = None,
    noises=(0.02, 0.2),
) -> list[dict]:
    """Test RMSE vs K of learned unrolled assimilators at two noise levels."""
    cfg = Config.for_size(size)
    ks = (1, 2, 3, 5, 10) if size == "full" else cfg.ks
    rows = []
    for noise in noises:
        problem = make_l1(
            quick=size == "quick", tiny=size == "tiny", seed=cfg.seed, noise=noise
        )
        cost = problem.cost
        lam = lambda_max(cost, problem.train.obs[0])
        gn = gauss_newton_converged(cost, problem.test, n_outer=1)
        unrolled, _ = _makers(cost, cfg, 1.0 / lam)
        base = {"problem": "L1-depth", "size": size, "noise": noise, **_device()}
        new = [
            {
                **base,
                "method": "gauss_newton",
                "K": 1,
                "loss": "none",
                "model_sweeps": gn["model_sweeps"],
                "analysis_rmse": gn["analysis_rmse"],
                "final_rmse": gn["final_rmse"],
            }
        ]
        if emit is not None:
            emit(new[0])
        key = jr.key(cfg.seed + 200)
        for i, K in enumerate(ks):
            row, _ = train_row(
                problem,
                cfg,
                "unrolled",
                K,
                "supervised",
                unrolled(K),
                key=jr.fold_in(key, i),
            )
            new.append({**base, **row})
            if emit is not None:
                emit(new[-1])
        rows.extend(new)
    return rows


# --------------------------------------------------------------------------- L1b


@dataclasses.dataclass(frozen=True)
class SWProblem:
    """The L1b set-up: nonlinear shallow water, sea-level gauges."""

    cost: da.FourDVar
    train: learn.Windows
    val: learn.Windows
    test: learn.Windows
    meta: dict


L1B_SIZES = {
    "full": (32, (512, 64, 128)),
    "quick": (32, (96, 32, 48)),
    "tiny": (16, (8, 4, 4)),
}


def make_l1b(size: str = "quick", *, seed: int = 0) -> SWProblem:
    r"""Nonlinear rotating shallow water (vector-invariant momentum, centred
    continuity, f-plane) on a doubly periodic square of side $32\times5$ km, rest
    depth 5 m, $f = 10^{-4}$ s$^{-1}$, IMEX (Crank-Nicolson gravity waves, AB2
    nonlinear terms), $\Delta t = 300$ s, 24-step windows. True initial sea level from
    a diffusion-covariance field (length scale 20 km, std 0.5 m, so
    $\eta/H \approx 0.1$), fluid at rest; 16 gauges of $\eta$ every 4 steps, noise
    0.02 m. Background: rest. Control: $\eta$, $u$, $v$ (std 0.5 m, 0.05 m/s)."""
    n, (n_train, n_val, n_test) = L1B_SIZES[size]
    dx = 5e3
    grid = dphys.Grid((n, n), lengths=n * dx, boundary="periodic")
    model = pdes.ShallowWater(
        grid,
        depth=5.0,
        f0=1e-4,
        nonlinear=True,
        continuity="centered",
        momentum="vector_invariant",
    )
    dt, n_steps, every = 300.0, 24, 4
    b_eta = da.Diffusion(grid, 4 * dx, std=0.5, normalization="constant")
    b_uv = da.Diffusion(grid, 4 * dx, std=0.05, normalization="constant")
    zero = jnp.zeros(grid.shape)
    state0 = pdes.SWState(zero, zero, zero)
    positions = jr.uniform(
        jr.fold_in(jr.key(seed), 7), (16, 2), minval=0.0, maxval=n * dx
    )
    times = dt * every * np.arange(1, n_steps // every + 1)
    obs = da.Observations(
        times, jnp.zeros((len(times), 16)), positions, 0.02, field="eta"
    )
    cost = da.FourDVar(
        model,
        dphys.IMEX(),
        state0,
        obs,
        da.Control(initial_state=da.InitialState(pdes.SWState(b_eta, b_uv, b_uv))),
        dt=dt,
        n_steps=n_steps,
    )

    def prior(key):
        return pdes.SWState(b_eta.sample(key=key), zero, zero)

    key = jr.key(seed + 11)
    sets = [
        learn.make_windows(
            cost, prior, n_windows=m, key=jr.fold_in(key, i), chunk_size=32
        )
        for i, m in enumerate((n_train, n_val, n_test))
    ]
    meta = {"n": n, "dx": dx, "dt": dt, "n_steps": n_steps, "depth": 5.0, "noise": 0.02}
    return SWProblem(cost, *sets, meta)


def run_l1b(
    size: str = "quick", *, emit: Callable[[dict], Any] | None = None
) -> list[dict]:
    """L1b rows: Gauss-Newton with outer iterations, L-BFGS, learned unrolled."""
    cfg = Config.for_size(size)
    t_start = time.perf_counter()
    _log("L1b: generating shallow-water windows")
    problem = make_l1b(size, seed=cfg.seed)
    cost = problem.cost
    base = {"problem": "L1b", "size": size, **_device()}
    rows: list[dict] = []

    def put(row):
        row = {**base, **row}
        rows.append(row)
        if emit is not None:
            emit(row)

    outer = (1, 2, 3, 5) if size != "tiny" else (1, 2)
    cgs = (4, 16, 64) if size != "tiny" else (4,)
    curve = []
    for K in outer:
        for j in cgs:
            assim = learn.unrolled_gauss_newton(cost, K, n_cg=j, damping=1e-30)
            controls, dt = _timed_batch(
                _analyser(assim, cost), problem.test.obs, repeats=1
            )
            r = {
                "method": "gauss_newton_outer",
                "K": K,
                "cg_iterations": j,
                "loss": "none",
                "model_sweeps": K * (2 + 2 * j),
                "analysis_s": dt / problem.test.n_windows,
                "train_s": 0.0,
                **score(cost, problem.test, controls),
            }
            curve.append(r)
            put(r)
    _log("L1b: Gauss-Newton to convergence")
    n_outer = 6 if size != "tiny" else 2
    conv = gauss_newton_converged(cost, problem.test, n_outer=n_outer)
    converged = conv["analysis_rmse"]
    put(
        {
            "method": "gauss_newton",
            "K": n_outer,
            "loss": "none",
            "train_s": 0.0,
            **{k: v for k, v in conv.items() if k != "controls"},
        }
    )
    lb, lb_s = lbfgs_curve(cost, problem.test, cfg.lbfgs_iterations)
    for r in lb:
        put(
            {
                "method": "lbfgs",
                "K": r["iteration"],
                "loss": "none",
                "train_s": 0.0,
                "analysis_s": lb_s * r["iteration"] / cfg.lbfgs_iterations,
                **{k: v for k, v in r.items() if k != "iteration"},
            }
        )
    lam = lambda_max(cost, problem.train.obs[0], n_iter=40)
    unrolled, _ = _makers(cost, cfg, 1.0 / lam)
    key = jr.key(cfg.seed + 300)
    plan = [
        ("unrolled", 5, "supervised", unrolled(5)),
        ("unrolled", 5, "selfsup", unrolled(5)),
    ]
    plan.append(("unrolled_cnn", 5, "supervised", unrolled(5, True)))
    if size == "tiny":
        plan = [
            ("unrolled", 2, "supervised", unrolled(2)),
            ("unrolled", 2, "selfsup", unrolled(2)),
        ]
    l1b_cfg = dataclasses.replace(cfg, epochs=min(cfg.epochs, 10))
    for i, (method, K, loss, make) in enumerate(plan):
        row, _ = train_row(
            problem, l1b_cfg, method, K, loss, make, key=jr.fold_in(key, i)
        )
        put(row)
    summary = summarize(rows, converged)
    summary["wall_s"] = time.perf_counter() - t_start
    summary["lambda_max"] = lam
    put({"method": "summary", **summary})
    return rows


# ---------------------------------------------------------------------------- L3


def run_l3(
    size: str = "quick", *, emit: Callable[[dict], Any] | None = None
) -> list[dict]:
    """L3: gradient modes of a trained DEQ assimilator on L1 windows."""
    cfg = Config.for_size(size)
    t_start = time.perf_counter()
    problem = make_l1(quick=size != "full", tiny=size == "tiny", seed=cfg.seed)
    cost = problem.cost
    base = {"problem": "L3", "size": size, **_device()}
    rows: list[dict] = []

    def put(row):
        row = {**base, **row}
        rows.append(row)
        if emit is not None:
            emit(row)

    grid = cost.model.grid
    width = 4 if size == "tiny" else 8
    prior = learn.NetworkPrior(
        learn.GridCNN(grid, 1, 4, width=width, depth=1, zero_init=False, key=jr.key(5)),
        jnp.asarray(-2.0),
    )
    n_cg = 5
    implicit = learn.Implicit(
        tol=1e-11,
        max_iterations=200,
        anderson=5,
        adjoint_rtol=1e-12,
        adjoint_tol=1e-8,
        fallback_k=20,
    )
    deq = learn.unrolled_gauss_newton(
        cost, 1, n_cg=n_cg, damping=0.1, tied=True, adjoint=implicit
    )
    deq = dataclasses.replace(deq, prior=prior)
    _log("L3: training the DEQ assimilator (implicit gradients)")
    n_train = 32 if size != "tiny" else 4
    loss = _losses(cfg, cost)["supervised"]
    res = learn.fit(
        deq,
        loss,
        problem.train[:n_train],
        optimizer=optax.adam(3e-3),
        key=jr.key(cfg.seed + 400),
        batch_size=min(8, n_train),
        n_epochs=3 if size != "tiny" else 1,
    )
    deq = res.best_model
    put(
        {
            "method": "deq_training",
            "K": None,
            "loss": "supervised",
            "train_s": float(res.stats["train_s"]),
            "train_loss": [float(x) for x in res.history["train_loss"]],
        }
    )
    window = problem.test[0]
    c = learn.with_obs(cost, window.obs)
    sup = learn.Supervised()

    def grad_of(assim):
        params, static = eqx.partition(assim, eqx.is_inexact_array)
        f = lambda p: sup(eqx.combine(p, static), c, truth=window.truth_x0)
        g = eqx.filter_jit(eqx.filter_grad(f))(params)
        return jnp.concatenate(
            [jnp.ravel(x) for x in jtu.tree_leaves(g.prior)]
            + [jnp.ravel(g.layers.damping)]
        )

    def mem(assim):
        return learn.gradient_memory(assim, sup, c, window.truth_x0)

    info = eqx.filter_jit(lambda a: a(c).info)(deq)
    t = time.perf_counter()
    g_imp = jax.block_until_ready(grad_of(deq))
    t_imp = time.perf_counter() - t
    mem_imp = mem(deq)
    rho = float(
        learn.contraction(
            dataclasses.replace(deq, adjoint=learn.FullUnroll()).iterations(0, 30), c
        )
    )
    put(
        {
            "method": "implicit",
            "K": int(info["iterations"]),
            "fixed_point_residual": float(info["fixed_point_residual"]),
            "converged": bool(info["converged"]),
            "mem_mb": mem_imp,
            "grad_s": t_imp,
            "rho": rho,
        }
    )
    # The implicit mode's memory does not grow with the forward iterations: measure
    # it at two iteration caps.
    implicit_mem = {}
    for cap in (50, 400):
        capped = dataclasses.replace(deq.adjoint, max_iterations=cap)
        implicit_mem[str(cap)] = mem(dataclasses.replace(deq, adjoint=capped))
    ks = (10, 50, 100, 200, 400) if size != "tiny" else (5, 10)
    full_mem = []
    for K in ks:
        full = dataclasses.replace(deq, adjoint=learn.FullUnroll(levels=2)).iterations(
            0, K
        )
        t = time.perf_counter()
        g = jax.block_until_ready(grad_of(full))
        dt = time.perf_counter() - t
        m = mem(full)
        full_mem.append(m)
        put(
            {
                "method": "full_unroll",
                "K": K,
                "rel_error_vs_implicit": float(
                    jnp.linalg.norm(g - g_imp) / jnp.linalg.norm(g_imp)
                ),
                "rho_K": rho**K,
                "mem_mb": m,
                "grad_s": dt,
            }
        )
    K_tr = 60 if size != "tiny" else 10
    for k in (1, 2, 4, 8, 16):
        if k > K_tr:
            continue
        tr = dataclasses.replace(deq, adjoint=learn.Truncated(k=k)).iterations(0, K_tr)
        g = grad_of(tr)
        put(
            {
                "method": "truncated",
                "K": K_tr,
                "k": k,
                "rel_error_vs_implicit": float(
                    jnp.linalg.norm(g - g_imp) / jnp.linalg.norm(g_imp)
                ),
                "rho_k": rho**k,
                "mem_mb": mem(tr),
            }
        )
    put(
        {
            "method": "summary",
            "rho": rho,
            "implicit_mem_mb": mem_imp,
            "full_unroll_mem_mb": dict(
                zip([str(k) for k in ks], full_mem, strict=True)
            ),
            "implicit_mem_mb_max_iterations": implicit_mem,
            "wall_s": time.perf_counter() - t_start,
        }
    )
    return rows


RUNNERS = {"L1": run_l1, "L1b": run_l1b, "L3": run_l3, "L1-depth": run_depth_study}
