"""conv2d: gradients by central differences, values by a direct loop over output pixels."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, leaf

import minidiff as md
import minidiff.functional as F
from minidiff import kernels
from minidiff.kernels import conv as conv_kernels
from minidiff.kernels import machine
from minidiff.testing import gradcheck, tolerance

DTYPES = [np.float32, np.float64]


def ref_conv2d(x, weight, bias, stride, padding):
    """Cross-correlation by definition: one dot product per output pixel."""
    n, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.zeros((n, o, ho, wo))
    for b in range(n):
        for f in range(o):
            for i in range(ho):
                for j in range(wo):
                    total = 0.0 if bias is None else bias[f]
                    for ch in range(c):
                        for di in range(kh):
                            for dj in range(kw):
                                r, s = i * sh + di - ph, j * sw + dj - pw
                                if 0 <= r < h and 0 <= s < w:
                                    total += x[b, ch, r, s] * weight[f, ch, di, dj]
                    out[b, f, i, j] = total
    return out


@st.composite
def conv_case(draw):
    n, c, o = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 2))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    stride = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    padding = (draw(st.integers(0, 1)), draw(st.integers(0, 1)))
    h = draw(st.integers(max(1, kh - 2 * padding[0]), 4))
    w = draw(st.integers(max(1, kw - 2 * padding[1]), 4))
    x = draw(arrays((n, c, h, w)))
    weight = draw(arrays((o, c, kh, kw)))
    bias = draw(arrays((o,))) if draw(st.booleans()) else None
    # the same geometry as an int where both sides agree, to cover that form of the argument
    as_arg = lambda p: p[0] if p[0] == p[1] and draw(st.booleans()) else p  # noqa: E731
    return x, weight, bias, as_arg(stride), as_arg(padding)


def _pairs(stride, padding):
    pair = lambda v: (v, v) if isinstance(v, int) else v  # noqa: E731
    return pair(stride), pair(padding)


@given(case=conv_case())
def test_conv2d_gradcheck(case):
    x, weight, bias, stride, padding = case
    inputs = [leaf(x), leaf(weight)] + ([leaf(bias)] if bias is not None else [])
    assert gradcheck(lambda *ts: F.conv2d(*ts, stride=stride, padding=padding), *inputs)


@given(case=conv_case())
def test_conv2d_gradcheck_input_only(case):
    x, weight, bias, stride, padding = case
    w = leaf(weight, requires_grad=False)
    b = None if bias is None else leaf(bias, requires_grad=False)
    assert gradcheck(lambda t: F.conv2d(t, w, b, stride=stride, padding=padding), leaf(x))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=conv_case())
def test_conv2d_forward(dtype, case):
    x, weight, bias, stride, padding = case
    tx, tw = md.tensor(x, dtype=dtype), md.tensor(weight, dtype=dtype)
    tb = None if bias is None else md.tensor(bias, dtype=dtype)
    up = lambda t: None if t is None else t.numpy().astype(np.float64)  # noqa: E731
    expected = ref_conv2d(up(tx), up(tw), up(tb), *_pairs(stride, padding))
    out = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
    assert out.dtype == dtype and out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype))


def test_conv2d_identity_kernel():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float64).reshape(2, 3, 4, 4)
    weight = np.zeros((3, 3, 3, 3))
    for c in range(3):
        weight[c, c, 1, 1] = 1.0
    out = F.conv2d(leaf(x), leaf(weight), padding=1)
    np.testing.assert_array_equal(out.numpy(), x)


@pytest.mark.parametrize("impl", sorted(kernels.implementations("im2col")))
@pytest.mark.parametrize("stride, padding, k", [(1, 0, 3), (2, 1, 3), (1, 0, 1), (2, 1, 2)])
def test_conv2d_under_each_kernel_implementation(impl, stride, padding, k):
    rng = np.random.default_rng(k + 10 * stride)
    x, w, b = rng.standard_normal((2, 2, 5, 4)), rng.standard_normal((3, 2, k, k)), rng.standard_normal(3)
    with kernels.use(impl):
        out = F.conv2d(leaf(x), leaf(w), leaf(b), stride=stride, padding=padding)
        expected = ref_conv2d(x, w, b, (stride, stride), (padding, padding))
        np.testing.assert_allclose(out.numpy(), expected, **tolerance(np.float64))
        x_view = np.asfortranarray(x)  # a non-C-contiguous input
        assert gradcheck(
            lambda *ts: F.conv2d(*ts, stride=stride, padding=padding), leaf(x_view), leaf(w), leaf(b)
        )


@pytest.mark.parametrize("chunk_bytes", [1, 200])  # one sample per chunk; two samples per chunk
@pytest.mark.parametrize("stride, padding, k", [(1, 1, 3), (2, 0, 2)])
@pytest.mark.parametrize("out_channels", [1, 3])  # gx as a conv of gy (O < C, stride 1) or by col2im
def test_conv2d_unfolds_the_batch_in_chunks(monkeypatch, chunk_bytes, stride, padding, k, out_channels):
    """The CPU path unfolds a few samples at a time; values and gradients do not depend on it."""
    rng = np.random.default_rng(k)
    o = out_channels
    x, w, b = rng.standard_normal((5, 2, 4, 5)), rng.standard_normal((o, 2, k, k)), rng.standard_normal(o)

    def run():
        tx, tw, tb = leaf(x), leaf(w), leaf(b)
        out = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
        (out * out).sum().backward()
        return out.numpy(), tx.grad, tw.grad, tb.grad

    whole = run()
    monkeypatch.setattr(conv_kernels, "COLS_CHUNK_BYTES", chunk_bytes)
    chunks = conv_kernels.chunks(x, 2 * k * k * 8)
    assert len(chunks) > 1 and chunks[0][0] == 0 and chunks[-1][1] == 5
    chunked = run()
    expected = ref_conv2d(x, w, b, (stride,) * 2, (padding,) * 2)
    np.testing.assert_allclose(chunked[0], expected, **tolerance(np.float64))
    for got, expected in zip(chunked, whole):
        np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)
    assert gradcheck(lambda *ts: F.conv2d(*ts, stride=stride, padding=padding), leaf(x[:3]), leaf(w), leaf(b))


@pytest.mark.skipif(
    kernels.which("conv2d") != "native" or not machine.native_conv_is_vectorized,
    reason="the direct convolution needs the native kernels and a CPU with AVX2 or AVX-512",
)
@pytest.mark.parametrize(
    "kernel, stride, padding, out_channels, input_grad_calls",
    [
        (3, 1, 1, 5, 1),
        (3, 1, 0, 4, 1),
        (5, 1, 2, 9, 1),
        (2, 1, 1, 6, 1),
        (1, 1, 0, 7, 1),
        (3, 2, 1, 16, 4),  # the U-Net's downsampling: one stride-1 convolution per phase
        (3, 3, 0, 5, 9),  # kernel 3, stride 3: 9 phases of one tap each
        (3, 3, 1, 5, 9),
        (2, 3, 1, 4, 4),  # kernel 2, stride 3: a third of the rows and columns meet no tap
        (1, 2, 0, 3, 1),  # only the even rows and columns meet the kernel: the rest get zeros
    ],
)
def test_conv2d_direct_path_matches_unfolding(
    monkeypatch, kernel, stride, padding, out_channels, input_grad_calls
):
    """float32 convs with padding below the kernel (1x1 and strided too) run the direct kernel
    forward and for the input gradient (a stride-1 convolution per phase of the stride), and the
    direct weight gradient; values and gradients agree with the unfolding (or, for 1x1, matrix
    product) path and with the definition."""
    rng = np.random.default_rng(kernel * 10 + out_channels)
    x = rng.standard_normal((3, 6, 9, 11)).astype(np.float32)
    w = rng.standard_normal((out_channels, 6, kernel, kernel)).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)
    Ho, Wo = (9 + 2 * padding - kernel) // stride + 1, (11 + 2 * padding - kernel) // stride + 1
    gy = rng.standard_normal((3, out_channels, Ho, Wo))

    def run():
        tx, tw, tb = (
            md.tensor(x, requires_grad=True),
            md.tensor(w, requires_grad=True),
            md.tensor(b, requires_grad=True),
        )
        out = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
        (out * md.tensor(gy.astype(np.float32))).sum().backward()
        return out.numpy(), tx.grad, tw.grad, tb.grad

    calls, weight_grad_calls = [], []
    direct, direct_weight_grad = conv_kernels.conv2d, conv_kernels.conv2d_weight_grad
    monkeypatch.setattr(conv_kernels, "conv2d", lambda *a: calls.append(a[1].shape) or direct(*a))
    monkeypatch.setattr(
        conv_kernels,
        "conv2d_weight_grad",
        lambda *a: weight_grad_calls.append(a[2:4]) or direct_weight_grad(*a),
    )
    got = run()
    assert len(calls) == 1 + input_grad_calls  # forward, then the input gradient's phases
    assert weight_grad_calls == [((kernel, kernel), (stride, stride))]
    with kernels.use("numba"):  # no numba direct kernel: im2col and matrix products
        unfolded = run()
    for a, e in zip(got, unfolded):
        np.testing.assert_allclose(a, e, **tolerance(np.float32))
    expected = ref_conv2d(x.astype(np.float64), w.astype(np.float64), b, (stride, stride), (padding, padding))
    np.testing.assert_allclose(got[0], expected, **tolerance(np.float32))


@st.composite
def direct_geometries(draw):
    """Kernels 1-4 each way, strides 1-3 each way, padding below the kernel, 3 or 16 output
    channels (positions or channels as the kernels' vector lanes), sizes the kernel fits."""
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1)))
    H, W = (
        draw(st.integers(max(1, kh - 2 * padding[0]), 10)),
        draw(st.integers(max(1, kw - 2 * padding[1]), 10)),
    )
    return (kh, kw), stride, padding, (draw(st.integers(1, 3)), 3, H, W), draw(st.sampled_from([3, 16]))


