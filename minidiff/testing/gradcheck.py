"""The numerical gradient check: backward() against central differences in float64.

Use it on any op you add::

    x = minidiff.tensor(np.random.randn(3, 4), dtype="float64", requires_grad=True)
    assert gradcheck(lambda t: my_op(t), x)
"""

from __future__ import annotations

import numpy as np

from ..autograd import no_grad
from ..tensor import Tensor
from .tolerances import TOLERANCES


class GradcheckError(AssertionError):
    pass


def gradcheck(fn, *inputs, eps=None, atol=None, rtol=None, seed=0, raise_exception=True) -> bool:
    """Compare the gradients of ``fn(*inputs)`` from ``backward()`` with central differences.

    Every input Tensor with ``requires_grad=True`` must be float64 (float32
    differences are too coarse to check anything). The output may have any
    shape: both sides are contracted with the same random cotangent ``v``, so
    the check is of ``v^T J`` over every element of every input. Inputs may be
    non-contiguous views; they are perturbed in place and restored.
    """
    defaults = TOLERANCES["gradcheck"]
    eps = defaults["eps"] if eps is None else eps
    atol = defaults["atol"] if atol is None else atol
    rtol = defaults["rtol"] if rtol is None else rtol
    wrt = [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
    if not wrt:
        raise ValueError("gradcheck: no input has requires_grad=True")
    for x in wrt:
        if x.dtype != np.float64:
            raise TypeError(f"gradcheck: inputs must be float64, got {x.dtype}; use .double()")

    out = fn(*inputs)
    if not isinstance(out, Tensor):
        raise TypeError(f"gradcheck: fn must return a Tensor, got {type(out).__name__}")
    xp = out.device.xp
    v = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))

    kept = [x.grad for x in wrt]  # leave the caller's accumulated gradients as they were
    for x in wrt:
        x.grad = None
    out.backward(v)
    analytic = [x.grad if x.grad is not None else xp.zeros(x.shape) for x in wrt]
    for x, g in zip(wrt, kept):
        x.grad = g

    def projected(values):
        return float((values.data * v).sum())

    for k, (x, grad) in enumerate(zip(wrt, analytic)):
        numeric = xp.zeros(x.shape)
        with no_grad():
            for idx in np.ndindex(*x.shape):
                original = x.data[idx].copy()
                x.data[idx] = original + eps
                plus = projected(fn(*inputs))
                x.data[idx] = original - eps
                minus = projected(fn(*inputs))
                x.data[idx] = original
                numeric[idx] = (plus - minus) / (2 * eps)
        bad = ~xp.isclose(grad, numeric, atol=atol, rtol=rtol)
        if bad.any():
            if not raise_exception:
                return False
            where = tuple(int(i) for i in np.argwhere(bad.get() if hasattr(bad, "get") else bad)[0])
            raise GradcheckError(
                f"gradcheck: input {k} (shape {x.shape}): {int(bad.sum())} of {x.size} gradient "
                f"elements differ; first at {where}: backward {float(grad[where]):.8g}, "
                f"central difference {float(numeric[where]):.8g} (atol={atol}, rtol={rtol})"
            )
    return True
