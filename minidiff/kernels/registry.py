"""Which kernel implementation runs.

Every kernel op (``im2col``, ``group_norm_forward``, ...) has a readable reference written in
``xp`` code and may have faster versions: on the CPU ``"numba"`` (Numba, compiled on first call)
and ``"native"`` (the optional C++ extension ``minidiff._native``); on the GPU ``"cuda"`` (Numba
CUDA kernels, compiled on first call, taking CuPy arrays). Family files register each one with
``@register(op, impl)``; the dispatcher built by ``dispatcher(op)`` runs the one selected by
``use(...)`` or the ``MINIDIFF_KERNELS`` environment variable.

Selection rules:

- NumPy arrays run a CPU implementation. ``"auto"`` (the default) picks the fastest one present
  for the op: native > numba > reference. A named implementation that has no version of some op
  falls back along that same order (``use("native")`` runs the Numba Adam update, since there is
  no native one). The CUDA kernels never run NumPy arrays.
- CuPy arrays run the ``"cuda"`` version when the op has one and CUDA is usable, else the
  reference (it is ``xp`` code); ``use("reference")`` makes them run the reference too.
- ``use("cuda")`` is allowed where CUDA is usable: CuPy arrays run the CUDA kernels and NumPy
  arrays run as under ``"auto"``. Where CUDA is not usable it raises RuntimeError with the reason,
  as ``use("native")`` does without the extension.

Whether CUDA is usable is decided without slowing ``import minidiff`` on a machine without a GPU:
``numba.cuda`` is imported only where a CUDA driver library (or Numba's CUDA simulator,
``NUMBA_ENABLE_CUDASIM=1``) is present, and ``cuda.is_available()``, which starts the driver, is
asked on first need (``available()``, ``use("cuda")``, the first kernel call on a CuPy array).
Under the simulator the CUDA kernels run as Python threads on NumPy arrays, which is how they are
tested on machines without a GPU; the dispatcher still sends NumPy arrays to the CPU versions.
"""

from __future__ import annotations

import ctypes
import importlib
import os
import sys

import numpy as np

from minidiff.backend import is_cupy_array

IMPLEMENTATIONS = ("reference", "numba", "native", "cuda")
_FASTEST_FIRST = ("native", "numba", "reference")  # for NumPy arrays: the CUDA kernels never run them
ENV_VAR = "MINIDIFF_KERNELS"


# OpenMP worker threads busy-wait after a parallel kernel by default (GCC's runtime: 300,000
# spins, about a millisecond); on a machine with few cores they then steal the cores from the
# BLAS matrix product that usually comes next (about a quarter of the GEMM time of a U-Net step
# on 2 cores). Waiting passively instead, the workers sleep at once and every kernel launch
# wakes them again (tens of microseconds on 2 cores), which weighs on small layers; a short spin
# first (GOMP_SPINCOUNT, GCC's runtime: 3000 spins, tens of microseconds) keeps them awake
# through back-to-back kernels: the sampling pass of the 16x16 digits U-Net 9% faster, its
# training step 4%, the 32x32 model's unchanged (longer spins made both slower). Read by the
# OpenMP runtime when it loads, so this must precede the imports below; values the user set
# are kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "3000")
# The CUDA reductions launch one block per group, row or channel by design (a few dozen blocks for
# small tensors); numba-cuda would warn at every such launch that under 128 blocks leave a GPU
# idle. Read by numba when it is imported.
os.environ.setdefault("NUMBA_CUDA_LOW_OCCUPANCY_WARNINGS", "0")

# -- what this machine has -------------------------------------------------------------------

try:
    import numba
    from numba import njit, prange

    _numba_status = (True, f"numba {numba.__version__}, {numba.config.NUMBA_NUM_THREADS} threads")
except ImportError as exc:  # numba lags new Python releases: the library still works without it
    numba = None
    prange = range

    def njit(*args, **kwargs):
        """Stand-in for ``numba.njit``: leaves the function as Python (it is never registered)."""
        if len(args) == 1 and callable(args[0]) and not kwargs:
            return args[0]
        return lambda fn: fn

    _numba_status = (False, f"numba is not installed ({type(exc).__name__}: {exc})")

