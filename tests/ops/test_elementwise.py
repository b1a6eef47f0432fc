"""Elementwise ops: arithmetic, pow, unary functions, clip, masked_fill, cast, comparisons."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from strategies import (
    arrays,
    away_from_zero,
    broadcastable_shapes,
    float_arrays,
    floats,
    grid,
    leaf,
    positive,
    shapes,
)

import minidiff as md
import minidiff.functional as F
from minidiff.testing import gradcheck, tolerance

DTYPES = [np.float32, np.float64]


def assert_close(actual, expected, dtype):
    """Compare a minidiff result with a float64 NumPy reference at ``dtype``'s tolerance."""
    assert actual.dtype == dtype, f"result has dtype {actual.dtype}, expected {np.dtype(dtype)}"
    np.testing.assert_allclose(actual.numpy(), np.asarray(expected, dtype=np.float64), **tolerance(dtype))


def const(array, dtype):
    return md.tensor(np.asarray(array), dtype=dtype)


# -- unary functions ---------------------------------------------------------------------------

SQRT_2_OVER_PI = np.sqrt(2.0 / np.pi)

UNARY = {
    # name: (minidiff op, independent NumPy/SciPy formula, element strategy)
    "neg": (F.neg, lambda a: -a, floats()),
    "exp": (F.exp, np.exp, floats()),
    "log": (F.log, np.log, positive()),
    "sqrt": (F.sqrt, np.sqrt, positive()),
    "abs": (F.abs, np.abs, away_from_zero()),
    "tanh": (F.tanh, lambda a: (np.exp(2 * a) - 1) / (np.exp(2 * a) + 1), floats()),
    "sigmoid": (F.sigmoid, lambda a: 1.0 / (1.0 + np.exp(-a)), floats(-6, 6)),
    "relu": (F.relu, lambda a: np.where(a > 0, a, 0.0), away_from_zero()),
    "silu": (F.silu, lambda a: a / (1.0 + np.exp(-a)), floats(-4, 4)),
    "gelu": (F.gelu, lambda a: a * scipy.stats.norm.cdf(a), floats(-4, 4)),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda a: 0.5 * a * (1.0 + np.tanh(SQRT_2_OVER_PI * (a + 0.044715 * a**3))),
        floats(-4, 4),
    ),
    "method_exp": (lambda x: x.exp(), np.exp, floats()),
    "method_gelu": (lambda x: x.gelu(), lambda a: a * scipy.stats.norm.cdf(a), floats(-4, 4)),
}


# silu = x * sigmoid(x) uses x twice: its gradcheck caught the topological_order bug fixed in ec78413.
@pytest.mark.parametrize("name", list(UNARY))
@given(data=st.data())
def test_unary_gradcheck(name, data):
    op, _, elements = UNARY[name]
    x = leaf(data.draw(float_arrays(elements=elements), label="x"))
    assert gradcheck(op, x)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(UNARY))
@given(data=st.data())
def test_unary_forward(name, dtype, data):
    op, ref, elements = UNARY[name]
    a = data.draw(float_arrays(elements=elements), label="x")
    x = const(a, dtype)
    assert_close(op(x), ref(x.numpy().astype(np.float64)), dtype)


def test_sigmoid_and_silu_do_not_overflow_at_extremes():
    x = md.tensor([-1000.0, -50.0, 0.0, 50.0, 1000.0], dtype="float64")
    with np.errstate(over="raise", invalid="raise"):
        s = F.sigmoid(x).numpy()
        y = F.silu(x).numpy()
    expected = [0.0, np.exp(-50.0) / (1 + np.exp(-50.0)), 0.5, 1 / (1 + np.exp(-50.0)), 1.0]
    np.testing.assert_allclose(s, expected, **tolerance(np.float64))
    assert np.isfinite(y).all()


# -- binary arithmetic ---------------------------------------------------------------------------

BINARY = {
    "add": (F.add, np.add, lambda a, b: a + b),
    "sub": (F.sub, np.subtract, lambda a, b: a - b),
    "mul": (F.mul, np.multiply, lambda a, b: a * b),
    "div": (F.div, np.divide, lambda a, b: a / b),
}


def _operands(data, name):
    shape_a, shape_b = data.draw(broadcastable_shapes(), label="shapes")
    a = data.draw(arrays(shape_a), label="a")
    b = data.draw(arrays(shape_b, elements=away_from_zero(0.5) if name == "div" else None), label="b")
    return a, b


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data())
def test_binary_gradcheck_with_broadcasting(name, data):
    op, _, _ = BINARY[name]
    a, b = _operands(data, name)
    assert gradcheck(op, leaf(a), leaf(b))


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data())
def test_binary_gradcheck_one_side_constant(name, data):
    op, _, _ = BINARY[name]
    a, b = _operands(data, name)
    assert gradcheck(op, leaf(a), leaf(b, requires_grad=False))
    assert gradcheck(op, leaf(a, requires_grad=False), leaf(b))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data())
