r"""The learning layer's one view of a 4D-Var cost.

Every use of a cost's internals by the unrolled assimilators, their gradient modes,
losses and steering goes through the functions here, so that the rest of
:mod:`assimilation.learn` depends only on this small interface:

* :func:`evaluate`: $J$, its named terms and $\nabla J$ at a whitened control $v$
  from one forward and one adjoint sweep of the model over the window;
* :func:`gauss_newton_operator`: the whitened Gauss-Newton Hessian
  $A = I + J_o^\top J_o$ as a ``lineax`` operator (one tangent-linear and one
  adjoint sweep per product);
* :func:`initial_state`, :func:`parameters`, :func:`state_control`: decoding the
  control;
* :func:`obs_mask`, :func:`hide_observations`, :func:`predict`, :func:`to_grid`:
  observations (masks, held-out sensors, model equivalents, the adjoint of the
  spatial interpolation);
* :func:`trajectory` and :func:`step_residual`: the analysis trajectory and the
  implicit relation of one model step (physics residual);
* :func:`make_analysis`: the :class:`assimilation.Analysis` of a learned run.

The whitened control is the ``dict`` of :class:`assimilation.Control`; the
background term is $\tfrac12\|v\|^2$ and the observation term
$\tfrac12\|R^{-1/2}(H(x(t_k; v)) - y_k)\|^2$.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np

import dphys

from .._assimilate import History, _make_analysis
from .._control import INITIAL_STATE
from .._cost import FourDVar
from .._stopping import StoppingRule
from ._windows import mask_cost


def _sq(tree):
    return sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(tree))


def check_cost(cost, name: str = "cost") -> None:
    """Raise ``TypeError`` unless ``cost`` is a cost this layer can assimilate."""
    if not isinstance(cost, FourDVar):
        raise TypeError(
            f"`{name}` must be an assimilation.FourDVar, got {type(cost).__name__}; "
            "build it with assimilation.FourDVar(model, stepper, background, obs, "
            "control, dt=..., n_steps=...)."
        )


def background(cost):
    """The whitened control of the background, $v = 0$."""
    return cost.init()


class Evaluation(eqx.Module):
    r"""$J$ and $\nabla J$ at one control, from one forward and one adjoint sweep.

    Attributes:
        background: $J_b = \tfrac12\|v\|^2$.
        observations: $J_o = \tfrac12\|r\|^2$.
        grad_background: $\nabla J_b = v$.
        grad_observations: $\nabla J_o = J_o^\top r$ (one adjoint sweep).
        residual: the whitened residuals $r = R^{-1/2}(H(x(t_k)) - y_k)$, zero where
            missing, shape ``(n_times, n_sensors)``.
    """

    background: jax.Array
    observations: jax.Array
    grad_background: Any
    grad_observations: Any
    residual: jax.Array

    def value(self, weight=1.0):
        r"""$\lambda J_b + J_o$ (the cost for ``weight`` $\lambda = 1$)."""
        return weight * self.background + self.observations

    def grad(self, weight=1.0):
        r"""$\lambda\nabla J_b + \nabla J_o$."""
        return jtu.tree_map(
            lambda b, o: weight * b + o, self.grad_background, self.grad_observations
        )

    @property
    def terms(self) -> dict:
        return {"background": self.background, "observations": self.observations}


def evaluate(cost, v, residual_map=None) -> Evaluation:
    """Terms and gradients of the cost at ``v``: one forward and one adjoint sweep.

    With ``residual_map`` (a map on ``(n_times, n_sensors)`` arrays), the adjoint
    sweep is applied to ``residual_map(r)`` instead of ``r``: the gradient of the
    observation term preconditioned in observation space, $J_o^\top C r$.
    """
    r, vjp_fn = jax.vjp(cost.obs_residual, v)
    (g_o,) = vjp_fn(r if residual_map is None else residual_map(r))
    return Evaluation(
        background=0.5 * _sq(v),
        observations=0.5 * jnp.sum(jnp.square(r)),
        grad_background=v,
        grad_observations=g_o,
        residual=r,
    )


def cost_value(cost, v):
    """$J(v)$ from one forward sweep."""
    return cost.costs(v)[0]


def gauss_newton_operator(cost, v):
    r"""The whitened Gauss-Newton Hessian $A = I + J_o^\top J_o$ at ``v``.

    Returns ``(operator, evaluation)``: a symmetric positive-definite
    ``lineax.FunctionLinearOperator`` on controls shaped like ``v`` (each product:
    one tangent-linear and one adjoint sweep) and the :class:`Evaluation` at ``v``
    (the linearisation's forward sweep and the gradient's adjoint sweep are shared
    with it).
    """
    r, vjp_fn = jax.vjp(cost.obs_residual, v)
    (g_o,) = vjp_fn(r)

    def mv(p):
        _, jp = jax.jvp(cost.obs_residual, (v,), (p,))
        (jtjp,) = vjp_fn(jp)
        return jtu.tree_map(jnp.add, p, jtjp)

    op = lx.FunctionLinearOperator(
        mv,
        jax.eval_shape(lambda: v),
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
    )
    ev = Evaluation(0.5 * _sq(v), 0.5 * jnp.sum(jnp.square(r)), v, g_o, r)
    return op, ev


# ---------------------------------------------------------------------- the control


def initial_state(cost, v):
    """$x_0(v) = x_b + U v_x$ (the background when the state is not controlled)."""
    return cost.initial_state(v)


def parameters(cost, v) -> dict:
    """Physical parameter values ``{name: value}`` of the control ``v``."""
    return cost.parameters(v)


def has_state_control(cost) -> bool:
    return cost.control.initial_state is not None


def state_control(v):
    """The whitened initial-state part $v_x$ of a control."""
    return v[INITIAL_STATE]


def with_state_control(v, vx) -> dict:
    """``v`` with its initial-state part replaced by ``vx``."""
    out = dict(v)
    out[INITIAL_STATE] = vx
    return out


def grid_of(cost) -> dphys.Grid:
    return cost.model.grid


# --------------------------------------------------------------------- observations


def obs_mask(cost):
    """``(n_times, n_sensors)`` booleans: True where a value is observed."""
    return ~jnp.isnan(cost.obs.values)


def hide_observations(cost, hidden):
    """``cost`` with the values where ``hidden`` is True marked missing (NaN).

    ``hidden`` has the shape of the observation values ``(n_times, n_sensors)`` or
    ``(n_sensors,)`` (a sensor hidden at every time). The hidden values drop out of
    the cost exactly as missing values do.
    """
    return mask_cost(cost, jnp.asarray(hidden, bool))


def observed_values(cost):
    """``(values, sigma)``: the observations (NaN where missing) and their std."""
    return cost.obs.values, cost.obs.sigma


def predict(cost, v):
    """Model equivalents $H(x(t_k; v))$, ``(n_times, n_sensors)``: one forward sweep."""
    return cost.predict(v)


def whitened_misfit(cost, predicted, where):
    r"""$\sum_{k,s\in\text{where}} ((p_{ks} - y_{ks})/\sigma_s)^2$ and the count.

    ``where`` selects entries (booleans of the values' shape); missing values never
    count.
    """
    y, sigma = observed_values(cost)
    valid = where & ~jnp.isnan(y)
    y_safe = jnp.where(valid, y, 0)
    d = jnp.where(valid, (predicted - y_safe) / sigma.astype(predicted.dtype), 0)
    return jnp.sum(jnp.square(d)), jnp.sum(valid)


def to_grid(cost, sensor_values):
    r"""$H^\top s$: sensor values ``(..., n_sensors)`` scattered onto the grid.

    The adjoint of the spatial interpolation (a weighted scatter, no model run).
    Leading axes are mapped over. Returns the observed field's grid shape.
    """
    fn = cost.obs_op.transpose
    for _ in range(sensor_values.ndim - 1):
        fn = jax.vmap(fn)
    return fn(sensor_values)


# ------------------------------------------------------------------------- physics


def trajectory(cost, v):
    """The states at every model step of the window from control ``v``.

    Returns a state pytree with a leading axis of length ``n_steps + 1`` (the
    initial state first). With model error the forced model of each sub-window
    (``cost.window_models``, :class:`dphys.Augmented`) is run, as in the cost.
    """
    models = cost.window_models(v)
    state = cost.initial_state(v)
    m = cost.n_steps // len(models)
    parts = []
    for j, model in enumerate(models):
        ys = dphys.simulate(
            model,
            cost.stepper,
            state,
            dt=cost.dt,
            n_steps=m,
            t0=cost.t0 + j * m * cost.dt,
            saveat=dphys.SaveAt(t0=True, every=1),
            adjoint=cost.adjoint,
            throw=cost.throw,
        ).ys
        parts.append(ys if j == 0 else jtu.tree_map(lambda y: y[1:], ys))
        state = jtu.tree_map(lambda y: y[-1], ys)
    return jtu.tree_map(lambda *p: jnp.concatenate(p), *parts)


def step_residual(model, stepper, t, dt, state, new):
    r"""The residual of one model step from ``state`` at ``t`` to ``new``, in
    tendency units: the stepper's implicit relation
    (:meth:`dphys.AbstractStepper.residual`, state units) divided by $\Delta t$.

    For the θ-method steppers it is
    $$ R = \frac{u^{n+1} - u^n}{\Delta t} - \theta(L u^{n+1} + f^{n+1})
         - (1-\theta)(L u^n + f^n) - N(u^n), $$
    zero along a model trajectory and equal to $\eta$ along a trajectory forced by
    a constant model error $\eta$. The stepper state is the one its ``init`` gives
    at ``state`` (a multistep stepper's step is scored as a first step).
    """
    stepper = stepper.resolve(model, state)
    sstate = stepper.init(model, t, dt, state)
    r = stepper.residual(model, t, dt, state, new, sstate)
    return jtu.tree_map(lambda x: x / dt, r)


def model_of(cost, v):
    """The model with the controlled parameters of ``v`` (no model-error forcing)."""
    return cost.model_at(v)


def time_axis(cost):
    """``(t0, dt, n_steps)`` of the window."""
    return cost.t0, cost.dt, cost.n_steps


# ------------------------------------------------------------------------- analysis


def make_analysis(
    cost,
    v,
    history: dict,
    *,
    method: Any,
    termination: str = "max_iterations",
    uncertainty: bool = False,
):
    """An :class:`assimilation.Analysis` of the control ``v``.

    ``history`` holds per-iteration arrays ``cost``, ``background_cost``,
    ``obs_cost``, ``grad_norm``, ``step_norm`` and ``inner_iterations`` (entry 0 the
    start) and optionally ``elapsed``; parameters are decoded here. ``method`` is
    the object that produced ``v`` (its class name is recorded).
    """
    h = {k: x for k, x in history.items() if k != "parameters"}
    h = {k: np.asarray(x) for k, x in h.items()}
    n = len(h["cost"])
    given = history.get("parameters", {})
    hist = History(
        cost=h["cost"],
        background_cost=h["background_cost"],
        obs_cost=h["obs_cost"],
        grad_norm=h["grad_norm"],
        step_norm=h.get("step_norm", np.zeros(n)),
        inner_iterations=h.get("inner_iterations", np.zeros(n)).astype(int),
        elapsed=h.get("elapsed", np.zeros(n)),
        parameters={
            name: np.asarray(given[name])
            for name in cost.control.parameter_names
            if name in given
        },
        terms={"background": h["background_cost"], "observation": h["obs_cost"]},
    )
    # A learned run stops after its fixed number of iterations: the stopping rule
    # that says so, and the producing object's class name for the message.
    stop = StoppingRule(max_iterations=n - 1, gtol=0.0, ftol=0.0)
    named = type(method, (), {})() if isinstance(method, str) else method
    return _make_analysis(cost, v, hist, termination, stop, named, uncertainty)
