"""Argument checks shared by the kernel wrappers: a kernel never guesses, it says what is wrong."""

from __future__ import annotations

import operator

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def float_dtype(fn: str, **arrays) -> np.dtype:
    """The common dtype of ``arrays`` (None values skipped); float32 or float64, else TypeError."""
    dtype = None
    for name, a in arrays.items():
        if a is None:
            continue
        if a.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{fn}: {name} has dtype {a.dtype}; kernels take float32 or float64")
        if dtype is None:
            dtype = a.dtype
        elif a.dtype != dtype:
            shown = ", ".join(f"{k}={v.dtype}" for k, v in arrays.items() if v is not None)
            raise TypeError(f"{fn}: all arrays must have the same dtype, got {shown}")
    return dtype


def pair(fn: str, name: str, value) -> tuple[int, int]:
    """``value`` as a pair of ints: an int ``k`` means ``(k, k)``."""
    try:
        if isinstance(value, (tuple, list)):
            a, b = value
            return operator.index(a), operator.index(b)
        k = operator.index(value)
        return k, k
    except (TypeError, ValueError):
        raise TypeError(f"{fn}: {name} must be an int or a pair of ints, got {value!r}") from None


def same_shape(fn: str, **arrays) -> None:
    shapes = {name: a.shape for name, a in arrays.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{fn}: shapes must match, got " + ", ".join(f"{k}={v}" for k, v in shapes.items()))


def flat(a):
    """``a`` as a C-contiguous 1-D array: a view when it is C-contiguous, else a copy."""
    return a.ravel()


def check_arrays(fn, names, *arrays):
    """The dtype shared by ``arrays`` (named ``names``; None skipped), which must be float32 or
    float64 and of one shape; TypeError or ValueError naming the arrays otherwise."""
    dtype, shape = arrays[0].dtype, arrays[0].shape
    if dtype in FLOAT_DTYPES:
        for a in arrays:
            if a is not None and (a.dtype != dtype or a.shape != shape):
                break
        else:
            return dtype
    named = {name: a for name, a in zip(names, arrays) if a is not None}
    dtype = float_dtype(fn, **named)
    same_shape(fn, **named)
    return dtype
