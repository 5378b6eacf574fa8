"""AbstractStepper.residual: the implicit relation of one step as a pure function.

For every stepper (and each structured solver): the residual of the stepper's own
output is zero to the solver tolerance, clearly non-zero for a perturbed output,
matches the relation written out by hand, and is differentiable (Taylor test with
a negative control that must fail)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax.tree_utils as otu
import pytest

import dphys
import dphys.testing as dtest
import pdes


def _model(grid, kappa, rate=0.8):
    """Heat with a source (forcing) plus a cubic reaction (explicit part)."""
    heat = pdes.Heat(grid, kappa, source=0.3 * jnp.ones(grid.shape))
    return dphys.Augmented(heat, explicit=lambda t, u: rate * (u - u**3))


GRIDS = {
    # name: (grid, solver): periodic -> FFT via Auto, 1-D walls -> tridiagonal,
    # 2-D Dirichlet -> Krylov (CG) at a tolerance well below the checks.
    "fft": (dphys.Grid(16, lengths=1.0), dphys.Auto()),
    "tridiagonal": (dphys.Grid(16, lengths=1.0, boundary="neumann"), dphys.Auto()),
    "krylov": (
        dphys.Grid((6, 7), lengths=1.0, boundary="dirichlet"),
        dphys.Krylov(rtol=1e-13),
    ),
}

STEPPERS = {
    "be": lambda s: dphys.BackwardEuler(solver=s),
    "cn": lambda s: dphys.CrankNicolson(solver=s),
    "theta0.7": lambda s: dphys.Theta(0.7, solver=s),
    "imex": lambda s: dphys.IMEX(solver=s),
    "bdf2": lambda s: dphys.BDF2(solver=s),
    "fully-implicit-be": lambda s: dphys.FullyImplicit(theta=1.0, rtol=1e-13),
    "fully-implicit-cn": lambda s: dphys.FullyImplicit(
        theta=0.5, rtol=1e-13, linear_rtol=1e-13
    ),
}

DT = 0.02


def _setup(grid_name, stepper_name, *, second_step):
    grid, solver = GRIDS[grid_name]
    stepper = STEPPERS[stepper_name](solver)
    kappa = 0.05 * (1.0 + 0.3 * jnp.cos(2 * jnp.pi * jnp.asarray(grid.coords[-1])))
    if grid_name == "fft":
        kappa = jnp.asarray(0.05)  # translation invariant: the FFT path
    model = _model(grid, kappa)
    u0 = 0.5 + 0.3 * jnp.sin(2 * jnp.pi * jnp.asarray(grid.coords[-1]))
    u0 = jnp.broadcast_to(u0, grid.shape)
    ss = stepper.init(model, 0.0, DT, u0)
    t, u = 0.0, u0
    if second_step:  # multistep methods: the history terms are used from step 2
        u, ss, _, _ = stepper.step(model, t, DT, u, ss)
        t = DT
    return stepper, model, kappa, t, u, ss


# Every linear-implicit stepper on every solver at its first step; the multistep
# ones (whose history enters from the second step) there too; Newton on one grid.
LINEAR = ["be", "cn", "theta0.7", "imex", "bdf2"]
CASES = (
    [(g, s, False) for g in GRIDS for s in LINEAR]
    + [(g, s, True) for g in GRIDS for s in ("imex", "bdf2")]
    + [("tridiagonal", s, True) for s in ("fully-implicit-be", "fully-implicit-cn")]
)


@pytest.mark.parametrize(
    "grid_name,stepper_name,second_step",
    CASES,
    ids=[f"{g}-{s}-step{2 if two else 1}" for g, s, two in CASES],
)
def test_residual_of_the_steps_own_output_is_zero(
    grid_name, stepper_name, getkey, second_step
):
    stepper, model, _, t, u, ss = _setup(
        grid_name, stepper_name, second_step=second_step
    )
    new, _, result, _ = stepper.step(model, t, DT, u, ss)
    assert result == dphys.RESULTS.successful
    r = stepper.residual(model, t, DT, u, new, ss)
    assert jax.tree.structure(r) == jax.tree.structure(new)
    scale = float(otu.tree_norm(new))
    # Direct solvers: round-off; Krylov and Newton were asked for 1e-13.
    assert float(otu.tree_norm(r)) < 1e-11 * scale
    # A perturbation of 1e-3 of the answer is a residual of at least about that
    # size (I - gamma L has eigenvalues >= 1 for this dissipative L).
    delta = otu.tree_scale(
        1e-3 * scale / np.sqrt(u.size), jax.random.normal(getkey(), u.shape)
    )
    r_bad = stepper.residual(model, t, DT, u, otu.tree_add(new, delta), ss)
    assert float(otu.tree_norm(r_bad)) > 0.5 * float(otu.tree_norm(delta))


def test_residual_conventions_written_out():
    """The documented formulas, by hand, on the FFT grid (exact solves): θ-method,
    CNAB2 with the stored N^{n-1}, SBDF2 on step 2, the fully implicit θ-method."""
    grid = GRIDS["fft"][0]
    model = _model(grid, jnp.asarray(0.05))
    x = jnp.asarray(grid.coords[-1])
    u0, u1 = 0.5 + 0.3 * jnp.sin(2 * jnp.pi * x), 0.4 + 0.2 * jnp.cos(2 * jnp.pi * x)
    w = 0.1 * jnp.cos(6 * jnp.pi * x)  # an arbitrary candidate u^{n+1}
    t, dt = 0.1, DT
    L = lambda u: model.linear(t, u)
    N = lambda u: model.explicit(t, u)
    f = model.forcing(t)  # constant source
    theta = 0.7
    expected = (w - theta * dt * L(w)) - (
        u1 + (1 - theta) * dt * L(u1) + dt * N(u1) + dt * f
    )
    st = dphys.Theta(theta)
    got = st.residual(model, t, dt, u1, w, st.init(model, t, dt, u1))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)

    imex = dphys.IMEX()
    ss = (imex.init(model, t, dt, u1)[0], N(u0))
    expected = (w - 0.5 * dt * L(w)) - (
        u1 + 0.5 * dt * L(u1) + dt * (1.5 * N(u1) - 0.5 * N(u0)) + dt * f
    )
    got = imex.residual(model, t, dt, u1, w, ss)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)

    bdf = dphys.BDF2()
    ss = (bdf.init(model, t, dt, u1)[0], u0, N(u0), jnp.asarray(False))
    g = 2 * dt / 3
    expected = (w - g * L(w)) - ((4 * u1 - u0) / 3 + g * (2 * N(u1) - N(u0)) + g * f)
    got = bdf.residual(model, t, dt, u1, w, ss)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)

    fi = dphys.FullyImplicit(theta=0.5)
    F = model.vector_field
    expected = w - 0.5 * dt * F(t + dt, w) - u1 - 0.5 * dt * F(t, u1)
    got = fi.residual(model, t, dt, u1, w, None)
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("stepper_name", list(STEPPERS))
def test_residual_is_differentiable(stepper_name, getkey):
    """Taylor test of 0.5 |residual|^2 in (kappa, u^n, u^{n+1}, dt): rate 2 with
    jax.grad, and a 1e-3 error in the gradient must fail."""
    grid_name = "fft" if stepper_name.startswith("fully") else "tridiagonal"
    stepper, model, kappa, t, u, ss = _setup(grid_name, stepper_name, second_step=True)
    new = stepper.step(model, t, DT, u, ss)[0]
    grid = GRIDS[grid_name][0]

    def loss(p):
        m = _model(grid, p["kappa"])
        r = stepper.residual(m, t, p["dt"], p["u"], p["new"], ss)
        return 0.5 * otu.tree_norm(r, squared=True)

    # Away from the solution, so the loss has a non-zero gradient in every leaf.
    x = {"kappa": kappa, "u": u, "new": 1.01 * new, "dt": jnp.asarray(DT)}
    grad = jax.grad(loss)(x)
    assert all(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grad))
    key = getkey()
    good = dtest.taylor_test(loss, x, grad=grad, key=key)
    assert good.passed and good.rate > 1.9, str(good)
    wrong = jax.tree.map(lambda g: g * (1 + 1e-3), grad)
    bad = dtest.taylor_test(loss, x, grad=wrong, key=key)
    assert not bad.passed, str(bad)
