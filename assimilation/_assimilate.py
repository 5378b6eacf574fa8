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
import optax.tree_utils as otu

from ._control import INITIAL_STATE
from ._cost import AbstractCost
from ._methods import AbstractMethod, GaussNewton
from ._minimize import _strong
from ._posterior import posterior
from ._stopping import INNER_RESULTS, TERMINATIONS, StoppingRule


class History(eqx.Module):
    """Convergence history of :func:`assimilate`, one entry per iteration.

    Entry 0 is the starting point (the background unless ``v0`` was given).

    Attributes:
        cost, background_cost, obs_cost: $J$, $J_b$, $J_o$ (``(n_iterations+1,)``).
        grad_norm: $\\|\\nabla J\\|_2$ in the whitened control space.
        step_norm: $\\|v_k - v_{k-1}\\|_2$ (0 at entry 0).
        inner_iterations: CG steps (Gauss-Newton) or line-search steps (L-BFGS)
            spent in each iteration (0 at entry 0).
        inner_residual: Gauss-Newton's relative inner true residual
            $\\|A\\delta + \\nabla J\\|_2/\\|\\nabla J\\|_2$ per iteration (0 at
            entry 0 and for L-BFGS).
        inner_result: how each inner solve ended, as names from
            :data:`assimilation.INNER_RESULTS` (``"converged"``, ``"max_steps"``,
            ``"nonfinite"``; ``"converged"`` at entry 0 and for L-BFGS).
        elapsed: wall-clock seconds since the start, at each entry.
        parameters: ``{name: array (n_iterations+1, *shape)}`` physical values.
        terms: ``{name: array (n_iterations+1,)}``: every named term of the cost
            (``background_cost``/``obs_cost`` are its ``"background"`` and
            ``"observation"`` entries).
    """

    cost: np.ndarray
    background_cost: np.ndarray
    obs_cost: np.ndarray
    grad_norm: np.ndarray
    step_norm: np.ndarray
    inner_iterations: np.ndarray
    elapsed: np.ndarray
    parameters: dict
    terms: dict = eqx.field(default_factory=dict)
    inner_residual: np.ndarray | None = None
    inner_result: tuple[str, ...] = eqx.field(static=True, default=())

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
        std: ``{name: posterior std of the physical value}`` for every control
            variable the posterior covered (all with the dense and Lanczos
            methods; the analysis message names any that are missing or not
            finite).

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
            ``"max_iterations"``, ``"callback"``, ``"nonfinite"`` or
            ``"no_decrease"`` (a Gauss-Newton step failed to decrease $J$; the
            last iterate is kept).
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
    std: dict | None
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
    values = cost.decode(s.v).values
    names = () if cost.control is None else cost.control.parameter_names
    return {
        "cost": s.cost,
        "background_cost": s.background_cost,
        "obs_cost": s.obs_cost,
        "grad_norm": s.grad_norm,
        "step_norm": s.step_norm,
        "inner_iterations": s.inner_iterations,
        "inner_residual": s.inner_residual,
        "inner_result": s.inner_result,
        "failed": s.failed,
        "terms": dict(s.terms),
        "parameters": {name: values[name] for name in names},
    }


@eqx.filter_jit
def _init_jit(method, cost, v):
    s = _strong(method.init(cost, v))
    return s, _info(cost, s)


@eqx.filter_jit
def _step_jit(method, cost, state):
    s = _strong(method.step(cost, state))
    return s, _info(cost, s)


@eqx.filter_jit
def _report_jit(cost, v):
    hx, final = cost.forecast(v)
    return cost.decode(v), hx, final


_posterior_jit = eqx.filter_jit(posterior)


def _step_config(method):
    """``method`` with its default stopping options neutralised: they never enter
    the jitted iteration, so changing them must not trigger a recompilation."""
    fields = {f.name for f in dataclasses.fields(method)}
    neutral = {"max_iterations": 0, "gtol": 0.0, "ftol": 0.0}
    return dataclasses.replace(
        method, **{k: x for k, x in neutral.items() if k in fields}
    )


_SCALARS = ("cost", "background_cost", "obs_cost", "grad_norm", "step_norm")


def _np_tree(tree):
    return jtu.tree_map(np.asarray, tree)


