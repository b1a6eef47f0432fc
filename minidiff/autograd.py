"""Reverse-mode automatic differentiation.

A :class:`Variable` is what the graph needs of a tensor: its array, its gradient, whether it
wants one, and the Function that made it (``minidiff.Tensor`` is a Variable with the
operators). Every differentiable op is a :class:`Function`. Calling ``SomeOp.apply(*tensors)``
runs ``forward`` on the raw arrays and, when a gradient will be needed, remembers the Function
instance on the output (``out._ctx``). That instance knows its inputs, so the tensors and
Functions form a graph. ``backward`` walks the graph from the output in reverse topological
order and asks each Function for the gradients of its inputs. See docs/autodiff.md.

The output of ``apply`` has the class of its inputs, so this module never imports the Tensor
class built on top of it.

Only first-order gradients are supported: ``backward`` works on raw arrays,
so the gradient computation itself is not recorded.
"""

from __future__ import annotations

import threading

from .backend import Device, device_of

_state = threading.local()


def is_grad_enabled() -> bool:
    return getattr(_state, "grad_enabled", True)


class no_grad:
    """Context manager (and decorator): ops inside build no graph.

    >>> with minidiff.no_grad():
    ...     y = model(x)          # y.requires_grad is False
    """

    def __enter__(self):
        self._previous = is_grad_enabled()
        _state.grad_enabled = False
        return self

    def __exit__(self, *exc):
        _state.grad_enabled = self._previous
        return False

    def __call__(self, func):
        def wrapper(*args, **kwargs):
            with no_grad():
                return func(*args, **kwargs)

        wrapper.__name__ = getattr(func, "__name__", "wrapper")
        wrapper.__doc__ = func.__doc__
        return wrapper


class Variable:
    """An array in the graph: ``data`` (numpy or cupy ndarray), ``grad`` (an array of the same
    shape after ``backward()``, else None), ``requires_grad``, and ``_ctx``, the Function that
    made it (None for a leaf). Users make ``minidiff.Tensor``s (:func:`minidiff.tensor`)."""

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "__weakref__")

    @classmethod
    def from_array(cls, data, requires_grad=False):
        """A leaf around an existing array: no copy and no checks (``minidiff.tensor`` copies
        and checks)."""
        t = cls.__new__(cls)
        t.data, t.grad, t.requires_grad, t._ctx = data, None, requires_grad, None
        return t

    @property
    def shape(self) -> tuple:
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def device(self) -> Device:
        return device_of(self.data)

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._ctx is None

    def backward(self, grad=None, retain_graph=False, grad_ready=None):
        """Accumulate d(self)/d(leaf) into ``leaf.grad`` for every leaf that requires grad.

        ``grad`` is the gradient flowing into ``self``; it may be left out only
        when ``self`` holds a single element (a loss). ``grad_ready(leaf)``, when given, is
        called as soon as a leaf's gradient is final, while backward goes on with the
        rest (data-parallel training starts sending it then).
        """
        if not self.requires_grad:
            raise RuntimeError(
                "backward() on a tensor that does not require grad: no input of the ops "
                "that made it has requires_grad=True (or it was made under no_grad())"
            )
        xp = self.device.xp
        if grad is None:
            if self.size != 1:
                raise RuntimeError(
                    f"backward() without a gradient needs a single-element tensor, got shape "
                    f"{self.shape}; pass grad= of that shape, or reduce first (e.g. .sum())"
                )
            grad = xp.ones(self.shape, dtype=self.dtype)
        else:
            grad = grad.data if isinstance(grad, Variable) else grad
            grad = xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(
                    f"backward(): grad has shape {grad.shape} but the tensor has shape {self.shape}"
                )
        run_backward(self, grad, retain_graph=retain_graph, grad_ready=grad_ready)

    def detach(self):
        """The same data, cut from the graph."""
        return type(self).from_array(self.data)

    def requires_grad_(self, flag: bool = True):
        if flag and self.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require grad, not {self.dtype}")
        self.requires_grad = flag
        return self

    def zero_grad(self):
        self.grad = None


