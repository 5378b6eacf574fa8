"""The problem abstraction: AbstractCost and its terms, open controls, the
Gauss-Newton operator, the iteration engine (minimize, stopping rules) and the
posterior, tested on costs other than FourDVar's own."""

import equinox as eqx
import jax
import jax.numpy as jnp
import lineax as lx
import numpy as np
import pytest

import assimilation as da
import dphys
import dphys.testing as dtest
import pdes


# ---------------------------------------------------------------- a toy least squares


class WeightedPrior(da.AbstractCost):
    r"""$J(v) = \tfrac12 v^\top \mathrm{diag}(a) v + \tfrac12\|Gv - y\|^2$: a
    background term that is *not* $\tfrac12\|v\|^2$ (e.g. a learned prior)."""

    a: jax.Array
    G: jax.Array
    y: jax.Array
    control: None = None
    nan_above: float | None = eqx.field(static=True, default=None)

    def init(self):
        return jnp.zeros(self.a.shape)

    def residual(self, v):
        return {"background": jnp.sqrt(self.a) * v, "observation": self.G @ v - self.y}

    def terms(self, v):
        r = self.residual(v)
        obs = 0.5 * jnp.sum(r["observation"] ** 2)
        if self.nan_above is not None:
            obs = jnp.where(v[0] > self.nan_above, jnp.nan, obs)
        return {"background": 0.5 * jnp.sum(self.a * v**2), "observation": obs}

    def innovations(self, v):
        return self.y - self.G @ v


def _toy(**kw):
    a = jnp.array([4.0, 0.25, 9.0])
    G = jnp.array([[1.0, 2.0, 0.5], [0.0, 1.0, -1.0]])
    y = jnp.array([1.0, -2.0])
    return WeightedPrior(a, G, y, **kw)


def _toy_optimum(cost):
    A = jnp.diag(cost.a) + cost.G.T @ cost.G
    return jnp.linalg.solve(A, cost.G.T @ cost.y), A


def test_lbfgs_history_reports_the_costs_own_background_term():
    """L-BFGS used to recompute J_b = 1/2 |v|^2 itself: a cost whose background
    term is not that (a learned prior) got a wrong J_b and J_o in its history."""
    cost = _toy()
    sol = da.minimize(cost, da.LBFGS(), n_iterations=4)
    v = sol.control
    terms = cost.terms(v)
    np.testing.assert_allclose(sol.history["background_cost"][-1], terms["background"])
    np.testing.assert_allclose(sol.history["obs_cost"][-1], terms["observation"])
    np.testing.assert_allclose(sol.state.terms["background"], terms["background"])
    # Not 1/2 |v|^2 (what the old code reported): the test can tell them apart.
    assert abs(float(terms["background"]) - 0.5 * float(v @ v)) > 1e-3
    np.testing.assert_allclose(
        sol.history["cost"],
        sol.history["terms"]["background"] + sol.history["terms"]["observation"],
        rtol=1e-12,
    )


def test_gauss_newton_uses_the_costs_residual():
    """On a quadratic cost one Gauss-Newton step with the cost's own residual is
    exact; I + J_o^T J_o (the old hard-coded system) is not the Hessian here."""
    cost = _toy()
    v_star, A = _toy_optimum(cost)
    op = da.gauss_newton_operator(cost, cost.init())
    np.testing.assert_allclose(op.as_matrix(), A, rtol=1e-12)
    sol = da.minimize(
        cost, da.GaussNewton(inner_rtol=1e-14), n_iterations=1, throw=False
    )
    np.testing.assert_allclose(sol.control, v_star, rtol=1e-10)
    np.testing.assert_allclose(
        sol.history["background_cost"][-1], cost.terms(v_star)["background"]
    )


