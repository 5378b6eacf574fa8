"""The checks of assimilation inputs, each written once with one tolerance.

Observation errors and standard deviations must be positive and finite
(:func:`check_positive`); time axes must be finite and strictly increasing
(:func:`check_time_axis`) and lie in the assimilation window
(:func:`times_in_window`); sensors must lie in the domain (:func:`sensors_in_domain`).
The DA maths (``Observations``, ``Interpolation``, ``TimeInterpolation``,
covariances, parameters) raise ``ValueError``; the file readers of
:mod:`assimilation.io` call the same functions with their own error classes and log
what was corrected. Traced values (inside ``jit``/``vmap``) cannot be inspected and
pass unchecked.
"""

from __future__ import annotations

import jax
import numpy as np

import dphys


# Times and positions within this fraction of the window length / domain length
# outside it are snapped onto its edge rather than refused: values stored as
# float32, or converted between units, miss an edge by a few float32 ulps (6e-8).
EDGE_RTOL = 1e-6


def is_concrete(x) -> bool:
    """Whether ``x`` can be inspected (not a tracer of ``jit``/``vmap``/``grad``)."""
    return not isinstance(x, jax.core.Tracer)


def check_positive(value, name: str, *, fix: str = "", error=ValueError) -> None:
    """Raise ``error`` naming ``name`` unless a concrete ``value`` is positive and
    finite everywhere.

    Args:
        value: a scalar or an array (traced values pass unchecked).
        name: the argument's name, shown in backticks.
        fix: how to fix it, appended to the message.
        error: the exception class (``ValueError`` or a subclass).
    """
    if not is_concrete(value):
        return
    arr = np.asarray(value, dtype=np.float64)
    bad = ~(np.isfinite(arr) & (arr > 0))
    if not np.any(bad):
        return
    if arr.ndim == 0:
        got = f"got {arr.item()!r}"
    else:
        idx = np.flatnonzero(bad.reshape(-1))
        got = (
            f"got {idx.size} of {arr.size} values that are not (entries "
            f"{idx[:5].tolist()}: {arr.reshape(-1)[idx[:5]].tolist()})"
        )
    raise error(
        f"`{name}` must be positive and finite, {got}." + (f" {fix}" if fix else "")
    )


def check_time_axis(
    times,
    name: str,
    *,
    fix_duplicates: str = "merge them into one record",
    fix_order: str = "sort the records by time",
    error=ValueError,
    unit: str = "",
) -> None:
    """Raise ``error`` unless concrete ``times`` are finite and strictly increasing.

    Args:
        times: a 1D array of times (traced values pass unchecked).
        name: the argument's name.
        fix_duplicates, fix_order: how to fix repeated or unsorted times.
        error: the exception class.
        unit: appended to the values in the message (e.g. ``" (model time)"``).
    """
    if not is_concrete(times):
        return
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    finite = np.isfinite(t)
    if not np.all(finite):
        raise error(f"`{name}` has {int(np.sum(~finite))} non-finite time value(s).")
    gaps = np.diff(t)
    if np.any(gaps == 0):
        i = int(np.argmax(gaps == 0))
        raise error(
            f"`{name}` has duplicate times: entries {i} and {i + 1} are both "
            f"{t[i]:.6g}{unit}; {fix_duplicates}."
        )
    if np.any(gaps < 0):
        i = int(np.argmax(gaps < 0))
        raise error(
            f"`{name}` is not increasing: entry {i + 1} ({t[i + 1]:.6g}) comes after "
            f"entry {i} ({t[i]:.6g}){unit}; times must be strictly increasing: "
            f"{fix_order}."
        )


