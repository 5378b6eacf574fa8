r"""Datasets of assimilation windows, and held-out sensor masks.

A learned assimilator is trained on many windows that share the model, the sensors
and the observation times and differ in their truth and noise. :func:`make_windows`
draws them as a twin experiment: for window $i$,

$$ x_0^{(i)} \sim \mathcal N(x_b, B), \qquad
   y^{(i)}_{k,s} = \big(H\,x^{(i)}(t_k)\big)_s + \varepsilon^{(i)}_{k,s},
   \quad \varepsilon^{(i)}_{k,s}\sim\mathcal N(0, \sigma_s^2), $$

with the model run, $H$ and the time interpolation taken from a *template cost*
(so a noise-free record gives a zero observation term at the truth) and $\sigma_s$
the template's observation errors. The result is a :class:`Windows` pytree whose
every leaf has a leading window axis: a dataset for :func:`assimilation.learn.fit`
as it is. The cost of window $i$ is the template with its observation values
swapped (:func:`with_obs`), which works under ``jax.vmap``::

    costs = jax.vmap(lambda y: analyse(with_obs(template, y)))(windows.obs)

Held-out sensors (self-supervised losses): :func:`sensor_splits` and
:func:`sensor_folds` draw which sensors to hide, :func:`hide_sensors` sets them
missing (NaN, which every cost already ignores), :func:`heldout_split` returns the
visible and the held-out records, :func:`mask_cost` a cost blind to the hidden
sensors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np

import dphys

from .._covariance import AbstractCovariance
from .._observation import Observations


class Windows(eqx.Module):
    """A dataset of assimilation windows (every leaf has a leading window axis).

    One window (``windows[i]``, leaves without the window axis) is what a
    per-example loss of :func:`assimilation.learn.fit` receives.

    Attributes:
        obs: noisy observation values, shape ``(n_windows, n_times, n_sensors)``,
            NaN where missing; the template cost's sensors and times.
        clean_obs: the noise-free values $H x(t_k)$ of the truth, same shape.
        truth_x0: the true initial states (the state pytree, leading window axis).
        truth_final: the true states at the end of the window.
        truth_params: the true parameters drawn per window (a pytree with a leading
            window axis), or ``None``.
        truth_states: true states at the model steps ``save_steps`` (leaves
            ``(n_windows, len(save_steps), ...)``), or ``None``.
        save_steps: the model step indices of ``truth_states``, counted from the
            window start (static).
    """

    obs: jax.Array
    clean_obs: jax.Array
    truth_x0: Any
    truth_final: Any
    truth_params: Any = None
    truth_states: Any = None
    save_steps: tuple[int, ...] = eqx.field(static=True, default=())

    @property
    def n_windows(self) -> int:
        """The number of windows (the leading axis; batched datasets only)."""
        return int(self.obs.shape[0])

    def __getitem__(self, index) -> Windows:
        """The windows at ``index`` (an int, a slice or an index array)."""
        return jtu.tree_map(lambda x: x[index], self)

    def states_at(self, step: int):
        """The true states at model step ``step`` (one of ``save_steps``)."""
        if step not in self.save_steps:
            raise ValueError(
                f"`step` = {step} was not saved; the saved steps are "
                f"{self.save_steps}. "
                "Pass it in `make_windows(save_steps=...)`."
            )
        i = self.save_steps.index(step)
        axis = self.obs.ndim - 2  # 1 for a dataset of windows, 0 for one window
        return jtu.tree_map(lambda x: jnp.take(x, i, axis=axis), self.truth_states)


# ---------------------------------------------------------------- template costs


_COST_PARTS = ("model", "stepper", "obs", "obs_op", "sampling", "dt", "n_steps", "t0")


def _check_cost(cost, name: str = "cost") -> None:
    missing = [a for a in _COST_PARTS if not hasattr(cost, a)]
    if missing:
        raise TypeError(
            f"`{name}` must be a window cost such as assimilation.FourDVar (with "
            f"attributes {_COST_PARTS}); a {type(cost).__name__} lacks {missing}."
        )
    if not isinstance(cost.obs, Observations):
        raise TypeError(
            f"`{name}.obs` must be assimilation.Observations, got "
            f"{type(cost.obs).__name__}."
        )


def with_obs(cost, values):
    """``cost`` with its observation values replaced by ``values`` (jit/vmap-safe).

    Args:
        cost: a window cost with an ``obs`` field (e.g. :class:`assimilation.FourDVar`).
        values: ``(n_times, n_sensors)`` values (NaN = missing).

    Returns:
        The same cost (model, sensors, times, covariances) for the new record.
    """
    _check_cost(cost)
    values = jnp.asarray(values)
    if values.shape != cost.obs.values.shape:
        raise ValueError(
            f"`values` must have the template's shape (n_times, n_sensors) = "
            f"{cost.obs.values.shape}, got {values.shape}. To score many windows, vmap "
            "over the window axis: `jax.vmap(lambda y: f(with_obs(cost, y)))(obs)`."
        )
    return eqx.tree_at(
        lambda c: c.obs.values, cost, values.astype(cost.obs.values.dtype)
    )


# --------------------------------------------------------------------- generation


def _is_cov(x) -> bool:
    return isinstance(x, AbstractCovariance)


def _sample_prior(prior, mean, key):
    """A draw from ``prior`` (covariance pytree around ``mean``, or a sampler)."""
    if callable(prior) and not _is_cov(prior):
        return prior(key)
    covs, treedef = jtu.tree_flatten(prior, is_leaf=_is_cov)
    means = treedef.flatten_up_to(mean)
    keys = jr.split(key, len(covs))
    draws = [
        m + c.sample(key=k, dtype=jnp.result_type(m)).astype(jnp.result_type(m))
        for c, m, k in zip(covs, means, keys, strict=True)
    ]
    return jtu.tree_unflatten(treedef, draws)


class _Generator(eqx.Module):
    model: Any
    stepper: Any
    prior: Any
    mean: Any
    obs_op: Any
    sampling: Any
    sigma: jax.Array
    params: Callable | None = eqx.field(static=True)
    apply_params: Callable | None = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    t0: float = eqx.field(static=True)
    n_steps: int = eqx.field(static=True)
    n_run: int = eqx.field(static=True)
    steps: tuple[int, ...] = eqx.field(static=True)
    save_steps: tuple[int, ...] = eqx.field(static=True)
    missing: float = eqx.field(static=True)

    def __call__(self, key):
        k_x0, k_par, k_noise, k_miss = jr.split(key, 4)
        x0 = _sample_prior(self.prior, self.mean, k_x0)
        model, params = self.model, None
        if self.params is not None:
            params = self.params(k_par)
            model = self.apply_params(model, params)
        states = dphys.simulate(
            model,
            self.stepper,
            x0,
            dt=self.dt,
            n_steps=self.n_run,
            t0=self.t0,
            saveat=dphys.SaveAt(t1=False, steps=self.steps),
            adjoint=dphys.Unrolled(),
        ).ys
        rows = lambda wanted: jnp.asarray([self.steps.index(s) for s in wanted])
        obs_rows = rows(self.sampling.steps)
        sensors = jax.vmap(self.obs_op)(jtu.tree_map(lambda s: s[obs_rows], states))
        clean = self.sampling(sensors)
        sigma = self.sigma.astype(clean.dtype)[None, :]  # per sensor, every time
        values = clean + sigma * jr.normal(k_noise, clean.shape, clean.dtype)
        if self.missing > 0:
            values = jnp.where(
                jr.uniform(k_miss, clean.shape) < self.missing, jnp.nan, values
            )
        i_final = self.steps.index(self.n_steps)
        final = jtu.tree_map(lambda s: s[i_final], states)
        saved = None
        if self.save_steps:
            saved = jtu.tree_map(lambda s: s[rows(self.save_steps)], states)
        return values, clean, x0, final, params, saved


@eqx.filter_jit
def _generate_chunk(gen: _Generator, keys):
    return jax.vmap(gen)(keys)


def _generate(gen: _Generator, keys, chunk_size: int):
    # One compiled program per chunk shape, reused for every chunk and every dataset
    # drawn with the same generator (train/validation/test sets of any size); the
    # last chunk is padded (its extra windows are computed and dropped).
    n = keys.shape[0]
    parts = []
    for start in range(0, n, chunk_size):
        chunk = keys[start : start + chunk_size]
        m = chunk.shape[0]
        if m < chunk_size:
            chunk = jnp.concatenate(
                [chunk, jnp.broadcast_to(chunk[:1], (chunk_size - m, *chunk.shape[1:]))]
            )
        out = _generate_chunk(gen, chunk)
        parts.append(jtu.tree_map(lambda x, m=m: x[:m], out))
    if len(parts) == 1:
        return parts[0]
    return jtu.tree_map(lambda *xs: jnp.concatenate(xs), *parts)


def make_windows(
    cost,
    prior,
    *,
    n_windows: int,
    key,
    mean=None,
    truth_model: dphys.AbstractModel | None = None,
    params: Callable[[jax.Array], Any] | None = None,
    apply_params: Callable[[Any, Any], Any] | None = None,
    save_steps: Sequence[int] | str = (),
    missing: float = 0.0,
    chunk_size: int = 64,
) -> Windows:
    r"""Seeded twin windows for a template cost: truths, runs, noisy sensor records.

    For each window, with its own key from ``jax.random.split(key, n_windows)``:
    draw $x_0 \sim$ ``prior``, optionally draw parameters $p$ (``params``) and set
    them in the truth model (``apply_params``), run the truth model over the window
    (and beyond, up to the largest of ``save_steps``), sample it exactly as the
    template cost does (its observation operator and time interpolation) and add
    Gaussian noise with the template's per-sensor $\sigma_s$. Windows are generated
    in vmapped chunks of ``chunk_size`` by one compiled program (reused for every
    chunk and every later call with the same template and options); the result
    depends only on ``key`` (``chunk_size`` changes it by round-off only, through
    the order of batched floating-point operations).

    Args:
        cost: the template cost (e.g. :class:`assimilation.FourDVar`): model,
            stepper, sensors, observation times, $\sigma_s$ and the window (its
            observation values are ignored).
        prior: the distribution of the true initial states: an
            :class:`assimilation.AbstractCovariance` $B$ (then $x_0 = m + B^{1/2}z$,
            $z\sim\mathcal N(0, I)$), a pytree of them for a multi-field state, or a
            function ``prior(key) -> state``.
        n_windows: the number of windows (> 0).
        key: PRNG key (keyword-only).
        mean: the mean $m$ of the prior (default: the template's background
            ``cost.state0``).
        truth_model: the model that makes the truth (default ``cost.model``); e.g. a
            model with terms the template's model lacks.
        params: ``params(key) -> pytree``: per-window true parameters (optional).
        apply_params: ``apply_params(model, params) -> model`` (required with
            ``params``), e.g. ``lambda m, p: eqx.tree_at(lambda m: m.kappa, m, p)``.
        save_steps: model steps (from the window start, may exceed the window for
            forecast truths) at which to keep the full true state, or ``"obs"`` for
            the steps the observations use.
        missing: fraction of values set missing (NaN) at random, in ``[0, 1)``.
        chunk_size: windows generated together (bounds memory).

    Returns:
        A :class:`Windows`.

    Raises:
        TypeError, ValueError: bad arguments (named in the message).
    """
    _check_cost(cost)
    if isinstance(n_windows, bool) or not isinstance(n_windows, int) or n_windows < 1:
        raise ValueError(f"`n_windows` must be a positive int, got {n_windows!r}.")
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size < 1
    ):
        raise ValueError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    if not 0.0 <= float(missing) < 1.0:
        raise ValueError(f"`missing` must lie in [0, 1), got {missing!r}.")
    if key is None:
        raise TypeError("`key` is required: pass e.g. `key=jax.random.key(0)`.")
    if not (_is_cov(prior) or callable(prior)):
        leaves = jtu.tree_leaves(prior, is_leaf=_is_cov)
        if not leaves or not all(_is_cov(c) for c in leaves):
            raise TypeError(
                "`prior` must be an AbstractCovariance (e.g. assimilation.Diffusion), "
                "a "
                "pytree of them (one per state field) or a function `prior(key) -> "
                f"state`; got {type(prior).__name__}."
            )
    if (params is None) != (apply_params is None):
        raise ValueError(
            "`params` and `apply_params` go together: `params(key)` draws the true "
            "parameters and `apply_params(model, params)` sets them in the model."
        )
    mean = cost.state0 if mean is None else mean
    if not callable(prior) or _is_cov(prior):
        treedef = jtu.tree_structure(prior, is_leaf=_is_cov)
        try:
            means = treedef.flatten_up_to(mean)
        except (ValueError, TypeError):
            raise ValueError(
                "`prior` must have one covariance per field of the state (`mean` / "
                "`cost.state0`)."
            ) from None
        for c, m in zip(treedef.flatten_up_to(prior), means, strict=True):
            c.check_shape(m, "prior")
    if save_steps == "obs":
        save_steps = tuple(cost.sampling.steps)
    elif isinstance(save_steps, str):
        raise ValueError(
            f"`save_steps` must be step indices or 'obs', got {save_steps!r}."
        )
    save_steps = tuple(int(s) for s in save_steps)
    if any(s < 0 for s in save_steps) or list(save_steps) != sorted(set(save_steps)):
        raise ValueError(
            "`save_steps` must be non-negative and strictly increasing, got "
            f"{save_steps}."
        )
    n_run = max((cost.n_steps, *save_steps))
    steps = tuple(sorted({*cost.sampling.steps, cost.n_steps, *save_steps}))
    gen = _Generator(
        model=cost.model if truth_model is None else truth_model,
        stepper=cost.stepper,
        prior=prior,
        mean=mean,
        obs_op=cost.obs_op,
        sampling=cost.sampling,
        sigma=cost.obs.sigma,
        params=params,
        apply_params=apply_params,
        dt=float(cost.dt),
        t0=float(cost.t0),
        n_steps=int(cost.n_steps),
        n_run=int(n_run),
        steps=steps,
        save_steps=save_steps,
        missing=float(missing),
    )
    keys = jr.split(key, n_windows)
    values, clean, x0, final, p, saved = _generate(
        gen, keys, min(chunk_size, n_windows)
    )
    return Windows(
        obs=values,
        clean_obs=clean,
        truth_x0=x0,
        truth_final=final,
        truth_params=p,
        truth_states=saved,
        save_steps=save_steps,
    )


# -------------------------------------------------------------------------- splits


def split_dataset(data, sizes: Sequence[int | float], *, key) -> tuple:
    """Split a dataset (leading example axis) into seeded random disjoint parts.

    Args:
        data: a pytree of arrays sharing the leading axis of length ``n``
            (e.g. :class:`Windows`).
        sizes: the parts' sizes: integers with sum at most ``n``, or fractions in
            (0, 1] summing to 1 (the last part takes the rounding remainder).
        key: PRNG key of the permutation (keyword-only).

    Returns:
        A tuple of datasets, one per entry of ``sizes``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> train, val = split_dataset(jnp.arange(10), (8, 2), key=jax.random.key(0))
        >>> train.shape, val.shape
        ((8,), (2,))
    """
    leaves = jtu.tree_leaves(data)
    ns = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if not leaves or None in ns or len(ns) != 1:
        raise ValueError(
            "`data` must be a pytree of arrays sharing a leading (example) axis."
        )
    (n,) = ns
    sizes = list(sizes)
    if not sizes:
        raise ValueError("`sizes` is empty; give e.g. (n_train, n_val, n_test).")
    if all(isinstance(s, int | np.integer) and not isinstance(s, bool) for s in sizes):
        counts = [int(s) for s in sizes]
        if min(counts) < 0 or sum(counts) > n:
            raise ValueError(
                f"`sizes` {counts} must be non-negative and sum to at most {n} (the "
                "number of examples)."
            )
    else:
        fr = np.asarray(sizes, float)
        if np.any(fr <= 0) or np.any(fr > 1) or abs(fr.sum() - 1) > 1e-9:
            raise ValueError(
                f"`sizes` as fractions must lie in (0, 1] and sum to 1, got {sizes}."
            )
        counts = [int(np.floor(f * n)) for f in fr[:-1]]
        counts.append(n - sum(counts))
    perm = np.asarray(jr.permutation(key, n))
    bounds = np.cumsum([0, *counts])
    return tuple(
        jtu.tree_map(lambda x, i=perm[a:b]: x[i], data)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    )


# ------------------------------------------------------------------ held-out sensors


def _n_hidden(n_sensors: int, fraction: float) -> int:
    if isinstance(n_sensors, bool) or not isinstance(n_sensors, int) or n_sensors < 2:
        raise ValueError(
            f"`n_sensors` must be an int >= 2 (some sensors seen, some held out), got "
            f"{n_sensors!r}."
        )
    if not 0.0 < float(fraction) < 1.0:
        raise ValueError(f"`fraction` must lie in (0, 1), got {fraction!r}.")
    k = int(round(float(fraction) * n_sensors))
    return min(max(k, 1), n_sensors - 1)


def sensor_splits(n_sensors: int, *, fraction: float, key, n_splits: int = 1):
    """Random held-out sensor sets: ``(n_splits, n_sensors)`` booleans, True = hidden.

    Each split hides $\\mathrm{round}(f\\,n)$ sensors (at least 1, at most
    $n - 1$) drawn uniformly without replacement, independently per split. Pure and
    jittable (``n_sensors``, ``fraction``, ``n_splits`` are static), so a loss can
    draw new splits from its key at every step.

    Example:
        >>> import jax
        >>> m = sensor_splits(10, fraction=0.3, n_splits=2, key=jax.random.key(0))
        >>> m.shape, m.sum(axis=1).tolist()
        ((2, 10), [3, 3])
    """
    k = _n_hidden(n_sensors, fraction)
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"`n_splits` must be a positive int, got {n_splits!r}.")

    def one(key):
        chosen = jr.permutation(key, n_sensors)[:k]
        return jnp.zeros(n_sensors, bool).at[chosen].set(True)

    return jax.vmap(one)(jr.split(key, n_splits))


def sensor_folds(n_sensors: int, *, n_folds: int, key):
    """A random partition of the sensors into folds, ``(n_folds, n_sensors)`` booleans.

    True = hidden.

    Every sensor is hidden in exactly one fold (fold sizes differ by at most one), so
    averaging a held-out loss over the folds scores every sensor once (K-fold
    cross-validation over sensors).
    """
    if (
        isinstance(n_folds, bool)
        or not isinstance(n_folds, int)
        or not (2 <= n_folds <= n_sensors)
    ):
        raise ValueError(
            f"`n_folds` must be an int in [2, n_sensors={n_sensors}], got {n_folds!r}."
        )
    fold_of = jr.permutation(key, n_sensors) % n_folds
    return fold_of[None, :] == jnp.arange(n_folds)[:, None]


def hide_sensors(values, hidden):
    """``values`` with the hidden sensors' columns set missing (NaN).

    Args:
        values: ``(..., n_sensors)`` observation values.
        hidden: ``(n_sensors,)`` booleans (True = hide), or any shape broadcastable
            to ``values``.
    """
    values = jnp.asarray(values)
    hidden = jnp.asarray(hidden)
    if hidden.dtype != jnp.bool_:
        raise TypeError(f"`hidden` must be a boolean mask, got dtype {hidden.dtype}.")
    try:
        hidden = jnp.broadcast_to(hidden, values.shape)
    except ValueError:
        raise ValueError(
            f"`hidden` of shape {hidden.shape} does not broadcast to `values` of shape "
            f"{values.shape}; give one flag per sensor (the last axis)."
        ) from None
    return jnp.where(hidden, jnp.asarray(jnp.nan, values.dtype), values)


def heldout_split(values, hidden):
    """``(visible, heldout)``: the record with the hidden sensors missing, and the
    record of the hidden sensors only (the others missing)."""
    hidden = jnp.asarray(hidden)
    return hide_sensors(values, hidden), hide_sensors(values, ~hidden)


def mask_cost(cost, hidden):
    """The cost blind to the hidden sensors (their values set missing)."""
    _check_cost(cost)
    return with_obs(cost, hide_sensors(cost.obs.values, hidden))
