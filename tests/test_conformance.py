"""Every stepper, solver, model and assimilation method under the JAX transforms.

Parametrised over the families of ``tests/helpers.py``:

* compatibility (static, the full solver x model product): a combination the
  solver's documented rule refuses raises that ``ValueError`` before tracing, every
  other one resolves;
* transforms (stepper x model x compatible solver, on tiny grids and 3 steps):
  jit = eager, vmap = loop, grad of vmap = vmap of grad, no recompilation when only
  values change (eager calls too), and float32 and float64 both run (float32 stays
  float32 and agrees with float64 to single precision);
* assimilation methods on a small 4D-Var cost: the same, through
  :func:`assimilation.minimize`; a method that is not reverse-differentiable must
  raise the documented error.

The default run takes a covering set of rows (every stepper, model and solver at
least once, a test checks it); ``pytest -m slow`` runs every compatible
combination. Every test here runs with strict dtype and rank promotion
(``jax_numpy_dtype_promotion="strict"``, ``jax_numpy_rank_promotion="raise"``).
"""

import itertools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import pytest
from helpers import (
    ALL_METHODS,
    ALL_MODELS,
    ALL_SOLVERS,
    ALL_STEPPERS,
    assert_tree_allclose,
    count_compiles,
    small_cost,
    tolerances,
)

import assimilation as da
import dphys


pytestmark = pytest.mark.usefixtures("strict_promotion")  # see conftest.py


STEPPERS = {c.id: c for c in ALL_STEPPERS}
SOLVERS = {c.id: c for c in ALL_SOLVERS}
MODELS = {c.id: c for c in ALL_MODELS}
METHODS = {c.id: c for c in ALL_METHODS}


# ------------------------------------------------------------------ compatibility


@pytest.mark.parametrize(
    "solver_id, model_id", list(itertools.product(SOLVERS, MODELS))
)
def test_solver_compatibility(solver_id, model_id):
    """A refused combination raises the documented error before anything is traced;
    an accepted one resolves to a concrete solver."""
    case, mcase = SOLVERS[solver_id], MODELS[model_id]
    model, state0 = mcase.build(jnp.float64)
    # Cycle the steppers that take a solver: the refusal does not depend on them.
    takes = [s for s in ALL_STEPPERS if s.takes_solver]
    stepper = takes[list(MODELS).index(model_id) % len(takes)].make(case.solver)
    refused = case.refuses(model, state0)
    if refused is not None:
        with count_compiles() as counts:
            with pytest.raises(ValueError, match=refused):
                dphys.simulate(model, stepper, state0, dt=mcase.dt, n_steps=1)
        assert counts["compiles"] == 0
    else:
        resolved = stepper.resolve(model, state0)
        assert not isinstance(resolved.solver, dphys.Auto)


# --------------------------------------------------------------------- transforms

# (stepper, model, solver, check gradients in the default run). Every stepper,
# model and solver appears at least once (test_rows_cover_every_family_member);
# gradients (the costliest compilations) only on the cheapest row by default, on
# every row with `-m slow`.
DEFAULT_ROWS = [
    ("CrankNicolson", "Heat-periodic", "FFT", True),
    ("BackwardEuler", "Heat-neumann-field-source", "Tridiagonal", False),
    ("BDF2", "Heat-dirichlet-2d", "Krylov-cg", False),
    ("IMEX", "Augmented-reaction", "Auto", False),
    ("Theta0.7", "Advection-periodic", "Krylov-bicgstab", False),
    ("FullyImplicit", "Augmented-reaction", "Auto", False),
]
# Rows kept out of the default run for their compile time (each took 50-130 s on
# the 2-core CPU under load, 3-5x the rows above); they run with `-m slow`, and the
# models and solvers they alone cover are named here so the gap is explicit.
SLOW_ROWS = [
    ("BackwardEuler", "ShallowWater-periodic", "Krylov-jacobi"),
    ("Theta0.7", "Advection-walled-2d", "Krylov-gmres"),
    ("IMEX", "ShallowWater-basin-nonlinear", "HelmholtzKrylov"),
]


