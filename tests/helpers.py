"""Shared test helpers: tolerances, toy models, and the families the tests run over.

* Tolerances: :func:`tree_allclose` with the project default ``rtol=1e-5,
  atol=1e-8`` (float64); :func:`tolerances` for other dtypes. Any relaxation for
  accelerators lives here and only here (:data:`DEVICE_RELAX`).
* Toy models and fields used by several test files: :class:`Reaction`,
  :func:`coords`, :func:`blob`, :class:`Counter`, :func:`count_compiles`.
* The families, one entry per public member, each with a readable id:
  :data:`ALL_STEPPERS`, :data:`ALL_SOLVERS`, :data:`ALL_MODELS` (every ``pdes``
  model and the core combinator in a tiny configuration: periodic and walled,
  linear and nonlinear), :data:`ALL_METHODS` (every assimilation method) with the
  small costs they run on (:func:`small_cost`). ``tests/test_conformance.py``
  runs them through the JAX transforms; a new stepper, solver, model or method is
  covered by adding one entry here.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.monitoring
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import assimilation as da
import dphys
import dphys.testing as dtest
import pdes
from dphys.operators import laplacian


# ------------------------------------------------------------------ tolerances

RTOL = 1e-5
ATOL = 1e-8

# XLA on accelerators reorders reductions and may fuse differently from the CPU, so
# comparisons between two programs (jit vs eager, vmap vs loop) differ by more
# rounding there. Only this factor changes with the device.
DEVICE_RELAX = 1.0 if jax.default_backend() == "cpu" else 10.0


def tolerances(dtype=jnp.float64) -> dict[str, float]:
    """``rtol``/``atol`` for comparing two computations of one result in ``dtype``.

    float64: the project default (1e-5, 1e-8). float32: (1e-3, 1e-5), because a few
    implicit steps amplify single-precision rounding (unit roundoff 6e-8) by the
    condition number of the solves and Krylov solves stop at a float32 tolerance
    (about 1e-5, see ``dphys.krylov_solve``).
    """
    if jnp.dtype(dtype) == jnp.float32:
        rtol, atol = 1e-3, 1e-5
    else:
        rtol, atol = RTOL, ATOL
    return dict(rtol=rtol * DEVICE_RELAX, atol=atol * DEVICE_RELAX)


def tree_allclose(x, y, *, rtol: float = RTOL, atol: float = ATOL) -> bool:
    """:func:`dphys.testing.tree_allclose` with the test-suite defaults (same
    structure and shapes, ``|x - y| <= atol + rtol |y|`` leaf by leaf)."""
    return dtest.tree_allclose(x, y, rtol=rtol, atol=atol)


def assert_tree_allclose(x, y, *, rtol: float = RTOL, atol: float = ATOL, msg=""):
    """:func:`tree_allclose`, raising with the largest mismatch when it fails."""
    if tree_allclose(x, y, rtol=rtol, atol=atol):
        return
    if jtu.tree_structure(x) != jtu.tree_structure(y):
        raise AssertionError(
            f"{msg} structures differ: {jtu.tree_structure(x)} vs "
            f"{jtu.tree_structure(y)}"
        )
    worst = []
    for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape:
            worst.append(f"shapes {a.shape} vs {b.shape}")
        else:
            err = np.max(np.abs(a - b) - rtol * np.abs(b), initial=-np.inf)
            worst.append(f"max |x-y| - rtol|y| = {err:.3g} (atol {atol:g})")
    raise AssertionError(f"{msg} trees differ: {worst}")


# ------------------------------------------------------------- fields and toys


def coords(grid: dphys.Grid) -> list[np.ndarray]:
    """NumPy meshgrid of the grid's coordinates, array order (no device work)."""
    axes = [grid.axis_coords(a) for a in range(grid.ndim)]
    return np.meshgrid(*axes, indexing="ij")


def blob(grid: dphys.Grid, shift: float = 0.0, offset: float = 0.0) -> jax.Array:
    """A Gaussian bump (width 0.1) centred at 0.4 + ``shift`` on every axis, plus a
    constant ``offset``."""
    r2 = sum((x - 0.4 - shift) ** 2 for x in coords(grid))
    return jnp.asarray(offset + np.exp(-r2 / 0.02))


