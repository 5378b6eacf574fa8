"""The learning layer: unrolled and learned assimilation, model-error learning,
bilevel calibration and structured priors.

It builds on the DA maths of :mod:`assimilation` (costs, controls, methods) and
takes pytrees, never files: it imports neither :mod:`assimilation.io`,
:mod:`assimilation.runs`, the command line nor xarray (``tests/test_layering.py``
checks it).
"""

# --- training machinery and window datasets (_train, _checkpoint, _memory, _windows)
from ._checkpoint import (
    config_hash as config_hash,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._memory import (
    MemoryBudgetError as MemoryBudgetError,
    check_memory_budget as check_memory_budget,
    memory_breakdown as memory_breakdown,
    predict_memory as predict_memory,
)
from ._train import (
    FitResult as FitResult,
    Selection as Selection,
    TrainState as TrainState,
    evaluate as evaluate,
    fit as fit,
    freeze as freeze,
    init_train as init_train,
    select_best as select_best,
    train_step as train_step,
)
from ._windows import (
    Windows as Windows,
    heldout_split as heldout_split,
    hide_sensors as hide_sensors,
    make_windows as make_windows,
    mask_cost as mask_cost,
    sensor_folds as sensor_folds,
    sensor_splits as sensor_splits,
    split_dataset as split_dataset,
    with_obs as with_obs,
)
# --- end of training machinery and window datasets
