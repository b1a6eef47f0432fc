"""im2col / col2im, the whole convolution and its weight gradient: every implementation against
naive loops, torch, and the reference."""

import itertools
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_params import CPU_IMPLEMENTATIONS, make_array

from minidiff import kernels

TOL = {np.float32: dict(atol=1e-5, rtol=1e-4), np.float64: dict(atol=1e-12, rtol=1e-10)}


def impls(*ops, names=CPU_IMPLEMENTATIONS):
    """pytest params, one per implementation: its function for each of ``ops`` (one op: the
    function itself); implementations this machine lacks are skipped with the reason."""
    params = []
    for name in names:
        ok, why = kernels.available()[name]
        missing = [op for op in ops if name not in kernels.implementations(op)]
        reason = why if not ok else (f"no {name} version of {', '.join(missing)}" if missing else None)
        fns = tuple(kernels.implementations(op).get(name) for op in ops)
        mark = pytest.mark.skipif(reason is not None, reason=str(reason))
        params.append(pytest.param(fns[0] if len(ops) == 1 else fns, id=name, marks=mark))
    return params


@st.composite
def conv_cases(draw):
    """A tiny conv geometry: odd sizes, kernels 1-3, strides 1-3, padding 0-2, and an input."""
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, 2)), draw(st.integers(0, 2))
    H = draw(st.integers(max(1, kh - 2 * ph), 7))
    W = draw(st.integers(max(1, kw - 2 * pw), 7))
    N, C = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_array(rng, (N, C, H, W), dtype, layout)
    return x, kh, kw, (sh, sw), (ph, pw), rng


def out_size(x_shape, kh, kw, stride, padding):
    H, W = x_shape[2:]
    return (H + 2 * padding[0] - kh) // stride[0] + 1, (W + 2 * padding[1] - kw) // stride[1] + 1


def naive_im2col(x, kh, kw, stride, padding):
    """The definition, one entry at a time."""
    N, C, H, W = x.shape
    Ho, Wo = out_size(x.shape, kh, kw, stride, padding)
    cols = np.zeros((N, C * kh * kw, Ho * Wo), x.dtype)
    for n, c, i, j, oh, ow in itertools.product(
        range(N), range(C), range(kh), range(kw), range(Ho), range(Wo)
    ):
        h, w = oh * stride[0] - padding[0] + i, ow * stride[1] - padding[1] + j
        if 0 <= h < H and 0 <= w < W:
            cols[n, c * kh * kw + i * kw + j, oh * Wo + ow] = x[n, c, h, w]
    return cols


def naive_col2im(cols, x_shape, kh, kw, stride, padding):
    """Scatter-add, one entry at a time, in float64."""
    N, C, H, W = x_shape
    Ho, Wo = out_size(x_shape, kh, kw, stride, padding)
    x = np.zeros(x_shape, np.float64)
    for n, c, i, j, oh, ow in itertools.product(
        range(N), range(C), range(kh), range(kw), range(Ho), range(Wo)
    ):
        h, w = oh * stride[0] - padding[0] + i, ow * stride[1] - padding[1] + j
        if 0 <= h < H and 0 <= w < W:
            x[n, c, h, w] += cols[n, c * kh * kw + i * kw + j, oh * Wo + ow]
    return x


def naive_conv2d(x, weight, stride, padding):
    """Direct convolution, one output pixel at a time, in float64."""
    out_channels, _, kh, kw = weight.shape
    Ho, Wo = out_size(x.shape, kh, kw, stride, padding)
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    y = np.zeros((x.shape[0], out_channels, Ho, Wo))
    for n, o, oh, ow in itertools.product(range(x.shape[0]), range(out_channels), range(Ho), range(Wo)):
        window = xpad[n, :, oh * stride[0] : oh * stride[0] + kh, ow * stride[1] : ow * stride[1] + kw]
        y[n, o, oh, ow] = np.sum(window * weight[o])
    return y


@pytest.mark.parametrize("im2col", impls("im2col"))
@settings(deadline=None)
@given(case=conv_cases())
def test_im2col_matches_naive_loops(im2col, case):
    x, kh, kw, stride, padding, _ = case
    cols = im2col(x, kh, kw, stride, padding)
    assert cols.dtype == x.dtype and cols.flags.c_contiguous
    np.testing.assert_array_equal(cols, naive_im2col(x, kh, kw, stride, padding))  # copies: exact


