r"""Rotating shallow water on an Arakawa C-grid, linear and nonlinear, semi-implicit.

The model advances the surface elevation $\eta$ and the velocities $(u, v)$ of a
layer of fluid of rest depth $H(x, y)$ (total depth $h = H + \eta$):

$$
\begin{aligned}
\eta_t + \nabla\cdot(h\,\mathbf u) &= 0,\\
\mathbf u_t + (\mathbf u\cdot\nabla)\mathbf u + f\,\hat{\mathbf z}\times\mathbf u
  &= -g\nabla\eta - r\,\mathbf u - C_d\frac{|\mathbf u|\,\mathbf u}{h}
     + \frac{\boldsymbol\tau}{h},
\end{aligned}
$$

with $f = f_0 + \beta\,(y - y_c)$, a linear drag rate $r$, a quadratic drag
coefficient $C_d$ and a kinematic wind stress $\boldsymbol\tau$ (stress divided by the
water density). The linear model keeps only the terms linear about rest
($h\to H$ in the flux, no advection).

**Semi-implicit splitting** (see :class:`dphys.AbstractModel`): the implicit linear
part $L$ holds every gravity-wave term ($-g\nabla\eta$, $-\nabla\cdot(H\mathbf u)$),
the Coriolis force and the linear drag, so the time step is not limited by the
gravity-wave or inertial Courant numbers. The explicit part holds only what is
nonlinear: momentum advection, the flux $\nabla\cdot(\eta\,\mathbf u)$ (plus the
difference between the upwind and centred face depths), quadratic drag and, in the
nonlinear model, the wind. With :class:`dphys.IMEX` this is CN/AB2, second order.

See :class:`ShallowWater` for the grid layout, :mod:`pdes._cgrid` for the stencils
and :class:`pdes.HelmholtzKrylov` (:mod:`pdes._helmholtz`) for the implicit solve.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import dphys
from dphys._checks import check_positive

from . import _cgrid as cg


CONTINUITY_SCHEMES: tuple[str, ...] = ("upwind", "centered")
MOMENTUM_SCHEMES: tuple[str, ...] = ("advective", "vector_invariant")


class SWState(eqx.Module):
    r"""State of :class:`ShallowWater`: three arrays of the grid's shape.

    Attributes:
        eta: surface elevation $\eta$ at cell centres [m]; the total depth is
            $h = H + \eta$.
        u: $x$-velocity on the east face of each cell [m/s]. On an $x$ axis with
            walls, the last column ``u[..., -1]`` is the east wall and is zero.
        v: $y$-velocity on the north face of each cell (2D) [m/s]; on a $y$ axis with
            walls, the last row ``v[-1, :]`` is the north wall and is zero. In 1D,
            ``v`` is the along-front velocity at cell centres (a 1.5D, $y$-invariant
            flow, as in geostrophic adjustment).

    A pytree: ``jax.tree_util`` maps over ``(eta, u, v)``, so arithmetic on states,
    ``jax.grad`` with respect to a state and ``jax.vmap`` over states all work.
    """

    eta: jax.Array
    u: jax.Array
    v: jax.Array


class ShallowWater(dphys.AbstractModel):
    r"""Rotating shallow water on a C-grid: doubly periodic or closed basins, 1D or 2D.

    **Grid and staggering.** The grid's cells carry $\eta$ at their centres; ``u``
    sits on each cell's east face and ``v`` on its north face, all three fields
    stored with the grid's shape (index convention, no extra row/column). Each
    axis of ``grid`` is either ``"periodic"`` or ``"neumann"``, which here means
    **walls**: zero normal velocity on the boundary faces (the last ``u`` column,
    the last ``v`` row are wall faces, held at zero by masks inside every operator;
    the west/south walls are the implicit face before index 0). Walls are free-slip.
    Use :class:`dphys.Grid` with ``boundary="neumann"`` and cell-centred spacing.
    In 1D the flow is $y$-invariant (1.5D): ``u`` on faces, ``v`` at cell centres;
    ``beta`` is not available there.

    **Discretisation** (second order in space on smooth solutions):

    * gradient $G\eta$ on faces $(\eta_{i+1}-\eta_i)/\Delta x$, divergence
      $D\mathbf F$ of face fluxes $(F_{i+1/2}-F_{i-1/2})/\Delta x$, with $D = -G^\top$;
    * linear continuity flux $H_u u$, $H_u = \tfrac12(H_i + H_{i+1})$;
    * Coriolis by four-point averages $\bar v^{xy}$, $\bar u^{xy}$ with $f$ at the
      $v$ points, in the depth-weighted skew form
      $u_t = \tfrac12[\overline{f v}^{xy} + \overline{f H_v v}^{xy}/H_u]$,
      $v_t = -\tfrac12[f\bar u^{xy} + f\,\overline{H_u u}^{xy}/H_v]$, which reduces
      to the usual form for constant depth and never changes the energy below;
    * the pressure gradient is $-g\nabla\eta$ (not $-g\nabla h$), so a lake at rest,
      $\eta$ constant over any bathymetry, has exactly zero tendency (well balanced).

    The linear model conserves mass $\sum\eta\,\Delta V$ exactly and the energy
    $E = \tfrac12\sum(g\eta^2 + H_u u^2 + H_v v^2)\Delta V$ exactly in semi-discrete
    form ($L$ is skew in that inner product; drag makes it dissipative), so
    Crank-Nicolson conserves $E$ to round-off without drag and never increases it
    with drag. Its per-mode dispersion relation (periodic, constant $H$, f-plane) is

    $$ \omega^2 = f^2\cos^2\tfrac{k\Delta x}{2}\cos^2\tfrac{l\Delta y}{2}
       + gH\Big(\tfrac{4}{\Delta x^2}\sin^2\tfrac{k\Delta x}{2}
       + \tfrac{4}{\Delta y^2}\sin^2\tfrac{l\Delta y}{2}\Big)
       \quad\text{(see ``pdes._analytic.c_grid_frequency``)}. $$

    Nonlinear model (``nonlinear=True``), explicit terms:

    * continuity in flux form $\eta_t = -D(h_f\mathbf u)$ with the face depth $h_f$
      either ``"upwind"`` (first order, monotone: needed for bores and dam breaks)
      or ``"centered"`` (average of the two cells: no numerical diffusion, for
      smooth flows). Mass is conserved to round-off either way.
    * momentum ``"advective"``: $(\mathbf u\cdot\nabla)\mathbf u$ in the
      momentum-conservative upwind form of Stelling & Duinmeijer (2003),
      $\frac{1}{\bar h}\big[\partial_x(\bar q\,u^*) - u\,\partial_x\bar q\big]$ with
      cell-centred fluxes $\bar q$ and upwind velocities $u^*$, which gives the
      right bore speeds (momentum jump conditions) in dam breaks; or
      ``"vector_invariant"``: $-q\,\hat{\mathbf z}\times h\mathbf u -
      \nabla K$ with potential vorticity $q = (f+\zeta)/h$ at cell corners in the
      energy-conserving arrangement of Sadourny (1975). With
      ``continuity="centered"`` the semi-discrete equations then conserve
      $\sum(hK + \tfrac12 g\eta^2)\Delta V$ exactly, $K = \tfrac12(\overline{u^2}^x
      + \overline{v^2}^y)$: the choice for smooth rotating flows. The Coriolis part
      that $L$ treats implicitly is subtracted, so only its nonlinear remainder is
      explicit.
    * quadratic drag $-C_d|\mathbf u|\mathbf u/\bar h$ and wind $\boldsymbol\tau/\bar
      h$ with the face-averaged total depth $\bar h$.

    In the linear model, quadratic drag (if given) uses $H$ and is the only explicit
    term; the wind is a state-independent forcing $\boldsymbol\tau/H$.

    **Time step.** Only the explicit part limits ``dt``: :meth:`check_run` refuses
    an explicit Courant number (:meth:`courant_numbers`) above ``max_courant``
    (default 0.5: a dam break with CN/AB2, :class:`dphys.IMEX`, was stable at 0.5
    and blew up at 0.7; with SBDF2, :class:`dphys.BDF2`, it stayed stable to 0.9,
    so raise ``max_courant`` for BDF2). The gravity-wave Courant number may be
    large (5 to 10 in the tests and benchmark).

    **Solvers.** For a doubly periodic grid, constant ``depth``, an f-plane and
    scalar drag, $L$ is translation invariant and :class:`dphys.Auto` solves each
    implicit step exactly with the FFT (one $3\times3$ system per Fourier mode).
    Otherwise :class:`dphys.Auto` picks :class:`HelmholtzKrylov` (see
    :meth:`preferred_solver`): GMRES on the
    coupled system, preconditioned by the exact constant-depth Helmholtz inverse
    (FFT/DCT), typically 4 to 15 Krylov steps per time step at any gravity-wave
    Courant number. :class:`dphys.Krylov` (unpreconditioned GMRES; a Jacobi
    preconditioner would be the identity here) also works but its iteration count
    grows with the gravity-wave Courant number: on a 64x64 closed basin with a bumpy
    bottom and a beta-plane at gravity-wave Courant number 14, 50 Crank-Nicolson
    steps took 0.21 s with ``HelmholtzKrylov`` (10 Arnoldi steps each) and 1.5 s
    with ``dphys.Krylov()`` (200 Arnoldi steps each), on a shared 2-core CPU.

    **Checks.** Static: the grid's boundary kinds, field shapes, positive
    ``depth`` and initial total depth, zero wall-face velocities, and (nonlinear
    model) the explicit Courant number (:meth:`check_run`). At run time
    :meth:`validate` flags a total depth $H+\eta\le 0$ and :func:`dphys.simulate`
    reports the step at which it happened.

    Attributes:
        grid: the :class:`dphys.Grid` (1D or 2D; each axis periodic or walls).
        g: gravitational acceleration [m/s^2] (scalar, differentiable).
        depth: rest depth $H$ [m]: positive scalar or field on the grid (cell
            centres); differentiable.
        f0: Coriolis parameter at the domain's centre [1/s]; differentiable.
        beta: $\partial f/\partial y$ [1/(m s)] or ``None`` (f-plane). Giving it,
            even as 0, makes the operator $y$-dependent (no FFT solve).
        drag: linear drag rate $r$ [1/s], scalar or field; differentiable.
        quadratic_drag: $C_d$ (dimensionless) or ``None``; differentiable.
        wind: ``(tau_x, tau_y)`` kinematic wind stress [m^2/s^2] (scalars or fields)
            or ``None``; differentiable.
        nonlinear: include the nonlinear terms (static).
        continuity: ``"upwind"`` or ``"centered"`` face depth in the nonlinear flux.
        momentum: ``"advective"`` or ``"vector_invariant"``.
        max_courant: largest explicit Courant number :meth:`check_run` accepts.

    Example:
        >>> grid = dphys.Grid((32, 32), lengths=320e3, boundary="periodic")
        >>> model = ShallowWater(grid, depth=1000.0, f0=1e-4)
        >>> y, x = grid.coords
        >>> state0 = SWState(jnp.exp(-((x - 160e3)**2 + (y - 160e3)**2) / 50e3**2),
        ...                  jnp.zeros_like(x), jnp.zeros_like(x))
        >>> traj = dphys.simulate(model, dphys.CrankNicolson(), state0, dt=600.0,
        ...                       n_steps=10)
        >>> bool(jnp.isclose(model.mass(traj.final), model.mass(state0)))
        True

    References:
        Arakawa & Lamb (1977), "Computational design of the basic dynamical processes
        of the UCLA general circulation model", Methods Comput. Phys. 17.
        Sadourny (1975), "The dynamics of finite-difference models of the
        shallow-water equations", J. Atmos. Sci. 32(4).
        Stelling & Duinmeijer (2003), "A staggered conservative scheme for every
        Froude number in rapidly varied shallow water flows", Int. J. Numer. Meth.
        Fluids 43.
    """

    grid: dphys.Grid
    g: jax.Array
    depth: jax.Array
    f0: jax.Array
    beta: jax.Array | None
    drag: jax.Array
    quadratic_drag: jax.Array | None
    wind: tuple[jax.Array, jax.Array] | None
    nonlinear: bool = eqx.field(static=True)
    continuity: str = eqx.field(static=True)
    momentum: str = eqx.field(static=True)
    max_courant: float = eqx.field(static=True)

    def __init__(
        self,
        grid: dphys.Grid,
        depth,
        *,
        g=9.81,
        f0=0.0,
        beta=None,
        drag=0.0,
        quadratic_drag=None,
        wind=None,
        nonlinear: bool = False,
        continuity: str = "upwind",
        momentum: str = "advective",
        max_courant: float = 0.5,
    ):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        bad = [b for b in grid.boundary if b not in ("periodic", cg.WALL)]
        if bad:
            raise ValueError(
                f"`grid.boundary` must be 'periodic' or 'neumann' (walls: zero normal "
                f"velocity) on every axis, got {grid.boundary}; shallow water has no "
                "Dirichlet variant here."
            )
        for name, value in (("g", g), ("f0", f0)):
            if jnp.ndim(value) != 0:
                raise ValueError(
                    f"`{name}` must be a scalar, got shape {jnp.shape(value)}."
                )
        grid.check_field(depth, "depth")
        check_positive(depth, "depth")
        check_positive(g, "g")
        grid.check_field(drag, "drag")
        check_positive(drag, "drag", allow_zero=True)
        if quadratic_drag is not None:
            grid.check_field(quadratic_drag, "quadratic_drag")
            check_positive(quadratic_drag, "quadratic_drag", allow_zero=True)
        if beta is not None:
            if grid.ndim != 2:
                raise ValueError(
                    "`beta` needs a 2D grid (a y axis); got a 1D grid. Use `beta=None` "
                    "(f-plane) in 1D."
                )
            if grid.boundary[0] != cg.WALL:
                raise ValueError(
                    "`beta` needs walls in y (`boundary=('neumann', ...)`): f varies "
                    "with y, so a periodic y axis would make f jump at the seam; got "
                    f"boundary={grid.boundary}."
                )
            if jnp.ndim(beta) != 0:
                raise ValueError(
                    f"`beta` must be a scalar, got shape {jnp.shape(beta)}."
                )
        if wind is not None:
            if not (isinstance(wind, (tuple, list)) and len(wind) == 2):
                raise ValueError(
                    "`wind` must be a pair (tau_x, tau_y) of kinematic stresses "
                    f"[m^2/s^2] (scalars or fields), got {type(wind).__name__}."
                )
            grid.check_field(wind[0], "wind[0]")
            grid.check_field(wind[1], "wind[1]")
        if continuity not in CONTINUITY_SCHEMES:
            raise ValueError(
                f"`continuity` must be one of {CONTINUITY_SCHEMES}, got {continuity!r}."
            )
        if momentum not in MOMENTUM_SCHEMES:
            raise ValueError(
                f"`momentum` must be one of {MOMENTUM_SCHEMES}, got {momentum!r}."
            )
        if not (max_courant > 0):
            raise ValueError(f"`max_courant` must be positive, got {max_courant!r}.")
        self.grid = grid
        self.g = jnp.asarray(g)
        self.depth = jnp.asarray(depth)
        self.f0 = jnp.asarray(f0)
        self.beta = None if beta is None else jnp.asarray(beta)
        self.drag = jnp.asarray(drag)
        self.quadratic_drag = (
            None if quadratic_drag is None else jnp.asarray(quadratic_drag)
        )
        self.wind = (
            None if wind is None else (jnp.asarray(wind[0]), jnp.asarray(wind[1]))
        )
        self.nonlinear = bool(nonlinear)
        self.continuity = continuity
        self.momentum = momentum
        self.max_courant = float(max_courant)

    # ------------------------------------------------------------- structure hints

    @property
    def has_explicit(self) -> bool:
        # The linear model's only explicit term is quadratic drag.
        return self.nonlinear or self.quadratic_drag is not None

    @property
    def has_forcing(self) -> bool:
        # The nonlinear model puts the wind in its explicit part.
        return not self.nonlinear and self.wind is not None

    @property
    def translation_invariant(self) -> bool:
        return (
            jnp.ndim(self.depth) == 0 and self.beta is None and jnp.ndim(self.drag) == 0
        )

    @property
    def autonomous(self) -> bool:
        return True

    def preferred_solver(self, like):
        """:class:`HelmholtzKrylov` when the FFT does not apply, else ``None``.

        With walls, variable depth or drag, or a beta-plane the operator is not
        translation invariant; the Helmholtz-preconditioned GMRES then takes a few
        iterations per step at any gravity-wave Courant number, where the generic
        :class:`dphys.Krylov` needs iterations growing with it. :class:`dphys.Auto`
        asks for this after its FFT check, so periodic constant-coefficient runs keep
        the exact FFT solve.
        """
        if self.grid.periodic and self.translation_invariant:
            return None
        from ._helmholtz import HelmholtzKrylov

        return HelmholtzKrylov()

    # ------------------------------------------------------------------ helpers

    def _p(self, value, like):
        """A parameter in the state's dtype (float32 runs stay float32)."""
        return jnp.asarray(value).astype(like.dtype)

    def _masks(self, like):
        mask_u, mask_v = cg.face_masks(self.grid)
        return jnp.asarray(mask_u, like.dtype), jnp.asarray(mask_v, like.dtype)

    @property
    def _two_d(self) -> bool:
        return self.grid.ndim == 2

    def _depth_field(self, like):
        return jnp.broadcast_to(self._p(self.depth, like), self.grid.shape)

    def _face_depths(self, h):
        """Centred face averages of a cell field: at u faces and at v faces/centres."""
        hu = cg.avg_fwd(h, -1)
        hv = cg.avg_fwd(h, -2) if self._two_d else h
        return hu, hv

    def _to_faces(self, value):
        """A scalar or cell field at the u faces and at the v points (centred mean)."""
        if jnp.ndim(value) == 0:
            return value, value
        return self._face_depths(value)

    def coriolis_parameter(self, like=None):
        r"""$f$ at the ``v`` points (2D: $y_{j+1/2}$; 1D: a scalar), in 1/s."""
        dtype = jnp.result_type(float) if like is None else like.dtype
        f0 = jnp.asarray(self.f0).astype(dtype)
        if self.beta is None:
            return f0
        y_faces = self.grid.axis_coords(0) + 0.5 * self.grid.spacing[0]
        y_c = self.grid.origin[0] + 0.5 * self.grid.lengths[0]
        yv = jnp.asarray((y_faces - y_c)[:, None], dtype)
        return f0 + jnp.asarray(self.beta).astype(dtype) * yv

    def _coriolis(self, u, v, hu, hv, masks):
        """Depth-weighted skew Coriolis terms (see the class docstring)."""
        f = self.coriolis_parameter(u)
        u, v = u * masks[0], v * masks[1]
        cu = 0.5 * (cg.v_to_u(self.grid, f * v) + cg.v_to_u(self.grid, f * hv * v) / hu)
        cv = -0.5 * (
            f * cg.u_to_v(self.grid, u) + f * cg.u_to_v(self.grid, hu * u) / hv
        )
        return cu * masks[0], cv * masks[1]

    # ------------------------------------------------------------------ the model

    def linear(self, t, state):
        r"""$L$: gravity waves, Coriolis and linear drag (all terms linear about rest).

        $\eta_t = -D(H_u u, H_v v)$, $u_t = -g G_x\eta + C_u - r u$,
        $v_t = -g G_y\eta + C_v - r v$ (no $G_y$ in 1D).
        """
        eta, u, v = state.eta, state.u, state.v
        masks = self._masks(eta)
        g = self._p(self.g, eta)
        r_u, r_v = self._to_faces(self._p(self.drag, eta))
        hu, hv = self._face_depths(self._depth_field(eta))
        u, v = u * masks[0], v * masks[1]
        deta = -cg.divergence(self.grid, hu * u, hv * v, masks)
        gx, gy = cg.gradient(self.grid, eta, masks)
        cu, cv = self._coriolis(u, v, hu, hv, masks)
        du = (-g * gx + cu - r_u * u) * masks[0]
        dv = (-g * gy + cv - r_v * v) * masks[1]
        return SWState(deta, du, dv)

    def explicit(self, t, state):
        """Nonlinear remainder (see the class docstring), or ``None`` if none."""
        if not self.nonlinear:
            if self.quadratic_drag is None:
                return None
            eta = state.eta
            masks = self._masks(eta)
            hu, hv = self._face_depths(self._depth_field(eta))
            du, dv = self._quadratic_drag(state.u, state.v, hu, hv, masks)
            return SWState(jnp.zeros_like(eta), du, dv)
        return self._nonlinear_tendency(state)

    def forcing(self, t):
        if self.nonlinear or self.wind is None:
            return None
        like = jnp.zeros(self.grid.shape, jnp.result_type(self.depth, float))
        masks = self._masks(like)
        hu, hv = self._face_depths(self._depth_field(like))
        tx, _ = self._to_faces(self.wind[0])
        _, ty = self._to_faces(self.wind[1])
        return SWState(like, tx / hu * masks[0], ty / hv * masks[1])

    def _quadratic_drag(self, u, v, hu, hv, masks):
        cd_u, cd_v = self._to_faces(self._p(self.quadratic_drag, u))
        u, v = u * masks[0], v * masks[1]
        speed_u = _safe_norm(u, cg.v_to_u(self.grid, v))
        speed_v = _safe_norm(cg.u_to_v(self.grid, u), v)
        return (
            -cd_u * speed_u * u / hu * masks[0],
            -cd_v * speed_v * v / hv * masks[1],
        )

    def _nonlinear_tendency(self, state):
        eta, u, v = state.eta, state.u, state.v
        masks = self._masks(eta)
        u, v = u * masks[0], v * masks[1]
        H = self._depth_field(eta)
        h = H + eta
        Hu, Hv = self._face_depths(H)
        hbar_u, hbar_v = self._face_depths(h)
        # Continuity: full flux h_f u minus the linear flux H_u u already in L.
        if self.continuity == "upwind":
            hf_u = jnp.where(u > 0, h, cg.fwd(h, -1))
            hf_v = jnp.where(v > 0, h, cg.fwd(h, -2)) if self._two_d else hbar_v
        else:
            hf_u, hf_v = hbar_u, hbar_v
        fx = hf_u * u * masks[0]
        fy = hf_v * v * masks[1]
        deta = -cg.divergence(self.grid, fx - Hu * u, fy - Hv * v, masks)
        if self.momentum == "advective":
            du, dv = self._advection_sd(u, v, fx, fy, hbar_u, hbar_v, masks)
        else:
            du, dv = self._vector_invariant(u, v, h, Hu, Hv, fx, fy, masks)
        if self.quadratic_drag is not None:
            qu, qv = self._quadratic_drag(u, v, hbar_u, hbar_v, masks)
            du, dv = du + qu, dv + qv
        if self.wind is not None:
            tx_u, _ = self._to_faces(self._p(self.wind[0], eta))
            _, ty_v = self._to_faces(self._p(self.wind[1], eta))
            du = du + tx_u / hbar_u
            dv = dv + ty_v / hbar_v
        return SWState(deta, du * masks[0], dv * masks[1])

    def _advection_sd(self, u, v, fx, fy, hbar_u, hbar_v, masks):
        r"""Momentum-conservative upwind advection (Stelling & Duinmeijer 2003).

        Along each direction $a$ the advection of a velocity component $w$ with
        mass flux $q$ (both averaged to the points between two $w$ points) is
        $\frac{1}{\bar h}\,[\delta_a(q\,w^*) - w\,\delta_a q]$ with $w^*$ the upwind
        value; summed over directions this is $(\mathbf u\cdot\nabla) w$ written so
        that $\bar h w$ changes only by flux differences.
        """
        dx = self.grid.spacing[-1]

        def along_own(w, q_faces, ax, d):
            # w and its flux q live on the same faces; average q to the cells
            # between faces, take the upwind w there, difference back to faces.
            qc = cg.avg_bwd(q_faces, ax)
            wstar = jnp.where(qc > 0, cg.bwd(w, ax), w)
            flux = qc * wstar
            return ((cg.fwd(flux, ax) - flux) - w * (cg.fwd(qc, ax) - qc)) / d

        def across(w, p_corner, ax, d):
            # p_corner: flux across the edges between w points along axis ax, located
            # half a cell forward of w; the upwind w there.
            wstar = jnp.where(p_corner > 0, w, cg.fwd(w, ax))
            flux = p_corner * wstar
            return (
                (flux - cg.bwd(flux, ax)) - w * (p_corner - cg.bwd(p_corner, ax))
            ) / d

        adv_u = along_own(u, fx, -1, dx)
        if self._two_d:
            dy = self.grid.spacing[0]
            adv_u = adv_u + across(u, cg.avg_fwd(fy, -1), -2, dy)
            adv_v = along_own(v, fy, -2, dy) + across(v, cg.avg_fwd(fx, -2), -1, dx)
        else:
            # 1.5D: v at cell centres, advected by the face flux fx.
            adv_v = across(v, fx, -1, dx)
        return -adv_u / hbar_u, -adv_v / hbar_v

    def _vector_invariant(self, u, v, h, Hu, Hv, fx, fy, masks):
        r"""Energy-conserving vector-invariant momentum terms (Sadourny 1975).

        $u_t = \overline{q\,\bar V^x}^y - \partial_x K$,
        $v_t = -\overline{q\,\bar U^y}^x - \partial_y K$ with $q=(f+\zeta)/\bar h$ at
        corners, $U, V$ the mass fluxes and $K = \tfrac12(\overline{u^2}^x +
        \overline{v^2}^y)$, minus the linear Coriolis terms that $L$ already holds.
        """
        dx = self.grid.spacing[-1]
        f = self.coriolis_parameter(u)
        if self._two_d:
            dy = self.grid.spacing[0]
            zeta = (cg.fwd(v, -1) - v) / dx - (cg.fwd(u, -2) - u) / dy
            h_corner = cg.avg_fwd(cg.avg_fwd(h, -1), -2)
            q = (f + zeta) / h_corner
            du = cg.avg_bwd(q * cg.avg_fwd(fy, -1), -2)
            dv = -cg.avg_bwd(q * cg.avg_fwd(fx, -2), -1)
            ke = 0.5 * (cg.avg_bwd(u * u, -1) + cg.avg_bwd(v * v, -2))
            dv = dv - (cg.fwd(ke, -2) - ke) / dy
        else:
            zeta = (cg.fwd(v, -1) - v) / dx
            q = (f + zeta) / cg.avg_fwd(h, -1)
            du = q * cg.avg_fwd(h * v, -1)
            dv = -cg.avg_bwd(q * fx, -1)
            ke = 0.5 * (cg.avg_bwd(u * u, -1) + v * v)
        du = du - (cg.fwd(ke, -1) - ke) / dx
        cu, cv = self._coriolis(u, v, Hu, Hv, masks)
        return du - cu, dv - cv

    # ------------------------------------------------------------------ diagnostics

    def mass(self, state):
        r"""Volume anomaly $\sum_i \eta_i\,\Delta V$ [m^3 in 2D, m^2 in 1D]."""
        return self.grid.integrate(state.eta)

    def energy(self, state):
        r"""Total energy per unit density [m^5/s^2 in 2D].

        $E = \tfrac12\sum(g\eta^2 + \bar h_u u^2 + \bar h_v v^2)\,\Delta V$ with the
        face depth $\bar h = H$ (linear model) or $\bar h = \overline{H+\eta}$
        (nonlinear model). Conserved by the linear model without drag.
        """
        eta = state.eta
        masks = self._masks(eta)
        h = self._depth_field(eta)
        if self.nonlinear:
            h = h + eta
        hu, hv = self._face_depths(h)
        g = self._p(self.g, eta)
        dens = (
            g * eta**2 + hu * (state.u * masks[0]) ** 2 + hv * (state.v * masks[1]) ** 2
        )
        return 0.5 * self.grid.integrate(dens)

    def courant_numbers(self, state, dt):
        """``(explicit, gravity_wave)`` Courant numbers of ``state`` at step ``dt``.

        ``explicit`` $= \\Delta t\\sum_a (\\max|u_a| +
        \\sqrt{g\\max|\\eta|})/\\Delta x_a$
        bounds the signal speed of the explicit part (advection, and the nonlinear
        part of the gravity-wave speed, $\\sqrt{g(H+\\eta)}-\\sqrt{gH}\\le
        \\sqrt{g|\\eta|}$); ``gravity_wave`` $= \\Delta t\\sqrt{g\\max H}\\sum_a
        1/\\Delta x_a$ is the implicit part's, shown for information (it may exceed
        one). NumPy floats; ``state`` and ``dt`` must be concrete.
        """
        g = float(np.asarray(self.g))
        speed_nl = math.sqrt(g * float(np.max(np.abs(np.asarray(state.eta)))))
        comps = [(state.u, self.grid.spacing[-1])]
        if self._two_d:
            comps.append((state.v, self.grid.spacing[0]))
        dts = float(np.asarray(dt))
        explicit = 0.0
        for comp, d in comps:
            explicit += dts * (float(np.max(np.abs(np.asarray(comp)))) + speed_nl) / d
        c = math.sqrt(g * float(np.max(np.asarray(self.depth))))
        gravity = dts * c * sum(1.0 / d for d in self.grid.spacing)
        return explicit, gravity

    # ------------------------------------------------------------------ checks

    def check_state(self, state) -> None:
        if not isinstance(state, SWState):
            raise TypeError(
                "`state0` must be a pdes.SWState(eta, u, v), got "
                f"{type(state).__name__}."
            )
        for name in ("eta", "u", "v"):
            value = getattr(state, name)
            if jnp.shape(value) != self.grid.shape:
                raise ValueError(
                    f"`state0.{name}` has shape {jnp.shape(value)} but the C-grid "
                    f"stores every field with the grid's shape {self.grid.shape} "
                    "(u on east faces, v on north faces, eta at centres); build it "
                    "from `model.grid.coords` or `model.rest_state()`."
                )
        dtypes = {jnp.result_type(getattr(state, n)) for n in ("eta", "u", "v")}
        if len(dtypes) != 1:
            raise ValueError(
                f"`state0` fields must share one dtype, got {sorted(map(str, dtypes))}."
            )
        if any(isinstance(leaf, jax.core.Tracer) for leaf in jtu.tree_leaves(state)):
            return
        if isinstance(self.depth, jax.core.Tracer):
            return
        h = np.asarray(self.depth) + np.asarray(state.eta)
        if not np.all(h > 0):
            idx = np.unravel_index(int(np.argmin(h)), h.shape)
            raise ValueError(
                "`state0.eta` makes the total depth `depth + eta` non-positive: min "
                f"{float(np.min(h)):.6g} m at index {tuple(int(i) for i in idx)} "
                f"({int(np.sum(h <= 0))} cells). Shallow water needs wet cells "
                "everywhere; raise `depth` or lower `eta` there."
            )
        mask_u, mask_v = cg.face_masks(self.grid)
        for name, mask in (("u", mask_u), ("v", mask_v)):
            wall = np.abs(np.asarray(getattr(state, name))) * (1.0 - mask)
            if np.any(wall > 0):
                where = "u[..., -1]" if name == "u" else "v[-1, :]"
                raise ValueError(
                    f"`state0.{name}` is non-zero on wall faces ({where}, max "
                    f"{float(np.max(wall)):.3g} m/s): a closed basin has zero normal "
                    "velocity there. Set those entries to zero."
                )

    def check_run(self, state, dt) -> None:
        """Raise ``ValueError`` if the explicit part is run above its stability limit.

        The limit is ``max_courant`` on :meth:`courant_numbers`' explicit number
        (nonlinear model), and $\\Delta t\\,C_d\\max|\\mathbf u|/\\min H \\le 1$ for
        explicit quadratic drag. Skipped for traced values.
        """
        leaves = jtu.tree_leaves(state) + [dt]
        if any(isinstance(leaf, jax.core.Tracer) for leaf in leaves):
            return
        params = [self.g, self.depth, self.quadratic_drag]
        if any(isinstance(p, jax.core.Tracer) for p in params if p is not None):
            return
        if self.nonlinear:
            explicit, gravity = self.courant_numbers(state, dt)
            if explicit > self.max_courant:
                raise ValueError(
                    f"`dt`={float(np.asarray(dt)):.6g} runs the explicit (nonlinear) "
                    f"part above its stability limit: explicit Courant number "
                    f"{explicit:.3g} > max_courant={self.max_courant} (advective speed "
                    "plus sqrt(g max|eta|), over the grid spacing; the implicit "
                    f"gravity-wave Courant number is {gravity:.3g} and is not limited)."
                    " Reduce `dt`."
                )
        if self.quadratic_drag is not None:
            speed = float(
                np.max(np.sqrt(np.asarray(state.u) ** 2 + np.asarray(state.v) ** 2))
            )
            number = (
                float(np.asarray(dt))
                * float(np.max(np.asarray(self.quadratic_drag)))
                * speed
                / float(np.min(np.asarray(self.depth)))
            )
            if number > 1.0:
                raise ValueError(
                    f"`dt` runs the explicit quadratic drag above its stability limit: "
                    f"dt * C_d * max|u| / min(depth) = {number:.3g} > 1. Reduce `dt`."
                )

    def validate(self, state):
        """``ok`` is False when the total depth $H+\\eta$ is not positive somewhere."""
        h = self._depth_field(state.eta) + state.eta
        return state, jnp.all(h > 0)

    @property
    def invalid_state_message(self) -> str:
        return (
            "The total water depth `depth + eta` became zero or negative (the "
            "shallow-water model needs wet cells everywhere). Reduce `dt`, lower the "
            "initial elevation or its gradients, or add drag."
        )

    def rest_state(self, eta=0.0, dtype=None):
        """A state at rest with elevation ``eta`` (scalar or field)."""
        dtype = jnp.result_type(float) if dtype is None else dtype
        eta = jnp.broadcast_to(jnp.asarray(eta, dtype), self.grid.shape)
        zeros = jnp.zeros(self.grid.shape, dtype)
        return SWState(eta, zeros, zeros)


def _safe_norm(a, b):
    """$\\sqrt{a^2+b^2}$ with a zero (not NaN) derivative at the origin."""
    s = a * a + b * b
    pos = s > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, s, 1.0)), 0.0)


__all__ = ["SWState", "ShallowWater"]
