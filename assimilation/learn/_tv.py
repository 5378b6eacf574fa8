r"""Total variation: difference operators and the TV proximal operator.

The TV proximal operator with weight $\lambda \ge 0$,

$$ \operatorname{prox}_{\lambda\,\mathrm{TV}}(x)
   = \arg\min_z\ \tfrac12\|z - x\|_2^2 + \lambda\,\mathrm{TV}(z), $$

is computed here in two ways:

* **1-D, exactly**: Condat's direct algorithm (Condat 2013), finite and exact up to
  round-off, $O(n)$ in practice. Its derivative is that of the piecewise-constant
  solution: on each constant segment $S$ of $z$,
  $z_S = \operatorname{mean}_S(x) + \lambda\,(s_S^{+} - s_S^{-})/|S|$ with
  $s^\pm_S \in \{-1, 0, 1\}$ the signs of the jumps at its right and left ends, so
  $\partial z/\partial x$ averages over segments and
  $\partial z_S/\partial\lambda = (s_S^{+} - s_S^{-})/|S|$ (exact wherever the
  segment structure is locally constant, i.e. almost everywhere).
* **n-D (isotropic or anisotropic)**: the dual problem
  $\min_{p \in P} \tfrac12\|x - \lambda D^\top p\|^2$,
  $P = \{|p_i|_2 \le 1\}$ (isotropic) or $\{|p_i|_\infty \le 1\}$ (anisotropic),
  solved by the fast gradient projection of Beck & Teboulle (2009) (Chambolle's
  projection with Nesterov momentum), $z = x - \lambda D^\top p$. The loop stops
  on the duality gap, which certifies the accuracy: for feasible $p$,
  $\tfrac12\|z - z^\star\|^2 \le \mathrm{gap}(p) =
  \lambda\sum_i (|(Dz)_i| - \langle p_i, (Dz)_i\rangle)$, so stopping at
  $2\,\mathrm{gap} \le (\mathrm{atol} + \mathrm{rtol}\|x\|)^2$ guarantees
  $\|z - z^\star\| \le \mathrm{atol} + \mathrm{rtol}\|x\|$. Its reverse-mode
  derivative is implicit: the dual solution is a fixed point of the projected
  gradient map $T(p; x, \lambda) = \Pi_P(p + \tau D(x - \lambda D^\top p))$, and
  the adjoint equation $w = \bar p + (\partial_p T)^\top w$ is solved by its
  Neumann series to the same relative tolerance (no backpropagation through the
  solver's iterations).

$D$ is the forward-difference gradient with a Neumann closure (the difference
across the last face of each axis is zero), in grid-index units; $D^\top$ is its
exact transpose (minus the discrete divergence), and $\|D\|_2^2 \le 4\,\mathrm{ndim}$.

References:
    L. Condat (2013), "A direct algorithm for 1-D total variation denoising", IEEE
    Signal Process. Lett. 20(11), 1054-1057.
    A. Chambolle (2004), "An algorithm for total variation minimization and
    applications", J. Math. Imaging Vis. 20, 89-97.
    A. Beck and M. Teboulle (2009), "Fast gradient-based algorithms for constrained
    total variation image denoising and deblurring problems", IEEE Trans. Image
    Process. 18(11), 2419-2434.
"""

from __future__ import annotations

import functools as ft

import equinox as eqx
import jax
import jax.numpy as jnp
from jax import lax


# ------------------------------------------------------------------ difference ops


def gradient(u: jax.Array) -> jax.Array:
    r"""Forward-difference gradient $Du$ with a Neumann closure.

    $(Du)_{a,i} = u_{i + e_a} - u_i$ for $i_a < n_a - 1$ and $0$ on the last slice
    of axis $a$ (grid-index units).

    Args:
        u: an array of any number of dimensions ``d >= 1``.

    Returns:
        An array of shape ``(d, *u.shape)``, component ``a`` the difference along
        axis ``a``.
    """
    parts = []
    for a in range(u.ndim):
        d = jnp.diff(u, axis=a)
        pad = [(0, 0)] * u.ndim
        pad[a] = (0, 1)
        parts.append(jnp.pad(d, pad))
    return jnp.stack(parts)


