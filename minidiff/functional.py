"""The public functional API.

Each function checks its arguments (so bad input fails here, with the op's
name and the shapes involved, not deep inside NumPy) and then applies one
Function from ``minidiff.ops``, or composes several.

It works on the graph's Variables (``minidiff.Tensor`` is one) and makes new ones only through
``Function.apply`` or with the class of a Tensor argument, so it never imports minidiff.tensor,
which builds on it.
"""

from __future__ import annotations

import math
import numbers
from typing import TYPE_CHECKING

import numpy as np

from .autograd import Variable
from .backend import FLOAT_DTYPES, Device
from .backend import to_device as _move_array
from .ops import attention, conv, elementwise, linalg, loss, norm, reduce, spatial
from .ops import shape as shape_module

if TYPE_CHECKING:
    from .tensor import Tensor

# -- argument checks ----------------------------------------------------------


def constant_like(value, like: Tensor) -> Tensor:
    """A number, list or array as a constant Tensor (no gradient) on ``like``'s device, with
    ``like``'s dtype when both are numeric and ``like`` is floating (booleans stay masks)."""
    if isinstance(value, Variable):
        return value
    if not (isinstance(value, (numbers.Number, list, tuple)) or hasattr(value, "__array__")):
        raise TypeError(f"cannot use a {type(value).__name__} as a tensor")
    array = like.device.xp.asarray(value)
    if like.dtype.kind == "f" and array.dtype.kind in "fiu":
        array = array.astype(like.dtype, copy=False)
    return type(like).from_array(array)


def _result(array, like: Tensor) -> Tensor:
    """An array computed outside the graph (no gradient), as a Tensor of ``like``'s class."""
    return type(like).from_array(array)


def _tensor(x, op, arg) -> Tensor:
    if isinstance(x, Variable):
        return x
    raise TypeError(
        f"{op}: {arg} must be a Tensor, got {type(x).__name__} (make one with minidiff.tensor(...))"
    )


def _float_tensor(x, op, arg) -> Tensor:
    x = _tensor(x, op, arg)
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {arg} has dtype {x.dtype}; expected float32 or float64")
    return x


def _check_ndim(x, ndim, op, arg, layout=""):
    if x.ndim != ndim:
        what = f" {layout}" if layout else ""
        raise ValueError(f"{op}: {arg} must have {ndim} dims{what}, got shape {x.shape}")


def _pair(value, op, arg, minimum):
    pair = (value, value) if isinstance(value, numbers.Integral) else value
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, numbers.Integral) for v in pair)
    ):
        raise TypeError(f"{op}: {arg} must be an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{op}: {arg} must be >= {minimum}, got {value!r}")
    return tuple(int(v) for v in pair)


def _binary_operands(a, b, op):
    """Both operands as Tensors: numbers and arrays take the other side's dtype and device."""
    if isinstance(a, Variable):
        b = constant_like(b, like=a)
    elif isinstance(b, Variable):
        a = constant_like(a, like=b)
    else:
        raise TypeError(
            f"{op}: at least one operand must be a Tensor, got {type(a).__name__} and {type(b).__name__}"
        )
    try:
        np.broadcast_shapes(a.shape, b.shape)
    except ValueError:
        raise ValueError(f"{op}: shapes {a.shape} and {b.shape} do not broadcast") from None
    return a, b


def _axis(axis, ndim, op):
    if not isinstance(axis, numbers.Integral) or not -ndim <= axis < ndim:
        raise ValueError(f"{op}: axis {axis!r} is out of range for a tensor with {ndim} dims")
    return int(axis) % ndim


# -- arithmetic -------------------------------------------------------------------


def add(a, b) -> Tensor:
    return elementwise.Add.apply(*_binary_operands(a, b, "add"))


def sub(a, b) -> Tensor:
    return elementwise.Sub.apply(*_binary_operands(a, b, "sub"))


