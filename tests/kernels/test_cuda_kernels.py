"""The Numba CUDA kernels against their references: every op in float32 and float64, odd sizes,
strides, padding and groups, non-contiguous inputs, the in-place updates, and bad arguments.

Without a GPU these tests run in Numba's CUDA simulator (tests/conftest.py turns it on), on NumPy
arrays, every CUDA thread a Python thread: the shapes are tiny, and most launches use a few
threads per block (``LAUNCHES``) that stride over many elements each, which also runs the loops
that a GPU runs over large inputs. With a GPU (CuPy with a device) the same tests run on CuPy
arrays; the expected values always come from the reference on NumPy arrays.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from kernel_params import check_group_norm_forward_rejects, make_array

from minidiff import kernels
from minidiff.kernels import _cuda, machine
from minidiff.testing import tolerance

CUDA_OK, WHY = kernels.available()["cuda"]
pytestmark = pytest.mark.skipif(not CUDA_OK, reason=WHY)

if CUDA_OK and not machine.simulated():
    xp = pytest.importorskip("cupy", reason="the CUDA kernels take CuPy arrays on a GPU")
else:
    xp = np

OPS = (
    "im2col",
    "col2im",
    "group_norm_forward",
    "group_norm_backward",
    "group_norm_silu_forward",
    "group_norm_silu_backward",
    "softmax_forward",
    "softmax_backward",
    "attention_forward",
    "gelu_forward",
    "gelu_backward",
    "geglu_forward",
    "geglu_backward",
    "q_sample",
    "mse_loss_forward",
    "mse_loss_backward",
    "ddpm_step",
    "ddim_step",
    "adam_update",
    "ema_update",
)
DTYPES = (np.float32, np.float64)
LAYOUTS = ("contiguous", "transposed", "strided")
LAUNCHES = {"few threads": (4, 3), "default": (_cuda.THREADS, _cuda.MAX_BLOCKS)}  # THREADS, MAX_BLOCKS
# group norm and softmax: the tolerances of their CPU kernel tests
TOL = {np.float32: dict(atol=1e-5, rtol=1e-4), np.float64: dict(atol=1e-10, rtol=1e-9)}


@pytest.fixture(scope="module", autouse=True)
def quick_thread_switches():
    """Under the simulator a block's threads are Python threads, and its scheduler polls them,
    holding the GIL for a switch interval (5 ms by default) at a time: switch 50 times as often."""
    if xp is not np or not machine.simulated():
        yield
        return
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)
    try:
        yield
    finally:
        sys.setswitchinterval(interval)


@pytest.fixture(autouse=True)
def launch(request, monkeypatch):
    """Few threads per block unless a test asks for ``launch="default"`` (indirect parametrize)."""
    threads, blocks = LAUNCHES[getattr(request, "param", "few threads")]
    monkeypatch.setattr(_cuda, "THREADS", threads)
    monkeypatch.setattr(_cuda, "MAX_BLOCKS", blocks)


def cuda(op):
    return kernels.implementations(op, device="cuda")["cuda"]


def reference(op):
    return kernels.implementations(op)["reference"]


def on_device(*arrays):
    """Host arrays as device arrays (the arrays themselves under the simulator)."""
    return tuple(a if xp is np else xp.asarray(a) for a in arrays)


def host(a):
    return a if a is None or xp is np else xp.asnumpy(a)


def array(rng, shape, dtype, layout="contiguous", scale=1.0):
    """``(device array, the same values on the host)``, the device one in ``layout``."""
    a = make_array(rng, shape, dtype, layout, scale=scale, xp=xp)
    return a, np.array(host(a))


def check(actual, expected, dtype, tol=None):
    """``actual`` (a device array or None) against ``expected`` (host, or None)."""
    if expected is None:
        assert actual is None
        return
    actual = host(actual)
    assert actual.shape == expected.shape and actual.dtype == dtype
    np.testing.assert_allclose(actual, expected, **(tol or tolerance(dtype)))


def test_every_op_runs_its_cuda_version_on_device_arrays():
    with kernels.use("auto"):
        for op in OPS:
            assert set(kernels.implementations(op, device="cuda")) == {"reference", "cuda"}
            assert kernels.which(op, device="cuda") == "cuda"
            assert kernels.which(op) != "cuda"  # NumPy arrays: a CPU version
            assert cuda(op).__name__ == f"{op}_cuda"


@pytest.mark.skipif(xp is np, reason="NumPy arrays (the simulator's) run the CPU versions")
def test_the_public_functions_keep_device_arrays_on_the_device():
    x, xh = array(np.random.default_rng(0), (1, 2, 4, 4), np.float32)
    with kernels.use("auto"):
        cols = kernels.im2col(x, 3, 3, 1, 1)
    assert type(cols) is type(x)
    np.testing.assert_array_equal(host(cols), reference("im2col")(xh, 3, 3, 1, 1))


# -- conv.py: im2col, col2im ------------------------------------------------------------------

CONV_CASES = [  # x shape, kernel, stride, padding, layout of the input
    ((2, 3, 5, 4), (3, 3), (1, 1), (1, 1), "contiguous"),
    ((1, 2, 7, 5), (2, 3), (2, 1), (0, 2), "transposed"),
    ((2, 1, 3, 3), (1, 1), (3, 2), (2, 0), "strided"),
    ((1, 2, 4, 6), (3, 2), (2, 3), (1, 1), "strided"),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_im2col_is_the_reference(case, dtype):
    shape, (kh, kw), stride, padding, layout = case
    x, x_host = array(np.random.default_rng(0), shape, dtype, layout)
    cols = cuda("im2col")(x, kh, kw, stride, padding)
    assert cols.flags.c_contiguous
    np.testing.assert_array_equal(host(cols), reference("im2col")(x_host, kh, kw, stride, padding))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CONV_CASES, ids=str)
def test_col2im_is_the_reference_to_the_bit(case, dtype):
    """Each pixel adds its entries in the reference's order, in the dtype: the same sums."""
    shape, (kh, kw), stride, padding, layout = case
    N, C, H, W = shape
    Ho = (H + 2 * padding[0] - kh) // stride[0] + 1
    Wo = (W + 2 * padding[1] - kw) // stride[1] + 1
    cols, cols_host = array(np.random.default_rng(1), (N, C * kh * kw, Ho * Wo), dtype, layout)
    x = cuda("col2im")(cols, shape, kh, kw, stride, padding)
    assert x.shape == shape and x.dtype == dtype
    np.testing.assert_array_equal(host(x), reference("col2im")(cols_host, shape, kh, kw, stride, padding))


