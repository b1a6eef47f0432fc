"""nn.Attention: multi-head self- and cross-attention, causal or masked, against PyTorch."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minidiff as md
from minidiff.nn import Attention
from minidiff.nn.attention import image_from_tokens, image_tokens
from minidiff.testing import tolerance


def torch_attention(attn, x, context=None, mask=None, causal=False):
    """The same attention in PyTorch from the module's weights: projections, heads split,
    F.scaled_dot_product_attention, heads merged, output projection. Returns the output and the
    torch leaves (input, context, and one per parameter, by name)."""
    params = {name: torch.tensor(p.numpy(), requires_grad=True) for name, p in attn.named_parameters()}
    tx = torch.tensor(x, requires_grad=True)
    tc = tx if context is None else torch.tensor(context, requires_grad=True)

    def project(name, t):
        bias = params.get(f"{name}.bias")
        return torch.nn.functional.linear(t, params[f"{name}.weight"], bias)

    def split(t):  # (N, L, h*d) -> (N, h, L, d)
        n, length, _ = t.shape
        return t.reshape(n, length, attn.heads, attn.head_dim).transpose(1, 2)

    if attn.names == "diffusers":
        to_q, to_k, to_v, to_out = "to_q", "to_k", "to_v", "to_out.0"
    else:
        to_q, to_k, to_v, to_out = "q_proj", "k_proj", "v_proj", "out_proj"
    q, k, v = split(project(to_q, tx)), split(project(to_k, tc)), split(project(to_v, tc))
    torch_mask = None if mask is None else torch.tensor(mask)
    if causal:
        lq, lk = q.shape[-2], k.shape[-2]
        allowed = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
        torch_mask = allowed if torch_mask is None else allowed & torch_mask
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch_mask)
    n, _, length, _ = out.shape
    out = project(to_out, out.transpose(1, 2).reshape(n, length, attn.heads * attn.head_dim))
    leaves = {"x": tx, **({} if context is None else {"context": tc}), **params}
    return out, leaves


@st.composite
def attention_cases(draw):
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 4))
    explicit_head_dim = draw(st.booleans())
    dim = heads * head_dim if not explicit_head_dim else draw(st.integers(1, 6))
    cross = draw(st.booleans())
    context_dim = draw(st.integers(1, 5)) if cross else None
    n, length = draw(st.integers(1, 2)), draw(st.integers(1, 5))
    causal = draw(st.booleans())
    # causal cross-attention aligns the ends: with fewer keys than queries the first queries
    # would see none
    context_length = draw(st.integers(length if causal else 1, 5)) if cross else length
    masked = draw(st.booleans())
    return dict(
        heads=heads,
        head_dim=head_dim if explicit_head_dim else None,
        dim=dim,
        context_dim=context_dim,
        n=n,
        length=length,
        context_length=context_length,
        causal=causal,
        masked=masked,
        qkv_bias=draw(st.booleans()),
        names=draw(st.sampled_from(["diffusers", "transformers"])),
        seed=draw(st.integers(0, 2**16)),
    )


@settings(deadline=None, max_examples=60)
@given(case=attention_cases())
def test_attention_matches_torch_values_and_gradients(case):
    """Self- or cross-attention, one or more heads, head_dim given or from dim, with and without
    biases, causal and/or a boolean mask: the output and the gradients of the input, the
    context and every projection are PyTorch's."""
    rng = np.random.default_rng(case["seed"])
    attn = Attention(
        case["dim"],
        context_dim=case["context_dim"],
        heads=case["heads"],
        head_dim=case["head_dim"],
        qkv_bias=case["qkv_bias"],
        names=case["names"],
        rng=rng,
        dtype=np.float64,
    )
    x = rng.standard_normal((case["n"], case["length"], case["dim"]))
    context = None
    if case["context_dim"] is not None:
        context = rng.standard_normal((case["n"], case["context_length"], case["context_dim"]))
    lk = case["context_length"]
    mask = None
    if case["masked"]:
        mask = rng.random((case["length"], lk)) < 0.7
        # every query keeps a key: the last one it may see
        last_visible = np.arange(case["length"]) + lk - case["length"] if case["causal"] else lk - 1
        mask[np.arange(case["length"]), last_visible] = True
    gy = rng.standard_normal((case["n"], case["length"], case["dim"]))

    tx = md.tensor(x, dtype=np.float64, requires_grad=True)
    tc = None if context is None else md.tensor(context, dtype=np.float64, requires_grad=True)
    out = attn(tx, tc, mask=mask, causal=case["causal"])
    (out * md.tensor(gy, dtype=np.float64)).sum().backward()

    expected, leaves = torch_attention(attn, x, context, mask, case["causal"])
    (expected * torch.tensor(gy)).sum().backward()
    tol = tolerance(np.float64)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), **tol)
    np.testing.assert_allclose(tx.grad, leaves["x"].grad.numpy(), **tol, err_msg="x")
    if tc is not None:
        np.testing.assert_allclose(tc.grad, leaves["context"].grad.numpy(), **tol, err_msg="context")
    for name, p in attn.named_parameters():
        np.testing.assert_allclose(p.grad, leaves[name].grad.numpy(), **tol, err_msg=name)


