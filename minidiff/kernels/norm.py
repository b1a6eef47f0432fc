"""Group normalization, forward and backward.

x has shape ``(N, C, *spatial)`` (any number of spatial dims, zero included). The C channels
are split into ``groups`` consecutive groups; each (sample, group) is normalized over its
``M = C/groups * prod(spatial)`` elements with the biased variance:

    xhat = (x - mean) * rstd,   rstd = 1 / sqrt(var + eps),   y = xhat * weight[c] + bias[c]

``mean`` and ``rstd`` (shape ``(N, groups)``, x's dtype) are returned for the backward:

    gbias[c]   = sum over n, spatial of gy
    gweight[c] = sum over n, spatial of gy * xhat
    gx         = rstd * (d - mean_group(d) - xhat * mean_group(d * xhat)),   d = gy * weight[c]

weight and bias are both given or both None (then y = xhat and gweight, gbias are None).

Implementations side by side: the reference (``xp`` code, NumPy or CuPy), Numba CPU, the C++
extension and Numba CUDA for CuPy arrays. The Numba versions (CPU and CUDA) accumulate the
statistics and the backward sums in float64 and round the results to x's dtype.
The CUDA kernels give each (sample, group) a block whose threads stride over the group and add
their partial sums in a tree in shared memory; the per-channel gradient sums come from a second
kernel with a block per channel, so no sum depends on the order in which blocks finish.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from minidiff.backend import get_array_module

from . import _cuda
from ._checks import float_dtype, same_shape
from ._cuda import BUFFER, block_sum, block_sum2
from .machine import cuda, native, njit, prange
from .registry import register


def _check_x(fn, x, groups):
    """Validate x and groups; return ``(N, C, S, M)``: S spatial elements, M = C/groups * S."""
    if x.ndim < 2:
        raise ValueError(f"{fn}: x must have shape (N, C, *spatial), got {x.shape}")
    N, C = x.shape[:2]
    groups = operator.index(groups)
    if groups < 1 or C % groups:
        raise ValueError(f"{fn}: groups={groups} must divide the C={C} channels of x with shape {x.shape}")
    S = math.prod(x.shape[2:])
    if C == 0 or S == 0:
        raise ValueError(f"{fn}: x with shape {x.shape} has empty groups")
    return N, C, S, C // groups * S


def _check_channel_vector(fn, name, v, C):
    if v is not None and v.shape != (C,):
        raise ValueError(f"{fn}: {name} must have shape ({C},), got {v.shape}")


def _check_forward(fn, x, weight, bias, groups):
    float_dtype(fn, x=x, weight=weight, bias=bias)
    N, C, S, M = _check_x(fn, x, groups)
    if (weight is None) != (bias is None):
        raise ValueError(f"{fn}: pass both weight and bias, or neither")
    _check_channel_vector(fn, "weight", weight, C)
    _check_channel_vector(fn, "bias", bias, C)
    return N, C, S, M


def _check_backward(fn, gy, x, weight, mean, rstd, groups):
    float_dtype(fn, gy=gy, x=x, weight=weight, mean=mean, rstd=rstd)
    N, C, S, M = _check_x(fn, x, groups)
    same_shape(fn, gy=gy, x=x)
    _check_channel_vector(fn, "weight", weight, C)
    if mean.shape != (N, groups) or rstd.shape != (N, groups):
        raise ValueError(
            f"{fn}: mean and rstd must have shape {(N, groups)}, got {mean.shape} and {rstd.shape}"
        )
    return N, C, S, M


def _channel_shape(x):
    """Shape that broadcasts a (C,) vector over x: (1, C, 1, ..., 1)."""
    return (1, x.shape[1]) + (1,) * (x.ndim - 2)


# -- reference -------------------------------------------------------------------------------


@register("group_norm_forward", "reference")
def group_norm_forward_reference(x, weight, bias, groups, eps):
    """``(y, mean, rstd)``: group norm of x ``(N, C, *spatial)``; see the module doc."""
    N, C, S, M = _check_forward("group_norm_forward", x, weight, bias, groups)
    xp = get_array_module(x)
    xg = x.reshape(N, groups, M)
    mean = xg.mean(axis=2)
    xc = xg - mean[:, :, None]
    # The mean rounded to x's dtype is off by up to half an ulp of |mean|, much against the
    # deviations when |mean| >> std; their own mean measures that error, and removing it keeps
    # xhat accurate to x's precision (as the float64 statistics of the other kernels do).
    xc -= xc.mean(axis=2, keepdims=True)
    var = (xc * xc).mean(axis=2)  # two passes: no cancellation when |mean| >> std
    rstd = 1 / xp.sqrt(var + eps)
    y = (xc * rstd[:, :, None]).reshape(x.shape)
    if weight is not None:
        y = y * weight.reshape(_channel_shape(x)) + bias.reshape(_channel_shape(x))
    return y, mean, rstd


@register("group_norm_backward", "reference")
def group_norm_backward_reference(gy, x, weight, mean, rstd, groups):
    """``(gx, gweight, gbias)`` for the forward above (gweight, gbias None without weight)."""
    N, C, S, M = _check_backward("group_norm_backward", gy, x, weight, mean, rstd, groups)
    xhat = (x.reshape(N, groups, M) - mean[:, :, None]) * rstd[:, :, None]
    if weight is None:
        gweight = gbias = None
        d = gy.reshape(N, groups, M)
    else:
        axes = (0, *range(2, x.ndim))
        gbias = gy.sum(axis=axes)
        gweight = (gy * xhat.reshape(x.shape)).sum(axis=axes)
        d = (gy * weight.reshape(_channel_shape(x))).reshape(N, groups, M)
    gx = rstd[:, :, None] * (
        d - d.mean(axis=2, keepdims=True) - xhat * (d * xhat).mean(axis=2, keepdims=True)
    )
    return gx.reshape(x.shape), gweight, gbias


# -- Numba CPU: one task per (n, group), statistics accumulated in float64 -------------------


@njit(parallel=True, cache=True)
def _group_norm_forward_cpu(x, weight, bias, groups, eps, y, mean, rstd):
    # x, y: (N, C, S) contiguous; weight, bias: (C,); mean, rstd: (N, groups)
    N, C, S = x.shape
    cpg = C // groups
    m = cpg * S
    for ng in prange(N * groups):
        n, g = ng // groups, ng % groups
        total = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            for s in range(S):
                total += x[n, c, s]
        mu = total / m
        sq = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            for s in range(S):
                dev = x[n, c, s] - mu
                sq += dev * dev
        r = 1.0 / np.sqrt(sq / m + eps)
        mean[n, g] = mu
        rstd[n, g] = r
        for c in range(g * cpg, (g + 1) * cpg):
            a = r * np.float64(weight[c])
            for s in range(S):
                y[n, c, s] = (x[n, c, s] - mu) * a + bias[c]


@njit(parallel=True, cache=True)
def _group_norm_backward_cpu(gy, x, weight, mean, rstd, groups, gx, gw_part, gb_part):
    # gy, x, gx: (N, C, S); gw_part, gb_part: (N, C) float64 per-sample partial sums, reduced
    # over N by the caller (tasks of different n share channels, so they cannot add in place).
    N, C, S = x.shape
    cpg = C // groups
    m = cpg * S
    for ng in prange(N * groups):
        n, g = ng // groups, ng % groups
        mu = np.float64(mean[n, g])  # np.float64, not float(): under Numba float() keeps float32
        r = np.float64(rstd[n, g])
        sum_d = 0.0
        sum_dxhat = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            w = np.float64(weight[c])
            gw = 0.0
            gb = 0.0
            for s in range(S):
                xhat = (x[n, c, s] - mu) * r
                gys = np.float64(gy[n, c, s])
                gw += gys * xhat
                gb += gys
            gw_part[n, c] = gw
            gb_part[n, c] = gb
            sum_d += gb * w
            sum_dxhat += gw * w
        mean_d = sum_d / m
        mean_dxhat = sum_dxhat / m
        for c in range(g * cpg, (g + 1) * cpg):
            w = np.float64(weight[c])
            for s in range(S):
                xhat = (x[n, c, s] - mu) * r
                gx[n, c, s] = r * (gy[n, c, s] * w - mean_d - xhat * mean_dxhat)


def _forward_arrays(fn, x, weight, bias, shift, groups, xp=np):
    """Check a forward's arguments and lay out what the Numba kernels (CPU and CUDA) take:
    ``(x3, w, b, sh, y, mean, rstd)``. The kernels always scale, shift and add: without weight
    by 1 and 0, without shift a zero shift; y, mean and rstd are the outputs to fill."""
    N, C, S, M = _check_forward(fn, x, weight, bias, groups)
    _check_shift(fn, shift, N, C)
    x3 = xp.ascontiguousarray(x).reshape(N, C, S)
    w = xp.ones(C, x.dtype) if weight is None else xp.ascontiguousarray(weight)
    b = xp.zeros(C, x.dtype) if bias is None else xp.ascontiguousarray(bias)
    sh = xp.zeros((N, C), x.dtype) if shift is None else xp.ascontiguousarray(shift)
    stats = (xp.empty((N, groups), x.dtype), xp.empty((N, groups), x.dtype))
    return x3, w, b, sh, xp.empty(x3.shape, x.dtype), *stats


def _backward_arrays(fn, gy, x, weight, bias, shift, mean, rstd, groups, xp=np):
    """The backward's counterpart of ``_forward_arrays``: ``(gy3, x3, w, b, sh, mean, rstd, gx)``
    (b is used with SiLU only; gx is the output to fill)."""
    N, C, S, M = _check_backward(fn, gy, x, weight, mean, rstd, groups)
    _check_shift(fn, shift, N, C)
    gy3 = xp.ascontiguousarray(gy).reshape(N, C, S)
    x3 = xp.ascontiguousarray(x).reshape(N, C, S)
    w = xp.ones(C, x.dtype) if weight is None else xp.ascontiguousarray(weight)
    b = xp.zeros(C, x.dtype) if bias is None else xp.ascontiguousarray(bias)
    sh = xp.zeros((N, C), x.dtype) if shift is None else xp.ascontiguousarray(shift)
    stats = (xp.ascontiguousarray(mean), xp.ascontiguousarray(rstd))
    return gy3, x3, w, b, sh, *stats, xp.empty(x3.shape, x.dtype)


def _channel_gradients(weight, gw_part, gb_part, dtype):
    """gweight, gbias from the Numba CPU kernels' per-sample partial sums (None without weight)."""
    if weight is None:
        return None, None
    return gw_part.sum(axis=0).astype(dtype), gb_part.sum(axis=0).astype(dtype)


