# %% [markdown]
# # Shallow water: gradient of a sensor misfit with respect to bottom drag and gravity
#
# A 1 m mound of water collapses in a closed, rotating basin (f-plane, 320 km square)
# over a ridge. We solve the nonlinear rotating shallow-water equations with
# `pdes.ShallowWater`:
#
# $$ \eta_t + \nabla\cdot(h\mathbf u) = 0,\qquad
#    \mathbf u_t + (f+\zeta)\hat{\mathbf z}\times\mathbf u + \nabla\big(g\eta +
#    \tfrac12|\mathbf u|^2\big) = -C_d\frac{|\mathbf u|\mathbf u}{h}, $$
#
# on a C-grid (energy-conserving vector-invariant form, centred fluxes), with the
# gravity waves, Coriolis force and linear terms implicit (Crank-Nicolson) and the
# rest explicit (Adams-Bashforth 2): `dphys.IMEX` with the `pdes.HelmholtzKrylov`
# solver. The gravity-wave Courant number is about 5, far above an explicit limit.
#
# 16 tide gauges record $\eta$ every 10 steps. We
#
# 1. run the "true" basin, check that mass is conserved to round-off and that the
#    drag only ever removes energy;
# 2. take the gradient of the misfit $J(C_d, g) = \tfrac12\sum_k\|H\eta(t_k) -
#    y_k\|^2$ with respect to the quadratic drag coefficient $C_d$ and gravity $g$ by
#    `jax.grad` through `dphys.simulate` (one transposed GMRES solve per step);
# 3. verify it with `dphys.testing.taylor_test` (remainder rate 2) and see a
#    gradient that is 0.1 % wrong fail the same test.

# %%
import os
import pathlib

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import dphys
import dphys.testing as dtest
import pdes


jax.config.update("jax_enable_x64", True)  # gradient checks need float64
plt.switch_backend("Agg")  # files only, no display

OUT = pathlib.Path(os.environ.get("DPHYS_EXAMPLE_OUT", os.getcwd()))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Basin, bathymetry and initial mound

# %%
n, length = 32, 320e3  # 10 km cells
grid = dphys.Grid((n, n), lengths=length, boundary="neumann")  # walls all round
y, x = grid.coords
depth = 100.0 * (1.0 - 0.5 * jnp.exp(-(((x - 0.6 * length) / 40e3) ** 2)))  # a ridge
f0 = 1e-4
dt, n_steps, obs_every = 600.0, 60, 10
cd_true, g_true = 2.5e-3, 9.81


def basin(params):
    return pdes.ShallowWater(
        grid,
        depth,
        g=params["g"],
        f0=f0,
        quadratic_drag=params["cd"],
        nonlinear=True,
        momentum="vector_invariant",
        continuity="centered",
    )


eta0 = 1.0 * jnp.exp(-((x - 0.3 * length) ** 2 + (y - 0.5 * length) ** 2) / 30e3**2)
state0 = basin({"cd": cd_true, "g": g_true}).rest_state(eta0)
stepper = dphys.IMEX(solver=pdes.HelmholtzKrylov(rtol=1e-12, atol=1e-14))
gauges = (slice(4, None, 8), slice(4, None, 8))  # a 4 x 4 lattice
truth_model = basin({"cd": cd_true, "g": g_true})


def record(t, state):
    """What is saved every `obs_every` steps: the gauges, plus two diagnostics."""
    return {
        "gauges": state.eta[gauges],
        "mass": truth_model.mass(state),
        "energy": truth_model.energy(state),
    }


# One save rule for the true run and the misfit: both reuse one compiled loop.
saveat = dphys.SaveAt(t0=True, every=obs_every, fn=record)

# %% [markdown]
# ## The true run: observations, mass and energy

