"""dphys: differentiable implicit PDE simulators in JAX.

The core of the ``dphys`` distribution: grids, matrix-free operators, structured
implicit solvers, implicit/IMEX steppers, adjoints, :func:`simulate`, and the public
gradient checks in :mod:`dphys.testing`. PDE models live in :mod:`pdes`; data
assimilation in :mod:`assimilation`.
"""

from . import operators as operators
from ._adjoint import (
    AbstractAdjoint as AbstractAdjoint,
    Checkpointed as Checkpointed,
    Unrolled as Unrolled,
    nested_scan as nested_scan,
)
from ._checks import check_positive as check_positive
from ._grid import Grid as Grid
from ._model import AbstractModel as AbstractModel, Augmented as Augmented
from ._results import RESULTS as RESULTS
from ._simulate import (
    SaveAt as SaveAt,
    SimulationError as SimulationError,
    Trajectory as Trajectory,
    simulate as simulate,
)
from ._solver import (
    FFT as FFT,
    AbstractLinearSolver as AbstractLinearSolver,
    Auto as Auto,
    FactoredSymbol as FactoredSymbol,
    Krylov as Krylov,
    Tridiagonal as Tridiagonal,
    krylov_solve as krylov_solve,
    probe_diagonal as probe_diagonal,
    probe_symbol as probe_symbol,
    probe_tridiagonal as probe_tridiagonal,
)
from ._stepper import (
    BDF2 as BDF2,
    IMEX as IMEX,
    AbstractStepper as AbstractStepper,
    BackwardEuler as BackwardEuler,
    CrankNicolson as CrankNicolson,
    FullyImplicit as FullyImplicit,
    LinearSolveState as LinearSolveState,
    Theta as Theta,
)
from ._version import version as _read_version


__version__: str = _read_version()
"""The distribution's version (package metadata; ``pyproject.toml`` is its source)."""