def test_binary_forward(name, dtype, data):
    op, ref, operator = BINARY[name]
    a, b = _operands(data, name)
    ta, tb = const(a, dtype), const(b, dtype)
    expected = ref(ta.numpy().astype(np.float64), tb.numpy().astype(np.float64))
    assert_close(op(ta, tb), expected, dtype)
    assert_close(operator(ta, tb), expected, dtype)  # the Tensor operator overloads


@pytest.mark.parametrize("name", list(BINARY))
@given(data=st.data(), scalar=away_from_zero(0.5))
def test_binary_with_python_scalar(name, data, scalar):
    op, ref, _ = BINARY[name]
    a = data.draw(float_arrays(elements=away_from_zero(0.5)), label="a")
    x = leaf(a)
    assert_close(op(x, scalar), ref(a, scalar), np.float64)
    assert_close(op(scalar, x), ref(scalar, a), np.float64)
    assert gradcheck(lambda t: op(t, scalar), x)
    assert gradcheck(lambda t: op(scalar, t), x)


# -- pow ---------------------------------------------------------------------------------------------


@given(data=st.data())
def test_pow_tensor_exponent_gradcheck(data):
    shape_a, shape_b = data.draw(broadcastable_shapes(), label="shapes")
    base = leaf(data.draw(arrays(shape_a, elements=positive()), label="base"))
    exponent = leaf(data.draw(arrays(shape_b, elements=floats()), label="exponent"))
    assert gradcheck(F.pow, base, exponent)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
def test_pow_tensor_exponent_forward(dtype, data):
    shape_a, shape_b = data.draw(broadcastable_shapes(), label="shapes")
    base = const(data.draw(arrays(shape_a, elements=positive()), label="base"), dtype)
    exponent = const(data.draw(arrays(shape_b, elements=floats()), label="exponent"), dtype)
    a, b = base.numpy().astype(np.float64), exponent.numpy().astype(np.float64)
    expected = np.exp(b * np.log(a))
    assert_close(F.pow(base, exponent), expected, dtype)
    assert_close(base**exponent, expected, dtype)


@given(data=st.data(), base=positive())
def test_pow_constant_base(data, base):
    x = leaf(data.draw(float_arrays(), label="exponent"))
    assert_close(base**x, np.exp(x.numpy() * np.log(base)), np.float64)
    assert gradcheck(lambda t: base**t, x)


SCALAR_EXPONENTS = [2, 3, -1, 0, 1, 2.0, 0.5, 1.5, -0.5, -2.5]


@given(data=st.data(), exponent=st.sampled_from(SCALAR_EXPONENTS))
def test_pow_scalar_exponent_gradcheck(data, exponent):
    integral = float(exponent).is_integer()
    elements = away_from_zero(0.3) if integral else positive()
    x = leaf(data.draw(float_arrays(elements=elements), label="x"))
    assert gradcheck(lambda t: F.pow(t, exponent), x)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data(), exponent=st.sampled_from(SCALAR_EXPONENTS))
def test_pow_scalar_exponent_forward(dtype, data, exponent):
    integral = float(exponent).is_integer()
    elements = away_from_zero(0.3) if integral else positive()
    x = const(data.draw(float_arrays(elements=elements), label="x"), dtype)
    a = x.numpy().astype(np.float64)
    if integral:  # repeated multiplication: independent of NumPy's power
        expected = np.ones_like(a)
        for _ in range(abs(int(exponent))):
            expected = expected * a
        expected = 1.0 / expected if exponent < 0 else expected
    else:
        expected = np.exp(exponent * np.log(a))
    assert_close(x**exponent, expected, dtype)


# -- clip --------------------------------------------------------------------------------------------


@st.composite
def clip_case(draw):
    """An array on the 0.01 grid and bounds halfway between grid points (never at an element)."""
    x = draw(float_arrays(elements=grid()))
    low = draw(grid(-2.5, 2.5)) + 0.005
    high = draw(grid(-2.5, 2.5)) + 0.005
    low, high = min(low, high), max(low, high)
    which = draw(st.sampled_from(["both", "low", "high"]))
    return x, (low if which != "high" else None), (high if which != "low" else None)


@given(case=clip_case())
def test_clip_gradcheck(case):
    x, low, high = case
    assert gradcheck(lambda t: F.clip(t, low, high), leaf(x))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=clip_case())
