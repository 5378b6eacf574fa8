"""The Laplace (Gauss-Newton) posterior against the exact linear-Gaussian posterior.

For a linear model and observation operator with Gaussian priors the posterior is
Gaussian with covariance $P = (B^{-1} + G^\\top R^{-1} G)^{-1}$, $G$ the Jacobian of
the model equivalents with respect to the control (initial state and parameters).
Each mapping of the posterior is checked on its own code path, with priors whose
standard deviations are not 1 (so that a covariance left in whitened units, or a
correlation left unnormalised, shows): the initial-state standard deviation, the
parameter standard deviations and correlations (scalar and field priors), the
delta method $\\sigma_p = |T'(z)|\\,\\sigma_z$ for non-linear transforms.
"""

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

import assimilation as da
import dphys
import pdes


GRID = dphys.Grid(12, lengths=1.0, boundary="periodic")
KAPPA, DT, N_STEPS = 0.03, 0.1, 10
STEPPER = dphys.CrankNicolson()
POSITIONS = jnp.array([0.1, 0.37, 0.55, 0.8])
# On a step, between steps (time interpolation), at t0 and at the end.
TIMES = jnp.array([0.0, 0.35, 0.6, 1.0])
STATE_STD, SCALAR_STD, FIELD_STD = 0.5, 0.3, 0.4


def _linear_problem(field_prior: bool):
    """Heat with an unknown source (scalar or field prior) and initial state."""
    (x,) = GRID.coords
    truth0 = jnp.sin(2 * jnp.pi * x) + 0.3 * jnp.cos(4 * jnp.pi * x)
    source = 0.2 + 0.1 * jnp.cos(2 * jnp.pi * x) if field_prior else jnp.asarray(0.2)
    truth = pdes.Heat(GRID, kappa=KAPPA, source=source)
    obs = da.make_observations(
        truth,
        STEPPER,
        truth0,
        positions=POSITIONS,
        times=TIMES,
        sigma=0.05,
        dt=DT,
        n_steps=N_STEPS,
        key=jax.random.key(4),
    )
    obs = eqx.tree_at(lambda o: o.values, obs, obs.values.at[2, 1].set(jnp.nan))
    B = da.Diffusion(GRID, 0.15, std=STATE_STD)
    if field_prior:
        prior = da.Diffusion(GRID, 0.2, std=FIELD_STD)
        param = da.Parameter("source", background=jnp.full(12, 0.1), covariance=prior)
    else:
        prior = da.Diagonal(SCALAR_STD)
        param = da.Parameter("source", background=0.1, sigma=SCALAR_STD)
    control = da.Control(initial_state=da.InitialState(B), parameters=[param])
    background = pdes.Heat(GRID, kappa=KAPPA, source=jnp.asarray(0.1))
    cost = da.FourDVar(
        background,
        STEPPER,
        truth0 + 0.2,
        obs,
        control,
        dt=DT,
        n_steps=N_STEPS,
        adjoint=dphys.Unrolled(),
    )
    return cost, B, prior


def _forecast(x0, source):
    """Model equivalents at TIMES, written independently of the 4D-Var cost: all
    states saved, linear interpolation between the two bracketing steps."""
    model = pdes.Heat(GRID, kappa=KAPPA, source=source)
    states = dphys.simulate(
        model,
        STEPPER,
        x0,
        dt=DT,
        n_steps=N_STEPS,
        saveat=dphys.SaveAt(t0=True, every=1),
        adjoint=dphys.Unrolled(),
    ).ys
    H = da.Interpolation(GRID, POSITIONS)
    rows = []
    for t in np.asarray(TIMES):
        s = t / DT
        j = min(int(np.floor(s + 1e-9)), N_STEPS - 1)
        a = s - j
        rows.append(H((1 - a) * states[j] + a * states[j + 1]))
    return jnp.stack(rows)


