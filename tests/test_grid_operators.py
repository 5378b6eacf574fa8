"""Grids and finite-difference operators: coordinates, adjoints, exact eigenpairs,
measured convergence order, and the structure that the solvers probe."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import coords

import dphys
import dphys.testing as dt
from dphys.operators import divergence, gradient, laplacian


BOUNDARIES = ("periodic", "dirichlet", "neumann")


def smooth_kappa(grid):
    """A positive, smooth, non-periodic-looking diffusivity field on ``grid``."""
    k = 1.0
    for x in coords(grid):
        k = k * (1.0 + 0.4 * np.sin(2.0 * np.pi * x + 0.3))
    return jnp.asarray(k)


def apply(fn, grid, u, *args):
    """``fn(u, grid, *args)`` compiled as one program (eager dispatch would compile
    every primitive separately, for every grid size)."""
    return jax.jit(lambda v, *a: fn(v, grid, *a))(u, *args)


def dense(fn, grid):
    """Dense matrix of the linear map ``fn`` on fields of ``grid`` (row-major)."""
    n = grid.size
    jac = jax.jit(jax.jacfwd(lambda v: fn(v.reshape(grid.shape)).reshape(n)))
    return np.asarray(jac(jnp.zeros(n)))


# ----------------------------------------------------------------------------- grid


@pytest.mark.parametrize(
    "boundary, spacing, first",
    [
        ("periodic", 2.0 / 8, 0.0),
        ("dirichlet", 2.0 / 9, 2.0 / 9),
        ("neumann", 0.25, 0.125),
    ],
)
def test_coordinates_per_boundary_kind(boundary, spacing, first):
    g = dphys.Grid(8, lengths=2.0, boundary=boundary, origin=-1.0)
    (x,) = g.coords
    assert g.spacing == pytest.approx((spacing,), rel=1e-15)
    np.testing.assert_allclose(x, -1.0 + first + spacing * np.arange(8), rtol=1e-15)
    # Every unknown lies strictly inside the domain except the periodic origin.
    assert float(x[-1]) < 1.0
    assert g.cell_volume == pytest.approx(spacing)


def test_coordinates_2d_mixed_boundaries():
    g = dphys.Grid((5, 7), lengths=(1.0, 3.5), boundary=("dirichlet", "periodic"))
    y, x = g.coords
    assert y.shape == x.shape == (5, 7)
    np.testing.assert_allclose(y[:, 0], (np.arange(5) + 1) / 6, rtol=1e-15)
    np.testing.assert_allclose(x[0], np.arange(7) * 0.5, rtol=1e-15)
    np.testing.assert_allclose(y[:, 3], y[:, 0])  # "ij" indexing
    assert g.cell_volume == pytest.approx(0.5 / 6)
    assert g.size == 35 and g.ndim == 2 and not g.periodic
    assert dphys.Grid((4, 4)).periodic


def test_integrate_is_midpoint_rule():
    g = dphys.Grid((16, 20), lengths=(2.0, 1.0), boundary="neumann")
    y, x = g.coords
    # The midpoint rule integrates linear functions exactly on cell centres.
    assert float(g.integrate(3.0 + x - 2.0 * y)) == pytest.approx(
        2.0 * (3.0 * 1.0 + 0.5 - 2.0), rel=1e-13
    )


def test_grid_is_static_and_hashable():
    a = dphys.Grid((8, 8), lengths=1.0, boundary="neumann")
    b = dphys.Grid((8, 8), lengths=(1.0, 1.0), boundary=("neumann", "neumann"))
    assert a == b and hash(a) == hash(b)
    assert jax.tree_util.tree_leaves(a) == []


# ------------------------------------------------------------------- adjoint checks

GRIDS = (
    [dphys.Grid(11, lengths=1.3, boundary=b) for b in BOUNDARIES]
    + [dphys.Grid((6, 9), lengths=(1.0, 2.0), boundary=b) for b in BOUNDARIES]
    + [dphys.Grid((7, 8), lengths=1.0, boundary=("dirichlet", "neumann"))]
)
GRID_IDS = [f"{len(g.shape)}d-{'-'.join(g.boundary)}" for g in GRIDS]


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
@pytest.mark.parametrize("kind", ["scalar", "field"])
def test_laplacian_dot_and_symmetry(grid, kind):
    kappa = {"scalar": jnp.asarray(0.7), "field": smooth_kappa(grid)}[kind]
    lap = jax.jit(lambda u: laplacian(u, grid, kappa))
    x = jnp.zeros(grid.shape)
    transpose = dt.dot_test(lap, None, x)  # against jax.linear_transpose
    assert transpose.passed and transpose.rel_error < 1e-12, transpose
    symmetric = dt.dot_test(lap, lap, x)  # L^T = L
    assert symmetric.passed and symmetric.rel_error < 1e-12, symmetric
    A = dense(lap, grid)
    np.testing.assert_allclose(A, A.T, rtol=0, atol=1e-12 * np.abs(A).max())
    # Negative semi-definite; definite with a Dirichlet axis.
    eig = np.linalg.eigvalsh(A)
    assert eig.max() <= 1e-12 * np.abs(eig).max()
    if "dirichlet" in grid.boundary:
        assert eig.max() < 0


def test_dot_test_catches_a_wrong_adjoint():
    grid = GRIDS[4]  # 2D Dirichlet
    kappa = smooth_kappa(grid)
    lap = jax.jit(lambda u: laplacian(u, grid, kappa))
    # The constant-coefficient Laplacian is not the adjoint of the variable one.
    wrong = dt.dot_test(lap, lambda u: laplacian(u, grid, 1.0), jnp.zeros(grid.shape))
    assert not wrong.passed and wrong.rel_error > 1e-3


@pytest.mark.parametrize("grid", GRIDS, ids=GRID_IDS)
def test_gradient_and_divergence_dot(grid):
    x = jnp.zeros(grid.shape)
    grad = jax.jit(lambda u: gradient(u, grid))
    div = jax.jit(lambda f: divergence(f, grid))
    res = dt.dot_test(grad, None, x)
    assert res.passed and res.rel_error < 1e-12, res
    fields = tuple(jnp.zeros(grid.shape) for _ in range(grid.ndim))
    res = dt.dot_test(div, None, fields)
    assert res.passed and res.rel_error < 1e-12, res
    if "neumann" not in grid.boundary:
        # Centred differences with periodic or zero ghosts are skew-symmetric:
        # the divergence is minus the adjoint of the gradient.
        res = dt.dot_test(grad, lambda f: -div(f), x)
        assert res.passed and res.rel_error < 1e-12, res


def test_gradient_and_divergence_values():
    g = dphys.Grid((32, 48), lengths=(1.0, 2.0), boundary="periodic")
    y, x = coords(g)
    u = np.sin(np.pi * x) * np.cos(2 * np.pi * y)
    uy, ux = apply(gradient, g, u)
    # Centred difference of a Fourier mode: exact symbol sin(k dx)/dx.
    sx = np.sin(np.pi * g.spacing[1]) / g.spacing[1]
    sy = np.sin(2 * np.pi * g.spacing[0]) / g.spacing[0]
    exact_x = sx * np.cos(np.pi * x) * np.cos(2 * np.pi * y)
    exact_y = -sy * np.sin(np.pi * x) * np.sin(2 * np.pi * y)
    np.testing.assert_allclose(ux, exact_x, atol=1e-12)
    np.testing.assert_allclose(uy, exact_y, atol=1e-12)
    div = apply(divergence, g, (jnp.asarray(u), jnp.asarray(u)))
    np.testing.assert_allclose(div, uy + ux, atol=1e-12)


# ------------------------------------------------------------ exact eigenpairs


def _symbol(k, n_eff, dx):
    """Discrete eigenvalue of the 3-point second difference for a mode of index k."""
    return -(4.0 / dx**2) * np.sin(np.pi * k / n_eff) ** 2


@pytest.mark.parametrize("ndim", [1, 2])
@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_laplacian_exact_eigenvectors(boundary, ndim):
    shape = (12, 10)[:ndim] if ndim == 2 else (13,)
    lengths = (1.5, 0.8)[:ndim] if ndim == 2 else (2.0,)
    g = dphys.Grid(shape, lengths=lengths, boundary=boundary)
    kappa = 0.37
    modes = (3, 2)[:ndim] if ndim == 2 else (4,)
    u = np.ones(shape)
    lam = 0.0
    for axis, (x, k, length, dx, n) in enumerate(
        zip(coords(g), modes, lengths, g.spacing, shape, strict=True)
    ):
        if boundary == "periodic":
            # A shifted cosine = combination of the two Fourier modes of index +-k.
            u = u * np.cos(2 * np.pi * k * x / length + 0.4 * (axis + 1))
            lam += _symbol(k, n, dx)
        elif boundary == "dirichlet":
            u = u * np.sin(np.pi * k * x / length)
            lam += _symbol(k, 2 * (n + 1), dx)
        else:
            u = u * np.cos(np.pi * k * x / length)
            lam += _symbol(k, 2 * n, dx)
    lu = np.asarray(apply(lambda v, g: laplacian(v, g, kappa), g, u))
    err = np.max(np.abs(lu - kappa * lam * u)) / np.max(np.abs(lu))
    assert err < 1e-12
    # The eigenvalue is the discrete one, not the continuous -kappa |k|^2 (which
    # differs at O(dx^2)); the check above would fail for it.
    cont = 0.0
    for k, length in zip(modes, lengths, strict=True):
        cont -= (np.pi * k / length * (2 if boundary == "periodic" else 1)) ** 2
    assert abs(cont - lam) / abs(lam) > 1e-3


# ---------------------------------------------------------- convergence in space


def _manufactured(boundary, x):
    """u, u', kappa, kappa' for a smooth solution compatible with ``boundary``."""
    if boundary == "periodic":
        u, du = np.sin(2 * np.pi * x), 2 * np.pi * np.cos(2 * np.pi * x)
        d2u = -((2 * np.pi) ** 2) * u
    elif boundary == "dirichlet":
        u, du = np.sin(np.pi * x), np.pi * np.cos(np.pi * x)
        d2u = -(np.pi**2) * u
    else:
        u, du = np.cos(np.pi * x), -np.pi * np.sin(np.pi * x)
        d2u = -(np.pi**2) * u
    kap = 1.0 + 0.5 * np.sin(2 * np.pi * x + 0.3)
    dkap = np.pi * np.cos(2 * np.pi * x + 0.3)
    return u, kap, dkap * du + kap * d2u


def _orders(errors):
    errors = np.asarray(errors)
    return np.log2(errors[:-1] / errors[1:])


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_variable_coefficient_laplacian_second_order(boundary):
    errors, errors_inner, errors_edge = [], [], []
    for n in (16, 32, 64, 128):
        g = dphys.Grid(n, lengths=1.0, boundary=boundary)
        (x,) = coords(g)
        u, kap, exact = _manufactured(boundary, x)
        e = np.abs(np.asarray(apply(laplacian, g, u, kap)) - exact)
        errors.append(e.max())
        errors_inner.append(e[2:-2].max())
        errors_edge.append(max(e[0], e[-1]))
    p_inner = _orders(errors_inner)[-1]
    assert abs(p_inner - 2) < 0.3, errors_inner
    if boundary == "dirichlet":
        # The boundary face coefficient is extrapolated to second order, which
        # leaves an O(dx) truncation error in the first and last rows (a copied
        # edge value would not converge there at all). Solutions are still second
        # order, see test_heat.py::test_space_convergence_variable_kappa.
        p_edge = _orders(errors_edge)[-1]
        assert abs(p_edge - 1) < 0.3, errors_edge
    else:
        p = _orders(errors)[-1]
        assert abs(p - 2) < 0.3, errors


def test_variable_coefficient_laplacian_second_order_2d():
    errors = []
    for n in (12, 24, 48):
        g = dphys.Grid((n, n + 4), lengths=(1.0, 2.0), boundary=("neumann", "periodic"))
        y, x = coords(g)
        u = np.cos(np.pi * y) * np.sin(np.pi * x)
        kap = 1.0 + 0.3 * np.cos(np.pi * x) * y
        # div(kap grad u) = kap_y u_y + kap_x u_x + kap lap u
        uy = -np.pi * np.sin(np.pi * y) * np.sin(np.pi * x)
        ux = np.pi * np.cos(np.pi * y) * np.cos(np.pi * x)
        kapy = 0.3 * np.cos(np.pi * x)
        kapx = -0.3 * np.pi * np.sin(np.pi * x) * y
        exact = kapy * uy + kapx * ux + kap * (-2 * np.pi**2) * u
        errors.append(np.max(np.abs(np.asarray(apply(laplacian, g, u, kap)) - exact)))
    p = _orders(errors)[-1]
    assert abs(p - 2) < 0.3, errors


# ----------------------------------------------------------------------- probing


class _Diffusion(dphys.AbstractModel):
    """Minimal model to probe: L u = div(kappa grad u)."""

    grid: dphys.Grid
    kappa: jax.Array

    def linear(self, t, state):
        return laplacian(state, self.grid, self.kappa)

    @property
    def translation_invariant(self):
        return jnp.ndim(self.kappa) == 0


@pytest.mark.parametrize(
    "grid", [dphys.Grid(10, lengths=1.0), dphys.Grid((6, 8), lengths=(1.0, 2.0))]
)
def test_probe_symbol_matches_dense_matrix(grid):
    model = _Diffusion(grid, jnp.asarray(0.3))
    A = dense(lambda u: model.linear(0.0, u), grid)
    S = jax.jit(dphys.probe_symbol)(model, 0.0, jnp.zeros(grid.shape))
    assert S.shape[:2] == (1, 1)
    # Circulant: the symbol is the transform of the first column (impulse response).
    col = A[:, 0].reshape(grid.shape)
    np.testing.assert_allclose(S[0, 0], np.fft.rfftn(col), atol=1e-12)
    # ... and A = F^-1 diag(S) F on random vectors.
    v = np.random.default_rng(0).normal(size=grid.shape)
    axes = tuple(range(grid.ndim))
    Av = np.fft.irfftn(np.asarray(S[0, 0]) * np.fft.rfftn(v), s=grid.shape, axes=axes)
    np.testing.assert_allclose(Av, (A @ v.ravel()).reshape(grid.shape), atol=1e-11)


def test_probe_symbol_coupled_fields():
    grid = dphys.Grid(8, lengths=1.0)

    class Coupled(dphys.AbstractModel):
        grid: dphys.Grid

        def linear(self, t, s):
            u, v = s
            return (laplacian(u, self.grid) + 2.0 * v, -3.0 * u + jnp.roll(v, 1))

        @property
        def translation_invariant(self):
            return True

    model = Coupled(grid)
    like = (jnp.zeros(8), jnp.zeros(8))
    S = jax.jit(dphys.probe_symbol)(model, 0.0, like)
    assert S.shape == (2, 2, 5)
    flat = lambda w: jnp.concatenate(model.linear(0.0, (w[:8], w[8:])))
    A = np.asarray(jax.jacfwd(flat)(jnp.zeros(16)))
    for a in range(2):
        for b in range(2):
            col = A[8 * a : 8 * (a + 1), 8 * b]
            np.testing.assert_allclose(S[a, b], np.fft.rfft(col), atol=1e-12)


@pytest.mark.parametrize("boundary", ["dirichlet", "neumann"])
def test_probe_tridiagonal_matches_dense_bands(boundary):
    grid = dphys.Grid(11, lengths=1.0, boundary=boundary)
    model = _Diffusion(grid, smooth_kappa(grid))
    A = dense(lambda u: model.linear(0.0, u), grid)
    lower, diag, upper = jax.jit(dphys.probe_tridiagonal)(model, 0.0, jnp.zeros(11))
    np.testing.assert_allclose(diag, np.diag(A), rtol=1e-13)
    np.testing.assert_allclose(lower[1:], np.diag(A, -1), rtol=1e-13)
    np.testing.assert_allclose(upper[:-1], np.diag(A, 1), rtol=1e-13)
    assert float(lower[0]) == 0.0 and float(upper[-1]) == 0.0
    # Nothing outside the three bands: the band solve is exact.
    band = np.diag(np.diag(A)) + np.diag(np.diag(A, -1), -1) + np.diag(np.diag(A, 1), 1)
    np.testing.assert_array_equal(A, band)


@pytest.mark.parametrize("boundary", BOUNDARIES)
def test_probe_diagonal_matches_dense(boundary):
    grid = dphys.Grid((7, 9), lengths=(1.0, 1.5), boundary=boundary)
    model = _Diffusion(grid, smooth_kappa(grid))
    A = dense(lambda u: model.linear(0.0, u), grid)
    d = jax.jit(dphys.probe_diagonal)(model, 0.0, jnp.zeros(grid.shape))
    np.testing.assert_allclose(np.asarray(d).ravel(), np.diag(A), rtol=1e-13)
    # A stride that does not cover the 5-point stencil gets it wrong: the probe
    # test can fail.
    bad = jax.jit(dphys.probe_diagonal, static_argnums=3)(
        model, 0.0, jnp.zeros(grid.shape), 1
    )
    assert not np.allclose(np.asarray(bad).ravel(), np.diag(A))


def test_symbol_method_matches_probe():
    import pdes

    grid = dphys.Grid((6, 10), lengths=(1.0, 2.0))
    model = pdes.Heat(grid, kappa=0.2)
    S = dphys.probe_symbol(model, 0.0, jnp.zeros(grid.shape))
    np.testing.assert_allclose(S[0, 0].real, model.symbol(), atol=1e-12)
    np.testing.assert_allclose(S[0, 0].imag, 0.0, atol=1e-12)
    assert math.isclose(float(jnp.max(model.symbol())), 0.0, abs_tol=1e-14)
