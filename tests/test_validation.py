"""Options of steppers, adjoints, SaveAt and simulate are validated early.

Every check asserts the error type and that the message names the argument and shows
the received value. Static options fail at construction; ``simulate``'s values fail
before tracing when concrete, and at run time (step 0, ``RESULTS.invalid_dt`` /
``invalid_t0``) when traced, without breaking jit, vmap or grad of good values.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import pdes


GRID = dphys.Grid(16, boundary="neumann")
U0 = jnp.asarray(np.cos(np.pi * GRID.axis_coords(0)))
HEAT = pdes.Heat(GRID, 0.1)


def simulate(stepper=None, state0=U0, **kwargs):
    kwargs.setdefault("dt", 0.01)
    kwargs.setdefault("n_steps", 4)
    stepper = dphys.BackwardEuler() if stepper is None else stepper
    return dphys.simulate(HEAT, stepper, state0, **kwargs)


def raises(error, *fragments):
    """``pytest.raises`` whose message must contain every fragment, in order."""
    return pytest.raises(error, match=".*".join(re.escape(f) for f in fragments))


# ------------------------------------------------------------- theta


THETA_OWNERS = {
    "Theta": lambda theta, **kw: dphys.Theta(theta, **kw),
    "FullyImplicit": lambda theta, **kw: dphys.FullyImplicit(theta=theta, **kw),
}


@pytest.mark.parametrize("owner", THETA_OWNERS)
@pytest.mark.parametrize(
    "theta, error, fragments",
    [
        (-0.1, ValueError, ("`theta` must lie in [0, 1]", "got -0.1")),
        (1.2, ValueError, ("`theta` must lie in [0, 1]", "got 1.2")),
        (float("nan"), ValueError, ("`theta` must be finite", "got nan")),
        (float("inf"), ValueError, ("`theta` must be finite", "got inf")),
        ("0.5", TypeError, ("`theta` must be a real number", "got '0.5' (str)")),
        (True, TypeError, ("`theta` must be a real number", "got True (bool)")),
        (0.5j, TypeError, ("`theta` must be a real number", "got 0.5j (complex)")),
    ],
)
def test_theta_out_of_range_or_not_a_number(owner, theta, error, fragments):
    with raises(error, *fragments):
        THETA_OWNERS[owner](theta)
    # Opting in to conditionally stable schemes does not widen [0, 1].
    with raises(error, *fragments):
        THETA_OWNERS[owner](theta, allow_unstable=True)


@pytest.mark.parametrize("owner", THETA_OWNERS)
@pytest.mark.parametrize("theta", [0.0, 0.25, 0.49])
def test_theta_below_one_half_needs_opt_in(owner, theta):
    with raises(
        ValueError,
        f"`theta` = {theta!r} < 1/2 is not A-stable",
        f"dphys.{owner}(..., allow_unstable=True)",
    ):
        THETA_OWNERS[owner](theta)
    stepper = THETA_OWNERS[owner](theta, allow_unstable=True)
    assert stepper.theta == theta and stepper.order == 1


@pytest.mark.parametrize("owner", THETA_OWNERS)
def test_theta_accepts_numpy_and_concrete_jax_scalars(owner):
    for theta in (np.float64(0.7), jnp.asarray(0.7), 1, np.int64(1)):
        stepper = THETA_OWNERS[owner](theta)
        assert type(stepper.theta) is float and stepper.theta == float(theta)


@pytest.mark.parametrize("owner", THETA_OWNERS)
def test_traced_theta_is_a_clear_type_error(owner):
    with raises(TypeError, "`theta` must be a real number, got a traced array"):
        jax.jit(lambda th: THETA_OWNERS[owner](th).order)(0.7)


@pytest.mark.parametrize("owner", THETA_OWNERS)
def test_allow_unstable_must_be_a_bool(owner):
    with raises(TypeError, "`allow_unstable` must be a Python bool", "got 'yes' (str)"):
        THETA_OWNERS[owner](0.7, allow_unstable="yes")


def _heat_matrix():
    eye = jnp.eye(GRID.shape[0])
    return jax.vmap(lambda e: HEAT.linear(0.0, e), out_axes=1)(eye)


def test_opted_in_theta_below_one_half_is_consistent_and_only_conditionally_stable():
    """theta = 1/4: first order below the stability limit dt < 2 / ((1-2θ)|λ|max),
    the same answer from Theta and FullyImplicit, and growth above the limit (what
    the check guards against)."""
    L = np.asarray(_heat_matrix())
    lam_max = float(np.max(np.abs(np.linalg.eigvalsh(0.5 * (L + L.T)))))
    theta = 0.25
    limit = 2.0 / ((1.0 - 2.0 * theta) * lam_max)
    t1 = 0.1
    exact = jax.scipy.linalg.expm(t1 * _heat_matrix()) @ U0
    errors = []
    for n in (40, 80):
        dt = t1 / n
        assert dt < limit
        traj = simulate(dphys.Theta(theta, allow_unstable=True), dt=dt, n_steps=n)
        errors.append(float(jnp.max(jnp.abs(traj.final - exact))))
    order = np.log2(errors[0] / errors[1])
    assert abs(order - 1.0) < 0.3, (errors, order)
    # Newton on a linear problem solves the same θ-step.
    fully = simulate(
        dphys.FullyImplicit(theta=theta, allow_unstable=True), dt=t1 / 40, n_steps=40
    )
    theta_run = simulate(
        dphys.Theta(theta, allow_unstable=True), dt=t1 / 40, n_steps=40
    )
    np.testing.assert_allclose(fully.final, theta_run.final, rtol=1e-8, atol=1e-10)
    # Above the limit a rough state grows although the exact solution decays.
    dt = 4.0 * limit
    u0 = jnp.asarray(np.random.default_rng(0).normal(size=16))
    with pytest.warns(UserWarning, match="far from monotone"):
        grown = simulate(
            dphys.Theta(theta, allow_unstable=True), state0=u0, dt=dt, n_steps=20
        ).final
    decayed = simulate(dphys.CrankNicolson(), state0=u0, dt=dt, n_steps=20).final
    assert float(jnp.linalg.norm(grown)) > 1e3 * float(jnp.linalg.norm(u0))
    assert float(jnp.linalg.norm(decayed)) < float(jnp.linalg.norm(u0))


# ------------------------------------------------- FullyImplicit Newton options


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        ({"rtol": -1e-3}, ValueError, ("`rtol` and `atol` must be >= 0", "-0.001")),
        ({"atol": -1.0}, ValueError, ("`rtol` and `atol` must be >= 0", "atol=-1.0")),
        (
            {"rtol": 0.0, "atol": 0.0},
            ValueError,
            ("`rtol` and `atol` are both 0", "at least one a positive value"),
        ),
        ({"rtol": 1.5}, ValueError, ("`rtol` must be < 1", "got 1.5")),
        ({"rtol": float("nan")}, ValueError, ("`rtol` must be finite", "got nan")),
        ({"atol": "1e-8"}, TypeError, ("`atol` must be a real number", "'1e-8'")),
        ({"max_steps": 0}, ValueError, ("`max_steps` must be >= 1", "got 0")),
        ({"max_steps": -3}, ValueError, ("`max_steps` must be >= 1", "got -3")),
        ({"max_steps": 2.5}, TypeError, ("`max_steps` must be an integer", "2.5")),
        ({"max_steps": True}, TypeError, ("`max_steps` must be an integer", "True")),
        (
            {"linear_rtol": 0.0},
            ValueError,
            ("`linear_rtol` must lie in (0, 1)", "got 0.0"),
        ),
        (
            {"linear_rtol": 1.0},
            ValueError,
            ("`linear_rtol` must lie in (0, 1)", "got 1.0"),
        ),
        (
            {"linear_max_steps": 0},
            ValueError,
            ("`linear_max_steps` must be >= 1", "got 0"),
        ),
        (
            {"linear_max_steps": None},
            TypeError,
            ("`linear_max_steps` must be an integer", "None"),
        ),
    ],
)
def test_bad_newton_options(kwargs, error, fragments):
    with raises(error, *fragments):
        dphys.FullyImplicit(**kwargs)


def test_good_newton_options_are_plain_python_values():
    stepper = dphys.FullyImplicit(
        rtol=np.float32(1e-6), atol=0, max_steps=np.int64(5), linear_max_steps=50
    )
    assert (stepper.rtol, stepper.atol, stepper.max_steps) == (
        pytest.approx(1e-6),
        0.0,
        5,
    )
    assert type(stepper.max_steps) is int and type(stepper.rtol) is float


# ---------------------------------------------------- solvers and adjoints


@pytest.mark.parametrize(
    "make",
    [
        lambda s: dphys.BackwardEuler(s),
        lambda s: dphys.CrankNicolson(solver=s),
        lambda s: dphys.Theta(0.7, s),
        lambda s: dphys.IMEX(solver=s),
        lambda s: dphys.BDF2(solver=s),
    ],
    ids=["BackwardEuler", "CrankNicolson", "Theta", "IMEX", "BDF2"],
)
def test_solver_must_be_a_dphys_solver(make):
    with raises(TypeError, "`solver` must be a dphys linear solver", "got 'fft' (str)"):
        make("fft")
    with raises(TypeError, "`solver` must be a dphys linear solver", "got None"):
        make(None)


@pytest.mark.parametrize(
    "levels, error, fragments",
    [
        (0, ValueError, ("`levels` must be an integer >= 1", "got 0")),
        (-2, ValueError, ("`levels` must be an integer >= 1", "got -2")),
        (2.0, TypeError, ("`levels` must be an integer", "got 2.0 (float)")),
        (True, TypeError, ("`levels` must be an integer", "got True (bool)")),
        ("2", TypeError, ("`levels` must be an integer", "got '2' (str)")),
    ],
)
def test_bad_checkpoint_levels(levels, error, fragments):
    with raises(error, *fragments):
        dphys.Checkpointed(levels=levels)


def test_numpy_integer_levels_are_accepted():
    adjoint = dphys.Checkpointed(levels=np.int64(3))
    assert adjoint.levels == 3 and type(adjoint.levels) is int
    a = simulate(adjoint=adjoint, n_steps=40).final
    b = simulate(adjoint=dphys.Checkpointed(levels=3), n_steps=40).final
    np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------- SaveAt


@pytest.mark.parametrize(
    "kwargs, error, fragments",
    [
        (
            {"t0": "False"},
            TypeError,
            ("`SaveAt(t0=...)` must be a Python bool", "'False'"),
        ),
        (
            {"t1": 1},
            TypeError,
            ("`SaveAt(t1=...)` must be a Python bool", "got 1 (int)"),
        ),
        ({"every": 0}, ValueError, ("`SaveAt(every=...)` must be a positive", "got 0")),
        (
            {"every": -5},
            ValueError,
            ("`SaveAt(every=...)` must be a positive", "got -5"),
        ),
        ({"every": 2.0}, TypeError, ("`SaveAt(every=...)` must be an integer", "2.0")),
        (
            {"every": True},
            TypeError,
            ("`SaveAt(every=...)` must be an integer", "True"),
        ),
        (
            {"steps": [1.5, 3]},
            TypeError,
            ("`SaveAt(steps=...)` must hold integer step indices", "[1.5, 3.0]"),
        ),
        (
            {"steps": [-1, 2]},
            ValueError,
            ("`SaveAt(steps=...)` has negative indices [-1]",),
        ),
        (
            {"steps": [3, 1, 2]},
            ValueError,
            ("`SaveAt(steps=...)` must be strictly increasing, got [3, 1, 2]",),
        ),
        (
            {"steps": (1, 2, 2)},
            ValueError,
            ("`SaveAt(steps=...)` must be strictly increasing, got [1, 2, 2]",),
        ),
        (
            {"steps": [[1, 2], [3, 4]]},
            ValueError,
            ("`SaveAt(steps=...)` must be one-dimensional", "shape (2, 2)"),
        ),
        (
            {"fn": "H"},
            TypeError,
            ("`SaveAt(fn=...)` must be a function", "got 'H' (str)"),
        ),
    ],
)
def test_bad_saveat(kwargs, error, fragments):
    with raises(error, *fragments):
        dphys.SaveAt(**kwargs)


def test_saveat_steps_accept_integer_arrays_and_scalars():
    assert dphys.SaveAt(steps=np.arange(1, 4)).steps == (1, 2, 3)
    assert dphys.SaveAt(steps=[3]).steps == (3,)
    # a bare integer is ambiguous (diffrax users read it as "every 3rd step")
    with raises(TypeError, "bare integer", "`steps=[3]`", "`every=3`"):
        dphys.SaveAt(steps=3)
    assert dphys.SaveAt(steps=[]).steps == ()
    traj = simulate(saveat=dphys.SaveAt(t1=False, steps=np.asarray([1, 3])))
    np.testing.assert_allclose(traj.ts, [0.01, 0.03])


def test_traced_saveat_steps():
    with raises(TypeError, "`SaveAt(steps=...)` must be concrete integers", "traced"):
        jax.jit(lambda k: dphys.SaveAt(steps=[k]).t1)(2)


def test_saveat_must_be_a_saveat():
    with raises(TypeError, "`saveat` must be a dphys.SaveAt", "got 'every' (str)"):
        simulate(saveat="every")


def test_saveat_steps_beyond_n_steps():
    with raises(
        ValueError, "`SaveAt(steps=...)` has indices [5, 9] outside [0, n_steps=4]"
    ):
        simulate(saveat=dphys.SaveAt(steps=[2, 5, 9]))


# ------------------------------------------------------------ throw and flags


@pytest.mark.parametrize(
    "throw, shown", [("no", "'no' (str)"), (0, "0 (int)"), (None, "None (NoneType)")]
)
def test_throw_must_be_a_bool(throw, shown):
    with raises(
        TypeError, "`throw` must be a Python bool", f"got {shown}", "throw=False"
    ):
        simulate(throw=throw)


def test_traced_throw_is_a_clear_type_error():
    with raises(TypeError, "`throw` must be a Python bool, got a traced array"):
        jax.jit(lambda b: simulate(throw=b).final)(True)


def test_numpy_bool_throw_is_accepted():
    a = simulate(throw=np.bool_(False)).final
    np.testing.assert_array_equal(a, simulate().final)


@pytest.mark.parametrize(
    "fast_forward, shown", [("yes", "'yes' (str)"), (1, "1 (int)")]
)
def test_fast_forward_must_be_a_bool_or_none(fast_forward, shown):
    with raises(TypeError, "`fast_forward` must be a Python bool", f"got {shown}"):
        simulate(fast_forward=fast_forward)


# ------------------------------------------------------------------ dt and t0


@pytest.mark.parametrize(
    "t0, shown",
    [
        (float("nan"), "got nan"),
        (float("inf"), "got inf"),
        (-float("inf"), "got -inf"),
        (jnp.asarray(jnp.nan), "got nan"),
        (np.ones(2), "got an array of shape (2,)"),
        (1j, "got 1j (complex)"),
        ("0", "got '0' (str)"),
    ],
)
def test_bad_t0(t0, shown):
    with raises(ValueError, "`t0` must be a finite real scalar", shown):
        simulate(t0=t0)


@pytest.mark.parametrize(
    "dt, shown",
    [
        (0.0, "got 0.0"),
        (-0.1, "got -0.1"),
        (float("nan"), "got nan"),
        (np.ones(2), "got an array of shape (2,)"),
        (None, "got None"),
    ],
)
def test_bad_dt_names_the_value(dt, shown):
    with raises(ValueError, "`dt` must be a positive finite scalar", shown):
        simulate(dt=dt)


def test_dt_and_t0_that_do_not_survive_the_state_dtype():
    u32 = U0.astype(jnp.float32)
    with raises(ValueError, "`dt` = 1e-50 becomes 0.0", "dtype float32"):
        simulate(state0=u32, dt=1e-50)
    with raises(ValueError, "`t0` = 1e+39 becomes inf", "dtype float32"):
        simulate(state0=u32, t0=1e39)
    # Negative t0 is a valid start time.
    np.testing.assert_allclose(simulate(t0=-1.0).ts, [-0.96])


def test_traced_dt_and_t0_of_the_wrong_shape_fail_at_trace_time():
    with raises(
        ValueError,
        "`dt` must be a positive finite scalar",
        "traced array of shape (2,)",
    ):
        jax.jit(lambda dt: simulate(dt=dt).final)(jnp.full(2, 0.01))
    with raises(ValueError, "`t0` must be a finite real scalar", "traced array"):
        jax.jit(lambda t0: simulate(t0=t0).final)(jnp.zeros(3))


def test_good_traced_dt_and_t0_still_work():
    eager = simulate(dt=0.02, t0=0.5)
    jitted = jax.jit(lambda dt, t0: simulate(dt=dt, t0=t0))(0.02, 0.5)
    np.testing.assert_allclose(jitted.final, eager.final, rtol=1e-12)
    np.testing.assert_allclose(jitted.ts, eager.ts, rtol=1e-12)
    assert jitted.result == dphys.RESULTS.successful
    batched = jax.vmap(lambda dt: simulate(dt=dt).final)(jnp.asarray([0.01, 0.02]))
    np.testing.assert_allclose(batched[1], eager.final, rtol=1e-12)
    # d(final)/d(dt) through the traced-dt check equals a central difference.
    f = lambda dt: jnp.sum(simulate(dt=dt).final ** 2)
    g = jax.grad(f)(0.02)
    fd = (f(0.02 + 1e-6) - f(0.02 - 1e-6)) / 2e-6
    np.testing.assert_allclose(g, fd, rtol=1e-6)


@pytest.mark.parametrize("dt", [-0.01, 0.0, float("nan"), float("inf")])
def test_bad_traced_dt_raises_at_run_time(dt):
    with pytest.raises(
        (RuntimeError, ValueError), match="the traced `dt`.*zero, negative, NaN"
    ):
        jax.block_until_ready(jax.jit(lambda dt: simulate(dt=dt).final)(dt))


def test_bad_traced_t0_raises_at_run_time():
    with pytest.raises((RuntimeError, ValueError), match="the traced `t0`.*NaN or inf"):
        jax.block_until_ready(jax.jit(lambda t0: simulate(t0=t0).final)(jnp.inf))


def test_bad_traced_dt_under_grad_reports_step_0():
    with raises(dphys.SimulationError, "failed at step 0 of 4", "the traced `dt`"):
        jax.grad(lambda dt: jnp.sum(simulate(dt=dt).final))(-0.01)


def test_bad_traced_dt_and_t0_are_recorded_with_throw_false_under_vmap():
    dts = jnp.asarray([0.01, -0.01, jnp.nan, 0.02])
    trajs = jax.vmap(lambda dt: simulate(dt=dt, throw=False))(dts)
    np.testing.assert_array_equal(trajs.stats["first_failed_step"], [-1, 0, 0, -1])
    bad = trajs.result == dphys.RESULTS.invalid_dt
    np.testing.assert_array_equal(bad, [False, True, True, False])
    assert bool(jnp.all(jnp.isfinite(trajs.final[jnp.asarray([0, 3])])))
    t0s = jnp.asarray([0.0, jnp.nan])
    trajs = jax.vmap(lambda t0: simulate(t0=t0, throw=False))(t0s)
    np.testing.assert_array_equal(trajs.stats["first_failed_step"], [-1, 0])
    bad = trajs.result == dphys.RESULTS.invalid_t0
    np.testing.assert_array_equal(bad, [False, True])
