"""Group norm: every implementation against a naive loop, central differences, torch, the reference."""

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from kernel_params import check_group_norm_forward_rejects, impls, make_array

from minidiff import kernels

TOL = {np.float32: dict(atol=1e-5, rtol=1e-4), np.float64: dict(atol=1e-10, rtol=1e-9)}


@st.composite
def gn_cases(draw, dtypes=(np.float32, np.float64)):
    """x (N, C, *spatial) with 0-3 spatial dims, groups dividing C, maybe weight and bias, and gy."""
    groups, per_group = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    shape = (draw(st.integers(1, 2)), groups * per_group, *spatial)
    dtype = draw(st.sampled_from(dtypes))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = make_array(rng, shape, dtype, layout)
    # Scale, and in float64 shift, so that a group's spread is not ~1 and its mean not ~0. No shift
    # in float32: mean and rstd are stored in x's dtype, so the rounding of mean is amplified by
    # rstd**2 * |mean| in the gradient, beyond float32 tolerances of a float64 oracle.
    x = x * draw(st.sampled_from([0.5, 1.0, 3.0]))
    if dtype == np.float64:
        x = x + draw(st.sampled_from([0.0, 2.0, 100.0]))
    weight = bias = None
    if draw(st.booleans()):
        weight = make_array(rng, (shape[1],), dtype, layout)
        bias = make_array(rng, (shape[1],), dtype, layout)
    gy = make_array(rng, shape, dtype, layout)
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.1]))
    return x, weight, bias, groups, eps, gy


def naive_group_norm(x, weight, bias, groups, eps):
    """One (sample, group) at a time, in float64."""
    shape, (N, C) = x.shape, x.shape[:2]
    x = x.astype(np.float64).reshape(N, C, -1)
    y = np.empty_like(x)
    mean, rstd = np.empty((N, groups)), np.empty((N, groups))
    cpg = C // groups
    for n in range(N):
        for g in range(groups):
            values = x[n, g * cpg : (g + 1) * cpg].ravel()
            mu = values.sum() / values.size
            var = ((values - mu) ** 2).sum() / values.size
            mean[n, g], rstd[n, g] = mu, 1 / np.sqrt(var + eps)
            y[n, g * cpg : (g + 1) * cpg] = (x[n, g * cpg : (g + 1) * cpg] - mu) * rstd[n, g]
    if weight is not None:
        y = y * weight[:, None] + bias[:, None]
    return y.reshape(shape), mean, rstd


def check_close(actual, expected, dtype):
    for a, e in zip(actual, expected, strict=True):
        if e is None:
            assert a is None
        else:
            assert a.dtype == dtype and a.shape == e.shape
            np.testing.assert_allclose(a, e, **TOL[np.dtype(dtype).type])


@pytest.mark.parametrize("forward", impls("group_norm_forward"))
@settings(deadline=None)
@given(case=gn_cases())
def test_forward_matches_naive_loop(forward, case):
    x, weight, bias, groups, eps, _ = case
    y, mean, rstd = forward(x, weight, bias, groups, eps)
    y_ref, mean_ref, rstd_ref = naive_group_norm(x, weight, bias, groups, eps)
    check_close((y, mean, rstd), (y_ref, mean_ref, rstd_ref), x.dtype)


def numerical_gradients(x, weight, bias, groups, eps, gy, h=1e-6):
    """Central differences of sum(gy * y) with respect to x, weight and bias (float64)."""
    forward = kernels.implementations("group_norm_forward")["reference"]

    def loss():
        return np.sum(gy * forward(x, weight, bias, groups, eps)[0])

    grads = []
    for a in (x, weight, bias):
        if a is None:
            grads.append(None)
            continue
        g = np.empty(a.shape)
        for i in np.ndindex(a.shape):
            saved = a[i]
            a[i] = saved + h
            up = loss()
            a[i] = saved - h
            down = loss()
            a[i] = saved
            g[i] = (up - down) / (2 * h)
        grads.append(g)
    return grads


