"""Timing, memory and limit measurements for ``benchmarks/run.py``.

Timing rules (benchmarks/README.md): every function is compiled ahead of time
(``jax.jit(f).lower(...).compile()``), so ``compile_s`` is tracing plus XLA compilation
and nothing else; the steady-state time is the median (and minimum) of ``repeats`` calls
after one warm-up call, each ended by ``jax.block_until_ready``. The machine is shared
and noisy, so the repeats of all implementations of a problem are interleaved
round-robin: a burst of load hits every implementation alike and the ratios stay fair.
A call slower than ``slow_s`` is not repeated (its single time is reported, with
``repeats: 1``), which keeps peers that need tens of seconds per call within budget.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import sys
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
    """The machine's limits at one grid size (benchmarks/README.md 'The limit').

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


# ------------------------------------------------- shared driver of P3/P4-style suites
@dataclasses.dataclass
class Spec:
    """One implementation of a problem: what to compile, at how many steps.

    ``forward(x0, p)`` runs ``steps`` steps; ``cost(x0, p)`` is the P5-style cost over
    ``grad_steps`` steps (``None``: no gradient timed, say why in ``notes``). Slow
    implementations run fewer steps than the problem's and are extrapolated per step.
    """

    name: str
    steps: int
    grad_steps: int | None
    forward: Callable
    cost: Callable | None
    notes: dict[str, Any]
    error_ref: str = "discrete"
    fns: dict[str, Compiled] = dataclasses.field(default_factory=dict)


def measure_specs(
    specs: Sequence[Spec],
    fwd_args: Sequence[Any],
    cost_args: Sequence[Any],
    *,
    base: dict[str, Any],
    repeats: int,
    slow_s: float,
    log: Callable[[str], None],
    only: Sequence[str] | None = None,
) -> tuple[list[Spec], list[dict[str, Any]], dict[str, Any]]:
    """Compile, warm up and time every spec round-robin with the machine's limits.

    The FFT-pair and axpy loops of :func:`limit_loops` (at the state's shape,
    ``base["steps"]`` long) join the same round-robin. A spec that fails to compile
    or to run becomes a row saying why (a failing peer is a result) instead of
    ending the run. ``only`` restricts the specs by name.

    Returns:
        The specs that ran, the rows so far (failures, then the ``limit`` row) and
        the limit row itself.
    """
    failed: list[dict[str, Any]] = []
    kept: list[Spec] = []
    for spec in specs:
        if only is not None and spec.name not in only:
            continue
        label = "compile"
        try:
            log(f"compiling {spec.name}")
            spec.fns["forward"] = Compiled(spec.forward, fwd_args)
            if spec.cost is not None:
                spec.fns["cost"] = Compiled(spec.cost, cost_args)
                vg = jax.value_and_grad(spec.cost, argnums=(0, 1))
                spec.fns["grad"] = Compiled(vg, cost_args)
            for label, fn in spec.fns.items():
                log(f"warm-up {spec.name} {label}")
                fn.warm()
        except Exception as err:  # noqa: BLE001 - a failing implementation is a result
            msg = " ".join(str(err).strip().splitlines()[-3:])[:300]
            why = f"{type(err).__name__} in {label}: {msg}"
            failed.append(base | {"impl": spec.name, "failed": why} | spec.notes)
            continue
        kept.append(spec)
    like = jax.tree.leaves(fwd_args[0])[0]
    limit_jobs = limit_loops(like.shape, like.dtype, base["steps"])
    for job in limit_jobs.values():
        job.warm()
    jobs = [fn for spec in kept for fn in spec.fns.values()]
    jobs += list(limit_jobs.values())
    log(f"timing {len(jobs)} functions, {repeats} rounds")
    # Round-robin repeats: a burst of load hits every implementation alike. Slow
    # functions keep their single warm-up time.
    for _ in range(repeats):
        for fn in jobs:
            if fn.first_s <= slow_s:
                fn.times.append(fn.call()[0])
    limits = limit_row(base, limit_jobs, base["steps"])
    return kept, failed + [limits], limits