@pytest.mark.parametrize("col2im", impls("col2im"))
@settings(deadline=None)
@given(case=conv_cases())
def test_col2im_matches_naive_loops(col2im, case):
    x, kh, kw, stride, padding, rng = case
    Ho, Wo = out_size(x.shape, kh, kw, stride, padding)
    cols = make_array(rng, (x.shape[0], x.shape[1] * kh * kw, Ho * Wo), x.dtype, "transposed")
    gx = col2im(cols, x.shape, kh, kw, stride, padding)
    assert gx.shape == x.shape and gx.dtype == x.dtype
    np.testing.assert_allclose(gx, naive_col2im(cols, x.shape, kh, kw, stride, padding), **TOL[x.dtype.type])


@pytest.mark.parametrize("im2col_col2im", impls("im2col", "col2im"))
@settings(deadline=None)
@given(case=conv_cases())
def test_col2im_is_the_adjoint_of_im2col(im2col_col2im, case):
    """<im2col(x), c> == <x, col2im(c)>, in float64."""
    im2col, col2im = im2col_col2im
    x, kh, kw, stride, padding, rng = case
    x = x.astype(np.float64)
    cols = im2col(x, kh, kw, stride, padding)
    c = rng.standard_normal(cols.shape)
    lhs, rhs = np.vdot(cols, c), np.vdot(x, col2im(c, x.shape, kh, kw, stride, padding))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-12, atol=1e-12)


@settings(deadline=None)
@given(case=conv_cases(), out_channels=st.integers(1, 3))
def test_reference_im2col_gives_the_convolution(case, out_channels):
    x, kh, kw, stride, padding, rng = case
    weight = rng.standard_normal((out_channels, x.shape[1], kh, kw)).astype(x.dtype)
    cols = kernels.implementations("im2col")["reference"](x, kh, kw, stride, padding)
    y = np.stack([weight.reshape(out_channels, -1) @ cols[n] for n in range(x.shape[0])])
    Ho, Wo = out_size(x.shape, kh, kw, stride, padding)
    np.testing.assert_allclose(
        y.reshape(-1, out_channels, Ho, Wo), naive_conv2d(x, weight, stride, padding), **TOL[x.dtype.type]
    )


@settings(deadline=None)
@given(case=conv_cases())
def test_reference_matches_torch_unfold_and_fold(case):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, kh, kw, stride, padding, rng = case
    cols = kernels.implementations("im2col")["reference"](x, kh, kw, stride, padding)
    expected = F.unfold(torch.from_numpy(np.ascontiguousarray(x)), (kh, kw), padding=padding, stride=stride)
    np.testing.assert_array_equal(cols, expected.numpy())
    c = rng.standard_normal(cols.shape).astype(x.dtype)
    gx = kernels.implementations("col2im")["reference"](c, x.shape, kh, kw, stride, padding)
    expected = F.fold(torch.from_numpy(c), x.shape[2:], (kh, kw), padding=padding, stride=stride)
    np.testing.assert_allclose(gx, expected.numpy(), **TOL[x.dtype.type])


@pytest.mark.parametrize("im2col", impls("im2col", names=("numba", "native")))
@settings(deadline=None)
@given(case=conv_cases())
def test_fast_im2col_matches_reference(im2col, case):
    x, kh, kw, stride, padding, _ = case
    expected = kernels.implementations("im2col")["reference"](x, kh, kw, stride, padding)
    np.testing.assert_array_equal(im2col(x, kh, kw, stride, padding), expected)


@pytest.mark.parametrize("col2im", impls("col2im", names=("numba", "native")))
@settings(deadline=None)
@given(case=conv_cases())
def test_fast_col2im_matches_reference(col2im, case):
    x, kh, kw, stride, padding, rng = case
    Ho, Wo = out_size(x.shape, kh, kw, stride, padding)
    cols = make_array(rng, (x.shape[0], x.shape[1] * kh * kw, Ho * Wo), x.dtype, "strided")
    expected = kernels.implementations("col2im")["reference"](cols, x.shape, kh, kw, stride, padding)
    np.testing.assert_allclose(col2im(cols, x.shape, kh, kw, stride, padding), expected, **TOL[x.dtype.type])


