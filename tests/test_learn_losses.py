"""Training losses: Taylor tests through the physics for each loss, what each one
measures, and their errors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest
from _learn_twin import advection_twin

from assimilation import learn
from assimilation.learn import _problem as P
from dphys.testing import taylor_test


@pytest.fixture(scope="module")
def twin():
    return advection_twin()


@pytest.fixture(scope="module")
def weak_twin():
    return advection_twin(model_error=True)


def _assim(cost, K=2):
    a = learn.unrolled_gradient(cost, K, step_size=5e-4, momentum=True, key=jr.key(0))
    return eqx.tree_at(lambda a: a.layers.log_step, a, jnp.log(jnp.array([5e-4, 8e-4])))


def _check(loss, assim, cost, **kw):
    params, static = eqx.partition(assim, eqx.is_inexact_array)
    f = eqx.filter_jit(lambda p: loss(eqx.combine(p, static), cost, **kw))
    g = eqx.filter_jit(eqx.filter_grad(f))(params)
    good = taylor_test(f, params, grad=g, key=jr.key(1))
    assert good.passed, str(good)
    bad = taylor_test(f, params, grad=jtu.tree_map(lambda x: 0.9 * x, g), key=jr.key(1))
    assert not bad.passed
    return g


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("supervised", marks=pytest.mark.slow),
        pytest.param("held_out", marks=pytest.mark.slow),
        "analysis_cost",
        pytest.param("kkt", marks=pytest.mark.slow),
        "mixed",  # supervised + held-out sensors + KKT residual
    ],
)
def test_loss_taylor(twin, name):
    cost, truth = twin
    loss, kw = {
        "supervised": (learn.Supervised(), {"truth": truth}),
        "held_out": (learn.HeldOutSensors(0.34, n_splits=2), {"key": jr.key(5)}),
        "analysis_cost": (learn.AnalysisCost(), {}),
        "kkt": (learn.KKTResidual(), {}),
        "mixed": (
            learn.Mixed(
                [learn.Supervised(), learn.HeldOutSensors(), learn.KKTResidual()],
                [1.0, 0.5, 0.1],
            ),
            {"truth": truth, "key": jr.key(6)},
        ),
    }[name]
    _check(loss, _assim(cost), cost, **kw)


def test_physics_residual_taylor_and_meaning(weak_twin, twin):
    cost, _ = weak_twin
    loss = learn.PhysicsResidual()
    assim = _assim(cost)
    _check(loss, assim, cost)
    # The analysis uses model error, so it departs from the model equations...
    res = assim(cost)
    assert float(jnp.max(jnp.abs(res.control["model_error"]))) > 0
    assert float(loss.evaluate(res, cost, None)) > 1e-8
    # ...by exactly its forcing: R = eta on every step of each sub-window.
    eta = cost.forcings(res.control)
    expected = float(jnp.mean(jnp.square(eta)))
    assert float(loss.evaluate(res, cost, None)) == pytest.approx(expected, rel=1e-8)
    # A strong-constraint analysis satisfies the model equations to round-off.
    strong, _ = twin
    r = _assim(strong)(strong)
    assert float(loss.evaluate(r, strong, None)) < 1e-24


@pytest.mark.slow
def test_supervised_parameters():
    cost, truth = advection_twin()
    import assimilation as da

    cost = da.FourDVar(
        cost.model,
        cost.stepper,
        cost.state0,
        cost.obs,
        da.Control(
            initial_state=cost.control.initial_state,
            parameters=[da.Parameter("kappa", transform=da.Log(), sigma=0.5)],
        ),
        dt=cost.dt,
        n_steps=cost.n_steps,
    )
    loss = learn.Supervised(state_weight=1.0, parameter_weight=1e4)
    t = {"initial_state": truth, "parameters": {"kappa": 5e-3}}
    _check(loss, _assim(cost), cost, truth=t)
    res = _assim(cost)(cost)
    x_a = cost.initial_state(res.control)
    kappa = cost.parameters(res.control)["kappa"]
    expected = jnp.mean((x_a - truth) ** 2) + 1e4 * (kappa - 5e-3) ** 2
    assert float(loss.evaluate(res, cost, t)) == pytest.approx(
        float(expected), rel=1e-12
    )
    with pytest.raises(ValueError, match="parameters"):
        loss.evaluate(res, cost, {"initial_state": truth})


def test_held_out_sensors_are_hidden_from_the_analysis(twin):
    cost, _ = twin
    loss = learn.HeldOutSensors(0.34, n_splits=3)
    masks = loss.masks(cost, jr.key(0))
    assert masks.shape == (3, 6)
    np.testing.assert_array_equal(masks.sum(axis=1), [2, 2, 2])
    assim = _assim(cost)
    hidden = masks[0]
    masked = P.hide_observations(cost, hidden)
    # Changing the hidden sensors' values does not change the analysis...
    changed = eqx.tree_at(
        lambda c: c.obs.values, cost, cost.obs.values + 10.0 * hidden[None, :]
    )
    a1 = assim(masked).control["initial_state"]
    a2 = assim(P.hide_observations(changed, hidden)).control["initial_state"]
    np.testing.assert_array_equal(a1, a2)
    # ...but changes the loss, which scores exactly those values.
    one = learn.HeldOutSensors(0.34, n_splits=1)
    l1 = one(assim, cost, key=jr.key(0))
    l2 = one(assim, changed, key=jr.key(0))
    assert float(l2) > float(l1) + 1.0
    with pytest.raises(ValueError, match="key"):
        loss(assim, cost)
    with pytest.raises(ValueError, match="fraction"):
        learn.HeldOutSensors(1.5)


def test_kkt_residual_is_the_whitened_gradient_norm(twin):
    cost, _ = twin
    res = _assim(cost)(cost)
    g = jax.grad(cost)(res.control)["initial_state"]
    n_obs = int(jnp.sum(~jnp.isnan(cost.obs.values)))
    expected = 0.5 * float(g @ g) / n_obs
    got = float(learn.KKTResidual().evaluate(res, cost, None))
    assert got == pytest.approx(expected, rel=1e-12)
    expected_j = float(cost(res.control)) / n_obs
    assert float(learn.AnalysisCost().evaluate(res, cost, None)) == pytest.approx(
        expected_j, rel=1e-12
    )


def test_losses_need_their_inputs(twin):
    cost, _ = twin
    assim = _assim(cost)
    with pytest.raises(ValueError, match="truth"):
        learn.Supervised()(assim, cost)
    with pytest.raises(ValueError, match="truth"):
        learn.Mixed([learn.Supervised(), learn.KKTResidual()])(assim, cost)
    with pytest.raises(TypeError, match="AbstractLoss"):
        learn.Mixed([learn.Supervised(), "kkt"])
    with pytest.raises(ValueError, match="weights"):
        learn.Mixed([learn.Supervised()], [1.0, 2.0])
