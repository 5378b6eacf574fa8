r"""Batch runs: many assimilation cases, resumable, atomic, on Dask processes.

A batch is a list of :class:`Case` objects (a name, a payload and a key) and a
function ``fn(case) -> xarray.Dataset``. :func:`run_batch` calls ``fn`` for every case
and writes ``<out_dir>/<case.name>.nc``:

* **in worker processes** with ``workers=N`` (a local Dask cluster of processes, one
  thread each): netCDF-C/HDF5 are not thread-safe, so threads that read and write
  files at the same time crash the process (every netCDF access of dphys also holds
  :func:`dphys.io.netcdf_lock`, for threaded clusters you build yourself);
* **atomically**: each output goes to a temporary file in the same directory and is
  renamed with :func:`os.replace`, so an interrupted run never leaves a partial file
  under a final name; temporaries left by a killed run are removed by the next one;
* **never mixing results**: every case has a key, a SHA-256 hash of what determines
  its output (for configured cases: the resolved configuration, the contents of its
  input files and the package version; otherwise the pickled payload). The key is
  stored in the output (``dphys_case_key``) and in ``manifest.json``; a case is
  skipped only when its output exists, opens and carries the same name and key, so
  a changed configuration or input is recomputed and an unchanged one is not;
* **failing gently only when asked** (DAPPER's ``fail_gently``): by default the first
  failing case stops the batch with :class:`BatchError`; with ``keep_going=True``
  failures are recorded and the other cases still run;
* **one batch per output folder**: an exclusive lock on ``<out_dir>/.dphys-batch.lock``
  refuses a second batch writing to the same folder at the same time.

The JAX persistent compilation cache (:func:`enable_compilation_cache`) is switched
on in every worker, so workers and reruns do not compile the same programs again.

GPUs: run one worker process per device, each seeing only its device
(``CUDA_VISIBLE_DEVICES``) and taking a fraction of its memory
(``XLA_PYTHON_CLIENT_MEM_FRACTION``; JAX preallocates 75% by default).
``run_batch(..., devices=["0", "1"], memory_fraction=0.9)`` (``[batch] devices``,
``memory_fraction``) starts such a local cluster: one worker process per entry,
its environment set before JAX starts in it. On several machines, start the
scheduler and the workers yourself::

    dask scheduler --port 8786 &
    CUDA_VISIBLE_DEVICES=0 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
        dask worker tcp://127.0.0.1:8786 --nworkers 1 --nthreads 1 &
    CUDA_VISIBLE_DEVICES=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.9 \
        dask worker tcp://127.0.0.1:8786 --nworkers 1 --nthreads 1 &
    dphys batch run.toml --scheduler tcp://127.0.0.1:8786

(``XLA_PYTHON_CLIENT_PREALLOCATE=false`` instead lets several workers share one
device, each allocating what it needs.)
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import pathlib
import pickle
import re
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import xarray as xr

from dphys.io import atomic_write, netcdf_lock, write_netcdf


__all__ = [
    "BatchError",
    "BatchReport",
    "Case",
    "CaseResult",
    "case_key",
    "enable_compilation_cache",
    "run_batch",
    "split_windows",
]

logger = logging.getLogger(__name__)

CASE_ATTR = "dphys_case"
KEY_ATTR = "dphys_case_key"
SCORES_ATTR = "dphys_scores"  # space-separated names of the scalar score variables
CASE_DIM = "case"
MANIFEST_NAME = "manifest.json"
LOCK_NAME = ".dphys-batch.lock"
CACHE_ENV = "DPHYS_COMPILATION_CACHE"
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
        key: what the output depends on, as a string (e.g. a hash of the
            configuration and its inputs, see :func:`case_key`). ``None``: a hash
            of the pickled payload. An existing output is reused only if it was
            written for the same key.
    """

    name: str
    payload: Any = None
    key: str | None = None

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
    key: str | None = None
    scores: dict[str, float] | None = None

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

    def table(self, columns: Sequence[str] | None = None) -> str:
        """A text table of every case: status, seconds, scores and error.

        ``columns``: the scores to show (default: every score any case has, in
        first-seen order). Scores of skipped cases are read from their outputs.
        """
        if columns is None:
            seen: dict[str, None] = {}
            for r in self.results:
                seen.update(dict.fromkeys(r.scores or {}))
            columns = list(seen)
        head = ["case", "status", "seconds", *columns]
        rows = []
        for r in self.results:
            cells = [r.name, r.status, f"{r.seconds:.1f}"]
            for c in columns:
                v = (r.scores or {}).get(c)
                cells.append("-" if v is None else f"{v:.4g}")
            rows.append(cells)
        widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]

        def line(cells):
            return "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(cells, widths, strict=True))
            ).rstrip()

        out = [line(head), line(["-" * w for w in widths])]
        out += [line(r) for r in rows]
        for r in self.results:
            if r.error:
                out.append(f"{r.name}: {r.error}")
        return "\n".join(out)