def mul(a, b) -> Tensor:
    return elementwise.Mul.apply(*_binary_operands(a, b, "mul"))


def div(a, b) -> Tensor:
    return elementwise.Div.apply(*_binary_operands(a, b, "div"))


def pow(base, exponent) -> Tensor:  # noqa: A001 - mirrors the ** operator
    """base ** exponent. A number exponent is a constant; a Tensor one is differentiable."""
    if isinstance(base, Variable) and isinstance(exponent, numbers.Number):
        # a Python number, so NumPy scalars (float64) do not promote float32 data
        exponent = int(exponent) if isinstance(exponent, numbers.Integral) else float(exponent)
        return elementwise.PowScalar.apply(base, exponent=exponent)
    return elementwise.Pow.apply(*_binary_operands(base, exponent, "pow"))


def neg(x) -> Tensor:
    return elementwise.Neg.apply(_tensor(x, "neg", "x"))


_COMPARISONS = {
    "lt": np.less,
    "le": np.less_equal,
    "gt": np.greater,
    "ge": np.greater_equal,
    "eq": np.equal,
    "ne": np.not_equal,
}


def compare(a, b, how: str) -> Tensor:
    """Elementwise comparison ('lt', 'le', 'gt', 'ge', 'eq', 'ne'): a boolean
    tensor outside the graph (comparisons have no gradient)."""
    a, b = _binary_operands(a, b, how)
    if a.device != b.device:
        raise ValueError(f"{how}: inputs are on different devices ({a.device} and {b.device})")
    xp = a.device.xp
    return _result(getattr(xp, _COMPARISONS[how].__name__)(a.data, b.data), a)


def _unary(cls, x, op, **params):
    return cls.apply(_float_tensor(x, op, "x"), **params)


def exp(x) -> Tensor:
    return _unary(elementwise.Exp, x, "exp")


def log(x) -> Tensor:
    return _unary(elementwise.Log, x, "log")


def sqrt(x) -> Tensor:
    return _unary(elementwise.Sqrt, x, "sqrt")


def abs(x) -> Tensor:  # noqa: A001
    return _unary(elementwise.Abs, x, "abs")


def tanh(x) -> Tensor:
    return _unary(elementwise.Tanh, x, "tanh")


def sigmoid(x) -> Tensor:
    return _unary(elementwise.Sigmoid, x, "sigmoid")


def relu(x) -> Tensor:
    return _unary(elementwise.Relu, x, "relu")


def silu(x) -> Tensor:
    """x * sigmoid(x) (also called swish)."""
    return _unary(elementwise.Silu, x, "silu")


def gelu(x, approximate: str = "none") -> Tensor:
    """x * Phi(x); ``approximate="tanh"`` uses the tanh formula."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _unary(elementwise.Gelu, x, "gelu", approximate=approximate)


def geglu(h) -> Tensor:
    """value * gelu(gate), where [value, gate] are the two halves of h's last axis (exact GELU)."""
    h = _float_tensor(h, "geglu", "h")
    if h.ndim == 0 or h.shape[-1] % 2:
        raise ValueError(f"geglu: h's last axis holds [value, gate], so it must be even; got {h.shape}")
    return elementwise.Geglu.apply(h)


def clip(x, low=None, high=None) -> Tensor:
    # Python floats, so NumPy float64 bounds do not promote float32 data
    low = None if low is None else float(low)
    high = None if high is None else float(high)
    if low is not None and high is not None and low > high:
        raise ValueError(f"clip: low ({low}) is greater than high ({high})")
    return _unary(elementwise.Clip, x, "clip", low=low, high=high)


