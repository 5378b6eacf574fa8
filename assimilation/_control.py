r"""What a variational analysis adjusts: the control declaration.

A :class:`Control` lists, in one place, every quantity the assimilation may change:

* :class:`InitialState`: the initial state $x_0 = x_b + U_x v_x$;
* :class:`Parameter`: a physical parameter of the model (a scalar or a field, e.g.
  ``kappa``), optimised in an unconstrained space through a :class:`Transform`:
  $p = T(z)$, $z = T^{-1}(p_b) + U_p v_p$ (``Log`` keeps $p$ positive,
  ``Bounded`` keeps it in an interval);
* :class:`ModelError`: weak-constraint model-error forcing, one field per
  sub-window, $\eta_j = U_q w_j$ with covariance $Q = U_q U_q^\top$.

The optimiser only ever sees the *whitened* control $v$, a ``dict`` mapping each
name to an array (``"initial_state"`` to a state-shaped pytree, ``"model_error"``
to an array with a leading sub-window axis): $v = 0$ is the background and the
background term of the cost is $\tfrac12\|v\|^2$.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

from ._covariance import AbstractCovariance, Diagonal


INITIAL_STATE = "initial_state"
MODEL_ERROR = "model_error"
_RESERVED = (INITIAL_STATE, MODEL_ERROR)


# -------------------------------------------------------------------------- transforms


class AbstractTransform(eqx.Module):
    r"""A bijection $p = T(z)$ from an unconstrained $z$ to a physical parameter $p$."""

    @abc.abstractmethod
    def forward(self, z):
        """$T(z)$: unconstrained to physical."""

    @abc.abstractmethod
    def inverse(self, p):
        """$T^{-1}(p)$: physical to unconstrained."""

    def check(self, p, name: str) -> None:
        """Raise ``ValueError`` if a concrete physical value lies outside the range."""

    def derivative(self, z):
        """$T'(z)$ elementwise (for the delta-method standard deviation)."""
        return jax.vmap(jax.grad(lambda s: self.forward(s)))(
            jnp.ravel(z)
        ).reshape(jnp.shape(z))


class Identity(AbstractTransform):
    """No constraint: $p = z$."""

    def forward(self, z):
        return z

    def inverse(self, p):
        return p


def _check_range(p, name, lower=None, upper=None):
    if isinstance(p, jax.core.Tracer):
        return
    arr = np.asarray(p)
    ok = np.isfinite(arr)
    if lower is not None:
        ok &= arr > lower
    if upper is not None:
        ok &= arr < upper
    if not np.all(ok):
        lo = "-inf" if lower is None else lower
        hi = "inf" if upper is None else upper
        raise ValueError(
            f"`{name}`: the background must lie strictly inside ({lo}, {hi}) for its "
            f"transform, got values in [{np.nanmin(arr)}, {np.nanmax(arr)}]."
        )


class Log(AbstractTransform):
    r"""Positivity: $p = e^z$. A std $\sigma$ on $z$ is a multiplicative factor $e^\sigma$."""

    def forward(self, z):
        return jnp.exp(z)

    def inverse(self, p):
        return jnp.log(p)

    def derivative(self, z):
        return jnp.exp(z)

    def check(self, p, name):
        _check_range(p, name, lower=0.0)


class Softplus(AbstractTransform):
    r"""Positivity, linear for large values: $p = \log(1 + e^z)$."""

    def forward(self, z):
        return jax.nn.softplus(z)

    def inverse(self, p):
        # log(e^p - 1), written to stay accurate for large and small p.
        return p + jnp.log(-jnp.expm1(-p))

    def derivative(self, z):
        return jax.nn.sigmoid(z)

    def check(self, p, name):
        _check_range(p, name, lower=0.0)


