"""Window datasets: seeded twin windows, per-window costs, splits, held-out sensors."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import assimilation as da
import assimilation.learn as al
import dphys
import pdes


N = 2000
SIGMA = np.array([0.05, 0.05, 0.05, 0.2, 0.2, 0.2])


@pytest.fixture(scope="module")
def setup():
    grid = dphys.Grid((8, 8), lengths=1.0, boundary="periodic")
    model = pdes.Advection(grid, velocity=(0.5, 1.0), kappa=2e-3)
    cov = da.Diffusion(grid, 0.15, std=0.7)
    pos = np.asarray(jr.uniform(jr.key(0), (6, 2)))
    # the second time falls between steps: exercises the time interpolation
    obs = da.Observations([0.02, 0.035], jnp.zeros((2, 6)), pos, SIGMA)
    cost = da.FourDVar(
        model,
        dphys.CrankNicolson(),
        jnp.zeros(grid.shape),
        obs,
        da.Control(initial_state=da.InitialState(cov)),
        dt=0.01,
        n_steps=4,
    )
    windows = al.make_windows(
        cost, cov, n_windows=N, key=jr.key(1), save_steps=(4, 8), chunk_size=500
    )
    return cost, cov, windows


def test_windows_shapes(setup):
    cost, cov, w = setup
    assert w.n_windows == N
    assert w.obs.shape == w.clean_obs.shape == (N, 2, 6)
    assert w.truth_x0.shape == w.truth_final.shape == (N, 8, 8)
    assert w.truth_states.shape == (N, 2, 8, 8) and w.save_steps == (4, 8)
    assert w.truth_params is None
    one = w[3]
    assert one.obs.shape == (2, 6) and one.truth_x0.shape == (8, 8)
    np.testing.assert_array_equal(one.states_at(4), w.truth_final[3])


def test_initial_states_follow_the_prior(setup):
    """Sample covariance of x0 against B: E||C_hat - B||_F^2 = (||B||_F^2 + tr(B)^2)/N
    for zero-mean Gaussian draws; the measured ratio must be close to 1 (over seeds
    it lies in 0.92-1.06), and a 20% larger std (1.44 B) must be far off."""
    _, cov, w = setup
    C = np.asarray(cov.to_dense())
    X = np.asarray(w.truth_x0).reshape(N, -1)
    C_hat = X.T @ X / N
    expected = (np.sum(C**2) + np.trace(C) ** 2) / N
    ratio = np.sum((C_hat - C) ** 2) / expected
    assert 0.7 < ratio < 1.4, ratio
    assert np.sum((C_hat - 1.44 * C) ** 2) / expected > 5  # negative control
    # mean zero within 4 standard errors of the field mean
    se = np.sqrt(C.sum() / C.shape[0] ** 2 / N)
    assert abs(X.mean()) < 4 * se


def test_observation_noise_has_the_template_sigma(setup):
    _, _, w = setup
    noise = np.asarray(w.obs - w.clean_obs).reshape(-1, 6)
    std = noise.std(axis=0)
    # relative standard error of a sample std is 1/sqrt(2 n), n = 2 N here
    np.testing.assert_allclose(std, SIGMA, rtol=4 / np.sqrt(4 * N))
    assert abs(noise.mean(axis=0) / SIGMA).max() < 4 / np.sqrt(2 * N)
    assert np.all(np.abs(noise.mean(axis=0)) < 4 * SIGMA / np.sqrt(2 * N))


def test_clean_values_are_what_the_cost_predicts_at_the_truth(setup):
    cost, _, w = setup

    @jax.jit
    def at_truth(x0, clean):
        # the background is the truth, so v = 0 starts the window at the truth
        truth_cost = al.with_obs(eqx.tree_at(lambda c: c.state0, cost, x0), clean)
        v = truth_cost.init()
        return truth_cost.predict(v), truth_cost.costs(v)[2]

    for i in (0, 7):
        predicted, jo = at_truth(w.truth_x0[i], w.clean_obs[i])
        np.testing.assert_allclose(predicted, w.clean_obs[i], rtol=1e-12, atol=1e-14)
        assert float(jo) < 1e-24  # zero observation term
    ref = dphys.simulate(
        cost.model, cost.stepper, w.truth_x0[5], dt=0.01, n_steps=8
    ).final
    np.testing.assert_allclose(w.states_at(8)[5], ref, rtol=1e-12, atol=1e-14)


def test_per_window_costs_under_vmap(setup):
    cost, _, w = setup
    v = jtu.tree_map(lambda x: 0.1 * jnp.ones_like(x), cost.init())
    batch = w[:3]
    J = lambda y: al.with_obs(cost, y)(v)
    vm = jax.jit(jax.vmap(J))(batch.obs)
    one = jax.jit(J)
    loop = [float(one(batch.obs[i])) for i in range(3)]
    np.testing.assert_allclose(vm, loop, rtol=1e-12)
    assert len(set(loop)) == 3


def test_generation_is_reproducible(setup):
    cost, cov, w = setup
    again = al.make_windows(
        cost, cov, n_windows=N, key=jr.key(1), save_steps=(4, 8), chunk_size=500
    )
    assert all(
        np.array_equal(a, b)
        for a, b in zip(jtu.tree_leaves(w), jtu.tree_leaves(again), strict=True)
    )
    other = al.make_windows(
        cost, cov, n_windows=N, key=jr.key(2), save_steps=(4, 8), chunk_size=500
    )
    assert not np.allclose(other.truth_x0[:4], w.truth_x0[:4])
    # the chunk size changes the values by round-off only
    chunked = al.make_windows(cost, cov, n_windows=40, key=jr.key(1), chunk_size=16)
    ref = al.make_windows(cost, cov, n_windows=40, key=jr.key(1), chunk_size=40)
    np.testing.assert_allclose(chunked.obs, ref.obs, rtol=1e-12, atol=1e-14)


def test_truth_model_and_per_window_parameters(setup):
    cost, cov, _ = setup
    truth = dphys.Augmented(cost.model, explicit=lambda t, u: -2.0 * u**3)
    draw = lambda key: {"kappa": jnp.exp(jr.uniform(key, (), minval=-7, maxval=-5))}
    put = lambda m, p: eqx.tree_at(lambda m: m.model.kappa, m, p["kappa"])
    w = al.make_windows(
        cost,
        cov,
        n_windows=3,
        key=jr.key(4),
        truth_model=truth,
        params=draw,
        apply_params=put,
        chunk_size=3,
    )
    kappas = np.asarray(w.truth_params["kappa"])
    assert kappas.shape == (3,) and len(set(kappas.tolist())) == 3
    m = put(truth, {"kappa": w.truth_params["kappa"][1]})
    ref = dphys.simulate(m, cost.stepper, w.truth_x0[1], dt=0.01, n_steps=4).final
    np.testing.assert_allclose(w.truth_final[1], ref, rtol=1e-12, atol=1e-14)
    plain = dphys.simulate(cost.model, cost.stepper, w.truth_x0[1], dt=0.01, n_steps=4)
    assert not np.allclose(plain.final, ref, atol=1e-6)  # the truth differs


def test_windows_train_with_fit(setup):
    """A one-parameter 'assimilator' x0 = a H^T y, trained on windows, improves."""
    cost, cov, w = setup
    H = cost.obs_op

    class Gain(eqx.Module):
        a: jax.Array

        def __call__(self, y):
            return self.a * H.transpose(jnp.nanmean(y, axis=0))

    loss = lambda m, ex, key: jnp.mean((m(ex.obs) - ex.truth_x0) ** 2)
    train, val = al.split_dataset(w[:64], (48, 16), key=jr.key(0))
    res = al.fit(
        Gain(jnp.asarray(0.0)),
        loss,
        train,
        val_data=val,
        optimizer=optax.adam(0.1),
        key=jr.key(0),
        batch_size=16,
        n_epochs=5,
    )
    assert res.history["val_loss"][-1] < res.history["val_loss"][0]


# ------------------------------------------------------------------------ splits


def test_split_dataset():
    data = {"a": jnp.arange(10), "b": jnp.arange(10) * 2}
    parts = al.split_dataset(data, (6, 3, 1), key=jr.key(0))
    got = np.concatenate([p["a"] for p in parts])
    assert sorted(got.tolist()) == list(range(10))
    assert all(np.array_equal(p["b"], 2 * p["a"]) for p in parts)
    fr = al.split_dataset(data, (0.5, 0.5), key=jr.key(0))
    assert [len(p["a"]) for p in fr] == [5, 5]
    again = al.split_dataset(data, (6, 3, 1), key=jr.key(0))
    assert np.array_equal(again[0]["a"], parts[0]["a"])
    with pytest.raises(ValueError, match="sum to at most 10"):
        al.split_dataset(data, (8, 3), key=jr.key(0))
    with pytest.raises(ValueError, match="sum to 1"):
        al.split_dataset(data, (0.5, 0.2), key=jr.key(0))
    with pytest.raises(ValueError, match="leading"):
        al.split_dataset({"a": jnp.zeros(3), "b": jnp.zeros(4)}, (1, 1), key=jr.key(0))


# --------------------------------------------------------------- held-out sensors


def test_sensor_splits_and_folds():
    m = al.sensor_splits(20, fraction=0.25, n_splits=8, key=jr.key(0))
    assert m.shape == (8, 20) and m.dtype == jnp.bool_
    assert np.all(np.asarray(m).sum(axis=1) == 5)
    assert len({tuple(r) for r in np.asarray(m)}) > 1  # splits differ
    jitted = jax.jit(lambda k: al.sensor_splits(20, fraction=0.25, key=k))(jr.key(0))
    assert jitted.shape == (1, 20)
    folds = al.sensor_folds(10, n_folds=3, key=jr.key(1))
    assert np.all(np.asarray(folds).sum(axis=0) == 1)  # each sensor held out once
    assert sorted(np.asarray(folds).sum(axis=1).tolist()) == [3, 3, 4]


def test_hidden_sensors_drop_out_of_the_cost(setup):
    cost, _, w = setup
    hidden = jnp.array([True, False, False, True, False, False])
    visible, heldout = al.heldout_split(w.obs[0], hidden)
    assert np.all(np.isnan(visible[:, [0, 3]])) and not np.any(np.isnan(visible[:, 1]))
    assert np.all(np.isnan(heldout[:, [1, 2, 4, 5]]))
    np.testing.assert_array_equal(heldout[:, 0], w.obs[0][:, 0])
    masked = al.mask_cost(al.with_obs(cost, w.obs[0]), hidden)
    v = jtu.tree_map(lambda x: 0.1 * jnp.ones_like(x), cost.init())
    r = masked.obs_residual(v)
    assert np.all(r[:, [0, 3]] == 0) and np.all(r[:, [1, 2]] != 0)
    full = al.with_obs(cost, w.obs[0]).obs_residual(v)
    np.testing.assert_array_equal(r[:, [1, 2, 4, 5]], full[:, [1, 2, 4, 5]])
    # under vmap over splits, with NaN never reaching the gradient
    masks = al.sensor_splits(6, fraction=0.5, n_splits=3, key=jr.key(0))
    J = lambda v, m: al.mask_cost(al.with_obs(cost, w.obs[0]), m)(v)
    vals, g = jax.jit(jax.vmap(jax.value_and_grad(J), in_axes=(None, 0)))(v, masks)
    assert np.all(np.isfinite(vals)) and len(set(np.asarray(vals).tolist())) == 3
    assert all(np.all(np.isfinite(x)) for x in jtu.tree_leaves(g))


# ------------------------------------------------------------------------ errors


def test_bad_arguments(setup):
    cost, cov, _ = setup
    other = da.Diffusion(dphys.Grid((4, 4), lengths=1.0, boundary="periodic"), 0.3)
    cases = [
        (dict(prior="B"), TypeError, "`prior` must be an AbstractCovariance"),
        (dict(n_windows=0), ValueError, "`n_windows` must be a positive int"),
        (dict(params=lambda k: 1.0), ValueError, "`params` and `apply_params`"),
        (dict(prior=other), ValueError, "`prior` acts on arrays of shape"),
        (dict(save_steps=(8, 4)), ValueError, "`save_steps` must be"),
        (dict(missing=1.0), ValueError, "`missing` must lie in"),
        (dict(chunk_size=0), ValueError, "`chunk_size`"),
        (dict(key=None), TypeError, "`key` is required"),
    ]
    for change, error, match in cases:
        kw = dict(prior=cov, n_windows=2, key=jr.key(0))
        kw.update(change)
        with pytest.raises(error, match=match):
            al.make_windows(cost, **kw)
    with pytest.raises(TypeError, match="`cost` must be a window cost"):
        al.make_windows(object(), cov, n_windows=2, key=jr.key(0))
    with pytest.raises(ValueError, match="template's shape"):
        al.with_obs(cost, jnp.zeros((3, 6)))
    with pytest.raises(TypeError, match="`hidden` must be a boolean"):
        al.hide_sensors(jnp.zeros((2, 6)), jnp.zeros(6))
    with pytest.raises(ValueError, match="does not broadcast"):
        al.hide_sensors(jnp.zeros((2, 6)), jnp.zeros(5, bool))
    with pytest.raises(ValueError, match="`fraction` must lie in"):
        al.sensor_splits(6, fraction=0.0, key=jr.key(0))
    with pytest.raises(ValueError, match="`n_folds`"):
        al.sensor_folds(6, n_folds=7, key=jr.key(0))
