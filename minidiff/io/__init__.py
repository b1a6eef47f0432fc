"""Reading and writing what minidiff keeps on disk: training checkpoints (checkpoint.py)."""

from .checkpoint import (
    LATEST,
    STATE_FILE,
    CheckpointError,
    RunLock,
    RunLockedError,
    has_checkpoint,
    list_checkpoints,
    load_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)

__all__ = [
    "LATEST",
    "STATE_FILE",
    "CheckpointError",
    "RunLock",
    "RunLockedError",
    "has_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "resolve_checkpoint",
    "save_checkpoint",
]