@pytest.mark.parametrize("launch", ["default"], indirect=True)
def test_conv_with_the_default_launch():
    x, x_host = array(np.random.default_rng(2), (1, 2, 5, 5), np.float32)
    cols = cuda("im2col")(x, 3, 3, 1, 1)
    np.testing.assert_array_equal(host(cols), reference("im2col")(x_host, 3, 3, 1, 1))
    np.testing.assert_array_equal(
        host(cuda("col2im")(cols, x.shape, 3, 3, 1, 1)), reference("col2im")(host(cols), x.shape, 3, 3, 1, 1)
    )


def test_conv_rejects_bad_arguments():
    x = on_device(np.zeros((1, 2, 4, 4), np.float32))[0]
    with pytest.raises(TypeError, match="im2col.*int64"):
        cuda("im2col")(x.astype(np.int64), 3, 3, 1, 0)
    with pytest.raises(ValueError, match=r"im2col.*\(N, C, H, W\)"):
        cuda("im2col")(x[0], 3, 3, 1, 0)
    with pytest.raises(ValueError, match="does not fit"):
        cuda("im2col")(x, 5, 3, 1, 0)
    with pytest.raises(ValueError, match="stride"):
        cuda("im2col")(x, 3, 3, (0, 1), 0)
    cols = on_device(np.zeros((1, 18, 4)))[0]
    with pytest.raises(ValueError, match=r"col2im.*\(1, 8, 4\).*\(1, 18, 4\)"):
        cuda("col2im")(cols, (1, 2, 3, 3), 2, 2, 1, 0)
    with pytest.raises(TypeError, match="col2im"):
        cuda("col2im")(cols[:, :8].astype(np.float16), (1, 2, 3, 3), 2, 2, 1, 0)


