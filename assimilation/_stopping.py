"""When a minimisation stops: the stopping rule, termination codes and results.

The rule is an object of its own, not an option of a method: the same
:class:`StoppingRule` is evaluated by :func:`assimilation.minimize` (inside JAX, on
traced values) and by :func:`assimilation.assimilate` (from Python, one iteration at
a time), so both stop at the same iterate for the same reason.
"""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp

import dphys


# Termination codes (int32 inside JAX) and their names (`Analysis.termination`).
RUNNING = 0
GRADIENT_TOLERANCE = 1
COST_TOLERANCE = 2
MAX_ITERATIONS = 3
NONFINITE = 4
CALLBACK = 5
NO_DECREASE = 6
TERMINATIONS = (
    "running",
    "gradient_tolerance",
    "cost_tolerance",
    "max_iterations",
    "nonfinite",
    "callback",
    "no_decrease",
)

# Outcome of one inner (linear) solve of an outer iteration, recorded in the
# history as ``inner_result`` (int32 inside JAX, indexing this tuple): the solve
# met its tolerance on the true residual; it stopped at its iteration cap (a
# truncated step, used only if it decreases the cost); or it produced a
# non-finite increment (never used).
INNER_CONVERGED = 0
INNER_MAX_STEPS = 1
INNER_NONFINITE = 2
INNER_RESULTS = ("converged", "max_steps", "nonfinite")


class RESULTS(dphys.RESULTS):
    """Outcome of a minimisation (the core's codes plus the minimiser's own)."""

    max_iterations_reached = (
        "The minimisation reached `max_iterations` before a tolerance was met. "
        "Increase `max_iterations`, loosen `gtol`/`ftol`, or check the gradient "
        "(e.g. with dphys.testing.taylor_test)."
    )
    nonfinite_cost = (
        "The cost or its gradient became non-finite (NaN or Inf); the last finite "
        "iterate is kept. Check the model run at that control (dt, parameters "
        "outside their valid range) and the observation errors."
    )
    no_decrease = (
        "No step along the method's direction decreased the cost (after "
        "`max_backtracks` halvings); the last iterate is kept. The inner solve may "
        "not have converged (see `history.inner_result` and `inner_residual`): "
        "raise `inner_max_steps`, or check the gradient and the Gauss-Newton "
        "operator (e.g. with dphys.testing.taylor_test)."
    )


class StoppingRule(eqx.Module):
    r"""When to stop: the first of these, checked after every iteration $k$.

    * ``"nonfinite"``: $J_k$ or $\|\nabla J_k\|$ is not finite (the step is
      rejected; the last finite iterate is kept);
    * ``"gradient_tolerance"``: $\|\nabla J_k\| \le$ ``gtol`` $\cdot\|\nabla J_0\|$
      (also at $k = 0$ when $\nabla J_0 = 0$);
    * ``"cost_tolerance"``: $0 \le J_{k-1} - J_k \le$ ``ftol`` $\cdot |J_k|$
      (never with ``ftol=None``);
    * ``"max_iterations"``: $k \ge$ ``max_iterations``.

    A method may also end the run itself: ``"no_decrease"`` when its step failed
    to decrease $J$ (Gauss-Newton after ``max_backtracks`` halvings); the rule is
    not consulted then and the last iterate is kept.

    Attributes:
        max_iterations: the most iterations (static int >= 0).
        gtol: relative gradient tolerance (static float >= 0).
        ftol: relative cost-decrease tolerance (static float >= 0), or ``None``
            for no cost test (for methods whose cost stalls in working precision
            before the iterate converges, e.g. proximal methods).

    Example:
        >>> import assimilation as da
        >>> da.StoppingRule(max_iterations=10, gtol=1e-8).max_iterations
        10
    """

    max_iterations: int = eqx.field(static=True, default=20)
    gtol: float = eqx.field(static=True, default=1e-6)
    ftol: float | None = eqx.field(static=True, default=1e-12)

    def __check_init__(self):
        m = self.max_iterations
        if isinstance(m, bool) or not isinstance(m, int) or m < 0:
            raise ValueError(f"`max_iterations` must be an integer >= 0, got {m!r}.")
        for name in ("gtol", "ftol"):
            value = getattr(self, name)
            if name == "ftol" and value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not value >= 0
            ):
                raise ValueError(f"`{name}` must be a number >= 0, got {value!r}.")

    def check(self, iteration, *, grad_norm0, cost_prev, cost, grad_norm):
        """The termination code after ``iteration`` (0: the starting point).

        Works on Python numbers and on traced arrays alike; returns an int32
        array, :data:`RUNNING` (0) to go on.
        """
        iteration = jnp.asarray(iteration)
        cost, grad_norm = jnp.asarray(cost), jnp.asarray(grad_norm)
        decrease = jnp.asarray(cost_prev) - cost
        code = jnp.where(iteration >= self.max_iterations, MAX_ITERATIONS, RUNNING)
        if self.ftol is not None:
            code = jnp.where(
                (iteration > 0)
                & (decrease >= 0)
                & (decrease <= self.ftol * jnp.abs(cost)),
                COST_TOLERANCE,
                code,
            )
        code = jnp.where(
            grad_norm <= self.gtol * jnp.asarray(grad_norm0), GRADIENT_TOLERANCE, code
        )
        code = jnp.where(
            ~(jnp.isfinite(cost) & jnp.isfinite(grad_norm)), NONFINITE, code
        )
        return code.astype(jnp.int32)

    def describe(self, termination: str) -> str:
        """A short reason for the message of an analysis."""
        return {
            "gradient_tolerance": f"gradient norm reduced below gtol={self.gtol:g}",
            "cost_tolerance": f"relative cost decrease below ftol={self.ftol}",
            "max_iterations": f"reached max_iterations={self.max_iterations}",
            "callback": "stopped by the callback",
            "nonfinite": "the cost became non-finite; kept the last finite iterate",
            "no_decrease": "no step decreased the cost; kept the last iterate",
            "running": "stopped after the requested iterations",
        }[termination]


def result_of(code):
    """The :class:`RESULTS` member of a termination code."""
    return RESULTS.where(
        code == NONFINITE,
        RESULTS.nonfinite_cost,
        RESULTS.where(
            code == NO_DECREASE,
            RESULTS.no_decrease,
            RESULTS.where(
                code == MAX_ITERATIONS,
                RESULTS.max_iterations_reached,
                RESULTS.successful,
            ),
        ),
    )
