r"""Approximate message passing (AMP) with soft thresholding, and its state evolution.

For $y = Ax_0 + w$, $A \in \mathbb R^{M\times N}$ with i.i.d. $\mathcal N(0, 1/M)$
entries (columns of unit norm on average), $\delta = M/N$, AMP (Donoho, Maleki &
Montanari 2009) iterates, from $x^0 = 0$, $z^0 = y$,

$$ \tau_t = \|z^t\|_2/\sqrt M,\qquad
   x^{t+1} = \eta(x^t + A^\top z^t;\ \alpha\tau_t),\qquad
   z^{t+1} = y - Ax^{t+1} + \frac{\|x^{t+1}\|_0}{M}\,z^t, $$

with $\eta$ the soft threshold. The last term is the *Onsager correction*:
$\frac1\delta\langle\eta'\rangle z^t$. It makes the effective observation
$x^t + A^\top z^t$ behave, for large i.i.d. Gaussian matrices, like $x_0 +
\tau_t Z$ with $Z \sim \mathcal N(0, I)$, and $\tau_t$ follows the scalar
**state evolution** (SE)

$$ \tau_{t+1}^2 = \sigma_w^2 + \frac1\delta\,
   \mathbb E\big[(\eta(X + \tau_t Z;\ \alpha\tau_t) - X)^2\big],\qquad
   \tau_0^2 = \sigma_w^2 + \frac1\delta\mathbb E[X^2], $$

so that the per-iteration MSE of $x^{t+1}$ is predicted as
$\mathbb E[(\eta(X + \tau_t Z; \alpha\tau_t) - X)^2]$. For a Bernoulli-Gaussian
$X \sim (1-\varepsilon)\,\delta_0 + \varepsilon\,\mathcal N(0, v)$ that expectation
is evaluated **exactly**, in closed form (:func:`soft_threshold_mse`: Gaussian
integrals of a piecewise quadratic), not by quadrature of the non-smooth threshold.

**Where the prediction holds.** SE is exact as $N \to \infty$ with $\delta$ fixed
for i.i.d. (sub-)Gaussian $A$; the finite-$N$ deviation shrinks like
$O(N^{-1/2})$. It does *not* hold for structured operators such as sensors
$\circ$ PDE solution operators (ill-conditioned, correlated columns): there AMP may
diverge and its SE prediction means nothing. :func:`amp` therefore warns when it is
given anything but an explicit matrix.

**LASSO calibration.** A fixed point $(x^\star, z^\star, \theta^\star)$ of AMP is a
minimiser of the LASSO $\tfrac12\|y - Ax\|^2 + \lambda\|x\|_1$ with
$\lambda = \theta^\star(1 - \|x^\star\|_0/M)$ (:func:`lasso_lambda`), so ISTA,
FISTA and AMP share that fixed point.

References:
    D. L. Donoho, A. Maleki and A. Montanari (2009), "Message-passing algorithms for
    compressed sensing", PNAS 106(45), 18914-18919.
    M. Bayati and A. Montanari (2011), "The dynamics of message passing on dense
    graphs, with applications to compressed sensing", IEEE Trans. Inf. Theory 57(2).
    D. L. Donoho, A. Maleki and A. Montanari (2011), "The noise-sensitivity phase
    transition in compressed sensing", IEEE Trans. Inf. Theory 57(10) (the
    calibration and the minimax phase transition).
"""

from __future__ import annotations

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
from jax import lax
from jax.scipy.special import ndtr

from ._prox import soft_threshold


_WARNING = (
    "AMP and its state evolution are derived for large matrices with i.i.d. Gaussian "
    "entries (and, via VAMP, rotation-invariant ones). This operator is not an "
    "explicit matrix (e.g. sensors composed with a PDE solution operator): AMP may "
    "diverge and its state-evolution prediction does not apply. Prefer FISTA or "
    "ADMM here; pass `warn=False` to silence this warning."
)


def _phi(x):
    return jnp.exp(-0.5 * x * x) / jnp.sqrt(2.0 * jnp.pi)


