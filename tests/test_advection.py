"""pdes.Advection: dispersion relation, convergence, conservation, gradients, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import dphys.testing as dtest
import pdes


TWO_PI = 2.0 * np.pi


def _rms(a):
    return float(jnp.sqrt(jnp.mean(a**2)))


def _order(errors):
    """Observed orders between successive halvings of the grid spacing."""
    e = np.asarray(errors)
    return np.log2(e[:-1] / e[1:])


def _symbol_1d(scheme, v, kappa, theta, dx):
    """Semi-discrete eigenvalue of mode exp(i theta j), written out independently."""
    e = np.exp(1j * theta)
    vp, vm = max(v, 0.0), min(v, 0.0)
    if scheme == "centered":
        s = -1j * v * np.sin(theta) / dx
    elif scheme == "upwind":
        s = -(vp * (1 - 1 / e) + vm * (e - 1)) / dx
    else:
        s = -(vp * (e**-2 - 6 / e + 3 + 2 * e) + vm * (-2 / e - 3 + 6 * e - e**2)) / (
            6 * dx
        )
    return s - kappa * 4.0 * np.sin(theta / 2) ** 2 / dx**2


def _amplification(s, dt, theta_method):
    return (1 + (1 - theta_method) * dt * s) / (1 - theta_method * dt * s)


def _periodic_2d(n=(12, 16), lengths=(1.0, 2.0)):
    return dphys.Grid(n, lengths=lengths, boundary="periodic")


def _smooth_fields(grid):
    y, x = grid.coords
    ly, lx = grid.lengths
    u0 = 1.0 + jnp.exp(jnp.sin(TWO_PI * x / lx) + 0.5 * jnp.cos(TWO_PI * y / ly))
    # A velocity field with nonzero divergence and no zero anywhere (see the kink).
    vy = 0.6 + 0.3 * jnp.sin(TWO_PI * x / lx)
    vx = 1.1 + 0.4 * jnp.cos(TWO_PI * y / ly) * jnp.sin(TWO_PI * x / lx)
    return u0, (vy, vx)


# ------------------------------------------------------------------ dispersion


@pytest.mark.parametrize("scheme", ["centered", "upwind", "upwind3"])
@pytest.mark.parametrize("v", [0.7, -1.3])
def test_symbol_matches_probed_operator(scheme, v):
    grid = dphys.Grid(24, lengths=1.5, boundary="periodic")
    model = pdes.Advection(grid, v, kappa=2e-3, scheme=scheme)
    (x,) = grid.coords
    probed = dphys.probe_symbol(model, 0.0, x)[0, 0]
    n = grid.shape[0]
    theta = TWO_PI * np.fft.rfftfreq(n) * n / n
    expect = _symbol_1d(scheme, v, 2e-3, theta, grid.spacing[0])
    scale = np.abs(expect).max()
    np.testing.assert_allclose(probed, expect, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(
        model.symbol(), expect, rtol=0, atol=1e-12 * np.abs(expect).max()
    )


@pytest.mark.parametrize(
    "scheme, stepper, theta_method",
    [
        ("centered", dphys.CrankNicolson(), 0.5),
        ("upwind", dphys.BackwardEuler(), 1.0),
        ("upwind3", dphys.CrankNicolson(), 0.5),
    ],
)
@pytest.mark.parametrize("fast_forward", [True, False])
def test_one_period_matches_dispersion_relation(
    scheme, stepper, theta_method, fast_forward
):
    """A Fourier mode after one period is G^n times itself; G from the symbol."""
    n, k, v = 64, 3, 1.0
    n_steps = 40  # dt = 1/40: Courant number v dt / dx = 1.6
    dt = 1.0 / n_steps
    grid = dphys.Grid(n, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    u0 = jnp.cos(TWO_PI * k * x)
    model = pdes.Advection(grid, v, scheme=scheme)
    traj = dphys.simulate(
        model, stepper, u0, dt=dt, n_steps=n_steps, fast_forward=fast_forward
    )
    assert traj.stats["fast_forward"] == fast_forward
    g = _amplification(
        _symbol_1d(scheme, v, 0.0, TWO_PI * k / n, 1.0 / n), dt, theta_method
    )
    predicted = g**n_steps
    coeffs = np.fft.rfft(np.asarray(traj.final)) * 2 / n
    # Round-off of n_steps FFT pairs and of the power: far below 1e-10.
    assert abs(coeffs[k] - predicted) < 1e-10
    others = np.delete(coeffs, k)
    assert np.max(np.abs(others)) < 1e-12
    # Amplitude and phase errors against the exact shift (the identity after one
    # period) are those of the dispersion relation.
    amplitude, phase = abs(coeffs[k]), np.angle(coeffs[k])
    np.testing.assert_allclose(amplitude, abs(g) ** n_steps, rtol=1e-10)
    phase_error = np.angle(np.exp(1j * (n_steps * np.angle(g) + TWO_PI * k * v)))
    assert abs(np.angle(np.exp(1j * (phase - phase_error)))) < 1e-10
    error = _rms(traj.final - u0) / _rms(u0)
    np.testing.assert_allclose(error, abs(predicted - 1.0), rtol=1e-9)
    if scheme == "centered":
        assert abs(abs(g) - 1.0) < 1e-14  # CN-centered: no amplitude error at all
        assert abs(amplitude - 1.0) < 1e-12
    else:
        assert abs(g) < 1.0  # upwinding damps: the amplitude error is |G|^n
        assert amplitude < 1.0
    assert error > 1e-3  # the test is not trivially satisfied


def test_2d_mode_krylov_and_fft_agree_with_dispersion_relation():
    """Stepping through GMRES gives the same G^n as the exact FFT solve."""
    grid = _periodic_2d((16, 12), lengths=(1.0, 1.0))
    y, x = grid.coords
    ky, kx = 2, 1
    u0 = jnp.cos(TWO_PI * (kx * x + ky * y))
    vy, vx, kappa = -0.4, 0.9, 1e-3
    dt, n_steps = 0.05, 20
    model = pdes.Advection(grid, (vy, vx), kappa=kappa)
    s = _symbol_1d("centered", vy, kappa, TWO_PI * ky / 16, 1 / 16) + _symbol_1d(
        "centered", vx, kappa, TWO_PI * kx / 12, 1 / 12
    )
    predicted = _amplification(s, dt, 0.5) ** n_steps
    expect = jnp.real(predicted * jnp.exp(1j * TWO_PI * (kx * x + ky * y)))
    fft = dphys.simulate(
        model, dphys.CrankNicolson(), u0, dt=dt, n_steps=n_steps, fast_forward=False
    )
    np.testing.assert_allclose(fft.final, expect, atol=1e-12)
    krylov = dphys.CrankNicolson(solver=dphys.Krylov(method="bicgstab", rtol=1e-13))
    kry = dphys.simulate(model, krylov, u0, dt=dt, n_steps=n_steps)
    # Each of the 20 solves stops at relative residual 1e-13.
    np.testing.assert_allclose(kry.final, expect, atol=1e-10)


# ------------------------------------------------------------------ convergence


@pytest.mark.parametrize(
    "scheme, stepper, sizes, dt_power, expected",
    [
        ("centered", dphys.CrankNicolson(), (64, 128, 256), 1.0, 2.0),
        ("upwind", dphys.BackwardEuler(), (512, 1024, 2048), 1.0, 1.0),
        # dt ~ dx^1.5 makes the O(dt^2) time error O(dx^3): the spatial order shows.
        ("upwind3", dphys.CrankNicolson(), (64, 128, 256), 1.5, 3.0),
    ],
)
def test_convergence_order_against_exact_shift(
    scheme, stepper, sizes, dt_power, expected
):
    errors = []
    for n in sizes:
        grid = dphys.Grid(n, lengths=1.0, boundary="periodic")
        (x,) = grid.coords
        u0 = jnp.exp(jnp.sin(TWO_PI * x))
        # Courant number 1.6 at dt_power=1: implicit stepping beyond the CFL limit.
        n_steps = int(np.ceil(1.0 / (1.6 * (1.0 / n) ** dt_power)))
        model = pdes.Advection(grid, 1.0, scheme=scheme)
        traj = dphys.simulate(model, stepper, u0, dt=1.0 / n_steps, n_steps=n_steps)
        errors.append(_rms(traj.final - u0))  # exact: one full period, u(T) = u0
    orders = _order(errors)
    assert abs(orders[-1] - expected) < 0.3, (errors, orders)


@pytest.mark.parametrize("scheme, expected", [("centered", 2.0), ("upwind", 1.0)])
def test_variable_velocity_steady_state_converges(scheme, expected):
    """u = 1/v is an exact steady state of u_t + (v u)_x = 0 (constant flux).

    A periodic velocity *field* takes the Krylov (GMRES) path; the discrete steady
    state differs from 1/v by the truncation error, which must fall at the scheme's
    order.
    """
    errors = []
    for n in (64, 128, 256):
        grid = dphys.Grid(n, lengths=1.0, boundary="periodic")
        (x,) = grid.coords
        v = 1.0 + 0.5 * jnp.sin(TWO_PI * x)
        model = pdes.Advection(grid, (v,), scheme=scheme)
        u0 = 1.0 / v
        method = dphys.CrankNicolson if scheme == "centered" else dphys.BackwardEuler
        stepper = method(solver=dphys.Krylov(method="bicgstab"))
        traj = dphys.simulate(model, stepper, u0, dt=0.05, n_steps=20)
        errors.append(_rms(traj.final - u0))
    orders = _order(errors)
    assert abs(orders[-1] - expected) < 0.3, (errors, orders)


# ------------------------------------------------------------------ conservation


def _relative_mass_change(grid, u0, u1):
    return abs(float(grid.integrate(u1) - grid.integrate(u0))) / abs(
        float(grid.integrate(u0))
    )


@pytest.mark.parametrize("scheme", ["centered", "upwind", "upwind3"])
def test_mass_conserved_over_ten_thousand_fft_steps(scheme):
    grid = dphys.Grid((16, 16), lengths=1.0, boundary="periodic")
    y, x = grid.coords
    u0 = 1.0 + jnp.exp(jnp.sin(TWO_PI * x) * jnp.cos(TWO_PI * y))
    model = pdes.Advection(grid, (0.5, -1.0), kappa=1e-4, scheme=scheme)
    stepper = dphys.BackwardEuler() if scheme == "upwind" else dphys.CrankNicolson()
    n_steps = 10_000
    stepped = dphys.simulate(
        model, stepper, u0, dt=0.1, n_steps=n_steps, fast_forward=False
    )
    assert not stepped.stats["fast_forward"]
    assert _relative_mass_change(grid, u0, stepped.final) <= 1e-12
    fast = dphys.simulate(
        model, stepper, u0, dt=0.1, n_steps=n_steps, saveat=dphys.SaveAt(every=1000)
    )
    assert fast.stats["fast_forward"]
    for state in fast.ys:
        assert _relative_mass_change(grid, u0, state) <= 1e-12
    np.testing.assert_allclose(fast.final, stepped.final, atol=1e-10)


@pytest.mark.parametrize(
    "scheme, stepper, method, preconditioner, bound",
    [
        ("centered", dphys.CrankNicolson, "gmres", None, 1e-12),
        ("upwind", dphys.BackwardEuler, "bicgstab", None, 1e-12),
        # A Jacobi preconditioner with a non-constant diagonal (upwind) breaks the
        # polynomial structure below: mass is then conserved to the solver
        # tolerance only (1.2e-11 measured over 300 steps), as documented.
        ("upwind", dphys.BackwardEuler, "bicgstab", "jacobi", 1e-8),
        pytest.param(
            "centered",
            dphys.CrankNicolson,
            "bicgstab",
            None,
            1e-12,
            marks=pytest.mark.slow,
        ),
        pytest.param(
            "upwind", dphys.BackwardEuler, "gmres", None, 1e-12, marks=pytest.mark.slow
        ),
    ],
)
def test_mass_conserved_with_velocity_field_krylov(
    scheme, stepper, method, preconditioner, bound
):
    """A Krylov residual is p(A) r0 with p(0) = 1, and 1^T A = 1^T (flux form), so
    1^T r = p(1) 1^T r0 = 0: the solve conserves mass to round-off."""
    grid = _periodic_2d()
    u0, velocity = _smooth_fields(grid)  # a divergent velocity field
    model = pdes.Advection(grid, velocity, kappa=1e-3, scheme=scheme)
    solver = dphys.Krylov(method=method, preconditioner=preconditioner)
    traj = dphys.simulate(
        model,
        stepper(solver=solver),
        u0,
        dt=0.05,
        n_steps=300,
        saveat=dphys.SaveAt(every=100),
    )
    for state in traj.ys:
        assert _relative_mass_change(grid, u0, state) <= bound
    assert _rms(traj.final - u0) > 1e-2  # something did move


def test_time_dependent_velocity_conserves_mass_and_converges():
    """v(t) = v0 cos(pi t / 2): every mode is multiplied by exp(s_k * int v dt)."""
    n = 128
    grid = dphys.Grid(n, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    u0 = 1.0 + jnp.exp(jnp.sin(TWO_PI * x))
    fn = lambda t, v: tuple(c * jnp.cos(jnp.pi * t / 2) for c in v)
    model = pdes.Advection(grid, 0.8, velocity_fn=fn)
    assert not model.autonomous and model.translation_invariant
    # Exact solution of the semi-discrete (centered) system at t = 1.
    displacement = 0.8 * 2 / np.pi * np.sin(np.pi / 2)
    theta = TWO_PI * np.fft.rfftfreq(n)
    s = _symbol_1d("centered", 1.0, 0.0, theta, 1.0 / n)
    exact = np.fft.irfft(np.exp(s * displacement) * np.fft.rfft(np.asarray(u0)), n)
    errors = []
    for n_steps in (10, 20):
        traj = dphys.simulate(
            model, dphys.CrankNicolson(), u0, dt=1.0 / n_steps, n_steps=n_steps
        )
        assert not traj.stats["fast_forward"]
        assert _relative_mass_change(grid, u0, traj.final) <= 1e-13
        errors.append(_rms(traj.final - exact))
    # Courant numbers up to 10; CN with L(t) re-probed every step is second order.
    assert abs(_order(errors)[-1] - 2.0) < 0.3, errors
    # A time-dependent field goes through the Krylov path, still conservative.
    grid2 = _periodic_2d()
    u0, velocity = _smooth_fields(grid2)
    model2 = pdes.Advection(grid2, velocity, scheme="upwind", velocity_fn=fn)
    traj = dphys.simulate(model2, dphys.BackwardEuler(), u0, dt=0.1, n_steps=50)
    assert _relative_mass_change(grid2, u0, traj.final) <= 1e-12


def test_inflow_outflow_mass_budget_and_steady_state():
    """Dirichlet axes: mass changes exactly by the boundary fluxes, no reflection."""
    grid = dphys.Grid(80, lengths=1.0, boundary="dirichlet")
    (x,) = grid.coords
    u0 = jnp.exp(-(((x - 0.5) / 0.08) ** 2))
    g_in, v, dt = 0.5, 1.0, 0.02
    for scheme, stepper, theta in [
        ("centered", dphys.CrankNicolson(), 0.5),
        ("upwind", dphys.BackwardEuler(), 1.0),
    ]:
        model = pdes.Advection(grid, v, kappa=0.0, scheme=scheme, inflow=g_in)
        assert model.forcing(0.0) is not None
        traj = dphys.simulate(model, stepper, u0, dt=dt, n_steps=1)
        u1 = traj.final
        # Boundary flux (per unit length): v*g in on the left, v*u_edge out on the
        # right (upwinded). The θ-method weights the two time levels.
        budget = lambda u: v * g_in - v * u[-1]
        change = float(grid.integrate(u1) - grid.integrate(u0))
        expect = dt * (theta * budget(u1) + (1 - theta) * budget(u0))
        assert abs(change - expect) < 1e-14
    # Implicit upwind at Courant 8 reaches the exact steady state u = inflow.
    model = pdes.Advection(grid, v, scheme="upwind", inflow=g_in)
    traj = dphys.simulate(model, dphys.BackwardEuler(), u0, dt=0.1, n_steps=200)
    np.testing.assert_allclose(traj.final, g_in, atol=1e-12)
    # A pulse leaves through the outflow boundary: once it is out, nothing is left
    # (no reflection); the Tridiagonal and Krylov paths agree.
    model = pdes.Advection(grid, -v, scheme="centered", kappa=1e-3)
    tri = dphys.simulate(
        model, dphys.CrankNicolson(solver=dphys.Tridiagonal()), u0, dt=0.01, n_steps=150
    )
    kry = dphys.simulate(
        model, dphys.CrankNicolson(solver=dphys.Krylov()), u0, dt=0.01, n_steps=150
    )
    np.testing.assert_allclose(tri.final, kry.final, atol=1e-10)
    assert float(jnp.max(jnp.abs(tri.final))) < 1e-2 * float(jnp.max(u0))


@pytest.mark.parametrize("scheme", ["upwind", "centered"])
def test_inflow_boundary_layer_with_diffusion_is_the_exact_discrete_solution(scheme):
    """Steady advection-diffusion with a source between two Dirichlet ends at the
    inflow value g: -v u' + kappa u'' + s = 0 has an outflow boundary layer of
    width kappa/v. Its discrete solution is known in closed form: every interior row
    is the recurrence with roots 1 and rho, so u_i = A + B rho^i + s x_i / v, and
    the two boundary rows (written here as flux balances, independently of the
    model's code) fix A and B. Both boundary faces' diffusive fluxes use g: one
    that used 0 instead (ignoring the inflow value) moves every u_i."""
    n, length = 50, 1.0
    grid = dphys.Grid(n, lengths=length, boundary="dirichlet")
    x = np.asarray(grid.coords[0])
    dx = float(grid.spacing[0])
    v, kappa, s, g = 1.0, 0.03, 0.5, 0.7
    d = kappa / dx**2
    if scheme == "upwind":
        # Upwind faces everywhere: row i reads v(u_{i-1} - u_i)/dx + d(u_{i-1} - 2u_i
        # + u_{i+1}) + s = 0 with ghosts u_{-1} = u_n = g, so the closed form
        # holds for every row and the ghosts fix A, B.
        rho = (d + v / dx) / d
        i = np.arange(n)
        exact = (
            g
            + s * x / v
            - (s * length / v) * (rho ** (i + 1) - 1) / (rho ** (n + 1) - 1)
        )
    else:
        # Centered interior faces: rho = (d + v/2dx) / (d - v/2dx). The boundary
        # faces are upwinded: left flux v g - kappa (u_0 - g)/dx, right flux
        # v u_{n-1} - kappa (g - u_{n-1})/dx.
        rho = (d + 0.5 * v / dx) / (d - 0.5 * v / dx)
        i = np.arange(n)

        def rows(coef):  # residuals of rows 0 and n-1 for u = coef . basis
            a, b, c = coef
            u = a + b * rho**i + c * s * x / v
            face = lambda k: (
                0.5 * v * (u[k] + u[k + 1]) - kappa * (u[k + 1] - u[k]) / dx
            )
            left = v * g - kappa * (u[0] - g) / dx
            right = v * u[-1] - kappa * (g - u[-1]) / dx
            r0 = -(face(0) - left) / dx + c * s
            r1 = -(right - face(n - 2)) / dx + c * s
            return np.array([r0, r1])

        base = rows((0.0, 0.0, 1.0))
        mat = np.stack(
            [
                rows((1.0, 0.0, 0.0)) - rows((0.0, 0.0, 0.0)),
                rows((0.0, 1.0, 0.0)) - rows((0.0, 0.0, 0.0)),
            ],
            axis=1,
        )
        a, b = np.linalg.solve(mat, -base)
        exact = a + b * rho**i + s * x / v
        # The closed form satisfies every interior row of the centered stencil.
        lap = d * (exact[:-2] - 2 * exact[1:-1] + exact[2:])
        adv = -0.5 * v * (exact[2:] - exact[:-2]) / dx
        np.testing.assert_allclose(lap + adv + s, 0.0, atol=1e-10)
    # A genuine boundary layer: the profile climbs to ~1.1 and falls back to g in
    # the last few cells.
    assert exact.max() > g + 0.3 * s * length / v and abs(exact[-1] - g) < 0.2
    model = pdes.Advection(grid, v, kappa=kappa, source=s, scheme=scheme, inflow=g)
    # Backward Euler with dt = 1e3 (decay rates >= ~kappa pi^2 ~ 0.3): 12 steps
    # reach the steady state to round-off.
    final = dphys.simulate(
        model, dphys.BackwardEuler(), jnp.zeros(n), dt=1e3, n_steps=12
    ).final
    np.testing.assert_allclose(final, exact, rtol=0, atol=1e-12)


def test_neumann_closed_box_with_face_velocity_conserves_mass():
    grid = dphys.Grid((10, 14), lengths=(1.0, 1.4), boundary="neumann")
    y, x = grid.coords
    u0 = 1.0 + jnp.exp(-((x - 0.7) ** 2 + (y - 0.5) ** 2) / 0.05)
    # Face velocities that vanish on the walls: a closed box.
    fy = np.linspace(0, 1.0, 11)[:, None] * np.ones((1, 14))
    fx = np.ones((10, 1)) * np.linspace(0, 1.4, 15)[None, :]
    vy = jnp.asarray(np.sin(np.pi * fy) * 0.7)
    vx = jnp.asarray(np.sin(np.pi * fx / 1.4) * -0.9)
    model = pdes.Advection(grid, (vy, vx), kappa=1e-3, velocity_at_faces=True)
    traj = dphys.simulate(model, dphys.CrankNicolson(), u0, dt=0.05, n_steps=100)
    assert _relative_mass_change(grid, u0, traj.final) <= 1e-12


def test_face_velocity_from_stream_function_preserves_a_constant():
    """A discretely divergence-free face field advects u = const exactly."""
    grid = _periodic_2d((12, 16), lengths=(1.0, 1.0))
    ny, nx = grid.shape
    dy, dx = grid.spacing
    # Stream function at the cell corners; corner (i, j) is the lower-left one.
    iy, ix = np.meshgrid(np.arange(ny + 1), np.arange(nx + 1), indexing="ij")
    psi = np.sin(TWO_PI * ix / nx) * np.cos(TWO_PI * iy / ny) + 0.3 * iy * dy
    vx = -(psi[1:, :-1] - psi[:-1, :-1]) / dy  # left x-faces of the cells
    vy = (psi[:-1, 1:] - psi[:-1, :-1]) / dx  # lower y-faces of the cells
    model = pdes.Advection(
        grid, (jnp.asarray(vy), jnp.asarray(vx)), velocity_at_faces=True
    )
    ones = jnp.ones(grid.shape)
    assert float(jnp.max(jnp.abs(model.linear(0.0, ones)))) < 1e-12
    # The same field averaged from the unknowns is not discretely divergence-free.
    centred = pdes.Advection(grid, (jnp.asarray(vy), jnp.asarray(vx)))
    assert float(jnp.max(jnp.abs(centred.linear(0.0, ones)))) > 1e-3
    # Uniform face fields equal scalar velocities.
    fields = (jnp.full(grid.shape, 0.3), jnp.full(grid.shape, -0.2))
    uniform = pdes.Advection(grid, fields, velocity_at_faces=True, scheme="upwind")
    scalar = pdes.Advection(grid, (0.3, -0.2), scheme="upwind")
    u = jnp.sin(TWO_PI * grid.coords[1]) + grid.coords[0]
    np.testing.assert_allclose(
        uniform.linear(0.0, u), scalar.linear(0.0, u), atol=1e-13
    )


# ------------------------------------------------------------------ stability


def test_courant_well_above_one_is_stable():
    """P3-like: c = (v_y, v_x) = (0.5, 1.0), Courant 3.2 in x, 200 steps."""
    grid = dphys.Grid((32, 64), lengths=1.0, boundary="periodic")
    y, x = grid.coords
    u0 = jnp.cos(TWO_PI * (2 * x + y)) + 0.5 * jnp.sin(TWO_PI * (x - 3 * y))
    dt = 3.2 / 64
    centred = pdes.Advection(grid, (0.5, 1.0))
    traj = dphys.simulate(
        centred, dphys.CrankNicolson(), u0, dt=dt, n_steps=200, fast_forward=False
    )
    # CN on a skew-symmetric operator conserves the discrete L2 norm exactly.
    np.testing.assert_allclose(_rms(traj.final), _rms(u0), rtol=1e-12)
    # Implicit upwind at Courant 3.2 is monotone: positivity and max bound hold.
    upwind = pdes.Advection(grid, (0.5, 1.0), scheme="upwind")
    p0 = 1.0 + u0
    traj = dphys.simulate(
        upwind,
        dphys.BackwardEuler(),
        p0,
        dt=dt,
        n_steps=200,
        saveat=dphys.SaveAt(every=20),
    )
    assert float(jnp.min(traj.ys)) >= float(jnp.min(p0)) - 1e-12
    assert float(jnp.max(traj.ys)) <= float(jnp.max(p0)) + 1e-12
    norms = [_rms(s) for s in traj.ys]
    assert all(b <= a + 1e-12 for a, b in zip(norms[:-1], norms[1:], strict=True))


def test_float32_run():
    """float32 states run in float32 on both the FFT and the Krylov path."""
    grid = dphys.Grid((16, 16), boundary="periodic")
    u0, _ = _smooth_fields(grid)
    const = pdes.Advection(grid, (0.5, 1.0), kappa=1e-3)
    ref = dphys.simulate(const, dphys.CrankNicolson(), u0, dt=0.05, n_steps=10).final
    # The same uniform flow given as fields takes the GMRES path.
    field = pdes.Advection(
        grid, (jnp.full(grid.shape, 0.5), jnp.full(grid.shape, 1.0)), kappa=1e-3
    )
    krylov = dphys.CrankNicolson(solver=dphys.Krylov(rtol=1e-6, atol=1e-7))
    for model, stepper in [(const, dphys.CrankNicolson()), (field, krylov)]:
        t32 = dphys.simulate(
            model, stepper, u0.astype(jnp.float32), dt=0.05, n_steps=10
        )
        assert t32.final.dtype == jnp.float32
        # float32 round-off (and the solver tolerance) over 10 steps.
        np.testing.assert_allclose(t32.final, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------ adjoints


def _jit_dot_test(forward, adjoint, x, key):
    """dot_test with jitted maps (eager op-by-op dispatch is slow)."""
    if adjoint is None:
        transpose = jax.linear_transpose(forward, x)
        adjoint = lambda w: transpose(w)[0]
    return dtest.dot_test(jax.jit(forward), jax.jit(adjoint), x, key=key)


@pytest.mark.parametrize("scheme", ["centered", "upwind", "upwind3"])
def test_operator_dot_tests(scheme, getkey):
    grid = _periodic_2d()
    u0, velocity = _smooth_fields(grid)
    kappa = 1e-3 * (1.0 + 0.5 * jnp.sin(TWO_PI * grid.coords[1] / 2.0))
    model = pdes.Advection(grid, velocity, kappa=kappa, scheme=scheme)
    res = _jit_dot_test(lambda u: model.linear(0.0, u), None, u0, getkey())
    assert res.passed, res
    # Hand-written adjoint for constant velocity: L(v)^T = L(-v) (mirror symmetry).
    const = pdes.Advection(grid, (0.3, -0.8), kappa=2e-3, scheme=scheme)
    mirror = pdes.Advection(grid, (-0.3, 0.8), kappa=2e-3, scheme=scheme)
    forward = lambda u: const.linear(0.0, u)
    res = _jit_dot_test(forward, lambda w: mirror.linear(0.0, w), u0, getkey())
    assert res.passed, res
    bad = _jit_dot_test(forward, forward, u0, getkey())
    assert not bad.passed


@pytest.mark.parametrize("kind", ["dirichlet", "neumann"])
@pytest.mark.parametrize("scheme", ["centered", "upwind"])
def test_operator_dot_tests_with_boundaries(kind, scheme, getkey):
    grid = dphys.Grid((9, 11), lengths=1.0, boundary=kind)
    y, x = grid.coords
    model = pdes.Advection(grid, (0.4 + x, -0.7 + 0.2 * y), kappa=1e-2, scheme=scheme)
    res = _jit_dot_test(lambda u: model.linear(0.0, u), None, x, getkey())
    assert res.passed, res


def test_centred_field_operator_hand_adjoint(getkey):
    """Adjoint of -D(v u_avg) by summation by parts: the advective form v.grad w."""
    grid = dphys.Grid(20, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    v = 1.0 + 0.5 * jnp.sin(TWO_PI * x)
    model = pdes.Advection(grid, (v,))
    vf = model.face_velocity(0.0, 0)[1:]  # v_{i+1/2}
    dx = grid.spacing[0]

    def adjoint(w):
        right = vf * (jnp.roll(w, -1) - w)  # v_{i+1/2} (w_{i+1} - w_i)
        return (right + jnp.roll(right, 1)) / (2 * dx)

    res = _jit_dot_test(lambda u: model.linear(0.0, u), adjoint, x, getkey())
    assert res.passed, res


def _one_step(grid, model_fn, stepper):
    def step(p):
        return dphys.simulate(
            model_fn(p["velocity"]), stepper, p["u0"], dt=0.1, n_steps=1
        ).final

    return step


# No one-step dot test on the FFT path: its tangent and adjoint are JAX's own
# linearisation and its transpose, equal by construction (the test cannot fail);
# its gradient is Taylor-tested below. The Krylov path's tangent and adjoint are
# separate solves (with A and with A^T), which this test compares.
def test_one_step_tangent_adjoint_dot_test_krylov(getkey):
    grid = _periodic_2d((8, 10))
    u0, velocity = _smooth_fields(grid)
    # Tangent and adjoint solves each stop at the Krylov tolerance: keep it tight.
    tight = dphys.Krylov(method="bicgstab", rtol=1e-14, atol=1e-16)
    model_fn = lambda v: pdes.Advection(grid, v, scheme="upwind")
    step = _one_step(grid, model_fn, dphys.BackwardEuler(solver=tight))
    res = dtest.dot_test_vjp(step, {"u0": u0, "velocity": velocity}, key=getkey())
    assert res.passed, res


def _sensor_cost(grid, model_fn, stepper, n_steps, dt, obs_every):
    """A 4D-Var-like misfit: sum_k ||H u(t_k) - y_k||^2 on a lattice of sensors."""
    idx = tuple(slice(1, None, 3) for _ in grid.shape)
    observe = lambda t, u: u[idx]
    y = 0.3 * jnp.cos(jnp.arange(n_steps // obs_every)[:, None, None] * 0.7 + 1.0)

    def cost(params):
        model, state0 = model_fn(params)
        traj = dphys.simulate(
            model,
            stepper,
            state0,
            dt=dt,
            n_steps=n_steps,
            saveat=dphys.SaveAt(every=obs_every, fn=observe),
        )
        return jnp.sum((traj.ys - y) ** 2)

    return jax.jit(cost)


def _only(x, name, key):
    """A random direction, scaled like ``x``, that moves only ``x[name]``."""
    h = dtest.tree_random_like(key, x)
    return {
        k: jax.tree_util.tree_map((lambda a: a) if k == name else jnp.zeros_like, v)
        for k, v in h.items()
    }


def _taylor_each(cost, x, key):
    """Taylor test of grad(cost) along each parameter alone, with negative controls.

    One jitted cost and one gradient serve every direction. The negative control
    scales the gradient by 1 + 1e-3 and moves along the gradient itself (so the
    error term <g, h> is as large as it can be): its rate must fall to about 1.
    """
    grad = jax.jit(jax.grad(cost))(x)
    wrong = jax.tree_util.tree_map(lambda g: g * (1 + 1e-3), grad)
    rates = {}
    for name in x:
        h = _only(x, name, key)
        good = dtest.taylor_test(cost, x, grad=grad, direction=h)
        assert good.passed and good.rate > 1.9, (name, good)
        along = {
            k: jax.tree_util.tree_map(
                (lambda g, xi: g * _rms(xi) / _rms(g))
                if k == name
                else (lambda g, xi: jnp.zeros_like(g)),
                v,
                x[k],
            )
            for k, v in grad.items()
        }
        bad = dtest.taylor_test(cost, x, grad=wrong, direction=along)
        assert not bad.passed and bad.rate < 1.5, (name, bad)
        rates[name] = good.rate
    return rates


def test_taylor_initial_state_constant_velocity_and_kappa(getkey):
    """FFT path: gradients w.r.t. u0, the constant velocity and kappa."""
    grid = _periodic_2d()
    u0, _ = _smooth_fields(grid)

    def model_fn(p):
        return pdes.Advection(grid, p["velocity"], kappa=p["kappa"]), p["u0"]

    cost = _sensor_cost(grid, model_fn, dphys.CrankNicolson(), 30, 0.08, 5)
    x = {
        "u0": u0,
        "velocity": (jnp.asarray(0.4), jnp.asarray(1.1)),
        "kappa": jnp.asarray(2e-3),
    }
    _taylor_each(cost, x, getkey())


@pytest.mark.parametrize(
    "scheme, stepper",
    [
        ("centered", dphys.CrankNicolson),
        pytest.param("upwind", dphys.BackwardEuler, marks=pytest.mark.slow),
    ],
)
def test_taylor_velocity_field_krylov(scheme, stepper, getkey):
    """GMRES path (IFT adjoint): gradients w.r.t. velocity and kappa fields."""
    grid = _periodic_2d((8, 10))
    u0, velocity = _smooth_fields(grid)
    kappa = 1e-3 * (1.0 + 0.5 * jnp.sin(TWO_PI * grid.coords[1] / 2.0))
    solver = dphys.Krylov(method="bicgstab", rtol=1e-13, atol=1e-15)

    def model_fn(p):
        model = pdes.Advection(grid, p["velocity"], kappa=p["kappa"], scheme=scheme)
        return model, p["u0"]

    cost = _sensor_cost(grid, model_fn, stepper(solver=solver), 12, 0.1, 3)
    # The velocity field stays away from 0 everywhere: upwinding is smooth there.
    assert min(float(jnp.min(jnp.abs(c))) for c in velocity) > 0.1
    _taylor_each(cost, {"u0": u0, "velocity": velocity, "kappa": kappa}, getkey())


def test_gradient_with_respect_to_inflow(getkey):
    grid = dphys.Grid(40, lengths=1.0, boundary="dirichlet")
    (x,) = grid.coords
    u0 = jnp.exp(-(((x - 0.5) / 0.1) ** 2))

    @jax.jit
    def cost(p):
        model = pdes.Advection(grid, p["v"], kappa=1e-3, inflow=p["g"])
        traj = dphys.simulate(model, dphys.CrankNicolson(), u0, dt=0.02, n_steps=30)
        return jnp.sum(traj.final[::4] ** 3)

    x0 = {"v": jnp.asarray(0.9), "g": jnp.asarray(0.4)}
    grad = jax.jit(jax.grad(cost))(x0)
    assert dtest.fd_check(cost, x0, grad=grad, key=getkey()).passed
    res = dtest.taylor_test(cost, x0, grad=grad, key=getkey())
    assert res.passed and res.rate > 1.9, res


def test_upwind_kink_at_zero_velocity():
    """At v = 0 the upwind flux is not differentiable; the documented derivative."""
    grid = dphys.Grid(16, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    u = jnp.sin(TWO_PI * x) + 0.3 * jnp.cos(3 * TWO_PI * x)

    @jax.jit
    def lin(v, centred):
        upwind = pdes.Advection(grid, v, scheme="upwind").linear(0.0, u)
        return jnp.where(centred, pdes.Advection(grid, v).linear(0.0, u), upwind)

    zero = jnp.asarray(0.0)
    tangent = lambda v, centred: jax.jvp(lambda w: lin(w, centred), (v,), (1.0,))[1]
    d_upwind, d_centred = tangent(zero, False), tangent(zero, True)
    # jnp.maximum/minimum split the tie: the derivative is the centered one, ...
    np.testing.assert_allclose(d_upwind, d_centred, atol=1e-12)
    # ... the mean of the two one-sided derivatives, which differ (a real kink).
    eps = 1e-7
    right = (lin(eps, False) - lin(zero, False)) / eps
    left = (lin(zero, False) - lin(-eps, False)) / eps
    np.testing.assert_allclose(0.5 * (right + left), d_upwind, atol=1e-6)
    assert float(jnp.max(jnp.abs(right - left))) > 1.0
    # Away from 0 the upwind operator is linear in v on each side: exact derivative.
    np.testing.assert_allclose(tangent(jnp.asarray(0.5), False), right, atol=1e-6)


# ------------------------------------------------------------------ errors


def test_bad_input_errors():
    g2 = _periodic_2d()
    g1 = dphys.Grid(10, boundary="periodic")
    with pytest.raises(ValueError, match="`kappa` must be non-negative"):
        pdes.Advection(g1, 1.0, kappa=-1e-3)
    with pytest.raises(
        ValueError,
        match=r"`velocity\[1\]` must be a scalar or a field "
        r"of shape \(12, 16\).*got shape \(12, 15\)",
    ):
        pdes.Advection(g2, (0.1, jnp.zeros((12, 15))))
    with pytest.raises(ValueError, match="`velocity` has 3 components but the grid"):
        pdes.Advection(g2, (0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match="`velocity` is a scalar but the grid is 2D"):
        pdes.Advection(g2, 1.0)
    gd = dphys.Grid((12, 16), boundary="dirichlet")
    with pytest.raises(ValueError, match="velocity_at_faces=True"):
        pdes.Advection(gd, (jnp.zeros((13, 16)), 0.0))
    with pytest.raises(ValueError, match=r"shape \(13, 16\)"):
        pdes.Advection(gd, (jnp.zeros((12, 16)), 0.0), velocity_at_faces=True)
    with pytest.raises(ValueError, match="`velocity\\[0\\]` must be finite"):
        pdes.Advection(g1, jnp.nan)
    with pytest.raises(ValueError, match="`scheme` must be one of"):
        pdes.Advection(g1, 1.0, scheme="lax-wendroff")
    with pytest.raises(ValueError, match="'upwind3'` needs a fully periodic grid"):
        pdes.Advection(gd, (0.1, 0.2), scheme="upwind3")
    with pytest.raises(ValueError, match="`inflow` is the value of u outside"):
        pdes.Advection(g1, 1.0, inflow=1.0)
    with pytest.raises(ValueError, match="`inflow` must be a scalar"):
        pdes.Advection(gd, (0.1, 0.2), inflow=jnp.ones(3))
    with pytest.raises(ValueError, match="`velocity_fn\\(t, velocity\\)` must return"):
        pdes.Advection(g2, (0.1, 0.2), velocity_fn=lambda t, v: (jnp.zeros(3), v[1]))
    with pytest.raises(TypeError, match="`velocity_fn` must be a callable"):
        pdes.Advection(g2, (0.1, 0.2), velocity_fn=3)
    with pytest.raises(TypeError, match="`grid` must be a dphys.Grid"):
        pdes.Advection((16,), 1.0)
    model = pdes.Advection(g1, 1.0)
    with pytest.raises(ValueError, match="`state0` has a leaf of shape"):
        dphys.simulate(model, dphys.CrankNicolson(), jnp.zeros(9), dt=0.1, n_steps=1)
    with pytest.raises(TypeError, match="`state0` must"):
        dphys.simulate(
            model, dphys.CrankNicolson(), jnp.zeros(10, int), dt=0.1, n_steps=1
        )
    with pytest.raises(TypeError, match="`state0` must be a floating-point array"):
        model.check_state(jnp.zeros(10, int))
    with pytest.raises(ValueError, match="must be one array of the grid's shape"):
        model.check_state({"u": jnp.zeros(10)})
    field = pdes.Advection(g1, (jnp.ones(10),))
    with pytest.raises(ValueError, match="`solver=FFT\\(\\)` needs"):
        dphys.simulate(
            field,
            dphys.CrankNicolson(solver=dphys.FFT()),
            jnp.zeros(10),
            dt=0.1,
            n_steps=1,
        )
    with pytest.raises(ValueError, match="`symbol` needs a periodic grid"):
        field.symbol()
