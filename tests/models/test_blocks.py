"""The shared convolutional blocks against diffusers' own: values and every gradient."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.models.resnet import Downsample2D as TorchDownsample2D
from diffusers.models.resnet import ResnetBlock2D as TorchResnetBlock2D
from diffusers.models.resnet import Upsample2D as TorchUpsample2D
from torch_compare import compare_with_torch

from minidiff.models.blocks import Downsample2D, ResnetBlock2D, Upsample2D


@pytest.mark.parametrize("in_ch, out_ch", [(4, 4), (4, 8)])
@pytest.mark.parametrize("temb", [None, 6])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_resnet_block_matches_diffusers(in_ch, out_ch, temb, scale):
    rng = np.random.default_rng(in_ch + out_ch)
    kwargs = dict(
        in_channels=in_ch,
        out_channels=out_ch,
        temb_channels=temb,
        groups=2,
        eps=1e-6,
        output_scale_factor=scale,
    )
    ours = ResnetBlock2D(**kwargs, dtype=np.float64)
    theirs = TorchResnetBlock2D(**kwargs)
    for p in theirs.parameters():  # norms start at 1 and 0: draw them too
        p.data.normal_()
    x = rng.standard_normal((2, in_ch, 5, 6))
    t = None if temb is None else rng.standard_normal((2, temb))
    compare_with_torch(ours, theirs, [x, t], rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("size", [6, 7])
def test_downsample_matches_diffusers(padding, size):
    rng = np.random.default_rng(size)
    ours = Downsample2D(3, 5, padding=padding, dtype=np.float64)
    theirs = TorchDownsample2D(3, use_conv=True, out_channels=5, padding=padding, name="op")
    x = rng.standard_normal((2, 3, size, size))
    out = compare_with_torch(ours, theirs, [x], rtol=1e-8, atol=1e-10)
    assert out.shape[-1] == (size + 1) // 2 if padding else size // 2


def test_upsample_matches_diffusers():
    rng = np.random.default_rng(0)
    ours = Upsample2D(3, 4, dtype=np.float64)
    theirs = TorchUpsample2D(3, use_conv=True, out_channels=4)
    out = compare_with_torch(ours, theirs, [rng.standard_normal((2, 3, 4, 5))], rtol=1e-8, atol=1e-10)
    assert out.shape == (2, 4, 8, 10)


def test_resnet_block_without_time_projection_refuses_an_embedding():
    block = ResnetBlock2D(4, 4, temb_channels=None, groups=2)
    import minidiff as md

    with pytest.raises(ValueError, match="temb_channels=None"):
        block(md.tensor(np.zeros((1, 4, 3, 3))), md.tensor(np.zeros((1, 4))))
