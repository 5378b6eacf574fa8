r"""Inference-time steering: refine an analysis with user-supplied energy terms.

A trained assimilator returns an analysis $v_a$ of the 4D-Var cost $J$. A user who
knows more than the observations (a sensor that read a given value, a conserved
total, smoothness, physical bounds) adds energy terms $E_i$ and refines by
gradient steps (L-BFGS) on the augmented cost

$$ F(v) = J(v) + \sum_i E_i(v), $$

starting from $v_a$. :func:`steer` reports what the refinement cost in $J$,
$\Delta J = J(v_s) - J(v_a)$, and how far it moved the analysis in units of the
posterior standard deviation: the Mahalanobis length of the shift under the
Gauss-Newton (Laplace) posterior $\mathcal N(v_a, A^{-1})$,
$A = I + J_o^\top J_o$,

$$ s = \sqrt{(v_s - v_a)^\top A\,(v_s - v_a)}, $$

(one tangent-linear and one adjoint sweep), and with a given pointwise posterior
standard deviation $\sigma_a$ of the initial state, $\max|x_s - x_a|/\sigma_a$.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from dphys.operators import gradient as _gradient
from dphys.testing import tree_dot

from . import _problem as P


class AbstractEnergy(eqx.Module):
    """A user energy term $E(v)$ on the whitened control of a cost."""

    @abc.abstractmethod
    def __call__(self, cost, v) -> jax.Array: ...


def _field(cost, state, field):
    if field is None:
        leaves = jtu.tree_leaves(state)
        if len(leaves) != 1:
            raise ValueError(
                "The state has several fields; name the one this energy acts on with "
                "`field=` (e.g. 'eta')."
            )
        return leaves[0]
    return getattr(state, field)


class SensorReading(AbstractEnergy):
    r"""Sensor ``sensor`` reads ``value`` at observation time index ``time_index``:
    $E = \tfrac12((H x(t_k))_s - y)^2/\sigma^2$ (one forward sweep).

    Attributes:
        sensor, time_index: which sensor of the cost's observations, at which of
            its observation times (static ints).
        value: the reading (observation units).
        sigma: how firmly it is imposed (its standard deviation).
    """

    sensor: int = eqx.field(static=True)
    time_index: int = eqx.field(static=True)
    value: jax.Array
    sigma: jax.Array

    def __init__(self, sensor: int, time_index: int, value, sigma):
        self.sensor = int(sensor)
        self.time_index = int(time_index)
        self.value = jnp.asarray(value, jnp.result_type(float))
        self.sigma = jnp.asarray(sigma, jnp.result_type(float))

    def __call__(self, cost, v):
        n_t, n_s = cost.obs.n_times, cost.obs.n_sensors
        if not (0 <= self.sensor < n_s and 0 <= self.time_index < n_t):
            raise ValueError(
                f"SensorReading(sensor={self.sensor}, time_index={self.time_index}) "
                f"is outside the cost's {n_s} sensors and {n_t} observation times."
            )
        pred = P.predict(cost, v)[self.time_index, self.sensor]
        return 0.5 * jnp.square((pred - self.value) / self.sigma)


class Conservation(AbstractEnergy):
    r"""The initial state's integral is ``total``:
    $E = \tfrac12(\sum_i x_{0,i}\Delta V - M)^2/\sigma^2$.

    Attributes:
        total: $M$; sigma: its tolerance; field: the field for multi-field states.
    """

    total: jax.Array
    sigma: jax.Array
    field: str | None = eqx.field(static=True, default=None)

    def __call__(self, cost, v):
        x = _field(cost, P.initial_state(cost, v), self.field)
        mass = P.grid_of(cost).integrate(x)
        return 0.5 * jnp.square((mass - self.total) / self.sigma)


class Smoothness(AbstractEnergy):
    r"""$E = \tfrac{w}{2}\sum_i |\nabla x_0|_i^2\,\Delta V$ (centred differences).

    Attributes:
        weight: $w$; field: the field for multi-field states.
    """

    weight: jax.Array
    field: str | None = eqx.field(static=True, default=None)

    def __call__(self, cost, v):
        grid = P.grid_of(cost)
        x = _field(cost, P.initial_state(cost, v), self.field)
        return (
            0.5
            * self.weight
            * sum(grid.integrate(jnp.square(g)) for g in _gradient(x, grid))
        )


class Bounds(AbstractEnergy):
    r"""$E = \tfrac{w}{2}\sum_i[\max(x_{0,i} - b, 0)^2 + \max(a - x_{0,i}, 0)^2]$.

    Attributes:
        lower, upper: $a$ and $b$ (``None`` for no bound); weight: $w$; field: the
            field for multi-field states.
    """

    lower: Any = None
    upper: Any = None
    weight: jax.Array = eqx.field(default_factory=lambda: jnp.asarray(1e4))
    field: str | None = eqx.field(static=True, default=None)

    def __call__(self, cost, v):
        x = _field(cost, P.initial_state(cost, v), self.field)
        out = jnp.zeros(())
        if self.upper is not None:
            out = out + jnp.sum(jnp.square(jax.nn.relu(x - self.upper)))
        if self.lower is not None:
            out = out + jnp.sum(jnp.square(jax.nn.relu(self.lower - x)))
        return 0.5 * self.weight * out


class SteeringResult(eqx.Module):
    """The output of :func:`steer`.

    Attributes:
        control: the steered control $v_s$; start: the analysis $v_a$.
        cost_before, cost_after: $J(v_a)$, $J(v_s)$; delta_cost: their difference.
        energies_before, energies_after: each energy term at $v_a$ and $v_s$.
        shift_sigma: $\\sqrt{\\Delta v^\\top A\\,\\Delta v}$, the shift in posterior
            standard deviations.
        shift_sigma_max: $\\max|x_s - x_a|/\\sigma_a$ when ``state_std`` was given,
            else ``None``.
    """

    control: Any
    start: Any
    cost_before: jax.Array
    cost_after: jax.Array
    delta_cost: jax.Array
    energies_before: jax.Array
    energies_after: jax.Array
    shift_sigma: jax.Array
    shift_sigma_max: Any


def steer(
    cost,
    energies: Sequence[AbstractEnergy],
    *,
    assimilator=None,
    v=None,
    n_iterations: int = 20,
    state_std=None,
) -> SteeringResult:
    r"""Refine an analysis by L-BFGS on $J + \sum_i E_i$ (see the module docstring).

    Args:
        cost: the window's :class:`assimilation.FourDVar`.
        energies: the user terms (:class:`SensorReading`, :class:`Conservation`,
            :class:`Smoothness`, :class:`Bounds` or any :class:`AbstractEnergy`).
        assimilator: a trained assimilator whose analysis is the start; or
        v: the start control directly (exactly one of the two).
        n_iterations: L-BFGS iterations (each a few cost and gradient evaluations).
        state_std: optional pointwise posterior std of the initial state (e.g.
            ``assimilation.posterior(cost, v).initial_state_std``).

    Returns:
        A :class:`SteeringResult`.
    """
    P.check_cost(cost)
    energies = tuple(energies)
    if not energies or not all(isinstance(e, AbstractEnergy) for e in energies):
        raise TypeError(
            "`energies` must be a non-empty sequence of AbstractEnergy terms, got "
            f"{[type(e).__name__ for e in energies]}."
        )
    if (assimilator is None) == (v is None):
        raise ValueError(
            "Give exactly one of `assimilator` (its analysis is the start) or `v`."
        )
    if (
        isinstance(n_iterations, bool)
        or not isinstance(n_iterations, int)
        or (n_iterations < 1)
    ):
        raise ValueError(
            f"`n_iterations` must be an integer >= 1, got {n_iterations!r}."
        )
    v_a = assimilator(cost).control if v is None else v

    def augmented(w):
        return P.cost_value(cost, w) + sum(e(cost, w) for e in energies)

    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(augmented)

    def body(c, _):
        w, state = c
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(
            grad, state, w, value=value, grad=grad, value_fn=augmented
        )
        return (optax.apply_updates(w, updates), state), None

    (v_s, _), _ = jax.lax.scan(body, (v_a, opt.init(v_a)), None, length=n_iterations)
    dv = jtu.tree_map(jnp.subtract, v_s, v_a)
    op, _ = P.gauss_newton_operator(cost, v_a)
    a_dv = op.mv(dv)
    shift = jnp.sqrt(tree_dot(dv, a_dv))
    shift_max = None
    if state_std is not None:
        dx = jtu.tree_map(
            jnp.subtract, P.initial_state(cost, v_s), P.initial_state(cost, v_a)
        )
        shift_max = max(
            jnp.max(jnp.abs(d) / s)
            for d, s in zip(
                jtu.tree_leaves(dx), jtu.tree_leaves(state_std), strict=True
            )
        )
    j_a, j_s = P.cost_value(cost, v_a), P.cost_value(cost, v_s)
    return SteeringResult(
        control=v_s,
        start=v_a,
        cost_before=j_a,
        cost_after=j_s,
        delta_cost=j_s - j_a,
        energies_before=jnp.stack([e(cost, v_a) for e in energies]),
        energies_after=jnp.stack([e(cost, v_s) for e in energies]),
        shift_sigma=shift,
        shift_sigma_max=shift_max,
    )
