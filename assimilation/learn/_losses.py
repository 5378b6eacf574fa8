r"""Training losses for unrolled assimilators, usable alone or mixed.

Every loss is called as ``loss(assimilator, cost, *, truth=None, key=None)`` on one
window (``jax.vmap`` over windows for a batch) and returns a scalar. It runs the
assimilator on the window's cost and scores the analysis $v_a$:

* :class:`Supervised`: mean squared error of the analysed initial state (and/or
  parameters) against the truth of a twin experiment;
* :class:`HeldOutSensors` (self-supervised, no truth): a random fraction of the
  sensors is hidden from the cost, and the analysis must predict their values,
  averaged over ``n_splits`` random splits;
* :class:`AnalysisCost`: $J(v_a)$ (no truth);
* :class:`KKTResidual`: $\tfrac12\|\nabla J(v_a)\|^2$ in the whitened control,
  i.e. $\tfrac12\|\nabla_{x_0} J\|_B^2$ (the first-order optimality residual in the
  $B$-metric), one adjoint sweep (no truth);
* :class:`PhysicsResidual`: the model equation's residual along the analysis
  trajectory, for weak-constraint analyses (no truth);
* :class:`Mixed`: a weighted sum; losses that only score the analysis share one
  run of the assimilator.

``truth`` is the true initial state (a state pytree) or a dict with
``"initial_state"`` and/or ``"parameters"`` (``{name: physical value}``).
"""

from __future__ import annotations

import abc
from collections.abc import Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

from . import _problem as P
from ._windows import sensor_splits


def _mean_sq(tree):
    leaves = jtu.tree_leaves(tree)
    n = sum(x.size for x in leaves)
    return sum(jnp.sum(jnp.square(x)) for x in leaves) / n


def _truth_parts(truth):
    if truth is None:
        return None, None
    if isinstance(truth, dict) and set(truth) <= {"initial_state", "parameters"}:
        return truth.get("initial_state"), truth.get("parameters")
    return truth, None


class AbstractLoss(eqx.Module):
    """A training loss on one window.

    Subclasses that only score the analysis implement
    ``evaluate(result, cost, truth) -> scalar``; others override ``__call__``.
    """

    needs_truth: bool = eqx.field(static=True, default=False, kw_only=True)

    def __call__(self, assimilator, cost, *, truth=None, key=None):
        self._check_truth(truth)
        return self.evaluate(assimilator(cost), cost, truth)

    @abc.abstractmethod
    def evaluate(self, result, cost, truth): ...

    def _check_truth(self, truth):
        if self.needs_truth and truth is None:
            raise ValueError(
                f"{type(self).__name__} compares the analysis with the truth: pass "
                "`truth=` (the true initial state, or a dict with 'initial_state' "
                "and/or 'parameters'), or use a loss without ground truth "
                "(HeldOutSensors, AnalysisCost, KKTResidual)."
            )


class Supervised(AbstractLoss):
    r"""$w_x\,\overline{(x_a - x_t)^2} + w_p\,\overline{(p_a - p_t)^2}$.

    Mean squared errors over the initial state's values and over the parameters'
    entries (physical units).

    Attributes:
        state_weight: $w_x$ (0 to ignore the state).
        parameter_weight: $w_p$ (0 to ignore the parameters).
    """

    state_weight: float = eqx.field(static=True, default=1.0)
    parameter_weight: float = eqx.field(static=True, default=0.0)
    needs_truth: bool = eqx.field(static=True, default=True, kw_only=True)

    def evaluate(self, result, cost, truth):
        x_t, p_t = _truth_parts(truth)
        v = result.control
        out = jnp.zeros(())
        if self.state_weight:
            if x_t is None:
                raise ValueError(
                    "Supervised(state_weight > 0) needs the true initial state in "
                    "`truth`."
                )
            x_a = P.initial_state(cost, v)
            out = out + self.state_weight * _mean_sq(
                jtu.tree_map(jnp.subtract, x_a, x_t)
            )
        if self.parameter_weight:
            if not p_t:
                raise ValueError(
                    "Supervised(parameter_weight > 0) needs `truth['parameters']`."
                )
            p_a = P.parameters(cost, v)
            err = {k: p_a[k] - jnp.asarray(p_t[k]) for k in p_t}
            out = out + self.parameter_weight * _mean_sq(err)
        return out


