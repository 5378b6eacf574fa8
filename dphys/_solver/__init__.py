r"""Structured solvers for the implicit systems $(I - \gamma L)\,x = b$.

Every implicit stepper reduces to this system with $\gamma = \theta\,\Delta t$ (or
$\tfrac23\Delta t$ for BDF2). The solvers split their work in two:

* ``init(model, t)`` extracts the structure of $L$ once (its Fourier symbol, its
  bands, its diagonal) by *probing* the matrix-free operator: applying it to a few
  impulse or comb vectors. Nothing model-specific is hand-coded, so every model
  written with :mod:`dphys` operators gets every solver for free.
* ``solve(model, t, gamma, b, structure)`` solves with a possibly traced ``gamma``.

Differentiation. None of these solvers is differentiated through its iterations:

* :class:`FFT` and :class:`Tridiagonal` are direct: their reverse-mode derivative is
  exactly one solve with the transposed operator (the FFT diagonalisation and LAPACK
  ``gtsv``/XLA tridiagonal solve have closed-form transposes).
* :class:`Krylov` calls ``lineax.linear_solve``, whose derivative is given by the
  implicit function theorem: $\bar b = A^{-T}\bar x$, $\bar p = -\bar b^T
  (\partial A/\partial p)\,x$, one transposed Krylov solve per step, with memory
  independent of the iteration count. Tangent and adjoint solves raise if they fail
  to converge, so an unconverged solve can never give a silently wrong gradient.
"""

from ._auto import Auto as Auto, resolve_solver as resolve_solver
from ._base import (
    AbstractLinearSolver as AbstractLinearSolver,
    FactoredSymbol as FactoredSymbol,
)
from ._fft import FFT as FFT
from ._krylov import Krylov as Krylov, krylov_solve as krylov_solve
from ._probes import (
    probe_diagonal as probe_diagonal,
    probe_symbol as probe_symbol,
    probe_tridiagonal as probe_tridiagonal,
)
from ._tridiagonal import Tridiagonal as Tridiagonal
