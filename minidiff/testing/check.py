"""One call that checks an op the way every op test does: its forward value against an independent
reference in each dtype, then its backward with ``gradcheck``.

    check_function(lambda x, w: F.conv2d(x, w, padding=1), [x, w], reference=ref_conv2d)

``inputs`` are NumPy arrays, the floating ones in float64, and anything else the op takes
positionally (``None``, ints, integer arrays such as class labels), which is passed on unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from ..tensor import Tensor, tensor
from .gradcheck import gradcheck
from .tolerances import tolerance

DTYPES = (np.float32, np.float64)


def _is_float_array(value) -> bool:
    return isinstance(value, np.ndarray) and value.dtype.kind == "f"


def check_function(
    fn: Callable,
    inputs: Sequence,
    reference: Callable,
    *,
    dtypes: Sequence = DTYPES,
    grad: bool | Sequence[bool] = True,
) -> None:
    """Check ``fn(*tensors)`` forward and backward; raise AssertionError on the first difference.

    Forward, for each of ``dtypes``: every floating input becomes a Tensor of that dtype (in
    float64 a Tensor that views the array, so a non-contiguous input stays non-contiguous), and
    the output must have that dtype, the reference's shape, and values within ``tolerance(dtype)``
    of ``reference(*arrays)``, where ``arrays`` are the inputs rounded to the dtype, in float64:
    the reference sees the values the op saw.

    Backward: ``gradcheck`` of ``fn`` on float64 leaves that view the inputs. ``grad`` is False
    (no gradient check), True (with respect to every floating input), or one bool per input.
    """
    inputs = list(inputs)
    for i, value in enumerate(inputs):
        if _is_float_array(value) and value.dtype != np.float64:
            raise TypeError(f"check_function: input {i} is {value.dtype}; pass floating inputs in float64")
    wrt = [grad] * len(inputs) if isinstance(grad, bool) else list(grad)
    if len(wrt) != len(inputs):
        raise ValueError(f"check_function: grad has {len(wrt)} entries for {len(inputs)} inputs")

    for dtype in map(np.dtype, dtypes):
        if dtype == np.float64:
            tensors = [Tensor.from_array(a) if _is_float_array(a) else a for a in inputs]
        else:
            tensors = [tensor(a, dtype=dtype) if _is_float_array(a) else a for a in inputs]
        seen = [t.numpy().astype(np.float64) if isinstance(t, Tensor) else t for t in tensors]
        expected = np.asarray(reference(*seen), dtype=np.float64)
        out = fn(*tensors)
        where = f"check_function: forward in {dtype}"
        assert isinstance(out, Tensor), f"{where}: fn returned {type(out).__name__}, not a Tensor"
        assert out.dtype == dtype, f"{where}: the output has dtype {out.dtype}"
        assert out.shape == expected.shape, f"{where}: output shape {out.shape}, reference {expected.shape}"
        np.testing.assert_allclose(out.numpy(), expected, **tolerance(dtype), err_msg=where)

    if any(wrt):
        leaves = [
            Tensor.from_array(a, requires_grad=g) if _is_float_array(a) else a for a, g in zip(inputs, wrt)
        ]
        gradcheck(fn, *leaves)
