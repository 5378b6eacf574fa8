r"""Linear advection-diffusion in conservative (flux) form."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import dphys
from dphys._checks import check_finite, check_positive
from dphys.operators import face_flux, pad_axis


SCHEMES: tuple[str, ...] = ("centered", "upwind", "upwind3")
_SCHEME_ALIASES = {"centred": "centered", "central": "centered"}


def _pad(u, grid: dphys.Grid, axis: int, width: int, ghost):
    """Pad grid axis ``axis`` of ``u`` with ``width`` ghost values on each side.

    Periodic axes wrap; Dirichlet axes take the boundary value ``ghost`` (a scalar);
    Neumann axes repeat the edge value (zero normal gradient).
    """
    ax = u.ndim - grid.ndim + axis
    kind = grid.boundary[axis]
    n = u.shape[ax]
    take = lambda start, stop: jax.lax.slice_in_dim(u, start, stop, axis=ax)
    if kind == "periodic":
        lo, hi = take(n - width, n), take(0, width)
    elif kind == "neumann":
        lo = jnp.concatenate([take(0, 1)] * width, axis=ax)
        hi = jnp.concatenate([take(n - 1, n)] * width, axis=ax)
    else:
        shape = list(u.shape)
        shape[ax] = width
        lo = hi = jnp.broadcast_to(jnp.asarray(ghost, dtype=u.dtype), tuple(shape))
    return jnp.concatenate([lo, u, hi], axis=ax)


def _faces_shape(grid: dphys.Grid, axis: int) -> tuple[int, ...]:
    """Shape of a face-centred array normal to ``axis`` (see :class:`Advection`)."""
    shape = list(grid.shape)
    if grid.boundary[axis] != "periodic":
        shape[axis] += 1
    return tuple(shape)


class Advection(dphys.AbstractModel):
    r"""Advection-diffusion in conservative finite-volume form, 1D or 2D:

    $$ u_t + \nabla\cdot(\mathbf v u) = \nabla\cdot(\kappa\nabla u) + f. $$

    **Discretisation.** Every unknown $u_i$ is the mean over a cell of width
    $\Delta x$ (see :class:`dphys.Grid` for where the unknowns sit). The tendency is a
    difference of face fluxes, one grid axis $a$ at a time:

    $$ \frac{du_i}{dt} = -\sum_a \frac{F_{i+1/2} - F_{i-1/2}}{\Delta x_a} + f_i,
       \qquad F_{i+1/2} = v_{i+1/2}\,u_{i+1/2}
       - \kappa_{i+1/2}\frac{u_{i+1}-u_i}{\Delta x_a}, $$

    with the face value $u_{i+1/2}$ chosen by ``scheme``:

    * ``"centered"``: $\tfrac12(u_i + u_{i+1})$, second order, no numerical
      diffusion. With Crank-Nicolson and constant coefficients each Fourier mode has
      $|G| = 1$ exactly: only a phase (dispersion) error, from
      $\tilde v = v\,\sin(k\Delta x)/(k\Delta x)$ in space and the trapezoidal rule
      in time.
    * ``"upwind"``: $v^+ u_i + v^- u_{i+1}$ with $v^\pm = \max(v, 0),\ \min(v, 0)$;
      first order and monotone. With :class:`dphys.BackwardEuler` this is the classic
      implicit upwind scheme, unconditionally stable and positivity preserving.
    * ``"upwind3"``: third-order upwind-biased face value
      $v^+(-u_{i-1} + 5u_i + 2u_{i+1})/6 + v^-(2u_i + 5u_{i+1} - u_{i+2})/6$
      (fully periodic grids only). It is linear in $u$, so its adjoint is exact.

    Because the update is a difference of face fluxes, the total mass
    $\sum_i u_i \Delta V$ changes only through boundary fluxes and the source: on a
    periodic grid the sum telescopes and mass is conserved to round-off, whatever
    the velocity field (divergence-free or not).

    **Velocity.** One component per grid axis, in the order of ``grid.shape`` and
    ``grid.coords`` (in 2D, ``(v_y, v_x)`` for a grid of shape ``(ny, nx)``). Each
    component is a scalar (uniform flow) or a field:

    * ``velocity_at_faces=False`` (default): a field of ``grid.shape`` holding the
      velocity at the unknowns; face values are arithmetic means of the two
      neighbours (at a non-periodic boundary face: the edge value).
    * ``velocity_at_faces=True``: component ``a`` holds the velocity on the faces
      normal to axis ``a``, entry ``j`` on the left face of unknown ``j`` (between
      unknowns ``j-1`` and ``j``). Along a periodic axis there are ``n`` faces (face
      0 is also the right face of the last unknown); along a non-periodic axis
      ``n + 1``, the last one being the right boundary face. Use this to pass a
      discretely divergence-free field, e.g. from a stream function, or a velocity
      that vanishes on a wall.

    **Time dependence.** ``velocity_fn(t, velocity) -> velocity`` maps the model's
    (differentiable) ``velocity`` to the velocity at time ``t``, e.g.
    ``lambda t, v: tuple(c * jnp.cos(t) for c in v)``; it must keep every
    component's shape. The model is then non-autonomous and the steppers rebuild the
    solver structure (Fourier symbol or Jacobi diagonal) every step.

    **Boundaries** (per non-periodic axis, from the grid's boundary kind). A boundary
    face always takes the *upwind* face value, the outside state being the ghost
    value below, so the centered scheme needs no extra outflow condition:

    * ``"dirichlet"`` (inflow/outflow): the outside value is ``inflow`` (default 0).
      Where the flow enters, the flux is $v\,u_\mathrm{in}$; where it leaves, the
      interior value leaves freely ($v\,u_\mathrm{edge}$, no reflection).
      Diffusion sees $u = u_\mathrm{in}$ on the boundary nodes (the
      :func:`dphys.operators.laplacian` Dirichlet closure). The inflow value is an
      affine term, so it goes to :meth:`forcing`, not :meth:`linear`.
    * ``"neumann"`` (zero gradient, transmissive): the outside value equals the edge
      value, so the advective boundary flux is $v_b\,u_\mathrm{edge}$ and the
      diffusive one zero. With zero normal velocity on the wall (e.g. a face
      velocity that vanishes there) the box is closed and mass is conserved.

    **The kink of the upwind flux.** $v^\pm$ are not differentiable at $v = 0$: the
    flux is $v\bar u - \tfrac12|v|(u_{i+1}-u_i)$. There, ``jnp.maximum`` and
    ``jnp.minimum`` give each of $v^\pm$ the derivative $\tfrac12$, so the derivative
    of the upwind flux at $v = 0$ is that of the centered flux, the mean of the two
    one-sided derivatives (an element of the Clarke generalised gradient). Gradient
    checks of the upwind schemes are meaningful only where no face velocity is zero.

    **Solvers.** On a periodic grid with constant velocity and $\kappa$ the operator
    is translation invariant and :class:`dphys.Auto` picks :class:`dphys.FFT`
    (exact, one FFT pair per step, or one per saved segment with fast-forward).
    Otherwise it is non-symmetric and :class:`dphys.Auto` picks
    :class:`dphys.Krylov` (GMRES), except in 1D with non-periodic boundaries where
    :class:`dphys.Tridiagonal` solves the centered and upwind schemes directly.
    GMRES (:func:`dphys.krylov_solve`) stops as soon as its residual meets the
    tolerance; its default restart of 10 was the fastest of 5-40 on 2D advection
    with velocity fields (``docs/design.md``).
    BiCGStab is cheaper per iteration and fine for upwinding or Courant numbers
    below about one, but can stagnate or break down on the centered scheme at large
    Courant numbers, whose eigenvalues lie far from the real axis.

    Mass and Krylov solves: a Krylov residual is $p(A)r_0$ with $p(0)=1$, and the
    flux form gives $\mathbf 1^T A = \mathbf 1^T$ and $\mathbf 1^T r_0 = 0$, so the
    residual sums to zero and mass is conserved to round-off whatever the tolerance,
    *unless* a Jacobi preconditioner with a non-constant diagonal (upwind with a
    velocity field) spoils that structure: mass is then conserved to the solver
    tolerance only. Pass ``preconditioner=None`` where round-off conservation
    matters.

    Attributes:
        grid: the :class:`dphys.Grid`.
        velocity: tuple of per-axis components (scalars or fields, see above)
            [length / time]; differentiable.
        kappa: diffusivity, ``None`` (none), a non-negative scalar or a
            non-negative field of ``grid.shape`` [length^2 / time]; differentiable.
        source: constant source $f$, ``None``, a scalar or a field [u / time];
            differentiable.
        inflow: value of $u$ outside ``"dirichlet"`` boundaries (a scalar; ``None``
            means 0) [u]; differentiable.
        scheme: ``"centered"`` (alias ``"centred"``), ``"upwind"`` or
            ``"upwind3"`` (static).
        velocity_at_faces: whether velocity fields are given on faces (static).
        velocity_fn: optional ``velocity_fn(t, velocity) -> velocity`` (static).
        source_fn: optional time-dependent source ``source_fn(t) -> field``, added
            to ``source`` (static).

    Example:
        >>> grid = dphys.Grid((64, 64), lengths=1.0, boundary="periodic")
        >>> model = Advection(grid, velocity=(0.5, 1.0), kappa=1e-4)
        >>> y, x = grid.coords
        >>> traj = dphys.simulate(model, dphys.CrankNicolson(),
        ...                       jnp.sin(2 * jnp.pi * x), dt=0.05, n_steps=20)
        >>> traj.final.shape
        (64, 64)

    References:
        LeVeque (2002), "Finite Volume Methods for Hyperbolic Problems", Cambridge
        University Press, ch. 4 and 8 (flux form, upwind, dispersion relations).
        Leonard (1979), "A stable and accurate convective modelling procedure based
        on quadratic upstream interpolation", Comput. Methods Appl. Mech. Eng. 19
        (the third-order upwind-biased face value).
    """

    grid: dphys.Grid
    velocity: tuple[jax.Array, ...]
    kappa: jax.Array | None
    source: jax.Array | None
    inflow: jax.Array | None
    scheme: str = eqx.field(static=True)
    velocity_at_faces: bool = eqx.field(static=True)
    velocity_fn: Callable | None = eqx.field(static=True)
    source_fn: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        grid: dphys.Grid,
        velocity,
        kappa=None,
        source=None,
        *,
        scheme: str = "centered",
        inflow=None,
        velocity_at_faces: bool = False,
        velocity_fn: Callable | None = None,
        source_fn: Callable | None = None,
    ):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        scheme = _SCHEME_ALIASES.get(scheme, scheme)
        if scheme not in SCHEMES:
            raise ValueError(
                f"`scheme` must be one of {SCHEMES} (or 'centred'), got {scheme!r}."
            )
        if scheme == "upwind3" and not grid.periodic:
            raise ValueError(
                "`scheme='upwind3'` needs a fully periodic grid (its 4-point stencil "
                f"has no boundary closure here); got boundary={grid.boundary}. Use "
                "'upwind' or 'centered' on grids with boundaries."
            )
        self.grid = grid
        self.scheme = scheme
        self.velocity_at_faces = bool(velocity_at_faces)
        self.velocity = self._check_velocity(velocity, "velocity")
        if kappa is not None:
            grid.check_field(kappa, "kappa")
            check_positive(kappa, "kappa", allow_zero=True)
            kappa = jnp.asarray(kappa)
        self.kappa = kappa
        if source is not None:
            grid.check_field(source, "source")
            source = jnp.asarray(source)
        self.source = source
        if inflow is not None:
            if jnp.ndim(inflow) != 0:
                raise ValueError(
                    f"`inflow` must be a scalar (the value of u outside every "
                    f"'dirichlet' boundary), got shape {jnp.shape(inflow)}."
                )
            if "dirichlet" not in grid.boundary:
                raise ValueError(
                    "`inflow` is the value of u outside 'dirichlet' boundaries, but "
                    f"the grid has boundary={grid.boundary}; drop `inflow` or use a "
                    "'dirichlet' axis."
                )
            inflow = jnp.asarray(inflow)
        self.inflow = inflow
        if velocity_fn is not None and not callable(velocity_fn):
            raise TypeError(
                "`velocity_fn` must be a callable `velocity_fn(t, velocity) -> "
                f"velocity`, got {type(velocity_fn).__name__}."
            )
        self.velocity_fn = velocity_fn
        self.source_fn = source_fn
        if velocity_fn is not None:
            expect = [jnp.shape(c) for c in self.velocity]
            try:
                out = jax.eval_shape(velocity_fn, 0.0, self.velocity)
            except Exception as err:
                raise ValueError(
                    "`velocity_fn(t, velocity)` failed when called with t=0.0 and the "
                    f"model's velocity (component shapes {expect}): {err}"
                ) from err
            got = (
                [getattr(c, "shape", None) for c in out]
                if isinstance(out, (tuple, list))
                else None
            )
            if got != expect:
                raise ValueError(
                    "`velocity_fn(t, velocity)` must return a tuple with one "
                    f"component per axis of the same shapes as `velocity` ({expect}), "
                    f"got {got if got is not None else type(out).__name__}."
                )

    # ------------------------------------------------------------------ validation

    def _check_velocity(self, velocity, name):
        grid = self.grid
        nd = grid.ndim
        if isinstance(velocity, (tuple, list)):
            comps = list(velocity)
        else:
            shape = jnp.shape(velocity)
            if shape == ():
                if nd != 1:
                    raise ValueError(
                        f"`{name}` is a scalar but the grid is {nd}D; give one "
                        f"component per axis, e.g. `{name}=(v_y, v_x)`."
                    )
                comps = [velocity]
            elif shape == (nd,) and nd > 1:
                comps = [velocity[a] for a in range(nd)]
            elif nd == 1 and len(shape) == 1:
                comps = [velocity]  # one field in 1D; its length is checked below
            else:
                comps = None
            if comps is None:
                raise ValueError(
                    f"`{name}` must be a tuple with one component per grid axis "
                    f"({nd}), each a scalar or a field, or an array of shape ({nd},) "
                    f"for a uniform flow; got an array of shape {shape}."
                )
        if len(comps) != nd:
            raise ValueError(
                f"`{name}` has {len(comps)} components but the grid has {nd} axes "
                f"(shape {grid.shape}); give one component per axis, in the order of "
                "`grid.shape` (the last axis is x)."
            )
        out = []
        for a, c in enumerate(comps):
            shape = jnp.shape(c)
            expect = _faces_shape(grid, a) if self.velocity_at_faces else grid.shape
            if shape not in ((), expect):
                where = (
                    "on the faces normal to that axis"
                    if self.velocity_at_faces
                    else "at the unknowns"
                )
                hint = ""
                if not self.velocity_at_faces and shape == _faces_shape(grid, a):
                    hint = " (this is a face shape: pass `velocity_at_faces=True`)"
                raise ValueError(
                    f"`{name}[{a}]` must be a scalar or a field of shape {expect} "
                    f"({where}), got shape {shape}{hint}."
                )
            check_finite(c, f"{name}[{a}]")
            out.append(jnp.asarray(c))
        return tuple(out)

    def check_state(self, state) -> None:
        if not hasattr(state, "shape") or not hasattr(state, "dtype"):
            raise ValueError(
                "`state0` of an Advection model must be one array of the grid's shape "
                f"{self.grid.shape}, got {type(state).__name__}."
            )
        if not jnp.issubdtype(state.dtype, jnp.floating):
            raise TypeError(
                f"`state0` must be a floating-point array, got dtype {state.dtype}; "
                "cast it, e.g. `state0.astype(float)`."
            )
        super().check_state(state)

    # ------------------------------------------------------------------ structure

    @property
    def has_forcing(self) -> bool:
        return (
            self.source is not None
            or self.source_fn is not None
            or self.inflow is not None
        )

    @property
    def translation_invariant(self) -> bool:
        return (
            self.grid.periodic
            and all(jnp.ndim(c) == 0 for c in self.velocity)
            and (self.kappa is None or jnp.ndim(self.kappa) == 0)
        )

    @property
    def symmetric(self) -> bool:
        return False

    @property
    def autonomous(self) -> bool:
        return self.velocity_fn is None

    # ------------------------------------------------------------------ operator

    def velocity_at(self, t):
        """The velocity components at time ``t`` (``velocity_fn`` applied if given)."""
        if self.velocity_fn is None:
            return self.velocity
        return tuple(self.velocity_fn(t, self.velocity))

    def face_velocity(self, t, axis: int, dtype=None):
        """Velocity on the ``n + 1`` faces normal to ``axis`` (a scalar if uniform).

        Face ``j`` lies between unknowns ``j - 1`` and ``j``; faces 0 and ``n`` are
        the boundary faces (the same face twice on a periodic axis).
        """
        v = self.velocity_at(t)[axis]
        if dtype is not None:
            v = v.astype(dtype)
        if jnp.ndim(v) == 0:
            return v
        grid = self.grid
        ax = axis
        if self.velocity_at_faces:
            if grid.boundary[axis] == "periodic":
                first = jax.lax.slice_in_dim(v, 0, 1, axis=ax)
                v = jnp.concatenate([v, first], axis=ax)
            return v
        vp = pad_axis(v, grid, axis, coefficient=True)
        n = vp.shape[ax]
        lo = jax.lax.slice_in_dim(vp, 0, n - 1, axis=ax)
        hi = jax.lax.slice_in_dim(vp, 1, n, axis=ax)
        return 0.5 * (lo + hi)

    def flux(self, t, u, axis: int, ghost=0.0):
        r"""Total flux $F = v\,u_\mathrm{face} - \kappa\,\partial u/\partial x$ on the
        ``n + 1`` faces normal to ``axis`` (face ``j`` between unknowns ``j-1``, ``j``).

        ``ghost`` is the value of $u$ outside ``"dirichlet"`` boundaries. The result
        is linear in ``(u, ghost)`` jointly.
        """
        grid = self.grid
        ax = u.ndim - grid.ndim + axis
        ghost = jnp.asarray(ghost, dtype=u.dtype)
        width = 2 if self.scheme == "upwind3" else 1
        up = _pad(u, grid, axis, width, ghost)
        m = up.shape[ax]
        part = lambda start, stop: jax.lax.slice_in_dim(up, start, stop, axis=ax)
        # Left and right neighbours of every face.
        left = part(width - 1, m - width)
        right = part(width, m - width + 1)
        v = self.face_velocity(t, axis, u.dtype)
        v_plus, v_minus = jnp.maximum(v, 0), jnp.minimum(v, 0)
        upwind = v_plus * left + v_minus * right
        if self.scheme == "centered":
            adv = 0.5 * v * (left + right)
            if grid.boundary[axis] != "periodic":
                # Boundary faces are upwinded: the outside value enters only where
                # the flow comes in, and the outflow needs no extra condition.
                mask = np.zeros(left.shape[ax], dtype=bool)
                mask[[0, -1]] = True
                mask = jnp.asarray(mask.reshape((-1,) + (1,) * (u.ndim - ax - 1)))
                adv = jnp.where(mask, upwind, adv)
        elif self.scheme == "upwind":
            adv = upwind
        else:  # upwind3 (periodic: every face is interior)
            far_left = part(0, m - 3)
            far_right = part(3, m)
            from_left = (-far_left + 5.0 * left + 2.0 * right) / 6.0
            from_right = (2.0 * left + 5.0 * right - far_right) / 6.0
            adv = v_plus * from_left + v_minus * from_right
        if self.kappa is None:
            return adv
        # The diffusive flux only sees differences of u, so shifting u by the
        # boundary value turns the Dirichlet ghost `ghost` into the zero ghost of
        # the shared stencil (the same closure as pdes.Heat).
        return adv + face_flux(u - ghost, grid, axis, self.kappa.astype(u.dtype))

    def _tendency(self, t, u, ghost):
        out = jnp.zeros_like(u)
        for axis in range(self.grid.ndim):
            ax = u.ndim - self.grid.ndim + axis
            f = self.flux(t, u, axis, ghost)
            n = f.shape[ax]
            diff = jax.lax.slice_in_dim(f, 1, n, axis=ax) - jax.lax.slice_in_dim(
                f, 0, n - 1, axis=ax
            )
            out = out - diff / self.grid.spacing[axis]
        return out

    def linear(self, t, state):
        r"""$L(t)u = -\sum_a (F_{i+1/2} - F_{i-1/2})/\Delta x_a$ with zero inflow."""
        return self._tendency(t, state, 0.0)

    def forcing(self, t):
        """Source plus the inflow boundary term (``None`` when there is neither)."""
        f = self.source
        if self.source_fn is not None:
            g = self.source_fn(t)
            f = g if f is None else f + g
        if self.inflow is not None:
            dtype = self.inflow.dtype if f is None else jnp.result_type(f)
            zero = jnp.zeros(self.grid.shape, dtype)
            b = self._tendency(t, zero, self.inflow.astype(dtype))
            f = b if f is None else f + b
        if f is not None and jnp.shape(f) != self.grid.shape:
            f = jnp.broadcast_to(f, self.grid.shape)
        return f

    def symbol(self):
        r"""Eigenvalues of $L$ on the ``rfftn`` modes (periodic grid, constant
        coefficients): the semi-discrete dispersion relation.

        With $\theta_a = 2\pi k_a / N_a$ and $v^\pm = \max/\min(v, 0)$, per axis:

        * centered: $-\mathrm{i}\,v\sin\theta/\Delta x$;
        * upwind: $-[v^+(1-e^{-\mathrm i\theta}) + v^-(e^{\mathrm i\theta}-1)]
          /\Delta x$;
        * upwind3: $-[v^+(e^{-2\mathrm i\theta} - 6e^{-\mathrm i\theta} + 3 +
          2e^{\mathrm i\theta}) + v^-(-2e^{-\mathrm i\theta} - 3 + 6e^{\mathrm i\theta}
          - e^{2\mathrm i\theta})]/(6\Delta x)$;

        plus $-4\kappa\sin^2(\theta/2)/\Delta x^2$ for diffusion. A θ-method step
        multiplies mode $k$ by $G_k = (1 + (1-\theta)\Delta t\lambda_k) / (1 -
        \theta\Delta t\lambda_k)$; the exact solution by $e^{-\mathrm i k\cdot v
        \Delta t}$ (times the diffusive decay).
        """
        if not (self.translation_invariant and self.autonomous):
            raise ValueError(
                "`symbol` needs a periodic grid, constant `velocity` and `kappa` and "
                "no `velocity_fn`."
            )
        shape = self.grid.shape
        lam = 0.0
        for a, (n, dx) in enumerate(zip(shape, self.grid.spacing, strict=True)):
            k = np.fft.rfftfreq(n) * n if a == len(shape) - 1 else np.fft.fftfreq(n) * n
            e = np.exp(1j * 2 * np.pi * k / n)
            bshape = [1] * len(shape)
            bshape[a] = k.size
            e = jnp.asarray(e.reshape(bshape))
            v = self.velocity[a]
            vp, vm = jnp.maximum(v, 0), jnp.minimum(v, 0)
            if self.scheme == "centered":
                s = -v * (e - 1 / e) / (2 * dx)
            elif self.scheme == "upwind":
                s = -(vp * (1 - 1 / e) + vm * (e - 1)) / dx
            else:
                s = -(
                    vp * (e**-2 - 6 / e + 3 + 2 * e) + vm * (-2 / e - 3 + 6 * e - e**2)
                ) / (6 * dx)
            if self.kappa is not None:
                s = s - self.kappa * (2 - e - 1 / e) / dx**2
            lam = lam + s
        return lam
