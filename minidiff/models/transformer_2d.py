"""The Stable Diffusion U-Net's spatial transformer: diffusers' Transformer2DModel on a feature map
(continuous input), with diffusers' attribute names so its checkpoint keys load by name.

    x ─▶ GroupNorm ─▶ proj_in ─▶ tokens (N, H*W, inner) ─▶ BasicTransformerBlock x num_layers
      ─▶ proj_out ─▶ back to (N, C, H, W) ─▶ + x

    BasicTransformerBlock   h += attn1(norm1(h))                  self-attention
                            h += attn2(norm2(h), context)         cross-attention over the text
                            h += ff(norm3(h))                     GEGLU feed-forward

proj_in and proj_out are 1x1 convolutions (SD 1.x) or Linear layers over the tokens
(``use_linear_projection``, SD 2.x): the same map, stored with different weight shapes.
"""

from __future__ import annotations

from .. import functional as F
from ..nn import Attention, Conv2d, Dropout, GroupNorm, LayerNorm, Linear, Module
from ..nn.attention import image_from_tokens, image_tokens


class GEGLU(Module):
    """value * gelu(gate), where ``proj`` (dim -> 2 * inner) gives [value, gate] (exact erf GELU)."""

    def __init__(self, dim_in, dim_out, rng=None, dtype=None):
        self.dim_out = dim_out
        self.proj = Linear(dim_in, 2 * dim_out, rng=rng, dtype=dtype)

    def forward(self, x):
        return F.geglu(self.proj(x))


class FeedForward(Module):
    """GEGLU to ``mult * dim``, dropout, Linear back to ``dim``; the list ``net`` gives diffusers'
    keys ``net.0.proj`` and ``net.2``."""

    def __init__(self, dim, mult=4, dropout=0.0, rng=None, dtype=None):
        inner = int(dim * mult)
        self.net = [
            GEGLU(dim, inner, rng=rng, dtype=dtype),
            Dropout(dropout, rng=rng),
            Linear(inner, dim, rng=rng, dtype=dtype),
        ]

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(Module):
    """Self-attention, cross-attention over ``context`` and a GEGLU feed-forward, each pre-normed
    by a LayerNorm and added back. ``cross_attention_dim=None`` leaves out the cross-attention
    (norm2, attn2); ``only_cross_attention`` makes attn1 attend over the context too."""

    def __init__(
        self,
        dim,
        num_attention_heads,
        attention_head_dim,
        dropout=0.0,
        cross_attention_dim=None,
        only_cross_attention=False,
        norm_eps=1e-5,
        rng=None,
        dtype=None,
    ):
        if only_cross_attention and cross_attention_dim is None:
            raise ValueError("BasicTransformerBlock: only_cross_attention needs a cross_attention_dim")
        self.only_cross_attention = only_cross_attention
        attention = dict(
            heads=num_attention_heads, head_dim=attention_head_dim, qkv_bias=False, rng=rng, dtype=dtype
        )
        self.norm1 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.attn1 = Attention(dim, cross_attention_dim if only_cross_attention else None, **attention)
        self.norm2 = self.attn2 = None
        if cross_attention_dim is not None:
            self.norm2 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
            self.attn2 = Attention(dim, cross_attention_dim, **attention)
        self.norm3 = LayerNorm(dim, eps=norm_eps, dtype=dtype)
        self.ff = FeedForward(dim, dropout=dropout, rng=rng, dtype=dtype)
        self.attn_dropout = Dropout(dropout, rng=rng)  # diffusers' to_out.1, after each attention

    def forward(self, x, context=None):
        if (self.attn2 is not None or self.only_cross_attention) and context is None:
            raise ValueError(
                "BasicTransformerBlock: cross-attention needs a context (N, L, cross_attention_dim)"
            )
        h = self.norm1(x)
        x = x + self.attn_dropout(self.attn1(h, context if self.only_cross_attention else None))
        if self.attn2 is not None:
            x = x + self.attn_dropout(self.attn2(self.norm2(x), context))
        return x + self.ff(self.norm3(x))


class Transformer2DModel(Module):
    """diffusers' Transformer2DModel for a feature map (N, in_channels, H, W): GroupNorm (eps 1e-6),
    proj_in to ``num_attention_heads * attention_head_dim``, ``num_layers`` BasicTransformerBlocks
    over the H*W tokens, proj_out, plus the input. ``upcast_attention`` is accepted: the attention
    already runs in the model's dtype (float32 or float64), never lower."""

    def __init__(
        self,
        num_attention_heads=16,
        attention_head_dim=88,
        in_channels=None,
        num_layers=1,
        dropout=0.0,
        norm_num_groups=32,
        cross_attention_dim=None,
        use_linear_projection=False,
        only_cross_attention=False,
        upcast_attention=False,
        rng=None,
        dtype=None,
    ):
        if in_channels is None:
            raise ValueError(
                "Transformer2DModel: in_channels is required (minidiff implements continuous input)"
            )
        inner = num_attention_heads * attention_head_dim
        self.in_channels, self.inner_dim = in_channels, inner
        self.use_linear_projection = use_linear_projection
        self.norm = GroupNorm(norm_num_groups, in_channels, eps=1e-6, dtype=dtype)
        if use_linear_projection:
            self.proj_in = Linear(in_channels, inner, rng=rng, dtype=dtype)
        else:
            self.proj_in = Conv2d(in_channels, inner, 1, rng=rng, dtype=dtype)
        self.transformer_blocks = [
            BasicTransformerBlock(
                inner,
                num_attention_heads,
                attention_head_dim,
                dropout=dropout,
                cross_attention_dim=cross_attention_dim,
                only_cross_attention=only_cross_attention,
                rng=rng,
                dtype=dtype,
            )
            for _ in range(num_layers)
        ]
        if use_linear_projection:
            self.proj_out = Linear(inner, in_channels, rng=rng, dtype=dtype)
        else:
            self.proj_out = Conv2d(inner, in_channels, 1, rng=rng, dtype=dtype)

    def forward(self, x, encoder_hidden_states=None):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Transformer2DModel: x must be (N, {self.in_channels}, H, W), got {x.shape}")
        _, _, height, width = x.shape
        h = self.norm(x)
        if self.use_linear_projection:
            h = self.proj_in(image_tokens(h))
        else:
            h = image_tokens(self.proj_in(h))
        for block in self.transformer_blocks:
            h = block(h, encoder_hidden_states)
        if self.use_linear_projection:
            h = image_from_tokens(self.proj_out(h), height, width)
        else:
            h = self.proj_out(image_from_tokens(h, height, width))
        return h + x
