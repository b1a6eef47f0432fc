"""The DDPM U-Net (Ho et al. 2020, Appendix B, and their reference code).

    x ──conv_in──▶ [ResBlock (+Attention)] x num_res_blocks, downsample ─┐  per level
                   middle: ResBlock, Attention, ResBlock                   │  skips
    out ◀─conv_out─ GroupNorm, SiLU ◀─ [ResBlock(concat skip) (+Attn)] x (num_res_blocks+1), upsample

Every ResBlock adds a per-channel projection of the timestep embedding (and
of the class embedding, when ``num_classes`` is set).
"""

from __future__ import annotations

import math

import numpy as np

from .. import functional as F
from ..nn import Attention, Conv2d, Dropout, Embedding, GroupNorm, Linear, Module
from ..nn.attention import image_from_tokens, image_tokens
from ..tensor import Tensor, as_tensor


def timestep_embedding(t, dim: int, xp=np, dtype=np.float32):
    """Sinusoidal embedding of integer timesteps t (N,) -> (N, dim), as in the DDPM code:
    [sin(t * f_0..f_{h-1}), cos(...)] with f_i = 10000^(-i/(h-1)), h = dim // 2."""
    half = dim // 2
    freqs = xp.exp(-math.log(10000.0) * xp.arange(half, dtype=np.float64) / (half - 1))
    args = xp.asarray(t, dtype=np.float64)[:, None] * freqs[None, :]
    emb = xp.concatenate([xp.sin(args), xp.cos(args)], axis=1)
    if dim % 2:
        emb = xp.pad(emb, ((0, 0), (0, 1)))
    return emb.astype(dtype)


def _zero_(param):
    """Zero a parameter in place: the DDPM code starts each block's last layer at zero,
    so every residual block begins as the identity."""
    param.data[...] = 0


def _norm_silu(norm: GroupNorm, x, shift=None):
    """silu(norm(x + shift)) in one fused kernel (F.group_norm_silu), shift (N, C) or None."""
    return F.group_norm_silu(x, norm.num_groups, norm.weight, norm.bias, norm.eps, shift=shift)


class ResBlock(Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout, groups, rng, dtype):
        self.norm1 = GroupNorm(groups, in_ch, dtype=dtype)
        self.conv1 = Conv2d(in_ch, out_ch, 3, padding=1, rng=rng, dtype=dtype)
        self.temb_proj = Linear(temb_ch, out_ch, rng=rng, dtype=dtype)
        self.norm2 = GroupNorm(groups, out_ch, dtype=dtype)
        self.dropout = Dropout(dropout, rng=rng)
        self.conv2 = Conv2d(out_ch, out_ch, 3, padding=1, rng=rng, dtype=dtype)
        _zero_(self.conv2.weight)
        _zero_(self.conv2.bias)
        self.skip = Conv2d(in_ch, out_ch, 1, rng=rng, dtype=dtype) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(_norm_silu(self.norm1, x))
        # the time embedding is added per channel inside the fused norm2 + SiLU
        h = self.conv2(self.dropout(_norm_silu(self.norm2, h, shift=self.temb_proj(F.silu(temb)))))
        return (self.skip(x) if self.skip is not None else x) + h


class AttentionBlock(Module):
    """Single-head self-attention over the H*W positions, with a residual."""

    def __init__(self, ch, groups, rng, dtype):
        self.norm = GroupNorm(groups, ch, dtype=dtype)
        self.attn = Attention(ch, rng=rng, dtype=dtype)
        _zero_(self.attn.to_out[0].weight)
        _zero_(self.attn.to_out[0].bias)

    def forward(self, x):
        _, _, h, w = x.shape
        return x + image_from_tokens(self.attn(image_tokens(self.norm(x))), h, w)


class ResAttention(Module):
    """A ResBlock, followed by self-attention at the resolutions that have it."""

    def __init__(self, block, attn):
        self.block, self.attn = block, attn

    def forward(self, x, temb):
        h = self.block(x, temb)
        return self.attn(h) if self.attn is not None else h


class Downsample(Module):
    def __init__(self, ch, rng, dtype):
        self.conv = Conv2d(ch, ch, 3, stride=2, padding=1, rng=rng, dtype=dtype)

    def forward(self, x):
        return self.conv(x)


class Upsample(Module):
    def __init__(self, ch, rng, dtype):
        self.conv = Conv2d(ch, ch, 3, padding=1, rng=rng, dtype=dtype)

    def forward(self, x):
        return self.conv(F.upsample_nearest2d(x, 2))


