"""softmax, log_softmax and scaled_dot_product_attention (boolean and additive masks)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import arrays, float_arrays, floats, leaf

import minidiff as md
import minidiff.functional as F
from minidiff import kernels
from minidiff.testing import gradcheck, tolerance

DTYPES = [np.float32, np.float64]


def ref_softmax(a, axis):
    """exp(a - max) / sum, one slice along ``axis`` at a time."""
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    out = np.empty_like(a)
    for idx in np.ndindex(*a.shape[:-1]):
        row = a[idx]
        e = np.exp(row - row.max())
        out[idx] = e / e.sum()
    return np.moveaxis(out, -1, axis)


def ref_log_softmax(a, axis):
    a = np.moveaxis(np.asarray(a, dtype=np.float64), axis, -1)
    out = np.empty_like(a)
    for idx in np.ndindex(*a.shape[:-1]):
        row = a[idx]
        top = row.max()
        out[idx] = row - top - np.log(np.exp(row - top).sum())
    return np.moveaxis(out, -1, axis)


@st.composite
def softmax_case(draw, scale=3.0):
    x = draw(float_arrays(min_dims=1, elements=floats(-scale, scale)))
    return x, draw(st.integers(-x.ndim, x.ndim - 1))


@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(case=softmax_case())
def test_softmax_gradcheck(name, case):
    x, axis = case
    op = getattr(F, name)
    assert gradcheck(lambda t: op(t, axis=axis), leaf(x))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
@given(case=softmax_case(scale=30.0))
def test_softmax_forward(name, dtype, case):
    x, axis = case
    t = md.tensor(x, dtype=dtype)
    ref = ref_softmax if name == "softmax" else ref_log_softmax
    expected = ref(t.numpy(), axis)
    for out in (getattr(F, name)(t, axis=axis), getattr(t, name)(axis=axis)):
        assert out.dtype == dtype and out.shape == x.shape
        np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype))


def test_softmax_is_stable_for_large_inputs():
    x = md.tensor([[1000.0, 1001.0, -1000.0]], dtype="float64")
    with np.errstate(over="raise", invalid="raise"):
        np.testing.assert_allclose(F.softmax(x).numpy(), ref_softmax(x.numpy(), -1), **tolerance(np.float64))
        np.testing.assert_allclose(
            F.log_softmax(x).numpy(), ref_log_softmax(x.numpy(), -1), **tolerance(np.float64)
        )


@pytest.mark.parametrize("impl", sorted(kernels.implementations("softmax_forward")))
@pytest.mark.parametrize("axis", [-1, 0])
def test_softmax_under_each_kernel_implementation(impl, axis):
    x = np.random.default_rng(4).standard_normal((3, 5)) * 3
    with kernels.use(impl):
        np.testing.assert_allclose(
            F.softmax(leaf(x), axis=axis).numpy(), ref_softmax(x, axis), **tolerance(np.float64)
        )
        assert gradcheck(lambda t: F.softmax(t, axis=axis), leaf(x.T.copy().T))  # F-ordered
        q, k, v = (np.random.default_rng(i).standard_normal((2, 3, 2)) for i in range(3))
        assert gradcheck(F.scaled_dot_product_attention, leaf(q), leaf(k), leaf(v))


# -- attention ---------------------------------------------------------------------------------------------


def ref_attention(q, k, v, mask, scale):
    """For each query: scores against every key, masked, softmaxed, then a weighted sum of values."""
    lead = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    lq, d = q.shape[-2:]
    lk, dv = v.shape[-2:]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if mask is not None:
        mask = np.broadcast_to(mask, lead + (lq, lk))
    out = np.zeros(lead + (lq, dv))
    for idx in np.ndindex(*lead):
        qi, ki, vi = (np.broadcast_to(a, lead + a.shape[-2:])[idx] for a in (q, k, v))
        for i in range(lq):
            scores = np.array([sum(qi[i, p] * ki[j, p] for p in range(d)) for j in range(lk)]) * scale
            if mask is not None and mask.dtype == np.bool_:
                scores = np.where(mask[idx][i], scores, -np.inf)
            elif mask is not None:
                scores = scores + mask[idx][i]
            w = np.exp(scores - scores.max())
            w /= w.sum()
            out[idx + (i,)] = w @ vi
    return out


@st.composite
def attention_case(draw, mask_kind=None):
    batch = tuple(draw(st.lists(st.integers(1, 2), min_size=1, max_size=2)))
    lq, lk, d, dv = (draw(st.integers(1, 3)) for _ in range(4))
    q = draw(arrays(batch + (lq, d)))
    k = draw(arrays(batch + (lk, d)))
    v = draw(arrays(batch + (lk, dv)))
    kind = draw(st.sampled_from(["none", "bool", "float"])) if mask_kind is None else mask_kind
    mask = None
    if kind != "none":
        # a mask that broadcasts to (..., Lq, Lk): some leading dims dropped or set to 1
        full = batch + (lq, lk)
        start = draw(st.integers(0, len(batch)))
        shape = tuple(1 if draw(st.booleans()) else n for n in full[start:])
        if kind == "bool":
            mask = draw(hnp.arrays(np.bool_, shape))
            mask[..., 0] = True  # every query may attend to something (else its row is NaN)
        else:
            mask = draw(arrays(shape))
    scale = None if draw(st.booleans()) else draw(floats(0.2, 1.5))
    return q, k, v, mask, scale


def _mask_tensor(mask):
    if mask is None:
        return None
    return md.tensor(mask) if mask.dtype == np.bool_ else leaf(mask, requires_grad=False)


@given(case=attention_case())
def test_attention_gradcheck(case):
    q, k, v, mask, scale = case
    m = _mask_tensor(mask)
    assert gradcheck(
        lambda a, b, c: F.scaled_dot_product_attention(a, b, c, mask=m, scale=scale),
        leaf(q),
        leaf(k),
        leaf(v),
    )


@given(case=attention_case(mask_kind="float"))
def test_attention_gradcheck_wrt_additive_mask(case):
    q, k, v, mask, scale = case
    assert gradcheck(
        lambda m: F.scaled_dot_product_attention(
            leaf(q, False), leaf(k, False), leaf(v, False), mask=m, scale=scale
        ),
        leaf(mask),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=attention_case())
def test_attention_forward(dtype, case):
    q, k, v, mask, scale = case
    tq, tk, tv = (md.tensor(a, dtype=dtype) for a in (q, k, v))
    tm = (
        None
        if mask is None
        else (md.tensor(mask) if mask.dtype == np.bool_ else md.tensor(mask, dtype=dtype))
    )
    up = lambda t: t.numpy() if t.dtype == np.bool_ else t.numpy().astype(np.float64)  # noqa: E731
    expected = ref_attention(up(tq), up(tk), up(tv), None if tm is None else up(tm), scale)
    out = F.scaled_dot_product_attention(tq, tk, tv, mask=tm, scale=scale)
    assert out.dtype == dtype and out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype))


def test_attention_bool_mask_blocks_positions():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 3, 2)) for _ in range(3))
    causal = np.tril(np.ones((3, 3), dtype=bool))
    out = F.scaled_dot_product_attention(leaf(q), leaf(k), leaf(v), mask=md.tensor(causal)).numpy()
    np.testing.assert_allclose(out[0, 0], v[0, 0], **tolerance(np.float64))  # the first query sees key 0 only
    np.testing.assert_allclose(out, ref_attention(q, k, v, causal, None), **tolerance(np.float64))


# Regression test, minidiff bug fixed in ec78413: scaled_dot_product_attention converts a NumPy
# boolean mask with as_tensor(mask, like=scores), which casts it to float, so True/False are
# silently *added* to the scores (1.0/0.0) instead of blocking positions
def test_attention_accepts_numpy_bool_mask():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 3, 2)) for _ in range(3))
    causal = np.tril(np.ones((3, 3), dtype=bool))
    out = F.scaled_dot_product_attention(leaf(q), leaf(k), leaf(v), mask=causal).numpy()
    np.testing.assert_allclose(out, ref_attention(q, k, v, causal, None), **tolerance(np.float64))


# Regression test, minidiff bug fixed in ec78413: scaled_dot_product_attention transposes k with
# transpose(k, -2, -1), which Tensor.transpose reads as a permutation (identity) for a 2-D k: 2-D q,
# k, v compute q @ k, not q @ k.T
def test_attention_with_2d_inputs():
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((3, 3)), rng.standard_normal((3, 3)), rng.standard_normal((3, 2))
    out = F.scaled_dot_product_attention(leaf(q), leaf(k), leaf(v))
    np.testing.assert_allclose(out.numpy(), ref_attention(q, k, v, None, None), **tolerance(np.float64))


# Regression test, minidiff bug fixed in ec78413: scaled_dot_product_attention fills blocked scores
# with -inf *before* the fused scale: a scale <= 0 turns them into +inf or NaN (0 * -inf) and every
# row with a blocked key is NaN; apply the mask after scaling (or scale before masked_fill and run
# Softmax with scale=1)
@pytest.mark.parametrize("scale", [0.0, -0.5])
def test_attention_bool_mask_with_non_positive_scale(scale):
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal((1, 2, 3)) for _ in range(3))
    mask = np.array([[True, False], [True, True]])
    out = F.scaled_dot_product_attention(leaf(q), leaf(k), leaf(v), mask=md.tensor(mask), scale=scale)
    np.testing.assert_allclose(out.numpy(), ref_attention(q, k, v, mask, scale), **tolerance(np.float64))


# -- bad input ---------------------------------------------------------------------------------------------


def test_softmax_rejects_bad_axis_and_dtype():
    x = md.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"softmax: axis 2 is out of range for a tensor with 2 dims"):
        F.softmax(x, axis=2)
    with pytest.raises(ValueError, match=r"log_softmax: axis -3 is out of range for a tensor with 2 dims"):
        F.log_softmax(x, axis=-3)
    with pytest.raises(ValueError, match=r"softmax: axis -1 is out of range for a tensor with 0 dims"):
        F.softmax(md.tensor(1.0))
    with pytest.raises(TypeError, match=r"softmax: x has dtype int64"):
        F.softmax(md.tensor(np.arange(3, dtype=np.int64)))


def test_attention_rejects_bad_shapes():
    op = F.scaled_dot_product_attention
    t = lambda *s: md.tensor(np.ones(s))  # noqa: E731
    with pytest.raises(
        ValueError,
        match=r"scaled_dot_product_attention: expected q \(..., Lq, D\), k \(..., Lk, D\), "
        r"v \(..., Lk, Dv\); got \(1, 2, 4\), \(1, 3, 5\), \(1, 3, 4\)",
    ):
        op(t(1, 2, 4), t(1, 3, 5), t(1, 3, 4))
    with pytest.raises(
        ValueError,
        match=r"scaled_dot_product_attention: expected .* got \(1, 2, 4\), \(1, 3, 4\), \(1, 2, 4\)",
    ):
        op(t(1, 2, 4), t(1, 3, 4), t(1, 2, 4))
    with pytest.raises(
        ValueError,
        match=r"scaled_dot_product_attention: q, k, v need the same number \(>= 2\) of dims, "
        r"got \(4,\), \(4,\), \(4,\)",
    ):
        op(t(4), t(4), t(4))
    with pytest.raises(ValueError, match=r"scaled_dot_product_attention: q, k, v need the same number"):
        op(t(1, 2, 4), t(3, 4), t(3, 4))
    with pytest.raises(ValueError, match=r"masked_fill: mask of shape \(2, 2\) does not broadcast"):
        op(t(1, 2, 4), t(1, 3, 4), t(1, 3, 4), mask=md.tensor(np.ones((2, 2), dtype=bool)))
    with pytest.raises(TypeError, match=r"scaled_dot_product_attention: k has dtype int64"):
        op(t(1, 2, 4), md.tensor(np.ones((1, 3, 4), dtype=np.int64)), t(1, 3, 4))
