"""Activation kernels (GELU, GEGLU): every implementation against the reference, the reference
against the textbook formulas (scipy.stats.norm), every layout, both drivers, and bad arguments."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_params import impls, make_array, threads

from minidiff import kernels
from minidiff.testing import tolerance

DTYPES = (np.float32, np.float64)
LAYOUTS = ("contiguous", "transposed", "strided")


def textbook(x, approximate):
    """(gelu, gelu') in float64 from the normal distribution's cdf and pdf, or the tanh formula."""
    x = x.astype(np.float64)
    if approximate == "tanh":
        k = np.sqrt(2 / np.pi)
        t = np.tanh(k * (x + 0.044715 * x**3))
        return 0.5 * x * (1 + t), 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * k * (1 + 3 * 0.044715 * x * x)
    return x * scipy.stats.norm.cdf(x), scipy.stats.norm.cdf(x) + x * scipy.stats.norm.pdf(x)


def name_of(fn):
    """The implementation name of a registered kernel function (``gelu_forward_numba``: numba)."""
    return fn.__name__.rsplit("_", 1)[1]


def close(actual, expected, dtype):
    assert actual.dtype == dtype and actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, **tolerance(dtype))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_gelu_is_the_textbook_formula(dtype, approximate):
    x = np.linspace(-8, 8, 1001).astype(dtype)
    g = np.random.default_rng(0).standard_normal(x.shape).astype(dtype)
    value, slope = textbook(x, approximate)
    close(kernels.activation.gelu_forward_reference(x, approximate), value.astype(dtype), dtype)
    close(kernels.activation.gelu_backward_reference(g, x, approximate), (g * slope).astype(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reference_geglu_is_value_times_gelu_of_gate(dtype):
    rng = np.random.default_rng(1)
    h = (3 * rng.standard_normal((2, 5, 8))).astype(dtype)
    g = rng.standard_normal((2, 5, 4)).astype(dtype)
    value, gate = h[..., :4].astype(np.float64), h[..., 4:]
    gelu, slope = textbook(gate, "none")
    close(kernels.activation.geglu_forward_reference(h), (value * gelu).astype(dtype), dtype)
    expected = np.concatenate([g * gelu, g * value * slope], axis=-1).astype(dtype)
    close(kernels.activation.geglu_backward_reference(g, h), expected, dtype)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", impls("gelu_forward"))
def test_gelu_matches_the_reference(impl, dtype, approximate, layout, parallel):
    rng = np.random.default_rng(2)
    x = make_array(rng, (3, 7, 5), dtype, layout, scale=3.0)
    g = make_array(rng, (3, 7, 5), dtype, layout)
    forward, backward = impl, kernels.implementations("gelu_backward")[name_of(impl)]
    with threads(parallel):
        y, gx = forward(x, approximate), backward(g, x, approximate)
    close(y, kernels.activation.gelu_forward_reference(x, approximate), dtype)
    close(gx, kernels.activation.gelu_backward_reference(g, x, approximate), dtype)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", impls("geglu_forward"))
def test_geglu_matches_the_reference(impl, dtype, layout, parallel):
    rng = np.random.default_rng(3)
    h = make_array(rng, (4, 3, 6), dtype, layout, scale=3.0)
    g = make_array(rng, (4, 3, 3), dtype, layout)
    with threads(parallel):
        y = impl(h)
        gh = kernels.implementations("geglu_backward")[name_of(impl)](g, h)
    close(y, kernels.activation.geglu_forward_reference(h), dtype)
    close(gh, kernels.activation.geglu_backward_reference(g, h), dtype)


@settings(max_examples=25, deadline=None)
@given(
    shape=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    half=st.integers(1, 9),
    seed=st.integers(0, 2**31 - 1),
)
def test_fast_kernels_match_the_reference_on_any_shape(shape, half, seed):
    rng = np.random.default_rng(seed)
    x = (4 * rng.standard_normal((*shape, 2 * half))).astype(np.float32)
    g = rng.standard_normal((*shape, half)).astype(np.float32)
    for impl in kernels.implementations("gelu_forward"):
        fns = kernels.implementations
        close(fns("gelu_forward")[impl](x), kernels.activation.gelu_forward_reference(x), np.float32)
        close(fns("geglu_forward")[impl](x), kernels.activation.geglu_forward_reference(x), np.float32)
        close(
            fns("geglu_backward")[impl](g, x), kernels.activation.geglu_backward_reference(g, x), np.float32
        )


@pytest.mark.parametrize("impl", impls("gelu_forward"))
def test_bad_arguments_are_named(impl):
    fns = {
        op: kernels.implementations(op)[name_of(impl)]
        for op in ("gelu_forward", "gelu_backward", "geglu_forward", "geglu_backward")
    }
    x = np.zeros((2, 4), np.float32)
    with pytest.raises(TypeError, match="gelu_forward: x has dtype int64"):
        fns["gelu_forward"](x.astype(np.int64))
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        fns["gelu_forward"](x, "erf")
    with pytest.raises(ValueError, match=r"gelu_backward: the gradient must have x's output shape \(2, 4\)"):
        fns["gelu_backward"](np.zeros((4, 2), np.float32), x)
    with pytest.raises(ValueError, match="geglu_forward: .*even length, got shape \\(2, 3\\)"):
        fns["geglu_forward"](np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match=r"geglu_backward: the gradient must have h's output shape \(2, 2\)"):
        fns["geglu_backward"](x, x)


@pytest.mark.skipif("numba" not in kernels.implementations("gelu_forward"), reason="needs numba")
def test_the_float32_rational_erf_is_within_four_ulp_of_one():
    """The measured error is 3.7 ulp of 1 (4.4e-7); SciPy's erf in float64 is the truth."""
    import scipy.special

    x = np.linspace(-6, 6, 6001).astype(np.float32)
    ours = np.array([kernels.activation._erf_float32_cpu(v) for v in x])  # float32 values
    assert np.array_equal(ours.astype(np.float32), ours)
    error = np.abs(ours.astype(np.float64) - scipy.special.erf(x.astype(np.float64)))
    assert error.max() <= 4 * np.spacing(np.float32(1))
    assert np.all(np.abs(ours) <= 1)