def _dense_posterior(cost, B, prior, n_p):
    """P = B - B G^T (G B G^T + R)^{-1} G B over (x0, p), from dense matrices."""
    n = GRID.size

    def g(z):
        source = z[n:] if n_p > 1 else z[n]
        return _forecast(z[:n], source).ravel()

    z0 = jnp.zeros(n + n_p)
    G = np.asarray(jax.jit(jax.jacfwd(g))(z0))
    y = np.asarray(cost.obs.values).ravel()
    sigma = np.broadcast_to(np.asarray(cost.obs.sigma), cost.obs.values.shape).ravel()
    keep = ~np.isnan(y)
    G, R = G[keep], np.diag(sigma[keep] ** 2)
    prior_dense = (
        np.asarray(prior.to_dense()) if n_p > 1 else np.array([[SCALAR_STD**2]])
    )
    B_full = scipy.linalg.block_diag(np.asarray(B.to_dense()), prior_dense)
    S = G @ B_full @ G.T + R
    return B_full - B_full @ G.T @ np.linalg.solve(S, G @ B_full)


def _kalman_filter_final(cost, B):
    """A Kalman filter on the augmented state [x; s] (scalar source s, constant):
    its final covariance holds the window's posterior variance of s (a constant's
    filter estimate at the end has seen every observation)."""
    n = GRID.size

    def one_step(z):
        model = pdes.Heat(GRID, kappa=KAPPA, source=z[n])
        x1 = dphys.simulate(model, STEPPER, z[:n], dt=DT, n_steps=1).final
        return jnp.concatenate([x1, z[n:]])

    M = np.asarray(jax.jit(jax.jacfwd(one_step))(jnp.zeros(n + 1)))
    H = np.asarray(jax.jacfwd(da.Interpolation(GRID, POSITIONS))(jnp.zeros(n)))
    H = np.concatenate([H, np.zeros((H.shape[0], 1))], axis=1)
    sigma = np.broadcast_to(np.asarray(cost.obs.sigma), cost.obs.values.shape)
    P = scipy.linalg.block_diag(np.asarray(B.to_dense()), [[SCALAR_STD**2]])
    steps = np.asarray(TIMES) / DT
    for j in range(N_STEPS + 1):
        for i, s in enumerate(steps):
            if not (j <= s + 1e-9 < j + 1 or (j == N_STEPS and abs(s - j) < 1e-9)):
                continue
            a = max(s - j, 0.0)
            Hj = H @ ((1 - a) * np.eye(n + 1) + a * M)
            keep = ~np.isnan(np.asarray(cost.obs.values[i]))
            Hk, Rk = Hj[keep], np.diag(sigma[i][keep] ** 2)
            K = np.linalg.solve(Hk @ P @ Hk.T + Rk, Hk @ P).T
            P = (np.eye(n + 1) - K @ Hk) @ P
        if j < N_STEPS:
            P = M @ P @ M.T
    return P, M


