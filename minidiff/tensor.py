"""The Tensor: a graph Variable with Python's operators, and the functions that make one.

Tensor is thin on purpose: arithmetic and methods forward to ``minidiff.functional``, where
each op is defined once (functional works on Variables and never imports this module).
"""

from __future__ import annotations


import numpy as np

from . import functional as F
from .autograd import Variable
from .backend import DEFAULT_DTYPE, Device, as_float_dtype, device_of, is_device_spec, to_device


class Tensor(Variable):
    """An n-dimensional array that can record the ops applied to it.

    Attributes: ``data`` (numpy or cupy ndarray), ``grad`` (ndarray of the same
    shape after ``backward()``, else None), ``requires_grad``. Make one with
    :func:`minidiff.tensor` (a copy), or ``Tensor.from_array(array)`` (no copy).
    The graph half (``backward``, ``detach``, ``shape``, ``device``, ...) is
    :class:`minidiff.autograd.Variable`'s.
    """

    __slots__ = ()
    __array_priority__ = 1000  # numpy scalars/arrays on the left defer to Tensor

    def __init__(self, data, requires_grad=False, dtype=None, device=None):
        t = tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)
        self.data, self.grad, self.requires_grad, self._ctx = t.data, None, t.requires_grad, None

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self):
        extra = f", device='{self.device}'" if self.device.type != "cpu" else ""
        grad = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self.numpy(), separator=", ", prefix="tensor(")
        return f"tensor({body}, dtype={self.dtype}{extra}{grad})"

    # -- conversion ---------------------------------------------------------
    def numpy(self) -> np.ndarray:
        """The data as a NumPy array (copied to the host for CUDA tensors)."""
        return to_device(self.data, "cpu")

    def item(self):
        if self.size != 1:
            raise ValueError(f"item() needs a single-element tensor, got shape {self.shape}")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    def to(self, device=None, dtype=None) -> Tensor:
        """Move to a device and/or convert the dtype (differentiable).

        ``t.to("cuda")``, ``t.to(np.float64)``, ``t.to("cpu", dtype="float64")``.
        """
        if device is not None and not is_device_spec(device):
            device, dtype = None, device  # t.to(np.float64) or t.to("float64")
        out = self
        if dtype is not None and np.dtype(dtype) != self.dtype:
            out = F.cast(out, dtype)
        if device is not None and Device(device) != self.device:
            out = F.to_device(out, device)
        return out

    def float(self) -> Tensor:
        return self.to(np.float32)

    def double(self) -> Tensor:
        return self.to(np.float64)

    def cpu(self) -> Tensor:
        return self.to("cpu")

    def cuda(self) -> Tensor:
        return self.to("cuda")

    # -- operators ----------------------------------------------------------
    def __add__(self, other):
        return F.add(self, other)

    def __radd__(self, other):
        return F.add(other, self)

    def __sub__(self, other):
        return F.sub(self, other)

    def __rsub__(self, other):
        return F.sub(other, self)

    def __mul__(self, other):
        return F.mul(self, other)

    def __rmul__(self, other):
        return F.mul(other, self)

    def __truediv__(self, other):
        return F.div(self, other)

    def __rtruediv__(self, other):
        return F.div(other, self)

    def __pow__(self, exponent):
        return F.pow(self, exponent)

    def __rpow__(self, base):
        return F.pow(base, self)

    def __matmul__(self, other):
        return F.matmul(self, other)

    def __rmatmul__(self, other):
        return F.matmul(other, self)

    def __neg__(self):
        return F.neg(self)

    def __pos__(self):
        return self

    def __getitem__(self, index):
        return F.getitem(self, index)

    # Comparisons give boolean tensors outside the graph.
    def __lt__(self, other):
        return F.compare(self, other, "lt")

    def __le__(self, other):
        return F.compare(self, other, "le")

    def __gt__(self, other):
        return F.compare(self, other, "gt")

    def __ge__(self, other):
        return F.compare(self, other, "ge")

    def __eq__(self, other):
        return F.compare(self, other, "eq")

    def __ne__(self, other):
        return F.compare(self, other, "ne")

    __hash__ = object.__hash__

    def __bool__(self):
        if self.size != 1:
            raise ValueError(
                f"the truth value of a tensor of shape {self.shape} is ambiguous; use .any() or .all()"
            )
        return bool(self.item())

    def any(self) -> bool:
        return bool(self.data.any())

    def all(self) -> bool:
        return bool(self.data.all())

    # -- methods that mirror minidiff.functional ----------------------------
    def sum(self, axis=None, keepdims=False):
        return F.sum(self, axis=axis, keepdims=keepdims)

    def mean(self, axis=None, keepdims=False):
        return F.mean(self, axis=axis, keepdims=keepdims)

    def max(self, axis=None, keepdims=False):
        return F.max(self, axis=axis, keepdims=keepdims)

    def reshape(self, *shape):
        return F.reshape(self, shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape)

    def flatten(self, start_axis=0):
        return F.reshape(self, self.shape[:start_axis] + (-1,))

    def transpose(self, *axes):
        """Reverse the axes (no arguments), swap two axes (``t.transpose(-2, -1)``,
        also for a matrix), or permute all of them (three or more axes)."""
        if len(axes) == 1 and not isinstance(axes[0], int):
            axes = tuple(axes[0])
        if len(axes) == 2:
            a, b = (ax % self.ndim for ax in axes)
            perm = list(range(self.ndim))
            perm[a], perm[b] = perm[b], perm[a]
            axes = tuple(perm)
        return F.permute(self, axes or None)

    def permute(self, *axes):
        return F.permute(self, axes[0] if len(axes) == 1 and not isinstance(axes[0], int) else axes)

    @property
    def T(self):
        return F.permute(self, None)

    def exp(self):
        return F.exp(self)

    def log(self):
        return F.log(self)

    def sqrt(self):
        return F.sqrt(self)

    def tanh(self):
        return F.tanh(self)

    def sigmoid(self):
        return F.sigmoid(self)

    def relu(self):
        return F.relu(self)

    def silu(self):
        return F.silu(self)

    def gelu(self):
        return F.gelu(self)

    def abs(self):
        return F.abs(self)

    def clip(self, low=None, high=None):
        return F.clip(self, low, high)

    def softmax(self, axis=-1):
        return F.softmax(self, axis=axis)

    def log_softmax(self, axis=-1):
        return F.log_softmax(self, axis=axis)

    def matmul(self, other):
        return F.matmul(self, other)


