"""Loss kernels: the mean squared error (the diffusion training loss against the noise).

    mse_loss_forward    loss = sum((pred - target)^2) / size          (summed in float64)
    mse_loss_backward   gpred = (pred - target) * (2 gloss / size)

pred and target share dtype and shape; gloss is the loss's gradient, one value (an array of one
element on the host or the device, or a number). The loss is returned as a 0-d array of pred's
dtype; an empty pred gives NaN with a warning, as np.mean.

Rounding: the sum is done in float64, the fast versions over chunks of ``_cpu.CHUNK`` elements
(each in vector lanes, an order fixed for a build and a CPU) whose sums are added in order, so it
does not depend on the number of threads; it agrees with the reference to float64 rounding. The
gradient's scale ``2 gloss / size`` is rounded to the dtype and the difference times it computed
in the dtype, as the reference does. The CUDA versions sum in float64 per block (a tree in shared
memory, a fixed order) and the block sums are added by one block.

Four implementations side by side: the reference (``xp`` code, NumPy or CuPy), Numba CPU, the C++
extension (kernels/diffusion.cpp) and Numba CUDA for CuPy arrays (grid-stride loops).
"""

from __future__ import annotations

import warnings

import numpy as np

from minidiff.backend import get_array_module

from . import _cpu, _cuda
from ._checks import check_arrays, flat
from ._cuda import BUFFER, block_sum
from .machine import cuda, native
from .registry import register


def _gradient_scale(pred, target, gloss, shape):
    """The checks of mse_loss_backward, then ``2 gloss / size`` in float64 rounded to pred's
    dtype, an array of ``shape`` in pred's array module (a gloss on the device stays there, not
    copied to the host); None for an empty pred."""
    check_arrays("mse_loss_backward", ("pred", "target"), pred, target)
    if not pred.size:
        return None
    xp = get_array_module(pred)
    gloss = xp.asarray(gloss, dtype=xp.float64)
    if gloss.size != 1:
        raise ValueError(
            f"mse_loss_backward: gloss must hold one value (the loss gradient), got shape {gloss.shape}"
        )
    return (gloss.reshape(shape) * 2.0 / pred.size).astype(pred.dtype)


# -- reference -------------------------------------------------------------------------------


@register("mse_loss_forward", "reference")
def mse_loss_forward_reference(pred, target):
    """``mean((pred - target)^2)`` computed in float64, returned as a 0-d array of pred's dtype."""
    check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    xp = get_array_module(pred)
    diff = pred.astype(xp.float64, copy=False) - target.astype(xp.float64, copy=False)
    return xp.asarray((diff * diff).sum() / diff.size, dtype=pred.dtype)


@register("mse_loss_backward", "reference")
def mse_loss_backward_reference(pred, target, gloss):
    """Gradient wrt pred of the loss above: ``(pred - target) * (2 gloss / size)``, pred's dtype."""
    scale = _gradient_scale(pred, target, gloss, ())
    if scale is None:
        return get_array_module(pred).empty(pred.shape, pred.dtype)
    return (pred - target) * scale


# -- Numba CPU -------------------------------------------------------------------------------
#
# Span functions over elements lo..hi of the flat arrays, run by the drivers of _cpu.py.


def _squared_error_span(lo, hi, pred, target):
    """float64 sum of (pred - target)^2 over lo..hi. "reassoc" (and nothing else of fastmath:
    NaN and inf still propagate) lets LLVM split the sum into vector lanes."""
    pred, target = pred[lo:hi], target[lo:hi]
    total = 0.0
    for i in range(pred.size):
        d = np.float64(pred[i]) - np.float64(target[i])
        total += d * d
    return total


def _scaled_difference_span(lo, hi, pred, target, scale, out):
    pred, target, out = pred[lo:hi], target[lo:hi], out[lo:hi]
    sc = out.dtype.type(scale)
    for i in range(out.size):
        out[i] = (pred[i] - target[i]) * sc


_SQUARED_ERROR = _cpu.sum_drivers(_squared_error_span, fastmath={"reassoc"})
_SCALED_DIFFERENCE = _cpu.drivers(_scaled_difference_span)


def _mean_of_sum(total, size, dtype):
    """The loss as a 0-d array of ``dtype``: ``total / size`` (NaN with a warning when size is 0,
    as np.mean)."""
    if not size:
        warnings.warn("mean of an empty array", RuntimeWarning, stacklevel=3)
        return np.array(np.nan, dtype=dtype)
    return np.array(total / size, dtype=dtype)


