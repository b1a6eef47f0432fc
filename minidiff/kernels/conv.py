"""Convolution helpers: im2col and its adjoint col2im, and the convolution itself with its weight gradient.

A 2-D convolution is a matrix product once every receptive field is laid out as a column:

    cols = im2col(x, kh, kw, stride, padding)        # (N, C*kh*kw, Ho*Wo)
    y[n] = weight.reshape(O, C*kh*kw) @ cols[n]      # (O, Ho*Wo)

Row ``c*kh*kw + i*kw + j`` of ``cols[n]`` holds input channel ``c`` shifted by kernel offset
``(i, j)``: ``cols[n, row, oh*Wo + ow] = x_padded[n, c, oh*sh + i, ow*sw + j]`` (the layout of
``torch.nn.functional.unfold``). col2im is the adjoint: it scatter-adds each column entry back
to the pixel it came from and drops the padding, which is the input gradient of im2col.

Four implementations side by side: the reference (``xp`` code, NumPy or CuPy, one strided
copy per kernel offset), Numba CPU, the C++ extension, and Numba CUDA for CuPy arrays. The
CUDA col2im gives each pixel of x a thread that gathers the entries taken from it, in the order of
the reference's loops (kernel row, then kernel column) and in the data's dtype: the reference's
sums, to the bit, without atomic additions.

``conv2d(x, weight, stride, padding, bias=None)`` is the whole convolution and
``conv2d_weight_grad(x, gy, kernel_size, stride, padding)`` its weight gradient. Their
references unfold and multiply as above; the native versions (kernels/conv_direct.cpp, float32)
read the padded input in place, with no columns: each kernel tap is a constant shift of the
flattened padded plane, so a tile of outputs (or of weight gradients) is a few vector loads and
fused multiply-adds per input channel and tap. They have no Numba or CUDA version: there the
convolution unfolds and calls BLAS / cuBLAS.
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import get_array_module

from . import _cuda, registry
from ._checks import float_dtype, pair
from .machine import cuda, native, native_conv_is_vectorized, njit, prange
from .registry import dispatcher, register


def conv_output_size(fn, x_shape, kh, kw, stride, padding):
    """Check the geometry; return ``(N, C, H, W, Ho, Wo, (sh, sw), (ph, pw))``."""
    if len(x_shape) != 4:
        raise ValueError(f"{fn}: x must have shape (N, C, H, W), got {tuple(x_shape)}")
    N, C, H, W = x_shape
    pair(fn, "kernel size", (kh, kw))
    sh, sw = pair(fn, "stride", stride)
    ph, pw = pair(fn, "padding", padding)
    if kh < 1 or kw < 1 or sh < 1 or sw < 1 or ph < 0 or pw < 0:
        raise ValueError(
            f"{fn}: need kernel >= 1, stride >= 1, padding >= 0; "
            f"got kernel ({kh}, {kw}), stride ({sh}, {sw}), padding ({ph}, {pw})"
        )
    Ho = (H + 2 * ph - kh) // sh + 1
    Wo = (W + 2 * pw - kw) // sw + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(
            f"{fn}: kernel ({kh}, {kw}) does not fit the padded input "
            f"({H + 2 * ph}, {W + 2 * pw}) of x with shape {tuple(x_shape)}"
        )
    return N, C, H, W, Ho, Wo, (sh, sw), (ph, pw)


def _check_cols(fn, cols, x_shape, kh, kw, stride, padding):
    x_shape = tuple(int(d) for d in x_shape)
    N, C, H, W, Ho, Wo, s, p = conv_output_size(fn, x_shape, kh, kw, stride, padding)
    if cols.shape != (N, C * kh * kw, Ho * Wo):
        raise ValueError(
            f"{fn}: cols must have shape {(N, C * kh * kw, Ho * Wo)} for x_shape {x_shape}, "
            f"kernel ({kh}, {kw}), stride {s}, padding {p}; got {cols.shape}"
        )
    float_dtype(fn, cols=cols)
    return x_shape, Ho, Wo, s, p


# -- reference -------------------------------------------------------------------------------


@register("im2col", "reference")
def im2col_reference(x, kh, kw, stride, padding):
    """Columns ``(N, C*kh*kw, Ho*Wo)`` of the zero-padded x ``(N, C, H, W)``; see the module doc."""
    float_dtype("im2col", x=x)
    N, C, H, W, Ho, Wo, (sh, sw), (ph, pw) = conv_output_size("im2col", x.shape, kh, kw, stride, padding)
    xp = get_array_module(x)
    xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    cols = xp.empty((N, C, kh, kw, Ho, Wo), dtype=x.dtype)
    for i in range(kh):  # one strided copy per kernel offset: every output pixel at once
        for j in range(kw):
            cols[:, :, i, j] = xpad[:, :, i : i + sh * (Ho - 1) + 1 : sh, j : j + sw * (Wo - 1) + 1 : sw]
    return cols.reshape(N, C * kh * kw, Ho * Wo)


@register("col2im", "reference")
def col2im_reference(cols, x_shape, kh, kw, stride, padding):
    """Adjoint of im2col: scatter-add ``cols`` back into an array of ``x_shape``."""
    (N, C, H, W), Ho, Wo, (sh, sw), (ph, pw) = _check_cols("col2im", cols, x_shape, kh, kw, stride, padding)
    xp = get_array_module(cols)
    cols = cols.reshape(N, C, kh, kw, Ho, Wo)
    xpad = xp.zeros((N, C, H + 2 * ph, W + 2 * pw), dtype=cols.dtype)
    for i in range(kh):  # overlapping windows add up: that is the adjoint of the copies above
        for j in range(kw):
            xpad[:, :, i : i + sh * (Ho - 1) + 1 : sh, j : j + sw * (Wo - 1) + 1 : sw] += cols[:, :, i, j]
    return xp.ascontiguousarray(xpad[:, :, ph : ph + H, pw : pw + W])


def _check_conv(fn, x, weight, stride, padding, bias=None):
    """Check x (N, C, H, W), weight (O, C, kh, kw), stride, padding and bias (O,) or None; return
    ``(kh, kw, (sh, sw), (ph, pw), (Ho, Wo))``."""
    arrays = dict(x=x, weight=weight) if bias is None else dict(x=x, weight=weight, bias=bias)
    float_dtype(fn, **arrays)
    if weight.ndim != 4 or x.ndim != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"{fn}: need x (N, C, H, W) and weight (O, C, kh, kw) with the same C, "
            f"got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"{fn}: bias must have shape (O,) = ({len(weight)},), got {tuple(bias.shape)}")
    kh, kw = weight.shape[2:]
    *_, Ho, Wo, stride, padding = conv_output_size(fn, x.shape, kh, kw, stride, padding)
    return kh, kw, stride, padding, (Ho, Wo)


@register("conv2d", "reference")
def conv2d_reference(x, weight, stride, padding, bias=None):
    """Convolution ``(N, O, Ho, Wo)`` of x ``(N, C, H, W)`` by weight ``(O, C, kh, kw)`` with zero
    padding, plus bias ``(O,)`` if given: the columns of every sample times the weight as a
    matrix."""
    kh, kw, stride, padding, (Ho, Wo) = _check_conv("conv2d", x, weight, stride, padding, bias)
    cols = im2col_reference(x, kh, kw, stride, padding)  # (N, C*kh*kw, Ho*Wo)
    y = weight.reshape(len(weight), -1) @ cols
    if bias is not None:
        y += bias[:, None]
    return y.reshape(len(x), len(weight), Ho, Wo)


def _check_weight_grad(fn, x, gy, kernel_size, stride, padding):
    """Check x (N, C, H, W), gy (N, O, Ho, Wo) against the kernel size, stride and padding;
    return ``(kh, kw, (sh, sw), (ph, pw))``."""
    float_dtype(fn, x=x, gy=gy)
    kh, kw = pair(fn, "kernel size", kernel_size)
    if x.ndim != 4 or gy.ndim != 4 or gy.shape[0] != x.shape[0]:
        raise ValueError(
            f"{fn}: need x (N, C, H, W) and gy (N, O, Ho, Wo) with the same N, "
            f"got x {tuple(x.shape)} and gy {tuple(gy.shape)}"
        )
    *_, Ho, Wo, stride, padding = conv_output_size(fn, x.shape, kh, kw, stride, padding)
    if gy.shape[2:] != (Ho, Wo):
        raise ValueError(
            f"{fn}: gy {tuple(gy.shape)} does not match x {tuple(x.shape)}: a ({kh}, {kw}) kernel "
            f"with stride {stride} and padding {padding} gives outputs of {Ho}x{Wo}"
        )
    return kh, kw, stride, padding


@register("conv2d_weight_grad", "reference")
def conv2d_weight_grad_reference(x, gy, kernel_size, stride, padding):
    """The weight gradient ``(O, C, kh, kw)`` of the convolution, from x ``(N, C, H, W)`` and the
    output gradient gy ``(N, O, Ho, Wo)``: the sum over samples of gy[n] times the transposed
    columns of x[n]."""
    kh, kw, stride, padding = _check_weight_grad("conv2d_weight_grad", x, gy, kernel_size, stride, padding)
    cols = im2col_reference(x, kh, kw, stride, padding)  # (N, C*kh*kw, Ho*Wo)
    g = gy.reshape(gy.shape[0], gy.shape[1], -1)  # (N, O, Ho*Wo)
    return (g @ cols.swapaxes(1, 2)).sum(axis=0).reshape(gy.shape[1], x.shape[1], kh, kw)


# -- Numba CPU -------------------------------------------------------------------------------


@njit(parallel=True, cache=True)
def _im2col_cpu(x, kh, kw, sh, sw, ph, pw, Ho, Wo, cols):
    N, C, H, W = x.shape
    for nc in prange(N * C):  # each (n, c) owns rows c*kh*kw ... of cols[n]: no write races
        n, c = nc // C, nc % C
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for oh in range(Ho):
                    h = oh * sh - ph + i
                    for ow in range(Wo):
                        w = ow * sw - pw + j
                        if 0 <= h < H and 0 <= w < W:
                            cols[n, row, oh * Wo + ow] = x[n, c, h, w]
                        else:
                            cols[n, row, oh * Wo + ow] = 0


@njit(parallel=True, cache=True)
def _col2im_cpu(cols, kh, kw, sh, sw, ph, pw, Ho, Wo, x):
    N, C, H, W = x.shape
    for nc in prange(N * C):  # each (n, c) writes only x[n, c]: no write races
        n, c = nc // C, nc % C
        x[n, c] = 0
        for i in range(kh):
            for j in range(kw):
                row = (c * kh + i) * kw + j
                for oh in range(Ho):
                    h = oh * sh - ph + i
                    if h < 0 or h >= H:
                        continue
                    for ow in range(Wo):
                        w = ow * sw - pw + j
                        if 0 <= w < W:
                            x[n, c, h, w] += cols[n, row, oh * Wo + ow]


@register("im2col", "numba")
def im2col_numba(x, kh, kw, stride, padding):
    float_dtype("im2col", x=x)
    N, C, H, W, Ho, Wo, (sh, sw), (ph, pw) = conv_output_size("im2col", x.shape, kh, kw, stride, padding)
    cols = np.empty((N, C * kh * kw, Ho * Wo), dtype=x.dtype)
    _im2col_cpu(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, Ho, Wo, cols)
    return cols


@register("col2im", "numba")
def col2im_numba(cols, x_shape, kh, kw, stride, padding):
    x_shape, Ho, Wo, (sh, sw), (ph, pw) = _check_cols("col2im", cols, x_shape, kh, kw, stride, padding)
    x = np.empty(x_shape, dtype=cols.dtype)
    _col2im_cpu(np.ascontiguousarray(cols), kh, kw, sh, sw, ph, pw, Ho, Wo, x)
    return x


# -- native (kernels/conv.cpp) ---------------------------------------------------------------


@register("im2col", "native")
def im2col_native(x, kh, kw, stride, padding):
    float_dtype("im2col", x=x)
    _, _, _, _, _, _, (sh, sw), (ph, pw) = conv_output_size("im2col", x.shape, kh, kw, stride, padding)
    return native.im2col(np.ascontiguousarray(x), kh, kw, sh, sw, ph, pw)


@register("col2im", "native")
def col2im_native(cols, x_shape, kh, kw, stride, padding):
    (N, C, H, W), _, _, (sh, sw), (ph, pw) = _check_cols("col2im", cols, x_shape, kh, kw, stride, padding)
    return native.col2im(np.ascontiguousarray(cols), C, H, W, kh, kw, sh, sw, ph, pw)


@register("conv2d", "native")
def conv2d_native(x, weight, stride, padding, bias=None):
    """The direct kernel of kernels/conv_direct.cpp (no columns) for float32; float64, the
    precision path of the gradient checks, runs the reference."""
    *_, (sh, sw), (ph, pw), _ = _check_conv("conv2d", x, weight, stride, padding, bias)
    if x.dtype != np.float32:
        return conv2d_reference(x, weight, (sh, sw), (ph, pw), bias)
    contiguous = np.ascontiguousarray
    b = None if bias is None else contiguous(bias)
    return native.conv2d_direct(contiguous(x), contiguous(weight), ph, pw, b, sh, sw)


@register("conv2d_weight_grad", "native")
def conv2d_weight_grad_native(x, gy, kernel_size, stride, padding):
    """The direct weight gradient of kernels/conv_direct.cpp (no columns) for float32; float64
    runs the reference."""
    kh, kw, (sh, sw), (ph, pw) = _check_weight_grad("conv2d_weight_grad", x, gy, kernel_size, stride, padding)
    if x.dtype != np.float32:
        return conv2d_weight_grad_reference(x, gy, (kh, kw), (sh, sw), (ph, pw))
    contiguous = np.ascontiguousarray
    return native.conv2d_direct_weight_grad(contiguous(x), contiguous(gy), kh, kw, ph, pw, sh, sw)


# -- Numba CUDA ------------------------------------------------------------------------------


@cuda.jit(cache=True)
def _im2col_cuda(x, kh, kw, sh, sw, ph, pw, Ho, Wo, cols):
    # grid-stride loop, one thread per entry of cols (N, C*kh*kw, Ho*Wo)
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    rows, L = C * kh * kw, Ho * Wo
    for k in range(cuda.grid(1), cols.size, cuda.gridsize(1)):
        n, row, p = k // (rows * L), k // L % rows, k % L
        c, i, j = row // (kh * kw), row // kw % kh, row % kw
        h = p // Wo * sh - ph + i
        w = p % Wo * sw - pw + j
        if 0 <= h < H and 0 <= w < W:
            cols[n, row, p] = x[n, c, h, w]
        else:
            cols[n, row, p] = 0


@cuda.jit(cache=True)
def _col2im_cuda(cols, kh, kw, sh, sw, ph, pw, Ho, Wo, zero, x):
    # grid-stride loop, one thread per pixel of x: it gathers the column entries taken from it
    # (no two threads write one pixel: no atomics, and the order of the sum is fixed)
    C, H, W = x.shape[1], x.shape[2], x.shape[3]
    for k in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        n, c, h, w = k // (C * H * W), k // (H * W) % C, k // W % H, k % W
        total = zero  # in x's dtype, as the reference adds
        for i in range(kh):
            th = h + ph - i  # = oh * sh for the output row oh that read (h, w) at kernel row i
            if th < 0:
                break
            if th % sh or th // sh >= Ho:
                continue
            for j in range(kw):
                tw = w + pw - j
                if tw < 0:
                    break
                if tw % sw or tw // sw >= Wo:
                    continue
                total += cols[n, (c * kh + i) * kw + j, th // sh * Wo + tw // sw]
        x[n, c, h, w] = total


@register("im2col", "cuda")
def im2col_cuda(x, kh, kw, stride, padding):
    float_dtype("im2col", x=x)
    N, C, H, W, Ho, Wo, (sh, sw), (ph, pw) = conv_output_size("im2col", x.shape, kh, kw, stride, padding)
    xp = get_array_module(x)
    cols = xp.empty((N, C * kh * kw, Ho * Wo), dtype=x.dtype)
    _cuda.launch_elementwise(
        _im2col_cuda, cols.size, xp.ascontiguousarray(x), kh, kw, sh, sw, ph, pw, Ho, Wo, cols
    )
    return cols


@register("col2im", "cuda")
def col2im_cuda(cols, x_shape, kh, kw, stride, padding):
    x_shape, Ho, Wo, (sh, sw), (ph, pw) = _check_cols("col2im", cols, x_shape, kh, kw, stride, padding)
    xp = get_array_module(cols)
    x = xp.empty(x_shape, dtype=cols.dtype)
    zero = cols.dtype.type(0)
    _cuda.launch_elementwise(
        _col2im_cuda, x.size, xp.ascontiguousarray(cols), kh, kw, sh, sw, ph, pw, Ho, Wo, zero, x
    )
    return x


# -- the convolution op: which strategy runs -------------------------------------------------
#
# conv2d_forward and conv2d_backward are what ops/conv.py calls. They are the same function for
# every implementation: each picks a strategy and runs it through the registered kernels above
# (so ``which("conv2d")``, ``which("im2col")`` ... name what runs):
#
# - direct: float32 NumPy arrays with padding below the kernel size, where ``conv2d`` runs the
#   native direct kernel and the CPU vectorizes it (kernels/conv_direct.cpp: no columns; forward
#   with the bias, the input gradient as stride-1 convolutions of gy, one per phase of the
#   stride, and the weight gradient). Without AVX2, unfolding and BLAS are faster, and so they
#   are for a large weight over few positions (Stable Diffusion's 1280-channel 8x8 and 16x16
#   levels): the direct kernel transposes the whole weight once per call, BLAS reads it in place.
# - pointwise: a 1x1 convolution at stride 1 without padding is one matrix product per sample.
# - unfolded: im2col then a matrix product, a few samples at a time (about COLS_CHUNK_BYTES of
#   columns), so that each chunk's columns are still in the cache when the product reads them and
#   one buffer serves the chunk's forward columns, its weight gradient and its input gradient; on
#   the GPU the whole batch is one chunk. The input gradient of a stride-1 convolution with fewer
#   output than input channels is itself a convolution (of gy with the flipped weight), which
#   unfolds O channels instead of folding back C*kH*kW rows with col2im.
#
# Measurements behind these choices: bench/RESULTS.md.

COLS_CHUNK_BYTES = 4 << 20
# Unfold instead of the direct kernel where the weight has at least LARGE_WEIGHT elements and the
# batch at most FEW_POSITIONS input positions (N*H*W).
LARGE_WEIGHT = 1 << 20
FEW_POSITIONS = 1024

# the dispatchers the strategies run (kernels/__init__.py exports them)
im2col = dispatcher("im2col")
col2im = dispatcher("col2im")
conv2d = dispatcher("conv2d")
conv2d_weight_grad = dispatcher("conv2d_weight_grad")


def _runs_direct(x, weight, padding):
    """Whether the native direct kernels compute this float32 convolution of NumPy arrays (1x1
    included: one kernel call instead of a matrix product per sample). Padding below the kernel
    size, so that the input gradient (convolutions of gy with the kernel flipped) runs them too."""
    kh, kw = weight.shape[2:]
    n, _, h, w = x.shape
    return (
        native_conv_is_vectorized
        and isinstance(x, np.ndarray)
        and x.dtype == weight.dtype == np.float32
        and padding[0] < kh
        and padding[1] < kw
        and not (weight.size >= LARGE_WEIGHT and n * h * w <= FEW_POSITIONS)
        and registry.which("conv2d") == "native"
    )


def _is_pointwise(kh, kw, stride, padding):
    return kh == kw == 1 and stride == (1, 1) and padding == (0, 0)


def _input_grad_is_a_conv(o, c, kh, kw, stride, padding):
    """Whether the unfolded backward computes gx as a convolution of gy (stride 1, padding below
    the kernel size, fewer output than input channels): the same arithmetic as folding the
    column gradient back, with less memory traffic."""
    return o < c and stride == (1, 1) and padding[0] < kh and padding[1] < kw


def chunks(x, cols_per_sample):
    """[(start, stop), ...] over the batch: the samples unfolded together, about
    COLS_CHUNK_BYTES of columns (``cols_per_sample`` elements per sample) at a time; the whole
    batch for arrays that are not NumPy's."""
    n = x.shape[0]
    if not isinstance(x, np.ndarray):
        return [(0, n)]
    step = max(1, COLS_CHUNK_BYTES // max(cols_per_sample * x.itemsize, 1))
    return [(a, min(n, a + step)) for a in range(0, n, step)]


def conv2d_forward(x, weight, bias, stride, padding):
    """The convolution ``(N, O, Ho, Wo)`` of x ``(N, C, H, W)`` by weight ``(O, C, kh, kw)`` plus
    bias ``(O,)`` or None, by the strategy described above; ``conv2d_reference`` is its
    definition."""
    o, _, kh, kw = weight.shape
    n, c, h, w, ho, wo, stride, padding = conv_output_size("conv2d_forward", x.shape, kh, kw, stride, padding)
    w2 = weight.reshape(o, -1)
    if _runs_direct(x, weight, padding) and (bias is None or bias.dtype == np.float32):
        y = conv2d(x, weight, stride, padding, bias).reshape(n, o, ho * wo)
        bias = None  # added by the kernel
    elif _is_pointwise(kh, kw, stride, padding):  # a 1x1 conv needs no unfolding
        y = w2 @ x.reshape(n, c, h * w)
    else:
        xp = get_array_module(x)
        # (N, O, Ho*Wo): already NCHW order
        y = xp.empty((n, o, ho * wo), dtype=xp.result_type(weight, x))
        for a, b in chunks(x, c * kh * kw * ho * wo):
            xp.matmul(w2, im2col(x[a:b], kh, kw, stride, padding), out=y[a:b])
    if bias is not None:
        y += bias[:, None]
    return y.reshape(n, o, ho, wo)


def conv2d_backward(gy, x, weight, stride, padding, needs=(True, True, True)):
    """``(gx, gweight, gbias)`` of the convolution from its output gradient gy ``(N, O, Ho, Wo)``;
    ``needs`` says which of the three to compute (the others are None; gbias only where there is
    a bias). ``conv2d_backward_reference`` is its definition."""
    o, _, kh, kw = weight.shape
    *_, stride, padding = conv_output_size("conv2d_backward", x.shape, kh, kw, stride, padding)
    g = gy.reshape(gy.shape[0], o, gy.shape[2] * gy.shape[3])  # (N, O, L); N may be 0
    w2 = weight.reshape(o, -1)
    need_x, need_w, need_b = needs
    gx = gw = gb = None
    xp = get_array_module(x)
    direct = gy.dtype == np.float32 and _runs_direct(x, weight, padding)
    if _is_pointwise(kh, kw, stride, padding) and not direct:
        cols = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
        if need_w:
            gw = xp.ascontiguousarray(_weight_grad_t(cols, g).T).reshape(weight.shape)
        if need_x:
            gx = (xp.ascontiguousarray(w2.T) @ g).reshape(x.shape)
    elif need_x or need_w:
        n, c, h, w = x.shape
        direct_x = need_x and direct
        direct_w = need_w and direct and registry.which("conv2d_weight_grad") == "native"
        as_conv = need_x and not direct_x and _input_grad_is_a_conv(o, c, kh, kw, stride, padding)
        if as_conv:
            # gx = gy (*) weight flipped in space, with O and C swapped, padded k - 1 - p
            w_flip = xp.ascontiguousarray(weight[:, :, ::-1, ::-1].swapaxes(0, 1)).reshape(c, -1)
            pad_flip = (kh - 1 - padding[0], kw - 1 - padding[1])
        if direct_x:
            gx = _input_grad_by_phases(gy, weight, x.shape, stride, padding)
        if direct_w:
            gw = conv2d_weight_grad(x, gy, (kh, kw), stride, padding)
        x_in_chunks = need_x and not direct_x  # gx computed chunk by chunk below
        w_in_chunks = need_w and not direct_w
        gcols_dtype = xp.result_type(w2, g)
        # (C*kH*kW, O), summed over the chunks
        gw_t = xp.zeros(w2.shape[::-1], dtype=xp.result_type(g, x)) if w_in_chunks else None
        if x_in_chunks:
            gx = xp.empty((n, c, h * w), dtype=gcols_dtype)
        if x_in_chunks and not as_conv:
            w2_t = xp.ascontiguousarray(w2.T)  # BLAS runs the product faster on a contiguous operand
        parts = chunks(x, kh * kw * max(c * g.shape[2], o * h * w if as_conv else 0))
        for a, b in parts if w_in_chunks or x_in_chunks else ():
            cols = None
            if w_in_chunks:
                cols = im2col(x[a:b], kh, kw, stride, padding)
                gw_t += _weight_grad_t(cols, g[a:b])
            if as_conv:
                xp.matmul(w_flip, im2col(gy[a:b], kh, kw, (1, 1), pad_flip), out=gx[a:b])
            elif x_in_chunks:
                reuse = cols is not None and cols.dtype == gcols_dtype
                gcols = xp.matmul(w2_t, g[a:b], out=cols if reuse else None)  # one buffer
                gx[a:b] = col2im(gcols, x[a:b].shape, kh, kw, stride, padding).reshape(b - a, c, h * w)
        if gw_t is not None:
            gw = xp.ascontiguousarray(gw_t.T).reshape(weight.shape)
        gx = None if gx is None else gx.reshape(x.shape)
    if need_b:
        gb = get_array_module(gy).einsum("nol->o", g)  # faster than gy.sum(axis=(0, 2, 3))
    return gx, gw, gb


def conv2d_backward_reference(gy, x, weight, stride, padding, needs=(True, True, True)):
    """The definition of ``conv2d_backward``: the column gradient ``weight^T @ gy`` folded back by
    col2im, the weight gradient of the columns, and gy summed for the bias."""
    kh, kw, stride, padding = _check_weight_grad("conv2d_backward", x, gy, weight.shape[2:], stride, padding)
    need_x, need_w, need_b = needs
    gx = gw = gb = None
    if need_x:
        g = gy.reshape(gy.shape[0], gy.shape[1], -1)  # (N, O, Ho*Wo)
        gcols = weight.reshape(len(weight), -1).T @ g  # (N, C*kh*kw, Ho*Wo)
        gx = col2im_reference(gcols, x.shape, kh, kw, stride, padding)
    if need_w:
        gw = conv2d_weight_grad_reference(x, gy, (kh, kw), stride, padding)
    if need_b:
        gb = gy.sum(axis=(0, 2, 3))
    return gx, gw, gb


def _input_grad_by_phases(gy, weight, x_shape, stride, padding):
    """gx of a convolution as stride-1 convolutions of gy, one per phase of the stride.

    Input row h meets kernel row i at output row u where h + p = u*s + i. The rows of one phase
    a = (h + p) % s meet only the taps i = a, a + s, ...: for them gx is gy correlated, at stride
    1, with that sub-kernel flipped (O and C swapped). At stride 1 there is one phase, the whole
    kernel padded k - 1 - p; at stride 2 a 3x3 kernel splits into 2x2, 2x1, 1x2 and 1x1 parts,
    the same multiply-adds as the transposed convolution, none on zeros."""
    H, W = x_shape[2:]
    rows = [_phase(a, stride[0], padding[0], weight.shape[2], H, gy.shape[2]) for a in range(stride[0])]
    cols = [_phase(b, stride[1], padding[1], weight.shape[3], W, gy.shape[3]) for b in range(stride[1])]
    if stride == (1, 1):
        gx = None  # one phase: the output is gx itself
    else:  # phases without a tap (kernel smaller than the stride) get no gradient
        gx = np.zeros(x_shape, dtype=gy.dtype)
    for a, r in enumerate(rows):
        for b, q in enumerate(cols):
            if r is None or q is None:
                continue
            sub = weight[:, :, a :: stride[0], b :: stride[1]][:, :, ::-1, ::-1].swapaxes(0, 1)
            out = conv2d(gy, np.ascontiguousarray(sub), (1, 1), (r[1], q[1]))
            part = out[:, :, r[2] : r[3], q[2] : q[3]]
            if gx is None:
                return np.ascontiguousarray(part)
            gx[:, :, r[0] :: stride[0], q[0] :: stride[1]] = part
    return gx


def _phase(a, s, p, k, size, out_size):
    """One phase of one axis of the input gradient: the input positions h with (h + p) % s == a,
    which meet the kernel taps a, a + s, ... Returns (first h, the symmetric padding of the
    stride-1 correlation, and the slice [lo, hi) of its outputs that are those positions, in
    order), or None when the phase has no tap or no position."""
    taps = len(range(a, k, s))
    first = (a - p) % s
    if taps == 0 or first >= size:
        return None
    last = first + (size - 1 - first) // s * s
    u_first, u_last = (first + p - a) // s, (last + p - a) // s  # output rows that h meets first
    # The correlation's output t = u + pad - (taps - 1) needs t >= 0 at u_first and gy rows
    # down to u_last; one padding serves both sides (at stride 1: k - 1 - p, all outputs kept).
    top = taps - 1
    pad = max(top - u_first, u_last - out_size + 1, 0)
    return first, pad, u_first + pad - top, u_last + pad - top + 1


def _weight_grad_t(cols, g):
    """The transposed weight gradient (K, O): the sum over samples of cols[n] @ g[n].T, from
    cols (N, K, L) and g (N, O, L). Transposed because BLAS multiplies faster when it reads the
    large operand (the columns) in its stored order and only the small one transposed."""
    return (cols @ g.swapaxes(1, 2)).sum(axis=0)