class HeldOutSensors(AbstractLoss):
    r"""Self-supervised: predict sensors hidden from the cost.

    For each of ``n_splits`` splits a random ``fraction`` of the sensors (at every
    time) is marked missing in the cost, the assimilator runs on the rest, and the
    loss is the mean of $((H x_a(t_k))_s - y_{ks})^2/\sigma_s^2$ over the hidden
    observed values (one more forward sweep per split), averaged over the splits.
    Its expected value is the whitened prediction error plus 1 (the noise of the
    held-out data), so it needs no truth. Needs ``key``.

    Attributes:
        fraction: share of sensors hidden per split, in (0, 1).
        n_splits: number of random splits (static).
    """

    fraction: float = eqx.field(static=True, default=0.2)
    n_splits: int = eqx.field(static=True, default=2)

    def __check_init__(self):
        if not (0.0 < self.fraction < 1.0):
            raise ValueError(f"`fraction` must lie in (0, 1), got {self.fraction!r}.")
        if (
            isinstance(self.n_splits, bool)
            or not isinstance(self.n_splits, int)
            or (self.n_splits < 1)
        ):
            raise ValueError(
                f"`n_splits` must be an integer >= 1, got {self.n_splits!r}."
            )

    def masks(self, cost, key):
        """``(n_splits, n_sensors)`` booleans: True for the hidden sensors
        (:func:`assimilation.learn.sensor_splits`)."""
        return sensor_splits(
            cost.obs.n_sensors, fraction=self.fraction, key=key, n_splits=self.n_splits
        )

    def __call__(self, assimilator, cost, *, truth=None, key=None):
        if key is None:
            raise ValueError(
                "HeldOutSensors draws random sensor splits: pass `key=` (a "
                "jax.random key)."
            )
        hidden = self.masks(cost, key)

        def split(h):
            result = assimilator(P.hide_observations(cost, h))
            pred = P.predict(cost, result.control)
            where = jnp.broadcast_to(h[None, :], pred.shape)
            total, count = P.whitened_misfit(cost, pred, where)
            return total / jnp.maximum(count, 1)

        return jnp.mean(jax.vmap(split)(hidden))

    def evaluate(self, result, cost, truth):
        raise TypeError(
            "HeldOutSensors runs the assimilator on masked costs; call it as "
            "loss(assimilator, cost, key=...)."
        )


def _n_obs(cost):
    return jnp.maximum(jnp.sum(P.obs_mask(cost)), 1)


class AnalysisCost(AbstractLoss):
    r"""$J(v_a)$ divided by the number of observed values (one forward sweep)."""

    def evaluate(self, result, cost, truth):
        return P.cost_value(cost, result.control) / _n_obs(cost)


class KKTResidual(AbstractLoss):
    r"""$\tfrac12\|\nabla J(v_a)\|^2$ divided by the number of observed values.

    In the whitened control $\nabla_v J = U^\top\nabla_{x_0}J$, so this is half the
    squared $B$-norm of the gradient, the first-order optimality (KKT) residual of
    4D-Var; one forward and one adjoint sweep.
    """

    def evaluate(self, result, cost, truth):
        g = P.evaluate(cost, result.control).grad()
        return (
            0.5 * sum(jnp.sum(jnp.square(x)) for x in jtu.tree_leaves(g)) / _n_obs(cost)
        )


class PhysicsResidual(AbstractLoss):
    r"""Mean squared model-equation residual along the analysis trajectory.

    $\frac{1}{N}\sum_n \overline{R(x_n, x_{n+1})^2}$ over the $N$ steps of the
    window, $R$ the residual of one step of the *unforced* model (tendency units;
    see :func:`assimilation.learn._problem.step_residual`). Zero to round-off along
    a strong-constraint trajectory; with a weak-constraint control it measures how
    far the analysis departs from the model equations (one forward sweep).
    """

    def evaluate(self, result, cost, truth):
        v = result.control
        states = P.trajectory(cost, v)
        model = P.model_of(cost, v)
        t0, dt, n = P.time_axis(cost)
        ts = t0 + dt * jnp.arange(n)
        x = jtu.tree_map(lambda s: s[:-1], states)
        x1 = jtu.tree_map(lambda s: s[1:], states)
        res = jax.vmap(
            lambda t, a, b: P.step_residual(model, cost.stepper, t, dt, a, b)
        )(ts, x, x1)
        return _mean_sq(res)


class Mixed(AbstractLoss):
    r"""$\sum_i w_i\,\ell_i$: losses run on one assimilator output where they can.

    Attributes:
        losses: the :class:`AbstractLoss` terms.
        weights: their weights $w_i$ (static floats).

    Example:
        >>> loss = Mixed([Supervised(), HeldOutSensors()], [1.0, 0.1])  # doctest: +SKIP
    """

    losses: tuple
    weights: tuple = eqx.field(static=True)

    def __init__(
        self, losses: Sequence[AbstractLoss], weights: Sequence[float] | None = None
    ):
        losses = tuple(losses)
        if not losses or not all(isinstance(x, AbstractLoss) for x in losses):
            raise TypeError(
                "`losses` must be a non-empty sequence of AbstractLoss, got "
                f"{[type(x).__name__ for x in losses]}."
            )
        weights = (
            (1.0,) * len(losses) if weights is None else tuple(map(float, weights))
        )
        if len(weights) != len(losses):
            raise ValueError(
                f"`weights` has {len(weights)} entries for {len(losses)} losses."
            )
        self.losses = losses
        self.weights = weights
        self.needs_truth = any(x.needs_truth for x in losses)

    def __call__(self, assimilator, cost, *, truth=None, key=None):
        def is_shared(x):
            return type(x).__call__ is AbstractLoss.__call__

        pairs = list(zip(self.weights, self.losses, strict=True))
        shared = [(w, x) for w, x in pairs if is_shared(x)]
        own = [(w, x) for w, x in pairs if not is_shared(x)]
        total = jnp.zeros(())
        if shared:
            for _, x in shared:
                x._check_truth(truth)
            result = assimilator(cost)
            for w, x in shared:
                total = total + w * x.evaluate(result, cost, truth)
        keys = (
            [None] * len(own) if key is None else list(jr.split(key, max(len(own), 1)))
        )
        for (w, x), k in zip(own, keys, strict=False):
            total = total + w * x(assimilator, cost, truth=truth, key=k)
        return total

    def evaluate(self, result, cost, truth):
        return sum(
            w * x.evaluate(result, cost, truth)
            for w, x in zip(self.weights, self.losses, strict=True)
        )