@pytest.mark.parametrize("backward", impls("group_norm_backward"))
@settings(deadline=None)
@given(case=gn_cases(dtypes=(np.float64,)))
def test_backward_matches_central_differences(backward, case):
    x, weight, bias, groups, eps, gy = case
    if eps < 1e-3:  # rstd up to 1/sqrt(eps): keep the finite-difference error well below the tolerance
        eps = 1e-3
    x, weight, bias = (None if a is None else np.array(a) for a in (x, weight, bias))  # writable copies
    _, mean, rstd = kernels.implementations("group_norm_forward")["reference"](x, weight, bias, groups, eps)
    grads = backward(gy, x, weight, mean, rstd, groups)
    for got, want in zip(grads, numerical_gradients(x, weight, bias, groups, eps, gy), strict=True):
        if want is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


@settings(deadline=None)
@given(case=gn_cases())
def test_reference_matches_torch(case):
    torch = pytest.importorskip("torch")
    x, weight, bias, groups, eps, gy = case
    assume(x.size > x.shape[1])  # torch refuses a single value per channel (it checks N * spatial)
    forward = kernels.implementations("group_norm_forward")["reference"]
    backward = kernels.implementations("group_norm_backward")["reference"]
    y, mean, rstd = forward(x, weight, bias, groups, eps)
    grads = backward(gy, x, weight, mean, rstd, groups)

    def leaf(a):
        return None if a is None else torch.tensor(np.asarray(a, np.float64), requires_grad=True)

    tx, tw, tb = leaf(x), leaf(weight), leaf(bias)
    ty = torch.nn.functional.group_norm(tx, groups, tw, tb, eps)
    ty.backward(torch.from_numpy(np.asarray(gy, np.float64)))
    np.testing.assert_allclose(y, ty.detach().numpy(), **TOL[x.dtype.type])
    for got, t in zip(grads, (tx, tw, tb), strict=True):
        if t is None:
            assert got is None
        else:
            np.testing.assert_allclose(got, t.grad.numpy(), **TOL[x.dtype.type])


@pytest.mark.parametrize("forward", impls("group_norm_forward", names=("numba", "native")))
@settings(deadline=None)
@given(case=gn_cases())
def test_fast_forward_matches_reference(forward, case):
    x, weight, bias, groups, eps, _ = case
    expected = kernels.implementations("group_norm_forward")["reference"](x, weight, bias, groups, eps)
    check_close(forward(x, weight, bias, groups, eps), expected, x.dtype)


@pytest.mark.parametrize("backward", impls("group_norm_backward", names=("numba", "native")))
@settings(deadline=None)
@given(case=gn_cases())
def test_fast_backward_matches_reference(backward, case):
    x, weight, bias, groups, eps, gy = case
    _, mean, rstd = kernels.implementations("group_norm_forward")["reference"](x, weight, bias, groups, eps)
    expected = kernels.implementations("group_norm_backward")["reference"](gy, x, weight, mean, rstd, groups)
    check_close(backward(gy, x, weight, mean, rstd, groups), expected, x.dtype)


@pytest.mark.parametrize("forward", impls("group_norm_silu_forward", names=("numba", "native")))
@settings(deadline=None)
@given(case=gn_cases(), shifted=st.booleans())
def test_fast_group_norm_silu_matches_reference(forward, case, shifted):
    """Forward (y, mean, rstd) and backward (gx, gweight, gbias, gshift) of the fused op, with and
    without the per-(sample, channel) shift, on the same inputs as the plain group norm."""
    name = next(n for n, f in kernels.implementations("group_norm_silu_forward").items() if f is forward)
    backward = kernels.implementations("group_norm_silu_backward")[name]
    x, weight, bias, groups, eps, gy = case
    # a shift moves a group's mean away from 0: float64 only, for the reason gn_cases gives
    shifted = shifted and x.dtype == np.float64
    shift = np.random.default_rng(1).standard_normal(x.shape[:2]).astype(x.dtype) if shifted else None
    ref_forward = kernels.implementations("group_norm_silu_forward")["reference"]
    ref_backward = kernels.implementations("group_norm_silu_backward")["reference"]
    expected = ref_forward(x, weight, bias, shift, groups, eps)
    check_close(forward(x, weight, bias, shift, groups, eps), expected, x.dtype)
    _, mean, rstd = expected
    got = backward(gy, x, weight, bias, shift, mean, rstd, groups)
    check_close(got, ref_backward(gy, x, weight, bias, shift, mean, rstd, groups), x.dtype)


