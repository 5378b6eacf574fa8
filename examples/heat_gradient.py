# %% [markdown]
# # Heat on a plate with a variable diffusivity, and the gradient of a sensor misfit
#
# An insulated square plate (zero-flux Neumann walls) carries a hot spot. Its
# diffusivity $\kappa(x, y)$ varies in space: a conductive stripe runs across the
# plate. The temperature obeys
#
# $$ u_t = \nabla\cdot(\kappa\nabla u), \qquad \kappa\,\partial_n u = 0
#    \text{ on the walls}, $$
#
# discretised with the conservative 5-point finite-volume operator and stepped with
# Crank-Nicolson. `dphys.Auto` sees a 2D non-periodic grid with a symmetric
# operator and would solve each implicit step with conjugate gradients to a relative
# residual of 1e-10; we ask `dphys.Krylov` for 1e-13, because the Taylor test at the
# end resolves the misfit to about 1e-12.
#
# We then
#
# 1. check that the total heat $\sum_i u_i\,\Delta V$ is conserved, as it must be
#    on an insulated plate;
# 2. take six sensors that record the temperature every 0.1 time units, and compute
#    the gradient of the misfit
#    $J(\kappa) = \tfrac12\sum_{k,s}(u_s(t_k;\kappa) - y_{k,s})^2$
#    with respect to the whole diffusivity *field* (1024 numbers) with one
#    `jax.grad`: one forward run and one adjoint run, with two-level checkpointing
#    and one transposed CG solve per step;
# 3. verify that gradient with a Taylor test, in three lines.

# %%
import os
import pathlib
import time

import jax
import jax.numpy as jnp
import matplotlib
import matplotlib.colors
import matplotlib.pyplot as plt
import matplotlib.ticker
import numpy as np

import dphys
import dphys.testing
import pdes


jax.config.update("jax_enable_x64", True)  # float64, before creating any array
matplotlib.use("Agg")  # write files, no window

OUT = pathlib.Path(os.environ.get("DPHYS_EXAMPLE_OUT", os.getcwd()))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The plate, its diffusivity and the initial hot spot

# %%
grid = dphys.Grid((32, 32), lengths=1.0, boundary="neumann")
y, x = grid.coords  # array order: the last axis is x


def stripe(centre, width=0.08, base=1e-2, boost=4.0):
    """A smooth conductive stripe along y at x = centre."""
    return base * (1.0 + boost * jnp.exp(-(((x - centre) / width) ** 2)))


kappa = stripe(0.55)
u0 = jnp.exp(-((x - 0.3) ** 2 + (y - 0.5) ** 2) / 0.01)

stepper = dphys.CrankNicolson(solver=dphys.Krylov(rtol=1e-13))
dt, n_steps = 0.02, 100  # t in [0, 2]

# %% [markdown]
# ## Run, and check that heat is conserved

# %%
start = time.perf_counter()
traj = dphys.simulate(
    pdes.Heat(grid, kappa),
    stepper,
    u0,
    dt=dt,
    n_steps=n_steps,
    saveat=dphys.SaveAt(t0=True, every=25),
)
print(
    f"forward run: {time.perf_counter() - start:.1f} s (compilation included), "
    f"{int(traj.stats['linear_iterations'])} CG iterations in {n_steps} steps"
)

heat = grid.integrate(traj.ys)  # total heat at each saved time
drift = float(jnp.max(jnp.abs(heat - heat[0])) / heat[0])
print(f"total heat {float(heat[0]):.6f}; largest relative drift {drift:.1e}")
assert drift < 1e-9  # CG stops at rtol 1e-10 per step

# %% [markdown]
# ## Sensors and a misfit
#
# The "observations" come from the same model with the stripe shifted to
# $x = 0.6$, so the misfit at our $\kappa$ is not zero. The gradient map shows where
# a change of diffusivity would move the sensor readings most: between the hot spot
# and the sensors it reaches first.

# %%
sensors = (np.array([8, 16, 24, 8, 16, 24]), np.array([12, 12, 12, 22, 22, 22]))
every = 5  # a sensor reading every 5 steps = 0.1 time units


def observe(t, u):
    return u[sensors]


def sensor_series(kappa):
    traj = dphys.simulate(
        pdes.Heat(grid, kappa),
        stepper,
        u0,
        dt=dt,
        n_steps=n_steps,
        saveat=dphys.SaveAt(every=every, fn=observe),
    )
    return traj.ys  # (20 times, 6 sensors)


obs = sensor_series(stripe(0.6))


@jax.jit
def misfit(kappa):
    return 0.5 * jnp.sum((sensor_series(kappa) - obs) ** 2)


start = time.perf_counter()
value, grad = jax.jit(jax.value_and_grad(misfit))(kappa)
print(
    f"J = {float(value):.4e}; gradient of J w.r.t. the kappa field in "
    f"{time.perf_counter() - start:.1f} s (compilation included)"
)

# %% [markdown]
# ## Verify the gradient: a Taylor test in three lines
#
# With a correct gradient the remainder $|J(\kappa+\epsilon h) - J(\kappa) -
# \epsilon\langle\nabla J, h\rangle|$ falls like $\epsilon^2$ (rate 2); a wrong one
# leaves a rate of 1.

# %%
result = dphys.testing.taylor_test(misfit, kappa, grad=grad)
print(result)
assert result.passed

# %% [markdown]
# ## Plot

# %%
fig, axes = plt.subplots(2, 3, figsize=(11, 7), constrained_layout=True)
extent = (0, 1, 0, 1)
for ax, k in zip(axes[0], (0, 2, 4), strict=True):
    im = ax.imshow(traj.ys[k], origin="lower", extent=extent, cmap="inferno")
    ax.set_title(f"u at t = {float(traj.ts[k]):.1f}")
    fig.colorbar(im, ax=ax, shrink=0.8)
im = axes[1, 0].imshow(kappa, origin="lower", extent=extent, cmap="viridis")
axes[1, 0].set_title(r"diffusivity $\kappa$")
fig.colorbar(im, ax=axes[1, 0], shrink=0.8)
xs, ys_ = grid.axis_coords(1)[sensors[1]], grid.axis_coords(0)[sensors[0]]
axes[1, 0].plot(xs, ys_, "w^", ms=7, label="sensors")
axes[1, 0].legend(loc="lower left", fontsize=8)
lim = float(jnp.max(jnp.abs(grad)))
norm = matplotlib.colors.SymLogNorm(linthresh=1e-3 * lim, vmin=-lim, vmax=lim)
im = axes[1, 1].imshow(grad, origin="lower", extent=extent, cmap="RdBu_r", norm=norm)
axes[1, 1].plot(xs, ys_, "k^", ms=7)
axes[1, 1].set_title(r"$\partial J / \partial \kappa$ (symmetric log scale)")
fig.colorbar(im, ax=axes[1, 1], shrink=0.8)
axes[1, 2].loglog(
    result.eps, result.remainder0, "o-", label=r"$|J(\kappa+\epsilon h)-J|$"
)
axes[1, 2].loglog(result.eps, result.remainder1, "s-", label="minus first-order term")
axes[1, 2].loglog(
    result.eps,
    result.remainder1[0] * (result.eps / result.eps[0]) ** 2,
    "k--",
    label=r"$\epsilon^2$",
)
axes[1, 2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
axes[1, 2].set_xlabel(r"$\epsilon$")
axes[1, 2].set_title(f"Taylor test: rate {result.rate1:.2f}")
axes[1, 2].legend(fontsize=8)
path = OUT / "heat_gradient.png"
fig.savefig(path, dpi=110)
print(f"wrote {path}")