def masked_fill(x, mask, value) -> Tensor:
    """``value`` where the boolean ``mask`` is True, ``x`` elsewhere."""
    x = _float_tensor(x, "masked_fill", "x")
    mask = constant_like(mask, like=x) if not isinstance(mask, Variable) else mask
    if mask.dtype != np.bool_:
        raise TypeError(f"masked_fill: mask must be boolean, got dtype {mask.dtype}")
    try:
        if np.broadcast_shapes(x.shape, mask.shape) != x.shape:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"masked_fill: mask of shape {mask.shape} does not broadcast to x's shape {x.shape}"
        ) from None
    return elementwise.MaskedFill.apply(x, mask, value=value)


def cast(x, dtype) -> Tensor:
    """Convert to float32 or float64 (differentiable)."""
    x = _tensor(x, "cast", "x")
    dtype = np.dtype(dtype)
    if dtype not in FLOAT_DTYPES:
        raise TypeError(f"cast: dtype {dtype} is not supported; use float32 or float64")
    if x.dtype.kind != "f":  # integer data: a plain conversion, nothing to differentiate
        return _result(x.data.astype(dtype), x)
    return elementwise.Cast.apply(x, dtype=dtype)


def to_device(x, device) -> Tensor:
    """Copy to another device (differentiable: the gradient comes back)."""
    x = _tensor(x, "to_device", "x")
    device = Device(device)
    _ = device.xp  # raises a clear error when CUDA is not there
    if x.dtype.kind != "f":
        return _result(_move_array(x.data, device), x)
    return elementwise.ToDevice.apply(x, device=device)


# -- reductions -------------------------------------------------------------------


def sum(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001
    x = _float_tensor(x, "sum", "x")
    return reduce.Sum.apply(x, axes=reduce.normalize_axes(axis, x.ndim, "sum"), keepdims=keepdims)


def mean(x, axis=None, keepdims=False) -> Tensor:
    x = _float_tensor(x, "mean", "x")
    axes = reduce.normalize_axes(axis, x.ndim, "mean")
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"mean: cannot average over an empty axis (shape {x.shape})")
    return reduce.Mean.apply(x, axes=axes, keepdims=keepdims)


def max(x, axis=None, keepdims=False) -> Tensor:  # noqa: A001
    x = _float_tensor(x, "max", "x")
    axes = reduce.normalize_axes(axis, x.ndim, "max")
    if any(x.shape[a] == 0 for a in axes):
        raise ValueError(f"max: cannot take the max over an empty axis (shape {x.shape})")
    return reduce.Max.apply(x, axes=axes, keepdims=keepdims)


# -- shapes -------------------------------------------------------------------------


def reshape(x, shape) -> Tensor:
    x = _tensor(x, "reshape", "x")
    shape = (shape,) if isinstance(shape, numbers.Integral) else tuple(int(n) for n in shape)
    known = math.prod(n for n in shape if n != -1)
    if -1 in shape:
        fits = shape.count(-1) == 1 and known != 0 and x.size % known == 0
    else:
        fits = known == x.size
    if not fits or any(n < -1 for n in shape):
        raise ValueError(f"reshape: cannot reshape a tensor of shape {x.shape} into {shape}")
    return shape_op(shape_module.Reshape, x, shape=shape)


def permute(x, axes=None) -> Tensor:
    """Reorder the axes (``axes=None`` reverses them, like ``x.T``)."""
    x = _tensor(x, "permute", "x")
    axes = tuple(reversed(range(x.ndim))) if axes is None else tuple(int(a) for a in axes)
    if sorted(a % x.ndim if x.ndim else a for a in axes) != list(range(x.ndim)) or any(
        not -x.ndim <= a < x.ndim for a in axes
    ):
        raise ValueError(f"permute: {axes} is not a permutation of the axes of shape {x.shape}")
    return shape_op(shape_module.Permute, x, axes=tuple(a % x.ndim for a in axes))


def transpose(x, *axes) -> Tensor:
    """Like ``Tensor.transpose``: no axes reverses, two axes swap, else a permutation."""
    return _tensor(x, "transpose", "x").transpose(*axes)