def test_clip_forward(dtype, case):
    x, low, high = case
    t = const(x, dtype)
    a = t.numpy().astype(np.float64)
    lo = -np.inf if low is None else np.float64(np.asarray(low, dtype))
    hi = np.inf if high is None else np.float64(np.asarray(high, dtype))
    expected = np.where(a < lo, lo, np.where(a > hi, hi, a))
    assert_close(F.clip(t, low, high), expected, dtype)
    assert_close(t.clip(low, high), expected, dtype)


def test_clip_gradient_is_zero_outside_the_bounds():
    x = md.tensor([-2.0, -0.5, 0.5, 2.0], dtype="float64", requires_grad=True)
    F.clip(x, -1.0, 1.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [0.0, 1.0, 1.0, 0.0])


# -- masked_fill ---------------------------------------------------------------------------------------


@st.composite
def masked_fill_case(draw):
    shape = draw(shapes())
    mask_shape = list(shape[draw(st.integers(0, len(shape))) :])  # drop leading dims
    mask_shape = tuple(1 if draw(st.booleans()) else n for n in mask_shape)  # and squeeze some
    x = draw(arrays(shape))
    mask = draw(hnp.arrays(np.bool_, mask_shape))
    return x, mask, draw(floats(-3, 3))


@given(case=masked_fill_case())
def test_masked_fill_gradcheck(case):
    x, mask, value = case
    assert gradcheck(lambda t: F.masked_fill(t, md.tensor(mask), value), leaf(x))


@pytest.mark.parametrize("dtype", DTYPES)
@given(case=masked_fill_case())
def test_masked_fill_forward(dtype, case):
    x, mask, value = case
    t = const(x, dtype)
    expected = t.numpy().astype(np.float64).copy()
    expected[np.broadcast_to(mask, x.shape)] = np.float64(np.asarray(value, dtype))
    assert_close(F.masked_fill(t, md.tensor(mask), value), expected, dtype)


def test_masked_fill_with_minus_inf():
    x = md.tensor([[1.0, 2.0], [3.0, 4.0]], dtype="float64", requires_grad=True)
    y = F.masked_fill(x, md.tensor(np.array([True, False])), -np.inf)
    np.testing.assert_array_equal(y.numpy(), [[-np.inf, 2.0], [-np.inf, 4.0]])
    F.mul(F.exp(y), 1.0).sum().backward()
    np.testing.assert_allclose(x.grad, [[0.0, np.exp(2.0)], [0.0, np.exp(4.0)]], **tolerance(np.float64))


# Regression test, minidiff bug fixed in ec78413: functional.masked_fill turns a NumPy boolean mask
# into a float tensor (as_tensor(mask, like=x) casts 'b' kinds to x's dtype) and then rejects it as
# not boolean
def test_masked_fill_accepts_numpy_bool_mask():
    x = md.tensor([1.0, 2.0], dtype="float64")
    y = F.masked_fill(x, np.array([True, False]), 0.0)
    np.testing.assert_array_equal(y.numpy(), [0.0, 2.0])


# -- cast ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "src, dst", [(np.float64, np.float32), (np.float32, np.float64), (np.float64, np.float64)]
)
@given(a=float_arrays())
def test_cast_forward_and_backward(src, dst, a):
    x = md.tensor(a, dtype=src, requires_grad=True)
    y = F.cast(x, dst)
    assert y.dtype == dst and y.requires_grad
    np.testing.assert_array_equal(y.numpy(), x.numpy().astype(dst))
    cotangent = np.linspace(-1, 1, y.size).reshape(y.shape)
    y.backward(cotangent)
    assert x.grad.dtype == src
    np.testing.assert_array_equal(x.grad, cotangent.astype(dst).astype(src))


@given(a=float_arrays())
def test_cast_gradcheck(a):
    assert gradcheck(lambda t: F.cast(t, np.float64) * 2.0, leaf(a))


def test_cast_integer_tensor_is_a_plain_conversion():
    y = F.cast(md.tensor(np.arange(3)), "float64")
    assert y.dtype == np.float64 and not y.requires_grad
    np.testing.assert_array_equal(y.numpy(), [0.0, 1.0, 2.0])


# -- comparisons -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "how, ref",
    [
        ("lt", np.less),
        ("le", np.less_equal),
        ("gt", np.greater),
        ("ge", np.greater_equal),
        ("eq", np.equal),
        ("ne", np.not_equal),
    ],
)
@given(data=st.data())
def test_compare_forward(how, ref, data):
    shape_a, shape_b = data.draw(broadcastable_shapes(), label="shapes")
    a = data.draw(arrays(shape_a, elements=grid(-0.05, 0.05)), label="a")  # ties happen often
    b = data.draw(arrays(shape_b, elements=grid(-0.05, 0.05)), label="b")
    out = F.compare(leaf(a), leaf(b), how)
    assert out.dtype == np.bool_ and not out.requires_grad
    np.testing.assert_array_equal(out.numpy(), ref(a, b))