def tensor(data, requires_grad=False, dtype=None, device=None) -> Tensor:
    """Make a Tensor from a list, a number, or a numpy/cupy array (always a copy).

    ``dtype`` defaults to float32, except that integer and boolean arrays keep
    their dtype (they serve as indices). ``device`` defaults to where ``data``
    lives ('cpu' for lists and numbers); 'cuda' needs CuPy and a GPU.
    """
    if isinstance(data, Tensor):
        data = data.data
    if device is None:
        device = device_of(data) if hasattr(data, "__array__") or hasattr(data, "device") else "cpu"
    device = Device(device)
    xp = device.xp
    if dtype is None:
        kind = getattr(getattr(data, "dtype", None), "kind", None)
        dtype = data.dtype if kind in ("i", "u", "b") else DEFAULT_DTYPE
    else:
        dtype = np.dtype(dtype)
        if dtype.kind == "f":
            as_float_dtype(dtype, "tensor()")
    if device_of(data) != device and hasattr(data, "__array__"):
        data = to_device(data, device)
    array = xp.array(data, dtype=dtype, copy=True)
    if requires_grad and array.dtype.kind != "f":
        raise TypeError(f"tensor(): only floating-point tensors can require grad, not {array.dtype}")
    return Tensor.from_array(array, requires_grad=bool(requires_grad))


def as_tensor(value, like: Tensor | None = None) -> Tensor:
    """A Tensor for ``value`` without copying Tensors; numbers and arrays become
    constants with ``like``'s dtype (when floating) and device."""
    if isinstance(value, Tensor):
        return value
    return tensor(value) if like is None else F.constant_like(value, like)


def zeros(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    xp = Device(device).xp
    dtype = np.dtype(dtype or DEFAULT_DTYPE)
    return tensor(xp.zeros(shape, dtype=dtype), requires_grad=requires_grad, dtype=dtype)


def ones(*shape, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    xp = Device(device).xp
    dtype = np.dtype(dtype or DEFAULT_DTYPE)
    return tensor(xp.ones(shape, dtype=dtype), requires_grad=requires_grad, dtype=dtype)


def randn(*shape, generator=None, dtype=None, device="cpu", requires_grad=False) -> Tensor:
    """Standard normal samples; ``generator`` is a numpy (or cupy) Generator or a seed."""
    shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    xp = Device(device).xp
    rng = generator if hasattr(generator, "standard_normal") else xp.random.default_rng(generator)
    dtype = np.dtype(dtype or DEFAULT_DTYPE)
    data = rng.standard_normal(shape, dtype=dtype)
    return tensor(data, requires_grad=requires_grad, dtype=dtype, device=device)
