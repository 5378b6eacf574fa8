"""Time steppers and implicit solvers: measured order in time against exact
semi-discrete solutions, implicit-solve residuals, stiff stability, solver choice."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
from helpers import Reaction

import dphys
import pdes
from dphys.operators import laplacian


class Unsteady(dphys.AbstractModel):
    """Non-autonomous: kappa(t) = kappa (1 + sin(2 pi t) / 2) and a forcing f(t)."""

    grid: dphys.Grid
    kappa: jax.Array

    def linear(self, t, state):
        return laplacian(
            state, self.grid, self.kappa * (1 + 0.5 * jnp.sin(2 * jnp.pi * t))
        )

    def forcing(self, t):
        x = jnp.asarray(self.grid.axis_coords(0))
        return jnp.sin(3.0 * t) * jnp.cos(2 * jnp.pi * x)

    @property
    def autonomous(self):
        return False

    @property
    def symmetric(self):
        return True

    @property
    def translation_invariant(self):
        return True


GRID = dphys.Grid(16, lengths=1.0)
X = GRID.axis_coords(0)
U0 = jnp.asarray(1.0 + 0.5 * np.cos(2 * np.pi * X) + 0.3 * np.sin(4 * np.pi * X))
T1 = 1.0


def _dense(model):
    return np.asarray(jax.jacfwd(lambda v: model.vector_field(0.0, v))(U0))


def _reference(model):
    """Exact solution of the semi-discrete ODE at T1: expm for autonomous linear
    models, otherwise DOP853 at tolerance 1e-13 (an independent integrator)."""
    if isinstance(model, pdes.Heat) or (
        isinstance(model, Reaction) and not model.cubic
    ):
        return scipy.linalg.expm(_dense(model) * T1) @ np.asarray(U0)
    f = jax.jit(lambda t, v: model.vector_field(t, v))
    sol = scipy.integrate.solve_ivp(
        lambda t, v: np.asarray(f(t, v)),
        (0.0, T1),
        np.asarray(U0),
        method="DOP853",
        rtol=1e-13,
        atol=1e-13,
    )
    return sol.y[:, -1]


MODELS = {
    "heat": pdes.Heat(GRID, 0.05),
    "linear-reaction": Reaction(GRID, jnp.asarray(0.05), jnp.asarray(1.0)),
    "cubic-reaction": Reaction(GRID, jnp.asarray(0.05), jnp.asarray(2.0), cubic=True),
    "unsteady": Unsteady(GRID, jnp.asarray(0.05)),
}

# (model, stepper, expected order, step counts). CN/Theta are only first order once
# there is an explicit part (forward Euler on N); IMEX/SBDF2 keep second order.
ORDER_CASES = [
    ("heat", dphys.BackwardEuler(), 1, (20, 40, 80)),
    ("heat", dphys.CrankNicolson(), 2, (20, 40, 80)),
    ("heat", dphys.Theta(0.7), 1, (20, 40, 80)),
    ("heat", dphys.BDF2(), 2, (20, 40, 80)),
    ("linear-reaction", dphys.IMEX(), 2, (20, 40, 80)),
    ("linear-reaction", dphys.BackwardEuler(), 1, (20, 40, 80)),
    ("linear-reaction", dphys.CrankNicolson(), 1, (20, 40, 80)),
    ("cubic-reaction", dphys.IMEX(), 2, (20, 40, 80)),
    ("cubic-reaction", dphys.BDF2(), 2, (20, 40, 80)),
    ("cubic-reaction", dphys.FullyImplicit(theta=1.0), 1, (20, 40)),
    ("cubic-reaction", dphys.FullyImplicit(theta=0.5), 2, (20, 40)),
    ("unsteady", dphys.BackwardEuler(), 1, (20, 40, 80)),
    ("unsteady", dphys.CrankNicolson(), 2, (20, 40, 80)),
    ("unsteady", dphys.BDF2(), 2, (20, 40, 80)),
]


def _case_id(case):
    name, stepper, _, _ = case
    theta = getattr(stepper, "theta", None)
    suffix = "" if theta is None or isinstance(stepper, dphys.CrankNicolson) else theta
    return f"{name}-{type(stepper).__name__}{suffix}"


def measured_order(model, stepper, steps):
    ref = _reference(model)
    errors = []
    for n in steps:
        final = jax.jit(
            lambda m, u, n=n: (
                dphys.simulate(
                    m, stepper, u, dt=T1 / n, n_steps=n, adjoint=dphys.Unrolled()
                ).final
            )
        )(model, U0)
        errors.append(float(np.max(np.abs(np.asarray(final) - ref))))
    errors = np.asarray(errors)
    return errors, np.log2(errors[:-1] / errors[1:])


@pytest.mark.parametrize("case", ORDER_CASES, ids=[_case_id(c) for c in ORDER_CASES])
def test_measured_order_in_time(case):
    name, stepper, order, steps = case
    errors, p = measured_order(MODELS[name], stepper, steps)
    assert abs(p[-1] - order) <= 0.3, (errors, p)
    assert order == stepper.order or name != "heat"


def test_reference_solutions_agree():
    """The two references (expm and DOP853) agree, so either can be trusted."""
    model = MODELS["heat"]
    expm = _reference(model)
    f = jax.jit(lambda t, v: model.vector_field(t, v))
    ivp = scipy.integrate.solve_ivp(
        lambda t, v: np.asarray(f(t, v)),
        (0.0, T1),
        np.asarray(U0),
        method="DOP853",
        rtol=1e-13,
        atol=1e-13,
    ).y[:, -1]
    np.testing.assert_allclose(ivp, expm, atol=1e-11)


# ---------------------------------------------------------------- implicit solves


def _field(grid):
    k = 1.0
    for a in range(grid.ndim):
        x = np.meshgrid(
            *[grid.axis_coords(b) for b in range(grid.ndim)], indexing="ij"
        )[a]
        k = k * (1.0 + 0.5 * np.sin(2 * np.pi * x + 0.7 * a))
    return jnp.asarray(0.1 * k)


SOLVE_CASES = [
    ("fft-1d", dphys.Grid(24), "scalar", dphys.FFT(), 1e-13),
    ("fft-2d", dphys.Grid((8, 12), lengths=(1.0, 2.0)), "scalar", dphys.FFT(), 1e-13),
    (
        "tridiagonal-dirichlet",
        dphys.Grid(24, boundary="dirichlet"),
        "field",
        dphys.Tridiagonal(),
        1e-13,
    ),
    (
        "tridiagonal-neumann",
        dphys.Grid(24, boundary="neumann"),
        "field",
        dphys.Tridiagonal(),
        1e-13,
    ),
    (
        "cg-2d",
        dphys.Grid((8, 12), boundary="neumann"),
        "field",
        dphys.Krylov(method="cg"),
        1e-9,
    ),
    (
        "gmres-2d",
        dphys.Grid((8, 12), boundary="dirichlet"),
        "field",
        dphys.Krylov(method="gmres"),
        1e-9,
    ),
    ("bicgstab-1d", dphys.Grid(24), "field", dphys.Krylov(method="bicgstab"), 1e-9),
    (
        "cg-no-preconditioner",
        dphys.Grid(24),
        "field",
        dphys.Krylov(preconditioner=None),
        1e-9,
    ),
    # Non-symmetric operators (advection-diffusion with a velocity field): every heat
    # operator is symmetric, so a solver that solves with A^T instead of A (e.g.
    # swapped bands) passes the cases above and fails these.
    (
        "tridiagonal-advection-dirichlet",
        dphys.Grid(24, boundary="dirichlet"),
        "advection",
        dphys.Tridiagonal(),
        1e-13,
    ),
    (
        "tridiagonal-advection-neumann",
        dphys.Grid(24, boundary="neumann"),
        "advection-upwind",
        dphys.Tridiagonal(),
        1e-13,
    ),
    (
        "gmres-advection-2d",
        dphys.Grid((8, 12), boundary="dirichlet"),
        "advection",
        dphys.Krylov(method="gmres"),
        1e-9,
    ),
    (
        "bicgstab-advection-1d",
        dphys.Grid(24),
        "advection-upwind",
        dphys.Krylov(method="bicgstab"),
        1e-9,
    ),
    (
        "fft-advection-2d",
        dphys.Grid((8, 12), lengths=(1.0, 2.0)),
        "advection-constant",
        dphys.FFT(),
        1e-13,
    ),
]


def _solve_model(kind, grid):
    """The model of a solve case: heat (symmetric) or advection (non-symmetric)."""
    if kind == "scalar":
        return pdes.Heat(grid, 0.1)
    if kind == "field":
        return pdes.Heat(grid, _field(grid))
    if kind == "advection-constant":
        return pdes.Advection(grid, (0.7, -1.3), kappa=0.02, scheme="upwind")
    # A velocity field with no zero (the upwind kink) and a diffusivity field.
    velocity = tuple(1.0 + 2.0 * _field(grid) for _ in range(grid.ndim))
    scheme = "upwind" if kind == "advection-upwind" else "centered"
    return pdes.Advection(grid, velocity, kappa=0.3 * _field(grid), scheme=scheme)


@pytest.mark.parametrize("case", SOLVE_CASES, ids=[c[0] for c in SOLVE_CASES])
def test_implicit_solve_residual(case, getkey):
    _, grid, kind, solver, tol = case
    model = _solve_model(kind, grid)
    assert model.symmetric == (kind in ("scalar", "field"))
    rhs = jax.random.normal(getkey(), grid.shape)
    gamma = 0.37

    @jax.jit
    def solve(model, rhs):
        structure = solver.init(model, 0.0, rhs)
        return solver.solve(model, 0.0, gamma, rhs, structure)

    x, result, _ = solve(model, rhs)
    assert result == dphys.RESULTS.successful
    n = grid.size
    apply_l = jax.jit(
        jax.vmap(lambda v: model.linear(0.0, v.reshape(grid.shape)).ravel())
    )
    residual = np.asarray(x).ravel() - gamma * apply_l(x.reshape(1, n))[0] - rhs.ravel()
    assert np.linalg.norm(residual) / float(jnp.linalg.norm(rhs)) < tol
    # ... and it is the solution of the dense system.
    A = np.eye(n) - gamma * np.asarray(apply_l(jnp.eye(n))).T
    if not model.symmetric:  # really non-symmetric, so A and A^T solves differ
        assert np.abs(A - A.T).max() > 0.1 * np.abs(A - np.eye(n)).max()
    exact = np.linalg.solve(A, np.asarray(rhs).ravel())
    np.testing.assert_allclose(
        np.asarray(x).ravel(), exact, atol=100 * tol * np.abs(exact).max()
    )


def test_auto_picks_the_structured_solver():
    like1, like2 = jnp.zeros(16), jnp.zeros((8, 8))
    resolve = lambda model, like: type(dphys.Auto().resolve(model, like))
    assert resolve(pdes.Heat(dphys.Grid(16), 0.1), like1) is dphys.FFT
    assert resolve(pdes.Heat(dphys.Grid(16), jnp.ones(16)), like1) is dphys.Krylov
    assert (
        resolve(pdes.Heat(dphys.Grid(16, boundary="neumann"), 0.1), like1)
        is dphys.Tridiagonal
    )
    assert (
        resolve(pdes.Heat(dphys.Grid((8, 8), boundary="dirichlet"), 0.1), like2)
        is dphys.Krylov
    )
    assert resolve(pdes.Heat(dphys.Grid((8, 8)), 0.1), like2) is dphys.FFT


# ----------------------------------------------------------------- stiff decay


@pytest.mark.parametrize(
    "stepper, l_stable",
    [
        (dphys.BackwardEuler(), True),
        (dphys.BDF2(), True),
        (dphys.CrankNicolson(), False),
        (dphys.Theta(0.75), False),
    ],
    ids=["BE", "BDF2", "CN", "Theta0.75"],
)
def test_stiff_mode_stability(stepper, l_stable):
    """The grid-scale mode with kappa lam dt = -4e4: L-stable schemes kill it in a
    step or two, CN keeps |G| -> 1 (bounded, oscillating); none blows up."""
    grid = dphys.Grid(32)
    u0 = jnp.asarray(np.cos(np.pi * np.arange(32)))  # Nyquist mode, lam = -4/dx^2
    lam = -4.0 * 32**2
    dt = 4e4 / (-lam)
    traj = jax.jit(
        lambda u: dphys.simulate(
            pdes.Heat(grid, 1.0),
            stepper,
            u,
            dt=dt,
            n_steps=6,
            saveat=dphys.SaveAt(every=1),
            fast_forward=False,
        )
    )(u0)
    amp = np.asarray(jnp.max(jnp.abs(traj.ys), axis=1))
    assert np.all(amp <= 1.0 + 1e-12)
    if l_stable:
        assert amp[-1] < 1e-6
    elif isinstance(stepper, dphys.CrankNicolson):
        assert amp[-1] > 0.99  # not L-stable: G -> -1
        signs = np.sign(np.asarray(traj.ys[:, 0]))
        assert np.all(signs[1:] == -signs[:-1])
    else:
        theta = stepper.theta
        g = (1 + (1 - theta) * dt * lam) / (1 - theta * dt * lam)
        np.testing.assert_allclose(amp[-1], abs(g) ** 6, rtol=1e-10)


def test_fast_forward_equals_stepping_and_is_used():
    grid = dphys.Grid((8, 12), lengths=(1.0, 1.5))
    y, x = np.meshgrid(grid.axis_coords(0), grid.axis_coords(1), indexing="ij")
    u0 = jnp.asarray(np.exp(-((x - 0.7) ** 2 + (y - 0.4) ** 2) / 0.05))
    model = pdes.Heat(grid, 0.03)
    kw = dict(dt=0.01, n_steps=60, saveat=dphys.SaveAt(every=20))
    for stepper in (dphys.CrankNicolson(), dphys.BackwardEuler(), dphys.Theta(0.6)):
        fast = dphys.simulate(model, stepper, u0, **kw)
        slow = dphys.simulate(model, stepper, u0, fast_forward=False, **kw)
        assert bool(fast.stats["fast_forward"]) and not bool(slow.stats["fast_forward"])
        np.testing.assert_allclose(fast.ys, slow.ys, rtol=0, atol=1e-13)
    # BDF2 and IMEX (multistep, explicit part) cannot propagate.
    assert not dphys.BDF2().can_propagate(model, u0)
    assert not dphys.CrankNicolson().can_propagate(MODELS["linear-reaction"], U0)


@pytest.mark.parametrize(
    "stepper,theta",
    [(dphys.CrankNicolson(), 0.5), (dphys.Theta(0.7), 0.7), (dphys.IMEX(), 0.5)],
    ids=["cn", "theta0.7", "imex"],
)
def test_fft_structure_factored_once_per_run(stepper, theta):
    # Steppers with a fixed gamma = theta dt factor the FFT symbol in init (the
    # per-mode inverse is then built and differentiated once per run); a step from
    # the factored state equals one from the raw symbol, and the factored part is
    # the constant part that simulate closes over.
    model, dt = MODELS["linear-reaction"], 0.01
    ss = stepper.init(model, 0.0, dt, U0)
    const, var = stepper.split_state(ss)
    assert isinstance(const, dphys.LinearSolveState)
    assert isinstance(const.solver, dphys.FFT)  # Auto, resolved once in init
    factored = const.structure
    assert isinstance(factored, dphys.FactoredSymbol)
    symbol = dphys.probe_symbol(model, 0.0, U0)
    np.testing.assert_allclose(factored.symbol, symbol)
    np.testing.assert_allclose(factored.inverse, 1.0 / (1.0 - theta * dt * symbol))
    joined = stepper.join_state(const, var)
    assert jax.tree.structure(joined) == jax.tree.structure(ss)
    raw = stepper.join_state(dphys.LinearSolveState(const.solver, symbol), var)
    a = stepper.step(model, 0.0, dt, U0, ss)[0]
    b = stepper.step(model, 0.0, dt, U0, raw)[0]
    np.testing.assert_allclose(a, b, rtol=1e-14, atol=1e-14)


def test_bdf2_keeps_the_raw_symbol_as_its_constant_part():
    # BDF2's gamma changes after the first step, so it must not factor.
    model = MODELS["linear-reaction"]
    const, var = dphys.BDF2().split_state(dphys.BDF2().init(model, 0.0, 0.01, U0))
    assert isinstance(const, dphys.LinearSolveState)
    assert isinstance(const.solver, dphys.FFT)
    np.testing.assert_allclose(const.structure, dphys.probe_symbol(model, 0.0, U0))
    assert len(var) == 3


class _ForcedReaction(Reaction):
    """Reaction-diffusion with a time-dependent source; L itself is autonomous."""

    def forcing(self, t):
        x = jnp.asarray(self.grid.axis_coords(0))
        return jnp.sin(3.0 * t) * jnp.cos(2 * jnp.pi * x)


@pytest.mark.parametrize(
    "make",
    [
        lambda s: dphys.CrankNicolson(solver=s),
        lambda s: dphys.Theta(0.7, solver=s),
        lambda s: dphys.IMEX(solver=s),
        lambda s: dphys.Theta(0.0, solver=s, allow_unstable=True),
        lambda s: dphys.BackwardEuler(solver=s),
    ],
    ids=["cn", "theta0.7", "imex", "explicit", "be"],
)
def test_factored_fft_step_equals_krylov_step_with_forcing_and_explicit_part(make):
    # With a factored FFT solve the θ/IMEX steps skip the explicit half (1-θ)Δt L u
    # (A^{-1}(u/θ + E) - (1-θ)/θ u); the trajectory must equal the textbook form
    # solved by GMRES, explicit reaction and time-dependent forcing included.
    model = _ForcedReaction(GRID, jnp.asarray(0.05), jnp.asarray(2.0), cubic=True)
    kw = dict(dt=0.01, n_steps=30, saveat=dphys.SaveAt(every=10))
    fft = dphys.simulate(model, make(dphys.FFT()), U0, **kw)
    krylov = dphys.simulate(
        model, make(dphys.Krylov(method="gmres", rtol=1e-14)), U0, **kw
    )
    assert not bool(fft.stats["fast_forward"])
    np.testing.assert_allclose(fft.ys, krylov.ys, rtol=0, atol=1e-12)
    grad = lambda s: jax.grad(
        lambda k: jnp.sum(
            dphys.simulate(
                eqx.tree_at(lambda m: m.kappa, model, k), make(s), U0, **kw
            ).ys
            ** 2
        )
    )(jnp.asarray(0.05))
    np.testing.assert_allclose(
        grad(dphys.FFT()), grad(dphys.Krylov(method="gmres", rtol=1e-14)), rtol=1e-9
    )


# ----------------------------------------------------- static structure, resolved once


class _CountingPrefers(dphys.AbstractModel):
    """Heat on walls that counts how often Auto asks for its preferred solver (the
    step of Auto's resolution that reaches the model) and refuses to have its
    explicit part evaluated outside a step."""

    grid: dphys.Grid
    kappa: jax.Array
    calls: list = eqx.field(static=True)

    def linear(self, t, state):
        return laplacian(state, self.grid, self.kappa)

    def preferred_solver(self, like):
        self.calls.append("resolve")
        return None

    @property
    def symmetric(self):
        return True


def test_auto_is_resolved_once_per_run():
    """simulate resolves Auto once and carries the concrete solver in the stepper
    state (before: 4 to 8 resolutions per call, from 7 places)."""
    grid = dphys.Grid(12, boundary="neumann")
    calls = []
    model = _CountingPrefers(grid, jnp.asarray(0.05), calls)
    u0 = jnp.asarray(np.cos(np.pi * grid.axis_coords(0)))
    for stepper in (dphys.CrankNicolson(), dphys.BDF2(), dphys.IMEX()):
        calls.clear()
        traj = dphys.simulate(model, stepper, u0, dt=0.01, n_steps=3)
        assert calls == ["resolve"], type(stepper).__name__
        assert bool(jnp.all(jnp.isfinite(traj.final)))
    ss = dphys.CrankNicolson().init(model, 0.0, 0.01, u0)
    assert isinstance(ss.solver, dphys.Tridiagonal)


class _NoEval(Reaction):
    """A model whose explicit part raises when evaluated: structure decisions must
    come from the static hints."""

    def explicit(self, t, state):
        raise AssertionError("explicit() evaluated to decide structure")


def test_can_propagate_reads_static_hints_without_evaluating_the_model():
    model = _NoEval(GRID, jnp.asarray(0.05), jnp.asarray(1.0))
    assert model.has_explicit  # overrides explicit
    assert not dphys.CrankNicolson().can_propagate(model, U0)
    heat = pdes.Heat(GRID, 0.05)
    assert not heat.has_explicit and not heat.has_forcing
    assert dphys.CrankNicolson().can_propagate(heat, U0)
    sourced = pdes.Heat(GRID, 0.05, source=1.0)
    assert sourced.has_forcing
    assert not dphys.CrankNicolson().can_propagate(sourced, U0)


def test_structure_hints_of_the_models_and_the_wrapper():
    sw_grid = dphys.Grid((8, 8), lengths=8e4, boundary="periodic")
    linear = pdes.ShallowWater(sw_grid, 100.0)
    assert not linear.has_explicit and not linear.has_forcing
    assert pdes.ShallowWater(sw_grid, 100.0, quadratic_drag=1e-3).has_explicit
    windy = pdes.ShallowWater(sw_grid, 100.0, wind=(1e-4, 0.0))
    assert windy.has_forcing and not windy.has_explicit
    nonlinear = pdes.ShallowWater(sw_grid, 100.0, wind=(1e-4, 0.0), nonlinear=True)
    assert nonlinear.has_explicit and not nonlinear.has_forcing
    adv = pdes.Advection(dphys.Grid(16), velocity=1.0)
    assert not adv.has_explicit and not adv.has_forcing
    heat = pdes.Heat(GRID, 0.05)
    zeros = jnp.zeros(GRID.shape)
    assert dphys.Augmented(heat, forcing=zeros).has_forcing
    assert not dphys.Augmented(heat, forcing=zeros).has_explicit
    assert dphys.Augmented(heat, explicit=lambda t, u: u).has_explicit
    assert not dphys.Augmented(heat, explicit=lambda t, u: u).has_forcing
    reaction = MODELS["linear-reaction"]
    assert dphys.Augmented(reaction, forcing=zeros).has_explicit


class _Lying(Reaction):
    @property
    def has_explicit(self):
        return False


def test_a_hint_that_hides_a_term_is_refused():
    model = _Lying(GRID, jnp.asarray(0.05), jnp.asarray(1.0))
    with pytest.raises(ValueError, match="`_Lying.has_explicit` is False but"):
        dphys.simulate(model, dphys.CrankNicolson(), U0, dt=0.01, n_steps=2)

# ------------------------------------------------------------- monotonicity warning


def _step_profile(stepper, r):
    """One step of 1D heat from a unit spike at diffusion number r."""
    grid = dphys.Grid(32, boundary="neumann")
    u0 = jnp.where(jnp.arange(32) == 16, 1.0, 0.0)
    dt = r * grid.spacing[0] ** 2 / 0.01
    return dphys.simulate(pdes.Heat(grid, 0.01), stepper, u0, dt=dt, n_steps=1).final


def test_crank_nicolson_at_a_large_diffusion_number_warns():
    # r = kappa dt / dx^2 = 100: CN's explicit half has diagonal 1 - r < 0, and one
    # step of a spike leaves [0, 1] (negative values: the grid-scale modes flip
    # sign with |G| near 1) ...
    with pytest.warns(UserWarning, match="far from monotone.*BackwardEuler stays"):
        u = _step_profile(dphys.CrankNicolson(), 100.0)
    assert float(jnp.max(u)) > 1.0 + 1e-3 or float(jnp.min(u)) < -1e-3
    # ... backward Euler stays in [0, 1], and CN at r <= 1 too: no warning.
    for stepper, r in ((dphys.BackwardEuler(), 100.0), (dphys.CrankNicolson(), 0.9)):
        u = _step_profile(stepper, r)
        assert -1e-14 <= float(jnp.min(u)) and float(jnp.max(u)) <= 1.0 + 1e-14
    # Routine steps between the monotone limit and the warning limit run quietly:
    # (1 - theta) dt max|L_ii| = 2 (1 - theta) r = 5 for CN at r = 5 and for
    # theta = 0.75 at r = 10; just above, they warn.
    _step_profile(dphys.CrankNicolson(), 5.0)
    _step_profile(dphys.Theta(0.75), 10.0)
    with pytest.warns(UserWarning, match=r"Theta with dt=.* dt <= "):
        _step_profile(dphys.Theta(0.75), 10.5)
    # IMEX uses CN on L.
    with pytest.warns(UserWarning, match="IMEX"):
        _step_profile(dphys.IMEX(), 100.0)


def test_upwind_courant_number_above_ten_warns_under_crank_nicolson():
    grid = dphys.Grid(40, lengths=1.0)
    model = pdes.Advection(grid, 1.0, scheme="upwind")
    u0 = jnp.where(jnp.abs(grid.coords[0] - 0.5) < 0.2, 1.0, 0.0)
    dx = grid.spacing[0]
    dphys.simulate(model, dphys.CrankNicolson(), u0, dt=9.5 * dx, n_steps=1)
    with pytest.warns(UserWarning, match="far from monotone"):
        dphys.simulate(model, dphys.CrankNicolson(), u0, dt=11.0 * dx, n_steps=1)


def test_monotonicity_check_skips_traced_values():
    # Inside jit the values are unknown: no probe and no warning.
    grid = dphys.Grid(32, boundary="neumann")
    run = jax.jit(
        lambda u, k: (
            dphys.simulate(
                pdes.Heat(grid, k), dphys.CrankNicolson(), u, dt=1.0, n_steps=1
            ).final
        )
    )
    run(jnp.ones(32), jnp.asarray(0.01))
