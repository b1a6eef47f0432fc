"""Shape ops: reshape, permute/transpose, broadcast_to, getitem, concat, stack, pad."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import arrays, floats, leaf, reshape_targets, shapes

import minidiff as md
import minidiff.functional as F
from minidiff.testing import gradcheck, tolerance


def assert_same(out, expected):
    """Shape ops move elements without arithmetic: the values must be identical."""
    assert out.shape == expected.shape, f"shape {out.shape}, expected {expected.shape}"
    np.testing.assert_array_equal(out.numpy(), expected)


# -- reshape -------------------------------------------------------------------------------------


@st.composite
def reshape_case(draw):
    shape = draw(shapes())
    return draw(arrays(shape)), draw(reshape_targets(shape))


@given(case=reshape_case())
def test_reshape_gradcheck(case):
    x, target = case
    assert gradcheck(lambda t: F.reshape(t, target), leaf(x))


@given(case=reshape_case())
def test_reshape_forward(case):
    x, target = case
    out = F.reshape(leaf(x), target)
    flat = [x[idx] for idx in np.ndindex(*x.shape)]  # C order, element by element
    known = math.prod(n for n in target if n != -1)
    shape = tuple(x.size // known if n == -1 else n for n in target)
    assert_same(out, np.array(flat).reshape(shape))
    assert_same(leaf(x).reshape(*target) if target else leaf(x).reshape(()), np.array(flat).reshape(shape))


# -- permute / transpose ---------------------------------------------------------------------------


@st.composite
def permute_case(draw):
    shape = draw(shapes())
    perm = draw(st.permutations(range(len(shape))))
    perm = [p - len(shape) if draw(st.booleans()) else p for p in perm]  # negative axes too
    return draw(arrays(shape)), tuple(perm)


def ref_permute(a, perm):
    perm = [p % a.ndim for p in perm]
    out = np.empty(tuple(a.shape[p] for p in perm))
    for idx in np.ndindex(*out.shape):
        src = [0] * a.ndim
        for k, p in enumerate(perm):
            src[p] = idx[k]
        out[idx] = a[tuple(src)]
    return out


@given(case=permute_case())
def test_permute_gradcheck(case):
    x, perm = case
    assert gradcheck(lambda t: F.permute(t, perm), leaf(x))


@given(case=permute_case())
def test_permute_forward(case):
    x, perm = case
    assert_same(F.permute(leaf(x), perm), ref_permute(x, perm))
    assert_same(leaf(x).permute(*perm) if perm else leaf(x).permute(()), ref_permute(x, perm))
    reversed_axes = tuple(reversed(range(x.ndim)))
    assert_same(F.permute(leaf(x)), ref_permute(x, reversed_axes))
    assert_same(leaf(x).T, ref_permute(x, reversed_axes))


@st.composite
def swap_case(draw, min_dims=2, distinct=True):
    shape = draw(shapes(min_dims=min_dims))
    a, b = draw(st.lists(st.integers(0, len(shape) - 1), min_size=2, max_size=2, unique=distinct))
    return draw(arrays(shape)), a - len(shape) if draw(st.booleans()) else a, b


def _swapped(ndim, a, b):
    perm = list(range(ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return perm


@given(case=swap_case())
def test_transpose_swaps_two_axes(case):
    x, a, b = case
    expected = ref_permute(x, _swapped(x.ndim, a % x.ndim, b))
    assert_same(F.transpose(leaf(x), a, b), expected)
    assert_same(leaf(x).transpose(a, b), expected)
    assert gradcheck(lambda t: F.transpose(t, a, b), leaf(x))


# Regression test, minidiff bug fixed in ec78413: Tensor.transpose treats two axes as a permutation
# when the tensor is 2-D, so x.transpose(0, 1) and x.transpose(-2, -1) return x unchanged instead of
# swapping
@pytest.mark.parametrize("axes", [(0, 1), (-2, -1)])
def test_transpose_two_axes_of_a_matrix(axes):
    x = np.arange(6.0).reshape(2, 3)
    assert_same(leaf(x).transpose(*axes), x.T)
    assert_same(F.transpose(leaf(x), *axes), x.T)


@pytest.mark.parametrize("axes", [(), (1, 0), (-1, -2)])
def test_transpose_of_a_matrix_reversing_axes(axes):
    x = np.arange(6.0).reshape(2, 3)
    assert_same(leaf(x).transpose(*axes), x.T)
    assert_same(F.transpose(leaf(x), *axes), x.T)


@given(case=swap_case(min_dims=1, distinct=False))
def test_swapaxes_gradcheck(case):
    x, a, b = case
    assert gradcheck(lambda t: F.swapaxes(t, a, b), leaf(x))


@given(case=swap_case(min_dims=1, distinct=False))
def test_swapaxes_forward(case):
    x, a, b = case
    expected = ref_permute(x, _swapped(x.ndim, a % x.ndim, b))
    assert_same(F.swapaxes(leaf(x), a, b), expected)
    assert_same(F.swapaxes(leaf(x), b, a), expected)


def test_swapaxes_of_a_matrix_and_the_same_axis():
    x = np.arange(6.0).reshape(2, 3)
    assert_same(F.swapaxes(leaf(x), -2, -1), x.T)
    assert_same(F.swapaxes(leaf(x), 1, 1), x)


# -- broadcast_to ---------------------------------------------------------------------------------


@st.composite
def broadcast_case(draw):
    shape = draw(shapes(max_size=16))
    other = draw(hnp.broadcastable_shapes(shape, min_dims=0, max_dims=4, min_side=1, max_side=3))
    target = np.broadcast_shapes(shape, other)
    if math.prod(target) > 48:
        target = shape
    return draw(arrays(shape)), tuple(target)


def ref_broadcast(a, target):
    out = np.empty(target)
    lead = len(target) - a.ndim
    for idx in np.ndindex(*target):
        src = tuple(0 if a.shape[k] == 1 else idx[lead + k] for k in range(a.ndim))
        out[idx] = a[src]
    return out


@given(case=broadcast_case())
def test_broadcast_to_gradcheck(case):
    x, target = case
    assert gradcheck(lambda t: F.broadcast_to(t, target), leaf(x))


@given(case=broadcast_case())
def test_broadcast_to_forward(case):
    x, target = case
    assert_same(F.broadcast_to(leaf(x), target), ref_broadcast(x, target))


# -- getitem -----------------------------------------------------------------------------------------


@st.composite
def basic_index_case(draw):
    shape = draw(shapes(min_dims=1))
    index = draw(hnp.basic_indices(shape, min_dims=0, allow_newaxis=True, allow_ellipsis=True))
    return draw(arrays(shape)), index


@st.composite
def integer_array_case(draw):
    """One or more integer index arrays (repeats and negative indices included), maybe with a slice."""
    shape = draw(shapes(min_dims=1))
    x = draw(arrays(shape))
    n_arrays = draw(st.integers(1, len(shape)))
    result_shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    index = draw(hnp.integer_array_indices(shape[:n_arrays], result_shape=st.just(result_shape)))
    if n_arrays < len(shape) and draw(st.booleans()):
        index = (*index, slice(None, None, -1))
    return x, index


@st.composite
def bool_mask_case(draw):
    shape = draw(shapes(min_dims=1))
    k = draw(st.integers(1, len(shape)))
    mask = draw(hnp.arrays(np.bool_, shape[:k]))
    return draw(arrays(shape)), mask


def ref_getitem(a, index):
    """NumPy's own indexing on a copy: the semantics minidiff promises to follow."""
    return np.array(a, copy=True)[index]