try:
    native = importlib.import_module("minidiff._native")
    _threads = f"OpenMP, {native.openmp_max_threads()} threads" if native.openmp else "no OpenMP, one thread"
    _native_status = (True, f"minidiff._native, {_threads}")
except ImportError as exc:
    native = None
    _native_status = (
        False,
        f"the native extension minidiff._native is not built ({type(exc).__name__}: {exc}); "
        "build it with `pip install .` or `python setup.py build_ext --inplace` "
        "(needs a C++17 compiler)",
    )


# Numba CUDA. Importing numba.cuda takes about a quarter of a second, so it is imported only where
# it can be of use: a CUDA driver library is present, or Numba's simulator was asked for.


def _cuda_driver_present() -> bool:
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


def _simulated() -> bool:
    """Whether Numba's CUDA simulator is on (read by numba from NUMBA_ENABLE_CUDASIM at import)."""
    return bool(getattr(numba.config, "ENABLE_CUDASIM", 0))


def _import_cuda():
    """``(numba.cuda, None)``, or ``(None, why it is not there)``."""
    if numba is None:
        return None, _numba_status[1]
    if not _simulated() and not _cuda_driver_present():
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


cuda, _cuda_missing = _import_cuda()
if cuda is None:
    cuda = _NoCuda()


def _cuda_status() -> tuple[bool, str]:
    """Whether the CUDA kernels can run here (asks the driver: called on first need only)."""
    if _cuda_missing is not None:
        return False, _cuda_missing
    if _simulated():
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


_AVAILABLE = {
    "reference": (True, "NumPy/CuPy code, always available"),
    "numba": _numba_status,
    "native": _native_status,
    "cuda": None,  # (usable, why): decided by _cuda_status() on first need
}


def _status(impl: str) -> tuple[bool, str]:
    if _AVAILABLE[impl] is None:
        _AVAILABLE[impl] = _cuda_status()
    return _AVAILABLE[impl]


def available() -> dict[str, tuple[bool, str]]:
    """``{implementation: (usable here, why or why not)}``; "cuda" asks the CUDA driver."""
    return {impl: _status(impl) for impl in IMPLEMENTATIONS}


# -- the registry ----------------------------------------------------------------------------

_TABLE: dict[str, dict[str, object]] = {}  # op -> {implementation: function}
_choice: str | None = None  # None until MINIDIFF_KERNELS has been read (lazily, see current())
# op -> function for NumPy arrays, and (op, "cuda") -> function for CuPy arrays, under the current
# choice; emptied by use() and register()
_selected: dict = {}
_DEVICES = ("cpu", "cuda")


