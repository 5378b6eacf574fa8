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


# The I/O edges (xarray, netCDF, TOML configurations, Dask batches, the command line)
# are imported on first use, so that `import assimilation` does not load them.
_LAZY = {
    # assimilation._data: observations and fields from netCDF, validated
    "DataError": "_data",
    "DomainError": "_data",
    "GridMismatchError": "_data",
    "MissingVariableError": "_data",
    "TimeAxisError": "_data",
    "UnitsError": "_data",
    "analysis_to_dataset": "_data",
    "convert_units": "_data",
    "model_times": "_data",
    "observations_to_dataset": "_data",
    "read_field": "_data",
    "read_observations": "_data",
    # assimilation._batch: resumable batch runs
    "BatchError": "_batch",
    "BatchReport": "_batch",
    "Case": "_batch",
    "CaseResult": "_batch",
    "run_batch": "_batch",
    "split_windows": "_batch",
    # assimilation._config: TOML run configurations
    "ConfigError": "_config",
    "load_config": "_config",
    "validate_config": "_config",
    # assimilation._plot
    "plot_analysis": "_plot",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