def test_causal_attention_ignores_later_positions():
    """Changing the last token changes no earlier output of a causal self-attention."""
    rng = np.random.default_rng(0)
    attn = Attention(8, heads=2, rng=rng, dtype=np.float64)
    x = rng.standard_normal((1, 5, 8))
    changed = x.copy()
    changed[0, -1] += 10.0
    a = attn(md.tensor(x, dtype=np.float64), causal=True).numpy()
    b = attn(md.tensor(changed, dtype=np.float64), causal=True).numpy()
    np.testing.assert_array_equal(a[0, :-1], b[0, :-1])
    assert not np.allclose(a[0, -1], b[0, -1])


def test_parameter_names_are_the_checkpoint_keys():
    attn = Attention(8, context_dim=6, heads=2, qkv_bias=False)
    shapes = {name: p.shape for name, p in attn.named_parameters()}
    assert shapes == {
        "to_q.weight": (8, 8),
        "to_k.weight": (8, 6),
        "to_v.weight": (8, 6),
        "to_out.0.weight": (8, 8),
        "to_out.0.bias": (8,),
    }
    clip = Attention(8, heads=2, names="transformers")
    assert sorted(name for name, _ in clip.named_parameters()) == [
        f"{p}_proj.{w}" for p in ("k", "out", "q", "v") for w in ("bias", "weight")
    ]


def test_image_tokens_round_trip():
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    tokens = image_tokens(md.tensor(x, dtype=np.float64))
    assert tokens.shape == (2, 20, 3)
    np.testing.assert_array_equal(tokens.numpy()[1, 7], x[1, :, 1, 2])  # position (1, 2) is token 7
    np.testing.assert_array_equal(image_from_tokens(tokens, 4, 5).numpy(), x)


def test_attention_rejects_bad_input():
    with pytest.raises(ValueError, match="3 heads do not divide the width 8"):
        Attention(8, heads=3)
    attn = Attention(4, heads=2)
    with pytest.raises(ValueError, match=r"x must be \(N, L, 4\)"):
        attn(md.tensor(np.zeros((2, 4), np.float32)))
    with pytest.raises(ValueError, match=r"context must be \(N, Lc, 4\)"):
        attn(md.tensor(np.zeros((1, 3, 4), np.float32)), md.tensor(np.zeros((1, 2, 5), np.float32)))
    with pytest.raises(ValueError, match="names must be"):
        Attention(4, names="torch")
    with pytest.raises(ValueError, match="boolean mask"):
        attn(md.tensor(np.zeros((1, 3, 4), np.float32)), mask=np.zeros((3, 3), np.float32), causal=True)
