# %% [markdown]
# # Unrolled assimilation: learning a few good 4D-Var iterations
#
# A classical 4D-Var analysis minimises
#
# $$ J(v) = \tfrac12\|v\|^2 + \tfrac12\sum_k\|R^{-1/2}(H x(t_k; v) - y_k)\|^2,
#    \qquad x_0 = x_b + B^{1/2} v, $$
#
# with tens to hundreds of model runs (Gauss-Newton: two per conjugate-gradient
# iteration). An *unrolled* assimilator runs only $K$ iterations on the same cost,
#
# $$ y_k = v_k + \beta_k (v_k - v_{k-1}), \qquad
#    v_{k+1} = y_k - \alpha_k\nabla J(y_k), $$
#
# each gradient from one forward and one adjoint run of the model, but with the step
# sizes $\alpha_k$ and momenta $\beta_k$ of every iteration *learned* from many
# assimilation windows. Training differentiates through the $K$ iterations, i.e.
# through the model's adjoint (second order).
#
# Here: 2D advection-diffusion on a periodic 32x32 grid, 32 sensors observed every
# 5 steps of a 30-step window, twin windows with truths drawn from the background
# covariance $B$. We train supervised (against the true initial states) and
# self-supervised (predicting held-out sensors, no truth), and compare with
# gradient descent at its best fixed step and with converged Gauss-Newton.

# %%
import os
import pathlib
import time

import jax


jax.config.update("jax_enable_x64", True)

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import matplotlib
import numpy as np
import optax


matplotlib.use("Agg")
import matplotlib.pyplot as plt

import assimilation as da
import dphys
import pdes
from assimilation import learn


OUT = pathlib.Path(os.environ.get("DPHYS_EXAMPLE_OUT", os.getcwd()))
OUT.mkdir(parents=True, exist_ok=True)
T0 = time.perf_counter()

# %% [markdown]
# ## The problem and the windows
#
# One template cost holds the model, the sensors, the observation times and $B$;
# `learn.make_windows` draws the truths and noisy records, and `learn.with_obs`
# swaps a window's records into the template (jit- and vmap-safe).

# %%
n = 32
grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
model = pdes.Advection(grid, velocity=(0.5, 1.0), kappa=2e-3)
B = da.Diffusion(grid, 0.1, std=1.0, normalization="constant")
dt, n_steps = 0.01, 30
times = dt * np.arange(5, n_steps + 1, 5)
positions = jr.uniform(jr.key(0), (32, 2))
obs = da.Observations(times, jnp.zeros((len(times), 32)), positions, 0.05)
template = da.FourDVar(
    model,
    dphys.CrankNicolson(),
    jnp.zeros(grid.shape),
    obs,
    da.Control(initial_state=da.InitialState(B)),
    dt=dt,
    n_steps=n_steps,
)
train = learn.make_windows(template, B, n_windows=32, key=jr.key(1))
val = learn.make_windows(template, B, n_windows=8, key=jr.key(2))
test = learn.make_windows(template, B, n_windows=16, key=jr.key(3))


def analyse(assim, data):
    """Analysed initial states of every window of ``data``."""
    run = eqx.filter_jit(jax.vmap(lambda y: assim(learn.with_obs(template, y)).control))
    controls = run(data.obs)
    return jax.vmap(template.initial_state)(controls)


def rmse(assim, data):
    return float(jnp.sqrt(jnp.mean((analyse(assim, data) - data.truth_x0) ** 2)))


# %% [markdown]
# ## The classical references
#
# Converged Gauss-Newton: one outer iteration with CG to convergence (the cost is
# quadratic), here an unrolled Gauss-Newton layer with 150 CG iterations. Gradient
# descent with a fixed step, the step chosen by grid search on the training set. The
# largest eigenvalue of the whitened Hessian $I + J_o^\top J_o$ sets the scale of
# stable steps.

# %%
gn = learn.unrolled_gauss_newton(template, 1, n_cg=150, damping=1e-30)
rmse_gn = rmse(gn, test)
print(f"background RMSE {float(jnp.sqrt(jnp.mean(test.truth_x0**2))):.3f}")
print(f"converged Gauss-Newton RMSE {rmse_gn:.4f} ({2 + 2 * 150} model sweeps)")

cost0 = learn.with_obs(template, train.obs[0])
hess = eqx.filter_jit(lambda c, u: jax.jvp(jax.grad(c), (c.init(),), (u,))[1])
u = {"initial_state": jr.normal(jr.key(4), grid.shape)}
for _ in range(40):  # power iteration (J is quadratic: its Hessian is constant)
    w = hess(cost0, u)
    lam = float(jnp.linalg.norm(w["initial_state"]))
    u = {"initial_state": w["initial_state"] / lam}
print(f"largest Hessian eigenvalue {lam:.4g}")