@pytest.mark.parametrize("im2col", impls("im2col"))
def test_im2col_rejects_bad_input(im2col):
    x = np.zeros((1, 2, 4, 4), np.float32)
    with pytest.raises(TypeError, match="im2col.*int64"):
        im2col(x.astype(np.int64), 3, 3, (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"im2col.*\(N, C, H, W\)"):
        im2col(x[0], 3, 3, (1, 1), (0, 0))
    with pytest.raises(ValueError, match="does not fit"):
        im2col(x, 5, 3, (1, 1), (0, 0))
    with pytest.raises(ValueError, match="stride"):
        im2col(x, 3, 3, (0, 1), (0, 0))
    with pytest.raises(TypeError, match="padding"):
        im2col(x, 3, 3, (1, 1), (0.5, 0))


@pytest.mark.parametrize("col2im", impls("col2im"))
def test_col2im_rejects_bad_input(col2im):
    cols = np.zeros((1, 8, 4), np.float64)  # x (1, 2, 3, 3), kernel 2x2 -> 2x2 outputs
    assert col2im(cols, (1, 2, 3, 3), 2, 2, (1, 1), (0, 0)).shape == (1, 2, 3, 3)
    with pytest.raises(ValueError, match=r"col2im.*\(1, 8, 4\).*\(1, 18, 4\)"):
        col2im(np.zeros((1, 18, 4)), (1, 2, 3, 3), 2, 2, (1, 1), (0, 0))
    with pytest.raises(TypeError, match="col2im"):
        col2im(cols.astype(np.float16), (1, 2, 3, 3), 2, 2, (1, 1), (0, 0))


# -- conv2d: the whole convolution (native: direct, no columns) --------------------------------


def draw_conv_geometry(draw):
    """``(kh, kw), (sh, sw), (ph, pw), (H, W)``: kernel 1-5, stride 1-3, padding up to the kernel
    size, an input of 1-9 (at least one output position)."""
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    ph, pw = draw(st.integers(0, kh)), draw(st.integers(0, kw))
    H = draw(st.integers(max(1, kh - 2 * ph), 9))
    W = draw(st.integers(max(1, kw - 2 * pw), 9))
    return (kh, kw), (sh, sw), (ph, pw), (H, W)


@st.composite
def direct_conv_cases(draw):
    """Kernels 1-5 (any padding, also beyond the kernel), strides 1-3, 1-9 output channels (the
    native positions-as-lanes tile holds 3 or 4: remainders) or a multiple of 16 (the native
    channels-as-lanes tiles), odd sizes, both dtypes, any input layout."""
    (kh, kw), (sh, sw), (ph, pw), (H, W) = draw_conv_geometry(draw)
    N, C = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    out = draw(st.one_of(st.integers(1, 9), st.sampled_from([16, 32, 48, 64])))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    layouts = st.sampled_from(["contiguous", "transposed", "strided"])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_array(rng, (N, C, H, W), dtype, draw(layouts))
    weight = make_array(rng, (out, C, kh, kw), dtype, draw(layouts))
    bias = draw(st.sampled_from([None, make_array(rng, (out,), dtype, draw(layouts))]))
    return x, weight, (sh, sw), (ph, pw), bias


@pytest.mark.parametrize("conv", impls("conv2d"))
@settings(deadline=None)
@given(case=direct_conv_cases())
def test_conv2d_matches_naive_loops(conv, case):
    x, weight, stride, padding, bias = case
    y = conv(x, weight, stride, padding, bias)
    assert y.dtype == x.dtype
    expected = naive_conv2d(x, weight, stride, padding)
    if bias is not None:
        expected += bias[:, None, None]
    np.testing.assert_allclose(y, expected, **TOL[x.dtype.type])


@pytest.mark.parametrize("conv", impls("conv2d", names=("native",)))
@pytest.mark.parametrize(
    "shape, out_channels, kernel, padding",
    [
        ((2, 7, 19, 23), 13, (3, 3), (1, 1)),  # full tiles of output channels, then the rest
        ((1, 5, 8, 8), 16, (3, 3), (1, 1)),  # one sample: the channels are split between threads
        ((3, 4, 16, 16), 6, (5, 3), (2, 0)),
        ((2, 3, 33, 30), 8, (2, 4), (0, 3)),
        ((3, 6, 8, 8), 9, (3, 3), (1, 1)),  # 8 x 9 = 72 positions: one tile of 5 vectors, 4.5 used
        ((2, 2, 16, 16), 5, (3, 3), (1, 1)),  # 16 x 17 = 272: 3 tiles of 5 vectors, then 2
        ((2, 3, 5, 7), 4, (3, 3), (1, 1)),  # 5 x 8 = 40: a tile of 3 vectors
        # a multiple of the vector width: channels as lanes (tiles of 1-4 vectors of channels,
        # 6-12 positions, the last tile's positions cut short)
        ((3, 6, 8, 8), 64, (3, 3), (1, 1)),
        ((2, 5, 11, 13), 32, (3, 3), (1, 1)),
        ((1, 4, 9, 7), 80, (3, 2), (1, 0)),  # one sample: its tiles are split between threads
        ((2, 3, 6, 6), 48, (5, 5), (2, 2)),
        ((2, 7, 10, 10), 16, (1, 1), (0, 0)),
    ],
)
@pytest.mark.parametrize("stride", [1, 2])
def test_native_conv2d_at_vector_sizes(conv, shape, out_channels, kernel, padding, stride):
    """Planes wider than one vector tile, the last tile of every length, every output-channel
    split, with and without the bias, at strides 1 and 2 (channels as lanes whatever O, with
    zero weights past O): against the reference."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    weight = rng.standard_normal((out_channels, shape[1], *kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    reference = kernels.implementations("conv2d")["reference"]
    s = (stride, stride)
    for b in (None, bias):
        np.testing.assert_allclose(
            conv(x, weight, s, padding, b), reference(x, weight, s, padding, b), **TOL[np.float32]
        )


@pytest.mark.parametrize("conv", impls("conv2d", names=("native",)))
@pytest.mark.parametrize(
    "shape, out_channels, kernel, padding",
    [((1, 130, 9, 10), 32, (3, 3), (1, 1)), ((2, 600, 4, 5), 16, (1, 1), (0, 0))],
)
def test_native_conv2d_over_many_input_channels(conv, shape, out_channels, kernel, padding):
    """Input channels over several blocks of rows (c, tap), the last one ragged: each tile resumes
    from the partial sums it stored. Long float32 sums: held to the float64 convolution within the
    rounding bound of a K-term sum, K * eps32 * (|x| (*) |w|)."""
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32)
    weight = rng.standard_normal((out_channels, shape[1], *kernel)).astype(np.float32)
    bias = rng.standard_normal(out_channels).astype(np.float32)
    reference = kernels.implementations("conv2d")["reference"]
    x64, w64 = x.astype(np.float64), weight.astype(np.float64)
    exact = reference(x64, w64, (1, 1), padding, bias.astype(np.float64))
    bound = reference(np.abs(x64), np.abs(w64), (1, 1), padding, np.abs(bias.astype(np.float64)))
    terms = shape[1] * kernel[0] * kernel[1] + 1
    error = np.abs(conv(x, weight, (1, 1), padding, bias) - exact)
    assert (error <= terms * np.finfo(np.float32).eps * bound).all(), error.max()


@pytest.mark.skipif(not kernels.available()["native"][0], reason=kernels.available()["native"][1])
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_conv2d_narrower_vectors(isa):
    """The CPU picks the widest version at load time; MINIDIFF_CONV_ISA runs the others here."""
    code = (
        "import numpy as np; from minidiff import _native, kernels; rng = np.random.default_rng(1)\n"
        "x = rng.standard_normal((2, 5, 13, 17)).astype(np.float32)\n"
        "w = rng.standard_normal((7, 5, 3, 3)).astype(np.float32)\n"
        "ref = kernels.implementations('conv2d')['reference'](x, w, (1, 1), (1, 1))\n"
        "err = np.abs(_native.conv2d_direct(x, w, 1, 1) - ref).max() / np.abs(ref).max()\n"
        "w16 = rng.standard_normal((16, 5, 3, 3)).astype(np.float32)\n"
        "ref16 = kernels.implementations('conv2d')['reference'](x, w16, (2, 2), (1, 1))\n"
        "y16 = _native.conv2d_direct(x, w16, 1, 1, None, 2, 2)\n"
        "err = max(err, np.abs(y16 - ref16).max() / np.abs(ref16).max())\n"
        "gy = rng.standard_normal((2, 37, 13, 17)).astype(np.float32)\n"
        "ref = kernels.implementations('conv2d_weight_grad')['reference'](x, gy, (3, 3), (1, 1), (1, 1))\n"
        "gw = _native.conv2d_direct_weight_grad(x, gy, 3, 3, 1, 1)\n"
        "print(_native.conv2d_direct_isa, err, np.abs(gw - ref).max() / np.abs(ref).max())"
    )
    env = dict(os.environ, MINIDIFF_CONV_ISA=isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    ran, err, err_weight_grad = out.stdout.split()
    assert ran in (isa, "baseline")  # a CPU without AVX2 falls back to the baseline
    assert float(err) < 1e-5 and float(err_weight_grad) < 1e-5


def test_reference_conv2d_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2))
    y = kernels.implementations("conv2d")["reference"](x, weight, (2, 1), (1, 2))
    tx, tw = torch.from_numpy(x), torch.from_numpy(weight)
    expected = torch.nn.functional.conv2d(tx, tw, stride=(2, 1), padding=(1, 2))
    np.testing.assert_allclose(y, expected.numpy(), **TOL[np.float64])


@pytest.mark.parametrize("conv", impls("conv2d"))
def test_conv2d_rejects_bad_input(conv):
    x, weight = np.zeros((1, 2, 4, 4), np.float32), np.zeros((3, 2, 3, 3), np.float32)
    with pytest.raises(TypeError, match="conv2d: all arrays must have the same dtype"):
        conv(x, weight.astype(np.float64), (1, 1), (1, 1))
    with pytest.raises(TypeError, match="conv2d: x has dtype int64"):
        conv(x.astype(np.int64), weight, (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"same C, got x \(1, 2, 4, 4\) and weight \(3, 5, 3, 3\)"):
        conv(x, np.zeros((3, 5, 3, 3), np.float32), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        conv(x, np.zeros((3, 2, 7, 3), np.float32), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="stride >= 1"):
        conv(x, weight, (0, 1), (1, 1))
    with pytest.raises(ValueError, match="padding"):
        conv(x, weight, (1, 1), (-1, 0))
    with pytest.raises(ValueError, match=r"conv2d: bias must have shape \(O,\) = \(3,\), got \(2,\)"):
        conv(x, weight, (1, 1), (1, 1), np.zeros(2, np.float32))
    with pytest.raises(TypeError, match="conv2d: all arrays must have the same dtype"):
        conv(x, weight, (1, 1), (1, 1), np.zeros(3, np.float64))


# -- conv2d_weight_grad: its weight gradient (native: direct) --------------------------------


def naive_weight_grad(x, gy, kernel_size, stride, padding):
    """gw[o, c, i, j] = sum over n, oh, ow of gy[n, o, oh, ow] * x_padded[n, c, oh*sh + i, ow*sw + j],
    one kernel tap at a time, in float64."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    Ho, Wo = gy.shape[2:]
    xpad = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    gw = np.zeros((gy.shape[1], x.shape[1], kh, kw))
    for i, j in itertools.product(range(kh), range(kw)):
        window = xpad[:, :, i : i + sh * (Ho - 1) + 1 : sh, j : j + sw * (Wo - 1) + 1 : sw]
        gw[:, :, i, j] = np.einsum("nohw,nchw->oc", gy.astype(np.float64), window)
    return gw


@st.composite
def weight_grad_cases(draw):
    """Kernels 1-5 (any padding), strides 1-3, 1-70 output channels (the native tiles hold 1-4
    vectors of 4, 8 or 16 channels: every remainder), 1-5 input channels (rows C*kh*kw: partial
    row tiles), odd sizes, both dtypes, any layout of x and gy."""
    (kh, kw), (sh, sw), (ph, pw), (H, W) = draw_conv_geometry(draw)
    N, C, out = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 70))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    layouts = st.sampled_from(["contiguous", "transposed", "strided"])
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_array(rng, (N, C, H, W), dtype, draw(layouts))
    Ho, Wo = (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1
    gy = make_array(rng, (N, out, Ho, Wo), dtype, draw(layouts))
    return x, gy, (kh, kw), (sh, sw), (ph, pw)


@pytest.mark.parametrize("weight_grad", impls("conv2d_weight_grad"))
@settings(deadline=None)
@given(case=weight_grad_cases())
def test_conv2d_weight_grad_matches_naive_loops(weight_grad, case):
    x, gy, kernel_size, stride, padding = case
    gw = weight_grad(x, gy, kernel_size, stride, padding)
    assert gw.dtype == x.dtype and gw.shape == (gy.shape[1], x.shape[1], *kernel_size)
    expected = naive_weight_grad(x, gy, kernel_size, stride, padding)
    np.testing.assert_allclose(gw, expected, **TOL[x.dtype.type])


@pytest.mark.parametrize("weight_grad", impls("conv2d_weight_grad", names=("native",)))
@pytest.mark.parametrize(
    "shape, out_channels, kernel, stride, padding",
    [
        ((5, 7, 19, 23), 80, (3, 3), (1, 1), (1, 1)),  # 4 + 1 vectors of 16 channels, 63 rows
        ((1, 5, 8, 8), 33, (3, 3), (1, 1), (1, 1)),  # one sample: its tiles are split between the threads
        ((3, 4, 16, 16), 48, (5, 3), (1, 1), (2, 0)),
        ((2, 3, 33, 30), 16, (2, 4), (1, 1), (0, 3)),
        ((4, 1, 12, 12), 1, (3, 3), (1, 1), (1, 1)),  # one output channel: 15 zero lanes
        ((3, 6, 16, 16), 64, (3, 3), (2, 2), (1, 1)),  # the U-Net's downsampling
        ((2, 5, 17, 14), 20, (3, 3), (2, 3), (1, 1)),
    ],
)
def test_native_conv2d_weight_grad_at_vector_sizes(weight_grad, shape, out_channels, kernel, stride, padding):
    """Planes of many positions, every tile shape and remainder: against the definition."""
    rng = np.random.default_rng(sum(shape) + out_channels)
    x = rng.standard_normal(shape).astype(np.float32)
    Ho = (shape[2] + 2 * padding[0] - kernel[0]) // stride[0] + 1
    Wo = (shape[3] + 2 * padding[1] - kernel[1]) // stride[1] + 1
    gy = rng.standard_normal((shape[0], out_channels, Ho, Wo)).astype(np.float32)
    expected = naive_weight_grad(x, gy, kernel, stride, padding)
    # float32 sums of N*Ho*Wo products: relative to the size of the terms, not of the result
    scale = np.sqrt(shape[0] * Ho * Wo)
    got = weight_grad(x, gy, kernel, stride, padding)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5 * scale)


