"""Exact solves by FFT diagonalisation, and the per-mode matrix algebra they use."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._results import RESULTS
from ._base import AbstractLinearSolver, FactoredSymbol
from ._probes import probe_symbol


class FFT(AbstractLinearSolver):
    r"""Exact solve by FFT diagonalisation (periodic, constant coefficients).

    Per Fourier mode $k$: $\hat x_k = (I - \gamma S_k)^{-1}\hat b_k$ where $S_k$ is the
    symbol of $L$ (a scalar per mode for one field, a small matrix per mode for coupled
    fields such as shallow water). Cost: one ``rfftn``/``irfftn`` pair per field.
    """

    def check(self, model, like):
        if not (model.grid.periodic and model.translation_invariant):
            raise ValueError(
                "`solver=FFT()` needs a fully periodic grid and a "
                "translation-invariant operator (constant coefficients); got "
                f"boundary={model.grid.boundary}, "
                f"translation_invariant={model.translation_invariant}. Use "
                "`dphys.Krylov()` (or `dphys.Tridiagonal()` in 1D) instead."
            )

    def init(self, model, t, like):
        return probe_symbol(model, t, like)

    def factor(self, structure, gamma):
        r"""The symbol with its per-mode inverse $(I - \gamma S_k)^{-1}$."""
        if isinstance(structure, FactoredSymbol):
            structure = structure.symbol
        return FactoredSymbol(structure, self.inverse_symbol(structure, gamma))

    def _apply_modes(self, mat, hats):
        # mat: (n, n, *modes); hats: (n, *modes)
        if mat.shape[0] == 1:
            return mat[0] * hats
        return jnp.sum(mat * hats[None], axis=1)  # see _mode_matmul

    def _to_modes(self, model, rhs):
        leaves, treedef = jtu.tree_flatten(rhs)
        axes = tuple(range(-model.grid.ndim, 0))
        return jnp.stack([jnp.fft.rfftn(v, axes=axes) for v in leaves]), treedef, axes

    def _from_modes(self, model, hats, treedef, axes, like_leaves):
        out = [
            jnp.fft.irfftn(h, s=v.shape[-model.grid.ndim :], axes=axes).astype(v.dtype)
            for h, v in zip(hats, like_leaves, strict=True)
        ]
        return jtu.tree_unflatten(treedef, out)

    def inverse_symbol(self, symbol, gamma):
        n = symbol.shape[0]
        gamma = jnp.asarray(gamma).astype(symbol.dtype)  # real into complex, explicitly
        if n == 1:
            return 1.0 / (1.0 - gamma * symbol)
        return _mode_inv(_mode_eye(symbol) - gamma * symbol)

    def solve(self, model, t, gamma, rhs, structure):
        hats, treedef, axes = self._to_modes(model, rhs)
        if isinstance(structure, FactoredSymbol):
            inv = structure.inverse  # factored for this gamma by the stepper's init
        else:
            inv = self.inverse_symbol(structure, gamma)
        out = self._apply_modes(inv, hats)
        x = self._from_modes(model, out, treedef, axes, jtu.tree_leaves(rhs))
        return x, RESULTS.successful, jnp.asarray(0)

    def propagate(self, model, t, dt, theta, m: int, state, structure):
        r"""Apply $m$ θ-method steps at once: $\hat u \leftarrow G_k^m \hat u$.

        $G_k = (I-\theta\Delta t S_k)^{-1}(I + (1-\theta)\Delta t S_k)$ is the exact
        one-step amplification matrix of the scheme, so this equals $m$ steps up to
        round-off, at the cost of one FFT pair.
        """
        gm = self.propagator(dt, theta, m, structure)
        return self.apply_propagator(model, gm, state)

    def apply_propagator(self, model, gm, state):
        """Apply per-mode matrices ``gm`` (from :meth:`propagator`): one FFT pair."""
        hats, treedef, axes = self._to_modes(model, state)
        out = self._apply_modes(gm, hats)
        return self._from_modes(model, out, treedef, axes, jtu.tree_leaves(state))

    def propagator(self, dt, theta, m: int, structure):
        """$G_k^m$ per mode, shape ``(n, n, *modes)``."""
        if isinstance(structure, FactoredSymbol):
            # Factored by the θ-stepper's init for gamma = θ dt, this same dt.
            inv, structure = structure.inverse, structure.symbol
        else:
            inv = self.inverse_symbol(structure, theta * dt)
        n = structure.shape[0]
        dt = jnp.asarray(dt).astype(structure.dtype)  # real into complex, explicitly
        if n == 1:
            g = inv[0, 0] * (1.0 + (1.0 - theta) * dt * structure[0, 0])
            gm = _int_power(g, m)[None, None]
        elif theta > 0:
            # (I - θΔt S)^{-1}(I + (1-θ)Δt S) = [(I - θΔt S)^{-1} - (1-θ) I] / θ since
            # (1-θ)Δt S = (1-θ)/θ [I - (I - θΔt S)]: no per-mode product needed.
            eye = _mode_eye(structure)
            gm = _mode_power((inv - (1.0 - theta) * eye) / theta, m)
        else:
            gm = _mode_power(_mode_eye(structure) + dt * structure, m)
        return gm


def _int_power(g, m: int):
    """``g**m`` for a static integer ``m >= 0`` by repeated squaring (any sign of g)."""
    result = jnp.ones_like(g)
    base = g
    while m > 0:
        if m & 1:
            result = result * base
        m >>= 1
        if m:
            base = base * base
    return result


# Per-mode n x n matrices are stored as (n, n, *modes) arrays and combined with
# elementwise arithmetic over the few fields, not with einsum / batched linalg: XLA
# lowers those to batched dots or LAPACK calls with layout transposes that cost
# 4-14x more (3x3 on 128x65 modes, CPU, forward and reverse mode), same results.
def _mode_eye(a):
    n = a.shape[0]
    return jnp.eye(n, dtype=a.dtype).reshape((n, n) + (1,) * (a.ndim - 2))


def _mode_matmul(a, b):
    """Per-mode product of ``(n, k, *modes)`` and ``(k, m, *modes)`` arrays."""
    return jnp.sum(a[:, :, None] * b[None], axis=1)


@jax.custom_jvp
def _mode_inv(a):
    r"""Per-mode inverse of ``(n, n, *modes)``: adjugate over determinant for n <= 3.

    Differentiated by $d(A^{-1}) = -A^{-1}\,dA\,A^{-1}$ (two per-mode products and,
    transposed, two more) rather than through the adjugate's many small products,
    which made the reverse pass of a 3x3 propagator 4x slower.
    """
    n = a.shape[0]
    if n == 2:
        det = a[0, 0] * a[1, 1] - a[0, 1] * a[1, 0]
        adj = jnp.stack(
            [jnp.stack([a[1, 1], -a[0, 1]]), jnp.stack([-a[1, 0], a[0, 0]])]
        )
        return adj / det
    if n == 3:
        c = [[None] * 3 for _ in range(3)]
        for i in range(3):
            for j in range(3):
                r = [k for k in range(3) if k != i]
                q = [k for k in range(3) if k != j]
                minor = a[r[0], q[0]] * a[r[1], q[1]] - a[r[0], q[1]] * a[r[1], q[0]]
                c[i][j] = minor if (i + j) % 2 == 0 else -minor
        det = a[0, 0] * c[0][0] + a[0, 1] * c[0][1] + a[0, 2] * c[0][2]
        adj = jnp.stack([jnp.stack([c[j][i] for j in range(3)]) for i in range(3)])
        return adj / det
    moved = jnp.moveaxis(jnp.moveaxis(a, 0, -1), 0, -1)  # (*modes, n, n)
    return jnp.moveaxis(jnp.moveaxis(jnp.linalg.inv(moved), -1, 0), -1, 0)


@_mode_inv.defjvp
def _mode_inv_jvp(primals, tangents):
    (a,), (da,) = primals, tangents
    x = _mode_inv(a)
    return x, -_mode_matmul(x, _mode_matmul(da, x))


def _mode_power(g, m: int):
    """``g**m`` per mode for a static integer ``m >= 0`` by repeated squaring."""
    result = _mode_eye(g)
    base = g
    while m > 0:
        if m & 1:
            result = _mode_matmul(result, base)
        m >>= 1
        if m:
            base = _mode_matmul(base, base)
    return result
