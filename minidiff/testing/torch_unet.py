"""A PyTorch reference of the DDPM U-Net (Ho et al. 2020, Appendix B): the oracle of the U-Net's
tests and the other side of the U-Net benchmark (minidiff.bench.unet). Needs PyTorch, which
minidiff itself does not: import this module only where torch is installed.

Written from the paper's description, not from minidiff/models/unet.py:

* timestep embedding: sinusoidal, [sin(t f), cos(t f)] with f_i = exp(-ln(10000) i / (half - 1)),
  then Linear(ch, 4ch), SiLU, Linear(4ch, 4ch); an optional class embedding
  Embedding(num_classes + 1, 4ch) is added to it (the last class is the "null" class);
* conv_in 3x3; per resolution level ``num_res_blocks`` residual blocks (followed by single-head
  self-attention at the resolutions listed in ``attn_resolutions``) and a stride-2 3x3
  downsampling conv (except at the last level); every output on the way down is kept as a skip;
* middle: ResBlock, attention, ResBlock;
* per level on the way up ``num_res_blocks + 1`` residual blocks, each taking the concatenation
  of the running features and one skip, then nearest x2 upsampling + 3x3 conv (except at the
  first level);
* GroupNorm, SiLU, conv 3x3 out.

ResBlock: GroupNorm, SiLU, conv3x3, + Linear(SiLU(temb)) per channel, GroupNorm, SiLU, dropout,
conv3x3, + the input (through a 1x1 conv when the channel count changes).

Attributes are registered in the order (and under the names) of minidiff's UNet, so that both
frameworks' ``named_parameters()`` walk the same tensors in the same order.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as TF


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    i = torch.arange(half, dtype=torch.float64)
    freqs = torch.exp(-math.log(10000.0) * i / (half - 1))
    angles = t.to(torch.float64)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2:
        emb = TF.pad(emb, (0, 1))
    return emb


class TorchResBlock(nn.Module):
    def __init__(self, in_ch, out_ch, temb_ch, dropout, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.temb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(TF.silu(self.norm1(x)))
        h = h + self.temb_proj(TF.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(TF.silu(self.norm2(h))))
        shortcut = x if self.skip is None else self.skip(x)
        return shortcut + h


class TorchAttention(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # diffusers' key: to_out.0

    def forward(self, x):
        n, c, h, w = x.shape
        y = self.norm(x).reshape(n, c, h * w).transpose(1, 2)  # (N, HW, C)
        q, k, v = self.to_q(y), self.to_k(y), self.to_v(y)
        scores = torch.einsum("nic,njc->nij", q, k) / math.sqrt(c)  # (N, HW query, HW key)
        weights = torch.softmax(scores, dim=-1)
        out = self.to_out[0](torch.einsum("nij,njc->nic", weights, v))
        return x + out.transpose(1, 2).reshape(n, c, h, w)


class TorchResAttention(nn.Module):
    def __init__(self, block, attn):
        super().__init__()
        self.block = block
        self.attn = attn

    def forward(self, x, temb):
        h = self.block(x, temb)
        return h if self.attn is None else self.attn(h)


class TorchDownsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class TorchUpsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(TF.interpolate(x, scale_factor=2, mode="nearest"))


class TorchUNet(nn.Module):
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
    ):
        super().__init__()
        ch, temb_ch = base_channels, 4 * base_channels
        self.base_channels = base_channels
        self.temb_dense0 = nn.Linear(ch, temb_ch)
        self.temb_dense1 = nn.Linear(temb_ch, temb_ch)
        self.class_emb = nn.Embedding(num_classes + 1, temb_ch) if num_classes else None
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)

        def res_attn(cin, cout, resolution):
            attn = TorchAttention(cout, norm_groups) if resolution in attn_resolutions else None
            return TorchResAttention(TorchResBlock(cin, cout, temb_ch, dropout, norm_groups), attn)

        self.down = nn.ModuleList()
        skip_channels = [ch]
        cur, resolution = ch, image_size
        levels = len(channel_mults)
        for level in range(levels):
            out = ch * channel_mults[level]
            for _ in range(num_res_blocks):
                self.down.append(res_attn(cur, out, resolution))
                cur = out
                skip_channels.append(cur)
            if level < levels - 1:
                self.down.append(TorchDownsample(cur))
                skip_channels.append(cur)
                resolution //= 2

        self.mid_block1 = TorchResBlock(cur, cur, temb_ch, dropout, norm_groups)
        self.mid_attn = TorchAttention(cur, norm_groups)
        self.mid_block2 = TorchResBlock(cur, cur, temb_ch, dropout, norm_groups)

        self.up = nn.ModuleList()
        for level in range(levels - 1, -1, -1):
            out = ch * channel_mults[level]
            for _ in range(num_res_blocks + 1):
                self.up.append(res_attn(cur + skip_channels.pop(), out, resolution))
                cur = out
            if level > 0:
                self.up.append(TorchUpsample(cur))
                resolution *= 2
        assert not skip_channels
        self.norm_out = nn.GroupNorm(norm_groups, cur)
        self.conv_out = nn.Conv2d(cur, in_channels, 3, padding=1)

    def forward(self, x, t, y=None):
        temb = sinusoidal_embedding(t, self.base_channels).to(x.dtype)
        temb = self.temb_dense1(TF.silu(self.temb_dense0(temb)))
        if self.class_emb is not None:
            temb = temb + self.class_emb(y)
        h = self.conv_in(x)
        skips = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, TorchResAttention) else layer(h)
            skips.append(h)
        h = self.mid_block1(h, temb)
        h = self.mid_attn(h)
        h = self.mid_block2(h, temb)
        for layer in self.up:
            if isinstance(layer, TorchResAttention):
                h = layer(torch.cat([h, skips.pop()], dim=1), temb)
            else:
                h = layer(h)
        assert not skips
        return self.conv_out(TF.silu(self.norm_out(h)))
