"""Matrix products."""

from __future__ import annotations

from ..autograd import Function, unbroadcast


def _swap_last(a):
    return a.swapaxes(-1, -2)


class MatMul(Function):
    """a @ b for a.ndim, b.ndim >= 2, batch dimensions broadcasting like NumPy.

    (1-D operands are handled in ``functional.matmul`` by reshaping.)
    """

    def forward(self, a, b):
        self.save_for_backward(a, b)
        return a @ b

    def backward(self, g):
        a, b = self.saved
        ga = unbroadcast(g @ _swap_last(b), a.shape) if self.needs_input_grad[0] else None
        gb = unbroadcast(_swap_last(a) @ g, b.shape) if self.needs_input_grad[1] else None
        return ga, gb


class Linear(Function):
    """y = x @ weight.T + bias over the last axis of x (any leading dims).

    One GEMM per direction over the flattened leading dims, rather than a
    batched matmul and a broadcast add.
    """

    def forward(self, x, weight, bias):
        self.save_for_backward(x, weight)
        self.has_bias = bias is not None
        # A 3-D x @ 2-D weight would be NumPy's stacked matmul, which leaves BLAS for a plain
        # loop on some strides; the flattened product is one GEMM.
        y = (x.reshape(-1, x.shape[-1]) @ weight.T).reshape(*x.shape[:-1], weight.shape[0])
        if bias is not None:
            y += bias
        return y

    def backward(self, g):
        x, weight = self.saved
        g2 = g.reshape(-1, g.shape[-1])
        gx = (g2 @ weight).reshape(*g.shape[:-1], weight.shape[1]) if self.needs_input_grad[0] else None
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_input_grad[1] else None
        gb = g2.sum(axis=0) if self.has_bias and self.needs_input_grad[2] else None
        return gx, gw, gb