def assimilate(
    cost: AbstractCost,
    method: AbstractMethod | None = None,
    *,
    stop: StoppingRule | None = None,
    v0=None,
    callback: Callable[[int, dict], Any] | None = None,
    uncertainty: bool = True,
    progress: bool = False,
) -> Analysis:
    r"""Minimise a 4D-Var cost and return the :class:`Analysis`.

    Runs ``method`` (default :class:`GaussNewton`) one jitted iteration at a time
    from Python until the :class:`assimilation.StoppingRule` ``stop`` (default:
    the method's, ``method.stopping_rule()``) is met: $\|\nabla J\| \le$ ``gtol``
    $\cdot\|\nabla J_0\|$ (``"gradient_tolerance"``), $J_{k-1}-J_k \le$ ``ftol``
    $\cdot J_k$ (``"cost_tolerance"``), ``max_iterations`` (``"max_iterations"``),
    a non-finite cost (``"nonfinite"``; the last finite iterate is kept) or the
    callback returning ``True`` (``"callback"``); the same rule
    :func:`assimilation.minimize` applies inside JAX. Then computes the
    Gauss-Newton posterior (:func:`posterior`) if ``uncertainty``.

    Args:
        cost: an :class:`assimilation.AbstractCost` that runs a model (e.g.
            :class:`FourDVar`: it has ``decode``, ``forecast``, ``obs`` and
            ``control``).
        method: :class:`GaussNewton` or :class:`LBFGS`.
        stop: the stopping rule (default: the method's).
        v0: starting whitened control (default: the background, $v = 0$).
        callback: ``callback(iteration, info)`` called after the start (iteration
            0) and after every iteration, with ``info`` a dict of Python floats /
            NumPy arrays: ``cost``, ``background_cost``, ``obs_cost``,
            ``grad_norm``, ``step_norm``, ``inner_iterations``, ``elapsed``,
            ``terms`` (``{name: value}``), ``parameters`` (``{name: physical
            value}``). Return ``True`` to stop.
        uncertainty: compute the posterior standard deviations and correlations.
        progress: show a progress bar of the iterations (cost and gradient norm)
            and of the posterior phase on stderr (tqdm).

    Returns:
        An :class:`Analysis`.

    Raises:
        TypeError: if ``cost``, ``method`` or ``stop`` has the wrong type.
        ValueError: if ``v0`` does not match the control.

    Example:
        >>> analysis = assimilate(cost, GaussNewton(max_iterations=10))  # doctest: +SKIP
        >>> print(analysis.summary())  # doctest: +SKIP
    """
    if not isinstance(cost, AbstractCost):
        raise TypeError(
            "`cost` must be an assimilation.AbstractCost (e.g. FourDVar), got "
            f"{type(cost).__name__}."
        )
    method = GaussNewton() if method is None else method
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "`method` must be assimilation.GaussNewton() or assimilation.LBFGS(), got "
            f"{type(method).__name__}."
        )
    if stop is None:
        stop = method.stopping_rule()
    elif not isinstance(stop, StoppingRule):
        raise TypeError(
            f"`stop` must be an assimilation.StoppingRule, got {type(stop).__name__}."
        )
    v_start = cost.init() if v0 is None else v0
    cost.check(v_start)
    _warn_if_single_precision(v_start)
    start = time.perf_counter()
    rows: list[dict] = []

    def record(raw):
        # One device-to-host transfer per iteration.
        raw = jax.device_get(raw)
        info = {k: float(raw[k]) for k in _SCALARS}
        info["inner_iterations"] = int(raw["inner_iterations"])
        info["inner_residual"] = float(raw["inner_residual"])
        info["inner_result"] = INNER_RESULTS[int(raw["inner_result"])]
        info["elapsed"] = time.perf_counter() - start
        info["terms"] = {k: float(x) for k, x in raw["terms"].items()}
        info["parameters"] = {k: np.asarray(x) for k, x in raw["parameters"].items()}
        rows.append(info)
        return info

    def check(it, info, cost_prev):
        code = stop.check(
            it,
            grad_norm0=rows[0]["grad_norm"],
            cost_prev=cost_prev,
            cost=info["cost"],
            grad_norm=info["grad_norm"],
        )
        return TERMINATIONS[int(code)]

    bar = _Progress(stop.max_iterations) if progress else None
    if bar is not None:
        user_callback = callback

        def callback(i, info):
            bar.update(i, info)
            return user_callback(i, info) if user_callback is not None else False

    core = _step_config(method)
    state, raw = _init_jit(core, cost, v_start)
    info = record(raw)
    termination = "callback" if callback is not None and callback(0, info) else None
    if termination is None:
        termination = check(0, info, math.inf)
    it = 0
    while termination == "running":
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
        if bool(raw["failed"]):
            # The method kept the iterate (no step decreased J): the row records
            # the attempt's inner solve, and the run ends here.
            termination = "no_decrease"
        elif callback is not None and callback(it, info):
            termination = "callback"
        else:
            termination = check(it, info, j_prev)

    terms = {
        name: np.array([r["terms"][name] for r in rows]) for name in rows[0]["terms"]
    }
    history = History(
        cost=np.array([r["cost"] for r in rows]),
        background_cost=np.array([r["background_cost"] for r in rows]),
        obs_cost=np.array([r["obs_cost"] for r in rows]),
        grad_norm=np.array([r["grad_norm"] for r in rows]),
        step_norm=np.array([r["step_norm"] for r in rows]),
        inner_iterations=np.array([r["inner_iterations"] for r in rows]),
        inner_residual=np.array([r["inner_residual"] for r in rows]),
        inner_result=tuple(r["inner_result"] for r in rows),
        elapsed=np.array([r["elapsed"] for r in rows]),
        parameters={
            name: np.stack([r["parameters"][name] for r in rows])
            for name in rows[0]["parameters"]
        },
        terms=terms,
    )
    if bar is not None:
        bar.close()
    return _make_analysis(
        cost, state.v, history, termination, stop, method, uncertainty, progress
    )


