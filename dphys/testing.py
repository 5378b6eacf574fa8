r"""Gradient verification: Taylor remainder, dot-product and finite-difference tests.

These are the tools a user (and this package's own test suite) needs to check that a
gradient, a Hessian-vector product or an adjoint operator is right. They work on
arbitrary pytrees of floating-point arrays, including Python scalars and 0-d arrays.

* [`taylor_test`][dphys.testing.taylor_test]: the Taylor remainder test of
  Farrell et al. (2013): with a correct gradient the first-order remainder
  $|f(x+\epsilon h) - f(x) - \epsilon\langle g, h\rangle|$ shrinks like
  $\epsilon^2$; with a wrong one, like $\epsilon$.
* [`dot_test`][dphys.testing.dot_test] and
  [`dot_test_vjp`][dphys.testing.dot_test_vjp]: the dot-product test
  $\langle A x, y\rangle = \langle x, A^\top y\rangle$ for a linear operator and its
  adjoint, or for the tangent and adjoint linear models of a nonlinear map.
* [`fd_check`][dphys.testing.fd_check]: a central finite-difference directional
  derivative compared with $\langle g, h\rangle$.

Verification needs float64: in float32 round-off swamps the remainders after a few
halvings of the step. Enable it before creating any array with
`jax.config.update("jax_enable_x64", True)`.

Nothing here raises when a check fails: each function returns a result object whose
`passed` attribute says whether it succeeded and whose `str()` explains the numbers.
Only misuse (mismatched pytree structures, non-floating leaves, invalid options)
raises `ValueError` or `TypeError`, before anything is evaluated.

Example:
    Verify the gradient of a model in three lines:

    >>> import jax.numpy as jnp
    >>> import dphys.testing as dt
    >>> cost = lambda x: jnp.sum(jnp.sin(x["u"]) ** 2) + x["k"] ** 3
    >>> x0 = {"u": jnp.linspace(0.0, 1.0, 8), "k": jnp.asarray(0.5)}
    >>> res = dt.taylor_test(cost, x0)
    >>> assert res.passed
    >>> print(res)  # doctest: +SKIP

References:
    P. E. Farrell, D. A. Ham, S. W. Funke and M. E. Rognes (2013), "Automated
    derivation of the adjoint of high-level transient finite element programs",
    SIAM J. Sci. Comput. 35(4), C369-C393, section 5.2 (Taylor test).
    J. F. Claerbout (1992), "Earth Soundings Analysis: Processing versus Inversion",
    section 1.4 (dot-product test).
"""

from __future__ import annotations

import functools as ft
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PRNGKeyArray, PyTree


__all__ = [
    "DotResult",
    "FDResult",
    "TaylorResult",
    "dot_test",
    "dot_test_vjp",
    "fd_check",
    "taylor_test",
    "tree_allclose",
    "tree_dot",
    "tree_random_like",
]

# A remainder below `_ROUNDOFF_FACTOR * eps_machine * |f|` is indistinguishable from
# the round-off error of evaluating f (a sum of many terms, each rounded), so it
# carries no information about the convergence rate.
_ROUNDOFF_FACTOR = 1e3
# The default steps are chosen so that the smallest remainder of interest is this
# many times above the round-off level. The level is pessimistic, so rates there
# are still accurate to about 1%, and every factor of 10 closer to it makes the test
# sqrt(10) times more sensitive to a wrong gradient (the error term is O(eps), the
# correct remainder O(eps^2)).
_ROUNDOFF_MARGIN = 1e1
# No default step moves x by more than this fraction of its own size: beyond that
# the Taylor expansion is not asymptotic for most models.
_MAX_RELATIVE_STEP = 0.1
# The trial step that measures the size of the remainder moves x by this fraction.
_TRIAL_RELATIVE_STEP = 1e-2
# An `inf` ("exact to round-off") verdict must certify <g, h> at least this well,
# ten times finer than the 0.1% gradient errors a verification should catch.
_MIN_RESOLUTION = 1e-4


# --------------------------------------------------------------------------------------
# Pytree helpers
# --------------------------------------------------------------------------------------


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple(leaf.shape) if hasattr(leaf, "shape") else jnp.shape(leaf)


def _dtype(leaf: Any) -> np.dtype:
    return np.dtype(leaf.dtype) if hasattr(leaf, "dtype") else jnp.result_type(leaf)


def _is_floating(dtype: Any) -> bool:
    return bool(jnp.issubdtype(dtype, jnp.floating))


def _widest(dtypes: Sequence[Any]) -> np.dtype:
    """The floating dtype with the most bits among `dtypes`.

    Computed by hand rather than with `jnp.promote_types`, which refuses to mix
    float32 and float64 under `jax_numpy_dtype_promotion="strict"`.
    """
    dtypes = [np.dtype(d) for d in dtypes]
    if not dtypes:
        return np.dtype(jnp.result_type(float))
    return max(dtypes, key=lambda d: jnp.finfo(d).bits)


def _check_floating(tree: PyTree, name: str) -> None:
    for path, leaf in jtu.tree_flatten_with_path(tree)[0]:
        dtype = _dtype(leaf)
        if not _is_floating(dtype):
            raise TypeError(
                f"`{name}` must be a pytree of real floating-point arrays, but leaf "
                f"`{name}{jtu.keystr(path)}` has dtype {dtype}. Cast it, e.g. with "
                "`jnp.asarray(leaf, dtype=float)`."
            )


def _check_same_structure(
    a: PyTree, b: PyTree, name_a: str, name_b: str, *, what: str = "must have"
) -> None:
    """Raise `ValueError` unless `a` and `b` have equal treedefs and leaf shapes."""
    treedef_a, treedef_b = jtu.tree_structure(a), jtu.tree_structure(b)
    if treedef_a != treedef_b:
        raise ValueError(
            f"`{name_b}` {what} the same pytree structure as `{name_a}`; got "
            f"{treedef_b} and {treedef_a}."
        )
    for (path, leaf_a), leaf_b in zip(
        jtu.tree_flatten_with_path(a)[0], jtu.tree_leaves(b), strict=True
    ):
        if _shape(leaf_a) != _shape(leaf_b):
            raise ValueError(
                f"`{name_b}` {what} the same leaf shapes as `{name_a}`; at "
                f"{jtu.keystr(path) or 'the root'} got shape {_shape(leaf_b)}, "
                f"expected {_shape(leaf_a)}."
            )