class Bounded(AbstractTransform):
    r"""An interval: $p = a + (b-a)\,\mathrm{sigmoid}(z)$.

    Attributes:
        lower, upper: the bounds $a < b$ (static floats).
    """

    lower: float = eqx.field(static=True)
    upper: float = eqx.field(static=True)

    def __check_init__(self):
        if not (np.isfinite(self.lower) and np.isfinite(self.upper)) or not (
            self.lower < self.upper
        ):
            raise ValueError(
                f"`Bounded` needs finite lower < upper, got ({self.lower}, "
                f"{self.upper})."
            )

    def forward(self, z):
        return self.lower + (self.upper - self.lower) * jax.nn.sigmoid(z)

    def inverse(self, p):
        s = (p - self.lower) / (self.upper - self.lower)
        return jnp.log(s) - jnp.log1p(-s)

    def derivative(self, z):
        s = jax.nn.sigmoid(z)
        return (self.upper - self.lower) * s * (1 - s)

    def check(self, p, name):
        _check_range(p, name, lower=self.lower, upper=self.upper)


# ------------------------------------------------------------------------------ specs


def _is_cov(x) -> bool:
    return isinstance(x, AbstractCovariance)


def _cov_map(method: str, cov, tree):
    """Apply ``cov.<method>`` leafwise: ``cov`` is one covariance or a pytree prefix."""
    return jtu.tree_map(lambda c, t: getattr(c, method)(t), cov, tree, is_leaf=_is_cov)


class InitialState(eqx.Module):
    r"""Control of the initial state: $x_0 = x_b + U v$, $B = UU^\top$.

    The background $x_b$ is the ``state0`` given to :class:`assimilation.FourDVar`.

    Attributes:
        covariance: the background-error covariance $B$: one
            :class:`AbstractCovariance` for an array state, or a pytree of them with
            the structure of the state (one per field) for multi-field states.
    """

    covariance: Any

    def __check_init__(self):
        leaves = jtu.tree_leaves(self.covariance, is_leaf=_is_cov)
        if not leaves or not all(_is_cov(c) for c in leaves):
            raise TypeError(
                "`covariance` must be an AbstractCovariance (e.g. "
                "assimilation.Diffusion(grid, length_scale, std=...)) or a pytree of "
                f"them, one per state field; got {type(self.covariance).__name__}."
            )

    name = INITIAL_STATE


