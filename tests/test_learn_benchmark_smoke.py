"""Smoke tests of the L1/L3 learning benchmarks on toy sizes (slow: they train)."""

import pytest


bench = pytest.importorskip("benchmarks._l1_unrolled")

REQUIRED = {
    "problem",
    "method",
    "K",
    "loss",
    "analysis_rmse",
    "final_rmse",
    "model_sweeps",
    "analysis_s",
    "train_s",
}
SUMMARY = {
    "converged_rmse",
    "classical_sweeps_to_match",
    "best_learned_rmse_over_converged",
    "sweeps_ratio",
    "selfsup_over_supervised",
}


@pytest.mark.slow
def test_l1_tiny_rows_and_summary():
    emitted = []
    rows = bench.run_l1("tiny", emit=emitted.append)
    assert rows == emitted
    body = [r for r in rows if r["method"] != "summary"]
    for r in body:
        assert REQUIRED <= set(r), (r["method"], REQUIRED - set(r))
    gn = next(r for r in rows if r["method"] == "gauss_newton")
    assert gn["grad_norm_reduction"] < 1e-8  # converged
    learned = [r for r in body if r["method"] in bench.LEARNED_METHODS]
    assert {r["loss"] for r in learned} == {"supervised", "selfsup"}
    for r in learned:
        assert r["model_sweeps"] == 2 * r["K"] + (r["method"] == "warm_start")
        assert r["analysis_rmse"] < 1.0  # better than the background (std 1)
    summary = rows[-1]
    assert summary["method"] == "summary" and SUMMARY <= set(summary)
    assert summary["converged_rmse"] == gn["analysis_rmse"]


@pytest.mark.slow
def test_l3_tiny_implicit_against_full_unroll():
    rows = bench.run_l3("tiny")
    implicit = next(r for r in rows if r["method"] == "implicit")
    assert implicit["converged"]
    full = [r for r in rows if r["method"] == "full_unroll"]
    # The error of the unrolled hypergradient decays with K towards the implicit one.
    assert full[-1]["rel_error_vs_implicit"] < full[0]["rel_error_vs_implicit"]
    summary = rows[-1]
    mems = list(summary["implicit_mem_mb_max_iterations"].values())
    assert max(mems) <= 1.05 * min(mems)  # flat in the iteration count