def mean_dwarfs_spread_case():
    """Float32 groups whose mean is ~1e4 (or ~2) times their spread, and u = their group norm in
    float64: the float32 mean is off by up to half an ulp of |mean|, and the normalized values
    must not inherit that error."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 5)) * 1e-3 + np.array([[1000.0], [1000.0], [-2.3], [-2.3]])
    x = x.astype(np.float32)
    weight, bias = rng.standard_normal(4).astype(np.float32), rng.standard_normal(4).astype(np.float32)
    eps = 1e-9
    return x, weight, bias, eps, naive_group_norm(x, weight, bias, 2, eps)[0]


@pytest.mark.parametrize("forward", impls("group_norm_forward"))
def test_float32_forward_when_the_mean_dwarfs_the_spread(forward):
    x, weight, bias, eps, u = mean_dwarfs_spread_case()
    np.testing.assert_allclose(forward(x, weight, bias, 2, eps)[0], u, **TOL[np.float32])


@pytest.mark.parametrize("forward", impls("group_norm_silu_forward"))
def test_float32_silu_forward_when_the_mean_dwarfs_the_spread(forward):
    # without shift: the reference forms x + shift in x's dtype, a rounding of its own
    x, weight, bias, eps, u = mean_dwarfs_spread_case()
    y = forward(x, weight, bias, None, 2, eps)[0]
    np.testing.assert_allclose(y, u / (1 + np.exp(-u)), **TOL[np.float32])


@pytest.mark.parametrize("forward", impls("group_norm_forward"))
def test_forward_rejects_bad_input(forward):
    x = np.zeros((2, 6, 3), np.float32)
    w = np.ones(6, np.float32)
    check_group_norm_forward_rejects(forward, x, w)
    with pytest.raises(TypeError, match="int32"):
        forward(x.astype(np.int32), None, None, 3, 1e-5)
    with pytest.raises(ValueError, match=r"\(N, C, \*spatial\)"):
        forward(x[0, 0], None, None, 1, 1e-5)


@pytest.mark.parametrize("backward", impls("group_norm_backward"))
def test_backward_rejects_bad_input(backward):
    x = np.zeros((2, 6, 3))
    stats = np.ones((2, 3))
    with pytest.raises(ValueError, match=r"mean and rstd must have shape \(2, 3\)"):
        backward(x, x, None, stats[:, :2], stats[:, :2], 3)
    with pytest.raises(ValueError, match="shapes must match"):
        backward(x[:, :, :2], x, None, stats, stats, 3)
    with pytest.raises(TypeError, match="same dtype"):
        backward(x.astype(np.float32), x, None, stats, stats, 3)


@pytest.mark.parametrize("forward", impls("group_norm_silu_forward"))
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_silu_saturates_at_large_activations(forward, dtype):
    """u = xhat * w + b from -400 to 400: SiLU is 0 far below zero and u far above, and every
    value in between (through the exponential's whole range, and beyond it) matches the float64
    formula. The native float32 exp is an approximation with a clamped range: this covers it."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 4, 64)).astype(dtype)
    weight = np.array([1.0, 60.0, 150.0, 1.0], dtype)
    bias = np.array([-120.0, 0.0, 0.0, 90.0], dtype)
    y, mean, rstd = forward(x, weight, bias, None, 4, 1e-5)
    xhat = (x.astype(np.float64) - mean.astype(np.float64)[:, :, None]) * rstd.astype(np.float64)[:, :, None]
    u = xhat * weight[:, None] + bias[:, None]
    with np.errstate(over="ignore"):
        expected = u / (1.0 + np.exp(-u))
    assert np.all(np.isfinite(y))
    np.testing.assert_allclose(y, expected, **TOL[np.dtype(dtype).type])
    assert np.all(y[:, 0] <= 0) and np.all(np.abs(y[:, 0]) < 1e-30)  # u near -120: silu is ~0
