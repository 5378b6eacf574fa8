import jax
import jax.random as jr
import pytest


jax.config.update("jax_enable_x64", True)


@pytest.fixture
def getkey():
    """A fresh PRNG key per call, seeded per test (reproducible)."""
    keys = iter(jr.split(jr.key(5678), 10_000))
    return lambda: next(keys)
