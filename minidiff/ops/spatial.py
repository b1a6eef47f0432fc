"""Resampling ops on NCHW images: nearest upsampling, average and max pooling, bilinear resizing."""

from __future__ import annotations

import numpy as np

from ..autograd import Function
from ..backend import get_array_module


class UpsampleNearest2d(Function):
    """Repeat every pixel ``scale`` times along H and W."""

    def forward(self, x, *, scale):
        self.scale = scale
        xp = get_array_module(x)
        # two contiguous repeats: cheaper than copying a broadcast (N, C, H, s, W, s) view
        return xp.repeat(xp.repeat(x, scale, axis=3), scale, axis=2)

    def backward(self, g):
        n, c, hs, ws = g.shape
        s = self.scale
        h, w = hs // s, ws // s
        # Sum the s row copies (whole contiguous rows), then the s column copies: s + s strided
        # adds over whole rows, instead of NumPy's .sum(axis=(3, 5)) over the small strided axes.
        rows = g.reshape(n, c, h, s, ws)
        acc = rows[:, :, :, 0].copy()
        for i in range(1, s):
            acc += rows[:, :, :, i]
        cols = acc.reshape(n, c, h, w, s)
        out = cols[..., 0].copy()
        for j in range(1, s):
            out += cols[..., j]
        return out


def _windows(xpad, kernel, stride, out_hw):
    """The kH*kW strided views of the padded input, one per window offset: view (i, j)[.., r, c]
    is the element at offset (i, j) of output (r, c)'s window. Loops run over offsets, never pixels."""
    (kh, kw), (sh, sw), (ho, wo) = kernel, stride, out_hw
    for i in range(kh):
        for j in range(kw):
            yield xpad[:, :, i : i + sh * ho : sh, j : j + sw * wo : sw]


def _out_hw(h, w, kernel, stride, padding):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    return (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1


def _scatter(windows_grad, shape, kernel, stride, padding, out_hw, dtype, xp):
    """The adjoint of _windows: add each offset's gradient back at its input positions."""
    (ph, pw) = padding
    n, c, h, w = shape
    gpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=dtype)
    for view, g in zip(_windows(gpad, kernel, stride, out_hw), windows_grad):
        view += g  # within one offset the positions are distinct, so += cannot collide
    return gpad[:, :, ph : ph + h, pw : pw + w]


class AvgPool2d(Function):
    """Mean over kH x kW windows. With ``count_include_pad`` (PyTorch's default) the zero padding
    counts in the mean; without it each window is divided by the number of input pixels it covers
    (TensorFlow's average pool, which the FID Inception network uses)."""

    def forward(self, x, *, kernel, stride, padding, count_include_pad=True):
        xp = get_array_module(x)
        (kh, kw), (ph, pw) = kernel, padding
        self.kernel, self.stride, self.padding, self.shape = kernel, stride, padding, x.shape
        self.out_hw = _out_hw(x.shape[2], x.shape[3], kernel, stride, padding)
        xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        y = xp.zeros(x.shape[:2] + self.out_hw, dtype=x.dtype)
        for view in _windows(xpad, kernel, stride, self.out_hw):
            y += view
        if count_include_pad or not (ph or pw):
            self.divisor = kh * kw
        else:
            # the window sizes: the same pooling over ones inside the image, zeros in the padding
            inside = xp.pad(
                xp.ones((1, 1) + x.shape[2:], dtype=x.dtype), ((0, 0), (0, 0), (ph, ph), (pw, pw))
            )
            self.divisor = sum(_windows(inside, kernel, stride, self.out_hw))
        return y / self.divisor

    def backward(self, g):
        xp = get_array_module(g)
        g = g / self.divisor
        grads = [g] * (self.kernel[0] * self.kernel[1])
        return _scatter(grads, self.shape, self.kernel, self.stride, self.padding, self.out_hw, g.dtype, xp)


