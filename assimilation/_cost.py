r"""Strong- and weak-constraint 4D-Var costs.

With the whitened control $v$ of a :class:`assimilation.Control` (initial state,
parameters, model-error forcings), the cost is

$$ J(v) = \tfrac12\|v\|^2
   + \tfrac12\sum_k \big\|R^{-1/2}\big(H_k(x(t_k; v)) - y_k\big)\big\|^2_{\text{observed}}, $$

which equals the textbook strong-constraint 4D-Var cost
$\tfrac12\|x_0-x_b\|^2_{B^{-1}} + \tfrac12\|p-p_b\|^2_{B_p^{-1}} +
\tfrac12\sum_k\|H_k(x(t_k)) - y_k\|^2_{R^{-1}}$ under the control-variable transform
$x_0 = x_b + B^{1/2}v_x$, $p = T(T^{-1}(p_b) + B_p^{1/2}v_p)$; with a
:class:`assimilation.ModelError` it also holds $\tfrac12\sum_j\|\eta_j\|^2_{Q^{-1}}$
(weak constraint). $R = \mathrm{diag}(\sigma_s^2)$ per sensor; missing values (NaN)
drop out of the sum.

The model trajectory is never stored: the observation hook
``dphys.SaveAt(steps=..., fn=H)`` saves only sensor values at the steps that bracket
the observation times, and ``jax.grad`` goes through the core's adjoints
(transposed implicit solves, checkpointed time loop).
"""

from __future__ import annotations

import numbers
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import dphys

from ._control import Control
from ._observation import (
    AbstractObservationOperator,
    Interpolation,
    Observations,
    TimeInterpolation,
)


class _Forced(dphys.AbstractModel):
    """``model`` with an extra constant source ``extra`` (model-error forcing)."""

    grid: dphys.Grid
    model: dphys.AbstractModel
    extra: Any

    def __init__(self, model, extra):
        self.grid = model.grid
        self.model = model
        self.extra = extra

    def linear(self, t, state):
        return self.model.linear(t, state)

    def explicit(self, t, state):
        return self.model.explicit(t, state)

    def forcing(self, t):
        f = self.model.forcing(t)
        if f is None:
            return self.extra
        return jtu.tree_map(jnp.add, f, self.extra)

    @property
    def translation_invariant(self):
        return self.model.translation_invariant

    @property
    def symmetric(self):
        return self.model.symmetric

    @property
    def autonomous(self):
        return self.model.autonomous

    def check_state(self, state):
        return self.model.check_state(state)

    def check_run(self, state, dt):
        return self.model.check_run(state, dt)

    def validate(self, state):
        return self.model.validate(state)


def _tree_sq(tree):
    leaves = jtu.tree_leaves(tree)
    return sum(jnp.sum(jnp.square(x)) for x in leaves)


