"""Attention softmax: ``y = softmax(scale * x)`` along one axis, and its backward.

    y  = exp(scale*x - max) / sum(exp(scale*x - max))     (subtracting the max cannot overflow)
    gx = scale * y * (gy - sum(gy * y))                    (sums along the same axis)

The backward needs only y, not x, so attention saves the probabilities it already has.

Implementations side by side: the reference (``xp`` code, NumPy or CuPy), Numba CPU, native C++
(kernels/attention.cpp) and Numba CUDA for CuPy arrays. The fast ones handle the last axis (rows of
a 2-D view; other axes run the reference) and sum in float64. Numba CPU and native compute the
exponentials in the data's dtype, native's float32 exp in vector lanes (about one ulp); the CUDA
kernels work in float64 within a row, one block per row whose threads stride over it and combine
their maxima and sums in a tree in shared memory.
"""

from __future__ import annotations

import math

import numpy as np

from minidiff.backend import get_array_module

from . import _cpu, _cuda
from ._checks import float_dtype, same_shape
from ._cuda import BUFFER, block_max, block_sum
from .machine import cuda, native, njit, prange
from .registry import register


def _check_axis(fn, x, axis):
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{fn}: axis {axis} is out of range for an array with shape {x.shape}")


# -- reference -------------------------------------------------------------------------------


@register("softmax_forward", "reference")
def softmax_forward_reference(x, axis=-1, scale=1.0):
    """``softmax(scale * x)`` along ``axis``, in x's dtype."""
    float_dtype("softmax_forward", x=x)
    _check_axis("softmax_forward", x, axis)
    xp = get_array_module(x)
    if x.size == 0:
        return xp.empty_like(x)
    z = x * scale if scale != 1.0 else x
    e = xp.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


@register("softmax_backward", "reference")
def softmax_backward_reference(gy, y, axis=-1, scale=1.0):
    """Gradient wrt x of ``softmax(scale * x)`` given its output y and the output gradient gy."""
    float_dtype("softmax_backward", gy=gy, y=y)
    same_shape("softmax_backward", gy=gy, y=y)
    _check_axis("softmax_backward", y, axis)
    gx = y * (gy - (gy * y).sum(axis=axis, keepdims=True))
    return gx * scale if scale != 1.0 else gx


# -- Numba CPU: one task per row -------------------------------------------------------------


@njit(parallel=True, cache=True)
def _softmax_forward_cpu(x, scale, y):
    # scale arrives in x's dtype, so exp runs in that dtype (float32 exp is the cheaper one)
    R, L = x.shape
    for r in prange(R):
        top = scale * x[r, 0]
        for k in range(1, L):
            top = max(top, scale * x[r, k])  # max of scale*x: scale may be negative
        total = 0.0
        for k in range(L):
            e = np.exp(scale * x[r, k] - top)
            y[r, k] = e
            total += e
        inv = 1.0 / total
        for k in range(L):
            y[r, k] *= inv


@njit(parallel=True, cache=True)
def _softmax_backward_cpu(gy, y, scale, gx):
    R, L = y.shape
    for r in prange(R):
        dot = 0.0
        for k in range(L):
            dot += np.float64(gy[r, k]) * y[r, k]
        for k in range(L):
            gx[r, k] = scale * y[r, k] * (gy[r, k] - dot)


def _is_last(x, axis):
    return axis == -1 or axis == x.ndim - 1


def _rows(fn, axis, **arrays):
    """The arrays, checked (a float dtype, one shape), as C-contiguous 2-D arrays of rows along
    the last axis; None where the fast kernels do not apply (another axis, 0-d or empty arrays),
    and the caller runs the reference."""
    first = next(iter(arrays.values()))
    if not _is_last(first, axis) or first.ndim == 0 or first.size == 0:
        return None
    float_dtype(fn, **arrays)
    if len(arrays) > 1:
        same_shape(fn, **arrays)
    xp = get_array_module(first)
    return [xp.ascontiguousarray(a).reshape(-1, first.shape[-1]) for a in arrays.values()]


@register("softmax_forward", "numba")
def softmax_forward_numba(x, axis=-1, scale=1.0):
    rows = _rows("softmax_forward", axis, x=x)
    if rows is None:
        return softmax_forward_reference(x, axis, scale)  # the kernel handles rows only
    (rows,) = rows
    y = np.empty(rows.shape, x.dtype)
    _softmax_forward_cpu(rows, x.dtype.type(scale), y)
    return y.reshape(x.shape)


