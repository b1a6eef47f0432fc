"""Normalization: group norm (a fused kernel) and layer norm."""

from __future__ import annotations

import math

from .. import kernels
from ..autograd import Function


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
    """Normalize over the last ``len(normalized_shape)`` axes (flattened into rows of D for the
    kernels of minidiff/kernels/norm.py)."""

    def forward(self, x, weight, bias, *, axes, eps):
        D = math.prod(x.shape[x.ndim - len(axes) :])
        rows = x.reshape(-1, D)
        flat = [None if a is None else a.reshape(D) for a in (weight, bias)]
        y, xhat, rstd = kernels.layer_norm_forward(rows, *flat, eps)
        self.save_for_backward(xhat, rstd, flat[0])
        self.shape, self.has_bias = x.shape, bias is not None
        self.affine_shape = tuple(x.shape[x.ndim - len(axes) :])
        return y.reshape(x.shape)

    def backward(self, g):
        xhat, rstd, weight = self.saved
        gx, gw, gb = kernels.layer_norm_backward(g.reshape(xhat.shape), xhat, rstd, weight, self.has_bias)
        return (
            gx.reshape(self.shape),
            None if gw is None else gw.reshape(self.affine_shape),
            None if gb is None else gb.reshape(self.affine_shape),
        )


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
