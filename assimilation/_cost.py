r"""The problem abstraction (:class:`AbstractCost`) and the 4D-Var cost.

An :class:`AbstractCost` is a *reduced functional* (pyadjoint's
``ReducedFunctional``, optimistix's ``fn``): a scalar function $J(v)$ of a whitened
control $v$, made of named terms,

$$ J(v) = \sum_{\text{name}} J_{\text{name}}(v), $$

at least ``"background"`` and ``"observation"`` (later ``"prior"``,
``"model_error"``, ...). The minimisation methods, :func:`assimilation.minimize`,
:func:`assimilation.assimilate` and :func:`assimilation.posterior` are written
against it: they read the terms and, for Gauss-Newton, the whitened residual, and
never re-derive a term themselves.

:class:`FourDVar` is the strong- and weak-constraint 4D-Var cost. With the whitened
control $v$ of a :class:`assimilation.Control` (initial state, parameters,
model-error forcings),

$$ J(v) = \tfrac12\|v\|^2
   + \tfrac12\sum_k \big\|R^{-1/2}\big(H_k(x(t_k; v)) - y_k\big)\big\|^2_{\text{observed}}, $$

which equals the textbook strong-constraint 4D-Var cost
$\tfrac12\|x_0-x_b\|^2_{B^{-1}} + \tfrac12\|p-p_b\|^2_{B_p^{-1}} +
\tfrac12\sum_k\|H_k(x(t_k)) - y_k\|^2_{R^{-1}}$ under the control-variable transform
$x_0 = x_b + B^{1/2}v_x$, $p = T(T^{-1}(p_b) + B_p^{1/2}v_p)$; with a
:class:`assimilation.ModelError` it also holds $\tfrac12\sum_j\|\eta_j\|^2_{Q^{-1}}$
(weak constraint). $R = \mathrm{diag}(\sigma_s^2)$ per sensor; missing values (NaN)
drop out of the sum.

The model trajectory is never stored: the observation hook (an ``eqx.Module``
holding the observation operator, passed as ``dphys.SaveAt(steps=..., fn=hook)``)
saves only sensor values at the steps that bracket the observation times, and
``jax.grad`` goes through the core's adjoints (transposed implicit solves,
checkpointed time loop).
"""

import abc
import numbers
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import lineax as lx
import numpy as np
import optax.tree_utils as otu
from equinox import AbstractVar

import dphys

from ._control import Control, Decoded
from ._observation import (
    AbstractObservationOperator,
    Interpolation,
    Observations,
    TimeInterpolation,
)


BACKGROUND = "background"
OBSERVATION = "observation"


def _warn_if_unobserved(obs: Observations, t_start: float, t_end: float) -> None:
    """Warn when every observation in the window is missing (all NaN): the cost
    then has no observation term and the analysis is the background."""
    values = obs.values
    if isinstance(values, jax.core.Tracer) or values.size == 0:
        return
    if bool(np.all(np.isnan(np.asarray(values)))):
        warnings.warn(
            f"all {values.size} observation values in the window [{t_start:g}, "
            f"{t_end:g}] are missing (NaN): the cost has no observation term and "
            "the analysis will equal the background. Check the observation file, "
            "its time axis and the sensor positions (a sensor outside the data's "
            "time range reads as missing).",
            stacklevel=3,
        )


def _shapes(tree):
    return jtu.tree_structure(tree), [jnp.shape(x) for x in jtu.tree_leaves(tree)]


