"""Shared pieces of the kernel tests: the implementations to run, input layouts, the serial and
parallel drivers."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import strategies as st

from minidiff import kernels
from minidiff.kernels import _cpu
from minidiff.testing import tolerance

# The implementations that run NumPy arrays; the CUDA kernels have tests of their own
# (tests/kernels/test_cuda_kernels.py).
CPU_IMPLEMENTATIONS = tuple(name for name in kernels.IMPLEMENTATIONS if name != "cuda")


def impls(op, names=CPU_IMPLEMENTATIONS, device="cpu"):
    """pytest params: the registered implementations of ``op``, the missing ones skipped with why."""
    registered = kernels.implementations(op, device=device)
    params = []
    for name in names:
        ok, why = kernels.available()[name]
        reason = None if name in registered else (why if not ok else f"no {name} version of {op}")
        mark = pytest.mark.skipif(reason is not None, reason=str(reason))
        params.append(pytest.param(registered.get(name), id=name, marks=mark))
    return params


def make_array(rng, shape, dtype, layout, scale=1.0, xp=np):
    """Random array of ``shape``: C-contiguous, a transposed view, or a strided slice. With ``xp``
    another array module (CuPy), the values are drawn on the host and the view taken there."""

    def draw(shape):
        a = (scale * rng.standard_normal(shape)).astype(dtype)
        return a if xp is np else xp.asarray(a)

    if layout == "transposed":
        return draw(shape[::-1]).T
    if layout == "strided" and shape:
        return draw((*shape[:-1], 2 * shape[-1]))[..., ::2]
    return draw(shape)


def implementation(op, name):
    """The ``name`` version of ``op``; the test is skipped where this machine has none."""
    impl = kernels.implementations(op).get(name)
    if impl is None:
        pytest.skip(f"no {name} version of {op} here")
    return impl


@contextlib.contextmanager
def threads(parallel):
    """Force the parallel (every size) or the serial (no size) driver of the fast kernels."""
    saved = _cpu.PARALLEL_MIN
    _cpu.PARALLEL_MIN = 0 if parallel else 1 << 62
    try:
        yield
    finally:
        _cpu.PARALLEL_MIN = saved


def reference(op):
    return kernels.implementations(op)["reference"]


def check_reference_and_doc(op):
    """``op`` has a reference, every version registered for it can run here, and the dispatcher
    carries the reference's docstring."""
    registered = kernels.implementations(op)
    assert "reference" in registered
    assert all(kernels.available()[name][0] for name in registered)
    assert getattr(kernels, op).__doc__ == registered["reference"].__doc__


def close(actual, expected, dtype):
    """Same shape, ``dtype``, and values within the tolerance of the dtype."""
    assert actual.shape == expected.shape
    assert actual.dtype == dtype
    np.testing.assert_allclose(actual, expected, **tolerance(dtype))


@st.composite
def cases(draw, min_dims=1):
    """``(rng, shape, dtype, layout)``: a small batch (N, ...) with 0-3 more dims (float32 or
    float64; C-contiguous, transposed or strided)."""
    rest = tuple(draw(st.lists(st.integers(1, 4), max_size=3)))
    shape = (draw(st.integers(1, 4)), *rest) if min_dims else rest
    dtype = draw(st.sampled_from((np.float32, np.float64)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))), shape, dtype, layout


def check_group_norm_forward_rejects(forward, x, w):
    """The argument errors every version of group_norm_forward raises, given float32 arrays
    x (2, 6, 3) and w (6,) (NumPy, or CuPy for the CUDA version)."""
    with pytest.raises(ValueError, match="groups=4 must divide the C=6"):
        forward(x, w, w, 4, 1e-5)
    with pytest.raises(ValueError, match="both weight and bias"):
        forward(x, w, None, 3, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(6,\)"):
        forward(x, w[:4], w[:4], 3, 1e-5)
    with pytest.raises(TypeError, match="same dtype"):
        forward(x, w.astype(np.float64), w, 3, 1e-5)
