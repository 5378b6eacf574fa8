"""P3 with a variable velocity field: advection where no FFT solve exists.

P3's grid, time step, initial state, sensors and cost (``benchmarks/README.md``), but
the velocity is a field: the mean flow $\\mathbf c = (c_x, c_y)$ (the differentiated
parameter, true value P3's (1.0, 0.5)) plus a fixed divergence-free swirl of
amplitude 0.25,

$$ \\mathbf v(x, y) = \\mathbf c + 0.25\\,(\\sin 2\\pi x\\cos 2\\pi y,\\;
   -\\cos 2\\pi x\\sin 2\\pi y), $$

given at the unknowns (``pdes.Advection``, centred flux form, face velocities the
mean of the two neighbours), Crank-Nicolson, Courant number up to 4. Every implicit
step is a non-symmetric solve:

* ``dphys``: :class:`dphys.Auto` (the choice is recorded in ``solver``).
* ``dphys-gmres``: ``dphys.Krylov(method="gmres")`` without a preconditioner.
* ``dphys-bicgstab-fourier``: BiCGStab with the Fourier preconditioner.
* ``jax-bicgstab``: ``jax.scipy.sparse.linalg.bicgstab`` per step on the same
  discretisation written here with ``jnp.roll`` (independent of dphys), warm-started
  from the previous state, ``tol=1e-10``, differentiated by ``jax.grad`` through the
  ``lax.scan``.
* ``jax-gmres``: the same with ``jax.scipy.sparse.linalg.gmres`` (restart 20).

There is no exact discrete solution: ``error`` is against a converged dphys run
(GMRES, ``rtol=1e-13``, products by ``model.linear``). Gradients are checked by a
central difference along a random direction and against dphys's.
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
from ._p3_advection import C_TRUE, N_OBS, P3  # noqa: E402
from ._problems import rel_l2  # noqa: E402


_log = _measure.logger("bench P3-variable")

SWIRL = 0.25


def swirl(p: P3):
    """The divergence-free perturbation ``(v_x, v_y)`` at the unknowns (NumPy)."""
    x, y = p.x, p.y
    return (
        SWIRL * np.sin(2 * np.pi * x) * np.cos(2 * np.pi * y),
        -SWIRL * np.cos(2 * np.pi * x) * np.sin(2 * np.pi * y),
    )


def _velocity(p: P3, c):
    """Array-axis order ``(v_y, v_x)`` for ``pdes.Advection``."""
    import jax.numpy as jnp

    sx, sy = (jnp.asarray(a) for a in swirl(p))
    return (c[1] + sy, c[0] + sx)


def _dphys_fns(p: P3, steps, grad_steps, y, H, solver):
    import jax.numpy as jnp

    import dphys
    import pdes

    grid = dphys.Grid(p.shape, lengths=1.0, boundary="periodic")
    stepper = dphys.CrankNicolson(solver=solver)
    every = max(1, grad_steps // N_OBS)
    model = lambda c: pdes.Advection(grid, _velocity(p, c))

    def forward(u0, c):
        return dphys.simulate(model(c), stepper, u0, dt=p.dt, n_steps=steps).final

    def cost(u0, c):
        traj = dphys.simulate(
            model(c),
            stepper,
            u0,
            dt=p.dt,
            n_steps=every * N_OBS,
            saveat=dphys.SaveAt(t1=False, every=every, fn=lambda t, u: H(u)),
        )
        return jnp.sum((traj.ys - y) ** 2)

    def iterations(u0, c):
        return dphys.simulate(model(c), stepper, u0, dt=p.dt, n_steps=steps).stats[
            "linear_iterations"
        ]

    return forward, cost, iterations


def _stencil(p: P3):
    """$-\\nabla\\cdot(\\mathbf v u)$, centred flux form, face velocity the mean of
    the two neighbours (``jnp.roll``; the discretisation of ``pdes.Advection``)."""
    import jax.numpy as jnp

    sx, sy = (jnp.asarray(a) for a in swirl(p))
    inv_dx = float(p.n)

    def lop(u, c):
        out = jnp.zeros_like(u)
        for axis, v in ((1, c[0] + sx), (0, c[1] + sy)):
            vf = 0.5 * (v + jnp.roll(v, -1, axis))  # face i+1/2
            flux = vf * 0.5 * (u + jnp.roll(u, -1, axis))
            out = out - (flux - jnp.roll(flux, 1, axis)) * inv_dx
        return out

    return lop


def _peer_fns(p: P3, steps, grad_steps, y, H, method, tol=1e-10):
    from jax.scipy.sparse.linalg import bicgstab, gmres

    lop = _stencil(p)
    half = 0.5 * p.dt

    def step_fn(c):
        def matvec(v):
            return v - half * lop(v, c)

        def step(u):
            rhs = u + half * lop(u, c)
            if method == "bicgstab":
                x, _ = bicgstab(matvec, rhs, x0=u, tol=tol, maxiter=1000)
            else:
                x, _ = gmres(matvec, rhs, x0=u, tol=tol, atol=0.0, restart=20)
            return x

        return step

    forward = lambda u0, c: _measure.scan_steps(step_fn(c), u0, steps)
    every = max(1, grad_steps // N_OBS)

    def cost(u0, c):
        return _measure.segment_misfit(step_fn(c), u0, every, H, y)

    notes = {"tol": tol, "x0": "previous state", "grad": "jax.grad through lax.scan"}
    if method == "gmres":
        notes["restart"] = 20
    return forward, cost, notes


def run_p3_variable(
    quick: bool,
    *,
    n: int = 256,
    repeats: int | None = None,
    slow_s: float = 20.0,
    only=None,
) -> list[dict[str, Any]]:
    """Run P3-variable for dphys and the peers; return one row each (see the module
    docstring). ``quick``: every implementation at 50 steps, extrapolated per step
    to P3's 200 (the cost is per step: the same solve every step)."""
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import dphys
    import pdes
    from dphys._solver import resolve_solver

    repeats = (3 if quick else 5) if repeats is None else repeats
    p = P3(n=n)
    full = p.steps
    steps = 50 if quick else full
    steps = min(steps, full)
    iy, ix = (jnp.asarray(i) for i in p.sensor_index())
    H = lambda u: u[iy, ix]
    u0 = jnp.asarray(p.u0())
    c_true = jnp.asarray(C_TRUE)
    u0_eval = jnp.asarray(p.u0() + p.perturbation())
    c_eval = 1.2 * c_true

    # Reference: the same scheme converged (no assembled stencil, no
    # preconditioner), and the observations of the cost from it with the true flow.
    ref_solver = dphys.Krylov(method="gmres", rtol=1e-13, assemble=False)
    _log("converged reference run")
    every = max(1, steps // N_OBS)
    ref_fwd, _, _ = _dphys_fns(p, steps, steps, None, H, ref_solver)
    reference = np.asarray(jax.jit(ref_fwd)(u0, c_true))
    ys = []
    ref_seg = jax.jit(
        lambda u, c: _dphys_fns(p, every, every, None, H, ref_solver)[0](u, c)
    )
    state = u0
    for _ in range(N_OBS):
        state = ref_seg(state, c_true)
        ys.append(np.asarray(H(state)))
    y = jnp.asarray(np.stack(ys))

    solvers = {
        "dphys": dphys.Auto(),
        "dphys-gmres": dphys.Krylov(method="gmres"),
        "dphys-bicgstab-fourier": dphys.Krylov(
            method="bicgstab", preconditioner="fourier"
        ),
    }
    specs, iteration_fns = [], {}
    for name, solver in solvers.items():
        f, c, it = _dphys_fns(p, steps, steps, y, H, solver)
        grid = dphys.Grid(p.shape, lengths=1.0, boundary="periodic")
        resolved = resolve_solver(
            solver, pdes.Advection(grid, _velocity(p, c_true)), u0
        )
        notes = {"solver": repr(resolved), "adjoint": "Checkpointed(levels=2)"}
        specs.append(_measure.Spec(name, steps, steps, f, c, notes, "reference"))
        iteration_fns[name] = it
    for method in ("bicgstab", "gmres"):
        f, c, nt = _peer_fns(p, steps, steps, y, H, method)
        specs.append(
            _measure.Spec(f"jax-{method}", steps, steps, f, c, nt, "reference")
        )

    base = {
        "problem": "P3-variable",
        "ndim": 2,
        "n": n,
        "steps": full,
        "dtype": "float64",
        "device": _measure.device_name(),
    }
    specs, rows, limits = _measure.measure_specs(
        specs,
        (u0, c_true),
        (u0_eval, c_eval),
        base=base,
        repeats=repeats,
        slow_s=slow_s,
        log=_log,
        only=only,
    )
    key = jax.random.key(1)
    direction = (
        jax.random.normal(key, p.shape, jnp.float64) * 0.1,
        jnp.asarray([0.3, -0.2]),
    )
    ref_grad = None
    for spec in specs:
        if spec.name == "dphys":
            ref_grad = spec.fns["grad"].out[1]
    for spec in specs:
        row = dict(base, impl=spec.name) | _measure.timing_fields(spec, full, limits)
        out = np.asarray(spec.fns["forward"].out)
        row["error_ref"] = "dphys Krylov(gmres, rtol=1e-13, assemble=False)"
        row["error"] = rel_l2(out, reference)
        if spec.name in iteration_fns:
            its = jax.jit(iteration_fns[spec.name])(u0, c_true)
            row["iterations_per_step"] = int(its) / spec.steps
        same = spec.name != "dphys" and ref_grad is not None
        row |= _measure.grad_checks(
            spec, (u0_eval, c_eval), direction, ref_grad if same else None
        )
        for k, v in spec.notes.items():
            row.setdefault(k, v)
        row["loadavg"] = os.getloadavg()[0]
        rows.append(row)
    return rows


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="P3 with a variable velocity field")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--impl", nargs="+", default=None)
    args = parser.parse_args(argv)
    rows = run_p3_variable(args.quick, n=args.n, repeats=args.repeats, only=args.impl)
    rows.append({"summary": {"P3-variable": _measure.problem_summary(rows)}})
    for row in rows:
        print(json.dumps(_measure.clean(row)), flush=True)


if __name__ == "__main__":
    main()