class AbstractCost(eqx.Module):
    r"""A cost function $J(v) = \sum_{\text{name}} J_{\text{name}}(v)$ of a whitened
    control $v$: the problem that the minimisation methods solve.

    Subclasses implement :meth:`init`, :meth:`terms` and :meth:`innovations`; a
    least-squares cost also implements :meth:`residual` (Gauss-Newton and the
    posterior need it), and a cost that runs a model implements :meth:`decode` and
    :meth:`forecast` and sets :attr:`control` (what :func:`assimilation.assimilate`
    reports in its :class:`assimilation.Analysis`). Every method is a pure function
    of the control: jittable, differentiable and vmappable.

    A cost that adds a term to another (a learned prior, a model-error penalty) is
    a new subclass holding the other cost and forwarding what it does not change.

    Attributes:
        control: the :class:`assimilation.Control` whose variables the blocks of
            $v$ are, or ``None`` for a cost of a bare vector (then
            :func:`assimilation.posterior` reports only whitened quantities).
    """

    control: AbstractVar[Control | None]

    @abc.abstractmethod
    def init(self):
        """The whitened control of the background (the starting point, $v_b$)."""

    @abc.abstractmethod
    def terms(self, control) -> dict[str, jax.Array]:
        r"""The named terms $J_{\text{name}}(v)$, scalars, whose sum is the cost.

        At least ``"background"`` and ``"observation"``; the order is the order
        in which results list them.
        """

    @abc.abstractmethod
    def innovations(self, control):
        """Observation minus model equivalent, $y - H(x(v))$ (NaN where missing)."""

    def residual(self, control):
        r"""The whitened residual $r(v)$ of a least-squares cost,
        $J = \tfrac12\|r(v)\|^2$: a pytree (e.g. ``{"background": ...,
        "observation": ...}``) whose Jacobian Gauss-Newton linearises
        (:func:`assimilation.gauss_newton_operator`).

        A cost with a term that is not a sum of squares (an L1 or a learned prior)
        returns the residual of its least-squares terms only: Gauss-Newton then
        steps with the exact gradient of $J$ but the curvature $J_r^\top J_r$ of
        those terms alone, and the Laplace posterior ignores the other terms'
        curvature. The default raises: the cost is not least-squares.
        """
        raise TypeError(
            f"{type(self).__name__} defines no `residual(control)`, so it is not a "
            "least-squares cost: Gauss-Newton and the Laplace posterior need the "
            "whitened residual r with J = 1/2 |r|^2. Use assimilation.LBFGS(), or "
            "implement `residual`."
        )

    def decode(self, control) -> Decoded:
        """The control decoded into model, initial state, forcings and values."""
        raise TypeError(
            f"{type(self).__name__} does not run a model (no `decode`): "
            "assimilation.assimilate needs one to report an Analysis; use "
            "assimilation.minimize for a bare cost."
        )

    def forecast(self, control):
        """``(hx, final)``: the model equivalents of the observations and the state
        at the end of the window."""
        raise TypeError(
            f"{type(self).__name__} does not run a model (no `forecast`): "
            "assimilation.assimilate needs one to report an Analysis; use "
            "assimilation.minimize for a bare cost."
        )

    def check(self, control) -> None:
        """Raise ``ValueError`` unless ``control`` has the structure and shapes of
        :meth:`init` (a static check, before tracing)."""
        ref = jax.eval_shape(self.init)
        if _shapes(control) != _shapes(ref):
            raise ValueError(
                f"The control must have the structure and shapes of `cost.init()`: "
                f"{jtu.tree_structure(ref)} with shapes {_shapes(ref)[1]}, got "
                f"{jtu.tree_structure(control)} with shapes {_shapes(control)[1]}."
            )

    def __call__(self, control):
        """The cost $J(v)$, a scalar: the sum of :meth:`terms`."""
        self.check(control)
        return _total(self.terms(control))

    def costs(self, control):
        r"""``(J, J_b, J_o)``: total, background and observation terms."""
        terms = self.terms(control)
        zero = jnp.zeros((), jnp.result_type(*terms.values()))
        return (
            _total(terms),
            terms.get(BACKGROUND, zero),
            terms.get(OBSERVATION, zero),
        )


def _total(terms: dict):
    values = list(terms.values())
    total = values[0]
    for value in values[1:]:
        total = total + value
    return total


