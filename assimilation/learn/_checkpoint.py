r"""Atomic training checkpoints: equinox-serialised state plus a JSON sidecar.

A checkpoint directory holds

* ``state-<step>.eqx``: every array leaf of the training state, written with
  :func:`equinox.tree_serialise_leaves` (``numpy.save`` per leaf: bit-exact);
* ``checkpoint.json``: which ``.eqx`` file is current, the step and epoch, a hash of
  the run's configuration, the loss history and the training time so far.

Each file is written to a temporary file in the same directory, flushed to disk and
moved into place with :func:`os.replace` (atomic on POSIX), the state first and the
sidecar last. A process killed at any instant therefore leaves a sidecar that names a
complete state file: either the previous checkpoint or the new one, never a torn one.
Older state files are deleted only after the new sidecar is in place.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import tempfile
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np


SIDECAR = "checkpoint.json"
FORMAT = 1


def _fsync_dir(path: pathlib.Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _atomic_write(path: pathlib.Path, write) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def config_hash(state: Any, **config: Any) -> str:
    """A short hash of a run's configuration, to refuse resuming a different run.

    It covers the path, shape and dtype of every array leaf of ``state`` (so a
    different model, optimizer or trainable subset changes it) and the JSON-encodable
    ``config`` values (batch size, dataset size, seed, ...). It does not cover
    functions (the loss): the caller is responsible for resuming with the same one.
    """
    leaves = jtu.tree_flatten_with_path(eqx.filter(state, eqx.is_array))[0]
    spec = [(jtu.keystr(p), list(np.shape(x)), str(x.dtype)) for p, x in leaves]
    text = json.dumps({"leaves": spec, "config": config}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def save_checkpoint(directory, state: Any, meta: dict) -> pathlib.Path:
    """Write ``state`` and ``meta`` atomically into ``directory`` (created if needed).

    Args:
        directory: the checkpoint directory.
        state: a pytree (e.g. :class:`TrainState`); its array leaves are saved.
        meta: JSON-encodable metadata; must contain an integer ``"step"``.

    Returns:
        The path of the state file written.
    """
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    step = int(meta["step"])
    name = f"state-{step:09d}.eqx"
    state = jax.device_get(state)
    _atomic_write(directory / name, lambda f: eqx.tree_serialise_leaves(f, state))
    sidecar = dict(meta, file=name, format=FORMAT)
    text = json.dumps(sidecar, indent=1, sort_keys=True).encode()
    _atomic_write(directory / SIDECAR, lambda f: f.write(text))
    for old in directory.glob("state-*.eqx"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return directory / name


def read_sidecar(directory) -> dict | None:
    """The metadata of the latest checkpoint in ``directory``, or ``None``."""
    path = pathlib.Path(directory) / SIDECAR
    if not path.exists():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"`checkpoint_dir`: {path} has checkpoint format {meta.get('format')!r}, "
            f"this version reads format {FORMAT}; start a new directory."
        )
    return meta


def load_checkpoint(directory, like: Any) -> tuple[Any, dict] | None:
    """The latest checkpoint of ``directory`` as ``(state, meta)``, or ``None``.

    Args:
        directory: the checkpoint directory.
        like: a pytree of the saved structure (e.g. a fresh :class:`TrainState`);
            its array leaves are replaced by the saved ones.
    """
    meta = read_sidecar(directory)
    if meta is None:
        return None
    path = pathlib.Path(directory) / meta["file"]
    state = eqx.tree_deserialise_leaves(path, like)
    return state, meta
