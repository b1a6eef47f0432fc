"""Softmax forward/backward and attention without the score matrix: every implementation against
naive formulas, torch, the reference."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_params import impls as _impls
from kernel_params import make_array

from minidiff import kernels

IMPLS = ("reference", "numba", "native")


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


# -- attention_forward / attention_backward ----------------------------------------------------


def naive_attention(q, k, v, scale):
    """The whole (B, Lq, Lk) softmax at once, in float64: (out, lse)."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    s = scale * (q @ k.transpose(0, 2, 1))
    top = s.max(axis=2, keepdims=True)
    e = np.exp(s - top)
    return (e / e.sum(axis=2, keepdims=True)) @ v, (top + np.log(e.sum(axis=2, keepdims=True)))[..., 0]


@st.composite
def attention_cases(draw, max_len=40):
    b, lq, lk = draw(st.integers(1, 3)), draw(st.integers(1, max_len)), draw(st.integers(1, max_len))
    d, dv = draw(st.integers(1, 20)), draw(st.integers(1, 20))
    scale = draw(st.sampled_from([1.0, 1 / math.sqrt(8), -0.7, 3.0]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    q, k = (make_array(rng, (b, length, d), dtype, layout) for length in (lq, lk))
    return q, k, make_array(rng, (b, lk, dv), dtype, layout), scale


ATTENTION_TOL = {np.float32: dict(atol=2e-5, rtol=2e-4), np.float64: dict(atol=1e-12, rtol=1e-10)}


@pytest.mark.parametrize("forward", impls("attention_forward"))
@settings(deadline=None, max_examples=40)
@given(case=attention_cases())
def test_attention_forward_matches_the_whole_softmax(forward, case):
    from minidiff.kernels import attention

    q, k, v, scale = case
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "KEY_TILE", 7)  # several tiles of keys at these sizes
        out, lse = forward(q, k, v, scale)
    expected_out, expected_lse = naive_attention(q, k, v, scale)
    assert out.dtype == lse.dtype == q.dtype and out.shape == expected_out.shape
    np.testing.assert_allclose(out, expected_out, **ATTENTION_TOL[q.dtype.type])
    np.testing.assert_allclose(lse, expected_lse, **ATTENTION_TOL[q.dtype.type])


@pytest.mark.parametrize("forward", impls("attention_forward"))
def test_attention_forward_over_many_tiles_of_queries_and_keys(forward):
    """Past the native kernel's blocks (64 queries, 256 keys) and the reference's 512 keys, with
    partial last blocks and a head width that is no whole number of vectors."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 130, 40)).astype(np.float32)
    k = rng.standard_normal((2, 600, 40)).astype(np.float32)
    v = rng.standard_normal((2, 600, 24)).astype(np.float32)
    out, lse = forward(q, k, v, 0.3)
    expected_out, expected_lse = naive_attention(q, k, v, 0.3)
    np.testing.assert_allclose(out, expected_out, **ATTENTION_TOL[np.float32])
    np.testing.assert_allclose(lse, expected_lse, **ATTENTION_TOL[np.float32])


@pytest.mark.parametrize("forward", impls("attention_forward"))
def test_attention_of_large_scores_does_not_overflow(forward):
    """Scores of 1e4 (exp overflows float64 at 710): the running maximum keeps every exp <= 1."""
    q = np.array([[[100.0], [-100.0]]], np.float32)
    k = np.array([[[100.0], [99.0], [-100.0]]], np.float32)
    v = np.array([[[1.0], [2.0], [3.0]]], np.float32)
    out, lse = forward(q, k, v, 1.0)
    np.testing.assert_allclose(out[0, :, 0], [1.0, 3.0], atol=1e-6)
    np.testing.assert_allclose(lse[0], [1e4, 1e4], rtol=1e-6)


@pytest.mark.parametrize("forward", impls("attention_forward"))
def test_attention_forward_rejects_bad_input(forward):
    a = np.zeros((2, 3, 4), np.float32)
    with pytest.raises(TypeError, match="attention_forward.*int64"):
        forward(a.astype(np.int64), a, a, 1.0)
    with pytest.raises(TypeError, match="same dtype"):
        forward(a, a.astype(np.float64), a, 1.0)
    with pytest.raises(ValueError, match=r"attention_forward: q, k, v must be 3-D"):
        forward(a[0], a, a, 1.0)
    with pytest.raises(ValueError, match=r"expected q \(B, Lq, D\), k \(B, Lk, D\)"):
        forward(a, np.zeros((2, 3, 5), np.float32), a, 1.0)
    with pytest.raises(ValueError, match=r"Lk >= 1"):
        forward(a, a[:, :0], a[:, :0], 1.0)


@settings(deadline=None, max_examples=30)
@given(case=attention_cases(max_len=20))
def test_attention_backward_matches_torch(case):
    torch = pytest.importorskip("torch")
    from minidiff.kernels import attention

    q, k, v, scale = (*(a.astype(np.float64) for a in case[:3]), case[3])
    gout = np.random.default_rng(1).standard_normal(q.shape[:2] + v.shape[2:])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(attention, "KEY_TILE", 5)
        out, lse = kernels.implementations("attention_forward")["reference"](q, k, v, scale)
        grads = kernels.attention_backward(gout, q, k, v, out, lse, scale)
    tq, tk, tv = (torch.tensor(a, requires_grad=True) for a in (q, k, v))
    tout = torch.softmax(scale * tq @ tk.transpose(1, 2), dim=-1) @ tv
    tout.backward(torch.tensor(gout))
    for name, mine, theirs in zip("qkv", grads, (tq.grad, tk.grad, tv.grad)):
        np.testing.assert_allclose(mine, theirs.numpy(), atol=1e-10, rtol=1e-9, err_msg=name)


def test_attention_backward_rejects_mismatched_saved_arrays():
    q = np.zeros((2, 3, 4))
    out, lse = np.zeros((2, 3, 4)), np.zeros((2, 3))
    with pytest.raises(ValueError, match=r"attention_backward: gout and out must be"):
        kernels.attention_backward(np.zeros((2, 3, 5)), q, q, q, out, lse, 1.0)
    with pytest.raises(ValueError, match=r"lse \(B, Lq\)"):
        kernels.attention_backward(out, q, q, q, out, np.zeros((2, 4)), 1.0)


@pytest.mark.skipif(not kernels.available()["native"][0], reason=kernels.available()["native"][1])
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_native_attention_narrower_instruction_sets(isa):
    """The native kernel picks the widest vectors at load time; MINIDIFF_ATTENTION_ISA picks a
    narrower one, run here in a fresh process against the whole softmax."""
    script = (
        "import numpy as np; from minidiff import kernels, _native\n"
        "rng = np.random.default_rng(2)\n"
        "q, k, v = (rng.standard_normal((2, n, 20)).astype(np.float32) for n in (70, 300, 300))\n"
        "out, lse = kernels.implementations('attention_forward')['native'](q, k, v, 0.4)\n"
        "s = 0.4 * q.astype(np.float64) @ k.transpose(0, 2, 1); e = np.exp(s - s.max(2, keepdims=True))\n"
        "np.testing.assert_allclose(out, (e / e.sum(2, keepdims=True)) @ v, atol=2e-5, rtol=2e-4)\n"
        "print(_native.attention_forward_isa)\n"
    )
    env = dict(os.environ, MINIDIFF_ATTENTION_ISA=isa)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] in (isa, "baseline")  # a CPU without AVX2 runs the baseline
