"""Gradients of simulate: Taylor tests for every stepper and solver, dot tests of one
step's tangent/adjoint pair, agreement between adjoint modes, and memory that does
not grow with Krylov iterations or (much) with the number of steps."""

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import dphys.testing as dt
import pdes


def Reaction(grid, kappa, rate=1.0):
    """Heat plus an explicit Allen-Cahn reaction rate (u - u^3), so that IMEX, SBDF2
    and Newton actually see a nonlinear explicit part."""
    return helpers.Reaction(grid, kappa, rate=rate, cubic=True)


coords = helpers.coords


def kappa_field(grid):
    k = 0.02
    for a, x in enumerate(coords(grid)):
        k = k * (1.0 + 0.5 * np.sin(2 * np.pi * x + a))
    return jnp.asarray(k)


def blob(grid):
    r2 = sum((x - 0.4 - 0.1 * a) ** 2 for a, x in enumerate(coords(grid)))
    return jnp.asarray(0.2 + np.exp(-r2 / 0.02))


# Solver set-ups: grid, solver, whether kappa is a scalar (FFT needs one).
# The Taylor test resolves the cost to about 1e-12 relative, so the Krylov solves must
# be tighter than that: at the default rtol=1e-10 (2-norm) the cost jumps by ~1e-10
# wherever the iteration count changes between two evaluations.
SOLVERS = {
    "fft": (dphys.Grid(32), dphys.FFT(), True),
    "tridiagonal": (dphys.Grid(32, boundary="neumann"), dphys.Tridiagonal(), False),
    "cg": (
        dphys.Grid(32, boundary="dirichlet"),
        dphys.Krylov(method="cg", rtol=1e-13),
        False,
    ),
    "gmres": (dphys.Grid(32), dphys.Krylov(method="gmres", rtol=1e-13), False),
    "bicgstab": (
        dphys.Grid((16, 16), boundary="neumann"),
        dphys.Krylov(method="bicgstab", rtol=1e-13),
        False,
    ),
}
STEPPERS = {
    "BE": dphys.BackwardEuler,
    "CN": dphys.CrankNicolson,
    "Theta0.7": lambda solver: dphys.Theta(0.7, solver=solver),
    "BDF2": dphys.BDF2,
    "IMEX": dphys.IMEX,
}
N_STEPS, EVERY, DT = 50, 5, 0.02


