"""Probed stencils, the Galerkin multigrid hierarchy and V-cycle, dphys.Multigrid and
the Fourier and multigrid preconditioners of dphys.Krylov: against dense operators
and solves on every boundary kind (1D and 2D), transposes by dot tests, gradients by
Taylor tests with failing negative controls, agreement with the FFT and tridiagonal
paths, gradient memory independent of the iteration count, and the error paths."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import dphys.testing as dtest
import pdes
from dphys._solver import _structure, _vcycle as vc
from dphys._solver._fourier_precond import fourier_preconditioner
from dphys._solver._stencil import (
    box_offsets,
    cross_offsets,
    model_stencil,
    stencil_mismatch,
)


BOUNDARIES = ("periodic", "dirichlet", "neumann")


def _kappa(grid, contrast=400.0):
    """A smooth positive field varying `contrast`-fold over the domain."""
    coords = grid.coords
    phase = sum(jnp.sin(2 * jnp.pi * (a + 1) * c) for a, c in enumerate(coords))
    return 1e-2 * jnp.exp(0.5 * np.log(contrast) * phase / grid.ndim)


def _heat(shape, boundary, contrast=400.0):
    grid = dphys.Grid(shape, lengths=1.0, boundary=boundary)
    return pdes.Heat(grid, _kappa(grid, contrast))


def _dense(model, like):
    n = like.size
    mat = jax.jacfwd(lambda v: model.linear(0.0, v.reshape(like.shape)).ravel())(
        jnp.zeros(n, like.dtype)
    )
    return np.asarray(mat)


def _relerr(x, ref):
    return float(np.linalg.norm(np.ravel(x) - np.ravel(ref)) / np.linalg.norm(ref))


def _rhs(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


# ---------------------------------------------------------------- probed stencils


@pytest.mark.parametrize(
    "boundary, shape",
    [
        ("periodic", (10, 9)),
        ("dirichlet", (10, 9)),
        ("neumann", (10, 9)),
        (("dirichlet", "periodic"), (10, 9)),
        pytest.param("periodic", (7,), marks=pytest.mark.slow),
        pytest.param("dirichlet", (7,), marks=pytest.mark.slow),
        pytest.param("neumann", (7,), marks=pytest.mark.slow),
    ],
)
def test_probed_stencil_is_the_dense_operator(boundary, shape):
    model = _heat(shape, boundary)
    like = jnp.zeros(shape)
    st, _ = model_stencil(model, 0.0, like, model.stencil_offsets)
    dense = _dense(model, like)
    scale = np.abs(dense).max()
    np.testing.assert_allclose(np.asarray(st.dense()), dense, atol=1e-13 * scale)
    np.testing.assert_allclose(
        np.asarray(st.transpose().dense()), dense.T, atol=1e-13 * scale
    )


def test_probed_stencil_of_coupled_walled_shallow_water():
    grid = dphys.Grid((6, 8), lengths=6e4, boundary="neumann")
    depth = 100.0 + 20.0 * jnp.cos(grid.coords[1] / 1e4)
    model = pdes.ShallowWater(grid, depth, f0=1e-4, beta=1e-11)
    like = model.rest_state()
    leaves, treedef = jax.tree_util.tree_flatten(like)
    st, _ = model_stencil(model, 0.0, like, model.stencil_offsets)

    def apply(fields):
        out = model.linear(0.0, jax.tree_util.tree_unflatten(treedef, fields))
        return jax.tree_util.tree_leaves(out)

    assert float(stencil_mismatch(apply, st, leaves)) < 1e-14


def test_a_stencil_missing_couplings_is_detected():
    """upwind3 reaches two points: a reach-1 probe misses couplings, and the
    mismatch check sees it."""
    grid = dphys.Grid((12, 10), lengths=1.0, boundary="periodic")
    y, x = grid.coords
    model = pdes.Advection(grid, (0.3 + 0 * x, 1.0 + 0.2 * y), scheme="upwind3")
    like = jnp.zeros(grid.shape)
    apply = lambda f: [model.linear(0.0, f[0])]
    wrong, _ = model_stencil(model, 0.0, like, cross_offsets(2, 1))
    right, _ = model_stencil(model, 0.0, like, model.stencil_offsets)
    assert float(stencil_mismatch(apply, wrong, [like])) > 1e-2
    assert float(stencil_mismatch(apply, right, [like])) < 1e-14


class _WrongOffsets(dphys.AbstractModel):
    """A 5-point-per-axis operator that declares a 3-point stencil."""

    grid: dphys.Grid

    def linear(self, t, u):
        return jnp.roll(u, 2, -1) + jnp.roll(u, -2, -1) - 2.0 * u

    @property
    def stencil_offsets(self):
        return cross_offsets(1)


def test_a_wrong_declared_stencil_raises_when_the_run_starts():
    model = _WrongOffsets(dphys.Grid(16, boundary="periodic"))
    u0 = jnp.cos(jnp.arange(16.0))
    with pytest.raises(Exception, match="does not reproduce `linear`"):
        dphys.simulate(
            model, dphys.BackwardEuler(solver=dphys.Krylov()), u0, dt=0.1, n_steps=2
        )
    # Without assembling, the same solver calls `linear` and runs.
    traj = dphys.simulate(
        model,
        dphys.BackwardEuler(solver=dphys.Krylov(method="gmres", assemble=False)),
        u0,
        dt=0.1,
        n_steps=2,
    )
    assert bool(jnp.all(jnp.isfinite(traj.final)))


def test_assembled_and_model_products_give_the_same_run_and_gradient():
    model = _heat((12, 12), "neumann")
    y, x = model.grid.coords
    u0 = jnp.cos(3 * x) * jnp.sin(2 * y)

    def cost(u, kappa, assemble):
        m = pdes.Heat(model.grid, kappa)
        solver = dphys.Krylov(rtol=1e-13, assemble=assemble)
        out = dphys.simulate(
            m, dphys.CrankNicolson(solver=solver), u, dt=0.05, n_steps=3
        )
        return jnp.sum(out.final**2)

    args = (u0, model.kappa)
    va, ga = jax.value_and_grad(cost, argnums=(0, 1))(*args, True)
    vm, gm = jax.value_and_grad(cost, argnums=(0, 1))(*args, False)
    assert abs(float(va - vm)) < 1e-12 * abs(float(vm))
    for a, b in zip(ga, gm, strict=True):
        assert _relerr(a, b) < 1e-10


# ------------------------------------------------------------------- transfer ops


@pytest.mark.parametrize("kind", BOUNDARIES)
def test_restriction_is_the_transpose_of_prolongation(kind):
    for n_fine in (8, 9, 12, 13):
        n_c = vc.coarse_length(n_fine, kind)
        if n_c is None:
            assert kind == "periodic" and n_fine % 2, (kind, n_fine)
            continue
        res = dtest.dot_test(
            jax.jit(lambda c, n_fine=n_fine: vc.prolong_axis(c, 0, kind, n_fine)),
            jax.jit(lambda f, n_c=n_c: vc.restrict_axis(f, 0, kind, n_c)),
            jnp.zeros(n_c),
            jnp.zeros(n_fine),
        )
        assert res.passed, (n_fine, str(res))


@pytest.mark.parametrize("kind", BOUNDARIES)
def test_prolongation_interpolates_linear_functions(kind):
    """Linear interpolation: exact for a linear function at every fine point that
    lies between two coarse points (and for constants everywhere but next to a
    Dirichlet boundary, where the boundary value zero is interpolated)."""
    n_f = 13 if kind == "dirichlet" else 12
    n_c = vc.coarse_length(n_f, kind)
    fine_idx = np.arange(n_f)
    coarse_idx = {"periodic": 2, "neumann": 2, "dirichlet": 2}[kind] * np.arange(n_c)
    if kind == "dirichlet":
        coarse_idx = coarse_idx + 1
    f = lambda i: 0.3 + 0.7 * i
    out = np.asarray(vc.prolong_axis(jnp.asarray(f(coarse_idx * 1.0)), 0, kind, n_f))
    inner = (fine_idx >= coarse_idx[0]) & (fine_idx <= coarse_idx[-1])
    np.testing.assert_allclose(out[inner], f(fine_idx[inner] * 1.0), rtol=1e-14)


# ------------------------------------------------------------------------ V-cycle


def _cycle(model, gamma, like, **kw):
    st, _ = model_stencil(model, 0.0, like, box_offsets(model.grid.ndim))
    h = vc.build_hierarchy(st, 16)
    opts = _structure.CycleOptions(**kw)
    return vc.make_cycle(h, gamma, sweeps=opts.sweeps, omega=opts.damping(like.ndim))


def _convergence_factor(model, gamma, cycles=8):
    like = jnp.zeros(model.grid.shape)

    @jax.jit
    def norms(b):
        cyc = _cycle(model, gamma, like)

        def body(x, _):
            r = b - (x - gamma * model.linear(0.0, x))
            return x + cyc(r), jnp.linalg.norm(r)

        return jax.lax.scan(body, jnp.zeros_like(b), None, length=cycles)[1]

    out = np.asarray(norms(_rhs(like.shape)))
    return (out[-1] / out[-4]) ** (1 / 3)


@pytest.mark.parametrize(
    "boundary, ndim",
    [
        ("neumann", 2),
        ("dirichlet", 1),
        pytest.param("periodic", 1, marks=pytest.mark.slow),
        pytest.param("neumann", 1, marks=pytest.mark.slow),
        pytest.param("periodic", 2, marks=pytest.mark.slow),
        pytest.param("dirichlet", 2, marks=pytest.mark.slow),
    ],
)
def test_vcycle_converges_fast_and_independently_of_the_grid_size(boundary, ndim):
    """400-fold coefficient contrast, a diffusion number of about 1e3 on the fine
    grid: the factor per cycle stays small and does not grow with refinement."""
    factors = []
    for n in (16, 32) if ndim == 2 else (64, 128):
        n = n - 1 if boundary == "dirichlet" else n
        model = _heat((n,) * ndim, boundary)
        factors.append(_convergence_factor(model, gamma=1.0))
    # Without a working coarse correction the factor would approach 1 as the
    # grid is refined (Jacobi alone damps smooth errors by 1 - O(h^2)).
    assert max(factors) < 0.3, factors
    assert factors[1] < factors[0] + 0.1, factors


def test_vcycle_is_symmetric_for_a_symmetric_operator():
    """What CG needs: M^T = M (Jacobi is symmetric and R = P^T)."""
    model = _heat((16, 16), "neumann")
    cyc = _cycle(model, 0.3, jnp.zeros((16, 16)))
    res = dtest.dot_test(cyc, cyc, jnp.zeros((16, 16)))
    assert res.passed, str(res)


def _advection_diffusion(boundary):
    grid = dphys.Grid((16, 16), lengths=1.0, boundary=boundary)
    y, x = grid.coords
    velocity = (0.3 * jnp.cos(2 * jnp.pi * x), 0.2 + 0.1 * jnp.sin(2 * jnp.pi * y))
    return pdes.Advection(grid, velocity, kappa=_kappa(grid, 10.0), scheme="upwind")


@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
def test_vcycle_transpose_is_the_vcycle_of_the_transposed_operator(boundary):
    """For a non-symmetric operator the adjoint solve uses M^T: it equals the
    V-cycle built from the transposed stencil (Galerkin of A^T = (R A P)^T)."""
    model = _advection_diffusion(boundary)
    like = jnp.zeros(model.grid.shape)
    st, _ = model_stencil(model, 0.0, like, box_offsets(2))
    kw = dict(sweeps=2, omega=0.8)
    cyc = vc.make_cycle(vc.build_hierarchy(st, 16), 0.2, **kw)
    cyc_t = vc.make_cycle(vc.build_hierarchy(st.transpose(), 16), 0.2, **kw)
    res = dtest.dot_test(cyc, cyc_t, like)
    assert res.passed, str(res)
    wrong = dtest.dot_test(cyc, cyc, like)
    assert not wrong.passed, str(wrong)


def test_fourier_preconditioner_transpose_and_exactness():
    """M(A)^T = M(A^T) for a non-symmetric periodic operator, and M is the exact
    inverse when the coefficients are constant."""
    model = _advection_diffusion("periodic")
    like = jnp.zeros(model.grid.shape)
    st, _ = model_stencil(model, 0.0, like, box_offsets(2))
    m = fourier_preconditioner(st, 0.3)
    mt = fourier_preconditioner(st.transpose(), 0.3)
    res = dtest.dot_test(lambda v: m(model, v), lambda v: mt(model, v), like)
    assert res.passed, str(res)
    const = pdes.Advection(model.grid, (0.3, -0.2), kappa=1e-2)
    st, _ = model_stencil(const, 0.0, like, box_offsets(2))
    m = fourier_preconditioner(st, 0.3)
    b = _rhs(like.shape)
    x = m(const, b)
    resid = b - (x - 0.3 * const.linear(0.0, x))
    assert float(jnp.linalg.norm(resid) / jnp.linalg.norm(b)) < 1e-13


# ------------------------------------------------------------ solves vs dense


SOLVERS = {
    "multigrid": dphys.Multigrid(rtol=1e-12),
    "cg-multigrid": dphys.Krylov(method="cg", preconditioner="multigrid", rtol=1e-12),
    "gmres-multigrid": dphys.Krylov(
        method="gmres", preconditioner=dphys.Multigrid(sweeps=1), rtol=1e-12
    ),
    "cg-fourier": dphys.Krylov(method="cg", preconditioner="fourier", rtol=1e-12),
    "bicgstab-fourier": dphys.Krylov(
        method="bicgstab", preconditioner="fourier", rtol=1e-12
    ),
}


def _solve_cases():
    """Every solver on every boundary kind in 1D and 2D; the default run keeps each
    solver on one grid and each boundary kind with multigrid (the rest is slow)."""
    fast = {
        ("multigrid", "1d", "dirichlet"),
        ("multigrid", "2d", "periodic"),
        ("multigrid", "2d", "neumann"),
        ("cg-multigrid", "2d", "dirichlet"),
        ("cg-multigrid", "1d", "neumann"),
        ("gmres-multigrid", "2d", "neumann"),
        ("cg-fourier", "2d", "periodic"),
        ("bicgstab-fourier", "1d", "periodic"),
    }
    cases = []
    for name in SOLVERS:
        for dim, shape in (("1d", (255,)), ("2d", (15, 16))):
            for boundary in BOUNDARIES:
                if "fourier" in name and boundary != "periodic":
                    continue
                marks = () if (name, dim, boundary) in fast else (pytest.mark.slow,)
                case_id = f"{name}-{dim}-{boundary}"
                cases.append(
                    pytest.param(name, shape, boundary, id=case_id, marks=marks)
                )
    return cases


@pytest.mark.parametrize("name, shape, boundary", _solve_cases())
def test_solve_matches_dense_solve(name, shape, boundary):
    if boundary == "periodic":
        shape = tuple(n + n % 2 for n in shape)
    # The Fourier preconditioner sees the mean coefficient: a 400-fold contrast at
    # these diffusion numbers takes it hundreds of iterations (docs/design.md).
    model = _heat(shape, boundary, contrast=10.0 if "fourier" in name else 400.0)
    like = jnp.zeros(shape)
    gamma = 2.0  # diffusion numbers up to ~1e5: a stiff system
    solver = SOLVERS[name]
    solver.check(model, like)
    b = _rhs(shape)

    @jax.jit
    def solve(b):
        structure = solver.init(model, 0.0, like)
        return solver.solve(model, 0.0, gamma, b, structure)

    x, result, iters = solve(b)
    a = np.eye(like.size) - gamma * _dense(model, like)
    ref = np.linalg.solve(a, np.ravel(b))
    assert result == dphys.RESULTS.successful
    # The requested tolerance is met on the true residual ...
    resid = np.linalg.norm(np.ravel(b) - a @ np.ravel(x)) / np.linalg.norm(b)
    assert resid <= 1e-12
    # ... so the error is at most cond(A) times that (cond ~ 1e3 here).
    assert _relerr(x, ref) < 1e-8
    assert 0 < int(iters) < (80 if "fourier" in name else 30)


def test_guess_is_used_and_exact_guess_needs_no_iteration():
    model = _heat((16, 16), "neumann")
    like = jnp.zeros((16, 16))
    solver = dphys.Krylov(method="cg", preconditioner="multigrid", rtol=1e-12)
    structure = solver.init(model, 0.0, like)
    b = _rhs(like.shape)
    x, _, iters = solver.solve(model, 0.0, 0.5, b, structure)
    _, result, none = solver.solve(model, 0.0, 0.5, b, structure, guess=x)
    assert int(iters) > 0 and int(none) == 0 and result == dphys.RESULTS.successful
    with pytest.raises(ValueError, match="`guess` must be a pytree like `rhs`"):
        dphys.krylov_solve(lambda v: v, b, guess=jnp.zeros(3))


# ------------------------------------------------------------ derivatives


def _cost(model, solver, n_steps=3, dt=0.05):
    y, x = model.grid.coords if model.grid.ndim == 2 else (None, model.grid.coords[0])
    target = jnp.sin(2 * jnp.pi * x) if y is None else jnp.sin(2 * jnp.pi * (x + y))

    def cost(params):
        m = pdes.Heat(model.grid, params["kappa"])
        traj = dphys.simulate(
            m,
            dphys.CrankNicolson(solver=solver),
            params["u0"],
            dt=dt,
            n_steps=n_steps,
            adjoint=dphys.Unrolled(),
        )
        return jnp.sum((traj.final - target) ** 2)

    u0 = jnp.cos(2 * jnp.pi * x) if y is None else jnp.cos(2 * jnp.pi * x) * y
    return cost, {"u0": u0, "kappa": model.kappa}


@pytest.mark.parametrize(
    "name, boundary",
    [
        ("cg-multigrid", "neumann"),
        pytest.param("multigrid", "dirichlet", marks=pytest.mark.slow),
        pytest.param("cg-fourier", "periodic", marks=pytest.mark.slow),
    ],
)
def test_taylor_gradient_through_steps(name, boundary, getkey):
    # rtol below the Taylor test's 1e-12 resolution of the cost.
    solver = {
        "multigrid": dphys.Multigrid(rtol=1e-14),
        "cg-multigrid": dphys.Krylov(preconditioner="multigrid", rtol=1e-14),
        "cg-fourier": dphys.Krylov(preconditioner="fourier", rtol=1e-14),
    }[name]
    cost, params = _cost(_heat((8, 8), boundary, contrast=10.0), solver)
    value_and_grad = jax.jit(jax.value_and_grad(cost))
    f = lambda p: value_and_grad(p)[0]
    grad = value_and_grad(params)[1]
    h = dtest.tree_random_like(getkey(), params)
    res = dtest.taylor_test(f, params, grad=grad, direction=h)
    assert res.passed and res.rate1 > 1.9, str(res)
    wrong = jax.tree_util.tree_map(lambda g: g * (1 + 1e-3), grad)
    bad = dtest.taylor_test(f, params, grad=wrong, direction=h)
    assert not bad.passed and bad.rate1 < 1.5, str(bad)


def test_agree_with_the_fft_path_values_and_gradients():
    """Periodic, constant coefficients: FFT is exact; the iterative paths agree."""
    grid = dphys.Grid((8, 8), lengths=1.0, boundary="periodic")
    model = pdes.Heat(grid, jnp.asarray(2e-3))
    solvers = [
        dphys.FFT(),
        dphys.Krylov(preconditioner="fourier", rtol=1e-13),
        dphys.Krylov(preconditioner="multigrid", rtol=1e-13),
        dphys.Multigrid(rtol=1e-13),
    ]
    results = []
    for solver in solvers:
        cost, params = _cost(model, solver, dt=0.5)
        results.append(jax.value_and_grad(cost)(params))
    (v0, g0), rest = results[0], results[1:]
    for v, g in rest:
        assert abs(float(v - v0)) < 1e-11 * abs(float(v0))
        assert _relerr(g["u0"], g0["u0"]) < 1e-9
        assert abs(float(g["kappa"] - g0["kappa"])) < 1e-9 * abs(float(g0["kappa"]))


@pytest.mark.parametrize(
    "boundary", ["dirichlet", pytest.param("neumann", marks=pytest.mark.slow)]
)
def test_agree_with_the_tridiagonal_path_values_and_gradients(boundary):
    model = _heat((33,), boundary)
    results = []
    for solver in (
        dphys.Tridiagonal(),
        dphys.Multigrid(rtol=1e-13),
        dphys.Krylov(preconditioner="multigrid", rtol=1e-13),
    ):
        cost, params = _cost(model, solver, dt=0.5)
        results.append(jax.value_and_grad(cost)(params))
    (v0, g0), rest = results[0], results[1:]
    for v, g in rest:
        assert abs(float(v - v0)) < 1e-11 * abs(float(v0))
        assert _relerr(g["u0"], g0["u0"]) < 1e-9
        assert _relerr(g["kappa"], g0["kappa"]) < 1e-9


def test_gradient_memory_is_independent_of_the_iteration_count():
    """XLA's compiled working memory of value_and_grad is the same whether a solve
    takes two V-cycles or eight: the derivative is the implicit function theorem's,
    nothing is stored per iteration."""
    model = _heat((12, 12), "neumann")
    out = {}
    for rtol in (1e-3, 1e-13):
        solver = dphys.Multigrid(rtol=rtol)
        cost, params = _cost(model, solver, n_steps=2)
        iters = dphys.simulate(
            model,
            dphys.CrankNicolson(solver=solver),
            params["u0"],
            dt=0.05,
            n_steps=2,
        ).stats["linear_iterations"]
        compiled = jax.jit(jax.value_and_grad(cost)).lower(params).compile()
        out[rtol] = (int(iters), compiled.memory_analysis().temp_size_in_bytes)
    assert out[1e-13][0] >= 2 * out[1e-3][0], out
    assert out[1e-13][1] == out[1e-3][1], out


# ------------------------------------------------------------------------ errors


def test_multigrid_needs_a_single_field():
    grid = dphys.Grid((8, 8), lengths=8e4, boundary="neumann")
    model = pdes.ShallowWater(grid, 100.0, f0=1e-4)
    with pytest.raises(ValueError, match="needs a single-field state, got 3 fields"):
        dphys.simulate(
            model,
            dphys.CrankNicolson(solver=dphys.Multigrid()),
            model.rest_state(),
            dt=60.0,
            n_steps=1,
        )


def test_fourier_needs_a_periodic_grid():
    model = _heat((8, 8), "neumann")
    solver = dphys.Krylov(preconditioner="fourier")
    with pytest.raises(ValueError, match="needs a fully periodic grid"):
        dphys.simulate(
            model,
            dphys.CrankNicolson(solver=solver),
            jnp.ones((8, 8)),
            dt=0.1,
            n_steps=1,
        )


def test_a_grid_that_does_not_coarsen_is_refused():
    model = _heat((75, 75), "periodic")  # odd periodic lengths cannot halve
    with pytest.raises(ValueError, match=r"only coarsens to \(75, 75\)"):
        dphys.Multigrid().check(model, jnp.zeros((75, 75)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"sweeps": 0}, "`sweeps` must be a positive integer, got 0"),
        ({"omega": 2.5}, r"`omega` must be None or a number in \(0, 2\), got 2.5"),
        ({"max_coarse": 0}, r"`max_coarse` must be an integer in \[1, 4096\]"),
        ({"rtol": -1.0}, "`rtol` must be a finite non-negative number"),
        ({"assemble": 1}, "`assemble` must be a bool"),
    ],
)
def test_bad_multigrid_options(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dphys.Multigrid(**kwargs)


def test_bad_krylov_preconditioner():
    with pytest.raises(ValueError, match="`preconditioner` must be None, 'jacobi'"):
        dphys.Krylov(preconditioner="ilu")


# ------------------------------------------------------- initial guesses by steppers


def test_quadratic_extrapolation_is_exact_for_quadratic_histories():
    n = jnp.arange(3.0)
    u = lambda k: jnp.stack([1.0 + 2.0 * k - 0.5 * k**2, 3.0 * k])
    guess = dphys._stepper.extrapolate(u(n[2]), (u(n[1]), u(n[0])))
    np.testing.assert_allclose(guess, u(3.0), rtol=1e-14)


@pytest.mark.parametrize(
    "stepper_cls", [dphys.CrankNicolson, dphys.BDF2, dphys.IMEX, dphys.BackwardEuler]
)
def test_steppers_carry_the_history_and_the_guess_saves_iterations(stepper_cls):
    """Iterative solvers get (u^{n-1}, u^{n-2}) in the varying stepper state; the
    extrapolated guess gives the same steps (to the tolerance) in fewer iterations
    than the solver's own start (the same stepper state with no history)."""
    model = _heat((16, 16), "periodic", contrast=3.0)
    y, x = model.grid.coords
    u0 = jnp.cos(2 * jnp.pi * x) + 0.5 * jnp.sin(4 * jnp.pi * y)
    stepper = stepper_cls(solver=dphys.Krylov(rtol=1e-12))
    dt = 0.02

    @jax.jit
    def run(u0):
        ss = stepper.init(model, 0.0, dt, u0)
        const, _ = stepper.split_state(ss)
        assert isinstance(const, dphys.LinearSolveState) and const.history is None
        states, its, its_plain, diffs = [u0], [], [], []
        for k in range(6):
            u = states[-1]
            new, ss_new, _, it = stepper.step(model, k * dt, dt, u, ss)
            # The same step from the solver's own initial guess.
            plain = jax.tree_util.tree_map(lambda a: a, ss)
            solve = plain if stepper_cls not in (dphys.BDF2, dphys.IMEX) else plain[0]
            no_history = dphys.LinearSolveState(solve.solver, solve.structure)
            if stepper_cls in (dphys.BDF2, dphys.IMEX):
                plain = (no_history, *plain[1:])
            else:
                plain = no_history
            ref, _, _, it_plain = stepper.step(model, k * dt, dt, u, plain)
            diffs.append(jnp.max(jnp.abs(new - ref)))
            its.append(it)
            its_plain.append(it_plain)
            states.append(new)
            ss = ss_new
        solve = ss if stepper_cls not in (dphys.BDF2, dphys.IMEX) else ss[0]
        return solve.history, states, jnp.stack(its), jnp.stack(its_plain), diffs

    history, states, its, its_plain, diffs = run(u0)
    np.testing.assert_array_equal(history[0], states[-2])
    np.testing.assert_array_equal(history[1], states[-3])
    assert max(float(d) for d in diffs) < 1e-10
    assert int(its[2:].sum()) < int(its_plain[2:].sum()), (its, its_plain)


