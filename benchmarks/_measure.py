"""Timing, memory and limit measurements for ``benchmarks/run.py``.

Timing rules (BENCHMARKS.md): every function is compiled ahead of time
(``jax.jit(f).lower(...).compile()``), so ``compile_s`` is tracing plus XLA compilation
and nothing else; the steady-state time is the median (and minimum) of ``repeats`` calls
after one warm-up call, each ended by ``jax.block_until_ready``. The machine is shared
and noisy, so the repeats of all implementations of a problem are interleaved
round-robin: a burst of load hits every implementation alike and the ratios stay fair.
A call slower than ``slow_s`` is not repeated (its single time is reported, with
``repeats: 1``), which keeps peers that need tens of seconds per call within budget.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


MB = 2.0**20


class Compiled:
    """An ahead-of-time compiled function with its compile time and memory stats."""

    def __init__(self, fn: Callable, args: Sequence[Any]):
        t = time.perf_counter()
        self.compiled = jax.jit(fn).lower(*args).compile()
        self.compile_s = time.perf_counter() - t
        self.args = tuple(args)
        try:
            mem = self.compiled.memory_analysis()
            self.temp_bytes = int(mem.temp_size_in_bytes)
            self.arg_bytes = int(mem.argument_size_in_bytes)
            self.out_bytes = int(mem.output_size_in_bytes)
        except Exception:  # noqa: BLE001 - not every backend reports memory
            self.temp_bytes = self.arg_bytes = self.out_bytes = None
        self.times: list[float] = []
        self.first_s: float | None = None
        self.out = None

    def call(self):
        t = time.perf_counter()
        out = jax.block_until_ready(self.compiled(*self.args))
        return time.perf_counter() - t, out

    def warm(self):
        self.first_s, self.out = self.call()

    @property
    def median(self) -> float | None:
        if self.times:
            return statistics.median(self.times)
        return self.first_s

    @property
    def minimum(self) -> float | None:
        if self.times:
            return min(self.times)
        return self.first_s


def interleaved(jobs: Sequence[Compiled], repeats: int, slow_s: float) -> None:
    """Warm up every job once, then time ``repeats`` rounds of all jobs round-robin.

    A job whose warm-up call took more than ``slow_s`` keeps that single time.
    """
    for job in jobs:
        job.warm()
    for _ in range(repeats):
        for job in jobs:
            if job.first_s is not None and job.first_s > slow_s:
                continue
            dt, _ = job.call()
            job.times.append(dt)


def n_repeats(job: Compiled) -> int:
    return len(job.times) if job.times else 1


class RssSampler:
    """Peak resident-set size during a block, sampled every ``interval`` seconds.

    ``delta_mb`` is the sampled peak minus the RSS just before the block: the memory
    the block needed above the process baseline (large XLA buffers are mmapped and
    returned to the OS, so this sees them).
    """

    def __init__(self, interval: float = 0.002):
        import psutil

        self._proc = psutil.Process()
        self.interval = interval
        self.peak = 0
        self.base = 0
        self._stop = threading.Event()

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self):
        self.base = self._proc.memory_info().rss
        self.peak = self.base
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def delta_mb(self) -> float:
        return (self.peak - self.base) / MB


def rss_delta_mb(job: Compiled) -> float | None:
    """Peak RSS above baseline during one call of ``job`` (None without psutil)."""
    try:
        sampler = RssSampler()
    except ImportError:
        return None
    with sampler:
        job.call()
    return sampler.delta_mb


# -------------------------------------------------------------------------- limits
def limit_loops(shape: tuple[int, ...], dtype, steps: int) -> dict[str, Compiled]:
    """``steps`` FFT pairs and ``steps`` axpys in jitted loops, as compiled jobs.

    Timed in the same round-robin as the implementations of a problem, they give the
    limit for exactly that run: a periodic implicit step needs one FFT pair, a stencil
    step is bandwidth-bound (about one axpy of traffic).
    """
    axes = tuple(range(len(shape)))
    u = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype=dtype)

    def pairs(v):
        def pair(i, w):
            return jnp.fft.irfftn(jnp.fft.rfftn(w, axes=axes), s=shape, axes=axes)

        return lax.fori_loop(0, steps, pair, v)

    def axpys(x, y):
        a = jnp.asarray(1.0 + 1e-9, dtype=dtype)
        return lax.fori_loop(0, steps, lambda i, w: a * x + w, y)

    return {"fft_pairs": Compiled(pairs, (u,)), "axpys": Compiled(axpys, (u, u))}


def measure_limits(shape: tuple[int, ...], dtype, repeats: int) -> dict[str, Any]:
    """The machine's limits at one grid size (BENCHMARKS.md 'The limit').

    * ``fft_pair_s``: one ``rfftn`` + ``irfftn`` pair, per pair inside a jitted loop of
      ``loop`` pairs (what a stepping loop pays); ``fft_pair_call_s`` is one jitted call
      (dispatch included).
    * ``axpy_s`` and ``bandwidth_gbs``: ``a*x + y`` over a state-size array inside a
      jitted loop; 3 arrays of traffic per axpy.
    """
    axes = tuple(range(len(shape)))
    u = jnp.asarray(np.random.default_rng(0).standard_normal(shape), dtype=dtype)
    loop = 100

    def pair(v):
        return jnp.fft.irfftn(jnp.fft.rfftn(v, axes=axes), s=shape, axes=axes)

    def pairs(v):
        return lax.fori_loop(0, loop, lambda i, w: pair(w), v)

    def axpys(x, y):
        a = jnp.asarray(1.0 + 1e-9, dtype=dtype)
        return lax.fori_loop(0, loop, lambda i, w: a * x + w, y)

    jobs = {
        "pair": Compiled(pair, (u,)),
        "pairs": Compiled(pairs, (u,)),
        "axpys": Compiled(axpys, (u, u)),
    }
    interleaved(list(jobs.values()), max(repeats, 5), slow_s=10.0)
    nbytes = u.size * u.dtype.itemsize
    axpy_s = jobs["axpys"].median / loop
    return {
        "fft_pair_s": jobs["pairs"].median / loop,
        "fft_pair_min_s": jobs["pairs"].minimum / loop,
        "fft_pair_call_s": jobs["pair"].median,
        "axpy_s": axpy_s,
        "bandwidth_gbs": 3 * nbytes / axpy_s / 1e9,
        "state_mb": nbytes / MB,
    }