@pytest.mark.parametrize(
    "case_strategy",
    [basic_index_case, integer_array_case, bool_mask_case],
    ids=["basic", "integer_arrays", "bool_mask"],
)
@given(data=st.data())
def test_getitem_gradcheck(case_strategy, data):
    x, index = data.draw(case_strategy(), label="case")
    assert gradcheck(lambda t: F.getitem(t, index), leaf(x))


@pytest.mark.parametrize(
    "case_strategy",
    [basic_index_case, integer_array_case, bool_mask_case],
    ids=["basic", "integer_arrays", "bool_mask"],
)
@given(data=st.data())
def test_getitem_forward(case_strategy, data):
    x, index = data.draw(case_strategy(), label="case")
    expected = ref_getitem(x, index)
    assert_same(F.getitem(leaf(x), index), expected)
    assert_same(leaf(x)[index], expected)


def test_getitem_repeated_integer_indices_add_up():
    x = md.tensor([1.0, 2.0, 3.0], dtype="float64", requires_grad=True)
    F.getitem(x, np.array([0, 2, 0, 0])).backward(np.array([1.0, 10.0, 100.0, 1000.0]))
    np.testing.assert_allclose(x.grad, [1101.0, 0.0, 10.0], **tolerance(np.float64))


def test_getitem_with_explicit_examples():
    a = np.arange(24.0).reshape(2, 3, 4)
    x = leaf(a)
    cases = [
        (0, 1, 2),
        (Ellipsis, 1),
        (None, slice(None), 0),
        (slice(None, None, -1), Ellipsis, slice(1, 3)),
        ([1, 0, 1], slice(None), [3, 3, 0]),  # advanced, separated by a slice
        (slice(None), [0, 0, 2]),
        (a[..., 0] > 5,),
        (1, a[1] > 14),
        (md.tensor(np.array([1, 1])),),  # an integer Tensor as index
    ]
    for index in cases:
        expected = a[tuple(i.numpy() if isinstance(i, md.Tensor) else i for i in index)]
        assert_same(x[index], expected)
        assert gradcheck(lambda t, index=index: t[index], x)


