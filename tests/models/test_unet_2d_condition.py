"""The Stable Diffusion U-Net against diffusers' UNet2DConditionModel: tiny SD 1.x and 2.x-like
configs in float64 (outputs and every gradient), folders diffusers saves (float32 and fp16), the
SD 1.5 and 2.1 parameter names and shapes, and the config values it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import UNet2DConditionModel as TorchUNet2DConditionModel
from diffusers.models.embeddings import get_timestep_embedding
from torch_compare import compare_with_torch

import minidiff as md
from minidiff.models.unet_2d_condition import UNet2DConditionModel, timestep_sinusoids
from minidiff.nn import layers
from minidiff.nn.pretrained import ConfigError

SD1_LIKE = dict(
    sample_size=8,
    block_out_channels=[32, 64],
    layers_per_block=1,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"],
    cross_attention_dim=16,
    attention_head_dim=8,
    norm_num_groups=8,
)
SD2_LIKE = dict(
    SD1_LIKE,
    block_out_channels=[32, 64],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    attention_head_dim=[2, 4],  # heads per level, as SD 2's [5, 10, 20, 20]
    use_linear_projection=True,
    upcast_attention=True,
    flip_sin_to_cos=True,
    freq_shift=0,
    norm_num_groups=16,
)
# Many other keys away from their defaults, on odd sizes (upsampling to the skips' sizes).
VARIED = dict(
    SD1_LIKE,
    in_channels=3,
    out_channels=5,
    center_input_sample=True,
    flip_sin_to_cos=False,
    freq_shift=1,
    layers_per_block=[2, 1],
    transformer_layers_per_block=[2, 1],
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    only_cross_attention=[True, False],
    downsample_padding=0,
    mid_block_scale_factor=2.0,
    norm_eps=1e-6,
    time_embedding_dim=40,
    attention_head_dim=[4, 2],
)


class _Sinusoids(torch.nn.Module):
    """diffusers' time projection replaced by ours: both are float32, and torch's float32 sine is
    not always the closest float32, so the network is compared on the same sinusoids and the
    sinusoids on their own (test_sinusoids_match_diffusers)."""

    def __init__(self, dim, flip_sin_to_cos, freq_shift):
        super().__init__()
        self.args = dim, flip_sin_to_cos, freq_shift

    def forward(self, timesteps):
        return torch.from_numpy(timestep_sinusoids(timesteps.numpy(), *self.args))


def _pair(config, seed=0):
    torch.manual_seed(seed)
    theirs = TorchUNet2DConditionModel(**config)
    for name, p in theirs.named_parameters():  # norms start at 1 and 0, conv_out at 0: draw them all
        p.data.normal_(0.0, 0.2 if name.endswith("weight") else 0.1)
    c = theirs.config
    theirs.time_proj = _Sinusoids(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
    return UNet2DConditionModel(config, dtype=np.float64), theirs


def _inputs(config, size=(8, 8), batch=2, seed=0):
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((batch, config.get("in_channels", 4), *size))
    context = rng.standard_normal((batch, 5, config["cross_attention_dim"]))
    return sample, np.array([3, 999])[:batch], context


def _torch_call(module, sample, timestep, context):
    return module(sample, timestep, context).sample


@pytest.mark.parametrize(
    "config, size", [(SD1_LIKE, (8, 8)), (SD2_LIKE, (8, 8)), (VARIED, (7, 9))], ids=["sd1", "sd2", "varied"]
)
def test_matches_diffusers_values_and_every_gradient(config, size):
    ours, theirs = _pair(config)
    sample, t, context = _inputs(config, size)
    out = compare_with_torch(
        ours, theirs, [sample, t, context], torch_call=_torch_call, rtol=1e-8, atol=1e-10
    )
    assert out.shape == (2, config.get("out_channels", 4), *size)


def test_parameter_names_and_shapes_are_diffusers():
    ours, theirs = _pair(SD1_LIKE)
    assert {n: p.shape for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in theirs.named_parameters()
    }
    names = dict(ours.named_parameters())
    for key in [
        "conv_in.weight",
        "time_embedding.linear_1.weight",
        "down_blocks.0.resnets.0.conv1.weight",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        "down_blocks.0.downsamplers.0.conv.weight",
        "mid_block.attentions.0.proj_in.weight",
        "mid_block.resnets.1.conv2.weight",
        "up_blocks.0.upsamplers.0.conv.weight",
        "up_blocks.1.resnets.1.conv_shortcut.weight",
        "conv_norm_out.weight",
        "conv_out.bias",
    ]:
        assert key in names, key


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (320, True, 0), (64, False, 1), (33, True, 0.5)])
def test_sinusoids_match_diffusers(dim, flip, shift):
    t = np.array([0, 1, 17, 250.5, 999])
    ours = timestep_sinusoids(t, dim, flip, shift)
    theirs = get_timestep_embedding(torch.tensor(t), dim, flip, shift).numpy()
    assert ours.dtype == np.float32 and ours.shape == (5, dim)
    # Both round the same float32 exponents; then exp, t * f and the sine each round once in
    # float32, and torch's exp and sine are not always the closest float32: a few ulps of t * f.
    half = dim // 2
    exponent = -math.log(10000) * np.arange(half) / (half - shift)
    args = t[:, None] * np.exp(exponent)[None]
    tol = np.abs(args) * 2.0**-21 + 2.0**-23
    pad = np.zeros((5, dim % 2))
    assert np.all(np.abs(ours - theirs) <= np.concatenate([tol, tol, pad], axis=1))
    # against the exact sinusoids the float32 exponents add their own rounding, relative to the argument
    exact = np.concatenate([np.cos(args), np.sin(args)] if flip else [np.sin(args), np.cos(args)], axis=1)
    tol_exact = tol + np.abs(args) * np.abs(exponent) * 2.0**-22
    assert np.all(np.abs(ours[:, : 2 * half] - exact) <= np.concatenate([tol_exact, tol_exact], axis=1))


def test_timestep_forms_agree():
    model = UNet2DConditionModel(SD1_LIKE, rng=np.random.default_rng(0))
    sample, _, context = _inputs(SD1_LIKE)
    x, c = md.tensor(sample), md.tensor(context)
    with md.no_grad():
        each = model(x, np.array([7, 7]), c).numpy()
        for t in [7, 7.0, np.array(7), np.array([7]), md.tensor(np.array([7, 7]))]:
            np.testing.assert_array_equal(model(x, t, c).numpy(), each)
        assert not np.allclose(model(x, np.array([7, 8]), c).numpy(), each)


def test_num_attention_heads_when_given_is_the_head_count():
    """diffusers refuses num_attention_heads; minidiff reads it as what it names, the heads
    (attention_head_dim is then unused, as in diffusers' cross-attention blocks)."""
    by_old_name = UNet2DConditionModel(SD2_LIKE, rng=np.random.default_rng(0), dtype=np.float64)
    by_new_name = UNet2DConditionModel(
        {**SD2_LIKE, "num_attention_heads": [2, 4], "attention_head_dim": 99}, dtype=np.float64
    )
    other_heads = UNet2DConditionModel({**SD2_LIKE, "num_attention_heads": 1}, dtype=np.float64)
    by_new_name.load_state_dict(by_old_name.state_dict())
    other_heads.load_state_dict(by_old_name.state_dict())
    sample, t, context = (md.tensor(a, dtype=np.float64) for a in _inputs(SD2_LIKE))
    with md.no_grad():
        expected = by_old_name(sample, t, context).numpy()
        np.testing.assert_array_equal(by_new_name(sample, t, context).numpy(), expected)
        assert not np.allclose(other_heads(sample, t, context).numpy(), expected)


def test_from_pretrained_float32_and_fp16(tmp_path):
    torch.manual_seed(0)
    theirs = TorchUNet2DConditionModel(**SD1_LIKE)
    for p in theirs.parameters():
        p.data.normal_(0.0, 0.2)
    theirs.save_pretrained(tmp_path / "unet")
    sample, t, context = _inputs(SD1_LIKE)
    with torch.no_grad():
        expected = theirs(
            torch.tensor(sample, dtype=torch.float32), torch.tensor(t), torch.tensor(context).float()
        )
    expected = expected.sample.numpy()

    model = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    assert model.conv_in.weight.dtype == np.float32
    assert model.config["block_out_channels"] == [32, 64] and model.config["act_fn"] == "silu"
    assert model.in_channels == 4 and model.sample_size == 8
    with md.no_grad():
        out = model(md.tensor(sample), t, md.tensor(context)).numpy()
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())

    theirs.half().save_pretrained(tmp_path / "fp16", variant="fp16")
    half = UNet2DConditionModel.from_pretrained(tmp_path / "fp16", variant="fp16")
    assert half.conv_in.weight.dtype == np.float32
    np.testing.assert_array_equal(half.conv_in.weight.numpy(), theirs.conv_in.weight.detach().float().numpy())
    with md.no_grad():
        out16 = half(md.tensor(sample), t, md.tensor(context)).numpy()
    np.testing.assert_allclose(out16, expected, atol=0.05 * np.abs(expected).max())  # fp16 weights


