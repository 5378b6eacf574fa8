r"""Batch runs: many assimilation cases, resumable, atomic, optionally on Dask.

A batch is a list of :class:`Case` objects (a name and a payload, e.g. a config or a
window) and a function ``fn(case) -> xarray.Dataset``. :func:`run_batch` calls ``fn``
for every case and writes ``<out_dir>/<case.name>.nc``:

* **atomically**: each output goes to a temporary file in the same directory and is
  renamed with :func:`os.replace`, so an interrupted run never leaves a partial file
  under a final name;
* **resumably**: a case whose final file exists and is a complete dphys output (it
  opens and carries ``dphys_case = <name>``) is skipped, so rerunning a batch after a
  crash or a ``Ctrl-C`` only does the remaining work; ``manifest.json`` in
  ``out_dir`` records each case's status, run time and error;
* **failing gently only when asked** (DAPPER's ``fail_gently``): by default the first
  failing case stops the batch with :class:`BatchError`; with ``keep_going=True``
  failures are recorded and the other cases still run;
* **serially in-process** by default, or on a Dask cluster: pass a
  ``dask.distributed.Client``, ``workers=N`` (a local cluster) or ``scheduler=`` (the
  address of a running scheduler). Outputs are written by the workers, so they need
  the same file system as the caller.

Many small cases of the same shape can instead be batched in-process with
``jax.vmap`` over a cost or an assimilation step; this module is for cases that
are independent programs (different files, configurations or windows).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import pathlib
import re
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import xarray as xr

from dphys.io import atomic_write, write_netcdf


__all__ = [
    "BatchError",
    "BatchReport",
    "Case",
    "CaseResult",
    "run_batch",
    "split_windows",
]

logger = logging.getLogger(__name__)

CASE_ATTR = "dphys_case"
MANIFEST_NAME = "manifest.json"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class BatchError(RuntimeError):
    """A case failed and ``keep_going`` was false; the message names the case."""


@dataclasses.dataclass(frozen=True)
class Case:
    """One unit of work.

    Attributes:
        name: unique, file-name safe (letters, digits, ``.``, ``_``, ``-``); the
            output is ``<out_dir>/<name>.nc``.
        payload: anything ``fn`` needs (a config dict, a window, a seed); must be
            picklable for process-based Dask workers.
    """

    name: str
    payload: Any = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ValueError(
                f"case `name` must be a non-empty file-name-safe string (letters, "
                f"digits, '.', '_', '-'), got {self.name!r}."
            )


@dataclasses.dataclass(frozen=True)
class CaseResult:
    """What happened to one case: ``status`` is ``"done"``, ``"skipped"`` or
    ``"failed"``; ``error`` is the one-line reason of a failure."""

    name: str
    status: str
    seconds: float = 0.0
    error: str | None = None
    detail: str | None = None  # full traceback of a failure, for the manifest

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class BatchReport:
    """Per-case results of :func:`run_batch`, in case order."""

    results: tuple[CaseResult, ...]
    out_dir: pathlib.Path

    def _names(self, status):
        return tuple(r.name for r in self.results if r.status == status)

    @property
    def done(self) -> tuple[str, ...]:
        return self._names("done")

    @property
    def skipped(self) -> tuple[str, ...]:
        return self._names("skipped")

    @property
    def failed(self) -> tuple[str, ...]:
        return self._names("failed")

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        return (
            f"{len(self.done)} done, {len(self.skipped)} skipped (already complete), "
            f"{len(self.failed)} failed, of {len(self.results)} case(s) in "
            f"{self.out_dir}"
        )


def output_path(out_dir: str | os.PathLike, case: Case) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{case.name}.nc"


def is_complete(path: pathlib.Path, name: str) -> bool:
    """True when ``path`` is a readable netCDF file written for case ``name``."""
    if not path.is_file():
        return False
    try:
        with xr.open_dataset(path, decode_times=False) as ds:
            return str(ds.attrs.get(CASE_ATTR)) == name
    except Exception as err:  # unreadable or truncated: redo the case
        logger.warning("existing output %s is not readable (%s); redoing it", path, err)
        return False


def _run_case(fn: Callable[[Case], xr.Dataset], case: Case, path: str) -> CaseResult:
    """Run one case and write its output atomically; never raises an Exception.

    Module-level (picklable) so Dask workers in other processes can run it.
    """
    start = time.perf_counter()
    try:
        ds = fn(case)
        if not isinstance(ds, xr.Dataset):
            raise TypeError(
                f"the case function must return an xarray.Dataset, got "
                f"{type(ds).__name__}."
            )
        ds = ds.assign_attrs({CASE_ATTR: case.name})
        write_netcdf(ds, path)
    except Exception as err:
        line = " ".join(f"{type(err).__name__}: {err}".split())
        return CaseResult(
            case.name,
            "failed",
            time.perf_counter() - start,
            line,
            traceback.format_exc(),
        )
    return CaseResult(case.name, "done", time.perf_counter() - start)


def _write_manifest(out_dir: pathlib.Path, records: dict[str, dict]) -> None:
    with atomic_write(out_dir / MANIFEST_NAME) as tmp:
        tmp.write_text(json.dumps({"cases": records}, indent=1, sort_keys=True))


def _read_manifest(out_dir: pathlib.Path) -> dict[str, dict]:
    path = out_dir / MANIFEST_NAME
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["cases"])
    except (ValueError, KeyError, TypeError) as err:
        logger.warning("ignoring unreadable %s (%s)", path, err)
        return {}


def _check_cases(cases: Iterable[Case]) -> list[Case]:
    cases = list(cases)
    for i, c in enumerate(cases):
        if not isinstance(c, Case):
            raise TypeError(
                f"`cases[{i}]` must be an assimilation.Case, got {type(c).__name__}."
            )
    names = [c.name for c in cases]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"`cases` have duplicate names {dupes}; names must be unique.")
    return cases


def run_batch(
    cases: Sequence[Case],
    fn: Callable[[Case], xr.Dataset],
    out_dir: str | os.PathLike,
    *,
    keep_going: bool = False,
    resume: bool = True,
    client=None,
    workers: int | None = None,
    scheduler: str | None = None,
    processes: bool = False,
    progress: Callable[[CaseResult, int, int], None] | None = None,
) -> BatchReport:
    """Run ``fn`` on every case and write ``<out_dir>/<name>.nc`` atomically.

    Args:
        cases: the cases, with unique names.
        fn: ``fn(case) -> xarray.Dataset``, the output to write. With process-based
            workers it must be picklable (a module-level function).
        out_dir: output directory (created if needed).
        keep_going: record a failing case and go on (``True``), or stop and raise
            :class:`BatchError` at the first failure (``False``, the default). Cases
            already running on other workers finish and are recorded either way.
        resume: skip cases whose output already exists and is complete.
        client: a ``dask.distributed.Client`` to submit the cases to.
        workers: start a local Dask cluster with this many workers (closed at the
            end). ``None`` (and no ``client``/``scheduler``) runs serially in-process.
        scheduler: address of a running Dask scheduler, e.g. ``"tcp://host:8786"``.
        processes: with ``workers``, use worker processes (``True``) or threads in
            this process (``False``, the default: JAX releases the GIL in compiled
            code, and nothing has to be pickled).
        progress: called as ``progress(result, n_finished, n_total)`` after each case.

    Returns:
        A :class:`BatchReport`; ``manifest.json`` in ``out_dir`` holds the same.

    Raises:
        BatchError: a case failed and ``keep_going`` is false.
        ValueError, TypeError: bad cases or options.
    """
    cases = _check_cases(cases)
    if sum(x is not None for x in (client, workers, scheduler)) > 1:
        raise ValueError("give at most one of `client`, `workers` and `scheduler`.")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"`workers` must be a positive integer, got {workers!r}.")
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = _read_manifest(out)
    results: dict[str, CaseResult] = {}
    pending: list[Case] = []
    for case in cases:
        if resume and is_complete(output_path(out, case), case.name):
            results[case.name] = CaseResult(case.name, "skipped")
            records.setdefault(case.name, {"name": case.name, "status": "done"})
        else:
            pending.append(case)
    n_total, n_finished = len(cases), len(results)
    logger.info(
        "batch: %d case(s), %d already complete, %d to run",
        n_total,
        n_total - len(pending),
        len(pending),
    )

    failure: CaseResult | None = None

    def record(res: CaseResult) -> None:
        nonlocal n_finished, failure
        results[res.name] = res
        records[res.name] = res.to_json()
        _write_manifest(out, records)
        n_finished += 1
        if res.status == "failed":
            logger.error("case %s failed: %s", res.name, res.error)
            if failure is None:
                failure = res
        if progress is not None:
            progress(res, n_finished, n_total)

    if client is None and workers is None and scheduler is None:
        for case in pending:
            record(_run_case(fn, case, str(output_path(out, case))))
            if failure is not None and not keep_going:
                break
    else:
        _run_dask(
            pending,
            fn,
            out,
            record,
            lambda: failure is not None and not keep_going,
            client=client,
            workers=workers,
            scheduler=scheduler,
            processes=processes,
        )
    _write_manifest(out, records)

    ordered = tuple(results[c.name] for c in cases if c.name in results)
    report = BatchReport(ordered, out)
    if failure is not None and not keep_going:
        not_run = n_total - len(ordered)
        raise BatchError(
            f"case {failure.name!r} failed: {failure.error} ({report.summary()}; "
            f"{not_run} not run). Fix it and rerun to resume, or pass keep_going=True "
            "(--keep-going) to run the other cases regardless."
        )
    return report


def _run_dask(
    pending, fn, out, record, should_stop, *, client, workers, scheduler, processes
):
    try:
        from dask.distributed import Client, LocalCluster, as_completed
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Dask execution needs `dask[distributed]`; install the `distributed` "
            "extra (pip install 'dphys[distributed]') or run serially."
        ) from err
    owned = []
    try:
        if client is None:
            if workers is not None:
                cluster = LocalCluster(
                    n_workers=workers,
                    threads_per_worker=1,
                    processes=processes,
                    dashboard_address=":0",
                )
                owned.append(cluster)
                client = Client(cluster)
            else:
                client = Client(scheduler)
            owned.insert(0, client)
        futures = [
            client.submit(
                _run_case,
                fn,
                case,
                str(output_path(out, case)),
                key=f"dphys-case-{case.name}-{os.getpid()}-{time.time_ns()}",
                pure=False,
            )
            for case in pending
        ]
        remaining = set(futures)
        for fut in as_completed(futures):
            remaining.discard(fut)
            record(fut.result())
            if should_stop():
                for other in remaining:
                    other.cancel()
                break
    finally:
        for obj in owned:
            obj.close()


def split_windows(start: float, end: float, length: float) -> list[tuple[float, float]]:
    """Consecutive assimilation windows ``[(t0, t0+length), ...]`` covering
    ``[start, end]`` (the last one is shortened to end at ``end``).

    Raises:
        ValueError: ``length <= 0`` or ``end <= start``.
    """
    if not length > 0:
        raise ValueError(f"window `length` must be positive, got {length}.")
    if not end > start:
        raise ValueError(f"`end` ({end}) must be after `start` ({start}).")
    n = max(1, math.ceil((end - start) / length - 1e-9))
    edges = [start + k * length for k in range(n)] + [end]
    windows = [(edges[k], min(edges[k + 1], end)) for k in range(n)]
    return [(a, b) for a, b in windows if b > a]
