"""Variational data assimilation and calibration on top of :mod:`pdes`/:mod:`dphys`."""

from ._assimilate import (
    Analysis as Analysis,
    History as History,
    assimilate as assimilate,
)
from ._control import (
    AbstractControlVariable as AbstractControlVariable,
    Control as Control,
    Decoded as Decoded,
    InitialState as InitialState,
    ModelError as ModelError,
    Parameter as Parameter,
)
from ._cost import (
    AbstractCost as AbstractCost,
    FourDVar as FourDVar,
    gauss_newton_operator as gauss_newton_operator,
)
from ._covariance import (
    AbstractCovariance as AbstractCovariance,
    Dense as Dense,
    Diagonal as Diagonal,
    Diffusion as Diffusion,
)
from ._methods import (
    LBFGS as LBFGS,
    AbstractMethod as AbstractMethod,
    GaussNewton as GaussNewton,
    IterationState as IterationState,
)
from ._minimize import Solution as Solution, minimize as minimize
from ._observation import (
    AbstractObservationOperator as AbstractObservationOperator,
    Interpolation as Interpolation,
    Observations as Observations,
    TimeInterpolation as TimeInterpolation,
)
from ._posterior import Posterior as Posterior, posterior as posterior
from ._stopping import (
    INNER_RESULTS as INNER_RESULTS,
    RESULTS as RESULTS,
    TERMINATIONS as TERMINATIONS,
    StoppingRule as StoppingRule,
)
from ._transforms import (
    AbstractTransform as AbstractTransform,
    Bounded as Bounded,
    Identity as Identity,
    Log as Log,
    Softplus as Softplus,
)
from ._twin import (
    TwinResult as TwinResult,
    make_observations as make_observations,
    twin_experiment as twin_experiment,
)


# The edges (xarray, netCDF, TOML configurations, Dask batches, figures, the command
# line) are imported on first use, so that `import assimilation` does not load them.
_LAZY = {
    # assimilation.io: observations and fields from netCDF, validated; CF writers
    "CurvilinearGridError": "io",
    "DataError": "io",
    "TangentPlane": "io",
    "DomainError": "io",
    "GridMismatchError": "io",
    "MissingVariableError": "io",
    "TimeAxisError": "io",
    "UnitsError": "io",
    "analysis_to_dataset": "io",
    "convert_units": "io",
    "model_times": "io",
    "observations_to_dataset": "io",
    "read_field": "io",
    "read_observations": "io",
    # assimilation.runs: TOML run configurations, resumable batch runs, figures
    "BatchError": "runs",
    "BatchReport": "runs",
    "Case": "runs",
    "CaseResult": "runs",
    "run_batch": "runs",
    "split_windows": "runs",
    "ConfigError": "runs",
    "load_config": "runs",
    "validate_config": "runs",
    "plot_analysis": "runs",
}
_SUBPACKAGES = ("io", "runs", "learn", "cli")


def __getattr__(name):
    import importlib

    if name in _SUBPACKAGES:
        return importlib.import_module(f".{name}", __name__)
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | set(_SUBPACKAGES))