def gradient_transpose(p: jax.Array) -> jax.Array:
    r"""The exact transpose $D^\top p$ of :func:`gradient` (minus the divergence).

    $(D^\top p)_i = \sum_a (p_{a, i - e_a}\,[i_a \ge 1] - p_{a,i}\,[i_a \le n_a - 2])$.

    Args:
        p: an array of shape ``(d, *shape)`` with ``d = len(shape)``.

    Returns:
        An array of shape ``shape``.
    """
    ndim = p.ndim - 1
    out = jnp.zeros(p.shape[1:], p.dtype)
    for a in range(ndim):
        q = p[a]
        n = q.shape[a]
        # Only the first n-1 slices enter <Du, p>: the last one multiplies a zero.
        q = lax.slice_in_dim(q, 0, n - 1, axis=a)
        pad_lo = [(0, 0)] * ndim
        pad_lo[a] = (1, 0)
        pad_hi = [(0, 0)] * ndim
        pad_hi[a] = (0, 1)
        out = out + jnp.pad(q, pad_lo) - jnp.pad(q, pad_hi)
    return out


def tv_norm(u: jax.Array, *, isotropic: bool = True) -> jax.Array:
    r"""$\mathrm{TV}(u) = \sum_i |(Du)_i|$ with $|\cdot|_2$ (isotropic) or $|\cdot|_1$.

    In 1-D both are $\sum_i |u_{i+1} - u_i|$.
    """
    g = gradient(u)
    if isotropic:
        # sqrt(0) has an infinite derivative; the double `where` keeps grad finite.
        sq = jnp.sum(g * g, axis=0)
        safe = jnp.where(sq > 0, sq, 1.0)
        return jnp.sum(jnp.where(sq > 0, jnp.sqrt(safe), 0.0))
    return jnp.sum(jnp.abs(g))


def _project(p: jax.Array, isotropic: bool) -> jax.Array:
    """Projection onto the unit ball of the dual norm, pixel by pixel."""
    if isotropic:
        norm = jnp.sqrt(jnp.sum(p * p, axis=0))
        return p / jnp.maximum(norm, 1.0)
    return jnp.clip(p, -1.0, 1.0)


# ------------------------------------------------------------------ 1-D: Condat


