"""S2: heat-equation source identification (benchmarks/README.md).

Five point releases of heat on a 64 x 64 periodic unit square (an initial state with
five non-zero cells, strengths U[1, 2]), observed by 32 sensors (bilinear
interpolation at random points) at five times t = 1..5 of u_t = kappa Lap u
(kappa = 2e-3, Crank-Nicolson, dt = 0.1), noise at SNR 40 dB. The forward operator
is sensors o dphys.simulate; its adjoint the core's transposed solves.

FISTA with a non-negative L1 prior (weight chosen on validation instances) against
a 16-layer ALISTA (learned steps and thresholds on the physics adjoint, one-sided
threshold with support selection), at equal layers and to convergence. Work in
physics sweeps (one forward or adjoint model run): two per iteration or layer.
Localisation: detections are local maxima (3 x 3, periodic) of the estimate above
20% of its maximum; a true source's error is the periodic distance (in cells) to
the nearest detection, capped at 8; a detection farther than 3 cells from every
true source is false.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import numpy as np

from . import _measure


log = _measure.logger("S2")


@dataclasses.dataclass(frozen=True)
class S2Config:
    n: int = 64
    n_sources: int = 5
    n_sensors: int = 32
    kappa: float = 2e-3
    dt: float = 0.1
    obs_every: int = 10
    n_obs: int = 5
    snr_db: float = 40.0
    n_test: int = 32
    n_val: int = 8
    layers: int = 16
    batch: int = 16
    n_train: int = 2000
    train_steps: int = 300
    fista_iters: int = 1000
    lambdas: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1)
    seed: int = 0


def config(size: str, quick: bool) -> S2Config:
    if size == "tiny":
        return S2Config(
            n=16,
            n_sources=2,
            n_sensors=8,
            kappa=1e-2,
            n_test=4,
            n_val=2,
            layers=3,
            batch=2,
            train_steps=3,
            fista_iters=20,
            lambdas=(0.01, 0.1),
        )
    if quick:
        return S2Config()
    return S2Config(n_test=128, n_val=16, train_steps=2000, fista_iters=3000)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def localisation(est, truth, *, rel=0.2, radius=3.0, cap=8.0):
    """(mean capped distance of true sources to detections, false detections)."""
    est = np.asarray(est)
    n0, n1 = est.shape
    neigh = np.max(
        [
            np.roll(np.roll(est, i, 0), j, 1)
            for i in (-1, 0, 1)
            for j in (-1, 0, 1)
            if (i, j) != (0, 0)
        ],
        axis=0,
    )
    peak = max(float(est.max()), 1e-300)
    det = np.argwhere((est > neigh) & (est > rel * peak))
    src = np.argwhere(np.asarray(truth) > 0)
    if len(det) == 0:
        return cap, 0

    def dist(a, b):
        d = np.abs(a[:, None, :] - b[None, :, :]).astype(float)
        d = np.minimum(d, np.array([n0, n1]) - d)
        return np.sqrt(np.sum(d * d, axis=-1))

    d = dist(src, det)
    err = float(np.mean(np.minimum(d.min(axis=1), cap)))
    false = int(np.sum(d.min(axis=0) > radius))
    return err, false


def run_s2(size: str = "full", quick: bool = False) -> tuple[list[dict], dict]:
    """Run S2; return its JSON rows and its summary entry."""
    import jax
    import jax.numpy as jnp
    import jax.random as jr

    import assimilation as da
    import assimilation.learn as L
    import dphys
    import dphys.testing
    import pdes

    c = config(size, quick)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    grid = dphys.Grid((c.n, c.n), lengths=1.0, boundary="periodic")
    model = pdes.Heat(grid, kappa=c.kappa)
    rng = np.random.default_rng(c.seed)
    obs_op = da.Interpolation(grid, rng.uniform(0, 1, (c.n_sensors, 2)))
    steps = tuple(c.obs_every * (k + 1) for k in range(c.n_obs))

    def forward(u0):
        traj = dphys.simulate(
            model,
            dphys.CrankNicolson(),
            u0,
            dt=c.dt,
            n_steps=steps[-1],
            saveat=dphys.SaveAt(t1=False, steps=steps, fn=lambda t, u: obs_op(u)),
        )
        return traj.ys

    x_like = jnp.zeros((c.n, c.n), dtype)
    op = L.physics_operator(forward, x_like)
    dot = dphys.testing.dot_test(
        jax.jit(lambda v: op.mv(v)), jax.jit(lambda w: op.transpose().mv(w)), x_like
    )
    lip = float(1.02 * L.operator_norm_squared(op, n_iter=50))

    def sources(key, batch):
        kp, ka = jr.split(key)
        idx = jax.vmap(
            lambda k: jr.choice(k, c.n * c.n, (c.n_sources,), replace=False)
        )(jr.split(kp, batch))
        amp = jr.uniform(ka, (batch, c.n_sources), dtype, 1.0, 2.0)
        flat = jnp.zeros((batch, c.n * c.n), dtype)
        flat = jax.vmap(lambda f, i, a: f.at[i].set(a))(flat, idx, amp)
        return flat.reshape(batch, c.n, c.n)

    fwd_batch = jax.jit(jax.vmap(op.mv))
    ref = fwd_batch(sources(jr.key(c.seed + 10), 16))
    sigma = float(jnp.sqrt(jnp.mean(ref**2))) * 10 ** (-c.snr_db / 20)

    def sample(key, batch):
        ks, kw = jr.split(key)
        x = sources(ks, batch)
        y = jax.vmap(op.mv)(x)
        return y + sigma * jr.normal(kw, y.shape, dtype), x

    y_test, x_test = jax.jit(lambda k: sample(k, c.n_test))(jr.key(c.seed + 1))
    y_val, x_val = jax.jit(lambda k: sample(k, c.n_val))(jr.key(c.seed + 2))
    base = {
        "problem": "S2",
        "n": c.n,
        "n_sources": c.n_sources,
        "n_sensors": c.n_sensors,
        "n_obs": c.n_obs,
        "snr_db": c.snr_db,
        "n_test": c.n_test,
        "device": _measure.device_name(),
        "dtype": str(np.dtype(dtype)),
    }

    def loc_stats(xs, truths):
        out = [
            localisation(e, t)
            for e, t in zip(np.asarray(xs), np.asarray(truths), strict=True)
        ]
        return float(np.mean([o[0] for o in out])), float(np.mean([o[1] for o in out]))

    method = L.FISTA(step_size=1.0 / lip)
    checkpoints = sorted(
        {1, 2, 4, 8, 16, 32, 64, 128, 256, 512, c.fista_iters}
        - {k for k in range(c.fista_iters + 1, 10**6)}
    )

    def fista_run(y, lam):
        cost = L.CompositeCost(L.LeastSquares(op, y), L.NonNegativeL1(lam))
        state = method.init(cost, x_like)
        outs, done = [], 0
        for k in checkpoints:
            state, _ = jax.lax.scan(
                lambda s, _: (method.step(cost, s), None),
                state,
                None,
                length=k - done,
            )
            done = k
            outs.append(state.v)
        return jnp.stack(outs), state.cost

    fista_batch = jax.jit(jax.vmap(fista_run))
    scale_val = jnp.max(jax.vmap(op.transpose().mv)(y_val), axis=(1, 2))
    best = None
    for rel in c.lambdas:
        log(f"FISTA lambda = {rel} max|A^T y| on {c.n_val} validation instances")
        xs, _ = fista_batch(y_val, rel * scale_val)
        err, false = loc_stats(xs[:, -1], x_val)
        if best is None or (err, false) < best[1]:
            best = (rel, (err, false))
    lam_rel = best[0]
    log(f"FISTA on {c.n_test} test instances, lambda = {lam_rel} max|A^T y|")
    t0 = time.perf_counter()
    lam_test = lam_rel * jnp.max(jax.vmap(op.transpose().mv)(y_test), axis=(1, 2))
    xs, objs = fista_batch(y_test, lam_test)
    xs = np.asarray(xs)
    fista_s = time.perf_counter() - t0
    curve = {k: loc_stats(xs[:, i], x_test) for i, k in enumerate(checkpoints)}
    conv_err, conv_false = curve[checkpoints[-1]]
    rows = [
        {
            **base,
            "impl": "FISTA",
            "lambda_rel": lam_rel,
            "loc_err_cells": {str(k): v[0] for k, v in curve.items()},
            "false_detections": {str(k): v[1] for k, v in curve.items()},
            "sweeps": {str(k): 2 * k for k in checkpoints},
            "converged_loc_err_cells": conv_err,
            "converged_false_detections": conv_false,
            "wall_s": fista_s,
            "sigma": sigma,
            "lipschitz": lip,
            "dot_test_rel_error": float(dot.rel_error),
        }
    ]
    tol_err = conv_err * 1.05 + 0.05
    fista_k = next(
        (
            k
            for k in checkpoints
            if curve[k][0] <= tol_err and curve[k][1] <= conv_false + 0.1
        ),
        checkpoints[-1],
    )

    # --- learned ALISTA on the physics adjoint
    frac = c.n_sources / (c.n * c.n)
    net = L.ALISTA(
        op,
        c.layers,
        step=1.0 / lip,
        lam=float(jnp.median(lam_test)) * 1.0,
        nonnegative=True,
        support=L.support_schedule(c.layers, 0.2 * frac, 2.0 * frac),
    )

    log(f"ALISTA-{c.layers}: training {c.train_steps} steps, batch {c.batch}")
    train = jax.jit(lambda k: sample(k, c.n_train))(jr.key(c.seed + 4))
    rss0 = _rss_mb()
    fit = L.fit_unrolled(
        net,
        train,
        key=jr.key(c.seed + 3),
        n_steps=c.train_steps,
        batch_size=c.batch,
        learning_rate=2e-3,
        val_data=(y_val, x_val),
        # No report_memory: fit's memory probe cannot trace a model that holds a
        # lineax.FunctionLinearOperator (its closure-converted jaxpr).
    )
    net = fit.best_model
    train_s = fit.stats["train_s"]
    per_layer = np.asarray(jax.jit(jax.vmap(lambda y: net(y, all_layers=True)))(y_test))
    layer_stats = [loc_stats(per_layer[:, k], x_test) for k in range(c.layers + 1)]
    l_err, l_false = layer_stats[-1]
    reached = l_err <= tol_err and l_false <= conv_false + 0.1
    fista_eq = curve[min(checkpoints, key=lambda k: abs(k - c.layers))]
    rows.append(
        {
            **base,
            "impl": f"ALISTA-{c.layers}",
            "loc_err_cells_per_layer": [s[0] for s in layer_stats],
            "false_detections_per_layer": [s[1] for s in layer_stats],
            "loc_err_cells": l_err,
            "false_detections": l_false,
            "sweeps": 2 * c.layers,
            "train_steps": c.train_steps,
            "batch": c.batch,
            "n_train": c.n_train,
            "train_s": train_s,
            "train_peak_rss_growth_mb": _rss_mb() - rss0,
            "best_val_loss": float(fit.stats["best_loss"]),
            "learned_steps": [float(v) for v in np.asarray(net.steps)],
            "learned_thresholds": [float(v) for v in np.asarray(net.thresholds)],
        }
    )
    summary = {
        "fista_converged_loc_err_cells": conv_err,
        "fista_converged_false_detections": conv_false,
        "fista_sweeps_to_converged_loc": 2 * fista_k,
        "fista_equal_layers_loc_err_cells": fista_eq[0],
        "fista_equal_layers_false_detections": fista_eq[1],
        "learned_loc_err_cells": l_err,
        "learned_false_detections": l_false,
        "learned_sweeps": 2 * c.layers,
        "learned_reaches_fista_converged_loc": bool(reached),
        "sweep_ratio": (2 * fista_k) / (2 * c.layers) if reached else None,
        "targets_met": {
            "learned_ge_10x_fewer_sweeps": bool(reached and fista_k >= 10 * c.layers)
        },
    }
    return rows, summary
