# %% [markdown]
# # Sparse source identification in an advection-diffusion model
#
# A pollutant is emitted at a constant rate by three point sources on a periodic
# square and carried by a uniform wind while it diffuses,
#
# $$ u_t + \mathbf v\cdot\nabla u = \kappa\Delta u + f(x), \qquad u(0) = 0. $$
#
# Twenty-four sensors record $u$ at ten times. Which cells emit, and how much?
# The map from the source field $f$ to the sensor records is linear: the physics,
# $A = H\circ$ (the implicit solution operator), applied by one run of
# `dphys.simulate` and transposed by one adjoint run.
#
# * **The Gaussian (4D-Var) answer**: a Gaussian prior on $f$ (independent cells,
#   standard deviation $\sigma_b$) and incremental Gauss-Newton
#   (`assimilation.FourDVar` with the source as a controlled field): the
#   minimum-norm, smeared-out field that fits the data.
# * **The sparse answer**: the *same* 4D-Var cost plus a non-smooth prior,
#   $J(v) + \lambda\sum_i v_i + \iota_{v\ge0}$ (sparse, non-negative), minimised by
#   FISTA with backtracking (`assimilation.learn.CompositeCost`, run by the same
#   engine as 4D-Var, `assimilation.minimize`): 4D-Var with an L1 prior is just a
#   cost with a non-smooth term, its history reporting each term.
#
# This is a twin experiment: the truth is known, so both answers can be scored.

# %%
import os
import pathlib

import jax


jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp
import matplotlib
import numpy as np


matplotlib.use("Agg")
import matplotlib.pyplot as plt

import assimilation as da
import assimilation.learn as L
import dphys
import pdes


OUT = pathlib.Path(os.environ.get("DPHYS_EXAMPLE_OUT", os.getcwd()))
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The truth and the observations

# %%
n = 32
grid = dphys.Grid((n, n), lengths=1.0, boundary="periodic")
velocity = (0.0, 0.3)  # (v_y, v_x): a wind blowing along x
kappa = 2e-3
dt, n_steps = 0.05, 40
truth = np.zeros((n, n))
for (i, j), q in zip([(8, 6), (20, 12), (25, 24)], [1.0, 1.5, 0.8], strict=True):
    truth[i, j] = q
truth = jnp.asarray(truth)
model = pdes.Advection(grid, velocity=velocity, kappa=kappa, source=jnp.zeros((n, n)))
stepper = dphys.CrankNicolson()
rng = np.random.default_rng(1)
positions = rng.uniform(0.0, 1.0, (24, 2))
obs_times = dt * np.arange(4, n_steps + 1, 4)
sensors = da.Interpolation(grid, positions)
steps = tuple(range(4, n_steps + 1, 4))


def forward(f):
    run = dphys.simulate(
        pdes.Advection(grid, velocity=velocity, kappa=kappa, source=f),
        stepper,
        jnp.zeros((n, n)),
        dt=dt,
        n_steps=n_steps,
        saveat=dphys.SaveAt(t1=False, steps=steps, fn=lambda t, u: sensors(u)),
    )
    return run.ys


clean = jax.jit(forward)(truth)
sigma = 0.01 * float(jnp.sqrt(jnp.mean(clean**2)))
y = clean + sigma * jnp.asarray(rng.normal(size=clean.shape))
obs = da.Observations(obs_times, y, positions, sigma)

# %% [markdown]
# The operator and its adjoint pass the dot test:
# $\langle Af, y\rangle = \langle f, A^\top y\rangle$ to round-off.

# %%
import dphys.testing  # noqa: E402


A = L.physics_operator(forward, jnp.zeros((n, n)))
dot = dphys.testing.dot_test(
    jax.jit(lambda f: A.mv(f)), jax.jit(lambda r: A.transpose().mv(r)), truth
)
print(dot)

# %% [markdown]
# ## The Gaussian answer: 4D-Var

# %%
sigma_b = 0.2
control = da.Control(
    parameters=[da.Parameter("source", background=jnp.zeros((n, n)), sigma=sigma_b)]
)
cost = da.FourDVar(
    model, stepper, jnp.zeros((n, n)), obs, control, dt=dt, n_steps=n_steps
)
gauss = da.assimilate(cost, da.GaussNewton(max_iterations=3), uncertainty=False)
f_gauss = jnp.asarray(gauss.parameters["source"])
print(gauss.message)

# %% [markdown]
# ## The sparse answer: the same cost plus a non-negative L1 term
#
# The control is whitened, $f = \sigma_b v$, so $\lambda\sum_i v_i$ is an L1
# penalty on $f$. The 4D-Var cost's value and gradient (adjoint run) are the smooth
# part; the prior enters only through its proximal operator.

# %%
lam = 6.0
sparse_cost = L.CompositeCost(cost, L.NonNegativeL1(lam))
sol = da.minimize(
    sparse_cost,
    L.FISTA(backtrack=True),
    stop=da.StoppingRule(400, gtol=1e-6, ftol=None),
    throw=False,
)
f_sparse = sigma_b * sol.value["source"]
print(
    "FISTA",
    "converged" if sol.result == da.RESULTS.successful else "stopped",
    "after",
    int(sol.stats["num_iterations"]),
    "steps,",
    int(sol.history["inner_iterations"].sum()),
    "cost evaluations",
)


# %%
def score(f):
    """(relative error, cells holding 90 % of the recovered emission)."""
    err = float(jnp.linalg.norm(f - truth) / jnp.linalg.norm(truth))
    w = np.sort(np.abs(np.asarray(f)).ravel())[::-1]
    k90 = int(np.searchsorted(np.cumsum(w) / w.sum(), 0.9)) + 1
    return err, k90


for name, f in (("4D-Var (Gaussian)", f_gauss), ("4D-Var + L1 (FISTA)", f_sparse)):
    err, k90 = score(f)
    print(
        f"{name:22s} relative error {err:.3f}; 90 % of the emission in {k90} cells; "
        f"total {float(jnp.sum(f)):.3f} (truth {float(jnp.sum(truth)):.3f})"
    )

# %% [markdown]
# The Gaussian answer spreads the emission over hundreds of cells (556 in our run),
# with negative lobes; the sparse answer concentrates it in about thirty cells
# clustered at the true sources (32 in our run, after 400 FISTA steps that have not
# fully converged), non-negative by construction. Neither recovers single cells
# exactly: neighbouring cells produce nearly the same sensor records once the plume
# has diffused over a few cells (the columns of $A$ are highly coherent), which is
# why the relative errors stay high (0.94 and 0.87) although the supports differ.

# %%
fig, axes = plt.subplots(1, 3, figsize=(12, 4))
for ax, f, title in zip(
    axes,
    (truth, f_gauss, f_sparse),
    ("truth", "4D-Var (Gaussian prior)", "4D-Var + L1 (FISTA)"),
    strict=True,
):
    im = ax.imshow(np.asarray(f), origin="lower", extent=(0, 1, 0, 1), cmap="magma")
    ax.plot(positions[:, 1], positions[:, 0], "c.", ms=4)
    ax.set_title(title)
    fig.colorbar(im, ax=ax, shrink=0.8)
fig.tight_layout()
path = OUT / "heat_source_identification.png"
fig.savefig(path, dpi=100)
print("wrote", path)
