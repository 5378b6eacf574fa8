"""L2 (``benchmarks/README.md``): learning model error and kappa from sparse sensors.

Truth: 2-D advection-diffusion (64x64 periodic, velocity (1.0, 0.5), kappa_true =
2e-3) plus a cubic damping -2u^3 and a smooth source the physics model lacks; the
physics model has kappa = 1.5 kappa_true. Data: windows of 40 Crank-Nicolson steps
with 64 sensors every 5 steps, noise 0.05 (:func:`benchmarks._learning_problems.
make_l2`).

Every method sees only the sensor records. The training windows are analysed once
by weak-constraint 4D-Var with the physics model (8 sub-windows of 5 steps); the test
windows likewise, and every method forecasts from the same test analyses at the
window's end (so the rows differ only by their model). Rows:

* ``physics``: the physics model as it is.
* ``calibrated``: kappa alone, by bilevel calibration (inner: strong-constraint
  analysis of each window's initial state from the first half of its observations;
  outer: the forecast misfit on the second half; implicit hypergradient; outer
  Gauss-Newton, Laplace std).
* ``one_step``, ``stop_gradient``, ``solver``: the hybrid (physics with trainable
  log kappa + a pointwise network N(u) + a band-limited learned forcing g(x))
  trained by the three protocols of :mod:`assimilation.learn._protocols` at the
  same budget (optimizer steps) on the same data.
* ``weak_forcing``: the network and field as a weak-constraint forcing of the state
  (constant over 5-step sub-windows), trained with the solver in the loop.

Each row: ``forecast_rmse`` at lead times 40, 80, 160 steps against the truth (the
twin diagnostic), ``kappa`` and ``kappa_std`` (Laplace, Gauss-Newton Hessian of the
training loss over all trained parameters, scaled by the residuals' variance),
``train_s``, ``mem_mb`` (compiled memory of one training step), ``stable`` (free
runs to 10x the 40-step horizon from the test analyses stay finite and bounded).
"""

from __future__ import annotations

import json
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import numpy as np
import optax

import assimilation as da
import dphys
from assimilation.learn import (
    Bilevel,
    FourierField,
    LocalTendency,
    SubwindowForcing,
    Sum,
    analyse_windows,
    calibrate,
    forecast_rmse,
    laplace,
    rollout_misfit,
    stability,
    train_correction,
)

from ._learning_problems import N_STEPS, make_l2


N_SUB = 8  # weak-constraint sub-windows of 5 steps
LEADS = (40, 80, 160)
BUDGET = {"full": 400, "quick": 120, "tiny": 8}  # optimizer steps per protocol
N_CALIBRATION = {"full": 32, "quick": 8, "tiny": 4}  # windows of the kappa bilevel
N_LAPLACE = {"full": 32, "quick": 8, "tiny": 4}


def _log(msg: str) -> None:
    print(f"[L2] {msg}", file=sys.stderr, flush=True)


def _set_kappa(physics, log_kappa):
    return eqx.tree_at(lambda m: m.kappa, physics, jnp.exp(log_kappa))


class HybridParams(eqx.Module):
    """The trained parameters: log kappa, the pointwise network, the field."""

    log_kappa: jax.Array
    network: LocalTendency
    field: FourierField


def hybrid_params(physics, *, key, width: int = 8) -> HybridParams:
    grid = physics.grid
    return HybridParams(
        log_kappa=jnp.log(jnp.asarray(physics.kappa)),
        network=LocalTendency(grid, width=width, depth=1, kernel_size=1, key=key),
        field=FourierField(grid, 2),
    )


def per_step_builder(physics):
    def build(p: HybridParams):
        return dphys.Augmented(
            _set_kappa(physics, p.log_kappa), explicit=p.network, forcing=p.field
        )

    return build


def subwindow_builder(physics, steps: int):
    def build(p: HybridParams):
        return SubwindowForcing(
            _set_kappa(physics, p.log_kappa), Sum(p.network, p.field), steps
        )

    return build


def _rows_meta(p, size):
    return {"problem": "L2", "size": size, "n": p.meta["n"], "dtype": "float64"}


ROWS = ("physics", "calibrated", "one_step", "stop_gradient", "solver", "weak_forcing")


