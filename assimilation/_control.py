r"""What a variational analysis adjusts: control variables and the control.

A :class:`Control` is an ordered collection of control variables
(:class:`AbstractControlVariable`), each a quantity the assimilation may change:

* :class:`InitialState`: the initial state $x_0 = x_b + U_x v_x$;
* :class:`Parameter`: a physical parameter of the model (a scalar or a field, e.g.
  ``kappa``), optimised in an unconstrained space through a :class:`Transform`:
  $p = T(z)$, $z = T^{-1}(p_b) + U_p v_p$ (``Log`` keeps $p$ positive,
  ``Bounded`` keeps it in an interval);
* :class:`ModelError`: weak-constraint model-error forcing, one field per
  sub-window, $\eta_j = U_q w_j$ with covariance $Q = U_q U_q^\top$;
* any other :class:`AbstractControlVariable` (e.g. the weights of a learned model
  correction): the collection is open.

The optimiser only ever sees the *whitened* control $v$, a ``dict`` mapping each
variable's ``name`` to its block (``"initial_state"`` to a state-shaped pytree,
``"model_error"`` to an array with a leading sub-window axis): $v = 0$ is the
background. :meth:`Control.decode` turns $v$ into everything a forecast needs, in
one pass over the variables (:class:`Decoded`: the model, the initial state, the
forcings and each variable's physical value), and each variable pushes a whitened
covariance forward to standard deviations of its physical value
(:meth:`AbstractControlVariable.push_forward`), so that posteriors and analyses
iterate over variables instead of knowing their kinds.
"""

import abc
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import equinox as eqx
import jax
import jax.flatten_util as jfu
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from equinox import AbstractVar

from ._checks import check_positive
from ._covariance import AbstractCovariance, Diagonal
from ._transforms import AbstractTransform, Identity


INITIAL_STATE = "initial_state"
MODEL_ERROR = "model_error"
_RESERVED = (INITIAL_STATE, MODEL_ERROR)


# ------------------------------------------------------------------------ decoding


class Decoded(eqx.Module):
    r"""A whitened control decoded into what a forecast runs: one hop, all at once.

    Attributes:
        model: the model with every controlled parameter set.
        initial_state: $x_0$ (the background $x_b$ when the state is not
            controlled).
        forcings: the model-error forcings, a pytree with the state's structure and
            a leading sub-window axis, or ``None`` (strong constraint).
        values: ``{name: physical value}`` of every control variable, in control
            order (the initial state, each parameter $p = T(z)$, the forcings).
    """

    model: Any
    initial_state: Any
    forcings: Any = None
    values: dict = eqx.field(default_factory=dict)

    def with_value(self, name: str, value, **changes) -> "Decoded":
        """A copy with ``values[name] = value`` and the given fields replaced."""
        return dataclasses.replace(self, values={**self.values, name: value}, **changes)


# ----------------------------------------------------------------- control variables


def _is_cov(x) -> bool:
    return isinstance(x, AbstractCovariance)


def _cov_map(method: str, cov, tree):
    """Apply ``cov.<method>`` leafwise: ``cov`` is one covariance or a pytree prefix."""
    return jtu.tree_map(lambda c, t: getattr(c, method)(t), cov, tree, is_leaf=_is_cov)


def _cov_variance(cov, tree):
    """``diag(B)`` leafwise, broadcast to ``tree``'s leaves (``cov``: one
    covariance or a pytree prefix of ``tree``)."""
    return jtu.tree_map(
        lambda c, t: jnp.broadcast_to(c.variance(), jnp.shape(t)).astype(
            jnp.result_type(t)
        ),
        cov,
        tree,
        is_leaf=_is_cov,
    )


def _labels(name: str, shape: tuple[int, ...]) -> list[str]:
    if shape == ():
        return [name]
    return [f"{name}[{','.join(str(i) for i in idx)}]" for idx in np.ndindex(*shape)]


