"""Resampling ops on NCHW images: nearest upsampling, average pooling."""

from __future__ import annotations

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


class AvgPool2d(Function):
    """Mean over kH x kW windows; zero padding counts in the mean (as in PyTorch)."""

    def forward(self, x, *, kernel, stride, padding):
        xp = get_array_module(x)
        (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
        self.kernel, self.stride, self.padding, self.shape = kernel, stride, padding, x.shape
        xpad = xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x
        ho = (xpad.shape[2] - kh) // sh + 1
        wo = (xpad.shape[3] - kw) // sw + 1
        self.out_hw = ho, wo
        y = xp.zeros(x.shape[:2] + (ho, wo), dtype=x.dtype)
        for i in range(kh):  # a loop over window offsets, never over pixels
            for j in range(kw):
                y += xpad[:, :, i : i + sh * ho : sh, j : j + sw * wo : sw]
        return y / (kh * kw)

    def backward(self, g):
        xp = get_array_module(g)
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        n, c, h, w = self.shape
        ho, wo = self.out_hw
        gpad = xp.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=g.dtype)
        g = g / (kh * kw)
        for i in range(kh):
            for j in range(kw):
                gpad[:, :, i : i + sh * ho : sh, j : j + sw * wo : sw] += g
        return gpad[:, :, ph : ph + h, pw : pw + w]
