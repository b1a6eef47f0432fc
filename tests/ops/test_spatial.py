"""Resampling: upsample_nearest2d, avg_pool2d (with and without the zero padding in the mean),
max_pool2d and resize_bilinear: NumPy formulas, gradchecks, and PyTorch as a second oracle."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, grid, images, leaf

import minidiff as md
import minidiff.functional as F
from minidiff.testing import check_function, gradcheck

DTYPES = [np.float32, np.float64]


def ref_upsample(x, s):
    n, c, h, w = x.shape
    out = np.empty((n, c, h * s, w * s))
    for i in range(h * s):
        for j in range(w * s):
            out[:, :, i, j] = x[:, :, i // s, j // s]
    return out


@given(x=images(), scale=st.integers(1, 3))
def test_upsample_nearest2d_gradcheck(x, scale):
    assert gradcheck(lambda t: F.upsample_nearest2d(t, scale), leaf(x))


@pytest.mark.parametrize("dtype", DTYPES)
@given(x=images(), scale=st.integers(1, 3))
def test_upsample_nearest2d_forward(dtype, x, scale):
    t = md.tensor(x, dtype=dtype)
    out = F.upsample_nearest2d(t, scale_factor=scale)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.numpy(), ref_upsample(t.numpy(), scale).astype(dtype))


def ref_avg_pool(x, kernel, stride, padding, count_include_pad=True):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            total, inside = np.zeros((n, c)), 0
            for di in range(kh):
                for dj in range(kw):
                    r, s = i * sh + di - ph, j * sw + dj - pw
                    if 0 <= r < h and 0 <= s < w:  # padding contributes zeros to the sum
                        total += x[:, :, r, s]
                        inside += 1
            out[:, :, i, j] = total / (kh * kw if count_include_pad else inside)
    return out


@st.composite
def pool_case(draw, unique=False):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = None if draw(st.booleans()) else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    h = draw(st.integers(max(1, kernel[0] - 2 * padding[0]), 5))
    w = draw(st.integers(max(1, kernel[1] - 2 * padding[1]), 5))
    # unique grid values for max pooling: no ties, and no two within gradcheck's eps
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 2)), h, w)
    x = draw(arrays(shape, elements=grid() if unique else None, unique=unique))
    square = lambda p: p[0] if p is not None and p[0] == p[1] and draw(st.booleans()) else p  # noqa: E731
    return x, square(kernel), square(stride), square(padding)


def _pair(v, default=None):
    if v is None:
        return default
    return (v, v) if isinstance(v, int) else v


@pytest.mark.parametrize("count_include_pad", [True, False])
@given(case=pool_case())
def test_avg_pool2d(count_include_pad, case):
    x, kernel, stride, padding = case
    k = _pair(kernel)
    check_function(
        lambda t: F.avg_pool2d(
            t, kernel, stride=stride, padding=padding, count_include_pad=count_include_pad
        ),
        [x],
        reference=lambda a: ref_avg_pool(a, k, _pair(stride, k), _pair(padding), count_include_pad),
    )


def test_avg_pool2d_count_include_pad_changes_only_the_border():
    x = md.tensor(np.ones((1, 1, 3, 3)))
    with_pad = F.avg_pool2d(x, 3, stride=1, padding=1).numpy()[0, 0]
    without = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False).numpy()[0, 0]
    np.testing.assert_allclose(with_pad, [[4 / 9, 6 / 9, 4 / 9], [6 / 9, 1, 6 / 9], [4 / 9, 6 / 9, 4 / 9]])
    np.testing.assert_allclose(without, np.ones((3, 3)))  # the mean of ones is one at the corners too


def ref_max_pool(x, kernel, stride, padding):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.full((n, c, ho, wo), -np.inf)
    for i in range(ho):
        for j in range(wo):
            for di in range(kh):
                for dj in range(kw):
                    r, s = i * sh + di - ph, j * sw + dj - pw
                    if 0 <= r < h and 0 <= s < w:
                        out[:, :, i, j] = np.maximum(out[:, :, i, j], x[:, :, r, s])
    return out


@given(case=pool_case(unique=True))
def test_max_pool2d(case):
    x, kernel, stride, padding = case
    k = _pair(kernel)
    check_function(
        lambda t: F.max_pool2d(t, kernel, stride=stride, padding=padding),
        [x],
        reference=lambda a: ref_max_pool(a, k, _pair(stride, k), _pair(padding)),
    )


def test_max_pool2d_negative_values_beat_the_padding():
    x = md.tensor(-np.arange(1.0, 10.0).reshape(1, 1, 3, 3))
    out = F.max_pool2d(x, 3, stride=1, padding=1).numpy()[0, 0]
    np.testing.assert_array_equal(out, [[-1, -1, -2], [-1, -1, -2], [-4, -4, -5]])


def test_max_pool2d_gradient_goes_to_the_first_of_tied_maxima():
    x = md.tensor(np.ones((1, 1, 2, 2)), requires_grad=True)
    F.max_pool2d(x, 2).sum().backward()
    np.testing.assert_array_equal(x.grad[0, 0], [[1, 0], [0, 0]])  # PyTorch's choice


def ref_resize_bilinear(x, size):
    """Per output pixel, PyTorch's align_corners=False sampling written out with four taps."""
    n, c, h, w = x.shape
    ho, wo = size
    out = np.zeros((n, c, ho, wo))

    def taps(i, n_in, n_out):
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        lo = min(int(np.floor(src)), n_in - 1)
        return lo, min(lo + 1, n_in - 1), src - lo

    for i in range(ho):
        r0, r1, fr = taps(i, h, ho)
        for j in range(wo):
            c0, c1, fc = taps(j, w, wo)
            top = (1 - fc) * x[:, :, r0, c0] + fc * x[:, :, r0, c1]
            bottom = (1 - fc) * x[:, :, r1, c0] + fc * x[:, :, r1, c1]
            out[:, :, i, j] = (1 - fr) * top + fr * bottom
    return out


