"""Matrix products: matmul (1-D operands, broadcasting batch dims) and linear."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import arrays, leaf

import minidiff as md
import minidiff.functional as F
from minidiff.testing import gradcheck, tolerance

DTYPES = [np.float32, np.float64]


def ref_matmul(a, b):
    """NumPy's matmul rules, with the products written as explicit sums."""
    a2 = a[None, :] if a.ndim == 1 else a
    b2 = b[:, None] if b.ndim == 1 else b
    batch = np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    a2 = np.broadcast_to(a2, batch + a2.shape[-2:])
    b2 = np.broadcast_to(b2, batch + b2.shape[-2:])
    n, k, m = a2.shape[-2], a2.shape[-1], b2.shape[-1]
    out = np.zeros(batch + (n, m))
    for idx in np.ndindex(*batch):
        for i in range(n):
            for j in range(m):
                out[idx + (i, j)] = sum(a2[idx + (i, p)] * b2[idx + (p, j)] for p in range(k))
    if a.ndim == 1:
        out = out[..., 0, :]
    if b.ndim == 1:
        out = out[..., 0]
    return out


@st.composite
def matmul_case(draw):
    shapes = draw(
        hnp.mutually_broadcastable_shapes(
            signature=np.matmul.signature, max_dims=2, min_side=1, max_side=3
        ).filter(lambda s: all(np.prod(x) <= 27 for x in s.input_shapes))
    )
    sa, sb = shapes.input_shapes
    return draw(arrays(sa)), draw(arrays(sb))


@given(case=matmul_case())
def test_matmul_gradcheck(case):
    a, b = case
    assert gradcheck(F.matmul, leaf(a), leaf(b))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=matmul_case())
def test_matmul_forward(dtype, case):
    a, b = case
    ta, tb = md.tensor(a, dtype=dtype), md.tensor(b, dtype=dtype)
    expected = ref_matmul(ta.numpy().astype(np.float64), tb.numpy().astype(np.float64))
    for out in (F.matmul(ta, tb), ta @ tb, ta.matmul(tb)):
        assert out.dtype == dtype and out.shape == expected.shape
        np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype))


@pytest.mark.parametrize(
    "sa, sb",
    [
        ((3,), (3,)),
        ((3,), (3, 2)),
        ((2, 3), (3,)),
        ((2, 1, 2, 3), (3,)),
        ((3,), (4, 3, 2)),
        ((2, 1, 2, 3), (3, 3, 1)),
    ],
)
def test_matmul_explicit_shapes(sa, sb):
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(sa), rng.standard_normal(sb)
    out = F.matmul(leaf(a), leaf(b))
    assert out.shape == np.matmul(a, b).shape
    np.testing.assert_allclose(out.numpy(), ref_matmul(a, b), **tolerance(np.float64))
    assert gradcheck(F.matmul, leaf(a), leaf(b))


@st.composite
def linear_case(draw):
    lead = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=3))
    fan_in, fan_out = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    x = draw(arrays(lead + (fan_in,)))
    weight = draw(arrays((fan_out, fan_in)))
    bias = draw(arrays((fan_out,))) if draw(st.booleans()) else None
    return x, weight, bias


def ref_linear(x, weight, bias):
    out = np.zeros(x.shape[:-1] + (weight.shape[0],))
    for idx in np.ndindex(*x.shape[:-1]):
        for o in range(weight.shape[0]):
            total = 0.0 if bias is None else bias[o]
            for i in range(weight.shape[1]):
                total += x[idx + (i,)] * weight[o, i]
            out[idx + (o,)] = total
    return out


@given(case=linear_case())
def test_linear_gradcheck(case):
    x, weight, bias = case
    inputs = [leaf(x), leaf(weight)] + ([leaf(bias)] if bias is not None else [])
    assert gradcheck(lambda *ts: F.linear(*ts), *inputs)


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=linear_case())
def test_linear_forward(dtype, case):
    x, weight, bias = case
    cast = lambda a: None if a is None else md.tensor(a, dtype=dtype)  # noqa: E731
    tx, tw, tb = cast(x), cast(weight), cast(bias)
    up = lambda t: None if t is None else t.numpy().astype(np.float64)  # noqa: E731
    expected = ref_linear(up(tx), up(tw), up(tb))
    out = F.linear(tx, tw, tb)
    assert out.dtype == dtype and out.shape == expected.shape
    np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype))


# Regression test, minidiff bug fixed in ec78413: functional.matmul and linear convert a NumPy
# operand with as_tensor(x) (no like=), so it becomes float32 whatever the Tensor operand's dtype:
# x64 @ ndarray raises a dtype-mix TypeError, while x64 * ndarray (via _binary_operands) follows x's
# dtype
def test_matmul_and_linear_with_numpy_operand_follow_the_tensor_dtype():
    x = md.tensor(np.eye(2), dtype="float64")
    assert (x @ np.eye(2)).dtype == np.float64
    assert (np.eye(2) @ x).dtype == np.float64
    assert F.linear(x, np.eye(2)).dtype == np.float64


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sa, sb", [((2, 3), (4, 2)), ((3,), (4,)), ((2, 2, 3), (3, 3, 2))])
def test_matmul_rejects_unaligned_shapes(sa, sb):
    a, b = md.tensor(np.ones(sa)), md.tensor(np.ones(sb))
    pattern = rf"matmul: shapes {sa!r} and {sb!r} are not aligned".replace("(", r"\(").replace(")", r"\)")
    with pytest.raises(ValueError, match=pattern):
        F.matmul(a, b)


def test_matmul_rejects_scalars_and_integer_tensors():
    with pytest.raises(ValueError, match=r"matmul: operands must have at least 1 dim, got \(\) and \(2,\)"):
        F.matmul(md.tensor(1.0), md.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match=r"matmul: a has dtype int64"):
        F.matmul(md.tensor(np.ones((2, 2), dtype=np.int64)), md.tensor(np.ones((2, 2))))


def test_linear_rejects_bad_shapes():
    x = md.tensor(np.ones((2, 3)))
    with pytest.raises(
        ValueError, match=r"linear: x has shape \(2, 3\) but weight \(4, 5\) expects 5 input features"
    ):
        F.linear(x, md.tensor(np.ones((4, 5))))
    with pytest.raises(
        ValueError, match=r"linear: weight must have 2 dims \(out_features, in_features\), got shape \(3,\)"
    ):
        F.linear(x, md.tensor(np.ones(3)))
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(4,\), got \(3,\)"):
        F.linear(x, md.tensor(np.ones((4, 3))), md.tensor(np.ones(3)))
    with pytest.raises(TypeError, match=r"linear: weight has dtype int64"):
        F.linear(x, md.tensor(np.ones((4, 3), dtype=np.int64)))
