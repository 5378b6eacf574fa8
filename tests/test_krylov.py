"""dphys.krylov_solve and dphys.Krylov: our CG, GMRES and BiCGStab against dense
solves, their early stopping, their implicit-function-theorem derivatives (Taylor and
dot tests through Crank-Nicolson steps), unconverged solves, option checks and the
model's preferred-solver hook of dphys.Auto."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import dphys.testing as dtest
import pdes


def _nonsymmetric(n, seed, shift=4.0):
    """A dense nonsymmetric, well-conditioned test matrix (NumPy)."""
    rng = np.random.default_rng(seed)
    return shift * np.eye(n) + rng.normal(size=(n, n)) / np.sqrt(n) * 2.0


def _relerr(x, ref):
    return float(np.linalg.norm(np.asarray(x) - ref) / np.linalg.norm(ref))


# ------------------------------------------------------------------ against dense


@pytest.mark.parametrize("restart", [3, 10, 60])
@pytest.mark.parametrize("preconditioned", [False, True], ids=["plain", "jacobi"])
def test_gmres_matches_dense_solve(restart, preconditioned):
    a = _nonsymmetric(50, seed=restart)
    b = np.random.default_rng(1).normal(size=50)
    d = 1.0 / np.diag(a)
    precond = (lambda v: jnp.asarray(d) * v) if preconditioned else None
    x, result, iters = dphys.krylov_solve(
        lambda v: jnp.asarray(a) @ v,
        jnp.asarray(b),
        method="gmres",
        restart=restart,
        rtol=1e-13,
        preconditioner=precond,
    )
    assert result == dphys.RESULTS.successful
    assert _relerr(x, np.linalg.solve(a, b)) < 1e-8
    assert 0 < int(iters) <= 500


@pytest.mark.parametrize("method", ["cg", "bicgstab"])
def test_cg_and_bicgstab_match_dense_solve(method):
    rng = np.random.default_rng(2)
    if method == "cg":
        m = rng.normal(size=(40, 40))
        a = np.eye(40) + m @ m.T / 40  # SPD
    else:
        a = _nonsymmetric(40, seed=3)
    b = rng.normal(size=40)
    x, result, _ = dphys.krylov_solve(
        lambda v: jnp.asarray(a) @ v, jnp.asarray(b), method=method, rtol=1e-13
    )
    assert result == dphys.RESULTS.successful
    assert _relerr(x, np.linalg.solve(a, b)) < 1e-8


def test_pytree_system_matches_dense_solve():
    """A coupled two-field system solved on its pytree (no flattening by the user)."""
    a = _nonsymmetric(30, seed=4)
    c = np.random.default_rng(5).normal(size=(30, 20)) * 0.1

    def mv(state):
        u, w = state
        return (jnp.asarray(a) @ u + jnp.asarray(c) @ w, 3.0 * w - jnp.asarray(c.T) @ u)

    b = (jnp.linspace(0.0, 1.0, 30), jnp.cos(jnp.arange(20.0)))
    x, result, _ = dphys.krylov_solve(mv, b, method="gmres", rtol=1e-13)
    dense = np.block([[a, c], [-c.T, 3.0 * np.eye(20)]])
    ref = np.linalg.solve(dense, np.concatenate([np.asarray(v) for v in b]))
    assert result == dphys.RESULTS.successful
    assert _relerr(np.concatenate([np.asarray(v) for v in x]), ref) < 1e-8


def _advection_model(n=12):
    """2D periodic centered advection with velocity *fields* (no FFT path)."""
    grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
    y, x = grid.coords
    vy = 0.5 + 0.25 * jnp.cos(2 * jnp.pi * x)
    vx = 1.0 + 0.25 * jnp.sin(2 * jnp.pi * y)
    model = pdes.Advection(grid, (vy, vx), kappa=1e-3)
    u0 = jnp.exp(-((x - 0.4) ** 2 + (y - 0.6) ** 2) / 0.02)
    return model, u0


def test_krylov_step_matches_dense_implicit_solve():
    """One Crank-Nicolson step at Courant number 3 with Krylov(gmres) equals the
    dense solve of (I - dt/2 L) u1 = (I + dt/2 L) u0."""
    model, u0 = _advection_model()
    n = u0.size
    dt = 3.0 / (1.25 * 12)
    lmat = jax.jacfwd(lambda v: model.linear(0.0, v.reshape(u0.shape)).ravel())(
        jnp.zeros(n)
    )
    lmat = np.asarray(lmat)
    rhs = (np.eye(n) + 0.5 * dt * lmat) @ np.asarray(u0).ravel()
    ref = np.linalg.solve(np.eye(n) - 0.5 * dt * lmat, rhs)
    for solver in (
        dphys.Krylov(method="gmres", rtol=1e-13),
        dphys.Krylov(method="gmres", rtol=1e-13, preconditioner="jacobi", restart=4),
    ):
        traj = dphys.simulate(
            model, dphys.CrankNicolson(solver=solver), u0, dt=dt, n_steps=1
        )
        assert _relerr(traj.final.ravel(), ref) < 1e-8, solver


# ------------------------------------------------------------ stopping behaviour


def test_stops_as_soon_as_converged():
    """A matrix with 4 distinct eigenvalues: Krylov methods are exact after 4 steps,
    and ours stop there (a restart of 10 is not run to its end)."""
    n = 64
    rng = np.random.default_rng(6)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    eigs = np.repeat([1.0, 2.0, 3.0, 5.0], n // 4)
    spd = q @ np.diag(eigs) @ q.T
    b = jnp.asarray(rng.normal(size=n))
    for method in ("cg", "gmres"):
        x, result, iters = dphys.krylov_solve(
            lambda v: jnp.asarray(spd) @ v, b, method=method, rtol=1e-12
        )
        assert result == dphys.RESULTS.successful
        assert int(iters) <= 5, (method, int(iters))
        assert _relerr(x, np.linalg.solve(spd, np.asarray(b))) < 1e-10


def test_residual_test_is_normwise_and_relative():
    """The returned x meets ||b - Ax||_2 <= rtol ||b||_2 whatever the scale of b."""
    a = _nonsymmetric(40, seed=7)
    b = np.random.default_rng(8).normal(size=40)
    for method in ("gmres", "bicgstab"):
        solve = jax.jit(
            lambda rhs, method=method: dphys.krylov_solve(
                lambda v: jnp.asarray(a) @ v, rhs, method=method, rtol=1e-9
            )
        )
        for scale in (1e-30, 1.0, 1e30):
            x, result, _ = solve(jnp.asarray(scale * b))
            res = np.linalg.norm(scale * b - a @ np.asarray(x))
            assert result == dphys.RESULTS.successful
            assert res <= 1e-9 * np.linalg.norm(scale * b), (method, scale)


def test_zero_rhs_is_solved_without_iterations():
    a = _nonsymmetric(10, seed=9)
    x, result, iters = dphys.krylov_solve(lambda v: jnp.asarray(a) @ v, jnp.zeros(10))
    assert result == dphys.RESULTS.successful
    assert int(iters) == 0 and not np.any(np.asarray(x))


def test_exact_preconditioner_with_preconditioned_guess_needs_no_iteration():
    a = _nonsymmetric(20, seed=10)
    inv = jnp.asarray(np.linalg.inv(a))
    _, result, iters = dphys.krylov_solve(
        lambda v: jnp.asarray(a) @ v,
        jnp.ones(20),
        preconditioner=lambda v: inv @ v,
        initial_guess="preconditioned",
    )
    assert result == dphys.RESULTS.successful and int(iters) == 0


def test_float32_solve_stays_float32_and_converges():
    a = _nonsymmetric(40, seed=11).astype(np.float32)
    b = np.ones(40, np.float32)
    for method in ("gmres", "bicgstab"):
        x, result, _ = dphys.krylov_solve(
            lambda v: jnp.asarray(a) @ v, jnp.asarray(b), method=method
        )
        assert x.dtype == jnp.float32
        # rtol=1e-10 is raised to 100 eps(float32) = 1.2e-5: the solve succeeds.
        assert result == dphys.RESULTS.successful
        assert _relerr(x, np.linalg.solve(a.astype(float), b)) < 1e-4


def test_vmap_over_right_hand_sides_matches_loop():
    a = jnp.asarray(_nonsymmetric(30, seed=12))
    bs = jnp.asarray(np.random.default_rng(13).normal(size=(3, 30)))

    solve = jax.jit(lambda b: dphys.krylov_solve(lambda v: a @ v, b, rtol=1e-12)[0])
    batched = jax.jit(jax.vmap(solve))(bs)
    for i in range(3):
        np.testing.assert_allclose(batched[i], solve(bs[i]), rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------- derivatives


def _cn_run(solver, n_steps=3):
    """A few CN steps of 2D advection-diffusion with velocity fields at Courant 3;
    returns ``cost(params)`` with params = (u0, velocity fields, kappa)."""
    model, u0 = _advection_model()
    dt = 3.0 / (1.25 * 12)
    stepper = dphys.CrankNicolson(solver=solver)

    def final(params):
        m = pdes.Advection(model.grid, params["velocity"], kappa=params["kappa"])
        return dphys.simulate(
            m, stepper, params["u0"], dt=dt, n_steps=n_steps, adjoint=dphys.Unrolled()
        ).final

    params = {"u0": u0, "velocity": model.velocity, "kappa": jnp.asarray(1e-3)}
    return final, params


def test_taylor_gmres_through_crank_nicolson_steps(getkey):
    # rtol well below the Taylor test's 1e-12 resolution of the cost.
    final, params = _cn_run(dphys.Krylov(method="gmres", rtol=1e-14))
    target = jnp.sin(jnp.arange(params["u0"].size) * 0.37).reshape(params["u0"].shape)
    cost = lambda p: jnp.sum((final(p) - target) ** 2)
    value_and_grad = jax.jit(jax.value_and_grad(cost))
    f = lambda p: value_and_grad(p)[0]
    grad = value_and_grad(params)[1]
    h = dtest.tree_random_like(getkey(), params)
    res = dtest.taylor_test(f, params, grad=grad, direction=h)
    assert res.passed and res.rate1 > 1.9, str(res)
    wrong = jax.tree_util.tree_map(lambda g: g * (1 + 1e-3), grad)
    bad = dtest.taylor_test(f, params, grad=wrong, direction=h)
    assert not bad.passed and bad.rate1 < 1.5, str(bad)


@pytest.mark.parametrize(
    "solver",
    [
        dphys.Krylov(method="gmres", rtol=1e-14),
        dphys.Krylov(method="gmres", rtol=1e-14, preconditioner="jacobi", restart=4),
    ],
    ids=["gmres", "gmres-jacobi-restart4"],
)
def test_dot_test_tangent_adjoint_through_crank_nicolson_steps(solver):
    """<J dx, dy> = <dx, J^T dy> for the tangent (jvp: tangent solves with A and M)
    and the adjoint (vjp: transposed solves with A^T and M^T) of three steps."""
    final, params = _cn_run(solver)
    res = dtest.dot_test_vjp(final, params)
    assert res.passed, str(res)


def test_dot_test_of_the_solve_itself():
    """b -> A^{-1} b is linear: its transpose (lineax's transposed GMRES solve with
    the transposed preconditioner) against the tangent solve."""
    a = jnp.asarray(_nonsymmetric(30, seed=14))
    d = 1.0 / jnp.diag(a)

    def solve(b):
        return dphys.krylov_solve(
            lambda v: a @ v, b, rtol=1e-14, preconditioner=lambda v: d * v
        )[0]

    res = dtest.dot_test(solve, None, jnp.zeros(30))
    assert res.passed, str(res)


# ------------------------------------------------------------ unconverged solves


UNCONVERGED = dphys.CrankNicolson(solver=dphys.Krylov(method="gmres", max_steps=2))


def test_unconverged_forward_solve_reports_linear_solve_failed():
    model, u0 = _advection_model()
    traj = dphys.simulate(model, UNCONVERGED, u0, dt=0.25, n_steps=2, throw=False)
    assert traj.result == dphys.RESULTS.linear_solve_failed
    with pytest.raises(dphys.SimulationError, match="did not converge"):
        dphys.simulate(model, UNCONVERGED, u0, dt=0.25, n_steps=2)


def test_unconverged_adjoint_solve_raises():
    model, u0 = _advection_model()

    def cost(u):
        traj = dphys.simulate(model, UNCONVERGED, u, dt=0.25, n_steps=2, throw=False)
        return jnp.sum(traj.final**2)

    with pytest.raises(
        (RuntimeError, ValueError), match="maximum number of solver steps"
    ):
        jax.block_until_ready(jax.grad(cost)(u0))


# ---------------------------------------------------------------- option checks


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"max_steps": 0}, r"`max_steps` must be a positive integer, got 0"),
        ({"max_steps": 2.5}, r"`max_steps` must be a positive integer, got 2.5"),
        ({"max_steps": True}, r"`max_steps` must be a positive integer, got True"),
        ({"restart": 0}, r"`restart` must be a positive integer, got 0"),
        ({"restart": -3}, r"`restart` must be a positive integer, got -3"),
        ({"rtol": -1e-8}, r"`rtol` must be a finite non-negative number, got -1e-08"),
        ({"atol": float("nan")}, r"`atol` must be a finite non-negative number"),
        ({"rtol": float("inf")}, r"`rtol` must be a finite non-negative number"),
        ({"rtol": "1e-8"}, r"`rtol` must be a finite non-negative number"),
        ({"rtol": 0.0, "atol": 0.0}, r"`rtol` and `atol` are both zero"),
        ({"method": "lu"}, r"`method` must be 'cg', 'gmres', 'bicgstab' or None"),
        ({"preconditioner": "ilu"}, r"`preconditioner` must be 'jacobi' or None"),
    ],
)
def test_bad_krylov_options_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dphys.Krylov(**kwargs)


def test_helmholtz_krylov_checks_options_like_krylov():
    with pytest.raises(ValueError, match=r"`restart` must be a positive integer"):
        pdes.HelmholtzKrylov(restart=0)
    with pytest.raises(ValueError, match=r"`rtol` and `atol` are both zero"):
        pdes.HelmholtzKrylov(rtol=0.0)


def test_bad_krylov_solve_arguments_rejected():
    mv = lambda v: v
    with pytest.raises(ValueError, match=r"`method` must be 'cg', 'gmres' or"):
        dphys.krylov_solve(mv, jnp.ones(3), method="minres")
    with pytest.raises(ValueError, match=r"`initial_guess` must be one of"):
        dphys.krylov_solve(mv, jnp.ones(3), initial_guess="previous")
    with pytest.raises(ValueError, match=r"`max_steps` must be a positive integer"):
        dphys.krylov_solve(mv, jnp.ones(3), max_steps=0)


# ----------------------------------------------------------- preferred solver hook


class _Prefers(dphys.AbstractModel):
    """Constant-coefficient diffusion that names its own solver (``choice``)."""

    grid: dphys.Grid
    choice: object = None

    def linear(self, t, state):
        return dphys.operators.laplacian(state, self.grid, 0.1)

    @property
    def translation_invariant(self) -> bool:
        return True

    @property
    def symmetric(self) -> bool:
        return True

    def preferred_solver(self, like):
        return self.choice


def test_auto_uses_the_models_preferred_solver():
    grid = dphys.Grid((8, 8), boundary="neumann")
    choice = dphys.Krylov(method="gmres", restart=3)
    like = jnp.ones(grid.shape)
    assert dphys.Auto().resolve(_Prefers(grid, choice), like) is choice
    assert isinstance(dphys.Auto().resolve(_Prefers(grid), like), dphys.Krylov)
    # ... and the run uses it: GMRES Arnoldi steps, not CG iterations, are counted.
    u0 = jnp.cos(jnp.arange(64.0)).reshape(8, 8)
    runs = [
        dphys.simulate(_Prefers(grid, c), dphys.CrankNicolson(), u0, dt=0.1, n_steps=2)
        for c in (choice, None)
    ]
    # Both solves stop at a relative residual of 1e-10.
    np.testing.assert_allclose(runs[0].final, runs[1].final, rtol=0, atol=1e-9)
    assert int(runs[0].stats["linear_iterations"]) > 0


def test_fft_wins_over_the_preferred_solver_when_periodic_and_constant():
    grid = dphys.Grid((8, 8))
    model = _Prefers(grid, dphys.Krylov())
    assert isinstance(dphys.Auto().resolve(model, jnp.ones(grid.shape)), dphys.FFT)


@pytest.mark.parametrize("bad", [dphys.Auto(), "gmres"])
def test_preferred_solver_must_be_a_concrete_solver(bad):
    grid = dphys.Grid((8, 8), boundary="neumann")
    with pytest.raises(TypeError, match=r"`_Prefers.preferred_solver` must return"):
        dphys.Auto().resolve(_Prefers(grid, bad), jnp.ones(grid.shape))


def test_tolerance_below_rounding_is_raised_to_the_floor():
    """rtol=1e-20 cannot be met in float64; it is raised to 10 eps (2.2e-15), which
    a well-conditioned solve reaches."""
    a = _nonsymmetric(30, seed=15)
    b = np.random.default_rng(16).normal(size=30)
    for method in ("gmres", "bicgstab"):
        x, result, _ = dphys.krylov_solve(
            lambda v: jnp.asarray(a) @ v, jnp.asarray(b), method=method, rtol=1e-20
        )
        assert result == dphys.RESULTS.successful
        res = np.linalg.norm(b - a @ np.asarray(x))
        assert res <= 10 * np.finfo(float).eps * np.linalg.norm(b) * 1.01
