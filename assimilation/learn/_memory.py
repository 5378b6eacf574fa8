r"""Predicted memory of a compiled function, before running it.

XLA plans every buffer of a compiled program ahead of time, so the device memory a
call needs is known after compilation and before execution:

$$ M = M_\text{arguments} + M_\text{outputs} + M_\text{temporaries}
       - M_\text{aliased}, $$

the last term removing output buffers that reuse a donated argument. These are the
sizes :meth:`jax.stages.Compiled.memory_analysis` reports; nothing is executed, so a
configuration that would not fit can be refused before it runs (e.g. a full unroll of
many iterations against a user's budget) and a benchmark can record the memory of a
training step without measuring the process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax


def _is_dynamic(x) -> bool:
    return isinstance(x, jax.ShapeDtypeStruct) or eqx.is_array(x)


def _compile(fn: Callable, args, kwargs):
    if not callable(fn):
        raise TypeError(f"`fn` must be callable, got {type(fn).__name__}.")
    dynamic, static = eqx.partition((args, kwargs), _is_dynamic)

    def call(dynamic):
        a, k = eqx.combine(dynamic, static)
        # Only the array leaves of the result are outputs of the program (as with
        # `eqx.filter_jit`): a model holding a lineax FunctionLinearOperator over
        # the physics also carries its closure-converted jaxpr, which is no JAX
        # type and takes no device memory.
        return eqx.filter(fn(*a, **k), eqx.is_array)

    return jax.jit(call).lower(dynamic).compile()


def memory_breakdown(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, int]:
    """The compiled memory of ``fn(*args, **kwargs)`` in bytes, part by part.

    ``fn`` is compiled (not run) with :func:`jax.jit`; array leaves of the arguments
    are traced and every other leaf is static, and only the array leaves of the
    result are outputs, as with :func:`equinox.filter_jit` (so ``fn`` may return
    a model holding functions, e.g. a ``lineax.FunctionLinearOperator``).
    Array leaves may be :class:`jax.ShapeDtypeStruct`, so nothing is allocated.

    Returns:
        ``{"argument", "output", "temp", "alias", "total"}`` with
        ``total = argument + output + temp - alias`` (bytes).

    Raises:
        RuntimeError: if the backend does not report a memory analysis.
    """
    stats = _compile(fn, args, kwargs).memory_analysis()
    if stats is None:
        raise RuntimeError(
            f"The {jax.default_backend()!r} backend gives no compiled memory analysis, "
            "so memory cannot be predicted here."
        )
    out = {
        "argument": int(stats.argument_size_in_bytes),
        "output": int(stats.output_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "alias": int(stats.alias_size_in_bytes),
    }
    out["total"] = out["argument"] + out["output"] + out["temp"] - out["alias"]
    return out


def predict_memory(fn: Callable, *args: Any, **kwargs: Any) -> int:
    r"""Bytes of device memory one call of ``fn(*args, **kwargs)`` needs.

    $M = M_\text{arg} + M_\text{out} + M_\text{temp} - M_\text{alias}$ from XLA's
    buffer assignment of the compiled program (see :func:`memory_breakdown`). The
    call is compiled, never executed.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> x = jax.ShapeDtypeStruct((1000,), jnp.float32)
        >>> predict_memory(lambda x: jnp.cumsum(x), x) >= 8000
        True
    """
    return memory_breakdown(fn, *args, **kwargs)["total"]


class MemoryBudgetError(ValueError):
    """A compiled function would need more memory than the budget allows."""


def check_memory_budget(
    fn: Callable, *args: Any, budget_bytes: int, what: str = "this call", **kwargs
) -> int:
    """Raise :class:`MemoryBudgetError` if ``fn(*args, **kwargs)`` needs > budget.

    Args:
        fn, args, kwargs: the call, as for :func:`predict_memory`.
        budget_bytes: the largest acceptable :func:`predict_memory`, in bytes (> 0).
        what: how the error message names the call (e.g. ``"a full unroll of K=400
            iterations"``).

    Returns:
        The predicted bytes (at most ``budget_bytes``).
    """
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int | float):
        raise TypeError(
            "`budget_bytes` must be a number of bytes, got "
            f"{type(budget_bytes).__name__}."
        )
    if not budget_bytes > 0:
        raise ValueError(f"`budget_bytes` must be > 0, got {budget_bytes!r}.")
    need = predict_memory(fn, *args, **kwargs)
    if need > budget_bytes:
        raise MemoryBudgetError(
            f"{what} needs {need / 2**20:.1f} MiB of device memory (compiled memory "
            f"analysis) but `budget_bytes` allows {budget_bytes / 2**20:.1f} MiB; "
            "raise "
            "the budget or choose a cheaper configuration (e.g. a checkpointed, "
            "truncated or implicit gradient mode, or a smaller batch)."
        )
    return need
