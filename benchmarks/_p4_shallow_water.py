"""P4 of benchmarks/README.md: linear (and nonlinear) rotating shallow water, C-grid.

``run_p4(quick) -> list[dict]`` measures, in one run and interleaved round-robin, on
a doubly periodic 128x128 C-grid (dx = 10 km, g = 9.81 m/s^2, H = 1000 m,
f = 1e-4 1/s), 500 Crank-Nicolson steps of dt = 600 s (gravity-wave Courant number
sqrt(gH) dt / dx = 5.9 per axis), from a 1 m Gaussian bump of e-folding width 100 km
at rest:

* ``dphys``: ``pdes.ShallowWater`` (linear), :class:`dphys.Auto` -> exact FFT solve
  (one 3x3 system per Fourier mode) and the default fast-forward (the exact
  multi-step propagator $G_k^m$ between saves).
* ``dphys-stepwise``: the same, one FFT solve per step (``fast_forward=False``).
* ``dphys-krylov``: the same model stepped with ``pdes.HelmholtzKrylov`` (GMRES
  preconditioned by the exact non-rotating Helmholtz inverse, lineax IFT adjoint):
  the path a variable depth or a closed basin takes, like-for-like with the peer.
* ``jax-gmres``: ``jax.scipy.sparse.linalg.gmres`` per step on a matrix-free C-grid
  stencil written here with ``jnp.roll`` (independent of dphys), warm-started,
  ``tol=1e-10``, differentiated by plain ``jax.grad`` through the ``lax.scan``.
* ``dphys-nonlinear`` (row ``problem: "P4-nonlinear"``, ``impl: "dphys"``): the
  nonlinear model (vector-invariant momentum, centred flux) on the same grid and
  step, CN/AB2 (``dphys.IMEX``) with the FFT solve for the implicit part; its
  ``error`` is against a run of the same scheme with dt/4 (time discretisation
  error), ``error_vs_linear`` shows the size of the nonlinear terms.
* ``jax-gmres-nonlinear`` (``P4-nonlinear``, ``impl: "jax-gmres"``): its peer, the
  same model tendencies and CN/AB2 formula with ``jax.scipy`` GMRES per step and
  ``jax.grad`` through the loop.

The gradient is that of $J(\\eta_0, g) = \\sum_{k=1}^{10}\\|H\\eta(t_k) - y_k\\|^2$ (an
8x8 lattice of sensors, observations every ``steps/10`` steps, $y_k$ from the exact
discrete solution with the true $g$), with respect to the initial elevation and $g$,
at a perturbed $\\eta_0$ and $g = 1.2\\,g_\\mathrm{true}$.

Every row checks its answer: ``error`` is the relative L2 error, in the energy norm
$(\\sqrt g\\,\\eta, \\sqrt H u, \\sqrt H v)$, against the exact solution of the discrete
scheme (per Fourier mode, $G_k^n$ with the $3\\times3$ C-grid symbol written here in
NumPy); ``mass_rel_change`` and ``energy_rel_change`` are the changes of
$\\sum\\eta$ (relative to $\\sum|\\eta_0|$) and of the energy over the run. Gradients
are checked by a central difference along a random direction (``grad_fd_relerr``)
and against dphys's (``grad_vs_dphys_relerr``).

dinosaur (an optional peer in benchmarks/README.md) solves shallow water on the
sphere with spherical harmonics; it has no planar doubly periodic C-grid, so it is
not run here.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any


if __package__ in (None, ""):  # `python benchmarks/_p4_shallow_water.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"

import numpy as np  # noqa: E402

from . import _measure  # noqa: E402
from ._problems import rel_l2  # noqa: E402


_log = _measure.logger("bench P4")


N_OBS = 10


class P4:
    """P4's data in NumPy: grid, initial state, exact discrete solution, sensors."""

    def __init__(self, n: int = 128, steps: int = 500):
        self.n, self.steps = n, steps
        self.d, self.g, self.depth, self.f, self.dt = 10e3, 9.81, 1000.0, 1e-4, 600.0
        self.width = 100e3
        self.length = n * self.d
        axis = np.arange(n) * self.d  # dphys's periodic nodes x_i = i dx
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")

    @property
    def shape(self):
        return (self.n, self.n)

    def eta0(self) -> np.ndarray:
        c = self.length / 2
        return np.exp(-((self.x - c) ** 2 + (self.y - c) ** 2) / self.width**2)

    def perturbation(self) -> np.ndarray:
        c = self.length / 2
        r2 = (self.x - 0.6 * self.length) ** 2 + (self.y - c) ** 2
        return 0.3 * np.exp(-r2 / (0.5 * self.width) ** 2)

    def symbol(self, g: float) -> np.ndarray:
        """The C-grid symbol on ``rfft2`` modes, ``(ny, nx//2+1, 3, 3)``, index basis.

        Derived from the stencils (eta at centres, u on east faces, v on north faces):
        a forward difference is $(e^{ikd}-1)/d$, a backward one $(1-e^{-ikd})/d$, the
        four-point Coriolis averages $\\frac14(1+e^{\\pm ikd})(1+e^{\\mp ild})$.
        """
        d, h, f = self.d, self.depth, self.f
        ky = 2 * np.pi * np.fft.fftfreq(self.n, d)[:, None]
        kx = 2 * np.pi * np.fft.rfftfreq(self.n, d)[None, :]
        ex, ey = np.exp(1j * kx * d), np.exp(1j * ky * d)
        fwd_x, fwd_y = (ex - 1) / d, (ey - 1) / d
        bwd_x, bwd_y = (1 - 1 / ex) / d, (1 - 1 / ey) / d
        v_to_u = 0.25 * (1 + ex) * (1 + 1 / ey)
        u_to_v = 0.25 * (1 + 1 / ex) * (1 + ey)
        zero = np.zeros(np.broadcast(kx, ky).shape, complex)
        s = np.empty(zero.shape + (3, 3), complex)
        s[..., 0, 0], s[..., 0, 1], s[..., 0, 2] = zero, -h * bwd_x, -h * bwd_y
        s[..., 1, 0], s[..., 1, 1], s[..., 1, 2] = -g * fwd_x, zero, f * v_to_u
        s[..., 2, 0], s[..., 2, 1], s[..., 2, 2] = -g * fwd_y, -f * u_to_v, zero
        return s

    def exact_discrete(self, eta0, n_steps: int, g: float | None = None, dt=None):
        """``n_steps`` Crank-Nicolson steps, exactly: $G_k^n$ per Fourier mode."""
        g = self.g if g is None else g
        s = self.symbol(g)
        eye = np.eye(3)
        half = 0.5 * (self.dt if dt is None else dt)
        amp = np.linalg.solve(eye - half * s, eye + half * s)
        amp_n = np.linalg.matrix_power(amp, n_steps)
        hats = np.stack(
            [
                np.fft.rfft2(eta0),
                np.zeros_like(s[..., 0, 0]),
                np.zeros_like(s[..., 0, 0]),
            ],
            axis=-1,
        )
        out = np.einsum("...ab,...b->...a", amp_n, hats)
        return tuple(np.fft.irfft2(out[..., c], s=self.shape) for c in range(3))

    def sensor_index(self):
        idx = np.arange(self.n // 16, self.n, self.n // 8)
        return np.meshgrid(idx, idx, indexing="ij")

    def observations(self, n_steps: int) -> np.ndarray:
        every = n_steps // N_OBS
        iy, ix = self.sensor_index()
        eta0 = self.eta0()
        return np.stack(
            [
                self.exact_discrete(eta0, k * every)[0][iy, ix]
                for k in range(1, N_OBS + 1)
            ]
        )

    def energy(self, state) -> float:
        eta, u, v = (np.asarray(a, np.float64) for a in state)
        return 0.5 * float(
            np.sum(self.g * eta**2 + self.depth * (u**2 + v**2)) * self.d**2
        )

    def energy_norm_error(self, state, exact) -> float:
        w = (math.sqrt(self.g), math.sqrt(self.depth), math.sqrt(self.depth))
        num = sum(
            np.sum((wi * (np.asarray(a) - b)) ** 2)
            for wi, a, b in zip(w, state, exact, strict=True)
        )
        den = sum(np.sum((wi * b) ** 2) for wi, b in zip(w, exact, strict=True))
        return float(math.sqrt(num / den))


# ---------------------------------------------------------------- implementations
def _model(p: P4, g, nonlinear: bool):
    """P4's ``pdes.ShallowWater`` (vector-invariant momentum, centred flux)."""
    import dphys
    import pdes

    grid = dphys.Grid(p.shape, lengths=p.length, boundary="periodic")
    return pdes.ShallowWater(
        grid,
        p.depth,
        g=g,
        f0=p.f,
        nonlinear=nonlinear,
        momentum="vector_invariant",
        continuity="centered",
    )


def _dphys_fns(p: P4, steps, grad_steps, y, sensors, *, kind):
    """dphys on P4; ``kind`` in fft, stepwise, krylov, nonlinear."""
    import jax.numpy as jnp

    import dphys
    import pdes

    nonlinear = kind == "nonlinear"
    fast_forward = None if kind == "fft" else False
    if kind == "krylov":
        stepper = dphys.CrankNicolson(solver=pdes.HelmholtzKrylov())
    elif nonlinear:
        stepper = dphys.IMEX()
    else:
        stepper = dphys.CrankNicolson()
    every = max(1, grad_steps // N_OBS)

    def model(g):
        return _model(p, g, nonlinear)

    def state(eta0):
        zeros = jnp.zeros_like(eta0)
        return pdes.SWState(eta0, zeros, zeros)

    def run(eta0, g, n_steps, dt=p.dt):
        traj = dphys.simulate(
            model(g),
            stepper,
            state(eta0),
            dt=dt,
            n_steps=n_steps,
            fast_forward=fast_forward,
        )
        return traj.final.eta, traj.final.u, traj.final.v

    def forward(eta0, g):
        return run(eta0, g, steps)

    def cost(eta0, g):
        traj = dphys.simulate(
            model(g),
            stepper,
            state(eta0),
            dt=p.dt,
            n_steps=every * N_OBS,
            saveat=dphys.SaveAt(t1=False, every=every, fn=lambda t, s: s.eta[sensors]),
            fast_forward=fast_forward,
        )
        return jnp.sum((traj.ys - y) ** 2)

    notes = {
        "solver": {
            "fft": "Auto -> FFT (3x3 per mode)",
            "stepwise": "Auto -> FFT (3x3 per mode)",
            "krylov": "HelmholtzKrylov (GMRES(5), FFT Helmholtz preconditioner)",
            "nonlinear": "Auto -> FFT for the implicit part",
        }[kind],
        "fast_forward": kind == "fft",
        "adjoint": "Checkpointed(levels=2)",
        "stepper": "IMEX (CN/AB2)" if nonlinear else "CrankNicolson",
    }
    return forward, cost, run, notes


def _stencil(p: P4):
    """The linear C-grid operator with ``jnp.roll`` (independent of dphys)."""
    import jax.numpy as jnp

    d, h, f = p.d, p.depth, p.f
    roll = jnp.roll

    def lop(state, g):
        eta, u, v = state
        deta = -h * ((u - roll(u, 1, 1)) + (v - roll(v, 1, 0))) / d
        v_at_u = 0.25 * (
            v + roll(v, -1, 1) + roll(v, 1, 0) + roll(roll(v, -1, 1), 1, 0)
        )
        u_at_v = 0.25 * (
            u + roll(u, 1, 1) + roll(u, -1, 0) + roll(roll(u, 1, 1), -1, 0)
        )
        du = -g * (roll(eta, -1, 1) - eta) / d + f * v_at_u
        dv = -g * (roll(eta, -1, 0) - eta) / d - f * u_at_v
        return deta, du, dv

    return lop


def _gmres_fns(p: P4, steps, grad_steps, y, sensors, tol=1e-10):
    import jax.numpy as jnp
    from jax.scipy.sparse.linalg import gmres

    lop = _stencil(p)
    half = 0.5 * p.dt

    def step_fn(g):
        def matvec(x):
            return tuple(a - half * b for a, b in zip(x, lop(x, g), strict=True))

        def step(x):
            rhs = tuple(a + half * b for a, b in zip(x, lop(x, g), strict=True))
            new, _ = gmres(matvec, rhs, x0=x, tol=tol, atol=0.0, restart=20, maxiter=50)
            return new

        return step

    def start(eta0):
        zeros = jnp.zeros_like(eta0)
        return (eta0, zeros, zeros)

    forward = lambda eta0, g: _measure.scan_steps(step_fn(g), start(eta0), steps)
    every = max(1, grad_steps // N_OBS)

    def cost(eta0, g):
        observe = lambda x: x[0][sensors]
        return _measure.segment_misfit(step_fn(g), start(eta0), every, observe, y)

    notes = {
        "tol": tol,
        "restart": 20,
        "x0": "previous state",
        "grad": "jax.grad through lax.scan (custom_linear_solve: transposed GMRES)",
    }
    return forward, cost, notes


def _gmres_nonlinear_fns(p: P4, steps, grad_steps, y, sensors, tol=1e-10):
    """The nonlinear model's CN/AB2 step with ``jax.scipy`` GMRES on the implicit part.

    What a user with the model but without dphys's solvers would write: the same
    ``pdes.ShallowWater`` tendencies (``linear`` and ``explicit``), the same CNAB2
    formula as :class:`dphys.IMEX`, each implicit system solved by
    ``jax.scipy.sparse.linalg.gmres`` (warm-started) and differentiated by plain
    ``jax.grad`` through the ``lax.scan``.
    """
    import jax
    import jax.numpy as jnp
    from jax.scipy.sparse.linalg import gmres

    import pdes

    dt, half = p.dt, 0.5 * p.dt

    def step_fn(g):
        model = _model(p, g, nonlinear=True)

        def matvec(x):
            return jax.tree.map(lambda a, b: a - half * b, x, model.linear(0.0, x))

        def step(carry):
            x, n_prev = carry
            n_now = model.explicit(0.0, x)
            rhs = jax.tree.map(
                lambda a, lin, nn, npv: a + half * lin + dt * (1.5 * nn - 0.5 * npv),
                x,
                model.linear(0.0, x),
                n_now,
                n_prev,
            )
            new, _ = gmres(matvec, rhs, x0=x, tol=tol, atol=0.0, restart=20, maxiter=50)
            return new, n_now

        def start(eta0):
            zeros = jnp.zeros_like(eta0)
            x = pdes.SWState(eta0, zeros, zeros)
            return x, model.explicit(0.0, x)

        return step, start

    def forward(eta0, g):
        step, start = step_fn(g)
        x, _ = _measure.scan_steps(step, start(eta0), steps)
        return x.eta, x.u, x.v

    every = max(1, grad_steps // N_OBS)

    def cost(eta0, g):
        step, start = step_fn(g)
        observe = lambda carry: carry[0].eta[sensors]
        return _measure.segment_misfit(step, start(eta0), every, observe, y)

    notes = {
        "tol": tol,
        "restart": 20,
        "x0": "previous state",
        "scheme": "CN/AB2 as dphys.IMEX, pdes.ShallowWater's linear/explicit parts",
        "grad": "jax.grad through lax.scan (custom_linear_solve: transposed GMRES)",
    }
    return forward, cost, notes


def run_p4(
    quick: bool,
    *,
    n: int = 128,
    steps: int = 500,
    repeats: int | None = None,
    slow_s: float = 20.0,
    only=None,
) -> list[dict[str, Any]]:
    """Run P4 (and its gradient) for dphys and the peer; return one row each.

    Args:
        quick: keep the run to a few minutes on a 2-core CPU: 3 repeats; the
            per-step Krylov implementations (dphys-krylov, jax-gmres) at 50 steps,
            extrapolated per step to ``steps`` (``extrapolated_from_steps``).
        n: grid points per axis (128 in benchmarks/README.md; smaller for smoke tests).
        steps: time steps (500 in benchmarks/README.md).
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
    p = P4(n=n, steps=steps)
    full = p.steps
    slow_steps = max(N_OBS, min(full, 50 if quick else full))
    iy, ix = (jnp.asarray(i) for i in p.sensor_index())
    sensors = (iy, ix)

    eta0 = jnp.asarray(p.eta0())
    g_true = jnp.asarray(p.g)
    eta0_eval = jnp.asarray(p.eta0() + p.perturbation())
    g_eval = 1.2 * g_true
    y_cache = {}

    def obs(grad_steps):
        if grad_steps not in y_cache:
            y_cache[grad_steps] = jnp.asarray(p.observations(grad_steps))
        return y_cache[grad_steps]

    specs = []
    runs = {}
    for kind, name in (
        ("fft", "dphys"),
        ("stepwise", "dphys-stepwise"),
        ("nonlinear", "dphys-nonlinear"),
    ):
        f, c, r, nt = _dphys_fns(p, full, full, obs(full), sensors, kind=kind)
        specs.append(_measure.Spec(name, full, full, f, c, nt))
        runs[name] = r
    f, c, r, nt = _dphys_fns(
        p, slow_steps, slow_steps, obs(slow_steps), sensors, kind="krylov"
    )
    specs.append(_measure.Spec("dphys-krylov", slow_steps, slow_steps, f, c, nt))
    f, c, nt = _gmres_fns(p, slow_steps, slow_steps, obs(slow_steps), sensors)
    specs.append(_measure.Spec("jax-gmres", slow_steps, slow_steps, f, c, nt))
    f, c, nt = _gmres_nonlinear_fns(p, slow_steps, slow_steps, obs(slow_steps), sensors)
    specs.append(_measure.Spec("jax-gmres-nonlinear", slow_steps, slow_steps, f, c, nt))

    base = {
        "problem": "P4",
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

    nonlinear_refs = {}

    def nonlinear_ref(n_steps):
        """The nonlinear scheme's answer check: the same run with dt / 4."""
        if n_steps not in nonlinear_refs:
            _log(f"nonlinear reference run (dt / 4, {n_steps} steps)")
            run = jax.jit(
                lambda e, g: runs["dphys-nonlinear"](e, g, 4 * n_steps, p.dt / 4)
            )
            nonlinear_refs[n_steps] = [np.asarray(a) for a in run(eta0, g_true)]
        return nonlinear_refs[n_steps]

    ref_grads = {}

    def ref_grad(kind, grad_steps):
        """dphys's gradient of the same cost, as the peers' cross-check."""
        if (kind, grad_steps) not in ref_grads:
            *_, c, _, _ = _dphys_fns(
                p, grad_steps, grad_steps, obs(grad_steps), sensors, kind=kind
            )
            g = jax.jit(jax.grad(c, argnums=(0, 1)))(eta0_eval, g_eval)
            ref_grads[kind, grad_steps] = g
        return ref_grads[kind, grad_steps]

    key = jax.random.key(1)
    direction = (jax.random.normal(key, p.shape, jnp.float64) * 0.01, jnp.asarray(0.3))
    exact_cache = {}
    eta_init = p.eta0()
    e0 = p.energy((eta_init, 0 * eta_init, 0 * eta_init))
    for spec in specs:
        nonlinear = spec.name in NONLINEAR
        row = dict(base, impl=spec.name) | _measure.timing_fields(spec, full, limits)
        if nonlinear:
            row |= {"problem": "P4-nonlinear", "impl": NONLINEAR[spec.name]}
        out = [np.asarray(a) for a in spec.fns["forward"].out]
        if spec.steps not in exact_cache:
            exact_cache[spec.steps] = p.exact_discrete(eta_init, spec.steps)
        exact = exact_cache[spec.steps]
        if nonlinear:
            # No exact discrete solution: self-convergence against dt / 4. The same
            # measure for the linear scheme (exactly, per mode) shows how much of it
            # is Crank-Nicolson's phase error at Courant 5.9, not the nonlinearity.
            row["error_ref"] = "dphys nonlinear scheme, dt/4"
            row["error"] = p.energy_norm_error(out, nonlinear_ref(spec.steps))
            quarter = p.exact_discrete(eta_init, 4 * spec.steps, dt=p.dt / 4)
            row["linear_scheme_error_vs_dt4"] = p.energy_norm_error(exact, quarter)
            row["error_vs_linear"] = p.energy_norm_error(out, exact)
            row["energy_note"] = "energy_rel_change uses the linear energy"
        else:
            row["error_ref"] = "discrete"
            row["error"] = p.energy_norm_error(out, exact)
            row["error_eta"] = rel_l2(out[0], exact[0])
        row["mass_rel_change"] = abs(float(np.sum(out[0]) - np.sum(eta_init))) / float(
            np.sum(np.abs(eta_init))
        )
        row["energy_rel_change"] = p.energy(out) / e0 - 1.0
        if "grad" in spec.fns:
            ref = None
            if spec.name not in ("dphys", "dphys-nonlinear"):
                ref = ref_grad("nonlinear" if nonlinear else "fft", spec.grad_steps)
            row |= _measure.grad_checks(spec, (eta0_eval, g_eval), direction, ref)
        for k, v in spec.notes.items():
            row.setdefault(k, v)
        row["loadavg"] = os.getloadavg()[0]
        rows.append(row)
    if only is None or "memory" in only:
        # P5 on this problem: the gradient's memory at 250, 1000 and 4000 steps.
        y0 = jnp.zeros_like(obs(full))
        for kind, label in (
            ("fft", "dphys"),
            ("stepwise", "dphys-stepwise"),
            ("nonlinear", "dphys-nonlinear"),
        ):
            _log(f"P5 memory scaling: {label}")
            cost_at = lambda m, kind=kind: _dphys_fns(p, m, m, y0, sensors, kind=kind)[
                1
            ]
            row = _measure.memory_scaling("P5-P4", label, cost_at, (eta0_eval, g_eval))
            rows.append(row | {"n": n, "device": base["device"]})
    return rows


# The nonlinear model's rows form their own problem, so its peer is compared with it
# and not with the linear one: spec name -> impl name in "P4-nonlinear".
NONLINEAR = {"dphys-nonlinear": "dphys", "jax-gmres-nonlinear": "jax-gmres"}
SUMMARY_KEYS = ("mass_rel_change", "energy_rel_change")


def main(argv=None) -> None:
    import argparse
    import json

    parser = argparse.ArgumentParser(
        description="benchmarks/README.md P4 (shallow-water-2d)"
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    rows = run_p4(args.quick, n=args.n, steps=args.steps, repeats=args.repeats)
    summary = {
        name: _measure.problem_summary(
            [r for r in rows if r.get("problem") == name], extra_keys=SUMMARY_KEYS
        )
        for name in ("P4", "P4-nonlinear")
    }
    rows.append({"summary": summary})
    for row in rows:
        print(json.dumps(_measure.clean(row)), flush=True)


if __name__ == "__main__":
    main()
