"""Reverse mode through periodic shifts: ``jnp.roll`` vs ``dphys.operators.roll``.

Usage::

    python benchmarks/roll_vjp.py [--n 128] [--repeats 7]

Times, in one interleaved run (float64, CPU or GPU unchanged), 100 evaluations of the
nonlinear C-grid shallow-water tendency (``pdes.ShallowWater(nonlinear=True)
.explicit``) and 100 of its vector-Jacobian product (forward included), once with the
model's shifts written with ``jnp.roll`` and once with ``dphys.operators.roll``
(the default), and prints one JSON line per variant with the VJP/forward ratio.
Both variants' VJPs are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    __package__ = "benchmarks"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)

    import jax

    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    import dphys
    import pdes
    import pdes._cgrid as cgrid

    from . import _measure

    n = args.n
    grid = dphys.Grid((n, n), lengths=n * 10e3, boundary="periodic")
    model = pdes.ShallowWater(grid, 1000.0, g=9.81, f0=1e-4, nonlinear=True)
    keys = jax.random.split(jax.random.key(0), 3)
    state = pdes.SWState(*(0.1 * jax.random.normal(k, (n, n)) for k in keys))

    def tendency(s):
        return model.explicit(0.0, s)

    def vjp(s):
        y, pullback = jax.vjp(tendency, s)
        return pullback(y)[0]

    def loop(fn):
        def body(i, s):
            return jax.tree.map(lambda a, b: a + 1e-9 * b, s, fn(s))

        return lambda s: jax.lax.fori_loop(0, 100, body, s)

    shifts = {
        "jnp.roll": lambda a, k, ax: jnp.roll(a, k, axis=ax),
        "dphys.operators.roll": dphys.operators.roll,
    }
    saved = cgrid.fwd, cgrid.bwd
    jobs, checks = {}, {}
    try:
        for name, shift in shifts.items():
            # The model's stencils read these two helpers when traced.
            cgrid.fwd = lambda a, ax, shift=shift: shift(a, -1, ax)
            cgrid.bwd = lambda a, ax, shift=shift: shift(a, 1, ax)
            jobs[name] = (
                _measure.Compiled(loop(tendency), (state,)),
                _measure.Compiled(loop(vjp), (state,)),
            )
            checks[name] = jax.jit(vjp)(state)
    finally:
        cgrid.fwd, cgrid.bwd = saved
    _measure.interleaved([j for pair in jobs.values() for j in pair], args.repeats, 20)
    a, b = (jax.tree.leaves(c) for c in checks.values())
    agree = max(
        float(jnp.max(jnp.abs(x - y)) / jnp.max(jnp.abs(y)))
        for x, y in zip(a, b, strict=True)
    )
    dev = jax.devices()[0]
    for name, (fwd, back) in jobs.items():
        row = {
            "benchmark": "roll_vjp",
            "shift": name,
            "n": n,
            "device": f"{dev.platform}:{getattr(dev, 'device_kind', '')}",
            "tendency_s": fwd.median / 100,
            "vjp_s": back.median / 100,
            "vjp_over_tendency": back.median / fwd.median,
            "vjp_over_tendency_min": back.minimum / fwd.minimum,
            "vjp_rel_diff_between_variants": agree,
            "loadavg": os.getloadavg()[0],
        }
        print(json.dumps(_measure.clean(row)), flush=True)


if __name__ == "__main__":
    main()
