"""Stable Diffusion's KL autoencoder (diffusers' ``AutoencoderKL``), with diffusers' attribute
names, so the ``vae`` folder of a Stable Diffusion checkpoint loads by name.

    encode  x ─conv_in─▶ [DownEncoderBlock2D: resnets, downsample] per level ─▶ mid_block
            ─▶ GroupNorm, SiLU, conv_out ─▶ quant_conv ─▶ moments (N, 2 * latent, h, w)
            ─▶ DiagonalGaussian(mean, logvar)
    decode  z ─post_quant_conv─▶ conv_in ─▶ mid_block ─▶ [UpDecoderBlock2D: resnets, upsample]
            per level, widest first ─▶ GroupNorm, SiLU, conv_out ─▶ image

The mid block is a residual block, a single-head self-attention over the h*w positions
(group-normalized input, residual connection), and another residual block.
"""

from __future__ import annotations

import math
import numbers
import re

import numpy as np

from .. import functional as F
from ..nn import Attention, Conv2d, GroupNorm, Module
from ..nn.attention import image_from_tokens, image_tokens
from ..nn.pretrained import Pretrained, config_error
from ..tensor import tensor
from .blocks import Downsample2D, ResnetBlock2D, Upsample2D, norm_silu

EPS = 1e-6  # every norm of the autoencoder, as diffusers builds it
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' clamp: keeps exp(logvar) finite in float16 and float32