def test_reference_conv2d_weight_grad_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 3, 7, 6)), rng.standard_normal((4, 3, 3, 2))
    gy = rng.standard_normal((2, 4, 4, 7))
    tw = torch.from_numpy(weight).requires_grad_()
    y = torch.nn.functional.conv2d(torch.from_numpy(x), tw, stride=(2, 1), padding=(1, 1))
    y.backward(torch.from_numpy(gy))
    gw = kernels.implementations("conv2d_weight_grad")["reference"](x, gy, (3, 2), (2, 1), (1, 1))
    np.testing.assert_allclose(gw, tw.grad.numpy(), **TOL[np.float64])


@pytest.mark.parametrize("weight_grad", impls("conv2d_weight_grad"))
def test_conv2d_weight_grad_rejects_bad_input(weight_grad):
    fn = "conv2d_weight_grad"
    x, gy = np.zeros((2, 2, 4, 4), np.float32), np.zeros((2, 3, 4, 4), np.float32)
    with pytest.raises(TypeError, match=f"{fn}: all arrays must have the same dtype"):
        weight_grad(x, gy.astype(np.float64), (3, 3), (1, 1), (1, 1))
    with pytest.raises(TypeError, match=f"{fn}: x has dtype int64"):
        weight_grad(x.astype(np.int64), gy, (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"same N, got x \(2, 2, 4, 4\) and gy \(1, 3, 4, 4\)"):
        weight_grad(x, gy[:1], (3, 3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match=r"gy \(2, 3, 4, 4\) does not match x .* outputs of 2x2"):
        weight_grad(x, gy, (3, 3), (1, 1), (0, 0))
    with pytest.raises(ValueError, match=r"stride \(2, 2\) and padding \(1, 1\) gives outputs of 2x2"):
        weight_grad(x, gy, (3, 3), (2, 2), (1, 1))
    with pytest.raises(ValueError, match="does not fit"):
        weight_grad(x, gy, (7, 3), (1, 1), (1, 1))


@pytest.mark.skipif(not kernels.available()["native"][0], reason=kernels.available()["native"][1])
def test_native_extension_never_casts_or_copies_silently():
    from minidiff import _native

    x = np.zeros((1, 2, 4, 4), np.float32)
    assert _native.im2col(x, 3, 3, 1, 1, 0, 0).dtype == np.float32
    assert _native.im2col(x.astype(np.float64), 3, 3, 1, 1, 0, 0).dtype == np.float64
    with pytest.raises(TypeError):  # a transposed view: the Python wrapper must copy it first
        _native.im2col(x.transpose(0, 1, 3, 2), 3, 3, 1, 1, 0, 0)
    with pytest.raises(TypeError):
        _native.im2col(x.astype(np.int32), 3, 3, 1, 1, 0, 0)
    with pytest.raises(ValueError, match="does not fit"):
        _native.im2col(x, 7, 3, 2, 1, 1, 0)
    w = np.zeros((3, 2, 3, 3), np.float32)
    assert _native.conv2d_direct(x, w, 1, 1).shape == (1, 3, 4, 4)
    assert _native.conv2d_direct(x, w, 1, 1, np.ones(3, np.float32)).min() == 1
    with pytest.raises(ValueError, match="bias must have shape"):
        _native.conv2d_direct(x, w, 1, 1, np.ones(4, np.float32))
    with pytest.raises(TypeError):  # float32 only: the Python wrapper sends float64 elsewhere
        _native.conv2d_direct(x.astype(np.float64), w.astype(np.float64), 1, 1)
    with pytest.raises(ValueError, match="same C"):
        _native.conv2d_direct(x, np.zeros((3, 1, 3, 3), np.float32), 1, 1)
    gy = np.zeros((1, 3, 4, 4), np.float32)
    assert _native.conv2d_direct_weight_grad(x, gy, 3, 3, 1, 1).shape == (3, 2, 3, 3)
    with pytest.raises(TypeError):
        _native.conv2d_direct_weight_grad(x.astype(np.float64), gy.astype(np.float64), 3, 3, 1, 1)
    with pytest.raises(ValueError, match="spatial shape"):
        _native.conv2d_direct_weight_grad(x, gy, 3, 3, 0, 0)


@pytest.mark.parametrize("choice", ["auto", *CPU_IMPLEMENTATIONS])
@settings(deadline=None)
@given(
    case=conv_cases(),
    out_channels=st.sampled_from([1, 2, 5]),
    needs=st.tuples(st.booleans(), st.booleans(), st.booleans()),
)
def test_conv2d_forward_and_backward_match_their_definitions(choice, case, out_channels, needs):
    """Whatever strategy conv2d_forward / conv2d_backward pick for the geometry and the selected
    kernels (direct, a matrix product for 1x1, im2col a chunk at a time, gx as a convolution of
    gy), they give the definition's numbers, and only the gradients asked for."""
    ok, why = kernels.available().get(choice, (True, None))
    if not ok:
        pytest.skip(str(why))
    x, kh, kw, stride, padding, rng = case
    weight = rng.standard_normal((out_channels, x.shape[1], kh, kw)).astype(x.dtype)
    bias = rng.standard_normal(out_channels).astype(x.dtype)
    Ho, Wo = out_size(x.shape, kh, kw, stride, padding)
    gy = rng.standard_normal((x.shape[0], out_channels, Ho, Wo)).astype(x.dtype)
    with kernels.use(choice):
        y = kernels.conv2d_forward(x, weight, bias, stride, padding)
        grads = kernels.conv2d_backward(gy, x, weight, stride, padding, needs)
    expected_y = kernels.conv.conv2d_reference(x, weight, stride, padding, bias)
    np.testing.assert_allclose(y, expected_y, **TOL[x.dtype.type])
    expected = kernels.conv.conv2d_backward_reference(gy, x, weight, stride, padding, needs)
    for name, got, want, needed in zip(("gx", "gweight", "gbias"), grads, expected, needs):
        assert (got is None) == (not needed), name
        if needed:
            assert got.shape == want.shape and got.dtype == x.dtype, name
            np.testing.assert_allclose(got, want, **TOL[x.dtype.type], err_msg=name)
