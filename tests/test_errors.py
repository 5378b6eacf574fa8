"""Bad input gets a clear error naming the argument; run-time failures are reported
with the step index (eagerly), through equinox (under jit), or recorded without
raising (throw=False under vmap); an unconverged solve never gives a silent gradient."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import pdes
from dphys.operators import gradient, laplacian


GRID = dphys.Grid(16, boundary="neumann")
U0 = jnp.asarray(np.cos(np.pi * GRID.axis_coords(0)))
HEAT = pdes.Heat(GRID, 0.1)


def simulate(model=HEAT, stepper=None, state0=U0, **kwargs):
    kwargs.setdefault("dt", 0.01)
    kwargs.setdefault("n_steps", 4)
    stepper = dphys.BackwardEuler() if stepper is None else stepper
    return dphys.simulate(model, stepper, state0, **kwargs)


# --------------------------------------------------------------- model input


@pytest.mark.parametrize("kappa", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_scalar_kappa(kappa):
    with pytest.raises(ValueError, match="`kappa` must be positive and finite"):
        pdes.Heat(GRID, kappa)


def test_non_positive_kappa_field_says_how_many():
    field = np.full(16, 0.1)
    field[[3, 7]] = [-0.1, 0.0]
    with pytest.raises(
        ValueError, match=r"`kappa` must be positive.*\(2 of 16 values\)"
    ):
        pdes.Heat(GRID, field)


@pytest.mark.parametrize("name", ["kappa", "source"])
def test_field_of_wrong_shape(name):
    kwargs = {"kappa": 0.1, name: jnp.ones(15)}
    with pytest.raises(
        ValueError,
        match=rf"`{name}` must be a scalar or an array of the grid's shape \(16,\), "
        r"got shape \(15,\)",
    ):
        pdes.Heat(GRID, **kwargs)


def test_heat_grid_type():
    with pytest.raises(TypeError, match="`grid` must be a dphys.Grid"):
        pdes.Heat((16,), 0.1)


@pytest.mark.parametrize(
    "state0, match",
    [
        (
            jnp.ones(15),
            r"`state0` has a leaf of shape \(15,\) but the model's grid has shape "
            r"\(16,\)",
        ),
        (jnp.ones((16, 1)), r"`state0` has a leaf of shape \(16, 1\)"),
        (jnp.ones(16, dtype=int), "`state0` must hold real floating-point arrays"),
        ({}, "`state0` has no array leaves"),
    ],
    ids=["short", "extra-axis", "integer", "empty"],
)
def test_bad_initial_state(state0, match):
    with pytest.raises((ValueError, TypeError), match=match):
        simulate(state0=state0)


# ---------------------------------------------------------- solver vs problem


class _AdvectionDiffusion(dphys.AbstractModel):
    """Non-symmetric operator: -c du/dx + nu d2u/dx2 (centred)."""

    grid: dphys.Grid

    def linear(self, t, state):
        return -0.5 * gradient(state, self.grid)[0] + 0.01 * laplacian(state, self.grid)


@pytest.mark.parametrize(
    "model, solver, match",
    [
        (
            HEAT,
            dphys.FFT(),
            r"`solver=FFT\(\)` needs a fully periodic grid.*boundary=\('neumann',\)",
        ),
        (
            pdes.Heat(dphys.Grid(16), jnp.ones(16)),
            dphys.FFT(),
            "translation_invariant=False",
        ),
        (
            pdes.Heat(dphys.Grid((8, 8), boundary="neumann"), 0.1),
            dphys.Tridiagonal(),
            r"`solver=Tridiagonal\(\)` needs a 1D grid.*shape \(8, 8\)",
        ),
        (
            pdes.Heat(dphys.Grid(16), 0.1),
            dphys.Tridiagonal(),
            r"Tridiagonal.*boundary=\('periodic',\)",
        ),
        (
            _AdvectionDiffusion(GRID),
            dphys.Krylov(method="cg"),
            r"`Krylov\(method='cg'\)` needs a symmetric operator but "
            "_AdvectionDiffusion",
        ),
    ],
    ids=[
        "fft-neumann",
        "fft-field-kappa",
        "tridiagonal-2d",
        "tridiagonal-periodic",
        "cg-nonsymmetric",
    ],
)
def test_solver_does_not_fit_problem(model, solver, match):
    state0 = jnp.ones(model.grid.shape)
    for stepper in (dphys.CrankNicolson(solver=solver), dphys.BDF2(solver=solver)):
        with pytest.raises(ValueError, match=match):
            simulate(model, stepper, state0)


def test_gmres_handles_the_nonsymmetric_model():
    traj = simulate(
        _AdvectionDiffusion(GRID), dphys.CrankNicolson(solver=dphys.Krylov())
    )
    assert traj.result == dphys.RESULTS.successful


def test_fast_forward_not_possible():
    with pytest.raises(
        ValueError, match="`fast_forward=True` needs an autonomous linear"
    ):
        simulate(stepper=dphys.BDF2(), fast_forward=True)
    with pytest.raises(ValueError, match="`fast_forward=True`"):
        simulate(fast_forward=True)  # Neumann grid: no FFT


# ------------------------------------------------------------- run arguments


@pytest.mark.parametrize(
    "n_steps, error",
    [
        (-1, ValueError),
        (2.0, TypeError),
        (True, TypeError),
        ("3", TypeError),
        (None, TypeError),
    ],
)
def test_bad_n_steps(n_steps, error):
    with pytest.raises(error, match="`n_steps` must be"):
        simulate(n_steps=n_steps)


def test_numpy_integer_n_steps_is_accepted():
    a = simulate(n_steps=np.int64(3)).final
    b = simulate(n_steps=3).final
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dt", [0.0, -0.1, float("nan"), float("inf"), 1j, np.ones(2)])
def test_bad_dt(dt):
    with pytest.raises(ValueError, match="`dt` must be a positive finite scalar"):
        simulate(dt=dt)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"model": "heat"}, TypeError, "`model` must be a dphys.AbstractModel"),
        ({"stepper": "CN"}, TypeError, "`stepper` must be a dphys.AbstractStepper"),
        ({"adjoint": "unrolled"}, TypeError, "`adjoint` must be dphys.Checkpointed"),
        (
            {"saveat": dphys.SaveAt(steps=[5])},
            ValueError,
            r"`SaveAt\(steps=...\)` has indices \[5\] outside \[0, n_steps=4\]",
        ),
    ],
)
def test_bad_simulate_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        simulate(**kwargs)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (
            lambda: dphys.Theta(0.3),
            ValueError,
            r"`theta` = 0.3 < 1/2 is not A-stable.*allow_unstable=True",
        ),
        (
            lambda: dphys.SaveAt(every=0),
            ValueError,
            r"`SaveAt\(every=...\)` must be a positive integer, got 0",
        ),
        (
            lambda: dphys.Krylov(method="lu"),
            ValueError,
            "`method` must be 'cg', 'gmres'",
        ),
        (
            lambda: dphys.Krylov(preconditioner="ilu"),
            ValueError,
            "`preconditioner` must be 'jacobi' or None",
        ),
        (
            lambda: dphys.Checkpointed(levels=0),
            ValueError,
            "`levels` must be an integer >= 1",
        ),
    ],
)
def test_bad_options(make, error, match):
    with pytest.raises(error, match=match):
        make()


# -------------------------------------------------------------------- grids


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (
            {"shape": (2,)},
            ValueError,
            r"`shape` needs at least 3 points per axis, got \(2,\)",
        ),
        ({"shape": (4, 4, 4)}, ValueError, "`shape` must have 1 or 2 axes"),
        ({"shape": ()}, ValueError, "`shape` must have 1 or 2 axes"),
        ({"shape": 8.5}, TypeError, "`shape` must be an int or a tuple of ints"),
        ({"shape": (8.5,)}, TypeError, "`shape` entries must be integers"),
        ({"shape": "16"}, TypeError, "`shape` must be an int or a tuple of ints"),
        (
            {"shape": 8, "lengths": -1.0},
            ValueError,
            "`lengths` must be positive and finite",
        ),
        (
            {"shape": 8, "lengths": float("inf")},
            ValueError,
            "`lengths` must be positive and finite",
        ),
        ({"shape": 8, "lengths": "one"}, TypeError, "`lengths` must be a real number"),
        (
            {"shape": (8, 8), "lengths": (1.0, 2.0, 3.0)},
            ValueError,
            "`lengths` has 3 entries but the grid has 2 axes",
        ),
        ({"shape": 8, "boundary": "Periodic"}, ValueError, "`boundary` must be one of"),
        (
            {"shape": (8, 8), "boundary": ("periodic",)},
            ValueError,
            "`boundary` has 1 entries but the grid has 2 axes",
        ),
        ({"shape": 8, "origin": float("nan")}, ValueError, "`origin` must be finite"),
    ],
)
def test_bad_grid(kwargs, error, match):
    with pytest.raises(error, match=match):
        dphys.Grid(**kwargs)


# ----------------------------------------------------------- run-time failures


class _Poisoned(dphys.AbstractModel):
    """Heat whose explicit tendency turns NaN from time ``t_bad`` on."""

    grid: dphys.Grid
    t_bad: jax.Array

    def linear(self, t, state):
        return laplacian(state, self.grid, 0.1)

    def explicit(self, t, state):
        return jnp.where(t >= self.t_bad, jnp.nan, 0.0) * state

    @property
    def symmetric(self):
        return True


def test_nan_in_state_reports_the_step():
    # Step k (1-based) uses t = (k-1) dt, so t_bad = 6.5 dt poisons step 8.
    model = _Poisoned(GRID, jnp.asarray(0.065))
    for stepper in (dphys.IMEX(), dphys.BackwardEuler(), dphys.BDF2()):
        with pytest.raises(
            dphys.SimulationError,
            match=r"failed at step 8 of 20 \(t = 0\.08\).*non-finite",
        ):
            simulate(model, stepper, dt=0.01, n_steps=20)


def test_diverging_negative_kappa_reports_the_step():
    # A negative diffusivity slipped past the constructor (e.g. by tree surgery).
    # With kappa = -5, dt = 0.01 the CN factor of the longest mode is about 124 per
    # step, so the state overflows after roughly 150 steps.
    grid = dphys.Grid(32)
    model = eqx.tree_at(lambda m: m.kappa, pdes.Heat(grid, 0.1), jnp.asarray(-5.0))
    u0 = jnp.asarray(np.random.default_rng(0).normal(size=32))
    with pytest.raises(
        dphys.SimulationError, match=r"failed at step \d+ of 200.*non-finite"
    ) as info:
        simulate(
            model,
            dphys.CrankNicolson(),
            u0,
            dt=0.01,
            n_steps=200,
            saveat=dphys.SaveAt(every=1),
        )
    step = int(str(info.value).split("step ")[1].split(" ")[0])
    assert 100 < step < 200
    # The same run with throw=False records the same step.
    traj = simulate(
        model,
        dphys.CrankNicolson(),
        u0,
        dt=0.01,
        n_steps=200,
        throw=False,
        saveat=dphys.SaveAt(every=1),
    )
    assert int(traj.stats["first_failed_step"]) == step
    assert traj.result == dphys.RESULTS.nonfinite_state
    # Fast-forwarding between saves (here: straight to the end) checks the state
    # once per saved segment, so the failure is reported at the segment's end.
    traj = simulate(model, dphys.CrankNicolson(), u0, dt=0.01, n_steps=200, throw=False)
    assert bool(traj.stats["fast_forward"])
    assert int(traj.stats["first_failed_step"]) == 200


def test_negative_kappa_through_a_traced_value_raises_under_jit():
    grid = dphys.Grid(32)
    u0 = jnp.asarray(np.random.default_rng(0).normal(size=32))

    @jax.jit
    def final(kappa):  # a traced kappa cannot be checked by the constructor
        model = pdes.Heat(grid, kappa)
        return dphys.simulate(
            model, dphys.CrankNicolson(), u0, dt=0.01, n_steps=200
        ).final

    assert bool(jnp.all(jnp.isfinite(final(jnp.asarray(0.1)))))
    # XLA surfaces the equinox run-time error as a RuntimeError or a ValueError
    # depending on where it is caught; the message is ours either way.
    with pytest.raises((RuntimeError, ValueError), match="The state became non-finite"):
        final(jnp.asarray(-5.0)).block_until_ready()


UNCONVERGED = dphys.BackwardEuler(solver=dphys.Krylov(max_steps=2, preconditioner=None))
# U0 is an eigenvector of HEAT's operator, which one Krylov step solves exactly: the
# unconverged solves run on a variable-kappa model instead.
HEAT_FIELD = pdes.Heat(GRID, 0.1 * (1.5 + U0))


def test_unconverged_krylov_solve_is_an_error():
    with pytest.raises(
        dphys.SimulationError,
        match=r"failed at step 1 of 4.*An implicit linear solve did not converge",
    ):
        simulate(HEAT_FIELD, stepper=UNCONVERGED)


@pytest.mark.parametrize(
    "jit", [jax.jit, eqx.filter_jit], ids=["jax.jit", "eqx.filter_jit"]
)
def test_unconverged_solve_under_jit_raises_at_run_time(jit):
    run = jit(lambda u: simulate(HEAT_FIELD, stepper=UNCONVERGED, state0=u).final)
    with pytest.raises(
        (RuntimeError, ValueError), match="An implicit linear solve did not converge"
    ):
        jax.block_until_ready(run(U0))


def test_throw_false_under_vmap_records_failures():
    # A zero state is solved exactly (no iterations needed); the others fail.
    states = jnp.stack([U0, jnp.zeros(16), 2.0 * U0])
    trajs = jax.vmap(
        lambda u: simulate(HEAT_FIELD, stepper=UNCONVERGED, state0=u, throw=False)
    )(states)
    np.testing.assert_array_equal(trajs.stats["first_failed_step"], [1, -1, 1])
    failed = trajs.result == dphys.RESULTS.linear_solve_failed
    np.testing.assert_array_equal(failed, [True, False, True])
    # Failures at different steps, batched over the model.
    models = jax.vmap(lambda t: _Poisoned(GRID, t))(jnp.asarray([0.025, 1.0, 0.005]))
    trajs = jax.vmap(
        lambda m: dphys.simulate(m, dphys.IMEX(), U0, dt=0.01, n_steps=10, throw=False)
    )(models)
    np.testing.assert_array_equal(trajs.stats["first_failed_step"], [4, -1, 2])
    ok = trajs.result == dphys.RESULTS.successful
    np.testing.assert_array_equal(ok, [False, True, False])


def test_unconverged_solve_never_gives_a_silent_gradient():
    """Even with throw=False on the forward run, the transposed (adjoint) Krylov solve
    raises instead of returning a wrong gradient."""

    def cost(u):
        traj = simulate(HEAT_FIELD, stepper=UNCONVERGED, state0=u, throw=False)
        return jnp.sum(traj.final**2)

    with pytest.raises(
        (RuntimeError, ValueError), match="maximum number of solver steps"
    ):
        jax.block_until_ready(jax.grad(cost)(U0))
    # The converged solver differentiates fine.
    ok = jax.grad(
        lambda u: jnp.sum(
            simulate(stepper=dphys.BackwardEuler(dphys.Krylov()), state0=u).final ** 2
        )
    )
    assert bool(jnp.all(jnp.isfinite(ok(U0))))