def gauss_newton_operator(cost: AbstractCost, control) -> lx.FunctionLinearOperator:
    r"""The Gauss-Newton Hessian $A = J_r^\top J_r$ of a least-squares cost at
    ``control``, a matrix-free ``lineax`` operator on the whitened control.

    With the whitened residual $r(v)$ of :meth:`AbstractCost.residual`
    ($J = \tfrac12\|r\|^2$) and $J_r = \partial r/\partial v$, $A v' = J_r^\top
    (J_r v')$: the tangent-linear model (``jax.jvp``) then the adjoint (``jax.vjp``,
    whose forward run is done once, here). For :class:`FourDVar`,
    $r = [v;\ R^{-1/2}(H(x(v)) - y)]$ and $A = I + J_o^\top J_o \succeq I$. Tagged
    symmetric positive semidefinite, so CG solves with it (Gauss-Newton uses
    :func:`dphys.krylov_solve`, which stops on the 2-norm of the true residual;
    ``lineax.CG`` tests each component against ``rtol |b_i|``); this one
    operator is the Gauss-Newton inner system, the Laplace posterior precision
    (:func:`assimilation.posterior`) and the Hessian that implicit
    hypergradients solve with.

    Args:
        cost: a least-squares :class:`AbstractCost` (it defines ``residual``).
        control: the linearisation point, a whitened control.

    Returns:
        A ``lineax.FunctionLinearOperator`` from and to the control's structure;
        ``.as_matrix()`` gives the dense matrix (in ``ravel_pytree`` order).

    Example:
        >>> op = gauss_newton_operator(cost, cost.init())  # doctest: +SKIP
        >>> delta, result, steps = dphys.krylov_solve(
        ...     op.mv, minus_grad, method="cg", initial_guess="zero"
        ... )  # doctest: +SKIP
    """
    _, vjp_fn = jax.vjp(cost.residual, control)

    def mv(tangent):
        _, jt = jax.jvp(cost.residual, (control,), (tangent,))
        return vjp_fn(jt)[0]

    return lx.FunctionLinearOperator(
        mv,
        jax.eval_shape(lambda: control),
        tags=(lx.symmetric_tag, lx.positive_semidefinite_tag),
    )


class _ObservationHook(eqx.Module):
    """The observation hook of :func:`dphys.simulate`: sensor values of a state.

    A Module, not a fresh function per call: its arrays (sensor weights, or a
    learned operator's parameters) are traced data, so calling the cost again with
    new values reuses the compiled run.
    """

    obs_op: AbstractObservationOperator

    def __call__(self, t, state):
        return self.obs_op(state)


def _saveat(steps, hook):
    return dphys.SaveAt(t1=False, steps=steps, fn=hook)


