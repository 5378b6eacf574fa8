"""Proximal operators: closed forms, Moreau identity, exact and dual TV, gradients."""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import scipy.linalg
import scipy.optimize

import assimilation.learn as L
import dphys.testing as dt


def _scalar_prox_ref(fun, x, step, lo, hi):
    """argmin_z step*fun(z) + (z - x)^2/2 over [lo, hi] by a bounded scalar search,
    per entry (the domain of an indicator is the search interval)."""
    out = []
    for xi in np.ravel(x):
        res = scipy.optimize.minimize_scalar(
            lambda z, xi=xi: step * fun(z) + 0.5 * (z - xi) ** 2,
            bounds=(max(xi - 10.0, lo), min(xi + 10.0, hi)),
            method="bounded",
            options={"xatol": 1e-12},
        )
        out.append(res.x)
    return np.reshape(out, np.shape(x))


INF = np.inf
SEPARABLE = {
    "L1": (L.L1(0.7), lambda z: 0.7 * abs(z), -INF, INF),
    "NonNegativeL1": (L.NonNegativeL1(0.4), lambda z: 0.4 * z, 0.0, INF),
    "ElasticNet": (L.ElasticNet(0.5, 2.0), lambda z: 0.5 * abs(z) + z * z, -INF, INF),
    "NonNegative": (L.NonNegative(), lambda z: 0.0, 0.0, INF),
    "Box": (L.Box(-0.5, 1.25), lambda z: 0.0, -0.5, 1.25),
}


@pytest.mark.parametrize("name", sorted(SEPARABLE))
@pytest.mark.parametrize("step", [1.0, 0.3])
def test_separable_prox_matches_a_reference_solve(name, step):
    prior, fun, lo, hi = SEPARABLE[name]
    x = np.linspace(-2.5, 2.5, 23)
    got = np.asarray(prior.prox(jnp.asarray(x), step))
    # The bounded search converges to ~1e-9 (its xatol is relative to the bracket).
    np.testing.assert_allclose(got, _scalar_prox_ref(fun, x, step, lo, hi), atol=1e-7)


def _group_ref(x, groups, lam, step):
    out = np.empty_like(x)
    for g in np.unique(groups):
        sel = groups == g
        xg = x[sel]
        res = scipy.optimize.minimize(
            lambda z, xg=xg: (
                step * lam * np.sqrt(np.sum(z * z) + 1e-30)
                + 0.5 * np.sum((z - xg) ** 2)
            ),
            xg,
            method="Powell",
            options={"xtol": 1e-12, "ftol": 1e-15, "maxiter": 100000},
        )
        out[sel] = res.x
    return out


def test_group_l1_prox_matches_a_reference_solve():
    rng = np.random.default_rng(0)
    x = rng.normal(size=12)
    groups = np.repeat(np.arange(4), 3)
    x[3:6] *= 0.1  # one group below the threshold: shrunk to zero
    prior = L.GroupL1(0.6, jnp.asarray(groups))
    got = np.asarray(prior.prox(jnp.asarray(x), 0.8))
    assert np.all(got[3:6] == 0)
    # Powell on a non-smooth function: ~1e-6 accurate.
    np.testing.assert_allclose(got, _group_ref(x, groups, 0.6, 0.8), atol=1e-5)


def _moreau_cases():
    groups = jnp.repeat(jnp.arange(4), 3)
    return {
        "Zero": L.Zero(),
        "L1": L.L1(0.7),
        "L1-weights": L.L1(jnp.linspace(0.1, 1.0, 12)),
        "NonNegative": L.NonNegative(),
        "NonNegativeL1": L.NonNegativeL1(0.4),
        "Box": L.Box(-0.5, 1.25),
        "ElasticNet": L.ElasticNet(0.5, 2.0),
        "GroupL1": L.GroupL1(0.6, groups),
        "L21": L.L21(0.6),
    }


@pytest.mark.parametrize("name", sorted(_moreau_cases()))
@pytest.mark.parametrize("step", [1.0, 0.3, 2.5])
def test_moreau_identity_with_closed_form_conjugates(name, step, getkey):
    """x = prox_{t g}(x) + t prox_{g*/t}(x/t), with prox_{g*} in closed form."""
    prior = _moreau_cases()[name]
    shape = (3, 4) if name == "L21" else (12,)
    x = 2.0 * jr.normal(getkey(), shape)
    lhs = prior.prox(x, step) + step * prior.conjugate_prox(x / step, 1.0 / step)
    assert dt.tree_allclose(lhs, x, rtol=1e-12, atol=1e-12)
    # The base-class (Moreau) conjugate agrees with the closed form.
    generic = L.AbstractPrior.conjugate_prox(prior, x, step)
    assert dt.tree_allclose(generic, prior.conjugate_prox(x, step), atol=1e-12)


