"""The spatial transformer against diffusers' Transformer2DModel: values and every gradient."""

from __future__ import annotations

import numpy as np
import pytest
from diffusers.models.transformers.transformer_2d import Transformer2DModel as TorchTransformer2DModel
from torch_compare import compare_with_torch

import minidiff as md
from minidiff.models.transformer_2d import Transformer2DModel

# diffusers warns about its own deprecated output class on every forward
pytestmark = pytest.mark.filterwarnings("ignore:.*Transformer2DModelOutput:FutureWarning")


def _pair(**kwargs):
    ours = Transformer2DModel(**kwargs, dtype=np.float64)
    theirs = TorchTransformer2DModel(**kwargs)
    for p in theirs.parameters():  # norms start at 1 and 0: draw every parameter
        p.data.normal_(0.0, 0.3)
    return ours, theirs


def _torch_call(module, x, context):
    return module(x, encoder_hidden_states=context).sample


@pytest.mark.parametrize("use_linear_projection", [False, True])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("heads, head_dim", [(1, 16), (4, 4)])
def test_transformer_2d_matches_diffusers(use_linear_projection, num_layers, heads, head_dim):
    ours, theirs = _pair(
        num_attention_heads=heads,
        attention_head_dim=head_dim,
        in_channels=16,
        num_layers=num_layers,
        norm_num_groups=4,
        cross_attention_dim=12,
        use_linear_projection=use_linear_projection,
    )
    rng = np.random.default_rng(num_layers + heads)
    x, context = rng.standard_normal((2, 16, 3, 5)), rng.standard_normal((2, 7, 12))
    out = compare_with_torch(ours, theirs, [x, context], torch_call=_torch_call, rtol=1e-8, atol=1e-10)
    assert out.shape == (2, 16, 3, 5)


def test_inner_width_differs_from_channels():
    """heads * head_dim need not equal the channels: proj_in and proj_out change the width."""
    ours, theirs = _pair(
        num_attention_heads=2, attention_head_dim=3, in_channels=8, norm_num_groups=2, cross_attention_dim=5
    )
    rng = np.random.default_rng(1)
    x, context = rng.standard_normal((1, 8, 4, 4)), rng.standard_normal((1, 3, 5))
    compare_with_torch(ours, theirs, [x, context], torch_call=_torch_call, rtol=1e-8, atol=1e-10)


def test_only_cross_attention_matches_diffusers():
    ours, theirs = _pair(
        num_attention_heads=2,
        attention_head_dim=4,
        in_channels=8,
        norm_num_groups=2,
        cross_attention_dim=6,
        only_cross_attention=True,
    )
    assert ours.transformer_blocks[0].attn1.to_k.weight.shape == (8, 6)
    rng = np.random.default_rng(2)
    x, context = rng.standard_normal((2, 8, 2, 3)), rng.standard_normal((2, 4, 6))
    compare_with_torch(ours, theirs, [x, context], torch_call=_torch_call, rtol=1e-8, atol=1e-10)


def test_self_attention_only_without_cross_attention_dim():
    ours, theirs = _pair(num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2)
    assert ours.transformer_blocks[0].attn2 is None
    x = np.random.default_rng(3).standard_normal((2, 8, 3, 3))
    compare_with_torch(
        ours, theirs, [x], torch_call=lambda m, x: m(x).sample, call=lambda m, x: m(x), rtol=1e-8, atol=1e-10
    )


def test_parameter_names_are_diffusers():
    ours, theirs = _pair(
        num_attention_heads=2, attention_head_dim=4, in_channels=8, norm_num_groups=2, cross_attention_dim=6
    )
    assert {n: tuple(p.shape) for n, p in ours.named_parameters()} == {
        n: tuple(p.shape) for n, p in theirs.named_parameters()
    }
    assert "transformer_blocks.0.ff.net.0.proj.weight" in dict(ours.named_parameters())
    assert "transformer_blocks.0.attn2.to_out.0.bias" in dict(ours.named_parameters())
    assert "transformer_blocks.0.attn2.to_q.bias" not in dict(ours.named_parameters())


def test_errors():
    model = Transformer2DModel(2, 4, in_channels=8, norm_num_groups=2, cross_attention_dim=6)
    x = md.tensor(np.zeros((1, 8, 2, 2)))
    with pytest.raises(ValueError, match=r"x must be \(N, 8, H, W\)"):
        model(md.tensor(np.zeros((1, 4, 2, 2))), md.tensor(np.zeros((1, 3, 6))))
    with pytest.raises(ValueError, match="needs a context"):
        model(x)
    with pytest.raises(ValueError, match=r"context must be \(N, Lc, 6\)"):
        model(x, md.tensor(np.zeros((1, 3, 5))))
    with pytest.raises(ValueError, match="in_channels is required"):
        Transformer2DModel(2, 4)
