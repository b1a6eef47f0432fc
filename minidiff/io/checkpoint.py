"""Checkpoints on disk: safetensors for arrays, JSON for everything else.

A checkpoint is a directory::

    step-000500/
      model.safetensors       the model's weights
      ema.safetensors         the EMA weights
      optimizer.safetensors   optimizer moments
      state.json              config and trainer state (step, RNG states, ...)

Every file is written into a temporary directory (``.tmp-*``), flushed to disk,
and the directory is renamed into place; then ``LATEST`` is replaced atomically.
A run killed at any moment leaves the newest complete checkpoint loadable:

- a checkpoint of the same name is first renamed aside (``NAME.replaced``, a
  complete checkpoint too), never deleted before the new one is in place;
- ``LATEST`` is a hint: when it is missing, names a missing folder, or names an
  older checkpoint than one on disk, the newest complete checkpoint (by the step
  in its state.json) is used;
- what a killed write leaves (``.tmp-*`` folders, ``*.replaced`` ones) is removed
  by the next successful write.

``RunLock`` keeps a second writer out of a folder while one works there.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save_file

LATEST = "LATEST"
STATE_FILE = "state.json"
LOCK_FILE = ".lock"
_TMP_PREFIX = ".tmp-"
_REPLACED = ".replaced"

# The stages of save_checkpoint, in order; ``_stage_hook`` (tests set it) is called at each one
# to inject a failure or a kill there, or to snapshot what is on disk at that moment.
STAGES = ("temp-written", "old-moved-aside", "renamed", "latest-written", "cleaned")
_stage_hook = None


def _reached(stage: str):
    if _stage_hook is not None:
        _stage_hook(stage)


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


class RunLockedError(RuntimeError):
    """Another process holds the folder's lock."""


def _fsync_file(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path):
    # Makes renames inside ``path`` durable; not every platform can open a directory.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_write_text(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _checkpoint_step(directory: Path) -> int | None:
    """The step a complete checkpoint directory holds, or None (no or unreadable state.json)."""
    try:
        step = json.loads((directory / STATE_FILE).read_text()).get("step")
    except (OSError, ValueError, AttributeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def list_checkpoints(root) -> list[tuple[int, Path]]:
    """(step, directory) of every complete checkpoint in ``root``, oldest step first; at equal
    steps a ``*.replaced`` copy sorts before the checkpoint that replaced it."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        if p.is_dir() and not p.name.startswith("."):
            step = _checkpoint_step(p)
            if step is not None:
                found.append((step, not p.name.endswith(_REPLACED), p.name, p))
    return [(step, p) for step, _, _, p in sorted(found)]


def _remove_leftovers(root: Path, keep_name: str):
    """Temporary folders and files of killed writes, and replaced checkpoints, once a newer
    complete checkpoint (``keep_name``) is in place."""
    for p in root.iterdir():
        if p.name.startswith(_TMP_PREFIX) or (p.name.startswith(f".{LATEST}.") and p.name.endswith(".tmp")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        elif p.is_dir() and p.name.endswith(_REPLACED) and p.name != keep_name:
            shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(
    root, name: str, arrays: dict[str, dict[str, np.ndarray]], state: dict, keep: int = 2
) -> Path:
    """Write ``root/name`` (one safetensors file per entry of ``arrays`` plus
    state.json), point ``root/LATEST`` at it, and delete all but the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    aside = root / (name + _REPLACED)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f"{_TMP_PREFIX}{name}-"))
    try:
        for group, tensors in arrays.items():
            file = tmp / f"{group}.safetensors"
            save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(file))
            _fsync_file(file)
        # state.json last: a directory holding it holds every array file too
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        _fsync_file(tmp / STATE_FILE)
        _reached("temp-written")
        if final.exists():
            # Renamed aside, not deleted: until the new one is in place the old one stays loadable.
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
            _reached("old-moved-aside")
        os.replace(tmp, final)
        _fsync_dir(root)
        _reached("renamed")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside.exists() and not final.exists():
            os.replace(aside, final)  # a failed overwrite keeps the old contents under their name
        raise
    _atomic_write_text(root / LATEST, name + "\n")
    _reached("latest-written")
    _remove_leftovers(root, keep_name=name)
    # Only checkpoint directories are pruned (other folders here are the user's),
    # oldest written first, never the one just written.
    checkpoints = sorted(
        (p for _, p in list_checkpoints(root)), key=lambda p: (p / STATE_FILE).stat().st_mtime_ns
    )
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    _reached("cleaned")
    return final


def _resolve_root(root: Path) -> Path | None:
    """The newest checkpoint of a checkpoints folder, LATEST's choice unless it is missing,
    stale or names nothing; None when the folder holds no checkpoint at all."""
    found = list_checkpoints(root)
    named, problem = None, None
    if (root / LATEST).is_file():
        name = (root / LATEST).read_text().strip()
        if not name or name in (".", "..") or "/" in name or "\\" in name:
            problem = f"{root / LATEST} is corrupt: it should name a checkpoint folder, got {name!r}"
        elif not (root / name).is_dir():
            problem = f"{root / LATEST} names {name!r}, which is not in {root}"
        else:
            named = root / name
    elif not found:
        return None
    if found:
        newest_step, newest = found[-1]
        named_step = _checkpoint_step(named) if named is not None else None
        # LATEST is written after the rename: a kill in between leaves it naming an older one
        if named is None or (named_step is not None and newest_step > named_step):
            return newest
        return named
    if named is not None:
        return named  # its state.json is missing or corrupt: load_checkpoint says so
    raise CheckpointError(problem)


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from itself, or from a folder holding checkpoints
    (a checkpoints folder, or a training output folder with checkpoints/)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if (path / STATE_FILE).is_file() and not (path / LATEST).exists():
        return path
    for root in (path, path / "checkpoints"):
        if root.is_dir():
            found = _resolve_root(root)
            if found is not None:
                return found
    raise CheckpointError(f"{path} is not a checkpoint: it has neither {STATE_FILE} nor {LATEST}")


def has_checkpoint(path) -> bool:
    """Whether ``path`` (a run folder, a checkpoints folder or a checkpoint) holds a checkpoint."""
    try:
        resolve_checkpoint(path)
    except (FileNotFoundError, CheckpointError):
        return False
    return True


def load_checkpoint(path, groups=("model",)) -> tuple[dict[str, dict[str, np.ndarray]], dict, Path]:
    """Read the arrays of ``groups`` and the state of a checkpoint; clear errors
    when files are missing or corrupt."""
    directory = resolve_checkpoint(path)
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {directory} has no {STATE_FILE}") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} is corrupt ({exc})") from None
    arrays = {}
    for group in groups:
        file = directory / f"{group}.safetensors"
        if not file.is_file():
            raise CheckpointError(f"checkpoint {directory} has no {file.name}")
        try:
            arrays[group] = load_file(str(file))
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"checkpoint file {file} is corrupt ({exc})") from None
    return arrays, state, directory


class RunLock:
    """An exclusive lock on a folder (``.lock`` in it, holding the owner's pid), so two
    trainers never write one run. The operating system drops it when the process dies,
    however it dies. Where ``fcntl`` is missing (Windows) it locks nothing."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        self._fd = None

    def acquire(self):
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunLockedError(
                f"{self.path.parent} is in use by another trainer (pid {owner}); wait for it to "
                "finish or stop it, or choose another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self):
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the lock
            self._fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
