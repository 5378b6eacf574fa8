r"""The Gauss-Newton (Laplace) approximation of the posterior at an analysis.

In the whitened space $\mathrm{Cov}(v) \approx A^{-1}$, with $A$ the Gauss-Newton
operator of :func:`assimilation.gauss_newton_operator` ($I + J_o^\top J_o$ for
4D-Var). Each control variable pushes its block of $A^{-1}$ forward to standard
deviations of its physical value
(:meth:`assimilation.AbstractControlVariable.push_forward`); the variables marked
``correlated`` (parameters) also get their joint correlation matrix.

Three ways to get $A^{-1}$: ``"dense"`` (materialise and factor $A$; small
controls), ``"lanczos"`` (the leading eigenpairs of $A$ and a low-rank-plus-prior
covariance, as operational systems estimate analysis errors; large controls) and
``"cg"`` (one CG solve per parameter entry: the parameters' block only).

References:
    M. Fisher and P. Courtier (1995), "Estimating the covariance matrices of
    analysis and forecast error in variational data assimilation", ECMWF
    Technical Memorandum 220.
    Y. Saad (2011), "Numerical Methods for Large Eigenvalue Problems", 2nd ed.,
    SIAM, chapter 6 (Lanczos with full reorthogonalisation).
"""

from __future__ import annotations

import math
from typing import Any

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.random as jr
import jax.scipy as jsp
import numpy as np

import dphys

from ._cost import AbstractCost, gauss_newton_operator


METHODS = ("auto", "dense", "cg", "lanczos")