def _compatible(stepper_id, model_id, solver_id):
    if not STEPPERS[stepper_id].takes_solver and solver_id != "Auto":
        return False  # its own Newton-Krylov solve: one row, with Auto
    model, state0 = MODELS[model_id].build(jnp.float64)
    return SOLVERS[solver_id].refuses(model, state0) is None


def _rows():
    default = {r[:3]: r[3] for r in DEFAULT_ROWS}
    rows = []
    for key in itertools.product(STEPPERS, MODELS, SOLVERS):
        if key in SLOW_ROWS:
            rows.append(
                pytest.param(*key, True, id="-".join(key), marks=pytest.mark.slow)
            )
        elif key in default:
            rows.append(pytest.param(*key, default[key], id="-".join(key)))
            if not default[key]:
                slow = pytest.mark.slow
                name = "-".join(key) + "-with-grad"
                rows.append(pytest.param(*key, True, id=name, marks=slow))
        elif _compatible(*key):
            rows.append(
                pytest.param(*key, True, id="-".join(key), marks=pytest.mark.slow)
            )
    return rows


ROWS = _rows()


def test_rows_cover_every_family_member():
    """The default rows cover every stepper; with the named slow rows, every model
    and solver (a new family member without a row fails here)."""
    assert set(STEPPERS) == {r[0] for r in DEFAULT_ROWS}
    for i, family in ((1, MODELS), (2, SOLVERS)):
        assert set(family) == {r[i] for r in DEFAULT_ROWS + SLOW_ROWS}, family
    for row in DEFAULT_ROWS + SLOW_ROWS:
        assert _compatible(*row[:3]), row


def _split(model):
    """(differentiable arrays, the rest) of a model."""
    return eqx.partition(model, eqx.is_inexact_array)


def _problem(stepper_id, model_id, solver_id, dtype):
    mcase = MODELS[model_id]
    model, state0 = mcase.build(dtype)
    stepper = STEPPERS[stepper_id].make(SOLVERS[solver_id].solver)
    params, static = _split(model)
    dt = jnp.asarray(mcase.dt, dtype)

    def run(params, state0):
        traj = dphys.simulate(
            eqx.combine(params, static), stepper, state0, dt=dt, n_steps=mcase.n_steps
        )
        return traj.final

    def loss(params, state0):
        final = run(params, state0)
        return sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(final))

    return run, loss, params, state0


def _scaled(tree, factor):
    return jtu.tree_map(lambda a: a * jnp.asarray(factor, a.dtype), tree)


def _batch(params, state0):
    """Two samples: the parameters and the state scaled by 1 and by 1.1 / 0.9."""
    ps = [params, _scaled(params, 1.1)]
    us = [state0, _scaled(state0, 0.9)]
    stack = lambda *xs: jnp.stack(xs)
    return ps, us, jtu.tree_map(stack, *ps), jtu.tree_map(stack, *us)


def _unstack(tree, i):
    return jtu.tree_map(lambda a: a[i], tree)


@pytest.mark.parametrize("stepper_id, model_id, solver_id, grad", ROWS)
def test_transforms(stepper_id, model_id, solver_id, grad):
    run, loss, params, state0 = _problem(stepper_id, model_id, solver_id, jnp.float64)
    ps, us, pb, ub = _batch(params, state0)
    tol = tolerances(jnp.float64)

    # Eager calls (simulate compiles its own program) with new values: one program.
    eager = [run(ps[0], us[0])]
    with count_compiles() as counts:
        eager.append(run(ps[1], us[1]))
    assert counts["compiles"] == 0, counts
    moved = jtu.tree_leaves(jtu.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)), *eager))
    assert max(float(m) for m in moved) > 0  # the two samples really differ

    # jit(vmap) = a loop of eager calls (jit = eager, vmap = loop in one program);
    # a second call with new values reuses the program.
    @eqx.filter_jit
    @eqx.debug.assert_max_traces(max_traces=1)
    def jitted(p_batch, u_batch):
        return jax.vmap(run)(p_batch, u_batch)

    batched = jitted(pb, ub)
    for i in range(2):
        assert_tree_allclose(_unstack(batched, i), eager[i], **tol, msg="vmap vs loop")
    swapped = jitted(*(jtu.tree_map(lambda a: a[::-1], t) for t in (pb, ub)))
    assert_tree_allclose(_unstack(swapped, 0), eager[1], **tol, msg="2nd call")

    if grad:
        vmap_grad = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1))))(pb, ub)
        grad_vmap = jax.jit(
            jax.grad(lambda p, u: jnp.sum(jax.vmap(loss)(p, u)), argnums=(0, 1))
        )(pb, ub)
        assert_tree_allclose(
            grad_vmap, vmap_grad, **tol, msg="grad(vmap) vs vmap(grad)"
        )
        norms = [float(jnp.max(jnp.abs(g))) for g in jtu.tree_leaves(vmap_grad)]
        assert max(norms) > 0

    # float32: runs, stays float32, agrees with float64 to single precision.
    run32, _, p32, u32 = _problem(stepper_id, model_id, solver_id, jnp.float32)
    out32 = run32(p32, u32)
    assert {a.dtype for a in jtu.tree_leaves(out32)} == {jnp.dtype(jnp.float32)}
    out64 = jtu.tree_map(lambda a: a.astype(jnp.float32), eager[0])
    assert_tree_allclose(out32, out64, **tolerances(jnp.float32), msg="f32 vs f64")