Ks = (1, 2, 4)
fixed = {}
for K in Ks:
    best = min(
        (rmse(learn.unrolled_gradient(template, K, step_size=a / lam), train), a)
        for a in np.geomspace(0.1, 2.0, 8)
    )
    fixed[K] = rmse(learn.unrolled_gradient(template, K, step_size=best[1] / lam), test)
    print(f"fixed-step GD K={K}: test RMSE {fixed[K]:.4f} (step {best[1]:.2f}/lambda)")

# %% [markdown]
# ## Training the unrolled assimilators
#
# `learn.fit` trains any equinox module with a per-window loss. The supervised loss
# is the mean squared error of the analysed initial state; the self-supervised one
# hides 20 % of the sensors from the cost and scores the analysis on them
# (`learn.HeldOutSensors`), so it needs no truth (also for validation).

# %%
supervised = learn.Supervised()
held_out = learn.HeldOutSensors(0.2, n_splits=2)


def sup_loss(m, ex, key):
    return supervised(m, learn.with_obs(template, ex.obs), truth=ex.truth_x0)


def selfsup_loss(m, ex, key):
    return held_out(m, learn.with_obs(template, ex.obs), key=key)


def train_assimilator(K, loss_fn, seed=0):
    model = learn.unrolled_gradient(template, K, step_size=1.0 / lam, momentum=True)
    res = learn.fit(
        model,
        loss_fn,
        train,
        optimizer=optax.adam(0.05),
        key=jr.key(10 + seed),
        batch_size=8,
        n_epochs=5,
        val_data=val,
        patience=2,
    )
    return res.best_model, res


learned, results = {}, {}
for K in Ks:
    learned[K], results[K] = train_assimilator(K, sup_loss)
    print(
        f"learned K={K}: test RMSE {rmse(learned[K], test):.4f}, trained in "
        f"{results[K].stats['train_s']:.0f} s"
    )
selfsup, _ = train_assimilator(4, selfsup_loss, seed=1)
rmse_selfsup = rmse(selfsup, test)
print(f"self-supervised K=4: test RMSE {rmse_selfsup:.4f}")

# %% [markdown]
# ## RMSE against depth, and the learned schedule
#
# Each iteration costs two model sweeps (forward and adjoint). The learned
# per-iteration steps beat the best fixed step at every depth.

# %%
rmse_learned = {K: rmse(learned[K], test) for K in Ks}
fig, axes = plt.subplots(1, 2, figsize=(10, 4))
ax = axes[0]
ax.plot(Ks, [rmse_learned[K] for K in Ks], "o-", label="learned steps + momentum")
ax.plot(Ks, [fixed[K] for K in Ks], "s--", label="best fixed step")
ax.plot([4], [rmse_selfsup], "^", label="learned, self-supervised")
ax.axhline(rmse_gn, color="k", lw=1, label=f"Gauss-Newton ({2 + 2 * 150} sweeps)")
ax.set_xlabel("iterations K (2 model sweeps each)")
ax.set_ylabel("test RMSE of $x_0$")
ax.legend()
ax = axes[1]
best_K = Ks[-1]
steps = np.exp(np.asarray(learned[best_K].layers.log_step)) * lam
moms = np.asarray(jax.nn.sigmoid(learned[best_K].layers.momentum))
ax.plot(range(1, best_K + 1), steps, "o-", label=r"$\alpha_k\,\lambda_{\max}$")
ax.plot(range(1, best_K + 1), moms, "s-", label=r"momentum $\beta_k$")
ax.set_xlabel("iteration k")
ax.set_title(f"learned schedule, K={best_K}")
ax.legend()
fig.tight_layout()
fig.savefig(OUT / "advection_unrolled_depth.png", dpi=100)

# %% [markdown]
# ## Analyses against the truth
#
# `learn.to_analysis` returns the same `assimilation.Analysis` as
# `assimilation.assimilate` (history, forecasts, observation-minus-analysis, and
# with `uncertainty=True` the Laplace posterior), so the usual plots and netCDF
# output apply.

# %%
window = test[0]
cost = learn.with_obs(template, window.obs)
analysis = learn.to_analysis(learned[best_K], cost)
print(analysis.message)
x_gn = analyse(gn, test[:1])[0]
panels = [
    ("truth", window.truth_x0),
    (f"learned, K={best_K} ({2 * best_K} sweeps)", analysis.initial_state),
    ("Gauss-Newton (302 sweeps)", x_gn),
]
fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
vmax = float(jnp.max(jnp.abs(window.truth_x0)))
for ax, (title, field) in zip(axes, panels, strict=True):
    im = ax.imshow(
        np.asarray(field), origin="lower", cmap="RdBu_r", vmin=-vmax, vmax=vmax
    )
    ax.set_title(title)
pos = np.asarray(template.obs.positions) * n
for ax in axes:
    ax.plot(pos[:, 1], pos[:, 0], "k.", ms=3)
fig.colorbar(im, ax=axes, shrink=0.8)
fig.savefig(OUT / "advection_unrolled_analyses.png", dpi=100)
print(f"done in {time.perf_counter() - T0:.0f} s")
