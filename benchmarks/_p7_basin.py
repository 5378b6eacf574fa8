"""P7: P4's basin with walls and a variable depth (``benchmarks/README.md``).

Linear rotating shallow water on P4's 128x128 C-grid (dx = 10 km, g = 9.81 m/s^2,
f = 1e-4 1/s, dt = 600 s, 500 Crank-Nicolson steps, the 1 m Gaussian bump at rest),
but closed by walls on all four sides and over a variable depth: 1000 m with a
seamount rising to 300 m (a Gaussian of e-folding width 200 km centred at (0.3 L,
0.6 L)) and a shelf shoaling to 400 m along the east wall,

$$ H = 1000\\,\\mathrm{m}\\,\\big[1 - 0.7\\,e^{-r^2/(200\\,\\mathrm{km})^2}\\big]
   \\big[1 - 0.6\\,e^{-(L - x)/(150\\,\\mathrm{km})}\\big]. $$

Neither the walls nor the depth allow an FFT solve: every step is a Krylov solve of
the coupled 3-field system at gravity-wave Courant number up to 5.9.

* ``dphys``: :class:`dphys.Auto` -> ``pdes.HelmholtzKrylov`` (GMRES preconditioned
  by a Helmholtz solve for $\\eta$; the variant is recorded in ``solver``).
* ``dphys-helmholtz-spectral``: ``HelmholtzKrylov(helmholtz="spectral")``, the
  exact mean-depth Helmholtz inverse by DCT (the solver before variable-depth
  multigrid).
* ``jax-gmres``: ``jax.scipy.sparse.linalg.gmres`` (restart 20, ``tol=1e-10``,
  warm-started) per step on ``pdes.ShallowWater.linear`` (the same model, without
  dphys's solvers), differentiated by ``jax.grad`` through the ``lax.scan``.

Answer checks: ``error`` is the energy-norm difference to a converged run
(``HelmholtzKrylov(rtol=1e-13)``); ``mass_rel_change`` (walls: mass is conserved
exactly) and ``energy_rel_change`` (Crank-Nicolson conserves the linear model's
energy; here up to the solver tolerance). Gradient: $J(\\eta_0, g)$ as P4's, checked
by a central difference and against dphys's.
"""

from __future__ import annotations

import os
import sys
from typing import Any


if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402

from . import _measure  # noqa: E402


_log = _measure.logger("bench P7")
N_OBS = 10