# -- activation.py: GELU and GEGLU --------------------------------------------------------------


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gelu_matches_the_reference(dtype, layout, approximate):
    rng = np.random.default_rng(5)
    x, x_host = array(rng, (3, 4, 5), dtype, layout, scale=3.0)
    g, g_host = array(rng, (3, 4, 5), dtype, layout)
    check(cuda("gelu_forward")(x, approximate), reference("gelu_forward")(x_host, approximate), dtype)
    check(
        cuda("gelu_backward")(g, x, approximate),
        reference("gelu_backward")(g_host, x_host, approximate),
        dtype,
    )


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_geglu_matches_the_reference(dtype, layout):
    rng = np.random.default_rng(6)
    h, h_host = array(rng, (2, 3, 6), dtype, layout, scale=3.0)
    g, g_host = array(rng, (2, 3, 3), dtype, layout)
    check(cuda("geglu_forward")(h), reference("geglu_forward")(h_host), dtype)
    check(cuda("geglu_backward")(g, h), reference("geglu_backward")(g_host, h_host), dtype)


def test_activation_kernels_reject_bad_arguments():
    x = on_device(np.zeros((2, 3), np.float32))[0]
    with pytest.raises(TypeError, match="gelu_forward: x has dtype float16"):
        cuda("gelu_forward")(x.astype(np.float16))
    with pytest.raises(ValueError, match="geglu_forward: .*even"):
        cuda("geglu_forward")(x)


# -- norm.py: group norm, and group norm + SiLU with a shift -------------------------------------

GN_CASES = [  # x shape, groups, layout
    ((2, 6, 3, 5), 3, "contiguous"),
    ((1, 4, 7), 2, "transposed"),
    ((3, 6), 6, "strided"),  # no spatial dims: one element per group
    ((2, 4, 2, 3, 2), 1, "contiguous"),
]


def gn_inputs(shape, dtype, layout, affine, seed=0):
    """x (scaled, and shifted in float64: see test_norm_kernels.gn_cases), weight, bias, gy: each a
    (device, host) pair, (None, None) for weight and bias when not ``affine``."""
    rng = np.random.default_rng(seed)
    x = make_array(rng, shape, dtype, layout, scale=3.0, xp=xp)
    if dtype == np.float64:
        x += 2.0  # in place: x stays a view in its layout
    weight = array(rng, shape[1:2], dtype) if affine else (None, None)
    bias = array(rng, shape[1:2], dtype) if affine else (None, None)
    return (x, np.array(host(x))), weight, bias, array(rng, shape, dtype, layout)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GN_CASES, ids=str)
def test_group_norm_forward_matches_the_reference(case, dtype, affine):
    shape, groups, layout = case
    (x, xh), (w, wh), (b, bh), _ = gn_inputs(shape, dtype, layout, affine)
    expected = reference("group_norm_forward")(xh, wh, bh, groups, 1e-5)
    for got, want in zip(cuda("group_norm_forward")(x, w, b, groups, 1e-5), expected, strict=True):
        check(got, want, dtype, TOL[dtype])


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", GN_CASES, ids=str)
def test_group_norm_backward_matches_the_reference(case, dtype, affine):
    shape, groups, layout = case
    (x, xh), (w, wh), (b, bh), (gy, gyh) = gn_inputs(shape, dtype, layout, affine)
    _, mean, rstd = reference("group_norm_forward")(xh, wh, bh, groups, 1e-3)
    expected = reference("group_norm_backward")(gyh, xh, wh, mean, rstd, groups)
    mean_d, rstd_d = on_device(mean, rstd)
    got = cuda("group_norm_backward")(gy, x, w, mean_d, rstd_d, groups)
    for g, want in zip(got, expected, strict=True):
        check(g, want, dtype, TOL[dtype])


SILU_CASES = [((2, 6, 3, 5), 3, "contiguous"), ((1, 4, 7), 2, "strided")]