# -------------------------------------------------------------------- DA methods


def _analysis_fn(method, dtype):
    make_cost = small_cost(dtype)

    def analysis(background):
        cost = make_cost(background)
        sol = da.minimize(cost, method, n_iterations=1)
        return sol.control

    return analysis


def _backgrounds(dtype):
    base = 0.5 + 0.1 * jnp.arange(8, dtype=dtype)
    return jnp.stack([base, jnp.flip(base)])


def _method_rows():
    # Default: eager calls (no recompilation) and float32. jit(vmap), gradients of
    # minimize (or, for a method that is not reverse-differentiable, its error:
    # tracing L-BFGS's line search for it alone took about a minute) compile or
    # trace programs several times the forward one (2-3 minutes per method on the
    # loaded 2-core CPU): `-m slow`.
    rows = []
    for name in METHODS:
        rows.append(pytest.param(name, False, id=name))
        slow = pytest.mark.slow
        rows.append(pytest.param(name, True, id=f"{name}-transforms", marks=slow))
    return rows


@pytest.mark.parametrize("method_id, transforms", _method_rows())
def test_method_transforms(method_id, transforms):
    case = METHODS[method_id]
    if case.strict_dtypes:
        _method_transforms(case, transforms)
    else:
        with jax.numpy_dtype_promotion("standard"):
            _method_transforms(case, transforms)


def _method_transforms(case, grad):
    analysis = _analysis_fn(case.method, jnp.float64)
    b = _backgrounds(jnp.float64)
    tol = tolerances(jnp.float64)

    eager = [analysis(b[0])]
    with count_compiles() as counts:
        eager.append(analysis(b[1]))
    assert counts["compiles"] == 0, counts
    assert not tree_equal(eager[0], eager[1])

    if grad:
        batched = jax.jit(jax.vmap(analysis))(b)
        for i in range(2):
            assert_tree_allclose(_unstack(batched, i), eager[i], **tol, msg="vmap")

    loss = lambda bg: sum(jnp.sum(x**2) for x in jtu.tree_leaves(analysis(bg)))
    if case.differentiable and grad:
        vmap_grad = jax.jit(jax.vmap(jax.grad(loss)))(b)
        grad_vmap = jax.jit(jax.grad(lambda bb: jnp.sum(jax.vmap(loss)(bb))))(b)
        assert_tree_allclose(grad_vmap, vmap_grad, **tol, msg="grad(vmap)")
        assert float(jnp.max(jnp.abs(vmap_grad))) > 0
    elif grad and not case.differentiable:
        error, match = case.grad_error
        with pytest.raises(error, match=match):
            jax.grad(loss)(b[0])

    out32 = _analysis_fn(case.method, jnp.float32)(b[0].astype(jnp.float32))
    assert {a.dtype for a in jtu.tree_leaves(out32)} == {jnp.dtype(jnp.float32)}
    ref = jtu.tree_map(lambda a: a.astype(jnp.float32), eager[0])
    assert_tree_allclose(out32, ref, **tolerances(jnp.float32), msg="f32 vs f64")


def tree_equal(a, b):
    return bool(eqx.tree_equal(a, b))
