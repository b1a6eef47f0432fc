"""Ops that move elements around without arithmetic."""

from __future__ import annotations

from ..autograd import Function, unbroadcast
from ..backend import get_array_module


class Reshape(Function):
    def forward(self, x, *, shape):
        self.shape = x.shape
        return x.reshape(shape)

    def backward(self, g):
        return g.reshape(self.shape)


class Permute(Function):
    def forward(self, x, *, axes):
        self.axes = axes
        return x.transpose(axes)

    def backward(self, g):
        inverse = [0] * len(self.axes)
        for i, a in enumerate(self.axes):
            inverse[a] = i
        return g.transpose(inverse)


class BroadcastTo(Function):
    def forward(self, x, *, shape):
        self.shape = x.shape
        return get_array_module(x).broadcast_to(x, shape)

    def backward(self, g):
        return unbroadcast(g, self.shape)


def scatter_add(target, index, values):
    """target[index] += values, adding up repeated integer indices."""
    xp = get_array_module(target)
    if xp.__name__ == "numpy":
        xp.add.at(target, index, values)
    else:  # pragma: no cover - needs a GPU
        import cupyx

        cupyx.scatter_add(target, index, values)


class GetItem(Function):
    """x[index] for basic (slices, ints, None, ...) and integer/boolean array indices."""

    def forward(self, x, *, index, advanced):
        self.shape, self.dtype, self.index, self.advanced = x.shape, x.dtype, index, advanced
        return x[index]

    def backward(self, g):
        xp = get_array_module(g)
        gx = xp.zeros(self.shape, dtype=self.dtype)
        if self.advanced:  # the same element may be picked twice: add, don't assign
            scatter_add(gx, self.index, g)
        else:
            gx[self.index] = g
        return gx


class Concat(Function):
    def forward(self, *xs, axis):
        self.axis = axis
        self.sizes = [x.shape[axis] for x in xs]
        return get_array_module(*xs).concatenate(xs, axis=axis)

    def backward(self, g):
        grads, start = [], 0
        for n in self.sizes:
            index = [slice(None)] * g.ndim
            index[self.axis] = slice(start, start + n)
            grads.append(g[tuple(index)])
            start += n
        return tuple(grads)


class Stack(Function):
    def forward(self, *xs, axis):
        self.axis, self.count = axis, len(xs)
        return get_array_module(*xs).stack(xs, axis=axis)

    def backward(self, g):
        xp = get_array_module(g)
        return tuple(xp.take(g, i, axis=self.axis) for i in range(self.count))


class Pad(Function):
    """Constant padding; ``pad_width`` is ((before, after), ...) for every axis."""

    def forward(self, x, *, pad_width, value):
        self.crop = tuple(slice(b, b + n) for (b, _), n in zip(pad_width, x.shape))
        return get_array_module(x).pad(x, pad_width, mode="constant", constant_values=value)

    def backward(self, g):
        return g[self.crop]
