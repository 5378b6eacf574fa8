"""PDE models built on :mod:`dphys`: heat, advection, shallow water."""

from ._advection import Advection as Advection
from ._heat import Heat as Heat, check_positive as check_positive
from ._shallow_water import (
    HelmholtzKrylov as HelmholtzKrylov,
    ShallowWater as ShallowWater,
    SWState as SWState,
)