def swapaxes(x, axis1, axis2) -> Tensor:
    """Exchange two axes."""
    x = _tensor(x, "swapaxes", "x")
    a, b = _axis(axis1, x.ndim, "swapaxes"), _axis(axis2, x.ndim, "swapaxes")
    axes = list(range(x.ndim))
    axes[a], axes[b] = axes[b], axes[a]
    return shape_op(shape_module.Permute, x, axes=tuple(axes))


def broadcast_to(x, shape) -> Tensor:
    x = _tensor(x, "broadcast_to", "x")
    shape = tuple(shape)
    try:
        if np.broadcast_shapes(x.shape, shape) != shape:
            raise ValueError
    except ValueError:
        raise ValueError(f"broadcast_to: shape {x.shape} does not broadcast to {shape}") from None
    return shape_op(shape_module.BroadcastTo, x, shape=shape)


def shape_op(cls, x, **params):
    """Shape ops work on any dtype; only float tensors can carry gradients."""
    if x.dtype.kind != "f":
        fn = cls()
        return _result(fn.forward(x.data, **params), x)
    return cls.apply(x, **params)


def _index_part(part, x, advanced):
    if isinstance(part, Variable):
        part = part.data
    if isinstance(part, (list, np.ndarray)) or type(part).__module__.startswith("cupy"):
        array = np.asarray(part) if isinstance(part, list) else part
        if array.dtype.kind not in "iub":
            raise IndexError(f"getitem: index arrays must be integer or boolean, got {array.dtype}")
        advanced.append(True)
        return _move_array(array, x.device)
    return part


def getitem(x, index) -> Tensor:
    """x[index]: ints, slices, None, Ellipsis, and integer or boolean arrays."""
    x = _tensor(x, "getitem", "x")
    advanced = []
    parts = index if isinstance(index, tuple) else (index,)
    parts = tuple(_index_part(p, x, advanced) for p in parts)
    index = parts if isinstance(index, tuple) else parts[0]
    try:
        x.data[index]  # validate on the data: NumPy's message, with our context added
    except (IndexError, TypeError) as exc:
        raise IndexError(f"getitem: {exc} (tensor shape {x.shape})") from None
    return shape_op(shape_module.GetItem, x, index=index, advanced=bool(advanced))


def _same_kind(tensors, op):
    if not tensors:
        raise ValueError(f"{op}: needs at least one tensor")
    tensors = [_tensor(t, op, f"tensors[{i}]") for i, t in enumerate(tensors)]
    return tensors


def concat(tensors, axis=0) -> Tensor:
    tensors = _same_kind(tensors, "concat")
    ndim = tensors[0].ndim
    axis = _axis(axis, ndim, "concat")

    def outside(shape):
        return shape[:axis] + shape[axis + 1 :]

    if any(t.ndim != ndim or outside(t.shape) != outside(tensors[0].shape) for t in tensors):
        shapes = [t.shape for t in tensors]
        raise ValueError(f"concat: shapes {shapes} differ outside axis {axis}")
    return shape_module.Concat.apply(*tensors, axis=axis)


def stack(tensors, axis=0) -> Tensor:
    tensors = _same_kind(tensors, "stack")
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"stack: all tensors need the same shape, got {[t.shape for t in tensors]}")
    axis = _axis(axis, tensors[0].ndim + 1, "stack")
    return shape_module.Stack.apply(*tensors, axis=axis)


def pad(x, pad_width, value=0.0) -> Tensor:
    """Constant padding, ``pad_width`` as in ``numpy.pad``: an int, one
    (before, after) pair for every axis, or a pair per axis."""
    x = _float_tensor(x, "pad", "x")
    if x.ndim == 0:  # nothing to pad, as in numpy.pad
        return x
    widths = np.asarray(pad_width)
    if widths.dtype.kind not in "iu":
        raise TypeError(f"pad: pad_width must be integers, got {pad_width!r}")
    try:
        widths = np.broadcast_to(widths, (x.ndim, 2))
    except ValueError:
        raise ValueError(f"pad: pad_width {pad_width!r} does not fit a tensor of shape {x.shape}") from None
    if (widths < 0).any():
        raise ValueError(f"pad: padding must be non-negative, got {pad_width!r}")
    pad_width = tuple((int(b), int(a)) for b, a in widths)
    return shape_module.Pad.apply(x, pad_width=pad_width, value=value)


