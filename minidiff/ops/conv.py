"""2-D convolution as im2col plus matrix products, a chunk of samples at a time.

The unfolding (im2col) and its adjoint (col2im) are kernels; see
minidiff/kernels/conv.py for the readable reference and the fast versions.

On the CPU the batch is unfolded a few samples at a time (about ``COLS_CHUNK_BYTES`` of
columns): the columns are then still in the cache when the matrix product reads them, and
one buffer serves the chunk's forward columns, its weight gradient and its input gradient.
Unfolding the whole batch at once writes kH*kW times the input (75 MiB for a 64-channel
32x32 batch of 32), which the product then reads back from memory, and allocates it anew
at every call. On the GPU the whole batch is one chunk.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..autograd import Function
from ..backend import get_array_module
from ..kernels.machine import native

COLS_CHUNK_BYTES = 4 << 20
_DIRECT_IS_VECTORIZED = native is not None and native.conv2d_direct_isa != "baseline"


class Conv2d(Function):
    """x (N, C, H, W) * weight (O, C, kH, kW) + bias (O,) -> (N, O, Ho, Wo)."""

    def forward(self, x, weight, bias, *, stride, padding):
        n, c, h, w = x.shape
        o, _, kh, kw = weight.shape
        self.stride, self.padding = stride, padding
        self.has_bias = bias is not None
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w + 2 * padding[1] - kw) // stride[1] + 1
        w2 = weight.reshape(o, -1)
        if self._runs_direct(x, weight) and (bias is None or bias.dtype == np.float32):
            y = kernels.conv2d(x, weight, stride, padding, bias).reshape(n, o, ho * wo)
            bias = None  # added by the kernel
        elif self._is_pointwise(kh, kw):  # a 1x1 conv needs no unfolding
            y = w2 @ x.reshape(n, c, h * w)
        else:
            xp = get_array_module(x)
            # (N, O, Ho*Wo): already NCHW order
            y = xp.empty((n, o, ho * wo), dtype=xp.result_type(weight, x))
            for a, b in self._chunks(x, c * kh * kw * ho * wo):
                xp.matmul(w2, kernels.im2col(x[a:b], kh, kw, stride, padding), out=y[a:b])
        if bias is not None:
            y += bias[:, None]
        # Keep x, not the columns: unfolding again in backward costs far less than keeping
        # kH*kW copies of every input alive until then.
        self.save_for_backward(x, weight)
        return y.reshape(n, o, ho, wo)

    def _is_pointwise(self, kh, kw):
        return kh == kw == 1 and self.stride == (1, 1) and self.padding == (0, 0)

    def _runs_direct(self, x, weight):
        """Whether the direct kernels (kernels/conv_direct.cpp: no columns; a U-Net step 1.5x
        faster than unfolding then multiplying with AVX-512 or with AVX2; slower without either,
        where BLAS keeps the work) compute this float32 convolution on the CPU, 1x1 included (one
        kernel call instead of a small matrix product per sample). Padding below the kernel size,
        so that the input gradient, convolutions of gy with the kernel flipped (one per phase of
        the stride, see _input_grad_by_phases), runs them too."""
        kh, kw = weight.shape[2:]
        return (
            _DIRECT_IS_VECTORIZED
            and isinstance(x, np.ndarray)
            and x.dtype == weight.dtype == np.float32
            and self.padding[0] < kh
            and self.padding[1] < kw
            and kernels.which("conv2d") == "native"
        )

    def _input_grad_is_a_conv(self, o, c, kh, kw):
        """Whether backward computes gx as a convolution of gy (stride 1, padding below the
        kernel size, fewer output than input channels): that unfolds gy's O channels instead of
        folding back C*kH*kW rows of columns, the same arithmetic with less memory traffic.
        Otherwise the column gradient reuses the (cached) buffer of x's columns, then col2im."""
        return o < c and self.stride == (1, 1) and self.padding[0] < kh and self.padding[1] < kw

    @staticmethod
    def _chunks(x, cols_per_sample):
        """[(start, stop), ...] over the batch: the samples unfolded together, about
        COLS_CHUNK_BYTES of columns (``cols_per_sample`` elements per sample) at a time."""
        n = x.shape[0]
        if not isinstance(x, np.ndarray):
            return [(0, n)]
        step = max(1, COLS_CHUNK_BYTES // max(cols_per_sample * x.itemsize, 1))
        return [(a, min(n, a + step)) for a in range(0, n, step)]

    def backward(self, gy):
        x, weight = self.saved
        o, _, kh, kw = weight.shape
        g = gy.reshape(gy.shape[0], o, gy.shape[2] * gy.shape[3])  # (N, O, L); N may be 0
        w2 = weight.reshape(o, -1)
        need_x, need_w = self.needs_input_grad[0], self.needs_input_grad[1]
        gx = gw = gb = None
        direct = gy.dtype == np.float32 and self._runs_direct(x, weight)
        if self._is_pointwise(kh, kw) and not direct:
            cols = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3])
            if need_w:
                gw = get_array_module(x).ascontiguousarray(_weight_grad_t(cols, g).T).reshape(weight.shape)
            if need_x:
                gx = (get_array_module(x).ascontiguousarray(w2.T) @ g).reshape(x.shape)
        elif need_x or need_w:
            xp = get_array_module(x)
            n, c, h, w = x.shape
            direct_x = need_x and direct
            direct_w = need_w and direct and kernels.which("conv2d_weight_grad") == "native"
            as_conv = need_x and not direct_x and self._input_grad_is_a_conv(o, c, kh, kw)
            if as_conv:
                # gx = gy (*) weight flipped in space, with O and C swapped, padded k - 1 - p
                w_flip = xp.ascontiguousarray(weight[:, :, ::-1, ::-1].swapaxes(0, 1)).reshape(c, -1)
                pad_flip = (kh - 1 - self.padding[0], kw - 1 - self.padding[1])
            if direct_x:
                gx = _input_grad_by_phases(gy, weight, x.shape, self.stride, self.padding)
            if direct_w:
                gw = kernels.conv2d_weight_grad(x, gy, (kh, kw), self.stride, self.padding)
            x_in_chunks = need_x and not direct_x  # gx computed chunk by chunk below
            w_in_chunks = need_w and not direct_w
            gcols_dtype = xp.result_type(w2, g)
            # (C*kH*kW, O), summed over the chunks
            gw_t = xp.zeros(w2.shape[::-1], dtype=xp.result_type(g, x)) if w_in_chunks else None
            if x_in_chunks:
                gx = xp.empty((n, c, h * w), dtype=gcols_dtype)
            if x_in_chunks and not as_conv:
                w2_t = xp.ascontiguousarray(w2.T)  # BLAS runs the product faster on a contiguous operand
            chunks = self._chunks(x, kh * kw * max(c * g.shape[2], o * h * w if as_conv else 0))
            for a, b in chunks if w_in_chunks or x_in_chunks else ():
                cols = None
                if w_in_chunks:
                    cols = kernels.im2col(x[a:b], kh, kw, self.stride, self.padding)
                    gw_t += _weight_grad_t(cols, g[a:b])
                if as_conv:
                    xp.matmul(w_flip, kernels.im2col(gy[a:b], kh, kw, (1, 1), pad_flip), out=gx[a:b])
                elif x_in_chunks:
                    reuse = cols is not None and cols.dtype == gcols_dtype
                    gcols = xp.matmul(w2_t, g[a:b], out=cols if reuse else None)  # one buffer
                    gx[a:b] = kernels.col2im(gcols, x[a:b].shape, kh, kw, self.stride, self.padding).reshape(
                        b - a, c, h * w
                    )
            if gw_t is not None:
                gw = xp.ascontiguousarray(gw_t.T).reshape(weight.shape)
            gx = None if gx is None else gx.reshape(x.shape)
        if self.has_bias and self.needs_input_grad[2]:
            gb = get_array_module(gy).einsum("nol->o", g)  # 3x faster than gy.sum(axis=(0, 2, 3))
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
            out = kernels.conv2d(gy, np.ascontiguousarray(sub), (1, 1), (r[1], q[1]))
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
    cols (N, K, L) and g (N, O, L).

    Transposed because BLAS then reads the large operand (the columns) in its stored order and
    only the small one transposed: 1.4-1.9x faster than g[n] @ cols[n].T with OpenBLAS on the
    U-Net's shapes."""
    return (cols @ g.swapaxes(1, 2)).sum(axis=0)
