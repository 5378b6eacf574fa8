"""assimilation.runs batches: atomic outputs, resume, keep_going, Dask, cases."""

import json
import pathlib
import time
import uuid

import numpy as np
import pytest
import xarray as xr

import dphys.io as dio
from assimilation.cli import demo_config, main
from assimilation.runs import (
    BatchError,
    BatchReport,
    Case,
    CaseResult,
    ConfigError,
    config_cases,
    run_batch,
    split_windows,
    validate_config,
)
from assimilation.runs._batch import LOCK_NAME, _exclusive


class Recorder:
    """A picklable case function that logs each call as a file (so calls made on
    Dask workers are seen too) and can fail on demand."""

    def __init__(self, log_dir, fail=()):
        self.log_dir = log_dir
        self.fail = set(fail)
        log_dir.mkdir(parents=True, exist_ok=True)
        for old in log_dir.iterdir():
            old.unlink()

    @property
    def calls(self):
        marks = sorted(self.log_dir.iterdir(), key=lambda p: p.stat().st_mtime_ns)
        return [p.name.split("@")[0] for p in marks]

    def __call__(self, case):
        (self.log_dir / f"{case.name}@{uuid.uuid4().hex}").touch()
        time.sleep(0.01)  # distinct modification times keep the call order
        if case.name in self.fail:
            raise RuntimeError(f"boom in {case.name}")
        return xr.Dataset({"value": ("x", np.full(3, float(case.payload)))})


ROOT = pathlib.Path(__file__).resolve().parents[1]
CASES = [Case("a", 1), Case("b", 2), Case("c", 3)]


def read_value(path):
    with xr.open_dataset(path) as ds:
        return float(ds["value"][0]), ds.attrs["dphys_case"]


