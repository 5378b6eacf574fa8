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
