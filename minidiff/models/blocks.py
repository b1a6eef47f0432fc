"""The convolutional blocks the Stable Diffusion U-Net and the KL autoencoder share, with
diffusers' attribute names (so ``down_blocks.0.resnets.1.conv1.weight`` loads by name).

    ResnetBlock2D   x ─▶ GroupNorm, SiLU, conv1 ─(+ time_emb_proj(silu(temb)))─▶ GroupNorm, SiLU,
                    dropout, conv2 ─▶ + (x or conv_shortcut(x)), divided by output_scale_factor
    Downsample2D    a 3x3 convolution at stride 2 (padding 0: the input padded right and bottom)
    Upsample2D      nearest-neighbour upsampling by 2, then a 3x3 convolution
"""

from __future__ import annotations

from .. import functional as F
from ..nn import Conv2d, Dropout, GroupNorm, Linear, Module


def norm_silu(norm: GroupNorm, x, shift=None):
    """silu(norm(x + shift)) in one fused kernel (F.group_norm_silu), shift (N, C) or None."""
    return F.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift)


class ResnetBlock2D(Module):
    """diffusers' ResnetBlock2D with ``time_embedding_norm="default"`` and SiLU: the residual
    block of both networks (``temb_channels=None``: no time embedding, as in the autoencoder)."""

    def __init__(
        self,
        in_channels,
        out_channels=None,
        temb_channels=512,
        groups=32,
        groups_out=None,
        eps=1e-6,
        dropout=0.0,
        output_scale_factor=1.0,
        rng=None,
        dtype=None,
    ):
        out_channels = in_channels if out_channels is None else out_channels
        groups_out = groups if groups_out is None else groups_out
        self.in_channels, self.out_channels = in_channels, out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = GroupNorm(groups, in_channels, eps=eps, dtype=dtype)
        self.conv1 = Conv2d(in_channels, out_channels, 3, padding=1, rng=rng, dtype=dtype)
        self.time_emb_proj = (
            Linear(temb_channels, out_channels, rng=rng, dtype=dtype) if temb_channels is not None else None
        )
        self.norm2 = GroupNorm(groups_out, out_channels, eps=eps, dtype=dtype)
        self.dropout = Dropout(dropout, rng=rng)
        self.conv2 = Conv2d(out_channels, out_channels, 3, padding=1, rng=rng, dtype=dtype)
        self.conv_shortcut = None  # the identity when the widths agree
        if in_channels != out_channels:
            self.conv_shortcut = Conv2d(in_channels, out_channels, 1, rng=rng, dtype=dtype)

    def forward(self, x, temb=None):
        h = self.conv1(norm_silu(self.norm1, x))
        shift = None
        if temb is not None:
            if self.time_emb_proj is None:
                raise ValueError("ResnetBlock2D: built with temb_channels=None, given a time embedding")
            shift = self.time_emb_proj(F.silu(temb))  # added per channel before norm2, fused
        h = self.conv2(self.dropout(norm_silu(self.norm2, h, shift=shift)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        out = skip + h
        return out if self.output_scale_factor == 1.0 else out / self.output_scale_factor


class Downsample2D(Module):
    """Halve H and W with a 3x3 convolution at stride 2. ``padding=0`` (the autoencoder's
    encoder) pads one zero row and column at the bottom and right first, as diffusers does."""

    def __init__(self, channels, out_channels=None, padding=1, rng=None, dtype=None):
        out_channels = channels if out_channels is None else out_channels
        self.padding = padding
        self.conv = Conv2d(channels, out_channels, 3, stride=2, padding=padding, rng=rng, dtype=dtype)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1)))
        return self.conv(x)


class Upsample2D(Module):
    """Double H and W (nearest neighbour), then a 3x3 convolution."""

    def __init__(self, channels, out_channels=None, rng=None, dtype=None):
        out_channels = channels if out_channels is None else out_channels
        self.conv = Conv2d(channels, out_channels, 3, padding=1, rng=rng, dtype=dtype)

    def forward(self, x):
        return self.conv(F.upsample_nearest2d(x, 2))