def _to_arrays(tree: PyTree) -> PyTree:
    """Python scalars and NumPy arrays to JAX arrays; `ShapeDtypeStruct`s are kept."""
    return jtu.tree_map(
        lambda leaf: (
            leaf if isinstance(leaf, jax.ShapeDtypeStruct) else jnp.asarray(leaf)
        ),
        tree,
    )


def tree_dot(a: PyTree, b: PyTree) -> Array:
    r"""Euclidean inner product of two pytrees with the same structure.

    $$\langle a, b\rangle = \sum_{\ell} \sum_i a_{\ell,i}\, b_{\ell,i},$$

    summed over the leaves $\ell$ and their entries $i$. Each leaf's sum accumulates
    in that leaf's dtype (the wider one, if `a` and `b` differ), with
    `precision=lax.Precision.HIGHEST`; the per-leaf sums are added in the widest
    dtype present. Mixed float32/float64 trees therefore work under
    `jax_numpy_dtype_promotion="strict"`. The function is traceable (jit, vmap).

    Args:
        a: pytree of real floating-point arrays (Python scalars and 0-d arrays are
            fine).
        b: pytree with the same structure and leaf shapes as `a`.

    Returns:
        A 0-d array. For trees without leaves, `0.0` in the default float dtype.

    Raises:
        ValueError: if the structures or leaf shapes differ.
        TypeError: if a leaf is not floating point.

    Example:
        >>> import jax.numpy as jnp
        >>> import dphys.testing as dt
        >>> a = {"u": jnp.array([1.0, 2.0]), "k": 3.0}
        >>> b = {"u": jnp.array([4.0, 5.0]), "k": 0.5}
        >>> float(dt.tree_dot(a, b))
        15.5
    """
    _check_same_structure(a, b, "a", "b")
    _check_floating(a, "a")
    _check_floating(b, "b")
    partials = []
    for leaf_a, leaf_b in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        leaf_a, leaf_b = jnp.asarray(leaf_a), jnp.asarray(leaf_b)
        dtype = _widest([leaf_a.dtype, leaf_b.dtype])
        partials.append(
            jnp.vdot(
                leaf_a.astype(dtype),
                leaf_b.astype(dtype),
                precision=lax.Precision.HIGHEST,
            )
        )
    if not partials:
        return jnp.zeros((), _widest([]))
    dtype = _widest([p.dtype for p in partials])
    return ft.reduce(
        lambda s, p: s + p.astype(dtype), partials[1:], partials[0].astype(dtype)
    )


def tree_random_like(key: PRNGKeyArray, tree: PyTree) -> PyTree:
    r"""Standard-normal pytree with the structure, shapes and dtypes of `tree`.

    Every entry is drawn independently from $\mathcal N(0, 1)$; each leaf uses its
    own subkey of `key`, so the result is reproducible and leaves are independent.

    Args:
        key: a JAX PRNG key (`jax.random.key` or legacy `jax.random.PRNGKey`).
        tree: pytree whose leaves are floating-point arrays, Python floats or
            `jax.ShapeDtypeStruct`s (e.g. from `jax.eval_shape`).

    Returns:
        A pytree of JAX arrays with the same structure, shapes and dtypes.

    Raises:
        TypeError: if a leaf is not floating point.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import dphys.testing as dt
        >>> z = dt.tree_random_like(jax.random.key(0), {"u": jnp.zeros(3), "k": 1.0})
        >>> z["u"].shape, z["k"].shape
        ((3,), ())
    """
    _check_floating(tree, "tree")
    leaves, treedef = jtu.tree_flatten(tree)
    if not leaves:
        return tree
    structs = tuple(jax.ShapeDtypeStruct(_shape(leaf), _dtype(leaf)) for leaf in leaves)
    return _random_from_structs(key, treedef, structs)


# Jitted (cached per structure) because drawing leaf by leaf eagerly compiles one
# small kernel per shape, which dominates the run time of a verification.
@ft.partial(jax.jit, static_argnums=(1, 2))
def _random_from_structs(
    key: PRNGKeyArray, treedef: Any, structs: tuple[jax.ShapeDtypeStruct, ...]
) -> PyTree:
    keys = jr.split(key, len(structs))
    new = [jr.normal(k, s.shape, s.dtype) for k, s in zip(keys, structs, strict=True)]
    return jtu.tree_unflatten(treedef, new)


def tree_allclose(a: PyTree, b: PyTree, rtol: float = 1e-5, atol: float = 1e-8) -> bool:
    r"""Whether two pytrees are equal up to tolerances, leaf by leaf.

    True if and only if `a` and `b` have the same structure, every pair of leaves has
    the same shape, and $|a_i - b_i| \le \mathrm{atol} + \mathrm{rtol}\,|b_i|$ for
    every entry (`jnp.allclose` semantics, NaNs unequal). A structure or shape
    mismatch gives `False`, not an error, so it can be asserted directly.

    Args:
        a: a pytree of arrays or scalars.
        b: the reference pytree.
        rtol: relative tolerance.
        atol: absolute tolerance.

    Returns:
        A Python `bool`.

    Example:
        >>> import jax.numpy as jnp
        >>> import dphys.testing as dt
        >>> dt.tree_allclose({"u": jnp.ones(2)}, {"u": jnp.ones(2) + 1e-9})
        True
        >>> dt.tree_allclose({"u": jnp.ones(2)}, {"u": jnp.ones(3)})
        False
    """
    if jtu.tree_structure(a) != jtu.tree_structure(b):
        return False
    for leaf_a, leaf_b in zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True):
        leaf_a, leaf_b = jnp.asarray(leaf_a), jnp.asarray(leaf_b)
        if leaf_a.shape != leaf_b.shape:
            return False
        dtypes = [leaf_a.dtype, leaf_b.dtype]
        if all(_is_floating(d) for d in dtypes):
            dtype = _widest(dtypes)
            leaf_a, leaf_b = leaf_a.astype(dtype), leaf_b.astype(dtype)
        elif leaf_a.dtype != leaf_b.dtype:
            return False
        if not bool(jnp.allclose(leaf_a, leaf_b, rtol=rtol, atol=atol)):
            return False
    return True


# --------------------------------------------------------------------------------------
# Shared machinery for the Taylor and finite-difference checks
# --------------------------------------------------------------------------------------


def _machine_eps(*dtypes: Any) -> float:
    """Machine epsilon of the least precise of `dtypes` (the one that limits us)."""
    return max(float(jnp.finfo(d).eps) for d in dtypes)