class SpatialSelfAttention(Attention):
    """Self-attention over the positions of a feature map (N, C, H, W): a group norm, the
    attention over the H*W tokens, then the input added back and the sum divided by
    ``rescale_output_factor`` (diffusers' ``Attention`` with ``norm_num_groups`` and
    ``residual_connection=True``)."""

    def __init__(self, channels, head_dim, groups, eps=EPS, rescale_output_factor=1.0, rng=None, dtype=None):
        super().__init__(channels, heads=channels // head_dim, head_dim=head_dim, rng=rng, dtype=dtype)
        self.group_norm = GroupNorm(groups, channels, eps=eps, dtype=dtype)
        self.rescale_output_factor = rescale_output_factor

    def forward(self, x):
        _, _, height, width = x.shape
        # diffusers normalizes the (N, C, H*W) view: the same groups as the 4-D map
        tokens = image_tokens(self.group_norm(x))
        out = image_from_tokens(super().forward(tokens), height, width) + x
        return out if self.rescale_output_factor == 1.0 else out / self.rescale_output_factor


def _resnets(in_channels, out_channels, num_layers, groups, rng, dtype):
    """``num_layers`` residual blocks without a time embedding, the first from ``in_channels``."""
    return [
        ResnetBlock2D(
            in_channels if i == 0 else out_channels,
            out_channels,
            temb_channels=None,
            groups=groups,
            eps=EPS,
            rng=rng,
            dtype=dtype,
        )
        for i in range(num_layers)
    ]


def _in_turn(x, *stages):
    """x through every module of each stage in turn (a stage: a list of modules, or None)."""
    for stage in stages:
        for module in stage or ():
            x = module(x)
    return x


class UNetMidBlock2D(Module):
    """resnets.0, then (attentions.0, resnets.1): diffusers' mid block without a time
    embedding; ``add_attention=False`` leaves the attention out."""

    def __init__(self, channels, groups, add_attention=True, rng=None, dtype=None):
        self.resnets = _resnets(channels, channels, 2, groups, rng, dtype)
        # diffusers' heads: channels // attention_head_dim with attention_head_dim = channels
        attention = (
            SpatialSelfAttention(channels, channels, groups, rng=rng, dtype=dtype) if add_attention else None
        )
        self.attentions = [attention]

    def forward(self, x):
        x = self.resnets[0](x)
        for attention, resnet in zip(self.attentions, self.resnets[1:]):
            if attention is not None:
                x = attention(x)
            x = resnet(x)
        return x


class DownEncoderBlock2D(Module):
    """``num_layers`` residual blocks, then (unless the last level) a stride-2 convolution."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample, rng=None, dtype=None):
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups, rng, dtype)
        self.downsamplers = (
            [Downsample2D(out_channels, out_channels, padding=0, rng=rng, dtype=dtype)]
            if add_downsample
            else None
        )

    def forward(self, x):
        return _in_turn(x, self.resnets, self.downsamplers)


class UpDecoderBlock2D(Module):
    """``num_layers`` residual blocks, then (unless the last level) an upsampling."""

    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample, rng=None, dtype=None):
        self.resnets = _resnets(in_channels, out_channels, num_layers, groups, rng, dtype)
        self.upsamplers = (
            [Upsample2D(out_channels, out_channels, rng=rng, dtype=dtype)] if add_upsample else None
        )

    def forward(self, x):
        return _in_turn(x, self.resnets, self.upsamplers)


class Encoder(Module):
    """Image (N, in_channels, H, W) -> moments (N, 2 * latent_channels, H / 2^(L-1), W / 2^(L-1))."""

    def __init__(
        self,
        in_channels,
        latent_channels,
        block_out_channels,
        layers_per_block,
        groups,
        mid_block_add_attention=True,
        rng=None,
        dtype=None,
    ):
        widths = list(block_out_channels)
        self.conv_in = Conv2d(in_channels, widths[0], 3, padding=1, rng=rng, dtype=dtype)
        self.down_blocks = [
            DownEncoderBlock2D(
                widths[max(i - 1, 0)],
                width,
                layers_per_block,
                groups,
                add_downsample=i < len(widths) - 1,
                rng=rng,
                dtype=dtype,
            )
            for i, width in enumerate(widths)
        ]
        self.mid_block = UNetMidBlock2D(widths[-1], groups, mid_block_add_attention, rng=rng, dtype=dtype)
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(widths[-1], 2 * latent_channels, 3, padding=1, rng=rng, dtype=dtype)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class Decoder(Module):
    """Latent (N, latent_channels, h, w) -> image (N, out_channels, h * 2^(L-1), w * 2^(L-1)); the
    levels run widest first, each with ``layers_per_block + 1`` residual blocks."""

    def __init__(
        self,
        latent_channels,
        out_channels,
        block_out_channels,
        layers_per_block,
        groups,
        mid_block_add_attention=True,
        rng=None,
        dtype=None,
    ):
        widths = list(reversed(block_out_channels))
        self.conv_in = Conv2d(latent_channels, widths[0], 3, padding=1, rng=rng, dtype=dtype)
        self.mid_block = UNetMidBlock2D(widths[0], groups, mid_block_add_attention, rng=rng, dtype=dtype)
        self.up_blocks = [
            UpDecoderBlock2D(
                widths[max(i - 1, 0)],
                width,
                layers_per_block + 1,
                groups,
                add_upsample=i < len(widths) - 1,
                rng=rng,
                dtype=dtype,
            )
            for i, width in enumerate(widths)
        ]
        self.conv_norm_out = GroupNorm(groups, widths[-1], eps=EPS, dtype=dtype)
        self.conv_out = Conv2d(widths[-1], out_channels, 3, padding=1, rng=rng, dtype=dtype)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(norm_silu(self.conv_norm_out, x))


class DiagonalGaussian:
    """The posterior N(mean, diag(exp(logvar))) from moments (N, 2 * latent, h, w): the first
    half of the channels is the mean, the second the log-variance, clamped to [-30, 20].
    Everything is a differentiable Tensor, so a KL term can train the encoder."""

    def __init__(self, moments):
        half = moments.shape[1] // 2
        self.moments = moments
        self.mean = moments[:, :half]
        self.logvar = F.clip(moments[:, half:], *LOGVAR_RANGE)
        self.std = F.exp(self.logvar * 0.5)
        self.var = F.exp(self.logvar)

    def sample(self, rng=None):
        """mean + std * noise, the noise a standard normal drawn from ``rng`` (a NumPy
        Generator; a fresh one if None) in the mean's dtype, on the mean's device."""
        rng = np.random.default_rng() if rng is None else rng
        dtype = self.mean.dtype
        draw_dtype = dtype if dtype in (np.float32, np.float64) else np.float32  # what Generator draws
        noise = rng.standard_normal(self.mean.shape, dtype=draw_dtype)
        return self.mean + self.std * tensor(noise, dtype=dtype, device=self.mean.device)

    def mode(self):
        return self.mean

    def kl(self, other=None):
        """KL(self || other), ``other`` N(0, I) by default, summed over (C, H, W): shape (N,)."""
        if other is None:
            terms = self.mean * self.mean + self.var - 1.0 - self.logvar
        else:
            diff = self.mean - other.mean
            terms = diff * diff / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar
        return F.sum(terms, axis=(1, 2, 3)) * 0.5

    def nll(self, sample, axis=(1, 2, 3)):
        """The negative log-likelihood of ``sample``, summed over ``axis``."""
        diff = sample - self.mean
        return F.sum(self.logvar + diff * diff / self.var + math.log(2.0 * math.pi), axis=axis) * 0.5


# -- the config --------------------------------------------------------------------------

DEFAULTS = {  # diffusers' AutoencoderKL defaults
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"],
    "block_out_channels": [64],
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "scaling_factor": 0.18215,
    "shift_factor": None,
    "latents_mean": None,
    "latents_std": None,
    "force_upcast": True,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "mid_block_add_attention": True,
}


def _is_int(value, minimum=1):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _checked_config(config, source) -> dict:
    """``config`` with diffusers' defaults filled in, every value checked; keys starting with
    ``_`` are diffusers' metadata (``_class_name``, ``_diffusers_version``, ...) and ignored."""
    if not isinstance(config, dict):
        raise config_error(source, "config", config, "a dict of AutoencoderKL's keys")
    unknown = [k for k in config if not str(k).startswith("_") and k not in DEFAULTS]
    if unknown:
        raise config_error(source, unknown[0], config[unknown[0]], f"the keys {', '.join(DEFAULTS)}")
    c = {**DEFAULTS, **{k: v for k, v in config.items() if k in DEFAULTS}}

    def refuse(key, supported):
        return config_error(source, key, c[key], supported)

    for key in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
        if not _is_int(c[key]):
            raise refuse(key, "a positive integer")
    widths = c["block_out_channels"]
    if not isinstance(widths, (list, tuple)) or not widths or not all(_is_int(w) for w in widths):
        raise refuse("block_out_channels", "a non-empty list of positive integers")
    if any(w % c["norm_num_groups"] for w in widths):
        raise refuse("norm_num_groups", f"a divisor of every block_out_channels entry {list(widths)}")
    for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        types = c[key]
        if (
            not isinstance(types, (list, tuple))
            or len(types) != len(widths)
            or any(t != block for t in types)
        ):
            raise refuse(key, f"{block} once per block_out_channels entry ({len(widths)})")
    if c["act_fn"] not in ("silu", "swish"):  # diffusers' two names of the same function
        raise refuse("act_fn", "'silu'")
    size = c["sample_size"]
    if not (
        _is_int(size) or (isinstance(size, (list, tuple)) and len(size) == 2 and all(map(_is_int, size)))
    ):
        raise refuse("sample_size", "a positive integer or a [height, width] pair")
    if not _is_number(c["scaling_factor"]):
        raise refuse("scaling_factor", "a number")
    if c["shift_factor"] is not None and not _is_number(c["shift_factor"]):
        raise refuse("shift_factor", "None or a number")
    for key in ("latents_mean", "latents_std"):
        value = c[key]
        if value is not None and not (
            isinstance(value, (list, tuple))
            and len(value) == c["latent_channels"]
            and all(map(_is_number, value))
        ):
            raise refuse(key, f"None or {c['latent_channels']} numbers (one per latent channel)")
    for key in ("force_upcast", "use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if not isinstance(c[key], bool):
            raise refuse(key, "true or false")
    return c


# Old autoencoder files name the mid-block attention's projections query, key, value and
# proj_attn (as diffusers' deprecated AttentionBlock did), sometimes as 1x1 convolutions.
_DEPRECATED_ATTENTION = re.compile(r"^(.*\.attentions\.\d+)\.(query|key|value|proj_attn)\.(weight|bias)$")
_ATTENTION_PROJECTION = re.compile(r"^.*\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$")
_NEW_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


class AutoencoderKL(Module, Pretrained):
    """The KL autoencoder: ``encode(x)`` -> DiagonalGaussian over latents, ``decode(z)`` ->
    image. The arguments are diffusers' (see ``DEFAULTS``); ``scaling_factor`` (and
    ``shift_factor``) are what a latent diffusion pipeline scales latents by, kept here."""

    def __init__(
        self,
        in_channels=3,
        out_channels=3,
        block_out_channels=(64,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=0.18215,
        shift_factor=None,
        latents_mean=None,
        latents_std=None,
        force_upcast=True,
        use_quant_conv=True,
        use_post_quant_conv=True,
        mid_block_add_attention=True,
        rng=None,
        dtype=None,
    ):
        arch = dict(
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, groups=norm_num_groups
        )
        self.encoder = Encoder(
            in_channels,
            latent_channels,
            **arch,
            mid_block_add_attention=mid_block_add_attention,
            rng=rng,
            dtype=dtype,
        )
        self.quant_conv = (
            Conv2d(2 * latent_channels, 2 * latent_channels, 1, rng=rng, dtype=dtype)
            if use_quant_conv
            else None
        )
        self.post_quant_conv = (
            Conv2d(latent_channels, latent_channels, 1, rng=rng, dtype=dtype) if use_post_quant_conv else None
        )
        self.decoder = Decoder(
            latent_channels,
            out_channels,
            **arch,
            mid_block_add_attention=mid_block_add_attention,
            rng=rng,
            dtype=dtype,
        )
        self.latent_channels = latent_channels
        self.scale_factor = 2 ** (len(block_out_channels) - 1)  # pixels per latent, each way
        self.sample_size = sample_size
        self.scaling_factor = float(scaling_factor)
        self.shift_factor = None if shift_factor is None else float(shift_factor)
        self.latents_mean = None if latents_mean is None else tuple(map(float, latents_mean))
        self.latents_std = None if latents_std is None else tuple(map(float, latents_std))
        self.force_upcast = force_upcast
        self.config = {
            **DEFAULTS,
            "in_channels": in_channels,
            "out_channels": out_channels,
            "down_block_types": ["DownEncoderBlock2D"] * len(block_out_channels),
            "up_block_types": ["UpDecoderBlock2D"] * len(block_out_channels),
            "block_out_channels": list(block_out_channels),
            "layers_per_block": layers_per_block,
            "latent_channels": latent_channels,
            "norm_num_groups": norm_num_groups,
            "sample_size": sample_size,
            "scaling_factor": scaling_factor,
            "shift_factor": shift_factor,
            "latents_mean": latents_mean,
            "latents_std": latents_std,
            "force_upcast": force_upcast,
            "use_quant_conv": use_quant_conv,
            "use_post_quant_conv": use_post_quant_conv,
            "mid_block_add_attention": mid_block_add_attention,
        }

    @classmethod
    def from_config(cls, config: dict, dtype=None, source="config"):
        """The autoencoder a diffusers ``config.json`` describes; a key or value it does not
        implement is a ConfigError naming the key."""
        c = _checked_config(config, source)
        for key in ("down_block_types", "up_block_types", "act_fn"):  # implied: checked above
            del c[key]
        return cls(**c, dtype=dtype)

    def adapt_weights(self, weights: dict) -> dict:
        """The deprecated attention names (query, key, value, proj_attn) as to_q, to_k, to_v,
        to_out.0, and 1x1-convolution-shaped projection weights (C, C, 1, 1) as (C, C)."""
        adapted = {}
        for name, value in weights.items():
            old = _DEPRECATED_ATTENTION.match(name)
            if old:
                prefix, proj, kind = old.groups()
                name = f"{prefix}.{_NEW_NAMES[proj]}.{kind}"
            if _ATTENTION_PROJECTION.match(name) and np.ndim(value) == 4 and value.shape[2:] == (1, 1):
                value = value.reshape(value.shape[:2])
            adapted[name] = value
        return adapted

    def encode(self, x) -> DiagonalGaussian:
        """Images (N, in_channels, H, W), in [-1, 1] -> the posterior over latents."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z):
        """Latents (N, latent_channels, h, w), unscaled -> images (N, out_channels, H, W)."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x, sample_posterior=False, rng=None):
        """The reconstruction of ``x``: decoded from the posterior's mean, or from a sample
        drawn with ``rng`` when ``sample_posterior``."""
        posterior = self.encode(x)
        return self.decode(posterior.sample(rng) if sample_posterior else posterior.mode())