def run_l2(
    *,
    quick: bool = False,
    tiny: bool = False,
    seed: int = 0,
    echo: bool = False,
    only: tuple[str, ...] | None = None,
) -> list[dict]:
    """Run the L2 rows; returns the rows and a final ``{"summary": ...}``.

    ``echo`` prints each row as a JSON line when it is ready (the module's own
    command line); :mod:`benchmarks.run` prints them itself. ``only`` runs a subset
    of :data:`ROWS` (``physics`` always runs: the other rows are compared with it);
    the summary then covers what ran.
    """
    only = ROWS if only is None else tuple(only)
    bad = sorted(set(only) - set(ROWS))
    if bad:
        raise ValueError(f"`only` has unknown rows {bad}; choose from {ROWS}.")
    size = "tiny" if tiny else "quick" if quick else "full"
    t_all = time.perf_counter()
    _log(f"generating the {size} set-up")
    p = make_l2(quick=quick, tiny=tiny, seed=seed)
    cost, physics, grid = p.cost, p.cost.model, p.cost.model.grid
    q = da.Diffusion(grid, 0.1, std=1.0, normalization="constant")
    _log("weak-constraint analyses of the training and test windows")
    t = time.perf_counter()
    train = analyse_windows(cost, p.train.obs, model_error_cov=q, n_subwindows=N_SUB)
    test = analyse_windows(cost, p.test.obs, model_error_cov=q, n_subwindows=N_SUB)
    jax.block_until_ready((train.analyses, test.analyses))
    analysis_s = time.perf_counter() - t
    start = test.analysis_at(N_STEPS)
    truths = {lead: p.test.states_at(N_STEPS + lead) for lead in LEADS}
    t_fc = cost.t0 + N_STEPS * cost.dt
    analysis_rmse = float(jnp.sqrt(jnp.mean((start - p.test.truth_final) ** 2)))

    def evaluate(model):
        rmse = forecast_rmse(model, cost.stepper, start, truths, dt=cost.dt, t0=t_fc)
        stab = stability(
            model,
            cost.stepper,
            start,
            dt=cost.dt,
            n_steps=10 * N_STEPS,
            bound=10.0,
            invariants={"mass": grid.integrate},
        )
        return rmse, stab

    base = _rows_meta(p, size)
    rows = []

    def emit(method, model, *, kappa, kappa_std, train_s, mem_mb, extra=None):
        rmse, stab = evaluate(model)
        row = {
            **base,
            "method": method,
            **{f"forecast_rmse_{k}": v for k, v in rmse.items()},
            "kappa": kappa,
            "kappa_std": kappa_std,
            "kappa_true": p.meta["kappa_true"],
            "kappa_within_2sigma": (
                None
                if kappa_std is None
                else bool(abs(kappa - p.meta["kappa_true"]) <= 2 * kappa_std)
            ),
            "train_s": train_s,
            "mem_mb": mem_mb,
            "stable": stab.stable,
            "growth_10x": stab.growth,
            "mass_drift_10x": stab.invariants["mass"],
            **(extra or {}),
        }
        rows.append(row)
        if echo:
            print(json.dumps(row), flush=True)
        return row

    emit(
        "physics",
        physics,
        kappa=float(physics.kappa),
        kappa_std=None,
        train_s=0.0,
        mem_mb=0.0,
        extra={"analysis_rmse_end": analysis_rmse, "analysis_s": analysis_s},
    )

    # -- kappa alone by bilevel calibration (forecast misfit on the second half)
    if "calibrated" in only:
        _calibrated_row(p, cost, physics, size, emit)
    _hybrid_rows(p, cost, physics, train, size, seed, emit, only)
    rows.append({"summary": summarize(rows, time.perf_counter() - t_all)})
    if echo:
        print(json.dumps(rows[-1]), flush=True)
    return rows


