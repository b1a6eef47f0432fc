"""Reductions: sum, mean, max over None, an int, or a tuple of axes, with keepdims."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, axes, grid, leaf, shapes

import minidiff as md
import minidiff.functional as F
from minidiff.testing import gradcheck, tolerance

DTYPES = [np.float32, np.float64]


def _as_tuple(axis, ndim):
    if axis is None:
        return tuple(range(ndim))
    return tuple(a % ndim for a in ((axis,) if isinstance(axis, int) else axis))


def _reduced_last(a, axis):
    """``(flat, red)``: a with the reduced axes ``red`` moved last and merged into one, the kept
    ones first."""
    red = _as_tuple(axis, a.ndim)
    keep = [i for i in range(a.ndim) if i not in red]
    moved = np.moveaxis(a, red, range(a.ndim - len(red), a.ndim)) if red else a
    return moved.reshape(tuple(a.shape[i] for i in keep) + (-1,)), red


def _kept(out, a, red, keepdims):
    """out with the reduced axes as ones when ``keepdims``."""
    return out.reshape(tuple(1 if i in red else n for i, n in enumerate(a.shape))) if keepdims else out


def ref_sum(a, axis, keepdims):
    """Sum by an explicit loop over the kept positions."""
    flat, red = _reduced_last(a, axis)
    out = np.zeros(flat.shape[:-1])
    for idx in np.ndindex(*flat.shape[:-1]):
        total = 0.0
        for v in flat[idx]:
            total += float(v)
        out[idx] = total
    return _kept(out, a, red, keepdims), flat.shape[-1]


def ref_max(a, axis, keepdims):
    flat, red = _reduced_last(a, axis)
    out = np.empty(flat.shape[:-1])
    for idx in np.ndindex(*flat.shape[:-1]):
        best = -np.inf
        for v in flat[idx]:
            best = v if v > best else best
        out[idx] = best
    return _kept(out, a, red, keepdims)


@st.composite
def reduce_case(draw, unique=False):
    shape = draw(shapes())
    x = draw(arrays(shape, elements=grid() if unique else None, unique=unique))
    return x, draw(axes(len(shape))), draw(st.booleans())


@pytest.mark.parametrize("name", ["sum", "mean"])
@given(case=reduce_case())
def test_sum_mean_gradcheck(name, case):
    x, axis, keepdims = case
    op = getattr(F, name)
    assert gradcheck(lambda t: op(t, axis=axis, keepdims=keepdims), leaf(x))


@given(case=reduce_case(unique=True))
def test_max_gradcheck_without_ties(case):
    x, axis, keepdims = case
    assert gradcheck(lambda t: F.max(t, axis=axis, keepdims=keepdims), leaf(x))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=reduce_case())
def test_sum_mean_forward(dtype, case):
    x, axis, keepdims = case
    t = md.tensor(x, dtype=dtype)
    total, count = ref_sum(t.numpy().astype(np.float64), axis, keepdims)
    for out, expected in (
        (F.sum(t, axis=axis, keepdims=keepdims), total),
        (t.sum(axis=axis, keepdims=keepdims), total),
        (F.mean(t, axis=axis, keepdims=keepdims), total / count),
        (t.mean(axis=axis, keepdims=keepdims), total / count),
    ):
        assert out.dtype == dtype
        assert out.shape == expected.shape
        np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=reduce_case())
def test_max_forward(dtype, case):
    x, axis, keepdims = case
    t = md.tensor(x, dtype=dtype)
    expected = ref_max(t.numpy().astype(np.float64), axis, keepdims)
    for out in (F.max(t, axis=axis, keepdims=keepdims), t.max(axis=axis, keepdims=keepdims)):
        assert out.dtype == dtype and out.shape == expected.shape
        np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype))


def test_max_ties_share_the_gradient():
    x = md.tensor([[1.0, 3.0, 3.0], [2.0, 2.0, 2.0]], dtype="float64", requires_grad=True)
    F.max(x, axis=1).backward(np.array([1.0, 3.0]))
    np.testing.assert_allclose(x.grad, [[0.0, 0.5, 0.5], [1.0, 1.0, 1.0]], **tolerance(np.float64))


def test_reductions_of_a_scalar_tensor():
    x = md.tensor(2.5, dtype="float64", requires_grad=True)
    for op in (F.sum, F.mean, F.max):
        assert op(x).shape == () and op(x).item() == 2.5
        assert gradcheck(op, x)


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
@pytest.mark.parametrize("axis", [2, -3, (0, 5)])
def test_axis_out_of_range(name, axis):
    bad = axis if isinstance(axis, int) else 5
    with pytest.raises(ValueError, match=rf"{name}: axis {bad} is out of range for a tensor with 2 dims"):
        getattr(F, name)(md.tensor(np.ones((2, 3))), axis=axis)


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_repeated_axis(name):
    with pytest.raises(ValueError, match=rf"{name}: repeated axis in \(1, -1\)"):
        getattr(F, name)(md.tensor(np.ones((2, 3))), axis=(1, -1))


@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_reduction_rejects_integer_tensors(name):
    with pytest.raises(TypeError, match=rf"{name}: x has dtype int64"):
        getattr(F, name)(md.tensor(np.arange(3, dtype=np.int64)))


@pytest.mark.parametrize("name", ["mean", "max"])
def test_reduction_over_an_empty_axis(name):
    with pytest.raises(ValueError, match=rf"{name}: .*empty axis \(shape \(2, 0\)\)"):
        getattr(F, name)(md.tensor(np.ones((2, 0))), axis=1)


# Regression test, minidiff bug fixed in ec78413: ops/reduce.py normalize_axes tests
# isinstance(axis, int), so a NumPy integer axis is iterated as if it were a tuple and fails with a
# bare TypeError
@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_numpy_integer_axis(name):
    out = getattr(F, name)(md.tensor(np.ones((2, 3))), axis=np.int64(1))
    assert out.shape == (2,)


# Regression test, minidiff bug fixed in ec78413: ops/reduce.py normalize_axes accepts axis 0 for a
# 0-dim tensor (range check uses max(ndim, 1)), then NumPy fails with AxisError/IndexError: either
# reduce (as PyTorch does: the result is the scalar) or raise the op's ValueError
@pytest.mark.parametrize("name", ["sum", "mean", "max"])
def test_axis_on_a_scalar_tensor(name):
    x = md.tensor(1.5)
    try:
        out = getattr(F, name)(x, axis=0)
    except ValueError as exc:
        assert f"{name}: axis 0 is out of range" in str(exc)
    else:
        assert out.shape == () and out.item() == 1.5
