"""Losses fused into one kernel pass each way (see minidiff/kernels/loss.py)."""

from __future__ import annotations

from .. import kernels
from ..autograd import Function


class MSELoss(Function):
    """``mean((pred - target)^2)`` over every element, as one op: the forward reads both arrays
    once (summing in float64) and the backward writes ``2 (pred - target) g / size`` in one pass,
    where the composite ``mean(diff * diff)`` makes three temporaries each way."""

    def forward(self, pred, target):
        self.save_for_backward(pred, target)
        return kernels.mse_loss_forward(pred, target)

    def backward(self, g):
        pred, target = self.saved
        gpred = kernels.mse_loss_backward(pred, target, g)
        return gpred, (-gpred if self.needs_input_grad[1] else None)
