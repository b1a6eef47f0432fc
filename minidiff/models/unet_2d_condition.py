"""The Stable Diffusion U-Net: diffusers' UNet2DConditionModel for the SD 1.x and 2.x configs, with
diffusers' attribute names, so a diffusers ``unet`` folder loads by name with no mapping.

    sample ─conv_in─▶ down_blocks ─▶ mid_block ─▶ up_blocks ─▶ GroupNorm, SiLU ─conv_out─▶ output
                        └── skips, concatenated onto the up blocks' inputs ──┘
    timestep ─sinusoids─▶ time_embedding (linear_1, SiLU, linear_2) ─▶ every ResnetBlock2D
    encoder_hidden_states (the text) ─▶ the cross-attention of every Transformer2DModel

    DownBlock2D              ResnetBlock2D x layers_per_block, then downsamplers.0 (a stride-2 conv)
    CrossAttnDownBlock2D     the same with a Transformer2DModel after each resnet (one class here)
    UNetMidBlock2DCrossAttn  ResnetBlock2D, Transformer2DModel, ResnetBlock2D
    UpBlock2D                ResnetBlock2D x (layers_per_block + 1), each on [x, one skip], then
                             upsamplers.0 (nearest x2, conv)
    CrossAttnUpBlock2D       the same with a Transformer2DModel after each resnet (one class here)

Every down block output (conv_in's, each resnet's or transformer's, each downsample's) is a skip;
the up blocks take them back last first. The last level has no downsample, the first no upsample.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

from .. import functional as F
from ..nn import Conv2d, GroupNorm, Linear, Module
from ..nn.pretrained import Pretrained, config_error
from ..tensor import Tensor
from .blocks import Downsample2D, ResnetBlock2D, Upsample2D, norm_silu
from .transformer_2d import Transformer2DModel

# -- the time embedding ----------------------------------------------------------------------


def timestep_sinusoids(timesteps, dim, flip_sin_to_cos=False, freq_shift=1.0, max_period=10000, xp=np):
    """diffusers' get_timestep_embedding: timesteps (N,) -> (N, dim) float32, [sin(t f), cos(t f)]
    (cos first with ``flip_sin_to_cos``), f_i = max_period ** (-i / (dim // 2 - freq_shift)).

    Computed in float32 as diffusers does (its Timesteps always returns float32), so a float64
    model sees the numbers the checkpoint was trained with. Exponentials and sinusoids are
    evaluated in float64 and rounded once: each is the float32 closest to the exact value."""
    half = dim // 2
    exponent = np.float32(-math.log(max_period)) * xp.arange(half, dtype=np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = xp.exp(exponent.astype(np.float64)).astype(np.float32)
    args = (xp.asarray(timesteps).astype(np.float32)[:, None] * freqs[None, :]).astype(np.float64)
    sin, cos = xp.sin(args).astype(np.float32), xp.cos(args).astype(np.float32)
    emb = xp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=1)
    if dim % 2:
        emb = xp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(Module):
    """linear_1, SiLU, linear_2: the sinusoids to the width every resnet block adds."""

    def __init__(self, in_channels, time_embed_dim, rng=None, dtype=None):
        self.linear_1 = Linear(in_channels, time_embed_dim, rng=rng, dtype=dtype)
        self.linear_2 = Linear(time_embed_dim, time_embed_dim, rng=rng, dtype=dtype)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# -- the blocks --------------------------------------------------------------------------------


def _upsample(upsampler: Upsample2D, x, size):
    """``upsampler`` to ``size`` (H, W): twice the input, or, where an odd size was halved on the
    way down, nearest neighbour to that size, indexed as torch's interpolate indexes."""
    height, width = x.shape[-2:]
    if size is None or tuple(size) == (2 * height, 2 * width):
        return upsampler(x)
    xp = x.device.xp

    def sources(n, out):  # torch: floor(i * (n / out)) in float32, clamped
        index = xp.floor(xp.arange(out, dtype=np.float32) * (np.float32(n) / np.float32(out)))
        return xp.minimum(index.astype(np.int64), n - 1)

    return upsampler.conv(x[:, :, sources(height, size[0])][:, :, :, sources(width, size[1])])


class DownBlock2D(Module):
    """diffusers' DownBlock2D, and with ``transformer`` (Transformer2DModel options) its
    CrossAttnDownBlock2D: ResnetBlock2D x num_layers, each followed by a Transformer2DModel in the
    cross-attention block, then a downsample unless last. Returns the output and its skips."""

    def __init__(
        self,
        in_channels,
        out_channels,
        temb_channels,
        num_layers,
        add_downsample,
        resnet,
        init,
        downsample_padding=1,
        transformer=None,
    ):
        self.resnets = [
            ResnetBlock2D(
                in_channels if i == 0 else out_channels, out_channels, temb_channels, **resnet, **init
            )
            for i in range(num_layers)
        ]
        self.attentions = None
        if transformer is not None:
            self.attentions = [_transformer(out_channels, transformer, init) for _ in range(num_layers)]
        self.downsamplers = None
        if add_downsample:
            self.downsamplers = [Downsample2D(out_channels, padding=downsample_padding, **init)]

    def forward(self, x, temb, context=None):
        skips = []
        attentions = self.attentions or [None] * len(self.resnets)
        for resnet, attention in zip(self.resnets, attentions):
            x = resnet(x, temb)
            if attention is not None:
                x = attention(x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class UpBlock2D(Module):
    """diffusers' UpBlock2D, and with ``transformer`` its CrossAttnUpBlock2D: ResnetBlock2D x
    num_layers, each on the channel concatenation of x and the next skip (the last first) and
    followed by a Transformer2DModel in the cross-attention block, then an upsample unless last."""

    def __init__(
        self,
        in_channels,
        prev_output_channel,
        out_channels,
        temb_channels,
        num_layers,
        add_upsample,
        resnet,
        init,
        transformer=None,
    ):
        self.resnets = []
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            x_channels = prev_output_channel if i == 0 else out_channels
            self.resnets.append(
                ResnetBlock2D(x_channels + skip_channels, out_channels, temb_channels, **resnet, **init)
            )
        self.attentions = None
        if transformer is not None:
            self.attentions = [_transformer(out_channels, transformer, init) for _ in range(num_layers)]
        self.upsamplers = [Upsample2D(out_channels, **init)] if add_upsample else None

    def forward(self, x, skips, temb, context=None, upsample_size=None):
        attentions = self.attentions or [None] * len(self.resnets)
        for resnet, attention, skip in zip(self.resnets, attentions, reversed(skips)):
            x = resnet(F.concat([x, skip], axis=1), temb)
            if attention is not None:
                x = attention(x, context)
        if self.upsamplers is not None:
            x = _upsample(self.upsamplers[0], x, upsample_size)
        return x


class UNetMidBlock2DCrossAttn(Module):
    """ResnetBlock2D, Transformer2DModel, ResnetBlock2D at the lowest resolution."""

    def __init__(self, channels, temb_channels, resnet, init, transformer):
        self.attentions = [_transformer(channels, transformer, init)]
        self.resnets = [ResnetBlock2D(channels, channels, temb_channels, **resnet, **init) for _ in range(2)]

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        return self.resnets[1](self.attentions[0](x, context), temb)


def _transformer(channels, options, init):
    """A Transformer2DModel over ``channels`` with ``options["heads"]`` heads of channels // heads."""
    options = dict(options)
    heads = options.pop("heads")
    return Transformer2DModel(heads, channels // heads, channels, **options, **init)


# -- the config ---------------------------------------------------------------------------------

# Every key of diffusers' UNet2DConditionModel, with its default there.
DEFAULT_CONFIG = {
    "sample_size": None,
    "in_channels": 4,
    "out_channels": 4,
    "center_input_sample": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "only_cross_attention": False,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "dropout": 0.0,
    "act_fn": "silu",
    "norm_num_groups": 32,
    "norm_eps": 1e-05,
    "cross_attention_dim": 1280,
    "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "attention_head_dim": 8,
    "num_attention_heads": None,
    "dual_cross_attention": False,
    "use_linear_projection": False,
    "class_embed_type": None,
    "addition_embed_type": None,
    "addition_time_embed_dim": None,
    "num_class_embeds": None,
    "upcast_attention": False,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "time_cond_proj_dim": None,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "projection_class_embeddings_input_dim": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None,
    "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}

# Keys whose other values select parts minidiff does not implement: the values it does.
_FIXED = {
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "act_fn": ("silu", "swish"),  # the same function under two names
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1.0,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
}
_DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_BLOCKS = ("UpBlock2D", "CrossAttnUpBlock2D")


def _matches(value, allowed) -> bool:
    """``value`` is ``allowed`` (None and booleans by identity, so that 0 is not False)."""
    if allowed is None or isinstance(allowed, bool) or isinstance(value, bool):
        return value is allowed
    return value == allowed


def _positive_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0


class _Config:
    """A config with diffusers' defaults filled in; each getter returns a checked value or raises
    the ConfigError that names the key."""

    def __init__(self, config, source):
        self.source = source
        self.values = {**DEFAULT_CONFIG, **config}
        for key in config:
            if not key.startswith("_") and key not in DEFAULT_CONFIG:  # _class_name, _diffusers_version...
                raise self.error(key, "the keys of diffusers' UNet2DConditionModel")
        for key, allowed in _FIXED.items():
            if not any(_matches(self.values[key], a) for a in allowed):
                raise self.error(key, " or ".join(repr(a) for a in allowed))

    def error(self, key, supported):
        return config_error(self.source, key, self.values.get(key), supported)

    def flag(self, key) -> bool:
        if not isinstance(self.values[key], bool):
            raise self.error(key, "true or false")
        return self.values[key]

    def number(self, key, low=-math.inf, high=math.inf, integer=False, above=False):
        """A number in [low, high] (or (low, high] with ``above``)."""
        value = self.values[key]
        ok = isinstance(value, numbers.Integral if integer else numbers.Real) and not isinstance(value, bool)
        if not ok or not (low < value if above else low <= value) or not value <= high:
            bound = f"{'>' if above else '>='} {low}" + ("" if high == math.inf else f" and <= {high}")
            raise self.error(key, f"{'an integer' if integer else 'a number'} {bound}")
        return value

    def per_level(self, key, levels, check, what, scalar=True):
        """One value per level: a list of ``levels`` values, or (``scalar``) one for every level."""
        value = self.values[key]
        listed = isinstance(value, (list, tuple))
        values = list(value) if listed else [value] * levels
        if len(values) != levels or not all(check(v) for v in values) or not (listed or scalar):
            one = f"{what[:-1] if what.endswith('s') else what} or " if scalar else ""
            raise self.error(key, f"{one}a list of {levels} {what}")
        return values

    def names(self, key, allowed):
        value = self.values[key]
        if not isinstance(value, (list, tuple)) or not value or not all(v in allowed for v in value):
            raise self.error(key, "a list of " + " and ".join(allowed))
        return list(value)


# -- the model --------------------------------------------------------------------------------


class UNet2DConditionModel(Module, Pretrained):
    """diffusers' UNet2DConditionModel for Stable Diffusion 1.x and 2.x configs.

    ``UNet2DConditionModel(config)`` builds the network a diffusers config dict describes (keys it
    omits take diffusers' defaults; ``config`` keeps them all). ``model(sample, timestep,
    encoder_hidden_states)``: sample (N, in_channels, H, W), timestep a number or a 0-d or (N,)
    array, encoder_hidden_states (N, L, cross_attention_dim) -> (N, out_channels, H, W).

    In diffusers' SD configs ``attention_head_dim`` is the number of heads per level (a name kept
    from an early mistake): ``num_attention_heads`` when that is null, as diffusers reads it.
    """

    def __init__(self, config=None, rng=None, dtype=None, source="config"):
        c = _Config(dict(config or {}), source)
        self.config = c.values
        down_types = c.names("down_block_types", _DOWN_BLOCKS)
        levels = len(down_types)
        up_types = c.names("up_block_types", _UP_BLOCKS)
        if len(up_types) != levels:
            raise c.error("up_block_types", f"as many blocks as down_block_types ({levels})")
        ints = "positive integers"
        channels = c.per_level("block_out_channels", levels, _positive_int, ints, scalar=False)
        layers = c.per_level("layers_per_block", levels, _positive_int, ints)
        transformer_layers = c.per_level("transformer_layers_per_block", levels, _positive_int, ints)
        cross_dims = c.per_level("cross_attention_dim", levels, _positive_int, ints)
        only_cross = c.per_level("only_cross_attention", levels, lambda v: isinstance(v, bool), "booleans")
        heads_key = "attention_head_dim" if c.values["num_attention_heads"] is None else "num_attention_heads"
        heads = c.per_level(heads_key, levels, _positive_int, ints)
        if any(h > ch for h, ch in zip(heads, channels)):
            raise c.error(heads_key, "heads per level at most block_out_channels (one channel per head)")
        groups = self.config["norm_num_groups"]
        if not _positive_int(groups) or any(ch % groups for ch in channels):
            raise c.error("norm_num_groups", f"an integer dividing every block_out_channels {channels}")
        eps = c.number("norm_eps", low=0.0, above=True)
        dropout = c.number("dropout", low=0.0, high=1.0)
        use_linear_projection = c.flag("use_linear_projection")
        upcast_attention = c.flag("upcast_attention")
        self.in_channels = c.number("in_channels", low=1, integer=True)
        self.out_channels = c.number("out_channels", low=1, integer=True)
        self.center_input_sample = c.flag("center_input_sample")
        self.flip_sin_to_cos = c.flag("flip_sin_to_cos")
        self.freq_shift = c.number("freq_shift")
        if self.freq_shift >= channels[0] // 2:
            raise c.error("freq_shift", f"a number below half of block_out_channels[0] ({channels[0] // 2})")
        downsample_padding = c.number("downsample_padding", low=0, integer=True)
        mid_scale = c.number("mid_block_scale_factor", low=0.0, above=True)
        time_embed_dim = self.config["time_embedding_dim"]
        if time_embed_dim is None:
            time_embed_dim = 4 * channels[0]
        elif not _positive_int(time_embed_dim):
            raise c.error("time_embedding_dim", "null or a positive integer")
        self.sample_size = self.config["sample_size"]
        # mid_block_only_cross_attention and addition_embed_type_num_heads configure only parts
        # minidiff refuses (the simple-cross-attention mid block, the text addition embedding)

        init = dict(rng=rng, dtype=dtype)
        resnet = dict(groups=groups, eps=eps, dropout=dropout)

        def transformer(level, mid=False):
            return dict(
                heads=heads[level],
                num_layers=transformer_layers[level],
                dropout=dropout,
                norm_num_groups=groups,
                cross_attention_dim=cross_dims[level],
                use_linear_projection=use_linear_projection,
                only_cross_attention=False if mid else only_cross[level],
                upcast_attention=upcast_attention,
            )

        self.conv_in = Conv2d(self.in_channels, channels[0], 3, padding=1, **init)
        self.time_embedding = TimestepEmbedding(channels[0], time_embed_dim, **init)

        self.down_blocks = []
        for i, kind in enumerate(down_types):
            self.down_blocks.append(
                DownBlock2D(
                    channels[max(i - 1, 0)],
                    channels[i],
                    time_embed_dim,
                    layers[i],
                    add_downsample=i < levels - 1,
                    resnet=resnet,
                    init=init,
                    downsample_padding=downsample_padding,
                    transformer=transformer(i) if kind == "CrossAttnDownBlock2D" else None,
                )
            )
        self.mid_block = UNetMidBlock2DCrossAttn(
            channels[-1],
            time_embed_dim,
            resnet={**resnet, "output_scale_factor": mid_scale},
            init=init,
            transformer=transformer(levels - 1, mid=True),
        )
        self.up_blocks = []
        for i, kind in enumerate(up_types):
            level = levels - 1 - i  # the up blocks walk the levels back up
            self.up_blocks.append(
                UpBlock2D(
                    channels[max(level - 1, 0)],
                    channels[min(level + 1, levels - 1)],
                    channels[level],
                    time_embed_dim,
                    layers[level] + 1,
                    add_upsample=i < levels - 1,
                    resnet=resnet,
                    init=init,
                    transformer=transformer(level) if kind == "CrossAttnUpBlock2D" else None,
                )
            )
        self.conv_norm_out = GroupNorm(groups, channels[0], eps=eps, dtype=dtype)
        self.conv_out = Conv2d(channels[0], self.out_channels, 3, padding=1, **init)
        self.cross_attention_dims = sorted(set(cross_dims))

    @classmethod
    def from_config(cls, config: dict, dtype=None, source="config"):
        return cls(config, dtype=dtype, source=source)

    def _timesteps(self, timestep, batch, xp):
        """The timesteps as a float32 (N,) array: one number or 0-d array for all, or one each."""
        if isinstance(timestep, Tensor):
            timestep = timestep.data
        t = xp.asarray(timestep)
        if t.dtype.kind not in "iuf" or t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(
                f"UNet2DConditionModel: timestep must be a number or a 0-d or ({batch},) array, "
                f"got {t.dtype} of shape {t.shape}"
            )
        return xp.broadcast_to(t.reshape(-1), (batch,))

    def forward(self, sample, timestep, encoder_hidden_states):
        if sample.ndim != 4 or sample.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet2DConditionModel: sample must be (N, {self.in_channels}, H, W), got {sample.shape}"
            )
        n = sample.shape[0]
        widths = self.cross_attention_dims
        context = encoder_hidden_states
        if (
            not isinstance(context, Tensor)
            or context.ndim != 3
            or context.shape[0] != n
            or (len(widths) == 1 and context.shape[2] != widths[0])
        ):
            shape = getattr(context, "shape", type(context).__name__)
            raise ValueError(
                f"UNet2DConditionModel: encoder_hidden_states must be a Tensor ({n}, L, "
                f"{' or '.join(map(str, widths))}) for the sample's batch of {n}, got {shape}"
            )
        xp = sample.device.xp
        if self.center_input_sample:
            sample = 2 * sample - 1.0
        t = self._timesteps(timestep, n, xp)
        sinusoids = timestep_sinusoids(
            t, self.conv_in.out_channels, self.flip_sin_to_cos, self.freq_shift, xp=xp
        )
        temb = self.time_embedding(Tensor.from_array(sinusoids.astype(sample.dtype)))

        x = self.conv_in(sample)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips.extend(block_skips)
        x = self.mid_block(x, temb, context)
        # sizes not divisible by 2 ** (levels - 1): each upsample goes to its skip's size
        odd = any(s % 2 ** (len(self.up_blocks) - 1) for s in sample.shape[2:])
        for block in self.up_blocks:
            block_skips, skips = skips[-len(block.resnets) :], skips[: -len(block.resnets)]
            size = skips[-1].shape[2:] if odd and skips else None
            x = block(x, block_skips, temb, context, upsample_size=size)
        return self.conv_out(norm_silu(self.conv_norm_out, x))