@pytest.mark.parametrize(
    "field_prior, method",
    [
        (False, "dense"),
        (True, "dense"),
        (True, "cg"),
        (False, "lanczos"),
        (True, "lanczos"),
    ],
    ids=["scalar-dense", "field-dense", "field-cg", "scalar-lanczos", "field-lanczos"],
)
def test_posterior_equals_the_linear_gaussian_posterior(field_prior, method):
    cost, B, prior = _linear_problem(field_prior)
    n, n_p = GRID.size, GRID.size if field_prior else 1
    P = _dense_posterior(cost, B, prior, n_p)
    post = jax.jit(lambda v: da.posterior(cost, v, method=method))(cost.init())
    std_p = np.sqrt(np.diag(P[n:, n:]))
    # Parameter standard deviations: mapped back through the prior's square root
    # (the whitened ones are smaller by the prior std, 0.3 or 0.4).
    rtol = 1e-8 if method == "dense" else 1e-6
    np.testing.assert_allclose(post.std_unconstrained, std_p, rtol=rtol)
    np.testing.assert_allclose(post.std, std_p, rtol=rtol)  # identity transform
    np.testing.assert_allclose(post.covariance_unconstrained, P[n:, n:], rtol=rtol)
    # Correlations, normalised: unit diagonal, and equal to P's.
    corr = P[n:, n:] / np.outer(std_p, std_p)
    np.testing.assert_allclose(post.correlation, corr, rtol=rtol, atol=1e-10)
    np.testing.assert_allclose(np.diag(post.correlation), 1.0, rtol=1e-12)
    if field_prior:  # a genuinely correlated posterior
        assert np.abs(corr - np.eye(n_p)).max() > 0.3
    assert bool(post.converged), post.describe()
    # The initial state's standard deviation, field by field (dense and Lanczos;
    # CG solves for the parameters only, and says so).
    if method == "cg":
        assert post.initial_state_std is None
        assert "no std for 'initial_state'" in post.describe()
    else:
        std_x = np.sqrt(np.diag(P[:n, :n]))
        np.testing.assert_allclose(post.initial_state_std, std_x, rtol=rtol)
        # The observations really constrain the state: below the prior's 0.5.
        assert std_x.max() < 0.9 * STATE_STD
    if not field_prior:
        # The reference itself against an independent Kalman filter on [x; s].
        P_kf, M = _kalman_filter_final(cost, B)
        np.testing.assert_allclose(P_kf[n, n], P[n, n], rtol=1e-9)
        phi = np.linalg.matrix_power(M, N_STEPS)
        np.testing.assert_allclose(P_kf, phi @ P @ phi.T, rtol=1e-7, atol=1e-12)


def test_physical_std_is_the_delta_method():
    """sigma_p = |T'(z)| sigma_z at the analysis z, T' from differentiating T
    (not the transform's own derivative method); a log and a bounded transform."""
    transform = da.Bounded(-1.0, 2.0)
    (x,) = GRID.coords
    truth0 = jnp.sin(2 * jnp.pi * x)
    truth = pdes.Heat(GRID, kappa=KAPPA, source=jnp.asarray(0.3))
    obs = da.make_observations(
        truth,
        STEPPER,
        truth0,
        positions=POSITIONS,
        times=TIMES[1:],
        sigma=0.05,
        dt=DT,
        n_steps=N_STEPS,
        key=jax.random.key(1),
    )
    control = da.Control(
        parameters=[
            da.Parameter("kappa", background=0.02, transform=da.Log(), sigma=0.5),
            da.Parameter("source", background=0.5, transform=transform, sigma=0.7),
        ]
    )
    cost = da.FourDVar(
        pdes.Heat(GRID, kappa=0.02, source=jnp.asarray(0.5)),
        STEPPER,
        truth0,
        obs,
        control,
        dt=DT,
        n_steps=N_STEPS,
        adjoint=dphys.Unrolled(),
    )
    v = {"kappa": jnp.asarray(0.4), "source": jnp.asarray(-0.3)}
    post = jax.jit(lambda v: da.posterior(cost, v))(v)
    physical = cost.parameters(v)
    z = np.array(
        [
            float(da.Log().inverse(physical["kappa"])),
            float(transform.inverse(physical["source"])),
        ]
    )
    np.testing.assert_allclose(post.mean_unconstrained, z, rtol=1e-12)
    slopes = np.array(
        [
            float(jax.grad(da.Log().forward)(jnp.asarray(z[0]))),
            float(jax.grad(transform.forward)(jnp.asarray(z[1]))),
        ]
    )
    assert np.all(np.abs(np.abs(slopes) - 1.0) > 0.05)  # the factor matters here
    np.testing.assert_allclose(
        post.std, np.abs(slopes) * post.std_unconstrained, rtol=1e-12
    )
    # Correlations of two parameters: unit diagonal, symmetric, within [-1, 1] and
    # consistent with the reported covariance.
    corr = np.asarray(post.correlation)
    np.testing.assert_allclose(np.diag(corr), 1.0, rtol=1e-12)
    np.testing.assert_allclose(corr, corr.T, rtol=1e-12)
    assert np.all(np.abs(corr) <= 1.0 + 1e-12)
    cov = np.asarray(post.covariance_unconstrained)
    s = np.sqrt(np.diag(cov))
    np.testing.assert_allclose(post.std_unconstrained, s, rtol=1e-12)
    np.testing.assert_allclose(corr, cov / np.outer(s, s), rtol=1e-12)
    assert abs(corr[0, 1]) > 0.01  # two parameters that really co-vary


