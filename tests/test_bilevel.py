"""Bilevel calibration (assimilation.learn._bilevel): implicit and unrolled
hypergradients, the convergence gate, outer Gauss-Newton with Laplace std and its
coverage, joint estimation. Float64; a 1D periodic advection-diffusion twin of 32
cells whose initial state is analysed per window (inner problem) and whose
diffusivity is shared (outer problem)."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import assimilation as da
import dphys
import pdes
from assimilation.learn import Bilevel, calibrate, joint_estimate, make_windows


N, N_STEPS, KAPPA = 32, 20, 4e-3


def _cubic(t, u):
    return -2.0 * u**3


def _cost(kappa=KAPPA, n_sensors=8, sigma=0.02, nonlinear=False):
    grid = dphys.Grid(N, lengths=1.0, boundary="periodic")
    model = pdes.Advection(grid, velocity=0.5, kappa=kappa)
    if nonlinear:
        model = dphys.Augmented(model, explicit=_cubic)
    cov = da.Diffusion(grid, 0.15, std=1.0, normalization="constant")
    positions = (np.arange(n_sensors) + 0.3) / n_sensors
    times = 0.05 * np.arange(1, 5)
    obs = da.Observations(times, jnp.zeros((4, n_sensors)), positions[:, None], sigma)
    return da.FourDVar(
        model,
        dphys.CrankNicolson(),
        jnp.zeros(grid.shape),
        obs,
        da.Control(initial_state=da.InitialState(cov)),
        dt=0.01,
        n_steps=N_STEPS,
        throw=False,
    ), cov


def _physics(model):
    return model.model if isinstance(model, dphys.Augmented) else model


def _set_kappa(theta, cost):
    kappa = jnp.exp(theta["log_kappa"])
    return eqx.tree_at(lambda c: _physics(c.model).kappa, cost, kappa)


def _windows(cost, cov, n, key, kappa=KAPPA):
    truth = eqx.tree_at(lambda m: _physics(m).kappa, cost.model, jnp.asarray(kappa))
    return make_windows(cost, cov, n_windows=n, key=key, truth_model=truth)


def _outer_later(cost):
    """Inner: the first two observation times; outer: the last two (a forecast
    misfit)."""
    n_t, n_s = cost.obs.values.shape
    inner = np.zeros((n_t, n_s), bool)
    inner[:2] = True
    return inner, ~inner


def _problem(cost, **kw):
    inner, outer = _outer_later(cost)
    stop = da.StoppingRule(max_iterations=20, gtol=1e-12, ftol=0.0)
    method = da.GaussNewton(inner_rtol=1e-13, inner_max_steps=200)
    kw = dict(inner_mask=inner, outer_mask=outer, method=method, stop=stop) | kw
    return Bilevel(cost, _set_kappa, **kw)


def _fd(f, x, h):
    return (f(x + h) - f(x - h)) / (2 * h)


def test_implicit_hypergradient_equals_finite_differences(getkey):
    cost, cov = _cost()
    windows = _windows(cost, cov, 2, getkey(), kappa=2 * KAPPA)
    problem = _problem(cost)
    y = windows.obs[0]
    loss = jax.jit(lambda lk: problem.loss({"log_kappa": lk}, y))
    lk = jnp.log(jnp.asarray(KAPPA))
    g = jax.grad(lambda lk: problem.loss({"log_kappa": lk}, y))(lk)
    fd = _fd(loss, lk, 1e-4)
    # The central difference's own error is O(h^2 f''') ~ 1e-8 relative here.
    assert abs(float(g) - float(fd)) <= 1e-6 * abs(float(fd)), (g, fd)
    # Forward mode (jacfwd through the same rule) agrees with reverse mode.
    gf = jax.jacfwd(lambda lk: problem.loss({"log_kappa": lk}, y))(lk)
    np.testing.assert_allclose(gf, g, rtol=1e-10)
    # A wrong sign on the implicit term would not: the total derivative differs
    # from the partial one (the inner optimum moves with kappa).
    partial = jax.grad(
        lambda lk: (
            0.5
            * jnp.sum(
                _partial_residual(
                    problem,
                    {"log_kappa": lk},
                    y,
                    problem.solve(
                        {"log_kappa": jnp.log(jnp.asarray(KAPPA))}, y
                    ).control,
                )
                ** 2
            )
        )
    )(lk)
    assert abs(float(partial) - float(g)) > 1e-3 * abs(float(g))


def _partial_residual(problem, theta, y, v):
    cost = problem.inner_cost(theta, y)
    hx = cost.forecast(v)[0]
    valid = problem.outer_mask
    return jnp.where(valid, (hx - jnp.where(valid, y, 0)) / cost.obs.sigma, 0)


def test_unrolled_hypergradient_converges_to_the_implicit_one(getkey):
    """A nonlinear inner problem (cubic damping): Gauss-Newton needs several
    iterations; the hypergradient unrolled through them converges to the implicit
    one (< 1e-6 relative), while one unrolled iteration is far from it."""
    cost, cov = _cost(nonlinear=True)
    windows = _windows(cost, cov, 1, getkey(), kappa=2 * KAPPA)
    y = windows.obs[0]
    lk = jnp.log(jnp.asarray(KAPPA))
    implicit = jax.grad(lambda lk: _problem(cost).loss({"log_kappa": lk}, y))(lk)

    # Reverse mode through each unrolled CG solve is lineax's transposed solve,
    # which must itself converge: a tolerance CG reaches in float64.
    method = da.GaussNewton(inner_rtol=1e-11, inner_max_steps=400)

    def unrolled(n):
        problem = _problem(cost, gradient="unrolled", n_unroll=n, method=method)
        return jax.grad(lambda lk: problem.loss({"log_kappa": lk}, y))(lk)

    rel = lambda g: abs(float(g) - float(implicit)) / abs(float(implicit))
    assert rel(unrolled(12)) < 1e-6, rel(unrolled(12))
    assert rel(unrolled(1)) > 1e-3, rel(unrolled(1))


def test_gauss_newton_hypergradient_is_close(getkey):
    """The Gauss-Newton IFT drops the residual's curvature: close to, not equal
    to, the exact hypergradient when the inner residual is small."""
    cost, cov = _cost()
    windows = _windows(cost, cov, 1, getkey(), kappa=2 * KAPPA)
    y = windows.obs[0]
    lk = jnp.log(jnp.asarray(KAPPA))
    exact = jax.grad(lambda lk: _problem(cost).loss({"log_kappa": lk}, y))(lk)
    gn = _problem(cost, hessian="gauss_newton")
    g_gn = jax.grad(lambda lk: gn.loss({"log_kappa": lk}, y))(lk)
    rel = abs(float(g_gn) - float(exact)) / abs(float(exact))
    assert 0 < rel < 0.1, rel


def test_gate_refuses_an_unconverged_inner_problem(getkey):
    cost, cov = _cost()
    windows = _windows(cost, cov, 1, getkey())
    y = windows.obs[0]
    problem = _problem(
        cost,
        stop=da.StoppingRule(max_iterations=1, gtol=1e-14, ftol=0.0),
        method=da.GaussNewton(inner_max_steps=2, inner_rtol=1e-13),
    )
    lk = jnp.log(jnp.asarray(KAPPA))
    # The value alone is allowed (and says it is not converged)...
    assert problem.solve({"log_kappa": lk}, y).result != da.RESULTS.successful
    float(problem.loss({"log_kappa": lk}, y))
    # ...a hypergradient is not.
    with pytest.raises(Exception, match="did not converge"):
        jax.grad(lambda lk: problem.loss({"log_kappa": lk}, y))(lk)
    with pytest.raises(Exception, match="did not converge"):
        jax.jit(jax.grad(lambda lk: problem.loss({"log_kappa": lk}, y)))(lk)


def test_calibrate_recovers_kappa_and_joint_estimate_agrees(getkey):
    """Profile calibration (no held-out set) with the Gauss-Newton hypergradient
    and joint estimation are the same estimator: same kappa, same marginal std."""
    cost, cov = _cost()
    windows = _windows(cost, cov, 4, getkey(), kappa=2 * KAPPA)
    stop = da.StoppingRule(max_iterations=20, gtol=1e-10, ftol=0.0)
    method = da.GaussNewton(inner_rtol=1e-12, inner_max_steps=300)
    problem = Bilevel(
        cost, _set_kappa, method=method, stop=stop, hessian="gauss_newton"
    )
    theta0 = {"log_kappa": jnp.log(jnp.asarray(KAPPA))}
    cal = calibrate(problem, theta0, windows.obs, n_iterations=15, prior_precision=1.0)
    true = np.log(2 * KAPPA)
    est, std = float(cal.theta["log_kappa"]), float(cal.std["log_kappa"])
    assert abs(est - true) < 3 * std, (est, true, std)
    assert std < 0.2
    theta_j, std_j, sol = joint_estimate(
        problem,
        theta0,
        windows.obs,
        prior_std=1.0,
        method=method,
        stop=da.StoppingRule(max_iterations=30, gtol=1e-9, ftol=0.0),
    )
    assert sol.result == da.RESULTS.successful
    np.testing.assert_allclose(theta_j["log_kappa"], est, rtol=0, atol=1e-4 * std)
    np.testing.assert_allclose(std_j["log_kappa"], std, rtol=1e-3)


@pytest.mark.slow
def test_laplace_coverage(getkey):
    """Over 40 independent twins, the calibrated log kappa lies within 2 Laplace
    std of the truth about 95% of the time (binomial: at least 33 of 40 with
    probability > 0.99 if the std is right; a std halved would give ~68%)."""
    cost, cov = _cost()
    stop = da.StoppingRule(max_iterations=20, gtol=1e-10, ftol=0.0)
    method = da.GaussNewton(inner_rtol=1e-12, inner_max_steps=300)
    problem = Bilevel(
        cost, _set_kappa, method=method, stop=stop, hessian="gauss_newton"
    )
    theta0 = {"log_kappa": jnp.log(jnp.asarray(KAPPA))}
    true = np.log(2 * KAPPA)
    inside, inside_half = 0, 0
    for i in range(40):
        windows = _windows(cost, cov, 2, jr.fold_in(getkey(), i), kappa=2 * KAPPA)
        cal = calibrate(problem, theta0, windows.obs, n_iterations=10)
        err = abs(float(cal.theta["log_kappa"]) - true)
        inside += err <= 2 * float(cal.std["log_kappa"])
        inside_half += err <= float(cal.std["log_kappa"])
    assert inside >= 33, inside
    assert inside_half < 38, inside_half  # the std is not grossly inflated either


def test_bad_input():
    cost, _ = _cost()
    with pytest.raises(ValueError, match="gradient"):
        Bilevel(cost, _set_kappa, gradient="truncated")
    with pytest.raises(ValueError, match="hessian"):
        Bilevel(cost, _set_kappa, hessian="bfgs")
    with pytest.raises(ValueError, match="inner_mask"):
        Bilevel(cost, _set_kappa, inner_mask=np.ones((2, 2), bool))
    with pytest.raises(TypeError, match="apply"):
        Bilevel(cost, 3)
    with pytest.raises(TypeError, match="AbstractCost"):
        Bilevel("cost", _set_kappa)
