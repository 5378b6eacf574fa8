"""Result codes carried through jitted loops (cf. lineax/diffrax ``RESULTS``)."""

from __future__ import annotations

import equinox as eqx


class RESULTS(eqx.Enumeration):
    """Outcome of a simulation or solve. ``successful`` is the only success code."""

    successful = ""
    linear_solve_failed = (
        "An implicit linear solve did not converge. Increase the Krylov solver's "
        "`max_steps`, loosen its `rtol`/`atol`, add a preconditioner, or choose a direct "
        "solver (`dphys.FFT()` for periodic constant coefficients, `dphys.Tridiagonal()` "
        "in 1D)."
    )
    nonlinear_solve_failed = (
        "A nonlinear implicit step (Newton-Krylov) did not converge. Reduce `dt`, "
        "increase `max_steps`, or loosen `rtol`/`atol`."
    )
    invalid_state = (
        "The state failed the model's run-time validity check (`model.validate`), "
        "e.g. a non-positive water depth. Reduce `dt`, check the parameters and the "
        "initial state."
    )
    nonfinite_state = (
        "The state became non-finite (NaN or Inf). The run diverged: reduce `dt`, check "
        "the parameters (e.g. negative diffusivity or depth) and the initial state."
    )
    invalid_dt = (
        "`dt` must be positive and finite, but the traced `dt` (an argument of a "
        "jitted, vmapped or differentiated function) was zero, negative, NaN or "
        "infinite at run time. Pass a positive finite time step."
    )
    invalid_t0 = (
        "`t0` must be finite, but the traced `t0` (an argument of a jitted, vmapped or "
        "differentiated function) was NaN or infinite at run time. Pass a finite "
        "initial time."
    )
