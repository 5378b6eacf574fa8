"""Smoke test of benchmarks/run.py on toy sizes, so the benchmark code cannot rot.

Runs the real measurement path (ahead-of-time compilation, interleaved timing,
answer checks, finite-difference gradient check, summary) for P1 with dphys and the
jax.scipy CG peer at N = 64, and checks the JSON keys and that the answers are right.
"""

import io
import json

import numpy as np
import pytest


run = pytest.importorskip("benchmarks.run")
problems = pytest.importorskip("benchmarks._problems")

REQUIRED = {
    "problem",
    "impl",
    "n",
    "steps",
    "dtype",
    "device",
    "forward_s",
    "grad_s",
    "grad_ratio",
    "compile_s",
    "mem_mb",
    "error",
}


def test_exact_discrete_matches_one_step_at_a_time():
    # The reference the benchmarks check against: G^n per mode equals n explicit
    # applications of the θ-method step written out with the 3-point stencil.
    p = problems.make_problem("P1", size="tiny")
    u = p.u0()
    lap = lambda v: p.kappa * (np.roll(v, 1) + np.roll(v, -1) - 2 * v) * p.n**2
    # Backward Euler: solve (I - dt L) u_new = u by the dense matrix.
    eye = np.eye(p.n)
    lmat = np.stack([lap(e) for e in eye], axis=1)
    a = eye - p.dt * lmat
    v = u.copy()
    for _ in range(p.steps):
        v = np.linalg.solve(a, v)
    assert problems.rel_l2(p.exact_discrete(u, p.steps), v) < 1e-12
    # ...and differs from the PDE solution by the discretisation error only.
    err = problems.rel_l2(v, p.exact_pde(p.steps * p.dt))
    assert 1e-8 < err < 1e-2


def test_run_tiny_p1_rows_and_summary():
    out = io.StringIO()
    cfg = run.Config(size="tiny", repeats=1, slow_s=5.0, only=("dphys", "jax-cg"))
    rows = run.run(["P1"], cfg, out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(lines) == len(rows)
    limits = [r for r in lines if r.get("problem") == "limits"]
    assert limits and limits[0]["fft_pair_s"] > 0 and limits[0]["bandwidth_gbs"] > 0
    by_impl = {r["impl"]: r for r in lines if r.get("problem") == "P1"}
    assert set(by_impl) == {"dphys", "jax-cg", "limit"}
    # the FFT-pair limit timed in the same round-robin as the implementations
    assert by_impl.pop("limit")["fft_pair_s"] > 0
    for row in by_impl.values():
        assert REQUIRED <= set(row), REQUIRED - set(row)
        assert row["forward_s"] > 0 and row["grad_s"] > 0 and row["mem_mb"] > 0
        assert row["error_ref"] == "discrete"
        # Central differences (Richardson) vs the reverse-mode directional derivative.
        assert row["grad_fd_relerr"] < 1e-5
    assert by_impl["dphys"]["error"] < 1e-12
    assert by_impl["jax-cg"]["error"] < 1e-7
    # Two independent implementations of the same cost agree on the gradient.
    assert by_impl["jax-cg"]["grad_rel_diff_vs_dphys"] < 1e-6
    summary = lines[-1]["summary"]["P1"]
    assert summary["fastest_peer_forward"][0] == "jax-cg"
    assert summary["dphys"]["forward_speedup"] > 0
    assert "targets_met" in summary


def test_p5_tiny_memory_rows():
    out = io.StringIO()
    cfg = run.Config(size="tiny", repeats=1, slow_s=5.0, only=("dphys",))
    run.run(["P5"], cfg, out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    p5 = [r for r in lines if r.get("problem") == "P5"]
    assert [r["steps"] for r in p5] == [20, 80]
    for r in p5:
        assert r["mem_mb"] > 0 and r["grad_ratio"] > 0
        assert r["rss_delta_mb"] is not None  # the fresh-process peak-RSS probe ran
    growth = lines[-1]["summary"]["P5"]["dphys"]["mem_growth"]
    # fast_forward stores one state per observation segment, whatever the step count
    assert growth < 1.5


@pytest.mark.parametrize(
    "problem,impls",
    [
        ("P3", ("dphys", "dphys-stepwise", "jax-bicgstab")),
        ("P4", ("dphys", "jax-gmres")),
    ],
)
def test_p3_p4_tiny_rows_and_summary(problem, impls):
    out = io.StringIO()
    cfg = run.Config(size="tiny", repeats=1, slow_s=5.0, only=impls)
    run.run([problem], cfg, out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    by_impl = {r["impl"]: r for r in lines if r.get("problem") == problem}
    assert set(by_impl) == set(impls) | {"limit"}
    assert by_impl.pop("limit")["fft_pair_s"] > 0
    for row in by_impl.values():
        assert REQUIRED <= set(row), REQUIRED - set(row)
        assert row["forward_s"] > 0 and row["grad_s"] > 0 and row["mem_mb"] > 0
        assert row["grad_fd_relerr"] < 1e-4
    # dphys's answer is the exact discrete solution (per-mode G^n, written in NumPy)
    assert by_impl["dphys"]["error"] < 1e-12
    peer = impls[-1]
    assert by_impl[peer]["error"] < 1e-6
    assert by_impl[peer]["grad_vs_dphys_relerr"] < 1e-6
    if problem == "P4":
        assert by_impl["dphys"]["mass_rel_change"] < 1e-13
        assert abs(by_impl["dphys"]["energy_rel_change"]) < 1e-12
    summary = lines[-1]["summary"][problem]
    assert summary["fastest_peer_forward"][0] == peer
    assert set(summary["targets_met"]) == {
        "forward_2x_fastest_peer",
        "grad_2x_fastest_peer",
        "grad_ratio_le_3",
    }


@pytest.mark.parametrize("problem", ["P1", "P3"])
def test_missing_peer_is_a_skipped_row(problem, monkeypatch):
    # A peer that is not installed (exponax is only in the `bench` extra) must give
    # a row that says how to install it, never end the run.
    monkeypatch.setitem(__import__("sys").modules, "exponax", None)
    out = io.StringIO()
    cfg = run.Config(size="tiny", repeats=1, slow_s=5.0, only=("dphys", "exponax"))
    run.run([problem], cfg, out=out)
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    rows = {r["impl"]: r for r in lines if r.get("problem") == problem}
    assert "pip install" in rows["exponax"]["skipped"]
    assert rows["dphys"]["forward_s"] > 0