@register("softmax_backward", "numba")
def softmax_backward_numba(gy, y, axis=-1, scale=1.0):
    rows = _rows("softmax_backward", axis, y=y, gy=gy)
    if rows is None:
        return softmax_backward_reference(gy, y, axis, scale)
    y_rows, gy_rows = rows
    gx = np.empty(y_rows.shape, y.dtype)
    _softmax_backward_cpu(gy_rows, y_rows, float(scale), gx)
    return gx.reshape(y.shape)


# -- native (kernels/attention.cpp) -----------------------------------------------------------

# The rows run on one thread below this many elements: waking a sleeping OpenMP thread
# (OMP_WAIT_POLICY=PASSIVE, see minidiff/runtime.py) costs more than it saves on small inputs.
# The forward, with its exponentials, pays off sooner than the backward, a pass over memory.
PARALLEL_MIN_FORWARD = 1 << 17


@register("softmax_forward", "native")
def softmax_forward_native(x, axis=-1, scale=1.0):
    rows = _rows("softmax_forward", axis, x=x)
    if rows is None:
        return softmax_forward_reference(x, axis, scale)
    return native.softmax_forward(rows[0], float(scale), x.size >= PARALLEL_MIN_FORWARD).reshape(x.shape)


@register("softmax_backward", "native")
def softmax_backward_native(gy, y, axis=-1, scale=1.0):
    rows = _rows("softmax_backward", axis, y=y, gy=gy)
    if rows is None:
        return softmax_backward_reference(gy, y, axis, scale)
    y_rows, gy_rows = rows
    gx = native.softmax_backward(gy_rows, y_rows, float(scale), y.size >= _cpu.PARALLEL_MIN)
    return gx.reshape(y.shape)


# -- Numba CUDA ------------------------------------------------------------------------------


@cuda.jit(cache=True)
def _softmax_forward_cuda(x, scale, y):
    # one block per row; its threads stride over the row
    r, L = cuda.blockIdx.x, x.shape[1]
    buf = cuda.shared.array(BUFFER, np.float64)
    top = -math.inf
    for k in range(cuda.threadIdx.x, L, cuda.blockDim.x):
        top = max(top, scale * np.float64(x[r, k]))  # max of scale*x: scale may be negative
    top = block_max(buf, top)
    total = 0.0
    for k in range(cuda.threadIdx.x, L, cuda.blockDim.x):
        total += math.exp(scale * np.float64(x[r, k]) - top)
    inv = 1.0 / block_sum(buf, total)
    for k in range(cuda.threadIdx.x, L, cuda.blockDim.x):
        y[r, k] = math.exp(scale * np.float64(x[r, k]) - top) * inv


@cuda.jit(cache=True)
def _softmax_backward_cuda(gy, y, scale, gx):
    # one block per row; its threads stride over the row
    r, L = cuda.blockIdx.x, y.shape[1]
    buf = cuda.shared.array(BUFFER, np.float64)
    dot = 0.0
    for k in range(cuda.threadIdx.x, L, cuda.blockDim.x):
        dot += np.float64(gy[r, k]) * np.float64(y[r, k])
    dot = block_sum(buf, dot)
    for k in range(cuda.threadIdx.x, L, cuda.blockDim.x):
        gx[r, k] = scale * np.float64(y[r, k]) * (np.float64(gy[r, k]) - dot)


@register("softmax_forward", "cuda")
def softmax_forward_cuda(x, axis=-1, scale=1.0):
    rows = _rows("softmax_forward", axis, x=x)
    if rows is None:
        return softmax_forward_reference(x, axis, scale)  # the kernel handles rows only
    (rows,) = rows
    y = get_array_module(x).empty(rows.shape, x.dtype)
    _cuda.launch_per_block(_softmax_forward_cuda, rows.shape[0], rows.shape[1], rows, np.float64(scale), y)
    return y.reshape(x.shape)


@register("softmax_backward", "cuda")
def softmax_backward_cuda(gy, y, axis=-1, scale=1.0):
    rows = _rows("softmax_backward", axis, y=y, gy=gy)
    if rows is None:
        return softmax_backward_reference(gy, y, axis, scale)
    y_rows, gy_rows = rows
    gx = get_array_module(y).empty(y_rows.shape, y.dtype)
    _cuda.launch_per_block(
        _softmax_backward_cuda, y_rows.shape[0], y_rows.shape[1], gy_rows, y_rows, np.float64(scale), gx
    )
    return gx.reshape(y.shape)