def sensor_cost(grid, stepper, model_cls, *, adjoint=None, fast_forward=None):
    """0.5 * sum of squared misfits at 4 sensors, every EVERY steps over N_STEPS
    (adjoint: default Unrolled, the fastest to compile)."""
    adjoint = dphys.Unrolled() if adjoint is None else adjoint
    flat = np.linspace(3, grid.size - 4, 4).astype(int)
    sensors = np.unravel_index(flat, grid.shape)
    obs = 0.3 + 0.1 * np.arange(N_STEPS // EVERY * 4).reshape(-1, 4) / 40

    def cost(params):
        if isinstance(model_cls, type) or model_cls is Reaction:
            model = model_cls(grid, params["kappa"])
        else:  # a function (grid, params) -> model
            model = model_cls(grid, params)
        traj = dphys.simulate(
            model,
            stepper,
            params["state0"],
            dt=DT,
            n_steps=N_STEPS,
            saveat=dphys.SaveAt(every=EVERY, fn=lambda t, u: u[sensors]),
            adjoint=adjoint,
            fast_forward=fast_forward,
        )
        return 0.5 * jnp.sum((traj.ys - obs) ** 2)

    return cost


def check_taylor(cost, params, key):
    """Taylor tests along each parameter alone and along all of them, plus the
    negative control; all from one compiled value-and-gradient."""
    value_and_grad = jax.jit(jax.value_and_grad(cost))
    f = lambda p: value_and_grad(p)[0]
    grad = value_and_grad(params)[1]
    h = dt.tree_random_like(key, params)
    rms = lambda t: jnp.sqrt(
        sum(jnp.sum(a**2) for a in jax.tree.leaves(t))
        / sum(a.size for a in jax.tree.leaves(t))
    )
    h = {k: jax.tree.map(lambda a, k=k: a * rms(params[k]), v) for k, v in h.items()}
    zero = lambda t: jax.tree.map(jnp.zeros_like, t)
    rates = {}
    for name, keep in [(k, (k,)) for k in h] + [("all", tuple(h))]:
        d = {k: (v if k in keep else zero(v)) for k, v in h.items()}
        res = dt.taylor_test(f, params, grad=grad, direction=d)
        assert res.passed and res.rate1 > 1.9, (name, str(res))
        rates[name] = res.rate1
    wrong = jax.tree_util.tree_map(lambda g: g * (1 + 1e-3), grad)
    bad = dt.taylor_test(f, params, grad=wrong, direction=h)
    assert not bad.passed, str(bad)
    return rates


# The full stepper x solver matrix runs with `-m slow`; the default run covers every
# stepper and every solver at least once.
DEFAULT = {
    ("BE", "fft"),
    ("CN", "tridiagonal"),
    ("Theta0.7", "cg"),
    ("BDF2", "gmres"),
    ("IMEX", "bicgstab"),
}
MATRIX = [
    pytest.param(
        s, v, id=f"{s}-{v}", marks=() if (s, v) in DEFAULT else pytest.mark.slow
    )
    for s in STEPPERS
    for v in SOLVERS
]


@pytest.mark.parametrize("stepper_name, solver_name", MATRIX)
def test_taylor_every_stepper_and_solver(stepper_name, solver_name, getkey):
    grid, solver, scalar = SOLVERS[solver_name]
    stepper = STEPPERS[stepper_name](solver=solver)
    # IMEX and BDF2 extrapolate the explicit part: give them one.
    model_cls = Reaction if stepper_name in ("IMEX", "BDF2") else pdes.Heat
    params = {
        "state0": blob(grid),
        "kappa": jnp.asarray(0.02) if scalar else kappa_field(grid),
    }
    check_taylor(sensor_cost(grid, stepper, model_cls), params, getkey())


# The same matrix on a non-symmetric operator: centered advection-diffusion with a
# velocity field (differentiated too). Every heat operator is symmetric, so a
# transposed solve that forgets the transpose (A instead of A^T in an adjoint) passes
# the matrix above and fails here.
ADVECTION_SOLVERS = {
    "fft": (dphys.Grid(32), dphys.FFT(), True),
    "tridiagonal": (dphys.Grid(32, boundary="dirichlet"), dphys.Tridiagonal(), False),
    "gmres": (dphys.Grid(32), dphys.Krylov(method="gmres", rtol=1e-13), False),
    "bicgstab": (
        dphys.Grid((8, 10), boundary="dirichlet"),
        dphys.Krylov(method="bicgstab", rtol=1e-13),
        False,
    ),
}
ADVECTION_DEFAULT = {
    ("BE", "bicgstab"),
    ("CN", "gmres"),
    ("Theta0.7", "tridiagonal"),
    ("BDF2", "gmres"),
    ("IMEX", "fft"),
}
ADVECTION_MATRIX = [
    pytest.param(
        s,
        v,
        id=f"{s}-{v}",
        marks=() if (s, v) in ADVECTION_DEFAULT else pytest.mark.slow,
    )
    for s in STEPPERS
    for v in ADVECTION_SOLVERS
]


def advection_params(grid, scalar):
    """State, velocity (one component per axis) and diffusivity of a smooth
    advection-diffusion problem whose face velocities never vanish."""
    if scalar:
        velocity = tuple(jnp.asarray(0.8 - 0.3 * a) for a in range(grid.ndim))
        return {"state0": blob(grid), "velocity": velocity, "kappa": jnp.asarray(0.01)}
    xs = coords(grid)
    velocity = tuple(
        jnp.asarray(0.8 + 0.3 * np.sin(2 * np.pi * xs[-1] + a))
        for a in range(grid.ndim)
    )
    return {
        "state0": blob(grid),
        "velocity": velocity,
        "kappa": 0.5 * kappa_field(grid),
    }


def advection_model(grid, params):
    return pdes.Advection(grid, params["velocity"], kappa=params["kappa"])


@pytest.mark.parametrize("stepper_name, solver_name", ADVECTION_MATRIX)
def test_taylor_nonsymmetric_every_stepper_and_solver(
    stepper_name, solver_name, getkey
):
    grid, solver, scalar = ADVECTION_SOLVERS[solver_name]
    stepper = STEPPERS[stepper_name](solver=solver)
    params = advection_params(grid, scalar)
    model = advection_model(grid, params)
    assert not model.symmetric
    check_taylor(sensor_cost(grid, stepper, advection_model), params, getkey())


@pytest.mark.parametrize(
    "theta",
    [1.0, pytest.param(0.5, marks=pytest.mark.slow)],
    ids=["theta1", "theta0.5"],
)
def test_taylor_fully_implicit(theta, getkey):
    grid = dphys.Grid(32, boundary="neumann")
    stepper = dphys.FullyImplicit(theta=theta)
    params = {"state0": blob(grid), "kappa": kappa_field(grid)}
    check_taylor(sensor_cost(grid, stepper, Reaction), params, getkey())


def test_taylor_scalar_kappa_tridiagonal(getkey):
    """A scalar kappa off the FFT path (the band solve's derivative in kappa)."""
    grid = dphys.Grid(32, boundary="dirichlet")
    cost = sensor_cost(grid, dphys.CrankNicolson(), pdes.Heat)
    check_taylor(cost, {"state0": blob(grid), "kappa": jnp.asarray(0.03)}, getkey())


# --------------------------------------------------------- one-step dot tests


def _tight(solver):
    # Tangent and adjoint Krylov solves are separate iterations: each must be
    # accurate well below the 1e-12 dot-test tolerance (rtol is a 2-norm residual
    # relative to the right-hand side; the floor in float64 is 10 eps, 2.2e-15).
    if isinstance(solver, dphys.Krylov):
        return dphys.Krylov(method=solver.method, rtol=1e-15)
    return solver


# What a one-step dot test can catch. <J dx, dy> = <dx, J^T dy> compares the tangent
# (jax.jvp) with the adjoint (jax.vjp) of a step. Where both come from JAX's own
# linearisation and transposition (the FFT and tridiagonal paths, including the FFT
# path's hand-written per-mode JVP, whose adjoint JAX derives by transposing that
# same rule), they are transposes of each other by construction: the test cannot
# fail there and is no adjoint coverage, so those paths are not dot-tested (their
# gradients are checked by the Taylor matrices above). Where the tangent and the
# adjoint are separate iterative solves (our Krylov solvers through lineax's
# implicit-function-theorem rules: tangent with A and M, adjoint with A^T and M^T;
# Newton's IFT adjoint), the test is real, and it is run on a non-symmetric
# operator, where an adjoint solve with A instead of A^T fails it. CG needs a
# symmetric operator: heat.
DOT_CASES = [
    pytest.param("cg", "CN", id="cg-CN"),
    pytest.param("gmres", "CN", id="gmres-CN"),
    pytest.param("bicgstab", "CN", id="bicgstab-CN"),
    pytest.param("gmres", "BDF2", id="gmres-BDF2"),
    pytest.param("bicgstab", "BDF2", id="bicgstab-BDF2", marks=pytest.mark.slow),
    pytest.param("cg", "BDF2", id="cg-BDF2", marks=pytest.mark.slow),
    pytest.param("newton", "FullyImplicit", id="newton-FullyImplicit"),
]


@pytest.mark.parametrize("solver_name, stepper_name", DOT_CASES)
def test_one_step_tangent_adjoint_dot(solver_name, stepper_name):
    if stepper_name == "FullyImplicit":
        # Advection-diffusion plus an Allen-Cahn reaction, all implicit: Newton's
        # Jacobian I - theta dt (L + N') is non-symmetric.
        grid = dphys.Grid(32, boundary="dirichlet")
        stepper = dphys.FullyImplicit(theta=0.5, linear_rtol=1e-14)

        def make(grid, p):
            return dphys.Augmented(
                advection_model(grid, p), explicit=lambda t, u: u - u**3
            )

        x = advection_params(grid, False)
    elif solver_name == "cg":
        grid, solver, _ = SOLVERS["cg"]
        stepper = STEPPERS[stepper_name](solver=_tight(solver))
        make = lambda grid, p: pdes.Heat(grid, p["kappa"])
        x = {"state0": blob(grid), "kappa": kappa_field(grid)}
    else:
        grid, solver, _ = ADVECTION_SOLVERS[solver_name]
        stepper = STEPPERS[stepper_name](solver=_tight(solver))
        make = advection_model
        x = advection_params(grid, False)
    assert make(grid, x).symmetric == (solver_name == "cg")

    def step(p):
        model = make(grid, p)
        ss = stepper.init(model, 0.0, 0.1, p["state0"])
        new, ss, _, _ = stepper.step(model, 0.0, 0.1, p["state0"], ss)
        if stepper_name == "BDF2":  # the second step is the true two-step formula
            new, ss, _, _ = stepper.step(model, 0.1, 0.1, new, ss)
        return new

    res = dt.dot_test_vjp(jax.jit(step), x)
    assert res.passed and res.rel_error < 1e-12, str(res)


# --------------------------------------------------- agreement between modes


def _grad(cost, params):
    return jax.jit(jax.grad(cost))(params)


def _assert_tree_close(a, b, rtol):
    for k in a:
        err = float(jnp.max(jnp.abs(a[k] - b[k])) / jnp.max(jnp.abs(b[k])))
        assert err < rtol, (k, err)


def test_checkpointed_equals_unrolled():
    grid, solver, _ = SOLVERS["tridiagonal"]
    stepper = dphys.CrankNicolson(solver=solver)
    params = {"state0": blob(grid), "kappa": kappa_field(grid)}
    ref = _grad(sensor_cost(grid, stepper, pdes.Heat, adjoint=dphys.Unrolled()), params)
    for levels in (1, 2, 3):
        adjoint = dphys.Checkpointed(levels=levels)
        g = _grad(sensor_cost(grid, stepper, pdes.Heat, adjoint=adjoint), params)
        # Same arithmetic, replayed: agreement to round-off.
        _assert_tree_close(g, ref, 1e-12)


@pytest.mark.parametrize("levels", [2, 3])
def test_checkpointing_runs_the_remainder_chunks(levels):
    """Loop lengths that the chunks do not divide: every `rest` branch of the
    nested and segmented scans must run its steps (a skipped remainder chunk
    loses steps), values and gradients equal to the unchecked loop."""
    from dphys._adjoint import nested_scan, segmented_scan

    def count(c):
        return c + 1, c + 1

    # nested_scan: 50 = 6 x 8 + 2 at two levels; 100 = 4 x 22 + 12, 22 = 4 x 5 + 2
    # at three. The counter sees every step once, in order.
    length = 50 if levels == 2 else 100
    final, ys = nested_scan(count, jnp.asarray(0), length, levels)
    assert int(final) == length
    np.testing.assert_array_equal(ys, np.arange(1, length + 1))
    # segmented_scan: segments longer than a chunk (one segment of 103 = 10 x 10 +
    # 3 steps) and shorter (103 segments of 1 step, in groups of 10 + 3).
    for n_seg, seg in ((1, 103), (103, 1), (7, 15)):
        final, ys = segmented_scan(
            lambda c: (c + 1, None), lambda c: c, jnp.asarray(0), n_seg, seg, levels
        )
        assert int(final) == n_seg * seg, (n_seg, seg)
        np.testing.assert_array_equal(ys, seg * np.arange(1, n_seg + 1))

    # Through simulate, with its gradient (stepping and fast-forward loops).
    grid = dphys.Grid(16)
    u0 = blob(grid)
    for saveat, fast in (
        (dphys.SaveAt(), False),
        (dphys.SaveAt(every=1), False),
        (dphys.SaveAt(every=1), True),
    ):

        def run(u, adjoint, saveat=saveat, fast=fast):
            traj = dphys.simulate(
                pdes.Heat(grid, 0.01),
                dphys.CrankNicolson(),
                u,
                dt=0.05,
                n_steps=103,
                saveat=saveat,
                adjoint=adjoint,
                fast_forward=fast,
            )
            return traj.ys

        cost = lambda u, adjoint: jnp.sum(jnp.sin(3.0 * run(u, adjoint)))
        ref = run(u0, dphys.Unrolled())
        got = run(u0, dphys.Checkpointed(levels=levels))
        np.testing.assert_allclose(got, ref, rtol=0, atol=1e-14)
        g_ref = jax.grad(cost)(u0, dphys.Unrolled())
        g = jax.grad(cost)(u0, dphys.Checkpointed(levels=levels))
        np.testing.assert_allclose(g, g_ref, rtol=1e-12, atol=1e-14)


def test_fast_forward_gradient_equals_stepping():
    grid = dphys.Grid(32)
    params = {"state0": blob(grid), "kappa": jnp.asarray(0.02)}
    for stepper in (dphys.CrankNicolson(), dphys.BackwardEuler()):
        fast = _grad(sensor_cost(grid, stepper, pdes.Heat, fast_forward=True), params)
        slow = _grad(sensor_cost(grid, stepper, pdes.Heat, fast_forward=False), params)
        _assert_tree_close(fast, slow, 1e-11)


@pytest.mark.parametrize("direct", ["fft", "tridiagonal"])
def test_krylov_gradient_equals_direct_solver_gradient(direct):
    grid, solver, scalar = SOLVERS[direct]
    params = {
        "state0": blob(grid),
        "kappa": jnp.asarray(0.02) if scalar else kappa_field(grid),
    }
    ref = _grad(sensor_cost(grid, dphys.BDF2(solver=solver), pdes.Heat), params)
    krylov = dphys.BDF2(solver=dphys.Krylov(method="gmres" if scalar else "cg"))
    g = _grad(sensor_cost(grid, krylov, pdes.Heat), params)
    # Krylov solves stop at rtol=1e-10 per step: agreement to ~1e-8, checked at 1e-6.
    _assert_tree_close(g, ref, 1e-6)
    assert not all(bool(jnp.all(g[k] == ref[k])) for k in g)  # really different paths


# ------------------------------------------------------------------- memory


def _temp_bytes(fn, *args):
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize(
    "method",
    [
        "cg",
        pytest.param("gmres", marks=pytest.mark.slow),
        pytest.param("bicgstab", marks=pytest.mark.slow),
    ],
)
def test_krylov_gradient_memory_independent_of_iterations(method):
    """lineax differentiates the solve implicitly (one transposed solve), so the
    backward pass stores nothing per Krylov iteration."""
    grid = dphys.Grid((16, 16), boundary="neumann")
    kappa, rhs = kappa_field(grid), blob(grid)

    def make(rtol, max_steps):
        solver = dphys.Krylov(
            method=method, rtol=rtol, atol=rtol * 1e-2, max_steps=max_steps
        )

        def f(kappa, rhs):
            model = pdes.Heat(grid, kappa)
            structure = solver.init(model, 0.0, rhs)
            x, _, iterations = solver.solve(model, 0.0, 0.5, rhs, structure)
            return jnp.sum(x**2), iterations

        return f

    loose, tight = make(1e-3, 20), make(1e-12, 2000)
    it_loose = int(jax.jit(loose)(kappa, rhs)[1])
    it_tight = int(jax.jit(tight)(kappa, rhs)[1])
    assert it_tight > it_loose  # the tight solve really iterates more
    grad = lambda f: jax.grad(f, argnums=(0, 1), has_aux=True)
    mem_loose = _temp_bytes(grad(loose), kappa, rhs)
    mem_tight = _temp_bytes(grad(tight), kappa, rhs)
    assert abs(mem_tight - mem_loose) <= 0.05 * mem_loose, (mem_loose, mem_tight)


def test_newton_gradient_memory_independent_of_iterations():
    """FullyImplicit differentiates each Newton solve by the implicit function
    theorem (one transposed GMRES solve), so reverse mode stores nothing per Newton
    or GMRES iteration: the compiled gradient's temporary memory is the same for a
    loose solve (a few iterations, low caps) and a tight one (more iterations, caps
    of 60 Newton and 800 GMRES steps). Differentiating through the iterations
    instead would store a state per iteration (or per checkpoint)."""
    grid = dphys.Grid((16, 16), boundary="neumann")
    kappa, u0 = kappa_field(grid), blob(grid)

    def make(rtol, max_steps, linear_rtol, linear_max_steps):
        stepper = dphys.FullyImplicit(
            rtol=rtol,
            atol=rtol * 1e-2,
            max_steps=max_steps,
            linear_rtol=linear_rtol,
            linear_max_steps=linear_max_steps,
        )

        def f(kappa, u):
            model = Reaction(grid, kappa, rate=2.0)
            ss = stepper.init(model, 0.0, 0.2, u)
            new, _, _, iterations = stepper.step(model, 0.0, 0.2, u, ss)
            return jnp.sum(new**2), iterations

        return f

    loose = make(0.5, 3, 1e-3, 30)
    tight = make(1e-13, 60, 1e-13, 800)
    it_loose = int(jax.jit(loose)(kappa, u0)[1])
    it_tight = int(jax.jit(tight)(kappa, u0)[1])
    assert it_tight > it_loose, (it_loose, it_tight)  # really more Newton steps
    grad = lambda f: jax.grad(f, argnums=(0, 1), has_aux=True)
    mem_loose = _temp_bytes(grad(loose), kappa, u0)
    mem_tight = _temp_bytes(grad(tight), kappa, u0)
    assert abs(mem_tight - mem_loose) <= 0.05 * mem_loose, (mem_loose, mem_tight)


def test_checkpointed_memory_grows_sublinearly():
    grid = dphys.Grid((16, 16), lengths=1.0)
    params = {"state0": blob(grid), "kappa": jnp.asarray(0.01)}

    def memory(adjoint, n_steps):
        def cost(p):
            traj = dphys.simulate(
                pdes.Heat(grid, p["kappa"]),
                dphys.CrankNicolson(),
                p["state0"],
                dt=1e-4,
                n_steps=n_steps,
                saveat=dphys.SaveAt(fn=lambda t, u: u[3, 4]),
                adjoint=adjoint,
                fast_forward=False,
            )
            return jnp.sum(traj.ys**2)

        return _temp_bytes(jax.grad(cost), params)

    unrolled = [memory(dphys.Unrolled(), n) for n in (250, 4000)]
    two = [memory(dphys.Checkpointed(levels=2), n) for n in (250, 4000)]
    three = [memory(dphys.Checkpointed(levels=3), n) for n in (250, 4000)]
    # Unrolled stores every step: 16x the steps, about 16x the memory.
    assert unrolled[1] > 10 * unrolled[0], unrolled
    # sqrt(16) = 4 for two levels, 16^(1/3) = 2.5 for three.
    assert two[1] <= 4 * two[0], two
    assert three[1] <= 4 * three[0], three
    assert two[1] < unrolled[1] / 10 and three[1] <= two[1]
