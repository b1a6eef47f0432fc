"""The KL autoencoder against diffusers' AutoencoderKL: encoder, decoder, posterior, the whole
reconstruction (values and every gradient in float64), loading a saved folder in float32 (with
the deprecated attention names too), and refused configs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from safetensors.numpy import load_file, save_file
from torch_compare import compare_with_torch, copy_weights

import minidiff as md
from minidiff.models.autoencoder_kl import AutoencoderKL, DiagonalGaussian
from minidiff.nn.pretrained import ConfigError

TINY = [
    dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4),
    dict(block_out_channels=[8, 16, 16], layers_per_block=2, norm_num_groups=8),
    dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False),
    dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, use_quant_conv=False),
    dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, use_post_quant_conv=False),
]
IDS = ["two-levels", "three-levels", "no-attention", "no-quant-conv", "no-post-quant-conv"]


def tiny_config(**overrides):
    levels = len(overrides.get("block_out_channels", [8, 16]))
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=[8, 16],
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
    )
    return {**config, **overrides}


def diffusers_vae(config, seed=0):
    """diffusers' autoencoder with its norms drawn away from 1 and 0, so their gradients count."""
    torch.manual_seed(seed)
    vae = TorchAutoencoderKL(**config)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return vae


def ours_for(config, dtype=np.float64):
    return AutoencoderKL.from_config(config, dtype=dtype)


@pytest.mark.parametrize("overrides", TINY, ids=IDS)
def test_encoder_mean_matches_diffusers(overrides):
    config = tiny_config(**overrides)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, 12, 16))
    out = compare_with_torch(
        ours_for(config),
        diffusers_vae(config),
        [x],
        call=lambda m, x: m.encode(x).mean,
        torch_call=lambda m, x: m.encode(x).latent_dist.mean,
        rtol=1e-8,
        atol=1e-10,
    )
    scale = 2 ** (len(config["block_out_channels"]) - 1)
    assert out.shape == (2, 4, 12 // scale, 16 // scale)


def test_encoder_kl_matches_diffusers():
    """The KL term reaches every encoder parameter, the log-variance half included."""
    config = tiny_config()
    x = np.random.default_rng(2).uniform(-1, 1, (2, 3, 8, 8))
    compare_with_torch(
        ours_for(config),
        diffusers_vae(config, seed=1),
        [x],
        call=lambda m, x: m.encode(x).kl(),
        torch_call=lambda m, x: m.encode(x).latent_dist.kl(),
        rtol=1e-8,
        atol=1e-10,
    )


@pytest.mark.parametrize("overrides", TINY, ids=IDS)
def test_decoder_matches_diffusers(overrides):
    config = tiny_config(**overrides)
    z = np.random.default_rng(3).standard_normal((2, 4, 4, 3))
    out = compare_with_torch(
        ours_for(config),
        diffusers_vae(config, seed=2),
        [z],
        call=lambda m, z: m.decode(z),
        torch_call=lambda m, z: m.decode(z).sample,
        rtol=1e-8,
        atol=1e-10,
    )
    scale = 2 ** (len(config["block_out_channels"]) - 1)
    assert out.shape == (2, 3, 4 * scale, 3 * scale)


@pytest.mark.parametrize("overrides", TINY[:2], ids=IDS[:2])
def test_reconstruction_matches_diffusers(overrides):
    config = tiny_config(**overrides)
    x = np.random.default_rng(4).uniform(-1, 1, (2, 3, 16, 16))
    compare_with_torch(
        ours_for(config),
        diffusers_vae(config, seed=3),
        [x],
        torch_call=lambda m, x: m(x, sample_posterior=False).sample,
        rtol=1e-8,
        atol=1e-10,
    )


# -- the posterior ---------------------------------------------------------------------------


def extreme_moments(rng):
    """Moments whose log-variance half reaches past both ends of the clamp [-30, 20]."""
    moments = rng.standard_normal((2, 8, 3, 4))
    moments[:, 4:] *= 20
    moments[0, 4, 0, :2] = [-45.0, 33.0]
    assert (moments[:, 4:] < -30).any() and (moments[:, 4:] > 20).any()
    return moments


@pytest.mark.parametrize("field", ["mean", "logvar", "std", "var", "mode", "kl"])
def test_posterior_matches_diffusers(field):
    moments = extreme_moments(np.random.default_rng(5))
    ours_in = md.tensor(moments, dtype=np.float64, requires_grad=True)
    theirs_in = torch.tensor(moments, requires_grad=True)
    ours, theirs = DiagonalGaussian(ours_in), DiagonalGaussianDistribution(theirs_in)
    get = {"mode": lambda d: d.mode(), "kl": lambda d: d.kl()}.get(field, lambda d: getattr(d, field))
    out, expected = get(ours), get(theirs)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-12, atol=0)
    gy = np.random.default_rng(6).standard_normal(out.shape)
    (out * md.tensor(gy, dtype=np.float64)).sum().backward()
    (expected * torch.tensor(gy)).sum().backward()
    # the clamped log-variances pass no gradient, in both
    np.testing.assert_allclose(ours_in.grad, theirs_in.grad.numpy(), rtol=1e-12, atol=0)


