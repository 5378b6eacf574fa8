"""Rotating shallow water (pdes.ShallowWater): discrete-exact dispersion, Gill
adjustment, lake at rest, Stoker dam break, invariants, gradients and bad input."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import dphys.testing as dtest
import pdes
from pdes import HelmholtzKrylov, ShallowWater, SWState
from pdes._analytic import (
    c_grid_frequency,
    c_grid_symbol,
    crank_nicolson_phase,
    gill_adjustment,
    stoker_dam_break,
)


G, H0, F0 = 9.81, 1000.0, 1e-4


def _basin(shape=(12, 14), boundary="neumann", nonlinear=False, **kwargs):
    """A small 2D basin with a bumpy bottom and rectangular cells (dx = 10 km, dy =
    13 km), so that a dx/dy mix-up anywhere in the stencils changes the answers."""
    grid = dphys.Grid(
        shape, lengths=(shape[0] * 13e3, shape[1] * 10e3), boundary=boundary
    )
    y, x = grid.coords
    ly, lx = grid.lengths
    depth = H0 * (1.0 + 0.3 * jnp.sin(2 * jnp.pi * x / lx) * jnp.cos(jnp.pi * y / ly))
    model = ShallowWater(
        grid, kwargs.pop("depth", depth), f0=F0, nonlinear=nonlinear, **kwargs
    )
    return model


def _bump(model, amplitude=1.0, width=30e3):
    y, x = model.grid.coords
    ly, lx = model.grid.lengths
    eta = amplitude * jnp.exp(-((x - 0.45 * lx) ** 2 + (y - 0.55 * ly) ** 2) / width**2)
    return model.rest_state(eta)


# ---------------------------------------------------------------------- dispersion


def test_single_mode_frequency_matches_discrete_dispersion_relation():
    """Phase per Crank-Nicolson step of C-grid eigenmodes = 2 atan(omega dt / 2).

    Rectangular cells (dy = 1.6 dx): with dx = dy a swap of the two spacings
    anywhere in the gradient or divergence would go unnoticed."""
    ny, nx, d, dy = 16, 32, 10e3, 16e3
    grid = dphys.Grid((ny, nx), lengths=(ny * dy, nx * d), boundary="periodic")
    model = ShallowWater(grid, H0, g=G, f0=F0)
    dt, n_steps = 600.0, 12  # gravity-wave Courant number about 8.4
    y, x = (np.asarray(c) for c in grid.coords)
    modes = [(3, 2), (5, -1), (1, 6), (0, 3)]
    eta = np.zeros(grid.shape)
    u = np.zeros(grid.shape)
    v = np.zeros(grid.shape)
    bases, vecs, omegas = [], [], []
    for mx, my in modes:
        k, l = 2 * np.pi * mx / (nx * d), 2 * np.pi * my / (ny * dy)
        omega = c_grid_frequency(k, l, g=G, depth=H0, f=F0, dx=d, dy=dy)
        sym = c_grid_symbol(k, l, g=G, depth=H0, f=F0, dx=d, dy=dy)
        lam, vec = np.linalg.eig(sym)
        e = vec[:, np.argmin(np.abs(lam - 1j * omega))]
        # The hand-derived symbol has +i omega as an eigenvalue.
        assert np.abs(lam - 1j * omega).min() < 1e-12 * omega
        phases = [
            np.exp(1j * (k * x + l * y)),
            np.exp(1j * (k * (x + d / 2) + l * y)),
            np.exp(1j * (k * x + l * (y + dy / 2))),
        ]
        eta += np.real(e[0] * phases[0])
        u += np.real(e[1] * phases[1])
        v += np.real(e[2] * phases[2])
        bases.append(phases)
        vecs.append(e)
        omegas.append(omega)
    state0 = SWState(*(jnp.asarray(a) for a in (eta, u, v)))
    traj = dphys.simulate(
        model,
        dphys.CrankNicolson(),
        state0,
        dt=dt,
        n_steps=n_steps,
        saveat=dphys.SaveAt(t0=True, every=1),
        fast_forward=False,
    )
    fields = [np.asarray(traj.ys.eta), np.asarray(traj.ys.u), np.asarray(traj.ys.v)]
    for phases, e, omega in zip(bases, vecs, omegas, strict=True):
        amp = sum(
            np.conj(e[c]) * np.sum(fields[c] * np.conj(phases[c]), axis=(1, 2))
            for c in range(3)
        )
        phase = np.unwrap(np.angle(amp / amp[0]))
        per_step = np.diff(phase)
        expected = crank_nicolson_phase(omega, dt)
        assert np.max(np.abs(per_step - expected)) <= 1e-10 * expected
        np.testing.assert_allclose(np.abs(amp / amp[0]), 1.0, rtol=0, atol=1e-12)


# ------------------------------------------------------------ geostrophic adjustment


def _gill_errors(n):
    """Adjusted state of a periodic double height step vs Gill's solution."""
    radius = np.sqrt(G * 100.0) / F0
    length = 40 * radius
    dx = length / n
    # Cell faces at multiples of dx, so both steps lie on faces.
    grid = dphys.Grid(n, lengths=length, boundary="periodic", origin=dx / 2)
    (x,) = grid.coords
    model = ShallowWater(grid, 100.0, g=G, f0=F0)
    eta0 = jnp.where(jnp.abs(x - length / 2) < length / 4, 1.0, -1.0)
    state0 = model.rest_state(eta0)
    # Backward Euler with f dt = 1000 damps every inertia-gravity wave (frequency >=
    # f) by a factor >= 1000 per step, while the geostrophic mode (the kernel of L)
    # and the discrete potential vorticity are kept exactly: 8 steps reach the
    # discrete adjusted state to round-off.
    final = dphys.simulate(
        model, dphys.BackwardEuler(), state0, dt=1e3 / F0, n_steps=8
    ).final
    xs = np.asarray(x)
    ea, va = gill_adjustment(
        xs, x_front=length / 4, eta_left=-1.0, eta_right=1.0, g=G, depth=100.0, f=F0
    )
    eb, vb = gill_adjustment(
        xs, x_front=3 * length / 4, eta_left=1.0, eta_right=-1.0, g=G, depth=100.0, f=F0
    )
    # Superpose the two fronts (linear problem, the -1 removes the doubly counted
    # level between them); their tails overlap by e^-10 at most.
    eta_exact, v_exact = ea + eb - 1.0, va + vb
    err_eta = np.max(np.abs(np.asarray(final.eta) - eta_exact))
    err_v = np.max(np.abs(np.asarray(final.v) - v_exact)) / np.max(np.abs(v_exact))
    kinetic = 0.5 * 100.0 * float(jnp.sum(final.u**2 + final.v**2)) * dx
    released = 0.5 * G * float(jnp.sum(eta0**2 - final.eta**2)) * dx
    return err_eta, err_v, kinetic / released, float(jnp.max(jnp.abs(final.u)))


