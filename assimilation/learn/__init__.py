"""The learning layer: unrolled and learned assimilation, model-error learning,
bilevel calibration and structured priors.

It builds on the DA maths of :mod:`assimilation` (costs, controls, methods) and
takes pytrees, never files: it imports neither :mod:`assimilation.io`,
:mod:`assimilation.runs`, the command line nor xarray (``tests/test_layering.py``
checks it).
"""

# --- training machinery and window datasets (_train, _checkpoint, _memory, _windows)
# --- end of training machinery and window datasets
# --- structured priors and sparse recovery (proximal operators, ISTA/FISTA/ADMM/
# --- Chambolle-Pock, AMP and state evolution, LISTA/ALISTA, plug-and-play) ---------
from ._amp import (
    AMP as AMP,
    AMPResult as AMPResult,
    AMPState as AMPState,
    StateEvolution as StateEvolution,
    amp as amp,
    lasso_lambda as lasso_lambda,
    optimal_alpha as optimal_alpha,
    phase_transition as phase_transition,
    soft_threshold_activity as soft_threshold_activity,
    soft_threshold_mse as soft_threshold_mse,
    state_evolution as state_evolution,
    state_evolution_fixed_point as state_evolution_fixed_point,
)
from ._checkpoint import (
    config_hash as config_hash,
    load_checkpoint as load_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._composite import (
    AbstractSmooth as AbstractSmooth,
    CompositeCost as CompositeCost,
    LeastSquares as LeastSquares,
    SmoothCost as SmoothCost,
    SmoothFunction as SmoothFunction,
)
from ._lista import (
    ALISTA as ALISTA,
    LISTA as LISTA,
    analytic_weight as analytic_weight,
    fit_unrolled as fit_unrolled,
    learned_leaves as learned_leaves,
    support_schedule as support_schedule,
)
from ._memory import (
    MemoryBudgetError as MemoryBudgetError,
    check_memory_budget as check_memory_budget,
    memory_breakdown as memory_breakdown,
    predict_memory as predict_memory,
)
from ._physics import physics_operator as physics_operator
from ._pnp import (
    RED as RED,
    DenoisingCNN as DenoisingCNN,
    UnrolledHQS as UnrolledHQS,
    train_denoiser as train_denoiser,
    unrolled_hqs_leaves as unrolled_hqs_leaves,
)
from ._prox import (
    L1 as L1,
    L21 as L21,
    TV as TV,
    TV1D as TV1D,
    AbstractPrior as AbstractPrior,
    Box as Box,
    ElasticNet as ElasticNet,
    GroupL1 as GroupL1,
    NonNegative as NonNegative,
    NonNegativeL1 as NonNegativeL1,
    PnP as PnP,
    Select as Select,
    Zero as Zero,
    soft_threshold as soft_threshold,
)
from ._proximal_methods import (
    ADMM as ADMM,
    FISTA as FISTA,
    HQS as HQS,
    ISTA as ISTA,
    RESULTS as RESULTS,
    AbstractProximalMethod as AbstractProximalMethod,
    ChambollePock as ChambollePock,
    Continuation as Continuation,
    ProximalState as ProximalState,
    Solution as Solution,
    operator_norm_squared as operator_norm_squared,
    solve as solve,
    unroll as unroll,
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
from ._tv import (
    TVSolution as TVSolution,
    gradient as gradient,
    gradient_transpose as gradient_transpose,
    tv1d_prox as tv1d_prox,
    tv_norm as tv_norm,
    tv_prox as tv_prox,
    tv_solve as tv_solve,
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


# --- end of structured priors and sparse recovery ----------------------------------

# isort: split
# --- model-error learning: hybrid models, training protocols, bilevel calibration
#     (_hybrid, _protocols, _bilevel) -----------------------------------------------
from ._bilevel import (
    Bilevel as Bilevel,
    Calibration as Calibration,
    calibrate as calibrate,
    joint_estimate as joint_estimate,
    laplace as laplace,
)
from ._hybrid import (
    FourierField as FourierField,
    LocalTendency as LocalTendency,
    Stability as Stability,
    SubwindowForcing as SubwindowForcing,
    Sum as Sum,
    rollout as rollout,
    set_field as set_field,
    stability as stability,
)
from ._protocols import (
    PROTOCOLS as PROTOCOLS,
    ModelErrorData as ModelErrorData,
    ProtocolResult as ProtocolResult,
    analyse_windows as analyse_windows,
    forecast_rmse as forecast_rmse,
    one_step_loss as one_step_loss,
    rollout_loss as rollout_loss,
    rollout_misfit as rollout_misfit,
    train_correction as train_correction,
    weak_constraint_cost as weak_constraint_cost,
)


# --- end of model-error learning ---------------------------------------------------

# isort: split
# --- unrolled assimilation: assimilators, gradient modes, losses, steering ---------
from ._losses import (
    AbstractLoss as AbstractLoss,
    AnalysisCost as AnalysisCost,
    HeldOutSensors as HeldOutSensors,
    KKTResidual as KKTResidual,
    Mixed as Mixed,
    PhysicsResidual as PhysicsResidual,
    Supervised as Supervised,
)
from ._modes import (
    AbstractIterationAdjoint as AbstractIterationAdjoint,
    FullUnroll as FullUnroll,
    Implicit as Implicit,
    OneStep as OneStep,
    Truncated as Truncated,
    gradient_memory as gradient_memory,
    implicit_report as implicit_report,
    neumann_vjp as neumann_vjp,
    within_budget as within_budget,
)
from ._networks import GridCNN as GridCNN, ScalarMLP as ScalarMLP
from ._steering import (
    AbstractEnergy as AbstractEnergy,
    Bounds as Bounds,
    Conservation as Conservation,
    SensorReading as SensorReading,
    Smoothness as Smoothness,
    SteeringResult as SteeringResult,
    steer as steer,
)
from ._unrolled import (
    AbstractLayer as AbstractLayer,
    AbstractLearnedPrior as AbstractLearnedPrior,
    FirstGuess as FirstGuess,
    GaussNewtonStep as GaussNewtonStep,
    GradientStep as GradientStep,
    LearnedContinuation as LearnedContinuation,
    LearnedSquareRoot as LearnedSquareRoot,
    NetworkPrior as NetworkPrior,
    UnrolledAssimilator as UnrolledAssimilator,
    UnrolledResult as UnrolledResult,
    contraction as contraction,
    first_guess_network as first_guess_network,
    stack_layers as stack_layers,
    to_analysis as to_analysis,
    unrolled_gauss_newton as unrolled_gauss_newton,
    unrolled_gradient as unrolled_gradient,
)
# --- end of unrolled assimilation ----------------------------------------------------
