"""Process-wide settings minidiff applies when it is imported, and what they are now.

minidiff never writes into its own installed package (it may be read-only, shared by several
users, or replaced by pip): Numba's compiled-kernel cache (``cache=True``) goes to a per-user
folder, ``NUMBA_CACHE_DIR`` set to ``<cache>/numba`` unless the user set it, where ``<cache>``
is ``MINIDIFF_CACHE`` or the platform's user cache directory (``~/.cache/minidiff`` on Linux).
The feature classifier of the evaluation caches its weights there too.

Three settings change how fast the CPU runs minidiff's kernels and array passes; none overrides
a value the user set, and ``minidiff info`` reports them:

- ``OMP_WAIT_POLICY=PASSIVE`` and ``GOMP_SPINCOUNT=3000`` for the native kernels' OpenMP
  threads: an idle worker spins briefly (enough to stay awake through back-to-back kernels),
  then sleeps, instead of busy-waiting long enough to take its core from the BLAS matrix product
  that usually comes next. The OpenMP runtime reads them when it loads (with the native
  extension, after this module).
- ``OPENBLAS_THREAD_TIMEOUT=4`` for the OpenBLAS that NumPy multiplies matrices with: its idle
  threads then sleep at once instead of spinning for about 2^28 cycles (tens of milliseconds)
  after every product. A spinning BLAS thread holds a core that the native kernels' OpenMP
  threads need next. OpenBLAS reads the variable when it is loaded, so it is set before NumPy
  is imported; where NumPy came first, the loaded copies are told to read it again and their
  threads are restarted (at import, while no product runs).
- glibc's allocator keeps freed memory for reuse (``mallopt``): by default it hands every block
  over 32 MiB, and memory freed at the top of its heap, back to the system, and a training step
  that allocates and frees a few hundred MiB of activations then pays a page fault on each 4 KiB
  page again, every step. The resident
  size then stays near its peak instead of shrinking between steps. Set
  ``MINIDIFF_MALLOC=system`` to keep the allocator's defaults.

``NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS=0`` (unless set): the CUDA reductions launch one block per
group, row or channel by design, and numba-cuda would warn at every launch of under 128 blocks.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from pathlib import Path

import platformdirs

MALLOC_VAR = "MINIDIFF_MALLOC"
BLAS_TIMEOUT_VAR = "OPENBLAS_THREAD_TIMEOUT"
_BLAS_TIMEOUT = "4"  # OpenBLAS's smallest: idle threads sleep after 2^4 cycles

# Read by the OpenMP runtime and by numba when they load, after this module: only defaults.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

# Before NumPy loads OpenBLAS, when minidiff is imported first: nothing to restart then.
_blas_user_value = os.environ.get(BLAS_TIMEOUT_VAR)
_blas_loaded_first = "numpy" in sys.modules
if _blas_user_value is None:
    os.environ[BLAS_TIMEOUT_VAR] = _BLAS_TIMEOUT

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
_MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value: larger blocks are always mapped
_TRIM_THRESHOLD = 1 << 30  # keep up to 1 GiB freed at the heap's top
_TOP_PAD = 64 << 20  # grow the heap in steps of 64 MiB

CACHE_VAR = "MINIDIFF_CACHE"
JIT_CACHE_VAR = "NUMBA_CACHE_DIR"

_state = {"malloc": "not applied", "blas": "not applied", "jit cache": "not applied"}


def cache_dir() -> Path:
    """minidiff's per-user cache folder: ``MINIDIFF_CACHE``, else the platform's user cache
    directory for minidiff (not created here)."""
    chosen = os.environ.get(CACHE_VAR)
    return Path(chosen).expanduser() if chosen else Path(platformdirs.user_cache_dir("minidiff", False))


def _apply_jit_cache() -> str:
    chosen = os.environ.get(JIT_CACHE_VAR)
    if chosen:
        return f"{chosen} (as set in {JIT_CACHE_VAR})"
    folder = str(cache_dir() / "numba")
    os.environ[JIT_CACHE_VAR] = folder
    numba_config = sys.modules.get("numba.core.config")
    if numba_config is not None:  # Numba read its environment before minidiff was imported
        numba_config.CACHE_DIR = folder
    return f"{folder} ({JIT_CACHE_VAR}; set it, or {CACHE_VAR}, to choose another folder)"


def _restart_openblas_threads() -> int:
    """Make the OpenBLAS copies already loaded read the environment again and restart their
    threads (which read the timeout when they start); returns how many were restarted."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return 0
    restarted = 0
    for found in threadpool_info():
        if found.get("internal_api") != "openblas":
            continue
        try:
            lib = ctypes.CDLL(found["filepath"])
            steps = lib.openblas_read_env, lib.blas_thread_shutdown_, lib.blas_thread_init
        except (OSError, AttributeError, KeyError):
            continue  # a build without these entry points keeps its threads as they are
        for step in steps:
            step()
        restarted += 1
    return restarted


def _apply_blas_timeout() -> str:
    if _blas_user_value is not None:
        return f"OpenBLAS thread timeout as set ({BLAS_TIMEOUT_VAR}={_blas_user_value})"
    note = f"idle OpenBLAS threads sleep at once ({BLAS_TIMEOUT_VAR}={_BLAS_TIMEOUT})"
    if _blas_loaded_first:
        restarted = _restart_openblas_threads()
        note += f"; {restarted} OpenBLAS loaded before minidiff restarted" if restarted else ""
    return note


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


# At import, before the kernel modules import Numba (which reads NUMBA_CACHE_DIR as it loads).
_state["jit cache"] = _apply_jit_cache()


def apply() -> None:
    """Apply the settings (idempotent; ``import minidiff`` calls it)."""
    if _state["malloc"] == "not applied":
        _state["malloc"] = _apply_malloc()
    if _state["blas"] == "not applied":
        _state["blas"] = _apply_blas_timeout()


def jit_cache_note() -> str:
    """Where Numba's compiled kernels are cached, for ``minidiff info``."""
    return _state["jit cache"]


def malloc_note() -> str:
    """What minidiff did about the allocator, for ``minidiff info``."""
    return _state["malloc"]


def blas_note() -> str:
    """What minidiff did about OpenBLAS's idle threads, for ``minidiff info``."""
    return _state["blas"]


def omp_note() -> str:
    """How idle OpenMP workers wait (the variables as the OpenMP runtime read them)."""
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset)")
    spin = os.environ.get("GOMP_SPINCOUNT", "(unset)")
    return f"OMP_WAIT_POLICY={policy}, GOMP_SPINCOUNT={spin} (idle workers spin that many times, then sleep)"
