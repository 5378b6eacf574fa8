"""The validation vocabulary (dphys._checks): one helper per kind of check, each
message naming the argument, what was received and how to fix it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dphys
import pdes
from dphys._checks import check_finite, check_increasing, check_positive, check_time


def test_check_positive():
    check_positive(1.0, "kappa")
    check_positive(np.array([0.0, 1.0]), "drag", allow_zero=True)
    with pytest.raises(ValueError, match=r"`kappa` must be positive and finite .* -1"):
        check_positive(np.array([1.0, -1.0]), "kappa")
    with pytest.raises(ValueError, match="`drag` must be non-negative and finite"):
        check_positive(-1e-3, "drag", allow_zero=True)
    with pytest.raises(ValueError, match="exp\\(log_value\\)"):
        check_positive(float("nan"), "g")
    with pytest.raises(ValueError, match="use metres"):
        check_positive(0.0, "depth", fix="use metres")
    # Traced values cannot be inspected and pass through.
    jax.jit(lambda k: check_positive(k, "kappa") or k)(jnp.asarray(-1.0))


def test_check_finite_and_increasing():
    check_finite([0.0, 1.0], "origin")
    with pytest.raises(ValueError, match=r"`origin` must be finite, got \[nan\]"):
        check_finite([float("nan")], "origin")
    with pytest.raises(ValueError, match="3 non-finite values"):
        check_finite(np.full(10, np.inf).tolist()[:3] + [0.0] * 7, "field")
    check_increasing([0.0, 0.5, 2.0], "times")
    with pytest.raises(
        ValueError, match=r"`times` must be strictly increasing, got \[0.0, 0.0\]: "
    ):
        check_increasing([0.0, 0.0], "times", why="one row per time", fix="Sort.")


def test_check_time():
    check_time("dt", 0.1, positive=True)
    check_time("t0", -3, positive=False)
    with pytest.raises(ValueError, match="`dt` must be a positive finite scalar"):
        check_time("dt", 0.0, positive=True)
    with pytest.raises(ValueError, match="`t0` must be a finite real scalar"):
        check_time("t0", [0.0, 1.0], positive=False)


def test_check_positive_moved_to_the_core_with_a_deprecated_alias():
    assert dphys.check_positive is check_positive
    with pytest.warns(DeprecationWarning, match="dphys.check_positive"):
        alias = pdes.check_positive
    assert alias is check_positive
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        pdes.nope  # noqa: B018


def test_models_and_grids_use_the_shared_checks():
    with pytest.raises(ValueError, match="`lengths` must be positive and finite"):
        dphys.Grid(8, lengths=-1.0)
    with pytest.raises(ValueError, match="`depth` must be positive and finite"):
        pdes.ShallowWater(dphys.Grid((8, 8), boundary="periodic"), -1.0)
    with pytest.raises(ValueError, match=r"`velocity\[0\]` must be finite"):
        pdes.Advection(dphys.Grid(8), velocity=float("nan"))
