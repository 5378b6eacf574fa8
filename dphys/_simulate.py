r"""``simulate``: run a model with an implicit stepper, differentiably."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._adjoint import AbstractAdjoint, Checkpointed
from ._checks import check_increasing, check_time, describe, static_bool, static_int
from ._model import AbstractModel
from ._results import RESULTS
from ._stepper import AbstractStepper
from ._tree import all_finite


class SimulationError(RuntimeError):
    """A run failed: unconverged solve, non-finite state or invalid model state."""


class SaveAt(eqx.Module):
    """What :func:`simulate` returns besides the final state.

    Attributes:
        t0: also save the initial state.
        t1: save the final state (as the last entry of ``ys``).
        every: save every ``every`` steps (step indices ``every, 2*every, ...``), a
            positive integer.
        steps: explicit step indices in ``[0, n_steps]`` to save at, strictly
            increasing (the rows of ``ys`` follow increasing step order, so an unsorted
            or repeated list would misalign them with the caller's).
        fn: observation hook ``fn(t, state) -> pytree``; when given, ``ys`` holds
            ``fn`` at the save times instead of full states, so a 4D-Var cost only
            ever stores sensor values, never the trajectory. The hook is data, not
            configuration: an ``eqx.Module`` hook (e.g. an observation operator
            with sensor weights, or a network) has its arrays traced, so calling
            :func:`simulate` again with new values reuses the compiled program and
            ``jax.grad`` differentiates through them. A plain function is static
            and compared by identity: pass the same function object (not a fresh
            ``lambda`` per call) to avoid recompiling.

    Saving at step indices whose greatest common divisor is ``g`` runs the loop as
    ``n_steps / g`` segments of ``g`` steps: the cost does not grow with the number
    of saves, and memory for ``ys`` is ``n_steps / g`` entries.

    Raises:
        TypeError: a flag that is not a bool, non-integer ``every``/``steps``, a
            non-callable ``fn``, or a traced save option (all but ``fn`` are
            static).
        ValueError: ``every < 1``; ``steps`` negative, not strictly increasing or not
            one-dimensional. Indices beyond ``n_steps`` are reported by
            :func:`simulate`.
    """

    t0: bool = eqx.field(static=True, default=False)
    t1: bool = eqx.field(static=True, default=True)
    every: int | None = eqx.field(static=True, default=None)
    steps: tuple[int, ...] | None = eqx.field(static=True, default=None)
    # Not static: a Module hook's arrays are traced data (see the docstring).
    fn: Callable[[Any, Any], Any] | None = None

    def __init__(self, *, t0=False, t1=True, every=None, steps=None, fn=None):
        why = "it decides what is saved"
        self.t0 = static_bool("SaveAt(t0=...)", t0, why=why)
        self.t1 = static_bool("SaveAt(t1=...)", t1, why=why)
        if every is not None:
            every = static_int("SaveAt(every=...)", every, why=why)
            if every < 1:
                raise ValueError(
                    f"`SaveAt(every=...)` must be a positive integer, got {every!r}; "
                    "e.g. every=10 saves steps 10, 20, ..."
                )
        self.every = every
        self.steps = None if steps is None else _check_steps(steps)
        if fn is not None and not callable(fn):
            raise TypeError(
                f"`SaveAt(fn=...)` must be a function `fn(t, state) -> pytree` or "
                f"None, got {describe(fn)}."
            )
        self.fn = fn

    def indices(self, n_steps: int) -> tuple[int, ...]:
        """Sorted unique step indices that are saved."""
        idx = set()
        if self.t0:
            idx.add(0)
        if self.t1:
            idx.add(n_steps)
        if self.every is not None:
            idx.update(range(self.every, n_steps + 1, self.every))
        if self.steps is not None:
            bad = [s for s in self.steps if not 0 <= s <= n_steps]
            if bad:
                raise ValueError(
                    f"`SaveAt(steps=...)` has indices {bad[:5]} outside [0, n_steps="
                    f"{n_steps}]; save indices count steps from t0."
                )
            idx.update(self.steps)
        return tuple(sorted(idx))


def _check_steps(steps) -> tuple[int, ...]:
    name = "`SaveAt(steps=...)`"
    bare = isinstance(steps, (int, np.integer)) or (
        isinstance(steps, np.ndarray) and steps.ndim == 0
    )
    if bare and not isinstance(steps, bool):
        # diffrax users read `steps=10` as "every 10th step"; here it was "only step
        # 10". Refuse the ambiguous spelling and name both meanings.
        raise TypeError(
            f"{name} takes a sequence of step indices, got the bare integer "
            f"{describe(steps)}, which is ambiguous: pass `steps=[{steps}]` to save "
            f"only step {steps}, or `every={steps}` to save every {steps}th step."
        )
    items = steps if isinstance(steps, (list, tuple)) else [steps]
    if any(isinstance(s, jax.core.Tracer) for s in items):
        raise TypeError(
            f"{name} must be concrete integers (they fix the loop's segments), got a "
            "traced value; build the SaveAt outside jit/vmap/grad."
        )
    try:
        arr = np.asarray(steps)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"{name} must be a sequence of integers, got {describe(steps)}."
        ) from err
    if arr.ndim > 1:
        raise ValueError(
            f"{name} must be one-dimensional, got an array of shape {arr.shape}."
        )
    arr = arr.ravel()
    if arr.size and (arr.dtype.kind not in "iu"):
        raise TypeError(
            f"{name} must hold integer step indices, got {arr.tolist()[:5]} (dtype "
            f"{arr.dtype}); convert times to steps, e.g. "
            "`np.round((times - t0) / dt).astype(int)`."
        )
    if np.any(arr < 0):
        raise ValueError(
            f"{name} has negative indices {arr[arr < 0].tolist()[:5]}; save indices "
            "count steps from t0, so they lie in [0, n_steps]."
        )
    check_increasing(
        arr,
        "SaveAt(steps=...)",
        why="the rows of `ys` follow increasing step order, so an unsorted or "
        "repeated list would not line up with them",
        fix="Pass `sorted(set(steps))`.",
    )
    return tuple(int(s) for s in arr)


class Trajectory(eqx.Module):
    """The output of :func:`simulate`.

    Attributes:
        ts: save times, shape ``(n_saves,)``.
        ys: saved states (or ``SaveAt.fn`` outputs), leading axis ``n_saves``; ``None``
            if nothing was saved.
        final: the state after ``n_steps`` steps.
        result: a :class:`RESULTS` code; ``RESULTS.successful`` unless a solve failed
            or the state went bad.
        stats: ``n_steps``; ``first_failed_step`` (-1 if none; the step at whose end
            the failure was detected); ``linear_iterations`` (total Krylov/Newton
            iterations, 0 for direct solvers); ``fast_forward`` (whether exact
            multi-step propagation was used).
    """

    ts: Any
    ys: Any
    final: Any
    result: RESULTS
    stats: dict[str, Any]


def _check_static(
    model, stepper, state0, dt, n_steps, adjoint, saveat, t0, fast_forward, throw
):
    if not isinstance(model, AbstractModel):
        raise TypeError(
            f"`model` must be a dphys.AbstractModel (e.g. pdes.Heat), got "
            f"{type(model).__name__}."
        )
    if not isinstance(stepper, AbstractStepper):
        raise TypeError(
            f"`stepper` must be a dphys.AbstractStepper (e.g. dphys.CrankNicolson()), "
            f"got {type(stepper).__name__}."
        )
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"`adjoint` must be dphys.Checkpointed() or dphys.Unrolled(), got "
            f"{type(adjoint).__name__}."
        )
    if not isinstance(saveat, SaveAt):
        raise TypeError(
            f"`saveat` must be a dphys.SaveAt (e.g. dphys.SaveAt(every=10)), got "
            f"{describe(saveat)}."
        )
    static_bool(
        "throw",
        throw,
        why="it decides at trace time whether a failed run raises",
        fix=" To handle failures yourself (e.g. under vmap), pass throw=False and "
        "inspect `traj.result`.",
    )
    if fast_forward is not None:
        static_bool(
            "fast_forward",
            fast_forward,
            why="it chooses the time loop",
            fix=" Use None (automatic), True or False.",
        )
    if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral):
        raise TypeError(
            f"`n_steps` must be a Python int (it fixes the loop length), got "
            f"{type(n_steps).__name__} {n_steps!r}."
        )
    if n_steps < 0:
        raise ValueError(
            f"`n_steps` must be >= 0, got {n_steps}; it counts steps of size `dt` "
            "from `t0`."
        )
    check_time("dt", dt, positive=True)
    check_time("t0", t0, positive=False)
    for leaf in jtu.tree_leaves(state0):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            # dt and t0 are cast to the state's dtype: an integer state would turn
            # dt = 0.1 into 0 and silently return the initial state.
            raise TypeError(
                f"`state0` must hold real floating-point arrays, got a leaf of dtype "
                f"{dtype}; cast it, e.g. `jnp.asarray(state0, dtype=float)`."
            )
    model.check_state(state0)
    # dt and t0 are cast to the state's dtype: a tiny dt underflows to 0 and a huge
    # t0 overflows to inf in float32.
    dtype = jnp.result_type(*jtu.tree_leaves(state0))
    for name, value, positive in (("dt", dt, True), ("t0", t0, False)):
        if isinstance(value, jax.core.Tracer):
            continue
        with np.errstate(over="ignore", under="ignore"):
            cast = np.asarray(value).astype(dtype)
        if not (np.isfinite(cast) and (cast > 0 or not positive)):
            raise ValueError(
                f"`{name}` = {np.asarray(value).item()!r} becomes {cast.item()!r} in "
                f"the state's dtype {dtype}; change `{name}` or use a float64 state."
            )
    _check_hints(model, t0, state0)
    # The one resolution of the run: a dphys.Auto solver becomes the concrete one
    # here, and init/step/propagate read that (see AbstractStepper.resolve).
    stepper = stepper.resolve(model, state0)
    model.check_run(state0, dt)
    stepper.check_run(model, state0, dt, t0)
    return stepper


def _check_hints(model, t0, state0) -> None:
    """A model whose static hint says "no explicit part / no forcing" must return
    ``None`` there: steppers trust the hints (e.g. to propagate exactly in Fourier
    space), so a wrong one would silently drop a term. Checked by tracing only
    (``jax.eval_shape``), and only for overridden hooks the hint says are empty."""
    checks = (
        ("explicit", "has_explicit", lambda: model.explicit(t0, state0)),
        ("forcing", "has_forcing", lambda: model.forcing(t0)),
    )
    for hook, hint, call in checks:
        if getattr(model, hint):
            continue
        if getattr(type(model), hook) is getattr(AbstractModel, hook):
            continue
        if jax.eval_shape(call) is not None:
            raise ValueError(
                f"`{type(model).__name__}.{hint}` is False but `{hook}(...)` returned "
                f"a term: steppers would drop it. Make `{hint}` return True whenever "
                f"`{hook}` can return something."
            )


@eqx.filter_jit
def _run(model, stepper, state0, t0, dt, n_steps, saveat, adjoint, fast_forward):
    indices = saveat.indices(n_steps)
    positive = [i for i in indices if i > 0] + [n_steps]
    seg = math.gcd(*positive) if n_steps > 0 else 1
    n_seg = n_steps // seg if n_steps > 0 else 0
    observe = saveat.fn if saveat.fn is not None else (lambda t, y: y)

    sstate = stepper.init(model, t0, dt, state0)
    # Only the varying part of the stepper state rides in the loop carry (see
    # AbstractStepper.split_state); the constant part is closed over.
    ss_const, ss_var = stepper.split_state(sstate)
    int_dtype = jnp.asarray(0).dtype

    def record(carry, step_index, res, ok, iters):
        state, ss, result, failed_at, total_iters = carry
        finite, valid = ok
        newly = (result == RESULTS.successful) & (
            (res != RESULTS.successful) | ~(finite & valid)
        )
        bad_state = RESULTS.where(
            finite, RESULTS.invalid_state, RESULTS.nonfinite_state
        )
        res = RESULTS.where(res == RESULTS.successful, bad_state, res)
        result = RESULTS.where(newly, res, result)
        failed_at = jnp.where(newly, step_index, failed_at)
        return result, failed_at, total_iters + iters.astype(int_dtype)

    # A pure linear FFT-diagonal stepper steps by its one-step propagator G_k, built
    # once here (like the fast-forward one): reverse mode then differentiates G_k once
    # per run, not once per step (about 15% off a stepwise P2 gradient).
    prop1 = None
    if not fast_forward and stepper.can_propagate(model, state0):
        prop1 = stepper.propagator(model, t0, dt, state0, sstate, 1)

    def step(carry_k):
        carry, k = carry_k
        state, ss, result, failed_at, total_iters = carry
        t = t0 + k * dt
        if prop1 is not None:
            new = stepper.propagate(model, t, dt, state, sstate, 1, propagator=prop1)
            res, iters = RESULTS.successful, jnp.asarray(0)
        else:
            full = stepper.join_state(ss_const, ss)
            new, full, res, iters = stepper.step(model, t, dt, state, full)
            ss = stepper.split_state(full)[1]
        new, valid = model.validate(new)
        ok = (all_finite(new), valid)
        result, failed_at, total_iters = record(carry, k + 1, res, ok, iters)
        return ((new, ss, result, failed_at, total_iters), k + 1), None

    def segment(carry_k):
        carry, k = carry_k
        if fast_forward:
            state, ss, result, failed_at, total_iters = carry
            t = t0 + k * dt
            new = stepper.propagate(model, t, dt, state, sstate, seg, propagator=prop)
            new, valid = model.validate(new)
            ok = (all_finite(new), valid)
            result, failed_at, total_iters = record(
                carry, k + seg, RESULTS.successful, ok, jnp.asarray(0)
            )
            carry_k = ((new, ss, result, failed_at, total_iters), k + seg)
        else:
            carry_k, _ = adjoint.loop(step, carry_k, seg)
        carry, k = carry_k
        return carry_k, observe(t0 + k * dt, carry[0])

    init = (
        (state0, ss_var, RESULTS.successful, jnp.asarray(-1), jnp.asarray(0)),
        jnp.asarray(0),
    )
    # The segment propagator (G^seg per mode) is loop-invariant: built here, its
    # derivative is taken once per run, not once per segment.
    prop = None
    if fast_forward:
        prop = stepper.propagator(model, t0, dt, state0, sstate, seg)
    if n_seg > 0 and fast_forward:
        (carry, _), seg_ys = adjoint.loop(segment, init, n_seg)
    elif n_seg > 0:
        # Steps and segments share one checkpointing hierarchy, so each step is
        # recomputed levels-1 times, not twice that (see `segmented_scan`).
        (carry, _), seg_ys = adjoint.segments(
            step, lambda ck: observe(t0 + ck[1] * dt, ck[0][0]), init, n_seg, seg
        )
    else:
        (carry, _), seg_ys = init, None
    final, _, result, failed_at, total_iters = carry

    ys = None
    if indices:
        parts = []
        if indices[0] == 0:
            parts.append(jtu.tree_map(lambda v: v[None], observe(t0, state0)))
        rows = np.asarray([i // seg - 1 for i in indices if i > 0], dtype=np.int32)
        if rows.size:
            parts.append(jtu.tree_map(lambda v: v[rows], seg_ys))
        ys = (
            parts[0]
            if len(parts) == 1
            else jtu.tree_map(lambda a, b: jnp.concatenate([a, b]), *parts)
        )
    ts = t0 + jnp.asarray(indices, dtype=jnp.result_type(dt)) * dt
    stats = {
        "n_steps": n_steps,
        "first_failed_step": failed_at,
        "linear_iterations": total_iters,
        "fast_forward": fast_forward,
    }
    return Trajectory(ts=ts, ys=ys, final=final, result=result, stats=stats)


def simulate(
    model: AbstractModel,
    stepper: AbstractStepper,
    state0,
    *,
    dt,
    n_steps: int,
    t0=0.0,
    saveat: SaveAt = SaveAt(),
    adjoint: AbstractAdjoint = Checkpointed(),
    fast_forward: bool | None = None,
    throw: bool = True,
) -> Trajectory:
    r"""Integrate ``model`` from ``state0`` for ``n_steps`` steps of size ``dt``.

    Advances $du/dt = L(t)u + N(t,u) + f(t)$ with ``stepper`` and returns the states
    (or observation-hook outputs) at the times chosen by ``saveat``. Differentiable
    with ``jax.grad``/``jax.jvp`` with respect to ``state0``, every array in
    ``model`` (physical parameters) and ``dt``; composes with ``jax.jit`` and
    ``jax.vmap``. Each implicit solve is differentiated by one transposed solve; the
    time loop by ``adjoint`` (default: two-level checkpointing, memory
    $O(\sqrt{n})$).

    Args:
        model: the PDE model (e.g. ``pdes.Heat``).
        stepper: e.g. ``dphys.CrankNicolson()``, ``dphys.BDF2(solver=dphys.Krylov())``.
        state0: initial state, a pytree matching the model's grid.
        dt: time step (model time units), a positive finite scalar; may be traced
            (then checked at run time, see Raises).
        n_steps: number of steps (static Python int >= 0).
        t0: initial time, a finite scalar; may be traced like ``dt``.
        saveat: what to save (:class:`SaveAt`).
        adjoint: :class:`Checkpointed` (default) or :class:`Unrolled`.
        fast_forward: apply the exact multi-step propagator between saves when the
            scheme allows it (autonomous linear model, FFT solver, no explicit part or
            forcing): the same discrete answer to round-off, at one FFT pair per
            saved segment instead of one per step. ``None`` (default) uses it when
            possible; ``False`` always steps.
        throw: raise :class:`SimulationError` if the run fails. With ``False`` the
            failure is only recorded in ``result``/``stats`` (use inside ``vmap``).
            A Python bool (it decides at trace time whether to raise).

    Returns:
        A :class:`Trajectory`.

    Raises:
        TypeError, ValueError: bad arguments (checked before tracing): wrong types,
            a non-bool ``throw``/``fast_forward``, a non-scalar ``dt``/``t0``, concrete
            ``dt <= 0`` or non-finite ``dt``/``t0``, save indices outside
            ``[0, n_steps]``.
        SimulationError: unconverged solve or non-finite/invalid state, with the step
            index (when called outside ``jit``; inside ``jit`` the error is raised by
            ``equinox`` at run time with the reason only). A traced ``dt`` that is not
            positive and finite, or a traced ``t0`` that is not finite, fails at step
            0 with ``RESULTS.invalid_dt``/``RESULTS.invalid_t0`` (recorded, not
            raised, with ``throw=False``).

    Example:
        >>> import dphys, pdes
        >>> grid = dphys.Grid(64, lengths=1.0, boundary="periodic")
        >>> model = pdes.Heat(grid, kappa=1e-2)
        >>> x, = grid.coords
        >>> traj = dphys.simulate(model, dphys.CrankNicolson(), jnp.sin(2 * jnp.pi * x),
        ...                       dt=0.1, n_steps=10)
        >>> traj.final.shape
        (64,)
    """
    stepper = _check_static(
        model, stepper, state0, dt, n_steps, adjoint, saveat, t0, fast_forward, throw
    )
    # A NumPy integer would reach the jitted loop as a traced array; the loop length
    # must be a static Python int.
    n_steps = int(n_steps)
    saveat.indices(n_steps)  # validates
    can_ff = stepper.can_propagate(model, state0)
    if fast_forward is None:
        fast_forward = can_ff
    elif fast_forward and not can_ff:
        raise ValueError(
            "`fast_forward=True` needs an autonomous linear model with no explicit part "
            "or forcing, solved by `dphys.FFT()` with a θ-method stepper; use "
            "`fast_forward=None` to fall back to stepping."
        )
    dtype = jnp.result_type(*jtu.tree_leaves(state0))
    t0_cast = jnp.asarray(t0, dtype=dtype)
    dt_cast = jnp.asarray(dt, dtype=dtype)
    traj = _run(
        model,
        stepper,
        state0,
        t0_cast,
        dt_cast,
        n_steps,
        saveat,
        adjoint,
        bool(fast_forward),
    )
    traj = _check_traced_times(traj, t0, dt, t0_cast, dt_cast)
    if not throw:
        return traj
    result = traj.result
    if result.is_traced():
        token = result.error_if(traj.final, result != RESULTS.successful)
        return eqx.tree_at(lambda tr: tr.final, traj, token)
    if result != RESULTS.successful:
        step = int(traj.stats["first_failed_step"])
        where = ""
        if not any(isinstance(v, jax.core.Tracer) for v in (t0, dt)):
            where = f" (t = {float(t0 + step * np.asarray(dt)):.6g})"
        message = RESULTS[result]
        if result == RESULTS.invalid_state and model.invalid_state_message:
            message = model.invalid_state_message
        raise SimulationError(
            f"simulate failed at step {step} of {n_steps}{where}: {message}"
        )
    return traj


def _check_traced_times(traj, t0, dt, t0_cast, dt_cast):
    """Record a non-finite traced ``t0`` or non-positive/non-finite traced ``dt``.

    Concrete values were checked before tracing; traced ones can only be checked at
    run time. A bad one is reported as failing at step 0 (before any step), so
    ``throw=True`` raises and ``throw=False`` records it instead of returning NaNs or a
    run backwards in time.
    """
    result, failed_at = traj.result, traj.stats["first_failed_step"]
    checks = []
    if isinstance(t0, jax.core.Tracer):
        checks.append((~jnp.isfinite(t0_cast), RESULTS.invalid_t0))
    if isinstance(dt, jax.core.Tracer):
        checks.append((~(jnp.isfinite(dt_cast) & (dt_cast > 0)), RESULTS.invalid_dt))
    if not checks:
        return traj
    for bad, code in checks:
        result = RESULTS.where(bad, code, result)
        failed_at = jnp.where(bad, 0, failed_at)
    stats = {**traj.stats, "first_failed_step": failed_at}
    return Trajectory(traj.ts, traj.ys, traj.final, result, stats)