@given(x=images(hw=(1, 4)), size=st.tuples(st.integers(1, 7), st.integers(1, 7)))
def test_resize_bilinear(x, size):
    check_function(
        lambda t: F.resize_bilinear(t, size), [x], reference=lambda a: ref_resize_bilinear(a, size)
    )


def test_resize_bilinear_to_the_same_size_is_the_identity():
    x = np.random.default_rng(0).standard_normal((2, 3, 5, 4))
    np.testing.assert_array_equal(F.resize_bilinear(md.tensor(x, dtype=np.float64), (5, 4)).numpy(), x)


# -- PyTorch as a second oracle ---------------------------------------------------------------------


def torch_compare(md_fn, torch_fn, x, seed=0):
    """Forward values and the input gradient of sum(out * cotangent), float64, against PyTorch."""
    torch = pytest.importorskip("torch")
    ours = md.tensor(x, dtype=np.float64, requires_grad=True)
    theirs = torch.tensor(x, requires_grad=True)
    out, expected = md_fn(ours), torch_fn(theirs)
    np.testing.assert_allclose(out.numpy(), expected.detach().numpy(), rtol=1e-12, atol=1e-12)
    cotangent = np.random.default_rng([seed, 1]).standard_normal(out.shape)
    (out * md.tensor(cotangent, dtype=np.float64)).sum().backward()
    (expected * torch.tensor(cotangent)).sum().backward()
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-12, atol=1e-12)


POOL_GEOMETRIES = [(3, 1, 1), (3, 2, 0), (3, 2, 1), ((1, 3), 1, (0, 1)), (2, None, 0)]


@pytest.mark.parametrize("kernel, stride, padding", POOL_GEOMETRIES)
@pytest.mark.parametrize("count_include_pad", [True, False])
def test_avg_pool2d_against_torch(kernel, stride, padding, count_include_pad):
    TF = pytest.importorskip("torch").nn.functional
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    kw = dict(stride=stride, padding=padding, count_include_pad=count_include_pad)
    torch_compare(lambda t: F.avg_pool2d(t, kernel, **kw), lambda t: TF.avg_pool2d(t, kernel, **kw), x)


