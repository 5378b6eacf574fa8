r"""Transforms of constrained physical parameters: $p = T(z)$ with $z$ unconstrained.

A :class:`assimilation.Parameter` is optimised in the unconstrained space $z$;
its transform maps $z$ to the physical value $p$ (``Log``: $p > 0$; ``Softplus``:
$p > 0$ with a linear tail; ``Bounded``: $p$ in an interval), gives the inverse for
the background, and the derivative $T'(z)$ for the delta-method standard deviation
$\sigma_p = |T'(z)|\,\sigma_z$.
"""

import abc

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


# -------------------------------------------------------------------------- transforms


class AbstractTransform(eqx.Module):
    r"""A bijection $p = T(z)$ from an unconstrained $z$ to a physical parameter $p$."""

    @abc.abstractmethod
    def forward(self, z):
        """$T(z)$: unconstrained to physical."""

    @abc.abstractmethod
    def inverse(self, p):
        """$T^{-1}(p)$: physical to unconstrained."""

    def check(self, p, name: str) -> None:
        """Raise ``ValueError`` if a concrete physical value lies outside the range."""

    def derivative(self, z):
        """$T'(z)$ elementwise (for the delta-method standard deviation)."""
        return jax.vmap(jax.grad(lambda s: self.forward(s)))(jnp.ravel(z)).reshape(
            jnp.shape(z)
        )


class Identity(AbstractTransform):
    """No constraint: $p = z$."""

    def forward(self, z):
        return z

    def inverse(self, p):
        return p


def _check_range(p, name, lower=None, upper=None):
    if isinstance(p, jax.core.Tracer):
        return
    arr = np.asarray(p)
    ok = np.isfinite(arr)
    if lower is not None:
        ok &= arr > lower
    if upper is not None:
        ok &= arr < upper
    if not np.all(ok):
        lo = "-inf" if lower is None else lower
        hi = "inf" if upper is None else upper
        raise ValueError(
            f"`{name}`: the background must lie strictly inside ({lo}, {hi}) for its "
            f"transform, got values in [{np.nanmin(arr)}, {np.nanmax(arr)}]."
        )


class Log(AbstractTransform):
    r"""Positivity: $p = e^z$. A std $\sigma$ on $z$ is a multiplicative factor $e^\sigma$."""

    def forward(self, z):
        return jnp.exp(z)

    def inverse(self, p):
        return jnp.log(p)

    def derivative(self, z):
        return jnp.exp(z)

    def check(self, p, name):
        _check_range(p, name, lower=0.0)


class Softplus(AbstractTransform):
    r"""Positivity, linear for large values: $p = \log(1 + e^z)$."""

    def forward(self, z):
        return jax.nn.softplus(z)

    def inverse(self, p):
        # log(e^p - 1), written to stay accurate for large and small p.
        return p + jnp.log(-jnp.expm1(-p))

    def derivative(self, z):
        return jax.nn.sigmoid(z)

    def check(self, p, name):
        _check_range(p, name, lower=0.0)


class Bounded(AbstractTransform):
    r"""An interval: $p = a + (b-a)\,\mathrm{sigmoid}(z)$.

    Attributes:
        lower, upper: the bounds $a < b$ (static floats).
    """

    lower: float = eqx.field(static=True)
    upper: float = eqx.field(static=True)

    def __check_init__(self):
        if not (np.isfinite(self.lower) and np.isfinite(self.upper)) or not (
            self.lower < self.upper
        ):
            raise ValueError(
                f"`Bounded` needs finite lower < upper, got ({self.lower}, "
                f"{self.upper})."
            )

    def forward(self, z):
        return self.lower + (self.upper - self.lower) * jax.nn.sigmoid(z)

    def inverse(self, p):
        s = (p - self.lower) / (self.upper - self.lower)
        return jnp.log(s) - jnp.log1p(-s)

    def derivative(self, z):
        s = jax.nn.sigmoid(z)
        return (self.upper - self.lower) * s * (1 - s)

    def check(self, p, name):
        _check_range(p, name, lower=self.lower, upper=self.upper)