@register("group_norm_forward", "numba")
def group_norm_forward_numba(x, weight, bias, groups, eps):
    x3, w, b, _, y, mean, rstd = _forward_arrays("group_norm_forward", x, weight, bias, None, groups)
    _group_norm_forward_cpu(x3, w, b, groups, float(eps), y, mean, rstd)
    return y.reshape(x.shape), mean, rstd


@register("group_norm_backward", "numba")
def group_norm_backward_numba(gy, x, weight, mean, rstd, groups):
    fn = "group_norm_backward"
    gy3, x3, w, _, _, mean, rstd, gx = _backward_arrays(fn, gy, x, weight, None, None, mean, rstd, groups)
    # per-sample partial sums, reduced over N here (tasks of different n share channels)
    gw_part, gb_part = np.empty(x3.shape[:2], np.float64), np.empty(x3.shape[:2], np.float64)
    _group_norm_backward_cpu(gy3, x3, w, mean, rstd, groups, gx, gw_part, gb_part)
    return (gx.reshape(x.shape), *_channel_gradients(weight, gw_part, gb_part, x.dtype))


# -- native (kernels/norm.cpp) ---------------------------------------------------------------


def _contiguous_or_none(a):
    """An optional argument of the native kernels: C-contiguous, or None (they take None as
    "no weight" or "no shift" and skip the work that goes with it)."""
    return None if a is None else np.ascontiguousarray(a)


