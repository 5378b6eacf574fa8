r"""Linear forward operators built from a model run.

For sparse or TV recovery the forward operator is the physics: sensors $\circ$
the implicit solution operator, e.g. a source field $f \mapsto H u(t_k)$ with
$u_t = \nabla\cdot(\kappa\nabla u) + f$, $u(0) = 0$. It is never a matrix: $Ax$ is
one forward run of :func:`dphys.simulate`, and $A^\top y$ one adjoint run, which
``jax.linear_transpose`` derives from the same transposition rules the core's
reverse mode uses (one transposed implicit solve per step, see
:mod:`dphys`), without storing a trajectory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import lineax as lx


def physics_operator(fn: Callable, x_like, *, tags=()) -> lx.FunctionLinearOperator:
    r"""The linear map ``fn`` (e.g. a source field to sensor values through
    :func:`dphys.simulate`) as a ``lineax`` operator.

    ``operator.mv(x)`` runs the model; ``operator.transpose().mv(y)`` runs its
    adjoint (transposed implicit solves, via ``jax.linear_transpose``). Check the
    pair with ``dphys.testing.dot_test(operator.mv, operator.transpose().mv, x)``.

    Args:
        fn: a function linear in its argument (affine terms, such as a boundary
            value or a background run, belong in the data, not in ``fn``).
        x_like: an example input (array, pytree or ``jax.ShapeDtypeStruct``s).
        tags: ``lineax`` tags (e.g. ``lx.symmetric_tag``).

    Returns:
        A ``lineax.FunctionLinearOperator``.

    Raises:
        TypeError: if ``fn`` is not callable.
    """
    if not callable(fn):
        raise TypeError(f"`fn` must be a callable linear map, got {type(fn).__name__}.")
    struct = jax.eval_shape(lambda: x_like)
    return lx.FunctionLinearOperator(fn, struct, tags=tags)