class Function:
    """One node of the graph: an op's forward and its backward.

    Subclasses implement ``forward(self, *arrays, **params) -> array`` and
    ``backward(self, grad) -> array | tuple`` (one gradient per positional
    input, ``None`` where there is none). Both work on raw numpy/cupy arrays.
    ``forward`` keeps what ``backward`` needs with ``save_for_backward``.
    """

    def __init__(self):
        self.saved = ()
        self.inputs = ()
        self.needs_input_grad = ()
        self.released = False

    def save_for_backward(self, *arrays):
        self.saved = arrays

    def forward(self, *arrays, **params):  # pragma: no cover - abstract
        raise NotImplementedError

    def backward(self, grad):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def name(self) -> str:
        return type(self).__name__

    def release(self):
        """Drop saved arrays and the links to inputs, so memory can be reused."""
        self.saved = ()
        self.inputs = ()
        self.released = True

    @classmethod
    def apply(cls, *inputs, **params):
        """Run the op on Tensors (or None) and record it in the graph if needed; the output
        has the class of the first input."""
        fn = cls()
        arrays = []
        device = float_dtype = output_type = None
        for x in inputs:
            if x is None:
                arrays.append(None)
                continue
            if not isinstance(x, Variable):
                raise TypeError(f"{fn.name}: expected Tensor inputs, got {type(x).__name__}")
            if device is None:
                device, output_type = x.device, type(x)
            elif x.device != device:
                raise ValueError(
                    f"{fn.name}: inputs are on different devices ({device} and {x.device}); "
                    "move them with .to(device)"
                )
            if x.data.dtype.kind == "f":
                if float_dtype is None:
                    float_dtype = x.data.dtype
                elif x.data.dtype != float_dtype:
                    raise TypeError(
                        f"{fn.name}: inputs have different dtypes ({float_dtype} and "
                        f"{x.data.dtype}); convert one with .to(dtype)"
                    )
            arrays.append(x.data)

        data = fn.forward(*arrays, **params)

        requires_grad = is_grad_enabled() and any(x is not None and x.requires_grad for x in inputs)
        if output_type is None:
            raise TypeError(f"{fn.name}: needs at least one Tensor input")
        out = output_type.from_array(data, requires_grad=requires_grad)
        if requires_grad:
            fn.inputs = inputs
            fn.needs_input_grad = tuple(x is not None and x.requires_grad for x in inputs)
            out._ctx = fn
        return out


def unbroadcast(grad, shape):
    """Sum ``grad`` down to ``shape``: the adjoint of NumPy broadcasting."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    return grad


def topological_order(root):
    """Tensors reachable from ``root`` through recorded Functions, inputs first.

    Iterative depth-first search, so deep graphs do not hit Python's recursion
    limit. A tensor is marked visited when it is expanded, not when it is
    pushed: one reached again on a later path must still be emitted after
    every tensor computed from it (x in ``x * sigmoid(x)``).
    """
    order, visited = [], set()
    stack = [(root, False)]
    while stack:
        node, inputs_done = stack.pop()
        if inputs_done:
            order.append(node)
            continue
        if id(node) in visited:
            continue
        visited.add(id(node))
        stack.append((node, True))
        fn = node._ctx
        if fn is None:
            continue
        if fn.released:
            raise RuntimeError(
                f"backward through {fn.name} a second time: its graph was freed by the first "
                "backward(). Recompute the forward pass, or call backward(retain_graph=True) "
                "the first time."
            )
        for x in fn.inputs:
            if x is not None and x.requires_grad and id(x) not in visited:
                stack.append((x, False))
    return order


def run_backward(root, grad, retain_graph=False, grad_ready=None):
    """Propagate ``grad`` (d root / d root) to every leaf that requires grad.

    With ``grad_ready``, a leaf's gradient is stored, and ``grad_ready(leaf)`` called, as soon
    as the last Function that uses the leaf has run (counted per use), not when the walk
    reaches the leaf: a depth-first order puts the leaves last, after all of the backward
    computation, and a caller that sends gradients away wants the last layers' early."""
    order = topological_order(root)
    uses = {}
    if grad_ready is not None:
        for node in order:
            for x in node._ctx.inputs if node._ctx is not None else ():
                if x is not None and x.requires_grad and x._ctx is None:
                    uses[id(x)] = uses.get(id(x), 0) + 1
    grads = {id(root): grad}

    def store(leaf, g):
        # Copy on first write: g may be shared with other leaves (Add passes
        # the same array to both inputs), and optimizers update .grad in place.
        leaf.grad = g.copy() if leaf.grad is None else leaf.grad + g
        if grad_ready is not None:
            grad_ready(leaf)

    for node in reversed(order):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        fn = node._ctx
        if fn is None:  # a leaf: gradients accumulate across backward calls
            store(node, g)
            continue
        input_grads = fn.backward(g)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        if len(input_grads) != len(fn.inputs):
            raise RuntimeError(
                f"{fn.name}.backward returned {len(input_grads)} gradients for {len(fn.inputs)} inputs"
            )
        for x, gx in zip(fn.inputs, input_grads):
            if x is None or not x.requires_grad:
                continue
            if gx is not None:
                if gx.shape != x.shape:
                    raise RuntimeError(
                        f"{fn.name}.backward returned a gradient of shape {gx.shape} "
                        f"for an input of shape {x.shape}"
                    )
                if device_of(gx) != x.device:  # pragma: no cover - guards op authors
                    raise RuntimeError(f"{fn.name}.backward returned a gradient on another device")
                previous = grads.get(id(x))
                grads[id(x)] = gx if previous is None else previous + gx
            if id(x) in uses:
                uses[id(x)] -= 1
                if uses[id(x)] == 0 and id(x) in grads:  # the leaf's last use: its gradient is final
                    store(x, grads.pop(id(x)))
        if not retain_graph:
            fn.release()
