"""Variational data assimilation and calibration on top of :mod:`pdes`/:mod:`dphys`."""

from ._control import (
    AbstractTransform as AbstractTransform,
    Bounded as Bounded,
    Control as Control,
    Identity as Identity,
    InitialState as InitialState,
    Log as Log,
    ModelError as ModelError,
    Parameter as Parameter,
    Softplus as Softplus,
)
from ._cost import FourDVar as FourDVar
from ._covariance import (
    AbstractCovariance as AbstractCovariance,
    Dense as Dense,
    Diagonal as Diagonal,
    Diffusion as Diffusion,
)
from ._observation import (
    AbstractObservationOperator as AbstractObservationOperator,
    Interpolation as Interpolation,
    Observations as Observations,
    TimeInterpolation as TimeInterpolation,
)
from ._variational import (
    LBFGS as LBFGS,
    AbstractMethod as AbstractMethod,
    Analysis as Analysis,
    GaussNewton as GaussNewton,
    History as History,
    IterationState as IterationState,
    Posterior as Posterior,
    assimilate as assimilate,
    minimize as minimize,
    posterior as posterior,
)
from ._twin import (
    TwinResult as TwinResult,
    make_observations as make_observations,
    twin_experiment as twin_experiment,
)
