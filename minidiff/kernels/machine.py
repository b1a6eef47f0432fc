"""What this machine can run: Numba, the native extension ``minidiff._native``, Numba CUDA.

Probed once, at import, without slowing ``import minidiff`` on a machine without a GPU:
``numba.cuda`` is imported only where a CUDA driver library (or Numba's CUDA simulator,
``NUMBA_ENABLE_CUDASIM=1``) is present, and ``cuda_status()``, which starts the driver, is asked
by the registry on first need. Where a piece is missing, stand-ins keep the family files
importable: ``njit`` and ``cuda.jit`` then leave functions as Python (they are never registered,
so never run).

The process settings these libraries read when they load (OpenMP's wait policy, numba-cuda's
warnings) are minidiff.runtime's, applied before this module is imported.
"""

from __future__ import annotations

import ctypes
import importlib
import sys

import numpy as np

try:
    import numba
    from numba import njit, prange

    numba_status = (True, f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads")
except ImportError as exc:  # numba lags new Python releases: the library still works without it
    numba = None
    prange = range

    def njit(*args, **kwargs):
        """Stand-in for ``numba.njit``: leaves the function as Python (it is never registered)."""
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    numba_status = (False, f"numba is not installed ({type(exc).__name__}: {exc})")

try:
    native = importlib.import_module("minidiff._native")
    _threads = f"OpenMP, {native.openmp_max_threads()} threads" if native.openmp else "no OpenMP, one thread"
    native_status = (True, f"minidiff._native, {_threads}")
except ImportError as exc:
    native = None
    native_status = (
        False,
        f"the native extension minidiff._native is not built ({type(exc).__name__}: {exc}); "
        "build it with `pip install .` or `python setup.py build_ext --inplace` "
        "(needs a C++17 compiler)",
    )

# Whether the direct convolution kernels of the native extension run vectorized (AVX2 or
# AVX-512); without either, unfolding and BLAS are faster.
native_conv_is_vectorized = native is not None and native.conv2d_direct_isa != "baseline"


# -- Numba CUDA: imported only where it can be of use (the import is slow) --------------------


def cuda_driver_present() -> bool:
    """Whether a CUDA driver library loads (the names numba.cuda tries); does not start it."""
    if sys.platform == "win32":
        names = ["nvcuda.dll"]
    elif sys.platform == "darwin":
        names = ["libcuda.dylib", "/usr/local/cuda/lib/libcuda.dylib"]
    else:
        names = ["libcuda.so.1", "libcuda.so", "/usr/lib/libcuda.so.1", "/usr/lib64/libcuda.so.1"]
    for name in names:
        try:
            ctypes.CDLL(name)
        except OSError:
            continue
        return True
    return False


def simulated() -> bool:
    """Whether Numba's CUDA simulator is on (read by numba from NUMBA_ENABLE_CUDASIM at import)."""
    return bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


def _import_cuda():
    """``(numba.cuda, None)``, or ``(None, why it is not there)``."""
    if numba is None:
        return None, numba_status[1]
    if not simulated() and not cuda_driver_present():
        return None, "no CUDA driver library (libcuda) found: this machine has no NVIDIA driver"
    try:
        from numba import cuda as module
    except Exception as exc:  # ImportError, or a CUDA installation that fails to load
        return None, f"numba.cuda cannot be imported ({type(exc).__name__}: {exc}); install numba-cuda"
    return module, None


class _NoCuda:
    """Stand-in for ``numba.cuda`` where it is not there: ``@cuda.jit`` leaves functions as Python
    (they are never registered, so never run)."""

    @staticmethod
    def jit(*args, **kwargs):
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn


cuda, cuda_missing = _import_cuda()  # cuda_missing: None, or why numba.cuda is not there
if cuda is None:
    cuda = _NoCuda()


def cuda_status() -> tuple[bool, str]:
    """Whether the CUDA kernels can run here (asks the driver: call on first need only)."""
    if cuda_missing is not None:
        return False, cuda_missing
    if simulated():
        return True, "Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1): kernels run as Python threads"
    try:
        if not cuda.is_available():
            return False, "numba.cuda found no usable CUDA GPU (cuda.is_available() is False)"
        device = cuda.get_current_device()
        name = device.name.decode() if isinstance(device.name, bytes) else device.name
        cc = ".".join(map(str, device.compute_capability))
    except Exception as exc:  # a driver that loads but fails to start
        return False, f"the CUDA driver failed to start ({type(exc).__name__}: {exc})"
    try:
        _compile_and_run_a_kernel()
    except Exception as exc:  # e.g. numba-cuda without NVRTC: every kernel would fail on first use
        return False, (
            f"numba-cuda cannot compile and run a kernel on {name} ({type(exc).__name__}: {exc}); "
            'install the CUDA compiler libraries: pip install "numba-cuda[cu12]"'
        )
    return True, f"numba-cuda on {name} (compute capability {cc})"


def _compile_and_run_a_kernel() -> None:
    """Compile, launch and check a one-thread kernel; raises where that fails."""

    @cuda.jit
    def write_seven(out):
        out[0] = 7

    out = cuda.to_device(np.zeros(1, np.int32))
    write_seven[1, 1](out)
    if out.copy_to_host()[0] != 7:
        raise RuntimeError("a test kernel ran but did not write its output")