# -- linear algebra -------------------------------------------------------------------


def matmul(a, b) -> Tensor:
    """Matrix product with NumPy's rules: batch dims broadcast, 1-D operands
    are promoted to matrices and the added axis is removed again."""
    if isinstance(a, Variable) != isinstance(b, Variable):  # an array operand follows the Tensor's dtype
        a, b = (a, constant_like(b, like=a)) if isinstance(a, Variable) else (constant_like(a, like=b), b)
    a, b = _float_tensor(a, "matmul", "a"), _float_tensor(b, "matmul", "b")
    if a.ndim == 0 or b.ndim == 0:
        raise ValueError(f"matmul: operands must have at least 1 dim, got {a.shape} and {b.shape}")
    a2 = reshape(a, (1, a.shape[0])) if a.ndim == 1 else a
    b2 = reshape(b, (b.shape[0], 1)) if b.ndim == 1 else b
    try:
        if a2.shape[-1] != b2.shape[-2]:
            raise ValueError
        np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    except ValueError:
        raise ValueError(f"matmul: shapes {a.shape} and {b.shape} are not aligned") from None
    out = linalg.MatMul.apply(a2, b2)
    if a.ndim == 1:
        out = reshape(out, out.shape[:-2] + out.shape[-1:])
    if b.ndim == 1:
        out = reshape(out, out.shape[:-1])
    return out


def linear(x, weight, bias=None) -> Tensor:
    """x @ weight.T + bias, with weight of shape (out_features, in_features)."""
    x = _float_tensor(x, "linear", "x")
    weight = _float_tensor(constant_like(weight, like=x), "linear", "weight")
    _check_ndim(weight, 2, "linear", "weight", "(out_features, in_features)")
    if x.ndim == 0 or x.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear: x has shape {x.shape} but weight {weight.shape} expects "
            f"{weight.shape[1]} input features in the last axis"
        )
    if bias is not None:
        bias = _float_tensor(constant_like(bias, like=x), "linear", "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"linear: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    return linalg.Linear.apply(x, weight, bias)


# -- convolution and resampling -----------------------------------------------------


def conv2d(x, weight, bias=None, stride=1, padding=0) -> Tensor:
    """2-D cross-correlation: x (N, C, H, W), weight (O, C, kH, kW), bias (O,)."""
    op = "conv2d"
    x = _float_tensor(x, op, "x")
    weight = _float_tensor(weight, op, "weight")
    _check_ndim(x, 4, op, "x", "(N, C, H, W)")
    _check_ndim(weight, 4, op, "weight", "(O, C, kH, kW)")
    if x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: x has {x.shape[1]} channels (shape {x.shape}) but weight expects "
            f"{weight.shape[1]} (shape {weight.shape})"
        )
    if bias is not None:
        bias = _float_tensor(bias, op, "bias")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{op}: bias must have shape ({weight.shape[0]},), got {bias.shape}")
    stride = _pair(stride, op, "stride", 1)
    padding = _pair(padding, op, "padding", 0)
    for size, k, p, name in zip(x.shape[2:], weight.shape[2:], padding, ("height", "width")):
        if size + 2 * p < k:
            raise ValueError(
                f"{op}: kernel {weight.shape[2:]} is larger than the padded input "
                f"{x.shape[2:]} + 2*{padding} ({name})"
            )
    return conv.Conv2d.apply(x, weight, bias, stride=stride, padding=padding)


