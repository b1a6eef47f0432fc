"""2-D convolution. How it is computed (direct kernels, a matrix product for 1x1, or im2col and
matrix products a chunk of samples at a time) is chosen in minidiff/kernels/conv.py, beside the
readable references."""

from __future__ import annotations

from .. import kernels
from ..autograd import Function


class Conv2d(Function):
    """x (N, C, H, W) * weight (O, C, kH, kW) + bias (O,) -> (N, O, Ho, Wo)."""

    def forward(self, x, weight, bias, *, stride, padding):
        y = kernels.conv2d_forward(x, weight, bias, stride, padding)
        # Keep x, not its columns: unfolding again in backward costs far less than keeping
        # kH*kW copies of every input alive until then.
        self.save_for_backward(x, weight)
        self.stride, self.padding, self.has_bias = stride, padding, bias is not None
        return y

    def backward(self, gy):
        x, weight = self.saved
        need_x, need_w, need_b = self.needs_input_grad
        needs = (need_x, need_w, need_b and self.has_bias)
        return kernels.conv2d_backward(gy, x, weight, self.stride, self.padding, needs)