def register(op: str, impl: str):
    """Decorator: ``fn`` is implementation ``impl`` of kernel ``op``.

    Implementations this machine lacks (no numba, native not built, no numba.cuda) are silently
    not registered, so family files can define them unconditionally. A "cuda" version is
    registered wherever numba.cuda imports; whether a GPU is usable is asked when it is needed.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"register({op!r}, {impl!r}): implementation must be one of {IMPLEMENTATIONS}")

    def decorate(fn):
        present = _cuda_missing is None if impl == "cuda" else _AVAILABLE[impl][0]
        if present:
            _TABLE.setdefault(op, {})[impl] = fn
            _selected.clear()
        return fn

    return decorate


def _device_type(device) -> str:
    kind = str(device).partition(":")[0]
    if kind not in _DEVICES:
        raise ValueError(f"device must be 'cpu' or 'cuda' (or 'cuda:N'), got {device!r}")
    return kind


def implementations(op: str, device: str = "cpu") -> dict:
    """``{implementation: function}`` that can run ``op`` on this machine (for tests, bench).

    ``device="cpu"`` (the default): those for NumPy arrays, the reference and the CPU versions.
    ``device="cuda"``: those for CuPy arrays, the reference and, where CUDA is usable, "cuda".
    """
    if op not in _TABLE:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(_TABLE)}")
    impls = _TABLE[op]
    if _device_type(device) == "cpu":
        return {name: fn for name, fn in impls.items() if name != "cuda"}
    return {
        name: fn
        for name, fn in impls.items()
        if name == "reference" or (name == "cuda" and _status("cuda")[0])
    }


def _set(name: str, source: str = "use()") -> None:
    global _choice
    if name != "auto" and name not in IMPLEMENTATIONS:
        valid = ", ".join(repr(n) for n in ("auto", *IMPLEMENTATIONS))
        raise ValueError(f"unknown kernel implementation {name!r} (from {source}); choose one of {valid}")
    if name != "auto" and not _status(name)[0]:
        raise RuntimeError(
            f"kernel implementation {name!r} (from {source}) is not available: {_status(name)[1]}"
        )
    _choice = name
    _selected.clear()


def current() -> str:
    """The selected implementation name: ``"auto"`` or one of ``IMPLEMENTATIONS``."""
    if _choice is None:
        # Read on first need rather than at import, so a bad value fails where kernels are used
        # (with the variable named) instead of breaking ``import minidiff``.
        _set(os.environ.get(ENV_VAR, "").strip().lower() or "auto", source=f"the {ENV_VAR} variable")
    return _choice


class _Selection:
    """What ``use()`` returns: the choice is already made; ``with`` only adds the restore."""

    def __init__(self, previous):
        self._previous = previous

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        global _choice
        _choice = self._previous  # may be None: MINIDIFF_KERNELS is then read again when needed
        _selected.clear()
        return False


def use(name: str) -> _Selection:
    """Select ``"auto"``, ``"reference"``, ``"numba"``, ``"native"`` or ``"cuda"`` for all kernel ops.

    Takes effect at once; ``with use("reference"): ...`` restores the previous choice on exit.
    ``"cuda"`` runs the CUDA kernels on CuPy arrays (which run them under every choice but
    ``"reference"``) and leaves NumPy arrays to ``"auto"``. Raises ValueError for an unknown
    name, RuntimeError for one this machine cannot run.
    """
    previous = _choice
    _set(name)
    return _Selection(previous)


def which(op: str, device: str = "cpu") -> str:
    """Name of the implementation that runs ``op`` under the current choice: on NumPy arrays
    (``device="cpu"``, the default) or on CuPy arrays (``device="cuda"``)."""
    if _device_type(device) == "cpu":
        fn = _select(op)
    else:
        fn = _select_gpu(op)
    return next(impl for impl, f in _TABLE[op].items() if f is fn)


def _select(op: str):
    """Resolve (and cache) the function for ``op`` on NumPy arrays under the current choice."""
    choice = current()
    impls = implementations(op)
    order = _FASTEST_FIRST[_FASTEST_FIRST.index(choice) :] if choice in _FASTEST_FIRST else _FASTEST_FIRST
    fn = next(impls[impl] for impl in order if impl in impls)
    _selected[op] = fn
    return fn


def _select_gpu(op: str):
    """Resolve (and cache) the function for ``op`` on CuPy arrays under the current choice."""
    impls = implementations(op, device="cuda")
    fn = impls["cuda"] if current() != "reference" and "cuda" in impls else impls["reference"]
    _selected[op, "cuda"] = fn
    return fn


def dispatcher(op: str):
    """The public function for kernel ``op``: runs the selected implementation.

    The first positional argument decides the device: NumPy arrays go to the selected CPU
    implementation, CUDA arrays (CuPy) to the CUDA version or the reference (see the module doc),
    anything else to the reference.
    """
    impls = _TABLE.get(op, {})
    if "reference" not in impls:
        raise LookupError(f"kernel op {op!r} has no reference implementation registered")
    reference = impls["reference"]
    on_gpu = (op, "cuda")

    def dispatch(*args, **kwargs):
        # Runs on every op call: for NumPy arrays one isinstance, one dict lookup, then the kernel.
        first = args[0]
        if isinstance(first, np.ndarray):
            fn = _selected.get(op) or _select(op)
        elif is_cupy_array(first):
            fn = _selected.get(on_gpu) or _select_gpu(op)
        else:
            fn = reference
        return fn(*args, **kwargs)

    dispatch.__name__ = dispatch.__qualname__ = op
    dispatch.__doc__ = reference.__doc__
    return dispatch