def upsample_nearest2d(x, scale_factor=2) -> Tensor:
    x = _float_tensor(x, "upsample_nearest2d", "x")
    _check_ndim(x, 4, "upsample_nearest2d", "x", "(N, C, H, W)")
    if not isinstance(scale_factor, numbers.Integral) or scale_factor < 1:
        raise ValueError(f"upsample_nearest2d: scale_factor must be a positive int, got {scale_factor!r}")
    return spatial.UpsampleNearest2d.apply(x, scale=int(scale_factor))


def _pool_args(op, x, kernel_size, stride, padding):
    x = _float_tensor(x, op, "x")
    _check_ndim(x, 4, op, "x", "(N, C, H, W)")
    kernel = _pair(kernel_size, op, "kernel_size", 1)
    stride = kernel if stride is None else _pair(stride, op, "stride", 1)
    padding = _pair(padding, op, "padding", 0)
    if any(p > k // 2 for p, k in zip(padding, kernel)):
        raise ValueError(f"{op}: padding {padding} must be at most half the kernel {kernel}")
    if any(s + 2 * p < k for s, p, k in zip(x.shape[2:], padding, kernel)):
        raise ValueError(f"{op}: kernel {kernel} is larger than the padded input {x.shape[2:]}")
    return x, kernel, stride, padding


def avg_pool2d(x, kernel_size, stride=None, padding=0, count_include_pad=True) -> Tensor:
    """Mean over windows (stride defaults to the kernel); ``count_include_pad=False`` divides each
    window by the input pixels it covers instead of counting the zero padding."""
    x, kernel, stride, padding = _pool_args("avg_pool2d", x, kernel_size, stride, padding)
    return spatial.AvgPool2d.apply(
        x, kernel=kernel, stride=stride, padding=padding, count_include_pad=bool(count_include_pad)
    )


def max_pool2d(x, kernel_size, stride=None, padding=0) -> Tensor:
    """Maximum over windows (stride defaults to the kernel); the padding never wins."""
    x, kernel, stride, padding = _pool_args("max_pool2d", x, kernel_size, stride, padding)
    return spatial.MaxPool2d.apply(x, kernel=kernel, stride=stride, padding=padding)


def resize_bilinear(x, size) -> Tensor:
    """Resize (N, C, H, W) images to ``size`` (an int or (height, width)) by bilinear
    interpolation with PyTorch's ``interpolate(mode="bilinear", align_corners=False)`` pixel
    centres, without antialiasing."""
    op = "resize_bilinear"
    x = _float_tensor(x, op, "x")
    _check_ndim(x, 4, op, "x", "(N, C, H, W)")
    size = _pair(size, op, "size", 1)
    return spatial.ResizeBilinear.apply(x, size=size)


# -- normalization --------------------------------------------------------------------


def _affine(param, name, shape, op):
    if param is None:
        return None
    param = _float_tensor(param, op, name)
    if param.shape != shape:
        raise ValueError(f"{op}: {name} must have shape {shape}, got {param.shape}")
    return param


def _group_norm_args(op, x, num_groups, weight, bias):
    """Checked (x, weight, bias) for the group norm ops; both affine parameters or neither."""
    x = _float_tensor(x, op, "x")
    if x.ndim < 2:
        raise ValueError(f"{op}: x must have at least 2 dims (N, C, ...), got shape {x.shape}")
    channels = x.shape[1]
    if not isinstance(num_groups, numbers.Integral) or num_groups < 1 or channels % num_groups:
        raise ValueError(
            f"{op}: num_groups={num_groups!r} must be a positive divisor of the "
            f"{channels} channels of x (shape {x.shape})"
        )
    weight = _affine(weight, "weight", (channels,), op)
    bias = _affine(bias, "bias", (channels,), op)
    # the kernels take both or neither
    if bias is not None and weight is None:
        weight = constant_like(np.ones(channels), like=x)
    if weight is not None and bias is None:
        bias = constant_like(np.zeros(channels), like=x)
    return x, weight, bias


def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5) -> Tensor:
    """Normalize (N, C, *spatial) over groups of C // num_groups channels."""
    x, weight, bias = _group_norm_args("group_norm", x, num_groups, weight, bias)
    return norm.GroupNorm.apply(x, weight, bias, groups=int(num_groups), eps=float(eps))


