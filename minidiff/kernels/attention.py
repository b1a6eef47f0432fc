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

Attention itself, ``out = softmax(scale * q k^T) v`` over (B, L, D) arrays, also runs without
the (B, Lq, Lk) score matrix: ``attention_forward`` walks the keys in tiles and keeps, per query
row, the running maximum m of its scaled scores, the running sum l of exp(score - m) and the
unnormalised output; a tile with a larger maximum rescales both first (the online softmax of
FlashAttention). It returns the output and the log-sum-exp m + log l of each row, from which
``attention_backward`` rebuilds the probabilities of any tile, exp(score - lse), to form the
gradients tile by tile as well:

    gv_j = sum_i p_ij go_i          dp_ij = go_i . v_j          ds_ij = p_ij (dp_ij - go_i . out_i)
    gq_i = scale sum_j ds_ij k_j    gk_j = scale sum_i ds_ij q_i

(go_i . out_i equals sum_j p_ij dp_ij, the softmax backward's row sum, from arrays at hand). The
reference holds one tile of scores for every query at once; the native forward
(kernels/flash_attention.cpp, float32) holds one block of queries by one tile of keys per thread;
the CUDA forward gives each thread one query row and stages tiles of keys and values in shared
memory.
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


# -- attention without the score matrix ------------------------------------------------------

KEY_TILE = 512  # keys per tile of the reference: it holds (B, Lq, KEY_TILE) scores at a time


def _check_attention(fn, q, k, v, **more):
    dtype = float_dtype(fn, q=q, k=k, v=v, **more)
    if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        raise ValueError(f"{fn}: q, k, v must be 3-D (B, L, D), got {q.shape}, {k.shape}, {v.shape}")
    b, _, d = q.shape
    lk = v.shape[1]
    if k.shape != (b, lk, d) or v.shape[0] != b or lk < 1:
        raise ValueError(
            f"{fn}: expected q (B, Lq, D), k (B, Lk, D), v (B, Lk, Dv) with Lk >= 1, got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    return dtype


@register("attention_forward", "reference")
def attention_forward_reference(q, k, v, scale):
    """(out, lse): ``out = softmax(scale * q k^T) v`` and each row's log-sum-exp of the scaled
    scores, for q (B, Lq, D), k (B, Lk, D), v (B, Lk, Dv), in tiles of KEY_TILE keys."""
    dtype = _check_attention("attention_forward", q, k, v)
    xp = get_array_module(q)
    b, lq, _ = q.shape
    top = xp.full((b, lq, 1), -np.inf, dtype)  # running max of the scaled scores
    total = xp.zeros((b, lq, 1), dtype)  # running sum of exp(score - top)
    acc = xp.zeros((b, lq, v.shape[2]), dtype)  # running sum of exp(score - top) v
    for j in range(0, k.shape[1], KEY_TILE):
        scores = (q @ k[:, j : j + KEY_TILE].transpose(0, 2, 1)) * dtype.type(scale)
        new_top = xp.maximum(top, scores.max(axis=2, keepdims=True))
        rescale = xp.exp(top - new_top)  # 0 on the first tile
        p = xp.exp(scores - new_top)
        total = total * rescale + p.sum(axis=2, keepdims=True)
        acc = acc * rescale + p @ v[:, j : j + KEY_TILE]
        top = new_top
    return acc / total, (top + xp.log(total))[..., 0]


@register("attention_backward", "reference")
def attention_backward_reference(gout, q, k, v, out, lse, scale):
    """(gq, gk, gv) of ``attention_forward`` from its output gradient gout (B, Lq, Dv), its
    inputs and its (out, lse), in tiles of KEY_TILE keys."""
    dtype = _check_attention("attention_backward", q, k, v, gout=gout, out=out, lse=lse)
    if gout.shape != out.shape or out.shape != q.shape[:2] + v.shape[2:] or lse.shape != q.shape[:2]:
        raise ValueError(
            f"attention_backward: gout and out must be (B, Lq, Dv) and lse (B, Lq) for q {q.shape}, "
            f"v {v.shape}; got gout {gout.shape}, out {out.shape}, lse {lse.shape}"
        )
    xp = get_array_module(q)
    scale = dtype.type(scale)
    row_dot = (gout * out).sum(axis=2, keepdims=True)  # go_i . out_i = sum_j p_ij dp_ij
    gq, gk, gv = xp.zeros_like(q), xp.empty_like(k), xp.empty_like(v)
    for j in range(0, k.shape[1], KEY_TILE):
        kj, vj = k[:, j : j + KEY_TILE], v[:, j : j + KEY_TILE]
        p = xp.exp((q @ kj.transpose(0, 2, 1)) * scale - lse[..., None])
        gv[:, j : j + KEY_TILE] = p.transpose(0, 2, 1) @ gout
        ds = p * (gout @ vj.transpose(0, 2, 1) - row_dot)
        gq += (ds @ kj) * scale
        gk[:, j : j + KEY_TILE] = (ds.transpose(0, 2, 1) @ q) * scale
    return gq, gk, gv


@register("attention_forward", "native")
def attention_forward_native(q, k, v, scale):
    dtype = _check_attention("attention_forward", q, k, v)
    if dtype != np.float32:
        return attention_forward_reference(q, k, v, scale)  # the native kernel is float32 only
    q, k, v = (np.ascontiguousarray(a) for a in (q, k, v))
    # each score costs D multiply-adds: count them, not the scores, against the threshold
    parallel = q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2] >= _cpu.PARALLEL_MIN
    return native.attention_forward(q, k, v, float(scale), parallel)


# The CUDA forward: one thread per query row, blocks of QUERY_ROWS rows; the keys and values
# come through shared memory CUDA_KEY_TILE at a time; head widths up to CUDA_MAX_DIM.
QUERY_ROWS = 64
CUDA_KEY_TILE = 16
CUDA_MAX_DIM = 128


@cuda.jit(cache=True)
def _attention_forward_cuda(q, k, v, scale, out, lse):
    b, i = cuda.blockIdx.y, cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    lq, d, lk, dv = q.shape[1], q.shape[2], k.shape[1], v.shape[2]
    k_tile = cuda.shared.array((CUDA_KEY_TILE, CUDA_MAX_DIM), np.float64)
    v_tile = cuda.shared.array((CUDA_KEY_TILE, CUDA_MAX_DIM), np.float64)
    q_row = cuda.local.array(CUDA_MAX_DIM, np.float64)
    acc = cuda.local.array(CUDA_MAX_DIM, np.float64)
    scores = cuda.local.array(CUDA_KEY_TILE, np.float64)
    live = i < lq  # threads past the last row still help stage the tiles
    for c in range(d):
        q_row[c] = q[b, i, c] if live else 0.0
    for c in range(dv):
        acc[c] = 0.0
    top, total = -math.inf, 0.0
    for j0 in range(0, lk, CUDA_KEY_TILE):
        n = min(CUDA_KEY_TILE, lk - j0)
        for e in range(cuda.threadIdx.x, n * CUDA_MAX_DIM, cuda.blockDim.x):
            j, c = e // CUDA_MAX_DIM, e % CUDA_MAX_DIM
            if c < d:
                k_tile[j, c] = k[b, j0 + j, c]
            if c < dv:
                v_tile[j, c] = v[b, j0 + j, c]
        cuda.syncthreads()
        new_top = top
        for j in range(n):
            s = 0.0
            for c in range(d):
                s += q_row[c] * k_tile[j, c]
            scores[j] = scale * s
            new_top = max(new_top, scores[j])
        rescale = math.exp(top - new_top)  # 0 on the first tile
        total *= rescale
        for c in range(dv):
            acc[c] *= rescale
        for j in range(n):
            p = math.exp(scores[j] - new_top)
            total += p
            for c in range(dv):
                acc[c] += p * v_tile[j, c]
        top = new_top
        cuda.syncthreads()  # before the next tile overwrites this one
    if live:
        for c in range(dv):
            out[b, i, c] = acc[c] / total
        lse[b, i] = top + math.log(total)


@register("attention_forward", "cuda")
def attention_forward_cuda(q, k, v, scale):
    _check_attention("attention_forward", q, k, v)
    if max(q.shape[2], v.shape[2]) > CUDA_MAX_DIM:
        return attention_forward_reference(q, k, v, scale)  # wider heads than the kernel stages
    xp = get_array_module(q)
    q, k, v = (xp.ascontiguousarray(a) for a in (q, k, v))
    b, lq, _ = q.shape
    out = xp.empty((b, lq, v.shape[2]), q.dtype)
    lse = xp.empty((b, lq), q.dtype)
    grid = (-(-lq // QUERY_ROWS), b)
    if b and lq:
        _attention_forward_cuda[grid, QUERY_ROWS, _cuda.launch_stream((q,))](
            q, k, v, np.float64(scale), out, lse
        )
    return out, lse
