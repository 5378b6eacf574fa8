r"""Training: a pure init/step state machine and the :func:`fit` loop around it.

Any equinox module is trained with any loss. The objective on a mini-batch
$\mathcal B$ is the mean per-example loss

$$ L(\theta; \mathcal B) = \frac{1}{|\mathcal B|}\sum_{i\in\mathcal B}
   \ell(m_\theta, z_i, k_i), $$

with $m_\theta$ the model whose *trainable* leaves are $\theta$ (the rest frozen),
$z_i$ one example (one assimilation window, say) and $k_i$ a PRNG key of its own.

**Loss convention.** ``loss_fn(model, example, key)`` scores *one* unbatched example
(every array leaf of the dataset without its leading axis) and returns a scalar, or
``(scalar, aux)`` with ``aux`` a dict of scalar diagnostics (averaged like the loss
and recorded in the history). :func:`fit` vmaps it over the batch. With
``batch_loss=True`` it instead receives the whole batch (leading axis kept) and
returns the batch's scalar loss (for losses that couple examples).

**State machine** (optax/diffrax pattern, state never on ``self``):
:func:`init_train` builds a :class:`TrainState`, :func:`train_step` advances it by one
optimizer step, :func:`fit` loops over epochs with seeded shuffling, validation, early
stopping, atomic checkpoints and resumption, and returns a :class:`FitResult`.

**Reproducibility.** Every random choice is derived from the one ``key`` and a
counter: the shuffling of epoch $e$ from ``fold_in(k_shuffle, e)``, the loss keys of
step $s$ from ``fold_in(k_loss, s)``, validation keys from the example index. Two
runs with the same key give bitwise-identical parameters, and a run resumed from a
checkpoint repeats exactly the computations the uninterrupted run would have done.

**Data parallelism.** With several devices the batch axis is sharded over a 1-D
mesh of the devices (:class:`jax.sharding.NamedSharding`, axis ``"batch"``) and the
parameters and optimizer state are replicated; XLA inserts the all-reduce of the
gradient. On one device nothing is sharded.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
import warnings
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._checkpoint import config_hash, load_checkpoint, save_checkpoint
from ._memory import memory_breakdown


# Sub-streams of the root key (fold_in constants): shuffling, training-loss keys,
# validation-loss keys.
_SHUFFLE, _LOSS, _VALIDATION = 0, 1, 2
BATCH_AXIS = "batch"


# ---------------------------------------------------------------------------- state


class TrainState(eqx.Module):
    """Everything that changes during training, as one pytree (checkpointed whole).

    Attributes:
        params: the trainable leaves of the model (``None`` where frozen), as split
            by :func:`equinox.partition` with the ``trainable`` filter.
        frozen: the other leaves of the model (never updated).
        opt_state: the optax optimizer state of ``params``.
        step: number of optimizer steps taken (int array).
        epoch: number of completed epochs (int array).
        key: the root PRNG key (raw ``uint32[2]`` data; constant, see the module
            docstring for how per-step keys are derived from it).
        best_loss: the best monitored loss so far (validation loss, or the epoch's
            mean training loss without validation data); ``inf`` before the first
            epoch.
        best_params: the trainable leaves at ``best_loss``.
        best_epoch: the epoch (1-based) of ``best_loss``, 0 before the first epoch.
        bad_epochs: consecutive epochs without improvement (early-stopping counter).
    """

    params: Any
    frozen: Any
    opt_state: Any
    step: jax.Array
    epoch: jax.Array
    key: jax.Array
    best_loss: jax.Array
    best_params: Any
    best_epoch: jax.Array
    bad_epochs: jax.Array

    @property
    def model(self):
        """The current model (trainable and frozen leaves combined)."""
        return eqx.combine(self.params, self.frozen)

    @property
    def best_model(self):
        """The model at the best monitored loss."""
        return eqx.combine(self.best_params, self.frozen)


def _raw_key(key, name: str = "key"):
    if key is None:
        raise TypeError(
            f"`{name}` is required (keyword-only): pass e.g. "
            f"`{name}=jax.random.key(0)`."
        )
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jr.key_data(key)
    if key.dtype != jnp.uint32 or key.shape != (2,):
        raise ValueError(
            f"`{name}` must be a PRNG key (`jax.random.key(seed)` or "
            f"`jax.random.PRNGKey(seed)`, default threefry implementation), got an "
            f"array of dtype {key.dtype} and shape {key.shape}."
        )
    return key


def _check_optimizer(optimizer) -> None:
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            "`optimizer` must be an optax.GradientTransformation (e.g. "
            f"`optax.adam(1e-3)`), got {type(optimizer).__name__}."
        )


def freeze(model, where: Callable, base: Callable = eqx.is_inexact_array):
    """A ``trainable`` filter that trains every leaf ``base`` selects except ``where``.

    Args:
        model: the model.
        where: ``where(model) -> node or tuple of nodes`` to freeze (as in
            :func:`equinox.tree_at`), e.g. ``lambda m: m.physics.kappa``.
        base: which leaves are trainable otherwise (default: floating arrays).

    Returns:
        A filter-spec pytree for ``init_train(trainable=...)``/``fit(trainable=...)``.

    Example:
        >>> import equinox as eqx, jax
        >>> net = eqx.nn.Linear(2, 1, key=jax.random.key(0))
        >>> spec = freeze(net, lambda m: m.bias)
        >>> params, _ = eqx.partition(net, spec)
        >>> params.bias is None
        True
    """
    spec = jtu.tree_map(base, model)
    return eqx.tree_at(
        where, spec, replace_fn=lambda node: jtu.tree_map(lambda _: False, node)
    )


def init_train(
    model,
    optimizer: optax.GradientTransformation,
    *,
    key,
    trainable=eqx.is_inexact_array,
) -> TrainState:
    """The initial :class:`TrainState` of ``model`` under ``optimizer``.

    Args:
        model: any pytree (usually an :class:`equinox.Module`).
        optimizer: an optax gradient transformation.
        key: the root PRNG key of the run (keyword-only).
        trainable: filter spec of the trainable leaves, as for
            :func:`equinox.partition`: a function ``leaf -> bool`` or a pytree prefix
            of bools/functions (see :func:`freeze`). Default: every floating array.

    Raises:
        TypeError: ``optimizer`` is not an optax transformation, or ``trainable``
            selects a leaf that is not a floating-point array.
        ValueError: ``trainable`` selects no leaf.
    """
    _check_optimizer(optimizer)
    key = _raw_key(key)
    try:
        params, frozen = eqx.partition(model, trainable)
    except Exception as err:
        raise TypeError(
            "`trainable` must be a filter spec for `model` (a function leaf -> bool, "
            f"or a pytree prefix of the model of bools/functions); got {trainable!r}: "
            f"{err}"
        ) from None
    leaves = jtu.tree_leaves(params)
    if not leaves:
        raise ValueError(
            "`trainable` selects no leaf of `model`, so there is nothing to train; the "
            "default trains every floating-point array."
        )
    bad = [type(x).__name__ for x in leaves if not eqx.is_inexact_array(x)]
    if bad:
        raise TypeError(
            "`trainable` selects leaves that are not floating-point arrays "
            f"({sorted(set(bad))}); only floating arrays can be trained. Combine your "
            "filter with `equinox.is_inexact_array`."
        )
    dtype = jnp.result_type(float)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(
        params=params,
        frozen=frozen,
        opt_state=optimizer.init(params),
        step=zero,
        epoch=zero,
        key=key,
        best_loss=jnp.asarray(jnp.inf, dtype),
        best_params=params,
        best_epoch=zero,
        bad_epochs=zero,
    )


# ------------------------------------------------------------------------- the step


def _split_out(out, name: str):
    if isinstance(out, tuple):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise TypeError(
                f"`{name}` must return a scalar loss or `(loss, aux)` with `aux` a "
                "dict "
                f"of scalar diagnostics; got a tuple of length {len(out)}."
            )
        loss, aux = out
    else:
        loss, aux = out, {}
    return loss, aux


def _check_scalar(x, what: str, name: str):
    if jnp.shape(x) != () or not jnp.issubdtype(jnp.result_type(x), jnp.floating):
        raise TypeError(
            f"`{name}` must return a floating-point scalar {what}, got shape "
            f"{jnp.shape(x)} and dtype {jnp.result_type(x)}. Per-example losses "
            "(the default) score one unbatched example; set `batch_loss=True` if the "
            "function takes the whole batch."
        )


def _constrain(tree, mesh: Mesh | None):
    """Shard the leading (batch) axis of every leaf over ``mesh``."""
    if mesh is None:
        return tree
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXIS))
    return jtu.tree_map(lambda x: lax.with_sharding_constraint(x, sharding), tree)


def _batch_objective(params, frozen, batch, key, loss_fn, batch_loss, name="loss_fn"):
    """Mean loss of ``batch`` and mean diagnostics, as a function of ``params``."""
    model = eqx.combine(params, frozen)
    if batch_loss:
        loss, aux = _split_out(loss_fn(model, batch, key), name)
        _check_scalar(loss, "batch loss", name)
        for v in aux.values():
            _check_scalar(v, "diagnostic in `aux`", name)
        return loss, aux
    n = jtu.tree_leaves(batch)[0].shape[0]
    keys = jr.split(key, n)

    def one(example, k):
        loss, aux = _split_out(loss_fn(model, example, k), name)
        _check_scalar(loss, "per-example loss", name)
        for v in aux.values():
            _check_scalar(v, "diagnostic in `aux`", name)
        return loss, aux

    losses, aux = jax.vmap(one)(batch, keys)
    return jnp.mean(losses), jtu.tree_map(jnp.mean, aux)


def _norm(tree):
    leaves = jtu.tree_leaves(tree)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in leaves))


def _step_impl(state: TrainState, batch, loss_fn, optimizer, batch_loss, mesh):
    batch = _constrain(batch, mesh)
    key = jr.fold_in(jr.fold_in(state.key, _LOSS), state.step)
    (loss, aux), grads = eqx.filter_value_and_grad(_batch_objective, has_aux=True)(
        state.params, state.frozen, batch, key, loss_fn, batch_loss
    )
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = eqx.apply_updates(state.params, updates)
    state = dataclasses.replace(
        state, params=params, opt_state=opt_state, step=state.step + 1
    )
    metrics = {"loss": loss, "grad_norm": _norm(grads), **aux}
    return state, metrics


@eqx.filter_jit
def train_step(
    state: TrainState,
    batch,
    *,
    loss_fn: Callable,
    optimizer: optax.GradientTransformation,
    batch_loss: bool = False,
) -> tuple[TrainState, dict]:
    r"""One optimizer step on one mini-batch (jitted, pure).

    $\theta \leftarrow \theta + \mathrm{update}(\nabla_\theta L(\theta;\mathcal B))$
    with $L$ the mean per-example loss (module docstring). The loss keys are
    ``jax.random.split(fold_in(fold_in(state.key, 1), state.step), batch_size)``.

    Args:
        state: the :class:`TrainState`.
        batch: a pytree of arrays with a leading batch axis.
        loss_fn: ``loss_fn(model, example, key)`` (or ``(model, batch, key)`` with
            ``batch_loss=True``), see the module docstring.
        optimizer: the optax transformation the state was built with.
        batch_loss: whether ``loss_fn`` takes the whole batch.

    Returns:
        ``(state, metrics)``: the advanced state and ``{"loss", "grad_norm", **aux}``
        (the batch loss before the update, the gradient's global 2-norm, and the
        mean diagnostics).
    """
    return _step_impl(state, batch, loss_fn, optimizer, batch_loss, None)


@eqx.filter_jit
def _fit_step(
    state, data, perm, b, *, loss_fn, optimizer, batch_loss, batch_size, mesh
):
    idx = lax.dynamic_slice_in_dim(perm, b * batch_size, batch_size)
    batch = jtu.tree_map(lambda x: x[idx], data)
    return _step_impl(state, batch, loss_fn, optimizer, batch_loss, mesh)


@eqx.filter_jit
def _permutation(key, epoch, n: int):
    return jr.permutation(jr.fold_in(jr.fold_in(key, _SHUFFLE), epoch), n)


# ----------------------------------------------------------------------- evaluation


@eqx.filter_jit
def _eval_chunk(params, frozen, data, idx, weight, key, *, loss_fn, batch_loss, mesh):
    """Weighted sums of the per-example losses (and diagnostics) of ``data[idx]``."""
    batch = jtu.tree_map(lambda x: x[idx], data)
    if mesh is not None and idx.shape[0] % mesh.size == 0:
        batch = _constrain(batch, mesh)  # an uneven last chunk stays replicated
    model = eqx.combine(params, frozen)
    if batch_loss:
        loss, aux = _split_out(loss_fn(model, batch, key), "val_loss_fn")
        _check_scalar(loss, "batch loss", "val_loss_fn")
        n = idx.shape[0]
        return loss * n, jtu.tree_map(lambda a: a * n, aux)
    keys = jax.vmap(lambda i: jr.fold_in(key, i))(idx)

    def one(example, k):
        loss, aux = _split_out(loss_fn(model, example, k), "val_loss_fn")
        _check_scalar(loss, "per-example loss", "val_loss_fn")
        return loss, aux

    losses, aux = jax.vmap(one)(batch, keys)
    w = weight.astype(losses.dtype)
    return jnp.sum(w * losses), jtu.tree_map(lambda a: jnp.sum(w * a), aux)


def _evaluate(params, frozen, data, n, loss_fn, *, key, batch_size, batch_loss, mesh):
    total, aux_total = 0.0, None
    if batch_loss:
        chunks = [
            (np.arange(s, min(s + batch_size, n)), None)
            for s in range(0, n, batch_size)
        ]
    else:
        n_chunks = -(-n // batch_size)
        pos = np.arange(n_chunks * batch_size)
        weight = (pos < n).astype(np.float64)
        pos = np.minimum(pos, n - 1)  # padding repeats the last example, weight 0
        chunks = [
            (
                pos[c * batch_size : (c + 1) * batch_size],
                weight[c * batch_size : (c + 1) * batch_size],
            )
            for c in range(n_chunks)
        ]
    for c, (idx, w) in enumerate(chunks):
        k = jr.fold_in(key, c) if batch_loss else key
        w = jnp.ones(len(idx)) if w is None else jnp.asarray(w)
        s, aux = _eval_chunk(
            params,
            frozen,
            data,
            jnp.asarray(idx),
            w,
            k,
            loss_fn=loss_fn,
            batch_loss=batch_loss,
            mesh=mesh,
        )
        total = total + s
        aux_total = aux if aux_total is None else jtu.tree_map(jnp.add, aux_total, aux)
    out = {"loss": float(total) / n}
    out.update({k: float(v) / n for k, v in (aux_total or {}).items()})
    return out


def evaluate(
    model,
    loss_fn: Callable,
    data,
    *,
    key,
    batch_size: int | None = None,
    batch_loss: bool = False,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, float]:
    r"""The mean loss (and mean diagnostics) of ``model`` over a whole dataset.

    $\bar\ell = \frac1N\sum_{i=1}^N \ell(m, z_i, k_i)$, evaluated in chunks of
    ``batch_size`` (the last one padded with weight zero, so every example counts
    once); $k_i$ = ``fold_in(key, i)`` depends on the example's index only, so the
    value does not depend on ``batch_size``. With ``batch_loss=True`` the chunks are
    scored by ``loss_fn`` as batches and averaged with their sizes as weights.

    Returns:
        ``{"loss": float, **mean diagnostics}``.
    """
    data, n = _check_dataset(data, "data")
    batch_size = n if batch_size is None else _check_batch_size(batch_size, n)
    key = _raw_key(key)
    mesh = _mesh(devices, batch_size)
    params, frozen = eqx.partition(model, eqx.is_inexact_array)
    params, frozen, data = _place((params, frozen, data), mesh)
    return _evaluate(
        params,
        frozen,
        data,
        n,
        loss_fn,
        key=key,
        batch_size=batch_size,
        batch_loss=batch_loss,
        mesh=mesh,
    )


# --------------------------------------------------------------- checks, placement


def _check_dataset(data, name: str):
    leaves = jtu.tree_leaves(data)
    if not leaves:
        raise ValueError(f"`{name}` has no array leaves; give a pytree of arrays.")
    bad = [
        type(x).__name__ for x in leaves if not isinstance(x, jax.Array | np.ndarray)
    ]
    if bad:
        raise TypeError(
            f"`{name}` must be a pytree whose leaves are arrays with a leading example "
            f"axis; found leaves of types {sorted(set(bad))}. Keep shared, non-batched "
            "data (grids, sensor positions) in the model or the loss function instead."
        )
    sizes = {int(np.shape(x)[0]) if np.ndim(x) else None for x in leaves}
    if None in sizes or len(sizes) != 1:
        shapes = sorted({tuple(np.shape(x)) for x in leaves})[:6]
        raise ValueError(
            f"Every array of `{name}` must have the same leading (example) axis; got "
            f"shapes {shapes}."
        )
    (n,) = sizes
    if n < 1:
        raise ValueError(f"`{name}` is empty (leading axis of length 0).")
    return jtu.tree_map(jnp.asarray, data), n


def _check_batch_size(batch_size, n: int, name: str = "batch_size") -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"`{name}` must be a positive int, got {batch_size!r}.")
    if not 1 <= batch_size <= n:
        raise ValueError(
            f"`{name}` must lie in [1, {n}] (the number of training examples), got "
            f"{batch_size}."
        )
    return int(batch_size)


def _mesh(devices, batch_size: int) -> Mesh | None:
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` is empty; pass None to use every device.")
    if len(devices) == 1:
        return None
    if batch_size % len(devices):
        raise ValueError(
            f"`batch_size` = {batch_size} is not divisible by the {len(devices)} "
            "devices the batch is sharded over; choose a multiple of the device "
            "count or pass `devices=` with fewer devices."
        )
    return Mesh(np.asarray(devices), (BATCH_AXIS,))


def _place(tree, mesh: Mesh | None, device=None):
    """Replicate the array leaves over ``mesh`` (or put them on ``device``)."""
    if mesh is not None:
        target = NamedSharding(mesh, PartitionSpec())
    elif device is not None:
        target = device
    else:
        return tree
    dynamic, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(dynamic, target), static)


# ---------------------------------------------------------------------------- fit


class FitResult(eqx.Module):
    """What :func:`fit` returns.

    Attributes:
        model: the model after the last step taken.
        best_model: the model at the best monitored loss (validation loss with
            ``val_data``, else the epoch's mean training loss): the one to use.
        state: the final :class:`TrainState`.
        history: per-epoch lists: ``epoch``, ``step``, ``train_loss`` (mean over the
            epoch's steps), ``val_loss`` (NaN without validation), ``time_s``
            (wall time of the epoch), ``grad_norm``, and ``train_<name>`` /
            ``val_<name>`` for every diagnostic of the loss's ``aux``.
        stats: ``train_s`` (wall time of this call's loop, compilation included),
            ``train_s_total`` (all resumed segments together), ``compile_s`` (the
            first step, compilation included), ``steps``, ``epochs``,
            ``steps_per_epoch``, ``n_devices``, ``best_loss``, ``best_epoch``,
            ``resumed_from_step`` (or ``None``), and ``step_memory_bytes`` (the
            compiled memory of one training step, with ``report_memory=True``) and
            ``gradient_check`` (with ``check_gradients=True``).
        result: why training stopped: ``"completed"`` (all epochs/steps),
            ``"early_stopped"`` (``patience`` epochs without improvement),
            ``"stopped_by_callback"`` or ``"non_finite_loss"``.
    """

    model: Any
    best_model: Any
    state: TrainState
    history: dict
    stats: dict
    result: str


RESULT_VALUES = ("completed", "early_stopped", "stopped_by_callback", "non_finite_loss")


def _new_history() -> dict[str, list]:
    return {
        k: []
        for k in ("epoch", "step", "train_loss", "val_loss", "grad_norm", "time_s")
    }


def _append(history: dict, name: str, value, n_before: int) -> None:
    col = history.setdefault(name, [math.nan] * n_before)
    col.append(value)


def _gradient_check(state, batch, loss_fn, batch_loss):
    import dphys.testing

    dtypes = {x.dtype for x in jtu.tree_leaves(state.params)}
    low = [d for d in dtypes if jnp.finfo(d).bits < 64]
    if low:
        warnings.warn(
            "`check_gradients=True` with trainable parameters in "
            f"{sorted(map(str, low))}"
            ": Taylor tests need float64 (round-off swamps the remainder in float32), "
            "so the check is recorded but not enforced. Enable "
            "`jax.config.update('jax_enable_x64', True)` and train in float64 to "
            "check.",
            stacklevel=3,
        )
    key = jr.fold_in(jr.fold_in(state.key, _LOSS), state.step)

    @jax.jit
    def f(params):
        return _batch_objective(params, state.frozen, batch, key, loss_fn, batch_loss)[
            0
        ]

    res = dphys.testing.taylor_test(f, state.params, key=jr.fold_in(state.key, 99))
    if not low and not res.passed:
        raise RuntimeError(
            "`check_gradients=True`: the Taylor test of the batch loss with respect to "
            f"the trainable parameters failed:\n{res}\nThe loss is not differentiable "
            "as written (a stop_gradient, a non-smooth operation, or a wrong custom "
            "derivative)."
        )
    return {"rate": float(res.rate), "passed": bool(res.passed)}


def fit(
    model,
    loss_fn: Callable,
    train_data,
    *,
    optimizer: optax.GradientTransformation,
    key,
    batch_size: int,
    n_epochs: int | None = None,
    n_steps: int | None = None,
    val_data=None,
    val_loss_fn: Callable | None = None,
    patience: int | None = None,
    min_delta: float = 0.0,
    trainable=eqx.is_inexact_array,
    batch_loss: bool = False,
    eval_batch_size: int | None = None,
    checkpoint_dir=None,
    checkpoint_every: int = 1,
    resume: bool = True,
    progress: bool = False,
    callback: Callable[[dict], Any] | None = None,
    devices: Sequence[jax.Device] | None = None,
    check_gradients: bool = False,
    report_memory: bool = False,
) -> FitResult:
    r"""Train ``model`` by minimising the mean of ``loss_fn`` over ``train_data``.

    Each epoch visits ``n // batch_size`` mini-batches of a seeded permutation of the
    ``n`` training examples (the remainder of the permutation is skipped that epoch,
    so every step has the same shape and compiles once), applying one
    :func:`train_step` each. After each epoch the validation loss is computed, the
    best parameters are kept, early stopping is checked, a checkpoint may be
    written and ``callback`` is called.

    Args:
        model: the module to train (any pytree).
        loss_fn: ``loss_fn(model, example, key) -> loss`` or ``(loss, aux)``: the
            loss of ONE unbatched example, vmapped over the batch (``batch_loss=True``:
            of the whole batch); ``aux`` a dict of scalar diagnostics.
        train_data: a pytree of arrays whose leaves share the leading example axis
            (e.g. :class:`assimilation.learn.Windows`).
        optimizer: an optax transformation (wrap it in ``optax.apply_if_finite`` to
            skip non-finite updates).
        key: the root PRNG key (keyword-only): fixes shuffling and loss keys.
        batch_size: examples per step (a multiple of the number of devices).
        n_epochs, n_steps: the length of training; give exactly one. ``n_steps``
            may end mid-epoch (the last epoch is then partial).
        val_data: validation examples (same structure as ``train_data``).
        val_loss_fn: validation loss (default ``loss_fn``), same convention.
        patience: stop after this many epochs without a validation improvement
            larger than ``min_delta`` (needs ``val_data``); ``None`` never stops early.
        min_delta: the smallest decrease of the monitored loss that counts.
        trainable: filter spec of the trained leaves (see :func:`init_train`,
            :func:`freeze`), e.g. to freeze physical parameters.
        batch_loss: ``loss_fn`` takes whole batches.
        eval_batch_size: chunk size of validation (default ``batch_size``).
        checkpoint_dir: directory for atomic checkpoints (``None``: none).
        checkpoint_every: write a checkpoint every this many epochs (and always
            after the last epoch).
        resume: continue from the latest checkpoint in ``checkpoint_dir`` when there
            is one (same configuration required; the saved state, frozen leaves
            included, replaces ``model``, and the loss history continues). With
            ``False`` training starts afresh and overwrites it.
        progress: show a tqdm progress bar over epochs.
        callback: ``callback(info)`` after every epoch (after its checkpoint), with
            ``info`` a dict of ``epoch``, ``step``, ``train_loss``, ``val_loss``,
            ``model``, ``state``; returning ``True`` stops training.
        devices: the devices to shard the batch over (default: all of
            :func:`jax.devices`).
        check_gradients: before training, Taylor-test the gradient of the first
            batch's loss with respect to the trainable leaves (float64; in float32 a
            warning is issued and the check is not enforced).
        report_memory: record the compiled memory of one training step (one extra
            compilation).

    Returns:
        A :class:`FitResult`.

    Raises:
        TypeError, ValueError: bad arguments (named in the message); resuming a
            checkpoint written by a different configuration.
        RuntimeError: ``check_gradients=True`` and the Taylor test fails in float64.

    Example:
        >>> import jax, jax.numpy as jnp, optax, equinox as eqx
        >>> x = jnp.linspace(0.0, 1.0, 32)
        >>> data = {"x": x, "y": 2.0 * x + 1.0}
        >>> loss = lambda m, ex, key: (m(ex["x"][None])[0] - ex["y"]) ** 2
        >>> net = eqx.nn.Linear(1, 1, key=jax.random.key(0))
        >>> res = fit(net, loss, data, optimizer=optax.adam(0.1), key=jax.random.key(1),
        ...           batch_size=8, n_epochs=200)
        >>> round(float(res.best_model.weight[0, 0]), 2), res.result
        (2.0, 'completed')
    """
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable, got {type(loss_fn).__name__}.")
    _check_optimizer(optimizer)
    train_data, n = _check_dataset(train_data, "train_data")
    batch_size = _check_batch_size(batch_size, n)
    if (n_epochs is None) == (n_steps is None):
        raise ValueError(
            "Give exactly one of `n_epochs` and `n_steps` (the length of training); "
            "got "
            f"n_epochs={n_epochs!r}, n_steps={n_steps!r}."
        )
    for name, v in (("n_epochs", n_epochs), ("n_steps", n_steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"`{name}` must be a positive int, got {v!r}.")
    if val_data is not None:
        val_data, n_val = _check_dataset(val_data, "val_data")
        if jtu.tree_structure(val_data) != jtu.tree_structure(train_data):
            raise ValueError(
                "`val_data` must have the same pytree structure as `train_data`."
            )
    else:
        n_val = 0
        if val_loss_fn is not None:
            raise ValueError("`val_loss_fn` was given without `val_data`.")
    if patience is not None:
        if val_data is None:
            raise ValueError(
                "`patience` (early stopping) needs `val_data`: early stopping on the "
                "training loss would stop a converging optimizer, not an overfitting "
                "one."
            )
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(
                f"`patience` must be a positive int or None, got {patience!r}."
            )
    if (
        isinstance(checkpoint_every, bool)
        or not isinstance(checkpoint_every, int)
        or (checkpoint_every < 1)
    ):
        raise ValueError(
            "`checkpoint_every` must be a positive int (epochs), got "
            f"{checkpoint_every!r}."
        )
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable, got {type(callback).__name__}.")
    eval_batch_size = (
        batch_size
        if eval_batch_size is None
        else _check_batch_size(eval_batch_size, max(n_val, 1), "eval_batch_size")
    )
    if val_data is not None:
        eval_batch_size = min(eval_batch_size, n_val)
    val_loss_fn = loss_fn if val_loss_fn is None else val_loss_fn
    mesh = _mesh(devices, batch_size)
    if mesh is not None and val_data is not None and eval_batch_size % mesh.size:
        eval_batch_size = max(mesh.size, eval_batch_size - eval_batch_size % mesh.size)
    device = None if devices is None or mesh is not None else list(devices)[0]
    if device == jax.devices()[0]:
        device = None  # the default device: leave arrays uncommitted

    state = init_train(model, optimizer, key=key, trainable=trainable)
    steps_per_epoch = n // batch_size
    total_steps = n_steps if n_steps is not None else n_epochs * steps_per_epoch
    n_epochs_total = -(-total_steps // steps_per_epoch)
    chash = config_hash(
        state,
        batch_size=batch_size,
        n_train=n,
        n_val=n_val,
        key=np.asarray(state.key).tolist(),
        batch_loss=bool(batch_loss),
    )
    history, previous_s, resumed_from, result = _new_history(), 0.0, None, "completed"
    if checkpoint_dir is not None and resume:
        loaded = load_checkpoint(checkpoint_dir, state)
        if loaded is not None:
            loaded_state, meta = loaded
            if meta.get("config_hash") != chash:
                raise ValueError(
                    f"`checkpoint_dir` {str(checkpoint_dir)!r} holds a checkpoint of a "
                    "different configuration (model/optimizer structure, batch size, "
                    "dataset size or key); pass `resume=False` to overwrite it or use "
                    "another directory."
                )
            state, history = loaded_state, meta["history"]
            previous_s = float(meta.get("train_s_total", 0.0))
            resumed_from = int(meta["step"])
            if meta.get("result") in ("early_stopped", "non_finite_loss"):
                result = meta["result"]
    state = _place(state, mesh, device)
    train_data = _place(train_data, mesh, device)
    if val_data is not None:
        val_data = _place(val_data, mesh, device)
    k_val = jr.fold_in(state.key, _VALIDATION)
    stats: dict[str, Any] = {
        "steps_per_epoch": steps_per_epoch,
        "n_devices": 1 if mesh is None else mesh.size,
        "resumed_from_step": resumed_from,
    }
    step_kw = dict(
        loss_fn=loss_fn,
        optimizer=optimizer,
        batch_loss=bool(batch_loss),
        batch_size=batch_size,
        mesh=mesh,
    )
    if check_gradients:
        first = jtu.tree_map(lambda x: x[:batch_size], train_data)
        stats["gradient_check"] = _gradient_check(state, first, loss_fn, batch_loss)
    if report_memory:
        perm0 = jnp.arange(n)
        stats["step_memory_bytes"] = memory_breakdown(
            lambda s, d, p, b: _fit_step(s, d, p, b, **step_kw),
            state,
            train_data,
            perm0,
            jnp.asarray(0),
        )["total"]

    def save(state, history, elapsed, result):
        save_checkpoint(
            checkpoint_dir,
            state,
            {
                "step": int(state.step),
                "epoch": int(state.epoch),
                "config_hash": chash,
                "history": history,
                "train_s_total": previous_s + elapsed,
                "result": result,
            },
        )

    bar = None
    start_epoch = int(state.epoch)
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=n_epochs_total,
            initial=min(start_epoch, n_epochs_total),
            desc="fit",
            unit="epoch",
        )
    t_start = time.perf_counter()
    compile_s = None
    epoch = start_epoch
    host_step = int(state.step)
    while result == "completed" and epoch < n_epochs_total:
        t_epoch = time.perf_counter()
        perm = _permutation(state.key, jnp.asarray(epoch, jnp.int32), n)
        metrics = []
        for b in range(steps_per_epoch):
            if host_step >= total_steps:
                break
            t0 = time.perf_counter()
            state, m = _fit_step(state, train_data, perm, jnp.asarray(b), **step_kw)
            host_step += 1
            metrics.append(m)
            if compile_s is None:
                jax.block_until_ready(m["loss"])
                compile_s = time.perf_counter() - t0
        metrics = jax.device_get(metrics)
        means = {k: float(np.mean([m[k] for m in metrics])) for k in metrics[0]}
        epoch += 1
        state = dataclasses.replace(state, epoch=jnp.asarray(epoch, jnp.int32))
        val = None
        if val_data is not None:
            val = _evaluate(
                state.params,
                state.frozen,
                val_data,
                n_val,
                val_loss_fn,
                key=k_val,
                batch_size=eval_batch_size,
                batch_loss=bool(batch_loss),
                mesh=mesh,
            )
        monitored = means["loss"] if val is None else val["loss"]
        if monitored < float(state.best_loss) - min_delta:
            state = dataclasses.replace(
                state,
                best_loss=jnp.asarray(monitored, state.best_loss.dtype),
                best_params=state.params,
                best_epoch=jnp.asarray(epoch, jnp.int32),
                bad_epochs=jnp.zeros((), jnp.int32),
            )
        else:
            state = dataclasses.replace(state, bad_epochs=state.bad_epochs + 1)
        n_before = len(history["epoch"])
        history["epoch"].append(epoch)
        history["step"].append(int(state.step))
        history["train_loss"].append(means["loss"])
        history["val_loss"].append(math.nan if val is None else val["loss"])
        history["grad_norm"].append(means["grad_norm"])
        history["time_s"].append(time.perf_counter() - t_epoch)
        for k, v in means.items():
            if k not in ("loss", "grad_norm"):
                _append(history, f"train_{k}", v, n_before)
        for k, v in (val or {}).items():
            if k != "loss":
                _append(history, f"val_{k}", v, n_before)
        if not math.isfinite(means["loss"]):
            result = "non_finite_loss"
        elif patience is not None and int(state.bad_epochs) >= patience:
            result = "early_stopped"
        last = result != "completed" or epoch >= n_epochs_total
        if checkpoint_dir is not None and (last or epoch % checkpoint_every == 0):
            save(state, history, time.perf_counter() - t_start, result)
        if bar is not None:
            post = {"train": f"{means['loss']:.4g}"}
            if val is not None:
                post["val"] = f"{val['loss']:.4g}"
            bar.set_postfix(post)
            bar.update(1)
        if callback is not None:
            stop = callback(
                {
                    "epoch": epoch,
                    "step": int(state.step),
                    "train_loss": means["loss"],
                    "val_loss": None if val is None else val["loss"],
                    "model": state.model,
                    "state": state,
                }
            )
            if stop is True and result == "completed":
                result = "stopped_by_callback"
    if bar is not None:
        bar.close()
    elapsed = time.perf_counter() - t_start
    stats.update(
        train_s=elapsed,
        train_s_total=previous_s + elapsed,
        compile_s=compile_s,
        steps=int(state.step),
        epochs=int(state.epoch),
        best_loss=float(state.best_loss),
        best_epoch=int(state.best_epoch),
    )
    return FitResult(
        model=state.model,
        best_model=state.best_model,
        state=state,
        history=history,
        stats=stats,
        result=result,
    )


# ---------------------------------------------------------------- model selection


class Selection(eqx.Module):
    """What :func:`select_best` returns.

    Attributes:
        best: the label of the candidate with the lowest validation loss.
        val_loss: ``{label: validation loss of that candidate's best model}``.
        results: ``{label: FitResult}``.
    """

    best: Hashable
    val_loss: dict
    results: dict

    @property
    def best_model(self):
        """The best model of the selected candidate."""
        return self.results[self.best].best_model


def select_best(
    models: Mapping[Hashable, Any],
    loss_fn: Callable,
    train_data,
    *,
    val_data,
    key,
    val_loss_fn: Callable | None = None,
    checkpoint_dir=None,
    **fit_kwargs,
) -> Selection:
    r"""Train each candidate and pick the one with the lowest validation loss.

    Depth selection is the main use: ``models = {K: make(K) for K in (1, 2, 3, 5,
    10)}``. Every candidate is trained by :func:`fit` with the same ``key`` (same
    shuffling and loss keys: a like-for-like comparison) and scored by the
    validation loss of its best model, $\arg\min_c \bar\ell_\text{val}(m_c^\star)$.

    Args:
        models: ``{label: model}`` (labels are used in checkpoint sub-directories,
            so keep them short strings or numbers).
        loss_fn, train_data, val_data, key, val_loss_fn: as for :func:`fit`
            (``val_data`` is required).
        checkpoint_dir: if given, each candidate checkpoints (and resumes) in
            ``checkpoint_dir/<label>``.
        **fit_kwargs: passed on to :func:`fit` (``optimizer``, ``batch_size``,
            ``n_epochs``, ``patience``, ...).

    Returns:
        A :class:`Selection`.
    """
    if not isinstance(models, Mapping) or not models:
        raise TypeError(
            "`models` must be a non-empty mapping {label: model}, e.g. "
            "{K: make_assimilator(K) for K in (1, 2, 3)}; got "
            f"{type(models).__name__}."
        )
    if val_data is None:
        raise ValueError("`val_data` is required: candidates are compared on it.")
    results, losses = {}, {}
    for label, m in models.items():
        ckpt = (
            None
            if checkpoint_dir is None
            else pathlib.Path(checkpoint_dir) / str(label)
        )
        res = fit(
            m,
            loss_fn,
            train_data,
            val_data=val_data,
            val_loss_fn=val_loss_fn,
            key=key,
            checkpoint_dir=ckpt,
            **fit_kwargs,
        )
        results[label] = res
        losses[label] = res.stats["best_loss"]
    finite = {k: v for k, v in losses.items() if math.isfinite(v)}
    if not finite:
        raise RuntimeError(
            f"Every candidate has a non-finite validation loss: {losses}; lower the "
            "learning rate or check the loss."
        )
    best = min(finite, key=finite.get)
    return Selection(best=best, val_loss=losses, results=results)
