r"""The Gauss-Newton (Laplace) approximation of the posterior at an analysis.

In the whitened space $\mathrm{Cov}(v) \approx A^{-1}$, with $A$ the Gauss-Newton
operator of :func:`assimilation.gauss_newton_operator` ($I + J_o^\top J_o$ for
4D-Var). Each control variable pushes its block of $A^{-1}$ forward to standard
deviations of its physical value
(:meth:`assimilation.AbstractControlVariable.push_forward`); the variables marked
``correlated`` (parameters) also get their joint correlation matrix.
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.scipy as jsp
import lineax as lx

from ._cost import AbstractCost, gauss_newton_operator


class Posterior(eqx.Module):
    r"""Laplace (Gauss-Newton) approximation of the posterior at an analysis.

    In the whitened space $\mathrm{Cov}(v) \approx A^{-1}$, $A = I + J_o^\top J_o$,
    so a variable's Gaussian coordinate $z = z_b + Uv$ has covariance
    $U A^{-1}_{vv} U^\top$, and a physical value $p = T(z)$ the delta-method
    standard deviation $|T'(z)|\,\sigma_z$.

    Per variable (every variable with the dense method; the ``correlated`` ones,
    i.e. the parameters, with CG):
        stds: ``{name: physical std}``, each with the structure of the value.
        stds_unconstrained: ``{name: std of z}``.

    Over the scalar entries of the correlated variables (parameters), flattened in
    control order:
        labels: one label per entry (``name`` for scalars, ``name[i,j]`` for
            fields); ``names``, ``sizes``, ``shapes`` per variable (static).
        mean_unconstrained: $z$ at the analysis, ``(n_p,)``.
        covariance_unconstrained: ``(n_p, n_p)`` covariance of $z$.
        std_unconstrained, std: ``(n_p,)``.
        correlation: ``(n_p, n_p)`` correlation matrix (same for $z$ and, to first
            order, for $p$).

    Attributes:
        initial_state_std: ``stds["initial_state"]`` (``None`` if absent).
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
    stds: dict
    stds_unconstrained: dict
    method: str = eqx.field(static=True)

    @property
    def initial_state_std(self) -> Any:
        return self.stds.get("initial_state")

    def split(self, flat) -> dict:
        """Split a flat ``(n_p,)`` array into ``{name: array of its shape}``."""
        out, start = {}, 0
        for name, size, shape in zip(self.names, self.sizes, self.shapes, strict=True):
            out[name] = flat[start : start + size].reshape(shape)
            start += size
        return out


def posterior(cost: AbstractCost, v, *, method: str = "auto", max_dense: int = 3000):
    r"""Gauss-Newton (Laplace) posterior of the control variables at ``v``.

    ``method="dense"`` materialises $A$ (:func:`assimilation.gauss_newton_operator`)
    and inverts it; every variable gets its standard deviation. ``method="cg"``
    solves $A x = e_i$ by CG for the entries $i$ of the correlated variables
    (parameters) only (matrix-free: their block of $A^{-1}$, the inverse of the
    Schur complement, without forming $A$). ``"auto"`` is dense when the control
    has at most ``max_dense`` entries. Pure JAX: jit- and vmap-able.

    Args:
        cost: a least-squares :class:`assimilation.AbstractCost`.
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
    variables = () if cost.control is None else tuple(cost.control)
    # Where each variable's block sits in the flat whitened vector.
    index = unravel(jnp.arange(n, dtype=dtype))
    idx = {
        var.name: jnp.ravel(jfu.ravel_pytree(index[var.name])[0]).astype(jnp.int32)
        for var in variables
    }
    corr_vars = [var for var in variables if var.correlated]
    p_idx = (
        jnp.concatenate([idx[var.name] for var in corr_vars])
        if corr_vars
        else jnp.zeros((0,), jnp.int32)
    )
    op = gauss_newton_operator(cost, v)

    stds, stds_z = {}, {}
    if method == "dense":
        a = op.as_matrix()
        chol = jnp.linalg.cholesky(a)
        cov_v = jsp.linalg.cho_solve((chol, True), jnp.eye(n, dtype=dtype))
        cov_pp = cov_v[p_idx][:, p_idx]
        for var in variables:
            i = idx[var.name]
            stds[var.name], stds_z[var.name] = var.push_forward(
                v[var.name], cov_v[i][:, i]
            )
    else:
        solver = lx.CG(rtol=1e-10, atol=0.0, max_steps=max(10 * n, 100))

        def column(i):
            e = unravel(jnp.zeros(n, dtype).at[i].set(1.0))
            x = lx.linear_solve(op, e, solver, throw=False).value
            return jfu.ravel_pytree(x)[0]

        cols = jax.lax.map(column, p_idx) if p_idx.size else jnp.zeros((0, n), dtype)
        cov_pp = cols[:, p_idx]
        cov_pp = 0.5 * (cov_pp + cov_pp.T)
        start = 0
        for var in corr_vars:
            size = idx[var.name].size
            block = cov_pp[start : start + size, start : start + size]
            stds[var.name], stds_z[var.name] = var.push_forward(v[var.name], block)
            start += size

    # The joint covariance of the correlated variables' Gaussian coordinates.
    if corr_vars:
        u_p = jsp.linalg.block_diag(
            *[var.sqrt_matrix(v[var.name]) for var in corr_vars]
        )
        cov_z = jnp.matmul(
            jnp.matmul(u_p, cov_pp, precision="highest"), u_p.T, precision="highest"
        )
        mean_z = jnp.concatenate(
            [jnp.ravel(var.unconstrained(v[var.name])) for var in corr_vars]
        )
        std_flat = jnp.concatenate([jnp.ravel(stds[var.name]) for var in corr_vars])
    else:
        cov_z = jnp.zeros((0, 0), dtype)
        mean_z = std_flat = jnp.zeros((0,), dtype)
    std_z = jnp.sqrt(jnp.diagonal(cov_z))
    labels, names, sizes, shapes = [], [], [], []
    for var in corr_vars:
        shape = tuple(jnp.shape(var.sqrt(v[var.name])))
        labels += var.labels(v[var.name])
        names.append(var.name)
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
        std=std_flat,
        correlation=cov_z / jnp.outer(std_z, std_z),
        stds=stds,
        stds_unconstrained=stds_z,
        method=method,
    )