def test_costs_without_a_residual_refuse_gauss_newton():
    class NotLeastSquares(da.AbstractCost):
        control: None = None

        def init(self):
            return jnp.zeros(2)

        def terms(self, v):
            return {"background": jnp.sum(jnp.abs(v)), "observation": jnp.sum(v)}

        def innovations(self, v):
            return v

    cost = NotLeastSquares()
    with pytest.raises(TypeError, match="not a least-squares cost"):
        da.gauss_newton_operator(cost, cost.init())
    with pytest.raises(TypeError, match="assimilate needs one"):
        da.assimilate(cost, da.LBFGS())
    assert float(cost(jnp.array([1.0, -2.0]))) == pytest.approx(3.0 - 1.0)
    with pytest.raises(ValueError, match="structure and shapes of `cost.init"):
        cost(jnp.zeros(3))


# -------------------------------------------------------------- the iteration engine


def test_stopping_rule_is_shared_by_minimize_and_assimilate():
    cost = _periodic_heat()
    rule = da.StoppingRule(max_iterations=30, gtol=1e-9)
    sol = da.minimize(cost, da.GaussNewton(), stop=rule)
    analysis = da.assimilate(cost, da.GaussNewton(), stop=rule, uncertainty=False)
    assert sol.termination == analysis.termination
    assert sol.termination in ("gradient_tolerance", "cost_tolerance")
    assert sol.result == da.RESULTS.successful
    n = int(sol.stats["num_iterations"])
    assert n == analysis.n_iterations < 30
    for name in sol.control:
        np.testing.assert_allclose(sol.control[name], analysis.control[name], rtol=1e-8)
    # After the stop the loop is frozen: later history entries repeat the last.
    np.testing.assert_array_equal(
        sol.history["cost"][n:], np.full(31 - n, sol.history["cost"][n])
    )
    np.testing.assert_allclose(sol.history["cost"][: n + 1], analysis.history.cost)


def test_minimize_result_codes_and_throw():
    cost = _toy()
    rule = da.StoppingRule(max_iterations=1, gtol=0.0, ftol=0.0)
    sol = da.minimize(cost, da.LBFGS(), stop=rule, throw=False)
    assert sol.result == da.RESULTS.max_iterations_reached
    assert sol.termination == "max_iterations"
    with pytest.raises(eqx.EquinoxRuntimeError, match="max_iterations"):
        da.minimize(cost, da.LBFGS(), stop=rule)
    # A full Gauss-Newton step into a region where the cost is NaN is rejected:
    # the last finite iterate is kept and the result says why.
    nan_cost = _toy(nan_above=0.01)
    gn = da.GaussNewton(max_backtracks=0)
    v_star, _ = _toy_optimum(nan_cost)
    assert float(v_star[0]) > 0.01
    sol = da.minimize(nan_cost, gn, n_iterations=3, throw=False)
    assert sol.result == da.RESULTS.nonfinite_cost
    assert sol.termination == "nonfinite" and int(sol.stats["num_iterations"]) == 0
    np.testing.assert_array_equal(sol.control, nan_cost.init())
    with pytest.raises(eqx.EquinoxRuntimeError, match="non-finite"):
        da.minimize(nan_cost, gn, n_iterations=3)
    with pytest.raises(TypeError, match="StoppingRule"):
        da.minimize(cost, stop={"gtol": 1.0})
    with pytest.raises(TypeError, match="n_iterations"):
        da.minimize(cost, n_iterations=2.0)
    with pytest.raises(TypeError, match="adjoint"):
        da.minimize(cost, n_iterations=2, adjoint="checkpointed")
    with pytest.raises(ValueError, match="gtol"):
        da.StoppingRule(gtol=-1.0)
    with pytest.raises(ValueError, match="max_iterations"):
        da.StoppingRule(max_iterations=1.5)


def test_minimize_loop_checkpointed_equals_unrolled_and_differentiates():
    """`adjoint=` runs the iteration loop; the unrolled Gauss-Newton iteration is
    differentiable with respect to the data (the step-size search is not
    differentiated), checked against finite differences."""
    cost = _toy()

    def final_misfit(y, adjoint):
        c = eqx.tree_at(lambda c: c.y, cost, y)
        v = da.minimize(c, da.GaussNewton(), n_iterations=2, adjoint=adjoint).control
        return jnp.sum((cost.G @ v - 1.0) ** 2)

    y = cost.y
    g_unrolled = jax.grad(final_misfit)(y, dphys.Unrolled())
    g_ckpt = jax.grad(final_misfit)(y, dphys.Checkpointed())
    np.testing.assert_allclose(g_ckpt, g_unrolled, rtol=1e-12)
    result = dtest.taylor_test(
        lambda y: final_misfit(y, dphys.Unrolled()), y, grad=g_unrolled
    )
    assert result.passed and result.rate > 1.9, str(result)
    bad = dtest.taylor_test(
        lambda y: final_misfit(y, dphys.Unrolled()), y, grad=1.001 * g_unrolled
    )
    assert not bad.passed


