"""Array modules, devices and dtypes.

minidiff runs the same code on NumPy (CPU) and CuPy (GPU) arrays. Every op
asks ``get_array_module(*arrays)`` for ``xp`` and writes ``xp.exp(x)``; the
array module follows the data.
"""

from __future__ import annotations

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
DEFAULT_DTYPE = np.dtype(np.float32)

_cupy = None
_cupy_error: str | None = None


def _load_cupy():
    """Import CuPy once; remember why it failed so errors can say so."""
    global _cupy, _cupy_error
    if _cupy is None and _cupy_error is None:
        try:
            import cupy

            if cupy.cuda.runtime.getDeviceCount() < 1:
                raise RuntimeError("CuPy found no CUDA device")
            _cupy = cupy
        except Exception as exc:  # ImportError, CUDA driver errors, ...
            _cupy_error = f"{type(exc).__name__}: {exc}"
    return _cupy


def cuda_available() -> bool:
    return _load_cupy() is not None


def cuda_unavailable_reason() -> str | None:
    """None when CUDA works, else why not (for ``minidiff info`` and errors)."""
    _load_cupy()
    if _cupy is not None:
        return None
    if _cupy_error and _cupy_error.startswith(("ImportError", "ModuleNotFoundError")):
        return "CuPy is not installed (pip install 'minidiff[cuda]')"
    return _cupy_error


def is_cupy_array(a) -> bool:
    """Whether ``a`` is a CuPy array (told by its type's module: CuPy is not imported for this)."""
    return type(a).__module__.startswith("cupy")


def get_array_module(*arrays):
    """numpy, or cupy when any argument is a CuPy array."""
    for a in arrays:
        if is_cupy_array(a):
            return _load_cupy()
    return np


class Device:
    """A place where arrays live: ``Device("cpu")`` or ``Device("cuda:0")``."""

    __slots__ = ("type", "index")

    def __init__(self, spec: str | Device = "cpu"):
        if isinstance(spec, Device):
            self.type, self.index = spec.type, spec.index
            return
        if not isinstance(spec, str):
            raise TypeError(f"device must be a string like 'cpu' or 'cuda:0', got {spec!r}")
        kind, _, index = spec.partition(":")
        if kind not in ("cpu", "cuda"):
            raise ValueError(f"unknown device {spec!r}: expected 'cpu', 'cuda' or 'cuda:N'")
        if kind == "cpu" and index:
            raise ValueError(f"unknown device {spec!r}: the CPU has no index")
        if index and not index.isdigit():
            raise ValueError(f"unknown device {spec!r}: the index must be a number")
        self.type = kind
        self.index = (int(index) if index else 0) if kind == "cuda" else None

    @property
    def xp(self):
        if self.type == "cpu":
            return np
        cupy = _load_cupy()
        if cupy is None:
            raise RuntimeError(f"device {self} is not available: {cuda_unavailable_reason()}")
        return cupy

    def __eq__(self, other):
        if isinstance(other, str):
            other = Device(other)
        return isinstance(other, Device) and (self.type, self.index) == (other.type, other.index)

    def __hash__(self):
        return hash((self.type, self.index))

    def __str__(self):
        return "cpu" if self.type == "cpu" else f"cuda:{self.index}"

    def __repr__(self):
        return f"device('{self}')"


CPU = Device("cpu")


def is_device_spec(value) -> bool:
    """True for a Device or a string naming one ('cpu', 'cuda', 'cuda:1'), False
    for anything else (such as a dtype name like 'float64')."""
    if isinstance(value, Device):
        return True
    return isinstance(value, str) and value.partition(":")[0] in ("cpu", "cuda")


def device_of(array) -> Device:
    if type(array).__module__.startswith("cupy"):
        return Device(f"cuda:{array.device.id}")
    return CPU


def to_device(array, device: Device | str):
    """Copy ``array`` to ``device`` (a no-op when it is already there)."""
    device = Device(device)
    if device_of(array) == device:
        return array
    if device.type == "cpu":
        return array.get()
    cupy = device.xp
    with cupy.cuda.Device(device.index):
        return cupy.asarray(array)


def as_float_dtype(dtype, where: str = "tensor") -> np.dtype:
    """The dtype as a NumPy dtype, checked to be one minidiff computes in."""
    dt = np.dtype(dtype)
    if dt not in FLOAT_DTYPES:
        raise TypeError(f"{where}: dtype {dt} is not supported; use float32 or float64")
    return dt