def output_path(out_dir: str | os.PathLike, case: Case) -> pathlib.Path:
    return pathlib.Path(out_dir) / f"{case.name}.nc"


def case_key(case: Case) -> str:
    """The key of ``case``: ``case.key``, else a hash of its pickled payload."""
    if case.key is not None:
        return str(case.key)
    try:
        blob = pickle.dumps(case.payload, protocol=4)
    except Exception as err:
        raise TypeError(
            f"case {case.name!r}: its payload cannot be pickled ({err}); give the "
            "case a `key` (e.g. a hash of what its output depends on)."
        ) from err
    return hashlib.sha256(blob).hexdigest()


def _output_attrs(path: pathlib.Path) -> dict[str, Any] | None:
    """The global attributes of an existing output, or None if it does not open."""
    if not path.is_file():
        return None
    try:
        with netcdf_lock(), xr.open_dataset(path, decode_times=False) as ds:
            attrs = dict(ds.attrs)
            names = str(attrs.get(SCORES_ATTR, "")).split()
            attrs["__scores__"] = {
                n: float(ds[n].values) for n in names if n in ds and ds[n].size == 1
            }
            return attrs
    except Exception as err:  # unreadable or truncated: redo the case
        logger.warning("existing output %s is not readable (%s); redoing it", path, err)
        return None


def is_complete(path: pathlib.Path, name: str, key: str | None = None) -> bool:
    """True when ``path`` is a readable netCDF file written for case ``name`` (and,
    when ``key`` is given, for that key)."""
    attrs = _output_attrs(pathlib.Path(path))
    if attrs is None or str(attrs.get(CASE_ATTR)) != name:
        return False
    return key is None or str(attrs.get(KEY_ATTR)) == key