# %%
explicit_cfl, gravity_cfl = truth_model.courant_numbers(state0, dt)
print(f"Courant numbers: explicit {explicit_cfl:.2f}, gravity waves {gravity_cfl:.2f}")
truth = dphys.simulate(
    truth_model, stepper, state0, dt=dt, n_steps=n_steps, saveat=saveat
)
obs = truth.ys["gauges"][1:]
mass, energy = np.asarray(truth.ys["mass"]), np.asarray(truth.ys["energy"])
mass_error = np.max(np.abs(mass - mass[0])) / float(grid.integrate(jnp.abs(eta0)))
print(
    f"Krylov steps per time step: {int(truth.stats['linear_iterations']) / n_steps:.1f}"
)
print(f"max relative mass change: {mass_error:.1e}")
print(f"energy / initial energy at the saves: {np.round(energy / energy[0], 4)}")
assert mass_error < 1e-13
assert np.all(np.diff(energy) < 0)  # drag only removes energy

# %% [markdown]
# ## Misfit and its gradient with respect to (C_d, g)


# %%
def misfit(params):
    traj = dphys.simulate(
        basin(params), stepper, state0, dt=dt, n_steps=n_steps, saveat=saveat
    )
    return 0.5 * jnp.sum((traj.ys["gauges"][1:] - obs) ** 2)


guess = {"cd": jnp.asarray(1.0e-3), "g": jnp.asarray(9.6)}
value, grad = jax.value_and_grad(misfit)(guess)
at_truth = misfit({"cd": jnp.asarray(cd_true), "g": jnp.asarray(g_true)})
print(f"misfit at the guess {float(value):.4e}; at the truth {float(at_truth):.1e}")
print(f"dJ/dC_d = {float(grad['cd']):.4e}, dJ/dg = {float(grad['g']):.4e}")

# %% [markdown]
# ## Verify the gradient: Taylor remainder test and a negative control

# %%
result = dtest.taylor_test(misfit, guess, grad=grad)
print(result)
wrong = jax.tree_util.tree_map(lambda g: g * (1 + 1e-3), grad)
control = dtest.taylor_test(misfit, guess, grad=wrong)
print(
    f"negative control (gradient x 1.001): rate {control.rate:.2f}, "
    f"passed={control.passed}"
)
assert result.passed and result.rate > 1.9
assert not control.passed

# %% [markdown]
# ## The misfit along C_d and its tangent from the gradient

# %%
cds = np.linspace(0.5e-3, 4e-3, 8)
values = [float(misfit({"cd": jnp.asarray(c), "g": guess["g"]})) for c in cds]
tangent = float(value) + float(grad["cd"]) * (cds - float(guess["cd"]))

fig, axes = plt.subplots(1, 3, figsize=(14, 4), constrained_layout=True)
km = 1e-3
extent = (0, length * km, 0, length * km)
im = axes[0].imshow(depth, origin="lower", extent=extent, cmap="Blues")
axes[0].plot(x[gauges].ravel() * km, y[gauges].ravel() * km, "r^", ms=5)
axes[0].set_title("depth H [m] and gauges")
fig.colorbar(im, ax=axes[0])
final = truth.final
im = axes[1].imshow(final.eta, origin="lower", extent=extent, cmap="RdBu_r")
uc = 0.5 * (final.u + jnp.roll(final.u, 1, axis=1))  # to cell centres
vc = 0.5 * (final.v + jnp.roll(final.v, 1, axis=0))
s = 2
axes[1].quiver(x[::s, ::s] * km, y[::s, ::s] * km, uc[::s, ::s], vc[::s, ::s])
axes[1].set_title(f"true eta [m] and velocity at t = {n_steps * dt / 3600:g} h")
fig.colorbar(im, ax=axes[1])
axes[2].plot(cds * 1e3, values, "o-", label="misfit J(C_d)")
axes[2].plot(cds * 1e3, tangent, "--", label="tangent from jax.grad")
axes[2].axvline(cd_true * 1e3, color="k", lw=0.8, label="true C_d")
axes[2].set_xlabel("C_d x 1000")
axes[2].legend()
for ax in axes[:2]:
    ax.set_xlabel("x [km]")
    ax.set_ylabel("y [km]")
path = OUT / "shallow_water_gradient.png"
fig.savefig(path, dpi=90)
print(f"wrote {path}")
