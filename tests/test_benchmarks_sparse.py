"""Smoke tests of the S1/S2 benchmarks on toy sizes (slow: minutes of compilation)."""

import pytest


s1 = pytest.importorskip("benchmarks._s1_sparse")
s2 = pytest.importorskip("benchmarks._s2_source")


@pytest.mark.slow
def test_s1_tiny_rows_and_summary():
    rows, summary = s1.run_s1(size="tiny")
    impls = {r["impl"] for r in rows}
    assert {
        "ISTA",
        "FISTA",
        "AMP",
        "AMP-state-evolution",
        "ALISTA-16",
        "LISTA-16",
    } <= impls
    for key in (
        "amp_iters_to_35db",
        "fista_iters_to_35db",
        "fixed_point_spread_db",
        "learned16_gain_over_fista16_db",
        "targets_met",
    ):
        assert key in summary
    amp = next(r for r in rows if r["impl"] == "AMP")
    ista = next(r for r in rows if r["impl"] == "ISTA")
    # AMP is faster than ISTA per iteration on this set-up, whatever the size.
    assert amp["nmse_db"][20] < ista["nmse_db"][20]


@pytest.mark.slow
def test_s2_tiny_rows_and_summary():
    rows, summary = s2.run_s2(size="tiny")
    fista = next(r for r in rows if r["impl"] == "FISTA")
    assert fista["dot_test_rel_error"] < 1e-12
    for key in (
        "fista_converged_loc_err_cells",
        "learned_loc_err_cells",
        "learned_sweeps",
        "sweep_ratio",
        "targets_met",
    ):
        assert key in summary


def test_localisation_metric():
    import numpy as np

    truth = np.zeros((16, 16))
    truth[3, 4] = truth[10, 12] = 1.0
    est = np.zeros((16, 16))
    est[3, 5] = 2.0  # one cell off
    est[10, 12] = 1.5  # exact
    est[0, 15] = 1.0  # a false detection far from both (periodic distance)
    err, false = s2.localisation(est, truth)
    assert err == 0.5 and false == 1
    assert s2.localisation(np.zeros((16, 16)), truth) == (8.0, 0)