def group_norm_silu(x, num_groups, weight=None, bias=None, eps=1e-5, shift=None) -> Tensor:
    """``silu(group_norm(x + shift))`` as one fused op. ``shift`` (N, C), optional, is added
    to every position of each (sample, channel) first: the U-Net's time-embedding projection."""
    op = "group_norm_silu"
    x, weight, bias = _group_norm_args(op, x, num_groups, weight, bias)
    if shift is not None:
        shift = _float_tensor(shift, op, "shift")
        if shift.shape != x.shape[:2]:
            raise ValueError(f"{op}: shift must have shape {x.shape[:2]} (N, C), got {shift.shape}")
    return norm.GroupNormSiLU.apply(x, weight, bias, shift, groups=int(num_groups), eps=float(eps))


def layer_norm(x, normalized_shape, weight=None, bias=None, eps=1e-5) -> Tensor:
    """Normalize over the trailing axes given by ``normalized_shape``."""
    op = "layer_norm"
    x = _float_tensor(x, op, "x")
    normalized_shape = (
        (int(normalized_shape),)
        if isinstance(normalized_shape, numbers.Integral)
        else tuple(normalized_shape)
    )
    k = len(normalized_shape)
    if k == 0 or x.shape[x.ndim - k :] != normalized_shape:
        raise ValueError(f"{op}: normalized_shape {normalized_shape} does not end x's shape {x.shape}")
    weight = _affine(weight, "weight", normalized_shape, op)
    bias = _affine(bias, "bias", normalized_shape, op)
    axes = tuple(range(x.ndim - k, x.ndim))
    return norm.LayerNorm.apply(x, weight, bias, axes=axes, eps=float(eps))


# -- softmax and attention ------------------------------------------------------------


def softmax(x, axis=-1) -> Tensor:
    x = _float_tensor(x, "softmax", "x")
    return attention.Softmax.apply(x, axis=_axis(axis, x.ndim, "softmax"), scale=1.0)


def log_softmax(x, axis=-1) -> Tensor:
    x = _float_tensor(x, "log_softmax", "x")
    return attention.LogSoftmax.apply(x, axis=_axis(axis, x.ndim, "log_softmax"))


def scaled_dot_product_attention(q, k, v, mask=None, scale=None) -> Tensor:
    """softmax(q @ k^T * scale) @ v, with scale = 1/sqrt(head dim) by default.

    q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv). ``mask`` is boolean (True
    = may attend) or additive (float, added to the scaled scores); it
    broadcasts to (..., Lq, Lk).
    """
    op = "scaled_dot_product_attention"
    q, k, v = (_float_tensor(t, op, n) for t, n in ((q, "q"), (k, "k"), (v, "v")))
    if q.ndim < 2 or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(
            f"{op}: q, k, v need the same number (>= 2) of dims, got {q.shape}, {k.shape}, {v.shape}"
        )
    if q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
        raise ValueError(
            f"{op}: expected q (..., Lq, D), k (..., Lk, D), v (..., Lk, Dv); got "
            f"{q.shape}, {k.shape}, {v.shape}"
        )
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    if mask is None and q.shape[:-2] == k.shape[:-2] == v.shape[:-2] and k.shape[-2] > 0:
        return attention.Attention.apply(q, k, v, scale=scale)  # never forms the (..., Lq, Lk) scores
    scores = matmul(q, swapaxes(k, -2, -1))
    last = scores.ndim - 1
    if mask is None:  # leading dims that broadcast
        return matmul(attention.Softmax.apply(scores, axis=last, scale=scale), v)
    mask = constant_like(mask, like=scores)
    if mask.dtype == np.bool_ and scale > 0:
        # -inf stays -inf under a positive scale, so the scale can stay fused in the softmax
        scores = masked_fill(scores, _result(~mask.data, scores), -np.inf)
        return matmul(attention.Softmax.apply(scores, axis=last, scale=scale), v)
    scores = scores * scale
    if mask.dtype == np.bool_:
        scores = masked_fill(scores, _result(~mask.data, scores), -np.inf)
    else:
        scores = add(scores, mask)
    return matmul(attention.Softmax.apply(scores, axis=last, scale=1.0), v)


