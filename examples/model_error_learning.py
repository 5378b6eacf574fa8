# %% [markdown]
# # Learning a model-error correction and a diffusivity from sparse sensors
#
# The truth is advection-diffusion on a periodic square **plus two terms the
# model lacks**, a cubic damping $-\gamma u^3$ and a fixed smooth source $s(x)$;
# the physics model also has the wrong diffusivity ($1.5\,\kappa_\text{true}$).
# All we have are windows of sparse, noisy sensor records.
#
# We learn, from the sensors alone,
#
# * $\log\kappa$ of the physics model, and
# * a correction: a pointwise network $N_\theta(u)$ plus a band-limited learned
#   forcing $g_\theta(x)$,
#
# in the hybrid model $u_t = L_\kappa u + N_\theta(u) + g_\theta(x)$ stepped by
# Crank-Nicolson with $L_\kappa$ implicit (its FFT solve and transposed-solve
# adjoint) and the learned terms explicit (`dphys.Augmented`).
#
# Every window is first analysed by weak-constraint 4D-Var with the physics model;
# then three protocols train the same hybrid on the same data at the same budget:
# **one-step** (fit the tendency to the analysed model-error forcings, no solver in
# the graph), **stop-gradient rollouts** and **solver in the loop** (rollouts from
# the analyses scored on the sensors, differentiated through the implicit steps,
# with a rollout-length curriculum). We compare forecasts from the test windows'
# analyses against the truth (a twin experiment, so the truth is known) and give
# $\kappa$ a Laplace standard deviation.

# %%
import os
import pathlib

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import assimilation as da  # noqa: E402
import dphys  # noqa: E402
import pdes  # noqa: E402
from assimilation.learn import (  # noqa: E402
    FourierField,
    LocalTendency,
    analyse_windows,
    forecast_rmse,
    laplace,
    make_windows,
    rollout_misfit,
    stability,
    train_correction,
)


OUT = pathlib.Path(os.environ.get("DPHYS_EXAMPLE_OUT", os.getcwd()))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## Truth, physics model, sensors

# %%
n, dt, n_steps = 32, 0.01, 20
grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
y, x = grid.coords
kappa_true, gamma = 2e-3, 2.0
source = jnp.sin(2 * jnp.pi * x) * jnp.cos(2 * jnp.pi * y) + 0.5 * jnp.cos(
    2 * jnp.pi * (2 * x - y) + 0.3
)


def cubic(t, u):
    return -gamma * u**3


velocity = (0.5, 1.0)  # (v_y, v_x)
truth = dphys.Augmented(
    pdes.Advection(grid, velocity, kappa=kappa_true), explicit=cubic, forcing=source
)
physics = pdes.Advection(grid, velocity, kappa=1.5 * kappa_true)
stepper = dphys.CrankNicolson()

B = da.Diffusion(grid, 0.1, std=1.0, normalization="constant")
positions = jr.uniform(jr.key(1), (32, 2))
times = dt * 5 * np.arange(1, n_steps // 5 + 1)
obs = da.Observations(times, jnp.zeros((len(times), 32)), positions, 0.05)
cost = da.FourDVar(
    physics,
    stepper,
    jnp.zeros(grid.shape),
    obs,
    da.Control(initial_state=da.InitialState(B)),
    dt=dt,
    n_steps=n_steps,
    throw=False,
)
leads = (10, 20, 40, 80)
train_w = make_windows(cost, B, n_windows=16, key=jr.key(2), truth_model=truth)
test_w = make_windows(
    cost,
    B,
    n_windows=8,
    key=jr.key(3),
    truth_model=truth,
    save_steps=tuple(n_steps + k for k in leads),
)

# %% [markdown]
# ## Weak-constraint analyses (sensors only)
#
# Four sub-windows of 5 steps, each with its own constant forcing $\eta_j$ with a
# smooth prior $Q$: the analysed states start the rollouts, the analysed forcings
# are the one-step protocol's targets (the *reverse diagnostic*).

# %%
Q = da.Diffusion(grid, 0.1, std=1.0, normalization="constant")
train = analyse_windows(cost, train_w.obs, model_error_cov=Q, n_subwindows=4)
test = analyse_windows(cost, test_w.obs, model_error_cov=Q, n_subwindows=4)
start = test.analysis_at(n_steps)
truths = {k: test_w.states_at(n_steps + k) for k in leads}
print(
    "analysis RMSE at the end of the test windows:",
    float(jnp.sqrt(jnp.mean((start - test_w.truth_final) ** 2))),
)

# %% [markdown]
# ## The hybrid and the three protocols


# %%
class Params(eqx.Module):
    log_kappa: jax.Array
    network: LocalTendency
    field: FourierField


def build(p):
    model = eqx.tree_at(lambda m: m.kappa, physics, jnp.exp(p.log_kappa))
    return dphys.Augmented(model, explicit=p.network, forcing=p.field)


init = Params(
    jnp.log(jnp.asarray(physics.kappa)),
    LocalTendency(grid, width=8, depth=1, key=jr.key(4)),
    FourierField(grid, 2),
)
budget = 60
results = {}
for protocol in ("one_step", "stop_gradient", "solver"):
    results[protocol] = train_correction(
        init,
        train,
        cost,
        protocol=protocol,
        n_steps=budget,
        key=jr.key(5),
        build=build,
        physics=physics,
        optimizer=optax.adam(1e-2),
        batch_size=8,
        curriculum=(5, 10, 20),
    )
    print(protocol, f"{results[protocol].stats['train_s']:.0f} s")

# %% [markdown]
# ## Forecasts from the test analyses, stability, and kappa

# %%
t_fc = n_steps * dt
curves = {
    "physics": forecast_rmse(physics, stepper, start, truths, dt=dt, t0=t_fc),
    "truth model": forecast_rmse(truth, stepper, start, truths, dt=dt, t0=t_fc),
}
for name, res in results.items():
    curves[name] = forecast_rmse(res.model, stepper, start, truths, dt=dt, t0=t_fc)
    stab = stability(res.model, stepper, start, dt=dt, n_steps=10 * n_steps)
    print(f"{name}: stable to 10x the window: {stab.stable} (growth {stab.growth:.2f})")
for name, c in curves.items():
    print(f"{name:>14}: " + ", ".join(f"lead {k}: {v:.3f}" for k, v in c.items()))

solver = results["solver"]
_, std = laplace(
    lambda p, ex: rollout_misfit(build(p), cost, ex, horizon=n_steps)[0],
    solver.params,
    train[:8],
    prior_precision=1e-6,
    scale_by_residual=True,
)
kappa = float(jnp.exp(solver.params.log_kappa))
print(
    f"kappa = {kappa:.2e} +- {kappa * float(std.log_kappa):.1e} "
    f"(truth {kappa_true:.1e}, physics model {1.5 * kappa_true:.1e})"
)

fig, ax = plt.subplots(figsize=(6, 4))
for name, c in curves.items():
    ax.plot(list(c), list(c.values()), marker="o", label=name)
ax.set_xlabel("lead time (steps after the window)")
ax.set_ylabel("forecast RMSE vs truth")
ax.set_yscale("log")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "model_error_forecast_rmse.png", dpi=120)
