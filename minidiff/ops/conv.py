"""2-D convolution as im2col plus one batched matrix product.

The unfolding (im2col) and its adjoint (col2im) are kernels; see
minidiff/kernels/conv.py for the readable reference and the fast versions.
"""

from __future__ import annotations

from .. import kernels
from ..autograd import Function


class Conv2d(Function):
    """x (N, C, H, W) * weight (O, C, kH, kW) + bias (O,) -> (N, O, Ho, Wo)."""

    def forward(self, x, weight, bias, *, stride, padding):
        n, _, h, w = x.shape
        o, _, kh, kw = weight.shape
        self.stride, self.padding = stride, padding
        self.has_bias = bias is not None
        ho = (h + 2 * padding[0] - kh) // stride[0] + 1
        wo = (w + 2 * padding[1] - kw) // stride[1] + 1
        cols = self._unfold(x, kh, kw)  # (N, C*kH*kW, Ho*Wo)
        y = weight.reshape(o, -1) @ cols  # (N, O, Ho*Wo): already NCHW order
        if bias is not None:
            y += bias[:, None]
        # Keep x, not cols: cols are kH*kW times larger, and unfolding again in
        # backward costs far less than the matrix products.
        self.save_for_backward(x, weight)
        return y.reshape(n, o, ho, wo)

    def _is_pointwise(self, kh, kw):
        return kh == kw == 1 and self.stride == (1, 1) and self.padding == (0, 0)

    def _unfold(self, x, kh, kw):
        if self._is_pointwise(kh, kw):  # a 1x1 conv needs no unfolding
            return x.reshape(x.shape[0], x.shape[1], -1)
        return kernels.im2col(x, kh, kw, self.stride, self.padding)

    def backward(self, gy):
        x, weight = self.saved
        o, _, kh, kw = weight.shape
        g = gy.reshape(gy.shape[0], o, -1)  # (N, O, L)
        gx = gw = gb = None
        if self.needs_input_grad[1]:
            cols = self._unfold(x, kh, kw)
            # one GEMM per sample (BLAS reads cols transposed in place), then a sum
            # over samples: cheaper than the transposed copies a single GEMM needs
            gw = (g @ cols.swapaxes(1, 2)).sum(axis=0).reshape(weight.shape)
        if self.needs_input_grad[0]:
            gcols = weight.reshape(o, -1).T @ g  # (N, C*kH*kW, L)
            if self._is_pointwise(kh, kw):
                gx = gcols.reshape(x.shape)
            else:
                gx = kernels.col2im(gcols, x.shape, kh, kw, self.stride, self.padding)
        if self.has_bias and self.needs_input_grad[2]:
            gb = gy.sum(axis=(0, 2, 3))
        return gx, gw, gb
