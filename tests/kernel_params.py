"""Shared pieces of the kernel tests: the implementations to run, and input layouts."""

from __future__ import annotations

import pytest

from minidiff import kernels


def impls(op, names=kernels.IMPLEMENTATIONS):
    """pytest params: the registered implementations of ``op``, the missing ones skipped with why."""
    registered = kernels.implementations(op)
    params = []
    for name in names:
        ok, why = kernels.available()[name]
        reason = None if name in registered else (why if not ok else f"no {name} version of {op}")
        mark = pytest.mark.skipif(reason is not None, reason=str(reason))
        params.append(pytest.param(registered.get(name), id=name, marks=mark))
    return params


def make_array(rng, shape, dtype, layout, scale=1.0):
    """Random array of ``shape``: C-contiguous, a transposed view, or a strided slice."""
    if layout == "transposed":
        return (scale * rng.standard_normal(shape[::-1])).astype(dtype).T
    if layout == "strided" and shape:
        return (scale * rng.standard_normal((*shape[:-1], 2 * shape[-1]))).astype(dtype)[..., ::2]
    return (scale * rng.standard_normal(shape)).astype(dtype)