def test_posterior_nll_and_kl_to_another_match_diffusers():
    rng = np.random.default_rng(7)
    a, b, x = rng.standard_normal((3, 2, 8, 3, 4))
    ours, theirs = (
        DiagonalGaussian(md.tensor(a, dtype=np.float64)),
        DiagonalGaussianDistribution(torch.tensor(a)),
    )
    other, other_t = (
        DiagonalGaussian(md.tensor(b, dtype=np.float64)),
        DiagonalGaussianDistribution(torch.tensor(b)),
    )
    np.testing.assert_allclose(ours.kl(other).numpy(), theirs.kl(other_t).numpy(), rtol=1e-12)
    np.testing.assert_allclose(
        ours.nll(md.tensor(x[:, :4], dtype=np.float64)).numpy(),
        theirs.nll(torch.tensor(x[:, :4])).numpy(),
        rtol=1e-12,
    )


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sample_is_mean_plus_std_times_the_generators_normal(dtype):
    moments = np.random.default_rng(8).standard_normal((2, 8, 3, 4))
    posterior = DiagonalGaussian(md.tensor(moments, dtype=dtype, requires_grad=True))
    sample = posterior.sample(np.random.default_rng(9))
    noise = np.random.default_rng(9).standard_normal((2, 4, 3, 4), dtype=dtype)
    rounded = moments.astype(dtype).astype(np.float64)
    expected = rounded[:, :4] + np.exp(0.5 * rounded[:, 4:]) * noise
    assert sample.dtype == dtype and sample.shape == (2, 4, 3, 4)
    # float32: terms of about 1 cancel to near 0 in places, so the rounding is absolute
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == np.float32 else dict(rtol=1e-13, atol=0)
    np.testing.assert_allclose(sample.numpy(), expected, **tol)
    sample.sum().backward()  # d sample / d logvar = 0.5 * std * noise
    half = 0.5 * np.exp(0.5 * moments[:, 4:]) * noise
    np.testing.assert_allclose(
        posterior.moments.grad[:, 4:], half, rtol=1e-5 if dtype == np.float32 else 1e-13
    )


def test_forward_with_a_sampled_posterior_decodes_the_sample():
    model = ours_for(tiny_config())
    x = md.tensor(np.random.default_rng(10).uniform(-1, 1, (1, 3, 8, 8)), dtype=np.float64)
    z = model.encode(x).sample(np.random.default_rng(11))
    got = model(x, sample_posterior=True, rng=np.random.default_rng(11))
    np.testing.assert_array_equal(got.numpy(), model.decode(z).numpy())
    assert not np.allclose(got.numpy(), model(x).numpy())


# -- loading saved folders ------------------------------------------------------------------


def save_diffusers(tmp_path, config, seed=4):
    vae = diffusers_vae(config, seed=seed).eval()
    vae.save_pretrained(tmp_path)
    return vae


def decode_both(model, vae, seed=12):
    z = np.random.default_rng(seed).standard_normal((2, 4, 4, 4)).astype(np.float32)
    with md.no_grad():
        ours = model.decode(md.tensor(z)).numpy()
    with torch.no_grad():
        theirs = vae.decode(torch.from_numpy(z)).sample.numpy()
    return ours, theirs


def assert_close_relative(ours, theirs, rel=1e-4):
    assert ours.dtype == np.float32
    err = np.abs(ours - theirs).max() / np.abs(theirs).max()
    assert err < rel, f"max abs difference {err:.2e} of the largest value"


