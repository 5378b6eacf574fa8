"""pdes.Heat: exact discrete decay of eigenmodes, measured convergence order in space,
and the invariants of the discrete heat equation (heat content, energy, sources)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import coords

import dphys
import pdes


def run(model, stepper, state0, **kwargs):
    """simulate compiled with jax.jit (one program per configuration)."""
    return jax.jit(lambda m, u: dphys.simulate(m, stepper, u, **kwargs))(model, state0)


def rel_max(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


STEPPERS = {
    "BE": (lambda solver: dphys.BackwardEuler(solver=solver), 1.0),
    "CN": (lambda solver: dphys.CrankNicolson(solver=solver), 0.5),
    "Theta0.7": (lambda solver: dphys.Theta(0.7, solver=solver), 0.7),
}


def amplification(lam, dt, theta):
    """Exact one-step factor of the theta-method for an eigenvalue ``lam``."""
    return (1.0 + (1.0 - theta) * dt * lam) / (1.0 - theta * dt * lam)


# ------------------------------------------------------------- eigenmode decay


def _periodic_mode(ndim):
    if ndim == 1:
        grid = dphys.Grid(24, lengths=2.0)
        (x,) = coords(grid)
        u0 = np.cos(2 * np.pi * 3 * x / 2.0 + 0.3)
        lam = -(4 / grid.spacing[0] ** 2) * np.sin(np.pi * 3 / 24) ** 2
    else:
        grid = dphys.Grid((12, 16), lengths=(1.0, 2.0))
        y, x = coords(grid)
        u0 = np.cos(2 * np.pi * 2 * y + 0.2) * np.sin(2 * np.pi * 3 * x / 2.0)
        lam = -(4 / grid.spacing[0] ** 2) * np.sin(np.pi * 2 / 12) ** 2
        lam += -(4 / grid.spacing[1] ** 2) * np.sin(np.pi * 3 / 16) ** 2
    return grid, jnp.asarray(u0), lam


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("how", ["fft-fast-forward", "fft-stepping", "krylov"])
@pytest.mark.parametrize("name", list(STEPPERS))
def test_fourier_mode_exact_amplification(name, how, ndim):
    make, theta = STEPPERS[name]
    grid, u0, lam = _periodic_mode(ndim)
    kappa, n_steps = 0.01, 40
    # dt chosen so the mode decays to about a third: the check is on an O(1) signal.
    dt = float(np.log(3.0) / (-kappa * lam) / n_steps)
    solver = dphys.Krylov(rtol=1e-12, atol=1e-14) if how == "krylov" else dphys.FFT()
    traj = run(
        pdes.Heat(grid, kappa),
        make(solver),
        u0,
        dt=dt,
        n_steps=n_steps,
        saveat=dphys.SaveAt(steps=(7, n_steps)),
        fast_forward=None if how == "fft-fast-forward" else False,
    )
    assert bool(traj.stats["fast_forward"]) == (how == "fft-fast-forward")
    g = amplification(kappa * lam, dt, theta)
    assert 0.2 < g**n_steps < 0.5
    for row, k in enumerate((7, n_steps)):
        err = rel_max(traj.ys[row], g**k * u0)
        assert err < 1e-12, (k, err)
    # Not the exact PDE decay exp(kappa lam t): the discrete factor is what is exact.
    assert rel_max(traj.final, np.exp(kappa * lam * dt * n_steps) * u0) > 1e-5


@pytest.mark.parametrize(
    "boundary, solver_kind, ndim",
    [
        ("dirichlet", "tridiagonal", 1),
        ("neumann", "tridiagonal", 1),
        ("dirichlet", "krylov", 2),
        ("neumann", "krylov", 2),
    ],
)
@pytest.mark.parametrize("name", ["BE", "CN"])
def test_sine_and_cosine_modes_exact_amplification(boundary, solver_kind, ndim, name):
    make, theta = STEPPERS[name]
    shape = (20,) if ndim == 1 else (10, 14)
    lengths = (1.5,) if ndim == 1 else (1.0, 1.4)
    modes = (3,) if ndim == 1 else (2, 3)
    grid = dphys.Grid(shape, lengths=lengths, boundary=boundary)
    u0, lam = np.ones(shape), 0.0
    for x, k, n, length, dx in zip(
        coords(grid), modes, shape, lengths, grid.spacing, strict=True
    ):
        if boundary == "dirichlet":
            u0 = u0 * np.sin(np.pi * k * x / length)
            lam -= (4 / dx**2) * np.sin(np.pi * k / (2 * (n + 1))) ** 2
        else:
            u0 = u0 * np.cos(np.pi * k * x / length)
            lam -= (4 / dx**2) * np.sin(np.pi * k / (2 * n)) ** 2
    kappa, n_steps = 0.02, 30
    dt = float(np.log(3.0) / (-kappa * lam) / n_steps)
    solver = (
        dphys.Tridiagonal()
        if solver_kind == "tridiagonal"
        else dphys.Krylov(rtol=1e-12, atol=1e-14)
    )
    traj = run(
        pdes.Heat(grid, kappa), make(solver), jnp.asarray(u0), dt=dt, n_steps=n_steps
    )
    g = amplification(kappa * lam, dt, theta)
    assert rel_max(traj.final, g**n_steps * u0) < 1e-10
    if solver_kind == "krylov":
        assert int(traj.stats["linear_iterations"]) > 0


# -------------------------------------------------------- convergence in space


def _manufactured_problem(boundary, n):
    """Heat with variable kappa and a source making u = exp(-t) g(x) exact."""
    grid = dphys.Grid(n, lengths=1.0, boundary=boundary)
    (x,) = coords(grid)
    if boundary == "periodic":
        g, dg, d2g = (
            np.sin(2 * np.pi * x) + 0.5,
            2 * np.pi * np.cos(2 * np.pi * x),
            -((2 * np.pi) ** 2) * np.sin(2 * np.pi * x),
        )
    elif boundary == "dirichlet":
        g, dg, d2g = (
            np.sin(np.pi * x),
            np.pi * np.cos(np.pi * x),
            -(np.pi**2) * np.sin(np.pi * x),
        )
    else:
        g, dg, d2g = (
            np.cos(np.pi * x),
            -np.pi * np.sin(np.pi * x),
            -(np.pi**2) * np.cos(np.pi * x),
        )
    kappa = 0.1 * (1.0 + 0.5 * np.sin(2 * np.pi * x + 0.3))
    dkappa = 0.1 * np.pi * np.cos(2 * np.pi * x + 0.3)
    # f = u_t - (kappa u_x)_x with u = exp(-t) g.
    shape_f = jnp.asarray(-g - (dkappa * dg + kappa * d2g))
    model = pdes.Heat(grid, kappa, source_fn=lambda t: jnp.exp(-t) * shape_f)
    return model, jnp.asarray(g)


@pytest.mark.parametrize("boundary", ["periodic", "dirichlet", "neumann"])
def test_space_convergence_variable_kappa(boundary):
    t1, n_steps = 0.5, 100
    errors = []
    # Dirichlet converges non-monotonically at first (1.87, 1.74, 1.89 from n = 16):
    # an O(dx^3) boundary term; the last pair is in the asymptotic range.
    for n in (32, 64, 128):
        model, g = _manufactured_problem(boundary, n)
        traj = run(model, dphys.CrankNicolson(), g, dt=t1 / n_steps, n_steps=n_steps)
        errors.append(float(jnp.max(jnp.abs(traj.final - np.exp(-t1) * g))))
    errors = np.asarray(errors)
    p = np.log2(errors[:-1] / errors[1:])
    # Time error (CN, dt = 5e-3) is ~1e-7, far below the space error here.
    assert abs(p[-1] - 2) < 0.3, (errors, p)
    assert errors[-1] < 2e-4


# ------------------------------------------------------------------ invariants


def _blob(grid):
    r2 = sum((x - 0.37 * (a + 1)) ** 2 for a, x in enumerate(coords(grid)))
    return jnp.asarray(np.exp(-r2 / 0.02))


CONSERVATIVE = [
    ("periodic-1d-fft", dphys.Grid(32, lengths=1.0), "scalar", dphys.FFT()),
    (
        "periodic-1d-krylov",
        dphys.Grid(32, lengths=1.0),
        "field",
        dphys.Krylov(rtol=1e-12, atol=1e-14),
    ),
    (
        "neumann-1d-tridiagonal",
        dphys.Grid(32, boundary="neumann"),
        "field",
        dphys.Tridiagonal(),
    ),
    (
        "neumann-2d-krylov",
        dphys.Grid((12, 16), lengths=(1.0, 1.5), boundary="neumann"),
        "field",
        dphys.Krylov(rtol=1e-12, atol=1e-14),
    ),
]


def _kappa(grid, kind):
    if kind == "scalar":
        return 0.05
    k = 0.05
    for x in coords(grid):
        k = k * (1.0 + 0.5 * np.cos(2 * np.pi * x))
    return jnp.asarray(k)


@pytest.mark.parametrize("case", CONSERVATIVE, ids=[c[0] for c in CONSERVATIVE])
@pytest.mark.parametrize("name", ["BE", "CN", "BDF2"])
def test_heat_content_conserved_and_energy_decays(case, name):
    _, grid, kind, solver = case
    stepper = dphys.BDF2(solver=solver) if name == "BDF2" else STEPPERS[name][0](solver)
    u0 = _blob(grid)
    traj = run(
        pdes.Heat(grid, _kappa(grid, kind)),
        stepper,
        u0,
        dt=0.02,
        n_steps=40,
        saveat=dphys.SaveAt(every=1, t0=True),
        fast_forward=False,
    )
    mass = np.asarray(grid.integrate(traj.ys))
    drift = np.abs(mass - mass[0]).max() / abs(mass[0])
    assert drift < 1e-12, drift
    energy = np.asarray(jnp.sum(traj.ys**2, axis=tuple(range(1, grid.ndim + 1))))
    # It really diffuses (the invariant check is not vacuous) ...
    assert energy[-1] < 0.9 * energy[0]
    if name != "BDF2":
        # ... and for the theta-methods |G_k| <= 1 per eigenmode, so the Euclidean
        # energy never grows (BDF2 is G-stable in another norm, not this one).
        assert np.all(np.diff(energy) <= 1e-13 * energy[0])


@pytest.mark.parametrize("name", ["BE", "CN", "BDF2"])
@pytest.mark.parametrize("kind", ["scalar", "field"])
def test_constant_source_adds_heat_linearly(name, kind):
    grid = dphys.Grid(24, lengths=2.0, boundary="neumann")
    source = 0.3 if kind == "scalar" else jnp.asarray(0.3 + 0.2 * coords(grid)[0])
    model = pdes.Heat(grid, _kappa(grid, "field"), source=source)
    solver = dphys.Tridiagonal()
    stepper = dphys.BDF2(solver=solver) if name == "BDF2" else STEPPERS[name][0](solver)
    u0, dt = _blob(grid), 0.01
    traj = run(
        model, stepper, u0, dt=dt, n_steps=30, saveat=dphys.SaveAt(every=1, t0=True)
    )
    mass = np.asarray(grid.integrate(traj.ys))
    rate = float(grid.integrate(jnp.broadcast_to(source, grid.shape)))
    expected = mass[0] + rate * dt * np.arange(31)
    np.testing.assert_allclose(mass, expected, rtol=1e-12)


def test_time_dependent_source_trapezoidal_mass():
    """CN integrates a linear-in-time source exactly: M(t_n) = M0 + int_0^t f."""
    grid = dphys.Grid(40, boundary="periodic")
    model = pdes.Heat(grid, 0.02, source_fn=lambda t: (1.0 + 2.0 * t) * jnp.ones(40))
    u0 = _blob(grid)
    traj = run(
        model,
        dphys.CrankNicolson(),
        u0,
        dt=0.05,
        n_steps=20,
        saveat=dphys.SaveAt(every=1),
    )
    t = np.asarray(traj.ts)
    mass = np.asarray(grid.integrate(traj.ys))
    np.testing.assert_allclose(mass, float(grid.integrate(u0)) + t + t**2, rtol=1e-12)


def test_dirichlet_heat_leaves_the_domain():
    grid = dphys.Grid(30, boundary="dirichlet")
    u0 = jnp.ones(30)
    traj = run(
        pdes.Heat(grid, 0.05),
        dphys.BackwardEuler(),
        u0,
        dt=0.05,
        n_steps=20,
        saveat=dphys.SaveAt(every=1),
    )
    mass = np.asarray(grid.integrate(traj.ys))
    assert np.all(np.diff(mass) < 0) and np.all(mass > 0)
    # Backward Euler is monotone: no new extrema.
    assert float(jnp.max(traj.ys)) <= 1.0 and float(jnp.min(traj.ys)) >= 0.0


def test_symbol_needs_periodic_scalar_kappa():
    with pytest.raises(ValueError, match="periodic grid and a scalar `kappa`"):
        pdes.Heat(dphys.Grid(8, boundary="neumann"), 0.1).symbol()
    with pytest.raises(ValueError, match="periodic grid and a scalar `kappa`"):
        pdes.Heat(dphys.Grid(8), jnp.ones(8)).symbol()