def _unit_step(x: PyTree, h: PyTree) -> float:
    r"""The step $\epsilon$ at which $\epsilon h$ first grows as large as $x$.

    $\min_\ell \mathrm{rms}(x_\ell) / \mathrm{rms}(h_\ell)$ over the leaves where $h$
    is nonzero, with $\mathrm{rms}(x_\ell)$ replaced by 1 where $x_\ell = 0$. Taken
    leaf by leaf, so that a direction concentrated on a small parameter (a
    diffusivity of 1e-3, say) moves that parameter by a fraction of itself.
    """
    steps = []
    for x_leaf, h_leaf in zip(jtu.tree_leaves(x), jtu.tree_leaves(h), strict=True):
        if np.size(h_leaf) == 0:
            continue
        rms_h = float(np.sqrt(np.mean(np.square(np.asarray(h_leaf, np.float64)))))
        if not math.isfinite(rms_h):
            raise ValueError("`direction` must be finite.")
        if rms_h == 0.0:
            continue
        rms_x = float(np.sqrt(np.mean(np.square(np.asarray(x_leaf, np.float64)))))
        steps.append((rms_x if rms_x > 0.0 else 1.0) / rms_h)
    if not steps:
        raise ValueError("`direction` must be nonzero.")
    return min(steps)


@jax.jit
def _default_direction(key: PRNGKeyArray, x: PyTree) -> PyTree:
    r"""Random direction with each leaf as large as the matching leaf of `x`.

    Leaf by leaf, a standard-normal draw is rescaled so that its root-mean-square
    equals that of the leaf of `x` (so $\|h_\ell\| = \|x_\ell\|$), or 1 where the
    leaf of `x` is zero. Rescaling per leaf keeps every control variable in play even
    when their magnitudes differ by orders of magnitude (a state ~1e3 and a
    diffusivity ~1e-3, say). Jitted for the reason given at `_random_from_structs`.
    """
    z = tree_random_like(key, x)

    def rescale(z_leaf: Array, x_leaf: Array) -> Array:
        if z_leaf.size == 0:
            return z_leaf
        rms_x = jnp.sqrt(jnp.mean(x_leaf * x_leaf))
        rms_z = jnp.sqrt(jnp.mean(z_leaf * z_leaf))
        scale = jnp.where(rms_x > 0, rms_x, jnp.ones_like(rms_x))
        return z_leaf * (scale / rms_z)

    return jtu.tree_map(rescale, z, x)


def _prepare(
    f: Callable[[PyTree], Any],
    x: PyTree,
    grad: PyTree | None,
    direction: PyTree | None,
    key: PRNGKeyArray | None,
) -> tuple[PyTree, float, PyTree, PyTree, float, float]:
    """Common set-up: arrays, f(x), gradient, direction, machine epsilon, unit step."""
    x = _to_arrays(x)
    _check_floating(x, "x")
    f0 = f(x)
    if jnp.shape(f0) != ():
        raise ValueError(
            f"`f` must return a scalar, but returned shape {jnp.shape(f0)}. Reduce "
            "the output, e.g. with `jnp.sum`."
        )
    if not _is_floating(_dtype(f0)):
        raise TypeError(f"`f` must return a real float, but returned {_dtype(f0)}.")
    if grad is None:
        grad = jax.grad(f)(x)
    else:
        grad = _to_arrays(grad)
        _check_same_structure(x, grad, "x", "grad")
        _check_floating(grad, "grad")
    if direction is None:
        h = _default_direction(jr.key(0) if key is None else key, x)
    else:
        direction = _to_arrays(direction)
        _check_same_structure(x, direction, "x", "direction")
        _check_floating(direction, "direction")
        h = jtu.tree_map(lambda d, xl: d.astype(xl.dtype), direction, x)
    eps_mach = _machine_eps(_dtype(f0), *(leaf.dtype for leaf in jtu.tree_leaves(x)))
    return x, float(f0), grad, h, eps_mach, _unit_step(x, h)


def _step(x: PyTree, eps: float, h: PyTree) -> PyTree:
    """x + eps * h, leaf by leaf in the leaves' own dtype."""
    return jtu.tree_map(lambda xl, hl: xl + jnp.asarray(eps, xl.dtype) * hl, x, h)


# --------------------------------------------------------------------------------------
# Taylor test
# --------------------------------------------------------------------------------------


