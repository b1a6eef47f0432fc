"""Resampling: upsample_nearest2d and avg_pool2d (zero padding counted in the mean)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, images, leaf

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


def ref_avg_pool(x, kernel, stride, padding):
    n, c, h, w = x.shape
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            total = np.zeros((n, c))
            for di in range(kh):
                for dj in range(kw):
                    r, s = i * sh + di - ph, j * sw + dj - pw
                    if 0 <= r < h and 0 <= s < w:  # padding contributes zeros to the sum
                        total += x[:, :, r, s]
            out[:, :, i, j] = total / (kh * kw)
    return out


@st.composite
def pool_case(draw):
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = None if draw(st.booleans()) else (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    padding = (draw(st.integers(0, kernel[0] // 2)), draw(st.integers(0, kernel[1] // 2)))
    h = draw(st.integers(max(1, kernel[0] - 2 * padding[0]), 5))
    w = draw(st.integers(max(1, kernel[1] - 2 * padding[1]), 5))
    x = draw(arrays((draw(st.integers(1, 2)), draw(st.integers(1, 2)), h, w)))
    square = lambda p: p[0] if p is not None and p[0] == p[1] and draw(st.booleans()) else p  # noqa: E731
    return x, square(kernel), square(stride), square(padding)


def _pair(v, default=None):
    if v is None:
        return default
    return (v, v) if isinstance(v, int) else v


@given(case=pool_case())
def test_avg_pool2d(case):
    x, kernel, stride, padding = case
    k = _pair(kernel)
    check_function(
        lambda t: F.avg_pool2d(t, kernel, stride=stride, padding=padding),
        [x],
        reference=lambda a: ref_avg_pool(a, k, _pair(stride, k), _pair(padding)),
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


def test_avg_pool2d_rejects_wrong_rank():
    with pytest.raises(
        ValueError, match=r"avg_pool2d: x must have 4 dims \(N, C, H, W\), got shape \(4, 4\)"
    ):
        F.avg_pool2d(md.tensor(np.ones((4, 4))), 2)