def test_gill_geostrophic_adjustment_second_order_and_one_third_energy():
    errs = [_gill_errors(n) for n in (200, 400, 800)]
    e_eta = np.array([e[0] for e in errs])
    e_v = np.array([e[1] for e in errs])
    order_eta = np.log2(e_eta[:-1] / e_eta[1:])
    order_v = np.log2(e_v[:-1] / e_v[1:])
    # Measured: eta 1.89, 1.94; v 1.96, 1.98 (errors 4.3e-3 .. 3.0e-4 of eta0).
    assert np.all(order_eta > 1.8) and order_eta[-1] > 1.9, order_eta
    assert np.all(order_v > 1.9), order_v
    assert e_eta[-1] < 5e-4
    for err in errs:
        ratio = err[2]
        assert abs(ratio - 1 / 3) < 0.01 / 3, ratio  # within 1 % of Gill's 1/3
        assert err[3] < 1e-12  # steady: no cross-front flow


# --------------------------------------------------------------------- lake at rest


# Nonlinear runs on the small basin share one compiled loop per boundary kind: the
# same model structure (`_nonlinear_basin`), stepper, step count and saves.
NL_STEPPER = dphys.IMEX(solver=HelmholtzKrylov())


def _nonlinear_basin(boundary, depth=None, **kwargs):
    beta = 2e-11 if boundary == "neumann" else None
    kwargs = {"quadratic_drag": 2.5e-3, "drag": 1e-6, **kwargs}
    if depth is not None:
        kwargs["depth"] = depth
    return _basin(boundary=boundary, nonlinear=True, beta=beta, **kwargs)


def _nonlinear_run(model, state0, dt):
    return dphys.simulate(
        model,
        NL_STEPPER,
        state0,
        dt=dt,
        n_steps=30,
        saveat=dphys.SaveAt(t0=True, every=5),
    )


@pytest.mark.parametrize("boundary", ["neumann", "periodic"])
def test_lake_at_rest_stays_at_rest_over_variable_bathymetry(boundary):
    grid = _basin(boundary=boundary).grid
    y, x = grid.coords
    # Steep, rough bathymetry: a seamount rising to 5 % of the mean depth.
    depth = H0 * (1.0 - 0.95 * jnp.exp(-((x - 70e3) ** 2 + (y - 60e3) ** 2) / 20e3**2))
    depth = depth * (1.0 + 0.1 * jnp.cos(3.0 * x / 10e3))
    model = _nonlinear_basin(boundary, depth=depth)
    state0 = model.rest_state(0.3)
    final = _nonlinear_run(model, state0, dt=300.0).final
    assert float(jnp.max(jnp.abs(final.u))) <= 1e-12
    assert float(jnp.max(jnp.abs(final.v))) <= 1e-12
    assert float(jnp.max(jnp.abs(final.eta - 0.3))) <= 1e-12


# ----------------------------------------------------------------------- dam break