def _condat(x: jax.Array, lam: jax.Array) -> jax.Array:
    """Condat's (2013) direct algorithm, as a ``lax.while_loop`` over its events.

    Every branch of the original C code is one loop iteration; a write of a value
    ``v`` to ``output[k0..K]`` is recorded at the segment's last index ``K`` and the
    segments are filled in at the end (each index is written exactly once).
    """
    n = x.shape[0]
    dtype = x.dtype
    lam = jnp.asarray(lam, dtype)
    idx = jnp.arange(n)
    i0 = jnp.zeros((), jnp.int32)

    def write(vals, mask, k0, last, v, do):
        last = jnp.maximum(last, k0)  # C's do-while writes at least one entry
        vals = vals.at[last].set(jnp.where(do, v, vals[last]))
        mask = mask.at[last].set(mask[last] | do)
        return vals, mask, jnp.where(do, last + 1, k0)

    def body(s):
        k, k0, km, kp, umin, umax, vmin, vmax, vals, mask, done = s
        at_end = k == n - 1
        kn = jnp.minimum(k + 1, n - 1)
        xn = x[kn]
        # --- the end of the signal (C: `while (k == width - 1)`)
        e1 = at_end & (umin < 0)
        e2 = at_end & ~(umin < 0) & (umax > 0)
        e3 = at_end & ~(umin < 0) & ~(umax > 0)
        # --- the main loop
        umin1 = umin + xn - vmin
        m1 = ~at_end & (umin1 < -lam)
        umax1 = umax + xn - vmax
        m2 = ~at_end & ~(umin1 < -lam) & (umax1 > lam)
        m3 = ~at_end & ~m1 & ~m2

        v_final = vmin + umin / (k - k0 + 1).astype(dtype)
        write_min = e1 | m1
        write_max = e2 | m2
        last = jnp.where(write_min, km, jnp.where(write_max, kp, k))
        v = jnp.where(write_min, vmin, jnp.where(write_max, vmax, v_final))
        vals, mask, k0n = write(vals, mask, k0, last, v, write_min | write_max | e3)
        xk0 = x[jnp.minimum(k0n, n - 1)]

        # restarts after a write (e1, e2, m1, m2)
        restart = write_min | write_max
        k_r = k0n
        # e1: vmin = x[k0]; umin = lam; umax = vmin + lam - vmax; km = k = k0
        # e2: vmax = x[k0]; umax = -lam; umin = vmax - lam - vmin; kp = k = k0
        # m1: vmin = x[k0]; vmax = vmin + 2 lam; umin = lam; umax = -lam; k=kp=km=k0
        # m2: vmax = x[k0]; vmin = vmax - 2 lam; umin = lam; umax = -lam; k=kp=km=k0
        vmin_r = jnp.where(e1 | m1, xk0, jnp.where(m2, xk0 - 2 * lam, vmin))
        vmax_r = jnp.where(e2 | m2, xk0, jnp.where(m1, xk0 + 2 * lam, vmax))
        umin_r = jnp.where(e2, xk0 - lam - vmin, lam)
        umax_r = jnp.where(e1, xk0 + lam - vmax, -lam)
        km_r = jnp.where(e2, km, k_r)
        kp_r = jnp.where(e1, kp, k_r)

        # m3: advance
        k_a = k + 1
        cnt = (k_a - k0 + 1).astype(dtype)
        lo = umin1 >= lam
        hi = umax1 <= -lam
        vmin_a = jnp.where(lo, vmin + (umin1 - lam) / cnt, vmin)
        umin_a = jnp.where(lo, lam, umin1)
        km_a = jnp.where(lo, k_a, km)
        vmax_a = jnp.where(hi, vmax + (umax1 + lam) / cnt, vmax)
        umax_a = jnp.where(hi, -lam, umax1)
        kp_a = jnp.where(hi, k_a, kp)

        pick = lambda r, a, old: jnp.where(restart, r, jnp.where(m3, a, old))
        return (
            pick(k_r, k_a, k),
            k0n,
            pick(km_r, km_a, km),
            pick(kp_r, kp_a, kp),
            pick(umin_r, umin_a, umin),
            pick(umax_r, umax_a, umax),
            pick(vmin_r, vmin_a, vmin),
            pick(vmax_r, vmax_a, vmax),
            vals,
            mask,
            done | e3,
        )

    init = (
        i0,
        i0,
        i0,
        i0,
        lam,
        -lam,
        x[0] - lam,
        x[0] + lam,
        jnp.zeros_like(x),
        jnp.zeros((n,), bool),
        jnp.zeros((), bool),
    )
    out = lax.while_loop(lambda s: ~s[-1], body, init)
    vals, mask = out[8], out[9]
    # Each index takes the value recorded at the end of its segment.
    ends = jnp.where(mask, idx, n - 1)
    return vals[lax.cummin(ends, reverse=True)]


@jax.custom_jvp
def tv1d_prox(x: jax.Array, lam) -> jax.Array:
    r"""Exact $\operatorname{prox}_{\lambda \mathrm{TV}}(x)$ of a 1-D signal.

    $\arg\min_z \tfrac12\|z - x\|^2 + \lambda\sum_i |z_{i+1} - z_i|$ by Condat's
    direct algorithm (exact up to round-off). Differentiable in ``x`` and ``lam``
    (forward and reverse mode) with the derivative of the piecewise-constant
    solution (see the module docstring). Works under ``jit`` and ``vmap``.

    Args:
        x: a 1-D float array.
        lam: $\lambda \ge 0$, a scalar.

    Returns:
        $z$, same shape and dtype as ``x``.
    """
    return _condat(x, lam)


@tv1d_prox.defjvp
def _tv1d_prox_jvp(primals, tangents):
    x, lam = primals
    dx, dlam = tangents
    n = x.shape[0]
    z = _condat(x, lam)
    jumps = jnp.sign(z[1:] - z[:-1])
    seg = jnp.concatenate([jnp.zeros(1, jnp.int32), jnp.cumsum(jumps != 0)])
    count = jax.ops.segment_sum(jnp.ones_like(x), seg, num_segments=n)
    count = jnp.maximum(count, 1.0)
    zero = jnp.zeros(1, x.dtype)
    # s_S^+ - s_S^-: the jump leaving the segment minus the jump entering it.
    c = jax.ops.segment_sum(
        jnp.concatenate([jumps, zero]) - jnp.concatenate([zero, jumps]),
        seg,
        num_segments=n,
    )
    mean_dx = jax.ops.segment_sum(dx, seg, num_segments=n) / count
    dlam = jnp.asarray(dlam, x.dtype)
    dz = (mean_dx + dlam * c / count)[seg]
    return z, dz