class UNet(Module):
    """The DDPM noise-prediction network: ``model(x, t, y=None) -> eps`` with x of
    shape (N, in_channels, image_size, image_size) and integer timesteps t (N,).

    ``UNet(3, 128, (1, 2, 2, 2), 2, (16,), 32)`` is the paper's 35.7M-parameter
    CIFAR-10 model. With ``num_classes`` set, class ``num_classes`` is the "null"
    class used for classifier-free guidance.
    """

    def __init__(
        self,
        in_channels,
        base_channels,
        channel_mults,
        num_res_blocks,
        attn_resolutions,
        image_size,
        dropout=0.0,
        norm_groups=32,
        num_classes=None,
        seed=0,
        dtype=None,
    ):
        ch = base_channels
        for m in channel_mults:
            if (ch * m) % norm_groups or ch % norm_groups:
                raise ValueError(
                    f"UNet: norm_groups={norm_groups} must divide every channel count "
                    f"({[ch * m for m in channel_mults]})"
                )
        if image_size % 2 ** (len(channel_mults) - 1):
            raise ValueError(
                f"UNet: image_size {image_size} must be divisible by 2**{len(channel_mults) - 1} "
                f"for {len(channel_mults)} resolution levels"
            )
        rng = np.random.default_rng(seed)
        self.config = dict(
            in_channels=in_channels,
            base_channels=base_channels,
            channel_mults=tuple(channel_mults),
            num_res_blocks=num_res_blocks,
            attn_resolutions=tuple(attn_resolutions),
            image_size=image_size,
            dropout=dropout,
            norm_groups=norm_groups,
            num_classes=num_classes,
        )
        temb_ch = 4 * ch
        self.temb_dense0 = Linear(ch, temb_ch, rng=rng, dtype=dtype)
        self.temb_dense1 = Linear(temb_ch, temb_ch, rng=rng, dtype=dtype)
        self.class_emb = Embedding(num_classes + 1, temb_ch, rng=rng, dtype=dtype) if num_classes else None
        self.conv_in = Conv2d(in_channels, ch, 3, padding=1, rng=rng, dtype=dtype)

        def block(i, o, resolution=None):
            attn = AttentionBlock(o, norm_groups, rng, dtype) if resolution in attn_resolutions else None
            return ResAttention(ResBlock(i, o, temb_ch, dropout, norm_groups, rng, dtype), attn)

        # Down path: remember the channel count of every skip connection.
        self.down, skips, c, res = [], [ch], ch, image_size
        for level, mult in enumerate(channel_mults):
            for _ in range(num_res_blocks):
                self.down.append(block(c, ch * mult, res))
                c = ch * mult
                skips.append(c)
            if level != len(channel_mults) - 1:
                self.down.append(Downsample(c, rng, dtype))
                skips.append(c)
                res //= 2
        self.mid_block1 = ResBlock(c, c, temb_ch, dropout, norm_groups, rng, dtype)
        self.mid_attn = AttentionBlock(c, norm_groups, rng, dtype)
        self.mid_block2 = ResBlock(c, c, temb_ch, dropout, norm_groups, rng, dtype)
        self.up = []
        for level, mult in reversed(list(enumerate(channel_mults))):
            for _ in range(num_res_blocks + 1):
                self.up.append(block(c + skips.pop(), ch * mult, res))
                c = ch * mult
            if level != 0:
                self.up.append(Upsample(c, rng, dtype))
                res *= 2
        self.norm_out = GroupNorm(norm_groups, c, dtype=dtype)
        self.conv_out = Conv2d(c, in_channels, 3, padding=1, rng=rng, dtype=dtype)
        _zero_(self.conv_out.weight)
        _zero_(self.conv_out.bias)

    def forward(self, x, t, y=None):
        n = x.shape[0]
        t_data = t.data if isinstance(t, Tensor) else np.asarray(t)
        if t_data.shape != (n,):
            raise ValueError(f"UNet: t must have shape ({n},) (one timestep per image), got {t_data.shape}")
        xp = x.device.xp
        temb = as_tensor(timestep_embedding(xp.asarray(t_data), self.temb_dense0.in_features, xp, x.dtype))
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        if self.class_emb is not None:
            if y is None:
                raise ValueError("UNet: this model is class-conditional; pass y (use num_classes for 'null')")
            temb = temb + self.class_emb(y)
        elif y is not None:
            raise ValueError("UNet: y was given but the model has no num_classes")

        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResAttention) else layer(h)
            hs.append(h)
        h = self.mid_block2(self.mid_attn(self.mid_block1(h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, ResAttention):
                h = layer(F.concat([h, hs.pop()], axis=1), temb)
            else:
                h = layer(h)
        return self.conv_out(_norm_silu(self.norm_out, h))
