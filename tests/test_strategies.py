"""The shared strategies do what the op tests rely on: small shapes, bounds, odd memory layouts."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import find, given, settings
from hypothesis import strategies as st
from strategies import (
    MAX_SIZE,
    arrays,
    away_from_zero,
    broadcastable_shapes,
    float_arrays,
    is_c_contiguous,
    leaf,
    positive,
    reshape_targets,
    shapes,
)

import minidiff.functional as F


@given(shape=shapes())
def test_shapes_are_small(shape):
    assert 0 <= len(shape) <= 4 and all(1 <= n <= 4 for n in shape) and math.prod(shape) <= MAX_SIZE


@given(pair=broadcastable_shapes())
def test_broadcastable_shapes_broadcast(pair):
    np.broadcast_shapes(*pair)


@given(a=float_arrays())
def test_values_are_bounded(a):
    assert a.dtype == np.float64 and np.all(np.abs(a) <= 2)


@given(a=float_arrays(elements=positive()), b=float_arrays(elements=away_from_zero()))
def test_positive_and_away_from_zero(a, b):
    assert np.all(a >= 0.5) and np.all(np.abs(b) >= 0.05)


@given(
    shape=shapes(min_dims=2, min_side=2), layout=st.sampled_from(["transposed", "strided"]), data=st.data()
)
def test_non_contiguous_layouts(shape, layout, data):
    a = data.draw(arrays(shape, layout=layout))
    assert a.shape == shape
    assert not is_c_contiguous(a)
    t = leaf(a)
    assert not t.data.flags.c_contiguous  # the op really receives the strided view


def test_default_layout_draws_non_contiguous_arrays():
    found = find(arrays((3, 2)), lambda a: not is_c_contiguous(a), settings=settings(database=None))
    assert found.shape == (3, 2)


@given(data=st.data())
def test_reshape_targets_keep_the_size(data):
    shape = data.draw(shapes())
    target = data.draw(reshape_targets(shape))
    assert F.reshape(leaf(np.zeros(shape)), target).size == math.prod(shape)