# ------------------------------------------------------------------ Auto's rule


def test_auto_preconditions_krylov_from_the_structure_hints():
    """None on periodic grids (measured fastest on P6), multigrid for symmetric
    single fields on bounded grids, none for non-symmetric bounded operators; FFT
    and Tridiagonal first."""
    auto = dphys.Auto()
    like = jnp.zeros((16, 16))
    cases = {
        "periodic": (None, "cg"),
        "neumann": ("multigrid", "cg"),
        "dirichlet": ("multigrid", "cg"),
    }
    for boundary, (precond, method) in cases.items():
        model = _heat((16, 16), boundary)
        solver = auto.resolve(model, like)
        assert isinstance(solver, dphys.Krylov), (boundary, solver)
        assert solver.preconditioner == precond, (boundary, solver)
        assert solver._method(model) == method, (boundary, solver)
    walled = _advection_diffusion("neumann")
    solver = auto.resolve(walled, like)
    assert isinstance(solver, dphys.Krylov) and solver.preconditioner is None
    assert solver._method(walled) == "gmres"
    periodic = _advection_diffusion("periodic")
    assert auto.resolve(periodic, like).preconditioner is None
    const = pdes.Heat(dphys.Grid((16, 16), boundary="periodic"), jnp.asarray(1e-2))
    assert isinstance(auto.resolve(const, like), dphys.FFT)
    assert isinstance(
        auto.resolve(_heat((17,), "dirichlet"), jnp.zeros(17)), dphys.Tridiagonal
    )