def test_outputs_and_manifest(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    fn = Recorder(log)
    report = run_batch(CASES, fn, out)
    assert report.done == ("a", "b", "c") and report.ok
    for case in CASES:
        assert read_value(out / f"{case.name}.nc") == (case.payload, case.name)
    manifest = json.loads((out / "manifest.json").read_text())["cases"]
    assert {k: v["status"] for k, v in manifest.items()} == dict.fromkeys("abc", "done")
    # nothing but the outputs and the manifest: no temporary files left behind
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == [
        "a.nc",
        "b.nc",
        "c.nc",
        "manifest.json",
    ]


def test_resume_skips_finished_cases(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    run_batch(CASES[:2], Recorder(log), out)
    fn = Recorder(log)
    report = run_batch(CASES, fn, out)
    assert fn.calls == ["c"]  # a and b are complete: their function is not called
    assert report.skipped == ("a", "b") and report.done == ("c",)
    # a truncated output (e.g. an old non-atomic writer killed mid-write) is redone
    (out / "b.nc").write_bytes((out / "b.nc").read_bytes()[:100])
    fn = Recorder(log)
    run_batch(CASES, fn, out)
    assert fn.calls == ["b"]
    assert read_value(out / "b.nc") == (2.0, "b")
    # a file written for another case name does not count as this case's output
    (out / "c.nc").replace(out / "d.nc")
    fn = Recorder(log)
    run_batch([Case("d", 4)], fn, out)
    assert fn.calls == ["d"]
    fn = Recorder(log)
    run_batch(CASES, fn, out, resume=False)
    assert fn.calls == ["a", "b", "c"]


def test_failures_stop_the_batch_unless_keep_going(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    fn = Recorder(log, fail={"b"})
    with pytest.raises(
        BatchError,
        match=r"case 'b' failed: RuntimeError: boom in b .*"
        r"1 not run.*keep_going=True",
    ):
        run_batch(CASES, fn, out)
    assert fn.calls == ["a", "b"]  # c was never started
    assert not (out / "b.nc").exists() and not (out / "c.nc").exists()
    manifest = json.loads((out / "manifest.json").read_text())["cases"]
    assert manifest["b"]["status"] == "failed"
    assert "boom in b" in manifest["b"]["error"]
    assert "Traceback" in manifest["b"]["detail"]

    fn = Recorder(log, fail={"b"})
    report = run_batch(CASES, fn, out, keep_going=True)
    assert fn.calls == ["b", "c"]  # a resumed; b fails again; c runs regardless
    assert report.failed == ("b",) and report.done == ("c",) and not report.ok
    assert "1 failed" in report.summary()

    fn = Recorder(log)  # fixed: only the failed case runs again
    report = run_batch(CASES, fn, out)
    assert fn.calls == ["b"] and report.ok


def test_output_write_is_atomic(tmp_path, monkeypatch):
    out, log = tmp_path / "out", tmp_path / "log"

    def explode(self, path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"CDF\x01partial")
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_netcdf", explode)
    report = run_batch(CASES[:1], Recorder(log), out, keep_going=True)
    assert report.failed == ("a",)
    assert sorted(p.name for p in out.iterdir() if p.name != LOCK_NAME) == [
        "manifest.json"
    ]


def test_bad_cases_are_rejected(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    with pytest.raises(ValueError, match="file-name-safe"):
        Case("../escape")
    with pytest.raises(ValueError, match=r"duplicate names \['a'\]"):
        run_batch([Case("a"), Case("a")], Recorder(log), out)
    with pytest.raises(TypeError, match=r"`cases\[0\]` must be an assimilation.Case"):
        run_batch(["a"], Recorder(log), out)
    with pytest.raises(ValueError, match="at most one of `client`, `workers`"):
        run_batch(CASES, Recorder(log), out, workers=1, scheduler="tcp://x:1")
    with pytest.raises(ValueError, match="`workers` must be a positive integer"):
        run_batch(CASES, Recorder(log), out, workers=0)


def test_changed_case_is_recomputed_unchanged_skipped(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    run_batch(CASES, Recorder(log), out)
    # "a" changed (its payload, hence its key); "b", "c" did not
    fn = Recorder(log)
    changed = [Case("a", 10), *CASES[1:]]
    report = run_batch(changed, fn, out)
    assert fn.calls == ["a"] and report.done == ("a",)
    assert report.skipped == ("b", "c")
    assert read_value(out / "a.nc") == (10.0, "a")
    # an explicit key decides, whatever the payload (e.g. provenance attributes)
    fn = Recorder(log)
    run_batch([Case("k", 1, key="v1")], fn, out)
    run_batch([Case("k", 2, key="v1")], fn, out)
    assert fn.calls == ["k"]
    run_batch([Case("k", 2, key="v2")], fn, out)
    assert fn.calls == ["k", "k"]
    manifest = json.loads((out / "manifest.json").read_text())["cases"]
    assert manifest["k"]["key"] == "v2"


def test_stale_temporaries_removed_and_one_batch_per_folder(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    out.mkdir()
    # what a batch killed during a write leaves behind (atomic_write's names)
    stale = [out / ".a.nc.k2j3h4.tmp", out / ".manifest.json.x8y7.tmp"]
    other = out / ".notes.txt.abc.tmp"  # not the batch's: kept
    for p in (*stale, other):
        p.write_bytes(b"partial")
    report = run_batch(CASES, Recorder(log), out)
    assert report.done == ("a", "b", "c")
    assert not any(p.exists() for p in stale) and other.exists()
    with _exclusive(out):
        with pytest.raises(BatchError, match="another batch is writing to"):
            run_batch(CASES, Recorder(log), out)


def test_report_table():
    report = BatchReport(
        (
            CaseResult("a", "done", 1.25, scores={"rmse": 0.5, "chi2": 1.1}),
            CaseResult("b", "failed", 0.1, error="DataError: bad file"),
            CaseResult("c", "skipped", scores={"rmse": 0.25}),
        ),
        "out",
    )
    lines = report.table().splitlines()
    assert lines[0].split() == ["case", "status", "seconds", "rmse", "chi2"]
    assert lines[2].split() == ["a", "done", "1.2", "0.5", "1.1"]
    assert lines[3].split() == ["b", "failed", "0.1", "-", "-"]
    assert lines[4].split() == ["c", "skipped", "0.0", "0.25", "-"]
    assert lines[5] == "b: DataError: bad file"


def test_dask_local_cluster(tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    pytest.importorskip("dask.distributed")
    import sys

    import cloudpickle

    # worker processes cannot import this test module: ship Recorder by value
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    fn = Recorder(log)
    report = run_batch(CASES[:2], fn, out, workers=2)
    assert sorted(report.done) == ["a", "b"] and sorted(fn.calls) == ["a", "b"]
    assert read_value(out / "a.nc") == (1.0, "a")
    # a client the caller owns; failures are recorded the same way
    from dask.distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=1, threads_per_worker=1, processes=False, dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        fn = Recorder(log, fail={"c"})
        report = run_batch(CASES, fn, out, client=client, keep_going=True)
        assert fn.calls == ["c"] and report.failed == ("c",)
        assert report.skipped == ("a", "b")


def test_split_windows():
    assert split_windows(0.0, 1.0, 0.25) == [
        (0.0, 0.25),
        (0.25, 0.5),
        (0.5, 0.75),
        (0.75, 1.0),
    ]
    assert split_windows(0.0, 1.0, 0.4) == [(0.0, 0.4), (0.4, 0.8), (0.8, 1.0)]
    with pytest.raises(ValueError, match="window `length` must be positive"):
        split_windows(0.0, 1.0, 0.0)


# -- configured batches ----------------------------------------------------------------
def tiny_twin_config(tmp_path, **batch):
    cfg = demo_config(quick=True, out=str(tmp_path))
    cfg["model"]["grid"]["shape"] = [16]
    cfg["time"]["n_steps"] = 10
    cfg["twin"]["n_sensors"] = 4
    cfg["solver"] = {"method": "lbfgs", "max_iterations": 1, "uncertainty": False}
    cfg["background"]["length_scale"] = 0.0
    cfg["batch"] = batch
    return cfg


def test_config_cases(tmp_path):
    cfg = validate_config(tiny_twin_config(tmp_path, seeds=[3, 4]))
    cases = config_cases(cfg)
    assert [c.name for c in cases] == ["seed-3", "seed-4"]
    assert [c.payload["config"]["twin"]["seed"] for c in cases] == [3, 4]
    cfg = validate_config(tiny_twin_config(tmp_path, n_windows=3, window_length=0.1))
    cases = config_cases(cfg)
    assert [c.name for c in cases] == ["window-000", "window-001", "window-002"]
    assert [c.payload["config"]["time"]["t0"] for c in cases] == pytest.approx(
        [0.0, 0.1, 0.2]
    )
    assert {c.payload["config"]["time"]["n_steps"] for c in cases} == {5}
    cfg = validate_config(
        tiny_twin_config(
            tmp_path, cases=[{"name": "fine", "set": {"time": {"dt": 0.01}}}]
        )
    )
    (case,) = config_cases(cfg)
    assert case.payload["config"]["time"]["dt"] == 0.01
    bad = validate_config(
        tiny_twin_config(tmp_path, cases=[{"name": "x", "set": {"time.dt": -1.0}}])
    )
    with pytest.raises(
        ConfigError, match=r"batch case 'x': `time.dt` must be positive"
    ):
        config_cases(bad)
    with pytest.raises(ConfigError, match="exactly one of `seeds`"):
        config_cases(
            validate_config(tiny_twin_config(tmp_path, seeds=[1], n_windows=2))
        )
    with pytest.raises(ConfigError, match="whole number of time steps"):
        config_cases(
            validate_config(
                tiny_twin_config(tmp_path, n_windows=2, window_length=0.013)
            )
        )


def to_toml(table, prefix=""):
    """A minimal TOML writer for the plain nested tables of a configuration."""

    def value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        return repr(v)

    lines = [f"{k} = {value(v)}" for k, v in table.items() if not isinstance(v, dict)]
    for k, v in table.items():
        if isinstance(v, dict):
            lines += ["", f"[{prefix}{k}]", to_toml(v, f"{prefix}{k}.")]
    return "\n".join(lines)


def test_cli_batch_runs_and_resumes(tmp_path, capsys):
    cfg = tiny_twin_config(tmp_path, seeds=[0, 1], out_dir="runs")
    del cfg["output"]
    path = tmp_path / "batch.toml"
    path.write_text(to_toml(cfg))
    assert main(["batch", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "2 done, 0 skipped" in out and "[2/2]" in err
    for seed in (0, 1):
        ds = dio.read_netcdf(tmp_path / "runs" / f"seed-{seed}.nc")
        assert ds.attrs["dphys_case"] == f"seed-{seed}"
        assert (
            ds.attrs["history"].startswith("20")
            and "dphys batch" in ds.attrs["history"]
        )
        assert "analysis" in ds and "kappa" in ds
    assert main(["batch", str(path)]) == 0
    assert "0 done, 2 skipped" in capsys.readouterr().out


# -- real files, worker processes, kills -----------------------------------------------
OBS_CASES_TOML = """
[model]
name = "heat"
units = "K"
length_units = "m"
time_units = "s"
grid = {{ shape = [12], lengths = 1.0, boundary = "neumann" }}
parameters = {{ kappa = 0.01 }}

[time]
dt = 0.05
n_steps = 4
reference = "2000-01-01T00:00:00"

[observations]
path = "data/obs-0.nc"
variable = "u"

[background]
value = 273.15
std = 0.5

[control.parameters.kappa]
transform = "log"
sigma = 0.5

[solver]
method = "lbfgs"
max_iterations = {iterations}
uncertainty = false

[batch]
out_dir = "runs"
cases = [
{cases}
]
"""


def write_obs_cases(root, n, iterations=1):
    """``n`` observation files and a config whose cases name them by relative
    paths (relative to the config file, which lives in ``root/config``)."""
    import jax.numpy as jnp

    from assimilation import Observations
    from assimilation.io import observations_to_dataset

    (root / "config" / "data").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        obs = Observations(
            times=jnp.asarray([0.1, 0.2]),
            values=jnp.full((2, 3), 0.05 * (i + 1)),
            positions=jnp.asarray([0.2, 0.5, 0.8]),
            sigma=0.05,
        )
        ds = observations_to_dataset(
            obs,
            units="degC",
            length_units="m",
            time_units="s",
            reference="2000-01-01T00:00:00",
        )
        dio.write_netcdf(ds, root / "config" / "data" / f"obs-{i}.nc")
    cases = ",\n".join(
        f'{{ name = "obs-{i}", set = {{ "observations.path" = "data/obs-{i}.nc" }} }}'
        for i in range(n)
    )
    path = root / "config" / "batch.toml"
    path.write_text(OBS_CASES_TOML.format(cases=cases, iterations=iterations))
    return path


def test_cli_batch_worker_processes_repeatedly(tmp_path, capsys, monkeypatch):
    """`dphys batch --workers 2` (processes) over netCDF cases, repeatedly: all run,
    all skipped, the changed one rerun; run from another folder (paths in `set`
    are relative to the config file)."""
    pytest.importorskip("dask.distributed")
    config = write_obs_cases(tmp_path, 3)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    runs = tmp_path / "config" / "runs"

    assert main(["batch", str(config), "--workers", "2"]) == 0
    out, err = capsys.readouterr()
    assert "3 done, 0 skipped" in out, out + err
    assert out.splitlines()[1].split()[:3] == ["case", "status", "seconds"]
    assert "chi2_analysis" in out.splitlines()[1]
    for i in range(3):
        ds = dio.read_netcdf(runs / f"obs-{i}.nc")
        # each case read its own file: degC observations converted to K
        np.testing.assert_allclose(ds["obs"].values, 273.15 + 0.05 * (i + 1))
        assert ds.attrs["dphys_case"] == f"obs-{i}"
        assert int(ds["case"]) == i

    assert main(["batch", str(config), "--workers", "2"]) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out

    # a changed input file recomputes its case only
    data = tmp_path / "config" / "data" / "obs-2.nc"
    ds = dio.read_netcdf(data)
    dio.write_netcdf(ds.assign(u=ds["u"] + 0.01), data)
    assert main(["batch", str(config), "--workers", "2"]) == 0
    assert "1 done, 2 skipped" in capsys.readouterr().out
    # a batch's outputs open as one dataset along `case`, scores included
    merged = xr.open_mfdataset(
        sorted(runs.glob("obs-*.nc")), combine="nested", concat_dim="case"
    )
    try:
        assert merged["chi2_analysis"].dims == ("case",)
        np.testing.assert_array_equal(merged["case"].values, [0, 1, 2])
        np.testing.assert_allclose(merged["obs"].values[2], 273.15 + 0.16)
    finally:
        merged.close()


def test_changed_configuration_recomputes_every_case(tmp_path, capsys):
    config = write_obs_cases(tmp_path, 2)
    assert main(["batch", str(config)]) == 0
    assert "2 done, 0 skipped" in capsys.readouterr().out
    text = config.read_text()
    config.write_text(text.replace("value = 273.15", "value = 273.0"))
    assert main(["batch", str(config)]) == 0
    assert "2 done, 0 skipped" in capsys.readouterr().out
    ds = dio.read_netcdf(tmp_path / "config" / "runs" / "obs-0.nc")
    np.testing.assert_allclose(ds["background"].values, 273.0)


def test_resume_after_sigkill(tmp_path):
    """A batch killed with SIGKILL resumes: finished cases are not recomputed and no
    temporary file is left."""
    import os
    import signal
    import subprocess
    import sys

    config = write_obs_cases(tmp_path, 5, iterations=3)
    runs = tmp_path / "config" / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "assimilation.cli", "batch", str(config)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if runs.is_dir() and any(runs.glob("obs-*.nc")):
                break
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finished = sorted(p.stem for p in runs.glob("obs-*.nc"))
    assert 1 <= len(finished) < 5, finished
    stamps = {n: (runs / f"{n}.nc").stat().st_mtime_ns for n in finished}
    # a kill during a write leaves a temporary like this one
    (runs / ".obs-4.nc.abcd1234.tmp").write_bytes(b"CDF\x01partial")

    from assimilation.cli import main as cli_main

    assert cli_main(["batch", str(config)]) == 0
    report = json.loads((runs / "manifest.json").read_text())["cases"]
    assert all(v["status"] == "done" for v in report.values())
    redone = sorted(p.stem for p in runs.glob("obs-*.nc"))
    assert redone == [f"obs-{i}" for i in range(5)]
    # the finished cases were skipped (their files untouched), the others run
    assert {n: (runs / f"{n}.nc").stat().st_mtime_ns for n in finished} == stamps
    assert not [p.name for p in runs.iterdir() if p.name.endswith(".tmp")]


CONCURRENT_READS = """
import sys, threading
import numpy as np, xarray as xr
import dphys.io as dio
d = sys.argv[1]
paths = []
for i in range(4):
    ds = xr.Dataset({"u": (("time", "y", "x"), np.random.rand(10, 30, 30))},
                    coords={"time": np.arange(10.0)})
    paths.append(dio.write_netcdf(ds, f"{d}/f{i}.nc"))
def work(i):
    for k in range(25):
        ds = dio.read_netcdf(paths[(i + k) % 4])
        assert ds["u"].shape == (10, 30, 30)
        if k % 5 == 0:
            dio.write_netcdf(ds, f"{d}/out{i}.nc")
threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
print("ok")
"""


def test_concurrent_netcdf_reads_in_threads_do_not_crash(tmp_path):
    """Eight threads reading and writing netCDF files through dphys.io at once.

    Without the lock around every netCDF access this crashed the interpreter
    (segmentation fault in netCDF4/HDF5) in most runs; each run is a fresh process.
    """
    import os
    import subprocess
    import sys

    script = tmp_path / "reads.py"
    script.write_text(CONCURRENT_READS)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for _ in range(3):
        proc = subprocess.run(
            [sys.executable, str(script), str(tmp_path)],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_cycled_windows(tmp_path, capsys):
    """`cycle = true`: each window's background is the previous window's analysis
    at its end; windows are half-open, so every observation is used once."""
    import jax.numpy as jnp

    from assimilation import Observations
    from assimilation.io import observations_to_dataset

    times = jnp.asarray([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    obs = Observations(
        times=times,
        values=jnp.full((6, 3), 0.1),
        positions=jnp.asarray([0.2, 0.5, 0.8]),
        sigma=0.05,
    )
    (tmp_path / "config" / "data").mkdir(parents=True)
    dio.write_netcdf(
        observations_to_dataset(
            obs,
            units="degC",
            length_units="m",
            time_units="s",
            reference="2000-01-01T00:00:00",
        ),
        tmp_path / "config" / "data" / "obs.nc",
    )
    text = OBS_CASES_TOML.format(cases="", iterations=2)
    text = text.replace('path = "data/obs-0.nc"', 'path = "data/obs.nc"')
    text = text.replace(
        "cases = [\n\n]", "n_windows = 3\nwindow_length = 0.2\ncycle = true"
    )
    config = tmp_path / "config" / "batch.toml"
    config.write_text(text)
    assert main(["batch", str(config), "--workers", "2"]) == 0
    assert "3 done" in capsys.readouterr().out
    runs = tmp_path / "config" / "runs"
    outs = [dio.read_netcdf(runs / f"window-{k:03d}.nc") for k in range(3)]
    for prev, nxt in zip(outs[:-1], outs[1:], strict=True):
        np.testing.assert_allclose(nxt["background"].values, prev["analysis_final"])
    # each observation once: 0.1, 0.2 | 0.3, 0.4 | 0.5, 0.6 (window ends included)
    assert [ds.sizes["time"] for ds in outs] == [2, 2, 2]
    assert main(["batch", str(config)]) == 0
    assert "0 done, 3 skipped" in capsys.readouterr().out


# -- GPU recipe: one worker process per device -----------------------------------------
def worker_env(case):
    """The device variables the worker process that ran ``case`` was started with."""
    import os

    return xr.Dataset(
        attrs={
            "pid": os.getpid(),
            "device": os.environ.get("CUDA_VISIBLE_DEVICES", "unset"),
            "fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset"),
        }
    )


def test_devices_start_one_worker_process_per_device(tmp_path):
    """No GPU here: the test checks what each worker process sees, which is what
    JAX reads when it starts its backend there."""
    pytest.importorskip("dask.distributed")
    import os
    import sys

    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cases = [Case(f"c{i}", i) for i in range(4)]
    report = run_batch(
        cases, worker_env, tmp_path, devices=[0, "1"], memory_fraction=0.45
    )
    assert sorted(report.done) == [c.name for c in cases]
    seen = {}
    for case in cases:
        with xr.open_dataset(tmp_path / f"{case.name}.nc") as ds:
            assert ds.attrs["fraction"] == "0.45"
            assert ds.attrs["pid"] != os.getpid()  # in a worker process
            seen.setdefault(ds.attrs["device"], set()).add(ds.attrs["pid"])
    assert set(seen) <= {"0", "1"} and seen
    # one process per device: no process saw two devices
    pids = [p for ps in seen.values() for p in ps]
    assert len(pids) == len(set(pids))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"devices": "0"}, "non-empty list of device indices"),
        ({"devices": []}, "non-empty list of device indices"),
        ({"devices": [0, 0]}, "distinct single devices"),
        ({"devices": ["0,1"]}, "distinct single devices"),
        ({"devices": [0, 1], "workers": 3}, r"`workers` \(3\) must equal"),
        ({"devices": [0], "processes": False}, "needs worker processes"),
        ({"devices": [0], "scheduler": "tcp://x:1"}, "cannot be combined"),
        ({"devices": [0], "memory_fraction": 1.5}, r"must lie in \(0, 1\]"),
        ({"memory_fraction": 0.5}, "give `devices` too"),
    ],
)
def test_device_options_errors(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        run_batch(CASES, worker_env, tmp_path, **kwargs)


def test_device_config_keys(tmp_path):
    cfg = tiny_twin_config(tmp_path, seeds=[0, 1], devices=[0, 1], memory_fraction=0.5)
    assert validate_config(cfg)["batch"]["devices"] == [0, 1]
    for bad, message in (([0, 0], "distinct device"), ("0", "distinct device")):
        cfg = tiny_twin_config(tmp_path, seeds=[0], devices=bad)
        with pytest.raises(ConfigError, match=message):
            validate_config(cfg)
    cfg = tiny_twin_config(tmp_path, seeds=[0], memory_fraction=0.0)
    with pytest.raises(ConfigError, match=r"must lie in \(0, 1\]"):
        validate_config(cfg)
