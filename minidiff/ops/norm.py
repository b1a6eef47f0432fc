"""Normalization: group norm (a fused kernel) and layer norm."""

from __future__ import annotations

from .. import kernels
from ..autograd import Function
from ..backend import get_array_module


class GroupNorm(Function):
    """Normalize each (sample, group of channels) to zero mean and unit variance,
    then scale and shift per channel. See minidiff/kernels/norm.py."""

    def forward(self, x, weight, bias, *, groups, eps):
        y, mean, rstd = kernels.group_norm_forward(x, weight, bias, groups, eps)
        self.save_for_backward(x, weight, mean, rstd)
        self.groups = groups
        self.has_bias = bias is not None
        return y

    def backward(self, gy):
        x, weight, mean, rstd = self.saved
        gx, gw, gb = kernels.group_norm_backward(gy, x, weight, mean, rstd, self.groups)
        return gx, gw, (gb if self.has_bias else None)


class LayerNorm(Function):
    """Normalize over the last ``len(normalized_shape)`` axes."""

    def forward(self, x, weight, bias, *, axes, eps):
        xp = get_array_module(x)
        centered = x - x.mean(axis=axes, keepdims=True)
        # The mean rounded to x's dtype is off by up to half an ulp of |mean|, which is large
        # against the deviations when |mean| >> std; the mean of the centered values measures
        # that error, and subtracting it leaves deviations accurate to their own precision.
        centered -= centered.mean(axis=axes, keepdims=True)
        rstd = 1 / xp.sqrt((centered * centered).mean(axis=axes, keepdims=True) + eps)
        xhat = centered * rstd
        self.save_for_backward(xhat, rstd, weight)
        self.axes, self.has_bias = axes, bias is not None
        y = xhat if weight is None else xhat * weight
        return y if bias is None else y + bias

    def backward(self, g):
        xhat, rstd, weight = self.saved
        lead = tuple(range(g.ndim - len(self.axes)))
        gxhat = g if weight is None else g * weight
        gx = rstd * (
            gxhat
            - gxhat.mean(axis=self.axes, keepdims=True)
            - xhat * (gxhat * xhat).mean(axis=self.axes, keepdims=True)
        )
        gw = (g * xhat).sum(axis=lead) if weight is not None else None
        gb = g.sum(axis=lead) if self.has_bias else None
        return gx, gw, gb


class GroupNormSiLU(Function):
    """silu(group_norm(x + shift)) in one kernel; shift (N, C) is optional."""

    def forward(self, x, weight, bias, shift, *, groups, eps):
        y, mean, rstd = kernels.group_norm_silu_forward(x, weight, bias, shift, groups, eps)
        self.save_for_backward(x, weight, bias, shift, mean, rstd)
        self.groups = groups
        return y

    def backward(self, gy):
        x, weight, bias, shift, mean, rstd = self.saved
        return kernels.group_norm_silu_backward(gy, x, weight, bias, shift, mean, rstd, self.groups)