class FourDVar(eqx.Module):
    r"""A 4D-Var cost function $J(v)$ over a window of ``n_steps`` model steps.

    Strong constraint by default; weak constraint when the control has a
    :class:`assimilation.ModelError` (the window is then run as ``n_windows``
    chained :func:`dphys.simulate` calls, each with its own constant forcing).
    Every method is a pure function of the whitened control ``v`` (a ``dict``,
    see :class:`assimilation.Control`): jittable, differentiable and vmappable.
    To vmap over observation sets (e.g. noise seeds), build the cost once and swap
    values with ``eqx.tree_at(lambda c: c.obs.values, cost, values)``.

    Attributes:
        model: the model at its background parameters (controlled parameters are
            overwritten from the control).
        stepper: the time stepper.
        state0: the background initial state $x_b$ (also the fixed initial state
            when the state is not controlled).
        obs: the :class:`assimilation.Observations`.
        control: the :class:`assimilation.Control` (backgrounds filled in).
        obs_op: the spatial observation operator (default: interpolation at
            ``obs.positions`` on ``model.grid``).
        sampling: the :class:`assimilation.TimeInterpolation` of ``obs.times``.
        t0, dt, n_steps: the window ``[t0, t0 + n_steps*dt]`` (static).
        adjoint: how :func:`dphys.simulate` differentiates the time loop.
        throw: raise if a model run fails (set ``False`` inside ``vmap`` to get
            NaN costs instead of an error for the failing members).

    Raises:
        TypeError, ValueError: bad arguments, with what was received and how to fix
            it: sensors outside a non-periodic domain, observation times outside the
            window, mismatched shapes, ``n_steps`` not divisible by ``n_windows``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import assimilation as da, dphys, pdes
        >>> grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
        >>> model = pdes.Heat(grid, kappa=0.01)
        >>> x, = grid.coords
        >>> obs = da.Observations([0.5, 1.0], jnp.zeros((2, 3)), [0.1, 0.5, 0.9], 0.1)
        >>> kappa = da.Parameter("kappa", transform=da.Log(), sigma=1.0)
        >>> cost = da.FourDVar(model, dphys.CrankNicolson(), jnp.sin(2 * jnp.pi * x),
        ...                    obs, da.Control(parameters=[kappa]), dt=0.1, n_steps=10)
        >>> J, g = jax.value_and_grad(cost)(cost.init())
        >>> sorted(g)
        ['kappa']
    """

    model: dphys.AbstractModel
    stepper: dphys.AbstractStepper
    state0: Any
    obs: Observations
    control: Control
    obs_op: AbstractObservationOperator
    sampling: TimeInterpolation
    adjoint: dphys.AbstractAdjoint
    t0: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    n_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        model: dphys.AbstractModel,
        stepper: dphys.AbstractStepper,
        state0,
        obs: Observations,
        control: Control,
        *,
        dt: float,
        n_steps: int,
        t0: float = 0.0,
        adjoint: dphys.AbstractAdjoint = dphys.Checkpointed(),
        obs_op: AbstractObservationOperator | None = None,
        throw: bool = True,
    ):
        if not isinstance(model, dphys.AbstractModel):
            raise TypeError(
                f"`model` must be a dphys.AbstractModel (e.g. pdes.Heat), got "
                f"{type(model).__name__}."
            )
        if not isinstance(stepper, dphys.AbstractStepper):
            raise TypeError(
                f"`stepper` must be a dphys.AbstractStepper, got {type(stepper).__name__}."
            )
        if not isinstance(obs, Observations):
            raise TypeError(
                f"`obs` must be assimilation.Observations, got {type(obs).__name__}."
            )
        if not isinstance(control, Control):
            raise TypeError(
                f"`control` must be assimilation.Control, got {type(control).__name__}."
            )
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral):
            raise TypeError(f"`n_steps` must be a Python int, got {n_steps!r}.")
        if n_steps < 1:
            raise ValueError(f"`n_steps` must be >= 1, got {n_steps}.")
        dt_arr, t0_arr = np.asarray(dt), np.asarray(t0)
        if dt_arr.shape != () or not (np.isfinite(dt_arr) and dt_arr > 0):
            raise ValueError(f"`dt` must be a positive finite scalar, got {dt!r}.")
        if t0_arr.shape != () or not np.isfinite(t0_arr):
            raise ValueError(f"`t0` must be a finite scalar, got {t0!r}.")
        model.check_state(state0)
        if control.model_error is not None and n_steps % control.model_error.n_windows:
            raise ValueError(
                f"`n_steps` = {n_steps} is not divisible by ModelError(n_windows="
                f"{control.model_error.n_windows}); sub-windows must have equal length."
            )
        if obs_op is None:
            obs_op = Interpolation(model.grid, obs.positions, field=obs.field)
        elif not isinstance(obs_op, AbstractObservationOperator):
            raise TypeError(
                "`obs_op` must be an AbstractObservationOperator, got "
                f"{type(obs_op).__name__}."
            )
        n_out = jax.eval_shape(obs_op, state0).shape
        if n_out != (obs.n_sensors,):
            raise ValueError(
                f"`obs_op` returns shape {n_out} but `obs` has {obs.n_sensors} sensors."
            )
        self.model = model
        self.stepper = stepper
        self.state0 = state0
        self.obs = obs
        self.control = control.resolve(model, state0)
        self.obs_op = obs_op
        self.sampling = TimeInterpolation(
            obs.times, t0=float(t0), dt=float(dt), n_steps=int(n_steps)
        )
        self.adjoint = adjoint
        self.t0 = float(t0)
        self.dt = float(dt)
        self.n_steps = int(n_steps)
        self.throw = bool(throw)

    # ------------------------------------------------------------------ the control

    def init(self) -> dict:
        """The whitened control of the background ($v = 0$)."""
        return self.control.zeros(self.state0)

    def initial_state(self, v):
        """$x_0(v)$."""
        return self.control.initial_state_of(v, self.state0)

    def parameters(self, v) -> dict:
        """Physical parameter values ``{name: value}``."""
        return self.control.parameters_of(v)

    def forcings(self, v):
        """Model-error forcings, leading axis ``n_windows`` (``None`` if strong)."""
        return self.control.forcings_of(v)

    def model_at(self, v):
        """The model with the controlled parameters set from ``v``."""
        return self.control.model_of(v, self.model)

    # ------------------------------------------------------------------ the forecast

    def forecast(self, v):
        r"""Run the window from control ``v``.

        Returns:
            ``(hx, final)``: the model equivalents $H(x(t_k))$ at the observation
            times, shape ``(n_times, n_sensors)``, and the state at the end of the
            window.
        """
        model = self.model_at(v)
        x0 = self.initial_state(v)
        forcings = self.forcings(v)
        steps = self.sampling.steps
        fn = lambda t, y: self.obs_op(y)
        run = lambda m, x, n, t0, save: dphys.simulate(
            m,
            self.stepper,
            x,
            dt=self.dt,
            n_steps=n,
            t0=t0,
            saveat=dphys.SaveAt(t1=False, steps=save, fn=fn),
            adjoint=self.adjoint,
            throw=self.throw,
        )
        if forcings is None:
            traj = run(model, x0, self.n_steps, self.t0, steps)
            saved, final = traj.ys, traj.final
        else:
            n_win = self.control.model_error.n_windows
            m = self.n_steps // n_win
            state, parts = x0, []
            for j in range(n_win):
                local = tuple(
                    s - j * m
                    for s in steps
                    if j * m < s <= (j + 1) * m or (j == 0 and s == 0)
                )
                forced = _Forced(model, jtu.tree_map(lambda f: f[j], forcings))
                traj = run(forced, state, m, self.t0 + j * m * self.dt, local)
                if local:
                    parts.append(traj.ys)
                state = traj.final
            saved = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
            final = state
        return self.sampling(saved), final

    def predict(self, v):
        """Model equivalents $H(x(t_k))$, shape ``(n_times, n_sensors)``."""
        return self.forecast(v)[0]

    def final_state(self, v):
        """The state at the end of the window, $x(t_0 + n\\Delta t)$."""
        return self.forecast(v)[1]

    # --------------------------------------------------------------------- the cost

    def _whiten(self, hx):
        y = self.obs.values.astype(hx.dtype)
        valid = ~jnp.isnan(y)
        # Double `where`: the NaN never enters an arithmetic operation, so neither
        # the value nor the gradient can become NaN.
        y_safe = jnp.where(valid, y, 0)
        sigma = self.obs.sigma.astype(hx.dtype)
        return jnp.where(valid, (hx - y_safe) / sigma, 0)

    def obs_residual(self, v):
        r"""Whitened residuals $R^{-1/2}(H(x(t_k)) - y_k)$, zero where missing.

        Shape ``(n_times, n_sensors)``; the observation term is half its squared
        norm. Its Jacobian is what Gauss-Newton linearises.
        """
        return self._whiten(self.predict(v))

    def costs(self, v):
        """``(J, J_b, J_o)``: total, background ($\\frac12\\|v\\|^2$), observation."""
        jb = 0.5 * _tree_sq(v)
        jo = 0.5 * jnp.sum(jnp.square(self.obs_residual(v)))
        return jb + jo, jb, jo

    def __call__(self, v):
        """The cost $J(v)$ (a scalar)."""
        self.control.check_control(v, self.state0)
        return self.costs(v)[0]

    def innovations(self, v):
        """$y_k - H(x(t_k))$ (observation minus model), NaN where missing."""
        hx = self.predict(v)
        y = self.obs.values.astype(hx.dtype)
        return jnp.where(jnp.isnan(y), jnp.nan, y - hx)