@register("group_norm_forward", "native")
def group_norm_forward_native(x, weight, bias, groups, eps):
    N, C, S, M = _check_forward("group_norm_forward", x, weight, bias, groups)
    x3 = np.ascontiguousarray(x).reshape(N, C, S)
    w, b = _contiguous_or_none(weight), _contiguous_or_none(bias)
    y, mean, rstd = native.group_norm_forward(x3, w, b, groups, float(eps))
    return y.reshape(x.shape), mean, rstd


@register("group_norm_backward", "native")
def group_norm_backward_native(gy, x, weight, mean, rstd, groups):
    N, C, S, M = _check_backward("group_norm_backward", gy, x, weight, mean, rstd, groups)
    x3 = np.ascontiguousarray(x).reshape(N, C, S)
    gy3 = np.ascontiguousarray(gy).reshape(N, C, S)
    gx, gweight, gbias = native.group_norm_backward(
        gy3, x3, _contiguous_or_none(weight), np.ascontiguousarray(mean), np.ascontiguousarray(rstd), groups
    )
    return gx.reshape(x.shape), gweight, gbias


# -- group norm + SiLU, with an optional per-(sample, channel) shift of the input ---------------
#
#     z = x + shift[n, c]        (shift: (N, C), e.g. a time-embedding projection; or None)
#     u = group_norm(z) * weight + bias,   y = silu(u) = u * sigmoid(u)
#
# One pass over the data instead of three (add, normalize, activate), and the backward rebuilds
# u from x and the saved statistics rather than keeping z and u alive.


