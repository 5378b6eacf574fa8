r"""Structured solvers for the implicit systems $(I - \gamma L)\,x = b$.

Every implicit stepper reduces to this system with $\gamma = \theta\,\Delta t$ (or
$\tfrac23\Delta t$ for BDF2). The solvers split their work in two:

* ``init(model, t)`` extracts the structure of $L$ once (its Fourier symbol, its
  bands, its diagonal) by *probing* the matrix-free operator: applying it to a few
  impulse or comb vectors. Nothing model-specific is hand-coded, so every model
  written with :mod:`dphys` operators gets every solver for free.
* ``solve(model, t, gamma, b, structure)`` solves with a possibly traced ``gamma``.

Differentiation. None of these solvers is differentiated through its iterations:

* :class:`FFT` and :class:`Tridiagonal` are direct: their reverse-mode derivative is
  exactly one solve with the transposed operator (the FFT diagonalisation and LAPACK
  ``gtsv``/XLA tridiagonal solve have closed-form transposes).
* :class:`Krylov` calls ``lineax.linear_solve``, whose derivative is given by the
  implicit function theorem: $\bar b = A^{-T}\bar x$, $\bar p = -\bar b^T
  (\partial A/\partial p)\,x$, one transposed Krylov solve per step, with memory
  independent of the iteration count. Tangent and adjoint solves raise if they fail
  to converge, so an unconverged solve can never give a silently wrong gradient.
"""

from __future__ import annotations

import abc
from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np

from ._model import AbstractModel
from ._results import RESULTS


# ---------------------------------------------------------------------------- probing


def _leaves(model: AbstractModel, like):
    return jtu.tree_flatten(like)


def probe_symbol(model: AbstractModel, t, like):
    r"""Fourier symbol of a translation-invariant $L$: ``S[a, b, *k]``.

    $L$ restricted to field $b \to a$ is a circular convolution with the impulse
    response $h_{ab} = (L\,\delta_b)_a$, so $\widehat{(Lu)}_a = \sum_b \hat h_{ab}\,
    \hat u_b$ with ``rfftn`` over the grid axes.
    """
    leaves, treedef = jtu.tree_flatten(like)
    n = len(leaves)
    axes = tuple(range(-model.grid.ndim, 0))
    cols = []
    for b in range(n):
        delta = [jnp.zeros_like(leaf) for leaf in leaves]
        idx = (0,) * model.grid.ndim
        delta[b] = delta[b].at[idx].set(1)
        out = jtu.tree_leaves(model.linear(t, jtu.tree_unflatten(treedef, delta)))
        cols.append(jnp.stack([jnp.fft.rfftn(o, axes=axes) for o in out]))
    return jnp.stack(cols, axis=1)  # (n_out, n_in, *modes)


def _comb_strides(model: AbstractModel, shape, stride: int) -> list[int]:
    # On a periodic axis of length n the comb i = r (mod s) has two probes n mod s
    # apart across the wrap; unless the comb tiles the axis (n mod s = 0) they must be
    # >= stride apart, or their stencils overlap and the probed diagonal is wrong
    # there (e.g. n = 4096, s = 3). A Jacobi preconditioner wrong at two points costs
    # 5x the CG iterations on smooth data (benchmarks/run.py P1, dphys-krylov).
    strides = []
    lead = len(shape) - model.grid.ndim
    for axis, n in enumerate(shape):
        s = stride
        if axis >= lead and model.grid.boundary[axis - lead] == "periodic":
            while 0 < n % s < stride:
                s += 1
        strides.append(s)
    return strides