# ------------------------------------------------------------------ n-D: dual FGP


class TVSolution(eqx.Module):
    """Output of the n-D TV proximal solver.

    Attributes:
        value: the primal solution $z = x - \\lambda D^\\top p$.
        dual: the dual variable $p$, shape ``(ndim, *x.shape)``, feasible.
        gap: the duality gap at ``dual`` (certifies
            $\\|z - z^\\star\\| \\le \\sqrt{2\\,\\mathrm{gap}}$).
        num_steps: iterations performed.
        converged: whether the gap met the tolerance.
    """

    value: jax.Array
    dual: jax.Array
    gap: jax.Array
    num_steps: jax.Array
    converged: jax.Array


def _gap(z, p, lam, isotropic):
    # lam * (TV(z) - <Dz, p>): each term is >= 0 for feasible p, so the gap is
    # summed without the cancellation of P(z) - D(p) computed separately.
    g = gradient(z)
    if isotropic:
        terms = jnp.sqrt(jnp.sum(g * g, axis=0)) - jnp.sum(g * p, axis=0)
    else:
        terms = jnp.abs(g) - g * p
    return lam * jnp.sum(terms)


def _fgp(x, lam, p0, isotropic, rtol, atol, max_steps):
    dtype = x.dtype
    ndim = x.ndim
    lam = jnp.asarray(lam, dtype)
    # Step 1/L with L = lam^2 ||D||^2 <= 4 ndim lam^2, written per unit lam.
    lam_safe = jnp.where(lam > 0, lam, 1.0)
    tau = 1.0 / (4.0 * ndim * lam_safe)
    target = jnp.square(atol + rtol * jnp.sqrt(jnp.sum(x * x)))

    def cond(s):
        k, p, q, t, gap = s
        return (k < max_steps) & (2 * gap > target)

    def body(s):
        k, p, q, t, _ = s
        zq = x - lam * gradient_transpose(q)
        p_new = _project(q + tau * gradient(zq), isotropic)
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t * t))
        q_new = p_new + ((t - 1.0) / t_new) * (p_new - p)
        z = x - lam * gradient_transpose(p_new)
        return k + 1, p_new, q_new, t_new, _gap(z, p_new, lam, isotropic)

    p0 = _project(p0, isotropic)
    gap0 = _gap(x - lam * gradient_transpose(p0), p0, lam, isotropic)
    init = (jnp.zeros((), jnp.int32), p0, p0, jnp.ones((), dtype), gap0)
    k, p, _, _, gap = lax.while_loop(cond, body, init)
    p = jnp.where(lam > 0, p, jnp.zeros_like(p))
    gap = jnp.where(lam > 0, gap, 0.0)
    return p, gap, k, 2 * gap <= target


def _fixed_point_map(p, x, lam, isotropic, active=None):
    r"""One projected-gradient step of the dual; the solution is its fixed point.

    With ``active`` (a mask of the points, or for anisotropic TV of the components,
    where the jump $(Dz)_i$ is non-zero), the projection is linearised on the known
    active set: the exact normalisation $q/|q|$ where active, the identity
    elsewhere. This is the map to differentiate: at a point with $(Dz)_i = 0$ and
    $|p_i| = 1$ exactly (which the accelerated iteration produces) the projection
    has a kink, and its one-sided derivative would drop the constraint
    $(D\,dz)_i = 0$.
    """
    ndim = x.ndim
    lam_safe = jnp.where(lam > 0, lam, 1.0)
    # tau is held fixed: the fixed points do not depend on it.
    tau = lax.stop_gradient(1.0 / (4.0 * ndim * lam_safe))
    q = p + tau * gradient(x - lam * gradient_transpose(p))
    if active is None:
        return _project(q, isotropic)
    if isotropic:
        sq = jnp.sum(q * q, axis=0)
        norm = jnp.sqrt(jnp.where(active, sq, 1.0))
        return jnp.where(active, q / norm, q)
    safe = jnp.where(active, q, 1.0)
    return jnp.where(active, jnp.sign(safe), q)