def _dam_break(n, length=1000.0, t_end=40.0, h_left=2.0, h_right=1.0):
    dx = length / n
    grid = dphys.Grid(n, lengths=length, boundary="neumann")
    (x,) = grid.coords
    model = ShallowWater(grid, h_right, g=G, nonlinear=True, continuity="upwind")
    state0 = model.rest_state(jnp.where(x < length / 2, h_left - h_right, 0.0))
    # Explicit Courant number 0.3 (check_run's measure); the implicit gravity waves
    # run at the same Courant number here: a bore needs a small step anyway.
    n_steps = int(np.ceil(t_end / (0.3 * dx / np.sqrt(G * (h_left - h_right)))))
    final = dphys.simulate(
        model,
        dphys.IMEX(solver=HelmholtzKrylov()),
        state0,
        dt=t_end / n_steps,
        n_steps=n_steps,
    ).final
    h = np.asarray(final.eta) + h_right
    xs = np.asarray(x)
    h_ex, _, fronts = stoker_dam_break(
        xs, t_end, h_left=h_left, h_right=h_right, x_dam=length / 2, g=G
    )
    return xs, dx, h, h_ex, fronts


def _crossing(xs, h, level):
    """Where a profile falling through ``level`` for the last time crosses it."""
    i = np.where(h > level)[0].max()
    return xs[i] + (h[i] - level) / (h[i] - h[i + 1]) * (xs[i + 1] - xs[i])


def _dam_break_metrics(n):
    xs, dx, h, h_ex, fr = _dam_break(n)
    width = fr["bore"] - fr["tail"]
    plateau = (xs > fr["tail"] + 0.2 * width) & (xs < fr["bore"] - 0.2 * width)
    h_mid = float(np.mean(h[plateau]))
    bore = _crossing(xs, h, 0.5 * (fr["h_m"] + 1.0))
    # Mid-fan level of the rarefaction: exact position from c = (2 c_L - xi) / 3.
    c_l, level = np.sqrt(G * 2.0), 0.5 * (2.0 + fr["h_m"])
    fan_exact = 500.0 + (2 * c_l - 3 * np.sqrt(G * level)) * 40.0
    fan = _crossing(xs, h, level)
    l1 = float(np.sum(np.abs(h - h_ex)) * dx)
    return {
        "dx": dx,
        "h_mid_rel": h_mid / fr["h_m"] - 1.0,
        "bore_cells": (bore - fr["bore"]) / dx,
        "fan_cells": (fan - fan_exact) / dx,
        "l1": l1,
    }


def test_stoker_dam_break_middle_state_and_fronts():
    m = _dam_break_metrics(200)
    # Measured at N=200: middle height -3.3e-4 relative, bore -0.16 cells. A
    # first-order upwind flux smears the bore over a few cells but keeps its
    # position (momentum-conservative jump conditions).
    assert abs(m["h_mid_rel"]) < 1e-3, m
    assert abs(m["bore_cells"]) < 1.0, m
    assert abs(m["fan_cells"]) < 1.0, m


@pytest.mark.slow
def test_stoker_dam_break_converges():
    ms = [_dam_break_metrics(n) for n in (200, 400, 800)]
    l1 = np.array([m["l1"] for m in ms])
    orders = np.log2(l1[:-1] / l1[1:])
    # Discontinuous solution, first-order flux: L1 order between 1/2 and 1.
    assert np.all(orders > 0.6), orders
    assert abs(ms[-1]["h_mid_rel"]) < 3e-4
    assert abs(ms[-1]["bore_cells"]) < 0.5


# ---------------------------------------------------------------------- invariants


@pytest.mark.parametrize("boundary", ["periodic", "neumann"])
def test_nonlinear_mass_conserved_to_roundoff(boundary):
    model = _nonlinear_basin(boundary)
    state0 = _bump(model, amplitude=5.0)
    # The GMRES tolerance is 1e-10, but eta comes from the continuity row, so the
    # mass balance holds to round-off regardless.
    final = _nonlinear_run(model, state0, dt=300.0).final
    _assert_mass(model, state0, final)


def _assert_mass(model, state0, final):
    scale = float(model.grid.integrate(jnp.abs(state0.eta)))
    assert abs(float(model.mass(final) - model.mass(state0))) <= 1e-13 * scale


def test_linear_energy_conserved_by_crank_nicolson():
    grid = dphys.Grid((32, 32), lengths=320e3, boundary="periodic")
    model = ShallowWater(grid, H0, f0=F0)
    state0 = _bump(model)
    traj = dphys.simulate(
        model,
        dphys.CrankNicolson(),
        state0,
        dt=600.0,
        n_steps=100,
        saveat=dphys.SaveAt(every=10),
        fast_forward=False,
    )
    e0 = float(model.energy(state0))
    energies = np.array(jax.vmap(model.energy)(traj.ys))
    np.testing.assert_allclose(energies, e0, rtol=1e-13, atol=0)
    _assert_mass(model, state0, traj.final)


