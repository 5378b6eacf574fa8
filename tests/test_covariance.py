"""Background covariances: square roots, adjoints, SPD, dense references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import assimilation as da
import dphys
import dphys.testing as dtest
from dphys.operators import laplacian


def _dense_laplacian(grid, kappa):
    n = grid.size
    eye = jnp.eye(n)
    cols = jax.vmap(lambda e: laplacian(e.reshape(grid.shape), grid, kappa).reshape(-1))(
        eye
    )
    return cols.T


def _dense_diffusion(grid, length_scale, std, n_steps):
    """B = S L K^{2m} L S built from dense matrices, independently of the library."""
    kappa = jnp.asarray(length_scale) ** 2 / (4 * n_steps)
    a = jnp.eye(grid.size) - _dense_laplacian(grid, kappa)
    k = jnp.linalg.inv(a)
    km = jnp.linalg.matrix_power(k, n_steps)
    c = km @ km.T
    lam = 1.0 / jnp.sqrt(jnp.diag(c))
    s = jnp.broadcast_to(jnp.asarray(std), grid.shape).reshape(-1)
    d = s * lam
    return d[:, None] * c * d[None, :]


CASES = [
    (dphys.Grid(12, lengths=1.0, boundary="neumann"), 0.15, 2),
    (dphys.Grid(12, lengths=1.0, boundary="dirichlet"), 0.2, 3),
    (dphys.Grid(16, lengths=1.0, boundary="periodic"), 0.1, 2),
    (dphys.Grid((5, 6), lengths=1.0, boundary=("periodic", "neumann")), 0.3, 2),
]


@pytest.mark.parametrize("grid, ell, m", CASES)
def test_diffusion_matches_dense_construction(grid, ell, m, getkey):
    std = 0.5 + jax.random.uniform(getkey(), grid.shape)
    B = da.Diffusion(grid, ell, std=std, n_steps=m)
    dense = _dense_diffusion(grid, ell, std, m)
    r = jax.random.normal(getkey(), grid.shape)
    np.testing.assert_allclose(
        B.mv(r).reshape(-1), dense @ r.reshape(-1), rtol=1e-10, atol=1e-12
    )
    # Unit correlation on the diagonal: the variance is std^2 everywhere.
    np.testing.assert_allclose(jnp.diag(dense), std.reshape(-1) ** 2, rtol=1e-12)
    np.testing.assert_allclose(
        jnp.diag(B.to_dense()), std.reshape(-1) ** 2, rtol=1e-10
    )


@pytest.mark.parametrize("grid, ell, m", CASES)
def test_diffusion_sqrt_adjoint_and_spd(grid, ell, m, getkey):
    std = 0.5 + jax.random.uniform(getkey(), grid.shape)
    B = da.Diffusion(grid, ell, std=std, n_steps=m)
    res = dtest.dot_test(B.sqrt, B.sqrt_transpose, jnp.zeros(grid.shape), key=getkey())
    assert res.rel_error < 1e-12, str(res)
    res = dtest.dot_test(B.mv, B.mv, jnp.zeros(grid.shape), key=getkey())
    assert res.rel_error < 1e-12, str(res)  # symmetric
    xs = jax.random.normal(getkey(), (20,) + grid.shape)
    quad = jax.vmap(lambda x: jnp.vdot(x, B.mv(x)))(xs)
    assert jnp.all(quad > 0)
    eig = jnp.linalg.eigvalsh(B.to_dense())
    assert eig.min() > 0


def test_diffusion_field_length_scale_and_constant_normalization(getkey):
    grid = dphys.Grid(24, lengths=1.0, boundary="neumann")
    (x,) = grid.coords
    ell = 0.05 + 0.1 * x
    B = da.Diffusion(grid, ell, n_steps=2)
    dense = _dense_diffusion(grid, ell, 1.0, 2)
    r = jax.random.normal(getkey(), grid.shape)
    np.testing.assert_allclose(B.mv(r), dense @ r, rtol=1e-10, atol=1e-12)
    # "constant" uses the centre variance everywhere: exact on a periodic grid.
    gp = dphys.Grid(24, lengths=1.0, boundary="periodic")
    Bc = da.Diffusion(gp, 0.1, normalization="constant")
    np.testing.assert_allclose(jnp.diag(Bc.to_dense()), 1.0, rtol=1e-12)


def test_diffusion_correlation_shape():
    # Many implicit steps approach the Gaussian exp(-r^2 / (2 ell^2)).
    grid = dphys.Grid(200, lengths=1.0, boundary="periodic")
    ell = 0.05
    B = da.Diffusion(grid, ell, n_steps=10)
    e = jnp.zeros(grid.shape).at[0].set(1.0)
    corr = B.mv(e)
    (x,) = grid.coords
    r = jnp.minimum(x, 1.0 - x)
    gauss = jnp.exp(-(r**2) / (2 * ell**2))
    # The m = 10 kernel is within a few percent of the Gaussian (m -> inf limit).
    assert float(jnp.max(jnp.abs(corr - gauss))) < 0.03
    assert float(corr[0]) == pytest.approx(1.0, rel=1e-12)


def test_diagonal_and_dense(getkey):
    D = da.Diagonal(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(D.mv(jnp.ones(3)), [1.0, 4.0, 9.0])
    np.testing.assert_allclose(D.variance(), [1.0, 4.0, 9.0])
    D0 = da.Diagonal(0.5, shape=(2, 2))
    assert D0.shape == (2, 2)
    m = jnp.array([[2.0, 0.3], [0.3, 1.0]])
    C = da.Dense(m)
    np.testing.assert_allclose(C.to_dense(), m, rtol=1e-12)
    res = dtest.dot_test(C.sqrt, C.sqrt_transpose, jnp.zeros(2), key=getkey())
    assert res.rel_error < 1e-12
    samples = jax.vmap(lambda k: C.sample(key=k))(jax.random.split(getkey(), 20000))
    np.testing.assert_allclose(jnp.cov(samples.T), m, atol=0.06)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: da.Diagonal(0.0), "std"),
        (lambda: da.Diagonal(jnp.ones(3), shape=(4,)), "shape"),
        (lambda: da.Dense([[1.0, 2.0], [2.0, 1.0]]), "positive definite"),
        (lambda: da.Dense([[1.0, 0.5], [0.4, 1.0]]), "symmetric"),
        (lambda: da.Dense(jnp.ones(3)), "square"),
        (lambda: da.Diffusion(dphys.Grid(8), -0.1), "length_scale"),
        (lambda: da.Diffusion(dphys.Grid(8), 0.1, std=jnp.ones(5)), "std"),
        (lambda: da.Diffusion(dphys.Grid(8), 0.1, n_steps=0), "n_steps"),
        (lambda: da.Diffusion(dphys.Grid(8), 0.1, normalization="x"), "normalization"),
    ],
)
def test_covariance_bad_input(make, match):
    with pytest.raises(ValueError, match=match):
        make()
