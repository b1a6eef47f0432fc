"""PyTorch (CPU) as a second oracle: forward values and gradients, float32, relative error < 1e-4.

Relative error is ``max|a - b| / max(max|b|, tiny)`` with b the PyTorch result. Gradients are
those of ``sum(out * cotangent)`` for a fixed random cotangent, for every input.
"""

from __future__ import annotations

import numpy as np
import pytest

import minidiff as md
import minidiff.functional as F
from minidiff.testing import tolerance

torch = pytest.importorskip("torch")
TF = torch.nn.functional

# The parity bound is the float32 rtol of the shared table (1e-4).
REL = tolerance(np.float32)["rtol"]
TINY = np.finfo(np.float32).tiny


def rel_error(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shapes differ: {a.shape} vs {b.shape}"
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), TINY))


def compare(md_fn, torch_fn, arrays, *, seed=0, consts=()):
    """Run both frameworks on the same float32 inputs; compare outputs and input gradients.

    ``arrays``: inputs that get gradients. ``consts``: extra arguments passed as-is to both
    functions after the differentiable ones, as (minidiff value, torch value) pairs.
    """
    md_in = [md.tensor(a, dtype="float32", requires_grad=True) for a in arrays]
    th_in = [torch.tensor(a, dtype=torch.float32, requires_grad=True) for a in arrays]
    md_out = md_fn(*md_in, *[c[0] for c in consts])
    th_out = torch_fn(*th_in, *[c[1] for c in consts])
    assert md_out.dtype == np.float32
    th_np = th_out.detach().numpy()
    err = rel_error(md_out.numpy(), th_np)
    assert err < REL, f"forward: relative error {err:.3g}"

    # its own seed stream: a cotangent equal to a (normalized) input would cancel the gradient
    cotangent = np.random.default_rng([seed, 2024]).standard_normal(th_np.shape).astype(np.float32)
    (md_out * md.tensor(cotangent)).sum().backward()
    (th_out * torch.from_numpy(cotangent)).sum().backward()
    for i, (m, t) in enumerate(zip(md_in, th_in, strict=True)):
        assert m.grad is not None, f"input {i}: minidiff gave no gradient"
        assert m.grad.dtype == np.float32, f"input {i}: gradient dtype {m.grad.dtype}"
        err = rel_error(m.grad, t.grad.numpy())
        assert err < REL, f"backward: input {i} (shape {m.shape}): relative error {err:.3g}"


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# -- conv2d ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("kernel", [1, 3])
@pytest.mark.parametrize("padding", [0, 1])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv2d(stride, padding, kernel, bias):
    rng = np.random.default_rng(stride * 100 + padding * 10 + kernel)
    x, w = randn(rng, 2, 3, 7, 6), randn(rng, 4, 3, kernel, kernel)
    arrays = [x, w] + ([randn(rng, 4)] if bias else [])

    def md_fn(x, w, b=None):
        return F.conv2d(x, w, b, stride=stride, padding=padding)

    def th_fn(x, w, b=None):
        return TF.conv2d(x, w, b, stride=stride, padding=padding)

    compare(md_fn, th_fn, arrays)


def test_conv2d_non_square():
    rng = np.random.default_rng(7)
    compare(
        lambda x, w, b: F.conv2d(x, w, b, stride=(1, 2), padding=(2, 1)),
        lambda x, w, b: TF.conv2d(x, w, b, stride=(1, 2), padding=(2, 1)),
        [randn(rng, 1, 2, 5, 8), randn(rng, 3, 2, 3, 2), randn(rng, 3)],
    )


# -- normalization ------------------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("groups", [1, 2, 4, 8])
def test_group_norm(groups, affine):
    rng = np.random.default_rng(groups)
    x = randn(rng, 2, 8, 5, 3) * 3 + 1
    if affine:
        compare(
            lambda x, w, b: F.group_norm(x, groups, w, b, eps=1e-5),
            lambda x, w, b: TF.group_norm(x, groups, w, b, eps=1e-5),
            [x, randn(rng, 8), randn(rng, 8)],
        )
    else:
        compare(
            lambda x: F.group_norm(x, groups, eps=1e-5), lambda x: TF.group_norm(x, groups, eps=1e-5), [x]
        )


@pytest.mark.parametrize("groups", [1, 4])
def test_group_norm_silu_with_shift(groups):
    rng = np.random.default_rng(10 + groups)
    compare(
        lambda x, w, b, s: F.group_norm_silu(x, groups, w, b, eps=1e-5, shift=s),
        lambda x, w, b, s: TF.silu(TF.group_norm(x + s[:, :, None, None], groups, w, b, eps=1e-5)),
        [randn(rng, 2, 8, 5, 3) * 3 + 1, randn(rng, 8), randn(rng, 8), randn(rng, 2, 8)],
    )


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("normalized", [(6,), (4, 6)])
def test_layer_norm(normalized, affine):
    rng = np.random.default_rng(len(normalized))
    x = randn(rng, 3, 4, 6) * 2 - 1
    if affine:
        compare(
            lambda x, w, b: F.layer_norm(x, normalized, w, b, eps=1e-5),
            lambda x, w, b: TF.layer_norm(x, normalized, w, b, eps=1e-5),
            [x, randn(rng, *normalized), randn(rng, *normalized)],
        )
    else:
        compare(
            lambda x: F.layer_norm(x, normalized, eps=1e-5),
            lambda x: TF.layer_norm(x, normalized, eps=1e-5),
            [x],
        )


