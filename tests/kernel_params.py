"""Shared pieces of the kernel tests: the implementations to run, and input layouts."""

from __future__ import annotations

import numpy as np
import pytest

from minidiff import kernels

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