def test_energy_non_increasing_with_drag():
    # Linear, closed basin, variable depth, beta-plane: CN on a dissipative operator.
    model = _basin(beta=2e-11, drag=5e-5)
    state0 = _bump(model)
    traj = dphys.simulate(
        model,
        dphys.CrankNicolson(solver=HelmholtzKrylov(rtol=1e-13)),
        state0,
        dt=600.0,
        n_steps=40,
        saveat=dphys.SaveAt(t0=True, every=1),
    )
    e = np.array(jax.vmap(model.energy)(traj.ys))
    _assert_mass(model, state0, traj.final)
    assert np.all(np.diff(e) <= 1e-12 * e[0]), np.diff(e).max()
    assert e[-1] < 0.9 * e[0]  # and it does dissipate
    # Without drag the same run keeps its energy (to the solver tolerance).
    free = eqx.tree_at(lambda m: m.drag, model, jnp.asarray(0.0))
    ef = free.energy(
        dphys.simulate(
            free,
            dphys.CrankNicolson(solver=HelmholtzKrylov(rtol=1e-13)),
            state0,
            dt=600.0,
            n_steps=40,
            saveat=dphys.SaveAt(t0=True, every=1),
        ).final
    )
    assert abs(float(ef) / e[0] - 1.0) < 1e-10


def test_nonlinear_energy_decays_with_quadratic_drag():
    model = _nonlinear_basin("neumann", quadratic_drag=0.2)
    state0 = _bump(model, amplitude=20.0)
    traj = _nonlinear_run(model, state0, dt=150.0)
    e = np.array(jax.vmap(model.energy)(traj.ys))
    assert np.all(np.diff(e) < 0), np.diff(e)
    assert e[-1] < 0.9 * e[0]


def test_vector_invariant_semi_discrete_energy_conservation():
    """Sadourny's energy-conserving form: dE/dt = 0 for the full nonlinear tendency."""
    model = _basin(
        boundary="neumann",
        nonlinear=True,
        momentum="vector_invariant",
        continuity="centered",
        beta=2e-11,
    )
    key = jax.random.key(3)
    k1, k2, k3 = jax.random.split(key, 3)
    shape = model.grid.shape
    mu, mv = (jnp.asarray(m) for m in pdes._cgrid.face_masks(model.grid))
    state = SWState(
        5.0 * jax.random.normal(k1, shape),
        0.5 * jax.random.normal(k2, shape) * mu,
        0.5 * jax.random.normal(k3, shape) * mv,
    )

    def sadourny_energy(s):
        h = model.depth + s.eta
        ke = 0.5 * (pdes._cgrid.avg_bwd(s.u**2, -1) + pdes._cgrid.avg_bwd(s.v**2, -2))
        return model.grid.integrate(h * ke + 0.5 * model.g * s.eta**2)

    tendency = model.vector_field(0.0, state)
    _, rate = jax.jvp(sadourny_energy, (state,), (tendency,))
    absolute = lambda tree: jax.tree_util.tree_map(jnp.abs, tree)
    scale = dtest.tree_dot(
        absolute(jax.grad(sadourny_energy)(state)), absolute(tendency)
    )
    assert abs(float(rate)) < 1e-13 * float(scale)


@pytest.mark.parametrize("nonlinear", [False, True])
def test_wind_setup_reaches_the_discrete_steady_state(nonlinear):
    """Constant wind in a closed 1D channel: g d(eta)/dx = tau / h at rest."""
    grid = dphys.Grid(40, lengths=20e3, boundary="neumann")
    tau, depth = 1e-4, 20.0
    # Drag at twice the gravest seiche frequency (pi sqrt(gH) / L = 2.2e-3 1/s)
    # damps every seiche at least as e^(-2.2e-3 t) = e^-33 by the end; the set-up
    # itself does not depend on the drag.
    model = ShallowWater(grid, depth, wind=(tau, 0.0), drag=4.4e-3, nonlinear=nonlinear)
    final = dphys.simulate(
        model,
        dphys.IMEX(solver=HelmholtzKrylov()),
        model.rest_state(),
        dt=50.0,
        n_steps=300,
    ).final
    eta = np.asarray(final.eta)
    h_faces = depth + (0.5 * (eta[:-1] + eta[1:]) if nonlinear else 0.0)
    slope = G * np.diff(eta) / grid.spacing[0]
    # 1e-6: the slope is a difference of neighbouring eta (2.5 mm apart) from
    # GMRES solves at rtol 1e-10; the seiches themselves are down to e^-33.
    np.testing.assert_allclose(slope, tau / h_faces, rtol=1e-6)
    assert float(jnp.max(jnp.abs(final.u))) < 1e-9
    scale = float(grid.integrate(jnp.abs(final.eta)))
    assert abs(float(model.mass(final))) < 1e-13 * scale  # set-up, no net volume


def test_helmholtz_krylov_matches_fft_on_periodic_constant_depth():
    grid = dphys.Grid((16, 16), lengths=160e3, boundary="periodic")
    model = ShallowWater(grid, H0, f0=F0, drag=1e-5)
    state0 = _bump(model)
    a = dphys.simulate(model, dphys.CrankNicolson(), state0, dt=600.0, n_steps=10)
    b = dphys.simulate(
        model,
        dphys.CrankNicolson(solver=HelmholtzKrylov(rtol=1e-13)),
        state0,
        dt=600.0,
        n_steps=10,
    )
    assert dtest.tree_allclose(b.final, a.final, rtol=0, atol=1e-11)
    # The Helmholtz preconditioner is exact up to rotation (gamma f = 0.03): a few
    # Arnoldi steps per time step to reach 1e-13 (measured: 6).
    assert int(b.stats["linear_iterations"]) <= 8 * 10, b.stats