class Reaction(dphys.AbstractModel):
    r"""Reaction-diffusion: $L u = \nabla\cdot(\kappa\nabla u)$ implicit, $N$
    explicit.

    ``cubic=False``: $N(u) = -r u$ (linear, so ``expm`` gives the exact solution);
    ``cubic=True``: $N(u) = r (u - u^3)$ (Allen-Cahn reaction, nonlinear), so
    IMEX, SBDF2 and Newton see a nonlinear explicit part. ``rate`` $r$ is a
    differentiable leaf.
    """

    grid: dphys.Grid
    kappa: jax.Array
    rate: Any = 1.0
    cubic: bool = eqx.field(static=True, default=False)

    def linear(self, t, state):
        return laplacian(state, self.grid, self.kappa)

    def explicit(self, t, state):
        if self.cubic:
            return self.rate * (state - state**3)
        return -self.rate * state

    @property
    def symmetric(self):
        return True

    @property
    def translation_invariant(self):
        return jnp.ndim(self.kappa) == 0


class Counter:
    """Counts calls made while tracing; hashable by identity, so it can sit in a
    static field of a Module."""

    def __init__(self):
        self.n = 0


_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def count_compiles():
    """Count XLA compilations and jaxpr traces inside the ``with`` block.

    Yields a dict ``{"compiles": int, "traces": int}`` updated in place. Works for
    any program, including those compiled inside library entry points such as
    ``dphys.simulate`` (where ``eqx.debug.assert_max_traces`` cannot be placed).
    """
    counts = {"compiles": 0, "traces": 0}

    def listener(event, duration, **kwargs):
        if event == _COMPILE_EVENT:
            counts["compiles"] += 1
        elif event == _TRACE_EVENT:
            counts["traces"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


# ---------------------------------------------------------------- the families


@dataclasses.dataclass(frozen=True)
class StepperCase:
    """A public stepper. ``make(solver)`` builds it around a linear solver;
    ``takes_solver=False`` for steppers that have none (they ignore ``solver``)."""

    id: str
    make: Callable[[dphys.AbstractLinearSolver], dphys.AbstractStepper]
    takes_solver: bool = True


ALL_STEPPERS: list[StepperCase] = [
    StepperCase("BackwardEuler", lambda s: dphys.BackwardEuler(solver=s)),
    StepperCase("CrankNicolson", lambda s: dphys.CrankNicolson(solver=s)),
    StepperCase("Theta0.7", lambda s: dphys.Theta(0.7, solver=s)),
    StepperCase("IMEX", lambda s: dphys.IMEX(solver=s)),
    StepperCase("BDF2", lambda s: dphys.BDF2(solver=s)),
    # Newton to 1e-5 relative: the defaults (1e-10, GMRES 1e-11) are below float32
    # rounding, so a float32 run with them reports a failed nonlinear solve.
    StepperCase(
        "FullyImplicit",
        lambda s: dphys.FullyImplicit(rtol=1e-5, atol=1e-6, linear_rtol=1e-6),
        takes_solver=False,
    ),
]


@dataclasses.dataclass(frozen=True)
class SolverCase:
    """A public linear solver, with the documented rule for which models it takes.

    ``refuses(model, state0)`` returns ``None`` when the solver applies, else a
    regular expression the ``ValueError`` raised before tracing must match (the
    rule is written from the solver's docstring, independently of its ``check``).
    """

    id: str
    solver: dphys.AbstractLinearSolver
    refuses: Callable[[dphys.AbstractModel, Any], str | None] = lambda m, u: None


def _fft_refuses(model, state0):
    if model.grid.periodic and model.translation_invariant:
        return None
    return r"`solver=FFT\(\)` needs a fully periodic grid"


def _tridiagonal_refuses(model, state0):
    one_d = model.grid.ndim == 1 and not model.grid.periodic
    if one_d and len(jtu.tree_leaves(state0)) == 1:
        return None
    return r"`solver=Tridiagonal\(\)` needs a 1D grid"


def _cg_refuses(model, state0):
    return None if model.symmetric else r"`Krylov\(method='cg'\)` needs a symmetric"


def _helmholtz_refuses(model, state0):
    if isinstance(model.unwrapped, pdes.ShallowWater):
        return None
    return r"`HelmholtzKrylov\(\)` solves pdes.ShallowWater's implicit systems only"


ALL_SOLVERS: list[SolverCase] = [
    SolverCase("Auto", dphys.Auto()),
    SolverCase("FFT", dphys.FFT(), _fft_refuses),
    SolverCase("Tridiagonal", dphys.Tridiagonal(), _tridiagonal_refuses),
    SolverCase("Krylov-cg", dphys.Krylov(method="cg"), _cg_refuses),
    SolverCase("Krylov-gmres", dphys.Krylov(method="gmres")),
    SolverCase("Krylov-bicgstab", dphys.Krylov(method="bicgstab")),
    SolverCase("Krylov-jacobi", dphys.Krylov(preconditioner="jacobi")),
    SolverCase("HelmholtzKrylov", pdes.HelmholtzKrylov(), _helmholtz_refuses),
]


@dataclasses.dataclass(frozen=True)
class ModelCase:
    """A model in a tiny configuration: ``build(dtype) -> (model, state0)``, with
    every array (parameters and state) in ``dtype`` and none weakly typed (a
    parameter left at a Python-float default is a weakly typed array, and
    recomputing it, e.g. scaling it, changes its type and so compiles a new
    program); ``dt`` and ``n_steps`` keep each run a few cheap, stable steps."""

    id: str
    build: Callable[[Any], tuple[dphys.AbstractModel, Any]]
    dt: float
    n_steps: int = 3
    nonlinear: bool = False


def _heat_periodic(dtype):
    grid = dphys.Grid(8, lengths=1.0)
    return pdes.Heat(grid, jnp.asarray(0.05, dtype)), blob(grid).astype(dtype)


def _heat_neumann_field(dtype):
    grid = dphys.Grid(8, lengths=1.0, boundary="neumann")
    (x,) = coords(grid)
    kappa = jnp.asarray(0.05 * (1.0 + 0.5 * np.cos(2 * np.pi * x)), dtype)
    source = jnp.asarray(0.3 * np.sin(np.pi * x), dtype)
    return pdes.Heat(grid, kappa, source=source), blob(grid).astype(dtype)


def _heat_dirichlet_2d(dtype):
    grid = dphys.Grid((5, 6), lengths=1.0, boundary="dirichlet")
    y, x = coords(grid)
    kappa = jnp.asarray(0.05 * (1.0 + 0.5 * np.cos(2 * np.pi * x) * np.sin(y)), dtype)
    return pdes.Heat(grid, kappa), blob(grid).astype(dtype)


def _reaction_periodic(dtype):
    grid = dphys.Grid(8, lengths=1.0)
    heat = pdes.Heat(grid, jnp.asarray(0.05, dtype))
    model = dphys.Augmented(heat, explicit=lambda t, u: u - u**3)
    return model, blob(grid, offset=0.2).astype(dtype)


def _advection_periodic(dtype):
    grid = dphys.Grid(8, lengths=1.0)
    model = pdes.Advection(
        grid, jnp.asarray(0.5, dtype), kappa=jnp.asarray(0.01, dtype)
    )
    return model, blob(grid).astype(dtype)


def _advection_walled_2d(dtype):
    grid = dphys.Grid((5, 6), lengths=1.0, boundary="dirichlet")
    y, x = coords(grid)
    vx = jnp.asarray(0.5 + 0.2 * np.sin(2 * np.pi * y), dtype)
    vy = jnp.asarray(0.3 * np.cos(np.pi * x), dtype)
    model = pdes.Advection(grid, (vy, vx), kappa=jnp.asarray(0.01, dtype))
    return model, blob(grid).astype(dtype)


def _sw_state(grid, dtype):
    eta = 0.01 * blob(dphys.Grid(grid.shape, lengths=1.0, boundary=grid.boundary))
    zero = jnp.zeros(grid.shape, dtype)
    return pdes.SWState(eta.astype(dtype), zero, zero)


def _shallow_water_periodic(dtype):
    grid = dphys.Grid(8, lengths=8e3)
    model = pdes.ShallowWater(
        grid,
        jnp.asarray(10.0, dtype),
        g=jnp.asarray(9.81, dtype),
        f0=jnp.asarray(1e-4, dtype),
        drag=jnp.asarray(0.0, dtype),
    )
    return model, _sw_state(grid, dtype)


def _shallow_water_basin_nonlinear(dtype):
    grid = dphys.Grid((5, 6), lengths=(5e3, 6e3), boundary="neumann")
    y, x = coords(grid)
    depth = jnp.asarray(10.0 + 2.0 * np.cos(np.pi * x / 6e3), dtype)
    model = pdes.ShallowWater(
        grid,
        depth,
        g=jnp.asarray(9.81, dtype),
        f0=jnp.asarray(1e-4, dtype),
        drag=jnp.asarray(0.0, dtype),
        nonlinear=True,
    )
    return model, _sw_state(grid, dtype)


ALL_MODELS: list[ModelCase] = [
    ModelCase("Heat-periodic", _heat_periodic, dt=0.05),
    ModelCase("Heat-neumann-field-source", _heat_neumann_field, dt=0.05),
    ModelCase("Heat-dirichlet-2d", _heat_dirichlet_2d, dt=0.05),
    ModelCase("Augmented-reaction", _reaction_periodic, dt=0.05, nonlinear=True),
    ModelCase("Advection-periodic", _advection_periodic, dt=0.05),
    ModelCase("Advection-walled-2d", _advection_walled_2d, dt=0.05),
    ModelCase("ShallowWater-periodic", _shallow_water_periodic, dt=100.0),
    ModelCase(
        "ShallowWater-basin-nonlinear",
        _shallow_water_basin_nonlinear,
        dt=100.0,
        nonlinear=True,
    ),
]


# ------------------------------------------------------------- DA methods


@dataclasses.dataclass(frozen=True)
class MethodCase:
    """An assimilation method. ``differentiable``: whether reverse mode goes through
    :func:`assimilation.minimize` with it; otherwise ``grad_error`` is the error
    (type, regex) reverse mode must raise. ``strict_dtypes``: whether it runs under
    ``jax_numpy_dtype_promotion="strict"`` with x64 on."""

    id: str
    method: da.AbstractMethod
    differentiable: bool = True
    grad_error: tuple[type[Exception], str] | None = None
    strict_dtypes: bool = True


ALL_METHODS: list[MethodCase] = [
    MethodCase("GaussNewton", da.GaussNewton(inner_max_steps=20)),
    MethodCase(
        "LBFGS",
        da.LBFGS(memory=3, max_linesearch_steps=5),
        differentiable=False,
        grad_error=(ValueError, "Reverse-mode differentiation does not work"),
        # optax's L-BFGS adds an int32 memory index to an int64 arange under x64.
        strict_dtypes=False,
    ),
]


def small_cost(dtype=jnp.float64) -> Callable[[jax.Array], da.FourDVar]:
    r"""A tiny strong-constraint 4D-Var problem: periodic heat on 8 points, the
    initial state as control with a diagonal prior, 3 sensors at 2 times.

    Returns ``cost(background) -> FourDVar``: everything but the first guess is
    built here, outside any transform (observations and ``dt`` are checked
    concretely), so ``cost`` can be called under ``jit``/``vmap``/``grad`` with a
    traced ``background`` (8 values). The cost is quadratic in the control, so
    Gauss-Newton and L-BFGS both approach its minimum in a few steps.
    """
    grid = dphys.Grid(8, lengths=1.0)
    model = pdes.Heat(grid, jnp.asarray(0.02, dtype))
    stepper = dphys.CrankNicolson()
    obs = da.Observations(
        jnp.asarray([0.1, 0.2], dtype),
        jnp.asarray([[0.3, 0.8, 0.1], [0.25, 0.7, 0.15]], dtype),
        jnp.asarray([0.1, 0.45, 0.8], dtype),
        jnp.asarray(0.1, dtype),
    )
    control = da.Control(
        initial_state=da.InitialState(da.Diagonal(jnp.asarray(0.5, dtype), (8,)))
    )

    def cost(background):
        return da.FourDVar(model, stepper, background, obs, control, dt=0.05, n_steps=4)

    return cost