class Parameter(eqx.Module):
    r"""A physical model parameter to calibrate: $p = T(z)$, $z = T^{-1}(p_b) + Uv$.

    Attributes:
        name: a label (also the key of this parameter in the control and in every
            result); by default also the model attribute it sets (``"kappa"`` sets
            ``model.kappa``; dotted paths such as ``"friction.drag"`` follow
            attributes).
        background: the prior value $p_b$ in physical units (scalar or field);
            ``None`` takes the model's current value. A field background for a
            model leaf that is a scalar turns the parameter into a field.
        transform: the :class:`AbstractTransform` $T$ (``Identity()``, ``Log()``,
            ``Softplus()``, ``Bounded(a, b)``).
        covariance: prior covariance of $z$ (the *unconstrained* value), e.g.
            ``Diagonal(0.5)`` for a log-parameter known to a factor $e^{0.5}$, or
            ``Diffusion(grid, ...)`` for a smooth field. ``sigma=`` is a shortcut for
            a :class:`Diagonal` covariance.
        where: optional ``where(model) -> leaf`` selecting the model leaf (as in
            ``eqx.tree_at``) when it is not an attribute path named by ``name``.

    Example:
        >>> import assimilation as da
        >>> da.Parameter("kappa", transform=da.Log(), sigma=0.5).name
        'kappa'
    """

    name: str = eqx.field(static=True)
    background: Any
    transform: AbstractTransform
    covariance: AbstractCovariance | None
    where: Callable | None = eqx.field(static=True)

    def __init__(
        self,
        name: str,
        *,
        background=None,
        transform: AbstractTransform | None = None,
        sigma=None,
        covariance: AbstractCovariance | None = None,
        where: Callable | None = None,
    ):
        if not isinstance(name, str) or not name:
            raise TypeError(f"`name` must be a non-empty string, got {name!r}.")
        if name in _RESERVED:
            raise ValueError(
                f"`name` {name!r} is reserved for the state/model-error controls; "
                "choose another label."
            )
        if (sigma is None) == (covariance is None):
            raise ValueError(
                f"Parameter {name!r}: give exactly one of `sigma` (prior std of the "
                "unconstrained value) or `covariance`."
            )
        if covariance is not None and not _is_cov(covariance):
            raise TypeError(
                f"Parameter {name!r}: `covariance` must be an AbstractCovariance, got "
                f"{type(covariance).__name__}."
            )
        transform = Identity() if transform is None else transform
        if not isinstance(transform, AbstractTransform):
            raise TypeError(
                f"Parameter {name!r}: `transform` must be an AbstractTransform such as "
                f"assimilation.Log(), got {type(transform).__name__}."
            )
        self.name = name
        self.background = None if background is None else jnp.asarray(background)
        self.transform = transform
        if covariance is None:
            std = jnp.asarray(sigma)
            if not isinstance(std, jax.core.Tracer) and not np.all(
                np.isfinite(np.asarray(std)) & (np.asarray(std) > 0)
            ):
                raise ValueError(
                    f"Parameter {name!r}: `sigma` must be positive and finite, got "
                    f"{np.asarray(std)}."
                )
            # The shape is fixed when the background is known (see `resolve`).
            covariance = None if self.background is None else Diagonal(
                std, shape=jnp.shape(self.background)
            )
            self._sigma = std
        else:
            self._sigma = None
        self.covariance = covariance
        self.where = where

    _sigma: Any = None

    def select(self, model):
        """The model leaf this parameter sets."""
        if self.where is not None:
            return self.where(model)
        obj = model
        for part in self.name.split("."):
            try:
                obj = getattr(obj, part)
            except AttributeError:
                raise ValueError(
                    f"Parameter {self.name!r}: the model ({type(model).__name__}) has "
                    f"no attribute {part!r}; pass `where=lambda m: m.<leaf>` to say "
                    "which model leaf it sets."
                ) from None
        return obj

    def resolve(self, model) -> Parameter:
        """Fill in the background from ``model`` and check shapes and ranges."""
        current = self.select(model)
        if current is None or not hasattr(current, "shape"):
            raise ValueError(
                f"Parameter {self.name!r}: the model leaf is "
                f"{type(current).__name__}, not an array; give the model an array "
                "value for it."
            )
        background = self.background
        if background is None:
            background = jnp.asarray(current)
        # A scalar model value may be calibrated as a field (e.g. a constant kappa
        # becoming kappa(x)): the model's own constructor accepts both.
        if jnp.shape(current) != () and jnp.shape(background) != jnp.shape(current):
            raise ValueError(
                f"Parameter {self.name!r}: `background` has shape "
                f"{jnp.shape(background)} but the model's value has shape "
                f"{jnp.shape(current)}."
            )
        self.transform.check(background, f"{self.name}.background")
        cov = self.covariance
        if cov is None:
            cov = Diagonal(self._sigma, shape=jnp.shape(background))
        cov.check_shape(background, f"{self.name}.covariance")
        new = eqx.tree_at(lambda p: p.background, self, background, is_leaf=_none)
        return eqx.tree_at(lambda p: p.covariance, new, cov, is_leaf=_none)

    def unconstrained_background(self):
        return self.transform.inverse(self.background)

    def physical(self, v):
        """Physical value $T(T^{-1}(p_b) + Uv)$ for the whitened control ``v``."""
        z = self.unconstrained_background() + self.covariance.sqrt(v)
        return self.transform.forward(z)

    def unconstrained(self, v):
        """$z = T^{-1}(p_b) + Uv$."""
        return self.unconstrained_background() + self.covariance.sqrt(v)

    def apply(self, model, value):
        """``model`` with this parameter set to ``value``."""
        if self.where is not None:
            return eqx.tree_at(self.where, model, value)

        def where(m):
            obj = m
            for part in self.name.split("."):
                obj = getattr(obj, part)
            return obj

        return eqx.tree_at(where, model, value)