class MaxPool2d(Function):
    """Maximum over kH x kW windows; padding never wins (it is -inf). The gradient goes to the
    first maximum of each window in row-major order, as in PyTorch. Forward keeps only running
    maxima (what inference needs); backward finds the winning offsets again from the input."""

    def forward(self, x, *, kernel, stride, padding):
        xp = get_array_module(x)
        (ph, pw) = padding
        self.kernel, self.stride, self.padding, self.shape = kernel, stride, padding, x.shape
        self.out_hw = _out_hw(x.shape[2], x.shape[3], kernel, stride, padding)
        pad = ((0, 0), (0, 0), (ph, ph), (pw, pw))
        xpad = xp.pad(x, pad, constant_values=-xp.inf) if ph or pw else x
        views = _windows(xpad, kernel, stride, self.out_hw)
        y = next(views).copy()
        for view in views:
            xp.maximum(y, view, out=y)
        self.xpad, self.y = xpad, y
        return y

    def backward(self, g):
        xp = get_array_module(g)
        zero = xp.zeros((), dtype=g.dtype)
        taken = xp.zeros(self.y.shape, dtype=bool)  # windows whose first maximum is already found

        def grads():
            for view in _windows(self.xpad, self.kernel, self.stride, self.out_hw):
                first = (view == self.y) & ~taken  # ties: only the earliest offset in the window
                taken[...] |= first
                yield xp.where(first, g, zero)

        return _scatter(grads(), self.shape, self.kernel, self.stride, self.padding, self.out_hw, g.dtype, xp)


def bilinear_matrix(size_in, size_out, xp, dtype):
    """The (size_out, size_in) matrix of 1-D linear interpolation with align_corners=False:
    output pixel i samples the input at (i + 0.5) * size_in / size_out - 0.5, clamped at 0,
    between its two neighbours (the last one repeated at the edge); no antialiasing when it shrinks."""
    scale = size_in / size_out
    src = np.maximum((np.arange(size_out) + 0.5) * scale - 0.5, 0.0)
    lo = np.minimum(np.floor(src).astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = src - lo
    m = np.zeros((size_out, size_in))
    rows = np.arange(size_out)
    np.add.at(m, (rows, lo), 1 - frac)
    np.add.at(m, (rows, hi), frac)  # lo == hi at the edge: the two weights add up to 1
    return xp.asarray(m, dtype=dtype)


class ResizeBilinear(Function):
    """Bilinear resizing to ``size`` (PyTorch's interpolate(mode="bilinear", align_corners=False)).
    It is separable: y = A_h x A_w^T per image with the two interpolation matrices, so forward and
    backward are matrix products."""

    def forward(self, x, *, size):
        xp = get_array_module(x)
        n, c, h, w = x.shape
        (ho, wo) = size
        self.a_h = bilinear_matrix(h, ho, xp, x.dtype)
        self.a_w = bilinear_matrix(w, wo, xp, x.dtype)
        # two plain matrix products (batched small products are slower): rows first, on the
        # (usually smaller) input, with H leading; then columns
        rows = self.a_h @ xp.ascontiguousarray(x.transpose(2, 0, 1, 3)).reshape(h, n * c * w)
        y = rows.reshape(ho * n * c, w) @ self.a_w.T
        return xp.ascontiguousarray(y.reshape(ho, n, c, wo).transpose(1, 2, 0, 3))

    def backward(self, g):
        xp = get_array_module(g)
        n, c, ho, wo = g.shape
        h, w = self.a_h.shape[1], self.a_w.shape[1]
        cols = xp.ascontiguousarray(g).reshape(n * c * ho, wo) @ self.a_w
        cols = xp.ascontiguousarray(cols.reshape(n * c, ho, w).transpose(1, 0, 2)).reshape(ho, n * c * w)
        gx = self.a_h.T @ cols
        return xp.ascontiguousarray(gx.reshape(h, n, c, w).transpose(1, 2, 0, 3))