@pytest.mark.parametrize(
    "case", ["walls", "periodic-variable-depth", "beta-plane", "periodic-constant"]
)
def test_auto_picks_helmholtz_krylov_off_the_fft_path(case):
    """ShallowWater.preferred_solver: Auto resolves to HelmholtzKrylov whenever the
    operator is not periodic and translation invariant (FFT otherwise), and a run
    with Auto is the run with an explicit HelmholtzKrylov."""
    if case == "walls":
        model = ShallowWater(_basin().grid, H0, f0=F0)
    elif case == "periodic-variable-depth":
        model = _basin(boundary="periodic")
    elif case == "beta-plane":
        model = _basin(beta=2e-11)
    else:
        model = ShallowWater(_basin(boundary="periodic").grid, H0, f0=F0)
    state0 = _bump(model)
    resolved = dphys.Auto().resolve(model, state0)
    if case == "periodic-constant":
        assert isinstance(resolved, dphys.FFT)
        assert model.preferred_solver(state0) is None
        return
    assert isinstance(resolved, HelmholtzKrylov)
    run = lambda stepper: dphys.simulate(model, stepper, state0, dt=600.0, n_steps=5)
    auto = run(dphys.CrankNicolson())
    explicit = run(dphys.CrankNicolson(solver=HelmholtzKrylov()))
    assert dtest.tree_allclose(auto.final, explicit.final, rtol=0, atol=0)
    assert int(auto.stats["linear_iterations"]) > 0


def test_float32_run_keeps_dtype_and_mass():
    model = _basin(nonlinear=True)
    state0 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), _bump(model))
    final = dphys.simulate(
        model,
        dphys.IMEX(solver=HelmholtzKrylov(rtol=1e-5)),
        state0,
        dt=300.0,
        n_steps=5,
    ).final
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(final))
    scale = float(model.grid.integrate(jnp.abs(state0.eta)))
    assert abs(float(model.mass(final) - model.mass(state0))) < 1e-5 * scale


# ----------------------------------------------------------------------- gradients


def _sensor_cost(build, stepper, dt, n_steps, sensors, obs, adjoint=None):
    adjoint = dphys.Checkpointed() if adjoint is None else adjoint

    def cost(p):
        model = build(p)
        state0 = SWState(p["eta0"], p["u0"], p["v0"])
        traj = dphys.simulate(
            model,
            stepper,
            state0,
            dt=dt,
            n_steps=n_steps,
            saveat=dphys.SaveAt(every=2, fn=lambda t, s: s.eta[sensors]),
            adjoint=adjoint,
        )
        return jnp.sum((traj.ys - obs) ** 2)

    return jax.jit(cost)


def _only(params, name, key):
    """A random direction in ``params[name]`` (scaled like it), zero elsewhere."""
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    z = jax.random.normal(key, jnp.shape(params[name]))
    rms = jnp.sqrt(jnp.mean(params[name] ** 2))
    zeros[name] = z * jnp.where(rms > 0, rms, 1.0)
    return zeros


def _check_taylor(cost, params, names, key):
    grad = jax.jit(jax.grad(cost))(params)
    for i, name in enumerate(names):
        h = _only(params, name, jax.random.fold_in(key, i))
        res = dtest.taylor_test(cost, params, grad=grad, direction=h)
        assert res.passed and res.rate > 1.9, (name, str(res))
        wrong = jax.tree_util.tree_map(lambda a: (1 + 1e-3) * a, grad)
        bad = dtest.taylor_test(cost, params, grad=wrong, direction=h)
        assert not bad.passed, (name, str(bad))


def test_taylor_linear_closed_basin_state_depth_drag_g(getkey):
    base = _basin(beta=2e-11, drag=1e-5)
    grid = base.grid
    sensors = (jnp.array([2, 5, 9, 3]), jnp.array([3, 7, 10, 12]))
    stepper = dphys.CrankNicolson(solver=HelmholtzKrylov(rtol=1e-12))

    def build(p):
        return ShallowWater(
            grid, p["depth"], g=p["g"], f0=F0, beta=2e-11, drag=p["drag"]
        )

    truth = _bump(base)
    obs = dphys.simulate(
        base,
        stepper,
        truth,
        dt=900.0,
        n_steps=10,
        saveat=dphys.SaveAt(every=2, fn=lambda t, s: s.eta[sensors]),
    ).ys
    first = _bump(base, amplitude=0.7, width=40e3)
    params = {
        "eta0": first.eta,
        "u0": 0.01 * jax.random.normal(getkey(), grid.shape) * _face_mask(grid, "u"),
        "v0": 0.01 * jax.random.normal(getkey(), grid.shape) * _face_mask(grid, "v"),
        "depth": base.depth * 1.1,
        "drag": jnp.asarray(2e-5),
        "g": jnp.asarray(9.5),
    }
    # Unrolled: the same gradient as checkpointing (a core test), compiled faster.
    cost = _sensor_cost(
        build, stepper, 900.0, 10, sensors, obs, adjoint=dphys.Unrolled()
    )
    _check_taylor(cost, params, ["eta0", "u0", "v0", "depth", "drag", "g"], getkey())