@pytest.mark.parametrize("shifted", [True, False], ids=["shift", "no-shift"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SILU_CASES, ids=str)
def test_group_norm_silu_matches_the_reference(case, dtype, affine, shifted):
    shape, groups, layout = case
    (x, xh), (w, wh), (b, bh), (gy, gyh) = gn_inputs(shape, dtype, layout, affine, seed=3)
    shift, shift_h = (
        array(np.random.default_rng(4), shape[:2], dtype, "transposed") if shifted else (None, None)
    )
    expected = reference("group_norm_silu_forward")(xh, wh, bh, shift_h, groups, 1e-5)
    got = cuda("group_norm_silu_forward")(x, w, b, shift, groups, 1e-5)
    for g, want in zip(got, expected, strict=True):
        check(g, want, dtype, TOL[dtype])
    _, mean, rstd = expected
    expected = reference("group_norm_silu_backward")(gyh, xh, wh, bh, shift_h, mean, rstd, groups)
    got = cuda("group_norm_silu_backward")(gy, x, w, b, shift, *on_device(mean, rstd), groups)
    assert len(got) == 4
    for g, want in zip(got, expected, strict=True):
        check(g, want, dtype, TOL[dtype])


@pytest.mark.parametrize("launch", ["few threads", "default"], indirect=True)
def test_group_norm_sums_are_the_same_at_every_run(launch):
    """Tree reductions in a fixed order, no atomics: two runs agree to the bit (under the
    simulator the threads of a block really run concurrently, so a missing barrier shows here)."""
    (x, xh), (w, _), (b, _), (gy, _) = gn_inputs((2, 4, 3, 5), np.float32, "contiguous", True, seed=5)
    shift = on_device(np.random.default_rng(6).standard_normal((2, 4)).astype(np.float32))[0]
    _, mean, rstd = cuda("group_norm_silu_forward")(x, w, b, shift, 2, 1e-5)
    first = cuda("group_norm_silu_backward")(gy, x, w, b, shift, mean, rstd, 2)
    second = cuda("group_norm_silu_backward")(gy, x, w, b, shift, mean, rstd, 2)
    for a, c in zip(first, second, strict=True):
        np.testing.assert_array_equal(host(a), host(c))


def test_group_norm_rejects_bad_arguments():
    x, w = on_device(np.zeros((2, 6, 3), np.float32), np.ones(6, np.float32))
    forward, backward = cuda("group_norm_forward"), cuda("group_norm_backward")
    check_group_norm_forward_rejects(forward, x, w)
    stats = on_device(np.ones((2, 3), np.float32))[0]
    with pytest.raises(ValueError, match=r"mean and rstd must have shape \(2, 3\)"):
        backward(x, x, None, stats[:, :2], stats[:, :2], 3)
    with pytest.raises(ValueError, match="shapes must match"):
        backward(x[:, :, :2], x, None, stats, stats, 3)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 6\)"):
        cuda("group_norm_silu_forward")(x, w, w, stats, 3, 1e-5)
    with pytest.raises(ValueError, match=r"shift must have shape \(2, 6\)"):
        cuda("group_norm_silu_backward")(x, x, w, w, stats, stats, stats, 3)


# -- attention.py: softmax ----------------------------------------------------------------------

SOFTMAX_CASES = [  # shape, scale, layout, magnitude of x
    ((3, 7), 1.0, "contiguous", 1.0),
    ((2, 3, 5), -1.3, "transposed", 10.0),
    ((4, 1), 0.5, "strided", 1.0),
    ((9,), 1 / math.sqrt(8), "contiguous", 10.0),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=str)
def test_softmax_matches_the_reference(case, dtype):
    shape, scale, layout, magnitude = case
    rng = np.random.default_rng(7)
    x, xh = array(rng, shape, dtype, layout, scale=magnitude)
    gy, gyh = array(rng, shape, dtype, layout)
    expected = reference("softmax_forward")(xh, -1, scale)
    check(cuda("softmax_forward")(x, -1, scale), expected, dtype, TOL[dtype])
    y = on_device(expected)[0]
    check(
        cuda("softmax_backward")(gy, y, -1, scale),
        reference("softmax_backward")(gyh, expected, -1, scale),
        dtype,
        TOL[dtype],
    )


def test_softmax_over_another_axis_runs_the_reference():
    x, xh = array(np.random.default_rng(8), (3, 4, 5), np.float64, "transposed")
    for axis in (0, 1, -2):
        expected = reference("softmax_forward")(xh, axis, 0.5)
        check(cuda("softmax_forward")(x, axis, 0.5), expected, np.float64, TOL[np.float64])


