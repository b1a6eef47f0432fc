"""im2col / col2im: every implementation against naive loops, torch, and the reference."""

import itertools

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