# --------------------------------------------------------------- the 4D-Var problem


def _periodic_heat(control=None, n_steps=10):
    grid = dphys.Grid(16, lengths=1.0, boundary="periodic")
    (x,) = grid.coords
    truth = pdes.Heat(grid, kappa=0.01)
    u0 = jnp.sin(2 * jnp.pi * x)
    stepper = dphys.CrankNicolson()
    obs = da.make_observations(
        truth,
        stepper,
        u0,
        positions=jnp.linspace(0.05, 0.95, 5),
        times=jnp.array([0.3, 0.6, 1.0]),
        sigma=0.05,
        dt=0.1,
        n_steps=n_steps,
        key=jax.random.key(0),
    )
    if control is None:
        control = da.Control(
            initial_state=da.InitialState(da.Diffusion(grid, 0.1, std=0.3)),
            parameters=[da.Parameter("kappa", transform=da.Log(), sigma=0.5)],
        )
    return da.FourDVar(
        pdes.Heat(grid, kappa=0.015),
        stepper,
        0.9 * u0,
        obs,
        control,
        dt=0.1,
        n_steps=n_steps,
        adjoint=dphys.Unrolled(),
    )


def test_fourdvar_terms_residual_and_operator(getkey):
    cost = _periodic_heat()
    v = jax.tree_util.tree_map(
        lambda r: 0.3 * r, dtest.tree_random_like(getkey(), cost.init())
    )
    terms = cost.terms(v)
    assert list(terms) == ["background", "observation"]
    r = cost.residual(v)
    np.testing.assert_allclose(
        cost(v),
        0.5 * sum(jnp.sum(x**2) for x in jax.tree_util.tree_leaves(r)),
        rtol=1e-12,
    )
    np.testing.assert_allclose(cost.costs(v)[1], terms["background"])
    # A = I + J_o^T J_o: symmetric to round-off (dot test), >= I, as dense.
    op = da.gauss_newton_operator(cost, v)
    assert lx.is_symmetric(op) and lx.is_positive_semidefinite(op)
    x, y = (dtest.tree_random_like(getkey(), v) for _ in range(2))
    dot = lambda a, b: sum(
        jnp.vdot(p, q)
        for p, q in zip(*map(jax.tree_util.tree_leaves, (a, b)), strict=True)
    )
    lhs, rhs = dot(op.mv(x), y), dot(x, op.mv(y))
    assert abs(lhs - rhs) < 1e-12 * abs(lhs)
    flat, unravel = jax.flatten_util.ravel_pytree(v)
    jac = jax.jacfwd(lambda f: jnp.ravel(cost.obs_residual(unravel(f))))(flat)
    dense = jnp.eye(flat.size) + jac.T @ jac
    np.testing.assert_allclose(op.as_matrix(), dense, rtol=1e-10, atol=1e-12)


def test_forecast_decodes_the_control_once():
    """One hop: a cost evaluation decodes each control variable exactly once
    (it used to be decoded piecewise, 5-9 times)."""
    calls = []

    class Counted(da.AbstractControlVariable):
        inner: da.Parameter
        name: str = eqx.field(static=True, default="kappa")

        def resolve(self, model, state0):
            return Counted(self.inner.resolve(model))

        def zeros(self, state0):
            return self.inner.zeros(state0)

        def sqrt(self, v):
            return self.inner.sqrt(v)

        def decode(self, v, decoded):
            calls.append(1)
            return self.inner.decode(v, decoded)

    kappa = Counted(da.Parameter("kappa", transform=da.Log(), sigma=0.5))
    cost = _periodic_heat(da.Control(kappa))
    jax.make_jaxpr(jax.value_and_grad(cost))(cost.init())
    assert len(calls) == 1


