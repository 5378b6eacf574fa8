r"""Background and model-error covariances, given by matrix-free square roots.

Every covariance here is represented by a square root $U$ with $B = U U^\top$. The
variational cost never needs $B^{-1}$: with the control-variable transform

$$ x = x_b + U v, \qquad
   \tfrac12\|x - x_b\|^2_{B^{-1}} = \tfrac12\|v\|^2, $$

the background term is the identity in $v$ and the minimisation is well conditioned
(Lorenc 1988; Weaver & Courtier 2001). $U$ and $U^\top$ are linear maps from and to
arrays of ``shape``.

* :class:`Diagonal`: $U = \mathrm{diag}(\sigma)$.
* :class:`Dense`: $U$ the Cholesky factor of a small dense matrix (a few
  correlated scalar parameters).
* :class:`Diffusion`: $B = \Sigma\,\Lambda\,K^m K^{m}\,\Lambda\,\Sigma$, a smooth
  correlation model built from $m$ implicit (backward-Euler) diffusion steps
  $K = (I - \tfrac{\ell^2}{4m}\nabla^2)^{-1}$ solved with the dphys structured
  solvers, normalised ($\Lambda$) to unit variance.

References:
    A. C. Lorenc (1988), "Optimal nonlinear objective analysis", Q. J. R. Meteorol.
    Soc. 114, 205-240 (control-variable transform).
    A. T. Weaver and P. Courtier (2001), "Correlation modelling on the sphere using a
    generalized diffusion equation", Q. J. R. Meteorol. Soc. 127, 1815-1846.
    M. Mirouze and A. T. Weaver (2010), "Representation of correlation functions in
    variational assimilation using an implicit diffusion operator", Q. J. R.
    Meteorol. Soc. 136, 1421-1443.
"""

from __future__ import annotations

import abc
import dataclasses
import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np

import dphys
import pdes

from ._checks import check_positive


