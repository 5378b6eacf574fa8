"""assimilation.runs batches: atomic outputs, resume, keep_going, Dask, cases."""

import json
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
