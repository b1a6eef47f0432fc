"""Checkpoints on disk: safetensors for arrays, JSON for everything else.

A checkpoint is a directory::

    step-000500/
      model.safetensors       the model's weights
      ema.safetensors         the EMA weights
      optimizer.safetensors   optimizer moments
      state.json              config and trainer state (step, RNG states, ...)

It is written into a temporary directory and renamed into place, and the
``LATEST`` file that names the newest checkpoint is replaced atomically too: a
run killed at any moment leaves the previous checkpoint intact.
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


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _atomic_write_text(path: Path, text: str):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root, name: str, arrays: dict[str, dict[str, np.ndarray]], state: dict, keep: int = 2
) -> Path:
    """Write ``root/name`` (one safetensors file per entry of ``arrays`` plus
    state.json), point ``root/LATEST`` at it, and delete all but the newest ``keep``."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}."))
    try:
        for group, tensors in arrays.items():
            save_file(
                {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp / f"{group}.safetensors")
            )
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        final = root / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _atomic_write_text(root / LATEST, name + "\n")
    # Only checkpoint directories are pruned (other folders here are the user's),
    # oldest written first, never the one just written.
    checkpoints = sorted(
        (
            p
            for p in root.iterdir()
            if p.is_dir() and not p.name.startswith(".") and (p / STATE_FILE).is_file()
        ),
        key=lambda p: (p / STATE_FILE).stat().st_mtime_ns,
    )
    for old in checkpoints[: max(len(checkpoints) - keep, 0)]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return final


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory from itself, or from a folder holding LATEST
    (a checkpoints folder, or a training output folder with checkpoints/)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    for root in (path, path / "checkpoints"):
        if (root / LATEST).is_file():
            name = (root / LATEST).read_text().strip()
            if not name or name in (".", "..") or "/" in name or "\\" in name:
                raise CheckpointError(
                    f"{root / LATEST} is corrupt: it should name a checkpoint folder, got {name!r}"
                )
            if not (root / name).is_dir():
                raise CheckpointError(f"{root / LATEST} names {name!r}, which is not in {root}")
            return root / name
    if (path / STATE_FILE).is_file():
        return path
    raise CheckpointError(f"{path} is not a checkpoint: it has neither {STATE_FILE} nor {LATEST}")


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
