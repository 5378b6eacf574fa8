"""4D-Var costs: gradients (Taylor), masking, weak constraint, transforms, bad input."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import assimilation as da
import dphys
import dphys.testing as dtest
import pdes


def _periodic_problem(n_windows=None):
    """Heat on a periodic grid: initial state + scalar log-kappa (+ model error)."""
    grid = dphys.Grid(24, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    truth = pdes.Heat(grid, kappa=0.01)
    u0 = jnp.sin(2 * jnp.pi * x) + 0.5 * jnp.cos(4 * jnp.pi * x)
    stepper = dphys.CrankNicolson()
    obs = da.make_observations(
        truth, stepper, u0, positions=jnp.linspace(0.05, 0.95, 6),
        times=jnp.array([0.15, 0.4, 0.8, 1.0]), sigma=0.05, dt=0.1, n_steps=10,
        key=jax.random.key(0),
    )
    B = da.Diffusion(grid, 0.1, std=0.3)
    me = None if n_windows is None else da.ModelError(
        da.Diagonal(0.2, shape=grid.shape), n_windows=n_windows
    )
    control = da.Control(
        initial_state=da.InitialState(B),
        parameters=[da.Parameter("kappa", transform=da.Log(), sigma=0.5)],
        model_error=me,
    )
    model = pdes.Heat(grid, kappa=0.015)
    cost = da.FourDVar(
        model, stepper, 0.9 * u0, obs, control, dt=0.1, n_steps=10,
        adjoint=dphys.Unrolled(),
    )
    return cost


def _field_problem():
    """Heat on a Neumann grid: log-kappa *field* with a diffusion prior + model error."""
    grid = dphys.Grid(20, lengths=1.0, boundary="neumann")
    (x,) = grid.coords
    truth = pdes.Heat(grid, kappa=0.01 * (1.5 + jnp.sin(2 * jnp.pi * x)))
    u0 = jnp.cos(jnp.pi * x) + jnp.cos(3 * jnp.pi * x)
    stepper = dphys.BackwardEuler()
    obs = da.make_observations(
        truth, stepper, u0, positions=jnp.linspace(0.02, 0.98, 7),
        times=jnp.array([0.2, 0.55, 1.0]), sigma=0.02, dt=0.1, n_steps=10,
        key=jax.random.key(1),
    )
    control = da.Control(
        initial_state=da.InitialState(da.Diagonal(0.1, shape=grid.shape)),
        parameters=[
            da.Parameter(
                "kappa",
                background=jnp.full(grid.shape, 0.01),
                transform=da.Log(),
                covariance=da.Diffusion(grid, 0.2, std=0.5),
            )
        ],
        model_error=da.ModelError(da.Diffusion(grid, 0.1, std=0.1), n_windows=2),
    )
    cost = da.FourDVar(
        pdes.Heat(grid, kappa=0.01), stepper, u0, obs, control, dt=0.1, n_steps=10,
        adjoint=dphys.Unrolled(),
    )
    return cost


@pytest.fixture(scope="module")
def periodic_cost():
    return _periodic_problem()


@pytest.fixture(scope="module")
def field_cost():
    return _field_problem()


def _random_control(cost, key, scale=0.3):
    v = cost.init()
    return jax.tree_util.tree_map(
        lambda a, r: scale * r, v, dtest.tree_random_like(key, v)
    )


def _taylor_each(cost, key):
    v = _random_control(cost, key)
    fn = eqx.filter_jit(lambda v: cost(v))
    grad = eqx.filter_jit(jax.grad(lambda v: cost(v)))(v)
    rates = {}
    for name in cost.control.names:
        f = lambda vk, name=name: fn({**v, name: vk})
        good = dtest.taylor_test(f, v[name], grad=grad[name], key=key)
        wrong = jax.tree_util.tree_map(lambda g: g * (1 + 1e-3), grad[name])
        bad = dtest.taylor_test(f, v[name], grad=wrong, key=key)
        assert good.passed and good.rate > 1.9, (name, str(good))
        assert not bad.passed, (name, str(bad))
        rates[name] = (good.rate, bad.rate)
    return rates


def test_taylor_initial_state_and_scalar_parameter(periodic_cost, getkey):
    rates = _taylor_each(periodic_cost, getkey())
    assert set(rates) == {"initial_state", "kappa"}
    print("Taylor rates (good, negative control):", rates)


def test_taylor_parameter_field_and_model_error(field_cost, getkey):
    rates = _taylor_each(field_cost, getkey())
    assert set(rates) == {"initial_state", "kappa", "model_error"}
    print("Taylor rates (good, negative control):", rates)


def test_cost_equals_textbook_form(periodic_cost, getkey):
    # J(v) = 1/2 |x0 - xb|^2_{B^-1} + 1/2 |p - pb|^2 / s^2 + 1/2 sum |Hx - y|^2 / sigma^2
    cost = periodic_cost
    v = _random_control(cost, getkey())
    x0 = cost.initial_state(v)
    B = cost.control.initial_state.covariance.to_dense()
    dx = (x0 - cost.state0).reshape(-1)
    jb_x = 0.5 * dx @ jnp.linalg.solve(B, dx)
    log_k = jnp.log(cost.parameters(v)["kappa"])
    jb_p = 0.5 * (log_k - jnp.log(0.015)) ** 2 / 0.5**2
    hx = cost.predict(v)
    jo = 0.5 * jnp.sum(((hx - cost.obs.values) / cost.obs.sigma) ** 2)
    np.testing.assert_allclose(cost(v), jb_x + jb_p + jo, rtol=1e-9)


def test_nan_observations_are_masked(periodic_cost):
    cost = periodic_cost
    v = cost.init()
    values = cost.obs.values
    # Drop sensor 2 entirely and a scattered entry of sensor 4.
    nan_values = values.at[:, 2].set(jnp.nan).at[1, 4].set(jnp.nan)
    masked = eqx.tree_at(lambda c: c.obs.values, cost, nan_values)
    j, g = jax.value_and_grad(masked)(v)
    assert jnp.isfinite(j)
    assert all(jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(g))
    # Same as the cost with sensor 2 dropped, and entry (1, 4) removed by hand.
    keep = np.array([0, 1, 3, 4, 5])
    obs_drop = da.Observations(
        cost.obs.times, values[:, keep], cost.obs.positions[keep], cost.obs.sigma[keep]
    )
    dropped = da.FourDVar(
        cost.model, cost.stepper, cost.state0, obs_drop, cost.control,
        dt=cost.dt, n_steps=cost.n_steps, adjoint=dphys.Unrolled(),
    )
    r = dropped.obs_residual(v)
    j_drop = dropped(v) - 0.5 * r[1, 3] ** 2  # column 3 of `keep` is sensor 4
    np.testing.assert_allclose(j, j_drop, rtol=1e-12)
    assert float(masked.obs_residual(v)[1, 4]) == 0.0
    assert bool(jnp.isnan(masked.innovations(v)[1, 4]))


def test_weak_constraint_with_zero_forcing_equals_strong(periodic_cost, getkey):
    weak = _periodic_problem(n_windows=2)
    v = _random_control(periodic_cost, getkey())
    vw = {**v, "model_error": jnp.zeros((2, 24))}
    np.testing.assert_allclose(weak(vw), periodic_cost(v), rtol=1e-12)
    # A forcing on the second sub-window changes only observations after t = 0.5.
    eta = jnp.zeros((2, 24)).at[1].set(1.0)
    d = weak.predict({**vw, "model_error": eta}) - weak.predict(vw)
    assert jnp.all(d[:2] == 0) and jnp.all(jnp.abs(d[2:]) > 0)


def test_transforms_round_trip_and_derivative():
    z = jnp.linspace(-3.0, 3.0, 7)
    for t in [da.Identity(), da.Log(), da.Softplus(), da.Bounded(-1.0, 2.0)]:
        np.testing.assert_allclose(t.inverse(t.forward(z)), z, rtol=1e-10, atol=1e-12)
        d = jax.vmap(jax.grad(t.forward))(z)
        np.testing.assert_allclose(t.derivative(z), d, rtol=1e-12)
    assert jnp.all(da.Bounded(-1.0, 2.0).forward(30 * z) >= -1.0)


def test_cost_jit_and_vmap_over_observation_sets(periodic_cost, getkey):
    cost = periodic_cost
    v = cost.init()
    noise = 0.05 * jax.random.normal(getkey(), (3,) + cost.obs.values.shape)
    values = cost.obs.values + noise

    def j_of(vals):
        return eqx.tree_at(lambda c: c.obs.values, cost, vals)(v)

    batched = jax.jit(jax.vmap(j_of))(values)
    looped = jnp.stack([j_of(values[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-12)


def test_bad_input_errors(periodic_cost):
    cost = periodic_cost
    grid = cost.model.grid
    stepper, x0 = cost.stepper, cost.state0
    ctrl = da.Control(parameters=[da.Parameter("kappa", transform=da.Log(), sigma=1.0)])
    obs = cost.obs
    kw = dict(dt=0.1, n_steps=10)
    with pytest.raises(ValueError, match="outside the assimilation window"):
        late = da.Observations([0.5, 1.5], obs.values[:2], obs.positions, obs.sigma)
        da.FourDVar(cost.model, stepper, x0, late, ctrl, **kw)
    with pytest.raises(ValueError, match="outside the dirichlet domain"):
        wall = pdes.Heat(dphys.Grid(24, boundary="dirichlet"), kappa=0.01)
        bad = da.Observations(obs.times, obs.values, obs.positions + 0.1, obs.sigma)
        da.FourDVar(wall, stepper, x0, bad, ctrl, **kw)
    with pytest.raises(ValueError, match="n_windows"):
        me = da.Control(model_error=da.ModelError(da.Diagonal(1.0, grid.shape), 3))
        da.FourDVar(cost.model, stepper, x0, obs, me, **kw)
    with pytest.raises(ValueError, match="shape"):
        da.FourDVar(cost.model, stepper, x0[:10], obs, ctrl, **kw)
    with pytest.raises(ValueError, match="initial_state.covariance"):
        small = da.Control(initial_state=da.InitialState(da.Diagonal(1.0, (5,))))
        da.FourDVar(cost.model, stepper, x0, obs, small, **kw)
    with pytest.raises(ValueError, match="no attribute 'drag'"):
        drag = da.Control(parameters=[da.Parameter("drag", sigma=1.0)])
        da.FourDVar(cost.model, stepper, x0, obs, drag, **kw)
    with pytest.raises(ValueError, match="strictly inside"):
        neg = da.Control(
            parameters=[da.Parameter("kappa", background=-1.0, transform=da.Log(),
                                     sigma=1.0)]
        )
        da.FourDVar(cost.model, stepper, x0, obs, neg, **kw)
    with pytest.raises(ValueError, match="exactly one"):
        da.Parameter("kappa")
    with pytest.raises(ValueError, match="sigma"):
        da.Parameter("kappa", sigma=-1.0)
    with pytest.raises(ValueError, match="reserved"):
        da.Parameter("initial_state", sigma=1.0)
    with pytest.raises(ValueError, match="duplicate"):
        da.Control(parameters=[da.Parameter("kappa", sigma=1.0)] * 2)
    with pytest.raises(ValueError, match="empty"):
        da.Control()
    with pytest.raises(ValueError, match="keys"):
        cost({"kappa": jnp.zeros(())})
    with pytest.raises(ValueError, match="dt"):
        da.FourDVar(cost.model, stepper, x0, obs, ctrl, dt=-0.1, n_steps=10)
    with pytest.raises(TypeError, match="Observations"):
        da.FourDVar(cost.model, stepper, x0, obs.values, ctrl, **kw)


# ------------------------------------------------- weak constraint keeps model hooks


def _closed_basin_weak_cost():
    """A 16x16 closed basin (walls everywhere), weak constraint on 2 sub-windows."""
    n = 16
    grid = dphys.Grid((n, n), lengths=(n * 10e3, n * 10e3), boundary="neumann")
    y, x = grid.coords
    depth = 1000.0 * (1.0 + 0.2 * jnp.cos(jnp.pi * x / grid.lengths[1]))
    model = pdes.ShallowWater(grid, depth, f0=1e-4)
    eta0 = 0.5 * jnp.exp(-((x - 80e3) ** 2 + (y - 80e3) ** 2) / (30e3) ** 2)
    state0 = model.rest_state(eta0)
    stepper = dphys.CrankNicolson()
    kw = dict(dt=600.0, n_steps=4)
    obs = da.make_observations(
        model, stepper, state0, positions=[[40e3, 50e3], [120e3, 90e3]],
        times=[1200.0, 2400.0], sigma=0.01, field="eta", **kw,
    )
    std = pdes.SWState(1e-4, 1e-6, 1e-6)
    Q = jax.tree_util.tree_map(lambda s: da.Diagonal(s, shape=grid.shape), std)
    control = da.Control(model_error=da.ModelError(Q, n_windows=2))
    return da.FourDVar(model, stepper, state0, obs, control, **kw), model


def test_weak_constraint_closed_basin_keeps_solver_and_message():
    """The weak-constraint wrapper used to drop the model's hooks: a closed-basin
    shallow-water cost then ran the generic Krylov solver instead of the model's
    HelmholtzKrylov, and a dry cell failed with the generic message."""
    cost, model = _closed_basin_weak_cost()
    v = cost.init()
    assert jnp.isfinite(cost(v))
    # A model-error forcing that drains the basin: eta falls 2 m/s * 1200 s below
    # the 800-1200 m depth in the first sub-window. The model's own message says so.
    drain = jax.tree_util.tree_map(jnp.zeros_like, v)
    drain["model_error"] = eqx.tree_at(
        lambda s: s.eta, drain["model_error"], jnp.full((2, 16, 16), -2e4)
    )
    with pytest.raises(dphys.SimulationError, match="total water depth"):
        cost(drain)
    # The model each sub-window runs is resolved to the model's own solver.
    state = cost.state0
    assert type(dphys.Auto().resolve(model, state)) is pdes.HelmholtzKrylov
    models = cost.window_models(v)
    assert len(models) == 2
    for m in models:
        assert type(dphys.Auto().resolve(m, state)) is pdes.HelmholtzKrylov
        assert m.invalid_state_message == model.invalid_state_message


# --------------------------------------------------- the observation hook is data


class _Counter:
    """Hashable by identity, so it can sit in a static field."""

    def __init__(self):
        self.n = 0


class _CountingInterpolation(da.AbstractObservationOperator):
    """Interpolation that counts how often it is traced (called in Python)."""

    inner: da.Interpolation
    counter: _Counter = eqx.field(static=True)

    def __call__(self, state):
        self.counter.n += 1
        return self.inner(state)

    def transpose(self, values):
        return self.inner.transpose(values)


def test_eager_cost_calls_with_new_values_trace_the_run_once(periodic_cost, getkey):
    """FourDVar passes its observation hook as an eqx.Module (data), not a fresh
    lambda per call: three eager evaluations with new controls trace the run
    once (before, every call retraced dphys.simulate's loop)."""
    cost = periodic_cost
    counter = _Counter()
    op = _CountingInterpolation(cost.obs_op, counter)
    cost = eqx.tree_at(lambda c: c.obs_op, cost, op)
    values = [_random_control(cost, getkey()) for _ in range(3)]
    cost(values[0])
    traced = counter.n
    assert traced > 0
    for v in values[1:]:
        cost(v)
    assert counter.n == traced


def test_posterior_pushes_every_block_forward():
    """Each control variable turns its block of the whitened posterior covariance
    into standard deviations of its physical value: here the model error,
    eta = 0.2 w, has std 0.2 sqrt(C_ww) entry by entry."""
    cost = _periodic_problem(n_windows=2)
    v = cost.init()
    post = eqx.filter_jit(da.posterior)(cost, v, method="dense")
    assert set(post.stds) == {"initial_state", "kappa", "model_error"}
    assert post.stds["model_error"].shape == (2, 24)
    cov = jnp.linalg.inv(da.gauss_newton_operator(cost, v).as_matrix())
    flat, unravel = jax.flatten_util.ravel_pytree(v)
    index = unravel(jnp.arange(flat.size, dtype=flat.dtype))
    i = jnp.ravel(index["model_error"]).astype(int)
    expected = 0.2 * jnp.sqrt(jnp.diagonal(cov)[i]).reshape(2, 24)
    np.testing.assert_allclose(post.stds["model_error"], expected, rtol=1e-8)
    # kappa = exp(z): the physical std is kappa times the std of z.
    kappa = cost.parameters(v)["kappa"]
    np.testing.assert_allclose(
        post.stds["kappa"], kappa * post.stds_unconstrained["kappa"], rtol=1e-10
    )
    np.testing.assert_allclose(post.std, [post.stds["kappa"]], rtol=1e-12)
    assert post.labels == ("kappa",)


def test_weak_constraint_sub_windows_start_at_their_own_time(getkey):
    """A time-dependent model (a source that varies in time) and t0 != 0: sub-window
    j must run from t0 + j m dt. With zero model error the weak-constraint forecast
    equals the strong-constraint one; with model error it equals a chain of runs
    started by hand at each sub-window's own time. (With an autonomous model a
    sub-window started at the wrong time gives the same answer.)"""
    grid = dphys.Grid(16, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    shape = jnp.cos(2 * jnp.pi * x)
    model = pdes.Heat(grid, kappa=0.01, source_fn=lambda t: jnp.sin(3.0 * t) * shape)
    stepper = dphys.CrankNicolson()
    t0, dt, n_steps, n_windows = 0.3, 0.1, 12, 3
    obs = da.make_observations(
        model,
        stepper,
        jnp.sin(2 * jnp.pi * x),
        positions=jnp.linspace(0.05, 0.9, 5),
        times=jnp.array([0.45, 0.7, 0.95, 1.2, 1.5]),
        sigma=0.05,
        dt=dt,
        n_steps=n_steps,
        t0=t0,
    )
    B = da.Diffusion(grid, 0.1, std=0.3)
    kw = dict(dt=dt, n_steps=n_steps, t0=t0, adjoint=dphys.Unrolled())
    xb = 0.9 * jnp.sin(2 * jnp.pi * x)
    strong = da.FourDVar(
        model, stepper, xb, obs, da.Control(initial_state=da.InitialState(B)), **kw
    )
    me = da.ModelError(da.Diagonal(0.5, shape=grid.shape), n_windows=n_windows)
    weak = da.FourDVar(
        model,
        stepper,
        xb,
        obs,
        da.Control(initial_state=da.InitialState(B), model_error=me),
        **kw,
    )
    v = {"initial_state": 0.3 * jax.random.normal(getkey(), grid.shape)}
    zero = {**v, "model_error": jnp.zeros((n_windows, 16))}
    np.testing.assert_allclose(weak.predict(zero), strong.predict(v), rtol=1e-12)
    np.testing.assert_allclose(
        weak.final_state(zero), strong.final_state(v), rtol=1e-12, atol=1e-14
    )
    forced = {**v, "model_error": jax.random.normal(getkey(), (n_windows, 16))}
    eta = weak.forcings(forced)
    m = n_steps // n_windows
    state = weak.initial_state(forced)
    for j in range(n_windows):
        sub = dphys.Augmented(model, forcing=eta[j])
        state = dphys.simulate(
            sub, stepper, state, dt=dt, n_steps=m, t0=t0 + j * m * dt
        ).final
    np.testing.assert_allclose(weak.final_state(forced), state, rtol=1e-12, atol=1e-14)
    # The time dependence matters: the same chain started at t0 every time differs.
    wrong = weak.initial_state(forced)
    for j in range(n_windows):
        sub = dphys.Augmented(model, forcing=eta[j])
        wrong = dphys.simulate(sub, stepper, wrong, dt=dt, n_steps=m, t0=t0).final
    assert float(jnp.max(jnp.abs(wrong - state))) > 1e-3


def test_all_observations_missing_warns():
    """A window whose observations are all NaN has no observation term: building
    its cost warns, and the analysis is the background."""
    cost = _periodic_problem()
    nan = jnp.full_like(cost.obs.values, jnp.nan)
    empty = eqx.tree_at(lambda o: o.values, cost.obs, nan)
    args = (cost.model, cost.stepper, cost.state0, empty, cost.control)
    kw = dict(dt=cost.dt, n_steps=cost.n_steps, adjoint=dphys.Unrolled())
    with pytest.warns(UserWarning, match=r"all 24 observation values .* are missing"):
        blind = da.FourDVar(*args, **kw)
    v = _random_control(cost, jax.random.key(0))
    assert float(blind.costs(v)[2]) == 0.0  # no observation term
    # One observed value is enough: no warning.
    one = eqx.tree_at(lambda o: o.values, empty, empty.values.at[1, 2].set(0.3))
    da.FourDVar(*args[:3], one, args[4], **kw)