def _face_mask(grid, which):
    mu, mv = pdes._cgrid.face_masks(grid)
    return jnp.asarray(mu if which == "u" else mv)


def test_taylor_nonlinear_state_depth_quadratic_drag_g(getkey):
    # A mean current keeps every face velocity one-signed, so the upwind switches
    # never flip and the cost is smooth. Rectangular cells (dx = 12 km, dy = 10
    # km) so the nonlinear terms' spacings are checked too.
    grid = dphys.Grid((10, 8), lengths=(100e3, 96e3), boundary="periodic")
    y, x = grid.coords
    depth = 50.0 * (1.0 + 0.2 * jnp.sin(2 * jnp.pi * x / 96e3))
    sensors = (jnp.array([2, 5, 9]), jnp.array([3, 7, 1]))
    stepper = dphys.IMEX(solver=HelmholtzKrylov(rtol=1e-12))

    def build(p):
        return ShallowWater(
            grid, p["depth"], g=p["g"], f0=F0, quadratic_drag=p["cd"], nonlinear=True
        )

    eta = 0.5 * jnp.exp(-((x - 60e3) ** 2 + (y - 50e3) ** 2) / (25e3) ** 2)
    params = {
        "eta0": eta,
        "u0": 1.0 + 0.05 * jax.random.normal(getkey(), grid.shape),
        "v0": 0.5 + 0.05 * jax.random.normal(getkey(), grid.shape),
        "depth": depth,
        "cd": jnp.asarray(3e-3),
        "g": jnp.asarray(9.81),
    }
    obs = 0.1 * jnp.ones((3, 3))
    # Unrolled: the same gradient as checkpointing (a core test), compiled faster.
    cost = _sensor_cost(
        build, stepper, 300.0, 6, sensors, obs, adjoint=dphys.Unrolled()
    )
    _check_taylor(cost, params, ["eta0", "u0", "v0", "depth", "cd", "g"], getkey())


def test_dot_test_one_step_tangent_adjoint():
    """Tangent (solves with A) against adjoint (solves with A^T) of one IMEX step
    through the Helmholtz-preconditioned GMRES, on the non-symmetric (Coriolis,
    beta-plane, drag) closed basin with rectangular cells.

    The FFT path is not dot-tested: its tangent and adjoint are JAX's linearisation
    and its transpose (including the hand-written per-mode-inverse JVP, which JAX
    transposes), equal by construction, so the test could not fail there; its
    gradients are Taylor-tested instead."""
    model = _basin(nonlinear=True, quadratic_drag=2e-3, beta=2e-11)
    # The dot test compares two inexact solves: 1e-14 keeps their error ~4e-14.
    stepper = dphys.IMEX(solver=HelmholtzKrylov(rtol=1e-14))
    state0 = _bump(model, amplitude=30.0)

    def one_step(s):
        return dphys.simulate(
            model, stepper, s, dt=600.0, n_steps=1, fast_forward=False
        ).final

    res = dtest.dot_test_vjp(one_step, state0)
    assert res.passed, str(res)


def test_gradient_through_fft_symbol_wrt_g_matches_finite_difference():
    grid = dphys.Grid((16, 16), lengths=160e3, boundary="periodic")
    state0 = _bump(ShallowWater(grid, H0))

    def cost(p):
        model = ShallowWater(grid, p["depth"], g=p["g"], f0=p["f0"], drag=p["drag"])
        final = dphys.simulate(
            model, dphys.CrankNicolson(), state0, dt=600.0, n_steps=20
        ).final
        return jnp.sum(final.eta[4:8, 4:8] ** 2)

    params = {"g": 9.81, "depth": 1000.0, "f0": 1e-4, "drag": 1e-5}
    params = jax.tree_util.tree_map(jnp.asarray, params)
    cost = jax.jit(cost)
    grad = jax.jit(jax.grad(cost))(params)
    assert dtest.taylor_test(cost, params, grad=grad).passed
    assert dtest.fd_check(cost, params, grad=grad).passed


@pytest.mark.parametrize("theta", [0.5, 1.0, 0.7, 0.0])
def test_fast_forward_of_coupled_fields_equals_solving_each_step(theta):
    # The per-mode 3x3 propagator G^m (built as [(I - θΔt S)^{-1} - (1-θ) I] / θ, or
    # I + Δt S when θ = 0) must reproduce m θ-steps solved one at a time by GMRES
    # (no FFT), values and gradients with respect to g.
    grid = dphys.Grid((16, 12), lengths=(160e3, 120e3), boundary="periodic")
    state0 = _bump(ShallowWater(grid, H0, f0=F0, drag=1e-5))
    dt = 30.0 if theta == 0 else 600.0  # explicit: below the gravity-wave CFL

    def cost(g, solver, fast):
        stepper = dphys.Theta(theta, solver=solver, allow_unstable=theta < 0.5)
        model = ShallowWater(grid, H0, g=g, f0=F0, drag=1e-5)
        traj = dphys.simulate(
            model,
            stepper,
            state0,
            dt=dt,
            n_steps=24,
            saveat=dphys.SaveAt(every=8),
            fast_forward=fast,
        )
        return traj, jnp.sum(traj.ys.eta[:, 3:9, 2:7] ** 2)

    krylov = dphys.Krylov(method="gmres", rtol=1e-13, max_steps=2000)
    fast, _ = cost(G, dphys.FFT(), None)
    slow, _ = cost(G, krylov, False)
    assert bool(fast.stats["fast_forward"]) and not bool(slow.stats["fast_forward"])
    scale = float(jnp.max(jnp.abs(slow.ys.eta)))
    for a, b in zip(jax.tree.leaves(fast.ys), jax.tree.leaves(slow.ys), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-10 * scale)
    g_fast = jax.grad(lambda g: cost(g, dphys.FFT(), None)[1])(jnp.asarray(G))
    g_slow = jax.grad(lambda g: cost(g, krylov, False)[1])(jnp.asarray(G))
    np.testing.assert_allclose(g_fast, g_slow, rtol=1e-9)


