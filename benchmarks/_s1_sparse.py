"""S1: sparse recovery with a 250 x 500 Gaussian matrix (benchmarks/README.md).

The standard set-up of the LAMP/ALISTA papers: A with N(0, 1/M) entries and
unit-norm columns, x Bernoulli(0.1)-Gaussian, noise at SNR 40 dB, NMSE in dB over a
test set. Rows: ISTA, FISTA and AMP per iteration (the LASSO weight of ISTA/FISTA
calibrated per instance from AMP's fixed point, so the three share it), the AMP
state-evolution prediction, and two 16-layer learned networks (ALISTA: 32 learned
scalars on the fixed weight A^T, with support selection; LISTA-CP: learned
matrices). A summary gives the issue's targets.
"""

from __future__ import annotations

import dataclasses
import resource
import time

import numpy as np

from . import _measure


log = _measure.logger("S1")


@dataclasses.dataclass(frozen=True)
class S1Config:
    m: int = 250
    n: int = 500
    eps: float = 0.1
    snr_db: float = 40.0
    n_test: int = 200
    n_iter: int = 1000
    n_iter_terminal: int = 30000
    layers: int = 16
    batch: int = 64
    n_train: int = 20000
    n_val: int = 512
    alista_steps: int = 600
    lista_steps: int = 400
    seed: int = 0


def config(size: str, quick: bool) -> S1Config:
    if size == "tiny":
        return S1Config(
            m=40,
            n=80,
            n_test=16,
            n_iter=60,
            n_iter_terminal=200,
            layers=4,
            batch=8,
            alista_steps=5,
            lista_steps=5,
        )
    if quick:
        return S1Config()
    return S1Config(
        n_test=1000, n_iter_terminal=5000, alista_steps=3000, lista_steps=3000
    )


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _first_below(db, level):
    below = np.nonzero(np.asarray(db) < level)[0]
    return int(below[0]) if below.size else None


