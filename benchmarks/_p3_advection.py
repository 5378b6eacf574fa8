"""BENCHMARKS.md P3: 2D periodic advection, Crank-Nicolson, central differences.

``run_p3(quick) -> list[dict]`` measures, in one run and interleaved round-robin:

* ``dphys``: ``pdes.Advection`` with constant velocity, :class:`dphys.Auto` (exact FFT
  solve) and the default fast-forward (the exact multi-step propagator $G_k^m$ between
  saves: one FFT pair per saved segment).
* ``dphys-stepwise``: the same, ``fast_forward=False`` (one FFT pair per step).
* ``dphys-krylov``: the same uniform flow passed as velocity *fields*, so every step
  is a Jacobi-preconditioned GMRES(10) solve (lineax) and its adjoint a transposed
  solve by the implicit function theorem: the like-for-like comparison with the
  BiCGStab peer (a variable velocity has no FFT path).
* ``jax-bicgstab``: ``jax.scipy.sparse.linalg.bicgstab`` per step on a matrix-free
  central-difference stencil, warm-started, ``tol=1e-10``, differentiated by plain
  ``jax.grad`` through the ``lax.scan``.
* ``exponax``: ``exponax.stepper.Advection`` (exact exponential of the spectral
  derivative) stepped with the same ``dt``: a different discretisation, so its
  ``error`` is against the PDE's exact shift.
* ``diffrax``: method of lines, a two-stage ESDIRK trapezoidal tableau (Crank-Nicolson)
  with Newton + matrix-free GMRES, forward only at a few steps (per-step
  extrapolation); its reverse pass would build a dense Jacobian per stage (see
  BENCHMARKS.md), so no gradient is timed.

The gradient is that of the P5-style cost $J(u_0, c) = \\sum_{k=1}^{10}\\|H u(t_k) -
y_k\\|^2$ (an 8x8 sensor lattice, observations every ``steps/10`` steps, $y_k$ from the
exact PDE solution with the true velocity), with respect to both the initial state and
the velocity vector, evaluated at a perturbed $u_0$ and $1.5\\,c$.

Every row checks its answer: ``error`` is the relative L2 error against the exact
solution of the *discrete* scheme (per Fourier mode $G_k^n$, written here in NumPy,
independent of dphys) or, for exponax, of the PDE; ``error_pde`` is against the exact
shift $u_0(x - c t)$ for every implementation. Gradients are checked by a central
difference along a random direction (``grad_fd_relerr``) and against dphys's
(``grad_vs_dphys_relerr``).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, ClassVar


if __package__ in (None, ""):  # `python benchmarks/_p3_advection.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402

from . import _measure  # noqa: E402


GOLDEN = 0.6180339887
SILVER = 0.4142135624
N_OBS = 10
C_TRUE = (1.0, 0.5)  # (c_x, c_y), as in BENCHMARKS.md


class P3:
    """P3's data in NumPy: grid, u0, exact discrete and PDE solutions, sensors."""

    def __init__(self, n: int = 256, dt: float = 0.0125, steps: int = 200):
        self.n, self.dt, self.steps = n, dt, steps
        axis = np.arange(n) / n
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")

    @property
    def shape(self):
        return (self.n, self.n)

    def modes(self):
        """``(amplitude, (k_y, k_x), phase)``: P2's modes with |k| <= 4."""
        out = []
        for kx in range(0, 5):
            for ky in range(-4, 5):
                if kx > 0 or ky > 0:
                    phase = 2 * np.pi * ((GOLDEN * kx + SILVER * ky) % 1.0)
                    out.append((1.0 / (kx * kx + ky * ky), (ky, kx), phase))
        return out

    def exact_pde(self, t: float, c=C_TRUE) -> np.ndarray:
        """$u_0(x - c_x t, y - c_y t)$."""
        u = np.zeros(self.shape)
        for amp, (ky, kx), phase in self.modes():
            arg = kx * (self.x - c[0] * t) + ky * (self.y - c[1] * t)
            u += amp * np.cos(2 * np.pi * arg + phase)
        return u

    def u0(self) -> np.ndarray:
        return self.exact_pde(0.0)

    def perturbation(self) -> np.ndarray:
        x, y = self.x, self.y
        return 0.2 * np.cos(2 * np.pi * (2 * x + 3 * y) + 0.5) + 0.1 * np.sin(
            2 * np.pi * (5 * x - y)
        )

    def exact_discrete(self, u0, n_steps: int, c=C_TRUE) -> np.ndarray:
        r"""CN + central differences, per mode: $G = (1 + \Delta t S/2)/(1 -
        \Delta t S/2)$, $S = -\mathrm i\,(c_x\sin\theta_x + c_y\sin\theta_y)
        /\Delta x$."""
        n = self.n
        tx = 2 * np.pi * np.fft.rfftfreq(n)
        ty = 2 * np.pi * np.fft.fftfreq(n)
        s = -1j * n * (c[0] * np.sin(tx)[None, :] + c[1] * np.sin(ty)[:, None])
        g = (1 + 0.5 * self.dt * s) / (1 - 0.5 * self.dt * s)
        uh = np.fft.rfft2(np.asarray(u0, dtype=np.float64))
        return np.fft.irfft2(uh * g**n_steps, s=self.shape)

    def sensor_index(self):
        idx = (np.arange(8) * self.n) // 8
        iy, ix = np.meshgrid(idx, idx, indexing="ij")
        return iy.ravel(), ix.ravel()

    def observations(self, n_steps: int) -> np.ndarray:
        every = max(1, n_steps // N_OBS)
        iy, ix = self.sensor_index()
        return np.stack(
            [self.exact_pde(k * every * self.dt)[iy, ix] for k in range(1, N_OBS + 1)]
        )


def rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# ---------------------------------------------------------------- implementations
def _cost_from_segments(run_segment, every, y, H):
    """J = sum_k ||H u(t_k) - y_k||^2 with ``run_segment(u, c, every) -> u``."""
    import jax.numpy as jnp
    from jax import lax

    def cost(u0, c):
        def body(u, _):
            u = run_segment(u, c, every)
            return u, H(u)

        _, hs = lax.scan(body, u0, None, length=y.shape[0])
        return jnp.sum((hs - y) ** 2)

    return cost


def _dphys_fns(p: P3, steps, grad_steps, y, H, *, fast_forward, fields=None):
    """dphys on P3; ``fields`` is None (scalar velocity, FFT) or a Krylov method."""
    import jax.numpy as jnp

    import dphys
    import pdes

    grid = dphys.Grid(p.shape, lengths=1.0, boundary="periodic")
    if fields:
        # lineax's GMRES completes a whole restart cycle before it tests convergence,
        # so a short cycle is much cheaper than the default 40 (BiCGStab, cheaper
        # still per iteration, breaks down on this skew operator at Courant > 1).
        solver = dphys.Krylov(method=fields, restart=10)
        stepper = dphys.CrankNicolson(solver=solver)
    else:
        stepper = dphys.CrankNicolson()
    every = max(1, grad_steps // N_OBS)

    def model(c):
        vy, vx = c[1], c[0]  # array-axis order: (v_y, v_x)
        if fields:
            vy, vx = jnp.full(p.shape, vy), jnp.full(p.shape, vx)
        return pdes.Advection(grid, (vy, vx))

    def forward(u0, c):
        traj = dphys.simulate(
            model(c), stepper, u0, dt=p.dt, n_steps=steps, fast_forward=fast_forward
        )
        return traj.final

    def cost(u0, c):
        traj = dphys.simulate(
            model(c),
            stepper,
            u0,
            dt=p.dt,
            n_steps=every * N_OBS,
            saveat=dphys.SaveAt(t1=False, every=every, fn=lambda t, u: H(u)),
            fast_forward=fast_forward,
        )
        return jnp.sum((traj.ys - y) ** 2)

    notes = {
        "solver": f"Krylov({fields}, restart=10, jacobi)" if fields else "Auto -> FFT",
        "fast_forward": fast_forward,
        "adjoint": "Checkpointed(levels=2)",
        "stepper": "CrankNicolson",
    }
    return forward, cost, notes


def _stencil(p: P3):
    """-c . grad u with second-order central differences (jnp.roll, independent)."""
    import jax.numpy as jnp

    inv2dx = p.n / 2.0

    def lop(u, c):
        dudx = (jnp.roll(u, -1, 1) - jnp.roll(u, 1, 1)) * inv2dx
        dudy = (jnp.roll(u, -1, 0) - jnp.roll(u, 1, 0)) * inv2dx
        return -(c[0] * dudx + c[1] * dudy)

    return lop


def _scan(step, u, n):
    from jax import lax

    return lax.scan(lambda v, _: (step(v), None), u, None, length=n)[0]


def _bicgstab_fns(p: P3, steps, grad_steps, y, H, tol=1e-10):
    from jax.scipy.sparse.linalg import bicgstab

    lop = _stencil(p)
    half = 0.5 * p.dt

    def step_fn(c):
        def matvec(v):
            return v - half * lop(v, c)

        def step(u):
            x, _ = bicgstab(matvec, u + half * lop(u, c), x0=u, tol=tol, maxiter=1000)
            return x

        return step

    forward = lambda u0, c: _scan(step_fn(c), u0, steps)
    every = max(1, grad_steps // N_OBS)
    cost = _cost_from_segments(lambda u, c, m: _scan(step_fn(c), u, m), every, y, H)
    notes = {"tol": tol, "x0": "previous state", "grad": "jax.grad through lax.scan"}
    return forward, cost, notes


def _exponax_fns(p: P3, steps, grad_steps, y, H):
    import exponax
    import jax.numpy as jnp

    def step_fn(c):
        stepper = exponax.stepper.Advection(
            2,
            1.0,
            p.n,
            p.dt,
            velocity=jnp.stack([c[1], c[0]]),  # array-axis order
        )
        return lambda u: stepper(u[None])[0]

    forward = lambda u0, c: _scan(step_fn(c), u0, steps)
    every = max(1, grad_steps // N_OBS)
    cost = _cost_from_segments(lambda u, c, m: _scan(step_fn(c), u, m), every, y, H)
    notes = {"scheme": "ETDRK0: exact exponential of the spectral derivative"}
    return forward, cost, notes


def _diffrax_fns(p: P3, steps):
    import diffrax
    import lineax as lx
    import optimistix as optx

    # Crank-Nicolson as a two-stage ESDIRK (explicit first stage): diffrax has none.
    cn_tableau = diffrax.ButcherTableau(
        c=np.array([1.0]),
        b_sol=np.array([0.5, 0.5]),
        b_error=np.array([0.5, -0.5]),
        a_lower=(np.array([0.5]),),
        a_diagonal=np.array([0.0, 0.5]),
        a_predictor=(np.array([1.0]),),
    )

    newton = optx.Newton(
        rtol=1e-8, atol=1e-8, linear_solver=lx.GMRES(rtol=1e-10, atol=1e-10, restart=40)
    )

    class CrankNicolsonESDIRK(diffrax.AbstractESDIRK):
        tableau: ClassVar = cn_tableau
        interpolation_cls: ClassVar = (
            diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
        )
        root_finder: optx.AbstractRootFinder = newton
        root_find_max_steps: int = 10

        def order(self, terms):
            return 2

    lop = _stencil(p)
    solver = CrankNicolsonESDIRK()
    term = diffrax.ODETerm(lambda t, u, c: lop(u, c))

    def forward(u0, c):
        return diffrax.diffeqsolve(
            term,
            solver,
            t0=0.0,
            t1=steps * p.dt,
            dt0=p.dt,
            y0=u0,
            args=c,
            saveat=diffrax.SaveAt(t1=True),
            stepsize_controller=diffrax.ConstantStepSize(),
            max_steps=steps + 1,
        ).ys[0]

    notes = {
        "solver": "ESDIRK trapezoid (Crank-Nicolson), optimistix.Newton(1e-8)",
        "linear_solver": "lineax.GMRES(rtol=atol=1e-10, restart=40)",
        "grad_skip": "reverse pass: a dense Jacobian LU per stage (BENCHMARKS.md)",
    }
    return forward, notes


# --------------------------------------------------------------------------- driver
def _log(msg: str) -> None:
    print(f"[bench P3 {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _device() -> str:
    import jax

    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', '')}"


def run_p3(
    quick: bool, *, n: int = 256, repeats: int | None = None, slow_s: float = 20.0
) -> list[dict[str, Any]]:
    """Run P3 (and its gradient) for dphys and the peers; return one row each.

    Args:
        quick: keep the run to a few minutes on a 2-core CPU: 3 repeats; the Krylov
            implementations (dphys-krylov, jax-bicgstab) at 50 steps and diffrax at
            10, extrapolated per step to 200 (``extrapolated_from_steps``).
        n: grid points per axis (256 in BENCHMARKS.md; smaller for smoke tests).
        repeats: timed calls per function after one warm-up (default 3 quick, 5).
        slow_s: a function slower than this is timed once.

    Returns:
        One dict per implementation with the keys of BENCHMARKS.md 'Running and
        output' (``problem, impl, n, steps, dtype, device, forward_s, grad_s,
        grad_ratio, compile_s, mem_mb, error``) plus checks and notes, then a
        ``{"problem": "P3", "impl": "summary", ...}`` row with dphys's speed-ups
        over the fastest peer.
    """
    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    repeats = (3 if quick else 5) if repeats is None else repeats
    p = P3(n=n)
    full = p.steps
    slow_steps = 50 if quick else full
    diffrax_steps = 10 if quick else 50
    iy, ix = (jnp.asarray(i) for i in p.sensor_index())
    H = lambda u: u[iy, ix]

    u0 = jnp.asarray(p.u0())
    c_true = jnp.asarray(C_TRUE)
    u0_eval = jnp.asarray(p.u0() + p.perturbation())
    c_eval = 1.5 * c_true
    y_cache = {}

    def obs(grad_steps):
        if grad_steps not in y_cache:
            y_cache[grad_steps] = jnp.asarray(p.observations(grad_steps))
        return y_cache[grad_steps]

    _log(f"limits at {p.shape}")
    limits = _measure.measure_limits(p.shape, "float64", repeats)

    specs = []  # (name, steps, grad_steps, forward, cost, error_ref, notes)
    f, c, nt = _dphys_fns(p, full, full, obs(full), H, fast_forward=None)
    specs.append(("dphys", full, full, f, c, "discrete", nt))
    f, c, nt = _dphys_fns(p, full, full, obs(full), H, fast_forward=False)
    specs.append(("dphys-stepwise", full, full, f, c, "discrete", nt))
    f, c, nt = _dphys_fns(
        p,
        slow_steps,
        slow_steps,
        obs(slow_steps),
        H,
        fast_forward=False,
        fields="gmres",
    )
    specs.append(("dphys-krylov", slow_steps, slow_steps, f, c, "discrete", nt))
    f, c, nt = _bicgstab_fns(p, slow_steps, slow_steps, obs(slow_steps), H)
    specs.append(("jax-bicgstab", slow_steps, slow_steps, f, c, "discrete", nt))
    f, c, nt = _exponax_fns(p, full, full, obs(full), H)
    specs.append(("exponax", full, full, f, c, "pde", nt))
    f, nt = _diffrax_fns(p, diffrax_steps)
    specs.append(("diffrax", diffrax_steps, None, f, None, "discrete", nt))

    base = {
        "problem": "P3",
        "ndim": 2,
        "n": n,
        "steps": full,
        "dtype": "float64",
        "device": _device(),
    }
    rows: list[dict[str, Any]] = []
    jobs = []
    for name, steps, gsteps, fwd, cost, ref, notes in specs:
        _log(f"compiling {name}")
        fns = {}
        try:
            fns["forward"] = _measure.Compiled(fwd, (u0, c_true))
            if cost is not None:
                fns["cost"] = _measure.Compiled(cost, (u0_eval, c_eval))
                vg = jax.value_and_grad(cost, argnums=(0, 1))
                fns["grad"] = _measure.Compiled(vg, (u0_eval, c_eval))
        except Exception as err:  # noqa: BLE001 - a peer failing is a result
            rows.append(
                base
                | {"impl": name, "failed": f"{type(err).__name__}: {str(err)[:300]}"}
                | notes
            )
            continue
        jobs.append((name, steps, gsteps, cost, ref, notes, fns))

    # One warm-up call each (outside `interleaved`, so one failing implementation
    # becomes a row saying why instead of ending the run).
    kept = []
    for job in jobs:
        name, *_, notes, fns = job
        try:
            for label, fn in fns.items():
                _log(f"warm-up {name} {label}")
                fn.warm()
        except Exception as err:  # noqa: BLE001 - a failing run is a result
            msg = str(err).strip().splitlines()
            rows.append(
                base
                | {
                    "impl": name,
                    "failed": f"{type(err).__name__} in "
                    f"{label}: {' '.join(msg[-3:])[:300]}",
                }
                | notes
            )
            continue
        kept.append(job)
    jobs = kept
    all_fns = [fn for *_, fns in jobs for fn in fns.values()]
    _log(f"timing {len(all_fns)} functions, {repeats} rounds")
    # Round-robin repeats (as `_measure.interleaved`, warm-up already done): a burst
    # of load hits every implementation alike. Slow functions keep their one time.
    for _ in range(repeats):
        for fn in all_fns:
            if fn.first_s <= slow_s:
                fn.times.append(fn.call()[0])

    key = jax.random.key(1)
    direction = (
        jax.random.normal(key, p.shape, jnp.float64) * 0.1,
        jnp.asarray([0.3, -0.2]),
    )
    ref_grad = None
    for name, steps, gsteps, _cost, ref, notes, fns in jobs:
        row = dict(base, impl=name)
        fw = fns["forward"]
        scale = full / steps
        row["forward_s"] = fw.median * scale
        row["forward_min_s"] = fw.minimum * scale
        row["forward_repeats"] = _measure.n_repeats(fw)
        row["compile_s"] = fw.compile_s
        if steps < full:
            row["extrapolated_from_steps"] = steps
            row["measured_forward_s"] = fw.median
        out = np.asarray(fw.out)
        exact_discrete = p.exact_discrete(p.u0(), steps)
        exact_pde = p.exact_pde(steps * p.dt)
        row["error_ref"] = ref
        row["error"] = rel_l2(out, exact_discrete if ref == "discrete" else exact_pde)
        row["error_discrete"] = rel_l2(out, exact_discrete)
        row["error_pde"] = rel_l2(out, exact_pde)
        row["step_s"] = row["forward_s"] / full
        row["step_over_fft_pair"] = row["step_s"] / limits["fft_pair_s"]
        row["step_over_axpy"] = row["step_s"] / limits["axpy_s"]
        if "grad" in fns:
            g, cst = fns["grad"], fns["cost"]
            gscale = full / gsteps
            row["grad_steps"] = gsteps
            row["grad_s"] = g.median * gscale
            row["grad_min_s"] = g.minimum * gscale
            row["cost_s"] = cst.median * gscale
            row["grad_ratio"] = g.median / cst.median
            row["grad_compile_s"] = g.compile_s
            row["grad_repeats"] = _measure.n_repeats(g)
            if gsteps < full:
                row["grad_extrapolated_from_steps"] = gsteps
                row["measured_grad_s"] = g.median
            if g.temp_bytes is not None:
                row["mem_mb"] = g.temp_bytes / _measure.MB
                row["mem_kind"] = "xla_temp_bytes of value_and_grad (excl. args, outs)"
            value, grads = g.out
            row["cost"] = float(value)
            row["cost_vs_value_relerr"] = abs(float(value) - float(cst.out)) / abs(
                float(value)
            )
            # Central difference of the cost along `direction` vs <grad, direction>.
            eps = 1e-5
            jc = cst.compiled
            plus = float(jc(u0_eval + eps * direction[0], c_eval + eps * direction[1]))
            minus = float(jc(u0_eval - eps * direction[0], c_eval - eps * direction[1]))
            fd = (plus - minus) / (2 * eps)
            ad = float(
                jnp.vdot(grads[0], direction[0]) + jnp.vdot(grads[1], direction[1])
            )
            row["grad_fd_relerr"] = abs(fd - ad) / max(abs(fd), abs(ad), 1e-300)
            if name == "dphys":
                ref_grad = grads
            elif ref_grad is not None and gsteps == full:
                num = math.sqrt(
                    float(jnp.sum((grads[0] - ref_grad[0]) ** 2))
                    + float(jnp.sum((grads[1] - ref_grad[1]) ** 2))
                )
                den = math.sqrt(
                    float(jnp.sum(ref_grad[0] ** 2)) + float(jnp.sum(ref_grad[1] ** 2))
                )
                row["grad_vs_dphys_relerr"] = num / den
        elif "grad_skip" in notes:
            row["grad_s"] = None
        for k, v in notes.items():
            row.setdefault(k, v)
        row["mem_mb"] = row.get("mem_mb")
        row["grad_s"] = row.get("grad_s")
        row["grad_ratio"] = row.get("grad_ratio")
        row["loadavg"] = os.getloadavg()[0]
        rows.append(row)

    rows.append(_summary(rows, limits))
    return rows


def _summary(rows, limits) -> dict[str, Any]:
    """dphys's speed-up over the fastest peer, forward and gradient."""
    ok = [r for r in rows if "failed" not in r]
    peers = [r for r in ok if not r["impl"].startswith("dphys")]
    out: dict[str, Any] = {
        "problem": "P3",
        "impl": "summary",
        "fft_pair_s": limits["fft_pair_s"],
        "axpy_s": limits["axpy_s"],
    }
    best_f = min(
        (r for r in peers if r.get("forward_s")),
        key=lambda r: r["forward_s"],
        default=None,
    )
    best_g = min(
        (r for r in peers if r.get("grad_s")), key=lambda r: r["grad_s"], default=None
    )
    if best_f:
        out["fastest_peer_forward"] = [best_f["impl"], best_f["forward_s"]]
    if best_g:
        out["fastest_peer_grad"] = [best_g["impl"], best_g["grad_s"]]
    for r in ok:
        if not r["impl"].startswith("dphys"):
            continue
        e = {
            "forward_s": r["forward_s"],
            "grad_s": r.get("grad_s"),
            "grad_ratio": r.get("grad_ratio"),
            "error": r["error"],
        }
        if best_f:
            e["forward_speedup"] = best_f["forward_s"] / r["forward_s"]
        if best_g and r.get("grad_s"):
            e["grad_speedup"] = best_g["grad_s"] / r["grad_s"]
        bicg = next((q for q in peers if q["impl"] == "jax-bicgstab"), None)
        if bicg is not None:
            e["forward_speedup_vs_bicgstab"] = bicg["forward_s"] / r["forward_s"]
            if bicg.get("grad_s") and r.get("grad_s"):
                e["grad_speedup_vs_bicgstab"] = bicg["grad_s"] / r["grad_s"]
        out[r["impl"]] = e
    return out


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(description="BENCHMARKS.md P3 (advection-2d)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    for row in run_p3(args.quick, n=args.n, repeats=args.repeats):
        clean = {
            k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in row.items()
        }
        print(json.dumps(clean, default=float), flush=True)


if __name__ == "__main__":
    main()
