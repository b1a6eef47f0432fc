"""Multi-head attention, written once for every model that attends.

``Attention(dim)`` is self-attention over a sequence (N, L, dim); given a ``context``
(N, Lc, context_dim) it is cross-attention: queries from the sequence, keys and values from
the context (the text, in a text-conditioned U-Net). The heads split the projected width:
(N, L, heads * head_dim) -> (N, heads, L, head_dim), one scaled dot-product attention over all
of them, then back and through the output projection. The projections carry diffusers' names
(``to_q``, ``to_k``, ``to_v``, and ``to_out.0``: diffusers keeps the output projection in a list
beside its dropout), or with ``names="transformers"`` those of transformers' CLIP (``q_proj``,
``k_proj``, ``v_proj``, ``out_proj``), so that either checkpoint loads by name.

Image models attend over the H*W positions of a feature map: ``image_tokens`` and
``image_from_tokens`` convert (N, C, H, W) <-> (N, H*W, C).
"""

from __future__ import annotations

import numpy as np

from .. import functional as F
from ..tensor import Tensor
from .layers import Linear
from .module import Module


def image_tokens(x):
    """(N, C, H, W) -> (N, H*W, C): one token per position."""
    n, c, h, w = x.shape
    return F.permute(F.reshape(x, (n, c, h * w)), (0, 2, 1))


def image_from_tokens(tokens, height, width):
    """(N, H*W, C) -> (N, C, H, W), the inverse of ``image_tokens``."""
    n, _, c = tokens.shape
    return F.reshape(F.permute(tokens, (0, 2, 1)), (n, c, height, width))


class Attention(Module):
    """softmax(Q K^T / sqrt(head_dim)) V per head, Q = to_q(x), K, V = to_k, to_v(context or x).

    ``heads * head_dim`` is the inner width (``dim`` with one head by default); ``qkv_bias``
    gives the three input projections biases (the DDPM U-Net, the autoencoder and CLIP have
    them, the Stable Diffusion U-Net does not). ``causal=True`` lets position i attend only to
    positions <= i (a text encoder's self-attention).
    """

    def __init__(
        self,
        dim,
        context_dim=None,
        heads=1,
        head_dim=None,
        qkv_bias=True,
        names="diffusers",
        rng=None,
        dtype=None,
    ):
        if heads < 1 or (head_dim is None and dim % heads):
            raise ValueError(f"Attention: {heads} heads do not divide the width {dim}")
        if names not in ("diffusers", "transformers"):
            raise ValueError(f"Attention: names must be 'diffusers' or 'transformers', got {names!r}")
        self.heads = heads
        self.head_dim = head_dim if head_dim is not None else dim // heads
        self.names = names
        inner = heads * self.head_dim
        context_dim = dim if context_dim is None else context_dim
        q = Linear(dim, inner, bias=qkv_bias, rng=rng, dtype=dtype)
        k = Linear(context_dim, inner, bias=qkv_bias, rng=rng, dtype=dtype)
        v = Linear(context_dim, inner, bias=qkv_bias, rng=rng, dtype=dtype)
        out = Linear(inner, dim, rng=rng, dtype=dtype)
        if names == "diffusers":
            self.to_q, self.to_k, self.to_v, self.to_out = q, k, v, [out]
        else:
            self.q_proj, self.k_proj, self.v_proj, self.out_proj = q, k, v, out

    @property
    def projections(self):
        """(query, key, value, output) projections, whatever their names."""
        if self.names == "diffusers":
            return self.to_q, self.to_k, self.to_v, self.to_out[0]
        return self.q_proj, self.k_proj, self.v_proj, self.out_proj

    def _split_heads(self, t):  # (N, L, heads * head_dim) -> (N, heads, L, head_dim)
        n, length, _ = t.shape
        if self.heads == 1:
            return t
        return F.permute(F.reshape(t, (n, length, self.heads, self.head_dim)), (0, 2, 1, 3))

    def _merge_heads(self, t):  # the inverse of _split_heads
        if self.heads == 1:
            return t
        n, _, length, _ = t.shape
        return F.reshape(F.permute(t, (0, 2, 1, 3)), (n, length, self.heads * self.head_dim))

    @staticmethod
    def _causal_mask(lq, lk, mask, xp):
        """True where query i may attend key j (j <= i, aligned at the end), and ``mask``."""
        allowed = xp.asarray(np.tril(np.ones((lq, lk), dtype=bool), k=lk - lq))
        if mask is None:
            return allowed
        given = mask.data if isinstance(mask, Tensor) else xp.asarray(mask)
        if given.dtype != np.bool_:
            raise ValueError(f"Attention: causal=True combines with a boolean mask only, got {given.dtype}")
        return allowed & given

    def forward(self, x, context=None, mask=None, causal=False):
        to_q, to_k, to_v, to_out = self.projections
        if x.ndim != 3:
            raise ValueError(f"Attention: x must be (N, L, {to_q.in_features}), got {x.shape}")
        context = x if context is None else context
        if context.ndim != 3 or context.shape[-1] != to_k.in_features:
            raise ValueError(f"Attention: context must be (N, Lc, {to_k.in_features}), got {context.shape}")
        q = self._split_heads(to_q(x))
        k = self._split_heads(to_k(context))
        v = self._split_heads(to_v(context))
        if causal:
            mask = self._causal_mask(q.shape[-2], k.shape[-2], mask, x.device.xp)
        out = F.scaled_dot_product_attention(q, k, v, mask=mask)
        return to_out(self._merge_heads(out))