def test_moreau_identity_detects_a_wrong_conjugate(getkey):
    x = 2.0 * jr.normal(getkey(), (12,))
    wrong = jnp.clip(x, -0.5, 0.5)  # the l_inf ball of the wrong radius
    assert not dt.tree_allclose(L.L1(0.7).prox(x) + wrong, x, atol=1e-6)


def test_separable_priors_act_on_pytrees(getkey):
    tree = {"a": jr.normal(getkey(), (5,)), "b": jr.normal(getkey(), (2, 3))}
    out = L.L1(0.3).prox(tree)
    assert dt.tree_allclose(out["b"], L.soft_threshold(tree["b"], 0.3))
    assert float(L.L1(0.3).value(tree)) == pytest.approx(
        0.3 * float(jnp.sum(jnp.abs(tree["a"])) + jnp.sum(jnp.abs(tree["b"])))
    )


# ------------------------------------------------------------------ total variation


def _d1(n):
    return np.diff(np.eye(n), axis=0)  # (D x)_i = x_{i+1} - x_i


def _tv_dual_ref(dmat, x, lam):
    """Exact anisotropic TV prox: the dual is a bounded least-squares problem."""
    res = scipy.optimize.lsq_linear(
        lam * dmat.T, x, bounds=(-1, 1), method="bvls", tol=1e-15
    )
    return x - lam * dmat.T @ res.x


@pytest.mark.parametrize("n", [1, 2, 7, 120])
@pytest.mark.parametrize("lam", [0.0, 0.05, 0.7, 5.0])
def test_tv1d_prox_is_exact(n, lam):
    rng = np.random.default_rng(n)
    x = np.cumsum(rng.normal(size=n)) * 0.3 + (rng.random(n) < 0.5)
    got = np.asarray(jax.jit(L.tv1d_prox)(jnp.asarray(x), lam))
    ref = x if n == 1 else _tv_dual_ref(_d1(n), x, lam)
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-12 * max(1.0, lam))


def test_tv1d_prior_and_vmap():
    x = jnp.asarray(np.random.default_rng(3).normal(size=(4, 30)))
    prior = L.TV1D(0.4)
    rows = jax.jit(jax.vmap(lambda r: prior.prox(r, 0.5)))(x)
    one = jax.jit(L.tv1d_prox)
    for r, row in zip(x, rows, strict=True):
        assert dt.tree_allclose(row, one(r, 0.2), rtol=0, atol=0)
    assert float(prior.value(x[0])) == pytest.approx(
        0.4 * float(jnp.sum(jnp.abs(jnp.diff(x[0]))))
    )


def _dmat(shape):
    n = int(np.prod(shape))
    cols = [
        np.asarray(L.gradient(jnp.asarray(e.reshape(shape)))).ravel() for e in np.eye(n)
    ]
    return np.stack(cols, axis=1)


def test_gradient_operator_dot_test(getkey):
    for shape in [(9,), (5, 7), (3, 4, 5)]:
        res = dt.dot_test(
            jax.jit(L.gradient),
            jax.jit(L.gradient_transpose),
            jnp.zeros(shape),
            key=getkey(),
        )
        assert res.passed, str(res)
    wrong = lambda p: -L.gradient_transpose(p)
    assert not dt.dot_test(L.gradient, wrong, jnp.zeros((5, 7))).passed


def _x2d(shape, seed):
    rng = np.random.default_rng(seed)
    iy, ix = np.indices(shape)
    return rng.normal(size=shape) * 0.5 + 2.0 * ((iy + ix) > shape[0]) + (ix > 4)


@pytest.mark.parametrize("lam", [0.1, 0.6])
def test_tv2d_anisotropic_against_exact_dual(lam):
    shape = (6, 7)
    x = _x2d(shape, 1)
    ref = _tv_dual_ref(_dmat(shape), x.ravel(), lam).reshape(shape)
    got = L.TV(lam, isotropic=False, rtol=1e-11).prox(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref, atol=1e-8)
    # The 1-D case of the dual solver agrees with Condat.
    x1 = jnp.asarray(x[0])
    np.testing.assert_allclose(
        np.asarray(L.tv_prox(x1, lam, rtol=1e-11)),
        np.asarray(L.tv1d_prox(x1, lam)),
        atol=1e-8,
    )


