"""PDE models built on :mod:`dphys`: heat, advection, shallow water."""

import warnings

from ._advection import Advection as Advection
from ._heat import Heat as Heat
from ._helmholtz import HelmholtzKrylov as HelmholtzKrylov
from ._shallow_water import ShallowWater as ShallowWater, SWState as SWState


def __getattr__(name: str):
    # Deprecated names, kept working with a warning that says where they went.
    if name == "check_positive":
        warnings.warn(
            "`pdes.check_positive` is deprecated: it moved to the core as "
            "`dphys.check_positive` (same signature); import it from there.",
            DeprecationWarning,
            stacklevel=2,
        )
        import dphys

        return dphys.check_positive
    raise AttributeError(f"module 'pdes' has no attribute {name!r}")
