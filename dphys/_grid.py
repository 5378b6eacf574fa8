"""Uniform 1D/2D grids with per-axis boundary kinds."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import numpy as np

from ._checks import check_finite, check_positive


BoundaryKind = Literal["periodic", "dirichlet", "neumann"]
BOUNDARY_KINDS: tuple[str, ...] = ("periodic", "dirichlet", "neumann")


class Grid(eqx.Module):
    r"""A uniform tensor-product grid in one or two dimensions.

    Where the unknowns sit depends on the boundary kind of each axis, so that every
    boundary condition is second-order accurate and the discrete operators have
    exactly known eigenvectors:

    * ``"periodic"``: nodes $x_i = x_0 + i\,\Delta x$, $\Delta x = L/N$, $i=0..N-1$;
      $x_0 + L$ is identified with $x_0$.
    * ``"dirichlet"``: interior nodes $x_i = x_0 + (i+1)\Delta x$, $\Delta x = L/(N+1)$;
      the boundary nodes $x_0$ and $x_0+L$ carry $u = 0$ (homogeneous Dirichlet).
    * ``"neumann"``: cell centres $x_i = x_0 + (i+\tfrac12)\Delta x$, $\Delta x = L/N$;
      the boundary faces carry zero normal flux.

    Attributes:
        shape: number of unknowns per axis, ``(nx,)`` or ``(ny, nx)`` (array order;
            the last axis is ``x``).
        lengths: domain length per axis in model units, same order as ``shape``.
        boundary: boundary kind per axis, same order as ``shape``.
        origin: coordinate of the domain's lower corner per axis.

    Everything is static metadata: a grid is hashable and never traced.

    Example:
        >>> g = Grid((64,), lengths=(1.0,), boundary="periodic")
        >>> float(g.spacing[0])
        0.015625
    """

    shape: tuple[int, ...] = eqx.field(static=True)
    lengths: tuple[float, ...] = eqx.field(static=True)
    boundary: tuple[str, ...] = eqx.field(static=True)
    origin: tuple[float, ...] = eqx.field(static=True)

    def __init__(
        self,
        shape: int | tuple[int, ...],
        lengths: float | tuple[float, ...] = 1.0,
        boundary: str | tuple[str, ...] = "periodic",
        origin: float | tuple[float, ...] = 0.0,
    ):
        if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
            shape = (shape,)
        if isinstance(shape, (str, bytes)) or not isinstance(shape, Iterable):
            raise TypeError(
                f"`shape` must be an int or a tuple of ints (points per axis), got "
                f"{type(shape).__name__} {shape!r}."
            )
        shape = tuple(shape)
        for n in shape:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise TypeError(
                    f"`shape` entries must be integers (numbers of points), got "
                    f"{shape!r}; a fractional size would be silently truncated."
                )
        ndim = len(shape)

        def per_axis(value, name):
            if isinstance(value, (tuple, list)):
                if len(value) != ndim:
                    raise ValueError(
                        f"`{name}` has {len(value)} entries but the grid has {ndim} "
                        f"axes (shape={shape}); give one value per axis or a scalar."
                    )
                return tuple(value)
            return (value,) * ndim

        def real(values, name):
            try:
                return tuple(float(v) for v in values)
            except (TypeError, ValueError):
                raise TypeError(
                    f"`{name}` must be a real number or one per axis, got {values!r}."
                ) from None

        self.shape = tuple(int(n) for n in shape)
        self.lengths = real(per_axis(lengths, "lengths"), "lengths")
        self.boundary = tuple(str(b) for b in per_axis(boundary, "boundary"))
        self.origin = real(per_axis(origin, "origin"), "origin")

    def __check_init__(self):
        if len(self.shape) not in (1, 2):
            raise ValueError(
                f"`shape` must have 1 or 2 axes, got {self.shape}; dphys supports 1D "
                "and 2D grids."
            )
        for n in self.shape:
            if n < 3:
                raise ValueError(
                    f"`shape` needs at least 3 points per axis, got {self.shape}."
                )
        check_positive(
            self.lengths,
            "lengths",
            fix=f"Got lengths={self.lengths}; give the domain's length along each "
            "axis, e.g. lengths=1.0.",
        )
        check_finite(self.origin, "origin")
        for b in self.boundary:
            if b not in BOUNDARY_KINDS:
                raise ValueError(
                    f"`boundary` must be one of {BOUNDARY_KINDS}, got {b!r}."
                )

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def periodic(self) -> bool:
        """True when every axis is periodic (FFT diagonalisation is possible)."""
        return all(b == "periodic" for b in self.boundary)

    @property
    def spacing(self) -> tuple[float, ...]:
        """Grid spacing $\\Delta x$ per axis."""
        return tuple(
            length / (n + 1) if b == "dirichlet" else length / n
            for n, length, b in zip(self.shape, self.lengths, self.boundary)
        )

    @property
    def cell_volume(self) -> float:
        """Volume (length/area) a grid value stands for; used in mass integrals."""
        return math.prod(self.spacing)

    def axis_coords(self, axis: int) -> np.ndarray:
        """1D coordinates of the unknowns along ``axis`` (NumPy, static)."""
        n, dx, b, x0 = (
            self.shape[axis],
            self.spacing[axis],
            self.boundary[axis],
            self.origin[axis],
        )
        offset = {"periodic": 0.0, "dirichlet": 1.0, "neumann": 0.5}[b]
        return x0 + (np.arange(n) + offset) * dx

    @property
    def coords(self) -> tuple[jnp.ndarray, ...]:
        """Meshgrid of coordinates, each of shape ``self.shape`` (``ij`` indexing)."""
        axes = [jnp.asarray(self.axis_coords(a)) for a in range(self.ndim)]
        return tuple(jnp.meshgrid(*axes, indexing="ij"))

    def integrate(self, u):
        """Discrete integral $\\sum_i u_i\\,\\Delta V$ over the grid's trailing axes."""
        axes = tuple(range(-self.ndim, 0))
        return jnp.sum(u, axis=axes) * self.cell_volume

    def check_field(self, value, name: str, *, allow_scalar: bool = True):
        """Raise a clear error unless ``value`` is a scalar or a field on this grid."""
        shape = jnp.shape(value)
        if shape == () and allow_scalar:
            return
        if shape != self.shape:
            expect = "a scalar or " if allow_scalar else ""
            raise ValueError(
                f"`{name}` must be {expect}an array of the grid's shape {self.shape}, "
                f"got shape {shape}."
            )