# ------------------------------------------------- large controls: Lanczos, all fields


def _shallow_water_window(ny, nx):
    """Linear shallow water on a periodic f-plane with rectangular cells (dx = 10
    km, dy = 13 km), 4 eta sensors at 3 times: the whitened control is the
    initial state's three fields, 3 ny nx unknowns, constrained on at most 12
    directions."""
    dx, dy = 10e3, 13e3
    grid = dphys.Grid((ny, nx), lengths=(ny * dy, nx * dx), boundary="periodic")
    y, x = grid.coords
    model = pdes.ShallowWater(grid, 1000.0, f0=1e-4)
    ly, lx_ = grid.lengths
    eta0 = 0.5 * jnp.exp(
        -(((x - 0.4 * lx_) / (2 * dx)) ** 2 + ((y - 0.5 * ly) / (2 * dy)) ** 2)
    )
    truth = model.rest_state(eta0)
    stepper = dphys.CrankNicolson()
    positions = jnp.array(
        [
            [0.3 * ly, 0.35 * lx_],
            [0.55 * ly, 0.5 * lx_],
            [0.7 * ly, 0.3 * lx_],
            [0.4 * ly, 0.7 * lx_],
        ]
    )
    kw = dict(dt=600.0, n_steps=6)
    obs = da.make_observations(
        model,
        stepper,
        truth,
        positions=positions,
        times=jnp.array([1200.0, 2400.0, 3600.0]),
        sigma=0.02,
        field="eta",
        key=jax.random.key(3),
        **kw,
    )
    std = pdes.SWState(
        da.Diffusion(grid, 3 * dx, std=0.2),
        da.Diagonal(0.05, shape=grid.shape),
        da.Diagonal(0.03, shape=grid.shape),
    )
    control = da.Control(initial_state=da.InitialState(std))
    return da.FourDVar(model, stepper, model.rest_state(), obs, control, **kw), std


def _fields(state):
    return {"eta": state.eta, "u": state.u, "v": state.v}


def test_lanczos_posterior_equals_dense_on_every_field():
    """Every field of a multi-field state gets its std (before, only array states
    did), and Lanczos's low-rank-plus-prior covariance equals the dense inverse."""
    cost, _ = _shallow_water_window(6, 8)
    v = cost.init()
    dense = jax.jit(lambda v: da.posterior(cost, v, method="dense"))(v)
    lz = jax.jit(lambda v: da.posterior(cost, v, method="lanczos"))(v)
    assert bool(lz.converged), lz.describe()
    assert int(lz.rank) < 3 * 48  # far fewer vectors than unknowns
    for name, s in _fields(dense.initial_state_std).items():
        s_lz = getattr(lz.initial_state_std, name)
        assert np.all(np.isfinite(s_lz)), name
        np.testing.assert_allclose(s_lz, s, rtol=1e-6, err_msg=name)
    # Too few vectors: reported, never silent.
    short = jax.jit(lambda v: da.posterior(cost, v, method="lanczos", max_rank=3))(v)
    assert not bool(short.converged) and int(short.rank) == 3
    assert "NOT CONVERGED" in short.describe()
    # The leading eigenvalues are those of the dense Gauss-Newton Hessian.
    a = da.gauss_newton_operator(cost, v).as_matrix()
    lam = np.sort(np.linalg.eigvalsh(a))[::-1]
    k = int(np.sum(lam > 1 + 1e-8))
    np.testing.assert_allclose(lz.eigenvalues[:k], lam[:k], rtol=1e-8)


