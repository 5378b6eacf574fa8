r"""Sparse sensor observations: records, interpolation in space and time, masks.

An observation of the model state $u$ at time $t_k$ by sensor $s$ at position
$p_s$ is modelled as

$$ y_{k,s} = (H u(t_k))_s + \varepsilon_{k,s}, \qquad
   \varepsilon_{k,s} \sim \mathcal N(0, \sigma_s^2), $$

where $H$ is (bi)linear interpolation from the grid unknowns to the sensor
positions (:class:`Interpolation`) and $u(t_k)$ is interpolated linearly in time
between the two model steps that bracket $t_k$ (:class:`TimeInterpolation`). Both
maps are linear, so their composition is linear in the trajectory and has an exact
adjoint. Missing values are NaN in ``Observations.values``; they are masked out of
every cost (with weight zero), never propagated.

Time sampling: the model keeps its own time step; an observation time $t$ that
falls strictly between steps $n$ and $n+1$ is compared with
$(1-\alpha)\,Hu^n + \alpha\,Hu^{n+1}$, $\alpha = (t - t_n)/\Delta t$. Only the sensor
values at the bracketing steps are stored (the observation hook
``dphys.SaveAt(steps=..., fn=H)``), never the trajectory.
"""

from __future__ import annotations

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import dphys

from ._checks import (
    check_positive,
    check_time_axis,
    is_concrete,
    sensors_in_domain,
    times_in_window,
)


# Relative tolerance (in units of the time step) under which an observation time
# counts as lying on a model step: a few hundred ulps of float64 times built by
# arithmetic.
_ON_STEP_RTOL = 1e-9


def _as_float(x):
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_:
        x = x.astype(jnp.result_type(float))
    return x


class Observations(eqx.Module):
    r"""Sensor records on a model's time axis.

    Attributes:
        times: observation times in model time units, shape ``(n_times,)``, strictly
            increasing.
        values: observed values, shape ``(n_times, n_sensors)``; NaN means missing
            (it is masked out of every cost, never propagated).
        positions: sensor coordinates in model length units, shape
            ``(n_sensors, ndim)``, in the grid's array-axis order (``(y, x)`` in 2D).
            A 1D array ``(n_sensors,)`` is accepted for 1D grids.
        sigma: observation-error standard deviation per sensor, ``(n_sensors,)``,
            in the units of ``values``, positive. A scalar is broadcast.
        field: for multi-field states (an ``eqx.Module`` with named fields, e.g.
            shallow water ``h``), the name of the observed field; ``None`` for
            single-array states.

    Raises:
        ValueError: on mismatched shapes, unsorted or duplicate ``times``,
            non-finite ``times``/``positions``, infinite ``values`` or non-positive
            ``sigma`` (value checks run when the arrays are concrete, i.e. outside
            ``jit``/``vmap``).

    Example:
        >>> import jax.numpy as jnp
        >>> import assimilation as da
        >>> obs = da.Observations(times=[0.1, 0.2], positions=[0.25, 0.75], sigma=0.1,
        ...                       values=[[1.0, 2.0], [1.5, jnp.nan]])
        >>> obs.values.shape, obs.positions.shape, obs.sigma.shape
        ((2, 2), (2, 1), (2,))
        >>> obs.mask.tolist()
        [[True, True], [True, False]]
    """

    times: jax.Array
    values: jax.Array
    positions: jax.Array
    sigma: jax.Array
    field: str | None = eqx.field(static=True, default=None)

    def __init__(self, times, values, positions, sigma, field=None):
        self.times = _as_float(times)
        self.values = _as_float(values)
        positions = _as_float(positions)
        if positions.ndim == 1:
            positions = positions[:, None]
        self.positions = positions
        sigma = _as_float(sigma)
        if sigma.ndim == 0 and self.values.ndim == 2:
            sigma = jnp.broadcast_to(sigma, (self.values.shape[1],))
        self.sigma = sigma
        self.field = field

    def __check_init__(self):
        t, v, p, s = (
            np.shape(a) for a in (self.times, self.values, self.positions, self.sigma)
        )
        if len(t) != 1 or len(v) != 2 or v[0] != t[0]:
            raise ValueError(
                f"`values` must have shape (n_times, n_sensors) = ({t[0] if t else '?'},"
                f" n_sensors) to match `times` {t}; got {v}."
            )
        if len(p) != 2 or p[0] != v[1]:
            raise ValueError(
                f"`positions` must have shape (n_sensors={v[1]}, ndim), got {p}."
            )
        if s != (v[1],):
            raise ValueError(f"`sigma` must have shape ({v[1]},), got {s}.")
        if t[0] == 0 or v[1] == 0:
            raise ValueError(
                f"`values` is empty (shape {v}); give at least one time and one sensor."
            )
        for name in ("times", "values", "positions", "sigma"):
            if not jnp.issubdtype(getattr(self, name).dtype, jnp.floating):
                raise TypeError(
                    f"`{name}` must be a floating-point array, got dtype "
                    f"{getattr(self, name).dtype}; pass e.g. `jnp.asarray(x, float)`."
                )
        check_time_axis(
            self.times,
            "times",
            fix_duplicates="merge records at equal times into one row (one column "
            "per sensor)",
            fix_order="sort the records by time (and the rows of `values` with them)",
        )
        if is_concrete(self.positions):
            pos = np.asarray(self.positions)
            if not np.all(np.isfinite(pos)):
                bad = np.flatnonzero(~np.all(np.isfinite(pos), axis=1))
                raise ValueError(
                    f"`positions` must be finite; sensors {bad[:5].tolist()} are not."
                )
        check_positive(
            self.sigma,
            "sigma",
            fix="Give each sensor its observation-error standard deviation (> 0).",
        )
        if is_concrete(self.values):
            if np.any(np.isinf(np.asarray(self.values))):
                raise ValueError(
                    "`values` contains infinities; mark missing values with NaN."
                )

    @property
    def n_times(self) -> int:
        return self.values.shape[0]

    @property
    def n_sensors(self) -> int:
        return self.values.shape[1]

    @property
    def mask(self):
        """Boolean array of ``values``' shape: True where a value was observed."""
        return ~jnp.isnan(self.values)

    def operator(self, grid: dphys.Grid) -> Interpolation:
        """The spatial observation operator of these sensors on ``grid``."""
        return Interpolation(grid, self.positions, field=self.field)