# -- bad input --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["add", "sub", "mul", "div", "pow"])
def test_binary_shapes_that_do_not_broadcast(name):
    op = getattr(F, name)
    a, b = md.tensor(np.ones((2, 3))), md.tensor(np.ones((4,)))
    with pytest.raises(ValueError, match=rf"{name}: shapes \(2, 3\) and \(4,\) do not broadcast"):
        op(a, b)


@pytest.mark.parametrize(
    "name", ["exp", "log", "sqrt", "abs", "tanh", "sigmoid", "relu", "silu", "gelu", "clip"]
)
def test_unary_rejects_integer_tensors(name):
    op = getattr(F, name)
    with pytest.raises(TypeError, match=rf"{name}: x has dtype int64; expected float32 or float64"):
        op(md.tensor(np.arange(3, dtype=np.int64)))


def test_unary_rejects_non_tensors():
    with pytest.raises(TypeError, match="exp: x must be a Tensor, got str"):
        F.exp("not a tensor")


def test_gelu_rejects_unknown_approximation():
    with pytest.raises(ValueError, match=r"gelu: approximate must be 'none' or 'tanh', got 'erf'"):
        F.gelu(md.tensor([1.0]), approximate="erf")


def test_clip_rejects_low_above_high():
    with pytest.raises(ValueError, match=r"clip: low \(2.0\) is greater than high \(1.0\)"):
        F.clip(md.tensor([1.0]), 2.0, 1.0)


def test_masked_fill_rejects_non_boolean_mask():
    with pytest.raises(TypeError, match="masked_fill: mask must be boolean, got dtype int64"):
        F.masked_fill(md.tensor([1.0, 2.0]), md.tensor(np.array([1, 0])), 0.0)


def test_masked_fill_rejects_mask_that_does_not_broadcast():
    x = md.tensor(np.ones((2, 3)))
    mask = md.tensor(np.ones((2, 2), dtype=bool))
    with pytest.raises(
        ValueError, match=r"masked_fill: mask of shape \(2, 2\) does not broadcast to x's shape \(2, 3\)"
    ):
        F.masked_fill(x, mask, 0.0)
    bigger = md.tensor(np.ones((4, 2, 3), dtype=bool))  # broadcasts, but would grow x
    with pytest.raises(ValueError, match=r"masked_fill: mask of shape \(4, 2, 3\)"):
        F.masked_fill(x, bigger, 0.0)


@pytest.mark.parametrize("dtype", ["int64", "float16", "bool"])
def test_cast_rejects_unsupported_dtypes(dtype):
    with pytest.raises(TypeError, match=rf"cast: dtype {dtype} is not supported"):
        F.cast(md.tensor([1.0]), dtype)


# -- to_device (CPU only here) ---------------------------------------------------------------------------


def test_to_device_cpu_round_trip():
    x = md.tensor([1.0, 2.0], dtype="float64", requires_grad=True)
    y = F.to_device(x, "cpu")
    assert y.device == "cpu"
    np.testing.assert_array_equal(y.numpy(), [1.0, 2.0])
    (y * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 3.0])


@st.composite
def geglu_inputs(draw):
    """h of shape (..., 2 d): [value, gate] halves, the gate in GELU's curved range."""
    lead = draw(st.lists(st.integers(1, 3), min_size=0, max_size=2))
    half = draw(st.integers(1, 3))
    return draw(arrays((*lead, 2 * half), elements=floats(-4, 4)))


def geglu_textbook(a):
    half = a.shape[-1] // 2
    return a[..., :half] * a[..., half:] * scipy.stats.norm.cdf(a[..., half:])


@given(a=geglu_inputs())
def test_geglu_gradcheck(a):
    assert gradcheck(F.geglu, leaf(a))


@pytest.mark.parametrize("dtype", DTYPES)
@given(a=geglu_inputs())
def test_geglu_forward(dtype, a):
    x = const(a, dtype)
    assert_close(F.geglu(x), geglu_textbook(x.numpy().astype(np.float64)), dtype)


def test_geglu_needs_an_even_last_axis():
    with pytest.raises(ValueError, match=r"geglu: .*it must be even; got \(2, 3\)"):
        F.geglu(md.tensor(np.zeros((2, 3), np.float32)))