def _shifted(x, shift):
    """x + shift broadcast over the spatial dims (x itself when shift is None)."""
    if shift is None:
        return x
    return x + shift.reshape(shift.shape + (1,) * (x.ndim - 2))


def _check_shift(fn, shift, N, C):
    if shift is not None and shift.shape != (N, C):
        raise ValueError(f"{fn}: shift must have shape {(N, C)}, got {shift.shape}")


def _sigmoid(u):
    """1 / (1 + e^-u) through e^-|u| <= 1: no overflow (nor its warning) for very negative u,
    and full relative precision where the sigmoid is tiny."""
    xp = get_array_module(u)
    e = xp.exp(-xp.abs(u))
    return xp.where(u >= 0, 1 / (1 + e), e / (1 + e))


@register("group_norm_silu_forward", "reference")
def group_norm_silu_forward_reference(x, weight, bias, shift, groups, eps):
    """``(y, mean, rstd)`` with y = silu(group_norm(x + shift)); see the comment above."""
    N, C, _, _ = _check_forward("group_norm_silu_forward", x, weight, bias, groups)
    _check_shift("group_norm_silu_forward", shift, N, C)
    u, mean, rstd = group_norm_forward_reference(_shifted(x, shift), weight, bias, groups, eps)
    return u * _sigmoid(u), mean, rstd


@register("group_norm_silu_backward", "reference")
def group_norm_silu_backward_reference(gy, x, weight, bias, shift, mean, rstd, groups):
    """``(gx, gweight, gbias, gshift)``; gshift is None without shift."""
    N, C, S, M = _check_backward("group_norm_silu_backward", gy, x, weight, mean, rstd, groups)
    _check_shift("group_norm_silu_backward", shift, N, C)
    z = _shifted(x, shift)
    u = ((z.reshape(N, groups, M) - mean[:, :, None]) * rstd[:, :, None]).reshape(x.shape)
    if weight is not None:
        u = u * weight.reshape(_channel_shape(x)) + bias.reshape(_channel_shape(x))
    s = _sigmoid(u)
    gu = gy * s * (1 + u * (1 - s))  # d silu(u) / du
    gx, gweight, gbias = group_norm_backward_reference(gu, z, weight, mean, rstd, groups)
    gshift = None if shift is None else gx.reshape(N, C, S).sum(axis=2)
    return gx, gweight, gbias, gshift


@njit(parallel=True, cache=True)
def _group_norm_silu_forward_cpu(x, weight, bias, shift, groups, eps, y, mean, rstd):
    # x, y: (N, C, S); weight, bias: (C,); shift: (N, C) (zeros when there is none)
    N, C, S = x.shape
    cpg = C // groups
    m = cpg * S
    for ng in prange(N * groups):
        n, g = ng // groups, ng % groups
        total = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            sh = np.float64(shift[n, c])
            for s in range(S):
                total += x[n, c, s] + sh
        mu = total / m
        sq = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            sh = np.float64(shift[n, c])
            for s in range(S):
                dev = x[n, c, s] + sh - mu
                sq += dev * dev
        r = 1.0 / np.sqrt(sq / m + eps)
        mean[n, g] = mu
        rstd[n, g] = r
        for c in range(g * cpg, (g + 1) * cpg):
            a = r * np.float64(weight[c])
            b = np.float64(bias[c]) + (np.float64(shift[n, c]) - mu) * a  # u = x * a + b
            for s in range(S):
                u = x[n, c, s] * a + b
                y[n, c, s] = u / (1.0 + np.exp(-u))


@njit(parallel=True, cache=True)
def _group_norm_silu_backward_cpu(
    gy, x, weight, bias, shift, mean, rstd, groups, gx, gw_part, gb_part, gshift
):
    # First pass: gu = d loss / d u into gx, and the per-channel sums; second pass: gx from gu.
    N, C, S = x.shape
    cpg = C // groups
    m = cpg * S
    for ng in prange(N * groups):
        n, g = ng // groups, ng % groups
        mu = np.float64(mean[n, g])
        r = np.float64(rstd[n, g])
        sum_d = 0.0
        sum_dxhat = 0.0
        for c in range(g * cpg, (g + 1) * cpg):
            w = np.float64(weight[c])
            b = np.float64(bias[c])
            sh = np.float64(shift[n, c])
            gw = 0.0
            gb = 0.0
            for s in range(S):
                xhat = (x[n, c, s] + sh - mu) * r
                u = xhat * w + b
                sig = 1.0 / (1.0 + np.exp(-u))
                gx[n, c, s] = gy[n, c, s] * sig * (1.0 + u * (1.0 - sig))
                # the sums take gu as stored (rounded to x's dtype), as the second pass reads it:
                # a group of one value then gets exactly the reference's zero gradient
                gu = np.float64(gx[n, c, s])
                gw += gu * xhat
                gb += gu
            gw_part[n, c] = gw
            gb_part[n, c] = gb
            sum_d += gb * w
            sum_dxhat += gw * w
        mean_d = sum_d / m
        mean_dxhat = sum_dxhat / m
        for c in range(g * cpg, (g + 1) * cpg):
            w = np.float64(weight[c])
            sh = np.float64(shift[n, c])
            total = 0.0
            for s in range(S):
                xhat = (x[n, c, s] + sh - mu) * r
                v = r * (gx[n, c, s] * w - mean_d - xhat * mean_dxhat)
                gx[n, c, s] = v
                total += v
            gshift[n, c] = total