@ft.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _tv_dual(x, lam, isotropic, rtol, atol, max_steps):
    p, _, _, _ = _fgp(
        x, lam, jnp.zeros((x.ndim, *x.shape), x.dtype), isotropic, rtol, atol, max_steps
    )
    return p


def _tv_dual_fwd(x, lam, isotropic, rtol, atol, max_steps):
    p = _tv_dual(x, lam, isotropic, rtol, atol, max_steps)
    return p, (x, lam, p)


def _tv_dual_bwd(isotropic, rtol, atol, max_steps, res, p_bar):
    x, lam, p = res
    # The active set: jumps well above the certified accuracy of z.
    g = gradient(x - lam * gradient_transpose(p))
    tol = 100.0 * (atol + rtol * jnp.sqrt(jnp.sum(x * x))) + 1e-300
    active = (jnp.sqrt(jnp.sum(g * g, axis=0)) if isotropic else jnp.abs(g)) > tol
    _, vjp = jax.vjp(
        lambda p_, x_, l_: _fixed_point_map(p_, x_, l_, isotropic, active), p, x, lam
    )
    # Adjoint of the fixed point p = T(p; x, lam): w = p_bar + (d_p T)^T w, solved
    # by its Neumann series (it converges at the rate of the projected gradient).
    scale = jnp.sqrt(jnp.sum(p_bar * p_bar))

    def cond(s):
        k, w, term = s
        return (k < max_steps) & (jnp.sqrt(jnp.sum(term * term)) > rtol * scale + atol)

    def body(s):
        k, w, term = s
        term = vjp(term)[0]
        return k + 1, w + term, term

    _, w, _ = lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), p_bar, p_bar))
    _, x_bar, lam_bar = vjp(w)
    live = lam > 0
    return jnp.where(live, x_bar, 0.0), jnp.where(live, lam_bar, 0.0)


_tv_dual.defvjp(_tv_dual_fwd, _tv_dual_bwd)


def tv_prox(
    x: jax.Array,
    lam,
    *,
    isotropic: bool = True,
    rtol: float = 1e-8,
    atol: float = 0.0,
    max_steps: int = 20_000,
) -> jax.Array:
    r"""$\operatorname{prox}_{\lambda\mathrm{TV}}(x)$ of an n-D array by the dual FGP.

    Stops when $\|z - z^\star\| \le \mathrm{atol} + \mathrm{rtol}\|x\|$ is
    certified by the duality gap, or after ``max_steps`` iterations. Reverse-mode
    differentiable in ``x`` and ``lam`` by implicit differentiation of the dual
    fixed point (see the module docstring); not forward-mode differentiable.

    Args:
        x: a float array with ``ndim >= 1``.
        lam: $\lambda \ge 0$, a scalar.
        isotropic: $|\cdot|_2$ (``True``) or $|\cdot|_1$ of the gradient per point.
        rtol, atol: the certified accuracy (static).
        max_steps: iteration cap of the solver and of the adjoint solve (static).

    Returns:
        $z$, same shape and dtype as ``x``.
    """
    lam = jnp.asarray(lam, x.dtype)
    p = _tv_dual(x, lam, bool(isotropic), float(rtol), float(atol), int(max_steps))
    return x - lam * gradient_transpose(p)


def tv_solve(
    x: jax.Array,
    lam,
    *,
    isotropic: bool = True,
    rtol: float = 1e-8,
    atol: float = 0.0,
    max_steps: int = 20_000,
    dual0: jax.Array | None = None,
) -> TVSolution:
    """:func:`tv_prox` with its diagnostics (gap, iterations) and a warm start.

    Not differentiable (use :func:`tv_prox` for gradients).
    """
    lam = jnp.asarray(lam, x.dtype)
    p0 = jnp.zeros((x.ndim, *x.shape), x.dtype) if dual0 is None else dual0
    p, gap, k, ok = _fgp(
        x, lam, p0, bool(isotropic), float(rtol), float(atol), int(max_steps)
    )
    return TVSolution(x - lam * gradient_transpose(p), p, gap, k, ok)
