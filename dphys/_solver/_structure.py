r"""What the iterative solvers take from $L$ once: its stencil and a preconditioner.

:class:`dphys.Krylov` and :class:`dphys.Multigrid` share this: ``init`` probes $L$
(:func:`build`), ``factor`` builds the preconditioner for one $\gamma$
(:func:`factor`), and a solve asks for the product with $I-\gamma L$
(:func:`operator`) and the preconditioner (:func:`preconditioner`).

**Assembled products.** When the model declares its stencil
(:attr:`dphys.AbstractModel.stencil_offsets`) and $L$ does not depend on time, $L$
is probed once into per-point coefficients and every product with $I-\gamma L$ is
one pass over them. This is exact, not an approximation: the probe is checked
against ``model.linear`` on a test field when the run starts (a declared stencil
that misses a coupling raises there), and the coefficients are differentiable
functions of the model's parameters, so the implicit-function-theorem derivative is
unchanged. On P6's variable-$\kappa$ Laplacian a product costs about a third of
:func:`dphys.operators.laplacian`'s, which recomputes face coefficients every call
(``docs/design.md``).

**Preconditioners** (each built without derivatives: they change the iterations,
never the solution):

* ``"jacobi"``: $\mathrm{diag}(I-\gamma L)^{-1}$.
* ``"fourier"``: $(I-\gamma\bar L)^{-1}$ with $\bar L$ the translation average of
  $L$ (fully periodic grids; :mod:`dphys._solver._fourier_precond`).
* ``"multigrid"``: one Galerkin V-cycle (single-field states;
  :mod:`dphys._solver._vcycle`).

Preconditioners need only an approximate stencil: without a declared one they probe
a $3^d$ box, which is exact for every 3-point-per-axis operator and merely a weaker
preconditioner otherwise.
"""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ._fft import FFT
from ._fourier_precond import FourierPreconditioner, mean_symbol
from ._probes import probe_diagonal
from ._stencil import Stencil, box_offsets, model_stencil, stencil_mismatch
from ._vcycle import build_hierarchy, hierarchy, make_cycle


PRECONDITIONERS: tuple[str | None, ...] = (None, "jacobi", "fourier", "multigrid")

# A probed stencil reproduces `linear` to round-off (about 1e-16 relative); a
# missed coupling shows at O(0.1). The threshold sits far from both.
_MISMATCH_EPS = 1e4

STENCIL_MISMATCH = (
    "The stencil probed from the model's `linear` with its declared "
    "`stencil_offsets` does not reproduce `linear` on a test field: the operator "
    "couples points outside those offsets (or across a non-periodic boundary). Fix "
    "the model's `stencil_offsets` (None when unknown), or pass `assemble=False` to "
    "the solver."
)


class CycleOptions(eqx.Module):
    """The V-cycle's settings (see :class:`dphys.Multigrid`)."""

    sweeps: int = eqx.field(static=True, default=2)
    omega: float | None = eqx.field(static=True, default=None)
    max_coarse: int = eqx.field(static=True, default=64)

    def damping(self, ndim: int) -> float:
        # Damped Jacobi's best smoothing factor for the 3-point (1D) and 5-point
        # (2D) Laplacians: omega = 2/3 and 4/5 (Trottenberg et al. 2001, sec. 2.1).
        if self.omega is not None:
            return self.omega
        return 2.0 / 3.0 if ndim == 1 else 0.8


class LinearStructure(eqx.Module):
    r"""What an iterative solver extracted from $L$ (see the module docstring).

    Attributes:
        stencil: the assembled stencil of $L$ used for products, or ``None``
            (products call ``model.linear``).
        precond: the preconditioner's data: ``None``; for ``"jacobi"`` the
            diagonal of $L$ (leaves), once factored that of $(I-\gamma L)^{-1}$;
            for ``"fourier"`` the mean symbol, once factored a
            :class:`dphys.FactoredSymbol`; for ``"multigrid"`` the Galerkin
            hierarchy, once factored the V-cycle.
        kind: the preconditioner (static).
        factored: whether ``precond`` is built for one $\gamma$ (static).
        treedef: the state's pytree structure (static).
    """

    stencil: Stencil | None
    precond: Any
    kind: str | None = eqx.field(static=True)
    factored: bool = eqx.field(static=True)
    treedef: Any = eqx.field(static=True)


def _apply_fn(model, t, treedef):
    def apply(fields):
        return jtu.tree_leaves(model.linear(t, jtu.tree_unflatten(treedef, fields)))

    return apply


def _stop(tree):
    return jtu.tree_map(
        lambda a: jax.lax.stop_gradient(a) if eqx.is_array(a) else a, tree
    )


