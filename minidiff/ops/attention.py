"""Softmax and log-softmax; attention itself is composed in functional.py."""

from __future__ import annotations

from .. import kernels
from ..autograd import Function
from ..backend import get_array_module


class Softmax(Function):
    """softmax(scale * x) along ``axis`` (the scale is fused for attention)."""

    def forward(self, x, *, axis, scale):
        y = kernels.softmax_forward(x, axis=axis, scale=scale)
        self.save_for_backward(y)
        self.axis, self.scale = axis, scale
        return y

    def backward(self, g):
        (y,) = self.saved
        return kernels.softmax_backward(g, y, axis=self.axis, scale=self.scale)


class LogSoftmax(Function):
    def forward(self, x, *, axis):
        xp = get_array_module(x)
        shifted = x - x.max(axis=axis, keepdims=True)
        y = shifted - xp.log(xp.exp(shifted).sum(axis=axis, keepdims=True))
        self.save_for_backward(y)
        self.axis = axis
        return y

    def backward(self, g):
        (y,) = self.saved
        xp = get_array_module(y)
        return g - xp.exp(y) * g.sum(axis=self.axis, keepdims=True)
