"""The learning benchmark problems of ``benchmarks/README.md``: L1 and L2 set-ups.

* **L1** (learned assimilation): advection-diffusion on a 64x64 periodic unit square,
  velocity (v_x, v_y) = (1.0, 0.5), kappa = 2e-3, Crank-Nicolson, dt = 0.01, windows
  of 40 steps; true initial states drawn from the diffusion-covariance Gaussian field
  B (length scale 0.1, sigma = 1); 64 sensors at fixed random positions observed
  every 5 steps (steps 5, 10, ..., 40) with noise sigma = 0.05; background 0 with
  that B. Seeded sets of 1024 training, 128 validation and 256 test windows.
* **L2** (model error, calibration): the same, but the truth has terms the model
  lacks, a cubic damping -gamma u^3 (gamma = 2) and a fixed smooth source pattern
  (:class:`dphys.Augmented`), and the physics model has kappa = 1.5 kappa_true.
  256 training and 64 test windows; the test windows keep the true state at steps
  40 (end of window), 80, 120, 160 and 200, i.e. forecasts at lead times 40, 80
  and 160 steps counted from the end of the window (the last observation), and at
  40, 80, 160 counted from the window start.

Everything is generated in compiled, vmapped chunks (:func:`assimilation.learn.
make_windows`); ``meta["generation_s"]`` records the wall time of each set
(compilation included). ``quick=True`` keeps the grid and shrinks the sets;
``tiny=True`` is a 16x16 toy for smoke tests.

Run ``python -m benchmarks._learning_problems [L1|L2] [--quick|--tiny]`` to time the
generation (one JSON line).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import assimilation as da
import dphys
import pdes
from assimilation.learn import Windows, make_windows


VELOCITY_XY = (1.0, 0.5)  # (v_x, v_y); dphys takes array-axis order (v_y, v_x)
KAPPA = 2e-3
DT = 0.01
N_STEPS = 40
OBS_EVERY = 5
N_SENSORS = 64
NOISE = 0.05
LENGTH_SCALE = 0.1
STD = 1.0
GAMMA = 2.0  # L2 cubic damping
KAPPA_FACTOR = 1.5  # L2 physics model: kappa = 1.5 kappa_true
FORECAST_LEADS = (40, 80, 160)  # L2, in steps

SIZES = {
    # (n, n_sensors, L1 train/val/test, L2 train/test)
    "full": (64, N_SENSORS, (1024, 128, 256), (256, 64)),
    "quick": (64, N_SENSORS, (128, 32, 64), (64, 16)),
    "tiny": (16, 16, (16, 8, 8), (8, 4)),
}


@dataclasses.dataclass(frozen=True)
class LearningProblem:
    """One learning benchmark set-up.

    Attributes:
        name: ``"L1"`` or ``"L2"``.
        cost: the template :class:`assimilation.FourDVar` (physics model, background
            0, the initial state controlled with ``background_cov``; observation
            values zero: swap them per window with ``assimilation.learn.with_obs``).
        background_cov: the background covariance B (also the truth's prior).
        truth_model: the model that made the truth (L1: ``cost.model``).
        train, val, test: the :class:`assimilation.learn.Windows` (``val`` is
            ``None`` for L2).
        meta: sizes, constants, sensor positions and generation times.
    """

    name: str
    cost: da.FourDVar
    background_cov: da.Diffusion
    truth_model: dphys.AbstractModel
    train: Windows
    val: Windows | None
    test: Windows
    meta: dict[str, Any]


class CubicDamping(eqx.Module):
    """The explicit tendency ``-gamma * u**3`` (the L2 truth's missing term)."""

    gamma: jax.Array

    def __call__(self, t, u):
        return -self.gamma.astype(u.dtype) * u**3


def source_pattern(grid: dphys.Grid) -> jax.Array:
    """The L2 truth's fixed smooth source (per unit time), zero-mean, O(1)."""
    y, x = grid.coords
    two_pi = 2 * jnp.pi
    return jnp.sin(two_pi * x) * jnp.cos(two_pi * y) + 0.5 * jnp.cos(
        two_pi * (2 * x - y) + 0.3
    )


def _size(quick: bool, tiny: bool) -> str:
    if quick and tiny:
        raise ValueError("Give at most one of `quick` and `tiny`.")
    return "tiny" if tiny else "quick" if quick else "full"


def _setup(size: str, seed: int, kappa: float, noise: float):
    n, n_sensors = SIZES[size][:2]
    grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
    model = pdes.Advection(grid, velocity=VELOCITY_XY[::-1], kappa=kappa)
    # On a periodic grid with a constant length scale the variance is the same at
    # every point, so the cheap "constant" normalisation is exact.
    cov = da.Diffusion(grid, LENGTH_SCALE, std=STD, normalization="constant")
    positions = jr.uniform(jr.fold_in(jr.key(seed), 1000), (n_sensors, 2))
    times = DT * OBS_EVERY * np.arange(1, N_STEPS // OBS_EVERY + 1)
    obs = da.Observations(times, jnp.zeros((len(times), n_sensors)), positions, noise)
    cost = da.FourDVar(
        model,
        dphys.CrankNicolson(),
        jnp.zeros(grid.shape),
        obs,
        da.Control(initial_state=da.InitialState(cov)),
        dt=DT,
        n_steps=N_STEPS,
    )
    return grid, cov, cost


def _chunk(*counts: int) -> int:
    # One chunk size for every set, so that the generator compiles once.
    return min(64, *counts)


def _timed(fn, **kw):
    t = time.perf_counter()
    out = fn(**kw)
    jax.block_until_ready(out)
    return out, time.perf_counter() - t


def make_l1(
    *, quick: bool = False, tiny: bool = False, seed: int = 0, noise: float = NOISE
) -> LearningProblem:
    """The L1 set-up (see the module docstring); ``noise`` for the depth study."""
    size = _size(quick, tiny)
    n_train, n_val, n_test = SIZES[size][2]
    grid, cov, cost = _setup(size, seed, KAPPA, noise)
    key = jr.key(seed)
    chunk = _chunk(n_train, n_val, n_test)
    gen = {}
    sets = {}
    for i, (name, count) in enumerate(
        (("train", n_train), ("val", n_val), ("test", n_test))
    ):
        sets[name], gen[name] = _timed(
            make_windows,
            cost=cost,
            prior=cov,
            n_windows=count,
            key=jr.fold_in(key, i),
            chunk_size=chunk,
        )
    meta = _meta("L1", size, seed, noise, grid, cost, gen)
    return LearningProblem(
        "L1", cost, cov, cost.model, sets["train"], sets["val"], sets["test"], meta
    )


def make_l2(
    *, quick: bool = False, tiny: bool = False, seed: int = 0, noise: float = NOISE
) -> LearningProblem:
    """The L2 set-up (see the module docstring)."""
    size = _size(quick, tiny)
    n_train, n_test = SIZES[size][3]
    grid, cov, cost = _setup(size, seed, KAPPA_FACTOR * KAPPA, noise)
    dtype = jnp.result_type(float)
    truth = dphys.Augmented(
        pdes.Advection(grid, velocity=VELOCITY_XY[::-1], kappa=KAPPA),
        explicit=CubicDamping(jnp.asarray(GAMMA, dtype)),
        forcing=source_pattern(grid).astype(dtype),
    )
    forecast_steps = tuple(
        sorted({N_STEPS, *FORECAST_LEADS, *(N_STEPS + lead for lead in FORECAST_LEADS)})
    )
    key = jr.fold_in(jr.key(seed), 2)
    train, t_train = _timed(
        make_windows,
        cost=cost,
        prior=cov,
        n_windows=n_train,
        key=jr.fold_in(key, 0),
        truth_model=truth,
        chunk_size=_chunk(n_train, n_test),
    )
    test, t_test = _timed(
        make_windows,
        cost=cost,
        prior=cov,
        n_windows=n_test,
        key=jr.fold_in(key, 2),
        truth_model=truth,
        save_steps=forecast_steps,
        chunk_size=_chunk(n_test),
    )
    meta = _meta(
        "L2", size, seed, noise, grid, cost, {"train": t_train, "test": t_test}
    )
    meta.update(
        kappa_true=KAPPA,
        kappa_model=KAPPA_FACTOR * KAPPA,
        gamma=GAMMA,
        source=np.asarray(source_pattern(grid)),
        forecast_leads=FORECAST_LEADS,
        # lead counted from the end of the window -> model step from its start
        forecast_steps={lead: N_STEPS + lead for lead in FORECAST_LEADS},
        forecast_steps_from_start={lead: lead for lead in FORECAST_LEADS},
    )
    return LearningProblem("L2", cost, cov, truth, train, None, test, meta)


def _meta(name, size, seed, noise, grid, cost, gen_s) -> dict[str, Any]:
    return {
        "problem": name,
        "size": size,
        "seed": seed,
        "n": grid.shape[0],
        "dt": DT,
        "n_steps": N_STEPS,
        "obs_every": OBS_EVERY,
        "noise": noise,
        "length_scale": LENGTH_SCALE,
        "std": STD,
        "velocity_xy": VELOCITY_XY,
        "n_sensors": cost.obs.n_sensors,
        "positions": np.asarray(cost.obs.positions),
        "times": np.asarray(cost.obs.times),
        "generation_s": gen_s,
    }


def main(argv=None) -> None:
    args = sys.argv[1:] if argv is None else argv
    name = next((a for a in args if a in ("L1", "L2")), "L1")
    kw = {"quick": "--quick" in args, "tiny": "--tiny" in args}
    t = time.perf_counter()
    p = (make_l1 if name == "L1" else make_l2)(**kw)
    total = time.perf_counter() - t
    sets = {"train": p.train, "val": p.val, "test": p.test}
    row = {
        "problem": name,
        "size": p.meta["size"],
        "n": p.meta["n"],
        "windows": {k: (None if w is None else w.n_windows) for k, w in sets.items()},
        "generation_s": {k: round(v, 3) for k, v in p.meta["generation_s"].items()},
        "total_s": round(total, 3),
        "device": str(jax.devices()[0].device_kind),
        "dtype": str(p.train.obs.dtype),
        "obs_noise_std": float(jnp.nanstd(p.train.obs - p.train.clean_obs)),
    }
    print(json.dumps(row))


if __name__ == "__main__":
    jax.config.update("jax_enable_x64", True)
    main()