def soft_threshold_mse(tau2, theta, eps, var=1.0):
    r"""$\mathbb E[(\eta(X + \tau Z;\theta) - X)^2]$ for Bernoulli-Gaussian $X$,
    exactly.

    $X \sim (1-\varepsilon)\delta_0 + \varepsilon\mathcal N(0, v)$, $Z \sim
    \mathcal N(0,1)$ independent, $\eta$ the soft threshold. With $a = \theta/\tau$,
    $s^2 = v + \tau^2$, $b = \theta/s$, $c = v/s^2$ (so $\mathbb E[X|V] = cV$ for
    $V = X + \tau Z$ when $X \ne 0$):

    $$ (1-\varepsilon)\,2\tau^2[(1+a^2)\Phi(-a) - a\varphi(a)]
      + \varepsilon\Big\{\tfrac{v\tau^2}{s^2}
      + c^2 s^2[1 - 2\Phi(-b) - 2b\varphi(b)]
      + (1-c)^2 s^2[2\Phi(-b) + 2b\varphi(b)] - 4(1-c)\theta s\varphi(b)
      + 2\theta^2\Phi(-b)\Big\}. $$

    Args:
        tau2: $\tau^2 > 0$.
        theta: the threshold $\theta \ge 0$.
        eps: the fraction of non-zeros $\varepsilon \in [0, 1]$.
        var: the variance $v$ of the non-zeros.

    Returns:
        The mean squared error (a scalar; broadcasts over array arguments).
    """
    tau = jnp.sqrt(tau2)
    a = theta / tau
    zero_part = 2.0 * tau2 * ((1.0 + a * a) * ndtr(-a) - a * _phi(a))
    s2 = var + tau2
    s = jnp.sqrt(s2)
    b = theta / s
    c = var / s2
    inside = c * c * s2 * (1.0 - 2.0 * ndtr(-b) - 2.0 * b * _phi(b))
    outside = (
        (1.0 - c) ** 2 * s2 * (2.0 * ndtr(-b) + 2.0 * b * _phi(b))
        - 4.0 * (1.0 - c) * theta * s * _phi(b)
        + 2.0 * theta * theta * ndtr(-b)
    )
    nonzero_part = var * tau2 / s2 + inside + outside
    return (1.0 - eps) * zero_part + eps * nonzero_part


def soft_threshold_activity(tau2, theta, eps, var=1.0):
    r"""$\mathbb E[\eta'(X + \tau Z;\theta)] = P(|X + \tau Z| > \theta)$ for
    Bernoulli-Gaussian $X$: $(1-\varepsilon)2\Phi(-\theta/\tau) +
    \varepsilon\,2\Phi(-\theta/\sqrt{v + \tau^2})$."""
    return (1.0 - eps) * 2.0 * ndtr(-theta / jnp.sqrt(tau2)) + eps * 2.0 * ndtr(
        -theta / jnp.sqrt(var + tau2)
    )


class StateEvolution(eqx.Module):
    r"""The state-evolution prediction of AMP (see the module docstring).

    Attributes:
        tau2: $\tau_t^2$, ``t = 0..n_iterations`` (shape ``(n_iterations + 1,)``).
        mse: predicted $\mathbb E[(x^{t}_i - x_{0,i})^2]$ for ``t = 0..n_iterations``
            (``mse[0]`` $= \varepsilon v$, the start $x^0 = 0$).
        nmse: ``mse / (eps * var)``.
        nmse_db: $10\log_{10}$ of ``nmse``.
    """

    tau2: jax.Array
    mse: jax.Array
    nmse: jax.Array
    nmse_db: jax.Array


def _check_se_args(delta, eps, sigma2, alpha):
    for name, value, ok in (
        ("delta", delta, lambda v: v > 0),
        ("eps", eps, lambda v: 0 <= v <= 1),
        ("sigma2", sigma2, lambda v: v >= 0),
        ("alpha", alpha, lambda v: v >= 0),
    ):
        if isinstance(value, jax.core.Tracer):
            continue
        v = np.asarray(value)
        if v.shape != () or not np.isfinite(v) or not ok(float(v)):
            raise ValueError(
                f"`{name}` must be a finite scalar in its range (delta > 0, 0 <= eps "
                f"<= 1, sigma2 >= 0, alpha >= 0), got {value!r}."
            )