def _iso_reference(x, lam):
    """Isotropic TV prox by an active-set Newton method on the primal.

    SLSQP on the dual finds which pixels have a non-zero gradient (the active
    set); on the subspace where the others vanish the primal is smooth, and Newton
    converges quadratically to machine precision. Independent of the FGP solver.
    """
    shape = x.shape
    n = x.size
    dm = _dmat(shape)
    gy, gx = dm[:n], dm[n:]

    def dual_obj(p):
        v = x.ravel() - lam * dm.T @ p
        return 0.5 * v @ v

    res = scipy.optimize.minimize(
        dual_obj,
        np.zeros(2 * n),
        jac=lambda p: -lam * dm @ (x.ravel() - lam * dm.T @ p),
        constraints=[
            {
                "type": "ineq",
                "fun": lambda p: 1 - p[:n] ** 2 - p[n:] ** 2,
                "jac": lambda p: np.hstack([np.diag(-2 * p[:n]), np.diag(-2 * p[n:])]),
            }
        ],
        method="SLSQP",
        options={"ftol": 1e-16, "maxiter": 2000},
    )
    z = x.ravel() - lam * dm.T @ res.x
    g = np.hypot(gy @ z, gx @ z)
    active = g > 1e-5 * max(1.0, np.abs(x).max())
    rows = np.concatenate([gy[~active], gx[~active]])
    basis = scipy.linalg.null_space(rows) if rows.size else np.eye(n)
    c = np.linalg.lstsq(basis, z, rcond=None)[0]
    ay, ax = gy[active] @ basis, gx[active] @ basis
    for _ in range(50):
        zc = basis @ c
        vy, vx = ay @ c, ax @ c
        nrm = np.hypot(vy, vx)
        grad = basis.T @ (zc - x.ravel()) + lam * (
            ay.T @ (vy / nrm) + ax.T @ (vx / nrm)
        )
        hess = basis.T @ basis
        for i in range(len(nrm)):
            j = np.stack([ay[i], ax[i]])
            v = np.array([vy[i], vx[i]])
            hess = (
                hess
                + lam * j.T @ (np.eye(2) / nrm[i] - np.outer(v, v) / nrm[i] ** 3) @ j
            )
        c = c - np.linalg.solve(hess, grad)
        if np.linalg.norm(grad) < 1e-14:
            break
    z = basis @ c
    # Certificate: the Newton solution is optimal iff a feasible dual exists; its
    # primal value is no larger than the (independent) SLSQP one.
    return z.reshape(shape)


def test_tv2d_isotropic_against_an_independent_solver():
    shape = (5, 6)
    x = _x2d(shape, 2)
    lam = 0.4
    ref = _iso_reference(x, lam)
    sol = L.tv_solve(jnp.asarray(x), lam, isotropic=True, rtol=1e-11)
    assert bool(sol.converged)
    np.testing.assert_allclose(np.asarray(sol.value), ref, atol=1e-8)
    # The certified bound holds: ||z - z*|| <= sqrt(2 gap).
    err = np.linalg.norm(np.asarray(sol.value) - ref)
    assert err <= np.sqrt(2 * max(float(sol.gap), 0.0)) + 1e-12


def test_tv_solve_reports_an_unconverged_solve():
    x = jnp.asarray(_x2d((8, 8), 3))
    sol = L.tv_solve(x, 0.5, rtol=1e-12, max_steps=5)
    assert not bool(sol.converged) and int(sol.num_steps) == 5


# ------------------------------------------------------------------ gradients


def _loss_through(prox_fn, x, target):
    return lambda p: (
        0.5 * jnp.sum((prox_fn(p["x"], p["lam"]) - target) ** 2)
        + jnp.sum(jnp.sin(prox_fn(p["x"], p["lam"])))
    )