@pytest.mark.parametrize("n", [2, 3])
def test_per_mode_inverse_derivatives_match_dense_inverse(n, getkey):
    # The per-mode inverse has a hand-written JVP; its first and second derivatives
    # must equal those of jnp.linalg.inv on the same matrices.
    from dphys._solver._fft import _mode_inv

    shape = (n, n, 4, 3)
    a = jax.random.normal(getkey(), shape) + 1j * jax.random.normal(getkey(), shape)
    a = a + 3 * jnp.eye(n).reshape(n, n, 1, 1)
    da = jax.random.normal(getkey(), shape) + 0j
    dense = lambda a: jnp.moveaxis(
        jnp.moveaxis(
            jnp.linalg.inv(jnp.moveaxis(jnp.moveaxis(a, 0, -1), 0, -1)), -1, 0
        ),
        -1,
        0,
    )
    np.testing.assert_allclose(_mode_inv(a), dense(a), rtol=1e-13, atol=1e-14)
    t_ours = jax.jvp(_mode_inv, (a,), (da,))[1]
    t_dense = jax.jvp(dense, (a,), (da,))[1]
    np.testing.assert_allclose(t_ours, t_dense, rtol=1e-12, atol=1e-13)
    w = jax.random.normal(getkey(), shape)
    f_ours = lambda a: jnp.sum(w * jnp.real(_mode_inv(a)))
    f_dense = lambda a: jnp.sum(w * jnp.real(dense(a)))
    hv = lambda f: jax.jvp(jax.grad(f), (a,), (da,))[1]
    np.testing.assert_allclose(
        jax.grad(f_ours)(a), jax.grad(f_dense)(a), rtol=1e-12, atol=1e-13
    )
    np.testing.assert_allclose(hv(f_ours), hv(f_dense), rtol=1e-11, atol=1e-12)


# ----------------------------------------------------------------------- bad input


def test_bad_depth_rejected():
    grid = dphys.Grid((8, 8), lengths=80e3, boundary="periodic")
    with pytest.raises(ValueError, match="`depth` must be positive.*got min 0"):
        ShallowWater(grid, 0.0)
    with pytest.raises(ValueError, match="`depth` must be positive.*-5"):
        ShallowWater(grid, jnp.full((8, 8), 100.0).at[2, 3].set(-5.0))
    with pytest.raises(ValueError, match=r"`depth` must be a scalar or an array"):
        ShallowWater(grid, jnp.ones((8, 9)))
    with pytest.raises(ValueError, match="`g` must be positive"):
        ShallowWater(grid, 10.0, g=-1.0)


def test_initial_total_depth_must_be_positive():
    grid = dphys.Grid((8, 8), lengths=80e3, boundary="periodic")
    model = ShallowWater(grid, 10.0, nonlinear=True)
    state0 = model.rest_state(jnp.zeros((8, 8)).at[1, 2].set(-10.0))
    with pytest.raises(ValueError, match=r"`state0.eta`.*total depth.*index \(1, 2\)"):
        dphys.simulate(model, dphys.IMEX(), state0, dt=1.0, n_steps=1)


def test_depth_going_negative_reported_with_step_index():
    # Linear 1D basin, 20 m deep, under a strong constant wind: the set-down at the
    # upwind wall deepens until the bed falls dry.
    grid = dphys.Grid(50, lengths=100e3, boundary="neumann")
    model = ShallowWater(grid, 20.0, wind=(2.0, 0.0))
    state0 = model.rest_state()
    stepper = dphys.CrankNicolson(solver=HelmholtzKrylov())
    traj = dphys.simulate(
        model,
        stepper,
        state0,
        dt=60.0,
        n_steps=200,
        saveat=dphys.SaveAt(every=1),
        throw=False,
    )
    depth_min = np.asarray(jnp.min(traj.ys.eta, axis=1)) + 20.0
    first_dry = int(np.argmax(depth_min <= 0)) + 1  # saves start at step 1
    assert depth_min.min() <= 0 and first_dry > 1
    assert int(traj.stats["first_failed_step"]) == first_dry
    assert traj.result == dphys.RESULTS.invalid_state
    with pytest.raises(
        dphys.SimulationError,
        match=rf"failed at step {first_dry} of 200.*`depth \+ eta` became zero or ne",
    ):
        dphys.simulate(
            model, stepper, state0, dt=60.0, n_steps=200, saveat=dphys.SaveAt(every=1)
        )