# -- softmax and attention -------------------------------------------------------------------------------


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_softmax(axis):
    rng = np.random.default_rng(3)
    compare(lambda x: F.softmax(x, axis=axis), lambda x: TF.softmax(x, dim=axis), [randn(rng, 4, 5, 6) * 3])


@pytest.mark.parametrize("axis", [-1, 1])
def test_log_softmax(axis):
    rng = np.random.default_rng(4)
    compare(
        lambda x: F.log_softmax(x, axis=axis),
        lambda x: TF.log_softmax(x, dim=axis),
        [randn(rng, 4, 5, 6) * 3],
    )


@pytest.mark.parametrize("mask", ["none", "bool", "float"])
@pytest.mark.parametrize("scale", [None, 0.3])
def test_scaled_dot_product_attention(mask, scale):
    rng = np.random.default_rng(5)
    q, k, v = randn(rng, 2, 3, 5, 4), randn(rng, 2, 3, 6, 4), randn(rng, 2, 3, 6, 7)
    consts = ()
    if mask == "bool":
        m = rng.random((5, 6)) > 0.4
        m[:, 0] = True  # every query attends somewhere
        consts = ((md.tensor(m), torch.from_numpy(m)),)
    elif mask == "float":
        m = randn(rng, 1, 3, 5, 6)
        consts = ((md.tensor(m), torch.from_numpy(m)),)

    def md_fn(q, k, v, m=None):
        return F.scaled_dot_product_attention(q, k, v, mask=m, scale=scale)

    def th_fn(q, k, v, m=None):
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)

    compare(md_fn, th_fn, [q, k, v], consts=consts)


def test_attention_with_float_mask_gradient():
    rng = np.random.default_rng(6)
    q, k, v, m = randn(rng, 2, 4, 3), randn(rng, 2, 5, 3), randn(rng, 2, 5, 2), randn(rng, 2, 4, 5)
    compare(
        lambda q, k, v, m: F.scaled_dot_product_attention(q, k, v, mask=m),
        lambda q, k, v, m: TF.scaled_dot_product_attention(q, k, v, attn_mask=m),
        [q, k, v, m],
    )


# -- resampling ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [2, 3])
def test_upsample_nearest2d(scale):
    rng = np.random.default_rng(scale)
    compare(
        lambda x: F.upsample_nearest2d(x, scale_factor=scale),
        lambda x: TF.interpolate(x, scale_factor=scale, mode="nearest"),
        [randn(rng, 2, 3, 4, 5)],
    )


@pytest.mark.parametrize(
    "kernel, stride, padding", [(2, None, 0), (3, 1, 1), (3, 2, 1), ((2, 3), (1, 2), (1, 0))]
)
def test_avg_pool2d(kernel, stride, padding):
    rng = np.random.default_rng(8)
    compare(
        lambda x: F.avg_pool2d(x, kernel, stride=stride, padding=padding),
        lambda x: TF.avg_pool2d(x, kernel, stride=stride, padding=padding),
        [randn(rng, 2, 3, 7, 6)],
    )


# -- elementwise, linear, losses ----------------------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(approximate):
    rng = np.random.default_rng(9)
    compare(
        lambda x: F.gelu(x, approximate=approximate),
        lambda x: TF.gelu(x, approximate=approximate),
        [randn(rng, 4, 7) * 3],
    )


# Regression test, minidiff bug fixed in ec78413: autograd.topological_order: silu = x * sigmoid(x)
# uses x twice and its gradient drops the sigmoid path (see tests/test_autograd.py)
def test_silu():
    rng = np.random.default_rng(10)
    compare(F.silu, TF.silu, [randn(rng, 4, 7) * 3])


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_linear(bias):
    rng = np.random.default_rng(11)
    arrays = [randn(rng, 2, 3, 5), randn(rng, 4, 5)] + ([randn(rng, 4)] if bias else [])
    compare(lambda *a: F.linear(*a), lambda *a: TF.linear(*a), arrays)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_mse_loss(reduction):
    rng = np.random.default_rng(12)
    compare(
        lambda a, b: F.mse_loss(a, b, reduction=reduction),
        lambda a, b: TF.mse_loss(a, b, reduction=reduction),
        [randn(rng, 3, 4), randn(rng, 3, 4)],
    )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy(reduction):
    rng = np.random.default_rng(13)
    labels = rng.integers(0, 5, size=6)
    compare(
        lambda x, y: F.cross_entropy(x, y, reduction=reduction),
        lambda x, y: TF.cross_entropy(x, y, reduction=reduction),
        [randn(rng, 6, 5) * 2],
        consts=((labels, torch.from_numpy(labels)),),
    )