@pytest.mark.parametrize("which", ["soft_threshold", "tv1d", "tv2d-iso", "tv2d-aniso"])
def test_prox_gradients_taylor(which, getkey):
    if which == "soft_threshold":
        x = 2.0 * jr.normal(getkey(), (40,))
        fn = L.soft_threshold
    elif which == "tv1d":
        x = jnp.asarray(_x2d((1, 40), 4)[0])
        fn = L.tv1d_prox
    else:
        x = jnp.asarray(_x2d((6, 6), 5))
        iso = which == "tv2d-iso"
        fn = lambda a, lam: L.tv_prox(a, lam, isotropic=iso, rtol=1e-11)
    target = jr.normal(getkey(), x.shape)
    f = jax.jit(_loss_through(fn, x, target))
    p0 = {"x": x, "lam": jnp.asarray(0.3)}
    g = jax.jit(jax.grad(f))(p0)
    # Small steps keep the active set/segments fixed (the function is smooth there).
    direction = {"x": 1e-2 * jr.normal(getkey(), x.shape), "lam": jnp.asarray(1.0)}
    res = dt.taylor_test(f, p0, grad=g, direction=direction, eps0=1e-3)
    assert res.passed and res.rate > 1.9, str(res)
    bad = {"x": g["x"], "lam": 1.05 * g["lam"] + 1e-3}
    res_bad = dt.taylor_test(f, p0, grad=bad, direction=direction, eps0=1e-3)
    assert not res_bad.passed, str(res_bad)


def test_tv1d_forward_and_reverse_modes_agree(getkey):
    x = jnp.asarray(_x2d((1, 30), 6)[0])
    prox = jax.jit(L.tv1d_prox)
    res = dt.dot_test_vjp(lambda a: prox(a, 0.3), x, key=getkey())
    assert res.passed, str(res)
    # d z / d lam by forward mode equals a central difference.
    d_fwd = jax.jvp(lambda lam: prox(x, lam), (0.3,), (1.0,))[1]
    h = 1e-6
    fd = (prox(x, 0.3 + h) - prox(x, 0.3 - h)) / (2 * h)
    np.testing.assert_allclose(np.asarray(d_fwd), np.asarray(fd), atol=1e-7)


def test_tv2d_implicit_gradient_matches_finite_differences(getkey):
    """The implicit adjoint (with the active set linearised) against central
    differences, isotropic and anisotropic, in random directions."""
    x = jnp.asarray(_x2d((6, 6), 7))
    target = jr.normal(getkey(), x.shape)
    for iso in (True, False):
        f = jax.jit(
            lambda p, iso=iso: jnp.sum(
                (L.tv_prox(p["x"], p["lam"], isotropic=iso, rtol=1e-12) - target) ** 2
            )
        )
        p0 = {"x": x, "lam": jnp.asarray(0.3)}
        g = jax.jit(jax.grad(f))(p0)
        for _ in range(2):
            h = {"x": jr.normal(getkey(), x.shape), "lam": jnp.asarray(0.5)}
            res = dt.fd_check(f, p0, grad=g, direction=h)
            assert res.passed, str(res)


def test_prox_under_jit_and_vmap(getkey):
    xs = jr.normal(getkey(), (3, 6, 6))
    prior = L.TV(0.2, rtol=1e-10)
    batched = jax.jit(jax.vmap(lambda x: prior.prox(x)))(xs)
    one = jax.jit(lambda x: prior.prox(x))
    for x, b in zip(xs, batched, strict=True):
        assert dt.tree_allclose(b, one(x), atol=1e-9)
    lams = jnp.array([0.1, 0.5, 1.0])
    out = jax.vmap(lambda lam: L.L1(lam).prox(xs[0]))(lams)
    assert dt.tree_allclose(out[1], L.soft_threshold(xs[0], 0.5))


# ------------------------------------------------------------------ errors


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="`lam` must be a finite number >= 0"):
        L.L1(-1.0)
    with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
        L.Box(1.0, 0.0)
    with pytest.raises(ValueError, match="`l2` must be > 0"):
        L.ElasticNet(0.1, 0.0)
    with pytest.raises(TypeError, match="`groups` must be an integer array"):
        L.GroupL1(0.1, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`groups` must hold labels in \[0, n_groups"):
        L.GroupL1(0.1, jnp.array([0, 1, 5]), n_groups=2)
    with pytest.raises(ValueError, match="`x` must be one array of the shape"):
        L.GroupL1(0.1, jnp.array([0, 0, 1])).prox(jnp.zeros(4))
    with pytest.raises(ValueError, match="TV1D acts on 1-D arrays"):
        L.TV1D(0.1).prox(jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="`max_steps` must be an int >= 1"):
        L.TV(0.1, max_steps=0)
