"""Iterations per implicit solve against the grid size, per preconditioner.

``python benchmarks/iterations.py [--sizes 64 128 256 512] [--steps 20]`` runs P6's
Crank-Nicolson heat problem (``benchmarks/README.md``: periodic unit square, dt =
2e-2, P2's initial state) at each size, with P6's diffusivity
$\\kappa = 10^{-3}(1 + 0.5\\sin 2\\pi x\\cos 2\\pi y)$ and with a 400-fold contrast
$\\kappa = 10^{-3}\\exp(3\\sin 2\\pi x\\cos 2\\pi y)$, and prints one JSON line per
(field, size, solver) with the mean iterations per solve
(``Trajectory.stats["linear_iterations"] / steps``), the forward time per step
(median of 3 after a warm-up; a shared CPU makes these indicative only, the
iteration counts are exact) and the error against the FFT-free reference (CG with
``rtol=1e-13``).

The solvers: ``dphys.Krylov(method="cg")`` with no preconditioner, the Fourier
preconditioner and the multigrid V-cycle; all with the assembled stencil and the
steppers' extrapolated initial guess. A final ``{"table": ...}`` line holds the
markdown table quoted in ``docs/design.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time


if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402


SOLVERS = ("cg", "fourier", "multigrid")
FIELDS = ("P6", "contrast-400")


def kappa_field(name: str, n: int) -> np.ndarray:
    axis = np.arange(n) / n
    y, x = np.meshgrid(axis, axis, indexing="ij")
    wave = np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y)
    if name == "P6":
        return 1e-3 * (1.0 + 0.5 * wave)
    return 1e-3 * np.exp(3.0 * wave)


def measure(field: str, n: int, solver_name: str, steps: int) -> dict:
    import dataclasses

    import jax
    import jax.numpy as jnp

    import dphys
    import pdes

    from ._problems import make_problem

    p = dataclasses.replace(make_problem("P6"), n=n)
    grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
    kappa = jnp.asarray(kappa_field(field, n))
    u0 = jnp.asarray(p.u0())
    precond = None if solver_name == "cg" else solver_name
    solvers = {
        "run": dphys.Krylov(method="cg", preconditioner=precond),
        "reference": dphys.Krylov(method="cg", rtol=1e-13, max_steps=5000),
    }
    out = {}
    for key, solver in solvers.items():
        run = jax.jit(
            lambda u, k, solver=solver: dphys.simulate(
                pdes.Heat(grid, k),
                dphys.CrankNicolson(solver=solver),
                u,
                dt=p.dt,
                n_steps=steps,
            )
        )
        traj = jax.block_until_ready(run(u0, kappa))
        times = []
        if key == "run":
            for _ in range(3):
                t = time.perf_counter()
                jax.block_until_ready(run(u0, kappa))
                times.append(time.perf_counter() - t)
        out[key] = (traj, times)
    traj, times = out["run"]
    ref = out["reference"][0].final
    return {
        "field": field,
        "n": n,
        "solver": solver_name,
        "steps": steps,
        "iterations_per_solve": int(traj.stats["linear_iterations"]) / steps,
        "step_ms": statistics.median(times) / steps * 1e3,
        "error_vs_reference": float(
            jnp.linalg.norm(traj.final - ref) / jnp.linalg.norm(ref)
        ),
        "loadavg": os.getloadavg()[0],
    }


def table(rows) -> str:
    sizes = sorted({r["n"] for r in rows})
    head = "| field | solver | " + " | ".join(f"{n}²" for n in sizes) + " |"
    lines = [head, "|" + "---|" * (2 + len(sizes))]
    for field in FIELDS:
        for solver in SOLVERS:
            cells = []
            for n in sizes:
                r = [
                    x
                    for x in rows
                    if (x["field"], x["solver"], x["n"]) == (field, solver, n)
                ]
                cells.append(
                    f"{r[0]['iterations_per_solve']:.1f} ({r[0]['step_ms']:.1f} ms)"
                    if r
                    else "-"
                )
            lines.append(f"| {field} | {solver} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    import jax

    jax.config.update("jax_enable_x64", True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--solvers", nargs="+", default=list(SOLVERS))
    parser.add_argument("--fields", nargs="+", default=list(FIELDS))
    args = parser.parse_args(argv)
    rows = []
    for field in args.fields:
        for n in args.sizes:
            for solver in args.solvers:
                row = measure(field, n, solver, args.steps)
                rows.append(row)
                print(json.dumps(row), flush=True)
    print(json.dumps({"table": table(rows)}), flush=True)


if __name__ == "__main__":
    main()