class TaylorResult(eqx.Module):
    r"""Outcome of [`taylor_test`][dphys.testing.taylor_test].

    With $\epsilon_i = \epsilon_0\,\mathrm{factor}^i$ and $\delta_i = f(x +
    \epsilon_i h) - f(x)$, the remainders are
    $r^{(0)}_i = |\delta_i|$, $r^{(1)}_i = |\delta_i - \epsilon_i \langle g,
    h\rangle|$ and $r^{(2)}_i = |\delta_i - \epsilon_i \langle g, h\rangle -
    \tfrac12 \epsilon_i^2 \langle h, H h\rangle|$, and the rates between successive
    steps are $\log(r_i / r_{i+1}) / \log(1/\mathrm{factor})$.

    Attributes:
        eps: the steps $\epsilon_i$, shape `(n_eps,)`.
        remainder0: $r^{(0)}$, expected $O(\epsilon)$.
        remainder1: $r^{(1)}$, expected $O(\epsilon^2)$ for a correct gradient.
        remainder2: $r^{(2)}$, expected $O(\epsilon^3)$ for a correct Hessian-vector
            product; `None` without `hvp`.
        rates0: the raw successive rates of `remainder0`, shape `(n_eps - 1,)`.
        rates1: the raw successive rates of `remainder1`.
        rates2: the raw successive rates of `remainder2`, or `None`.
        roundoff: the round-off level of each remainder,
            $10^3\,\varepsilon_\mathrm{mach}\max(|f(x)|, |f(x+\epsilon_i h)|)$.
            A rate is *usable* if the remainders at both of its ends are finite and
            above this level; `rates*` keep every rate, the summaries use only usable
            ones.
        rate0: median of the usable `rates0` (about 1).
        rate1: median of the usable `rates1` (about 2 for a correct gradient).
        rate2: median of the usable `rates2` (about 3), or `None`.
        rate: the headline rate: `rate2` when a Hessian-vector product was
            checked, else `rate1`.
        min_rate: the threshold for `rate1`; `rate2` must reach `min_rate + 1`.
        f0: $f(x)$.
        dfdh: the directional derivative $\langle g, h\rangle$ being verified.
        passed: whether `rate1 >= min_rate` (and `rate2 >= min_rate + 1`).
        relative_step: how far the largest step moves `x` relative to its size,
            $\epsilon_0 / \epsilon_u$ with $\epsilon_u = \min_\ell
            \mathrm{rms}(x_\ell)/\mathrm{rms}(h_\ell)$ (0.1 at most by default).
            Below $\sqrt{\varepsilon_\mathrm{mach}}$ the steps have *collapsed*:
            $x + \epsilon h$ differs from $x$ only in its last digits, and a
            failure says nothing about the gradient (see `hint`).

    A summary is `inf` when the remainders after the first step sit at round-off
    level and that round-off level is small against the previous-order remainder
    (the expansion is exact to machine precision, e.g. `remainder1` of a linear
    function; see `taylor_test`), and `nan` when too few rates are usable to say
    anything; `nan` never passes.
    """

    eps: np.ndarray
    remainder0: np.ndarray
    remainder1: np.ndarray
    remainder2: np.ndarray | None
    rates0: np.ndarray
    rates1: np.ndarray
    rates2: np.ndarray | None
    roundoff: np.ndarray
    rate0: float
    rate1: float
    rate2: float | None
    rate: float
    min_rate: float
    f0: float
    dfdh: float
    passed: bool
    relative_step: float
    eps_mach: float

    @property
    def collapsed(self) -> bool:
        """Whether the steps are too small to say anything (see `relative_step`)."""
        return self.relative_step < math.sqrt(self.eps_mach)

    @property
    def hint(self) -> str | None:
        """What to try when the test failed on collapsed steps, else ``None``."""
        if self.passed or not self.collapsed:
            return None
        return (
            f"the largest step moves x by only {self.relative_step:.1e} of its size: "
            "the steps collapsed, and this failure says nothing about the gradient. "
            f"The default step rule takes |f(x)| = {abs(self.f0):.1e} as the "
            "round-off scale, which shrinks the steps when x sits at (or extremely "
            "close to) a minimum where f is nearly 0, or where f crosses zero. Pass "
            "a larger `eps0`, e.g. `eps0` = "
            f"{1e-3 * self.eps[0] / self.relative_step:.1e} (a step moving x by "
            "0.1% of its size)."
        )

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        need = f"rate1 {self.rate1:.3f} (need >= {self.min_rate:.2f})"
        if self.rate2 is not None:
            need += f", rate2 {self.rate2:.3f} (need >= {self.min_rate + 1:.2f})"
        lines = [
            f"Taylor test {status}: {need}",
            f"  f(x) = {self.f0:.6e}   <g, h> = {self.dfdh:.6e}",
        ]
        columns = [("|f(x+eh)-f(x)|", self.remainder0, self.rates0)]
        columns.append(("|...-e<g,h>|", self.remainder1, self.rates1))
        if self.remainder2 is not None and self.rates2 is not None:
            columns.append(("|...-e^2/2<h,Hh>|", self.remainder2, self.rates2))
        header = f"  {'eps':>10}"
        for name, _, _ in columns:
            header += f"  {name:>17} {'rate':>6}"
        lines.append(header)
        for i, eps in enumerate(self.eps):
            row = f"  {eps:10.3e}"
            for _, remainder, rates in columns:
                mark = " " if remainder[i] > self.roundoff[i] else "*"
                rate = "-" if i == 0 else f"{rates[i - 1]:6.3f}"
                row += f"  {remainder[i]:16.3e}{mark} {rate:>6}"
            lines.append(row)
        lines.append(
            "  summary rates: median of usable rates; '*' marks a remainder at "
            "round-off level (its rates are not used)"
        )
        if self.hint is not None:
            lines.append(f"  hint: {self.hint}")
        return "\n".join(lines)