def _inner_summary(history) -> str:
    """What the inner solves did, when one of them did not converge."""
    results = history.inner_result[1:]
    bad = [r for r in results if r != "converged"]
    if not bad or history.inner_residual is None:
        return ""
    worst = float(np.max(history.inner_residual[1:]))
    return (
        f"; {len(bad)} of {len(results)} inner solve(s) did not converge "
        f"({', '.join(sorted(set(bad)))}; largest relative residual {worst:.2g})"
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
    cost, v_a, history, termination, stop, method, uncertainty, progress=False
):
    """The :class:`Analysis` at ``v_a``: every per-variable quantity comes from
    iterating over the control variables (their decoded values and posterior
    standard deviations), never from the variables' fields."""
    v_b = cost.init()
    d_b, hx_b, final_b = _report_jit(cost, v_b)
    d_a, hx_a, final_a = _report_jit(cost, v_a)
    y = cost.obs.values
    omb = jnp.where(jnp.isnan(y), jnp.nan, y - hx_b)
    oma = jnp.where(jnp.isnan(y), jnp.nan, y - hx_a)
    names = cost.control.names
    parameter_names = cost.control.parameter_names
    increments = {
        name: otu.tree_sub(d_a.values[name], d_b.values[name]) for name in names
    }
    p_std = p_std_z = corr = state_std = std = None
    post_note = ""
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
        post_note = post.describe()
        std = _np_tree(post.stds)
        if parameter_names:
            p_std = {n: np.asarray(post.stds[n]) for n in parameter_names}
            p_std_z = {
                n: np.asarray(post.stds_unconstrained[n]) for n in parameter_names
            }
            corr = np.asarray(post.correlation)
        state_std = std.get(INITIAL_STATE)
    converged = termination in ("gradient_tolerance", "cost_tolerance")
    n_it = history.n_iterations
    message = (
        f"{type(method).__name__}: {'converged' if converged else 'stopped'} after "
        f"{n_it} iteration(s) ({stop.describe(termination)}); J "
        f"{history.cost[0]:.6g} -> {history.cost[-1]:.6g}"
    )
    message += _inner_summary(history)
    if post_note:
        message += "; posterior: " + post_note
    return Analysis(
        control=_np_tree(v_a),
        initial_state=_np_tree(d_a.initial_state),
        background_state=_np_tree(d_b.initial_state),
        final_state=_np_tree(final_a),
        background_final_state=_np_tree(final_b),
        parameters={n: np.asarray(d_a.values[n]) for n in parameter_names},
        background_parameters={n: np.asarray(d_b.values[n]) for n in parameter_names},
        increments=_np_tree(increments),
        model_error=None if d_a.forcings is None else _np_tree(d_a.forcings),
        model=d_a.model,
        parameter_std=p_std,
        parameter_std_unconstrained=p_std_z,
        parameter_correlation=corr,
        parameter_labels=tuple(labels),
        initial_state_std=state_std,
        std=std,
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
