"""Pieces of the FFT path's reverse mode, each timed with and without its remedy.

Usage::

    python benchmarks/fft_reverse_parts.py [--repeats 7]

Prints one JSON line per measurement (float64, min of ``--repeats`` calls after a
warm-up, the variants of one measurement interleaved):

* ``inverse``: the 3x3 per-mode propagator $G^{50}$ of P4's linear shallow-water
  symbol (128², CN, dt = 600 s) and its gradient with respect to g, with the per-mode
  inverse differentiated by its hand-written JVP (``jvp``) and by automatic
  differentiation through the adjugate formula (``adjugate``).
* ``imex_step``: one IMEX step of P4's nonlinear model, from the factored stepper
  state (per-mode inverse built in ``init``) and from the raw symbol (inverse built
  in the step), forward and VJP.
* ``accumulate``: a ``lax.scan`` of 200 steps of rfft2, per-mode multiply by a
  loop-invariant complex array, irfft2 (256²): ``value_and_grad`` with respect to
  the initial state only and to the per-mode array, with every step stored
  (``levels=1``) and with two-level checkpointing (``levels=2``); the difference per
  step is the cost of accumulating the array's cotangent.
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


def _timed(fns: dict, args: dict, repeats: int) -> dict:
    import jax

    for name, fn in fns.items():
        jax.block_until_ready(fn(*args[name]))
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args[name]))
            times[name].append(time.perf_counter() - t0)
    return {f"{name}_ms": 1e3 * min(ts) for name, ts in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import dphys
    import pdes
    from dphys._adjoint import nested_scan
    from dphys._solver import _fft as ls

    from . import _p4_shallow_water as p4

    def emit(row):
        row["device"] = jax.devices()[0].platform
        row["loadavg"] = os.getloadavg()[0]
        print(json.dumps(row), flush=True)

    p = p4.P4()
    eta = jnp.asarray(p.eta0())
    like = pdes.SWState(eta, eta, eta)
    g0 = jnp.asarray(p.g)
    w = jax.random.normal(jax.random.key(0), (3, 3, p.n, p.n // 2 + 1))

    # --- the per-mode inverse: hand-written JVP vs AD through the adjugate
    def propagator(g, inv):
        s = dphys.probe_symbol(p4._model(p, g, False), 0.0, like)
        a = inv(ls._mode_eye(s) - 0.5 * p.dt * s)
        return ls._mode_power(2.0 * a - ls._mode_eye(s), 50)

    fns, fargs = {}, {}
    for name, inv in (("jvp", ls._mode_inv), ("adjugate", ls._mode_inv.fun)):
        f = lambda g, inv=inv: jnp.sum(w * jnp.real(propagator(g, inv)))
        fns[f"{name}_forward"] = jax.jit(f)
        fns[f"{name}_grad"] = jax.jit(jax.grad(f))
        fargs[f"{name}_forward"] = fargs[f"{name}_grad"] = (g0,)
    emit(
        {"part": "inverse", "what": "G^50 of the 3x3 symbol, d/dg"}
        | _timed(fns, fargs, args.repeats)
    )

    # --- one IMEX step: factored stepper state vs raw symbol
    model = p4._model(p, g0, True)
    keys = jax.random.split(jax.random.key(1), 3)
    state = pdes.SWState(
        eta, *(0.1 * jax.random.normal(k, eta.shape) for k in keys[:2])
    )
    ct = pdes.SWState(*(jax.random.normal(k, eta.shape) for k in keys))
    stepper = dphys.IMEX()
    factored = stepper.init(model, 0.0, p.dt, state)
    solve = factored[0]
    raw = (dphys.LinearSolveState(solve.solver, solve.structure.symbol), factored[1])

    def step(s, ss):
        return stepper.step(model, 0.0, p.dt, s, ss)[0]

    fns, fargs = {}, {}
    for name, ss in (("factored", factored), ("raw", raw)):
        fns[f"{name}_forward"] = jax.jit(step)
        fns[f"{name}_vjp"] = jax.jit(
            lambda s, ss, c: jax.vjp(lambda s, ss: step(s, ss), s, ss)[1](c)
        )
        fargs[f"{name}_forward"] = (state, ss)
        fargs[f"{name}_vjp"] = (state, ss, ct)
    emit(
        {"part": "imex_step", "what": "P4 nonlinear, 128^2"}
        | _timed(fns, fargs, args.repeats)
    )

    # --- accumulating the cotangent of a loop-invariant per-mode array
    n, steps = 256, 200
    k1, k2, k3 = jax.random.split(jax.random.key(2), 3)
    mult = 0.3 * (
        jax.random.normal(k1, (n, n // 2 + 1))
        + 1j * jax.random.normal(k2, (n, n // 2 + 1))
    )
    x0 = jax.random.normal(k3, (n, n))

    def run(x, m, levels):
        body = lambda x: (jnp.fft.irfft2(m * jnp.fft.rfft2(x), s=(n, n)), None)
        final, _ = nested_scan(body, x, steps, levels)
        return jnp.sum(final[:10, :10] ** 2)

    fns, fargs = {}, {}
    for levels in (1, 2):
        f = lambda x, m, levels=levels: run(x, m, levels)
        fns[f"L{levels}_state"] = jax.jit(jax.value_and_grad(f, argnums=0))
        fns[f"L{levels}_array"] = jax.jit(jax.value_and_grad(f, argnums=1))
        fargs[f"L{levels}_state"] = fargs[f"L{levels}_array"] = (x0, mult)
    row = {"part": "accumulate", "what": f"{steps} FFT steps at {n}^2"}
    row |= _timed(fns, fargs, args.repeats)
    for levels in (1, 2):
        extra = row[f"L{levels}_array_ms"] - row[f"L{levels}_state_ms"]
        row[f"L{levels}_extra_per_step_ms"] = extra / steps
    emit(row)


if __name__ == "__main__":
    main()
