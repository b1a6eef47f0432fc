"""Elementwise ops. Binary ops broadcast like NumPy; ``unbroadcast`` undoes it."""

from __future__ import annotations

from .. import kernels
from ..autograd import Function, unbroadcast
from ..backend import device_of, get_array_module, to_device


class Add(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a + b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(g, self.shapes[1])


class Sub(Function):
    def forward(self, a, b):
        self.shapes = a.shape, b.shape
        return a - b

    def backward(self, g):
        return unbroadcast(g, self.shapes[0]), unbroadcast(-g, self.shapes[1])


class Mul(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g * b, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(g * a, b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Div(Function):
    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        gb_ = g / b
        ga = unbroadcast(gb_, a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(-gb_ * a / b, b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class PowScalar(Function):
    """x ** p for a constant exponent p."""

    def forward(self, x, *, exponent):
        self.save_for_backward(x)
        self.exponent = exponent
        return x**exponent

    def backward(self, g):
        (x,) = self.saved
        p = self.exponent
        return g * p * x ** (p - 1)


class Pow(Function):
    """a ** b with both sides differentiable (d/db uses log a, so a > 0 there)."""

    def forward(self, a, b):
        out = a**b
        self.save_for_backward(a, b, out)
        return out

    def backward(self, g):
        a, b, out = self.saved
        xp = get_array_module(a)
        ga = unbroadcast(g * b * a ** (b - 1), a.shape) if self.needs_input_grad[0] else None
        gb = None
        if self.needs_input_grad[1]:
            gb = unbroadcast(g * out * xp.log(xp.where(a > 0, a, 1)), b.shape)
        return ga, gb


class Neg(Function):
    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


class Exp(Function):
    def forward(self, x):
        y = get_array_module(x).exp(x)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return g * y


class Log(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return get_array_module(x).log(x)

    def backward(self, g):
        (x,) = self.saved
        return g / x


class Sqrt(Function):
    def forward(self, x):
        y = get_array_module(x).sqrt(x)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return g / (2 * y)


class Abs(Function):
    def forward(self, x):
        self.save_for_backward(x)
        return abs(x)

    def backward(self, g):
        (x,) = self.saved
        return g * get_array_module(x).sign(x)


class Tanh(Function):
    def forward(self, x):
        y = get_array_module(x).tanh(x)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return g * (1 - y * y)


def special(xp):
    """scipy.special for NumPy arrays, cupyx.scipy.special for CuPy arrays."""
    if xp.__name__ == "numpy":
        import scipy.special

        return scipy.special
    import cupyx.scipy.special  # pragma: no cover - needs a GPU

    return cupyx.scipy.special  # pragma: no cover


def sigmoid_array(x):
    """1 / (1 + exp(-x)), with SciPy's overflow-free ufunc (expit)."""
    return special(get_array_module(x)).expit(x)


class Sigmoid(Function):
    def forward(self, x):
        y = sigmoid_array(x)
        self.save_for_backward(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return g * y * (1 - y)


class Silu(Function):
    """x * sigmoid(x) as one node: one saved sigmoid instead of a second graph node."""

    def forward(self, x):
        s = sigmoid_array(x)
        self.save_for_backward(x, s)
        return x * s

    def backward(self, g):
        x, s = self.saved
        # d/dx x s(x) = s + x s (1 - s) = s (1 + x (1 - s))
        return g * s * (1 + x * (1 - s))


class Relu(Function):
    def forward(self, x):
        self.save_for_backward(x > 0)
        return get_array_module(x).maximum(x, 0)

    def backward(self, g):
        (positive,) = self.saved
        return g * positive


class Gelu(Function):
    """x * Phi(x) (exact, with erf) or its tanh approximation; see minidiff/kernels/activation.py."""

    def forward(self, x, *, approximate="none"):
        self.approximate = approximate
        self.save_for_backward(x)
        return kernels.gelu_forward(x, approximate)

    def backward(self, g):
        (x,) = self.saved
        return kernels.gelu_backward(g, x, self.approximate)


class Geglu(Function):
    """value * gelu(gate) for h = [value, gate] split along the last axis, in one kernel."""

    def forward(self, h):
        self.save_for_backward(h)
        return kernels.geglu_forward(h)

    def backward(self, g):
        (h,) = self.saved
        return kernels.geglu_backward(g, h)


class Clip(Function):
    """Clamp to [low, high]; the gradient flows only where x was inside."""

    def forward(self, x, *, low, high):
        xp = get_array_module(x)
        inside = xp.ones(x.shape, dtype=bool)
        if low is not None:
            inside &= x >= low
        if high is not None:
            inside &= x <= high
        self.save_for_backward(inside)
        return xp.clip(x, low, high)

    def backward(self, g):
        (inside,) = self.saved
        return g * inside


class MaskedFill(Function):
    """Where ``mask`` is True the output is ``value`` (and gets no gradient)."""

    def forward(self, x, mask, *, value):
        xp = get_array_module(x)
        self.save_for_backward(mask)
        self.shape = x.shape
        return xp.where(mask, xp.asarray(value, dtype=x.dtype), x)

    def backward(self, g):
        (mask,) = self.saved
        xp = get_array_module(g)
        return unbroadcast(xp.where(mask, 0, g), self.shape), None


class Cast(Function):
    def forward(self, x, *, dtype):
        self.dtype = x.dtype
        return x.astype(dtype)

    def backward(self, g):
        return g.astype(self.dtype)


class ToDevice(Function):
    def forward(self, x, *, device):
        self.device = device_of(x)
        return to_device(x, device)

    def backward(self, g):
        return to_device(g, self.device)