def _none(x):
    return x is None


class ModelError(eqx.Module):
    r"""Weak-constraint model error: a constant forcing $\eta_j$ per sub-window.

    The window of ``n_steps`` model steps is split into ``n_windows`` equal
    sub-windows; on sub-window $j$ the model is advanced with the extra source
    $\eta_j$ (added to the model's forcing, in state units per time unit), and
    $\eta_j = U_q w_j$ with the whitened control $w_j$, so $\eta_j\sim\mathcal N(0,Q)$
    a priori and the cost gains $\tfrac12\sum_j\|w_j\|^2$.

    Attributes:
        covariance: $Q$, the covariance of each $\eta_j$ (an
            :class:`AbstractCovariance` on the state shape, or a pytree of them
            for multi-field states).
        n_windows: number of sub-windows (static); must divide ``n_steps``.
    """

    covariance: Any
    n_windows: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if isinstance(self.n_windows, bool) or not isinstance(self.n_windows, int) or (
            self.n_windows < 1
        ):
            raise ValueError(
                f"`n_windows` must be an integer >= 1, got {self.n_windows!r}."
            )
        leaves = jtu.tree_leaves(self.covariance, is_leaf=_is_cov)
        if not leaves or not all(_is_cov(c) for c in leaves):
            raise TypeError(
                "`covariance` must be an AbstractCovariance or a pytree of them, got "
                f"{type(self.covariance).__name__}."
            )

    name = MODEL_ERROR


