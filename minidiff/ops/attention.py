"""Softmax, log-softmax, and attention without the score matrix.

``functional.scaled_dot_product_attention`` runs ``Attention`` below when there is no mask, and
composes matmul, masking and ``Softmax`` when there is one.
"""

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


class Attention(Function):
    """softmax(scale * q k^T) v over q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv), fused: the
    kernels walk the keys in tiles and keep only each row's log-sum-exp for the backward, never
    the (..., Lq, Lk) scores (see minidiff/kernels/attention.py)."""

    def forward(self, q, k, v, *, scale):
        lead = q.shape[:-2]
        flat = [a.reshape((-1,) + a.shape[-2:]) for a in (q, k, v)]
        out, lse = kernels.attention_forward(*flat, scale)
        self.save_for_backward(*flat, out, lse)
        self.lead, self.scale = lead, scale
        return out.reshape(lead + out.shape[1:])

    def backward(self, g):
        q, k, v, out, lse = self.saved
        g = g.reshape(out.shape)
        grads = kernels.attention_backward(g, q, k, v, out, lse, self.scale)
        return tuple(gr.reshape(self.lead + gr.shape[1:]) for gr in grads)