@register("group_norm_silu_forward", "numba")
def group_norm_silu_forward_numba(x, weight, bias, shift, groups, eps):
    x3, w, b, sh, y, mean, rstd = _forward_arrays("group_norm_silu_forward", x, weight, bias, shift, groups)
    _group_norm_silu_forward_cpu(x3, w, b, sh, groups, float(eps), y, mean, rstd)
    return y.reshape(x.shape), mean, rstd


@register("group_norm_silu_backward", "numba")
def group_norm_silu_backward_numba(gy, x, weight, bias, shift, mean, rstd, groups):
    fn = "group_norm_silu_backward"
    gy3, x3, w, b, sh, mean, rstd, gx = _backward_arrays(fn, gy, x, weight, bias, shift, mean, rstd, groups)
    gw_part, gb_part = np.empty(x3.shape[:2], np.float64), np.empty(x3.shape[:2], np.float64)
    gshift = np.empty(x3.shape[:2], x.dtype)
    _group_norm_silu_backward_cpu(gy3, x3, w, b, sh, mean, rstd, groups, gx, gw_part, gb_part, gshift)
    gweight, gbias = _channel_gradients(weight, gw_part, gb_part, x.dtype)
    return gx.reshape(x.shape), gweight, gbias, (None if shift is None else gshift)


# native (kernels/norm.cpp): float32 data stays float32 in the elementwise part, with an exp
# written to vectorize; the statistics and the sums of the backward are float64 as above.


@register("group_norm_silu_forward", "native")
def group_norm_silu_forward_native(x, weight, bias, shift, groups, eps):
    N, C, S, M = _check_forward("group_norm_silu_forward", x, weight, bias, groups)
    _check_shift("group_norm_silu_forward", shift, N, C)
    x3 = np.ascontiguousarray(x).reshape(N, C, S)
    w, b, sh = _contiguous_or_none(weight), _contiguous_or_none(bias), _contiguous_or_none(shift)
    y, mean, rstd = native.group_norm_silu_forward(x3, w, b, sh, groups, float(eps))
    return y.reshape(x.shape), mean, rstd


@register("group_norm_silu_backward", "native")
def group_norm_silu_backward_native(gy, x, weight, bias, shift, mean, rstd, groups):
    N, C, S, M = _check_backward("group_norm_silu_backward", gy, x, weight, mean, rstd, groups)
    _check_shift("group_norm_silu_backward", shift, N, C)
    gx, gweight, gbias, gshift = native.group_norm_silu_backward(
        np.ascontiguousarray(gy).reshape(N, C, S),
        np.ascontiguousarray(x).reshape(N, C, S),
        _contiguous_or_none(weight),
        _contiguous_or_none(bias),
        _contiguous_or_none(shift),
        np.ascontiguousarray(mean),
        np.ascontiguousarray(rstd),
        groups,
    )
    return gx.reshape(x.shape), gweight, gbias, gshift


# -- Numba CUDA ------------------------------------------------------------------------------
#
# Both ops share the kernels: plain group norm runs them with a zero shift and silu=False (and,
# without weight, a weight of ones and a bias of zeros), as the Numba CPU kernels of the fused op
# do. Arrays arrive as (N, C, S); x + shift, xhat and u are formed in float64.


@cuda.jit(device=True)
def _upstream_gradient(gy, xhat, w, b, silu):
    """d loss / d u for u = xhat w + b: gy itself, or through y = silu(u) when ``silu``."""
    if silu:
        u = xhat * w + b
        sig = 1.0 / (1.0 + math.exp(-u))
        return gy * sig * (1.0 + u * (1.0 - sig))
    return gy


