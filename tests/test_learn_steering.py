"""Inference-time steering of an analysis with user energy terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _learn_twin import advection_twin

import assimilation as da
from assimilation import learn


@pytest.fixture(scope="module")
def converged():
    cost, truth = advection_twin(diagonal_b=True)  # posterior: see advection_twin
    analysis = da.assimilate(cost, da.GaussNewton(gtol=1e-12), uncertainty=True)
    return cost, analysis


def _assim(cost):
    return learn.unrolled_gauss_newton(cost, 1, n_cg=16, damping=1e-30)


def test_sensor_reading_steers_the_prediction(converged):
    cost, analysis = converged
    pred = cost.predict(analysis.control)
    target = float(pred[1, 2]) + 0.5
    energy = learn.SensorReading(sensor=2, time_index=1, value=target, sigma=0.01)
    res = learn.steer(
        cost,
        [energy],
        assimilator=_assim(cost),
        n_iterations=30,
        state_std=analysis.initial_state_std,
    )
    new = cost.predict(res.control)
    assert abs(float(new[1, 2]) - target) < 0.05 * 0.5
    # Starting at the 4D-Var minimum, any move raises J.
    assert float(res.delta_cost) > 0
    assert float(res.cost_before) == pytest.approx(analysis.cost_analysis, rel=1e-8)
    assert float(res.energies_after[0]) < 1e-2 * float(res.energies_before[0])
    # The shift in posterior-sigma units is the Mahalanobis length under A.
    dv = res.control["initial_state"] - res.start["initial_state"]
    hess = jax.hessian(lambda x: cost({"initial_state": x}))(res.start["initial_state"])
    assert float(res.shift_sigma) == pytest.approx(
        float(jnp.sqrt(dv @ hess @ dv)), rel=1e-8
    )
    dx = cost.initial_state(res.control) - cost.initial_state(res.start)
    assert float(res.shift_sigma_max) == pytest.approx(
        float(jnp.max(jnp.abs(dx) / analysis.initial_state_std)), rel=1e-10
    )


@pytest.mark.parametrize("kind", ["conservation", "smoothness", "bounds"])
def test_energy_terms_do_what_they_say(converged, kind):
    cost, analysis = converged
    grid = cost.model.grid
    x_a = cost.initial_state(analysis.control)
    if kind == "conservation":
        target = float(grid.integrate(x_a)) + 0.3
        energy = learn.Conservation(jnp.asarray(target), jnp.asarray(1e-3))
        measure = lambda x: abs(float(grid.integrate(x)) - target)
    elif kind == "smoothness":
        energy = learn.Smoothness(jnp.asarray(10.0))
        measure = lambda x: float(jnp.sum(jnp.diff(x) ** 2))
    else:
        upper = 0.5 * float(jnp.max(x_a))
        energy = learn.Bounds(upper=upper, weight=jnp.asarray(1e4))
        measure = lambda x: float(jnp.max(x)) - upper
    res = learn.steer(cost, [energy], v=analysis.control, n_iterations=40)
    x_s = cost.initial_state(res.control)
    assert measure(x_s) < 0.5 * measure(x_a)
    assert float(res.delta_cost) > 0
    assert res.shift_sigma_max is None


def test_steer_errors(converged):
    cost, analysis = converged
    e = learn.Smoothness(jnp.asarray(1.0))
    with pytest.raises(ValueError, match="exactly one"):
        learn.steer(cost, [e])
    with pytest.raises(TypeError, match="AbstractEnergy"):
        learn.steer(cost, ["smooth"], v=analysis.control)
    with pytest.raises(ValueError, match="n_iterations"):
        learn.steer(cost, [e], v=analysis.control, n_iterations=0)
    with pytest.raises(ValueError, match="outside"):
        learn.steer(cost, [learn.SensorReading(99, 0, 1.0, 0.1)], v=analysis.control)
    np.testing.assert_array_equal(analysis.control["initial_state"].shape, (16,))