def probe_diagonal(model: AbstractModel, t, like, stride: int = 3):
    """Diagonal of $L$ (pytree like ``like``) from about ``stride**ndim`` comb probes.

    Exact for stencils that reach at most ``stride - 1`` points along each axis; the
    default of 3 covers every 3-point-per-axis stencil (5- and 9-point in 2D). On a
    periodic axis whose length is not a multiple of ``stride`` the comb spacing grows
    until probes stay ``stride`` apart across the wrap too.
    """
    leaves, treedef = jtu.tree_flatten(like)
    diag = [jnp.zeros_like(leaf) for leaf in leaves]
    for b, leaf in enumerate(leaves):
        strides = _comb_strides(model, leaf.shape, stride)
        for offset in np.ndindex(*strides):
            comb = np.zeros(leaf.shape, dtype=bool)
            comb[tuple(slice(o, None, s) for o, s in zip(offset, strides))] = True
            comb = jnp.asarray(comb)
            probe = [jnp.zeros_like(v) for v in leaves]
            probe[b] = comb.astype(leaf.dtype)
            out = jtu.tree_leaves(model.linear(t, jtu.tree_unflatten(treedef, probe)))
            diag[b] = jnp.where(comb, out[b], diag[b])
    return jtu.tree_unflatten(treedef, diag)


def probe_tridiagonal(model: AbstractModel, t, like):
    """Bands ``(lower, diag, upper)`` of a 1D 3-point $L$ (scalar field), 3 probes.

    ``lower[0]`` and ``upper[-1]`` are zero, as ``lax.linalg.tridiagonal_solve``
    expects.
    """
    n = like.shape[-1]
    idx = np.arange(n)
    lower = jnp.zeros_like(like)
    diag = jnp.zeros_like(like)
    upper = jnp.zeros_like(like)
    for r in range(3):
        comb = jnp.asarray(idx % 3 == r).astype(like.dtype)
        out = model.linear(t, comb)
        is_col = jnp.asarray(idx % 3 == r)
        # Row i sees column i (diag), i-1 (lower) and i+1 (upper).
        diag = jnp.where(is_col, out, diag)
        lower = jnp.where(jnp.asarray((idx - 1) % 3 == r) & (idx > 0), out, lower)
        upper = jnp.where(jnp.asarray((idx + 1) % 3 == r) & (idx < n - 1), out, upper)
    return lower, diag, upper


# ---------------------------------------------------------------------------- solvers


class AbstractLinearSolver(eqx.Module):
    """Solves $(I-\\gamma L(t))\\,x = b$ for a model's implicit operator $L$."""

    @abc.abstractmethod
    def init(self, model: AbstractModel, t, like):
        """Structure of $L(t)$ needed by :meth:`solve` (computed once if autonomous)."""

    @abc.abstractmethod
    def solve(self, model: AbstractModel, t, gamma, rhs, structure):
        """Return ``(x, result, iterations)``."""

    def check(self, model: AbstractModel, like) -> None:
        """Raise ``ValueError`` if this solver cannot handle ``model``."""