class AbstractCovariance(eqx.Module):
    r"""A covariance $B = U U^\top$ on arrays of ``shape``, matrix-free.

    Subclasses implement :meth:`sqrt` ($v \mapsto Uv$) and :meth:`sqrt_transpose`
    ($x \mapsto U^\top x$); both act on arrays of ``shape`` (control and state have
    the same shape here).
    """

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the arrays $B$ acts on."""

    @abc.abstractmethod
    def sqrt(self, v):
        """$U v$: whitened control to physical increment."""

    @abc.abstractmethod
    def sqrt_transpose(self, x):
        """$U^\\top x$: the adjoint of :meth:`sqrt`."""

    def mv(self, x):
        """$B x = U U^\\top x$."""
        return self.sqrt(self.sqrt_transpose(x))

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def to_dense(self):
        """The dense matrix $B$, shape ``(size, size)`` (small problems and tests)."""
        return _to_dense(self)

    def variance(self):
        """The diagonal of $B$, an array of ``shape``."""
        return _variance(self)

    def sample(self, *, key, dtype=None):
        r"""A draw $U z$, $z\sim\mathcal N(0, I)$: a sample from $\mathcal N(0, B)$."""
        z = jr.normal(key, self.shape, dtype or jnp.result_type(float))
        return self.sqrt(z)

    def check_shape(self, like, name: str) -> None:
        if tuple(jnp.shape(like)) != tuple(self.shape):
            raise ValueError(
                f"`{name}` acts on arrays of shape {self.shape}, but the quantity it "
                f"describes has shape {tuple(jnp.shape(like))}; build the covariance "
                "on the same grid/shape."
            )


@eqx.filter_jit
def _to_dense(cov):
    eye = jnp.eye(cov.size, dtype=jnp.result_type(float))
    cols = jax.vmap(lambda e: cov.mv(e.reshape(cov.shape)).reshape(-1))(eye)
    return cols.T


@eqx.filter_jit
def _variance(cov):
    eye = jnp.eye(cov.size, dtype=jnp.result_type(float))
    rows = jax.vmap(lambda e: cov.sqrt_transpose(e.reshape(cov.shape)))(eye)
    return jnp.sum(rows.reshape(cov.size, -1) ** 2, axis=1).reshape(cov.shape)


def _check_std(std, name="std"):
    check_positive(std, name, fix="Give standard deviations (> 0).")


class Diagonal(AbstractCovariance):
    r"""Uncorrelated errors: $B = \mathrm{diag}(\sigma^2)$, $U = \mathrm{diag}(\sigma)$.

    Attributes:
        std: standard deviation $\sigma$, a positive scalar or an array of ``shape``.
        shape: shape of the arrays $B$ acts on (static). Default: ``std``'s shape.

    Example:
        >>> import jax.numpy as jnp
        >>> import assimilation as da
        >>> B = da.Diagonal(0.5, shape=(3,))
        >>> B.mv(jnp.ones(3)).tolist()
        [0.25, 0.25, 0.25]
    """

    std: jax.Array
    _shape: tuple[int, ...] = eqx.field(static=True)

    def __init__(self, std, shape: tuple[int, ...] | None = None):
        std = jnp.asarray(std, dtype=jnp.result_type(float))
        _check_std(std)
        shape = tuple(std.shape) if shape is None else tuple(shape)
        if std.ndim and tuple(std.shape) != shape:
            raise ValueError(
                f"`std` must be a scalar or have shape {shape}, got {tuple(std.shape)}."
            )
        self.std = std
        self._shape = shape

    @property
    def shape(self):
        return self._shape

    def sqrt(self, v):
        return self.std.astype(v.dtype) * v

    def sqrt_transpose(self, x):
        return self.std.astype(x.dtype) * x

    def variance(self):
        return jnp.broadcast_to(self.std**2, self.shape)


class Dense(AbstractCovariance):
    r"""A small dense covariance matrix, $U$ its lower Cholesky factor.

    Attributes:
        factor: lower-triangular $U$ with $B = UU^\top$, shape ``(n, n)``.

    Raises:
        ValueError: if ``matrix`` is not square, symmetric and positive definite.

    Example:
        >>> import jax.numpy as jnp
        >>> import assimilation as da
        >>> B = da.Dense([[1.0, 0.5], [0.5, 2.0]])
        >>> bool(jnp.allclose(B.to_dense(), jnp.array([[1.0, 0.5], [0.5, 2.0]])))
        True
    """

    factor: jax.Array

    def __init__(self, matrix):
        m = np.asarray(matrix, dtype=np.float64)
        if m.ndim != 2 or m.shape[0] != m.shape[1]:
            raise ValueError(f"`matrix` must be square, got shape {m.shape}.")
        if not np.allclose(m, m.T, rtol=1e-10, atol=0):
            raise ValueError("`matrix` must be symmetric.")
        try:
            factor = np.linalg.cholesky(m)
        except np.linalg.LinAlgError:
            raise ValueError(
                "`matrix` must be positive definite (Cholesky failed); check the "
                "variances are positive and the correlations below 1 in magnitude."
            ) from None
        self.factor = jnp.asarray(factor, dtype=jnp.result_type(float))

    @property
    def shape(self):
        return (self.factor.shape[0],)

    def sqrt(self, v):
        return jnp.matmul(self.factor.astype(v.dtype), v, precision="highest")

    def sqrt_transpose(self, x):
        return jnp.matmul(self.factor.T.astype(x.dtype), x, precision="highest")


class Diffusion(AbstractCovariance):
    r"""Smooth correlations from implicit diffusion: $B = \Sigma\Lambda K^{2m}\Lambda\Sigma$.

    $$ K = (I - \tfrac{\ell^2}{4m}\,\nabla^2)^{-1}, \qquad
       U = \Sigma\,\Lambda\,K^m, \qquad U^\top = K^m\,\Lambda\,\Sigma, $$

    with $\nabla^2$ the model grid's conservative Laplacian (its boundary conditions
    included), so $K$ is symmetric positive definite and $B = UU^\top$ is SPD. As
    $m\to\infty$, $K^{2m}\to\exp(\tfrac{\ell^2}{2}\nabla^2)$ whose kernel is the
    Gaussian $\exp(-r^2/2\ell^2)$; finite $m$ gives a Matern-like function of the
    same width (Mirouze & Weaver 2010). A field $\ell(x)$ uses
    $\nabla\cdot(\tfrac{\ell^2}{4m}\nabla)$. Each application of $U$ costs $m$
    structured solves (FFT, tridiagonal or preconditioned CG, chosen by
    ``dphys.Auto``), whose adjoints are exact, so gradients through $U$ are exact.

    $\Lambda$ normalises the correlation to unit variance:
    ``normalization="exact"`` computes $\mathrm{diag}(K^{2m})$ from one solve per
    grid point (exact, also near boundaries; default when the grid has at most 4096
    points); ``"constant"`` uses the variance at the grid centre everywhere (exact on
    periodic grids with constant $\ell$, approximate near walls); ``None`` leaves
    $K^{2m}$ unnormalised.

    Attributes:
        grid: the grid of the field.
        length_scale: correlation length $\ell$ [length], a positive scalar or field.
        std: standard deviation $\sigma$, a positive scalar or a field.
        n_steps: $m$, the number of implicit diffusion steps in $U$ (static).
        scale: the normalisation $\Lambda$ (a field, or a scalar).

    Example:
        >>> import jax.numpy as jnp
        >>> import assimilation as da, dphys
        >>> grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
        >>> B = da.Diffusion(grid, length_scale=0.1, std=2.0)
        >>> bool(jnp.allclose(jnp.diag(B.to_dense()), 4.0))
        True
    """

    grid: dphys.Grid
    length_scale: jax.Array
    std: jax.Array
    scale: jax.Array
    n_steps: int = eqx.field(static=True)

    def __init__(
        self,
        grid: dphys.Grid,
        length_scale,
        *,
        std=1.0,
        n_steps: int = 2,
        normalization: str | None = "auto",
    ):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"`n_steps` must be an integer >= 1, got {n_steps!r}.")
        dtype = jnp.result_type(float)
        grid.check_field(length_scale, "length_scale")
        grid.check_field(std, "std")
        _check_std(length_scale, "length_scale")
        _check_std(std, "std")
        if normalization not in ("auto", "exact", "constant", None):
            raise ValueError(
                "`normalization` must be 'auto', 'exact', 'constant' or None, got "
                f"{normalization!r}."
            )
        if normalization == "auto":
            normalization = "exact" if grid.size <= 4096 else "constant"
        self.grid = grid
        self.length_scale = jnp.asarray(length_scale, dtype=dtype)
        self.std = jnp.asarray(std, dtype=dtype)
        self.n_steps = n_steps
        self.scale = jnp.ones((), dtype)
        if normalization == "exact":
            var = self._variance_exact()
            self.scale = 1.0 / jnp.sqrt(var)
        elif normalization == "constant":
            centre = tuple(n // 2 for n in grid.shape)
            e = jnp.zeros(grid.shape, dtype).at[centre].set(1.0)
            self.scale = 1.0 / jnp.sqrt(jnp.sum(self._smooth(e) ** 2))

    @property
    def shape(self):
        return self.grid.shape

    def _smooth(self, v):
        """$K^m v$, with $K = (I - \\nabla\\cdot\\frac{\\ell^2}{4m}\\nabla)^{-1}$."""
        return _smooth(self, v)

    def _smooth_impl(self, v):
        kappa = self.length_scale.astype(v.dtype) ** 2 / (4 * self.n_steps)
        model = pdes.Heat(self.grid, kappa)
        solver = dphys.Auto().resolve(model, v)
        if isinstance(solver, dphys.Krylov):
            # U and U^T are the same solves applied to different vectors: B is
            # symmetric and the adjoint exact only to the solve's tolerance, so
            # solve to rounding level (rtol is floored at 100 eps).
            solver = dataclasses.replace(solver, rtol=1e-14)
        solver.check(model, v)
        structure = solver.init(model, 0.0, v)
        for _ in range(self.n_steps):
            v, _, _ = solver.solve(model, 0.0, 1.0, v, structure)
        return v

    def _variance_exact(self):
        return _variance_exact(self)

    def sqrt(self, v):
        w = self._smooth(v)
        return (self.std * self.scale).astype(w.dtype) * w

    def sqrt_transpose(self, x):
        return self._smooth((self.std * self.scale).astype(x.dtype) * x)

    def variance(self):
        if self.scale.ndim:  # exact normalisation: unit correlation on the diagonal
            return jnp.broadcast_to(self.std**2, self.shape)
        return super().variance()


@eqx.filter_jit
def _smooth(cov: Diffusion, v):
    return cov._smooth_impl(v)


@eqx.filter_jit
def _variance_exact(cov: Diffusion):
    # diag(K^{2m})_i = ||K^m e_i||^2 since K is symmetric: one smoothing per point,
    # batched to bound memory. A module-level jitted function, so that covariances
    # of the same structure share one compilation.
    n = cov.grid.size
    dtype = jnp.result_type(float)

    def column_norm(i):
        e = jnp.zeros(n, dtype).at[i].set(1.0).reshape(cov.grid.shape)
        return jnp.sum(cov._smooth_impl(e) ** 2)

    var = jax.lax.map(column_norm, jnp.arange(n), batch_size=min(n, 512))
    return var.reshape(cov.grid.shape)