def _calibrated_row(p, cost, physics, size, emit):
    _log("bilevel calibration of kappa")
    n_t, n_s = cost.obs.values.shape
    inner = np.zeros((n_t, n_s), bool)
    inner[: n_t // 2] = True
    problem = Bilevel(
        cost,
        lambda th, c: eqx.tree_at(lambda c: c.model, c, _set_kappa(c.model, th)),
        inner_mask=inner,
        outer_mask=~inner,
        method=da.GaussNewton(inner_max_steps=120, inner_rtol=1e-10),
        stop=da.StoppingRule(max_iterations=4, gtol=1e-5, ftol=0.0),
        # The hypergradient's system I + J^T J has the conditioning of the 4D-Var
        # Hessian (hundreds of CG steps to 1e-8); 1e-6 is ample for a gradient.
        linear_solver=lx.CG(rtol=1e-6, atol=0.0, max_steps=2000),
    )
    n_cal = N_CALIBRATION[size]
    t = time.perf_counter()
    try:
        cal = calibrate(
            problem,
            jnp.log(jnp.asarray(physics.kappa)),
            p.train.obs[:n_cal],
            n_iterations=5,
        )
    except Exception as err:  # the convergence gate: report it, keep going
        _log(f"calibration failed: {err!s:.300}")
        cal = None
    cal_s = time.perf_counter() - t
    if cal is not None:
        k_cal = float(jnp.exp(cal.theta))
        emit(
            "calibrated",
            _set_kappa(physics, cal.theta),
            kappa=k_cal,
            kappa_std=k_cal * float(cal.std),
            train_s=cal_s,
            mem_mb=None,
            extra={
                "outer_iterations": len(cal.history["loss"]) - 1,
                "n_windows": n_cal,
            },
        )


def _hybrid_rows(p, cost, physics, train, size, seed, emit, only):
    # -- the three protocols and the weak-constraint forcing network
    budget = BUDGET[size]
    key = jr.key(seed)
    init = hybrid_params(physics, key=jr.fold_in(key, 1))
    opt = optax.adam(1e-2)
    configs = [
        ("one_step", "one_step", per_step_builder(physics)),
        ("stop_gradient", "stop_gradient", per_step_builder(physics)),
        ("solver", "solver", per_step_builder(physics)),
        ("weak_forcing", "solver", subwindow_builder(physics, N_STEPS // N_SUB)),
    ]
    n_lap = N_LAPLACE[size]
    for name, protocol, build in configs:
        if name not in only:
            continue
        _log(f"training {name}")
        res = train_correction(
            init,
            train,
            cost,
            protocol=protocol,
            n_steps=budget,
            key=jr.fold_in(key, 2),
            build=build,
            physics=physics,
            optimizer=opt,
            batch_size=8,
        )
        _log(f"{name}: {res.stats['train_s']:.1f} s; Laplace")

        def resid(params, example, build=build):
            r, _ = rollout_misfit(build(params), cost, example, horizon=N_STEPS)
            return r

        _, std = laplace(
            resid,
            res.params,
            train[:n_lap],
            prior_precision=1e-6,
            scale_by_residual=True,
        )
        kappa = float(jnp.exp(res.params.log_kappa))
        emit(
            name,
            res.model,
            kappa=kappa,
            kappa_std=kappa * float(std.log_kappa),
            train_s=res.stats["train_s"],
            mem_mb=res.stats["step_memory_bytes"] / 2**20,
            extra={
                "final_train_loss": res.history["train_loss"][-1],
                "steps": res.stats["steps"],
            },
        )


def summarize(rows, wall_s) -> dict:
    by = {r["method"]: r for r in rows if "method" in r}
    phys = by["physics"]["forecast_rmse_80"]
    hybrids = tuple(
        m for m in ("one_step", "stop_gradient", "solver", "weak_forcing") if m in by
    )
    if not hybrids:
        return {"problem": "L2", "wall_s": wall_s, "rows": sorted(by)}
    protocols = [m for m in ("one_step", "stop_gradient", "solver") if m in by]
    best = min(hybrids, key=lambda m: by[m]["forecast_rmse_80"])
    order = sorted(protocols, key=lambda m: by[m]["forecast_rmse_80"])
    reduction = phys / by[best]["forecast_rmse_80"]
    return {
        "problem": "L2",
        "forecast_reduction_80": reduction,
        "best_hybrid": best,
        "protocol_order_80": order,
        "kappa_within_2sigma": {m: by[m]["kappa_within_2sigma"] for m in by},
        "targets": {
            "reduction_5x": reduction >= 5.0,
            "solver_no_worse": (
                None
                if "solver" not in by
                else by["solver"]["forecast_rmse_80"]
                <= min(by[m]["forecast_rmse_80"] for m in protocols)
            ),
            "kappa_2sigma_best": bool(by[best]["kappa_within_2sigma"]),
            "all_hybrids_stable": all(by[m]["stable"] for m in hybrids),
        },
        "wall_s": wall_s,
    }


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    args = sys.argv[1:]
    only = tuple(a for a in args if a in ROWS) or None
    if only is not None and "physics" not in only:
        only = ("physics", *only)
    run_l2(quick="--quick" in args, tiny="--tiny" in args, echo=True, only=only)
