"""Reductions over axes: sum, mean, max."""

from __future__ import annotations

import numbers

from ..autograd import Function
from ..backend import get_array_module


def normalize_axes(axis, ndim, op="reduce"):
    """``axis`` (None, int or tuple) as a sorted tuple of non-negative axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
    out = []
    for a in axes:
        if not isinstance(a, numbers.Integral) or not -ndim <= a < ndim:
            raise ValueError(f"{op}: axis {a} is out of range for a tensor with {ndim} dims")
        out.append(int(a) % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"{op}: repeated axis in {axis}")
    return tuple(sorted(out))


class Sum(Function):
    def forward(self, x, *, axes, keepdims):
        self.shape, self.axes, self.keepdims = x.shape, axes, keepdims
        return x.sum(axis=axes, keepdims=keepdims)

    def backward(self, g):
        if not self.keepdims:
            g = g.reshape(tuple(1 if i in self.axes else n for i, n in enumerate(self.shape)))
        return get_array_module(g).broadcast_to(g, self.shape).copy()


class Mean(Function):
    def forward(self, x, *, axes, keepdims):
        self.shape, self.axes, self.keepdims = x.shape, axes, keepdims
        self.count = 1
        for a in axes:
            self.count *= x.shape[a]
        return x.mean(axis=axes, keepdims=keepdims)

    def backward(self, g):
        if not self.keepdims:
            g = g.reshape(tuple(1 if i in self.axes else n for i, n in enumerate(self.shape)))
        xp = get_array_module(g)
        return xp.broadcast_to(g / self.count, self.shape).copy()


class Max(Function):
    """Maximum over axes. Ties share the gradient equally (the subgradient
    that keeps sum-of-gradients equal to the incoming gradient)."""

    def forward(self, x, *, axes, keepdims):
        self.axes, self.keepdims = axes, keepdims
        y = x.max(axis=axes, keepdims=True)
        self.save_for_backward(x, y)
        return y if keepdims else y.reshape(tuple(n for i, n in enumerate(x.shape) if i not in axes))

    def backward(self, g):
        x, y = self.saved
        if not self.keepdims:
            g = g.reshape(y.shape)
        is_max = x == y
        count = is_max.sum(axis=self.axes, keepdims=True).astype(g.dtype)
        return is_max * (g / count)