# ------------------------------------------------------------------------------ space


class AbstractObservationOperator(eqx.Module):
    r"""A linear map $H$ from a model state to sensor values, with its adjoint."""

    @abc.abstractmethod
    def __call__(self, state) -> jax.Array:
        """$H u$: sensor values, shape ``(n_sensors,)``."""

    @abc.abstractmethod
    def transpose(self, values) -> jax.Array:
        """$H^\\top y$: the adjoint, from ``(n_sensors,)`` to the observed field."""


def _axis_weights(p, n, dx, x0, length, boundary):
    """Corner indices and weights of linear interpolation along one axis.

    Returns ``(i0, i1, w0, w1)`` (each ``(n_sensors,)``); indices are always valid
    array indices, and a corner that stands for a Dirichlet boundary node (where
    $u=0$) has weight zero.
    """
    if boundary == "periodic":
        s = jnp.mod(p - x0, length) / dx
        i0f = jnp.floor(s)
        w1 = s - i0f
        i0 = i0f.astype(jnp.int32) % n
        i1 = (i0 + 1) % n
        return i0, i1, 1 - w1, w1
    if boundary == "dirichlet":
        # Unknown j sits at x0 + (j+1) dx; the boundary nodes are j = -1 and j = n.
        s = (p - x0) / dx - 1
        i0f = jnp.clip(jnp.floor(s), -1, n - 1)
        w1 = s - i0f
        i0 = i0f.astype(jnp.int32)
        i1 = i0 + 1
        w0 = jnp.where(i0 >= 0, 1 - w1, 0)
        w1 = jnp.where(i1 <= n - 1, w1, 0)
        return jnp.clip(i0, 0, n - 1), jnp.clip(i1, 0, n - 1), w0, w1
    # Neumann: unknown j at the cell centre x0 + (j + 1/2) dx. In the half cell next
    # to a wall the zero-flux ghost mirrors the first unknown, so linear
    # interpolation towards it is constant: clamp.
    s = jnp.clip((p - x0) / dx - 0.5, 0, n - 1)
    i0f = jnp.clip(jnp.floor(s), 0, n - 2)
    w1 = s - i0f
    i0 = i0f.astype(jnp.int32)
    return i0, i0 + 1, 1 - w1, w1


