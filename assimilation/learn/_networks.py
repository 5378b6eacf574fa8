r"""Small networks on the model grid and on scalar features.

* :class:`GridCNN`: a convolutional network on the model grid whose padding follows
  the grid's boundary kinds (periodic axes wrap, walls and Dirichlet/Neumann axes
  repeat the edge value), so it is translation equivariant on periodic grids.
* :class:`ScalarMLP`: a multilayer perceptron on a handful of scalar features.

Both can start as the zero map (``zero_init=True``), so that a learned correction
added to a classical step leaves that step unchanged before training.
"""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu

import dphys


def _zero_last(layer):
    layer = eqx.tree_at(lambda c: c.weight, layer, jnp.zeros_like(layer.weight))
    if layer.bias is not None:
        layer = eqx.tree_at(lambda c: c.bias, layer, jnp.zeros_like(layer.bias))
    return layer


def _pad(x, grid: dphys.Grid, width: int):
    """Pad the trailing grid axes of ``x`` (channels first) by ``width`` cells."""
    for a, kind in enumerate(grid.boundary):
        ax = x.ndim - grid.ndim + a
        pads = [(0, 0)] * x.ndim
        pads[ax] = (width, width)
        x = jnp.pad(x, pads, mode="wrap" if kind == "periodic" else "edge")
    return x


class GridCNN(eqx.Module):
    r"""A convolutional network on the model grid, channels first.

    ``depth`` hidden convolutions of ``width`` channels with ``activation``, then a
    final convolution to ``out_channels``, all with ``kernel_size`` stencils. Each
    convolution pads by the grid's boundary kinds (see the module docstring), so the
    output has the grid's shape.

    Attributes:
        grid: the model grid (static metadata).
        layers: the convolutions (``equinox.nn.Conv``).
        activation: the hidden nonlinearity.
        kernel_size: stencil width (odd).

    Example:
        >>> import jax.random as jr, dphys
        >>> grid = dphys.Grid((8, 8), boundary="periodic")
        >>> net = GridCNN(grid, 3, 1, key=jr.key(0))
        >>> net(jnp.ones((3, 8, 8))).shape
        (1, 8, 8)
    """

    grid: dphys.Grid
    layers: tuple
    activation: Callable = eqx.field(static=True)
    kernel_size: int = eqx.field(static=True)

    def __init__(
        self,
        grid: dphys.Grid,
        in_channels: int,
        out_channels: int,
        *,
        width: int = 16,
        depth: int = 2,
        kernel_size: int = 3,
        activation: Callable = jax.nn.gelu,
        zero_init: bool = True,
        dtype=None,
        key,
    ):
        if not isinstance(grid, dphys.Grid):
            raise TypeError(f"`grid` must be a dphys.Grid, got {type(grid).__name__}.")
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"`kernel_size` must be odd and >= 1, got {kernel_size}.")
        if depth < 0 or width < 1:
            raise ValueError(
                f"`depth` must be >= 0 and `width` >= 1, got {depth} and {width}."
            )
        dtype = jnp.result_type(float) if dtype is None else dtype
        sizes = [in_channels] + [width] * depth + [out_channels]
        keys = jr.split(key, len(sizes) - 1)
        layers = [
            eqx.nn.Conv(grid.ndim, a, b, kernel_size, dtype=dtype, key=k)
            for a, b, k in zip(sizes[:-1], sizes[1:], keys, strict=True)
        ]
        if zero_init:
            layers[-1] = _zero_last(layers[-1])
        self.grid = grid
        self.layers = tuple(layers)
        self.activation = activation
        self.kernel_size = kernel_size

    def __call__(self, x):
        """``(in_channels, *grid.shape)`` to ``(out_channels, *grid.shape)``."""
        w = self.kernel_size // 2
        for i, conv in enumerate(self.layers):
            x = conv(_pad(x, self.grid, w))
            if i < len(self.layers) - 1:
                x = self.activation(x)
        return x


class ScalarMLP(eqx.Module):
    """A small MLP from ``in_size`` scalar features to ``out_size`` outputs.

    Attributes:
        mlp: the ``equinox.nn.MLP``.
    """

    mlp: eqx.nn.MLP

    def __init__(
        self,
        in_size: int,
        out_size: int,
        *,
        width: int = 16,
        depth: int = 2,
        zero_init: bool = True,
        dtype=None,
        key,
    ):
        dtype = jnp.result_type(float) if dtype is None else dtype
        mlp = eqx.nn.MLP(
            in_size, out_size, width, depth, activation=jnp.tanh, dtype=dtype, key=key
        )
        if zero_init:
            mlp = eqx.tree_at(lambda m: m.layers[-1], mlp, _zero_last(mlp.layers[-1]))
        self.mlp = mlp

    def __call__(self, x):
        return self.mlp(x)


# ----------------------------------------------------------------- field <-> channels


def to_channels(tree):
    """Stack the leaves of a state-shaped pytree as channels: ``(n_leaves, *grid)``."""
    return jnp.stack(jtu.tree_leaves(tree))


def from_channels(channels, like):
    """Inverse of :func:`to_channels` onto the structure of ``like``."""
    leaves, treedef = jtu.tree_flatten(like)
    return jtu.tree_unflatten(
        treedef, [channels[i].astype(leaf.dtype) for i, leaf in enumerate(leaves)]
    )


def rms(x, eps: float = 1e-30):
    """Root mean square of an array or pytree, floored at ``sqrt(eps)``."""
    leaves = jtu.tree_leaves(x)
    n = sum(leaf.size for leaf in leaves)
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in leaves) / n + eps)