# About 2.5 minutes on a loaded 2-core machine (the Diffusion prior's variance and
# one tangent-linear/adjoint run per Lanczos vector on 36 x 40 cells): slow; the
# same code path is checked against the dense inverse by default on the 6 x 8 copy.
@pytest.mark.slow
def test_large_shallow_water_posterior_is_finite_and_verified():
    """A 4320-unknown control (above `max_dense`): "auto" takes Lanczos; every
    field's std is finite, below the prior's, and equals an independent CG solve
    of (A^{-1})_ii on entries next to a sensor (to 1e-6)."""
    cost, prior = _shallow_water_window(36, 40)
    v = cost.init()
    post = jax.jit(lambda v: da.posterior(cost, v))(v)
    assert post.method == "lanczos"
    assert bool(post.converged), post.describe()
    for name, s in _fields(post.initial_state_std).items():
        s = np.asarray(s)
        p = np.sqrt(np.asarray(getattr(prior, name).variance()))
        assert np.all(np.isfinite(s)), name
        assert np.all(s <= p * (1 + 1e-10)), name
    # The sensors constrain eta: its std drops below the prior (0.181 at best:
    # the gravity waves spread what a sensor sees over the basin).
    assert np.min(post.initial_state_std.eta) < 0.95 * 0.2
    # Independent check: (A^{-1})_ii by CG for whitened eta entries at the
    # minimum-std point, pushed through the diagonal u, v priors directly.
    op = da.gauss_newton_operator(cost, v)
    flat, unravel = jax.flatten_util.ravel_pytree(v)
    index = unravel(jnp.arange(flat.size))
    for name, sd in (("u", 0.05), ("v", 0.03)):
        s = np.asarray(getattr(post.initial_state_std, name))
        i, j = np.unravel_index(np.argmin(s), s.shape)
        e = (
            jnp.zeros(flat.size)
            .at[int(getattr(index["initial_state"], name)[i, j])]
            .set(1.0)
        )
        x, result, _ = dphys.krylov_solve(
            lambda w: jax.flatten_util.ravel_pytree(op.mv(unravel(w)))[0],
            e,
            method="cg",
            rtol=1e-12,
            initial_guess="zero",
        )
        assert result == dphys.RESULTS.successful
        np.testing.assert_allclose(s[i, j], sd * np.sqrt(float(x @ e)), rtol=1e-6)
        assert s[i, j] < sd * (1 - 1e-3)  # a constrained entry, not the prior's


def test_dense_posterior_with_an_fft_covariance_on_an_fft_model():
    """A diffusion B (FFT smoothing) on a Crank-Nicolson FFT model: the dense
    posterior used to materialise A column by column through the vmapped adjoint,
    whose transposed FFT operand XLA's CPU runtime refused (an internal error, so
    `assimilate(..., uncertainty=True)` crashed). It is finite and equals the
    Lanczos posterior."""
    grid = dphys.Grid(16, lengths=1.0, boundary="periodic")
    model = pdes.Advection(grid, velocity=(1.0,), kappa=5e-3)
    stepper = dphys.CrankNicolson()
    B = da.Diffusion(grid, 0.1, std=1.0)
    truth = B.sample(key=jax.random.key(0))
    obs = da.make_observations(
        model,
        stepper,
        truth,
        positions=jnp.linspace(0.03, 0.97, 6),
        times=jnp.asarray([0.05, 0.1]),
        sigma=0.05,
        dt=0.01,
        n_steps=10,
        key=jax.random.key(1),
    )
    control = da.Control(initial_state=da.InitialState(B))
    cost = da.FourDVar(model, stepper, jnp.zeros(16), obs, control, dt=0.01, n_steps=10)
    v = cost.init()
    dense = da.posterior(cost, v, method="dense")
    lanczos = da.posterior(cost, v, method="lanczos")
    std_d = np.asarray(dense.stds["initial_state"])
    std_l = np.asarray(lanczos.stds["initial_state"])
    assert np.all(np.isfinite(std_d)) and np.all(std_d > 0)
    np.testing.assert_allclose(std_d, std_l, rtol=1e-6)
    analysis = da.assimilate(cost, da.GaussNewton(), uncertainty=True)
    assert np.all(np.isfinite(analysis.initial_state_std))