@pytest.mark.skipif(
    kernels.which("conv2d") != "native" or not machine.native_conv_is_vectorized,
    reason="the direct convolution needs the native kernels and a CPU with AVX2 or AVX-512",
)
@given(geometry=direct_geometries(), seed=st.integers(0, 2**16))
def test_conv2d_direct_path_at_any_stride_matches_unfolding(geometry, seed):
    """Output and every gradient of the direct path (the input gradient by phases of the stride)
    against the unfolding path, over kernel, stride and padding shapes."""
    kernel, stride, padding, x_shape, out_channels = geometry
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal((out_channels, x_shape[1], *kernel)).astype(np.float32)
    b = rng.standard_normal(out_channels).astype(np.float32)

    def run():
        tx, tw, tb = (md.tensor(a, requires_grad=True) for a in (x, w, b))
        out = F.conv2d(tx, tw, tb, stride=stride, padding=padding)
        gy = np.random.default_rng(seed + 1).standard_normal(out.shape).astype(np.float32)
        (out * md.tensor(gy)).sum().backward()
        return out.numpy(), tx.grad, tw.grad, tb.grad

    direct = run()
    with kernels.use("numba"):
        unfolded = run()
    for a, e in zip(direct, unfolded, strict=True):
        np.testing.assert_allclose(a, e, **tolerance(np.float32))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kernel, stride", [(1, 1), (3, 1), (1, 2), (3, 2)])
