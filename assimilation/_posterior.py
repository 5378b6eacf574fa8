r"""The Gauss-Newton (Laplace) approximation of the posterior at an analysis.

$\mathrm{Cov}(v) \approx (I + J_o^\top J_o)^{-1}$ in the whitened control space,
mapped to parameter standard deviations and correlations (delta method).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import lineax as lx
import numpy as np

from ._control import INITIAL_STATE
from ._cost import FourDVar


class Posterior(eqx.Module):
    r"""Laplace (Gauss-Newton) approximation of the posterior at an analysis.

    In the whitened space $\mathrm{Cov}(v) \approx A^{-1}$, $A = I + J_o^\top J_o$,
    so the unconstrained parameters $z = z_b + Uv$ have covariance
    $U A^{-1}_{pp} U^\top$, and physical parameters $p = T(z)$ the delta-method
    standard deviation $|T'(z)|\,\sigma_z$.

    Attributes:
        labels: one label per scalar parameter entry, in control order: the
            parameter name for scalars, ``name[i]`` / ``name[i,j]`` for fields.
        names: parameter names (static), and ``sizes`` their number of entries.
        mean_unconstrained: $z$ at the analysis, flattened, ``(n_p,)``.
        covariance_unconstrained: ``(n_p, n_p)`` covariance of $z$.
        std_unconstrained: ``(n_p,)``.
        std: ``(n_p,)`` physical standard deviations (delta method).
        correlation: ``(n_p, n_p)`` correlation matrix (same for $z$ and, to first
            order, for $p$).
        initial_state_std: posterior standard deviation of the initial state (an
            array of the state's shape) when the state is controlled, is a single
            array and the dense method was used; else ``None``.
        method: ``"dense"`` or ``"cg"``.
    """

    labels: tuple[str, ...] = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)
    sizes: tuple[int, ...] = eqx.field(static=True)
    shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)
    mean_unconstrained: jax.Array
    covariance_unconstrained: jax.Array
    std_unconstrained: jax.Array
    std: jax.Array
    correlation: jax.Array
    initial_state_std: Any
    method: str = eqx.field(static=True)

    def split(self, flat) -> dict:
        """Split a flat ``(n_p,)`` array into ``{name: array of the parameter shape}``."""
        out, start = {}, 0
        for name, size, shape in zip(self.names, self.sizes, self.shapes):
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out


def _labels(name, shape):
    if shape == ():
        return [name]
    return [f"{name}[{','.join(str(i) for i in idx)}]" for idx in np.ndindex(*shape)]


def _dense_sqrt(cov, size, shape, dtype):
    eye = jnp.eye(size, dtype=dtype)
    return jax.vmap(lambda e: cov.sqrt(e.reshape(shape)).reshape(-1))(eye).T


def posterior(cost: FourDVar, v, *, method: str = "auto", max_dense: int = 3000):
    r"""Gauss-Newton (Laplace) posterior of the parameters at the analysis ``v``.

    ``method="dense"`` forms the whole whitened Hessian $A = I + J_o^\top J_o$ from
    one tangent-linear run per control entry (``jax.jacfwd``) and inverts it; it
    also gives the initial-state standard deviation. ``method="cg"`` solves
    $A x = e_i$ by CG for each parameter entry $i$ only (matrix-free: the parameter
    block of $A^{-1}$, i.e. the inverse of the Schur complement, without forming
    $A$). ``"auto"`` is dense when the control has at most ``max_dense`` entries.
    Pure JAX: jit- and vmap-able.

    Args:
        cost: the :class:`FourDVar` cost.
        v: the whitened control at the analysis.
        method: ``"auto"``, ``"dense"`` or ``"cg"``.
        max_dense: size limit for ``"auto"``.

    Returns:
        A :class:`Posterior`.
    """
    if method not in ("auto", "dense", "cg"):
        raise ValueError(f"`method` must be 'auto', 'dense' or 'cg', got {method!r}.")
    flat, unravel = jfu.ravel_pytree(v)
    n = flat.size
    dtype = flat.dtype
    if method == "auto":
        method = "dense" if n <= max_dense else "cg"
    # Where each control entry sits in the flat vector.
    index_tree = unravel(jnp.arange(n, dtype=dtype))
    params = cost.control.parameters
    p_idx = [jnp.ravel(index_tree[p.name]).astype(jnp.int32) for p in params]
    p_idx_all = jnp.concatenate(p_idx) if p_idx else jnp.zeros((0,), jnp.int32)
    n_p = int(p_idx_all.size)

    def residual_flat(f):
        return jnp.ravel(cost.obs_residual(unravel(f)))

    state_std = None
    if method == "dense":
        jac = jax.jacfwd(residual_flat)(flat)
        a = jnp.eye(n, dtype=dtype) + jnp.matmul(jac.T, jac, precision="highest")
        chol = jnp.linalg.cholesky(a)
        cov_v = jax.scipy.linalg.cho_solve((chol, True), jnp.eye(n, dtype=dtype))
        cov_pp = cov_v[p_idx_all][:, p_idx_all]
        ctrl_state = cost.control.initial_state
        if ctrl_state is not None and isinstance(cost.state0, jax.Array | np.ndarray):
            x_idx = jnp.ravel(index_tree[INITIAL_STATE]).astype(jnp.int32)
            shape = jnp.shape(cost.state0)
            size = math.prod(shape)
            u = _dense_sqrt(ctrl_state.covariance, size, shape, dtype)
            uc = jnp.matmul(u, cov_v[x_idx][:, x_idx], precision="highest")
            state_std = jnp.sqrt(jnp.sum(uc * u, axis=1)).reshape(shape)
    else:
        _, vjp_fn = jax.vjp(residual_flat, flat)

        def hvp(p):
            _, jp = jax.jvp(residual_flat, (flat,), (p,))
            return p + vjp_fn(jp)[0]

        op = lx.FunctionLinearOperator(
            hvp,
            jax.ShapeDtypeStruct((n,), dtype),
            tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
        )
        solver = lx.CG(rtol=1e-10, atol=0.0, max_steps=max(10 * n, 100))

        def column(i):
            e = jnp.zeros(n, dtype).at[i].set(1.0)
            return lx.linear_solve(op, e, solver, throw=False).value

        cols = jax.lax.map(column, p_idx_all) if n_p else jnp.zeros((0, n), dtype)
        cov_pp = cols[:, p_idx_all]
        cov_pp = 0.5 * (cov_pp + cov_pp.T)

    # Map the whitened block to the unconstrained parameters: z = z_b + U v.
    blocks, means, derivs = [], [], []
    for p in params:
        shape = jnp.shape(p.background)
        size = math.prod(shape)
        blocks.append(_dense_sqrt(p.covariance, size, shape, dtype))
        z = p.unconstrained(v[p.name])
        means.append(jnp.ravel(z))
        derivs.append(jnp.ravel(p.transform.derivative(z)))
    if params:
        u_p = jax.scipy.linalg.block_diag(*blocks)
        cov_z = u_p @ cov_pp @ u_p.T
        mean_z = jnp.concatenate(means)
        deriv = jnp.concatenate(derivs)
    else:
        cov_z = jnp.zeros((0, 0), dtype)
        mean_z = deriv = jnp.zeros((0,), dtype)
    std_z = jnp.sqrt(jnp.diagonal(cov_z))
    corr = cov_z / jnp.outer(std_z, std_z)
    labels, names, sizes, shapes = [], [], [], []
    for p in params:
        shape = tuple(jnp.shape(p.background))
        labels += _labels(p.name, shape)
        names.append(p.name)
        sizes.append(math.prod(shape))
        shapes.append(shape)
    return Posterior(
        labels=tuple(labels),
        names=tuple(names),
        sizes=tuple(sizes),
        shapes=tuple(shapes),
        mean_unconstrained=mean_z,
        covariance_unconstrained=cov_z,
        std_unconstrained=std_z,
        std=jnp.abs(deriv) * std_z,
        correlation=corr,
        initial_state_std=state_std,
        method=method,
    )