class Damping(eqx.Module):
    """A learned explicit term E(t, u) = -r u with a weight (the rate r)."""

    rate: jax.Array

    def __call__(self, t, u):
        return -self.rate * u


class DampingRate(da.AbstractControlVariable):
    """A new kind of control variable: the weights of an explicit correction added
    to the model with dphys.Augmented, r = r_b + sigma v."""

    background: jax.Array
    sigma: float = eqx.field(static=True)
    name: str = eqx.field(static=True, default="damping")

    def zeros(self, state0):
        return jnp.zeros_like(self.background)

    def sqrt(self, v):
        return self.sigma * v

    def unconstrained(self, v):
        return self.background + self.sqrt(v)

    def decode(self, v, decoded):
        rate = self.unconstrained(v)
        model = dphys.Augmented(decoded.model, explicit=Damping(rate))
        return decoded.with_value(self.name, rate, model=model)


def test_an_open_control_variable_end_to_end(getkey):
    grid = dphys.Grid(16, lengths=1.0, boundary="periodic")
    base = _periodic_heat()
    control = da.Control(
        DampingRate(jnp.asarray(0.1), 0.5),
        initial_state=da.InitialState(da.Diffusion(grid, 0.1, std=0.3)),
    )
    cost = da.FourDVar(
        base.model,
        dphys.IMEX(),
        base.state0,
        base.obs,
        control,
        dt=0.1,
        n_steps=10,
        adjoint=dphys.Unrolled(),
    )
    assert cost.control.names == ("damping", "initial_state")
    assert isinstance(cost.control["damping"], DampingRate)
    v = cost.init()
    decoded = cost.decode(v)
    assert isinstance(decoded.model, dphys.Augmented)
    assert float(decoded.values["damping"]) == pytest.approx(0.1)
    # Differentiable in the new block (Taylor test with a negative control).
    g = jax.grad(cost)(v)
    f = lambda w: cost({**v, "damping": w})
    assert dtest.taylor_test(f, v["damping"], grad=g["damping"], key=getkey()).passed
    assert not dtest.taylor_test(
        f, v["damping"], grad=1.01 * g["damping"], key=getkey()
    ).passed
    # The posterior pushes each block forward: the damping rate's std is
    # sigma * sqrt(C_vv) for its whitened variance C_vv.
    post = da.posterior(cost, v, method="dense")
    a = da.gauss_newton_operator(cost, v).as_matrix()
    cov = jnp.linalg.inv(a)
    flat_index = jax.flatten_util.ravel_pytree(
        {"damping": jnp.ones(()), "initial_state": jnp.zeros(16)}
    )[0]
    i = int(jnp.argmax(flat_index))
    np.testing.assert_allclose(
        post.stds["damping"], 0.5 * jnp.sqrt(cov[i, i]), rtol=1e-8
    )
    assert post.stds["initial_state"].shape == (16,)
    assert post.labels == () and post.names == ()  # not a correlated variable


def test_control_collection_and_errors():
    grid = dphys.Grid(8, boundary="periodic")
    B = da.Diagonal(0.1, shape=grid.shape)
    p = da.Parameter("kappa", transform=da.Log(), sigma=0.5)
    legacy = da.Control(initial_state=da.InitialState(B), parameters=[p])
    assert legacy.names == ("initial_state", "kappa")
    assert legacy.parameters == (p,) and legacy.model_error is None
    assert [var.name for var in legacy] == ["initial_state", "kappa"]
    assert len(legacy) == 2 and legacy["kappa"] is p
    with pytest.raises(KeyError, match="no control variable 'drag'"):
        legacy["drag"]
    with pytest.raises(TypeError, match="entry 0 must be an"):
        da.Control("kappa")
    with pytest.raises(ValueError, match="duplicate names"):
        da.Control(da.InitialState(B), initial_state=da.InitialState(B))
