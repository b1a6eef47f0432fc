"""Which kernel implementation runs.

Every kernel op (``im2col``, ``group_norm_forward``, ...) has a readable reference written in
``xp`` code and may have faster CPU versions: ``"numba"`` (Numba, compiled on first call) and
``"native"`` (the optional C++ extension ``minidiff._native``). Family files register each one
with ``@register(op, impl)``; the dispatcher built by ``dispatcher(op)`` runs the one selected by
``use(...)`` or the ``MINIDIFF_KERNELS`` environment variable.

Selection rules:

- ``"auto"`` (the default) picks the fastest one present for the op: native > numba > reference.
- A named implementation that has no version of some op falls back along that same order
  (``use("native")`` runs the Numba softmax, since there is no native one).
- CuPy arrays always run the reference (it is ``xp`` code), whatever was selected.
"""

from __future__ import annotations

import importlib
import os

import numpy as np

IMPLEMENTATIONS = ("reference", "numba", "native")
_FASTEST_FIRST = ("native", "numba", "reference")
ENV_VAR = "MINIDIFF_KERNELS"


# OpenMP worker threads busy-wait after a parallel kernel by default; on a machine with few
# cores they then steal the cores from the BLAS matrix product that usually comes next (about
# a quarter of the GEMM time of a U-Net step on 2 cores). Passive waiting costs a few
# microseconds per kernel launch instead. Read by the OpenMP runtime when it loads, so this
# must precede the imports below; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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

_AVAILABLE = {
    "reference": (True, "NumPy/CuPy code, always available"),
    "numba": _numba_status,
    "native": _native_status,
}


def available() -> dict[str, tuple[bool, str]]:
    """``{implementation: (usable on the CPU, why or why not)}``."""
    return dict(_AVAILABLE)


# -- the registry ----------------------------------------------------------------------------

_TABLE: dict[str, dict[str, object]] = {}  # op -> {implementation: function}
_choice: str | None = None  # None until MINIDIFF_KERNELS has been read (lazily, see current())
_selected: dict[str, object] = {}  # op -> function for the current choice; emptied by use()


def register(op: str, impl: str):
    """Decorator: ``fn`` is implementation ``impl`` of kernel ``op``.

    Implementations this machine lacks (no numba, native not built) are silently not
    registered, so family files can define them unconditionally.
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"register({op!r}, {impl!r}): implementation must be one of {IMPLEMENTATIONS}")

    def decorate(fn):
        if _AVAILABLE[impl][0]:
            _TABLE.setdefault(op, {})[impl] = fn
            _selected.clear()
        return fn

    return decorate


def implementations(op: str) -> dict:
    """``{implementation: function}`` registered for ``op`` on this machine (for tests, bench)."""
    if op not in _TABLE:
        raise KeyError(f"unknown kernel op {op!r}; known: {sorted(_TABLE)}")
    return dict(_TABLE[op])


def _set(name: str, source: str = "use()") -> None:
    global _choice
    if name != "auto" and name not in IMPLEMENTATIONS:
        valid = ", ".join(repr(n) for n in ("auto", *IMPLEMENTATIONS))
        raise ValueError(f"unknown kernel implementation {name!r} (from {source}); choose one of {valid}")
    if name != "auto" and not _AVAILABLE[name][0]:
        raise RuntimeError(
            f"kernel implementation {name!r} (from {source}) is not available: {_AVAILABLE[name][1]}"
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
    """Select ``"auto"``, ``"reference"``, ``"numba"`` or ``"native"`` for all kernel ops.

    Takes effect at once; ``with use("reference"): ...`` restores the previous choice on exit.
    Raises ValueError for an unknown name, RuntimeError for one this machine cannot run.
    """
    previous = _choice
    _set(name)
    return _Selection(previous)


def which(op: str) -> str:
    """Name of the implementation that runs ``op`` on NumPy arrays under the current choice."""
    fn = _select(op)
    return next(impl for impl, f in implementations(op).items() if f is fn)


def _select(op: str):
    """Resolve (and cache) the function for ``op`` under the current choice."""
    choice = current()
    impls = implementations(op)
    order = _FASTEST_FIRST if choice == "auto" else _FASTEST_FIRST[_FASTEST_FIRST.index(choice) :]
    fn = next(impls[impl] for impl in order if impl in impls)
    _selected[op] = fn
    return fn


def dispatcher(op: str):
    """The public function for kernel ``op``: runs the selected implementation.

    The first positional argument decides the device: NumPy arrays go to the selected CPU
    implementation, anything else (CuPy) to the reference.
    """
    impls = _TABLE.get(op, {})
    if "reference" not in impls:
        raise LookupError(f"kernel op {op!r} has no reference implementation registered")
    reference = impls["reference"]

    def dispatch(*args, **kwargs):
        # Runs on every op call: one isinstance, one dict lookup, then the kernel.
        if isinstance(args[0], np.ndarray):
            fn = _selected.get(op) or _select(op)
            return fn(*args, **kwargs)
        return reference(*args, **kwargs)

    dispatch.__name__ = dispatch.__qualname__ = op
    dispatch.__doc__ = reference.__doc__
    return dispatch