@pytest.mark.parametrize("kernel, stride, padding", POOL_GEOMETRIES)
def test_max_pool2d_against_torch(kernel, stride, padding):
    TF = pytest.importorskip("torch").nn.functional
    x = np.random.default_rng(1).standard_normal((2, 3, 7, 6))
    kw = dict(stride=stride, padding=padding)
    torch_compare(lambda t: F.max_pool2d(t, kernel, **kw), lambda t: TF.max_pool2d(t, kernel, **kw), x)


@pytest.mark.parametrize("size", [(299, 299), (16, 16), (5, 11), (1, 1), (12, 3)])
def test_resize_bilinear_against_torch(size):
    TF = pytest.importorskip("torch").nn.functional
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 6))
    torch_compare(
        lambda t: F.resize_bilinear(t, size),
        lambda t: TF.interpolate(t, size=size, mode="bilinear", align_corners=False),
        x,
    )


# -- bad input ----------------------------------------------------------------------------------------


def test_upsample_rejects_bad_arguments():
    x = md.tensor(np.ones((1, 1, 2, 2)))
    with pytest.raises(
        ValueError, match=r"upsample_nearest2d: x must have 4 dims \(N, C, H, W\), got shape \(2, 2\)"
    ):
        F.upsample_nearest2d(md.tensor(np.ones((2, 2))))
    for scale in (0, -1, 1.5):
        with pytest.raises(ValueError, match=r"upsample_nearest2d: scale_factor must be a positive int"):
            F.upsample_nearest2d(x, scale)
    with pytest.raises(TypeError, match=r"upsample_nearest2d: x has dtype int64"):
        F.upsample_nearest2d(md.tensor(np.ones((1, 1, 2, 2), dtype=np.int64)))


@pytest.mark.parametrize(
    "args, kwargs, error, message",
    [
        (
            (3,),
            {"padding": 2},
            ValueError,
            r"avg_pool2d: padding \(2, 2\) must be at most half the kernel \(3, 3\)",
        ),
        ((3,), {"padding": -1}, ValueError, r"avg_pool2d: padding must be >= 0, got -1"),
        ((0,), {}, ValueError, r"avg_pool2d: kernel_size must be >= 1, got 0"),
        ((2,), {"stride": 0}, ValueError, r"avg_pool2d: stride must be >= 1, got 0"),
        ((5,), {}, ValueError, r"avg_pool2d: kernel \(5, 5\) is larger than the padded input \(4, 4\)"),
        (((1, 2, 3),), {}, TypeError, r"avg_pool2d: kernel_size must be an int or a pair of ints"),
    ],
)
def test_avg_pool2d_rejects_bad_geometry(args, kwargs, error, message):
    with pytest.raises(error, match=message):
        F.avg_pool2d(md.tensor(np.ones((1, 1, 4, 4))), *args, **kwargs)
    # max pooling takes the same geometry through the same checks, under its own name
    with pytest.raises(error, match=message.replace("avg_pool2d", "max_pool2d")):
        F.max_pool2d(md.tensor(np.ones((1, 1, 4, 4))), *args, **kwargs)


def test_avg_pool2d_rejects_wrong_rank():
    with pytest.raises(
        ValueError, match=r"avg_pool2d: x must have 4 dims \(N, C, H, W\), got shape \(4, 4\)"
    ):
        F.avg_pool2d(md.tensor(np.ones((4, 4))), 2)


@pytest.mark.parametrize(
    "x, size, error, message",
    [
        (
            np.ones((4, 4)),
            2,
            ValueError,
            r"resize_bilinear: x must have 4 dims \(N, C, H, W\), got shape \(4, 4\)",
        ),
        (np.ones((1, 1, 4, 4)), 0, ValueError, r"resize_bilinear: size must be >= 1, got 0"),
        (
            np.ones((1, 1, 4, 4)),
            (2, 2, 2),
            TypeError,
            r"resize_bilinear: size must be an int or a pair of ints",
        ),
    ],
)
def test_resize_bilinear_rejects_bad_arguments(x, size, error, message):
    with pytest.raises(error, match=message):
        F.resize_bilinear(md.tensor(x), size)
