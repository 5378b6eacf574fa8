"""Where P4's gradient time goes: value_and_grad with respect to eta0, g and both.

Usage::

    python benchmarks/grad_parts.py [--kinds fft stepwise nonlinear] [--repeats 5]

For each dphys path of benchmarks/README.md P4 (``fft``: fast-forward, ``stepwise``: one
FFT solve per step, ``nonlinear``: IMEX CN/AB2 with the FFT solve; 128², 500 steps,
10 observation times, default ``Checkpointed(levels=2)``), times the P5-style cost
and ``jax.value_and_grad`` of it with respect to the initial elevation only, to g
only and to both, interleaved round-robin (min of ``--repeats`` calls after a
warm-up, float64), and prints one JSON line per path with the ratios to the cost.
The split shows which part of the reverse pass is the state's adjoint and which the
parameter's (the derivative of the per-mode operator).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", nargs="+", default=["fft", "stepwise", "nonlinear"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from . import _p4_shallow_water as p4

    p = p4.P4()
    sensors = tuple(jnp.asarray(i) for i in p.sensor_index())
    y = jnp.asarray(p.observations(p.steps))
    eta = jnp.asarray(p.eta0() + p.perturbation())
    g = jnp.asarray(1.2 * p.g)

    for kind in args.kinds:
        _, cost, _, _ = p4._dphys_fns(p, p.steps, p.steps, y, sensors, kind=kind)
        fns = {
            "cost": jax.jit(cost),
            "vg_eta": jax.jit(jax.value_and_grad(cost, argnums=0)),
            "vg_g": jax.jit(jax.value_and_grad(cost, argnums=1)),
            "vg_both": jax.jit(jax.value_and_grad(cost, argnums=(0, 1))),
        }
        for fn in fns.values():
            jax.block_until_ready(fn(eta, g))
        times = {name: [] for name in fns}
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                jax.block_until_ready(fn(eta, g))
                times[name].append(time.perf_counter() - t0)
        best = {name: min(ts) for name, ts in times.items()}
        row = {"problem": "P4", "kind": kind, "steps": p.steps, "n": p.n}
        row |= {f"{name}_s": s for name, s in best.items()}
        row |= {
            f"{name}_over_cost": best[name] / best["cost"]
            for name in ("vg_eta", "vg_g", "vg_both")
        }
        row["device"] = jax.devices()[0].platform
        row["loadavg"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
