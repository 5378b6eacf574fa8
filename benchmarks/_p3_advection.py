"""benchmarks/README.md P3: 2D periodic advection, Crank-Nicolson, central differences.

``run_p3(quick) -> list[dict]`` measures, in one run and interleaved round-robin:

* ``dphys``: ``pdes.Advection`` with constant velocity, :class:`dphys.Auto` (exact FFT
  solve) and the default fast-forward (the exact multi-step propagator $G_k^m$ between
  saves: one FFT pair per saved segment).
* ``dphys-stepwise``: the same, ``fast_forward=False`` (one FFT pair per step).
* ``dphys-krylov``: the same uniform flow passed as velocity *fields*, so every step
  is a GMRES(10) solve (``dphys.krylov_solve``) and its adjoint a transposed
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
  benchmarks/README.md), so no gradient is timed.

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

import os
import sys
from typing import Any, ClassVar


if __package__ in (None, ""):  # `python benchmarks/_p3_advection.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402

from . import _measure  # noqa: E402
from ._problems import rel_l2  # noqa: E402


_log = _measure.logger("bench P3")


GOLDEN = 0.6180339887
SILVER = 0.4142135624
N_OBS = 10
C_TRUE = (1.0, 0.5)  # (c_x, c_y), as in benchmarks/README.md


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


# ---------------------------------------------------------------- implementations
def _cost_from_segments(step_fn, every, y, H):
    """J = sum_k ||H u(t_k) - y_k||^2, ``every`` steps of ``step_fn(c)`` apart."""

    def cost(u0, c):
        return _measure.segment_misfit(step_fn(c), u0, every, H, y)

    return cost


def _dphys_fns(p: P3, steps, grad_steps, y, H, *, fast_forward, fields=None):
    """dphys on P3; ``fields`` is None (scalar velocity, FFT) or a Krylov method."""
    import jax.numpy as jnp

    import dphys
    import pdes

    grid = dphys.Grid(p.shape, lengths=1.0, boundary="periodic")
    if fields:
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
        "solver": f"Krylov({fields}, restart=10)" if fields else "Auto -> FFT",
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

    forward = lambda u0, c: _measure.scan_steps(step_fn(c), u0, steps)
    every = max(1, grad_steps // N_OBS)
    cost = _cost_from_segments(step_fn, every, y, H)
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

    forward = lambda u0, c: _measure.scan_steps(step_fn(c), u0, steps)
    every = max(1, grad_steps // N_OBS)
    cost = _cost_from_segments(step_fn, every, y, H)
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
        "grad_skip": (
            "reverse pass: a dense Jacobian LU per stage (benchmarks/README.md)"
        ),
    }
    return forward, notes


# --------------------------------------------------------------------------- driver
def run_p3(
    quick: bool,
    *,
    n: int = 256,
    repeats: int | None = None,
    slow_s: float = 20.0,
    only=None,
) -> list[dict[str, Any]]:
    """Run P3 (and its gradient) for dphys and the peers; return one row each.

    Args:
        quick: keep the run to a few minutes on a 2-core CPU: 3 repeats; the Krylov
            implementations (dphys-krylov, jax-bicgstab) at 50 steps and diffrax at
            10, extrapolated per step to 200 (``extrapolated_from_steps``).
        n: grid points per axis (256 in benchmarks/README.md; smaller for smoke tests).
        repeats: timed calls per function after one warm-up (default 3 quick, 5).
        slow_s: a function slower than this is timed once.
        only: names of the implementations to run (default all).

    Returns:
        One dict per implementation with the keys of benchmarks/README.md 'Running and
        output' (``problem, impl, n, steps, dtype, device, forward_s, grad_s,
        grad_ratio, compile_s, mem_mb, error``) plus checks and notes, and a
        ``limit`` row (the FFT pair and axpy timed in the same run).
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

    Spec = _measure.Spec
    specs = []
    f, c, nt = _dphys_fns(p, full, full, obs(full), H, fast_forward=None)
    specs.append(Spec("dphys", full, full, f, c, nt))
    f, c, nt = _dphys_fns(p, full, full, obs(full), H, fast_forward=False)
    specs.append(Spec("dphys-stepwise", full, full, f, c, nt))
    y_slow = obs(slow_steps)
    f, c, nt = _dphys_fns(
        p, slow_steps, slow_steps, y_slow, H, fast_forward=False, fields="gmres"
    )
    specs.append(Spec("dphys-krylov", slow_steps, slow_steps, f, c, nt))
    f, c, nt = _bicgstab_fns(p, slow_steps, slow_steps, obs(slow_steps), H)
    specs.append(Spec("jax-bicgstab", slow_steps, slow_steps, f, c, nt))
    missing = []
    if only is None or "exponax" in only:
        try:
            f, c, nt = _exponax_fns(p, full, full, obs(full), H)
            specs.append(Spec("exponax", full, full, f, c, nt, error_ref="pde"))
        except ImportError as err:
            # A peer that is not installed is a row saying so, not a failed run.
            why = f"{err}; pip install -e '.[bench]'"
            missing.append({"impl": "exponax", "skipped": why})
    f, nt = _diffrax_fns(p, diffrax_steps)
    specs.append(Spec("diffrax", diffrax_steps, None, f, None, nt))

    base = {
        "problem": "P3",
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
    rows[:0] = [base | row for row in missing]

    key = jax.random.key(1)
    direction = (
        jax.random.normal(key, p.shape, jnp.float64) * 0.1,
        jnp.asarray([0.3, -0.2]),
    )
    ref_grad = None
    for spec in specs:
        row = dict(base, impl=spec.name) | _measure.timing_fields(spec, full, limits)
        out = np.asarray(spec.fns["forward"].out)
        exact_discrete = p.exact_discrete(p.u0(), spec.steps)
        exact_pde = p.exact_pde(spec.steps * p.dt)
        row["error_ref"] = spec.error_ref
        exact = exact_discrete if spec.error_ref == "discrete" else exact_pde
        row["error"] = rel_l2(out, exact)
        row["error_discrete"] = rel_l2(out, exact_discrete)
        row["error_pde"] = rel_l2(out, exact_pde)
        if "grad" in spec.fns:
            same = spec.grad_steps == full and spec.name != "dphys"
            row |= _measure.grad_checks(
                spec, (u0_eval, c_eval), direction, ref_grad if same else None
            )
            if spec.name == "dphys":
                ref_grad = spec.fns["grad"].out[1]
        for k, v in spec.notes.items():
            row.setdefault(k, v)
        row["loadavg"] = os.getloadavg()[0]
        rows.append(row)
    if only is None or "memory" in only:
        # P5 on this problem: the gradient's memory at 250, 1000 and 4000 steps.
        y0 = jnp.zeros_like(obs(full))
        for label, ff in (("dphys", None), ("dphys-stepwise", False)):
            _log(f"P5 memory scaling: {label}")
            cost_at = lambda m, ff=ff: _dphys_fns(p, m, m, y0, H, fast_forward=ff)[1]
            row = _measure.memory_scaling("P5-P3", label, cost_at, (u0_eval, c_eval))
            rows.append(row | {"n": n, "device": base["device"]})
    return rows


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        description="benchmarks/README.md P3 (advection-2d)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    rows = run_p3(args.quick, n=args.n, repeats=args.repeats)
    rows.append({"summary": {"P3": _measure.problem_summary(rows)}})
    for row in rows:
        print(json.dumps(_measure.clean(row)), flush=True)


if __name__ == "__main__":
    main()