class FourDVar(AbstractCost):
    r"""A 4D-Var cost function $J(v)$ over a window of ``n_steps`` model steps.

    Strong constraint by default; weak constraint when the control has a
    :class:`assimilation.ModelError` (the window is then run as ``n_windows``
    chained :func:`dphys.simulate` calls, each with the model plus its constant
    forcing, :class:`dphys.Augmented`, which keeps every hook of the model: its
    preferred solver, its run-time checks and their messages). Every method is a
    pure function of the whitened control ``v`` (a ``dict``, see
    :class:`assimilation.Control`): jittable, differentiable and vmappable. To vmap
    over observation sets (e.g. noise seeds), build the cost once and swap values
    with ``eqx.tree_at(lambda c: c.obs.values, cost, values)``.

    Terms: ``"background"`` $\tfrac12\|v\|^2$ and ``"observation"``
    $\tfrac12\|R^{-1/2}(H(x) - y)\|^2$; the whitened residual is
    ``{"background": v, "observation": obs_residual(v)}``.

    Attributes:
        model: the model at its background parameters (controlled parameters are
            overwritten from the control).
        stepper: the time stepper.
        state0: the background initial state $x_b$ (also the fixed initial state
            when the state is not controlled).
        obs: the :class:`assimilation.Observations`.
        control: the :class:`assimilation.Control` (backgrounds filled in).
        obs_op: the spatial observation operator (default: interpolation at
            ``obs.positions`` on ``model.grid``).
        sampling: the :class:`assimilation.TimeInterpolation` of ``obs.times``.
        t0, dt, n_steps: the window ``[t0, t0 + n_steps*dt]`` (static).
        adjoint: how :func:`dphys.simulate` differentiates the time loop.
        throw: raise if a model run fails (set ``False`` inside ``vmap`` to get
            NaN costs instead of an error for the failing members).

    Raises:
        TypeError, ValueError: bad arguments, with what was received and how to fix
            it: sensors outside a non-periodic domain, observation times outside the
            window, mismatched shapes, ``n_steps`` not divisible by ``n_windows``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> import assimilation as da, dphys, pdes
        >>> grid = dphys.Grid(32, lengths=1.0, boundary="periodic")
        >>> model = pdes.Heat(grid, kappa=0.01)
        >>> x, = grid.coords
        >>> obs = da.Observations([0.5, 1.0], jnp.zeros((2, 3)), [0.1, 0.5, 0.9], 0.1)
        >>> kappa = da.Parameter("kappa", transform=da.Log(), sigma=1.0)
        >>> cost = da.FourDVar(model, dphys.CrankNicolson(), jnp.sin(2 * jnp.pi * x),
        ...                    obs, da.Control(parameters=[kappa]), dt=0.1, n_steps=10)
        >>> J, g = jax.value_and_grad(cost)(cost.init())
        >>> sorted(g)
        ['kappa']
    """

    model: dphys.AbstractModel
    stepper: dphys.AbstractStepper
    state0: Any
    obs: Observations
    control: Control
    obs_op: AbstractObservationOperator
    sampling: TimeInterpolation
    adjoint: dphys.AbstractAdjoint
    t0: float = eqx.field(static=True)
    dt: float = eqx.field(static=True)
    n_steps: int = eqx.field(static=True)
    throw: bool = eqx.field(static=True)

    def __init__(
        self,
        model: dphys.AbstractModel,
        stepper: dphys.AbstractStepper,
        state0,
        obs: Observations,
        control: Control,
        *,
        dt: float,
        n_steps: int,
        t0: float = 0.0,
        adjoint: dphys.AbstractAdjoint = dphys.Checkpointed(),
        obs_op: AbstractObservationOperator | None = None,
        throw: bool = True,
    ):
        if not isinstance(model, dphys.AbstractModel):
            raise TypeError(
                f"`model` must be a dphys.AbstractModel (e.g. pdes.Heat), got "
                f"{type(model).__name__}."
            )
        if not isinstance(stepper, dphys.AbstractStepper):
            raise TypeError(
                f"`stepper` must be a dphys.AbstractStepper, got {type(stepper).__name__}."
            )
        if not isinstance(obs, Observations):
            raise TypeError(
                f"`obs` must be assimilation.Observations, got {type(obs).__name__}."
            )
        if not isinstance(control, Control):
            raise TypeError(
                f"`control` must be assimilation.Control, got {type(control).__name__}."
            )
        if isinstance(n_steps, bool) or not isinstance(n_steps, numbers.Integral):
            raise TypeError(f"`n_steps` must be a Python int, got {n_steps!r}.")
        if n_steps < 1:
            raise ValueError(f"`n_steps` must be >= 1, got {n_steps}.")
        dt_arr, t0_arr = np.asarray(dt), np.asarray(t0)
        if dt_arr.shape != () or not (np.isfinite(dt_arr) and dt_arr > 0):
            raise ValueError(f"`dt` must be a positive finite scalar, got {dt!r}.")
        if t0_arr.shape != () or not np.isfinite(t0_arr):
            raise ValueError(f"`t0` must be a finite scalar, got {t0!r}.")
        model.check_state(state0)
        if control.model_error is not None and n_steps % control.model_error.n_windows:
            raise ValueError(
                f"`n_steps` = {n_steps} is not divisible by ModelError(n_windows="
                f"{control.model_error.n_windows}); sub-windows must have equal length."
            )
        if obs_op is None:
            obs_op = Interpolation(model.grid, obs.positions, field=obs.field)
        elif not isinstance(obs_op, AbstractObservationOperator):
            raise TypeError(
                "`obs_op` must be an AbstractObservationOperator, got "
                f"{type(obs_op).__name__}."
            )
        n_out = jax.eval_shape(obs_op, state0).shape
        if n_out != (obs.n_sensors,):
            raise ValueError(
                f"`obs_op` returns shape {n_out} but `obs` has {obs.n_sensors} sensors."
            )
        self.model = model
        self.stepper = stepper
        self.state0 = state0
        self.obs = obs
        self.control = control.resolve(model, state0)
        self.obs_op = obs_op
        self.sampling = TimeInterpolation(
            obs.times, t0=float(t0), dt=float(dt), n_steps=int(n_steps)
        )
        self.adjoint = adjoint
        self.t0 = float(t0)
        self.dt = float(dt)
        self.n_steps = int(n_steps)
        self.throw = bool(throw)
        _warn_if_unobserved(obs, self.t0, self.t0 + self.n_steps * self.dt)
        # The model runs inside jit (traced), where simulate cannot check the
        # stepper at this dt: check it here, with concrete values.
        stepper.check_run(model, state0, dt, t0)

    # ------------------------------------------------------------------ the control

    def init(self) -> dict:
        """The whitened control of the background ($v = 0$)."""
        return self.control.zeros(self.state0)

    def check(self, control) -> None:
        self.control.check_control(control, self.state0)

    def decode(self, v) -> Decoded:
        """Everything the forecast runs, from one pass over the control variables:
        the model at ``v``, $x_0(v)$, the forcings and each variable's value."""
        return self.control.decode(v, self.model, self.state0)

    def initial_state(self, v):
        """$x_0(v)$."""
        return self.decode(v).initial_state

    def parameters(self, v) -> dict:
        """Physical parameter values ``{name: value}``."""
        values = self.decode(v).values
        return {name: values[name] for name in self.control.parameter_names}

    def forcings(self, v):
        """Model-error forcings, leading axis ``n_windows`` (``None`` if strong)."""
        return self.decode(v).forcings

    def model_at(self, v):
        """The model with the controlled parameters set from ``v``."""
        return self.decode(v).model

    def window_models(self, v) -> tuple[dphys.AbstractModel, ...]:
        """The model run on each sub-window: the model at ``v`` (strong
        constraint), or that model plus sub-window $j$'s forcing
        (:class:`dphys.Augmented`) under weak constraint."""
        return self._window_models(self.decode(v))

    def _window_models(self, decoded: Decoded):
        if decoded.forcings is None:
            return (decoded.model,)
        n_win = jtu.tree_leaves(decoded.forcings)[0].shape[0]
        return tuple(
            dphys.Augmented(
                decoded.model,
                forcing=jtu.tree_map(lambda f, j=j: f[j], decoded.forcings),
            )
            for j in range(n_win)
        )

    # ------------------------------------------------------------------ the forecast

    def forecast(self, v):
        r"""Run the window from control ``v``.

        Returns:
            ``(hx, final)``: the model equivalents $H(x(t_k))$ at the observation
            times, shape ``(n_times, n_sensors)``, and the state at the end of the
            window.
        """
        decoded = self.decode(v)
        models = self._window_models(decoded)
        hook = _ObservationHook(self.obs_op)
        steps = self.sampling.steps
        m = self.n_steps // len(models)
        state, parts = decoded.initial_state, []
        for j, model in enumerate(models):
            # The saved steps of sub-window j, counted from its start; step 0 (the
            # initial state) belongs to the first.
            local = tuple(
                s - j * m
                for s in steps
                if j * m < s <= (j + 1) * m or (j == 0 and s == 0)
            )
            traj = dphys.simulate(
                model,
                self.stepper,
                state,
                dt=self.dt,
                n_steps=m,
                t0=self.t0 + j * m * self.dt,
                saveat=_saveat(local, hook),
                adjoint=self.adjoint,
                throw=self.throw,
            )
            if local:
                parts.append(traj.ys)
            state = traj.final
        saved = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
        return self.sampling(saved), state

    def predict(self, v):
        """Model equivalents $H(x(t_k))$, shape ``(n_times, n_sensors)``."""
        return self.forecast(v)[0]

    def final_state(self, v):
        """The state at the end of the window, $x(t_0 + n\\Delta t)$."""
        return self.forecast(v)[1]

    # --------------------------------------------------------------------- the cost

    def _whiten(self, hx):
        y = self.obs.values.astype(hx.dtype)
        valid = ~jnp.isnan(y)
        # Double `where`: the NaN never enters an arithmetic operation, so neither
        # the value nor the gradient can become NaN.
        y_safe = jnp.where(valid, y, 0)
        sigma = self.obs.sigma.astype(hx.dtype)
        return jnp.where(valid, (hx - y_safe) / sigma[None, :], 0)

    def obs_residual(self, v):
        r"""Whitened residuals $R^{-1/2}(H(x(t_k)) - y_k)$, zero where missing.

        Shape ``(n_times, n_sensors)``; the observation term is half its squared
        norm. Its Jacobian is what Gauss-Newton linearises.
        """
        return self._whiten(self.predict(v))

    def residual(self, v) -> dict:
        r"""``{"background": v, "observation": obs_residual(v)}``, with
        $J = \tfrac12\|r\|^2$."""
        return {BACKGROUND: v, OBSERVATION: self.obs_residual(v)}

    def terms(self, v) -> dict:
        r"""``{"background": ½‖v‖², "observation": ½‖R^{-1/2}(H(x) - y)‖²}``."""
        return {
            BACKGROUND: 0.5 * otu.tree_norm(v, squared=True),
            OBSERVATION: 0.5 * jnp.sum(jnp.square(self.obs_residual(v))),
        }

    def innovations(self, v):
        """$y_k - H(x(t_k))$ (observation minus model), NaN where missing."""
        hx = self.predict(v)
        y = self.obs.values.astype(hx.dtype)
        return jnp.where(jnp.isnan(y), jnp.nan, y - hx)
