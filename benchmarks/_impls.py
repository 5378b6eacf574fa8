"""The implementations measured by ``benchmarks/run.py``: dphys's paths and the peers.

Every implementation is an :class:`Impl`: a pure ``forward(u0, kappa) -> state after
``steps`` steps`` and a pure ``cost(u0, kappa) -> J`` (the P5 cost over ``grad_steps``
steps), both jit-able and differentiable with ``jax.value_and_grad``. Peers are written
here from their public APIs only, in the configuration a careful user would pick: the
whole loop jitted, warm-started Krylov solves, tolerances that give the same answer as
ours, and plain ``jax.grad`` through the time loop where that is what the library
offers.

Peers (benchmarks/README.md):

* ``jax-cg``: ``jax.scipy.sparse.linalg.cg`` per implicit step, matrix-free periodic
  stencil, warm start from the previous state, ``tol=1e-10``.
* ``diffrax``: method of lines, ``ImplicitEuler`` (backward Euler) or a two-stage ESDIRK
  trapezoidal tableau (Crank-Nicolson; diffrax ships none), ``optimistix.Newton`` with a
  matrix-free ``lineax.GMRES`` (restart tuned), ``RecursiveCheckpointAdjoint``,
  constant step. (diffrax's default ``VeryChord`` root finder cannot take a Krylov
  solver: see :func:`diffrax_verychord_pitfall`.)
* ``dense-lu``: the dense matrix of the implicit operator factored once per call, one
  LU solve per step (1D only: the 2D matrix would take 34 GB).
* ``exponax``: its ETDRK0 linear diffusion stepper (exact exponential of the spectral
  Laplacian), stepped with the same ``dt``. A different discretisation: its error is
  against the PDE's exact solution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from . import _measure
from ._problems import Problem, kappa_field_p6


@dataclasses.dataclass
class Impl:
    """One implementation of one problem.

    Attributes:
        name: ``"dphys"``, ``"dphys-stepwise"``, a peer's name, ...
        problem: the problem it solves (``problem.n`` may be smaller than the
            benchmark's for a peer that cannot run at full size).
        steps: steps run by ``forward`` (fewer than ``problem.steps`` means the time is
            extrapolated per step).
        forward: ``(u0, kappa) -> state`` after ``steps`` steps, or None.
        grad_steps: steps of the cost ``cost``.
        cost: ``(u0, kappa) -> J`` over ``grad_steps`` steps, or None.
        error_ref: what ``error`` is measured against: ``"discrete"`` (exact solution
            of the benchmark's scheme), ``"pde"`` or ``"reference"`` (P6 tol=1e-13 run).
        fixed_cost: forward time has a step-independent part (a factorisation):
            extrapolate with an affine fit over two step counts ``fit_steps``.
        fit_steps: second, smaller step count for the affine fit.
        notes: extra fields copied into the JSON line.
        skip: reason the implementation is not run (a JSON line still says why).
    """

    name: str
    problem: Problem
    steps: int
    forward: Callable | None
    grad_steps: int | None = None
    cost: Callable | None = None
    error_ref: str = "discrete"
    fit_steps: int | None = None
    forward_small: Callable | None = None
    notes: dict[str, Any] = dataclasses.field(default_factory=dict)
    skip: str | None = None


# ------------------------------------------------------------------------ helpers
def sensor_fn(problem: Problem):
    """H: state -> sensor values (a gather, differentiable)."""
    idx = tuple(jnp.asarray(i) for i in problem.sensor_index())
    return lambda u: u[idx]


def stencil_laplacian(problem: Problem):
    r"""Periodic 3/5-point $\nabla\cdot(\kappa\nabla u)$ written with ``jnp.roll``.

    Independent of dphys's operators. A field κ is averaged onto faces
    ($\kappa_{i+1/2} = (\kappa_i+\kappa_{i+1})/2$), the conservative form of P6.
    """
    dx2 = (1.0 / problem.n) ** 2
    axes = tuple(range(problem.ndim))

    def lap(u, kappa):
        if jnp.ndim(kappa) == 0:
            out = sum(jnp.roll(u, 1, a) + jnp.roll(u, -1, a) for a in axes)
            return kappa * (out - 2 * problem.ndim * u) / dx2
        out = jnp.zeros_like(u)
        for a in axes:
            kf = 0.5 * (kappa + jnp.roll(kappa, -1, a))  # face i+1/2
            flux = kf * (jnp.roll(u, -1, a) - u)
            out = out + flux - jnp.roll(flux, 1, a)
        return out / dx2

    return lap


def scan_impl(
    name, problem, make_step, steps, grad_steps, y, *, error_ref="discrete", **kw
):
    """An :class:`Impl` from ``make_step(kappa) -> (u -> u)``: one lax.scan per run.

    The cost runs ``len(y)`` segments of ``every`` steps and records ``H u`` after each;
    its gradient is plain ``jax.grad`` through the loops (every step stored).
    """
    H = sensor_fn(problem)
    every = problem.obs_every(grad_steps)

    def forward(u0, kappa):
        return _measure.scan_steps(make_step(kappa), u0, steps)

    def cost(u0, kappa):
        return _measure.segment_misfit(make_step(kappa), u0, every, H, y)

    return Impl(
        name,
        problem,
        steps,
        forward,
        grad_steps,
        cost,
        error_ref=error_ref,
        **kw,
    )


# -------------------------------------------------------------------------- dphys
def dphys_impl(
    name,
    problem: Problem,
    steps: int,
    grad_steps: int,
    y,
    *,
    fast_forward=None,
    solver=None,
    adjoint=None,
    error_ref="discrete",
    notes=None,
):
    """dphys.simulate on pdes.Heat, forward to the final state and the P5 cost."""
    import dphys
    import pdes

    grid = dphys.Grid(problem.shape, lengths=1.0, boundary="periodic")
    cls = dphys.BackwardEuler if problem.theta == 1.0 else dphys.CrankNicolson
    stepper = cls() if solver is None else cls(solver=solver)
    adjoint = dphys.Checkpointed() if adjoint is None else adjoint
    H = sensor_fn(problem)
    every = problem.obs_every(grad_steps)

    def forward(u0, kappa):
        traj = dphys.simulate(
            pdes.Heat(grid, kappa),
            stepper,
            u0,
            dt=problem.dt,
            n_steps=steps,
            fast_forward=fast_forward,
            adjoint=adjoint,
        )
        return traj.final

    def cost(u0, kappa):
        traj = dphys.simulate(
            pdes.Heat(grid, kappa),
            stepper,
            u0,
            dt=problem.dt,
            n_steps=every * len(y),
            saveat=dphys.SaveAt(t1=False, every=every, fn=lambda t, u: H(u)),
            fast_forward=fast_forward,
            adjoint=adjoint,
        )
        return jnp.sum((traj.ys - y) ** 2)

    info = {
        "stepper": problem.stepper_name,
        "fast_forward": fast_forward,
        "solver": type(stepper.solver).__name__,
        "adjoint": repr(adjoint),
    }
    info.update(notes or {})
    return Impl(
        name,
        problem,
        steps,
        forward,
        grad_steps,
        cost,
        error_ref=error_ref,
        notes=info,
    )


# ------------------------------------------------------------------------- jax-cg
def cg_impl(problem, steps, grad_steps, y, *, tol=1e-10, error_ref="discrete"):
    """jax.scipy.sparse.linalg.cg per step, warm-started, differentiated by jax.grad."""
    from jax.scipy.sparse.linalg import cg

    lap = stencil_laplacian(problem)
    theta, dt = problem.theta, problem.dt

    def make_step(kappa):
        def matvec(v):
            return v - theta * dt * lap(v, kappa)

        def step(u):
            rhs = u if theta == 1.0 else u + (1 - theta) * dt * lap(u, kappa)
            x, _ = cg(matvec, rhs, x0=u, tol=tol, maxiter=2000)
            return x

        return step

    return scan_impl(
        "jax-cg",
        problem,
        make_step,
        steps,
        grad_steps,
        y,
        error_ref=error_ref,
        notes={"tol": tol, "x0": "previous state", "grad": "jax.grad through scan"},
    )


# ----------------------------------------------------------------------- dense LU
def dense_lu_impl(problem, steps, grad_steps, y, *, fit_steps=None):
    """Dense (I - θΔt L) factored once per call (lu_factor), one lu_solve per step."""
    import jax.scipy.linalg as jsl

    if problem.ndim != 1:
        size = problem.n**problem.ndim
        gb = size * size * 8 / 1e9
        return Impl(
            "dense-lu",
            problem,
            steps,
            None,
            skip=f"dense {size}x{size} float64 matrix is {gb:.1f} GB: does not fit",
        )
    n, dt, theta = problem.n, problem.dt, problem.theta
    eye = np.eye(n)
    lap_unit = (np.roll(eye, 1, 0) + np.roll(eye, -1, 0) - 2 * eye) * n * n

    def make_step(kappa):
        lmat = kappa * jnp.asarray(lap_unit)
        lu = jsl.lu_factor(jnp.eye(n) - theta * dt * lmat)
        if theta == 1.0:
            return lambda u: jsl.lu_solve(lu, u)
        bmat = jnp.eye(n) + (1 - theta) * dt * lmat
        return lambda u: jsl.lu_solve(lu, bmat @ u)

    impl = scan_impl(
        "dense-lu",
        problem,
        make_step,
        steps,
        grad_steps,
        y,
        notes={"factor": "jax.scipy.linalg.lu_factor once per call"},
    )
    if fit_steps is not None:
        impl.fit_steps = fit_steps
        impl.forward_small = lambda u0, kappa: _measure.scan_steps(
            make_step(kappa), u0, fit_steps
        )
    return impl


# ------------------------------------------------------------------------ exponax
def exponax_impl(problem, steps, grad_steps, y):
    """exponax.stepper.Diffusion (ETDRK0, exact in time) with the benchmark's dt."""
    if problem.variable:
        return Impl(
            "exponax",
            problem,
            steps,
            None,
            skip="exponax has no variable-coefficient diffusion stepper",
        )
    try:
        import exponax
    except ImportError as err:
        return Impl(
            "exponax", problem, steps, None, skip=f"{err}; pip install -e '.[bench]'"
        )

    def make_step(kappa):
        stepper = exponax.stepper.Diffusion(
            problem.ndim,
            1.0,
            problem.n,
            problem.dt,
            diffusivity=kappa * jnp.ones(problem.ndim),
        )
        return lambda u: stepper(u[None])[0]

    return scan_impl(
        "exponax",
        problem,
        make_step,
        steps,
        grad_steps,
        y,
        error_ref="pde",
        notes={"scheme": "ETDRK0: exact exponential of the spectral Laplacian"},
    )


# ------------------------------------------------------------------------ diffrax
def _trapezoid_class():
    """A Crank-Nicolson (trapezoidal) two-stage ESDIRK for diffrax."""
    import diffrax
    import optimistix as optx

    trapezoid_tableau = diffrax.ButcherTableau(
        a_lower=(np.array([0.5]),),
        a_predictor=(np.array([1.0]),),
        a_diagonal=np.array([0.0, 0.5]),
        b_sol=np.array([0.5, 0.5]),
        b_error=np.array([0.5, -0.5]),  # trapezoid minus backward Euler
        c=np.array([1.0]),
    )

    class Trapezoid(diffrax.AbstractESDIRK):
        tableau: ClassVar = trapezoid_tableau
        interpolation_cls: ClassVar = (
            diffrax.ThirdOrderHermitePolynomialInterpolation.from_k
        )
        root_finder: optx.AbstractRootFinder = optx.Newton(rtol=1e-8, atol=1e-8)
        root_find_max_steps: int = 10

        def order(self, terms):
            return 2

    return Trapezoid


def diffrax_impl(problem, steps, grad_steps, y, *, error_ref="discrete", notes=None):
    """diffrax MOL: implicit solver + Newton with matrix-free GMRES, checkpointed."""
    import diffrax
    import lineax as lx
    import optimistix as optx

    lap = stencil_laplacian(problem)
    dt = problem.dt
    H = sensor_fn(problem)
    # GMRES restart tuned on this CPU over {3, 5, 10, 20, 40}: lineax's GMRES costs
    # grow quickly with the restart length (P2: 1.5 s/step at 40, 0.06 s/step at 3),
    # and these well-conditioned systems converge in a few iterations anyway.
    restart = 10 if problem.ndim == 1 else 3
    root_finder = optx.Newton(
        rtol=1e-8,
        atol=1e-8,
        linear_solver=lx.GMRES(rtol=1e-10, atol=1e-10, restart=restart),
    )
    if problem.theta == 1.0:
        solver = diffrax.ImplicitEuler(root_finder=root_finder)
    else:
        solver = _trapezoid_class()(root_finder=root_finder)
    term = diffrax.ODETerm(lambda t, u, kappa: lap(u, kappa))

    def solve(u0, kappa, n_steps, saveat):
        return diffrax.diffeqsolve(
            term,
            solver,
            t0=0.0,
            t1=n_steps * dt,
            dt0=dt,
            y0=u0,
            args=kappa,
            saveat=saveat,
            stepsize_controller=diffrax.ConstantStepSize(),
            adjoint=diffrax.RecursiveCheckpointAdjoint(),
            max_steps=n_steps + 1,
        ).ys

    def forward(u0, kappa):
        return solve(u0, kappa, steps, diffrax.SaveAt(t1=True))[0]

    obs_steps = problem.obs_steps(grad_steps)[: len(y)]
    ts = jnp.asarray(obs_steps, dtype=float) * dt

    def cost(u0, kappa):
        ys = solve(u0, kappa, obs_steps[-1], diffrax.SaveAt(ts=ts))
        hs = jax.vmap(H)(ys)
        return jnp.sum((hs - y) ** 2)

    info = {
        "solver": type(solver).__name__,
        "root_finder": "optimistix.Newton(rtol=atol=1e-8)",
        "linear_solver": f"lineax.GMRES(rtol=atol=1e-10, restart={restart})",
        "adjoint": "RecursiveCheckpointAdjoint",
    }
    info.update(notes or {})
    return Impl(
        "diffrax",
        problem,
        steps,
        forward,
        grad_steps,
        cost,
        error_ref=error_ref,
        notes=info,
    )


def diffrax_verychord_pitfall(problem: Problem) -> str:
    """Try diffrax's default root finder (VeryChord) with a matrix-free GMRES.

    Returns the outcome (an error message or "ok") on a tiny copy of ``problem``.
    """
    import diffrax
    import lineax as lx

    small = dataclasses.replace(
        problem,
        n=16,
        kappa=kappa_field_p6(16) if problem.variable else problem.kappa,
    )
    lap = stencil_laplacian(small)
    solver = diffrax.Kvaerno3(
        root_finder=diffrax.VeryChord(
            rtol=1e-8, atol=1e-8, linear_solver=lx.GMRES(rtol=1e-10, atol=1e-10)
        )
    )
    u0 = jnp.asarray(small.u0())
    try:
        jax.block_until_ready(
            jax.jit(
                lambda u: (
                    diffrax.diffeqsolve(
                        diffrax.ODETerm(lambda t, v, k: lap(v, k)),
                        solver,
                        0.0,
                        2 * small.dt,
                        small.dt,
                        u,
                        args=jnp.asarray(small.kappa),
                        stepsize_controller=diffrax.ConstantStepSize(),
                    ).ys
                )
            )(u0)
        )
        return "ok"
    except Exception as err:  # noqa: BLE001 - we report whatever diffrax raises
        msg = str(err).strip().splitlines()
        return (
            f"{type(err).__name__}: ... {msg[-1][-120:]}" if msg else type(err).__name__
        )


def diffrax_dense_adjoint_pitfall(problem: Problem) -> dict[str, Any]:
    """Count dense ``lu`` factorisations and n x n arrays in diffrax's backward pass.

    Traces (does not run) ``grad`` of a 2-step solve on a 64-point copy of ``problem``
    (1D) and searches the jaxpr for the ``lu`` primitive: optimistix's default
    ``ImplicitAdjoint`` materialises the Jacobian and factorises it at every implicit
    stage, whatever linear solver the forward pass used.
    """
    import re

    small = dataclasses.replace(problem, n=64, ndim=1, kappa=1e-3, theta=problem.theta)
    u0 = jnp.asarray(small.u0())
    y = jnp.zeros((2, min(small.n_sensors, small.n)))
    impl = diffrax_impl(small, 2, 2, y)
    jaxpr = str(jax.make_jaxpr(jax.grad(impl.cost, argnums=1))(u0, 1e-3))
    fwd = str(jax.make_jaxpr(impl.cost)(u0, 1e-3))
    dense = f"[{small.n},{small.n}]"
    return {
        # `lu` equations in the traced program (each inside the per-step loop body)
        "backward_lu_eqns": len(re.findall(r" = lu\b", jaxpr)),
        "forward_lu_eqns": len(re.findall(r" = lu\b", fwd)),
        "backward_dense_nxn_arrays": jaxpr.count(dense),
        "forward_dense_nxn_arrays": fwd.count(dense),
    }
