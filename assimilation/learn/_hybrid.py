r"""Hybrid physics + network models: learned tendencies, fields and forcings.

A hybrid model is a physics model plus learned terms, built with
:class:`dphys.Augmented` (no other wrapper):

$$ \frac{du}{dt} = \underbrace{L_p u + N_p(u) + f_p}_{\text{physics, parameters } p}
   + \underbrace{N_\theta(u)}_{\text{explicit, learned}}
   + \underbrace{g_\theta(x)}_{\text{forcing, learned}}, $$

so the IMEX/BDF2/θ steppers keep $L_p$ implicit (its structured solver and its
transposed-solve adjoint) and step the learned terms explicitly. The learned terms
are equinox modules whose arrays are leaves of the hybrid model, so ``jax.grad`` of a
rollout loss reaches the network weights and the physical parameters $p$ alike,
through the core's checkpointed time loop.

* :class:`LocalTendency`: $N_\theta(u)$, a local convolutional network on the model
  grid (translation equivariant; ``kernel_size=1`` is pointwise), in state units per
  time unit; it starts as the zero map.
* :class:`FourierField`: $g_\theta(x)$, a smooth field of position from its low
  Fourier modes (a learned forcing, or a learned parameter field such as
  $\kappa(x) = \exp(\cdot)$ set into the model with :func:`set_field`).
* :class:`SubwindowForcing`: the model error as a weak-constraint forcing produced by
  a network of the state: on each sub-window of ``steps_per_window`` steps the model
  is forced by the constant $\eta_j = \mathcal N_\theta(t_j, x(t_j))$, the forcing
  of :class:`assimilation.ModelError` made a function of the state instead of free
  variables, so one network serves every window.

:func:`rollout` runs any of them and returns the (observed) states at chosen steps,
with the gradient either through the solver (solver in the loop: the implicit
steps' transposed solves and the checkpointed loop) or stop-gradiented at every
solver output. :func:`stability` checks free runs of a hybrid far beyond its
training horizon.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jax import lax

import dphys


GRADIENTS = ("solver", "stop_gradient")


# ---------------------------------------------------------------------- networks


def _state_channels(state):
    return jnp.stack(jtu.tree_leaves(state))


def _from_channels(channels, like):
    leaves, treedef = jtu.tree_flatten(like)
    return jtu.tree_unflatten(
        treedef, [channels[i].astype(x.dtype) for i, x in enumerate(leaves)]
    )


def _pad(x, grid: dphys.Grid, width: int):
    """Pad the grid axes of ``x`` (channels first) by the grid's boundary kinds."""
    if width == 0:
        return x
    for a, kind in enumerate(grid.boundary):
        ax = x.ndim - grid.ndim + a
        pads = [(0, 0)] * x.ndim
        pads[ax] = (width, width)
        x = jnp.pad(x, pads, mode="wrap" if kind == "periodic" else "edge")
    return x


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value!r}.")
    return value