def enable_compilation_cache(path: str | os.PathLike | None = None) -> str | None:
    """Switch on JAX's persistent compilation cache (idempotent); return its folder.

    ``path`` default: ``$DPHYS_COMPILATION_CACHE``, else
    ``$XDG_CACHE_HOME/dphys/jax`` (``~/.cache/dphys/jax``). Setting
    ``DPHYS_COMPILATION_CACHE`` to an empty string or ``0`` switches it off.
    A cache already configured (``jax_compilation_cache_dir``) is kept.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return current
    if path is None:
        env = os.environ.get(CACHE_ENV)
        if env is not None and env.strip() in ("", "0"):
            return None
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
            os.path.expanduser("~"), ".cache"
        )
        path = env or os.path.join(base, "dphys", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as err:
        logger.warning("no compilation cache: cannot create %s (%s)", path, err)
        return None
    jax.config.update("jax_compilation_cache_dir", str(path))
    # cache every program that took noticeable time to compile
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
    return str(path)


def _run_case(
    fn: Callable[[Case], xr.Dataset],
    case: Case,
    path: str,
    key: str,
    index: int = 0,
    cache: bool = True,
) -> CaseResult:
    """Run one case and write its output atomically; never raises an Exception.

    Module-level (picklable) so Dask workers in other processes can run it.
    """
    start = time.perf_counter()
    try:
        if cache:
            enable_compilation_cache()
        ds = fn(case)
        if not isinstance(ds, xr.Dataset):
            raise TypeError(
                f"the case function must return an xarray.Dataset, got "
                f"{type(ds).__name__}."
            )
        ds = ds.assign_attrs({CASE_ATTR: case.name, KEY_ATTR: key})
        ds = ds.assign_coords(
            {
                CASE_DIM: xr.DataArray(
                    index,
                    attrs={"long_name": "index of the case in its batch", "units": "1"},
                ),
            }
        )
        names = str(ds.attrs.get(SCORES_ATTR, "")).split()
        scores = {n: float(ds[n].values) for n in names if n in ds and ds[n].size == 1}
        write_netcdf(ds, path)
    except Exception as err:
        line = " ".join(f"{type(err).__name__}: {err}".split())
        return CaseResult(
            case.name,
            "failed",
            time.perf_counter() - start,
            line,
            traceback.format_exc(),
            key,
        )
    return CaseResult(
        case.name, "done", time.perf_counter() - start, key=key, scores=scores or None
    )


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


_TMP = re.compile(r"^\.(?P<target>.+)\.[^.]+\.tmp$")


def _remove_stale_temporaries(out: pathlib.Path, names: Iterable[str]) -> int:
    """Remove the temporaries (``.<file>.<random>.tmp``) a killed batch left."""
    targets = {f"{n}.nc" for n in names} | {f"{n}.png" for n in names}
    targets.add(MANIFEST_NAME)
    n = 0
    for p in out.iterdir():
        m = _TMP.match(p.name)
        if m and m.group("target") in targets and p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    if n:
        logger.warning("removed %d temporary file(s) left by an interrupted run", n)
    return n


@contextlib.contextmanager
def _exclusive(out: pathlib.Path):
    """Hold an exclusive lock on ``out`` for the whole batch (POSIX ``flock``)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no lock
        yield
        return
    with open(out / LOCK_NAME, "a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BatchError(
                f"another batch is writing to {str(out)!r} (it holds "
                f"{LOCK_NAME}); wait for it to finish, or give another `out_dir`."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
    processes: bool = True,
    compilation_cache: bool = True,
    progress: Callable[[CaseResult, int, int], None] | None = None,
    devices: Sequence[str | int] | None = None,
    memory_fraction: float | None = None,
) -> BatchReport:
    """Run ``fn`` on every case and write ``<out_dir>/<name>.nc`` atomically.

    Args:
        cases: the cases, with unique names.
        fn: ``fn(case) -> xarray.Dataset``, the output to write. With process-based
            workers it must be picklable (a module-level function). Scalar
            variables named in the dataset's ``dphys_scores`` attribute are the
            case's scores (in the report and the manifest).
        out_dir: output directory (created if needed).
        keep_going: record a failing case and go on (``True``), or stop and raise
            :class:`BatchError` at the first failure (``False``, the default). Cases
            already running on other workers finish and are recorded either way.
        resume: skip cases whose output exists, is complete and has the case's
            key (:func:`case_key`); ``False`` recomputes every case.
        client: a ``dask.distributed.Client`` to submit the cases to.
        workers: start a local Dask cluster with this many workers (closed at the
            end). ``None`` (and no ``client``/``scheduler``) runs serially in-process.
        scheduler: address of a running Dask scheduler, e.g. ``"tcp://host:8786"``.
        processes: with ``workers``, worker processes (``True``, the default) or
            threads in this process (``False``; every netCDF access then holds
            :func:`dphys.io.netcdf_lock`, which serialises the reads and writes).
        compilation_cache: switch on JAX's persistent compilation cache in every
            worker (:func:`enable_compilation_cache`).
        progress: called as ``progress(result, n_finished, n_total)`` after each case.
        devices: accelerators to run on, one local worker process per entry (a
            CUDA device index or UUID), started with ``CUDA_VISIBLE_DEVICES`` set to
            it; ``workers``, if given, must equal ``len(devices)``.
        memory_fraction: with ``devices``, ``XLA_PYTHON_CLIENT_MEM_FRACTION`` of
            every worker, in (0, 1] (default: JAX's, 0.75).

    Returns:
        A :class:`BatchReport`; ``manifest.json`` in ``out_dir`` holds the same.

    Raises:
        BatchError: a case failed and ``keep_going`` is false, or another batch is
            writing to ``out_dir``.
        ValueError, TypeError: bad cases or options.
    """
    cases = _check_cases(cases)
    if sum(x is not None for x in (client, workers, scheduler)) > 1:
        raise ValueError("give at most one of `client`, `workers` and `scheduler`.")
    if workers is not None and (
        isinstance(workers, bool) or not isinstance(workers, int) or workers < 1
    ):
        raise ValueError(f"`workers` must be a positive integer, got {workers!r}.")
    worker_env = _device_env(
        devices, memory_fraction, workers, processes, client, scheduler
    )
    if worker_env is not None:
        workers = len(worker_env)
    keys = {c.name: case_key(c) for c in cases}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _exclusive(out):
        _remove_stale_temporaries(out, keys)
        return _run_locked(
            cases,
            keys,
            fn,
            out,
            keep_going=keep_going,
            resume=resume,
            client=client,
            workers=workers,
            scheduler=scheduler,
            processes=processes,
            cache=compilation_cache,
            progress=progress,
            worker_env=worker_env,
        )