def timing_fields(spec: Spec, full: int, limits: dict[str, float]) -> dict[str, Any]:
    """Forward/gradient times of ``spec`` scaled to ``full`` steps, ratios, memory."""
    row: dict[str, Any] = {}
    fw = spec.fns["forward"]
    scale = full / spec.steps
    row["forward_s"] = fw.median * scale
    row["forward_min_s"] = fw.minimum * scale
    row["forward_repeats"] = n_repeats(fw)
    row["compile_s"] = fw.compile_s
    if spec.steps < full:
        row["extrapolated_from_steps"] = spec.steps
        row["measured_forward_s"] = fw.median
    row["step_s"] = row["forward_s"] / full
    row["step_over_fft_pair"] = row["step_s"] / limits["fft_pair_s"]
    row["step_over_axpy"] = row["step_s"] / limits["axpy_s"]
    row["grad_s"] = row["grad_ratio"] = row["mem_mb"] = None
    if "grad" in spec.fns:
        g, cst = spec.fns["grad"], spec.fns["cost"]
        gscale = full / spec.grad_steps
        row["grad_steps"] = spec.grad_steps
        row["grad_s"] = g.median * gscale
        row["grad_min_s"] = g.minimum * gscale
        row["cost_s"] = cst.median * gscale
        row["grad_ratio"] = g.median / cst.median
        row["grad_ratio_min"] = g.minimum / cst.minimum
        row["grad_compile_s"] = g.compile_s
        row["grad_repeats"] = n_repeats(g)
        if spec.grad_steps < full:
            row["grad_extrapolated_from_steps"] = spec.grad_steps
            row["measured_grad_s"] = g.median
        if g.temp_bytes is not None:
            row["mem_mb"] = g.temp_bytes / MB
            row["mem_kind"] = "xla_temp_bytes of value_and_grad (excl. args, outs)"
        value = float(g.out[0])
        row["cost"] = value
        row["cost_vs_value_relerr"] = abs(value - float(cst.out)) / abs(value)
    return row


def _vdot(a, b) -> float:
    leaves = zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    return float(sum(jnp.vdot(x, y) for x, y in leaves))


def grad_checks(
    spec: Spec, cost_args, direction, reference=None, eps: float = 1e-5
) -> dict[str, float]:
    """Central difference of the cost along ``direction`` vs <grad, direction>, and
    the gradient's relative difference to ``reference`` (another implementation's).
    """
    grads = spec.fns["grad"].out[1]
    cost = spec.fns["cost"].compiled
    plus = jax.tree.map(lambda a, d: a + eps * d, tuple(cost_args), tuple(direction))
    minus = jax.tree.map(lambda a, d: a - eps * d, tuple(cost_args), tuple(direction))
    fd = (float(cost(*plus)) - float(cost(*minus))) / (2 * eps)
    ad = _vdot(grads, tuple(direction))
    out = {"grad_fd_relerr": abs(fd - ad) / max(abs(fd), abs(ad), 1e-300)}
    if reference is not None:
        diff = jax.tree.map(lambda a, b: a - b, grads, reference)
        out["grad_vs_dphys_relerr"] = math.sqrt(_vdot(diff, diff)) / math.sqrt(
            _vdot(reference, reference)
        )
    return out


def problem_summary(
    rows: Sequence[dict[str, Any]],
    *,
    target_speedup: float | None = None,
    target_grad_ratio: float | None = None,
    extra_keys: Sequence[str] = (),
) -> dict[str, Any]:
    """dphys's speed-ups over the fastest peer of one problem, and targets met.

    Peers are the rows whose ``impl`` does not start with ``dphys`` and that ran
    (no ``failed``/``skipped``) and are comparable; the targets are checked on the
    headline implementation, ``dphys``.
    """
    ok = [
        r
        for r in rows
        if not r.get("failed")
        and not r.get("skipped")
        and r.get("impl") not in ("limit", "summary")
    ]
    peers = [
        r
        for r in ok
        if not r["impl"].startswith("dphys") and r.get("comparable", True) is not False
    ]
    s: dict[str, Any] = {}
    best_f = min(
        (r for r in peers if r.get("forward_s")),
        key=lambda r: r["forward_s"],
        default=None,
    )
    best_g = min(
        (r for r in peers if r.get("grad_s")), key=lambda r: r["grad_s"], default=None
    )
    if best_f:
        s["fastest_peer_forward"] = [best_f["impl"], best_f["forward_s"]]
    if best_g:
        s["fastest_peer_grad"] = [best_g["impl"], best_g["grad_s"]]
    for r in ok:
        if not r["impl"].startswith("dphys"):
            continue
        e: dict[str, Any] = {
            k: r.get(k) for k in ("forward_s", "grad_s", "grad_ratio", "error")
        }
        e.update({k: r[k] for k in extra_keys if k in r})
        if best_f and r.get("forward_s"):
            e["forward_speedup"] = best_f["forward_s"] / r["forward_s"]
        if best_g and r.get("grad_s"):
            e["grad_speedup"] = best_g["grad_s"] / r["grad_s"]
        if r.get("step_over_fft_pair") is not None:
            e["step_over_fft_pair"] = r["step_over_fft_pair"]
        s[r["impl"]] = e
    main = s.get("dphys", {})
    targets = {}
    if target_speedup is not None:
        tag = f"{target_speedup:g}x_fastest_peer"
        if "forward_speedup" in main:
            targets[f"forward_{tag}"] = main["forward_speedup"] >= target_speedup
        if "grad_speedup" in main:
            targets[f"grad_{tag}"] = main["grad_speedup"] >= target_speedup
    if target_grad_ratio is not None and main.get("grad_ratio") is not None:
        targets[f"grad_ratio_le_{target_grad_ratio:g}"] = (
            main["grad_ratio"] <= target_grad_ratio
        )
    if targets:
        s["targets_met"] = targets
    return s