class P7:
    """P7's data (NumPy): grid, depth, initial state, sensors."""

    def __init__(self, n: int = 128, steps: int = 500):
        self.n, self.steps = n, steps
        self.d, self.g, self.f, self.dt = 10e3, 9.81, 1e-4, 600.0
        self.length = n * self.d
        axis = (np.arange(n) + 0.5) * self.d  # cell centres of a walled axis
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")

    @property
    def shape(self):
        return (self.n, self.n)

    def depth(self) -> np.ndarray:
        L = self.length
        r2 = (self.x - 0.3 * L) ** 2 + (self.y - 0.6 * L) ** 2
        seamount = 1.0 - 0.7 * np.exp(-r2 / (200e3) ** 2)
        shelf = 1.0 - 0.6 * np.exp(-(L - self.x) / 150e3)
        return 1000.0 * seamount * shelf

    def eta0(self) -> np.ndarray:
        c = self.length / 2
        return np.exp(-((self.x - c) ** 2 + (self.y - c) ** 2) / (100e3) ** 2)

    def perturbation(self) -> np.ndarray:
        c = self.length / 2
        r2 = (self.x - 0.6 * self.length) ** 2 + (self.y - c) ** 2
        return 0.3 * np.exp(-r2 / (50e3) ** 2)

    def sensor_index(self):
        idx = np.arange(self.n // 16, self.n, self.n // 8)
        return np.meshgrid(idx, idx, indexing="ij")

    def energy(self, state) -> float:
        eta, u, v = (np.asarray(a, np.float64) for a in state)
        h = self.depth()
        hu = 0.5 * (h + np.roll(h, -1, 1))
        hv = 0.5 * (h + np.roll(h, -1, 0))
        u = u.copy()
        v = v.copy()
        u[:, -1] = 0.0
        v[-1, :] = 0.0
        return 0.5 * float(np.sum(self.g * eta**2 + hu * u**2 + hv * v**2))

    def energy_norm_error(self, state, exact) -> float:
        num = self.energy([a - b for a, b in zip(state, exact, strict=True)])
        return float(np.sqrt(num / self.energy(exact)))


def _model(p: P7, g):
    import jax.numpy as jnp

    import dphys
    import pdes

    grid = dphys.Grid(p.shape, lengths=p.length, boundary="neumann")
    return pdes.ShallowWater(grid, jnp.asarray(p.depth()), g=g, f0=p.f)


def _dphys_fns(p: P7, steps, y, sensors, solver):
    import jax.numpy as jnp

    import dphys
    import pdes

    stepper = dphys.CrankNicolson(solver=solver)
    every = max(1, steps // N_OBS)

    def state(eta0):
        zeros = jnp.zeros_like(eta0)
        return pdes.SWState(eta0, zeros, zeros)

    def forward(eta0, g):
        final = dphys.simulate(
            _model(p, g), stepper, state(eta0), dt=p.dt, n_steps=steps
        ).final
        return final.eta, final.u, final.v

    def cost(eta0, g):
        traj = dphys.simulate(
            _model(p, g),
            stepper,
            state(eta0),
            dt=p.dt,
            n_steps=every * N_OBS,
            saveat=dphys.SaveAt(t1=False, every=every, fn=lambda t, s: s.eta[sensors]),
        )
        return jnp.sum((traj.ys - y) ** 2)

    def iterations(eta0, g):
        traj = dphys.simulate(
            _model(p, g), stepper, state(eta0), dt=p.dt, n_steps=steps
        )
        return traj.stats["linear_iterations"]

    return forward, cost, iterations


def _gmres_fns(p: P7, steps, y, sensors, tol=1e-10):
    import jax
    import jax.numpy as jnp
    from jax.scipy.sparse.linalg import gmres

    import pdes

    half = 0.5 * p.dt

    def step_fn(g):
        model = _model(p, g)
        lin = lambda x: model.linear(0.0, x)

        def step(x):
            rhs = jax.tree.map(lambda a, b: a + half * b, x, lin(x))
            matvec = lambda v: jax.tree.map(lambda a, b: a - half * b, v, lin(v))
            new, _ = gmres(matvec, rhs, x0=x, tol=tol, atol=0.0, restart=20)
            return new

        return step

    def start(eta0):
        zeros = jnp.zeros_like(eta0)
        return pdes.SWState(eta0, zeros, zeros)

    def forward(eta0, g):
        x = _measure.scan_steps(step_fn(g), start(eta0), steps)
        return x.eta, x.u, x.v

    every = max(1, steps // N_OBS)

    def cost(eta0, g):
        observe = lambda x: x.eta[sensors]
        return _measure.segment_misfit(step_fn(g), start(eta0), every, observe, y)

    notes = {
        "tol": tol,
        "restart": 20,
        "x0": "previous state",
        "operator": "pdes.ShallowWater.linear (same model, no dphys solver)",
        "grad": "jax.grad through lax.scan (custom_linear_solve: transposed GMRES)",
    }
    return forward, cost, notes


def run_p7(
    quick: bool,
    *,
    n: int = 128,
    steps: int = 500,
    repeats: int | None = None,
    slow_s: float = 20.0,
    only=None,
) -> list[dict[str, Any]]:
    """Run P7 (and its gradient) for dphys and the peer; one row each.

    ``quick``: every implementation at 50 steps, extrapolated per step to ``steps``
    (each step is the same kind of solve).
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import dphys
    import pdes
    from dphys._solver import resolve_solver

    repeats = (3 if quick else 5) if repeats is None else repeats
    p = P7(n=n, steps=steps)
    full = p.steps
    run_steps = min(full, max(N_OBS, 50 if quick else full))
    iy, ix = (jnp.asarray(i) for i in p.sensor_index())
    sensors = (iy, ix)
    eta0 = jnp.asarray(p.eta0())
    g_true = jnp.asarray(p.g)
    eta0_eval = jnp.asarray(p.eta0() + p.perturbation())
    g_eval = 1.2 * g_true

    _log("converged reference run")
    ref_solver = pdes.HelmholtzKrylov(rtol=1e-13, helmholtz="spectral")
    every = max(1, run_steps // N_OBS)
    states = jax.jit(
        lambda e: (
            dphys.simulate(
                _model(p, g_true),
                dphys.CrankNicolson(solver=ref_solver),
                pdes.SWState(e, jnp.zeros_like(e), jnp.zeros_like(e)),
                dt=p.dt,
                n_steps=every * N_OBS,
                saveat=dphys.SaveAt(t1=False, every=every),
            ).ys
        )
    )(eta0)
    reference = [np.asarray(a[-1]) for a in (states.eta, states.u, states.v)]
    y = states.eta[:, iy, ix]

    solvers = {
        "dphys": dphys.Auto(),
        "dphys-helmholtz-spectral": pdes.HelmholtzKrylov(helmholtz="spectral"),
    }
    specs, iteration_fns = [], {}
    for name, solver in solvers.items():
        f, c, it = _dphys_fns(p, every * N_OBS, y, sensors, solver)
        resolved = resolve_solver(
            solver, _model(p, g_true), pdes.SWState(eta0, eta0, eta0)
        )
        notes = {"solver": repr(resolved), "adjoint": "Checkpointed(levels=2)"}
        steps_here = every * N_OBS
        specs.append(_measure.Spec(name, steps_here, steps_here, f, c, notes))
        iteration_fns[name] = it
    f, c, nt = _gmres_fns(p, every * N_OBS, y, sensors)
    specs.append(_measure.Spec("jax-gmres", every * N_OBS, every * N_OBS, f, c, nt))

    base = {
        "problem": "P7",
        "ndim": 2,
        "n": n,
        "steps": full,
        "dtype": "float64",
        "device": _measure.device_name(),
    }
    specs, rows, limits = _measure.measure_specs(
        specs,
        (eta0, g_true),
        (eta0_eval, g_eval),
        base=base,
        repeats=repeats,
        slow_s=slow_s,
        log=_log,
        only=only,
    )
    key = jax.random.key(1)
    direction = (jax.random.normal(key, p.shape, jnp.float64) * 0.01, jnp.asarray(0.3))
    ref_grad = next((s.fns["grad"].out[1] for s in specs if s.name == "dphys"), None)
    e0 = p.energy((p.eta0(), 0 * p.eta0(), 0 * p.eta0()))
    for spec in specs:
        row = dict(base, impl=spec.name) | _measure.timing_fields(spec, full, limits)
        out = [np.asarray(a) for a in spec.fns["forward"].out]
        row["error_ref"] = "HelmholtzKrylov(rtol=1e-13), same steps"
        row["error"] = p.energy_norm_error(out, reference)
        row["mass_rel_change"] = abs(float(np.sum(out[0]) - np.sum(p.eta0()))) / float(
            np.sum(np.abs(p.eta0()))
        )
        row["energy_rel_change"] = p.energy(out) / e0 - 1.0
        if spec.name in iteration_fns:
            its = jax.jit(iteration_fns[spec.name])(eta0, g_true)
            row["iterations_per_step"] = int(its) / spec.steps
        same = spec.name != "dphys"
        row |= _measure.grad_checks(
            spec, (eta0_eval, g_eval), direction, ref_grad if same else None
        )
        for k, v in spec.notes.items():
            row.setdefault(k, v)
        row["depth_range_m"] = [float(p.depth().min()), float(p.depth().max())]
        row["loadavg"] = os.getloadavg()[0]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="P7: walled basin, variable depth")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--impl", nargs="+", default=None)
    args = parser.parse_args(argv)
    rows = run_p7(
        args.quick, n=args.n, steps=args.steps, repeats=args.repeats, only=args.impl
    )
    summary = _measure.problem_summary(
        rows, extra_keys=("mass_rel_change", "energy_rel_change")
    )
    rows.append({"summary": {"P7": summary}})
    for row in rows:
        print(json.dumps(_measure.clean(row)), flush=True)


if __name__ == "__main__":
    main()
