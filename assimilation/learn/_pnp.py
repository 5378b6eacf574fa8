r"""Plug-and-play priors: a learned denoiser in place of a proximal operator.

* :class:`DenoisingCNN` — a small residual CNN, $\mathcal D(x) = x - N_\phi(x)$,
  trained (:func:`train_denoiser`) to remove Gaussian noise of a given level from
  fields drawn from the model's state distribution.
* :class:`assimilation.learn.PnP` uses it as the proximal step of any proximal
  method (Venkatakrishnan, Bouman & Wohlberg 2013), e.g. ``HQS``.
* :class:`RED` — regularisation by denoising (Romano, Elad & Milanfar 2017): the
  smooth prior $\tfrac\lambda2\langle x, x - \mathcal D(x)\rangle$ with the RED
  gradient $\lambda(x - \mathcal D(x))$ (exact for denoisers with a symmetric
  Jacobian that are locally homogeneous), added to a data misfit.
* :class:`UnrolledHQS` — $K$ steps of half-quadratic splitting with learned
  penalties $\rho_k$ and the denoiser: $x_k = (A^\top A + \rho_k I)^{-1}
  (A^\top y + \rho_k z_{k-1})$ (CG on the physics' normal equations), $z_k =
  \mathcal D(x_k)$; trainable end to end (penalties and denoiser).

References:
    S. V. Venkatakrishnan, C. A. Bouman and B. Wohlberg (2013), "Plug-and-play
    priors for model based reconstruction", IEEE GlobalSIP.
    Y. Romano, M. Elad and P. Milanfar (2017), "The little engine that could:
    regularization by denoising (RED)", SIAM J. Imaging Sci. 10(4).
    K. Zhang, W. Zuo, S. Gu and L. Zhang (2017), "Learning deep CNN denoiser prior
    for image restoration", CVPR (unrolled HQS with a CNN denoiser).
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import lineax as lx
import optax

from ._composite import AbstractSmooth, _dot


class DenoisingCNN(eqx.Module):
    r"""A small residual CNN denoiser for 2-D fields, $\mathcal D(x) = x -
    N_\phi(x)$ ($N_\phi$: ``depth`` 3x3 convolutions with ``width`` channels and
    ReLU, zero ('SAME') padding). The last convolution starts at zero, so the
    untrained denoiser is the identity.

    Attributes:
        convs: the convolutions.
    """

    convs: tuple[eqx.nn.Conv2d, ...]

    def __init__(self, *, key, width: int = 16, depth: int = 4, dtype=None):
        if depth < 2:
            raise ValueError(f"`depth` must be >= 2, got {depth}.")
        keys = jr.split(key, depth)
        chans = [1] + [width] * (depth - 1) + [1]
        convs = tuple(
            eqx.nn.Conv2d(
                chans[i], chans[i + 1], 3, padding="SAME", key=keys[i], dtype=dtype
            )
            for i in range(depth)
        )
        # The last layer starts at zero: the untrained denoiser is the identity.
        last = convs[-1]
        last = eqx.tree_at(
            lambda c: (c.weight, c.bias),
            last,
            (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)),
        )
        self.convs = (*convs[:-1], last)

    def __call__(self, x):
        h = x[None]
        for conv in self.convs[:-1]:
            h = jax.nn.relu(conv(h))
        return x - self.convs[-1](h)[0]


def train_denoiser(
    denoiser,
    fields,
    *,
    key,
    noise_std: float,
    n_steps: int,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    val_fields=None,
):
    """Train ``denoiser`` to map ``x + noise_std * e`` back to ``x`` (mean squared
    error, fresh noise per example and step) with :func:`assimilation.learn.fit`.

    Args:
        denoiser: e.g. a :class:`DenoisingCNN`.
        fields: clean training fields, shape ``(n, *field_shape)``, drawn from the
            model's state distribution.
        key: PRNG key (shuffling and noise).
        noise_std: the noise level (field units).
        n_steps, batch_size, learning_rate: the optimisation.
        val_fields: optional validation fields.

    Returns:
        The :class:`assimilation.learn.FitResult`.
    """
    from ._train import fit

    def loss(net, x, key):
        noisy = x + noise_std * jr.normal(key, x.shape, x.dtype)
        return jnp.mean((net(noisy) - x) ** 2)

    return fit(
        denoiser,
        loss,
        fields,
        optimizer=optax.adam(learning_rate),
        key=key,
        batch_size=batch_size,
        n_steps=n_steps,
        val_data=val_fields,
    )


class RED(AbstractSmooth):
    r"""A data misfit plus regularisation by denoising:
    $f(x) = f_{\mathrm{data}}(x) + \tfrac\lambda2\langle x, x - \mathcal D(x)\rangle$,
    with the RED gradient $\nabla f_{\mathrm{data}} + \lambda(x - \mathcal D(x))$.

    Attributes:
        data: the misfit (e.g. :class:`assimilation.learn.LeastSquares`).
        denoiser: $\mathcal D$.
        lam: $\lambda \ge 0$.
    """

    data: AbstractSmooth
    denoiser: Callable
    lam: jax.Array

    def __init__(self, data: AbstractSmooth, denoiser: Callable, lam):
        if not isinstance(data, AbstractSmooth):
            raise TypeError(
                f"`data` must be an AbstractSmooth misfit, got {type(data).__name__}."
            )
        self.data = data
        self.denoiser = denoiser
        self.lam = jnp.asarray(lam)

    def value(self, x):
        return self.data.value(x) + 0.5 * self.lam * _dot(x, x - self.denoiser(x))

    def value_and_grad(self, x):
        fd, gd = self.data.value_and_grad(x)
        residual = x - self.denoiser(x)
        value = fd + 0.5 * self.lam * _dot(x, residual)
        return value, gd + self.lam * residual


class UnrolledHQS(eqx.Module):
    r"""$K$ steps of half-quadratic splitting with learned penalties and a denoiser.

    $x_k = (A^\top A + \rho_k I)^{-1}(A^\top y + \rho_k z_{k-1})$ approximately, by
    ``cg_steps`` CG iterations warm-started at $z_{k-1}$ (differentiated through
    its iterations: the gradient is that of the truncated solve), $z_k = \mathcal
    D(x_k)$, $z_0 = 0$; returns $z_K$. $\rho_k = \exp(\text{log\_rhos}_k)$.

    Attributes:
        operator: $A$ (fixed).
        denoiser: $\mathcal D$ (learned or fixed).
        log_rhos: ``(K,)`` (learned).
        cg_steps: CG iterations per data step (static).
    """

    operator: lx.AbstractLinearOperator
    denoiser: Callable
    log_rhos: jax.Array
    cg_steps: int = eqx.field(static=True)

    def __init__(self, operator, denoiser, rhos, *, cg_steps: int = 20):
        if not isinstance(operator, lx.AbstractLinearOperator):
            raise TypeError(
                "`operator` must be a lineax.AbstractLinearOperator, got "
                f"{type(operator).__name__}."
            )
        self.operator = operator
        self.denoiser = denoiser
        self.log_rhos = jnp.log(jnp.asarray(rhos))
        self.cg_steps = int(cg_steps)

    def __call__(self, y):
        a, at = self.operator, self.operator.transpose()
        aty = at.mv(y)
        z = jnp.zeros_like(aty)
        for log_rho in self.log_rhos:
            rho = jnp.exp(log_rho)
            x = _cg(
                lambda v, rho=rho: at.mv(a.mv(v)) + rho * v,
                aty + rho * z,
                z,
                self.cg_steps,
            )
            z = self.denoiser(x)
        return z


def _cg(matvec, b, x0, n_steps):
    """``n_steps`` conjugate-gradient iterations from ``x0`` (``lax.fori_loop`` with
    a fixed trip count): differentiable through its iterations, so that the
    gradient is that of the truncated solve actually computed."""

    def body(_, c):
        x, r, p, rr = c
        ap = matvec(p)
        alpha = rr / jnp.maximum(jnp.vdot(p, ap), jnp.finfo(b.dtype).tiny)
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = jnp.vdot(r, r)
        p = r + (rr_new / jnp.maximum(rr, jnp.finfo(b.dtype).tiny)) * p
        return x, r, p, rr_new

    r = b - matvec(x0)
    x, *_ = jax.lax.fori_loop(0, n_steps, body, (x0, r, r, jnp.vdot(r, r)))
    return x


def unrolled_hqs_leaves(model: UnrolledHQS, *, denoiser: bool = True):
    """Filter spec of the learned leaves of an :class:`UnrolledHQS`: the penalties,
    and the denoiser's weights if ``denoiser``."""
    spec = jax.tree_util.tree_map(lambda _: False, model)
    spec = eqx.tree_at(lambda m: m.log_rhos, spec, True)
    if denoiser:
        spec = eqx.tree_at(
            lambda m: m.denoiser,
            spec,
            jax.tree_util.tree_map(eqx.is_inexact_array, model.denoiser),
        )
    return spec