def times_in_window(
    times,
    window: tuple[float, float],
    name: str,
    *,
    outside: str = "error",
    fix: str = "drop them or lengthen the window",
    error=ValueError,
    closed: str = "both",
):
    """Which ``times`` lie in ``window``, with those within round-off of an edge
    snapped onto it.

    ``closed="both"``: the window is $[t_0, t_1]$; ``"right"``: $(t_0, t_1]$, so
    that consecutive windows share no observation (a time on $t_0$ belongs to the
    window before).

    A time within ``EDGE_RTOL`` times the window length (at least ``1e-3`` of the
    window's magnitude, for a window of length zero) outside an edge counts as on it.

    Args:
        times: a 1D array of concrete times.
        window: ``(start, end)`` with ``end >= start``.
        name: the argument's name.
        outside: ``"error"`` (raise for times outside) or ``"drop"``.
        fix: how to fix times outside, appended to the message.
        error: the exception class.
        closed: ``"both"`` or ``"right"`` (see above).

    Returns:
        ``(keep, times, n_snapped)``: a boolean mask of the times inside, the times
        with the snapped ones moved onto the edge, and how many were snapped.
    """
    if outside not in ("error", "drop"):
        raise ValueError(f"`outside` must be 'error' or 'drop', got {outside!r}.")
    if closed not in ("both", "right"):
        raise ValueError(f"`closed` must be 'both' or 'right', got {closed!r}.")
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    t0, t1 = (float(w) for w in window)
    if not t1 >= t0:
        raise ValueError(
            f"`window` must be (start, end) with end >= start, got {window}."
        )
    tol = EDGE_RTOL * max(t1 - t0, 1e-3 * max(abs(t0), abs(t1), 1.0))
    near = ((t < t0) & (t >= t0 - tol)) | ((t > t1) & (t <= t1 + tol))
    t = np.where(near, np.clip(t, t0, t1), t)
    keep = ((t > t0) if closed == "right" else (t >= t0)) & (t <= t1)
    n_out = int(np.sum(~keep))
    if n_out and outside == "error":
        bad = np.flatnonzero(~keep)
        raise error(
            f"`{name}` has {n_out} of {t.size} times outside the assimilation window "
            f"{'(' if closed == 'right' else '['}{t0:.6g}, {t1:.6g}] "
            f"(entries {bad[:5].tolist()} at "
            f"{[float(f'{v:.6g}') for v in t[bad[:5]]]}); {fix}."
        )
    return keep, t, int(np.sum(near))


def sensors_in_domain(
    positions,
    grid: dphys.Grid,
    name: str,
    *,
    labels=None,
    error=ValueError,
    fix: str = "move them inside or drop them",
):
    """Sensor positions in the domain of ``grid``: wrapped along periodic axes,
    snapped onto the edge within round-off along the others, else an error.

    Args:
        positions: ``(n_sensors, grid.ndim)`` concrete coordinates, array-axis order.
        grid: the model grid.
        name: the argument's name (or one name per axis, a sequence).
        labels: sensor labels for the message (default: their indices).
        error: the exception class.
        fix: how to fix sensors outside, appended to the message.

    Returns:
        ``(positions, wrapped, snapped)``: the positions inside the domain and, per
        axis name, how many coordinates were wrapped or snapped (``{name: count}``,
        nonzero counts only).
    """
    pos = np.array(positions, dtype=np.float64)
    if pos.ndim != 2 or pos.shape[1] != grid.ndim:
        raise ValueError(
            f"`{name}` must have shape (n_sensors, {grid.ndim}) for a {grid.ndim}D "
            f"grid (array-axis order), got {pos.shape}."
        )
    names = [name] * grid.ndim if isinstance(name, str) else list(name)
    if not np.all(np.isfinite(pos)):
        bad = np.flatnonzero(~np.all(np.isfinite(pos), axis=1))
        raise error(f"`{names[0]}` must be finite; sensors {bad[:5].tolist()} are not.")
    wrapped, snapped = {}, {}
    for a in range(grid.ndim):
        lo, length = grid.origin[a], grid.lengths[a]
        hi = lo + length
        p = pos[:, a]
        if grid.boundary[a] == "periodic":
            inside = lo + np.mod(p - lo, length)
            n = int(np.sum(~np.isclose(inside, p, rtol=0, atol=1e-12 * length)))
            if n:
                wrapped[names[a]] = n
            pos[:, a] = inside
            continue
        tol = EDGE_RTOL * length
        near = ((p < lo) & (p >= lo - tol)) | ((p > hi) & (p <= hi + tol))
        if np.any(near):
            snapped[names[a]] = int(np.sum(near))
        p = np.where(near, np.clip(p, lo, hi), p)
        bad = np.flatnonzero((p < lo) | (p > hi))
        if bad.size:
            shown = bad[:3] if labels is None else np.asarray(labels)[bad[:3]]
            raise error(
                f"{bad.size} sensor(s) lie outside the {grid.boundary[a]} domain "
                f"[{lo:g}, {hi:g}] along `{names[a]}` (axis {a}): sensor(s) "
                f"{np.ravel(shown).tolist()} at {[float(v) for v in p[bad[:3]]]}. "
                f"Only periodic axes wrap: {fix}."
            )
        pos[:, a] = p
    return pos, wrapped, snapped
