"""dropout (seeded, inverted scaling) and embedding (row lookup, repeated indices)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import arrays, away_from_zero, float_arrays, leaf

import minidiff as md
import minidiff.functional as F
from minidiff.testing import gradcheck, tolerance

DTYPES = [np.float32, np.float64]


# -- dropout -------------------------------------------------------------------------------------------


@given(x=float_arrays(), p=st.sampled_from([0.1, 0.5, 0.8]), seed=st.integers(0, 2**16))
def test_dropout_gradcheck(x, p, seed):
    # an integer seed gives the same mask on every call, so central differences see one function
    assert gradcheck(lambda t: F.dropout(t, p, generator=seed), leaf(x))


@pytest.mark.parametrize("dtype", DTYPES)
@given(
    x=float_arrays(elements=away_from_zero(0.1)),
    p=st.sampled_from([0.1, 0.5, 0.8]),
    seed=st.integers(0, 2**16),
)
def test_dropout_forward(dtype, x, p, seed):
    t = md.tensor(x, dtype=dtype)
    out = F.dropout(t, p, generator=seed)
    assert out.dtype == dtype and out.shape == x.shape
    a, y = t.numpy().astype(np.float64), out.numpy().astype(np.float64)
    kept = y != 0
    # every element is either dropped or scaled by 1 / (1 - p)
    np.testing.assert_allclose(y[kept], a[kept] / (1 - p), **tolerance(dtype))
    # the same seed gives the same mask; the gradient is that mask, scaled
    np.testing.assert_array_equal(F.dropout(t, p, generator=seed).numpy(), out.numpy())
    x64 = md.tensor(x, dtype="float64", requires_grad=True)
    F.dropout(x64, p, generator=seed).sum().backward()
    np.testing.assert_allclose(x64.grad, kept / (1 - p), **tolerance(dtype))


def test_dropout_keeps_about_1_minus_p():
    x = md.ones(200, 100)
    for p in (0.2, 0.5, 0.9):
        kept = (F.dropout(x, p, generator=np.random.default_rng(1)).numpy() != 0).mean()
        # 20000 Bernoulli draws: 5 standard deviations is at most 0.018
        assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / x.size)


def test_dropout_identity_cases():
    x = md.tensor(np.arange(1.0, 7.0).reshape(2, 3), dtype="float64", requires_grad=True)
    assert F.dropout(x, 0.5, training=False) is x
    assert F.dropout(x, 0.0) is x
    zeros = F.dropout(x, 1.0)
    np.testing.assert_array_equal(zeros.numpy(), np.zeros((2, 3)))
    zeros.sum().backward()
    np.testing.assert_array_equal(x.grad, np.zeros((2, 3)))


def test_dropout_rejects_bad_input():
    x = md.tensor(np.ones(3))
    for p in (-0.1, 1.5):
        with pytest.raises(ValueError, match=rf"dropout: p must be in \[0, 1\], got {p}"):
            F.dropout(x, p)
    with pytest.raises(TypeError, match=r"dropout: x has dtype int64"):
        F.dropout(md.tensor(np.ones(3, dtype=np.int64)))


# -- embedding ------------------------------------------------------------------------------------------


@st.composite
def embedding_case(draw):
    num, dim = draw(st.integers(1, 5)), draw(st.integers(1, 4))
    weight = draw(arrays((num, dim)))
    index_shape = draw(hnp.array_shapes(min_dims=0, max_dims=2, min_side=1, max_side=4))
    indices = draw(hnp.arrays(np.int64, index_shape, elements=st.integers(0, num - 1)))  # repeats welcome
    return weight, indices


def ref_embedding(weight, indices):
    out = np.empty(indices.shape + weight.shape[1:])
    for idx in np.ndindex(*indices.shape):
        out[idx] = weight[int(indices[idx])]
    return out


@given(case=embedding_case())
def test_embedding_gradcheck(case):
    weight, indices = case
    assert gradcheck(lambda w: F.embedding(indices, w), leaf(weight))
    assert gradcheck(lambda w: F.embedding(md.tensor(indices), w), leaf(weight))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=embedding_case())
def test_embedding_forward(dtype, case):
    weight, indices = case
    w = md.tensor(weight, dtype=dtype)
    out = F.embedding(indices, w)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.numpy(), ref_embedding(w.numpy(), indices))


def test_embedding_gradient_adds_repeated_rows():
    w = md.tensor(np.zeros((3, 2)), dtype="float64", requires_grad=True)
    F.embedding([2, 0, 2, 2], w).sum().backward()
    np.testing.assert_array_equal(w.grad, [[1.0, 1.0], [0.0, 0.0], [3.0, 3.0]])


def test_embedding_rejects_bad_input():
    w = md.tensor(np.ones((4, 2)))
    with pytest.raises(IndexError, match=r"embedding: indices must lie in \[0, 4\), got values from 0 to 4"):
        F.embedding([0, 4], w)
    with pytest.raises(IndexError, match=r"embedding: indices must lie in \[0, 4\), got values from -1 to 2"):
        F.embedding(np.array([-1, 2]), w)
    with pytest.raises(TypeError, match=r"embedding: indices must be integers, got dtype float64"):
        F.embedding(np.array([0.0, 1.0]), w)
    with pytest.raises(
        ValueError, match=r"embedding: weight must have 2 dims \(num_embeddings, dim\), got shape \(4,\)"
    ):
        F.embedding([0], md.tensor(np.ones(4)))
    with pytest.raises(TypeError, match=r"embedding: weight has dtype int64"):
        F.embedding([0], md.tensor(np.ones((4, 2), dtype=np.int64)))
