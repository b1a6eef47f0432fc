"""Softmax forward/backward: every implementation against naive loops, torch, the reference."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_params import impls as _impls
from kernel_params import make_array

from minidiff import kernels

IMPLS = ("reference", "numba")  # there is no native softmax


def impls(op, names=IMPLS):
    return _impls(op, names=names)


TOL = {np.float32: dict(atol=1e-5, rtol=1e-4), np.float64: dict(atol=1e-12, rtol=1e-10)}


@st.composite
def softmax_cases(draw):
    """x of 1-3 dims (sizes 1-5), an axis, a scale (negative too), gy, a probability array y."""
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    axis = draw(st.integers(-len(shape), len(shape) - 1))
    scale = draw(st.sampled_from([1.0, 0.5, 1 / math.sqrt(8), -1.3, 4.0]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_array(rng, shape, dtype, layout) * draw(st.sampled_from([1.0, 10.0]))
    gy = make_array(rng, shape, dtype, layout)
    return x, axis, scale, gy


def naive_softmax(x, axis, scale):
    """Row by row with math.exp, in float64."""
    x = np.moveaxis(x.astype(np.float64), axis, -1)
    y = np.empty_like(x)
    for i in np.ndindex(x.shape[:-1]):
        z = [scale * v for v in x[i]]
        e = [math.exp(v - max(z)) for v in z]
        y[i] = [v / sum(e) for v in e]
    return np.moveaxis(y, -1, axis)


def naive_softmax_backward(gy, y, axis, scale):
    """gx = J^T gy with the explicit Jacobian J = scale * (diag(y) - y y^T) of each row."""
    gy, y = (np.moveaxis(a.astype(np.float64), axis, -1) for a in (gy, y))
    gx = np.empty_like(y)
    for i in np.ndindex(y.shape[:-1]):
        jac = scale * (np.diag(y[i]) - np.outer(y[i], y[i]))
        gx[i] = jac.T @ gy[i]
    return np.moveaxis(gx, -1, axis)


@pytest.mark.parametrize("forward", impls("softmax_forward"))
@settings(deadline=None)
@given(case=softmax_cases())
def test_forward_matches_naive_loop(forward, case):
    x, axis, scale, _ = case
    y = forward(x, axis=axis, scale=scale)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y, naive_softmax(x, axis, scale), **TOL[x.dtype.type])


@pytest.mark.parametrize("backward", impls("softmax_backward"))
@settings(deadline=None)
@given(case=softmax_cases())
def test_backward_matches_jacobian(backward, case):
    x, axis, scale, gy = case
    y = naive_softmax(x, axis, scale).astype(x.dtype)
    gx = backward(gy, y, axis=axis, scale=scale)
    assert gx.dtype == x.dtype and gx.shape == x.shape
    np.testing.assert_allclose(gx, naive_softmax_backward(gy, y, axis, scale), **TOL[x.dtype.type])


@settings(deadline=None)
@given(case=softmax_cases())
def test_reference_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, axis, scale, gy = case
    y = kernels.implementations("softmax_forward")["reference"](x, axis=axis, scale=scale)
    gx = kernels.implementations("softmax_backward")["reference"](gy, y, axis=axis, scale=scale)
    tx = torch.tensor(np.asarray(x, np.float64), requires_grad=True)
    ty = torch.softmax(scale * tx, dim=axis)
    ty.backward(torch.from_numpy(np.asarray(gy, np.float64)))
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL[x.dtype.type])
    np.testing.assert_allclose(gx, tx.grad.numpy(), **TOL[x.dtype.type])


@pytest.mark.parametrize("forward", impls("softmax_forward", names=("numba",)))
@settings(deadline=None)
@given(case=softmax_cases())
def test_fast_forward_matches_reference(forward, case):
    """Any axis: the fast versions run the reference themselves for an axis other than the last."""
    x, axis, scale, _ = case
    expected = kernels.implementations("softmax_forward")["reference"](x, axis=axis, scale=scale)
    np.testing.assert_allclose(forward(x, axis=axis, scale=scale), expected, **TOL[x.dtype.type])


@pytest.mark.parametrize("backward", impls("softmax_backward", names=("numba",)))
@settings(deadline=None)
@given(case=softmax_cases())
def test_fast_backward_matches_reference(backward, case):
    x, axis, scale, gy = case
    y = kernels.implementations("softmax_forward")["reference"](x, axis=axis, scale=scale)
    expected = kernels.implementations("softmax_backward")["reference"](gy, y, axis=axis, scale=scale)
    np.testing.assert_allclose(backward(gy, y, axis=axis, scale=scale), expected, **TOL[x.dtype.type])


def test_large_logits_do_not_overflow():
    x = np.array([[1000.0, 1000.0, -1000.0], [-1e4, 0.0, 1e4]], np.float32)
    for forward in kernels.implementations("softmax_forward").values():
        np.testing.assert_allclose(forward(x), [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
        np.testing.assert_allclose(forward(x, scale=-1.0), [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("forward", impls("softmax_forward"))
def test_masked_and_tiny_logits_get_probability_zero(forward, dtype):
    """-inf (a masked position) and logits far below the row's max give exactly 0; NaN spreads."""
    x = np.array([[0.0, -np.inf, 1.0, -np.inf], [-1e4, 3.0, -1e3, 2.0]], dtype)
    y = forward(x)
    assert y[0, 1] == y[0, 3] == 0.0 and y[1, 0] == y[1, 2] == 0.0
    np.testing.assert_allclose(y.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(y[0, [0, 2]], [1 / (1 + np.e), np.e / (1 + np.e)], rtol=1e-6)
    assert np.isnan(forward(np.array([[0.0, np.nan, 1.0]], dtype))).all()


@pytest.mark.parametrize("forward", impls("softmax_forward"))
def test_forward_rejects_bad_input(forward):
    with pytest.raises(TypeError, match="softmax_forward.*int64"):
        forward(np.zeros((2, 3), np.int64))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        forward(np.zeros((2, 3)), axis=2)


@pytest.mark.parametrize("backward", impls("softmax_backward"))
def test_backward_rejects_bad_input(backward):
    with pytest.raises(ValueError, match="shapes must match"):
        backward(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match="same dtype"):
        backward(np.zeros((2, 3), np.float32), np.zeros((2, 3)))


@pytest.mark.skipif(not kernels.available()["native"][0], reason=kernels.available()["native"][1])
def test_native_rows_split_over_threads_give_the_same_values(monkeypatch):
    """The native kernels split the rows over OpenMP threads above a size: each row is still
    computed alone, so the values do not change."""
    from minidiff.kernels import _cpu, attention

    forward = kernels.implementations("softmax_forward")["native"]
    backward = kernels.implementations("softmax_backward")["native"]
    rng = np.random.default_rng(3)
    x, gy = (
        rng.standard_normal((2, 37, 19)).astype(np.float32),
        rng.standard_normal((2, 37, 19)).astype(np.float32),
    )
    monkeypatch.setattr(attention, "PARALLEL_MIN_FORWARD", 1 << 62)
    monkeypatch.setattr(_cpu, "PARALLEL_MIN", 1 << 62)
    y, gx = forward(x, scale=0.5), backward(gy, forward(x, scale=0.5), scale=0.5)
    monkeypatch.setattr(attention, "PARALLEL_MIN_FORWARD", 0)
    monkeypatch.setattr(_cpu, "PARALLEL_MIN", 0)
    np.testing.assert_array_equal(forward(x, scale=0.5), y)
    np.testing.assert_array_equal(backward(gy, y, scale=0.5), gx)