class Control(eqx.Module):
    r"""The full control: any combination of initial state, parameters, model error.

    Attributes:
        initial_state: an :class:`InitialState`, or ``None`` to keep the initial
            state fixed at the background (parameter-only calibration).
        parameters: a tuple of :class:`Parameter` (unique names).
        model_error: a :class:`ModelError` for weak-constraint 4D-Var, or ``None``
            (strong constraint: the model is perfect).

    The whitened control is a ``dict``: ``{"initial_state": state-shaped pytree,
    <parameter name>: array of the parameter's shape, "model_error": array of shape
    (n_windows, *state shape)}`` with only the declared entries.

    Example:
        >>> import assimilation as da, dphys
        >>> grid = dphys.Grid(16, boundary="periodic")
        >>> control = da.Control(
        ...     initial_state=da.InitialState(da.Diagonal(0.1, shape=grid.shape)),
        ...     parameters=[da.Parameter("kappa", transform=da.Log(), sigma=0.5)],
        ... )
        >>> control.names
        ('initial_state', 'kappa')
    """

    initial_state: InitialState | None
    parameters: tuple[Parameter, ...]
    model_error: ModelError | None

    def __init__(self, *, initial_state=None, parameters=(), model_error=None):
        if isinstance(parameters, Parameter):
            parameters = (parameters,)
        parameters = tuple(parameters)
        for p in parameters:
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"`parameters` must hold assimilation.Parameter objects, got "
                    f"{type(p).__name__}."
                )
        names = [p.name for p in parameters]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"`parameters` has duplicate names {dup}; names are keys.")
        if initial_state is not None and not isinstance(initial_state, InitialState):
            raise TypeError(
                "`initial_state` must be an assimilation.InitialState, got "
                f"{type(initial_state).__name__}."
            )
        if model_error is not None and not isinstance(model_error, ModelError):
            raise TypeError(
                "`model_error` must be an assimilation.ModelError, got "
                f"{type(model_error).__name__}."
            )
        if initial_state is None and not parameters and model_error is None:
            raise ValueError(
                "`Control` is empty: declare at least one of `initial_state`, "
                "`parameters` or `model_error`."
            )
        self.initial_state = initial_state
        self.parameters = parameters
        self.model_error = model_error

    @property
    def names(self) -> tuple[str, ...]:
        out = []
        if self.initial_state is not None:
            out.append(INITIAL_STATE)
        out += [p.name for p in self.parameters]
        if self.model_error is not None:
            out.append(MODEL_ERROR)
        return tuple(out)

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    def resolve(self, model, state0) -> Control:
        """Fill in parameter backgrounds from ``model``; check every shape."""
        if self.initial_state is not None:
            _check_cov_tree(self.initial_state.covariance, state0, "initial_state")
        if self.model_error is not None:
            _check_cov_tree(self.model_error.covariance, state0, "model_error")
        params = tuple(p.resolve(model) for p in self.parameters)
        return eqx.tree_at(lambda c: c.parameters, self, params)

    def zeros(self, state0) -> dict:
        """The whitened control of the background, $v = 0$."""
        v = {}
        if self.initial_state is not None:
            v[INITIAL_STATE] = jtu.tree_map(jnp.zeros_like, state0)
        for p in self.parameters:
            v[p.name] = jnp.zeros(jnp.shape(p.background), jnp.result_type(float))
        if self.model_error is not None:
            n = self.model_error.n_windows
            v[MODEL_ERROR] = jtu.tree_map(
                lambda x: jnp.zeros((n,) + jnp.shape(x), x.dtype), state0
            )
        return v

    def initial_state_of(self, v, state0):
        """$x_0 = x_b + U v_x$ (``state0`` when the state is not controlled)."""
        if self.initial_state is None:
            return state0
        dx = _cov_map("sqrt", self.initial_state.covariance, v[INITIAL_STATE])
        return jtu.tree_map(lambda a, b: a + b.astype(a.dtype), state0, dx)

    def forcings_of(self, v):
        r"""Model-error forcings $\eta_j = U_q w_j$, leading axis ``n_windows``."""
        if self.model_error is None:
            return None
        cov = self.model_error.covariance
        return jax.vmap(lambda w: _cov_map("sqrt", cov, w))(v[MODEL_ERROR])

    def parameters_of(self, v) -> dict:
        """Physical parameter values ``{name: p}`` for the whitened control ``v``."""
        return {p.name: p.physical(v[p.name]) for p in self.parameters}

    def model_of(self, v, model):
        """``model`` with every controlled parameter set from ``v``."""
        for p in self.parameters:
            model = p.apply(model, p.physical(v[p.name]))
        return model

    def check_control(self, v, state0) -> None:
        """Raise ``ValueError`` unless ``v`` has this control's keys and shapes."""
        if not isinstance(v, dict) or set(v) != set(self.names):
            got = sorted(v) if isinstance(v, dict) else type(v).__name__
            raise ValueError(
                f"The control must be a dict with keys {sorted(self.names)}, got "
                f"{got}; start from `cost.init()`."
            )
        ref = self.zeros(state0)
        for k in self.names:
            a, b = jtu.tree_structure(v[k]), jtu.tree_structure(ref[k])
            shapes = [jnp.shape(x) for x in jtu.tree_leaves(v[k])]
            ref_shapes = [jnp.shape(x) for x in jtu.tree_leaves(ref[k])]
            if a != b or shapes != ref_shapes:
                raise ValueError(
                    f"Control entry {k!r} must have shapes {ref_shapes}, got {shapes}."
                )


def _check_cov_tree(cov, state, name):
    if _is_cov(cov):
        leaves = jtu.tree_leaves(state)
        if len(leaves) != 1 or not isinstance(state, jax.Array | np.ndarray):
            raise ValueError(
                f"`{name}.covariance` is a single covariance but the state has "
                f"{len(leaves)} fields ({type(state).__name__}); give a pytree of "
                "covariances with the state's structure (one per field)."
            )
        cov.check_shape(state, f"{name}.covariance")
        return
    try:
        pairs = jtu.tree_map(
            lambda c, s: (c, s), cov, state, is_leaf=_is_cov
        )
    except ValueError as err:
        raise ValueError(
            f"`{name}.covariance` must have the pytree structure of the state: {err}"
        ) from None
    for c, s in jtu.tree_leaves(pairs, is_leaf=lambda x: isinstance(x, tuple)):
        c.check_shape(s, f"{name}.covariance")
