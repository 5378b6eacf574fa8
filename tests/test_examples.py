"""Smoke-run every script in examples/ in a fresh interpreter.

Each example must run to completion (exit status 0) with its outputs redirected to a
temporary directory through the ``DPHYS_EXAMPLE_OUT`` environment variable, and
must write at least one file there. Examples that take longer than about 40 s on
the reference 2-core CPU are marked ``slow`` (run them with ``pytest -m slow``);
the rest run in the default suite.
"""

import os
import pathlib
import resource
import subprocess
import sys

import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))

# Measured CPU time (user + system) of one run on the reference 2-core machine; any
# example above ~40 s goes here so that the default test run stays short.
# Default-run examples measured at the same time: advection_velocity_gradient 21 s,
# heat_4dvar_calibration 21 s, heat_gradient 11 s.
SLOW: dict[str, str] = {
    "shallow_water_gradient.py": "42 s CPU (53 s before the FFT-path reverse-mode changes)",
    "advection_unrolled.py": "trains four unrolled assimilators through the model's "
    "adjoint (second order): minutes of CPU",
}

# Generous wall-clock limits: a shared CI machine can be several times slower than
# an idle one. Hitting them means the example hangs or regressed badly.
TIMEOUT = {"default": 300, "slow": 900}


def _params():
    for path in EXAMPLES:
        slow = path.name in SLOW
        yield pytest.param(path, id=path.stem, marks=[pytest.mark.slow] if slow else [])


def test_examples_are_jupytext_scripts():
    assert EXAMPLES, "examples/ holds no scripts"
    for path in EXAMPLES:
        text = path.read_text()
        assert "# %%" in text, f"{path.name} is not a jupytext percent-format script"
        assert "DPHYS_EXAMPLE_OUT" in text, (
            f"{path.name} must write its outputs under $DPHYS_EXAMPLE_OUT"
        )


@pytest.mark.parametrize("script", list(_params()))
def test_example_runs(script, tmp_path):
    out = tmp_path / "out"
    env = {
        **os.environ,
        "DPHYS_EXAMPLE_OUT": str(out),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p
        ),
        "MPLBACKEND": "Agg",
    }
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    timeout = TIMEOUT["slow" if script.name in SLOW else "default"]
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            cwd=tmp_path,  # anything written to the working directory stays here too
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name} did not finish within {timeout} s")
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-30:])
    assert proc.returncode == 0, f"{script.name} failed:\n{tail}"
    written = [p for p in out.rglob("*") if p.is_file()] if out.exists() else []
    assert written, f"{script.name} wrote nothing under $DPHYS_EXAMPLE_OUT"
    print(f"{script.name}: {cpu:.1f} s CPU, wrote {[p.name for p in written]}")
