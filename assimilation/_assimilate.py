r"""The assimilation driver: :func:`assimilate` and its :class:`Analysis`.

:func:`assimilate` runs a method (:class:`assimilation.GaussNewton` or
:class:`assimilation.LBFGS`) from Python, one jitted iteration at a time, with
stopping criteria, a convergence :class:`History` and a progress ``callback``, then
the Laplace posterior (:func:`assimilation.posterior`), and returns an
:class:`Analysis` in physical units.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._control import INITIAL_STATE, MODEL_ERROR
from ._cost import FourDVar
from ._methods import AbstractMethod, GaussNewton
from ._posterior import posterior


class History(eqx.Module):
    """Convergence history of :func:`assimilate`, one entry per iteration.

    Entry 0 is the starting point (the background unless ``v0`` was given).

    Attributes:
        cost, background_cost, obs_cost: $J$, $J_b$, $J_o$ (``(n_iterations+1,)``).
        grad_norm: $\\|\\nabla J\\|_2$ in the whitened control space.
        step_norm: $\\|v_k - v_{k-1}\\|_2$ (0 at entry 0).
        inner_iterations: CG steps (Gauss-Newton) or line-search steps (L-BFGS)
            spent in each iteration (0 at entry 0).
        elapsed: wall-clock seconds since the start, at each entry.
        parameters: ``{name: array (n_iterations+1, *shape)}`` physical values.
    """

    cost: np.ndarray
    background_cost: np.ndarray
    obs_cost: np.ndarray
    grad_norm: np.ndarray
    step_norm: np.ndarray
    inner_iterations: np.ndarray
    elapsed: np.ndarray
    parameters: dict

    @property
    def n_iterations(self) -> int:
        return len(self.cost) - 1


class Analysis(eqx.Module):
    r"""The result of :func:`assimilate` (all arrays concrete; physical units).

    Control and model:
        control: the whitened analysis control $v_a$ (``dict``, see
            :class:`assimilation.Control`).
        initial_state: analysed initial state $x_a(t_0)$ (the background if the
            state is not controlled).
        background_state: the background initial state $x_b$.
        final_state: forecast from the analysis at the end of the window.
        background_final_state: forecast from the background at the end of the
            window.
        parameters: ``{name: analysed physical value}``.
        background_parameters: ``{name: background physical value}``.
        increments: ``{"initial_state": x_a - x_b, name: p_a - p_b, ...}`` for the
            controlled quantities (``"model_error"``: the analysed forcings).
        model_error: analysed forcings, shape ``(n_windows, *state shape)``, or
            ``None`` (strong constraint).
        model: the model with the analysed parameters.

    Uncertainty (Gauss-Newton/Laplace, see :func:`posterior`; ``None`` if
    ``uncertainty=False``):
        parameter_std: ``{name: physical std}`` (delta method).
        parameter_std_unconstrained: ``{name: std of the unconstrained value}``
            (e.g. of $\log\kappa$ for ``Log()``).
        parameter_correlation: ``(n_p, n_p)`` correlation between all scalar
            parameter entries, rows labelled by ``parameter_labels``.
        parameter_labels: tuple of ``n_p`` strings.
        initial_state_std: posterior std of the initial state, or ``None``.

    Fit to the observations (shape ``(n_times, n_sensors)``, NaN where missing,
    observation minus model):
        obs_times: the observation times.
        obs_minus_background: $y - H(x^b(t_k))$.
        obs_minus_analysis: $y - H(x^a(t_k))$.

    Convergence:
        history: the :class:`History`.
        cost_background, cost_analysis: $J$ at the start and at the end.
        n_iterations: iterations performed.
        converged: whether a tolerance was met.
        termination: ``"gradient_tolerance"``, ``"cost_tolerance"``,
            ``"max_iterations"``, ``"callback"`` or ``"nonfinite"``.
        message: a one-line human-readable summary.
        method: the method's class name (``"GaussNewton"``, ``"LBFGS"``).
    """

    control: dict
    initial_state: Any
    background_state: Any
    final_state: Any
    background_final_state: Any
    parameters: dict
    background_parameters: dict
    increments: dict
    model_error: Any
    model: Any
    parameter_std: dict | None
    parameter_std_unconstrained: dict | None
    parameter_correlation: Any
    parameter_labels: tuple[str, ...] = eqx.field(static=True)
    initial_state_std: Any
    obs_times: Any
    obs_minus_background: Any
    obs_minus_analysis: Any
    history: History
    cost_background: float
    cost_analysis: float
    n_iterations: int
    converged: bool
    termination: str = eqx.field(static=True)
    message: str = eqx.field(static=True)
    method: str = eqx.field(static=True)

    def summary(self) -> str:
        """A short multi-line text summary (parameters with their std)."""
        lines = [self.message]
        for name, value in self.parameters.items():
            value = np.asarray(value)
            bg = np.asarray(self.background_parameters[name])
            if value.ndim == 0:
                std = (
                    ""
                    if self.parameter_std is None
                    else f" +/- {float(self.parameter_std[name]):.4g}"
                )
                lines.append(
                    f"  {name}: {float(value):.6g}{std} (background {float(bg):.6g})"
                )
            else:
                lines.append(
                    f"  {name}: field {value.shape}, mean {value.mean():.6g} "
                    f"(background mean {bg.mean():.6g})"
                )
        return "\n".join(lines)


def _info(cost, s):
    return {
        "cost": s.cost,
        "background_cost": s.background_cost,
        "obs_cost": s.obs_cost,
        "grad_norm": s.grad_norm,
        "step_norm": s.step_norm,
        "inner_iterations": s.inner_iterations,
        "parameters": cost.parameters(s.v),
    }


def _strong(tree):
    """Drop weak types so that the state of every iteration has one signature."""
    return jtu.tree_map(lambda x: x.astype(x.dtype) if eqx.is_array(x) else x, tree)


@eqx.filter_jit
def _init_jit(method, cost, v):
    s = _strong(method.init(cost, v))
    return s, _info(cost, s)


@eqx.filter_jit
def _step_jit(method, cost, state):
    s = _strong(method.step(cost, state))
    return s, _info(cost, s)


@eqx.filter_jit
def _forecast_jit(cost, v):
    return cost.forecast(v)


_posterior_jit = eqx.filter_jit(posterior)


def _step_config(method):
    """``method`` with the stopping options neutralised: they never enter the
    jitted iteration, so changing them must not trigger a recompilation."""
    return dataclasses.replace(method, max_iterations=0, gtol=0.0, ftol=0.0)


_SCALARS = ("cost", "background_cost", "obs_cost", "grad_norm", "step_norm")


def _np_tree(tree):
    return jtu.tree_map(np.asarray, tree)


def assimilate(
    cost: FourDVar,
    method: AbstractMethod | None = None,
    *,
    v0=None,
    callback: Callable[[int, dict], Any] | None = None,
    uncertainty: bool = True,
    progress: bool = False,
) -> Analysis:
    r"""Minimise a 4D-Var cost and return the :class:`Analysis`.

    Runs ``method`` (default :class:`GaussNewton`) one jitted iteration at a time
    from Python, stopping at the first of: $\|\nabla J\| \le$ ``gtol``
    $\cdot\|\nabla J_0\|$ (``"gradient_tolerance"``), $J_{k-1}-J_k \le$ ``ftol``
    $\cdot J_k$ (``"cost_tolerance"``), ``max_iterations`` (``"max_iterations"``),
    a non-finite cost (``"nonfinite"``; the last finite iterate is kept) or the
    callback returning ``True`` (``"callback"``). Then computes the Gauss-Newton
    posterior (:func:`posterior`) if ``uncertainty``.

    Args:
        cost: a :class:`FourDVar`.
        method: :class:`GaussNewton` or :class:`LBFGS`.
        v0: starting whitened control (default: the background, $v = 0$).
        callback: ``callback(iteration, info)`` called after the start (iteration
            0) and after every iteration, with ``info`` a dict of Python floats /
            NumPy arrays: ``cost``, ``background_cost``, ``obs_cost``,
            ``grad_norm``, ``step_norm``, ``inner_iterations``, ``elapsed``,
            ``parameters`` (``{name: physical value}``). Return ``True`` to stop.
        uncertainty: compute the posterior parameter std and correlation.
        progress: show a progress bar of the iterations (cost and gradient norm)
            and of the posterior phase on stderr (tqdm).

    Returns:
        An :class:`Analysis`.

    Raises:
        TypeError: if ``cost`` or ``method`` has the wrong type.
        ValueError: if ``v0`` does not match the control.

    Example:
        >>> analysis = assimilate(cost, GaussNewton(max_iterations=10))  # doctest: +SKIP
        >>> print(analysis.summary())  # doctest: +SKIP
    """
    if not isinstance(cost, FourDVar):
        raise TypeError(f"`cost` must be a FourDVar, got {type(cost).__name__}.")
    method = GaussNewton() if method is None else method
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be assimilation.GaussNewton() or assimilation.LBFGS(), got "
            f"{type(method).__name__}."
        )
    v_start = cost.init() if v0 is None else v0
    cost.control.check_control(v_start, cost.state0)
    _warn_if_single_precision(v_start)
    start = time.perf_counter()
    rows: list[dict] = []

    def record(raw):
        # One device-to-host transfer per iteration.
        raw = jax.device_get(raw)
        info = {k: float(raw[k]) for k in _SCALARS}
        info["inner_iterations"] = int(raw["inner_iterations"])
        info["elapsed"] = time.perf_counter() - start
        info["parameters"] = {k: np.asarray(x) for k, x in raw["parameters"].items()}
        rows.append(info)
        return info

    bar = _Progress(method.max_iterations) if progress else None
    if bar is not None:
        user_callback = callback

        def callback(i, info):
            bar.update(i, info)
            return user_callback(i, info) if user_callback is not None else False

    core = _step_config(method)
    state, raw = _init_jit(core, cost, v_start)
    info = record(raw)
    stop = bool(callback(0, info)) if callback is not None else False
    g0 = info["grad_norm"]
    termination = "callback" if stop else None
    if termination is None and not math.isfinite(info["cost"]):
        termination = "nonfinite"
    if termination is None and g0 == 0.0:
        termination = "gradient_tolerance"
    it = 0
    while termination is None:
        if it >= method.max_iterations:
            termination = "max_iterations"
            break
        new, raw = _step_jit(core, cost, state)
        raw = jax.device_get(raw)
        if not (
            math.isfinite(float(raw["cost"])) and math.isfinite(float(raw["grad_norm"]))
        ):
            termination = "nonfinite"
            break
        j_prev = rows[-1]["cost"]
        state = new
        it += 1
        info = record(raw)
        if callback is not None and callback(it, info):
            termination = "callback"
        elif info["grad_norm"] <= method.gtol * g0:
            termination = "gradient_tolerance"
        elif 0.0 <= j_prev - info["cost"] <= method.ftol * abs(info["cost"]):
            termination = "cost_tolerance"

    v_a = state.v
    history = History(
        cost=np.array([r["cost"] for r in rows]),
        background_cost=np.array([r["background_cost"] for r in rows]),
        obs_cost=np.array([r["obs_cost"] for r in rows]),
        grad_norm=np.array([r["grad_norm"] for r in rows]),
        step_norm=np.array([r["step_norm"] for r in rows]),
        inner_iterations=np.array([r["inner_iterations"] for r in rows]),
        elapsed=np.array([r["elapsed"] for r in rows]),
        parameters={
            name: np.stack([r["parameters"][name] for r in rows])
            for name in cost.control.parameter_names
        },
    )
    if bar is not None:
        bar.close()
    return _make_analysis(
        cost, v_a, history, termination, method, uncertainty, progress
    )


def _warn_if_single_precision(tree) -> None:
    leaves = [x for x in jtu.tree_leaves(tree) if eqx.is_array(x)]
    dtypes = {jnp.result_type(x) for x in leaves}
    if any(jnp.issubdtype(d, jnp.floating) and jnp.finfo(d).bits < 64 for d in dtypes):
        import warnings

        warnings.warn(
            "assimilate is running in single precision "
            f"({', '.join(sorted(map(str, dtypes)))}): gradient tolerances, "
            "Gauss-Newton steps and posterior variances lose most of their digits. "
            "Enable float64 first (`jax.config.update('jax_enable_x64', True)`, "
            "before building arrays; the `dphys` command does it through "
            "`[solver] precision`).",
            stacklevel=3,
        )


class _Progress:
    """A tqdm bar over the iterations (imported only when asked for)."""

    def __init__(self, total):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="4D-Var", unit="it", leave=True)
        self.done = 0

    def update(self, i, info):
        self.bar.set_postfix_str(
            f"J={info['cost']:.4e} |g|={info['grad_norm']:.2e}", refresh=False
        )
        self.bar.update(i - self.done)
        self.done = i

    def close(self):
        self.bar.close()


def _make_analysis(
    cost, v_a, history, termination, method, uncertainty, progress=False
):
    v_b = cost.init()
    hx_b, final_b = _forecast_jit(cost, v_b)
    hx_a, final_a = _forecast_jit(cost, v_a)
    y = cost.obs.values
    omb = jnp.where(jnp.isnan(y), jnp.nan, y - hx_b)
    oma = jnp.where(jnp.isnan(y), jnp.nan, y - hx_a)
    x_b = cost.state0
    x_a = cost.initial_state(v_a)
    params_a = cost.parameters(v_a)
    params_b = cost.parameters(v_b)
    increments = {}
    if cost.control.initial_state is not None:
        increments[INITIAL_STATE] = jtu.tree_map(jnp.subtract, x_a, x_b)
    for name in cost.control.parameter_names:
        increments[name] = params_a[name] - params_b[name]
    forcings = cost.forcings(v_a)
    if forcings is not None:
        increments[MODEL_ERROR] = forcings

    p_std = p_std_z = corr = state_std = None
    labels: tuple[str, ...] = ()
    if uncertainty:
        if progress:
            import sys

            print(
                "posterior (Laplace): Gauss-Newton Hessian and its inverse ...",
                file=sys.stderr,
                flush=True,
            )
            t_post = time.perf_counter()
        post = _posterior_jit(cost, v_a)
        if progress:
            print(
                f"posterior done ({time.perf_counter() - t_post:.1f} s)",
                file=sys.stderr,
                flush=True,
            )
        labels = post.labels
        if post.names:
            p_std = _np_tree(post.split(post.std))
            p_std_z = _np_tree(post.split(post.std_unconstrained))
            corr = np.asarray(post.correlation)
        state_std = (
            None
            if post.initial_state_std is None
            else np.asarray(post.initial_state_std)
        )
    converged = termination in ("gradient_tolerance", "cost_tolerance")
    n_it = history.n_iterations
    reason = {
        "gradient_tolerance": f"gradient norm reduced below gtol={method.gtol:g}",
        "cost_tolerance": f"relative cost decrease below ftol={method.ftol:g}",
        "max_iterations": f"reached max_iterations={method.max_iterations}",
        "callback": "stopped by the callback",
        "nonfinite": "the cost became non-finite; kept the last finite iterate",
    }[termination]
    message = (
        f"{type(method).__name__}: {'converged' if converged else 'stopped'} after "
        f"{n_it} iteration(s) ({reason}); J {history.cost[0]:.6g} -> "
        f"{history.cost[-1]:.6g}"
    )
    return Analysis(
        control=_np_tree(v_a),
        initial_state=_np_tree(x_a),
        background_state=_np_tree(x_b),
        final_state=_np_tree(final_a),
        background_final_state=_np_tree(final_b),
        parameters=_np_tree(params_a),
        background_parameters=_np_tree(params_b),
        increments=_np_tree(increments),
        model_error=None if forcings is None else _np_tree(forcings),
        model=cost.model_at(v_a),
        parameter_std=p_std,
        parameter_std_unconstrained=p_std_z,
        parameter_correlation=corr,
        parameter_labels=tuple(labels),
        initial_state_std=state_std,
        obs_times=np.asarray(cost.obs.times),
        obs_minus_background=np.asarray(omb),
        obs_minus_analysis=np.asarray(oma),
        history=history,
        cost_background=float(history.cost[0]),
        cost_analysis=float(history.cost[-1]),
        n_iterations=n_it,
        converged=converged,
        termination=termination,
        message=message,
        method=type(method).__name__,
    )