def test_conv2d_of_an_empty_batch(dtype, kernel, stride):
    """No samples: empty outputs and input gradients, zero weight and bias gradients (every path,
    the direct kernels included, whose thread split once divided by the batch size)."""
    x = md.tensor(np.zeros((0, 4, 8, 8)), dtype=dtype, requires_grad=True)
    w = md.tensor(np.ones((16, 4, kernel, kernel)), dtype=dtype, requires_grad=True)
    b = md.tensor(np.ones(16), dtype=dtype, requires_grad=True)
    y = F.conv2d(x, w, b, stride=stride, padding=kernel // 2)
    assert y.shape == (0, 16, 8 // stride, 8 // stride)
    y.sum().backward()
    assert x.grad.shape == (0, 4, 8, 8)
    assert not w.grad.any() and not b.grad.any()


# -- bad input -------------------------------------------------------------------------------------------


def _x(shape=(1, 2, 5, 5), dtype=np.float32):
    return md.tensor(np.ones(shape), dtype=dtype)


def test_conv2d_rejects_channel_mismatch():
    with pytest.raises(
        ValueError,
        match=r"conv2d: x has 2 channels \(shape \(1, 2, 5, 5\)\) "
        r"but weight expects 3 \(shape \(4, 3, 3, 3\)\)",
    ):
        F.conv2d(_x(), _x((4, 3, 3, 3)))


def test_conv2d_rejects_wrong_ranks():
    with pytest.raises(ValueError, match=r"conv2d: x must have 4 dims \(N, C, H, W\), got shape \(2, 5, 5\)"):
        F.conv2d(_x((2, 5, 5)), _x((4, 2, 3, 3)))
    with pytest.raises(
        ValueError, match=r"conv2d: weight must have 4 dims \(O, C, kH, kW\), got shape \(4, 2, 3\)"
    ):
        F.conv2d(_x(), _x((4, 2, 3)))


def test_conv2d_rejects_bad_bias():
    with pytest.raises(ValueError, match=r"conv2d: bias must have shape \(4,\), got \(3,\)"):
        F.conv2d(_x(), _x((4, 2, 3, 3)), _x((3,)))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"padding": -1}, ValueError, r"conv2d: padding must be >= 0, got -1"),
        ({"padding": (1, -2)}, ValueError, r"conv2d: padding must be >= 0, got \(1, -2\)"),
        ({"stride": 0}, ValueError, r"conv2d: stride must be >= 1, got 0"),
        ({"stride": (1, 2, 3)}, TypeError, r"conv2d: stride must be an int or a pair of ints"),
        # regression test, minidiff bug fixed in ec78413: a float failed inside tuple(value)
        ({"stride": 1.5}, TypeError, r"conv2d: stride must be an int or a pair of ints, got 1.5"),
        ({"padding": 0.5}, TypeError, r"conv2d: padding must be an int or a pair of ints, got 0.5"),
    ],
)
def test_conv2d_rejects_bad_geometry(kwargs, error, message):
    with pytest.raises(error, match=message):
        F.conv2d(_x(), _x((4, 2, 3, 3)), **kwargs)


def test_conv2d_rejects_kernel_larger_than_input():
    with pytest.raises(ValueError, match=r"conv2d: kernel \(8, 3\) is larger than the padded input \(5, 5\)"):
        F.conv2d(_x(), _x((4, 2, 8, 3)), padding=1)


def test_conv2d_rejects_dtypes():
    with pytest.raises(TypeError, match=r"conv2d: x has dtype int64"):
        F.conv2d(md.tensor(np.ones((1, 2, 5, 5), dtype=np.int64)), _x((4, 2, 3, 3)))
    with pytest.raises(TypeError, match=r"(?i)conv2d.*float32.*float64"):
        F.conv2d(_x(), _x((4, 2, 3, 3), dtype=np.float64))
