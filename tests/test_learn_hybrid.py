"""Hybrid physics + network models (assimilation.learn._hybrid, _protocols).

Float64 throughout (tests/conftest.py). Problems are tiny (16x16 periodic or a
32-cell bounded line, a few steps) so each test runs in seconds.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import pytest

import dphys
import dphys.testing as dtest
import pdes
from assimilation.learn import (
    FourierField,
    LocalTendency,
    SubwindowForcing,
    Sum,
    rollout,
    stability,
)


STEPPERS = {
    "backward_euler": dphys.BackwardEuler(),
    "crank_nicolson": dphys.CrankNicolson(),
    "theta_0.7": dphys.Theta(0.7),
    "imex": dphys.IMEX(),
    "bdf2": dphys.BDF2(),
}
KRYLOV = dphys.CrankNicolson(solver=dphys.Krylov(rtol=1e-13))
SAVE = (3, 6)


def _grid(n=16):
    return dphys.Grid((n, n), lengths=1.0, boundary="periodic")


def _physics(grid, kappa=3e-3):
    return pdes.Advection(grid, velocity=(0.5, 1.0), kappa=kappa)


def _state(grid, key):
    y, x = grid.coords
    smooth = jnp.sin(2 * jnp.pi * x) * jnp.cos(2 * jnp.pi * y)
    return smooth + 0.3 * jr.normal(key, grid.shape)


def _net(grid, key, **kw):
    kw = dict(width=4, depth=1, kernel_size=3, zero_init=False, **kw)
    return LocalTendency(grid, key=key, **kw)


@pytest.mark.parametrize("name", sorted(STEPPERS))
def test_zero_network_reproduces_the_physics(name, getkey):
    stepper = STEPPERS[name]
    grid = _grid()
    phys = _physics(grid)
    u0 = _state(grid, getkey())
    hybrid = dphys.Augmented(
        phys,
        explicit=LocalTendency(grid, key=getkey(), kernel_size=3, depth=2),
        forcing=FourierField(grid, 2),
    )
    ref = rollout(phys, stepper, u0, dt=0.01, n_steps=6, save_steps=SAVE)
    out = rollout(hybrid, stepper, u0, dt=0.01, n_steps=6, save_steps=SAVE)
    # Bitwise where both take the same solve; the physics alone on the FFT path
    # applies its one-step propagator instead, equal to round-off.
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-13)
    if name in ("backward_euler", "imex", "bdf2"):
        assert np.array_equal(out, ref)


def _rollout_loss(stepper, u0, y, *, gradient="solver"):
    def loss(params):
        net, log_kappa = params
        model = dphys.Augmented(_physics(u0_grid(u0), jnp.exp(log_kappa)), explicit=net)
        ys = rollout(
            model,
            stepper,
            u0,
            dt=0.01,
            n_steps=6,
            save_steps=SAVE,
            gradient=gradient,
            observe=_sensors,
        )
        return 0.5 * jnp.sum((ys - y) ** 2)

    return loss


def u0_grid(u0):
    return _grid(u0.shape[0])


def _sensors(t, u):
    return u[::4, ::3].ravel()


def _wrong(grad, factor=1.01):
    return jtu.tree_map(lambda g: factor * g, grad)


@pytest.mark.parametrize(
    "name",
    [*sorted(STEPPERS), pytest.param("krylov", marks=pytest.mark.slow)],
)
def test_taylor_rollout_loss_weights_and_kappa(name, getkey):
    """Gradient of a sensor loss through implicit steps w.r.t. the network weights
    and the physical diffusivity, for every stepper with an explicit part (and a
    GMRES-solved step, slow); a 1% wrong gradient must fail. The diffusivity is
    also checked alone (a direction along log kappa only)."""
    stepper = KRYLOV if name == "krylov" else STEPPERS[name]
    grid = _grid()
    u0 = _state(grid, getkey())
    net = _net(grid, getkey())
    y = 0.1 * jr.normal(getkey(), (len(SAVE), 24))
    loss = _rollout_loss(stepper, u0, y)
    params = (net, jnp.log(jnp.asarray(3e-3)))
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    f = jax.jit(lambda a: loss(eqx.combine(a, static)))
    grad = jax.jit(jax.grad(f))(arrays)
    key = getkey()
    good = dtest.taylor_test(f, arrays, grad=grad, key=key)
    assert good.passed, good
    bad = dtest.taylor_test(f, arrays, grad=_wrong(grad), key=key)
    assert not bad.passed, bad
    if name == "crank_nicolson":
        along = (jtu.tree_map(jnp.zeros_like, arrays[0]), jnp.ones(()))
        assert dtest.taylor_test(f, arrays, grad=grad, direction=along).passed
        wrong = (grad[0], 1.01 * grad[1])
        assert not dtest.taylor_test(f, arrays, grad=wrong, direction=along).passed


def test_taylor_subwindow_forcing(getkey):
    grid = _grid()
    u0 = _state(grid, getkey())
    net = Sum(_net(grid, getkey()), FourierField(grid, 2, key=getkey(), init_scale=0.3))
    y = 0.1 * jr.normal(getkey(), (len(SAVE), 24))

    def loss(params):
        network, log_kappa = params
        model = SubwindowForcing(_physics(grid, jnp.exp(log_kappa)), network, 3)
        ys = rollout(
            model,
            dphys.CrankNicolson(),
            u0,
            dt=0.01,
            n_steps=6,
            save_steps=SAVE,
            observe=_sensors,
        )
        return 0.5 * jnp.sum((ys - y) ** 2)

    params = (net, jnp.log(jnp.asarray(3e-3)))
    arrays, static = eqx.partition(params, eqx.is_inexact_array)
    f = jax.jit(lambda a: loss(eqx.combine(a, static)))
    grad = jax.grad(f)(arrays)
    key = getkey()
    assert dtest.taylor_test(f, arrays, grad=grad, key=key).passed
    assert not dtest.taylor_test(f, arrays, grad=_wrong(grad), key=key).passed


def test_subwindow_forcing_is_weak_constraint_forcing(getkey):
    """A SubwindowForcing whose network returns a constant is the model with that
    constant forcing on each sub-window (the weak-constraint 4D-Var forward run)."""
    grid = _grid()
    phys = _physics(grid)
    u0 = _state(grid, getkey())
    eta = jr.normal(getkey(), grid.shape)
    sw = SubwindowForcing(phys, lambda t, u: eta, 3)
    ref = rollout(
        dphys.Augmented(phys, forcing=eta),
        dphys.CrankNicolson(),
        u0,
        dt=0.01,
        n_steps=6,
        save_steps=SAVE,
    )
    out = rollout(sw, dphys.CrankNicolson(), u0, dt=0.01, n_steps=6, save_steps=SAVE)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=1e-13)


def test_stop_gradient_rollout(getkey):
    """Same values as the solver-in-the-loop rollout; the gradient is the sum of
    the local sensitivities dt dF/dp at the states before each save (computed here
    from the saved trajectory), not the true gradient."""
    grid = _grid()
    u0 = _state(grid, getkey())
    net = _net(grid, getkey())
    y = 0.1 * jr.normal(getkey(), (len(SAVE), 24))
    stepper = dphys.CrankNicolson()
    solver = _rollout_loss(stepper, u0, y)
    sg = _rollout_loss(stepper, u0, y, gradient="stop_gradient")
    params = (net, jnp.log(jnp.asarray(3e-3)))
    assert float(solver(params)) == pytest.approx(float(sg(params)), rel=1e-12)
    g_sg = eqx.filter_grad(sg)(params)
    g_true = eqx.filter_grad(solver)(params)

    def model_of(p):
        return dphys.Augmented(_physics(grid, jnp.exp(p[1])), explicit=p[0])

    states = rollout(
        model_of(params), stepper, u0, dt=0.01, n_steps=6, save_steps=(2, 3, 5, 6)
    )
    ys = jax.vmap(lambda u: _sensors(0.0, u))(states[jnp.asarray([1, 3])])
    expected = None
    for i, (prev, t) in enumerate(((states[0], 0.02), (states[2], 0.05))):
        cot = jnp.zeros(grid.shape).at[::4, ::3].set((ys[i] - y[i]).reshape(4, 6))
        _, vjp = eqx.filter_vjp(
            lambda p, t=t, prev=prev: 0.01 * model_of(p).vector_field(t, prev),
            params,
        )
        (g,) = vjp(cot)
        expected = g if expected is None else jtu.tree_map(jnp.add, expected, g)
    for a, b in zip(jtu.tree_leaves(g_sg), jtu.tree_leaves(expected), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-14)
    diff = max(
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jtu.tree_leaves(g_sg), jtu.tree_leaves(g_true), strict=True)
    )
    assert diff > 1e-3


def test_fourier_field_is_band_limited_and_scaled(getkey):
    grid = _grid(32)
    y, x = grid.coords
    field = FourierField(grid, 2)
    # One coefficient: a cosine of amplitude ~ the coefficient.
    c = field.coefficients.at[0, 1, 2].set(0.7)  # k_y = 1, k_x = 2
    g = eqx.tree_at(lambda f: f.coefficients, field, c)()
    np.testing.assert_allclose(
        g, 0.7 * np.cos(2 * np.pi * (2 * x + y)), rtol=1e-12, atol=1e-12
    )
    pos = FourierField(grid, 1, transform=jnp.exp, offset=np.log(2e-3))
    np.testing.assert_allclose(pos(), 2e-3, rtol=1e-12)
    with pytest.raises(ValueError, match="periodic"):
        FourierField(dphys.Grid(16, boundary="dirichlet"), 2)
    with pytest.raises(ValueError, match="n_modes"):
        FourierField(grid, 16)


def test_local_tendency_is_translation_equivariant(getkey):
    grid = _grid()
    net = _net(grid, getkey())
    u = _state(grid, getkey())
    shifted = jnp.roll(u, (3, -5), axis=(0, 1))
    np.testing.assert_allclose(
        net(0.0, shifted), jnp.roll(net(0.0, u), (3, -5), axis=(0, 1)), atol=1e-13
    )


def test_bad_input(getkey):
    grid = _grid()
    with pytest.raises(ValueError, match="kernel_size"):
        LocalTendency(grid, kernel_size=2, key=getkey())
    with pytest.raises(TypeError, match="grid"):
        LocalTendency("grid", key=getkey())
    with pytest.raises(ValueError, match="inputs"):
        LocalTendency(grid, inputs=jnp.zeros((2, 3, 3)), key=getkey())
    phys = _physics(grid)
    u0 = _state(grid, getkey())
    with pytest.raises(ValueError, match="gradient"):
        rollout(
            phys,
            dphys.CrankNicolson(),
            u0,
            dt=0.01,
            n_steps=2,
            save_steps=(1,),
            gradient="truncated",
        )
    with pytest.raises(ValueError, match="save_steps"):
        rollout(phys, dphys.CrankNicolson(), u0, dt=0.01, n_steps=2, save_steps=(3,))
    sw = SubwindowForcing(phys, lambda t, u: u, 4)
    with pytest.raises(ValueError, match="steps_per_window"):
        rollout(sw, dphys.CrankNicolson(), u0, dt=0.01, n_steps=6, save_steps=(6,))
    with pytest.raises(TypeError, match="network"):
        SubwindowForcing(phys, 3.0, 2)


def test_stability_detects_blow_up(getkey):
    grid = _grid()
    phys = _physics(grid)
    u0 = jnp.stack([_state(grid, getkey()) for _ in range(2)])
    ok = stability(
        phys,
        dphys.CrankNicolson(),
        u0,
        dt=0.01,
        n_steps=40,
        invariants={"mass": grid.integrate},
    )
    assert ok.stable and ok.invariants["mass"] < 1e-12
    # An anti-damping learned term (+5 u) blows up by e^(5 t): caught.
    grow = dphys.Augmented(phys, explicit=lambda t, u: 5.0 * u)
    bad = stability(grow, dphys.CrankNicolson(), u0, dt=0.01, n_steps=100)
    assert not bad.stable and bad.growth > 10


def test_exactly_representable_correction_is_recovered(getkey):
    """The truth lacks nothing but a linear damping -0.8 u; a pointwise linear
    network N(u) = a u + b (depth 0) represents it exactly. Calibrated from 8
    sparse noisy sensors per window (initial states analysed per window, the
    network weights shared: bilevel, profile cost), a and b are recovered within
    3 Laplace standard deviations, which are at the noise level (small)."""
    import assimilation as da
    from assimilation.learn import Bilevel, calibrate, make_windows

    grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
    phys = pdes.Advection(grid, velocity=0.5, kappa=4e-3)
    truth = dphys.Augmented(phys, explicit=lambda t, u: -0.8 * u)
    cov = da.Diffusion(grid, 0.15, std=1.0, normalization="constant")
    obs = da.Observations(
        0.05 * np.arange(1, 5),
        jnp.zeros((4, 8)),
        (np.arange(8)[:, None] + 0.3) / 8,
        0.02,
    )
    cost = da.FourDVar(
        phys,
        dphys.CrankNicolson(),
        jnp.zeros(grid.shape),
        obs,
        da.Control(initial_state=da.InitialState(cov)),
        dt=0.01,
        n_steps=20,
        throw=False,
    )
    windows = make_windows(cost, cov, n_windows=4, key=getkey(), truth_model=truth)
    net = LocalTendency(grid, depth=0, kernel_size=1, key=getkey())

    def apply(theta, c):
        return eqx.tree_at(lambda c: c.model, c, dphys.Augmented(phys, explicit=theta))

    problem = Bilevel(
        cost,
        apply,
        method=da.GaussNewton(inner_rtol=1e-12, inner_max_steps=300),
        stop=da.StoppingRule(max_iterations=10, gtol=1e-9, ftol=0.0),
        hessian="gauss_newton",
    )
    cal = calibrate(problem, net, windows.obs, n_iterations=8)
    a, b = float(cal.theta.weights[0].ravel()[0]), float(cal.theta.biases[0][0])
    sa, sb = float(cal.std.weights[0].ravel()[0]), float(cal.std.biases[0][0])
    assert abs(a + 0.8) <= 3 * sa, (a, sa)
    assert abs(b) <= 3 * sb, (b, sb)
    assert sa < 0.1 and sb < 0.05, (sa, sb)
    # The physics alone (a = b = 0) is far outside that uncertainty.
    assert abs(0.0 + 0.8) > 10 * sa


# ------------------------------------------------------------------- protocols


@functools.cache
def _twin(n_windows=4):
    """A tiny seeded twin (8x8, 8 CN steps, 12 sensors), built once per session:
    the protocol tests only read it."""
    import assimilation as da
    from assimilation.learn import make_windows

    grid = _grid(8)
    phys = _physics(grid)
    truth = dphys.Augmented(phys, explicit=lambda t, u: -2.0 * u**3)
    cov = da.Diffusion(grid, 0.15, std=1.0, normalization="constant")
    positions = jr.uniform(jr.key(7), (12, 2))
    obs = da.Observations(
        0.01 * np.arange(2, 9, 2), jnp.zeros((4, 12)), positions, 0.05
    )
    cost = da.FourDVar(
        phys,
        dphys.CrankNicolson(),
        jnp.zeros(grid.shape),
        obs,
        da.Control(initial_state=da.InitialState(cov)),
        dt=0.01,
        n_steps=8,
        throw=False,
    )
    windows = make_windows(
        cost,
        cov,
        n_windows=n_windows,
        key=jr.key(11),
        truth_model=truth,
        save_steps=(2, 4, 6, 8),
    )
    return cost, cov, truth, windows


def test_rollout_misfit_is_zero_from_the_truth(getkey):
    """Rolled out from the true states with the true model, the scored residuals
    against noise-free records vanish: the segments, observation rows and time
    interpolation line up with the template cost; from the physics model they do
    not."""
    from assimilation.learn import ModelErrorData, rollout_misfit

    cost, _, truth, w = _twin()
    states = jnp.concatenate([w.truth_x0[:, None], w.truth_states], axis=1)
    data = ModelErrorData(
        obs=w.clean_obs,
        analyses=states,
        forcings=jnp.zeros_like(states[:, 1:]),
        analysis_steps=(0, 2, 4, 6, 8),
    )
    for horizon in (2, 4, 8):
        r, wts = rollout_misfit(truth, cost, data[0], horizon=horizon)
        assert float(jnp.sum(wts)) == (4 if horizon != 8 else 4) * 12
        assert float(jnp.max(jnp.abs(r))) < 1e-10
    r, _ = rollout_misfit(cost.model, cost, data[0], horizon=8)
    assert float(jnp.max(jnp.abs(r))) > 0.1
    # A sensor subset scores only those sensors.
    keep = jnp.arange(12) < 5
    r, wts = rollout_misfit(cost.model, cost, data[0], horizon=4, sensors=keep)
    assert float(jnp.sum(wts)) == 4 * 5


def test_analyses_are_the_weak_constraint_trajectory(getkey):
    """analyse_windows: each analysis state is the previous one advanced over its
    sub-window by the model plus the analysed forcing; the analyses fit the
    sensors far better than the background."""
    import assimilation as da
    from assimilation.learn import analyse_windows, rollout

    cost, cov, _, w = _twin()
    q = da.Diffusion(cost.model.grid, 0.15, std=2.0, normalization="constant")
    data = analyse_windows(cost, w.obs[:2], model_error_cov=q, n_subwindows=4)
    assert data.analysis_steps == (0, 2, 4, 6, 8)
    for j in range(4):
        forced = dphys.Augmented(cost.model, forcing=data.forcings[0, j])
        nxt = rollout(
            forced,
            cost.stepper,
            data.analyses[0, j],
            dt=0.01,
            n_steps=2,
            save_steps=(2,),
            t0=0.02 * j,
        )[0]
        np.testing.assert_allclose(nxt, data.analyses[0, j + 1], atol=1e-12)
    from assimilation.learn import rollout_misfit

    r, wts = rollout_misfit(cost.model, cost, data[0], horizon=2)
    assert float(jnp.sum(r**2) / jnp.sum(wts)) < 1.5  # near the noise level


@pytest.mark.parametrize("protocol", ["one_step", "stop_gradient", "solver"])
def test_protocols_train_and_report(protocol, getkey):
    import optax

    import assimilation as da
    from assimilation.learn import (
        ModelErrorData,
        evaluate,
        freeze,
        one_step_loss,
        rollout_loss,
        train_correction,
    )

    cost, _, _, w = _twin()
    states = jnp.concatenate([w.truth_x0[:, None], w.truth_states], axis=1)
    # Dense true states and exact per-interval tendencies stand in for analyses
    # here (the protocols only read them).
    forcings = -2.0 * states[:, :-1] ** 3
    data = ModelErrorData(w.obs, states, forcings, (0, 2, 4, 6, 8))
    net = LocalTendency(cost.model.grid, width=4, depth=1, key=getkey())
    hybrid = dphys.Augmented(cost.model, explicit=net)
    # Only the network trains: Adam's first steps would move the physics'
    # velocity and kappa by the learning rate, far beyond their scale.
    res = train_correction(
        hybrid,
        data,
        cost,
        protocol=protocol,
        n_steps=6,
        key=getkey(),
        physics=cost.model,
        optimizer=optax.adam(3e-2),
        batch_size=2,
        # The curriculum is exercised once (two stages of compilation).
        curriculum=(2, 8) if protocol == "solver" else (8,),
        trainable=freeze(hybrid, lambda m: m.model),
        report_memory=True,
        stability_check=lambda m: stability(
            m, cost.stepper, data.analyses[:2, 0], dt=0.01, n_steps=20
        ),
    )
    assert res.stats["steps"] == 6 and res.stats["step_memory_bytes"] > 0
    assert all(np.isfinite(res.history["train_loss"]))
    # The whole-window sensor loss (or the one-step loss) decreased.
    if protocol == "one_step":
        score = one_step_loss(cost.model, t0=cost.t0, dt=cost.dt)
    else:
        score = rollout_loss(cost, horizon=8)
    before = evaluate(hybrid, score, data, key=getkey())["loss"]
    after = evaluate(res.model, score, data, key=getkey())["loss"]
    # Six Adam steps from a zero output layer: the rollout losses fall by more than
    # 10%; the one-step loss of the cubic tendency (entries up to ~15) by 5% here.
    assert after < (0.97 if protocol == "one_step" else 0.9) * before, (before, after)
    assert res.history["stability"] and res.history["stability"][-1].stable
    if protocol == "solver":
        assert set(res.history["horizon"]) == {2, 8}
    with pytest.raises(ValueError, match="protocol"):
        train_correction(
            hybrid, data, cost, protocol="adjoint", n_steps=1, key=getkey()
        )
    del da