class FFT(AbstractLinearSolver):
    r"""Exact solve by FFT diagonalisation (periodic, constant coefficients).

    Per Fourier mode $k$: $\hat x_k = (I - \gamma S_k)^{-1}\hat b_k$ where $S_k$ is the
    symbol of $L$ (a scalar per mode for one field, a small matrix per mode for coupled
    fields such as shallow water). Cost: one ``rfftn``/``irfftn`` pair per field.
    """

    def check(self, model, like):
        if not (model.grid.periodic and model.translation_invariant):
            raise ValueError(
                "`solver=FFT()` needs a fully periodic grid and a translation-invariant "
                f"operator (constant coefficients); got boundary={model.grid.boundary}, "
                f"translation_invariant={model.translation_invariant}. Use "
                "`dphys.Krylov()` (or `dphys.Tridiagonal()` in 1D) instead."
            )

    def init(self, model, t, like):
        return probe_symbol(model, t, like)

    def _apply_modes(self, mat, hats):
        # mat: (n, n, *modes); hats: (n, *modes)
        if mat.shape[0] == 1:
            return mat[0] * hats
        # An elementwise multiply-add over the few fields, not einsum: XLA lowers the
        # per-mode einsum to a batched dot with layout transposes, 14x slower at
        # 3 fields on 128x65 modes (CPU, measured) for the same result.
        return jnp.sum(mat * hats[None], axis=1)

    def _to_modes(self, model, rhs):
        leaves, treedef = jtu.tree_flatten(rhs)
        axes = tuple(range(-model.grid.ndim, 0))
        return jnp.stack([jnp.fft.rfftn(v, axes=axes) for v in leaves]), treedef, axes

    def _from_modes(self, model, hats, treedef, axes, like_leaves):
        out = [
            jnp.fft.irfftn(h, s=v.shape[-model.grid.ndim :], axes=axes).astype(v.dtype)
            for h, v in zip(hats, like_leaves)
        ]
        return jtu.tree_unflatten(treedef, out)

    def inverse_symbol(self, symbol, gamma):
        n = symbol.shape[0]
        if n == 1:
            return 1.0 / (1.0 - gamma * symbol)
        a = jnp.eye(n, dtype=symbol.dtype).reshape((n, n) + (1,) * (symbol.ndim - 2))
        a = a - gamma * symbol
        moved = jnp.moveaxis(jnp.moveaxis(a, 0, -1), 0, -1)  # (*modes, n, n)
        inv = jnp.linalg.inv(moved)
        return jnp.moveaxis(jnp.moveaxis(inv, -1, 0), -1, 0)

    def solve(self, model, t, gamma, rhs, structure):
        hats, treedef, axes = self._to_modes(model, rhs)
        out = self._apply_modes(self.inverse_symbol(structure, gamma), hats)
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
        inv = self.inverse_symbol(structure, theta * dt)
        n = structure.shape[0]
        if n == 1:
            g = inv[0, 0] * (1.0 + (1.0 - theta) * dt * structure[0, 0])
            gm = _int_power(g, m)[None, None]
        else:
            eye = jnp.eye(n, dtype=structure.dtype).reshape(
                (n, n) + (1,) * (structure.ndim - 2)
            )
            explicit = eye + (1.0 - theta) * dt * structure
            g = jnp.einsum("ab...,bc...->ac...", inv, explicit, precision="highest")
            moved = jnp.moveaxis(jnp.moveaxis(g, 0, -1), 0, -1)
            gm = jnp.linalg.matrix_power(moved, m)
            gm = jnp.moveaxis(jnp.moveaxis(gm, -1, 0), -1, 0)
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


class Tridiagonal(AbstractLinearSolver):
    """Direct banded solve in 1D with Dirichlet/Neumann boundaries (any coefficients).

    Uses ``lax.linalg.tridiagonal_solve`` (LAPACK ``gtsv`` on CPU, cuSPARSE on GPU),
    whose derivative is one transposed tridiagonal solve.
    """

    def check(self, model, like):
        leaves = jtu.tree_leaves(like)
        if model.grid.ndim != 1 or len(leaves) != 1 or model.grid.periodic:
            raise ValueError(
                "`solver=Tridiagonal()` needs a 1D grid with Dirichlet or Neumann "
                f"boundaries and a single field; got grid shape {model.grid.shape}, "
                f"boundary={model.grid.boundary}, {len(leaves)} field(s). Use "
                "`dphys.FFT()` for periodic grids or `dphys.Krylov()`."
            )

    def init(self, model, t, like):
        return probe_tridiagonal(model, t, like)

    def solve(self, model, t, gamma, rhs, structure):
        lower, diag, upper = structure
        x = jax.lax.linalg.tridiagonal_solve(
            -gamma * lower, 1.0 - gamma * diag, -gamma * upper, rhs[:, None]
        )[:, 0]
        return x, RESULTS.successful, jnp.asarray(0)