class Posterior(eqx.Module):
    r"""Laplace (Gauss-Newton) approximation of the posterior at an analysis.

    In the whitened space $\mathrm{Cov}(v) \approx A^{-1}$, $A = I + J_o^\top J_o$,
    so a variable's Gaussian coordinate $z = z_b + Uv$ has covariance
    $U A^{-1}_{vv} U^\top$, and a physical value $p = T(z)$ the delta-method
    standard deviation $|T'(z)|\,\sigma_z$.

    Per variable (every variable with ``"dense"`` and ``"lanczos"``; the
    ``correlated`` ones, i.e. the parameters, with ``"cg"``):
        stds: ``{name: physical std}``, each with the structure of the value
            (for a multi-field state, one std field per state field).
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

    How it was computed and how accurate it is:
        method: ``"dense"``, ``"cg"`` or ``"lanczos"`` (static).
        converged: whether the computation met its tolerance (``"dense"``: the
            Cholesky factor is finite; ``"cg"``: every column's CG met
            ``rtol``; ``"lanczos"``: an invariant subspace was found, see
            :func:`posterior`).
        accuracy: ``"cg"``: the largest relative true residual
            $\|Ax - e_i\|_2$ over the columns; ``"lanczos"``: the last Lanczos
            coefficient $\beta$ relative to $\|T\|$; ``"dense"``: 0.
        rank: ``"lanczos"``: the number of Lanczos vectors; ``"cg"``: the
            number of columns solved; ``"dense"``: the control size.
        eigenvalues: ``"lanczos"``: the Ritz values of $A$ (descending, the
            leading eigenvalues; NaN beyond ``rank``); otherwise empty.
        missing: ``{name: why}`` for the variables that have no standard
            deviation (static).

    Attributes:
        initial_state_std: ``stds["initial_state"]`` (``None`` if absent).
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
    converged: Any = True
    accuracy: Any = 0.0
    rank: Any = 0
    eigenvalues: Any = None
    missing: dict = eqx.field(static=True, default_factory=dict)

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

    def describe(self) -> str:
        """A one-line account of how the posterior was computed, and of every
        standard deviation that could not be computed or is not finite (call it
        on concrete values, outside ``jit``)."""
        parts = [self.method]
        if self.method == "lanczos":
            parts[0] = (
                f"lanczos, {int(self.rank)} vectors, relative residual "
                f"{float(self.accuracy):.1e}"
            )
        elif self.method == "cg":
            parts[0] = (
                f"cg, {int(self.rank)} columns, largest relative residual "
                f"{float(self.accuracy):.1e}"
            )
        if not bool(self.converged):
            parts.append(
                "NOT CONVERGED: the standard deviations are approximate"
                + (
                    " (the prior's in the directions not found; raise `max_rank`)"
                    if self.method == "lanczos"
                    else ""
                )
            )
        for name, why in self.missing.items():
            parts.append(f"no std for {name!r}: {why}")
        for name, std in self.stds.items():
            leaves = jax.tree_util.tree_leaves(std)
            bad = sum(int(np.sum(~np.isfinite(np.asarray(x)))) for x in leaves)
            if bad:
                total = sum(int(np.size(x)) for x in leaves)
                parts.append(
                    f"std of {name!r} not finite at {bad} of {total} entries (the "
                    "Gauss-Newton Hessian is not positive definite there, or its "
                    "solve failed)"
                )
        return "; ".join(parts)


def posterior(
    cost: AbstractCost,
    v,
    *,
    method: str = "auto",
    max_dense: int = 3000,
    max_rank: int = 300,
    rtol: float = 1e-10,
    key=None,
):
    r"""Gauss-Newton (Laplace) posterior of the control variables at ``v``.

    * ``method="dense"`` materialises $A$ (:func:`assimilation.gauss_newton_operator`)
      and inverts it by Cholesky; every variable gets its standard deviation.
    * ``method="lanczos"`` runs Lanczos with full reorthogonalisation on $A$ from
      a random start (matrix-free, one product with $A$ per step) and uses the
      Ritz pairs $(\theta_j, y_j)$ as

      $$ A^{-1} \approx I + \textstyle\sum_j (\theta_j^{-1} - 1)\,y_j y_j^\top, $$

      the prior plus a low-rank correction (Fisher and Courtier 1995). For a
      4D-Var cost $A = I + J_o^\top J_o$ differs from $I$ on at most as many
      directions as there are observations, so the Krylov space is exhausted
      after about that many steps: when $\beta_k \le$ ``rtol`` $\|T_k\|$ the
      Lanczos basis spans an invariant subspace, and a fresh random probe,
      orthogonalised against it, tests whether $A$ acts as the identity on
      what is left (if not, Lanczos goes on from the probe, which also catches
      repeated eigenvalues). Then the formula is exact up to ``rtol`` times the
      condition number of $A$; every variable gets its standard deviation,
      $\mathrm{Var}(z) = \mathrm{diag}(UU^\top) + \sum_j (\theta_j^{-1}-1)
      (Uy_j)^2$, from ``max_rank`` products with $U$ at most. If ``max_rank``
      vectors are reached first, ``converged`` is false and the standard
      deviations are approximate (the prior's in the directions not found).
    * ``method="cg"`` solves $A x = e_i$ by CG (:func:`dphys.krylov_solve`, on
      the 2-norm of the true residual) for the entries $i$ of the correlated
      variables (parameters) only: their block of $A^{-1}$, without forming
      $A$; the other variables are listed in ``missing``.
    * ``"auto"``: dense when the control has at most ``max_dense`` entries,
      Lanczos otherwise.

    Pure JAX: jit- and vmap-able.

    Args:
        cost: a least-squares :class:`assimilation.AbstractCost`.
        v: the whitened control at the analysis.
        method: ``"auto"``, ``"dense"``, ``"cg"`` or ``"lanczos"``.
        max_dense: size limit for ``"auto"``.
        max_rank: most Lanczos vectors (memory: ``max_rank + 1`` control-sized
            vectors), capped by the control size.
        rtol: relative tolerance of the Lanczos breakdown test and of each CG
            column.
        key: PRNG key of Lanczos's random start and probes (default
            ``jax.random.key(0)``: the result is deterministic).

    Returns:
        A :class:`Posterior`.

    Raises:
        ValueError: bad ``method``, ``max_rank`` or ``rtol``.
    """
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS}, got {method!r}: 'dense' for small "
            "controls, 'lanczos' for large ones."
        )
    if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1:
        raise ValueError(f"`max_rank` must be an integer >= 1, got {max_rank!r}.")
    if isinstance(rtol, bool) or not isinstance(rtol, int | float) or not rtol > 0:
        raise ValueError(f"`rtol` must be a number > 0, got {rtol!r}.")
    flat, unravel = jfu.ravel_pytree(v)
    n = flat.size
    dtype = flat.dtype
    if method == "auto":
        method = "dense" if n <= max_dense else "lanczos"
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

    def mv(x):
        return jfu.ravel_pytree(op.mv(unravel(x)))[0]

    stds, stds_z, missing = {}, {}, {}
    eigenvalues = jnp.zeros((0,), dtype)
    if method == "dense":
        # A = J_r^T J_r from the Jacobian of the residual (n tangent-linear runs),
        # not from A's columns (n tangent-linear + n adjoint runs): half the model
        # runs, and XLA's CPU FFT refuses the transposed operand layout that the
        # vmapped adjoint of an FFT-based B (``Diffusion``) produces.
        jac = jax.jacfwd(lambda x: jfu.ravel_pytree(cost.residual(unravel(x)))[0])(flat)
        a = jnp.matmul(jac.T, jac, precision="highest")
        chol = jnp.linalg.cholesky(a)
        cov_v = jsp.linalg.cho_solve((chol, True), jnp.eye(n, dtype=dtype))
        cov_pp = cov_v[p_idx][:, p_idx]
        for var in variables:
            i = idx[var.name]
            stds[var.name], stds_z[var.name] = var.push_forward(
                v[var.name], cov_v[i][:, i]
            )
        converged = jnp.all(jnp.isfinite(chol))
        accuracy = jnp.zeros((), dtype)
        rank = jnp.asarray(n)
    elif method == "lanczos":
        key = jr.key(0) if key is None else key
        q, theta, y, k, converged, accuracy = _lanczos(
            mv, n, dtype, min(max_rank, n), float(rtol), key
        )
        # Ritz vectors V = Q^T Y (unused Lanczos rows are zero; their Ritz values
        # are padded with 1, weight 0).
        ritz = jnp.matmul(y.T, q[: y.shape[0]], precision="highest")  # (k, n)
        weights = 1.0 / theta - 1.0
        for var in variables:
            stds[var.name], stds_z[var.name] = var.push_forward_low_rank(
                v[var.name], ritz[:, idx[var.name]], weights
            )
        vp = ritz[:, p_idx]
        cov_pp = jnp.eye(p_idx.size, dtype=dtype) + jnp.matmul(
            vp.T * weights, vp, precision="highest"
        )
        # The k largest Ritz values (the padding adds ones, the prior's value).
        eigenvalues = jnp.where(jnp.arange(theta.size) < k, -jnp.sort(-theta), jnp.nan)
        rank = k
    else:

        def column(i):
            e = jnp.zeros(n, dtype).at[i].set(1.0)
            x, result, _ = dphys.krylov_solve(
                mv,
                e,
                method="cg",
                rtol=rtol,
                max_steps=max(10 * n, 100),
                initial_guess="zero",
            )
            res = jnp.linalg.norm(mv(x) - e)
            return x, result == dphys.RESULTS.successful, res

        if p_idx.size:
            cols, ok, res = jax.lax.map(column, p_idx)
            converged, accuracy = jnp.all(ok), jnp.max(res)
        else:
            cols = jnp.zeros((0, n), dtype)
            converged, accuracy = jnp.asarray(True), jnp.zeros((), dtype)
        rank = jnp.asarray(p_idx.size)
        cov_pp = cols[:, p_idx]
        cov_pp = 0.5 * (cov_pp + cov_pp.T)
        start = 0
        for var in corr_vars:
            size = idx[var.name].size
            block = cov_pp[start : start + size, start : start + size]
            stds[var.name], stds_z[var.name] = var.push_forward(v[var.name], block)
            start += size
        for var in variables:
            if not var.correlated:
                missing[var.name] = (
                    "method='cg' solves for the parameters' block of the posterior "
                    "only; use method='lanczos' (large controls) or 'dense'"
                )

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
        converged=jnp.asarray(converged),
        accuracy=jnp.asarray(accuracy, dtype),
        rank=jnp.asarray(rank, jnp.int32),
        eigenvalues=eigenvalues,
        missing=missing,
    )


def _lanczos(mv, n, dtype, m, rtol, key):
    r"""Lanczos with full reorthogonalisation on the SPD map ``mv`` (flat vectors).

    Runs at most ``m`` steps from a random unit vector. When $\beta_k \le$
    ``rtol`` $\max_j|\alpha_j|$ the basis spans an invariant subspace; then a
    fresh random probe, orthogonalised against the basis, continues the run as a
    new block (its coupling $\beta$ is 0). A block of one vector on which $A$ acts
    as the identity ($|\alpha - 1|$ and $\beta$ both within the tolerance) shows
    that nothing but the prior is left: the run has converged (as it has when
    the basis spans the whole space, ``k = n``).

    Returns:
        ``(q, theta, y, k, converged, accuracy)``: the basis ``(m + 1, n)`` (rows
        beyond ``k`` are zero), the Ritz values ``(m,)`` (1 beyond ``k``) and
        vectors ``(m, m)`` of the tridiagonal matrix, the number of vectors ``k``,
        whether it converged, and the last $\beta / \|T\|$.
    """
    hi = jax.lax.Precision.HIGHEST

    def orthogonalise(q, w):
        # Twice is enough (Kahan-Parlett "twice is enough").
        for _ in range(2):
            w = w - jnp.matmul(q.T, jnp.matmul(q, w, precision=hi), precision=hi)
        return w

    def probe(q, i):
        p = jr.normal(jr.fold_in(key, i), (n,), dtype)
        p = orthogonalise(q, p)
        return p / jnp.maximum(jnp.linalg.norm(p), jnp.finfo(dtype).tiny)

    q = jnp.zeros((m + 1, n), dtype)
    q = q.at[0].set(probe(q, 0))
    alpha = jnp.zeros(m, dtype)
    beta = jnp.zeros(m, dtype)

    # Carry: step k, basis, alpha, beta, start of the current block, number of
    # probes, converged, scale (max |alpha|), last relative beta.
    def cond(c):
        k, *_, done, _, _ = c
        return (k < m) & ~done

    def body(c):
        k, q, alpha, beta, block, probes, done, scale, last = c
        w = mv(q[k])
        a = jnp.dot(q[k], w, precision=hi)
        w = orthogonalise(q, w)
        b = jnp.linalg.norm(w)
        alpha = alpha.at[k].set(a)
        scale = jnp.maximum(scale, jnp.abs(a))
        tol = rtol * scale
        broke = b <= tol
        # Nothing but the prior left: a one-vector block on which A = I.
        done = broke & (k == block) & (jnp.abs(a - 1.0) <= tol)
        nxt = jnp.where(broke, probe(q, probes + 1), w / jnp.where(broke, 1.0, b))
        q = q.at[k + 1].set(nxt)
        beta = beta.at[k].set(jnp.where(broke, 0.0, b))
        block = jnp.where(broke, k + 1, block)
        probes = probes + broke.astype(jnp.int32)
        return k + 1, q, alpha, beta, block, probes, done, scale, b / scale

    one = jnp.ones((), dtype)
    zero = jnp.zeros((), jnp.int32)
    k, q, alpha, beta, _, _, done, _, last = jax.lax.while_loop(
        cond,
        body,
        (zero, q, alpha, beta, zero, zero, jnp.asarray(False), one, one),
    )
    used = jnp.arange(m) < k
    # T padded with the identity beyond k (Ritz value 1, weight 0).
    diag = jnp.where(used, alpha, 1.0)
    off = jnp.where(jnp.arange(m - 1) < k - 1, beta[: m - 1], 0.0)
    t = jnp.diag(diag) + jnp.diag(off, 1) + jnp.diag(off, -1)
    theta, y = jnp.linalg.eigh(t)
    # Padded rows of q are zero, so padded Ritz vectors contribute nothing.
    q = q * jnp.concatenate([used, jnp.zeros(1, bool)])[:, None]
    # A basis of the whole space (k = n) makes the formula exact whatever beta.
    return q, theta, y, k, done | (k >= n), last
