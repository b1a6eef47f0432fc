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

What this machine has is probed in machine.py; whether CUDA is usable (which starts the driver)
is asked on first need: ``available()``, ``use("cuda")``, the first kernel call on a CuPy array.
Under Numba's CUDA simulator the CUDA kernels run as Python threads on NumPy arrays, which is how
they are tested on machines without a GPU; the dispatcher still sends NumPy arrays to the CPU
versions.
"""

from __future__ import annotations

import os

import numpy as np

from minidiff.backend import is_cupy_array

from . import machine

IMPLEMENTATIONS = ("reference", "numba", "native", "cuda")
_FASTEST_FIRST = ("native", "numba", "reference")  # for NumPy arrays: the CUDA kernels never run them
ENV_VAR = "MINIDIFF_KERNELS"

_AVAILABLE = {
    "reference": (True, "NumPy/CuPy code, always available"),
    "numba": machine.numba_status,
    "native": machine.native_status,
    "cuda": None,  # (usable, why): decided by machine.cuda_status() on first need
}


def _status(impl: str) -> tuple[bool, str]:
    if _AVAILABLE[impl] is None:
        _AVAILABLE[impl] = machine.cuda_status()
    return _AVAILABLE[impl]


def available() -> dict[str, tuple[bool, str]]:
    """``{implementation: (usable here, why or why not)}``; "cuda" asks the CUDA driver."""
    return {impl: _status(impl) for impl in IMPLEMENTATIONS}


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
        present = machine.cuda_missing is None if impl == "cuda" else _AVAILABLE[impl][0]
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
