"""Layer norm kernels: every implementation against the reference, the reference against the
textbook formulas in float64, rows with a mean far larger than their spread, sums that do not
depend on the threads, and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_params import impls, make_array

from minidiff import kernels
from minidiff.kernels import norm
from minidiff.testing import tolerance

DTYPES = (np.float32, np.float64)


def name_of(fn):
    return fn.__name__.rsplit("_", 1)[1]


def inputs(rng, rows, D, dtype, affine, layout="contiguous", shift=0.0):
    x = make_array(rng, (rows, D), dtype, layout, scale=2.0)
    x += dtype(shift)
    weight = rng.standard_normal(D).astype(dtype) if affine else None
    bias = rng.standard_normal(D).astype(dtype) if affine else None
    return x, weight, bias, make_array(rng, (rows, D), dtype, layout)


def close(actual, expected, dtype):
    if expected is None:
        assert actual is None
        return
    assert actual.dtype == dtype and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, **tolerance(dtype))


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_reference_is_the_textbook_formula(affine):
    rng = np.random.default_rng(0)
    x, w, b, gy = inputs(rng, 7, 5, np.float64, affine)
    mean, var = x.mean(axis=1, keepdims=True), x.var(axis=1, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + 1e-5)
    y, xh, rstd = norm.layer_norm_forward_reference(x, w, b, 1e-5)
    close(y, xhat * w + b if affine else xhat, np.float64)
    close(rstd, 1 / np.sqrt(var[:, 0] + 1e-5), np.float64)
    gx, gw, gb = norm.layer_norm_backward_reference(gy, xh, rstd, w, affine)
    d = gy * w if affine else gy
    # the Jacobian of xhat written out: (I - 1/D - xhat xhat^T / D) rstd, applied row by row
    D = x.shape[1]
    expected = np.stack(
        [(np.eye(D) - 1 / D - np.outer(xh[r], xh[r]) / D) @ d[r] * rstd[r] for r in range(x.shape[0])]
    )
    close(gx, expected, np.float64)
    close(gw, (gy * xhat).sum(axis=0) if affine else None, np.float64)
    close(gb, gy.sum(axis=0) if affine else None, np.float64)


@pytest.mark.parametrize("shift", [0.0, 1e3], ids=["centred", "large mean"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", impls("layer_norm_forward"))
def test_kernels_match_the_reference(impl, dtype, affine, layout, shift):
    rng = np.random.default_rng(1)
    x, w, b, gy = inputs(rng, 150, 9, dtype, affine, layout, shift)  # 150 rows: three row tasks
    backward = kernels.implementations("layer_norm_backward")[name_of(impl)]
    y, xhat, rstd = impl(x, w, b, 1e-5)
    ry, rxhat, rrstd = norm.layer_norm_forward_reference(x, w, b, 1e-5)
    for actual, expected in ((y, ry), (xhat, rxhat), (rstd, rrstd)):
        close(actual, expected, dtype)
    for actual, expected in zip(
        backward(gy, rxhat, rrstd, w, affine), norm.layer_norm_backward_reference(gy, rxhat, rrstd, w, affine)
    ):
        close(actual, expected, dtype)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 140), D=st.integers(1, 12), seed=st.integers(0, 2**31 - 1))
def test_fast_kernels_match_the_reference_on_any_shape(rows, D, seed):
    rng = np.random.default_rng(seed)
    x, w, b, gy = inputs(rng, rows, D, np.float32, True)
    ry, rxhat, rrstd = norm.layer_norm_forward_reference(x, w, b, 1e-5)
    expected = norm.layer_norm_backward_reference(gy, rxhat, rrstd, w, True)
    for name, forward in kernels.implementations("layer_norm_forward").items():
        close(forward(x, w, b, 1e-5)[0], ry, np.float32)
        backward = kernels.implementations("layer_norm_backward")[name]
        for actual, want in zip(backward(gy, rxhat, rrstd, w, True), expected):
            close(actual, want, np.float32)


@pytest.mark.parametrize("impl", impls("layer_norm_backward"))
def test_weight_gradients_are_the_same_at_every_run(impl):
    rng = np.random.default_rng(2)
    x, w, b, gy = inputs(rng, 1000, 16, np.float32, True)
    _, xhat, rstd = norm.layer_norm_forward_reference(x, w, b, 1e-5)
    first = impl(gy, xhat, rstd, w, True)
    for _ in range(3):
        for a, b_ in zip(impl(gy, xhat, rstd, w, True), first):
            np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("impl", impls("layer_norm_forward"))
def test_bad_arguments_are_named(impl):
    x = np.zeros((3, 4), np.float32)
    with pytest.raises(ValueError, match=r"layer_norm_forward: x must be \(rows, D\)"):
        impl(x[0], None, None, 1e-5)
    with pytest.raises(ValueError, match=r"layer_norm_forward: weight must have shape \(4,\)"):
        impl(x, np.ones(3, np.float32), None, 1e-5)
    with pytest.raises(TypeError, match="layer_norm_forward: all arrays must have the same dtype"):
        impl(x, np.ones(4), None, 1e-5)
    backward = kernels.implementations("layer_norm_backward")[name_of(impl)]
    with pytest.raises(ValueError, match="layer_norm_backward: shapes must match"):
        backward(np.zeros((3, 5), np.float32), x, np.ones(3, np.float32), None, False)