# -- concat / stack -------------------------------------------------------------------------------------


@st.composite
def concat_case(draw):
    shape = draw(shapes(min_dims=1, max_size=16))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    count = draw(st.integers(1, 3))
    parts = []
    for _ in range(count):
        s = list(shape)
        s[axis] = draw(st.integers(1, 3))
        parts.append(draw(arrays(tuple(s))))
    return parts, axis


def ref_concat(parts, axis):
    axis %= parts[0].ndim
    out_shape = list(parts[0].shape)
    out_shape[axis] = sum(p.shape[axis] for p in parts)
    out = np.empty(out_shape)
    offset = 0
    for p in parts:
        for idx in np.ndindex(*p.shape):
            dst = list(idx)
            dst[axis] += offset
            out[tuple(dst)] = p[idx]
        offset += p.shape[axis]
    return out


@given(case=concat_case())
def test_concat_gradcheck(case):
    parts, axis = case
    assert gradcheck(lambda *ts: F.concat(list(ts), axis=axis), *[leaf(p) for p in parts])


@given(case=concat_case())
def test_concat_forward(case):
    parts, axis = case
    assert_same(F.concat([leaf(p) for p in parts], axis=axis), ref_concat(parts, axis))


@st.composite
def stack_case(draw):
    shape = draw(shapes(max_size=16))
    axis = draw(st.integers(-len(shape) - 1, len(shape)))
    parts = [draw(arrays(shape)) for _ in range(draw(st.integers(1, 3)))]
    return parts, axis


def ref_stack(parts, axis):
    axis %= parts[0].ndim + 1
    expanded = [p.reshape(p.shape[:axis] + (1,) + p.shape[axis:]) for p in parts]
    return ref_concat(expanded, axis)


@given(case=stack_case())
def test_stack_gradcheck(case):
    parts, axis = case
    assert gradcheck(lambda *ts: F.stack(list(ts), axis=axis), *[leaf(p) for p in parts])


@given(case=stack_case())
def test_stack_forward(case):
    parts, axis = case
    assert_same(F.stack([leaf(p) for p in parts], axis=axis), ref_stack(parts, axis))


def test_concat_with_a_constant():
    a = md.tensor([1.0, 2.0], dtype="float64", requires_grad=True)
    b = md.tensor([3.0], dtype="float64")
    F.concat([a, b]).backward(np.array([1.0, 2.0, 3.0]))
    np.testing.assert_array_equal(a.grad, [1.0, 2.0])
    assert b.grad is None


# -- pad ------------------------------------------------------------------------------------------


@st.composite
def pad_case(draw):
    shape = draw(shapes(min_dims=1, max_size=16))  # 0-dim: see test_pad_of_a_scalar_tensor
    kind = draw(st.sampled_from(["int", "pair", "per_axis"]))
    if kind == "int":
        width = draw(st.integers(0, 2))
    elif kind == "pair":
        width = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    else:
        width = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in shape)
    return draw(arrays(shape)), width, draw(floats(-3, 3))


def ref_pad(a, width, value):
    widths = np.broadcast_to(np.asarray(width), (a.ndim, 2))
    shape = tuple(n + b + e for n, (b, e) in zip(a.shape, widths, strict=True))
    out = np.full(shape, value, dtype=np.float64)
    for idx in np.ndindex(*a.shape):
        out[tuple(i + b for i, (b, _) in zip(idx, widths, strict=True))] = a[idx]
    return out


@given(case=pad_case())
def test_pad_gradcheck(case):
    x, width, value = case
    assert gradcheck(lambda t: F.pad(t, width, value=value), leaf(x))


@given(case=pad_case())
def test_pad_forward(case):
    x, width, value = case
    assert_same(F.pad(leaf(x), width, value=value), ref_pad(x, width, value))


# Regression test, minidiff bug fixed in ec78413: functional.pad hands np.pad an empty pad_width ()
# for a 0-dim tensor, and NumPy raises TypeError('`pad_width` must be of integral type.');
# np.pad(np.array(1.0), 2) returns the scalar
def test_pad_of_a_scalar_tensor():
    x = md.tensor(1.5, dtype="float64", requires_grad=True)
    out = F.pad(x, 2)
    assert out.shape == () and out.item() == 1.5


# -- integer tensors go through shape ops without gradients ------------------------------------------------