def run_s1(size: str = "full", quick: bool = False) -> tuple[list[dict], dict]:
    """Run S1; return its JSON rows and its summary entry."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import jax.random as jr
    import lineax as lx

    import assimilation.learn as L

    c = config(size, quick)
    dtype = jnp.float64 if jax.config.jax_enable_x64 else jnp.float32
    rng = np.random.default_rng(c.seed)
    a_np = rng.normal(size=(c.m, c.n)) / np.sqrt(c.m)
    a_np /= np.linalg.norm(a_np, axis=0)
    A = jnp.asarray(a_np, dtype)
    op = lx.MatrixLinearOperator(A)
    delta = c.m / c.n
    # SNR = E||Ax||^2 / E||w||^2 with unit-norm columns: E||Ax||^2 = eps N.
    sigma2 = c.eps * c.n / c.m * 10 ** (-c.snr_db / 10)
    sigma = float(np.sqrt(sigma2))

    def sample(key, batch):
        kx, ks, kw = jr.split(key, 3)
        x = jr.normal(kx, (batch, c.n), dtype) * (jr.uniform(ks, (batch, c.n)) < c.eps)
        y = x @ A.T + sigma * jr.normal(kw, (batch, c.m), dtype)
        return y, x

    y_test, x_test = sample(jr.key(c.seed + 1), c.n_test)
    energy = float(jnp.sum(x_test**2))
    to_db = lambda sq: 10.0 * np.log10(np.asarray(sq) / energy)
    lip = float(np.linalg.norm(a_np, 2) ** 2)
    rows: list[dict] = []
    base = {
        "problem": "S1",
        "m": c.m,
        "n": c.n,
        "eps": c.eps,
        "snr_db": c.snr_db,
        "n_test": c.n_test,
        "device": _measure.device_name(),
        "dtype": str(np.dtype(dtype)),
    }

    # --- AMP: threshold multiplier minimising the SE fixed-point MSE.
    alpha = L.optimal_alpha(delta, c.eps, sigma2)
    amp_method = L.AMP(alpha=alpha)

    @jax.jit
    def amp_curve(y, x):
        state = amp_method.init(op, y)

        def body(s, _):
            s = amp_method.step(op, y, s)
            return s, jnp.sum((s.x - x) ** 2)

        final, errs = jax.lax.scan(body, state, None, length=c.n_iter)
        support = jnp.sum(final.x != 0).astype(dtype)
        lam = final.theta * (1.0 - support / c.m)
        return jnp.concatenate([jnp.sum(x * x)[None], errs]), lam

    log(f"AMP (alpha = {alpha:.4f}) on {c.n_test} instances, {c.n_iter} iterations")
    t0 = time.perf_counter()
    errs, lams = jax.vmap(amp_curve)(y_test, x_test)
    amp_db = to_db(np.sum(np.asarray(errs), axis=0))
    amp_s = time.perf_counter() - t0
    se = L.state_evolution(delta, c.eps, sigma2, alpha, n_iterations=c.n_iter)
    se_db = np.asarray(se.nmse_db)

    def prox_curve(method, n_iter):
        @jax.jit
        def one(y, x, lam):
            cost = L.CompositeCost(L.LeastSquares(op, y), L.L1(lam))
            state = method.init(cost, jnp.zeros(c.n, dtype))

            def body(s, _):
                s = method.step(cost, s)
                return s, jnp.sum((s.v - x) ** 2)

            _, errs = jax.lax.scan(body, state, None, length=n_iter)
            return jnp.concatenate([jnp.sum(x * x)[None], errs])

        return lambda: np.sum(np.asarray(jax.vmap(one)(y_test, x_test, lams)), axis=0)

    def prox_converged(method):
        """Run to convergence (relative step 1e-10) or ``n_iter_terminal`` steps."""

        @jax.jit
        def one(y, lam):
            cost = L.CompositeCost(L.LeastSquares(op, y), L.L1(lam))
            sol = L.solve(
                cost,
                method,
                jnp.zeros(c.n, dtype),
                max_steps=c.n_iter_terminal,
                rtol=1e-10,
            )
            ok = sol.result == L.RESULTS.successful
            return sol.value, sol.stats["num_iterations"], ok

        x, steps, ok = jax.vmap(one)(y_test, lams)
        err = float(jnp.sum((x - x_test) ** 2))
        return to_db(err), int(jnp.max(steps)), float(jnp.mean(ok))

    curves = {"AMP": amp_db}
    walls = {"AMP": amp_s}
    terminal = {"AMP": float(amp_db[-1])}
    terminal_steps = {"AMP": c.n_iter}
    converged = {"AMP": None}
    for name, method in (
        ("FISTA", L.FISTA(step_size=1.0 / (1.01 * lip))),
        ("ISTA", L.ISTA(step_size=1.0 / (1.01 * lip))),
    ):
        log(f"{name}: {c.n_iter} iterations, then to convergence")
        t0 = time.perf_counter()
        curves[name] = to_db(prox_curve(method, c.n_iter)())
        walls[name] = time.perf_counter() - t0
        db_conv, terminal_steps[name], converged[name] = prox_converged(method)
        terminal[name] = float(db_conv)
    for name in ("ISTA", "FISTA", "AMP"):
        db = curves[name]
        rows.append(
            {
                **base,
                "impl": name,
                "nmse_db": [float(v) for v in db],
                "iters_to_35db": _first_below(db, -35.0),
                "nmse_db_at_iter": float(db[-1]),
                "terminal_nmse_db": terminal[name],
                "terminal_iters": terminal_steps[name],
                "terminal_converged_fraction": converged[name],
                "sweeps_per_iter": 2,
                "wall_s": walls[name],
                "alpha" if name == "AMP" else "lasso_lambda_median": (
                    alpha if name == "AMP" else float(np.median(np.asarray(lams)))
                ),
            }
        )
    rows.append(
        {
            **base,
            "impl": "AMP-state-evolution",
            "nmse_db": [float(v) for v in se_db],
            "iters_to_35db": _first_below(se_db, -35.0),
            "empirical_minus_predicted_db_iter1_20": [
                float(v) for v in (amp_db - se_db)[1:21]
            ],
        }
    )

    # --- learned networks, trained by assimilation.learn.fit on a fixed set
    train = sample(jr.key(c.seed + 3), c.n_train)
    val = sample(jr.key(c.seed + 4), c.n_val)

    lam0 = float(np.median(np.asarray(lams)))
    support = L.support_schedule(c.layers, 0.012, 0.13)
    nets = {
        "ALISTA-16": (
            L.ALISTA(op, c.layers, step=1.0 / lip, lam=lam0, support=support),
            c.alista_steps,
            1e-3,
        ),
        "LISTA-16": (
            L.LISTA(A, c.layers, lam=lam0, support=support),
            c.lista_steps,
            2e-4,
        ),
    }
    fista16 = float(curves["FISTA"][min(c.layers, c.n_iter)])
    learned = {}
    for name, (net, steps, lr) in nets.items():
        log(f"{name}: training {steps} steps, batch {c.batch}")
        rss0 = _rss_mb()
        fit = L.fit_unrolled(
            net,
            train,
            key=jr.key(c.seed + 2),
            n_steps=steps,
            batch_size=c.batch,
            learning_rate=lr,
            val_data=val,
            report_memory=True,
        )
        net = fit.best_model
        train_s = fit.stats["train_s"]
        per_layer = jax.jit(jax.vmap(lambda y, net=net: net(y, all_layers=True)))(
            y_test
        )
        db = to_db(np.sum(np.asarray((per_layer - x_test[:, None]) ** 2), axis=(0, 2)))
        learned[name] = float(db[-1])
        n_params = sum(
            int(np.size(p))
            for p in jax.tree_util.tree_leaves(eqx.filter(net, L.learned_leaves(net)))
        )
        rows.append(
            {
                **base,
                "impl": name,
                "nmse_db_per_layer": [float(v) for v in db],
                "nmse_db": float(db[-1]),
                "gain_over_fista16_db": fista16 - float(db[-1]),
                "train_steps": steps,
                "batch": c.batch,
                "learning_rate": lr,
                "train_s": train_s,
                "n_train": c.n_train,
                "train_step_memory_mb": (fit.stats.get("step_memory_bytes") or 0)
                / 2**20,
                "train_peak_rss_growth_mb": _rss_mb() - rss0,
                "best_val_loss": float(fit.stats["best_loss"]),
                "epochs": fit.stats["epochs"],
                "n_learned": n_params,
                "sweeps": 2 * c.layers,
            }
        )
    best = max(learned, key=lambda k: fista16 - learned[k])
    spread = max(terminal.values()) - min(terminal.values())
    summary = {
        "amp_iters_to_35db": _first_below(curves["AMP"], -35.0),
        "fista_iters_to_35db": _first_below(curves["FISTA"], -35.0),
        "ista_iters_to_35db": _first_below(curves["ISTA"], -35.0),
        "se_iters_to_35db": _first_below(se_db, -35.0),
        "terminal_nmse_db": terminal,
        "fixed_point_spread_db": spread,
        "fista16_nmse_db": fista16,
        "learned16_nmse_db": learned,
        "learned16_gain_over_fista16_db": fista16 - learned[best],
        "learned16_best": best,
        "targets_met": {
            "amp_about_25_iters": (_first_below(curves["AMP"], -35.0) or 10**9) <= 30,
            "fista_about_200_iters": (_first_below(curves["FISTA"], -35.0) or 10**9)
            <= 250,
            "fixed_point_spread_le_0.2db": spread <= 0.2,
            "learned16_gain_ge_15db": fista16 - learned[best] >= 15.0,
        },
    }
    return rows, summary