def check_positions(grid: dphys.Grid, positions) -> None:
    """Raise ``ValueError`` if a sensor lies outside a non-periodic domain
    (:func:`assimilation._checks.sensors_in_domain`, one tolerance for all).

    Periodic axes accept any finite coordinate (it is wrapped into the domain).
    Traced positions are not checked.
    """
    if is_concrete(positions):
        sensors_in_domain(positions, grid, "positions")


class Interpolation(AbstractObservationOperator):
    r"""Point sensors at arbitrary positions: linear (1D) / bilinear (2D) interpolation.

    $$ (H u)_s = \sum_{c} w_{s,c}\, u_{j_{s,c}}, $$

    over the $2^d$ grid unknowns $j_{s,c}$ around sensor $s$. Along a periodic axis
    the stencil wraps; along a Dirichlet axis the boundary node (where $u = 0$) takes
    part in the interpolation with value zero; along a Neumann axis the value is
    constant in the half cell next to the wall (the zero-flux ghost mirrors the
    first unknown). Positions outside a non-periodic domain raise ``ValueError``.

    The adjoint ``transpose`` scatters sensor values back with the same weights.

    Attributes:
        grid: the model grid.
        positions: ``(n_sensors, ndim)`` coordinates (array-axis order).
        indices: ``(n_sensors, 2**ndim)`` flat indices into the field.
        weights: ``(n_sensors, 2**ndim)`` interpolation weights (sum to 1 except
            near Dirichlet walls).
        field: name of the observed field for multi-field states, or ``None``.

    Example:
        >>> import jax.numpy as jnp
        >>> import assimilation as da, dphys
        >>> grid = dphys.Grid(4, lengths=1.0, boundary="periodic")
        >>> H = da.Interpolation(grid, [[0.125], [0.6], [0.9]])  # 0.9 wraps to 0
        >>> [round(float(v), 12) for v in H(jnp.arange(4.0))]
        [0.5, 2.4, 1.2]
    """

    grid: dphys.Grid
    positions: jax.Array
    indices: jax.Array
    weights: jax.Array
    field: str | None = eqx.field(static=True, default=None)

    def __init__(self, grid: dphys.Grid, positions, *, field: str | None = None):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        positions = jnp.asarray(positions)
        if positions.ndim == 1 and grid.ndim == 1:
            positions = positions[:, None]
        check_positions(grid, positions)
        corner_idx, corner_w = [], []
        for a in range(grid.ndim):
            i0, i1, w0, w1 = _axis_weights(
                positions[:, a],
                grid.shape[a],
                grid.spacing[a],
                grid.origin[a],
                grid.lengths[a],
                grid.boundary[a],
            )
            corner_idx.append((i0, i1))
            corner_w.append((w0, w1))
        idx, w = [], []
        for corner in np.ndindex(*((2,) * grid.ndim)):
            flat = jnp.zeros(positions.shape[0], jnp.int32)
            weight = jnp.ones(positions.shape[0], positions.dtype)
            for a, c in enumerate(corner):
                flat = flat * grid.shape[a] + corner_idx[a][c]
                weight = weight * corner_w[a][c]
            idx.append(flat)
            w.append(weight)
        self.grid = grid
        self.positions = positions
        self.indices = jnp.stack(idx, axis=1)
        self.weights = jnp.stack(w, axis=1)
        self.field = field

    @property
    def n_sensors(self) -> int:
        return self.indices.shape[0]

    def select(self, state):
        """The observed field of ``state`` (``state`` itself for array states)."""
        if self.field is None:
            if not isinstance(state, jax.Array | np.ndarray):
                raise TypeError(
                    f"The state is a {type(state).__name__}, not an array: set "
                    "`Observations(field=...)` to the name of the observed field."
                )
            return state
        try:
            return getattr(state, self.field)
        except AttributeError:
            raise ValueError(
                f"`field={self.field!r}` is not a field of the state "
                f"({type(state).__name__})."
            ) from None

    def __call__(self, state):
        u = self.select(state)
        if u.shape != self.grid.shape:
            raise ValueError(
                f"The observed field has shape {u.shape} but the sensors were placed on "
                f"a grid of shape {self.grid.shape}."
            )
        flat = u.reshape(-1)
        return jnp.sum(flat[self.indices] * self.weights.astype(u.dtype), axis=1)

    def transpose(self, values):
        values = jnp.asarray(values)
        contrib = self.weights.astype(values.dtype) * values[:, None]
        out = jnp.zeros(self.grid.size, values.dtype)
        out = out.at[self.indices.reshape(-1)].add(contrib.reshape(-1))
        return out.reshape(self.grid.shape)


