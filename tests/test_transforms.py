"""simulate under JAX transforms: jit vs eager, vmap vs a Python loop, grad of vmap
vs vmap of grad, and no recompilation when only array values change."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import pdes
from dphys.operators import laplacian


def coords(grid):
    axes = [grid.axis_coords(a) for a in range(grid.ndim)]
    return np.meshgrid(*axes, indexing="ij")


def blob(grid, shift=0.0):
    r2 = sum((x - 0.4 - shift) ** 2 for x in coords(grid))
    return jnp.asarray(np.exp(-r2 / 0.02))


CASES = {
    # name: (grid, kappa kind, stepper)
    "fft-cn": (dphys.Grid(32), "scalar", dphys.CrankNicolson()),
    "tridiagonal-bdf2": (dphys.Grid(32, boundary="neumann"), "field", dphys.BDF2()),
    "krylov-be-2d": (
        dphys.Grid((10, 12), boundary="dirichlet"),
        "field",
        dphys.BackwardEuler(),
    ),
}


def make_kappa(grid, kind, scale=1.0):
    if kind == "scalar":
        return jnp.asarray(0.02 * scale)
    k = 0.02 * scale
    for x in coords(grid):
        k = k * (1.0 + 0.5 * np.cos(2 * np.pi * x))
    return jnp.asarray(k)


def final_fn(grid, stepper, **kwargs):
    def final(kappa, state0):
        traj = dphys.simulate(
            pdes.Heat(grid, kappa), stepper, state0, dt=0.01, n_steps=20, **kwargs
        )
        return traj.final

    return final


@pytest.mark.parametrize("name", list(CASES))
def test_jit_equals_eager(name):
    grid, kind, stepper = CASES[name]
    f = final_fn(grid, stepper)
    kappa, u0 = make_kappa(grid, kind), blob(grid)
    eager = f(kappa, u0)
    jitted = jax.jit(f)(kappa, u0)
    np.testing.assert_allclose(jitted, eager, rtol=0, atol=1e-14)
    assert float(jnp.max(jnp.abs(eager - u0))) > 1e-3  # it did something


@pytest.mark.parametrize("name", list(CASES))
def test_vmap_over_states_and_kappas_equals_loop(name):
    grid, kind, stepper = CASES[name]
    f = jax.jit(final_fn(grid, stepper))
    states = jnp.stack([blob(grid, s) for s in (0.0, 0.1, 0.25)])
    kappas = jnp.stack([make_kappa(grid, kind, s) for s in (0.5, 1.0, 2.0)])
    batched = jax.jit(jax.vmap(f))(kappas, states)
    loop = jnp.stack([f(k, u) for k, u in zip(kappas, states, strict=True)])
    np.testing.assert_allclose(batched, loop, rtol=0, atol=1e-13)
    # Batch over states only, with a shared kappa.
    shared = jax.jit(jax.vmap(f, in_axes=(None, 0)))(kappas[1], states)
    shared_loop = jnp.stack([f(kappas[1], u) for u in states])
    np.testing.assert_allclose(shared, shared_loop, rtol=0, atol=1e-13)
    # The runs differ, so the comparison is not vacuous.
    assert float(jnp.max(jnp.abs(loop[0] - loop[2]))) > 1e-3


@pytest.mark.parametrize("name", ["fft-cn", "tridiagonal-bdf2"])
def test_grad_of_vmap_equals_vmap_of_grad(name):
    grid, kind, stepper = CASES[name]
    f = final_fn(grid, stepper)
    sensors = np.array([3, 11, 20])

    def cost(kappa, state0):
        return jnp.sum(f(kappa, state0)[sensors] ** 2)

    states = jnp.stack([blob(grid, s) for s in (0.0, 0.1, 0.25)])
    kappas = jnp.stack([make_kappa(grid, kind, s) for s in (0.5, 1.0, 2.0)])
    vmap_grad = jax.jit(jax.vmap(jax.grad(cost, argnums=(0, 1))))(kappas, states)
    grad_vmap = jax.jit(
        jax.grad(lambda k, u: jnp.sum(jax.vmap(cost)(k, u)), argnums=(0, 1))
    )(kappas, states)
    for a, b in zip(vmap_grad, grad_vmap, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    single = jax.jit(jax.grad(cost, argnums=(0, 1)))(kappas[2], states[2])
    for a, b in zip(single, vmap_grad, strict=True):
        np.testing.assert_allclose(a, b[2], rtol=1e-12, atol=1e-14)


def test_no_retrace_when_values_change():
    grid = dphys.Grid((8, 10), boundary="neumann")

    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def run(model, state0, dt):
        return dphys.simulate(
            model, dphys.CrankNicolson(), state0, dt=dt, n_steps=5
        ).final

    outs = []
    for scale in (1.0, 2.0, 3.0):
        model = pdes.Heat(grid, make_kappa(grid, "field", scale), source=0.1 * scale)
        outs.append(run(model, blob(grid, 0.05 * scale), jnp.asarray(0.01 * scale)))
    assert float(jnp.max(jnp.abs(outs[0] - outs[2]))) > 1e-3
    # A new static configuration (another grid) is a new program, as it must be.
    other = dphys.Grid((8, 11), boundary="neumann")
    with pytest.raises(RuntimeError, match="can only be traced 1 times"):
        run(pdes.Heat(other, 0.02), blob(other), jnp.asarray(0.01))


class _Counter:
    """Counts traces; hashable by identity so it can sit in a static field."""

    def __init__(self):
        self.n = 0


class _CountingHeat(dphys.AbstractModel):
    """Heat that counts how often its operator is traced (a Python side effect)."""

    grid: dphys.Grid
    kappa: jax.Array
    counter: _Counter = eqx.field(static=True)

    def linear(self, t, state):
        self.counter.n += 1
        return laplacian(state, self.grid, self.kappa)

    @property
    def symmetric(self):
        return True


def test_eager_simulate_compiles_once_per_configuration():
    """simulate is filter-jitted: new kappa, state or dt values reuse the program."""
    grid = dphys.Grid(16, boundary="neumann")
    counter = _Counter()
    stepper = dphys.BackwardEuler()
    traced = None
    for scale in (1.0, 2.0, 3.0):
        model = _CountingHeat(grid, make_kappa(grid, "field", scale), counter)
        dphys.simulate(
            model, stepper, blob(grid, 0.1 * scale), dt=0.01 * scale, n_steps=4
        )
        if traced is None:
            traced = counter.n
            assert traced > 0
    assert counter.n == traced


class _Sensors(eqx.Module):
    """An observation hook with weights: ``y = weights * state[index]``."""

    weights: jax.Array
    index: tuple[int, ...] = eqx.field(static=True)
    counter: _Counter = eqx.field(static=True)

    def __call__(self, t, state):
        self.counter.n += 1  # a Python side effect: runs only while tracing
        return self.weights * state[jnp.asarray(self.index)]


def test_saveat_module_hook_is_data_not_retraced():
    """SaveAt.fn is a pytree field: three eager runs with a Module hook holding
    different weights trace the run once (a static hook retraced on every new
    value, or could not be hashed at all)."""
    grid = dphys.Grid(16, boundary="neumann")
    model = pdes.Heat(grid, 0.02)
    counter = _Counter()
    u0 = blob(grid)
    outs, traced = [], None
    for scale in (1.0, 2.0, 3.0):
        hook = _Sensors(jnp.asarray([1.0, 2.0, 3.0]) * scale, (2, 7, 11), counter)
        traj = dphys.simulate(
            model,
            dphys.CrankNicolson(),
            u0,
            dt=0.01,
            n_steps=6,
            saveat=dphys.SaveAt(every=2, fn=hook),
        )
        outs.append(traj.ys)
        if traced is None:
            traced = counter.n
            assert traced > 0
    assert counter.n == traced
    assert outs[0].shape == (3, 3)
    np.testing.assert_allclose(outs[2], 3.0 * outs[0], rtol=1e-12)


def test_saveat_hook_weights_are_differentiable():
    """d/dw of sum(w * u_k[idx]) over the saves is sum(u_k[idx]): the hook's arrays
    carry derivatives through simulate."""
    grid = dphys.Grid(16, boundary="neumann")
    model = pdes.Heat(grid, 0.02)
    u0 = blob(grid)
    index = (2, 7, 11)

    def cost(w):
        hook = _Sensors(w, index, _Counter())
        saveat = dphys.SaveAt(every=2, fn=hook)
        traj = dphys.simulate(
            model, dphys.CrankNicolson(), u0, dt=0.01, n_steps=6, saveat=saveat
        )
        return jnp.sum(traj.ys)

    w = jnp.asarray([1.0, -0.5, 2.0])
    states = dphys.simulate(
        model,
        dphys.CrankNicolson(),
        u0,
        dt=0.01,
        n_steps=6,
        saveat=dphys.SaveAt(every=2),
    ).ys
    expected = jnp.sum(states[:, jnp.asarray(index)], axis=0)
    np.testing.assert_allclose(jax.grad(cost)(w), expected, rtol=1e-12)
    assert float(jnp.min(jnp.abs(expected))) > 1e-3


def test_saveat_plain_function_hook_still_works():
    grid = dphys.Grid(16, boundary="neumann")
    model = pdes.Heat(grid, 0.02)
    u0 = blob(grid)
    kw = dict(dt=0.01, n_steps=6)
    full = dphys.simulate(
        model, dphys.CrankNicolson(), u0, saveat=dphys.SaveAt(every=3), **kw
    )
    hooked = dphys.simulate(
        model,
        dphys.CrankNicolson(),
        u0,
        saveat=dphys.SaveAt(every=3, fn=lambda t, u: u[::4] + t),
        **kw,
    )
    np.testing.assert_allclose(hooked.ys, full.ys[:, ::4] + full.ts[:, None])


@pytest.mark.parametrize(
    "path",
    ["fft-fast-forward", "fft-stepping", "tridiagonal-unrolled", "checkpointed"],
)
def test_saveat_hook_receives_the_save_time(path):
    """The hook is called as fn(t, state) with t = t0 + k dt of the saved step k, on
    every code path that calls it: the initial save, the fast-forward segments, the
    stepped segments (plain and checkpointed). A hook that returns t makes ys equal
    ts exactly; one called with t - dt (or t0) would not."""
    periodic = path.startswith("fft")
    grid = dphys.Grid(16, boundary="periodic" if periodic else "neumann")
    model = pdes.Heat(grid, 0.02)
    adjoint = dphys.Checkpointed(levels=2) if path == "checkpointed" else None
    t0, dt, n_steps = 1.25, 0.1, 40
    saveat = dphys.SaveAt(t0=True, steps=(3, 9, 17, 40), fn=lambda t, u: t)
    traj = dphys.simulate(
        model,
        dphys.CrankNicolson(),
        blob(grid),
        t0=t0,
        dt=dt,
        n_steps=n_steps,
        saveat=saveat,
        fast_forward=path == "fft-fast-forward" if periodic else None,
        adjoint=dphys.Unrolled() if adjoint is None else adjoint,
    )
    assert bool(traj.stats["fast_forward"]) == (path == "fft-fast-forward")
    expected = t0 + dt * np.array([0, 3, 9, 17, 40])
    np.testing.assert_allclose(traj.ts, expected, rtol=0, atol=1e-14)
    np.testing.assert_allclose(traj.ys, traj.ts, rtol=0, atol=1e-14)
