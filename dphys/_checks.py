"""Argument checks shared by the steppers, adjoints and :func:`dphys.simulate`.

Static options (fields marked ``static=True``, loop lengths, flags that decide what is
traced) must be concrete Python values: each helper names the argument, shows what it
received and says how to fix it, and turns a traced value into a ``TypeError`` that
explains why it cannot be traced instead of JAX's generic concretisation error.
"""

from __future__ import annotations

import math
import numbers

import jax
import numpy as np


def describe(value) -> str:
    """Short description of a received value for error messages."""
    if isinstance(value, jax.core.Tracer):
        return f"a traced array of shape {value.shape} and dtype {value.dtype}"
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) > 0:
        return f"an array of shape {np.shape(value)}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _static_error(name: str, value, what: str, why: str) -> TypeError:
    return TypeError(
        f"`{name}` must be {what}, got {describe(value)}. It is static ({why}), so it "
        "cannot be a traced value: pass a Python number, not an argument of a "
        "jitted/vmapped/differentiated function."
    )


def static_real(name: str, value, *, why: str = "fixed when the step is traced"):
    """``value`` as a finite Python float, or a ``TypeError``/``ValueError``."""
    if isinstance(value, jax.core.Tracer):
        raise _static_error(name, value, "a real number", why)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {describe(value)}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value!r}.")
    return value


def static_int(name: str, value, *, why: str = "it fixes a loop length"):
    """``value`` as a Python int, or a ``TypeError``."""
    if isinstance(value, jax.core.Tracer):
        raise _static_error(name, value, "an integer", why)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        if np.issubdtype(np.asarray(value).dtype, np.integer):
            value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {describe(value)}.")
    return int(value)


def static_bool(name: str, value, *, why: str, fix: str = ""):
    """``value`` as a Python bool (``bool`` or ``numpy.bool_`` only), or a TypeError.

    Truthiness is not accepted: ``"False"`` would silently mean ``True``.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a Python bool, got {describe(value)}. It is static "
            f"({why}), so it cannot be a traced value.{fix}"
        )
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(
            f"`{name}` must be a Python bool (True or False), got {describe(value)}."
            f"{fix}"
        )
    return bool(value)


# ------------------------------------------------------------------ values of arrays
#
# One helper per kind of check, each with one rule: parameters and options checked
# before tracing say what they must be, show what was received and how to fix it.
# Traced values cannot be inspected and pass through; run-time failures are caught
# by `dphys.simulate` (non-finite states) or by `eqx.error_if` where they matter.


def check_positive(
    value, name: str, *, allow_zero: bool = False, fix: str | None = None
) -> None:
    """Raise ``ValueError`` naming ``name`` unless a concrete ``value`` is positive
    (or non-negative with ``allow_zero=True``) and finite everywhere.

    Traced values (inside ``jit``/``grad``) cannot be inspected and pass through;
    :func:`dphys.simulate` still catches the divergence they cause.

    Args:
        value: a scalar or array (NumPy or JAX).
        name: the argument's name, shown in backticks.
        allow_zero: accept zeros (e.g. a drag coefficient).
        fix: what to do about it, appended to the message; the default suggests a
            positive value and the ``exp(log_value)`` parameterisation used to
            optimise a positive parameter.
    """
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    bad = ~np.isfinite(arr) | ((arr < 0) if allow_zero else (arr <= 0))
    if np.any(bad):
        what = "non-negative" if allow_zero else "positive"
        where = f" ({int(bad.sum())} of {arr.size} values)" if arr.ndim else ""
        if fix is None:
            fix = (
                f"Pass a {what} value; to optimise it unconstrained, parameterise it "
                "as exp(log_value)."
            )
        raise ValueError(
            f"`{name}` must be {what} and finite everywhere, got min "
            f"{np.min(arr) if arr.size else arr}{where}. {fix}"
        )


def check_finite(value, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` if a concrete ``value`` has a NaN or an
    infinity (traced values pass through)."""
    if isinstance(value, jax.core.Tracer):
        return
    arr = np.asarray(value)
    bad = ~np.isfinite(arr)
    if np.any(bad):
        got = arr.tolist() if arr.size <= 8 else f"{int(bad.sum())} non-finite values"
        raise ValueError(f"`{name}` must be finite, got {got}.")


def check_increasing(values, name: str, *, why: str = "", fix: str = "") -> None:
    """Raise ``ValueError`` unless the 1-D ``values`` are strictly increasing.

    ``why`` (why the order matters) and ``fix`` are added to the message.
    """
    arr = np.asarray(values)
    if arr.size > 1 and np.any(np.diff(arr) <= 0):
        because = f": {why}" if why else ""
        hint = f" {fix}" if fix else ""
        raise ValueError(
            f"`{name}` must be strictly increasing, got {arr.tolist()[:10]}"
            f"{because}.{hint}"
        )


def check_time(name: str, value, *, positive: bool) -> None:
    """A time or time step: a real scalar; if concrete, finite (and positive for
    ``positive=True``, i.e. a time step).

    Traced values have a static shape and dtype, checked here; their values can
    only be checked at run time (see :func:`dphys.simulate`).
    """
    what = "a positive finite scalar" if positive else "a finite real scalar"
    if isinstance(value, jax.core.Tracer):
        shape, kind = value.shape, value.dtype.kind
    else:
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError):
            arr = np.asarray(None)
        shape, kind = arr.shape, arr.dtype.kind
    if shape != ():
        raise ValueError(
            f"`{name}` must be {what}, got {describe(value)}; to run several values, "
            "`jax.vmap` over a function that calls `simulate`."
        )
    if kind not in "iuf":
        raise ValueError(
            f"`{name}` must be {what}, got {describe(value)}; pass a real number."
        )
    if isinstance(value, jax.core.Tracer):
        return
    v = arr.item()
    if not math.isfinite(v) or (positive and v <= 0):
        fix = "a time step > 0, e.g. dt=0.01" if positive else "a finite time"
        raise ValueError(f"`{name}` must be {what}, got {v!r}; pass {fix}.")
