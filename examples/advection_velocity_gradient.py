# %% [markdown]
# # Gradient of a sensor misfit with respect to a velocity field
#
# A tracer $u$ is carried by an unknown, steady, divergence-free flow on the periodic
# unit square and diffuses slowly:
#
# $$ u_t + \nabla\cdot(\mathbf v u) = \nabla\cdot(\kappa\nabla u). $$
#
# 64 sensors on an $8\times 8$ lattice record $u$ every 10 steps. We
#
# 1. run the "true" flow with `pdes.Advection` (Crank-Nicolson, centered fluxes,
#    a velocity *field*, so each implicit step is a GMRES solve) and check that the
#    tracer mass is conserved to round-off;
# 2. take the gradient of the sensor misfit
#    $J(\mathbf v) = \tfrac12\sum_k \|H u(t_k; \mathbf v) - y_k\|^2$ with respect to
#    every face velocity at a first guess (a uniform drift), by `jax.grad` through
#    `dphys.simulate` (one transposed GMRES solve per step);
# 3. verify that gradient with `dphys.testing.taylor_test` (remainder rate 2), and
#    see a 0.1 % wrong gradient fail it.
#
# The velocity is given on the cell faces from a stream function at the cell
# corners, so it is *discretely* divergence-free: a constant tracer stays constant.

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
# ## Grid, flow and initial tracer

# %%
n = 32
grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
dy, dx = grid.spacing
y, x = grid.coords
kappa = 1e-3
dt, n_steps, obs_every = 0.02, 60, 10


def face_velocity_from_stream_function(amplitude, drift):
    """(v_y, v_x) on the faces from psi at the corners, plus a uniform drift.

    Corner (i, j) is the lower-left corner of cell (i, j); entry (i, j) of v_x is on
    the left face of cell (i, j), entry (i, j) of v_y on its lower face.
    """
    iy, ix = np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij")
    psi = np.sin(2 * np.pi * ix / n) * np.sin(2 * np.pi * iy / n) / (2 * np.pi)
    psi = amplitude * jnp.asarray(psi)
    vx = -(psi[1:, :-1] - psi[:-1, :-1]) / dy + drift[1]
    vy = (psi[:-1, 1:] - psi[:-1, :-1]) / dx + drift[0]
    return vy, vx


true_velocity = face_velocity_from_stream_function(0.5, (0.3, 0.6))
guess_velocity = face_velocity_from_stream_function(0.0, (0.3, 0.6))
u0 = 1.0 + jnp.exp(-((x - 0.35) ** 2 + (y - 0.4) ** 2) / 0.02)

stepper = dphys.CrankNicolson(solver=dphys.Krylov(rtol=1e-12, atol=1e-14))


def model_for(velocity):
    return pdes.Advection(grid, velocity, kappa=kappa, velocity_at_faces=True)


sensors = (slice(2, None, 4), slice(2, None, 4))  # an 8 x 8 lattice
observe = lambda t, u: u[sensors]
saveat = dphys.SaveAt(every=obs_every, fn=observe)

# %% [markdown]
# ## The true run: observations and mass conservation

# %%
truth = dphys.simulate(
    model_for(true_velocity), stepper, u0, dt=dt, n_steps=n_steps, saveat=saveat
)
obs = truth.ys
ones = jnp.ones(grid.shape)
free_stream = float(jnp.max(jnp.abs(model_for(true_velocity).linear(0.0, ones))))
mass0, mass1 = float(grid.integrate(u0)), float(grid.integrate(truth.final))
mass_error = abs(mass1 - mass0) / mass0
max_courant = max(float(jnp.max(jnp.abs(v))) for v in true_velocity) * dt / dx
print(
    f"max Courant number {max_courant:.2f}; GMRES iterations "
    f"{int(truth.stats['linear_iterations'])} over {n_steps} steps"
)
print(f"relative mass change over the run: {mass_error:.2e}")
print(f"max |L 1| (discrete divergence of the flow): {free_stream:.2e}")
assert mass_error < 1e-12
assert free_stream < 1e-10

# %% [markdown]
# ## Misfit and its gradient with respect to the velocity field


# %%
@jax.jit
def misfit(velocity):
    traj = dphys.simulate(
        model_for(velocity), stepper, u0, dt=dt, n_steps=n_steps, saveat=saveat
    )
    return 0.5 * jnp.sum((traj.ys - obs) ** 2)


value, grad = jax.jit(jax.value_and_grad(misfit))(guess_velocity)
print(
    f"misfit at the first guess {float(value):.4e}, at the truth "
    f"{float(misfit(true_velocity)):.1e}"
)

# %% [markdown]
# ## Verify the gradient: Taylor remainder test and a negative control

# %%
result = dtest.taylor_test(misfit, guess_velocity, grad=grad)
print(result)
wrong = jax.tree_util.tree_map(lambda g: g * (1 + 1e-3), grad)
control = dtest.taylor_test(misfit, guess_velocity, grad=wrong, direction=grad)
print(
    f"negative control (gradient x 1.001): rate {control.rate:.2f}, "
    f"passed={control.passed}"
)
assert result.passed and result.rate > 1.9
assert not control.passed

# %% [markdown]
# ## Plot

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 4), constrained_layout=True)
extent = (0, 1, 0, 1)
im = axes[0].imshow(u0, origin="lower", extent=extent, cmap="viridis")
axes[0].set_title("initial tracer $u_0$")
fig.colorbar(im, ax=axes[0])
im = axes[1].imshow(truth.final, origin="lower", extent=extent, cmap="viridis")
sy, sx = y[sensors], x[sensors]
axes[1].plot(sx.ravel(), sy.ravel(), "w.", ms=4)
axes[1].set_title(f"true run at t = {n_steps * dt:g} (dots: sensors)")
fig.colorbar(im, ax=axes[1])
# Gradient at the cell centres (mean of the two faces) as arrows.
gy = 0.5 * (grad[0] + jnp.roll(grad[0], -1, axis=0))
gx = 0.5 * (grad[1] + jnp.roll(grad[1], -1, axis=1))
mag = jnp.hypot(gx, gy)
im = axes[2].imshow(mag, origin="lower", extent=extent, cmap="magma")
step = 2
axes[2].quiver(
    x[::step, ::step],
    y[::step, ::step],
    -gx[::step, ::step],
    -gy[::step, ::step],
    color="w",
)
axes[2].set_title(r"$-\partial J/\partial \mathbf{v}$ at the first guess")
fig.colorbar(im, ax=axes[2])
for ax in axes:
    ax.set_xlabel("x")
    ax.set_ylabel("y")
path = OUT / "advection_velocity_gradient.png"
fig.savefig(path, dpi=90)
print(f"wrote {path}")