def limit_row(base: dict[str, Any], jobs: dict[str, Compiled], steps: int) -> dict:
    """The row of :func:`limit_loops`' jobs once timed: per-step FFT pair and axpy."""
    pairs, axpys = jobs["fft_pairs"], jobs["axpys"]
    u = pairs.args[0]
    axpy_s = axpys.median / steps
    return base | {
        "impl": "limit",
        "forward_s": pairs.median,
        "note": f"{steps} rfftn+irfftn pairs in one jitted loop, timed in the same "
        "round-robin as the implementations (the FFT-pair limit of a periodic "
        "implicit scheme)",
        "fft_pair_s": pairs.median / steps,
        "fft_pair_min_s": pairs.minimum / steps,
        "axpy_s": axpy_s,
        "bandwidth_gbs": 3 * u.size * u.dtype.itemsize / axpy_s / 1e9,
    }


def clean(x):
    """``x`` made JSON-safe: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, jax.Array) and x.ndim == 0:
        return clean(x.item())
    return x


def memory_scaling(
    name: str,
    impl: str,
    cost_at: Callable[[int], Callable],
    args: Sequence[Any],
    counts: Sequence[int] = (250, 1000, 4000),
    target: float = 4.0,
) -> dict[str, Any]:
    """P5's memory scaling of a gradient: XLA temporary bytes at several step counts.

    ``cost_at(n)`` is the P5-style cost over ``n`` steps; its ``value_and_grad`` is
    compiled (not run) at every count, so the figure is XLA's own account of the
    gradient's working memory (arguments and outputs excluded).
    """
    mem = {}
    for n in counts:
        vg = jax.value_and_grad(cost_at(n), argnums=(0, 1))
        compiled = jax.jit(vg).lower(*args).compile()
        mem[n] = compiled.memory_analysis().temp_size_in_bytes / MB
    lo, hi = min(counts), max(counts)
    return {
        "problem": name,
        "impl": impl,
        "mem_mb_by_steps": mem,
        "mem_growth": mem[hi] / mem[lo],
        "mem_kind": "xla_temp_bytes of value_and_grad (compiled, excl. args/outputs)",
        f"mem_{hi}_le_{target:g}x_mem_{lo}": mem[hi] / mem[lo] <= target,
    }


def scan_steps(step: Callable, x, n: int):
    """``n`` applications of ``step`` in one ``lax.scan`` (the peers' time loop)."""
    return lax.scan(lambda v, _: (step(v), None), x, None, length=n)[0]


def segment_misfit(step: Callable, x0, every: int, observe: Callable, y):
    """$\sum_k \|\mathrm{observe}(x_k) - y_k\|^2$ with $x_k$ ``every`` steps after
    $x_{k-1}$, one observation per row of ``y`` (the peers' P5-style cost)."""

    def segment(x, _):
        x = scan_steps(step, x, every)
        return x, observe(x)

    _, hs = lax.scan(segment, x0, None, length=y.shape[0])
    return jnp.sum((hs - y) ** 2)


def device_name() -> str:
    """``platform:device_kind`` of the default JAX device."""
    dev = jax.devices()[0]
    return f"{dev.platform}:{getattr(dev, 'device_kind', '')}"


def logger(tag: str) -> Callable[[str], None]:
    """A progress logger to stderr, lines prefixed ``[tag HH:MM:SS]``."""

    def log(msg: str) -> None:
        print(f"[{tag} {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    return log
