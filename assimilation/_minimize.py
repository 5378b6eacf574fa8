r"""The iteration engine: :func:`minimize` runs a method entirely in JAX.

The loop is a ``lax.scan`` of fixed length (run by an adjoint's ``loop``, so a long
unrolled minimisation can be checkpointed like a long time loop, e.g. with
``dphys.Checkpointed()``). A :class:`assimilation.StoppingRule` freezes the iterate
once it is met: later iterations are skipped (``lax.cond``) and leave the state
unchanged, so the result is the same as stopping, and the loop stays jit-, vmap-
and grad-able.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

import dphys

from ._cost import AbstractCost
from ._methods import AbstractMethod, GaussNewton, IterationState
from ._stopping import (
    MAX_ITERATIONS,
    NO_DECREASE,
    NONFINITE,
    RESULTS,
    RUNNING,
    TERMINATIONS,
    StoppingRule,
    result_of,
)


class Solution(eqx.Module):
    r"""The result of :func:`minimize`.

    Attributes:
        control: the final whitened control $v$.
        state: the method's final :class:`assimilation.IterationState` (cost,
            terms, gradient, method memory).
        history: a ``dict`` of arrays of length ``n_iterations + 1`` (index 0: the
            start; entries after a stop repeat the final values): ``cost``,
            ``background_cost``, ``obs_cost``, ``grad_norm``, ``step_norm``,
            ``inner_iterations`` and ``terms`` (``{name: array}``).
        result: a :class:`assimilation.RESULTS` member: ``successful``,
            ``max_iterations_reached`` (a stopping rule's tolerances were not met)
            or ``nonfinite_cost``.
        stats: ``{"num_iterations": iterations taken, "termination": code}``
            (int32 arrays; the code indexes :data:`assimilation.TERMINATIONS`).

    For compatibility, unpacking gives ``(control, history)``:
    ``v, history = minimize(...)``.
    """

    control: Any
    state: IterationState
    history: dict
    result: RESULTS
    stats: dict

    def __iter__(self):
        return iter((self.control, self.history))

    @property
    def value(self):
        """The final control (optimistix's name for it)."""
        return self.control

    @property
    def termination(self) -> str:
        """Why the loop stopped (``"running"``: it ran all requested iterations)."""
        return TERMINATIONS[int(self.stats["termination"])]


def _strong(tree):
    """Drop weak types so that the state of every iteration has one signature."""
    return jtu.tree_map(lambda x: x.astype(x.dtype) if eqx.is_array(x) else x, tree)


def _row(state: IterationState) -> dict:
    return {
        "cost": state.cost,
        "background_cost": state.background_cost,
        "obs_cost": state.obs_cost,
        "grad_norm": state.grad_norm,
        "step_norm": state.step_norm,
        "inner_iterations": state.inner_iterations,
        "inner_residual": state.inner_residual,
        "inner_result": state.inner_result,
        "terms": dict(state.terms),
    }


@eqx.filter_jit
def minimize(
    cost: AbstractCost,
    method: AbstractMethod | None = None,
    *,
    n_iterations: int | None = None,
    stop: StoppingRule | None = None,
    v0=None,
    adjoint: dphys.AbstractAdjoint | None = None,
    throw: bool = True,
) -> Solution:
    r"""Minimise ``cost`` with ``method``, entirely in JAX (jit-, vmap-, grad-able).

    * ``minimize(cost, method, n_iterations=n)``: exactly ``n`` iterations, no
      stopping test (a non-finite step is still rejected and ends the run);
    * ``minimize(cost, method, stop=rule)``: until ``rule`` is met, at most
      ``rule.max_iterations`` iterations (``n_iterations`` caps it further);
    * ``minimize(cost, method)``: the method's default rule
      (``method.stopping_rule()``).

    Use this inside ``jax.vmap`` (e.g. over noise seeds, with
    ``FourDVar(throw=False)``) or to differentiate through the minimisation
    (unrolled assimilation); use :func:`assimilation.assimilate` for progress
    callbacks and an :class:`assimilation.Analysis`.

    Args:
        cost: an :class:`assimilation.AbstractCost`.
        method: :class:`assimilation.GaussNewton` (default),
            :class:`assimilation.LBFGS`, or a proximal method of
            :mod:`assimilation.learn` (``FISTA()``, ``ISTA()``, ``ADMM()``, ...) on
            an ``assimilation.learn.CompositeCost`` (a cost plus a non-smooth
            prior).
        n_iterations: number of iterations (a static int), or the cap with ``stop``.
        stop: an :class:`assimilation.StoppingRule`.
        v0: starting whitened control (default: the background, ``cost.init()``).
        adjoint: runs the iteration loop (``adjoint.loop``):
            ``dphys.Unrolled()`` (default, a plain ``lax.scan``) or
            ``dphys.Checkpointed()`` to differentiate a long loop in less memory.
        throw: raise if the result is not ``successful`` (a non-finite cost, or a
            stopping rule's tolerances not met); ``False`` records it in
            ``result`` (for ``vmap``).

    Returns:
        A :class:`Solution` (unpacks as ``(control, history)``).

    Raises:
        TypeError, ValueError: bad arguments (before tracing).
    """
    method = GaussNewton() if method is None else method
    if not isinstance(cost, AbstractCost):
        raise TypeError(
            f"`cost` must be an assimilation.AbstractCost (e.g. FourDVar), got "
            f"{type(cost).__name__}."
        )
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be an assimilation.AbstractMethod (GaussNewton(), "
            f"LBFGS()), got {type(method).__name__}."
        )
    if stop is not None and not isinstance(stop, StoppingRule):
        raise TypeError(
            f"`stop` must be an assimilation.StoppingRule, got {type(stop).__name__}."
        )
    if n_iterations is not None and (
        isinstance(n_iterations, bool)
        or not isinstance(n_iterations, int)
        or n_iterations < 0
    ):
        raise TypeError(
            f"`n_iterations` must be a Python int >= 0 (it fixes the loop length), "
            f"got {n_iterations!r}."
        )
    if n_iterations is None and stop is None:
        stop = method.stopping_rule()
    if stop is not None:
        n_iterations = (
            stop.max_iterations
            if n_iterations is None
            else min(n_iterations, stop.max_iterations)
        )
    adjoint = dphys.Unrolled() if adjoint is None else adjoint
    if not isinstance(adjoint, dphys.AbstractAdjoint):
        raise TypeError(
            "`adjoint` must be a dphys.AbstractAdjoint (dphys.Unrolled(), "
            f"dphys.Checkpointed()), got {type(adjoint).__name__}."
        )
    v = cost.init() if v0 is None else v0
    cost.check(v)

    state = _strong(method.init(cost, v))
    g0 = state.grad_norm
    if stop is None:
        finite = jnp.isfinite(state.cost) & jnp.isfinite(g0)
        code = jnp.where(finite, RUNNING, NONFINITE).astype(jnp.int32)
    else:
        code = stop.check(
            0, grad_norm0=g0, cost_prev=jnp.inf, cost=state.cost, grad_norm=g0
        )
    row0 = _row(state)

    def body(carry):
        state, taken, code = carry
        running = code == RUNNING
        new = jax.lax.cond(
            running, lambda s: _strong(method.step(cost, s)), lambda s: s, state
        )
        finite = jnp.isfinite(new.cost) & jnp.isfinite(new.grad_norm)
        accept = running & finite
        # A failed step leaves v unchanged (the method kept the iterate) but its
        # inner statistics are recorded; it is not counted as an iteration.
        state = jtu.tree_map(lambda a, b: jnp.where(accept, a, b), new, state)
        moved = accept & ~new.failed
        taken = taken + moved.astype(jnp.int32)
        check = (
            jnp.asarray(RUNNING, jnp.int32)
            if stop is None
            else stop.check(
                taken,
                grad_norm0=g0,
                cost_prev=carry[0].cost,
                cost=state.cost,
                grad_norm=state.grad_norm,
            )
        )
        check = jnp.where(new.failed, NO_DECREASE, check)
        code = jnp.where(running, jnp.where(finite, check, NONFINITE), code)
        return (state, taken, code.astype(jnp.int32)), _row(state)

    init = (state, jnp.zeros((), jnp.int32), code)
    (state, taken, code), rows = adjoint.loop(body, init, n_iterations)
    history = jtu.tree_map(lambda r0, r: jnp.concatenate([r0[None], r]), row0, rows)
    if stop is not None:
        # Out of iterations without a tolerance met (`n_iterations` may cap the
        # rule's own `max_iterations`).
        code = jnp.where(code == RUNNING, MAX_ITERATIONS, code).astype(jnp.int32)
    result = result_of(code)
    control = state.v
    if throw:
        control = result.error_if(control, result != RESULTS.successful)
    return Solution(
        control=control,
        state=state,
        history=history,
        result=result,
        stats={"num_iterations": taken, "termination": code},
    )