def test_shape_ops_on_integer_tensors():
    x = md.tensor(np.arange(6).reshape(2, 3))
    assert F.reshape(x, (3, 2)).dtype == x.dtype
    np.testing.assert_array_equal(F.permute(x).numpy(), np.arange(6).reshape(2, 3).T)
    np.testing.assert_array_equal(x[1].numpy(), [3, 4, 5])
    assert F.broadcast_to(x, (2, 2, 3)).shape == (2, 2, 3)


# -- bad input ----------------------------------------------------------------------------------------------


def test_reshape_rejects_wrong_sizes():
    x = md.tensor(np.ones((2, 3)))
    for target in [(4, 2), (-1, 4), (-1, -1), (0, -1), (-2, -3)]:
        with pytest.raises(ValueError, match=r"reshape: cannot reshape a tensor of shape \(2, 3\) into"):
            F.reshape(x, target)


def test_permute_rejects_non_permutations():
    x = md.tensor(np.ones((2, 3, 4)))
    for axes in [(0, 1), (0, 0, 1), (0, 1, 3), (0, 1, -4)]:
        with pytest.raises(
            ValueError, match=r"permute: .* is not a permutation of the axes of shape \(2, 3, 4\)"
        ):
            F.permute(x, axes)


def test_swapaxes_rejects_bad_axes():
    x = md.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"swapaxes: axis 2 is out of range for a tensor with 2 dims"):
        F.swapaxes(x, 0, 2)
    with pytest.raises(ValueError, match=r"swapaxes: axis -3 is out of range for a tensor with 2 dims"):
        F.swapaxes(x, -3, 1)
    with pytest.raises(ValueError, match=r"swapaxes: axis 1.0 is out of range"):
        F.swapaxes(x, 1.0, 0)


def test_broadcast_to_rejects_incompatible_shapes():
    x = md.tensor(np.ones((2, 3)))
    for target in [(3, 3), (3,), (2, 1)]:
        with pytest.raises(ValueError, match=r"broadcast_to: shape \(2, 3\) does not broadcast to"):
            F.broadcast_to(x, target)


@pytest.mark.parametrize(
    "index, message",
    [
        (3, r"getitem: .*out of bounds.*\(tensor shape \(3, 2\)\)"),
        ((0, 0, 0), r"getitem: .*too many indices.*\(tensor shape \(3, 2\)\)"),
        (np.array([0, 5]), r"getitem: .*out of bounds.*\(tensor shape \(3, 2\)\)"),
        (np.array([0.5, 1.0]), r"getitem: index arrays must be integer or boolean, got float64"),
        (np.array([True, False]), r"getitem: .*boolean index did not match.*\(tensor shape \(3, 2\)\)"),
    ],
)
def test_getitem_rejects_bad_indices(index, message):
    with pytest.raises(IndexError, match=message):
        F.getitem(md.tensor(np.ones((3, 2))), index)


def test_concat_and_stack_reject_mismatched_shapes():
    a, b = md.tensor(np.ones((2, 3))), md.tensor(np.ones((2, 4)))
    with pytest.raises(ValueError, match=r"concat: shapes \[\(2, 3\), \(2, 4\)\] differ outside axis 0"):
        F.concat([a, b], axis=0)
    with pytest.raises(
        ValueError, match=r"stack: all tensors need the same shape, got \[\(2, 3\), \(2, 4\)\]"
    ):
        F.stack([a, b])
    with pytest.raises(ValueError, match=r"concat: needs at least one tensor"):
        F.concat([])
    with pytest.raises(ValueError, match=r"stack: needs at least one tensor"):
        F.stack([])


def test_concat_and_stack_reject_bad_axes():
    a = md.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"concat: axis 2 is out of range for a tensor with 2 dims"):
        F.concat([a, a], axis=2)
    with pytest.raises(ValueError, match=r"stack: axis -4 is out of range for a tensor with 3 dims"):
        F.stack([a, a], axis=-4)


def test_pad_rejects_bad_widths():
    x = md.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"pad: padding must be non-negative, got -1"):
        F.pad(x, -1)
    with pytest.raises(ValueError, match=r"pad: padding must be non-negative, got \(\(0, 1\), \(-2, 0\)\)"):
        F.pad(x, ((0, 1), (-2, 0)))
    with pytest.raises(ValueError, match=r"pad: pad_width .* does not fit a tensor of shape \(2, 3\)"):
        F.pad(x, ((0, 1), (0, 1), (0, 1)))
    with pytest.raises(TypeError, match=r"pad: pad_width must be integers, got 1.5"):
        F.pad(x, 1.5)
    with pytest.raises(TypeError, match=r"pad: x has dtype int64"):
        F.pad(md.tensor(np.arange(3, dtype=np.int64)), 1)
