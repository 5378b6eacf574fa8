r"""The implicit solve of :class:`pdes.ShallowWater`: Helmholtz-preconditioned GMRES.

The constant-depth, non-rotating part of the implicit system reduces to a Helmholtz
equation for $\eta$ that one FFT/DCT pair solves exactly
(:func:`_helmholtz_solve`); :class:`HelmholtzKrylov` uses it as the preconditioner of
GMRES on the full coupled system.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.fft as jsfft
import optax.tree_utils as otu

import dphys
from dphys._tree import axpy

from . import _cgrid as cg
from ._shallow_water import ShallowWater, SWState


class HelmholtzKrylov(dphys.AbstractLinearSolver):
    r"""GMRES for $(I-\gamma L)x=b$ preconditioned by an exact Helmholtz solve.

    The preconditioner is the exact inverse of $I-\gamma L_0$, where $L_0$ is
    :class:`ShallowWater`'s operator with the depth replaced by its mean $\bar H$,
    no rotation and the mean drag $\bar r$. Eliminating the velocities,

    $$ \big(I - \alpha\,D G\big)\,\eta = b_\eta - \gamma\bar H s\,D b_{\mathbf u},
       \qquad \mathbf u = s\,(b_{\mathbf u} - \gamma g\,G\eta),\qquad
       s = \frac{1}{1+\gamma\bar r},\quad \alpha = \gamma^2 g\bar H s, $$

    and the Helmholtz operator $I-\alpha DG$ is diagonal in the Fourier basis along
    periodic axes and the DCT-II basis along walled axes (cell-centred Neumann
    Laplacian), so one FFT/DCT pair solves it exactly. GMRES then only has to
    correct for variable depth, rotation and the $\beta$ effect, which takes a few
    iterations when $\gamma f \lesssim 1$ however large the gravity-wave Courant
    number is (the generic :class:`dphys.Krylov` needs iterations
    growing with that Courant number).

    GMRES (:func:`dphys.krylov_solve`: left-preconditioned, restarted, starting
    from $x_0 = Mb$) works on the energy-scaled unknowns $z = (\sqrt g\,\eta,
    \sqrt{\bar H}u, \sqrt{\bar H}v)$, in which every component has the same units
    and the operator is skew for constant depth, and stops on the norm of the true
    residual, $\|b_z - A z\|_2 \le \mathrm{atol} + \mathrm{rtol}\,\|b_z\|_2$. The
    Arnoldi process stops as soon as the preconditioned residual is small, so a step
    costs only the iterations it needs.

    After GMRES, $\eta$ is recomputed from the continuity equation,
    $\eta = b_\eta + \gamma L_\eta(\mathbf u)$, so the discrete mass balance holds
    to round-off whatever the solver tolerance.

    Derivatives: ``lineax.linear_solve`` (implicit function theorem: one tangent or
    one transposed solve per step, with the transposed preconditioner; memory
    independent of the iteration count). An unconverged tangent or adjoint solve
    raises; an unconverged forward solve gives ``RESULTS.linear_solve_failed``.

    :class:`dphys.Auto` picks this solver for :class:`ShallowWater` whenever the FFT
    does not apply (walls, variable depth or drag, beta-plane), through
    :meth:`ShallowWater.preferred_solver`.

    Attributes:
        rtol, atol: stopping tolerances on the energy-scaled residual (2-norm; atol
            in m^{3/2}/s, default 0). The relative test makes tangent and adjoint
            solves as accurate as the forward one whatever their scale. ``rtol`` is
            raised to the rounding level of the state's dtype (float64: 2.2e-15,
            float32: about 1e-5; see :func:`dphys.krylov_solve`).
        restart: Arnoldi steps per GMRES cycle (memory: ``restart + 1`` vectors).
        max_steps: cap on Arnoldi steps (products with $I-\gamma L$) per solve;
            reaching it is a failed solve.
    """

    rtol: float = eqx.field(static=True, default=1e-10)
    atol: float = eqx.field(static=True, default=0.0)
    restart: int = eqx.field(static=True, default=5)
    max_steps: int = eqx.field(static=True, default=200)

    def __check_init__(self):
        # The same option checks (and messages) as dphys.Krylov's.
        dphys.Krylov(
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            restart=self.restart,
        )

    def check(self, model, like):
        # The coefficients of L are the wrapped ShallowWater's (see
        # dphys.AbstractModel.unwrapped); added explicit terms or forcings do not
        # change the implicit system.
        if not isinstance(model.unwrapped, ShallowWater):
            raise ValueError(
                "`HelmholtzKrylov()` solves pdes.ShallowWater's implicit systems only, "
                f"got {type(model).__name__}; use `dphys.Krylov()` for other models."
            )

    def init(self, model, t, like):
        return None

    def _coefficients(self, model, gamma, like):
        r"""$(\bar H, g, \bar r, \gamma)$ for the preconditioner, without derivatives.

        Computed outside the preconditioner's closure: lineax refuses options that
        carry tangents, and the preconditioner does not change the solution.
        """
        sg = jax.lax.stop_gradient
        model = model.unwrapped
        hbar = jnp.mean(model._depth_field(like))
        g = model._p(model.g, like)
        rbar = jnp.mean(model._p(model.drag, like))
        gamma = jnp.asarray(gamma).astype(like.dtype)
        return tuple(sg(c) for c in (hbar, g, rbar, gamma))

    def precondition(self, model, coefficients, b):
        r"""Apply the exact inverse of $I-\gamma L_0$ (see the class docstring)."""
        hbar, g, rbar, gamma = coefficients
        model = model.unwrapped
        grid = model.grid
        eta = b.eta
        masks = model._masks(eta)
        s = 1.0 / (1.0 + gamma * rbar)
        alpha = gamma**2 * g * hbar * s
        bu, bv = b.u * masks[0], b.v * masks[1]
        rhs = eta - gamma * hbar * s * cg.divergence(grid, bu, bv, masks)
        lam = jnp.asarray(cg.laplacian_eigenvalues(grid), eta.dtype)
        new_eta = _helmholtz_solve(grid, rhs, 1.0 - alpha * lam)
        gx, gy = cg.gradient(grid, new_eta, masks)
        # Wall-face entries are outside the dynamics (L maps them to zero, so the
        # system there is the identity): pass them through, which keeps M invertible.
        walls_u, walls_v = b.u * (1.0 - masks[0]), b.v * (1.0 - masks[1])
        return SWState(
            new_eta,
            s * (bu - gamma * g * gx) + walls_u,
            s * (bv - gamma * g * gy) + walls_v,
        )

    def solve(self, model, t, gamma, rhs, structure):
        coefficients = self._coefficients(model, gamma, rhs.eta)
        hbar, g = coefficients[0], coefficients[1]
        # Energy scaling z = (sqrt(g) eta, sqrt(H) u, sqrt(H) v): all components in
        # the same units and size, and L becomes skew for constant depth.
        scale = SWState(jnp.sqrt(g), jnp.sqrt(hbar), jnp.sqrt(hbar))
        to_z = lambda x: otu.tree_mul(x, scale)
        from_z = lambda z: otu.tree_div(z, scale)
        rhs_z = to_z(rhs)

        def mv(z):
            lz = to_z(model.linear(t, from_z(z)))
            return axpy(-gamma, lz, z)

        def precond(z):
            return to_z(self.precondition(model, coefficients, from_z(z)))

        x, result, steps = dphys.krylov_solve(
            mv,
            rhs_z,
            method="gmres",
            preconditioner=precond,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
            restart=self.restart,
            initial_guess="preconditioned",
        )
        x = from_z(x)
        # Mass to round-off: eta from the continuity row with the solved velocities.
        eta = rhs.eta + gamma * model.linear(t, x).eta
        return SWState(eta, x.u, x.v), result, steps


def _helmholtz_solve(grid: dphys.Grid, rhs, symbol):
    """Solve ``symbol * transform(x) = transform(rhs)`` (DCT-II on walls, rFFT else)."""
    walls = [a - grid.ndim for a in range(grid.ndim) if grid.boundary[a] == cg.WALL]
    periodic = [a - grid.ndim for a in range(grid.ndim) if grid.boundary[a] != cg.WALL]
    x = rhs
    for ax in walls:
        x = jsfft.dct(x, type=2, axis=ax, norm="ortho")
    if periodic:
        xh = jnp.fft.rfftn(x, axes=periodic)
        xh = xh / symbol
        x = jnp.fft.irfftn(
            xh, s=[grid.shape[a] for a in periodic], axes=periodic
        ).astype(rhs.dtype)
    else:
        x = x / symbol
    for ax in walls:
        x = jsfft.idct(x, type=2, axis=ax, norm="ortho")
    return x


__all__ = ["HelmholtzKrylov"]
