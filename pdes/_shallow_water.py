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

See :class:`ShallowWater` for the grid layout and :class:`HelmholtzKrylov` for the
implicit solve.
"""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.scipy.fft as jsfft
import jax.tree_util as jtu
import numpy as np

import dphys
from dphys.operators import roll

from ._heat import check_positive


CONTINUITY_SCHEMES: tuple[str, ...] = ("upwind", "centered")
MOMENTUM_SCHEMES: tuple[str, ...] = ("advective", "vector_invariant")
_WALL = "neumann"


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


# ------------------------------------------------------------------ C-grid stencils
#
# Every field has the grid's shape; staggering is an index convention (cell (j, i),
# its east face u[j, i], its north face v[j, i]). A shift by one cell is a roll; on
# an axis with walls the roll wraps around, but every value it brings across the
# boundary is either multiplied by a zero wall-face velocity or lands on a wall face
# that is masked afterwards, so the same code serves periodic and walled axes. This
# also makes each averaging operator the exact transpose of its partner (avg_fwd of
# avg_bwd), which is what makes the discrete gravity-wave and Coriolis terms
# energy-conserving.


def _fwd(a, ax):
    """``a[i+1]`` along grid axis ``ax`` (negative array axis)."""
    return roll(a, -1, ax)


def _bwd(a, ax):
    """``a[i-1]`` along grid axis ``ax``."""
    return roll(a, 1, ax)


def _avg_fwd(a, ax):
    """Average of cell i and i+1: cell centre -> face (or face -> corner)."""
    return 0.5 * (a + _fwd(a, ax))


def _avg_bwd(a, ax):
    """Average of i-1 and i: face -> cell centre (or corner -> face)."""
    return 0.5 * (a + _bwd(a, ax))


def _face_masks(grid: dphys.Grid):
    """Masks (1 active, 0 wall) of the u and v faces, NumPy, grid-shaped."""
    mask_u = np.ones(grid.shape)
    mask_v = np.ones(grid.shape)
    if grid.boundary[-1] == _WALL:
        mask_u[..., -1] = 0.0
    if grid.ndim == 2 and grid.boundary[0] == _WALL:
        mask_v[-1, :] = 0.0
    return mask_u, mask_v


def _laplacian_eigenvalues(grid: dphys.Grid):
    """Eigenvalues of the C-grid Laplacian $D\\,G$ on the transform's modes.

    Periodic axes: $-\\frac{4}{\\Delta^2}\\sin^2(\\pi k/N)$ on ``rfftn`` modes (the
    last periodic axis is the half spectrum). Wall axes (cell-centred Neumann):
    $-\\frac{4}{\\Delta^2}\\sin^2(\\pi k/2N)$ on DCT-II modes.
    """
    periodic = [a for a in range(grid.ndim) if grid.boundary[a] == "periodic"]
    lam = np.zeros(())
    for a, (n, d) in enumerate(zip(grid.shape, grid.spacing, strict=True)):
        if grid.boundary[a] == "periodic":
            k = np.fft.rfftfreq(n) * n if a == periodic[-1] else np.fft.fftfreq(n) * n
            s = -(4.0 / d**2) * np.sin(np.pi * k / n) ** 2
        else:
            k = np.arange(n)
            s = -(4.0 / d**2) * np.sin(np.pi * k / (2 * n)) ** 2
        shape = [1] * grid.ndim
        shape[a] = s.size
        lam = lam + s.reshape(shape)
    return lam


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
        bad = [b for b in grid.boundary if b not in ("periodic", _WALL)]
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
            if grid.boundary[0] != _WALL:
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
        return HelmholtzKrylov()

    # ------------------------------------------------------------------ helpers

    def _p(self, value, like):
        """A parameter in the state's dtype (float32 runs stay float32)."""
        return jnp.asarray(value).astype(like.dtype)

    def _masks(self, like):
        mask_u, mask_v = _face_masks(self.grid)
        return jnp.asarray(mask_u, like.dtype), jnp.asarray(mask_v, like.dtype)

    @property
    def _two_d(self) -> bool:
        return self.grid.ndim == 2

    def _depth_field(self, like):
        return jnp.broadcast_to(self._p(self.depth, like), self.grid.shape)

    def _face_depths(self, h):
        """Centred face averages of a cell field: at u faces and at v faces/centres."""
        hu = _avg_fwd(h, -1)
        hv = _avg_fwd(h, -2) if self._two_d else h
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

    def _grad(self, eta, masks):
        gx = (_fwd(eta, -1) - eta) / self.grid.spacing[-1] * masks[0]
        if self._two_d:
            gy = (_fwd(eta, -2) - eta) / self.grid.spacing[0] * masks[1]
        else:
            gy = jnp.zeros_like(eta)
        return gx, gy

    def _div(self, fx, fy, masks):
        fx = fx * masks[0]
        out = (fx - _bwd(fx, -1)) / self.grid.spacing[-1]
        if self._two_d:
            fy = fy * masks[1]
            out = out + (fy - _bwd(fy, -2)) / self.grid.spacing[0]
        return out

    def _v_to_u(self, a):
        """Average from v points to u points (2D: four points; 1D: two)."""
        a = _avg_bwd(a, -2) if self._two_d else a
        return _avg_fwd(a, -1)

    def _u_to_v(self, a):
        """Average from u points to v points (the transpose of :meth:`_v_to_u`)."""
        a = _avg_bwd(a, -1)
        return _avg_fwd(a, -2) if self._two_d else a

    def _coriolis(self, u, v, hu, hv, masks):
        """Depth-weighted skew Coriolis terms (see the class docstring)."""
        f = self.coriolis_parameter(u)
        u, v = u * masks[0], v * masks[1]
        cu = 0.5 * (self._v_to_u(f * v) + self._v_to_u(f * hv * v) / hu)
        cv = -0.5 * (f * self._u_to_v(u) + f * self._u_to_v(hu * u) / hv)
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
        deta = -self._div(hu * u, hv * v, masks)
        gx, gy = self._grad(eta, masks)
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
        speed_u = _safe_norm(u, self._v_to_u(v))
        speed_v = _safe_norm(self._u_to_v(u), v)
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
            hf_u = jnp.where(u > 0, h, _fwd(h, -1))
            hf_v = jnp.where(v > 0, h, _fwd(h, -2)) if self._two_d else hbar_v
        else:
            hf_u, hf_v = hbar_u, hbar_v
        fx = hf_u * u * masks[0]
        fy = hf_v * v * masks[1]
        deta = -self._div(fx - Hu * u, fy - Hv * v, masks)
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
            qc = _avg_bwd(q_faces, ax)
            wstar = jnp.where(qc > 0, _bwd(w, ax), w)
            flux = qc * wstar
            return ((_fwd(flux, ax) - flux) - w * (_fwd(qc, ax) - qc)) / d

        def across(w, p_corner, ax, d):
            # p_corner: flux across the edges between w points along axis ax, located
            # half a cell forward of w; the upwind w there.
            wstar = jnp.where(p_corner > 0, w, _fwd(w, ax))
            flux = p_corner * wstar
            return ((flux - _bwd(flux, ax)) - w * (p_corner - _bwd(p_corner, ax))) / d

        adv_u = along_own(u, fx, -1, dx)
        if self._two_d:
            dy = self.grid.spacing[0]
            adv_u = adv_u + across(u, _avg_fwd(fy, -1), -2, dy)
            adv_v = along_own(v, fy, -2, dy) + across(v, _avg_fwd(fx, -2), -1, dx)
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
            zeta = (_fwd(v, -1) - v) / dx - (_fwd(u, -2) - u) / dy
            h_corner = _avg_fwd(_avg_fwd(h, -1), -2)
            q = (f + zeta) / h_corner
            du = _avg_bwd(q * _avg_fwd(fy, -1), -2)
            dv = -_avg_bwd(q * _avg_fwd(fx, -2), -1)
            ke = 0.5 * (_avg_bwd(u * u, -1) + _avg_bwd(v * v, -2))
            dv = dv - (_fwd(ke, -2) - ke) / dy
        else:
            zeta = (_fwd(v, -1) - v) / dx
            q = (f + zeta) / _avg_fwd(h, -1)
            du = q * _avg_fwd(h * v, -1)
            dv = -_avg_bwd(q * fx, -1)
            ke = 0.5 * (_avg_bwd(u * u, -1) + v * v)
        du = du - (_fwd(ke, -1) - ke) / dx
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
        mask_u, mask_v = _face_masks(self.grid)
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


# ---------------------------------------------------------------------- the solver


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
        rhs = eta - gamma * hbar * s * model._div(bu, bv, masks)
        lam = jnp.asarray(_laplacian_eigenvalues(grid), eta.dtype)
        new_eta = _helmholtz_solve(grid, rhs, 1.0 - alpha * lam)
        gx, gy = model._grad(new_eta, masks)
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
        to_z = lambda x: jtu.tree_map(jnp.multiply, x, scale)
        from_z = lambda z: jtu.tree_map(jnp.divide, z, scale)
        rhs_z = to_z(rhs)

        def mv(z):
            lz = to_z(model.linear(t, from_z(z)))
            return jtu.tree_map(lambda a, c: a - gamma * c, z, lz)

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
    walls = [a - grid.ndim for a in range(grid.ndim) if grid.boundary[a] == _WALL]
    periodic = [a - grid.ndim for a in range(grid.ndim) if grid.boundary[a] != _WALL]
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


__all__ = ["SWState", "ShallowWater", "HelmholtzKrylov"]