class Krylov(AbstractLinearSolver):
    r"""Matrix-free preconditioned Krylov solve through ``lineax``.

    Attributes:
        method: ``"cg"`` (needs a symmetric model), ``"gmres"`` or ``"bicgstab"``;
            ``None`` picks CG for symmetric models and GMRES otherwise.
        rtol, atol: stopping tolerances on the residual.
        max_steps: iteration cap; hitting it is reported as
            ``RESULTS.linear_solve_failed`` (and raises in the adjoint solve).
        preconditioner: ``"jacobi"`` (diagonal of $I-\gamma L$, from comb probes) or
            ``None``.
        restart: GMRES restart length.

    The derivative is lineax's implicit-function-theorem rule: one transposed Krylov
    solve per step in reverse mode; memory does not grow with the iteration count.
    """

    method: Literal["cg", "gmres", "bicgstab"] | None = eqx.field(
        static=True, default=None
    )
    rtol: float = eqx.field(static=True, default=1e-10)
    atol: float = eqx.field(static=True, default=1e-12)
    max_steps: int = eqx.field(static=True, default=500)
    preconditioner: Literal["jacobi"] | None = eqx.field(static=True, default="jacobi")
    restart: int = eqx.field(static=True, default=40)

    def __check_init__(self):
        if self.method not in (None, "cg", "gmres", "bicgstab"):
            raise ValueError(
                "`method` must be 'cg', 'gmres', 'bicgstab' or None, got "
                f"{self.method!r}."
            )
        if self.preconditioner not in (None, "jacobi"):
            raise ValueError(
                f"`preconditioner` must be 'jacobi' or None, got {self.preconditioner!r}."
            )

    def _method(self, model):
        if self.method is not None:
            return self.method
        return "cg" if model.symmetric else "gmres"

    def check(self, model, like):
        if self._method(model) == "cg" and not model.symmetric:
            raise ValueError(
                "`Krylov(method='cg')` needs a symmetric operator but "
                f"{type(model).__name__} is not symmetric; use method='gmres' or "
                "'bicgstab'."
            )

    def init(self, model, t, like):
        if self.preconditioner == "jacobi":
            return probe_diagonal(model, t, like)
        return None

    def solve(self, model, t, gamma, rhs, structure):
        method = self._method(model)
        structure_in = jax.eval_shape(lambda: rhs)

        def mv(x):
            lx_ = model.linear(t, x)
            return jtu.tree_map(lambda a, b: a - gamma * b, x, lx_)

        tags = (lx.symmetric_tag, lx.positive_semidefinite_tag) if method == "cg" else ()
        operator = lx.FunctionLinearOperator(mv, structure_in, tags=tags)
        if method == "cg":
            solver = lx.CG(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
        elif method == "gmres":
            solver = lx.GMRES(
                rtol=self.rtol,
                atol=self.atol,
                max_steps=self.max_steps,
                restart=self.restart,
                stagnation_iters=self.max_steps,
            )
        else:
            solver = lx.BiCGStab(rtol=self.rtol, atol=self.atol, max_steps=self.max_steps)
        # The initial guess and preconditioner do not change the solution, so they
        # carry no derivative (lineax requires non-differentiated options).
        options = {"y0": jax.lax.stop_gradient(rhs)}
        if structure is not None:
            pdiag = jtu.tree_map(lambda d: 1.0 / (1.0 - gamma * d), structure)
            options["preconditioner"] = lx.DiagonalLinearOperator(
                jax.lax.stop_gradient(pdiag)
            )
            if method == "cg":
                options["preconditioner"] = lx.TaggedLinearOperator(
                    options["preconditioner"],
                    (lx.symmetric_tag, lx.positive_semidefinite_tag),
                )
        sol = lx.linear_solve(operator, rhs, solver, options=options, throw=False)
        result = RESULTS.where(
            sol.result == lx.RESULTS.successful,
            RESULTS.successful,
            RESULTS.linear_solve_failed,
        )
        return sol.value, result, jnp.asarray(sol.stats.get("num_steps", 0))


class Auto(AbstractLinearSolver):
    """Pick the fastest correct solver from the model's structure (static choice).

    FFT for periodic translation-invariant operators; tridiagonal for 1D non-periodic
    single fields; otherwise preconditioned Krylov (CG if symmetric, else GMRES).
    """

    def resolve(self, model: AbstractModel, like) -> AbstractLinearSolver:
        if model.grid.periodic and model.translation_invariant:
            return FFT()
        if (
            model.grid.ndim == 1
            and not any(b == "periodic" for b in model.grid.boundary)
            and len(jtu.tree_leaves(like)) == 1
        ):
            return Tridiagonal()
        return Krylov()

    def init(self, model, t, like):
        return self.resolve(model, like).init(model, t, like)

    def solve(self, model, t, gamma, rhs, structure):
        return self.resolve(model, rhs).solve(model, t, gamma, rhs, structure)


def resolve_solver(solver: AbstractLinearSolver, model, like) -> AbstractLinearSolver:
    """The concrete solver that ``solver`` stands for, after checking it fits."""
    if isinstance(solver, Auto):
        solver = solver.resolve(model, like)
    solver.check(model, like)
    return solver
