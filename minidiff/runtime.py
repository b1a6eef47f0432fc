"""Process-wide settings minidiff applies when it is imported, and what they are now.

Two settings change how fast the CPU runs minidiff's kernels and array passes; neither overrides
a value the user set, and ``minidiff info`` reports both:

- ``OMP_WAIT_POLICY=PASSIVE`` for the native kernels' OpenMP threads (see kernels/registry.py).
- glibc's allocator keeps freed memory for reuse (``mallopt``): by default it hands every block
  over 32 MiB, and memory freed at the top of its heap, back to the system, and a training step
  that allocates and frees a few hundred MiB of activations then pays a page fault on each 4 KiB
  page again, every step (about a fifth of the step's time on a 2-core machine). The resident
  size then stays near its peak instead of shrinking between steps. Set
  ``MINIDIFF_MALLOC=system`` to keep the allocator's defaults.
"""

from __future__ import annotations

import ctypes
import os
import platform

MALLOC_VAR = "MINIDIFF_MALLOC"

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: larger blocks are always mapped
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB freed at the heap's top
_TOP_PAD = 64 << 20  # grow the heap in steps of 64 MiB

_state = {"malloc": "not applied"}


def _apply_malloc() -> str:
    if os.environ.get(MALLOC_VAR, "").strip().lower() == "system":
        return f"the allocator's defaults ({MALLOC_VAR}=system)"
    if platform.system() != "Linux":
        return "the allocator's defaults (not Linux)"
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return "the allocator's defaults (no glibc mallopt)"
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = all(
        mallopt(param, value)
        for param, value in (
            (_M_MMAP_THRESHOLD, _MMAP_THRESHOLD),
            (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
            (_M_TOP_PAD, _TOP_PAD),
        )
    )
    if not ok:
        return "the allocator rejected some of the settings (glibc mallopt returned 0)"
    return "glibc malloc keeps freed memory for reuse (mmap threshold 32 MiB, trim threshold 1 GiB)"


def apply() -> None:
    """Apply the settings (idempotent; ``import minidiff`` calls it)."""
    if _state["malloc"] == "not applied":
        _state["malloc"] = _apply_malloc()


def malloc_note() -> str:
    """What minidiff did about the allocator, for ``minidiff info``."""
    return _state["malloc"]
