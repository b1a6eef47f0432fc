"""Layers: thin Modules around minidiff.functional.

Weights start as in PyTorch: uniform in +-1/sqrt(fan_in). Pass ``rng`` (a
numpy Generator) to make the initialization reproducible. Inside
``without_init()`` the weights are left uninitialized instead (for a model whose
weights are loaded right after: drawing 860M random numbers first costs seconds).
"""

from __future__ import annotations

import contextlib
import math
import threading

import numpy as np

from .. import functional as F
from ..backend import DEFAULT_DTYPE
from .module import Module, Parameter

_state = threading.local()


@contextlib.contextmanager
def without_init():
    """Layers built inside allocate their weights without drawing or filling them."""
    before = getattr(_state, "skip", False)
    _state.skip = True
    try:
        yield
    finally:
        _state.skip = before


def _skipped(shape, dtype):
    if getattr(_state, "skip", False):
        # from_array, not Parameter(...): that copies, and a copy touches every page of memory
        # that np.empty leaves unmapped until the loaded weights replace it.
        return Parameter.from_array(np.empty(shape, dtype=dtype or DEFAULT_DTYPE), requires_grad=True)
    return None


def _uniform(rng, shape, bound, dtype):
    param = _skipped(shape, dtype)
    if param is not None:
        return param
    rng = rng if rng is not None else np.random.default_rng()
    return Parameter(rng.uniform(-bound, bound, size=shape), dtype=dtype or DEFAULT_DTYPE)


def _normal(rng, shape, dtype):
    param = _skipped(shape, dtype)
    if param is not None:
        return param
    rng = rng if rng is not None else np.random.default_rng()
    return Parameter(rng.standard_normal(shape), dtype=dtype or DEFAULT_DTYPE)


def _zeros(shape, dtype):
    param = _skipped(shape, dtype)
    return param if param is not None else Parameter(np.zeros(shape), dtype=dtype or DEFAULT_DTYPE)


def _ones(shape, dtype):
    param = _skipped(shape, dtype)
    return param if param is not None else Parameter(np.ones(shape), dtype=dtype or DEFAULT_DTYPE)


class Linear(Module):
    def __init__(self, in_features, out_features, bias=True, rng=None, dtype=None):
        bound = 1 / math.sqrt(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.weight = _uniform(rng, (out_features, in_features), bound, dtype)
        self.bias = _uniform(rng, (out_features,), bound, dtype) if bias else None

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}, bias={self.bias is not None}"


class Conv2d(Module):
    def __init__(
        self, in_channels, out_channels, kernel_size, stride=1, padding=0, bias=True, rng=None, dtype=None
    ):
        k = kernel_size
        bound = 1 / math.sqrt(in_channels * k * k)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = k, stride, padding
        self.weight = _uniform(rng, (out_channels, in_channels, k, k), bound, dtype)
        self.bias = _uniform(rng, (out_channels,), bound, dtype) if bias else None

    def forward(self, x):
        return F.conv2d(x, self.weight, self.bias, stride=self.stride, padding=self.padding)

    def extra_repr(self):
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}"
        )


class GroupNorm(Module):
    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=None):
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: {num_groups} groups do not divide {num_channels} channels")
        self.num_groups, self.num_channels, self.eps = num_groups, num_channels, eps
        self.weight = _ones((num_channels,), dtype) if affine else None
        self.bias = _zeros((num_channels,), dtype) if affine else None

    def forward(self, x):
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}"


class LayerNorm(Module):
    def __init__(self, normalized_shape, eps=1e-5, dtype=None):
        shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.normalized_shape, self.eps = shape, eps
        self.weight, self.bias = _ones(shape, dtype), _zeros(shape, dtype)

    def forward(self, x):
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class Embedding(Module):
    def __init__(self, num_embeddings, dim, rng=None, dtype=None):
        self.weight = _normal(rng, (num_embeddings, dim), dtype)

    def forward(self, indices):
        return F.embedding(indices, self.weight)


class Dropout(Module):
    """Dropout in training mode, the identity in eval mode. ``rng`` makes the
    masks reproducible."""

    def __init__(self, p=0.5, rng=None):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1], got {p}")
        self.p = p
        self.rng = rng if rng is not None else np.random.default_rng()

    def forward(self, x):
        return F.dropout(x, self.p, training=self.training, generator=self.rng)

    def extra_repr(self):
        return f"p={self.p}"


class SiLU(Module):
    def forward(self, x):
        return F.silu(x)


class Identity(Module):
    def forward(self, x):
        return x


class Sequential(Module):
    def __init__(self, *layers):
        self.layers = list(layers)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x
