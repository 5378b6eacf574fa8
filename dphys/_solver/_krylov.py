"""Matrix-free Krylov solves: our CG, GMRES and BiCGStab as lineax solvers."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.linalg
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optax.tree_utils as otu

from .._results import RESULTS
from .._tree import axpy
from ._base import AbstractLinearSolver
from ._probes import probe_diagonal


# ---------------------------------------------------------------------- Krylov methods
#
# Our own CG, GMRES and BiCGStab, written as lineax solvers so that
# ``lineax.linear_solve`` gives their derivative by the implicit function theorem (one
# tangent or one transposed solve, with the transposed preconditioner). All three stop
# on the 2-norm of the true residual relative to the right-hand side,
# ||b - Ax||_2 <= atol + rtol ||b||_2 (as jax.scipy.sparse.linalg.cg and SciPy do), and
# start from a guess computed from the right-hand side they are given, so tangent and
# transposed solves start from a guess for *their* right-hand side. lineax's own solvers
# test every component against atol + rtol |b_i| (a zero crossing of b makes that test
# absolute there), its CG also requires the last update to be small, and its GMRES
# tests convergence only after a full restart cycle and always runs at least two: on
# P6 of benchmarks/README.md and on 2D advection with velocity fields each cost several
# times the iterations needed (docs/design.md).

INITIAL_GUESSES: tuple[str, ...] = ("rhs", "preconditioned", "zero")


def _initial_guess(kind: str, b, apply_m):
    if kind == "rhs":
        return b
    if kind == "preconditioned":
        return b if apply_m is None else apply_m(b)
    return otu.tree_zeros_like(b)


# Vector algebra on pytrees of arrays (optax.tree_utils and dphys._tree). The kernels
# below work on the state's own pytree: flattening it into one vector (ravel_pytree)
# would copy every field at every product with A and cost about as much as the
# product itself on a 2D stencil. Inner products are summed with
# Precision.HIGHEST (tree_vdot).


def _nonzero(a):
    return jnp.where(a != 0, a, 1.0)


def _cg(apply_a, apply_m, b, x0, rtol, atol, max_steps):
    """Preconditioned CG on pytrees; returns ``(x, converged, steps)``.

    ``apply_m=None`` is no preconditioner. Convergence is decided on the true
    residual: when the recursively updated one meets the target, ``b - Ax`` is
    recomputed and, should rounding have made the two differ, CG restarts from there
    (so a reported success is a real one).
    """
    target2 = (atol + rtol * jnp.sqrt(otu.tree_vdot(b, b))) ** 2

    def run(x, r, steps):
        z = r if apply_m is None else apply_m(r)
        rz = otu.tree_vdot(r, z)
        rr = rz if apply_m is None else otu.tree_vdot(r, r)

        def cond(carry):
            *_, rr, k = carry
            return (rr > target2) & (k < max_steps)

        def body(carry):
            x, r, p, rz, _, k = carry
            ap = apply_a(p)
            alpha = rz / _nonzero(otu.tree_vdot(p, ap))
            x = axpy(alpha, p, x)
            r = axpy(-alpha, ap, r)
            z = r if apply_m is None else apply_m(r)
            rz_new = otu.tree_vdot(r, z)
            rr = rz_new if apply_m is None else otu.tree_vdot(r, r)
            p = axpy(rz_new / _nonzero(rz), p, z)
            return x, r, p, rz_new, rr, k + 1

        x, *_, steps = jax.lax.while_loop(cond, body, (x, r, z, rz, rr, steps))
        return x, steps

    return _verified(run, apply_a, b, x0, target2, max_steps)


def _verified(run, apply_a, b, x0, target2, max_steps):
    """Run ``run(x, r, steps) -> (x, steps)`` until the true residual is small."""

    def outer_cond(carry):
        _, r, steps = carry
        return (otu.tree_vdot(r, r) > target2) & (steps < max_steps)

    def outer_body(carry):
        x, r, steps = carry
        x, steps = run(x, r, steps)
        return x, otu.tree_sub(b, apply_a(x)), steps

    carry = (x0, otu.tree_sub(b, apply_a(x0)), jnp.asarray(0))
    x, r, steps = jax.lax.while_loop(outer_cond, outer_body, carry)
    return x, otu.tree_vdot(r, r) <= target2, steps


def _bicgstab(apply_a, apply_m, b, x0, rtol, atol, max_steps):
    """Right-preconditioned BiCGStab on pytrees; returns ``(x, converged, steps)``.

    van der Vorst's iteration on $AM\\,y = b$, $x = My$, so the recursively updated
    residual is that of the original system. A breakdown ($\\hat r_0\\cdot r$ or
    $\\hat r_0\\cdot v$ at rounding level) ends the sweep; like CG, convergence is
    decided on the true residual, and a sweep that stopped short restarts from it
    with a fresh shadow residual. ``steps`` counts iterations (two products with $A$
    each).
    """
    target2 = (atol + rtol * jnp.sqrt(otu.tree_vdot(b, b))) ** 2
    dtype = jtu.tree_leaves(b)[0].dtype
    eps = jnp.finfo(dtype).eps
    precondition = (lambda v: v) if apply_m is None else apply_m

    def run(x, r, steps):
        rhat = r
        rhat_norm = jnp.sqrt(otu.tree_vdot(rhat, rhat))
        zero = otu.tree_zeros_like(r)
        one = jnp.ones((), dtype)

        def cond(carry):
            *_, rr, k, broken = carry
            return (rr > target2) & (k < max_steps) & ~broken

        def body(carry):
            x, r, p, v, rho_old, alpha, omega, _, k, _ = carry
            rho = otu.tree_vdot(rhat, r)
            beta = (rho / _nonzero(rho_old)) * (alpha / _nonzero(omega))
            p = axpy(beta, axpy(-omega, v, p), r)
            phat = precondition(p)
            v = apply_a(phat)
            rv = otu.tree_vdot(rhat, v)
            alpha = rho / _nonzero(rv)
            s = axpy(-alpha, v, r)
            shat = precondition(s)
            t = apply_a(shat)
            omega = otu.tree_vdot(t, s) / _nonzero(otu.tree_vdot(t, t))
            x = axpy(omega, shat, axpy(alpha, phat, x))
            r = axpy(-omega, t, s)
            rr = otu.tree_vdot(r, r)
            tiny = eps * rhat_norm
            broken = (jnp.abs(rho) <= tiny * jnp.sqrt(otu.tree_vdot(p, p))) | (
                jnp.abs(rv) <= tiny * jnp.sqrt(otu.tree_vdot(v, v))
            )
            broken = broken | (omega == 0) | ~jnp.isfinite(rr)
            return x, r, p, v, rho, alpha, omega, rr, k + 1, broken

        carry = (
            x,
            r,
            zero,
            zero,
            one,
            one,
            one,
            otu.tree_vdot(r, r),
            steps,
            jnp.asarray(False),
        )
        out = jax.lax.while_loop(cond, body, carry)
        return out[0], out[8]

    return _verified(run, apply_a, b, x0, target2, max_steps)


def _gmres(apply_a, apply_m, b, x0, rtol, atol, restart, max_steps):
    """Restarted, left-preconditioned GMRES on pytrees; ``(x, converged, steps)``.

    Each cycle runs Arnoldi on $MA$ (modified Gram-Schmidt against the ``k + 1``
    vectors built so far only, a loop of dynamic length, so an early-stopping cycle
    costs what it uses) with Givens rotations, until the preconditioned residual
    estimate has dropped by the factor the true residual still needs, or for
    ``restart`` steps; the cycle ends with the true residual $b - Ax$, which decides
    convergence. ``steps`` counts Arnoldi steps (products with $A$ inside cycles) and
    is capped by ``max_steps`` in total. The Krylov basis is stored as one pytree
    with a leading axis of ``restart + 1``.
    """
    dtype = jtu.tree_leaves(b)[0].dtype
    hi = jax.lax.Precision.HIGHEST
    precondition = (lambda v: v) if apply_m is None else apply_m
    positive = lambda a: jnp.where(a > 0, a, 1.0)
    target = atol + rtol * jnp.sqrt(otu.tree_vdot(b, b))

    def cycle(x, r, steps):
        z = precondition(r)
        beta = jnp.sqrt(otu.tree_vdot(z, z))
        # Reduce the preconditioned residual by the factor the true one still needs
        # (with a margin of 2); every cycle takes at least one step, so a cycle that
        # starts below this target still makes progress.
        inner_target = 0.5 * beta * target / positive(jnp.sqrt(otu.tree_vdot(r, r)))
        limit = jnp.minimum(restart, max_steps - steps)
        basis = jtu.tree_map(
            lambda a: (
                jnp.zeros((restart + 1,) + a.shape, dtype).at[0].set(a / positive(beta))
            ),
            z,
        )
        row = lambda basis, i: jtu.tree_map(lambda v: v[i], basis)
        hess = jnp.zeros((restart + 1, restart), dtype)
        cs = jnp.zeros(restart, dtype)
        sn = jnp.zeros(restart, dtype)
        g = jnp.zeros(restart + 1, dtype).at[0].set(beta)

        def cond(carry):
            k, _, _, _, _, g = carry
            return (k < limit) & ((k == 0) | (jnp.abs(g[k]) > inner_target))

        def body(carry):
            k, basis, hess, cs, sn, g = carry
            w = precondition(apply_a(row(basis, k)))

            def orthogonalise(i, wc):
                w, col = wc
                v = row(basis, i)
                h = otu.tree_vdot(v, w)
                return axpy(-h, v, w), col.at[i].add(h)

            col = jnp.zeros(restart + 1, dtype)
            w, col = jax.lax.fori_loop(0, k + 1, orthogonalise, (w, col))
            hn = jnp.sqrt(otu.tree_vdot(w, w))
            basis = jtu.tree_map(
                lambda v, a: v.at[k + 1].set(a / positive(hn)), basis, w
            )
            col = col.at[k + 1].set(hn)

            def rotate(i, col):
                a, c = col[i], col[i + 1]
                return (
                    col.at[i]
                    .set(cs[i] * a + sn[i] * c)
                    .at[i + 1]
                    .set(-sn[i] * a + cs[i] * c)
                )

            col = jax.lax.fori_loop(0, k, rotate, col)
            a, c = col[k], col[k + 1]
            rr = jnp.hypot(a, c)
            c_k, s_k = jnp.where(rr > 0, a / positive(rr), 1.0), c / positive(rr)
            col = col.at[k].set(rr).at[k + 1].set(0.0)
            cs, sn = cs.at[k].set(c_k), sn.at[k].set(s_k)
            g = g.at[k + 1].set(-s_k * g[k]).at[k].set(c_k * g[k])
            return k + 1, basis, hess.at[:, k].set(col), cs, sn, g

        k, basis, hess, _, _, g = jax.lax.while_loop(
            cond, body, (jnp.asarray(0), basis, hess, cs, sn, g)
        )
        # Least squares on the k columns built: the triangular system padded with the
        # identity on the unused ones.
        used = jnp.arange(restart) < k
        tri = jnp.where(
            used[:, None] & used[None, :], hess[:restart], jnp.eye(restart, dtype=dtype)
        )
        y = jax.scipy.linalg.solve_triangular(
            tri, jnp.where(used, g[:restart], 0.0), lower=False
        )
        update = jtu.tree_map(
            lambda v: jnp.tensordot(y, v[:restart], axes=1, precision=hi), basis
        )
        x = otu.tree_add(x, update)
        return x, otu.tree_sub(b, apply_a(x)), steps + k

    def outer_cond(carry):
        _, r, steps = carry
        return (jnp.sqrt(otu.tree_vdot(r, r)) > target) & (steps < max_steps)

    def outer_body(carry):
        return cycle(*carry)

    carry = (x0, otu.tree_sub(b, apply_a(x0)), jnp.asarray(0))
    x, r, steps = jax.lax.while_loop(outer_cond, outer_body, carry)
    return x, jnp.sqrt(otu.tree_vdot(r, r)) <= target, steps


class _PytreeKrylov(lx.AbstractLinearSolver):
    """A ``lineax`` solver running one of the Krylov kernels above.

    ``options["preconditioner"]`` (a lineax operator $M\\approx A^{-1}$) is optional.
    The transposed solve (reverse mode) uses $A^T$ and $M^T$; tangent solves reuse
    $A$ and $M$. ``stats["num_steps"]`` counts iterations.
    """

    method: str = eqx.field(static=True)
    rtol: float = eqx.field(static=True)
    atol: float = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)
    restart: int = eqx.field(static=True)
    initial_guess: str = eqx.field(static=True)

    def init(self, operator, options):
        return lx.linearise(operator)

    def compute(self, state, vector, options):
        operator = state
        precond = options.get("preconditioner")
        apply_m = None if precond is None else precond.mv
        x0 = _initial_guess(self.initial_guess, vector, apply_m)
        if self.method == "gmres":
            x, converged, steps = _gmres(
                operator.mv,
                apply_m,
                vector,
                x0,
                self.rtol,
                self.atol,
                self.restart,
                self.max_steps,
            )
        else:
            kernel = _cg if self.method == "cg" else _bicgstab
            x, converged, steps = kernel(
                operator.mv, apply_m, vector, x0, self.rtol, self.atol, self.max_steps
            )
        result = lx.RESULTS.where(
            converged, lx.RESULTS.successful, lx.RESULTS.max_steps_reached
        )
        return x, result, {"num_steps": steps}

    def transpose(self, state, options):
        out = {}
        if options.get("preconditioner") is not None:
            out["preconditioner"] = options["preconditioner"].transpose()
        return state.transpose(), out

    def conj(self, state, options):
        return state, options  # real operators only

    def assume_full_rank(self):
        return True


def _stop_gradient_arrays(tree):
    return jtu.tree_map(
        lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, tree
    )


def krylov_solve(
    matvec,
    rhs,
    *,
    method: Literal["cg", "gmres", "bicgstab"] = "gmres",
    preconditioner=None,
    rtol: float = 1e-10,
    atol: float = 0.0,
    max_steps: int = 500,
    restart: int = 10,
    initial_guess: Literal["rhs", "preconditioned", "zero"] = "rhs",
):
    r"""Solve $A x = b$ matrix-free by preconditioned CG, GMRES or BiCGStab.

    The building block of :class:`Krylov` (and of model-specific solvers such as
    ``pdes.HelmholtzKrylov``). Its CG, GMRES and BiCGStab are ours and stop when

    $$ \|b - A x\|_2 \le \mathrm{atol} + \mathrm{rtol}\,\|b\|_2 $$

    on the true residual (the 2-norm over all leaves of the pytree). ``rtol`` is
    raised to the rounding level of ``rhs``'s dtype, below which the computed
    residual is noise: $10\varepsilon$ in float64 ($2.2\times10^{-15}$), where only
    an explicit request reaches it, and $100\varepsilon$ in float32 (about
    $1.2\times10^{-5}$), where the default 1e-10 does, so the margin over the noise
    $\varepsilon\,\|A\|$ is wider. GMRES is left-preconditioned and
    restarted; each cycle stops its Arnoldi process as soon as the preconditioned
    residual is small enough, so a solve costs the iterations it needs and a long
    ``restart`` only costs memory (``restart + 1`` vectors) and orthogonalisation
    (modified Gram-Schmidt: $O(k^2)$ vector operations over a cycle of $k$ steps).
    BiCGStab is right-preconditioned and restarts after a breakdown.

    The stopping test is on the solution of the linear system, not on what a
    derivative check needs: a Taylor test (:func:`dphys.testing.taylor_test`)
    resolves a cost to about $10^{-12}$ relative, so runs it checks need
    ``rtol`` $\lesssim 10^{-13}$, or the cost jumps by about ``rtol`` wherever the
    iteration count changes.

    Derivatives: ``lineax.linear_solve``'s implicit-function-theorem rule. With
    $x = A(p)^{-1}b$, the tangent is $A^{-1}(\dot b - \dot A x)$ and the adjoint
    $\bar b = A^{-T}\bar x$, $\bar p = -\bar b^T(\partial A/\partial p)\,x$: one
    Krylov solve each (the adjoint with $A^T$ and $M^T$), never a derivative of the
    iterations. Tangent and adjoint solves raise if they do not converge.

    Args:
        matvec: the linear map $x \mapsto Ax$ on pytrees shaped like ``rhs``; what it
            closes over (parameters, the time step) may be differentiated.
        rhs: right-hand side $b$ (a pytree of arrays).
        method: ``"cg"`` ($A$ symmetric positive definite), ``"gmres"`` or
            ``"bicgstab"``.
        preconditioner: ``None`` or a linear map $M \approx A^{-1}$ on the same
            pytrees (left preconditioning; for CG, $M$ must be symmetric positive
            definite). It never carries a derivative (its arrays are treated as
            constants): it changes the iterations, not the solution.
        rtol, atol: stopping tolerances (see above); not both zero.
        max_steps: cap on iterations: CG iterations and GMRES Arnoldi steps (one
            product with $A$ each), BiCGStab iterations (two each).
        restart: GMRES Arnoldi steps per cycle.
        initial_guess: $x_0 = b$ (``"rhs"``, good for $I - \gamma L$ with small
            $\gamma L$), $x_0 = Mb$ (``"preconditioned"``, good when $M$ is close to
            $A^{-1}$) or $0$. Computed from the right-hand side of each solve, so
            tangent and adjoint solves start from their own.

    Returns:
        ``(x, result, iterations)``: the solution (pytree like ``rhs``), a
        :class:`dphys.RESULTS` (``linear_solve_failed`` if the tolerance was not met
        within ``max_steps``) and the number of iterations.

    Example:
        >>> a = jnp.array([[4.0, 1.0], [2.0, 3.0]])
        >>> x, result, iters = krylov_solve(lambda v: a @ v, jnp.array([1.0, 2.0]))
        >>> bool(jnp.allclose(a @ x, jnp.array([1.0, 2.0])))
        True
        >>> bool(result == RESULTS.successful)
        True
    """
    if method not in ("cg", "gmres", "bicgstab"):
        raise ValueError(
            f"`method` must be 'cg', 'gmres' or 'bicgstab', got {method!r}."
        )
    if initial_guess not in INITIAL_GUESSES:
        raise ValueError(
            f"`initial_guess` must be one of {INITIAL_GUESSES}, got {initial_guess!r}."
        )
    _check_tolerances(rtol, atol, max_steps, restart)
    leaves = jtu.tree_leaves(rhs)
    eps = float(jnp.finfo(jnp.result_type(*leaves)).eps)
    rtol = max(float(rtol), (10 if eps < 1e-10 else 100) * eps)
    structure = jax.eval_shape(lambda: rhs)
    tags = (lx.symmetric_tag, lx.positive_semidefinite_tag) if method == "cg" else ()
    operator = lx.FunctionLinearOperator(matvec, structure, tags=tags)
    options = {}
    if preconditioner is not None:
        options["preconditioner"] = _stop_gradient_arrays(
            lx.FunctionLinearOperator(preconditioner, structure, tags=tags)
        )
    solver = _PytreeKrylov(
        method=method,
        rtol=rtol,
        atol=float(atol),
        max_steps=max_steps,
        restart=restart,
        initial_guess=initial_guess,
    )
    sol = lx.linear_solve(operator, rhs, solver, options=options, throw=False)
    result = RESULTS.where(
        sol.result == lx.RESULTS.successful,
        RESULTS.successful,
        RESULTS.linear_solve_failed,
    )
    return sol.value, result, jnp.asarray(sol.stats.get("num_steps", 0))


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, bool
    )


def _check_tolerances(rtol, atol, max_steps, restart) -> None:
    """Raise ``ValueError`` for bad Krylov options (shared by the solvers)."""
    for name, value in (("rtol", rtol), ("atol", atol)):
        if not _is_real(value) or not (0 <= value < float("inf")):
            raise ValueError(
                f"`{name}` must be a finite non-negative number, got {value!r}."
            )
    if rtol == 0 and atol == 0:
        raise ValueError(
            "`rtol` and `atol` are both zero: the solve could never stop. Give a "
            "relative tolerance, e.g. `rtol=1e-10`."
        )
    for name, value in (("max_steps", max_steps), ("restart", restart)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")


class Krylov(AbstractLinearSolver):
    r"""Matrix-free preconditioned Krylov solve of $(I-\gamma L)x = b$.

    CG for symmetric models, GMRES otherwise (or as chosen), through
    :func:`krylov_solve`: stops when $\|b - (I-\gamma L)x\|_2 \le \mathrm{atol} +
    \mathrm{rtol}\,\|b\|_2$, starting from $x_0 = b$. The derivative is the implicit
    function theorem's: one tangent or one transposed Krylov solve per step (with
    the transposed preconditioner), memory independent of the iteration count; an
    unconverged tangent or adjoint solve raises.

    Without a preconditioner every Krylov iterate stays in $b + \mathcal K$, whose
    residuals are $p(A)\,r_0$ with $p(0)=1$; for a flux-form operator
    ($\mathbf 1^T L = 0$ on a closed or periodic domain) $\mathbf 1^T r_0 = 0$ and so
    $\mathbf 1^T r = 0$: mass is conserved to round-off whatever the tolerance. A
    Jacobi preconditioner with a non-constant diagonal breaks this (mass to the
    tolerance only).

    Attributes:
        method: ``"cg"`` (needs a symmetric model), ``"gmres"`` or ``"bicgstab"``;
            ``None`` picks CG for symmetric models and GMRES otherwise.
        rtol, atol: stopping tolerances on the 2-norm of the residual, relative to
            that of $b$ and absolute (units of the state times sqrt(number of
            unknowns)); not both zero. The default ``atol=0`` makes tangent and
            adjoint solves as accurate as the forward one whatever their scale.
            ``rtol`` is raised to 10 (float64) or 100 (float32) machine epsilons
            of the state's dtype (see :func:`krylov_solve`). Taylor
            tests of a run need ``rtol`` $\lesssim 10^{-13}$ (see
            :func:`krylov_solve`).
        max_steps: cap on iterations per solve (CG iterations and GMRES Arnoldi
            steps, one product with $I-\gamma L$ each; BiCGStab iterations, two
            each); hitting it is reported as ``RESULTS.linear_solve_failed`` (and
            raises in the adjoint solve).
        preconditioner: ``None`` (default) or ``"jacobi"``: the inverse diagonal of
            $I-\gamma L$, from comb probes. The identity part keeps the smallest
            eigenvalue of $I-\gamma L$ at 1 whatever the coefficients, and dividing
            by a diagonal that varies in space spreads the cluster of smooth modes
            near 1, so Jacobi usually costs iterations: on P6 (benchmarks/README.md,
            Crank-Nicolson heat, $\kappa$ within a factor 3, $\gamma\kappa/\Delta
            x^2 \approx 0.7$) CG took 15.3 iterations per step with it and 7.3
            without; with $\kappa$ varying 400-fold, 68.6 and 29.4. It pays off
            when $\gamma|L| \gg 1$ everywhere with strongly varying coefficients
            (the same 400-fold field at 25 times the time step: 256 iterations per
            step with Jacobi; without, no convergence in 500). See
            ``docs/design.md``.
        restart: GMRES Arnoldi steps per cycle (memory: ``restart + 1`` vectors;
            a cycle of $k$ steps costs $O(k^2)$ vector operations to
            orthogonalise). The default 10 was the fastest of 5, 10, 20 and 40 on
            2D advection and closed-basin shallow water (5 stagnated on the
            latter's adjoint).
    """

    method: Literal["cg", "gmres", "bicgstab"] | None = eqx.field(
        static=True, default=None
    )
    rtol: float = eqx.field(static=True, default=1e-10)
    atol: float = eqx.field(static=True, default=0.0)
    max_steps: int = eqx.field(static=True, default=500)
    preconditioner: Literal["jacobi"] | None = eqx.field(static=True, default=None)
    restart: int = eqx.field(static=True, default=10)

    def __check_init__(self):
        if self.method not in (None, "cg", "gmres", "bicgstab"):
            raise ValueError(
                "`method` must be 'cg', 'gmres', 'bicgstab' or None, got "
                f"{self.method!r}."
            )
        if self.preconditioner not in (None, "jacobi"):
            raise ValueError(
                "`preconditioner` must be 'jacobi' or None, got "
                f"{self.preconditioner!r}."
            )
        _check_tolerances(self.rtol, self.atol, self.max_steps, self.restart)

    def _method(self, model):
        if self.method is not None:
            return self.method
        return "cg" if model.symmetric else "gmres"

    def check(self, model, like):
        if self._method(model) == "cg" and not model.symmetric:
            raise ValueError(
                "`Krylov(method='cg')` needs a symmetric operator but "
                f"{type(model).__name__} is not symmetric; use method='gmres' or "
                "'bicgstab'."
            )

    def init(self, model, t, like):
        if self.preconditioner == "jacobi":
            return probe_diagonal(model, t, like)
        return None

    def solve(self, model, t, gamma, rhs, structure):
        def mv(x):
            lx_ = model.linear(t, x)
            return axpy(-gamma, lx_, x)

        precond = None
        if structure is not None:
            pdiag = jtu.tree_map(lambda d: 1.0 / (1.0 - gamma * d), structure)
            precond = lambda x: otu.tree_mul(pdiag, x)
        return krylov_solve(
            mv,
            rhs,
            method=self._method(model),
            preconditioner=precond,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            restart=self.restart,
        )