def _shapes_only(monkeypatch):
    """Parameters as zero-stride views: the full-size models are built without their memory."""
    from minidiff.nn.module import Parameter

    def fake(*args):
        shape = args[1] if len(args) == 4 else args[0]
        return Parameter.from_array(np.broadcast_to(np.float32(0), shape), requires_grad=True)

    for name in ("_uniform", "_zeros", "_ones"):
        monkeypatch.setattr(layers, name, fake)


SD15 = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD21 = dict(
    SD15,
    _diffusers_version="0.10.0.dev0",
    attention_head_dim=[5, 10, 20, 20],
    cross_attention_dim=1024,
    dual_cross_attention=False,
    use_linear_projection=True,
    upcast_attention=True,
    num_class_embeds=None,
    only_cross_attention=False,
    sample_size=96,
)


@pytest.mark.parametrize("config, count", [(SD15, 859_520_964), (SD21, 865_910_724)], ids=["sd15", "sd21"])
def test_full_size_configs_have_diffusers_parameters(monkeypatch, config, count):
    _shapes_only(monkeypatch)
    ours = UNet2DConditionModel.from_config(config)
    with torch.device("meta"):
        theirs = TorchUNet2DConditionModel.from_config(config)
    assert {n: p.shape for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in theirs.named_parameters()
    }
    assert ours.num_parameters() == count


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ["SimpleCrossAttnDownBlock2D", "DownBlock2D"]),
        ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"]),
        ("up_block_types", ["UpBlock2D"]),
        ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
        ("mid_block_type", None),
        ("class_embed_type", "timestep"),
        ("num_class_embeds", 10),
        ("resnet_time_scale_shift", "scale_shift"),
        ("dual_cross_attention", True),
        ("time_embedding_type", "fourier"),
        ("addition_embed_type", "text"),
        ("encoder_hid_dim", 32),
        ("act_fn", "gelu"),
        ("conv_in_kernel", 1),
        ("transformer_layers_per_block", [[1, 2], [1]]),
        ("attention_head_dim", [8, 8, 8]),
        ("attention_head_dim", 0),
        ("block_out_channels", 32),
        ("block_out_channels", [32, 64, 64]),
        ("norm_num_groups", None),
        ("norm_num_groups", 12),
        ("layers_per_block", 0),
        ("only_cross_attention", 1),
        ("use_linear_projection", "yes"),
        ("norm_eps", 0),
        ("freq_shift", 16),
        ("no_such_key", 1),
    ],
)
def test_unsupported_config_values_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"unet/config.json: {key}="):
        UNet2DConditionModel.from_config({**SD1_LIKE, key: value}, source="unet/config.json")


def test_bad_inputs_are_refused_by_name():
    model = UNet2DConditionModel(SD1_LIKE)
    x, c = md.tensor(np.zeros((2, 4, 8, 8))), md.tensor(np.zeros((2, 5, 16)))
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be a Tensor \(2, L, 16\)"):
        model(x, 1, md.tensor(np.zeros((2, 5, 12))))
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model(x, 1, md.tensor(np.zeros((1, 5, 16))))
    with pytest.raises(ValueError, match="encoder_hidden_states must be"):
        model(x, 1, md.tensor(np.zeros((5, 16))))
    with pytest.raises(ValueError, match=r"sample must be \(N, 4, H, W\)"):
        model(md.tensor(np.zeros((2, 3, 8, 8))), 1, c)
    with pytest.raises(ValueError, match=r"timestep must be a number or a 0-d or \(2,\) array"):
        model(x, np.array([1, 2, 3]), c)
