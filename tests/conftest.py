import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)

# Strict promotion (`jax_numpy_dtype_promotion="strict"`,
# `jax_numpy_rank_promotion="raise"`) is opt-in per test through the fixture below,
# not global: optax's L-BFGS (used by assimilation.LBFGS and the runs built on it)
# adds an int32 memory index to an int64 arange when x64 is on, which strict dtype
# promotion refuses. tests/test_conformance.py runs every stepper, solver, model and
# Gauss-Newton under it.


@pytest.fixture
def strict_promotion():
    """Run the test with strict dtype promotion and rank promotion raising."""
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


@pytest.fixture
def getkey():
    """A fresh PRNG key per call, seeded per test (reproducible)."""
    keys = iter(jr.split(jr.key(5678), 10_000))
    return lambda: next(keys)


def _budget_slow() -> set[str]:
    import pathlib

    path = pathlib.Path(__file__).with_name("slow_budget.txt")
    lines = path.read_text().splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def pytest_collection_modifyitems(config, items):
    """Mark the tests named in ``slow_budget.txt`` as ``slow`` (see that file)."""
    slow = _budget_slow()
    for item in items:
        if item.nodeid in slow:
            item.add_marker(pytest.mark.slow)