class AbstractControlVariable(eqx.Module):
    r"""One block of the whitened control $v$: a quantity the analysis may change.

    A variable maps its whitened block $v_i$ to a Gaussian ("unconstrained")
    coordinate $z_i = z_{b,i} + U_i v_i$ (affine, $U_i U_i^\top$ its prior
    covariance) and then to its physical value $p_i = T_i(z_i)$ (elementwise; the
    identity for states and forcings). Subclasses implement:

    * :meth:`zeros`: the block of the background, $v_i = 0$, with its structure;
    * :meth:`decode`: apply the block to a :class:`Decoded` (set a model leaf, add
      an increment to the initial state, set the forcings, ...) and record the
      physical value under :attr:`name`;
    * :meth:`sqrt`: the linear map $U_i$ (whitened block to an increment of $z_i$,
      with the structure of the physical value);

    and may override :meth:`resolve` (fill in backgrounds from the model, check
    shapes), :meth:`derivative` ($T_i'(z_i)$ for the delta method) and
    :meth:`unconstrained`. Everything else (the push-forward of a whitened
    covariance to physical standard deviations) is derived from these.

    Attributes:
        name: the key of the block in the whitened control and in every result.
        correlated: class-level flag: whether the variable's entries enter the
            posterior correlation matrix (:class:`assimilation.Posterior`); true
            for parameters (a few entries), false for states and forcings.
    """

    name: AbstractVar[str]
    correlated: ClassVar[bool] = False

    def resolve(self, model, state0) -> "AbstractControlVariable":
        """This variable with its backgrounds filled in from ``model``/``state0``
        and its shapes checked (raise ``ValueError``/``TypeError`` otherwise)."""
        return self

    @abc.abstractmethod
    def zeros(self, state0):
        """The whitened block of the background, $v_i = 0$."""

    @abc.abstractmethod
    def decode(self, v, decoded: Decoded) -> "Decoded":
        """``decoded`` with this variable's block ``v`` applied."""

    @abc.abstractmethod
    def sqrt(self, v):
        """$U_i v$: the (linear) increment of the Gaussian coordinate."""

    def derivative(self, v):
        r"""$T_i'(z_i(v))$ elementwise, or ``None`` when $T_i$ is the identity."""
        return None

    def unconstrained(self, v):
        r"""$z_i(v)$, or ``None`` when it depends on more than the variable (e.g.
        the initial state's background)."""
        return None

    def labels(self, v) -> tuple[str, ...]:
        """One label per entry of the physical value (``name`` or ``name[i,j]``)."""
        leaves = jtu.tree_leaves(jax.eval_shape(self.sqrt, v))
        if len(leaves) == 1:
            return tuple(_labels(self.name, tuple(leaves[0].shape)))
        return tuple(
            label
            for k, leaf in enumerate(leaves)
            for label in _labels(f"{self.name}.{k}", tuple(leaf.shape))
        )

    def sqrt_matrix(self, v):
        """$U_i$ as a dense matrix, ``(entries of the value, entries of v)``."""
        flat, unravel = jfu.ravel_pytree(v)
        eye = jnp.eye(flat.size, dtype=flat.dtype)
        cols = jax.vmap(lambda e: jfu.ravel_pytree(self.sqrt(unravel(e)))[0])(eye)
        return cols.T

    def prior_variance(self, v):
        r"""$\mathrm{diag}(U_i U_i^\top)$, the prior variance of $z_i$, with the
        structure of the physical value (default: from :meth:`sqrt_matrix`;
        variables with a covariance override it with the covariance's own
        ``variance()``)."""
        u = self.sqrt_matrix(v)
        like = jax.eval_shape(self.sqrt, v)
        _, unravel = jfu.ravel_pytree(
            jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)
        )
        return unravel(jnp.sum(u * u, axis=1))

    def push_forward_low_rank(self, v, vectors, weights):
        r"""Standard deviations from a low-rank update of the prior,
        $C = I + V\,\mathrm{diag}(w)\,V^\top$ on the block $v_i$.

        Then $\mathrm{Var}(z_i) = \mathrm{diag}(U_iU_i^\top) + \sum_j w_j
        (U_i V_{:,j})^2$ (one product with $U_i$ per column, no dense $U_i$), and
        $\sigma_p = |T_i'(z_i)|\,\sigma_z$ as in :meth:`push_forward`.

        Args:
            v: the block at the analysis.
            vectors: ``(k, n_i)``, the columns $V_{:,j}$ as rows (flattened
                blocks).
            weights: ``(k,)``.

        Returns:
            ``(std, std_unconstrained)`` with the structure of the physical value.
        """
        _, unravel = jfu.ravel_pytree(v)
        cols = jax.vmap(lambda row: self.sqrt(unravel(row)))(vectors)
        prior = self.prior_variance(v)
        w = jnp.asarray(weights)
        var = jtu.tree_map(
            lambda p, c: p + jnp.tensordot(w, c * c, axes=1, precision="highest"),
            prior,
            cols,
        )
        std_z = jtu.tree_map(lambda x: jnp.sqrt(x), var)
        d = self.derivative(v)
        std = (
            std_z if d is None else jtu.tree_map(lambda s, g: jnp.abs(g) * s, std_z, d)
        )
        return std, std_z

    def push_forward(self, v, covariance):
        r"""Standard deviations of the physical value from a whitened covariance.

        With $C$ the covariance of the block $v_i$ (a dense ``(n_i, n_i)`` matrix
        over the flattened block, e.g. a block of the Gauss-Newton posterior
        $(I + J_o^\top J_o)^{-1}$): $\mathrm{Cov}(z_i) = U_i C U_i^\top$, and
        to first order (delta method) $\sigma_{p} = |T_i'(z_i)|\,\sigma_{z}$.

        Returns:
            ``(std, std_unconstrained)``, each with the structure of the physical
            value (``std_unconstrained`` is $\sigma_z$).
        """
        u = self.sqrt_matrix(v)
        var = jnp.sum(jnp.matmul(u, covariance, precision="highest") * u, axis=1)
        like = jax.eval_shape(self.sqrt, v)
        _, unravel = jfu.ravel_pytree(
            jtu.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), like)
        )
        std_z = unravel(jnp.sqrt(var))
        d = self.derivative(v)
        std = (
            std_z if d is None else jtu.tree_map(lambda s, g: jnp.abs(g) * s, std_z, d)
        )
        return std, std_z


