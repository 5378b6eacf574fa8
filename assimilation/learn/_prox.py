r"""Priors as proximal operators.

A prior here is a closed convex function $g$ (possibly an indicator, possibly
non-smooth) used through its proximal operator

$$ \operatorname{prox}_{t g}(x) = \arg\min_z\ t\,g(z) + \tfrac12\|z - x\|^2,
   \qquad t > 0 \text{ (the step)}. $$

Every prior is an immutable ``eqx.Module`` whose weights (e.g. $\lambda$) are
array leaves, so they can be learned with ``jax.grad``; every method is pure,
jittable and vmappable. The conjugate $g^*(y) = \sup_z \langle y, z\rangle - g(z)$
enters through the Moreau identity

$$ x = \operatorname{prox}_{t g}(x) + t\,\operatorname{prox}_{g^*/t}(x/t), $$

which is the default :meth:`AbstractPrior.conjugate_prox`; priors with a closed
form of their own (L1, box, group L1, elastic net, ...) override it, and the tests
check the identity against it. Separable priors act leaf by leaf on pytrees.

A prior $g(x) = h(Kx)$ of an *analysis* form (total variation: $K = D$, the
discrete gradient, $h$ a mixed norm) also exposes $K$, $K^\top$ and $h$ through
:meth:`AbstractPrior.analysis`, which the primal-dual method needs.

References:
    N. Parikh and S. Boyd (2014), "Proximal algorithms", Found. Trends Optim.
    1(3), 127-239 (section 6: the closed forms used here).
    H. H. Bauschke and P. L. Combettes (2017), "Convex Analysis and Monotone
    Operator Theory in Hilbert Spaces", 2nd ed., Springer (Moreau identity,
    Thm. 14.3).
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._tv import gradient, gradient_transpose, tv1d_prox, tv_norm, tv_prox


def _is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_nonneg(value, name: str) -> None:
    if value is None or not _is_concrete(value):
        return
    arr = np.asarray(value)
    if (
        not np.issubdtype(arr.dtype, np.number)
        or np.any(~np.isfinite(arr))
        or np.any(arr < 0)
    ):
        raise ValueError(
            f"`{name}` must be a finite number >= 0 (or an array of them), got "
            f"{value!r}. Pass e.g. `{name}=0.1`; to learn it unconstrained, "
            "parameterise it as exp(log_value)."
        )


def _param(value):
    """Weights become arrays, so that ``eqx.filter_grad`` sees them as leaves."""
    if value is None or isinstance(value, jax.Array | jax.core.Tracer):
        return value
    return jnp.asarray(value)


def _as(x, like):
    return jnp.asarray(x, dtype=jnp.result_type(like))


def soft_threshold(x, threshold):
    r"""The soft-thresholding function $\eta(x;\theta) = \mathrm{sign}(x)\max(|x| -
    \theta, 0)$, the proximal operator of $\theta\|\cdot\|_1$.

    Elementwise on arrays (``threshold`` broadcasts); differentiable in both
    arguments almost everywhere ($\partial\eta/\partial\theta = -\mathrm{sign}(x)$
    where $|x| > \theta$, else 0).
    """
    threshold = _as(threshold, x)
    return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0.0)


def _tree_sum(fn, tree):
    leaves = [fn(leaf) for leaf in jtu.tree_leaves(tree)]
    return sum(leaves[1:], leaves[0]) if leaves else jnp.zeros(())


def _indicator(feasible) -> jax.Array:
    return jnp.where(feasible, 0.0, jnp.inf)


class AbstractPrior(eqx.Module):
    r"""A closed convex function $g$ with a proximal operator.

    Subclasses implement :meth:`prox` ($\operatorname{prox}_{t g}$) and
    :meth:`value` ($g$, ``inf`` outside the domain of an indicator).
    """

    @abc.abstractmethod
    def prox(self, x, step=1.0):
        r"""$\operatorname{prox}_{t g}(x)$ with $t$ = ``step`` $> 0$."""

    @abc.abstractmethod
    def value(self, x) -> jax.Array:
        """$g(x)$, a scalar (``inf`` where an indicator is violated)."""

    def conjugate_prox(self, x, step=1.0):
        r"""$\operatorname{prox}_{t g^*}(x)$, by default from the Moreau identity
        $\operatorname{prox}_{t g^*}(x) = x - t\operatorname{prox}_{g/t}(x/t)$."""
        step = jnp.asarray(step)
        return jtu.tree_map(
            lambda a, b: a - step * b,
            x,
            self.prox(jtu.tree_map(lambda a: a / step, x), 1.0 / step),
        )

    def analysis(self):
        r"""``(K, K_T, h)`` with $g(x) = h(Kx)$; by default $K = I$, $h = g$."""
        identity = lambda x: x
        return identity, identity, self

    def __call__(self, x, step=1.0):
        return self.prox(x, step)


class Zero(AbstractPrior):
    """$g = 0$: no prior ($\\operatorname{prox} = $ identity)."""

    def prox(self, x, step=1.0):
        return x

    def value(self, x):
        return jnp.zeros((), jnp.result_type(*jtu.tree_leaves(x)))

    def conjugate_prox(self, x, step=1.0):
        # g* is the indicator of {0}.
        return jtu.tree_map(jnp.zeros_like, x)


class L1(AbstractPrior):
    r"""$g(x) = \lambda\|x\|_1$ (sparsity): $\operatorname{prox}_{tg}$ is the soft
    threshold at $t\lambda$; $g^*$ is the indicator of $\{|y|_\infty \le \lambda\}$.

    Attributes:
        lam: $\lambda \ge 0$, a scalar or an array broadcasting against each leaf
            (per-entry weights); differentiable.
    """

    lam: Any = eqx.field(default=1.0, converter=_param)

    def __check_init__(self):
        _check_nonneg(self.lam, "lam")

    def prox(self, x, step=1.0):
        return jtu.tree_map(lambda a: soft_threshold(a, step * self.lam), x)

    def value(self, x):
        return _tree_sum(lambda a: jnp.sum(_as(self.lam, a) * jnp.abs(a)), x)

    def conjugate_prox(self, x, step=1.0):
        return jtu.tree_map(
            lambda a: jnp.clip(a, -_as(self.lam, a), _as(self.lam, a)), x
        )


class NonNegative(AbstractPrior):
    r"""The indicator of $\{x \ge 0\}$; its conjugate is the indicator of
    $\{y \le 0\}$."""

    def prox(self, x, step=1.0):
        return jtu.tree_map(lambda a: jnp.maximum(a, 0.0), x)

    def value(self, x):
        return _indicator(
            jnp.all(jnp.asarray([jnp.all(a >= 0) for a in jtu.tree_leaves(x)]))
        )

    def conjugate_prox(self, x, step=1.0):
        return jtu.tree_map(lambda a: jnp.minimum(a, 0.0), x)


class NonNegativeL1(AbstractPrior):
    r"""$g(x) = \lambda\sum_i x_i + \iota_{x \ge 0}$ (sparse and non-negative, e.g.
    source strengths): $\operatorname{prox}_{tg}(x) = \max(x - t\lambda, 0)$;
    $g^*$ is the indicator of $\{y \le \lambda\}$.

    Attributes:
        lam: $\lambda \ge 0$ (scalar or broadcastable array); differentiable.
    """

    lam: Any = eqx.field(default=1.0, converter=_param)

    def __check_init__(self):
        _check_nonneg(self.lam, "lam")

    def prox(self, x, step=1.0):
        return jtu.tree_map(lambda a: jnp.maximum(a - step * _as(self.lam, a), 0.0), x)

    def value(self, x):
        ok = jnp.all(jnp.asarray([jnp.all(a >= 0) for a in jtu.tree_leaves(x)]))
        lin = _tree_sum(lambda a: jnp.sum(_as(self.lam, a) * a), x)
        return jnp.where(ok, lin, jnp.inf)

    def conjugate_prox(self, x, step=1.0):
        return jtu.tree_map(lambda a: jnp.minimum(a, _as(self.lam, a)), x)


class Box(AbstractPrior):
    r"""The indicator of $\{\ell \le x \le u\}$; its conjugate is the support
    function $\sigma(y) = \sum_i \max(\ell_i y_i, u_i y_i)$.

    Attributes:
        lower, upper: bounds (scalars or broadcastable arrays), ``lower <= upper``;
            ``-inf``/``inf`` for one-sided boxes.
    """

    lower: Any = eqx.field(default=-np.inf, converter=_param)
    upper: Any = eqx.field(default=np.inf, converter=_param)

    def __check_init__(self):
        if _is_concrete(self.lower) and _is_concrete(self.upper):
            if np.any(np.asarray(self.lower) > np.asarray(self.upper)):
                raise ValueError(
                    f"`lower` must be <= `upper` everywhere, got lower={self.lower!r}"
                    f", upper={self.upper!r}. Swap them or fix the bounds."
                )

    def prox(self, x, step=1.0):
        return jtu.tree_map(
            lambda a: jnp.clip(a, _as(self.lower, a), _as(self.upper, a)), x
        )

    def value(self, x):
        ok = [
            jnp.all((a >= _as(self.lower, a)) & (a <= _as(self.upper, a)))
            for a in jtu.tree_leaves(x)
        ]
        return _indicator(jnp.all(jnp.asarray(ok)))

    def conjugate_prox(self, x, step=1.0):
        # argmin_z t*sigma(z) + 1/2 (z - x)^2: z = x - t u above t u, x - t l below
        # t l, and 0 in between.
        def one(a):
            lo, hi = step * _as(self.lower, a), step * _as(self.upper, a)
            return jnp.where(a > hi, a - hi, jnp.where(a < lo, a - lo, 0.0))

        return jtu.tree_map(one, x)


class ElasticNet(AbstractPrior):
    r"""$g(x) = \lambda_1\|x\|_1 + \tfrac{\lambda_2}2\|x\|_2^2$:
    $\operatorname{prox}_{tg}(x) = \eta(x; t\lambda_1)/(1 + t\lambda_2)$;
    $g^*(y) = \tfrac1{2\lambda_2}\sum_i (|y_i| - \lambda_1)_+^2$.

    Attributes:
        l1, l2: $\lambda_1 \ge 0$, $\lambda_2 > 0$; differentiable.
    """

    l1: Any = eqx.field(default=1.0, converter=_param)
    l2: Any = eqx.field(default=1.0, converter=_param)

    def __check_init__(self):
        _check_nonneg(self.l1, "l1")
        _check_nonneg(self.l2, "l2")
        if _is_concrete(self.l2) and np.any(np.asarray(self.l2) == 0):
            raise ValueError(
                "`l2` must be > 0 for an elastic net (its conjugate needs it); use "
                "`L1(lam)` for l2 = 0."
            )

    def prox(self, x, step=1.0):
        return jtu.tree_map(
            lambda a: (
                soft_threshold(a, step * self.l1) / (1.0 + step * _as(self.l2, a))
            ),
            x,
        )

    def value(self, x):
        return _tree_sum(
            lambda a: jnp.sum(
                _as(self.l1, a) * jnp.abs(a) + 0.5 * _as(self.l2, a) * a * a
            ),
            x,
        )

    def conjugate_prox(self, x, step=1.0):
        def one(a):
            l1, l2 = _as(self.l1, a), _as(self.l2, a)
            big = jnp.sign(a) * (l1 + l2 * (jnp.abs(a) - l1) / (l2 + step))
            return jnp.where(jnp.abs(a) <= l1, a, big)

        return jtu.tree_map(one, x)


class GroupL1(AbstractPrior):
    r"""Group sparsity $g(x) = \lambda\sum_G \|x_G\|_2$ for one array ``x``.

    $\operatorname{prox}_{tg}$ shrinks each group: $x_G\max(0, 1 -
    t\lambda/\|x_G\|)$; $g^*$ is the indicator of $\{\|y_G\|_2 \le \lambda\ \forall
    G\}$ (so its prox projects each group onto the ball of radius $\lambda$).

    Attributes:
        lam: $\lambda \ge 0$, a scalar; differentiable.
        groups: integer group label of every entry, shape of ``x``, values in
            ``[0, n_groups)`` (entries with the same label form a group).
        n_groups: number of groups (static).
    """

    lam: Any
    groups: jax.Array
    n_groups: int = eqx.field(static=True)

    def __init__(self, lam, groups, n_groups: int | None = None):
        groups = jnp.asarray(groups)
        if not jnp.issubdtype(groups.dtype, jnp.integer):
            raise TypeError(
                f"`groups` must be an integer array of group labels, got dtype "
                f"{groups.dtype}. Pass e.g. `jnp.arange(n) // group_size`."
            )
        if n_groups is None:
            n_groups = int(np.max(np.asarray(groups))) + 1
        if np.any(np.asarray(groups) < 0) or np.any(np.asarray(groups) >= n_groups):
            raise ValueError(
                f"`groups` must hold labels in [0, n_groups={n_groups}), got min "
                f"{int(np.min(np.asarray(groups)))} and max "
                f"{int(np.max(np.asarray(groups)))}."
            )
        _check_nonneg(lam, "lam")
        self.lam = _param(lam)
        self.groups = groups
        self.n_groups = int(n_groups)

    def _check(self, x):
        if not isinstance(x, jax.Array | np.ndarray) or x.shape != self.groups.shape:
            raise ValueError(
                f"`x` must be one array of the shape of `groups` {self.groups.shape}, "
                f"got {getattr(x, 'shape', type(x).__name__)}."
            )

    def _norms(self, x):
        sq = jax.ops.segment_sum(
            jnp.ravel(x * x), jnp.ravel(self.groups), num_segments=self.n_groups
        )
        return jnp.sqrt(sq)

    def prox(self, x, step=1.0):
        self._check(x)
        norms = self._norms(x)
        thr = step * _as(self.lam, x)
        safe = jnp.where(norms > 0, norms, 1.0)
        scale = jnp.where(norms > thr, 1.0 - thr / safe, 0.0)
        return x * scale[self.groups]

    def value(self, x):
        self._check(x)
        return _as(self.lam, x) * jnp.sum(self._norms(x))

    def conjugate_prox(self, x, step=1.0):
        self._check(x)
        norms = self._norms(x)
        lam = _as(self.lam, x)
        return x * (lam / jnp.maximum(norms, lam))[self.groups]


class L21(AbstractPrior):
    r"""Mixed norm $h(p) = \lambda\sum_i |p_{:,i}|_2$ over the leading axis of one
    array (the isotropic-TV norm of a gradient field ``(ndim, *shape)``).

    Attributes:
        lam: $\lambda \ge 0$; differentiable.
    """

    lam: Any = eqx.field(default=1.0, converter=_param)

    def __check_init__(self):
        _check_nonneg(self.lam, "lam")

    def prox(self, x, step=1.0):
        norm = jnp.sqrt(jnp.sum(x * x, axis=0))
        thr = step * _as(self.lam, x)
        safe = jnp.where(norm > 0, norm, 1.0)
        return x * jnp.where(norm > thr, 1.0 - thr / safe, 0.0)

    def value(self, x):
        return _as(self.lam, x) * jnp.sum(jnp.sqrt(jnp.sum(x * x, axis=0)))

    def conjugate_prox(self, x, step=1.0):
        norm = jnp.sqrt(jnp.sum(x * x, axis=0))
        lam = _as(self.lam, x)
        return x * (lam / jnp.maximum(norm, lam))


class TV1D(AbstractPrior):
    r"""1-D total variation $g(x) = \lambda\sum_i |x_{i+1} - x_i|$, prox exact
    (Condat's direct algorithm, :func:`assimilation.learn.tv1d_prox`), differentiable
    in ``x`` and $\lambda$ in forward and reverse mode.

    Attributes:
        lam: $\lambda \ge 0$, a scalar; differentiable.
    """

    lam: Any = eqx.field(default=1.0, converter=_param)

    def __check_init__(self):
        _check_nonneg(self.lam, "lam")

    def prox(self, x, step=1.0):
        if jnp.ndim(x) != 1:
            raise ValueError(
                f"TV1D acts on 1-D arrays, got shape {jnp.shape(x)}; use TV for n-D "
                "arrays, or jax.vmap over rows."
            )
        return tv1d_prox(x, step * _as(self.lam, x))

    def value(self, x):
        return _as(self.lam, x) * tv_norm(x)

    def analysis(self):
        return gradient, gradient_transpose, L1(self.lam)


class TV(AbstractPrior):
    r"""n-D total variation $g(x) = \lambda\sum_i |(Dx)_i|$, isotropic
    ($|\cdot|_2$ of the gradient per point) or anisotropic ($|\cdot|_1$).

    The prox is solved by the dual fast gradient projection
    (:func:`assimilation.learn.tv_prox`) to the certified accuracy
    $\|z - z^\star\| \le$ ``atol`` $+$ ``rtol``$\,\|x\|$ (duality gap), and is
    reverse-mode differentiable in ``x`` and $\lambda$ by implicit
    differentiation of the dual fixed point. $D$ is the forward-difference gradient
    with a Neumann closure, in grid-index units (scale $\lambda$ by the grid
    spacing for a physical TV).

    Attributes:
        lam: $\lambda \ge 0$, a scalar; differentiable.
        isotropic: the per-point norm of the gradient (static).
        rtol, atol: accuracy of the inner solver (static).
        max_steps: iteration cap of the inner solver (static).
    """

    lam: Any = eqx.field(default=1.0, converter=_param)
    isotropic: bool = eqx.field(static=True, default=True)
    rtol: float = eqx.field(static=True, default=1e-8)
    atol: float = eqx.field(static=True, default=0.0)
    max_steps: int = eqx.field(static=True, default=20_000)

    def __check_init__(self):
        _check_nonneg(self.lam, "lam")
        if not (self.rtol >= 0 and self.atol >= 0 and self.rtol + self.atol > 0):
            raise ValueError(
                f"`rtol` and `atol` must be >= 0 and not both 0, got rtol={self.rtol}, "
                f"atol={self.atol}."
            )
        if not (isinstance(self.max_steps, int) and self.max_steps >= 1):
            raise ValueError(
                f"`max_steps` must be an int >= 1, got {self.max_steps!r}."
            )

    def prox(self, x, step=1.0):
        return tv_prox(
            x,
            step * _as(self.lam, x),
            isotropic=self.isotropic,
            rtol=self.rtol,
            atol=self.atol,
            max_steps=self.max_steps,
        )

    def value(self, x):
        return _as(self.lam, x) * tv_norm(x, isotropic=self.isotropic)

    def analysis(self):
        h = L21(self.lam) if self.isotropic else L1(self.lam)
        return gradient, gradient_transpose, h


class PnP(AbstractPrior):
    r"""A plug-and-play prior: a denoiser $\mathcal D$ used in place of a proximal
    operator, $\operatorname{prox}_{tg}(x) \approx \mathcal D(x)$ (Venkatakrishnan,
    Bouman & Wohlberg 2013).

    There is no explicit $g$: :meth:`value` is 0, so objective histories of a PnP
    run show the data term only. A learned denoiser is generally not a proximal
    operator, so convergence is not guaranteed in general (it is for averaged,
    e.g. spectrally normalised, denoisers).

    Attributes:
        denoiser: a callable (an ``eqx.Module`` with weights, e.g.
            :class:`assimilation.learn.DenoisingCNN`) mapping a field to a field
            of the same shape.
        scale_with_step: if ``True`` the denoiser is called as
            ``denoiser(x, step)`` (noise-level-aware denoisers).
    """

    denoiser: Callable
    scale_with_step: bool = eqx.field(static=True, default=False)

    def prox(self, x, step=1.0):
        if self.scale_with_step:
            return self.denoiser(x, step)
        return self.denoiser(x)

    def value(self, x):
        return jnp.zeros((), jnp.result_type(*jtu.tree_leaves(x)))


class Select(AbstractPrior):
    r"""A prior on one entry of a ``dict`` control, none on the others:
    $g(x) = g_0(x[\mathrm{key}])$.

    Use it to put a prior on one part of a 4D-Var control, e.g.
    ``Select("initial_state", TV(0.1))`` on the whitened control of an
    :class:`assimilation.FourDVar` whose other entries are parameters.

    Attributes:
        key: the entry (static).
        prior: the prior $g_0$ on that entry.
    """

    key: str = eqx.field(static=True)
    prior: AbstractPrior

    def __check_init__(self):
        if not isinstance(self.prior, AbstractPrior):
            raise TypeError(
                "`prior` must be an assimilation.learn prior, got "
                f"{type(self.prior).__name__}."
            )

    def _check(self, x):
        if not isinstance(x, dict) or self.key not in x:
            keys = sorted(x) if isinstance(x, dict) else type(x).__name__
            raise ValueError(
                f"Select({self.key!r}, ...) needs a dict control with the key "
                f"{self.key!r}, got {keys}."
            )

    def prox(self, x, step=1.0):
        self._check(x)
        return {**x, self.key: self.prior.prox(x[self.key], step)}

    def value(self, x):
        self._check(x)
        return self.prior.value(x[self.key])

    def conjugate_prox(self, x, step=1.0):
        # g* is g0* on the entry and the indicator of {0} elsewhere.
        self._check(x)
        out = {k: jtu.tree_map(jnp.zeros_like, v) for k, v in x.items()}
        out[self.key] = self.prior.conjugate_prox(x[self.key], step)
        return out