@cuda.jit(cache=True)
def _group_norm_forward_cuda(x, weight, bias, shift, groups, eps, silu, y, mean, rstd):
    # one block per (n, group); its threads stride over the group's C/groups * S elements
    C, S = x.shape[1], x.shape[2]
    cpg = C // groups
    m = cpg * S
    n, g = cuda.blockIdx.x // groups, cuda.blockIdx.x % groups
    first = g * cpg
    buf = cuda.shared.array(BUFFER, np.float64)
    total = 0.0
    for k in range(cuda.threadIdx.x, m, cuda.blockDim.x):
        c, s = first + k // S, k % S
        total += np.float64(x[n, c, s]) + np.float64(shift[n, c])
    mu = block_sum(buf, total) / m
    sq = 0.0
    for k in range(cuda.threadIdx.x, m, cuda.blockDim.x):
        c, s = first + k // S, k % S
        dev = np.float64(x[n, c, s]) + np.float64(shift[n, c]) - mu
        sq += dev * dev
    r = 1.0 / math.sqrt(block_sum(buf, sq) / m + eps)
    if cuda.threadIdx.x == 0:
        mean[n, g] = mu
        rstd[n, g] = r
    for k in range(cuda.threadIdx.x, m, cuda.blockDim.x):
        c, s = first + k // S, k % S
        a = r * np.float64(weight[c])
        u = (np.float64(x[n, c, s]) + np.float64(shift[n, c]) - mu) * a + np.float64(bias[c])
        y[n, c, s] = u / (1.0 + math.exp(-u)) if silu else u


@cuda.jit(cache=True)
def _group_norm_backward_cuda(gy, x, weight, bias, shift, mean, rstd, groups, silu, gx):
    # one block per (n, group); its threads stride over the group's C/groups * S elements
    C, S = x.shape[1], x.shape[2]
    cpg = C // groups
    m = cpg * S
    n, g = cuda.blockIdx.x // groups, cuda.blockIdx.x % groups
    first = g * cpg
    mu, r = np.float64(mean[n, g]), np.float64(rstd[n, g])
    buf_a = cuda.shared.array(BUFFER, np.float64)
    buf_b = cuda.shared.array(BUFFER, np.float64)
    sum_d = 0.0
    sum_dxhat = 0.0
    for k in range(cuda.threadIdx.x, m, cuda.blockDim.x):
        c, s = first + k // S, k % S
        w = np.float64(weight[c])
        xhat = (np.float64(x[n, c, s]) + np.float64(shift[n, c]) - mu) * r
        d = _upstream_gradient(np.float64(gy[n, c, s]), xhat, w, np.float64(bias[c]), silu) * w
        sum_d += d
        sum_dxhat += d * xhat
    sum_d, sum_dxhat = block_sum2(buf_a, buf_b, sum_d, sum_dxhat)
    mean_d, mean_dxhat = sum_d / m, sum_dxhat / m
    for k in range(cuda.threadIdx.x, m, cuda.blockDim.x):
        c, s = first + k // S, k % S
        w = np.float64(weight[c])
        xhat = (np.float64(x[n, c, s]) + np.float64(shift[n, c]) - mu) * r
        d = _upstream_gradient(np.float64(gy[n, c, s]), xhat, w, np.float64(bias[c]), silu) * w
        gx[n, c, s] = r * (d - mean_d - xhat * mean_dxhat)


@cuda.jit(cache=True)
def _group_norm_channel_sums_cuda(
    gy, x, weight, bias, shift, mean, rstd, groups, silu, gx, with_shift, gweight, gbias, gshift
):
    # one block per channel c; its threads stride over the spatial positions of each sample in turn
    N, C, S = x.shape[0], x.shape[1], x.shape[2]
    c = cuda.blockIdx.x
    g = c // (C // groups)
    w, b = np.float64(weight[c]), np.float64(bias[c])
    buf_a = cuda.shared.array(BUFFER, np.float64)
    buf_b = cuda.shared.array(BUFFER, np.float64)
    gw = 0.0
    gb = 0.0
    for n in range(N):
        mu, r = np.float64(mean[n, g]), np.float64(rstd[n, g])
        sh = np.float64(shift[n, c])
        part = 0.0
        for s in range(cuda.threadIdx.x, S, cuda.blockDim.x):
            xhat = (np.float64(x[n, c, s]) + sh - mu) * r
            gu = _upstream_gradient(np.float64(gy[n, c, s]), xhat, w, b, silu)
            gw += gu * xhat
            gb += gu
            part += np.float64(gx[n, c, s])
        if with_shift:  # gshift[n, c]: the sum of gx over the spatial positions
            total = block_sum(buf_a, part)
            if cuda.threadIdx.x == 0:
                gshift[n, c] = total
    gw, gb = block_sum2(buf_a, buf_b, gw, gb)
    if cuda.threadIdx.x == 0:
        gweight[c] = gw
        gbias[c] = gb


