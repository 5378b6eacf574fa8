"""Sparse sensor observations."""

from __future__ import annotations

import equinox as eqx
import jax
import numpy as np


class Observations(eqx.Module):
    r"""Sensor records on a model's time axis.

    Attributes:
        times: observation times in model time units, shape ``(n_times,)``, strictly
            increasing.
        values: observed values, shape ``(n_times, n_sensors)``; NaN means missing
            (it is masked out of every cost, never propagated).
        positions: sensor coordinates in model length units, shape
            ``(n_sensors, ndim)``, in the grid's array-axis order (``(y, x)`` in 2D).
        sigma: observation-error standard deviation per sensor, ``(n_sensors,)``,
            in the units of ``values``.
    """

    times: jax.Array
    values: jax.Array
    positions: jax.Array
    sigma: jax.Array

    def __check_init__(self):
        t, v, p, s = (np.shape(a) for a in (self.times, self.values, self.positions,
                                            self.sigma))
        if len(t) != 1 or len(v) != 2 or v[0] != t[0]:
            raise ValueError(
                f"`values` must have shape (n_times, n_sensors) = ({t[0] if t else '?'},"
                f" n_sensors) to match `times` {t}; got {v}."
            )
        if len(p) != 2 or p[0] != v[1]:
            raise ValueError(
                f"`positions` must have shape (n_sensors={v[1]}, ndim), got {p}."
            )
        if s != (v[1],):
            raise ValueError(f"`sigma` must have shape ({v[1]},), got {s}.")

    @property
    def mask(self):
        """True where a value was observed (not NaN)."""
        return ~np.isnan(np.asarray(self.values)) if not isinstance(
            self.values, jax.core.Tracer) else None