def _run_locked(
    cases,
    keys,
    fn,
    out,
    *,
    keep_going,
    resume,
    client,
    workers,
    scheduler,
    processes,
    cache,
    progress,
    worker_env=None,
):
    records = _read_manifest(out)
    results: dict[str, CaseResult] = {}
    pending: list[tuple[int, Case]] = []
    n_changed = 0
    for index, case in enumerate(cases):
        attrs = _output_attrs(output_path(out, case)) if resume else None
        same_case = attrs is not None and str(attrs.get(CASE_ATTR)) == case.name
        if same_case and str(attrs.get(KEY_ATTR)) == keys[case.name]:
            res = CaseResult(
                case.name,
                "skipped",
                key=keys[case.name],
                scores=attrs["__scores__"] or None,
            )
            results[case.name] = res
            old = records.get(case.name, {})
            records[case.name] = {**old, "name": case.name, "key": keys[case.name]}
            records[case.name].setdefault("status", "done")
        else:
            if same_case:
                n_changed += 1
                logger.info(
                    "case %s changed (configuration, inputs or version); recomputing",
                    case.name,
                )
            pending.append((index, case))
    n_total, n_finished = len(cases), len(results)
    logger.info(
        "batch: %d case(s), %d already complete, %d to run (%d changed)",
        n_total,
        n_total - len(pending),
        len(pending),
        n_changed,
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
        for index, case in pending:
            path = str(output_path(out, case))
            record(_run_case(fn, case, path, keys[case.name], index, cache))
            if failure is not None and not keep_going:
                break
    elif pending:  # start no cluster when every case is complete
        _run_dask(
            pending,
            keys,
            fn,
            out,
            record,
            lambda: failure is not None and not keep_going,
            client=client,
            workers=workers,
            scheduler=scheduler,
            processes=processes,
            cache=cache,
            worker_env=worker_env,
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
    pending,
    keys,
    fn,
    out,
    record,
    should_stop,
    *,
    client,
    workers,
    scheduler,
    processes,
    cache,
    worker_env=None,
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
            if worker_env is not None:
                cluster = _device_cluster(worker_env)
                owned.append(cluster)
                client = Client(cluster)
            elif workers is not None:
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
                keys[case.name],
                index,
                cache,
                key=f"dphys-case-{case.name}-{os.getpid()}-{time.time_ns()}",
                pure=False,
            )
            for index, case in pending
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


DEVICE_ENV = "CUDA_VISIBLE_DEVICES"
MEMORY_FRACTION_ENV = "XLA_PYTHON_CLIENT_MEM_FRACTION"


def _device_env(devices, memory_fraction, workers, processes, client, scheduler):
    """The environment of each worker of a ``devices`` batch (None without one)."""
    if devices is None:
        if memory_fraction is not None:
            raise ValueError(
                "`memory_fraction` applies to the workers of `devices`; give "
                "`devices` too (or set XLA_PYTHON_CLIENT_MEM_FRACTION yourself)."
            )
        return None
    if isinstance(devices, (str, int)) or not devices:
        raise ValueError(
            f"`devices` must be a non-empty list of device indices or UUIDs, e.g. "
            f'["0", "1"], got {devices!r}.'
        )
    names = [str(d).strip() for d in devices]
    if any(not n or "," in n for n in names) or len(set(names)) != len(names):
        raise ValueError(
            f"`devices` must name distinct single devices (one worker each), got "
            f"{list(devices)!r}."
        )
    if client is not None or scheduler is not None:
        raise ValueError(
            "`devices` starts its own local workers; it cannot be combined with "
            "`client` or `scheduler` (set CUDA_VISIBLE_DEVICES on those workers)."
        )
    if not processes:
        raise ValueError(
            "`devices` needs worker processes (each sees only its device); got "
            "processes=False."
        )
    if workers is not None and workers != len(names):
        raise ValueError(
            f"`workers` ({workers}) must equal the number of `devices` "
            f"({len(names)}): one worker per device."
        )
    env = {}
    if memory_fraction is not None:
        f = float(memory_fraction)
        if not 0.0 < f <= 1.0:
            raise ValueError(
                f"`memory_fraction` must lie in (0, 1], got {memory_fraction!r}."
            )
        env[MEMORY_FRACTION_ENV] = repr(f)
    return [{DEVICE_ENV: n, **env} for n in names]


def _device_cluster(worker_env):
    """A local cluster of one single-threaded worker process per environment."""
    from dask.distributed import Nanny, Scheduler, SpecCluster

    return SpecCluster(
        scheduler={"cls": Scheduler, "options": {"dashboard_address": ":0"}},
        workers={
            f"device-{env[DEVICE_ENV]}": {
                "cls": Nanny,
                # the Nanny sets `env` before the worker process starts, so JAX
                # initialises its backend with only this device visible
                "options": {"nthreads": 1, "env": env},
            }
            for env in worker_env
        },
    )


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