def _group_norm_forward_on_device(fn, x, weight, bias, shift, groups, eps, silu):
    xp = get_array_module(x)
    x3, w, b, sh, y, mean, rstd = _forward_arrays(fn, x, weight, bias, shift, groups, xp)
    N, C, S = x3.shape
    args = (x3, w, b, sh, groups, np.float64(eps), silu, y, mean, rstd)
    _cuda.launch_per_block(_group_norm_forward_cuda, N * groups, C // groups * S, *args)
    return y.reshape(x.shape), mean, rstd


def _group_norm_backward_on_device(fn, gy, x, weight, bias, shift, mean, rstd, groups, silu):
    """``(gx, gweight, gbias, gshift)``; gweight and gbias None without weight, gshift None
    without shift."""
    xp = get_array_module(x)
    *inputs, gx = _backward_arrays(fn, gy, x, weight, bias, shift, mean, rstd, groups, xp)
    N, C, S = gx.shape
    args = (*inputs, groups, silu, gx)  # the kernels' order: gy, x, w, b, sh, mean, rstd, ...
    _cuda.launch_per_block(_group_norm_backward_cuda, N * groups, C // groups * S, *args)
    if weight is None and shift is None:
        return gx.reshape(x.shape), None, None, None
    gweight, gbias, gshift = xp.empty(C, x.dtype), xp.empty(C, x.dtype), xp.empty((N, C), x.dtype)
    _cuda.launch_per_block(
        _group_norm_channel_sums_cuda, C, S, *args, shift is not None, gweight, gbias, gshift
    )
    if weight is None:
        gweight = gbias = None
    return gx.reshape(x.shape), gweight, gbias, (None if shift is None else gshift)


@register("group_norm_forward", "cuda")
def group_norm_forward_cuda(x, weight, bias, groups, eps):
    return _group_norm_forward_on_device("group_norm_forward", x, weight, bias, None, groups, eps, False)


@register("group_norm_backward", "cuda")
def group_norm_backward_cuda(gy, x, weight, mean, rstd, groups):
    fn = "group_norm_backward"
    return _group_norm_backward_on_device(fn, gy, x, weight, None, None, mean, rstd, groups, False)[:3]


@register("group_norm_silu_forward", "cuda")
def group_norm_silu_forward_cuda(x, weight, bias, shift, groups, eps):
    return _group_norm_forward_on_device("group_norm_silu_forward", x, weight, bias, shift, groups, eps, True)


@register("group_norm_silu_backward", "cuda")
def group_norm_silu_backward_cuda(gy, x, weight, bias, shift, mean, rstd, groups):
    fn = "group_norm_silu_backward"
    return _group_norm_backward_on_device(fn, gy, x, weight, bias, shift, mean, rstd, groups, True)


# -- layer norm: each row of a (rows, D) array normalized over its D entries ---------------------
#
#     xhat = (x - mean) * rstd,   y = xhat * weight + bias                  (weight, bias: (D,))
#     gx   = rstd * (d - mean(d) - xhat * mean(d * xhat)),   d = gy * weight   (means along the row)
#     gweight = sum over rows of gy * xhat,   gbias = sum over rows of gy
#
# The forward returns ``(y, xhat, rstd)``: the backward reads xhat (rows, D) and rstd (rows,).
# Reference and Numba CPU (float64 row statistics and sums, results rounded to x's dtype); the
# op flattens the normalized trailing axes into D.


def _check_layer_norm(fn, x, weight, bias):
    float_dtype(fn, x=x, weight=weight, bias=bias)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ValueError(f"{fn}: x must be (rows, D) with D >= 1, got {x.shape}")
    for name, v in (("weight", weight), ("bias", bias)):
        _check_channel_vector(fn, name, v, x.shape[1])


@register("layer_norm_forward", "reference")
def layer_norm_forward_reference(x, weight, bias, eps):
    _check_layer_norm("layer_norm_forward", x, weight, bias)
    xp = get_array_module(x)
    centered = x - x.mean(axis=1, keepdims=True)
    # The mean rounded to x's dtype is off by up to half an ulp of |mean|, which is large against
    # the deviations when |mean| >> std; the mean of the centered values measures that error.
    centered -= centered.mean(axis=1, keepdims=True)
    rstd = 1 / xp.sqrt((centered * centered).mean(axis=1, keepdims=True) + eps)
    xhat = centered * rstd
    y = xhat if weight is None else xhat * weight
    return (y if bias is None else y + bias), xhat, rstd[:, 0]


@register("layer_norm_backward", "reference")
def layer_norm_backward_reference(gy, xhat, rstd, weight, has_bias):
    """(gx, gweight, gbias); gweight None without weight, gbias None unless ``has_bias``."""
    _check_layer_norm("layer_norm_backward", xhat, weight, None)
    same_shape("layer_norm_backward", gy=gy, xhat=xhat)
    d = gy if weight is None else gy * weight
    gx = rstd[:, None] * (d - d.mean(axis=1, keepdims=True) - xhat * (d * xhat).mean(axis=1, keepdims=True))
    gw = (gy * xhat).sum(axis=0) if weight is not None else None
    return gx, gw, (gy.sum(axis=0) if has_bias else None)


# rows per task of the Numba kernels: each task adds its rows' gweight and gbias into its own
# float64 partial sums, which are then added in task order (the same sums at every run)
LAYER_NORM_ROWS = 64


@njit(parallel=True, cache=True)
def _layer_norm_forward_cpu(x, weight, bias, eps, y, xhat, rstd):
    R, D = x.shape
    for r in prange(R):
        mean = 0.0
        for c in range(D):
            mean += x[r, c]
        mean /= D
        var = 0.0
        for c in range(D):
            dev = x[r, c] - mean
            var += dev * dev
        inv = 1.0 / math.sqrt(var / D + eps)
        rstd[r] = inv
        for c in range(D):
            xh = (x[r, c] - mean) * inv
            xhat[r, c] = xh
            y[r, c] = xh * weight[c] + bias[c]


@njit(parallel=True, cache=True)
def _layer_norm_backward_cpu(gy, xhat, rstd, weight, gx, gw_parts, gb_parts):
    R, D = xhat.shape
    tasks = gw_parts.shape[0]
    for t in prange(tasks):
        for r in range(t * LAYER_NORM_ROWS, min(R, (t + 1) * LAYER_NORM_ROWS)):
            sum_d, sum_dx = 0.0, 0.0
            for c in range(D):
                d = np.float64(gy[r, c]) * weight[c]
                sum_d += d
                sum_dx += d * xhat[r, c]
                gw_parts[t, c] += np.float64(gy[r, c]) * xhat[r, c]
                gb_parts[t, c] += gy[r, c]
            mean_d, mean_dx = sum_d / D, sum_dx / D
            for c in range(D):
                d = np.float64(gy[r, c]) * weight[c]
                gx[r, c] = rstd[r] * (d - mean_d - xhat[r, c] * mean_dx)


@register("layer_norm_forward", "numba")
def layer_norm_forward_numba(x, weight, bias, eps):
    _check_layer_norm("layer_norm_forward", x, weight, bias)
    R, D = x.shape
    one, zero = np.ones(D, x.dtype), np.zeros(D, x.dtype)
    y, xhat, rstd = np.empty((R, D), x.dtype), np.empty((R, D), x.dtype), np.empty(R, x.dtype)
    _layer_norm_forward_cpu(
        np.ascontiguousarray(x),
        one if weight is None else np.ascontiguousarray(weight),
        zero if bias is None else np.ascontiguousarray(bias),
        float(eps),
        y,
        xhat,
        rstd,
    )
    return y, xhat, rstd


@register("layer_norm_backward", "numba")
def layer_norm_backward_numba(gy, xhat, rstd, weight, has_bias):
    _check_layer_norm("layer_norm_backward", xhat, weight, None)
    same_shape("layer_norm_backward", gy=gy, xhat=xhat)
    R, D = xhat.shape
    tasks = -(-R // LAYER_NORM_ROWS)
    gw_parts, gb_parts = np.zeros((tasks, D)), np.zeros((tasks, D))
    gx = np.empty((R, D), xhat.dtype)
    w = np.ones(D, xhat.dtype) if weight is None else np.ascontiguousarray(weight)
    _layer_norm_backward_cpu(
        np.ascontiguousarray(gy),
        np.ascontiguousarray(xhat),
        np.ascontiguousarray(rstd),
        w,
        gx,
        gw_parts,
        gb_parts,
    )
    gw = gw_parts.sum(axis=0).astype(xhat.dtype) if weight is not None else None
    gb = gb_parts.sum(axis=0).astype(xhat.dtype) if has_bias else None
    return gx, gw, gb