def state_evolution(
    delta, eps, sigma2, alpha, *, n_iterations: int, var=1.0
) -> StateEvolution:
    r"""The state evolution of soft-threshold AMP with threshold $\alpha\tau_t$.

    $\tau_0^2 = \sigma^2 + \varepsilon v/\delta$,
    $\tau_{t+1}^2 = \sigma^2 + \frac1\delta\,\mathrm{mse}(\tau_t^2, \alpha\tau_t)$
    with :func:`soft_threshold_mse`; evaluated exactly (closed form), jittable.

    Args:
        delta: $\delta = M/N$.
        eps: fraction of non-zeros of the Bernoulli-Gaussian signal.
        sigma2: noise variance $\sigma^2$ per measurement (with unit-norm columns).
        alpha: threshold multiplier $\alpha$.
        n_iterations: number of AMP iterations to predict (static).
        var: variance $v$ of the non-zeros.

    Returns:
        A :class:`StateEvolution`.

    Example:
        >>> se = state_evolution(0.5, 0.1, 2e-5, 1.1, n_iterations=30)
        >>> bool(se.nmse_db[-1] < -30)
        True
    """
    _check_se_args(delta, eps, sigma2, alpha)
    dtype = jnp.result_type(float)
    delta, eps, sigma2, alpha, var = (
        jnp.asarray(v, dtype) for v in (delta, eps, sigma2, alpha, var)
    )
    tau2_0 = sigma2 + eps * var / delta

    def body(tau2, _):
        mse = soft_threshold_mse(tau2, alpha * jnp.sqrt(tau2), eps, var)
        return sigma2 + mse / delta, (tau2, mse)

    tau2_last, (tau2s, mses) = lax.scan(body, tau2_0, None, length=int(n_iterations))
    tau2 = jnp.concatenate([tau2s, tau2_last[None]])
    mse = jnp.concatenate([(eps * var)[None], mses])
    nmse = mse / (eps * var)
    return StateEvolution(tau2, mse, nmse, 10.0 * jnp.log10(nmse))


def state_evolution_fixed_point(
    delta, eps, sigma2, alpha, *, var=1.0, n_iterations: int = 5000
):
    r"""$\tau_\star^2$ and the MSE at the fixed point of :func:`state_evolution`
    (iterated to convergence), as ``(tau2, mse)``."""
    se = state_evolution(delta, eps, sigma2, alpha, n_iterations=n_iterations, var=var)
    return se.tau2[-1], se.mse[-1]


