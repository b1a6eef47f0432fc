"""Losses: mse_loss and cross_entropy with every reduction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, leaf, shapes

import minidiff as md
import minidiff.functional as F
from minidiff.testing import check_function, gradcheck

REDUCTIONS = ["mean", "sum", "none"]


def reduce_ref(values, reduction):
    if reduction == "mean":
        return np.float64(sum(values.ravel()) / values.size)
    if reduction == "sum":
        return np.float64(sum(values.ravel()))
    return values


@st.composite
def mse_case(draw):
    shape = draw(shapes())
    return draw(arrays(shape)), draw(arrays(shape))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(case=mse_case())
def test_mse_loss(reduction, case):
    x, target = case
    check_function(
        lambda a, b: F.mse_loss(a, b, reduction=reduction),
        [x, target],
        reference=lambda a, b: reduce_ref((a - b) ** 2, reduction),
    )
    assert gradcheck(lambda a: F.mse_loss(a, target, reduction=reduction), leaf(x))  # array target


@st.composite
def cross_entropy_case(draw):
    n, c = draw(st.integers(1, 4)), draw(st.integers(1, 5))
    logits = draw(arrays((n, c)))
    labels = np.array(draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)), dtype=np.int64)
    return logits, labels


def ref_cross_entropy(logits, labels):
    out = np.empty(len(labels))
    for i, (row, y) in enumerate(zip(logits.astype(np.float64), labels, strict=True)):
        top = row.max()
        out[i] = -(row[y] - top - np.log(np.exp(row - top).sum()))
    return out


@pytest.mark.parametrize("reduction", REDUCTIONS)
@given(case=cross_entropy_case())
def test_cross_entropy(reduction, case):
    logits, labels = case
    check_function(
        lambda t, y: F.cross_entropy(t, y, reduction=reduction),
        [logits, labels],
        reference=lambda z, y: reduce_ref(ref_cross_entropy(z, y), reduction),
    )
    assert gradcheck(lambda t: F.cross_entropy(t, md.tensor(labels), reduction=reduction), leaf(logits))


# -- bad input --------------------------------------------------------------------------------------


def test_mse_loss_rejects_bad_input():
    a = md.tensor(np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"mse_loss: input \(2, 3\) and target \(3,\) differ in shape"):
        F.mse_loss(a, md.tensor(np.ones(3)))
    with pytest.raises(
        ValueError, match=r"mse_loss: reduction must be one of \('mean', 'sum', 'none'\), got 'avg'"
    ):
        F.mse_loss(a, a, reduction="avg")
    with pytest.raises(TypeError, match=r"mse_loss: input has dtype int64"):
        F.mse_loss(md.tensor(np.ones(3, dtype=np.int64)), md.tensor(np.ones(3)))


def test_cross_entropy_rejects_bad_input():
    logits = md.tensor(np.ones((3, 4)))
    with pytest.raises(
        ValueError, match=r"cross_entropy: logits must have 2 dims \(N, C\), got shape \(3, 4, 1\)"
    ):
        F.cross_entropy(md.tensor(np.ones((3, 4, 1))), [0, 1, 2])
    with pytest.raises(ValueError, match=r"cross_entropy: target must have shape \(3,\), got \(2,\)"):
        F.cross_entropy(logits, [0, 1])
    with pytest.raises(
        TypeError, match=r"cross_entropy: target must hold integer class indices, got dtype float64"
    ):
        F.cross_entropy(logits, np.array([0.0, 1.0, 2.0]))
    with pytest.raises(IndexError, match=r"cross_entropy: target classes must lie in \[0, 4\)"):
        F.cross_entropy(logits, [0, 4, 1])
    with pytest.raises(IndexError, match=r"cross_entropy: target classes must lie in \[0, 4\)"):
        F.cross_entropy(logits, [0, -1, 1])
    with pytest.raises(ValueError, match=r"cross_entropy: reduction must be one of"):
        F.cross_entropy(logits, [0, 1, 2], reduction="max")
