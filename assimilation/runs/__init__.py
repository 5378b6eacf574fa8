"""The run edge: TOML configurations, configured runs, batches and figures.

A configuration (:data:`SCHEMA`) is validated (:func:`validate_config`,
:func:`load_config`), built into a model, background, control and observations
(:func:`build_run`), run (:func:`run`) and written as a CF dataset
(:func:`output_dataset`); :func:`run_batch` runs many cases (resumable, atomic,
optionally on Dask), :func:`config_cases` makes them from a ``[batch]`` section, and
:func:`plot_analysis` draws the summary figure. The command line
(:mod:`assimilation.cli`) is a thin layer over this package; the DA maths never
imports it.
"""

from ._batch import (
    BatchError as BatchError,
    BatchReport as BatchReport,
    Case as Case,
    CaseResult as CaseResult,
    run_batch as run_batch,
    split_windows as split_windows,
)
from ._build import RunSetup as RunSetup, build_run as build_run
from ._cases import config_cases as config_cases, run_config_case as run_config_case
from ._config import (
    load_config as load_config,
    set_dotted as set_dotted,
    validate_config as validate_config,
)
from ._plot import plot_analysis as plot_analysis
from ._reference import config_reference as config_reference, init_config as init_config
from ._run import (
    RunOutput as RunOutput,
    output_dataset as output_dataset,
    parameter_units as parameter_units,
    run as run,
)
from ._schema import (
    MODELS as MODELS,
    SCHEMA as SCHEMA,
    STATE_FIELDS as STATE_FIELDS,
    ConfigError as ConfigError,
)