def test_explicit_part_above_stability_limit_is_an_error():
    grid = dphys.Grid(100, lengths=1000.0, boundary="neumann")
    model = ShallowWater(grid, 1.0, nonlinear=True)
    (x,) = grid.coords
    state0 = model.rest_state(jnp.where(x < 500.0, 1.0, 0.0))
    # sqrt(g * 1 m) = 3.13 m/s over dx = 10 m: dt = 4 s gives Courant 1.25.
    with pytest.raises(
        ValueError, match=r"explicit Courant number 1\.25 > max_courant=0\.5"
    ):
        dphys.simulate(model, dphys.IMEX(), state0, dt=4.0, n_steps=1)
    # The implicit (gravity-wave) part alone is not limited: the linear model runs.
    linear = ShallowWater(grid, 1.0)
    dphys.simulate(
        linear,
        dphys.CrankNicolson(solver=HelmholtzKrylov()),
        state0,
        dt=40.0,
        n_steps=2,
    )
    quad = ShallowWater(grid, 1.0, quadratic_drag=1.0)
    moving = SWState(state0.eta, jnp.ones(100).at[-1].set(0.0), jnp.zeros(100))
    with pytest.raises(
        ValueError, match=r"quadratic drag above its stability limit.*= 4 > 1"
    ):
        dphys.simulate(
            quad,
            dphys.CrankNicolson(solver=HelmholtzKrylov()),
            moving,
            dt=4.0,
            n_steps=1,
        )


def test_inconsistent_field_shapes_on_the_c_grid():
    grid = dphys.Grid((8, 10), lengths=(80e3, 100e3), boundary="neumann")
    model = ShallowWater(grid, 100.0)
    good = model.rest_state()
    # The classic C-grid layout with an extra face column is not this model's.
    bad = SWState(good.eta, jnp.zeros((8, 11)), good.v)
    with pytest.raises(ValueError, match=re.escape("`state0.u` has shape (8, 11)")):
        dphys.simulate(
            model, dphys.CrankNicolson(solver=HelmholtzKrylov()), bad, dt=1.0, n_steps=1
        )
    bad = SWState(good.eta, good.u, jnp.zeros((9, 10)))
    with pytest.raises(ValueError, match=re.escape("`state0.v` has shape (9, 10)")):
        dphys.simulate(
            model, dphys.CrankNicolson(solver=HelmholtzKrylov()), bad, dt=1.0, n_steps=1
        )
    wall = SWState(good.eta, good.u.at[:, -1].set(0.1), good.v)
    with pytest.raises(ValueError, match=r"`state0.u` is non-zero on wall faces"):
        dphys.simulate(
            model,
            dphys.CrankNicolson(solver=HelmholtzKrylov()),
            wall,
            dt=1.0,
            n_steps=1,
        )
    with pytest.raises(TypeError, match="`state0` must be a pdes.SWState"):
        dphys.simulate(
            model,
            dphys.CrankNicolson(solver=HelmholtzKrylov()),
            (good.eta, good.u, good.v),
            dt=1.0,
            n_steps=1,
        )


def test_bad_configuration_rejected():
    with pytest.raises(
        ValueError, match="`grid.boundary` must be 'periodic' or 'neumann'"
    ):
        ShallowWater(dphys.Grid(8, boundary="dirichlet"), 1.0)
    with pytest.raises(ValueError, match="`beta` needs a 2D grid"):
        ShallowWater(dphys.Grid(8, boundary="neumann"), 1.0, beta=1e-11)
    with pytest.raises(ValueError, match="`beta` needs walls in y"):
        ShallowWater(dphys.Grid((8, 8), boundary="periodic"), 1.0, beta=1e-11)
    with pytest.raises(ValueError, match="`continuity` must be one of"):
        ShallowWater(dphys.Grid(8), 1.0, continuity="central-ish")
    with pytest.raises(ValueError, match="`momentum` must be one of"):
        ShallowWater(dphys.Grid(8), 1.0, momentum="flux")
    with pytest.raises(ValueError, match="`wind` must be a pair"):
        ShallowWater(dphys.Grid(8), 1.0, wind=1.0)
    grid = dphys.Grid((8, 8), lengths=80e3, boundary="neumann")
    model = ShallowWater(grid, 100.0)
    with pytest.raises(
        ValueError, match="`solver=FFT\\(\\)` needs a fully periodic grid"
    ):
        dphys.simulate(
            model,
            dphys.CrankNicolson(solver=dphys.FFT()),
            model.rest_state(),
            dt=1.0,
            n_steps=1,
        )
    heat = pdes.Heat(grid, 1.0)
    with pytest.raises(
        ValueError, match="`HelmholtzKrylov\\(\\)` solves pdes.ShallowWater"
    ):
        dphys.simulate(
            heat,
            dphys.CrankNicolson(solver=HelmholtzKrylov()),
            jnp.zeros((8, 8)),
            dt=1.0,
            n_steps=1,
        )
