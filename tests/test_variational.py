"""4D-Var minimisation: Kalman-filter equivalence, recovery, coverage, GN vs L-BFGS."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import assimilation as da
import dphys
import pdes


# ----------------------------------------------------------------------------- helpers

KAPPA_TRUE = 0.01
KAPPA_BACKGROUND = 0.02


def _heat_twin(*, control_state=True, n_times=20, adjoint=dphys.Checkpointed(), throw=True):
    """Periodic heat, 8 sensors, 1% noise (of the rms signal); kappa (+ state)."""
    grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    u0 = jnp.sin(2 * jnp.pi * x) + 0.5 * jnp.cos(6 * jnp.pi * x)
    stepper = dphys.CrankNicolson()
    truth = pdes.Heat(grid, kappa=KAPPA_TRUE)
    pos = jnp.linspace(0.03, 0.97, 8)
    times = jnp.linspace(5.0 / n_times, 5.0, n_times)
    kw = dict(positions=pos, times=times, dt=0.1, n_steps=50)
    clean = da.make_observations(truth, stepper, u0, sigma=1.0, **kw)
    sigma = 0.01 * float(jnp.sqrt(jnp.mean(clean.values**2)))
    obs = da.make_observations(
        truth, stepper, u0, sigma=sigma, key=jax.random.key(42), **kw
    )
    B = da.Diffusion(grid, 0.1, std=0.3)
    background_u0 = u0 + B.sample(key=jax.random.key(7))
    control = da.Control(
        initial_state=da.InitialState(B) if control_state else None,
        parameters=[
            da.Parameter(
                "kappa", background=KAPPA_BACKGROUND, transform=da.Log(), sigma=1.0
            )
        ],
    )
    cost = da.FourDVar(
        pdes.Heat(grid, kappa=KAPPA_BACKGROUND),
        stepper,
        background_u0 if control_state else u0,
        obs,
        control,
        dt=0.1,
        n_steps=50,
        adjoint=adjoint,
        throw=throw,
    )
    return cost, u0, clean


@pytest.fixture(scope="module")
def twin():
    return _heat_twin()


# ----------------------------------------------------------------- Kalman filter check


def test_4dvar_final_state_equals_kalman_filter():
    """Linear-Gaussian, perfect model: 4D-Var's final state = KF's final analysis."""
    grid = dphys.Grid(16, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    model = pdes.Heat(grid, kappa=0.02)
    stepper = dphys.CrankNicolson()
    dt, n_steps = 0.1, 12
    truth0 = jnp.sin(2 * jnp.pi * x) + 0.3 * jnp.cos(4 * jnp.pi * x)
    B_cov = da.Diffusion(grid, 0.15, std=0.5)
    xb = truth0 + B_cov.sample(key=jax.random.key(3))
    # Observation times: on a step, between steps (time interpolation), at t0 and at
    # the end; one value missing.
    times = jnp.array([0.0, 0.35, 0.6, 1.2])
    pos = jnp.array([0.1, 0.33, 0.5, 0.71, 0.9])
    obs = da.make_observations(
        model, stepper, truth0, positions=pos, times=times, sigma=0.1, dt=dt,
        n_steps=n_steps, key=jax.random.key(4),
    )
    obs = eqx.tree_at(lambda o: o.values, obs, obs.values.at[2, 1].set(jnp.nan))
    control = da.Control(initial_state=da.InitialState(B_cov))
    cost = da.FourDVar(
        model, stepper, xb, obs, control, dt=dt, n_steps=n_steps,
        adjoint=dphys.Unrolled(),
    )
    analysis = da.assimilate(
        cost, da.GaussNewton(max_iterations=3, inner_rtol=1e-14, gtol=1e-12),
        uncertainty=False,
    )
    assert analysis.converged, analysis.message

    # --- independent Kalman filter with dense matrices -----------------------------
    def one_step(u):
        return dphys.simulate(model, stepper, u, dt=dt, n_steps=1).final

    M = jax.jacfwd(one_step)(xb)  # the model is linear: M is exact
    H = jax.jacfwd(da.Interpolation(grid, pos))(xb)
    R = jnp.diag(obs.sigma**2)
    B = B_cov.to_dense()
    xa, P = xb, B
    n_obs_steps = [(float(t) / dt) for t in times]
    k = 0
    for j in range(n_steps + 1):
        for i, s in enumerate(n_obs_steps):
            if not (j <= s < j + 1 or (j == n_steps and s == n_steps)):
                continue
            # An observation between steps j and j+1 sees (1-a) x_j + a M x_j.
            a = s - j
            Hj = H @ ((1 - a) * jnp.eye(grid.size) + a * M)
            y = obs.values[i]
            keep = ~jnp.isnan(y)
            Hk, yk, Rk = Hj[keep], y[keep], R[keep][:, keep]
            S = Hk @ P @ Hk.T + Rk
            K = jnp.linalg.solve(S, Hk @ P).T
            xa = xa + K @ (yk - Hk @ xa)
            P = (jnp.eye(grid.size) - K @ Hk) @ P
            k += 1
        if j < n_steps:
            xa, P = M @ xa, M @ P @ M.T
    assert k == len(times)
    rel = float(
        jnp.linalg.norm(analysis.final_state - xa) / jnp.linalg.norm(xa)
    )
    print(f"4D-Var vs Kalman filter, final state relative difference: {rel:.2e}")
    assert rel < 1e-8
    # The analysis also improves on the background at the end of the window.
    truth_final = dphys.simulate(model, stepper, truth0, dt=dt, n_steps=n_steps).final
    assert jnp.linalg.norm(analysis.final_state - truth_final) < jnp.linalg.norm(
        analysis.background_final_state - truth_final
    )


# --------------------------------------------------------------- parameter recovery


def test_scalar_kappa_recovered_and_gn_beats_lbfgs(twin):
    cost, u0, _ = twin
    gn = da.assimilate(cost, da.GaussNewton(max_iterations=20, gtol=1e-6))
    lb = da.assimilate(
        cost, da.LBFGS(max_iterations=2000, memory=20, gtol=1e-6), uncertainty=False
    )
    k_gn = float(gn.parameters["kappa"])
    k_lb = float(lb.parameters["kappa"])
    err = abs(k_gn - KAPPA_TRUE) / KAPPA_TRUE
    std = float(gn.parameter_std["kappa"])
    print(
        f"kappa: truth {KAPPA_TRUE}, GN {k_gn:.6g} +/- {std:.2g} (error {err:.2%}), "
        f"L-BFGS {k_lb:.6g}; iterations GN {gn.n_iterations}, L-BFGS "
        f"{lb.n_iterations}"
    )
    assert gn.converged and lb.converged, (gn.message, lb.message)
    assert err < 0.02
    assert abs(k_gn - KAPPA_TRUE) < 3 * std
    assert gn.n_iterations < lb.n_iterations
    assert abs(k_gn - k_lb) / k_gn < 1e-4
    # The analysis beats the background for the state too.
    rmse = lambda u: float(jnp.sqrt(jnp.mean((u - u0) ** 2)))
    assert rmse(gn.initial_state) < 0.5 * rmse(gn.background_state)
    # Result bookkeeping.
    h = gn.history
    assert h.cost.shape == (gn.n_iterations + 1,) == h.parameters["kappa"].shape
    assert np.all(np.diff(h.cost) <= 0)
    assert gn.parameter_labels == ("kappa",)
    assert gn.parameter_correlation.shape == (1, 1)
    assert gn.initial_state_std.shape == (32,)
    assert np.all(gn.initial_state_std < 0.3)  # posterior below prior std
    assert gn.obs_minus_analysis.shape == cost.obs.values.shape
    assert np.std(gn.obs_minus_analysis) < np.std(gn.obs_minus_background)
    np.testing.assert_allclose(
        gn.increments["initial_state"], gn.initial_state - gn.background_state
    )


def test_kappa_field_recovered_with_diffusion_prior():
    grid = dphys.Grid(48, lengths=1.0, boundary="neumann")
    (x,) = grid.coords
    log_k_true = jnp.log(0.01) + 0.6 * jnp.sin(2 * jnp.pi * x)
    # A steady source keeps temperature gradients (and so sensitivity to kappa)
    # everywhere.
    src = 0.2 * jnp.cos(2 * jnp.pi * x) + 0.2 * jnp.cos(5 * jnp.pi * x)
    truth = pdes.Heat(grid, kappa=jnp.exp(log_k_true), source=src)
    u0 = jnp.cos(jnp.pi * x) + 0.5 * jnp.cos(4 * jnp.pi * x)
    stepper = dphys.BackwardEuler()
    kw = dict(
        positions=jnp.linspace(0.02, 0.98, 16), times=jnp.linspace(0.5, 10.0, 20),
        dt=0.1, n_steps=100,
    )
    clean = da.make_observations(truth, stepper, u0, sigma=1.0, **kw)
    sigma = 0.01 * float(jnp.sqrt(jnp.mean(clean.values**2)))
    obs = da.make_observations(truth, stepper, u0, sigma=sigma, key=jax.random.key(3),
                               **kw)
    control = da.Control(
        parameters=[
            da.Parameter(
                "kappa",
                background=jnp.full(grid.shape, 0.01),
                transform=da.Log(),
                covariance=da.Diffusion(grid, 0.15, std=0.5),
            )
        ]
    )
    cost = da.FourDVar(
        pdes.Heat(grid, 0.01, source=src), stepper, u0, obs, control,
        dt=kw["dt"], n_steps=kw["n_steps"], adjoint=dphys.Unrolled(),
    )
    analysis = da.assimilate(cost, da.GaussNewton(max_iterations=10))
    log_k = np.log(analysis.parameters["kappa"])
    corr = float(np.corrcoef(log_k, log_k_true)[0, 1])
    std = analysis.parameter_std_unconstrained["kappa"]
    inside = float(np.mean(np.abs(log_k - log_k_true) <= 2 * std))
    print(
        f"kappa field: correlation {corr:.4f}, rms log-error "
        f"{np.sqrt(np.mean((log_k - log_k_true) ** 2)):.3g}, truth within 2 sigma at "
        f"{inside:.0%} of points; {analysis.message}"
    )
    assert analysis.converged
    assert corr > 0.9
    assert analysis.parameter_correlation.shape == (48, 48)
    assert analysis.parameter_labels[3] == "kappa[3]"


# ------------------------------------------------------------------- coverage


def _coverage(n_seeds, key):
    cost, _, clean = _heat_twin(control_state=False, throw=False)
    sigma = cost.obs.sigma

    def one(k):
        values = clean.values + sigma * jax.random.normal(k, clean.values.shape)
        c = eqx.tree_at(lambda c: c.obs.values, cost, values)
        v, hist = da.minimize(c, da.GaussNewton(), n_iterations=6)
        post = da.posterior(c, v)
        reduction = hist["grad_norm"][-1] / hist["grad_norm"][0]
        return post.mean_unconstrained[0], post.std_unconstrained[0], reduction

    z, s, reduction = jax.jit(jax.vmap(one))(jax.random.split(key, n_seeds))
    # Every member converged (the fixed-iteration pure-JAX Gauss-Newton path).
    assert np.all(np.asarray(reduction) < 1e-8)
    inside = np.abs(np.asarray(z) - np.log(KAPPA_TRUE)) <= 2 * np.asarray(s)
    return float(inside.mean()), float(np.mean(s))


def test_posterior_coverage_200_seeds():
    # 200 vmapped twins with fresh noise: the true log-kappa must lie within the
    # Gauss-Newton posterior +/- 2 sigma about 95% of the time. The binomial
    # standard error at 200 seeds is 1.5%, so [90%, 99%] is a > 3-sigma band.
    coverage, mean_std = _coverage(200, jax.random.key(2024))
    print(f"coverage over 200 seeds: {coverage:.1%} (mean std of log kappa {mean_std:.2e})")
    assert 0.90 <= coverage <= 0.99


# ------------------------------------------------------------ driver and posterior


def test_callback_history_and_stop(twin):
    cost, _, _ = twin
    seen = []

    def callback(i, info):
        seen.append((i, info["cost"], float(info["parameters"]["kappa"])))
        return i == 2

    a = da.assimilate(cost, da.GaussNewton(), callback=callback, uncertainty=False)
    assert [s[0] for s in seen] == [0, 1, 2]
    assert a.termination == "callback" and not a.converged
    assert a.n_iterations == 2
    np.testing.assert_allclose(a.history.cost, [s[1] for s in seen])
    assert a.parameter_std is None


def test_max_iterations_termination(twin):
    cost, _, _ = twin
    a = da.assimilate(cost, da.GaussNewton(max_iterations=1), uncertainty=False)
    assert a.termination == "max_iterations" and a.n_iterations == 1
    assert "max_iterations=1" in a.message


def test_posterior_dense_equals_cg(twin):
    # `assimilate` uses the dense Gauss-Newton Hessian for this small control; the
    # matrix-free CG route (parameter block of the inverse only) must agree.
    cost, _, _ = twin
    a = da.assimilate(cost, da.GaussNewton(gtol=1e-10))
    v = jax.tree_util.tree_map(jnp.asarray, a.control)
    cg = eqx.filter_jit(da.posterior)(cost, v, method="cg")
    assert cg.method == "cg"
    np.testing.assert_allclose(a.parameter_std["kappa"], cg.std[0], rtol=1e-6)
    np.testing.assert_allclose(
        a.parameter_std_unconstrained["kappa"], cg.std_unconstrained[0], rtol=1e-6
    )


def test_assimilate_bad_input(twin):
    cost, _, _ = twin
    with pytest.raises(TypeError, match="FourDVar"):
        da.assimilate(lambda v: 0.0)
    with pytest.raises(TypeError, match="method"):
        da.assimilate(cost, "lbfgs")
    with pytest.raises(ValueError, match="keys"):
        da.assimilate(cost, v0={"kappa": jnp.zeros(())})
    with pytest.raises(ValueError, match="max_iterations"):
        da.GaussNewton(max_iterations=-1)
    with pytest.raises(ValueError, match="gtol"):
        da.LBFGS(gtol=-1.0)
    with pytest.raises(ValueError, match="method"):
        da.posterior(cost, cost.init(), method="exact")


# ----------------------------------------------------------------- weak constraint


def test_weak_constraint_recovers_missing_forcing():
    """The truth has a source the model lacks: weak-constraint 4D-Var finds it."""
    grid = dphys.Grid(24, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    src = 0.3 * jnp.sin(2 * jnp.pi * x)
    truth = pdes.Heat(grid, kappa=0.01, source=src)
    u0 = jnp.cos(2 * jnp.pi * x)
    stepper = dphys.CrankNicolson()
    kw = dict(positions=jnp.linspace(0.02, 0.98, 12), times=jnp.linspace(0.1, 2.0, 20),
              dt=0.1, n_steps=20)
    obs = da.make_observations(truth, stepper, u0, sigma=0.01, key=jax.random.key(0),
                               **kw)
    final_true = dphys.simulate(truth, stepper, u0, dt=0.1, n_steps=20).final
    B = da.Diffusion(grid, 0.15, std=0.2)
    Q = da.Diffusion(grid, 0.15, std=0.5)
    control = da.Control(
        initial_state=da.InitialState(B), model_error=da.ModelError(Q, n_windows=2)
    )
    cost = da.FourDVar(
        pdes.Heat(grid, kappa=0.01), stepper, u0 + 0.1, obs, control,
        dt=kw["dt"], n_steps=kw["n_steps"], adjoint=dphys.Unrolled(),
    )
    a = da.assimilate(cost, uncertainty=False)
    assert a.converged
    rmse = lambda u: float(jnp.sqrt(jnp.mean((u - final_true) ** 2)))
    # Without model error the same initial-state analysis cannot produce the
    # source's effect: the best strong-constraint final state is off by at least
    # the forced response, which is what the forecast without forcing misses.
    unforced = dphys.simulate(pdes.Heat(grid, kappa=0.01), stepper, u0, dt=0.1,
                              n_steps=20).final
    corr = [float(np.corrcoef(f, src)[0, 1]) for f in a.model_error]
    fit = float(np.nanstd(a.obs_minus_analysis))
    print(f"weak constraint: final-state RMSE {rmse(a.final_state):.3g} (unforced "
          f"forecast from the true state {rmse(unforced):.3g}), O-A std {fit:.3g} "
          f"(noise 0.01), forcing correlation per sub-window {corr}")
    assert a.model_error.shape == (2, 24)
    assert rmse(a.final_state) < 0.05 * rmse(unforced)
    assert fit < 1.5 * 0.01
    assert min(corr) > 0.95
