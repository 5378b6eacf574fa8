"""A fixed number of minimisation iterations, entirely in JAX (jit/vmap-able)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ._cost import FourDVar
from ._methods import AbstractMethod, GaussNewton


def minimize(
    cost: FourDVar, method: AbstractMethod | None = None, *, n_iterations: int, v0=None
):
    """Run exactly ``n_iterations`` iterations of ``method`` in JAX (jit/vmap-able).

    No stopping test: iterations after convergence leave ``v`` (numerically)
    unchanged for Gauss-Newton. Use this inside ``jax.vmap`` (e.g. over noise
    seeds, with ``FourDVar(throw=False)``); use :func:`assimilate` for stopping
    criteria, progress and an :class:`Analysis`.

    Args:
        cost: the :class:`FourDVar` cost.
        method: :class:`GaussNewton` (default) or :class:`LBFGS`.
        n_iterations: number of (outer) iterations, a static int.
        v0: starting whitened control (default: the background, ``cost.init()``).

    Returns:
        ``(v, history)``: the final whitened control and a dict of arrays of length
        ``n_iterations + 1``: ``cost``, ``background_cost``, ``obs_cost``,
        ``grad_norm`` (index 0 is the start).
    """
    method = GaussNewton() if method is None else method
    v = cost.init() if v0 is None else v0
    state = method.init(cost, v)

    def body(s, _):
        s = method.step(cost, s)
        return s, (s.cost, s.background_cost, s.obs_cost, s.grad_norm)

    s0 = state
    state, rows = jax.lax.scan(body, state, None, length=n_iterations)
    names = ("cost", "background_cost", "obs_cost", "grad_norm")
    history = {
        n: jnp.concatenate([getattr(s0, n)[None], r]) for n, r in zip(names, rows)
    }
    return state.v, history