def build(model, t, like, *, kind, assemble: bool, cycle: CycleOptions):
    """:class:`LinearStructure` of ``model.linear(t, .)`` (the solvers' ``init``)."""
    leaves, treedef = jtu.tree_flatten(like)
    offsets = model.stencil_offsets
    stencil = None
    if assemble and offsets is not None and model.autonomous:
        stencil, _ = model_stencil(model, t, like, offsets)
        mismatch = stencil_mismatch(_apply_fn(model, t, treedef), stencil, leaves)
        eps = float(jnp.finfo(leaves[0].dtype).eps)
        coefficients = eqx.error_if(
            stencil.coefficients, mismatch > _MISMATCH_EPS * eps, STENCIL_MISMATCH
        )
        stencil = Stencil(coefficients, stencil.boundary, stencil.offsets)
    precond = None
    if kind == "jacobi":
        if stencil is not None:
            diag = stencil.center()
            precond = [diag[a, a] for a in range(diag.shape[0])]
        else:
            precond = jtu.tree_leaves(probe_diagonal(model, t, like))
        precond = _stop(precond)
    elif kind in ("fourier", "multigrid"):
        if stencil is not None:
            pstencil = stencil
        else:
            pstencil, _ = model_stencil(model, t, like, box_offsets(model.grid.ndim))
        pstencil = _stop(pstencil)
        if kind == "fourier":
            precond = mean_symbol(pstencil)
        else:
            precond = build_hierarchy(pstencil, cycle.max_coarse)
    return LinearStructure(stencil, precond, kind, False, treedef)


def factor(structure: LinearStructure, gamma, cycle: CycleOptions):
    r"""``structure`` with its preconditioner built for this $\gamma$."""
    if structure.factored:
        return structure
    gamma = jax.lax.stop_gradient(gamma)
    p = structure.precond
    if structure.kind == "jacobi":
        p = [1.0 / (1.0 - gamma * d) for d in p]
    elif structure.kind == "fourier":
        p = FFT().factor(p, gamma)
    elif structure.kind == "multigrid":
        ndim = len(p.shapes[0])
        p = make_cycle(p, gamma, sweeps=cycle.sweeps, omega=cycle.damping(ndim))
    return LinearStructure(
        structure.stencil, p, structure.kind, True, structure.treedef
    )


def operator(model, t, gamma, structure: LinearStructure):
    r"""$x \mapsto (I-\gamma L)x$ on state pytrees (assembled when possible)."""
    stencil, treedef = structure.stencil, structure.treedef
    if stencil is not None:

        def mv(x):
            lx_ = stencil.mv(jtu.tree_leaves(x))
            return jtu.tree_map(
                lambda a, b: a - gamma * b, x, jtu.tree_unflatten(treedef, lx_)
            )

        return mv

    def mv(x):
        return jtu.tree_map(lambda a, b: a - gamma * b, x, model.linear(t, x))

    return mv


def preconditioner(model, structure: LinearStructure):
    """The factored preconditioner as a function on state pytrees, or ``None``."""
    p, treedef = structure.precond, structure.treedef
    if structure.kind is None:
        return None
    if structure.kind == "jacobi":
        return lambda x: jtu.tree_unflatten(
            treedef, [d * v for d, v in zip(p, jtu.tree_leaves(x), strict=True)]
        )
    if structure.kind == "fourier":
        fourier = FourierPreconditioner(p)
        return lambda x: fourier(model, x)
    return lambda x: jtu.tree_unflatten(treedef, [p(jtu.tree_leaves(x)[0])])


def check(model, like, kind, cycle: CycleOptions, owner: str) -> None:
    """Raise ``ValueError`` if preconditioner ``kind`` cannot serve ``model``."""
    if kind == "fourier" and not model.grid.periodic:
        raise ValueError(
            f"`{owner}` with the Fourier preconditioner needs a fully periodic grid, "
            f"got boundary={model.grid.boundary}; use `preconditioner='multigrid'` "
            "(single field) or None."
        )
    if kind == "multigrid":
        leaves = jtu.tree_leaves(like)
        if len(leaves) != 1:
            raise ValueError(
                f"`{owner}` with multigrid needs a single-field state, got "
                f"{len(leaves)} fields; use `preconditioner='fourier'` (periodic "
                "grids), 'jacobi' or None for coupled fields."
            )
        shapes = hierarchy(model.grid.shape, model.grid.boundary, cycle.max_coarse)
        size = 1
        for n in shapes[-1]:
            size *= n
        if size > 4096:
            raise ValueError(
                f"`{owner}`: the grid {model.grid.shape} (boundary="
                f"{model.grid.boundary}) only coarsens to {shapes[-1]}, too large for "
                "the dense coarsest solve (at most 4096 points). Periodic axes halve "
                "only while their length is even: use lengths with a large power of "
                "two, or raise `max_coarse` no further than that."
            )
