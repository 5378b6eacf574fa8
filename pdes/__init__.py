"""PDE models built on :mod:`dphys`: heat, advection, shallow water."""

from ._advection import Advection as Advection
from ._heat import Heat as Heat, check_positive as check_positive
from ._helmholtz import HelmholtzKrylov as HelmholtzKrylov
from ._shallow_water import ShallowWater as ShallowWater, SWState as SWState