def optimal_alpha(delta, eps, sigma2, *, var=1.0, grid=None) -> float:
    r"""The threshold multiplier $\alpha$ minimising the fixed-point MSE of the state
    evolution (a grid search then a golden-section refinement; host-side NumPy).
    """
    _check_se_args(delta, eps, sigma2, 0.0)
    fp = jax.jit(
        lambda a: state_evolution_fixed_point(delta, eps, sigma2, a, var=var)[1]
    )
    grid = np.linspace(0.2, 3.5, 34) if grid is None else np.asarray(grid)
    vals = np.array([float(fp(a)) for a in grid])
    # Below some alpha the recursion diverges (NaN/inf): never a minimiser.
    vals = np.where(np.isfinite(vals), vals, np.inf)
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    f = lambda a: float(np.nan_to_num(fp(a), nan=np.inf))
    fc, fd = f(c), f(d)
    for _ in range(40):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = f(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = f(d)
    return float(0.5 * (lo + hi))


def lasso_lambda(delta, eps, sigma2, alpha, *, var=1.0):
    r"""The LASSO weight whose minimiser is AMP's fixed point, from the state
    evolution: $\lambda = \alpha\tau_\star\,(1 - \frac1\delta
    \mathbb E[\eta'(X + \tau_\star Z; \alpha\tau_\star)])$ (for unit-norm
    columns; Donoho, Maleki & Montanari 2011, eq. (1.8)).

    For one instance, use the empirical calibration of :func:`amp` instead
    (:attr:`AMPResult.lasso_lambda`), which is exact for that instance.
    """
    tau2, _ = state_evolution_fixed_point(delta, eps, sigma2, alpha, var=var)
    theta = alpha * jnp.sqrt(tau2)
    return theta * (1.0 - soft_threshold_activity(tau2, theta, eps, var) / delta)


def phase_transition(delta, *, n_alpha: int = 2001):
    r"""The noiseless phase transition $\rho_{SE}(\delta)$ of soft-threshold AMP (=
    the LASSO / $\ell_1$ weak threshold of Donoho and Tanner), $\rho = k/M$:

    $$ \rho_{SE}(\delta) = \max_{\alpha \ge 0}
       \frac{1 - \frac2\delta[(1+\alpha^2)\Phi(-\alpha) - \alpha\varphi(\alpha)]}
            {1 + \alpha^2 - 2[(1+\alpha^2)\Phi(-\alpha) - \alpha\varphi(\alpha)]} $$

    (Donoho, Maleki & Montanari 2009, eq. (4)); the maximum over a grid of
    ``n_alpha`` values of $\alpha \in [0, 6]$ refined by its parabola. Below
    $\rho_{SE}$, AMP (and $\ell_1$ minimisation) recovers $k$-sparse signals
    exactly from noiseless measurements as $N \to \infty$.

    Args:
        delta: $\delta = M/N \in (0, 1]$ (scalar or array).

    Returns:
        $\rho_{SE}(\delta)$, same shape.
    """
    delta = jnp.asarray(delta, jnp.result_type(float))
    alpha = jnp.linspace(0.0, 6.0, n_alpha, dtype=delta.dtype)
    m = (1.0 + alpha**2) * ndtr(-alpha) - alpha * _phi(alpha)
    num = 1.0 - (2.0 / delta[..., None]) * m
    den = 1.0 + alpha**2 - 2.0 * m
    rho = num / den
    i = jnp.clip(jnp.argmax(rho, axis=-1), 1, n_alpha - 2)
    take = lambda j: jnp.take_along_axis(rho, j[..., None], axis=-1)[..., 0]
    r0, r1, r2 = take(i - 1), take(i), take(i + 1)
    # Vertex of the parabola through the three grid points around the maximum.
    denom = r0 - 2.0 * r1 + r2
    return jnp.where(denom < 0, r1 - 0.125 * (r2 - r0) ** 2 / denom, r1)


# ------------------------------------------------------------------ the algorithm


class AMPState(eqx.Module):
    """State of :class:`AMP`: the estimate ``x``, the corrected residual ``z`` and
    the threshold ``theta`` of the last step."""

    x: jax.Array
    z: jax.Array
    theta: jax.Array
    num_steps: jax.Array


class AMP(eqx.Module):
    r"""Soft-threshold AMP (see the module docstring) as a state machine.

    Attributes:
        alpha: threshold multiplier $\alpha$ ($\theta_t = \alpha\|z^t\|/\sqrt M$).
        damping: $\beta \in (0, 1]$: $x^{t+1} \leftarrow \beta x^{t+1} +
            (1-\beta)x^t$ (1 = plain AMP, whose SE is exact; < 1 only to stabilise
            AMP on matrices it was not made for).
    """

    alpha: float = 1.0
    damping: float = eqx.field(static=True, default=1.0)

    def init(self, operator: lx.AbstractLinearOperator, y) -> AMPState:
        x = jnp.zeros(operator.in_structure().shape, y.dtype)
        return AMPState(x, y, jnp.zeros((), y.dtype), jnp.zeros((), jnp.int32))

    def step(self, operator: lx.AbstractLinearOperator, y, state: AMPState) -> AMPState:
        m = y.shape[0]
        tau = jnp.sqrt(jnp.sum(state.z * state.z) / m)
        theta = jnp.asarray(self.alpha, y.dtype) * tau
        r = state.x + operator.transpose().mv(state.z)
        x = soft_threshold(r, theta)
        if self.damping != 1.0:
            x = self.damping * x + (1.0 - self.damping) * state.x
        onsager = jnp.sum(jnp.abs(r) > theta).astype(y.dtype) / m
        z = y - operator.mv(x) + onsager * state.z
        return AMPState(x, z, theta, state.num_steps + 1)


class AMPResult(eqx.Module):
    """Output of :func:`amp`.

    Attributes:
        value: the final estimate $x^T$.
        xs: every iterate, shape ``(n_iterations + 1, N)`` (``xs[0] = 0``), or
            ``None`` with ``save_all=False``.
        tau2: the empirical $\\tau_t^2 = \\|z^t\\|^2/M$, ``t = 0..n_iterations``.
        theta: the thresholds $\\theta_t$ used for $x^{t+1}$.
        lasso_lambda: $\\theta_{T-1}(1 - \\|x^T\\|_0/M)$, the LASSO weight of
            which $x^T$ is the minimiser if AMP has converged.
    """

    value: jax.Array
    xs: jax.Array | None
    tau2: jax.Array
    theta: jax.Array
    lasso_lambda: jax.Array


def amp(
    operator,
    y,
    *,
    alpha,
    n_iterations: int,
    damping: float = 1.0,
    save_all: bool = True,
    warn: bool = True,
) -> AMPResult:
    r"""Run soft-threshold AMP for ``n_iterations`` iterations (``lax.scan``).

    Two sweeps ($A$ and $A^\top$) per iteration. Jittable, vmappable over ``y``.

    Args:
        operator: $A$, a ``lineax.MatrixLinearOperator`` or a 2-D array with
            (approximately) i.i.d. $\mathcal N(0, 1/M)$ entries. Any other
            ``lineax`` operator is accepted with a warning (see the module
            docstring).
        y: the measurements, shape ``(M,)``.
        alpha: threshold multiplier (see :func:`optimal_alpha`).
        n_iterations: number of iterations (static).
        damping: see :class:`AMP`.
        save_all: keep every iterate in ``xs``.
        warn: warn when ``operator`` is not an explicit matrix.

    Returns:
        An :class:`AMPResult`.

    Raises:
        TypeError: if ``operator`` is neither an array nor a lineax operator.
        ValueError: on mismatched shapes.
    """
    if isinstance(operator, jax.Array | np.ndarray):
        if np.ndim(operator) != 2:
            raise ValueError(
                f"`operator` must be a 2-D matrix, got shape {np.shape(operator)}."
            )
        operator = lx.MatrixLinearOperator(jnp.asarray(operator))
    if not isinstance(operator, lx.AbstractLinearOperator):
        raise TypeError(
            "`operator` must be a matrix or a lineax.AbstractLinearOperator, got "
            f"{type(operator).__name__}."
        )
    if warn and not isinstance(operator, lx.MatrixLinearOperator):
        warnings.warn(_WARNING, stacklevel=2)
    if operator.out_structure().shape != jnp.shape(y) or jnp.ndim(y) != 1:
        raise ValueError(
            f"`y` must be a vector of shape {operator.out_structure().shape} (the "
            f"operator's output), got {jnp.shape(y)}."
        )
    method = AMP(alpha=alpha, damping=damping)
    state = method.init(operator, y)
    m = y.shape[0]

    def body(s, _):
        new = method.step(operator, y, s)
        return new, (new.x if save_all else None, jnp.sum(s.z * s.z) / m, new.theta)

    final, (xs, tau2, theta) = lax.scan(body, state, None, length=int(n_iterations))
    tau2 = jnp.concatenate([tau2, (jnp.sum(final.z * final.z) / m)[None]])
    if save_all:
        xs = jnp.concatenate([state.x[None], xs])
    support = jnp.sum(final.x != 0).astype(y.dtype)
    lam = final.theta * (1.0 - support / m)
    return AMPResult(final.x, xs, tau2, theta, lam)
