"""Optimizer kernels (one Adam step, one EMA update, in place): every implementation against the
reference, the reference against the textbook formulas written out here, exactly which arrays
change, non-contiguous gradients, and the arrays they refuse to update."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kernel_params import impls, threads

from minidiff import kernels
from minidiff.kernels import _cpu
from minidiff.nn import Parameter
from minidiff.optim import EMA, Adam, AdamW
from minidiff.testing import tolerance

DTYPES = (np.float32, np.float64)
FAST = ("numba", "native")


def close(actual, expected, dtype):
    assert actual.dtype == dtype
    np.testing.assert_allclose(actual, expected, **tolerance(dtype))


@st.composite
def adam_cases(draw):
    """Parameters, moments from earlier steps, a gradient (maybe a non-contiguous view), the
    hyper-parameters and the step number."""
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    param = np.array(rng.standard_normal(shape), dtype)  # np.array: 0-d arrays, not scalars
    m = np.array(0.1 * rng.standard_normal(shape), dtype)
    v = np.array(0.1 * rng.random(shape), dtype)  # second moments are >= 0
    if draw(st.booleans()):
        grad = np.array(rng.standard_normal(shape[::-1]), dtype).T  # a non-contiguous view
    else:
        grad = np.array(rng.standard_normal(shape), dtype)
    hyper = dict(
        lr=draw(st.sampled_from([1e-3, 0.05])),
        beta1=draw(st.sampled_from([0.0, 0.8, 0.9])),
        beta2=draw(st.sampled_from([0.95, 0.999])),
        eps=draw(st.sampled_from([1e-8, 1e-3])),
        step=draw(st.integers(1, 1000)),
        weight_decay=draw(st.sampled_from([0.0, 0.1])),
        decoupled=draw(st.booleans()),
    )
    return param, grad, m, v, hyper


def adam_args(case):
    param, grad, m, v, h = case
    hyper = (h["lr"], h["beta1"], h["beta2"], h["eps"], h["step"], h["weight_decay"], h["decoupled"])
    return (param, grad, m, v, *hyper)


def copies(case):
    param, grad, m, v, h = case
    return param.copy(), grad, m.copy(), v.copy(), h


@pytest.mark.parametrize("op", ["adam_update", "ema_update"])
def test_every_op_has_a_reference_and_documents_it(op):
    impls_ = kernels.implementations(op)
    assert "reference" in impls_
    assert all(kernels.available()[name][0] for name in impls_)
    assert getattr(kernels, op).__doc__ == impls_["reference"].__doc__


# -- Adam ----------------------------------------------------------------------------------------


@given(adam_cases())
def test_adam_reference_is_the_textbook_step(case):
    """Bias-corrected moments m_hat = m / (1 - beta1^t), v_hat = v / (1 - beta2^t) and
    param -= lr m_hat / (sqrt(v_hat) + eps): the folded form of the kernel is the same number."""
    param, grad, m, v, h = case
    p64, g64, m64, v64 = (a.astype(np.float64) for a in (param, grad, m, v))
    b1, b2, t, lr, wd = h["beta1"], h["beta2"], h["step"], h["lr"], h["weight_decay"]
    if not h["decoupled"]:
        g64 = g64 + wd * p64
    m_new = b1 * m64 + (1 - b1) * g64
    v_new = b2 * v64 + (1 - b2) * g64**2
    if h["decoupled"]:
        p64 = p64 * (1 - lr * wd)
    m_hat, v_hat = m_new / (1 - b1**t), v_new / (1 - b2**t)
    p_new = p64 - lr * m_hat / (np.sqrt(v_hat) + h["eps"])

    param, grad, m, v, _ = work = copies(case)
    assert kernels.implementations("adam_update")["reference"](*adam_args(work)) is None
    close(m, m_new, param.dtype)
    close(v, v_new, param.dtype)
    close(param, p_new, param.dtype)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("impl", impls("adam_update", FAST))
@given(case=adam_cases())
def test_adam_matches_the_reference(impl, parallel, case):
    ours, theirs = copies(case), copies(case)
    with threads(parallel):
        assert impl(*adam_args(ours)) is None
    kernels.implementations("adam_update")["reference"](*adam_args(theirs))
    for a, b in zip(ours[:4], theirs[:4], strict=True):
        close(a, b, b.dtype)


@pytest.mark.parametrize("impl", impls("adam_update"))
def test_adam_updates_exactly_the_given_arrays(impl):
    """param, m, v are written through the caller's views (here rows of bigger buffers); the
    gradient and every other element are left alone."""
    rng = np.random.default_rng(0)
    buffers = [rng.standard_normal((3, 4, 5)) for _ in range(3)]
    before = [b.copy() for b in buffers]
    param, m, v = (b[1] for b in buffers)
    v[...] = np.abs(v)
    grad = rng.standard_normal((5, 4)).T  # any layout for the gradient
    grad_before = grad.copy()
    assert impl(param, grad, m, v, 0.01, 0.9, 0.999, 1e-8, 3, 0.1, True) is None
    for b, old in zip(buffers, before, strict=True):
        np.testing.assert_array_equal(b[0], old[0])
        np.testing.assert_array_equal(b[2], old[2])
        assert not np.array_equal(b[1], old[1])
    np.testing.assert_array_equal(grad, grad_before)


@pytest.mark.parametrize("impl", impls("adam_update"))
def test_adam_refuses_arrays_it_cannot_update_in_place(impl):
    def call(param=None, grad=None, m=None, v=None, step=1):
        arrays = [np.zeros((3, 4)) if a is None else a for a in (param, grad, m, v)]
        impl(*arrays, 0.01, 0.9, 0.999, 1e-8, step)

    transposed = np.zeros((4, 3)).T
    for name in ("param", "m", "v"):
        with pytest.raises(ValueError, match=f"{name} is updated in place, so it must be C-contiguous"):
            call(**{name: transposed})
        read_only = np.zeros((3, 4))
        read_only.flags.writeable = False
        with pytest.raises(ValueError, match=f"{name} is updated in place but is read-only"):
            call(**{name: read_only})
    shared = np.zeros((3, 4))
    with pytest.raises(ValueError, match="distinct"):
        call(m=shared, v=shared)
    with pytest.raises(ValueError, match="shapes must match"):
        call(grad=np.zeros((4, 3)))
    with pytest.raises(TypeError, match="same dtype"):
        call(grad=np.zeros((3, 4), np.float32))
    with pytest.raises(TypeError, match="float32 or float64"):
        call(param=np.zeros((3, 4), np.int64), grad=np.zeros((3, 4), np.int64))
    with pytest.raises(ValueError, match="from 1"):
        call(step=0)


# -- EMA -----------------------------------------------------------------------------------------


@st.composite
def ema_cases(draw):
    shape = tuple(draw(st.lists(st.integers(1, 5), max_size=3)))
    dtype = draw(st.sampled_from(DTYPES))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    shadow = np.array(rng.standard_normal(shape), dtype)
    if draw(st.booleans()):
        param = np.array(rng.standard_normal(shape[::-1]), dtype).T  # a non-contiguous view
    else:
        param = np.array(rng.standard_normal(shape), dtype)
    return shadow, param, draw(st.sampled_from([0.0, 0.1, 0.9, 0.9999, 1.0]))


@given(ema_cases())
def test_ema_reference_is_the_formula(case):
    shadow, param, decay = case
    expected = decay * shadow.astype(np.float64) + (1 - decay) * param.astype(np.float64)
    work = shadow.copy()
    assert kernels.implementations("ema_update")["reference"](work, param, decay) is None
    close(work, expected, shadow.dtype)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("impl", impls("ema_update", FAST))
@given(case=ema_cases())
def test_ema_matches_the_reference(impl, parallel, case):
    shadow, param, decay = case
    ours, theirs = shadow.copy(), shadow.copy()
    with threads(parallel):
        assert impl(ours, param, decay) is None
    kernels.implementations("ema_update")["reference"](theirs, param, decay)
    close(ours, theirs, shadow.dtype)


@pytest.mark.parametrize("impl", impls("ema_update"))
def test_ema_updates_exactly_the_shadow(impl):
    rng = np.random.default_rng(0)
    buffer = rng.standard_normal((3, 6))
    before = buffer.copy()
    param = rng.standard_normal(12)[::2]
    param_before = param.copy()
    impl(buffer[1], param, 0.5)
    np.testing.assert_array_equal(buffer[[0, 2]], before[[0, 2]])
    np.testing.assert_allclose(buffer[1], 0.5 * before[1] + 0.5 * param_before, **tolerance(np.float64))
    np.testing.assert_array_equal(param, param_before)


@pytest.mark.parametrize("impl", impls("ema_update"))
def test_ema_refuses_arrays_it_cannot_update_in_place(impl):
    with pytest.raises(ValueError, match="shadow is updated in place, so it must be C-contiguous"):
        impl(np.zeros((4, 3)).T, np.zeros((3, 4)), 0.9)
    read_only = np.zeros(3)
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        impl(read_only, np.zeros(3), 0.9)
    with pytest.raises(ValueError, match="shapes must match"):
        impl(np.zeros(3), np.zeros(4), 0.9)
    with pytest.raises(TypeError, match="same dtype"):
        impl(np.zeros(3), np.zeros(3, np.float32), 0.9)


# -- the optimizers on top of them ----------------------------------------------------------------


@pytest.mark.parametrize(
    "make", [lambda ps: Adam(ps, lr=0.01, weight_decay=0.1), lambda ps: AdamW(ps, lr=0.01)]
)
def test_adam_updates_a_non_contiguous_parameter_like_a_contiguous_one(make):
    """The kernels take C-contiguous arrays only; Adam updates any other view through a copy."""
    rng = np.random.default_rng(0)
    data = rng.standard_normal((4, 3))
    contiguous = Parameter(data.copy(), dtype="float64")
    transposed = Parameter(data.T.copy(), dtype="float64")
    transposed.data = transposed.data.T  # the same values as a transposed (F-ordered) view
    opts = [make([contiguous]), make([transposed])]
    view = transposed.data
    for _ in range(3):
        g = rng.standard_normal((4, 3))
        contiguous.grad, transposed.grad = g.copy(), g.copy()
        for opt in opts:
            opt.step()
    assert transposed.data is view  # updated in place, not replaced
    np.testing.assert_array_equal(transposed.data, contiguous.data)


def test_adam_takes_gradients_of_another_dtype():
    p = Parameter(np.ones(3), dtype="float32")
    opt = Adam([p], lr=0.1)
    p.grad = np.ones(3)  # float64
    opt.step()
    assert p.dtype == np.float32
    np.testing.assert_allclose(p.numpy(), 0.9, **tolerance(np.float32))


def test_ema_follows_the_parameters_through_the_kernel():
    p = Parameter(np.zeros(4), dtype="float32")
    ema = EMA([p], decay=0.5)
    p.data = np.ones(4, np.float32)
    ema.update()  # warm-up decay 1/10
    np.testing.assert_allclose(ema.shadow[0], 0.9, **tolerance(np.float32))
    assert ema.shadow[0].dtype == np.float32


# -- bit for bit what the optimizers did before the kernels ----------------------------------------


def previous_adam_step(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled):
    """The NumPy statements of Adam.step before it called a kernel."""
    c1, c2 = 1 - beta1**step, 1 - beta2**step
    step_size, eps_hat = lr * np.sqrt(c2) / c1, eps * np.sqrt(c2)
    g = grad + weight_decay * param if weight_decay and not decoupled else grad
    m *= beta1
    m += (1 - beta1) * g
    v *= beta2
    v += (1 - beta2) * (g * g)
    if weight_decay and decoupled:
        param *= 1 - lr * weight_decay
    param -= float(step_size) * m / (np.sqrt(v) + float(eps_hat))


# sizes: one chunk of the Numba drivers, or several with a ragged end
SIZES = pytest.mark.parametrize("n", [1000, 3 * _cpu.CHUNK + 5], ids=["one chunk", "several chunks"])
PARALLEL = pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])


@PARALLEL
@SIZES
@pytest.mark.parametrize("impl", impls("adam_update", ("reference", "numba")))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weight_decay, decoupled", [(0.0, False), (0.1, False), (0.1, True)])
def test_adam_is_bit_for_bit_the_previous_numpy_code(impl, dtype, weight_decay, decoupled, n, parallel):
    """Scalars rounded to the dtype, operations in the same order, no fused multiply-add: a float32
    model trains exactly as before (the native build may contract on some CPUs; it is not here)."""
    rng = np.random.default_rng(0)
    param = rng.standard_normal(n).astype(dtype)
    ours = (param, np.zeros(n, dtype), np.zeros(n, dtype))  # param, m, v
    theirs = tuple(a.copy() for a in ours)
    for step in range(1, 6):
        grad = rng.standard_normal(n).astype(dtype)
        hyper = (0.01, 0.9, 0.999, 1e-8, step, weight_decay, decoupled)
        with threads(parallel):
            impl(ours[0], grad, ours[1], ours[2], *hyper)
        previous_adam_step(theirs[0], grad, theirs[1], theirs[2], *hyper)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_array_equal(a, b)


@PARALLEL
@SIZES
@pytest.mark.parametrize("impl", impls("ema_update", ("reference", "numba")))
@pytest.mark.parametrize("dtype", DTYPES)
def test_ema_is_bit_for_bit_the_previous_numpy_code(impl, dtype, n, parallel):
    rng = np.random.default_rng(0)
    ours = rng.standard_normal(n).astype(dtype)
    theirs = ours.copy()
    for k in range(5):
        param = rng.standard_normal(n).astype(dtype)
        d = min(0.999, (1 + k) / (10 + k))
        with threads(parallel):
            impl(ours, param, d)
        theirs *= d
        theirs += (1 - d) * param
    np.testing.assert_array_equal(ours, theirs)


@pytest.mark.skipif(not kernels.available()["numba"][0], reason="numba is not installed")
def test_a_new_process_finds_the_numba_drivers_in_the_cache(tmp_path):
    """The drivers close over their span: the cache must key them on what a new process sees too."""
    code = (
        "import numpy as np\n"
        "from minidiff.kernels import optim\n"
        "optim.ema_update_numba(np.zeros(8, np.float32), np.ones(8, np.float32), 0.5)\n"
        "stats = optim._EMA.serial.stats\n"
        "print(sum(stats.cache_hits.values()), sum(stats.cache_misses.values()))\n"
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    run = lambda: subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert run() == ["0", "1"]  # compiled, and saved
    assert run() == ["1", "0"]  # loaded, not compiled again