@register("mse_loss_forward", "numba")
def mse_loss_forward_numba(pred, target):
    check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    total = _SQUARED_ERROR.pick(pred.size)(pred.size, flat(pred), flat(target))
    return _mean_of_sum(total, pred.size, pred.dtype)


def _backward_on_cpu(pred, target, gloss, scaled_difference):
    """mse_loss_backward through a CPU kernel ``scaled_difference(pred, target, scale)`` of flat
    arrays, scale ``2 gloss / size`` a Python float (gloss: a one-element array or a number)."""
    check_arrays("mse_loss_backward", ("pred", "target"), pred, target)
    if not pred.size:
        return np.empty(pred.shape, pred.dtype)
    if getattr(gloss, "size", 1) != 1:
        raise ValueError(
            f"mse_loss_backward: gloss must hold one value (the loss gradient), got shape {gloss.shape}"
        )
    scale = float(gloss.item() if hasattr(gloss, "item") else gloss) * 2.0 / pred.size
    return scaled_difference(flat(pred), flat(target), scale).reshape(pred.shape)


def _scaled_difference_numba(pred, target, scale):
    out = np.empty(pred.size, pred.dtype)
    _SCALED_DIFFERENCE.pick(pred.size)(pred.size, pred, target, scale, out)
    return out


@register("mse_loss_backward", "numba")
def mse_loss_backward_numba(pred, target, gloss):
    return _backward_on_cpu(pred, target, gloss, _scaled_difference_numba)


# -- native (kernels/diffusion.cpp) ----------------------------------------------------------


@register("mse_loss_forward", "native")
def mse_loss_forward_native(pred, target):
    check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    total = native.squared_error_sum(flat(pred), flat(target), pred.size >= _cpu.PARALLEL_MIN)
    return _mean_of_sum(total, pred.size, pred.dtype)


def _scaled_difference_native(pred, target, scale):
    return native.scaled_difference(pred, target, scale, pred.size >= _cpu.PARALLEL_MIN)


@register("mse_loss_backward", "native")
def mse_loss_backward_native(pred, target, gloss):
    return _backward_on_cpu(pred, target, gloss, _scaled_difference_native)


# -- Numba CUDA ------------------------------------------------------------------------------


@cuda.jit(cache=True)
def _squared_error_partials_cuda(pred, target, partial):
    # grid-stride loop over the elements, then one float64 partial sum per block
    total = 0.0
    for i in range(cuda.grid(1), pred.size, cuda.gridsize(1)):
        d = np.float64(pred[i]) - np.float64(target[i])
        total += d * d
    buf = cuda.shared.array(BUFFER, np.float64)
    total = block_sum(buf, total)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x] = total


@cuda.jit(cache=True)
def _mean_of_partials_cuda(partial, size, out):
    # a single block; its threads stride over the partial sums
    total = 0.0
    for k in range(cuda.threadIdx.x, partial.size, cuda.blockDim.x):
        total += partial[k]
    buf = cuda.shared.array(BUFFER, np.float64)
    total = block_sum(buf, total)
    if cuda.threadIdx.x == 0:
        out[0] = total / size


@cuda.jit(cache=True)
def _scaled_difference_cuda(pred, target, scale, out):
    # grid-stride loop over the elements; scale: one value of the dtype, in device memory
    sc = scale[0]
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = (pred[i] - target[i]) * sc


@register("mse_loss_forward", "cuda")
def mse_loss_forward_cuda(pred, target):
    check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    xp = get_array_module(pred)
    if not pred.size:
        return xp.asarray(_mean_of_sum(0.0, 0, pred.dtype))
    partial = xp.empty(_cuda.elementwise_blocks(pred.size), np.float64)
    _cuda.launch_elementwise(_squared_error_partials_cuda, pred.size, flat(pred), flat(target), partial)
    mean = xp.empty(1, np.float64)
    _cuda.launch_per_block(_mean_of_partials_cuda, 1, partial.size, partial, np.float64(pred.size), mean)
    return mean.astype(pred.dtype).reshape(())


@register("mse_loss_backward", "cuda")
def mse_loss_backward_cuda(pred, target, gloss):
    scale = _gradient_scale(pred, target, gloss, (1,))  # rounded as the reference rounds it
    out = get_array_module(pred).empty(pred.shape, pred.dtype)
    if scale is None:
        return out
    _cuda.launch_elementwise(_scaled_difference_cuda, out.size, flat(pred), flat(target), scale, out.ravel())
    return out