class InitialState(AbstractControlVariable):
    r"""Control of the initial state: $x_0 = x_b + U v$, $B = UU^\top$.

    The background $x_b$ is the ``state0`` given to :class:`assimilation.FourDVar`
    (the initial state of the :class:`Decoded` the block is applied to).

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

    @property
    def name(self) -> str:
        return INITIAL_STATE

    def resolve(self, model, state0):
        _check_cov_tree(self.covariance, state0, self.name)
        return self

    def zeros(self, state0):
        return jtu.tree_map(jnp.zeros_like, state0)

    def sqrt(self, v):
        return _cov_map("sqrt", self.covariance, v)

    def prior_variance(self, v):
        return _cov_variance(self.covariance, v)

    def decode(self, v, decoded):
        dx = self.sqrt(v)
        x0 = jtu.tree_map(lambda a, b: a + b.astype(a.dtype), decoded.initial_state, dx)
        return decoded.with_value(self.name, x0, initial_state=x0)


class Parameter(AbstractControlVariable):
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
    _sigma: Any = None

    correlated: ClassVar[bool] = True

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
            check_positive(std, f"Parameter {name!r}: `sigma`")
            # The shape is fixed when the background is known (see `resolve`).
            covariance = (
                None
                if self.background is None
                else Diagonal(std, shape=jnp.shape(self.background))
            )
            self._sigma = std
        else:
            self._sigma = None
        self.covariance = covariance
        self.where = where

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

    def resolve(self, model, state0=None) -> "Parameter":
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

    def zeros(self, state0=None):
        return jnp.zeros(jnp.shape(self.background), jnp.result_type(float))

    def unconstrained_background(self):
        return self.transform.inverse(self.background)

    def to_unconstrained(self, value):
        """$T^{-1}(p)$ of a physical value ``value``."""
        return self.transform.inverse(jnp.asarray(value))

    def sqrt(self, v):
        return self.covariance.sqrt(v)

    def prior_variance(self, v):
        return jnp.broadcast_to(self.covariance.variance(), jnp.shape(v))

    def unconstrained(self, v):
        """$z = T^{-1}(p_b) + Uv$."""
        return self.unconstrained_background() + self.covariance.sqrt(v)

    def physical(self, v):
        """Physical value $T(T^{-1}(p_b) + Uv)$ for the whitened control ``v``."""
        return self.transform.forward(self.unconstrained(v))

    def derivative(self, v):
        return self.transform.derivative(self.unconstrained(v))

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

    def decode(self, v, decoded):
        p = self.physical(v)
        return decoded.with_value(self.name, p, model=self.apply(decoded.model, p))


def _none(x):
    return x is None


class ModelError(AbstractControlVariable):
    r"""Weak-constraint model error: a constant forcing $\eta_j$ per sub-window.

    The window of ``n_steps`` model steps is split into ``n_windows`` equal
    sub-windows; on sub-window $j$ the model is advanced with the extra source
    $\eta_j$ (added to the model's forcing by :class:`dphys.Augmented`, in state
    units per time unit), and $\eta_j = U_q w_j$ with the whitened control $w_j$,
    so $\eta_j\sim\mathcal N(0,Q)$ a priori and the cost gains
    $\tfrac12\sum_j\|w_j\|^2$.

    Attributes:
        covariance: $Q$, the covariance of each $\eta_j$ (an
            :class:`AbstractCovariance` on the state shape, or a pytree of them
            for multi-field states).
        n_windows: number of sub-windows (static); must divide ``n_steps``.
    """

    covariance: Any
    n_windows: int = eqx.field(static=True, default=1)

    def __check_init__(self):
        if (
            isinstance(self.n_windows, bool)
            or not isinstance(self.n_windows, int)
            or (self.n_windows < 1)
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

    @property
    def name(self) -> str:
        return MODEL_ERROR

    def resolve(self, model, state0):
        _check_cov_tree(self.covariance, state0, self.name)
        return self

    def zeros(self, state0):
        n = self.n_windows
        return jtu.tree_map(lambda x: jnp.zeros((n,) + jnp.shape(x), x.dtype), state0)

    def sqrt(self, v):
        return jax.vmap(lambda w: _cov_map("sqrt", self.covariance, w))(v)

    def prior_variance(self, v):
        # The same Q for every sub-window.
        return jax.vmap(lambda w: _cov_variance(self.covariance, w))(v)

    def decode(self, v, decoded):
        if decoded.forcings is not None:
            raise ValueError(
                "Two control variables set the model-error forcings; declare one "
                "ModelError."
            )
        eta = self.sqrt(v)
        return decoded.with_value(self.name, eta, forcings=eta)


# --------------------------------------------------------------------- the control


class Control(eqx.Module):
    r"""The control: an ordered, open collection of control variables.

    ``Control(*variables)`` takes any :class:`AbstractControlVariable` s (unique
    names); the keywords ``initial_state=``, ``parameters=`` and ``model_error=``
    append an :class:`InitialState`, :class:`Parameter` s and a
    :class:`ModelError` after them, in that order. The whitened control is a
    ``dict`` ``{variable.name: block}``: ``{"initial_state": state-shaped pytree,
    <parameter name>: array of the parameter's shape, "model_error": array of shape
    (n_windows, *state shape)}`` with only the declared entries.

    Attributes:
        variables: the control variables, in order.

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

    variables: tuple[AbstractControlVariable, ...]

    def __init__(self, *variables, initial_state=None, parameters=(), model_error=None):
        if isinstance(parameters, Parameter):
            parameters = (parameters,)
        parameters = tuple(parameters)
        for p in parameters:
            if not isinstance(p, Parameter):
                raise TypeError(
                    f"`parameters` must hold assimilation.Parameter objects, got "
                    f"{type(p).__name__}."
                )
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
        for i, var in enumerate(variables):
            if not isinstance(var, AbstractControlVariable):
                raise TypeError(
                    f"`Control(*variables)`: entry {i} must be an "
                    "assimilation.AbstractControlVariable (InitialState, Parameter, "
                    f"ModelError, ...), got {type(var).__name__}."
                )
        variables = (
            *variables,
            *(() if initial_state is None else (initial_state,)),
            *parameters,
            *(() if model_error is None else (model_error,)),
        )
        if not variables:
            raise ValueError(
                "`Control` is empty: declare at least one of `initial_state`, "
                "`parameters` or `model_error` (or pass control variables)."
            )
        names = [v.name for v in variables]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(
                f"The control has duplicate names {dup}; names are the keys of the "
                "whitened control, give each variable its own."
            )
        self.variables = variables

    # -- the collection
    def __iter__(self) -> Iterator[AbstractControlVariable]:
        return iter(self.variables)

    def __len__(self) -> int:
        return len(self.variables)

    def __getitem__(self, name: str) -> "AbstractControlVariable":
        for var in self.variables:
            if var.name == name:
                return var
        raise KeyError(f"no control variable {name!r}; the control has {self.names}.")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(v.name for v in self.variables)

    def _of_type(self, cls):
        return tuple(v for v in self.variables if isinstance(v, cls))

    @property
    def initial_state(self) -> InitialState | None:
        """The :class:`InitialState` variable, or ``None``."""
        found = self._of_type(InitialState)
        return found[0] if found else None

    @property
    def parameters(self) -> tuple[Parameter, ...]:
        """The :class:`Parameter` variables, in order."""
        return self._of_type(Parameter)

    @property
    def model_error(self) -> ModelError | None:
        """The :class:`ModelError` variable, or ``None`` (strong constraint)."""
        found = self._of_type(ModelError)
        return found[0] if found else None

    @property
    def parameter_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.parameters)

    # -- building and checking
    def resolve(self, model, state0) -> "Control":
        """Every variable resolved against ``model`` and ``state0`` (backgrounds
        filled in, shapes checked)."""
        resolved = tuple(v.resolve(model, state0) for v in self.variables)
        return eqx.tree_at(lambda c: c.variables, self, resolved)

    def zeros(self, state0) -> dict:
        """The whitened control of the background, $v = 0$."""
        return {v.name: v.zeros(state0) for v in self.variables}

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

    # -- decoding
    def decode(self, v, model, state0) -> "Decoded":
        """Decode the whitened control ``v`` in one pass over the variables.

        Args:
            v: the whitened control (``dict``).
            model: the model at its background parameters.
            state0: the background initial state $x_b$.

        Returns:
            A :class:`Decoded`: the model with the controlled parameters set, the
            initial state, the forcings and every variable's physical value.
        """
        decoded = Decoded(model=model, initial_state=state0)
        for var in self.variables:
            decoded = var.decode(v[var.name], decoded)
        return decoded

    def sqrt(self, v) -> dict:
        """$U v$ blockwise: ``{name: increment of the Gaussian coordinate}``."""
        return {var.name: var.sqrt(v[var.name]) for var in self.variables}

    # -- single quantities (kept for compatibility; `decode` gives them all at once)
    def initial_state_of(self, v, state0):
        """$x_0 = x_b + U v_x$ (``state0`` when the state is not controlled)."""
        var = self.initial_state
        if var is None:
            return state0
        return var.decode(v[var.name], Decoded(None, state0)).initial_state

    def forcings_of(self, v):
        r"""Model-error forcings $\eta_j = U_q w_j$, leading axis ``n_windows``."""
        var = self.model_error
        return None if var is None else var.sqrt(v[var.name])

    def parameters_of(self, v) -> dict:
        """Physical parameter values ``{name: p}`` for the whitened control ``v``."""
        return {p.name: p.physical(v[p.name]) for p in self.parameters}

    def model_of(self, v, model):
        """``model`` with every controlled parameter set from ``v``."""
        for p in self.parameters:
            model = p.apply(model, p.physical(v[p.name]))
        return model


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
        pairs = jtu.tree_map(lambda c, s: (c, s), cov, state, is_leaf=_is_cov)
    except ValueError as err:
        raise ValueError(
            f"`{name}.covariance` must have the pytree structure of the state: {err}"
        ) from None
    for c, s in jtu.tree_leaves(pairs, is_leaf=lambda x: isinstance(x, tuple)):
        c.check_shape(s, f"{name}.covariance")