# -- regularization and lookup ---------------------------------------------------------


def dropout(x, p=0.5, training=True, generator=None) -> Tensor:
    """Zero each element with probability p and scale the rest by 1/(1-p).

    ``generator`` is a numpy Generator, or a seed, so runs repeat.
    """
    x = _float_tensor(x, "dropout", "x")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return x * 0.0
    rng = generator if hasattr(generator, "random") else np.random.default_rng(generator)
    keep = _move_array(rng.random(x.shape) >= p, x.device)  # same mask on every device
    return x * _result((keep / (1.0 - p)).astype(x.dtype), x)


def embedding(indices, weight) -> Tensor:
    """Rows of ``weight`` (num_embeddings, dim) picked by integer ``indices``."""
    weight = _float_tensor(weight, "embedding", "weight")
    _check_ndim(weight, 2, "embedding", "weight", "(num_embeddings, dim)")
    idx = indices.data if isinstance(indices, Variable) else np.asarray(indices)
    if idx.dtype.kind not in "iu":
        raise TypeError(f"embedding: indices must be integers, got dtype {idx.dtype}")
    if idx.size and (int(idx.min()) < 0 or int(idx.max()) >= weight.shape[0]):
        raise IndexError(
            f"embedding: indices must lie in [0, {weight.shape[0]}), got values from "
            f"{int(idx.min())} to {int(idx.max())}"
        )
    return getitem(weight, _result(idx, weight))


# -- losses --------------------------------------------------------------------------------

_REDUCTIONS = ("mean", "sum", "none")


def _reduce(loss, reduction, op):
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be one of {_REDUCTIONS}, got {reduction!r}")


def mse_loss(input, target, reduction="mean") -> Tensor:  # noqa: A002
    """Mean squared error; input and target must have the same shape."""
    input = _float_tensor(input, "mse_loss", "input")
    target = (
        _float_tensor(target, "mse_loss", "target")
        if isinstance(target, Variable)
        else constant_like(target, like=input)
    )
    if input.shape != target.shape:
        raise ValueError(f"mse_loss: input {input.shape} and target {target.shape} differ in shape")
    if reduction == "mean" and input.dtype == target.dtype:
        # one fused kernel pass each way instead of three temporaries (the same function)
        return loss.MSELoss.apply(input, target)
    diff = input - target
    return _reduce(diff * diff, reduction, "mse_loss")


def cross_entropy(logits, target, reduction="mean") -> Tensor:
    """Negative log-likelihood of integer class ``target`` (N,) under ``logits`` (N, C)."""
    op = "cross_entropy"
    logits = _float_tensor(logits, op, "logits")
    _check_ndim(logits, 2, op, "logits", "(N, C)")
    labels = target.data if isinstance(target, Variable) else np.asarray(target)
    if labels.dtype.kind not in "iu":
        raise TypeError(f"{op}: target must hold integer class indices, got dtype {labels.dtype}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"{op}: target must have shape ({logits.shape[0]},), got {labels.shape}")
    n, classes = logits.shape
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise IndexError(f"{op}: target classes must lie in [0, {classes})")
    labels = _move_array(labels, logits.device)
    rows = logits.device.xp.arange(n)
    picked = getitem(log_softmax(logits, axis=1), (rows, labels))
    return _reduce(-picked, reduction, op)
