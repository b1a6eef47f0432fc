"""Hypothesis strategies shared by the op tests, in one file (as minitorch does).

Shapes are small (1-4 per dim, 0-4 dims, a few dozen elements at most) so every gradcheck,
which runs the op twice per input element, stays fast. Values are bounded; the ``positive``
and ``away_from_zero`` variants keep log/sqrt/div/relu/abs away from their poles and kinks.
``arrays`` hands out C-contiguous arrays, transposed views and ``::2`` slices, so every op
also sees inputs that are not C-contiguous.
"""

from __future__ import annotations

import math

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minidiff import Tensor

MAX_SIZE = 48  # elements per generated array: gradcheck cost is linear in it

# -- values ------------------------------------------------------------------------------


def floats(lo=-2.0, hi=2.0):
    """Finite floats in [lo, hi] (no subnormals: they only test the FPU)."""
    return st.floats(lo, hi, allow_nan=False, allow_infinity=False, allow_subnormal=False, width=64)


def positive(lo=0.5, hi=2.0):
    """Values for log, sqrt, a denominator, a pow base: well away from 0."""
    return floats(lo, hi)


def away_from_zero(lo=0.05, hi=2.0):
    """Either sign, but at least ``lo`` from 0 (relu and abs have a kink there)."""
    return st.one_of(floats(lo, hi), floats(-hi, -lo))


def grid(lo=-2.0, hi=2.0, step=0.01):
    """Multiples of ``step`` in [lo, hi]. Distinct grid values lie ``step`` apart, far more
    than gradcheck's eps, so ``unique=True`` arrays of them have no ties (max) and bounds
    put between grid points (clip) are never within eps of an element."""
    return st.integers(round(lo / step), round(hi / step)).map(lambda i: i * step)


# -- shapes ------------------------------------------------------------------------------


def shapes(min_dims=0, max_dims=4, min_side=1, max_side=4, max_size=MAX_SIZE):
    """Small array shapes: 0-4 dims of 1-4, at most ``max_size`` elements."""
    return hnp.array_shapes(
        min_dims=min_dims, max_dims=max_dims, min_side=min_side, max_side=max_side
    ).filter(lambda s: math.prod(s) <= max_size)


def broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=4, max_size=MAX_SIZE):
    """Tuples of ``num_shapes`` shapes that broadcast together (sizes of 1, missing leading dims)."""
    return (
        hnp.mutually_broadcastable_shapes(
            num_shapes=num_shapes, min_dims=min_dims, max_dims=max_dims, min_side=1, max_side=max_side
        )
        .filter(lambda b: math.prod(b.result_shape) <= max_size)
        .map(lambda b: b.input_shapes)
    )


@st.composite
def axes(draw, ndim, allow_none=True, allow_negative=True):
    """A reduction ``axis`` for an ``ndim``-dim array: None, an int, or a tuple of distinct ints."""
    choices = ["tuple"] + (["none"] if allow_none else []) + (["int"] if ndim else [])
    kind = draw(st.sampled_from(choices))
    if kind == "none":
        return None

    def signed(a):
        return a - ndim if allow_negative and draw(st.booleans()) else a

    if kind == "int":
        return signed(draw(st.integers(0, ndim - 1)))
    chosen = draw(st.lists(st.integers(0, ndim - 1), unique=True, max_size=ndim)) if ndim else []
    return tuple(signed(a) for a in chosen)


# -- arrays --------------------------------------------------------------------------------

LAYOUTS = ("C", "transposed", "strided")


@st.composite
def arrays(draw, shape, elements=None, layout=None, unique=False, dtype=np.float64):
    """A float64 array of ``shape`` in one of three memory layouts.

    ``"C"``: C-contiguous. ``"transposed"``: the ``.T`` view of an array of the reversed shape.
    ``"strided"``: every other element along the last axis of a twice-as-wide array. (The last
    two fall back to C order where the shape leaves nothing to permute or to skip.)
    """
    shape = tuple(shape)
    elements = floats() if elements is None else elements
    layout = draw(st.sampled_from(LAYOUTS)) if layout is None else layout
    make = lambda s: draw(hnp.arrays(dtype, s, elements=elements, unique=unique))  # noqa: E731
    if layout == "transposed" and len(shape) >= 2:
        return make(shape[::-1]).T
    if layout == "strided" and len(shape) >= 1:
        return make(shape[:-1] + (2 * shape[-1],))[..., ::2]
    return make(shape)


def is_c_contiguous(array) -> bool:
    return bool(np.asarray(array).flags.c_contiguous)


def leaf(array, requires_grad=True) -> Tensor:
    """A float64 leaf Tensor that *views* ``array``, keeping its memory layout.

    ``minidiff.tensor`` always copies into a fresh array, which would make every input
    contiguous again; wrapping the view is how a test hands an op a non-contiguous input.
    gradcheck perturbs the view in place and restores it.
    """
    array = np.asarray(array)
    if array.dtype != np.float64:
        raise TypeError(f"leaf(): expected a float64 array, got {array.dtype}")
    return Tensor.from_array(array, requires_grad=requires_grad)


@st.composite
def float_arrays(draw, min_dims=0, max_dims=4, max_side=4, max_size=MAX_SIZE, elements=None, layout=None):
    """``arrays`` with a drawn small shape."""
    shape = draw(shapes(min_dims=min_dims, max_dims=max_dims, max_side=max_side, max_size=max_size))
    return draw(arrays(shape, elements=elements, layout=layout))


@st.composite
def images(draw, n=(1, 2), c=(1, 3), hw=(1, 4), elements=None, layout=None):
    """An NCHW image batch with each dim in the given (low, high) range."""
    shape = (
        draw(st.integers(*n)),
        draw(st.integers(*c)),
        draw(st.integers(*hw)),
        draw(st.integers(*hw)),
    )
    return draw(arrays(shape, elements=elements, layout=layout))


@st.composite
def reshape_targets(draw, shape):
    """A shape with the same number of elements as ``shape`` (maybe with one -1)."""
    size = math.prod(shape)
    factors = []
    rest = size
    for _ in range(draw(st.integers(0, 3))):
        divisors = [d for d in range(1, rest + 1) if rest % d == 0]
        d = draw(st.sampled_from(divisors))
        factors.append(d)
        rest //= d
    factors.append(rest)
    factors = draw(st.permutations(factors))
    if factors and draw(st.booleans()):
        factors[draw(st.integers(0, len(factors) - 1))] = -1
    return tuple(factors)