class LocalTendency(eqx.Module):
    r"""A local, translation-equivariant network tendency $N_\theta(u)$.

    $$ h_0 = [u;\ c],\quad h_{\ell+1} = \sigma(W_\ell * h_\ell + b_\ell),\quad
       N_\theta(u) = s\,(W_d * h_d + b_d), $$

    with $*$ a convolution of odd width ``kernel_size`` on the model grid (padded by
    the grid's boundary kinds: periodic axes wrap, others repeat the edge value, so
    the network is translation equivariant on a periodic grid; ``kernel_size=1`` is
    a pointwise network of the local state), $c$ optional extra input channels
    (``inputs``: parameters or forcings as fields) and $s$ = ``scale``. The output
    has one channel per state field, in state units per time unit; the last layer
    starts at zero (``zero_init``), so the hybrid starts as the physics model.

    Use it as the explicit term of a hybrid, ``dphys.Augmented(physics,
    explicit=LocalTendency(...))``, or as the network of a
    :class:`SubwindowForcing`.

    A pointwise network cannot represent a derivative, so a physical diffusivity
    stays identifiable next to it; a wider stencil can mimic $\kappa\nabla^2u$ and
    trades that identifiability for expressiveness.

    Attributes:
        grid: the model grid.
        weights: per layer, ``(out, in, *kernel)`` arrays.
        biases: per layer, ``(out,)`` arrays.
        inputs: extra input channels: ``None``, an array ``(n_inputs, *grid.shape)``
            (held fixed: gradients are stopped) or a callable ``inputs(t) ->`` such
            an array (e.g. a :class:`FourierField` stacked by the caller).
        kernel_size: stencil width (odd, static).
        scale: output scale $s$ (static).
        activation: the hidden nonlinearity (static; smooth, so Taylor tests apply).

    Example:
        >>> import dphys, jax, jax.numpy as jnp
        >>> grid = dphys.Grid((8, 8), lengths=1.0, boundary="periodic")
        >>> net = LocalTendency(grid, key=jax.random.key(0))
        >>> float(jnp.abs(net(0.0, jnp.ones(grid.shape))).max())
        0.0
    """

    grid: dphys.Grid
    weights: tuple[jax.Array, ...]
    biases: tuple[jax.Array, ...]
    inputs: Any
    kernel_size: int = eqx.field(static=True)
    scale: float = eqx.field(static=True)
    activation: Callable = eqx.field(static=True)

    def __init__(
        self,
        grid: dphys.Grid,
        n_fields: int = 1,
        *,
        width: int = 16,
        depth: int = 1,
        kernel_size: int = 1,
        inputs=None,
        n_inputs: int | None = None,
        activation: Callable = jnp.tanh,
        scale: float = 1.0,
        zero_init: bool = True,
        dtype=None,
        key,
    ):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        n_fields = _positive_int("n_fields", n_fields)
        width = _positive_int("width", width)
        depth = _positive_int("depth", depth, 0)
        kernel_size = _positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise ValueError(
                f"`kernel_size` must be odd (a centred stencil), got {kernel_size}."
            )
        if key is None:
            raise TypeError("`key` is required: pass e.g. `key=jax.random.key(0)`.")
        extra = 0
        if inputs is not None:
            if callable(inputs):
                if n_inputs is None:
                    raise ValueError(
                        "`inputs` is a function, so give `n_inputs` (its number of "
                        "channels)."
                    )
                extra = _positive_int("n_inputs", n_inputs)
            else:
                inputs = jnp.asarray(inputs)
                if inputs.ndim != grid.ndim + 1 or inputs.shape[1:] != grid.shape:
                    raise ValueError(
                        "`inputs` must have shape (n_inputs, *grid.shape) = "
                        f"(n, {', '.join(map(str, grid.shape))}), got {inputs.shape}."
                    )
                extra = inputs.shape[0]
        dtype = jnp.result_type(float) if dtype is None else dtype
        sizes = [n_fields + extra] + [width] * depth + [n_fields]
        keys = jr.split(key, len(sizes) - 1)
        kernel = (kernel_size,) * grid.ndim
        weights, biases = [], []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            fan_in = a * kernel_size**grid.ndim
            w = jr.normal(keys[i], (b, a, *kernel), dtype) / np.sqrt(fan_in)
            if zero_init and i == len(sizes) - 2:
                w = jnp.zeros_like(w)
            weights.append(w)
            biases.append(jnp.zeros((b,), dtype))
        self.grid = grid
        self.weights = tuple(weights)
        self.biases = tuple(biases)
        self.inputs = inputs
        self.kernel_size = kernel_size
        self.scale = float(scale)
        self.activation = activation

    def _layer(self, w, b, x):
        if self.kernel_size == 1:
            y = jnp.einsum(
                "oi,i...->o...",
                w.reshape(w.shape[:2]).astype(x.dtype),
                x,
                precision=lax.Precision.HIGHEST,
            )
        else:
            xp = _pad(x, self.grid, self.kernel_size // 2)[None]
            y = lax.conv_general_dilated(
                xp,
                w.astype(x.dtype),
                window_strides=(1,) * self.grid.ndim,
                padding="VALID",
                precision=lax.Precision.HIGHEST,
            )[0]
        return y + b.astype(x.dtype).reshape((-1,) + (1,) * self.grid.ndim)

    def __call__(self, t, state):
        """The tendency $N_\\theta(u)$ (same pytree as ``state``)."""
        x = _state_channels(state)
        if self.inputs is not None:
            extra = self.inputs(t) if callable(self.inputs) else self.inputs
            extra = lax.stop_gradient(extra) if not callable(self.inputs) else extra
            x = jnp.concatenate([x, jnp.asarray(extra, x.dtype)])
        n = len(self.weights)
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = self._layer(w, b, x)
            if i < n - 1:
                x = self.activation(x)
        return _from_channels(self.scale * x, state)


class FourierField(eqx.Module):
    r"""A smooth field of position from its low Fourier modes (periodic grids).

    $$ g(x) = T\Big(\sum_{|k_a| \le K} \hat g_k\, e^{2\pi i k\cdot x / \ell}\Big), $$

    real, with the complex coefficients $\hat g_k$ of the modes $|k_a| \le K$ on
    every axis (the rest zero) as trainable real and imaginary parts, scaled so that
    a coefficient of size $a$ gives a cosine of amplitude about $a$, and $T$ an
    optional pointwise transform (``jnp.exp`` for a positive parameter field).
    Use it as a learned forcing (``dphys.Augmented(model, forcing=field)``: it is
    called with the time and ignores it) or as a learned parameter field
    (:func:`set_field`).

    Attributes:
        grid: the (fully periodic) model grid.
        coefficients: ``(2, *mode_shape)`` real and imaginary parts, where
            ``mode_shape`` is ``(2K+1, ..., 2K+1, K+1)`` (the last axis holds the
            non-negative wavenumbers of a real field).
        n_modes: $K$ (static).
        transform: $T$, or ``None`` (static).
        offset: added before the transform (static), e.g. ``log(kappa0)``.

    Example:
        >>> import dphys, jax.numpy as jnp
        >>> grid = dphys.Grid((16, 16), lengths=1.0, boundary="periodic")
        >>> g = FourierField(grid, 2)
        >>> g().shape, float(jnp.abs(g()).max())
        ((16, 16), 0.0)
    """

    grid: dphys.Grid
    coefficients: jax.Array
    n_modes: int = eqx.field(static=True)
    transform: Callable | None = eqx.field(static=True)
    offset: float = eqx.field(static=True)

    def __init__(
        self,
        grid: dphys.Grid,
        n_modes: int,
        *,
        transform: Callable | None = None,
        offset: float = 0.0,
        dtype=None,
        key=None,
        init_scale: float = 0.0,
    ):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        if not grid.periodic:
            raise ValueError(
                "`FourierField` needs a fully periodic grid (its modes are periodic), "
                f"got boundary={grid.boundary}; on a bounded domain learn the field "
                "with a `LocalTendency` on coordinate inputs or as free values."
            )
        n_modes = _positive_int("n_modes", n_modes, 0)
        limit = min(n // 2 for n in grid.shape)
        if n_modes >= limit:
            raise ValueError(
                f"`n_modes` = {n_modes} must be below half the smallest grid size "
                f"({limit}) so every mode is resolved."
            )
        dtype = jnp.result_type(float) if dtype is None else dtype
        shape = (2,) + (2 * n_modes + 1,) * (grid.ndim - 1) + (n_modes + 1,)
        if init_scale:
            if key is None:
                raise TypeError("`init_scale` > 0 needs a `key`.")
            coefficients = init_scale * jr.normal(key, shape, dtype)
        else:
            coefficients = jnp.zeros(shape, dtype)
        self.grid = grid
        self.coefficients = coefficients
        self.n_modes = n_modes
        self.transform = transform
        self.offset = float(offset)

    def _index(self):
        k = self.n_modes
        idx = []
        for n in self.grid.shape[:-1]:
            idx.append(np.r_[np.arange(0, k + 1), np.arange(n - k, n)])
        idx.append(np.arange(0, k + 1))
        return np.ix_(*idx)

    def __call__(self, t=None):
        """The field on the grid (``t`` is ignored: the field is constant)."""
        c = self.coefficients
        dtype = c.dtype
        spec_shape = tuple(self.grid.shape[:-1]) + (self.grid.shape[-1] // 2 + 1,)
        cdtype = jnp.result_type(dtype, jnp.complex64)
        spec = jnp.zeros(spec_shape, cdtype)
        spec = spec.at[self._index()].set((c[0] + 1j * c[1]).astype(cdtype))
        # irfftn(S) has amplitude 2|S|/N for a single mode: scale by N/2.
        field = jnp.fft.irfftn(spec, s=self.grid.shape) * (0.5 * self.grid.size)
        field = field.astype(dtype) + self.offset
        return field if self.transform is None else self.transform(field)


def set_field(model, where: Callable, field):
    """``model`` with the leaf ``where(model)`` set to ``field()`` (a learned field).

    Call it inside the loss, so the field's coefficients stay differentiable:
    ``m = set_field(physics, lambda m: m.kappa, kappa_field)``.
    """
    value = field() if callable(field) else field
    return eqx.tree_at(where, model, value)


class SubwindowForcing(eqx.Module):
    r"""Model error as a weak-constraint forcing produced by a network of the state.

    The run is cut into sub-windows of ``steps_per_window`` steps; on sub-window $j$,
    starting at $t_j$ with state $x_j$, the model is advanced with the constant
    extra forcing

    $$ \eta_j = \mathcal N_\theta(t_j, x_j), $$

    exactly the per-sub-window forcing of weak-constraint 4D-Var
    (:class:`assimilation.ModelError`), but a function of the state instead of free
    variables: one network serves every window and every sub-window. The forcing is
    added with :class:`dphys.Augmented`, so the physics keeps its implicit solver.

    Attributes:
        model: the physics model (its parameters are differentiable leaves).
        network: ``network(t, state) -> forcing`` (state pytree, state units per time
            unit), e.g. a :class:`LocalTendency`; any callable, including a sum of a
            network and a :class:`FourierField` (:class:`Sum`).
        steps_per_window: sub-window length in steps (static, >= 1).
    """

    model: dphys.AbstractModel
    network: Any
    steps_per_window: int = eqx.field(static=True)

    def __init__(self, model, network, steps_per_window: int):
        if not isinstance(model, dphys.AbstractModel):
            raise TypeError(
                f"`model` must be a dphys.AbstractModel, got {type(model).__name__}."
            )
        if not callable(network):
            raise TypeError(
                "`network` must be a callable `network(t, state) -> forcing`, got "
                f"{type(network).__name__}."
            )
        self.model = model
        self.network = network
        self.steps_per_window = _positive_int("steps_per_window", steps_per_window)

    @property
    def grid(self) -> dphys.Grid:
        return self.model.grid

    def forced(self, t, state) -> dphys.Augmented:
        """The model of the sub-window starting at ``(t, state)``."""
        return dphys.Augmented(self.model, forcing=self.network(t, state))


class Sum(eqx.Module):
    r"""The sum of learned terms as one term: $\sum_i c_i(t, u)$.

    Each term is called as ``term(t, state)``; a :class:`FourierField` (a function
    of position only) is called as ``term(t)``. Use it to give a
    :class:`SubwindowForcing` a network of the state plus a learned field.
    """

    terms: tuple

    def __init__(self, *terms):
        if not terms or not all(callable(c) for c in terms):
            raise TypeError("`Sum` takes one or more callable terms.")
        self.terms = tuple(terms)

    def __call__(self, t, state):
        out = None
        for c in self.terms:
            v = c(t) if isinstance(c, FourierField) else c(t, state)
            v = jtu.tree_map(lambda a, s: jnp.broadcast_to(a, s.shape), v, state)
            out = v if out is None else jtu.tree_map(jnp.add, out, v)
        return out


# ----------------------------------------------------------------------- rollouts


def _identity(t, state):
    return state


def _check_save(save_steps, n_steps: int) -> tuple[int, ...]:
    steps = tuple(int(s) for s in save_steps)
    if not steps:
        raise ValueError("`save_steps` is empty: give the steps to return.")
    if list(steps) != sorted(set(steps)) or steps[0] < 1 or steps[-1] > n_steps:
        raise ValueError(
            f"`save_steps` must be strictly increasing steps in [1, n_steps="
            f"{n_steps}], got {steps}."
        )
    return steps


def _stop(tree):
    arrays, rest = eqx.partition(tree, eqx.is_inexact_array)
    return eqx.combine(lax.stop_gradient(arrays), rest)


def _stop_gradient_run(model, stepper, state0, t0, dt, n_steps, steps, observe):
    r"""Steps $u^{n+1} = \mathrm{sg}(S(u^n)) + \Delta t\,[F_p(u^n) -
    \mathrm{sg}(F_p(u^n))]$ with $u^n$ stop-gradiented: every solver output is a
    constant of the backward pass, and the parameters $p$ (network and physics)
    receive only the local sensitivity $\Delta t\,\partial F_p/\partial p$ of the
    step that produced each saved state (no gradient through the solver or across
    steps)."""
    frozen = _stop(model)
    sstate = stepper.init(frozen, t0, dt, lax.stop_gradient(state0))
    wanted = np.zeros(n_steps + 1, bool)
    wanted[list(steps)] = True
    wanted = jnp.asarray(wanted)

    def body(carry, k):
        u, ss = carry
        t = t0 + k * dt
        u = lax.stop_gradient(u)
        new, ss, _, _ = stepper.step(frozen, t, dt, u, ss)
        new = lax.stop_gradient(new)
        ss = lax.stop_gradient(ss)
        f = model.vector_field(t, u)
        new = jtu.tree_map(lambda a, b: a + dt * (b - lax.stop_gradient(b)), new, f)
        return (new, ss), observe(t + dt, new)

    ks = jnp.arange(n_steps)
    _, ys = lax.scan(body, (state0, sstate), ks)
    rows = jnp.asarray([s - 1 for s in steps])
    return jtu.tree_map(lambda y: y[rows], ys)


def rollout(
    model,
    stepper: dphys.AbstractStepper,
    state0,
    *,
    dt,
    n_steps: int,
    save_steps: Sequence[int],
    t0=0.0,
    observe: Callable | None = None,
    gradient: str = "solver",
    adjoint: dphys.AbstractAdjoint | None = None,
    throw: bool = True,
):
    r"""Run a (hybrid) model and return ``observe(t, state)`` at ``save_steps``.

    Two gradients, same forward values:

    * ``"solver"`` (solver in the loop): :func:`dphys.simulate`, differentiated
      through every implicit step (one transposed solve each) and the
      checkpointed time loop (``adjoint``).
    * ``"stop_gradient"``: every solver output is stop-gradiented; a saved state
      carries only the local sensitivity $\Delta t\,\partial F/\partial p$ of the
      model's vector field $F$ at the previous step (no backpropagation through the
      solver nor across steps). Memory is one step.

    Args:
        model: a :class:`dphys.AbstractModel` (e.g. a :class:`dphys.Augmented`
            hybrid) or a :class:`SubwindowForcing`.
        stepper: the time stepper.
        state0: the initial state.
        dt, t0: time step and initial time (may be traced).
        n_steps: steps to run (static int >= 1).
        save_steps: strictly increasing steps in ``[1, n_steps]`` to return.
        observe: ``observe(t, state) -> pytree`` (e.g. an observation operator
            wrapped as ``lambda t, u: H(u)``); default the state.
        gradient: ``"solver"`` or ``"stop_gradient"``.
        adjoint: the time loop's adjoint for ``"solver"`` (default
            ``dphys.Checkpointed()``).
        throw: raise on a failed run (``False``: NaN-free failure codes are
            dropped and the values may be non-finite, for training losses).

    Returns:
        The stacked ``observe`` outputs, leading axis ``len(save_steps)``.
    """
    n_steps = _positive_int("n_steps", n_steps)
    steps = _check_save(save_steps, n_steps)
    if gradient not in GRADIENTS:
        raise ValueError(f"`gradient` must be one of {GRADIENTS}, got {gradient!r}.")
    observe = _identity if observe is None else observe
    adjoint = dphys.Checkpointed() if adjoint is None else adjoint
    if isinstance(model, SubwindowForcing):
        if gradient != "solver":
            raise ValueError(
                "`gradient='stop_gradient'` is defined for per-step hybrids; a "
                "SubwindowForcing is trained with the solver in the loop."
            )
        return _subwindow_run(
            model, stepper, state0, t0, dt, n_steps, steps, observe, adjoint, throw
        )
    if not isinstance(model, dphys.AbstractModel):
        raise TypeError(
            "`model` must be a dphys.AbstractModel or a SubwindowForcing, got "
            f"{type(model).__name__}."
        )
    if gradient == "stop_gradient":
        dtype = jnp.result_type(*jtu.tree_leaves(state0))
        return _stop_gradient_run(
            model,
            stepper,
            state0,
            jnp.asarray(t0, dtype),
            jnp.asarray(dt, dtype),
            n_steps,
            steps,
            observe,
        )
    traj = dphys.simulate(
        model,
        stepper,
        state0,
        dt=dt,
        n_steps=n_steps,
        t0=t0,
        saveat=dphys.SaveAt(t1=False, steps=steps, fn=observe),
        adjoint=adjoint,
        fast_forward=False,
        throw=throw,
    )
    return traj.ys


def _subwindow_run(
    model, stepper, state0, t0, dt, n_steps, steps, observe, adjoint, throw
):
    m = model.steps_per_window
    if n_steps % m:
        raise ValueError(
            f"`n_steps` = {n_steps} must be a multiple of `steps_per_window` = {m} "
            "(whole sub-windows)."
        )
    state, parts = state0, []
    for j in range(n_steps // m):
        t_j = t0 + j * m * dt
        local = tuple(s - j * m for s in steps if j * m < s <= (j + 1) * m)
        saveat = (
            dphys.SaveAt(t1=False, steps=local, fn=observe)
            if local
            else dphys.SaveAt(t1=False)
        )
        traj = dphys.simulate(
            model.forced(t_j, state),
            stepper,
            state,
            dt=dt,
            n_steps=m,
            t0=t_j,
            saveat=saveat,
            adjoint=adjoint,
            fast_forward=False,
            throw=throw,
        )
        if local:
            parts.append(traj.ys)
        state = traj.final
    return jtu.tree_map(lambda *xs: jnp.concatenate(xs), *parts)


# ---------------------------------------------------------------------- stability


class Stability(eqx.Module):
    """What :func:`stability` measured (concrete values).

    Attributes:
        stable: every run stayed finite and below ``bound`` times its initial size.
        finite: every run stayed finite.
        max_abs: the largest ``|u|`` over all runs and saved times.
        growth: ``max_abs`` over the largest ``|u|`` of the initial states.
        invariants: ``{name: largest |I(u(t)) - I(u(0))| over runs and times}``.
        n_steps: the length of the free runs.
    """

    stable: bool
    finite: bool
    max_abs: float
    growth: float
    invariants: dict
    n_steps: int


def stability(
    model,
    stepper: dphys.AbstractStepper,
    states0,
    *,
    dt,
    n_steps: int,
    every: int | None = None,
    bound: float = 10.0,
    invariants: dict[str, Callable] | None = None,
) -> Stability:
    r"""Free runs of a (hybrid) model from a batch of states: blow-up and drift.

    Runs ``model`` for ``n_steps`` steps (e.g. 10x the training horizon) from each
    of ``states0`` (a leading batch axis), saving every ``every`` steps, and reports
    whether every run stayed finite with $\max|u| \le$ ``bound``
    $\cdot\max|u_0|$, and the largest drift of each invariant (e.g.
    ``{"mass": grid.integrate}`` where the physics conserves mass).

    Returns:
        A :class:`Stability`.
    """
    n_steps = _positive_int("n_steps", n_steps)
    every = max(1, n_steps // 20) if every is None else _positive_int("every", every)
    steps = tuple(range(every, n_steps + 1, every))
    if steps[-1] != n_steps:
        steps = (*steps, n_steps)
    invariants = {} if invariants is None else dict(invariants)

    @eqx.filter_jit
    def run(model, x0):
        ys = rollout(
            model, stepper, x0, dt=dt, n_steps=n_steps, save_steps=steps, throw=False
        )
        return ys

    ys = eqx.filter_jit(jax.vmap(lambda x: run(model, x)))(states0)
    leaves = jtu.tree_leaves(ys)
    finite = all(bool(jnp.all(jnp.isfinite(x))) for x in leaves)
    max_abs = max(float(jnp.nanmax(jnp.abs(x))) for x in leaves) if finite else np.inf
    start = max(float(jnp.max(jnp.abs(x))) for x in jtu.tree_leaves(states0))
    growth = max_abs / max(start, np.finfo(float).tiny)
    drift = {}
    for name, fn in invariants.items():
        i0 = jax.vmap(fn)(states0)
        it = jax.vmap(jax.vmap(fn))(ys)
        drift[name] = float(jnp.nanmax(jnp.abs(it - i0[:, None]))) if finite else np.inf
    return Stability(
        stable=bool(finite and growth <= bound),
        finite=bool(finite),
        max_abs=float(max_abs),
        growth=float(growth),
        invariants=drift,
        n_steps=int(n_steps),
    )