def _successive_rates(remainder: np.ndarray, factor: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return np.log(remainder[:-1] / remainder[1:]) / math.log(1.0 / factor)


def _summary_rate(
    remainder: np.ndarray,
    rates: np.ndarray,
    roundoff: np.ndarray,
    reference: np.ndarray | None,
    resolution: float,
) -> float:
    """Median of the usable rates; `inf` if exact to round-off; else `nan`.

    `inf` needs every remainder after the first at round-off level and, at one of
    those steps, a round-off level below `resolution` times `reference` (the
    previous-order remainder): only then does "at round-off" vouch for the term
    being checked, rather than round-off hiding it (as it would with a tiny `eps0`).
    """
    finite = np.isfinite(remainder)
    above = finite & (remainder > roundoff)
    usable = above[:-1] & above[1:]
    if usable.any():
        return float(np.median(rates[usable]))
    if finite.all() and not above[1:].any():
        if reference is None:
            return math.inf
        at_roundoff = ~above
        with np.errstate(divide="ignore", invalid="ignore"):
            relative = roundoff[at_roundoff] / reference[at_roundoff]
        if np.min(relative, initial=math.inf) <= resolution:
            return math.inf
    return math.nan


def _resolution(eps_mach: float) -> float:
    """Relative accuracy of <g, h> that an all-round-off verdict must certify."""
    # sqrt(margin * round-off level): what a first-order check can resolve at best,
    # as for a one-sided finite difference (about 1.5e-6 in float64). Never looser
    # than _MIN_RESOLUTION: float32 (0.035) could not certify a 1% error.
    return min(
        math.sqrt(_ROUNDOFF_MARGIN * _ROUNDOFF_FACTOR * eps_mach), _MIN_RESOLUTION
    )


def _default_eps0(
    f: Callable[[PyTree], Any],
    x: PyTree,
    h: PyTree,
    f0: float,
    dfdh: float,
    hhh: float | None,
    unit_step: float,
    eps_mach: float,
    n_eps: int,
    factor: float,
) -> float:
    """The default largest step, from one trial evaluation; see `taylor_test`."""
    eps_trial = _TRIAL_RELATIVE_STEP * unit_step
    f_trial = float(f(_step(x, eps_trial, h)))
    remainder = f_trial - f0 - eps_trial * dfdh
    order = 1
    if hhh is not None:
        remainder -= 0.5 * eps_trial**2 * hhh
        order = 2
    remainder = abs(remainder)
    target = _ROUNDOFF_MARGIN * _ROUNDOFF_FACTOR * eps_mach * abs(f0)
    if 0.0 < target < remainder < math.inf:
        eps_end = eps_trial * (target / remainder) ** (1.0 / (order + 1))
        eps0 = eps_end / factor ** (n_eps - 1)
    else:
        # f(x) = 0 (no round-off scale), a remainder already at round-off level at
        # the trial step (e.g. a linear f), or a non-finite value: keep the trial.
        eps0 = eps_trial
    return min(eps0, _MAX_RELATIVE_STEP * unit_step)


def taylor_test(
    f: Callable[[PyTree], Any],
    x: PyTree,
    *,
    grad: PyTree | None = None,
    hvp: Callable[[PyTree], PyTree] | None = None,
    direction: PyTree | None = None,
    key: PRNGKeyArray | None = None,
    eps0: float | None = None,
    n_eps: int = 6,
    factor: float = 0.5,
    min_rate: float | None = None,
) -> TaylorResult:
    r"""Taylor remainder test of a gradient (and optionally a Hessian-vector product).

    For a smooth scalar function $f$ with gradient $g = \nabla f(x)$ and Hessian $H$,

    $$
    \begin{aligned}
    r^{(0)}(\epsilon) &= |f(x+\epsilon h) - f(x)| = O(\epsilon),\\
    r^{(1)}(\epsilon) &= |f(x+\epsilon h) - f(x) - \epsilon\langle g, h\rangle|
        = O(\epsilon^2),\\
    r^{(2)}(\epsilon) &= |f(x+\epsilon h) - f(x) - \epsilon\langle g, h\rangle
        - \tfrac12\epsilon^2\langle h, H h\rangle| = O(\epsilon^3).
    \end{aligned}
    $$

    Any error in $g$ (along $h$) leaves an $O(\epsilon)$ term in $r^{(1)}$ that
    dominates for small $\epsilon$, so the measured rate of $r^{(1)}$ drops from 2
    to 1. The rates are measured over the steps $\epsilon_i = \epsilon_0
    \,\mathrm{factor}^i$, $i = 0, \dots, n_\mathrm{eps}-1$, as
    $\log(r_i / r_{i+1}) / \log(1/\mathrm{factor})$.

    **Direction.** Unless given, $h$ is a standard-normal draw from `key`, rescaled
    leaf by leaf to the root-mean-square size of the matching leaf of $x$ (so
    $\|h_\ell\| = \|x_\ell\|$), or to unit entries where that leaf is zero.

    **Steps.** A wrong gradient shows only at steps small enough for its
    $O(\epsilon)$ error term to outgrow the $O(\epsilon^2)$ remainder of a correct
    one, while too small steps drown the remainder in round-off. Unless `eps0` is
    given, the smallest step is therefore put where the checked remainder of a
    correct derivative is 10 times the round-off level
    $R = 10^3\varepsilon_\mathrm{mach}|f(x)|$ ($\varepsilon_\mathrm{mach}$ of the
    least precise of $x$ and $f(x)$). The remainder is measured once, at the trial
    step $\epsilon_t = 0.01\,\min_\ell \mathrm{rms}(x_\ell)/\mathrm{rms}(h_\ell)$
    (minimum over the leaves $\ell$ where $h \ne 0$; $\mathrm{rms}(x_\ell)$ is
    replaced by 1 where $x_\ell = 0$), which moves no leaf of $x$ by more than 1%
    of its size ($\epsilon_t = 0.01$ for the default direction), and scaled with
    its order $p + 1$ ($p = 1$, or $p = 2$ with `hvp`):

    $$
    \epsilon_\mathrm{end} = \epsilon_t \Big(\frac{10 R}{r^{(p)}(\epsilon_t)}
    \Big)^{1/(p+1)}, \qquad
    \epsilon_0 = \min\Big(\frac{\epsilon_\mathrm{end}}
    {\mathrm{factor}^{n_\mathrm{eps}-1}},\; 10\,\epsilon_t\Big),
    $$

    the cap keeping every step within 10% of each leaf's size. If $f(x) = 0$ or the
    trial remainder is already below $10R$ (e.g. a linear $f$), $\epsilon_0 =
    \epsilon_t$. This costs one extra evaluation of $f$. If the gradient is wrong,
    the trial remainder holds its $O(\epsilon)$ error, which the scaled steps keep
    above round-off. A rule on $f$ alone (say, make $\epsilon|\langle g, h\rangle|$
    a fixed fraction of $|f|$) is not used: it silently assumes a curvature on the
    scale set by $f$ and $g$, and for a cost whose gradient is dominated by one
    small parameter (a diffusivity of $10^{-3}$, say) it put every remainder into
    round-off. Pass `eps0` when $|f(x)|$ is a poor round-off scale ($f$ crosses
    zero near $x$, or $x$ sits extremely close to a minimum).

    **Round-off and the summary rate.** A remainder at or below
    $10^3\varepsilon_\mathrm{mach}\max(|f(x)|, |f(x+\epsilon_i h)|)$ is round-off
    noise, and a rate with such a remainder at either end is dropped. The summary
    rate is the *median* of the usable rates. pyadjoint's `taylor_test` reports
    the minimum, which fails a correct gradient as soon as a single pair of steps is
    pre-asymptotic (too large) or touched by round-off; the median tolerates up to
    half the rates being spoiled that way, while a wrong gradient, whose error term
    dominates from the first steps on with these defaults, still pulls it to 1. All
    raw rates are kept in the result for inspection.

    **Exact to round-off.** If the remainder is at round-off level at every step
    after the first (a linear $f$; or $\langle h, Hh\rangle = 0$, so that the
    remainder falls like $\epsilon^3$ into round-off), no rate can be measured, but
    the expansion is exact to machine precision: the rate is `inf` and the test
    passes, provided that at one of those steps the round-off level is below
    $\min(\sqrt{10^4\varepsilon_\mathrm{mach}}, 10^{-4})$ times the previous-order
    remainder ($r^{(0)}$ for $r^{(1)}$), so that round-off cannot hide a larger
    relative error in $\langle g, h\rangle$. The square root of $10R/|f|$ is the
    best a first-order check resolves ($1.5\cdot10^{-6}$ in float64); the cap
    $10^{-4}$ binds only in float32, whose round-off is too coarse to certify a
    gradient. Otherwise (e.g. `eps0` far too small, or float32) the rate is `nan`
    and the test fails.

    Nothing is raised when the check fails (non-finite values included): read
    `passed`. A failure on collapsed steps (the largest moves $x$ by less than
    $\sqrt{\varepsilon_\mathrm{mach}}$ of its size, e.g. at an exact minimum where
    $f \approx 0$) also warns and its `str()` suggests an `eps0`. `f` is called
    `n_eps + 2` times (`n_eps + 1` with `eps0`) and is not jitted here; pass
    `jax.jit(f)` if it is expensive to trace.

    Args:
        f: function from a pytree shaped like `x` to a real scalar.
        x: point at which the derivatives are verified; a pytree of floating-point
            arrays (float64 recommended).
        grad: the gradient to verify, a pytree shaped like `x` (e.g. from a
            hand-written adjoint model). Default: `jax.grad(f)(x)`; `f` need not be
            differentiable by JAX when `grad` is given.
        hvp: optional Hessian-vector product $v \mapsto H v$ at `x`; if given, the
            second-order remainder is checked too.
        direction: the perturbation $h$, a pytree shaped like `x`. Default: random,
            see above.
        key: PRNG key for the random direction. Default: `jax.random.key(0)`.
        eps0: the largest step. Default: see above.
        n_eps: number of steps, at least 3.
        factor: ratio between successive steps, in (0, 1).
        min_rate: least acceptable first-order rate; default 1.9. The second-order
            rate must reach `min_rate + 1`.

    Returns:
        A [`TaylorResult`][dphys.testing.TaylorResult]; `print` it for a table.

    Raises:
        ValueError: if `f` is not scalar-valued, `grad`/`direction` do not match the
            structure of `x`, the direction is zero, or an option is out of range.
        TypeError: if a leaf of `x`, `grad` or `direction` is not floating point.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import dphys.testing as dt
        >>> f = lambda x: jnp.sum(jnp.exp(x["a"]) * x["b"] ** 2)
        >>> x = {"a": jnp.linspace(0.0, 1.0, 4), "b": jnp.arange(1.0, 5.0)}
        >>> dt.taylor_test(f, x).passed
        True
        >>> g = jax.grad(f)(x)
        >>> wrong = jax.tree_util.tree_map(lambda l: 1.001 * l, g)
        >>> dt.taylor_test(f, x, grad=wrong).passed
        False
        >>> hvp = lambda v: jax.jvp(jax.grad(f), (x,), (v,))[1]
        >>> dt.taylor_test(f, x, hvp=hvp).rate > 2.9
        True

    References:
        Farrell, Ham, Funke and Rognes (2013), SIAM J. Sci. Comput. 35(4), C369,
        section 5.2; pyadjoint's `verification.py`.
    """
    if n_eps < 3:
        raise ValueError(f"`n_eps` must be at least 3 (two rates); got {n_eps}.")
    if not 0.0 < factor < 1.0:
        raise ValueError(f"`factor` must lie in (0, 1); got {factor}.")
    if eps0 is not None and not (0.0 < eps0 < math.inf):
        raise ValueError(f"`eps0` must be positive and finite; got {eps0}.")
    min_rate = 1.9 if min_rate is None else float(min_rate)

    x, f0, grad, h, eps_mach, unit_step = _prepare(f, x, grad, direction, key)
    dfdh = float(tree_dot(grad, h))
    hhh = None if hvp is None else float(tree_dot(h, hvp(h)))
    if eps0 is None:
        eps0 = _default_eps0(f, x, h, f0, dfdh, hhh, unit_step, eps_mach, n_eps, factor)

    eps = float(eps0) * factor ** np.arange(n_eps, dtype=np.float64)
    f_eps = np.array([float(f(_step(x, float(e), h))) for e in eps])
    with np.errstate(invalid="ignore", over="ignore"):
        delta = f_eps - f0
        first = delta - eps * dfdh
        remainder0 = np.abs(delta)
        remainder1 = np.abs(first)
        remainder2 = None if hhh is None else np.abs(first - 0.5 * eps**2 * hhh)
        roundoff = _ROUNDOFF_FACTOR * eps_mach * np.maximum(abs(f0), np.abs(f_eps))

    rates0 = _successive_rates(remainder0, factor)
    rates1 = _successive_rates(remainder1, factor)
    resolution = _resolution(eps_mach)
    rate0 = _summary_rate(remainder0, rates0, roundoff, None, resolution)
    rate1 = _summary_rate(remainder1, rates1, roundoff, remainder0, resolution)
    passed = rate1 >= min_rate
    if remainder2 is None:
        rates2, rate2, rate = None, None, rate1
    else:
        rates2 = _successive_rates(remainder2, factor)
        rate2 = _summary_rate(remainder2, rates2, roundoff, remainder1, resolution)
        rate = rate2
        passed = passed and rate2 >= min_rate + 1.0
    result = TaylorResult(
        eps=eps,
        remainder0=remainder0,
        remainder1=remainder1,
        remainder2=remainder2,
        rates0=rates0,
        rates1=rates1,
        rates2=rates2,
        roundoff=roundoff,
        rate0=rate0,
        rate1=rate1,
        rate2=rate2,
        rate=rate,
        min_rate=min_rate,
        f0=f0,
        dfdh=dfdh,
        passed=bool(passed),
        relative_step=float(eps[0]) / unit_step,
        eps_mach=eps_mach,
    )
    if result.hint is not None:
        # A failure on collapsed steps is not a verdict on the gradient: say so
        # even to callers that only read `passed`.
        warnings.warn(f"taylor_test failed: {result.hint}", stacklevel=2)
    return result


# --------------------------------------------------------------------------------------
# Dot-product tests
# --------------------------------------------------------------------------------------


class DotResult(eqx.Module):
    r"""Outcome of [`dot_test`][dphys.testing.dot_test] or
    [`dot_test_vjp`][dphys.testing.dot_test_vjp].

    Attributes:
        lhs: $\langle A x, y\rangle$.
        rhs: $\langle x, A^\top y\rangle$.
        rel_error: $|\mathrm{lhs} - \mathrm{rhs}| / \max(|\mathrm{lhs}|,
            |\mathrm{rhs}|, \mathrm{tiny})$, with tiny the smallest normal float64.
        rtol: the tolerance used.
        passed: whether `rel_error <= rtol` (`False` for non-finite values).
    """

    lhs: float
    rhs: float
    rel_error: float
    rtol: float
    passed: bool

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        return (
            f"Dot-product test {status}: <A x, y> = {self.lhs:.16e}, "
            f"<x, A^T y> = {self.rhs:.16e}, relative error {self.rel_error:.3e} "
            f"(rtol {self.rtol:.1e})"
        )


def _dot_result(lhs: float, rhs: float, rtol: float) -> DotResult:
    # Python floats: inf and nan propagate without raising (and never pass).
    tiny = float(np.finfo(np.float64).tiny)
    rel_error = abs(lhs - rhs) / max(abs(lhs), abs(rhs), tiny)
    return DotResult(
        lhs=lhs,
        rhs=rhs,
        rel_error=float(rel_error),
        rtol=float(rtol),
        passed=bool(rel_error <= rtol),
    )


def dot_test(
    forward: Callable[[PyTree], PyTree],
    adjoint: Callable[[PyTree], PyTree] | None,
    x: PyTree,
    y: PyTree | None = None,
    *,
    key: PRNGKeyArray | None = None,
    rtol: float = 1e-12,
) -> DotResult:
    r"""Dot-product test of a linear operator against its adjoint.

    For a linear map $A: X \to Y$ and its adjoint $A^\top$ with respect to the
    Euclidean inner products ([`tree_dot`][dphys.testing.tree_dot]),

    $$\langle A x, y\rangle_Y = \langle x, A^\top y\rangle_X
    \quad\text{for all } x \in X,\ y \in Y.$$

    Both sides are evaluated for standard-normal $x$ and $y$ drawn from `key`; a
    wrong adjoint makes them differ at $O(1)$ relative level, round-off only at
    $O(\varepsilon_\mathrm{mach})$. The arguments `x` and `y` only supply the
    structure, shapes and dtypes: their values are never used, because a special
    example such as `jnp.zeros(n)` would make the test pass trivially.

    The default `rtol=1e-12` suits float64; for float32 operators pass about
    `rtol=1e-5`.

    Args:
        forward: the linear map $x \mapsto A x$, pytree to pytree.
        adjoint: the map $y \mapsto A^\top y$ to verify, or `None` to derive it with
            `jax.linear_transpose(forward, x)` (which checks that `forward` is
            linear and traceable).
        x: example input: a pytree of floating-point arrays or
            `jax.ShapeDtypeStruct`s.
        y: example output, same kinds of leaves. Default:
            `jax.eval_shape(forward, x)`.
        key: PRNG key for the random vectors. Default: `jax.random.key(0)`.
        rtol: tolerance on the relative error.

    Returns:
        A [`DotResult`][dphys.testing.DotResult].

    Raises:
        ValueError: if `forward` or `adjoint` returns a pytree whose structure or
            leaf shapes differ from `y` or `x`.
        TypeError: if a leaf is not floating point.

    Example:
        >>> import jax
        >>> import jax.numpy as jnp
        >>> import dphys.testing as dt
        >>> A = jax.random.normal(jax.random.key(1), (5, 3), jnp.float64)
        >>> x = jnp.zeros(3, jnp.float64)
        >>> dt.dot_test(lambda v: A @ v, lambda w: A.T @ w, x).passed
        True
        >>> dt.dot_test(lambda v: A @ v, None, x).passed
        True
        >>> dt.dot_test(lambda v: A @ v, lambda w: 2.0 * A.T @ w, x).passed
        False
    """
    x = _to_arrays(x)
    _check_floating(x, "x")
    y_like = jax.eval_shape(forward, x) if y is None else _to_arrays(y)
    _check_floating(y_like, "y")
    if adjoint is None:
        transpose = jax.linear_transpose(forward, x)
        adjoint = lambda cotangent: transpose(cotangent)[0]
    key_x, key_y = jr.split(jr.key(0) if key is None else key)
    x_rand = tree_random_like(key_x, x)
    y_rand = tree_random_like(key_y, y_like)
    ax = forward(x_rand)
    _check_same_structure(y_rand, ax, "y", "forward(x)", what="must return")
    aty = adjoint(y_rand)
    _check_same_structure(x_rand, aty, "x", "adjoint(y)", what="must return")
    return _dot_result(float(tree_dot(ax, y_rand)), float(tree_dot(x_rand, aty)), rtol)


def dot_test_vjp(
    f: Callable[[PyTree], PyTree],
    x: PyTree,
    *,
    key: PRNGKeyArray | None = None,
    rtol: float = 1e-12,
) -> DotResult:
    r"""Dot-product test of the tangent and adjoint linear models of `f` at `x`.

    With $J = \partial f / \partial x$ at `x`, checks

    $$\langle J\,\delta x, \delta y\rangle = \langle \delta x, J^\top \delta y\rangle$$

    for standard-normal $\delta x$, $\delta y$, where $J\delta x$ comes from
    `jax.jvp` and $J^\top\delta y$ from `jax.vjp`. This catches inconsistent
    `custom_jvp` rules, and wrong linearisations inside solvers whose forward and
    reverse modes are implemented separately. (Functions with a `jax.custom_vjp`
    cannot be pushed through `jax.jvp`; for those, call
    [`dot_test`][dphys.testing.dot_test] with a reference tangent model as
    `forward` and the custom adjoint as `adjoint`.)

    Args:
        f: differentiable map from a pytree shaped like `x` to any pytree of floating
            point arrays.
        x: the linearisation point (its values are used).
        key: PRNG key for $\delta x$, $\delta y$. Default: `jax.random.key(0)`.
        rtol: tolerance on the relative error (float64 default).

    Returns:
        A [`DotResult`][dphys.testing.DotResult].

    Raises:
        TypeError: if a leaf of `x` or of `f(x)` is not floating point.

    Example:
        >>> import jax.numpy as jnp
        >>> import dphys.testing as dt
        >>> f = lambda x: {"s": jnp.sin(x) * x[::-1], "n": jnp.sum(x**3)}
        >>> dt.dot_test_vjp(f, jnp.linspace(0.0, 1.0, 5, dtype=jnp.float64)).passed
        True
    """
    x = _to_arrays(x)
    _check_floating(x, "x")
    key_x, key_y = jr.split(jr.key(0) if key is None else key)
    dx = tree_random_like(key_x, x)
    _, jdx = jax.jvp(f, (x,), (dx,))
    y, vjp_fn = jax.vjp(f, x)
    _check_floating(y, "f(x)")
    dy = tree_random_like(key_y, y)
    (jtdy,) = vjp_fn(dy)
    return _dot_result(float(tree_dot(jdx, dy)), float(tree_dot(dx, jtdy)), rtol)


# --------------------------------------------------------------------------------------
# Finite differences
# --------------------------------------------------------------------------------------


class FDResult(eqx.Module):
    r"""Outcome of [`fd_check`][dphys.testing.fd_check].

    Attributes:
        fd: the central difference $(f(x+\epsilon h) - f(x-\epsilon h)) /
            (2\epsilon)$.
        ad: the directional derivative $\langle g, h\rangle$ being checked.
        rel_error: $|\mathrm{fd} - \mathrm{ad}| / \max(|\mathrm{fd}|,
            |\mathrm{ad}|, \mathrm{tiny})$.
        eps: the step used.
        rtol: the relative tolerance used.
        noise: the round-off floor of `fd`,
            $10^3\varepsilon_\mathrm{mach}\max|f(x\pm\epsilon h)| / \epsilon$.
        passed: whether $|\mathrm{fd} - \mathrm{ad}| \le
            \mathrm{rtol}\max(|\mathrm{fd}|, |\mathrm{ad}|) + \mathrm{noise}$.
    """

    fd: float
    ad: float
    rel_error: float
    eps: float
    rtol: float
    noise: float
    passed: bool

    def __str__(self) -> str:
        status = "PASSED" if self.passed else "FAILED"
        return (
            f"Finite-difference check {status}: fd = {self.fd:.12e}, "
            f"<g, h> = {self.ad:.12e}, relative error {self.rel_error:.3e} "
            f"(rtol {self.rtol:.1e}, eps {self.eps:.3e}, noise {self.noise:.1e})"
        )


def fd_check(
    f: Callable[[PyTree], Any],
    x: PyTree,
    *,
    grad: PyTree | None = None,
    direction: PyTree | None = None,
    key: PRNGKeyArray | None = None,
    eps: float | None = None,
    rtol: float | None = None,
) -> FDResult:
    r"""Compare a directional derivative with a central finite difference.

    $$\frac{f(x+\epsilon h) - f(x-\epsilon h)}{2\epsilon}
    = \langle g, h\rangle + \frac{\epsilon^2}{6} f'''(x)[h,h,h] + O(\epsilon^4).$$

    **Step.** The total error is truncation $\sim\epsilon^2$ plus round-off
    $\sim\varepsilon_\mathrm{mach}|f|/\epsilon$, which is smallest at
    $\epsilon \sim \varepsilon_\mathrm{mach}^{1/3}$, with an error
    $\sim\varepsilon_\mathrm{mach}^{2/3}$ ($\approx 4\cdot10^{-11}$ in float64).
    The familiar $\sqrt{\varepsilon_\mathrm{mach}}$ is optimal only for one-sided
    differences, whose truncation error is $O(\epsilon)$; used here it would leave
    a round-off error of $\sqrt{\varepsilon_\mathrm{mach}}\approx10^{-8}$. So by
    default $\epsilon = \varepsilon_\mathrm{mach}^{1/3}\,\min_\ell
    \mathrm{rms}(x_\ell) / \mathrm{rms}(h_\ell)$ over the leaves where $h \ne 0$
    (with $\mathrm{rms}(x_\ell)$ replaced by 1 where $x_\ell = 0$): no leaf of $x$ is
    perturbed by more than $\varepsilon_\mathrm{mach}^{1/3}$ relative to its size.

    **Tolerance.** Default `rtol` $= 10\sqrt{\varepsilon_\mathrm{mach}}$
    ($1.5\cdot10^{-7}$ in float64, $3.5\cdot10^{-3}$ in float32), well above the
    ideal error to leave room for badly scaled functions. The comparison also allows
    for the round-off floor of the quotient,
    $10^3\varepsilon_\mathrm{mach}\max|f(x\pm\epsilon h)|/\epsilon$, so that a zero
    derivative (e.g. at a minimum) is not failed for noise. Use
    [`taylor_test`][dphys.testing.taylor_test] for a sharper, scale-free check.

    The direction is drawn as in `taylor_test` unless given. Nothing is raised
    when the check fails: read `passed`.

    Args:
        f: function from a pytree shaped like `x` to a real scalar.
        x: the point, a pytree of floating-point arrays.
        grad: the gradient to check. Default: `jax.grad(f)(x)`.
        direction: the direction $h$. Default: random, scaled like `x`.
        key: PRNG key for the direction. Default: `jax.random.key(0)`.
        eps: the step. Default: see above.
        rtol: relative tolerance. Default: see above.

    Returns:
        An [`FDResult`][dphys.testing.FDResult].

    Raises:
        ValueError: if `f` is not scalar-valued, `grad`/`direction` do not match the
            structure of `x`, the direction is zero or `eps` is not positive.
        TypeError: if a leaf is not floating point.

    Example:
        >>> import jax.numpy as jnp
        >>> import dphys.testing as dt
        >>> f = lambda x: jnp.sum(jnp.cos(x) * x)
        >>> x = jnp.linspace(0.0, 2.0, 6, dtype=jnp.float64)
        >>> dt.fd_check(f, x).passed
        True
        >>> dt.fd_check(f, x, grad=1.01 * jnp.sin(x)).passed
        False
    """
    if eps is not None and not (0.0 < eps < math.inf):
        raise ValueError(f"`eps` must be positive and finite; got {eps}.")
    x, _, grad, h, eps_mach, unit_step = _prepare(f, x, grad, direction, key)
    eps = eps_mach ** (1.0 / 3.0) * unit_step if eps is None else float(eps)
    rtol = 10.0 * math.sqrt(eps_mach) if rtol is None else float(rtol)
    f_plus = float(f(_step(x, eps, h)))
    f_minus = float(f(_step(x, -eps, h)))
    ad = float(tree_dot(grad, h))
    tiny = float(np.finfo(np.float64).tiny)
    # Python floats: inf and nan propagate without raising (and never pass).
    fd = (f_plus - f_minus) / (2.0 * eps)
    noise = _ROUNDOFF_FACTOR * eps_mach * max(abs(f_plus), abs(f_minus)) / eps
    error = abs(fd - ad)
    scale = max(abs(fd), abs(ad))
    rel_error = error / max(scale, tiny)
    passed = error <= rtol * scale + noise
    return FDResult(
        fd=fd,
        ad=ad,
        rel_error=float(rel_error),
        eps=eps,
        rtol=rtol,
        noise=float(noise),
        passed=bool(passed),
    )
