"""The L1/L2 learning benchmark set-ups (benchmarks/_learning_problems.py), tiny."""

import jax.numpy as jnp
import numpy as np
import pytest

import dphys


lp = pytest.importorskip("benchmarks._learning_problems")


def test_l1_tiny():
    p = lp.make_l1(tiny=True)
    assert (p.train.n_windows, p.val.n_windows, p.test.n_windows) == (16, 8, 8)
    assert p.cost.n_steps == 40 and p.cost.dt == 0.01
    np.testing.assert_allclose(p.cost.obs.times, 0.05 * np.arange(1, 9))
    assert p.train.obs.shape == (16, 8, 16)
    assert p.cost.model.velocity[1] == 1.0 and p.cost.model.velocity[0] == 0.5
    assert float(p.cost.model.kappa) == 2e-3
    assert np.all(np.asarray(p.cost.obs.sigma) == 0.05)
    assert not np.allclose(p.train.truth_x0[:8], p.val.truth_x0)  # independent sets
    assert set(p.meta["generation_s"]) == {"train", "val", "test"}
    assert 0.03 < float(jnp.std(p.train.obs - p.train.clean_obs)) < 0.07


def test_l2_tiny():
    p = lp.make_l2(tiny=True)
    assert p.val is None and (p.train.n_windows, p.test.n_windows) == (8, 4)
    assert float(p.cost.model.kappa) == pytest.approx(1.5 * 2e-3)
    assert p.test.save_steps == (40, 80, 120, 160, 200)
    assert p.meta["forecast_steps"] == {40: 80, 80: 120, 160: 200}
    np.testing.assert_array_equal(p.test.states_at(40), p.test.truth_final)
    far = np.asarray(p.test.states_at(200))
    assert np.all(np.isfinite(far)) and np.abs(far).max() < 5
    # the truth has terms the physics model lacks: runs from the same x0 differ
    physics = dphys.simulate(
        p.cost.model, p.cost.stepper, p.test.truth_x0[0], dt=0.01, n_steps=40
    ).final
    gap = np.sqrt(
        np.mean((np.asarray(physics) - np.asarray(p.test.truth_final[0])) ** 2)
    )
    assert gap > 0.05  # larger than the observation noise
