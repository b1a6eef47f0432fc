"""Reverse-mode automatic differentiation.

Every differentiable op is a :class:`Function`. Calling ``SomeOp.apply(*tensors)``
runs ``forward`` on the raw arrays and, when a gradient will be needed,
remembers the Function instance on the output tensor (``out._ctx``). That
instance knows its inputs, so the tensors and Functions form a graph.
``backward`` walks the graph from the output in reverse topological order and
asks each Function for the gradients of its inputs. See docs/autodiff.md.

Only first-order gradients are supported: ``backward`` works on raw arrays,
so the gradient computation itself is not recorded.
"""

from __future__ import annotations

import threading

from .backend import device_of

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
        """Run the op on Tensors (or None) and record it in the graph if needed."""
        from .tensor import Tensor

        fn = cls()
        arrays = []
        device = float_dtype = None
        for x in inputs:
            if x is None:
                arrays.append(None)
                continue
            if not isinstance(x, Tensor):
                raise TypeError(f"{fn.name}: expected Tensor inputs, got {type(x).__name__}")
            if device is None:
                device = x.device
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
        out = Tensor._wrap(data, requires_grad=requires_grad)
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


def run_backward(root, grad, retain_graph=False):
    """Propagate ``grad`` (d root / d root) to every leaf that requires grad."""
    grads = {id(root): grad}
    for node in reversed(topological_order(root)):
        g = grads.pop(id(node), None)
        if g is None:
            continue
        fn = node._ctx
        if fn is None:  # a leaf: gradients accumulate across backward calls
            # Copy on first write: g may be shared with other leaves (Add passes
            # the same array to both inputs), and optimizers update .grad in place.
            node.grad = g.copy() if node.grad is None else node.grad + g
            continue
        input_grads = fn.backward(g)
        if not isinstance(input_grads, tuple):
            input_grads = (input_grads,)
        if len(input_grads) != len(fn.inputs):
            raise RuntimeError(
                f"{fn.name}.backward returned {len(input_grads)} gradients for {len(fn.inputs)} inputs"
            )
        for x, gx in zip(fn.inputs, input_grads):
            if gx is None or x is None or not x.requires_grad:
                continue
            if gx.shape != x.shape:
                raise RuntimeError(
                    f"{fn.name}.backward returned a gradient of shape {gx.shape} "
                    f"for an input of shape {x.shape}"
                )
            if device_of(gx) != x.device:  # pragma: no cover - guards op authors
                raise RuntimeError(f"{fn.name}.backward returned a gradient on another device")
            previous = grads.get(id(x))
            grads[id(x)] = gx if previous is None else previous + gx
        if not retain_graph:
            fn.release()