# ------------------------------------------------------------------------------- time


class TimeInterpolation(eqx.Module):
    r"""Map observation times onto model steps, interpolating linearly in time.

    For observation time $t$ with $t_0 + n\Delta t \le t < t_0 + (n+1)\Delta t$ the
    model equivalent is $(1-\alpha)\,Hu^n + \alpha\,Hu^{n+1}$ with
    $\alpha = (t - t_0)/\Delta t - n$. Times within $10^{-9}\Delta t$ of a step use
    that step alone. Only the bracketing steps are saved.

    Attributes:
        steps: sorted unique step indices whose sensor values are needed (static).
        lo, hi: ``(n_times,)`` rows of the saved values (positions in ``steps``)
            for the steps before and after each observation time.
        alpha: ``(n_times,)`` weights of the later step.

    Raises:
        ValueError: if a time lies outside ``[t0, t0 + n_steps*dt]``.
    """

    steps: tuple[int, ...] = eqx.field(static=True)
    lo: jax.Array
    hi: jax.Array
    alpha: jax.Array

    def __init__(self, times, *, t0: float, dt: float, n_steps: int):
        if not is_concrete(times):
            raise ValueError(
                "`times` must be concrete (not traced under jit/vmap): they fix which "
                "model steps are saved. Build the cost outside the transformed "
                "function and replace only `values` inside it."
            )
        t1 = float(t0) + n_steps * float(dt)
        _, times, _ = times_in_window(
            times,
            (float(t0), t1),
            "times",
            fix=f"the window is [t0, t0 + n_steps*dt] = [{t0}, {t1}]: drop them or "
            "lengthen the window (`n_steps`)",
        )
        s = (times - float(t0)) / float(dt)
        nearest = np.rint(s)
        on_step = np.abs(s - nearest) <= _ON_STEP_RTOL
        lo = np.where(on_step, nearest, np.floor(s)).astype(np.int64)
        lo = np.clip(lo, 0, n_steps)
        hi = np.where(on_step, lo, np.minimum(lo + 1, n_steps))
        alpha = np.where(on_step, 0.0, s - lo)
        steps = tuple(int(k) for k in np.unique(np.concatenate([lo, hi])))
        row = {k: i for i, k in enumerate(steps)}
        self.steps = steps
        self.lo = jnp.asarray([row[int(k)] for k in lo], dtype=jnp.int32)
        self.hi = jnp.asarray([row[int(k)] for k in hi], dtype=jnp.int32)
        self.alpha = jnp.asarray(alpha)

    def __call__(self, saved):
        """Values at the observation times from values at ``steps`` (leading axis)."""
        a = self.alpha.astype(saved.dtype)[:, None]
        return (1 - a) * saved[self.lo] + a * saved[self.hi]

    def transpose(self, values):
        """Adjoint of :meth:`__call__`: observation-time values to saved steps."""
        a = self.alpha.astype(values.dtype)[:, None]
        out = jnp.zeros((len(self.steps),) + values.shape[1:], values.dtype)
        return out.at[self.lo].add((1 - a) * values).at[self.hi].add(a * values)
