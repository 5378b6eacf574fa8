r"""Unrolled, learned sparse solvers: LISTA (learned matrices) and ALISTA (learned
steps and thresholds on a fixed weight, e.g. the physics adjoint).

Both unroll $K$ iterations of ISTA,

$$ x_{k+1} = \eta_{\mathrm{ss}}\big(x_k + W_k^\top(y - Ax_k);\ \theta_k\big),
   \qquad x_0 = 0, $$

and learn what ISTA fixes:

* :class:`LISTA` (coupled form "LISTA-CP", Chen et al. 2018): a matrix $W_k$ of
  the size of $A$ and a threshold $\theta_k$ per layer. For small dense problems.
* :class:`ALISTA` (Liu et al. 2019): $W_k = \gamma_k W$ with one *fixed* weight $W$
  (the operator $A$ itself, so that $W^\top$ is the adjoint: for a PDE operator, one
  adjoint run of the model; or the analytic weight of :func:`analytic_weight`) and
  $2K$ learned scalars, a step $\gamma_k$ and a threshold $\theta_k$ per layer. It
  scales to physics operators: a layer costs two sweeps, as an ISTA iteration.

$\eta_{\mathrm{ss}}$ is the soft threshold with optional *support selection*: the
fraction $p_k$ of largest-magnitude entries passes unthresholded (Chen et al.
2018), with the schedule $p_k = \min(p\,k, p_{\max})$. With a non-negativity
constraint (``nonnegative=True``) the threshold is one-sided, $\max(v - \theta, 0)$.

Both are ``eqx.Module`` pytrees whose learned leaves are ordinary arrays:
``eqx.filter_grad`` / ``optax`` train them (:func:`fit_unrolled`, the project's
:func:`assimilation.learn.fit` with the fixed operator frozen). Their outputs
are differentiable in the data ``y`` too.

References:
    K. Gregor and Y. LeCun (2010), "Learning fast approximations of sparse coding",
    ICML.
    X. Chen, J. Liu, Z. Wang and W. Yin (2018), "Theoretical linear convergence of
    unfolded ISTA and its practical weights and thresholds", NeurIPS (LISTA-CP,
    support selection).
    J. Liu, X. Chen, Z. Wang and W. Yin (2019), "ALISTA: Analytic weights are as
    good as learned weights in LISTA", ICLR.
    M. Borgerding, P. Schniter and S. Rangan (2017), "AMP-inspired deep networks for
    sparse linear inverse problems", IEEE Trans. Signal Process. 65(16) (the S1
    set-up, layer-wise training).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optax
from jax import lax

from ._prox import soft_threshold


def _threshold(v, theta, frac, nonnegative):
    """Soft threshold with support selection of the top ``frac`` magnitudes."""
    if nonnegative:
        out = jnp.maximum(v - theta, 0.0)
        mag = v
    else:
        out = soft_threshold(v, theta)
        mag = jnp.abs(v)
    if frac is None or frac <= 0.0:
        return out
    n = v.size
    k = max(1, min(n, int(round(frac * n))))
    kth = lax.top_k(jnp.ravel(mag), k)[0][-1]
    keep = mag >= kth
    return jnp.where(keep & (mag > 0), v, out)


def support_schedule(n_layers: int, step: float, maximum: float):
    """The support-selection fractions $p_k = \\min(p\\,k, p_{\\max})$, $k = 1..K$."""
    return tuple(min(step * (k + 1), maximum) for k in range(n_layers))


class LISTA(eqx.Module):
    r"""LISTA-CP with learned matrices (see the module docstring).

    Attributes:
        matrix: $A$, ``(M, N)`` (fixed; exclude it from training, see
            :func:`fit_unrolled`).
        weights: $W_k$, ``(K, M, N)`` (learned).
        thresholds: $\theta_k$, ``(K,)`` (learned).
        support: support-selection fractions per layer (static), or ``None``.
        nonnegative: one-sided threshold (static).
    """

    matrix: jax.Array
    weights: jax.Array
    thresholds: jax.Array
    support: tuple[float, ...] | None = eqx.field(static=True)
    nonnegative: bool = eqx.field(static=True)

    def __init__(
        self,
        matrix,
        n_layers: int,
        *,
        lam: float = 0.1,
        support: tuple[float, ...] | None = None,
        nonnegative: bool = False,
    ):
        """ISTA initialisation: $W_k = A/L$, $\\theta_k = \\lambda/L$,
        $L = \\|A\\|_2^2$."""
        matrix = jnp.asarray(matrix)
        if matrix.ndim != 2:
            raise ValueError(f"`matrix` must be 2-D, got shape {matrix.shape}.")
        _check_layers(n_layers, support)
        lip = float(np.linalg.norm(np.asarray(matrix), 2) ** 2)
        self.matrix = matrix
        self.weights = jnp.broadcast_to(matrix / lip, (n_layers, *matrix.shape))
        self.thresholds = jnp.full((n_layers,), lam / lip, matrix.dtype)
        self.support = None if support is None else tuple(float(s) for s in support)
        self.nonnegative = bool(nonnegative)

    @property
    def n_layers(self) -> int:
        return self.thresholds.shape[0]

    def __call__(self, y, *, n_layers: int | None = None, all_layers: bool = False):
        """Run ``n_layers`` (default all) layers on one measurement vector ``y``.

        Returns $x_K$, or every $x_k$ ``(K + 1, N)`` with ``all_layers=True``.
        """
        return _run(self, y, n_layers, all_layers, self._layer)

    def _layer(self, k, x, y):
        r = y - self.matrix @ x
        v = x + self.weights[k].T @ r
        frac = None if self.support is None else self.support[k]
        return _threshold(v, self.thresholds[k], frac, self.nonnegative)

    def _zeros(self, y):
        return jnp.zeros(self.matrix.shape[1], y.dtype)


class ALISTA(eqx.Module):
    r"""ALISTA: learned per-layer steps and thresholds on a fixed weight.

    $x_{k+1} = \eta_{ss}(x_k - \gamma_k W^\top(Ax_k - y);\ \theta_k)$ with
    $W^\top$ the transpose of ``weight`` (default: $A$ itself, i.e. the adjoint).

    Attributes:
        operator: $A$, a ``lineax.AbstractLinearOperator`` (a matrix, or a model:
            sensors $\circ$ solution operator), fixed.
        weight: $W$, a ``lineax.AbstractLinearOperator`` with $A$'s structure, or
            ``None`` for $W = A$.
        steps: $\gamma_k$, ``(K,)`` (learned).
        thresholds: $\theta_k$, ``(K,)`` (learned).
        support: support-selection fractions per layer (static), or ``None``.
        nonnegative: one-sided threshold (static).
    """

    operator: lx.AbstractLinearOperator
    weight: lx.AbstractLinearOperator | None
    steps: jax.Array
    thresholds: jax.Array
    support: tuple[float, ...] | None = eqx.field(static=True)
    nonnegative: bool = eqx.field(static=True)

    def __init__(
        self,
        operator: lx.AbstractLinearOperator,
        n_layers: int,
        *,
        step: float,
        lam: float,
        weight: lx.AbstractLinearOperator | None = None,
        support: tuple[float, ...] | None = None,
        nonnegative: bool = False,
    ):
        """ISTA initialisation: $\\gamma_k$ = ``step`` (e.g. $1/L$),
        $\\theta_k$ = ``step * lam``."""
        if not isinstance(operator, lx.AbstractLinearOperator):
            raise TypeError(
                "`operator` must be a lineax.AbstractLinearOperator, got "
                f"{type(operator).__name__}."
            )
        _check_layers(n_layers, support)
        dtype = operator.in_structure().dtype
        self.operator = operator
        self.weight = weight
        self.steps = jnp.full((n_layers,), step, dtype)
        self.thresholds = jnp.full((n_layers,), step * lam, dtype)
        self.support = None if support is None else tuple(float(s) for s in support)
        self.nonnegative = bool(nonnegative)

    @property
    def n_layers(self) -> int:
        return self.thresholds.shape[0]

    def __call__(self, y, *, n_layers: int | None = None, all_layers: bool = False):
        """Run ``n_layers`` (default all) layers on one measurement ``y``.

        Returns $x_K$, or every $x_k$ (leading axis $K + 1$) with
        ``all_layers=True``. Each layer costs one sweep of $A$ and one of $W^\\top$.
        """
        return _run(self, y, n_layers, all_layers, self._layer)

    def _layer(self, k, x, y):
        w = self.operator if self.weight is None else self.weight
        r = jtu.tree_map(jnp.subtract, self.operator.mv(x), y)
        v = x - self.steps[k] * w.transpose().mv(r)
        frac = None if self.support is None else self.support[k]
        return _threshold(v, self.thresholds[k], frac, self.nonnegative)

    def _zeros(self, y):
        s = self.operator.in_structure()
        return jnp.zeros(s.shape, s.dtype)


def _check_layers(n_layers, support):
    if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"`n_layers` must be an int >= 1, got {n_layers!r}.")
    if support is not None and len(support) != n_layers:
        raise ValueError(
            f"`support` must give one fraction per layer ({n_layers}), got "
            f"{len(support)}. Use support_schedule(n_layers, step, maximum)."
        )


def _run(net, y, n_layers, all_layers, layer):
    n = net.n_layers if n_layers is None else int(n_layers)
    if not 0 <= n <= net.n_layers:
        raise ValueError(f"`n_layers` must lie in [0, {net.n_layers}], got {n}.")
    x = net._zeros(y)
    outs = [x]
    # A Python loop: the layers differ (support fractions are static per layer).
    for k in range(n):
        x = layer(k, x, y)
        outs.append(x)
    return jnp.stack(outs) if all_layers else x


def analytic_weight(matrix) -> jax.Array:
    r"""ALISTA's analytic weight $W$ for a dense $A$ (Liu et al. 2019, eq. (16)):

    $\min_W \|W^\top A\|_F^2$ s.t. $w_i^\top a_i = 1$, solved column by column:
    $w_i = (AA^\top)^{-1}a_i / (a_i^\top (AA^\top)^{-1} a_i)$.
    """
    a = jnp.asarray(matrix)
    g = jnp.linalg.solve(a @ a.T, a)
    return g / jnp.sum(a * g, axis=0, keepdims=True)


# ------------------------------------------------------------------ training


def fit_unrolled(
    model,
    train_data,
    *,
    key,
    n_steps: int,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    val_data=None,
    loss_fn: Callable | None = None,
    **fit_kwargs,
):
    r"""Train a :class:`LISTA`/:class:`ALISTA` with :func:`assimilation.learn.fit`.

    Adam on the learned leaves only (:func:`learned_leaves`: never the fixed
    operator), minimising by default the squared error of the last layer,
    $\|\mathrm{net}(y) - x\|^2$, averaged over mini-batches of ``train_data``.

    Args:
        model: the network.
        train_data: ``(ys, xs)`` with a leading example axis.
        key: PRNG key (shuffling).
        n_steps: optimisation steps.
        batch_size: examples per step.
        learning_rate: Adam's step.
        val_data: optional ``(ys, xs)`` for validation and best-model selection.
        loss_fn: ``loss_fn(model, (y, x), key) -> scalar`` for one example, instead
            of the squared error.
        **fit_kwargs: passed on to :func:`assimilation.learn.fit` (checkpoints,
            early stopping, progress, ...).

    Returns:
        The :class:`assimilation.learn.FitResult` (use ``.best_model`` with
        validation data, ``.model`` otherwise).
    """
    from ._train import fit

    if loss_fn is None:

        def loss_fn(net, example, key):
            y, x = example
            return jnp.sum((net(y) - x) ** 2)

    return fit(
        model,
        loss_fn,
        train_data,
        optimizer=optax.adam(learning_rate),
        key=key,
        batch_size=batch_size,
        n_steps=n_steps,
        val_data=val_data,
        trainable=learned_leaves(model),
        **fit_kwargs,
    )


def learned_leaves(model):
    if isinstance(model, LISTA):
        learned = lambda m: (m.weights, m.thresholds)
    elif isinstance(model, ALISTA):
        learned = lambda m: (m.steps, m.thresholds)
    else:
        return jtu.tree_map(eqx.is_inexact_array, model)
    spec = jtu.tree_map(lambda _: False, model)
    return eqx.tree_at(learned, spec, (True, True))