def test_from_pretrained_decodes_as_diffusers_in_float32(tmp_path):
    config = tiny_config(
        block_out_channels=[8, 16, 16], layers_per_block=2, norm_num_groups=8, scaling_factor=0.5
    )
    vae = save_diffusers(tmp_path, config)
    model = AutoencoderKL.from_pretrained(tmp_path)
    assert model.scaling_factor == 0.5 and model.scale_factor == 4 and model.latent_channels == 4
    assert model.config["block_out_channels"] == [8, 16, 16] and model.config["force_upcast"] is True
    assert_close_relative(*decode_both(model, vae))
    x = np.random.default_rng(13).uniform(-1, 1, (1, 3, 16, 16)).astype(np.float32)
    with md.no_grad():
        ours = model.encode(md.tensor(x)).mean.numpy()
    with torch.no_grad():
        theirs = vae.encode(torch.from_numpy(x)).latent_dist.mean.numpy()
    assert_close_relative(ours, theirs)


def test_deprecated_attention_names_load(tmp_path):
    vae = save_diffusers(tmp_path, tiny_config())
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    weights = load_file(str(path))
    renamed = {}
    for key, value in weights.items():
        for new, old in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"), ("to_out.0", "proj_attn")):
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{old}.")
                value = value.reshape(*value.shape, 1, 1) if value.ndim == 2 else value  # a 1x1 conv
        renamed[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in renamed
    assert renamed["encoder.mid_block.attentions.0.query.weight"].shape == (16, 16, 1, 1)
    save_file(renamed, str(path))
    model = AutoencoderKL.from_pretrained(tmp_path)
    assert_close_relative(*decode_both(model, vae))
    for key, value in model.state_dict().items():
        np.testing.assert_array_equal(value, weights[key])


SD15 = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
SDXL = {
    **SD15,
    "_diffusers_version": "0.20.0.dev0",
    "_name_or_path": "../sdxl-vae/",
    "force_upcast": True,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
}
SD3_LIKE = {
    **SD15,
    "latent_channels": 16,
    "latents_mean": None,
    "latents_std": None,
    "scaling_factor": 1.5305,
    "shift_factor": 0.0609,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": True,
}


@pytest.mark.parametrize("config", [SD15, SDXL, SD3_LIKE], ids=["sd15", "sdxl", "sd3-like"])
def test_released_configs_build_diffusers_parameters(config):
    small = {**config, "block_out_channels": [32, 32, 32, 32]}  # the released keys, narrower
    model = AutoencoderKL.from_config(small)
    theirs = TorchAutoencoderKL.from_config(small)
    assert {k: v.shape for k, v in model.named_parameters()} == {
        k: tuple(v.shape) for k, v in theirs.named_parameters()
    }
    assert model.scaling_factor == theirs.config.scaling_factor
    assert model.shift_factor == theirs.config.shift_factor
    assert model.latent_channels == config["latent_channels"] and model.scale_factor == 8
    assert all(not k.startswith("_") for k in model.config)
    copy_weights(theirs, model)  # and the weights load by name


def test_latents_mean_and_std_are_kept():
    config = tiny_config(
        latents_mean=[0.1, 0.2, 0.3, 0.4], latents_std=[1.0, 2.0, 3.0, 4.0], shift_factor=0.5
    )
    model = ours_for(config)
    assert model.latents_mean == (0.1, 0.2, 0.3, 0.4) and model.latents_std == (1.0, 2.0, 3.0, 4.0)
    assert model.shift_factor == 0.5


@pytest.mark.parametrize(
    "key, value",
    [
        ("down_block_types", ["DownBlock2D", "DownEncoderBlock2D"]),
        ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]),
        ("down_block_types", ["DownEncoderBlock2D"]),  # one per level
        ("act_fn", "gelu"),
        ("norm_num_groups", 3),  # does not divide the widths
        ("layers_per_block", 0),
        ("latent_channels", True),
        ("block_out_channels", []),
        ("shift_factor", "0.1"),
        ("latents_mean", [0.0, 1.0]),
        ("use_quant_conv", 1),
        ("sample_size", "512"),
        ("norm_type", "spatial"),  # not a key of AutoencoderKL
    ],
)
def test_unsupported_config_is_refused_by_key(key, value):
    with pytest.raises(ConfigError, match=rf"vae/config.json: {key}="):
        AutoencoderKL.from_config({**tiny_config(), key: value}, source="vae/config.json")


def test_config_json_with_an_unsupported_value_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**tiny_config(), "act_fn": "gelu"}))
    with pytest.raises(ConfigError, match=r"config.json: act_fn='gelu'"):
        AutoencoderKL.from_pretrained(tmp_path)