@pytest.mark.parametrize("launch", ["few threads", "default"], indirect=True)
def test_softmax_of_large_logits_does_not_overflow(launch):
    x = on_device(np.array([[1000.0, 1000.0, -1000.0], [-1e4, 0.0, 1e4]], np.float32))[0]
    np.testing.assert_allclose(host(cuda("softmax_forward")(x)), [[0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    np.testing.assert_allclose(host(cuda("softmax_forward")(x, scale=-1.0)), [[0, 0, 1.0], [1.0, 0, 0]])


def test_softmax_rejects_bad_arguments():
    a, b = on_device(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match="softmax_forward.*int64"):
        cuda("softmax_forward")(a.astype(np.int64))
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        cuda("softmax_forward")(a, axis=2)
    with pytest.raises(ValueError, match="shapes must match"):
        cuda("softmax_backward")(a, b)
    with pytest.raises(TypeError, match="same dtype"):
        cuda("softmax_backward")(a.astype(np.float32), a)


# -- attention.py: attention without the score matrix ------------------------------------------

ATTENTION_CASES = [  # batch, query rows, keys, head width, value width, scale, layout
    (2, 5, 3, 4, 3, 0.5, "contiguous"),
    (1, 9, 37, 6, 5, -0.8, "transposed"),  # more than two tiles of keys, a partial last one
    (3, 1, 16, 3, 2, 2.0, "strided"),  # exactly one tile
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ATTENTION_CASES, ids=str)
def test_attention_forward_matches_the_reference(case, dtype, monkeypatch):
    from minidiff.kernels import attention

    monkeypatch.setattr(attention, "QUERY_ROWS", 4)  # blocks of 4 rows: partial last blocks too
    b, lq, lk, d, dv, scale, layout = case
    rng = np.random.default_rng(11)
    q, qh = array(rng, (b, lq, d), dtype, layout)
    k, kh = array(rng, (b, lk, d), dtype, layout)
    v, vh = array(rng, (b, lk, dv), dtype, layout)
    out, lse = cuda("attention_forward")(q, k, v, scale)
    expected_out, expected_lse = reference("attention_forward")(qh, kh, vh, scale)
    check(out, expected_out, dtype, TOL[dtype])
    check(lse, expected_lse, dtype, TOL[dtype])


def test_attention_forward_wider_than_the_kernel_runs_the_reference(monkeypatch):
    from minidiff.kernels import attention

    monkeypatch.setattr(attention, "CUDA_MAX_DIM", 3)
    rng = np.random.default_rng(12)
    (q, qh), (k, kh), (v, vh) = (array(rng, (1, 2, 4), np.float64) for _ in range(3))
    expected_out, _ = reference("attention_forward")(qh, kh, vh, 0.5)
    check(cuda("attention_forward")(q, k, v, 0.5)[0], expected_out, np.float64, TOL[np.float64])


def test_attention_forward_rejects_bad_arguments():
    a = on_device(np.zeros((2, 3, 4)))[0]
    with pytest.raises(ValueError, match="attention_forward: q, k, v must be 3-D"):
        cuda("attention_forward")(a[0], a, a, 1.0)
    with pytest.raises(TypeError, match="same dtype"):
        cuda("attention_forward")(a.astype(np.float32), a, a, 1.0)


# -- diffusion.py: q_sample, the MSE, the sampler steps -------------------------------------------

ELEMENTWISE_SHAPES = [((3, 2, 5), "contiguous"), ((4,), "strided"), ((2, 3), "transposed")]


def schedule(rng, T):
    abar = np.cumprod(1 - rng.uniform(1e-3, 0.3, size=T))
    return np.sqrt(abar), np.sqrt(1 - abar)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", ELEMENTWISE_SHAPES, ids=str)
def test_q_sample_matches_the_reference(shape, layout, dtype):
    rng = np.random.default_rng(9)
    (x0, x0h), (noise, nh) = array(rng, shape, dtype, layout), array(rng, shape, dtype, layout)
    a, s = schedule(rng, 10)
    t = rng.integers(0, 10, size=shape[0]).astype(np.int32)
    expected = reference("q_sample")(x0h, nh, a, s, t)
    check(cuda("q_sample")(x0, noise, a, s, t), expected, dtype)
    check(cuda("q_sample")(x0, noise, a, s, on_device(t.astype(np.int64))[0]), expected, dtype)


def test_q_sample_rejects_bad_timesteps_and_tables():
    x0 = on_device(np.zeros((3, 2)))[0]
    a, s = schedule(np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 10\), got 0..10"):
        cuda("q_sample")(x0, x0, a, s, np.array([0, 1, 10]))
    with pytest.raises(ValueError, match="t must be 3 integer timesteps"):
        cuda("q_sample")(x0, x0, a, s, np.array([0, 1]))
    with pytest.raises(TypeError, match="float64"):
        cuda("q_sample")(x0, x0, a.astype(np.float32), s, np.array([0, 1, 2]))
    with pytest.raises(TypeError, match="same dtype"):
        cuda("q_sample")(x0, x0.astype(np.float32), a, s, np.array([0, 1, 2]))


MSE_SHAPES = [((), "contiguous"), ((7,), "strided"), ((3, 4, 5), "transposed"), ((1000,), "contiguous")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", MSE_SHAPES, ids=str)
def test_mse_matches_the_reference(shape, layout, dtype):
    rng = np.random.default_rng(10)
    (pred, ph), (target, th) = array(rng, shape, dtype, layout, scale=3.0), array(rng, shape, dtype, layout)
    loss = cuda("mse_loss_forward")(pred, target)
    check(loss, np.asarray(reference("mse_loss_forward")(ph, th)), dtype)
    for gloss in (np.asarray(0.7, dtype), 1.5, on_device(np.array([2.0]))[0]):
        expected = reference("mse_loss_backward")(ph, th, host(gloss))
        check(cuda("mse_loss_backward")(pred, target, gloss), expected, dtype)


@pytest.mark.parametrize("launch", ["few threads", "default"], indirect=True)
def test_mse_sum_is_the_same_at_every_run(launch):
    pred, target = on_device(*np.random.default_rng(11).standard_normal((2, 300)))  # 2 blocks at 256
    first, second = cuda("mse_loss_forward")(pred, target), cuda("mse_loss_forward")(pred, target)
    assert host(first).shape == () and host(first) == host(second)
    np.testing.assert_allclose(host(first), np.mean((host(pred) - host(target)) ** 2), rtol=1e-14)


def test_mse_of_empty_arrays():
    empty = on_device(np.zeros((0, 3), np.float32))[0]
    with pytest.warns(RuntimeWarning):
        loss = cuda("mse_loss_forward")(empty, empty)
    assert host(loss).dtype == np.float32 and np.isnan(host(loss))
    assert cuda("mse_loss_backward")(empty, empty, 1.0).shape == (0, 3)


def test_mse_rejects_bad_arguments():
    a, b = on_device(np.zeros((2, 3)), np.zeros((3, 2)))
    for op, extra in (("mse_loss_forward", ()), ("mse_loss_backward", (1.0,))):
        with pytest.raises(ValueError, match="shapes must match"):
            cuda(op)(a, b, *extra)
        with pytest.raises(TypeError, match="same dtype"):
            cuda(op)(a, a.astype(np.float32), *extra)
    with pytest.raises(ValueError, match="gloss must hold one value"):
        cuda("mse_loss_backward")(a, a, np.ones(2))


@pytest.mark.parametrize("noisy", [True, False], ids=["noise", "no-noise"])
@pytest.mark.parametrize("clip", [False, True], ids=["no-clip", "clip"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, layout", ELEMENTWISE_SHAPES[:2], ids=str)
def test_sampler_steps_match_the_reference(shape, layout, dtype, clip, noisy):
    rng = np.random.default_rng(12)
    (x_t, xh), (eps, eh) = array(rng, shape, dtype, layout), array(rng, shape, dtype, layout)
    x0, x0h = array(rng, shape, dtype, layout, scale=2.0)  # beyond [-1, 1] at times
    noise, nh = array(rng, shape, dtype, layout) if noisy else (None, None)
    c = (0.3, 0.6, 0.1)
    check(
        cuda("ddpm_step")(x_t, x0, noise, *c, clip=clip),
        reference("ddpm_step")(xh, x0h, nh, *c, clip=clip),
        dtype,
    )
    c = (0.7, 0.71, 0.8, 0.5, 0.1)
    expected = reference("ddim_step")(xh, eh, x0h, nh, *c, clip=clip)
    check(cuda("ddim_step")(x_t, eps, x0, noise, *c, clip=clip), expected, dtype)


def test_sampler_steps_keep_nan_through_the_clip():
    zeros, x0 = on_device(np.zeros(4), np.array([np.nan, 3.0, -3.0, 0.5]))
    out = cuda("ddpm_step")(zeros, x0, None, 1.0, 0.0, 0.0, clip=True)
    np.testing.assert_array_equal(host(out), [np.nan, 1.0, -1.0, 0.5])
    out = cuda("ddim_step")(zeros, zeros, x0, None, 1.0, 1.0, 1.0, 0.0, 0.0, clip=True)
    np.testing.assert_array_equal(host(out), [np.nan, 1.0, -1.0, 0.5])


def test_sampler_steps_reject_bad_arguments():
    x = on_device(np.zeros((2, 3)))[0]
    with pytest.raises(ValueError, match="shapes must match"):
        cuda("ddpm_step")(x, x[:, :2], None, 0.5, 0.5, 0.5)
    with pytest.raises(TypeError, match="same dtype"):
        cuda("ddim_step")(x, x, x, x.astype(np.float32), 0.5, 0.5, 0.5, 0.5, 0.5)
    with pytest.raises(TypeError, match="float32 or float64"):
        cuda("ddpm_step")(x.astype(np.int64), x.astype(np.int64), None, 0.5, 0.5, 0.5)


# -- optim.py: Adam and EMA, in place -------------------------------------------------------------


@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_adam_updates_exactly_the_given_arrays_as_the_reference(dtype, weight_decay, decoupled):
    """param, m, v are rows of bigger buffers, written through the views; the gradient (a
    transposed view) and the other rows are left alone."""
    rng = np.random.default_rng(13)
    buffers = [rng.standard_normal((3, 4, 5)).astype(dtype) for _ in range(3)]
    buffers[2] = np.abs(buffers[2]) * 0.1  # second moments are >= 0
    grad_host = rng.standard_normal((5, 4)).astype(dtype).T
    expected = [b[1].copy() for b in buffers]
    hyper = (0.01, 0.9, 0.999, 1e-8, 3, weight_decay, decoupled)
    reference("adam_update")(expected[0], grad_host, expected[1], expected[2], *hyper)

    device_buffers = on_device(*(b.copy() for b in buffers))
    grad = on_device(grad_host.T.copy())[0].T  # a transposed view on the device too
    param, m, v = (b[1] for b in device_buffers)
    assert cuda("adam_update")(param, grad, m, v, *hyper) is None
    for b, before, want in zip(device_buffers, buffers, expected, strict=True):
        b = host(b)
        np.testing.assert_array_equal(b[[0, 2]], before[[0, 2]])
        check(b[1], want, dtype)
        assert not np.array_equal(b[1], before[1])
    np.testing.assert_array_equal(host(grad), grad_host)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_updates_exactly_the_shadow_as_the_reference(dtype):
    rng = np.random.default_rng(14)
    buffer_host = rng.standard_normal((3, 6)).astype(dtype)
    param_host = rng.standard_normal(12).astype(dtype)[::2]  # a strided view
    expected = buffer_host[1].copy()
    reference("ema_update")(expected, param_host, 0.9)
    buffer, param = on_device(buffer_host.copy(), param_host.copy())
    assert cuda("ema_update")(buffer[1], param, 0.9) is None
    np.testing.assert_array_equal(host(buffer)[[0, 2]], buffer_host[[0, 2]])
    check(host(buffer)[1], expected, dtype)
    np.testing.assert_array_equal(host(param), param_host)


def test_optimizer_kernels_refuse_arrays_they_cannot_update_in_place():
    adam, ema = cuda("adam_update"), cuda("ema_update")
    zeros = lambda shape=(3, 4): on_device(np.zeros(shape))[0]  # noqa: E731

    def step(param=None, grad=None, m=None, v=None, step=1):
        param, grad, m, v = (zeros() if a is None else a for a in (param, grad, m, v))
        adam(param, grad, m, v, 0.01, 0.9, 0.999, 1e-8, step)

    for name in ("param", "m", "v"):
        with pytest.raises(ValueError, match=f"{name} is updated in place, so it must be C-contiguous"):
            step(**{name: zeros((4, 3)).T})
    shared = zeros()
    with pytest.raises(ValueError, match="distinct"):
        step(m=shared, v=shared)
    with pytest.raises(ValueError, match="shapes must match"):
        step(grad=zeros((4, 3)))
    with pytest.raises(ValueError, match="from 1"):
        step(step=0)
    with pytest.raises(ValueError, match="shadow is updated in place, so it must be C-contiguous"):
        ema(zeros((4, 3)).T, zeros(), 0.9)
    with pytest.raises(TypeError, match="same dtype"):
        ema(zeros(), zeros().astype(np.float32), 0.9)
    if xp is np:  # CuPy arrays have no read-only flag
        read_only = np.zeros((3, 4))
        read_only.flags.writeable = False
        with pytest.raises(ValueError, match="param is updated in place but is read-only"):
            step(param=read_only)
