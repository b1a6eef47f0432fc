"""Optimizers (SGD, Adam, AdamW), gradient clipping, learning-rate warm-up, EMA.

Optimizers update ``param.data`` in place from ``param.grad``; their state
(moments, step count) can be saved and restored exactly with
``state_dict()`` / ``load_state_dict()``.
"""

from __future__ import annotations

import math

import numpy as np

from . import kernels
from .backend import get_array_module, to_device


def _check_params(params, where):
    params = list(params)
    if not params:
        raise ValueError(f"{where}: got an empty parameter list")
    for p in params:
        if not getattr(p, "requires_grad", False):
            raise TypeError(f"{where}: every parameter must be a Tensor with requires_grad=True")
    return params


class Optimizer:
    def __init__(self, params, lr):
        if lr <= 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive, got {lr}")
        self.params = _check_params(params, type(self).__name__)
        self.lr = lr
        self.step_count = 0

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "lr": self.lr}

    def load_state_dict(self, state: dict):
        self.step_count = int(state["step_count"])
        self.lr = float(state["lr"])


def _copy_to_host(arrays):
    """Snapshots on the host: state dicts must not change when training goes on."""
    return [np.array(to_device(a, "cpu"), copy=True) if a is not None else None for a in arrays]


def _arrays_like_params(arrays, params, what, where):
    """Host arrays checked against the parameters' shapes, moved to their devices."""
    if len(arrays) != len(params):
        raise ValueError(f"{where}: state has {len(arrays)} {what} for {len(params)} parameters")
    out = []
    for i, (a, p) in enumerate(zip(arrays, params)):
        if a is None:
            out.append(None)
            continue
        a = np.asarray(a)
        if a.shape != p.shape:
            raise ValueError(f"{where}: {what}[{i}] has shape {a.shape}, the parameter has {p.shape}")
        out.append(get_array_module(p.data).array(to_device(a, p.device), dtype=p.dtype))
    return out


def _update_in_place(kernel, target, *args):
    """``kernel(target, *args)`` for a kernel that updates ``target`` in place. The kernels take
    C-contiguous arrays only; a parameter that is some other view is updated through a
    contiguous copy, written back."""
    if target.flags.c_contiguous:
        kernel(target, *args)
        return
    work = get_array_module(target).ascontiguousarray(target)
    kernel(work, *args)
    target[...] = work


class SGD(Optimizer):
    def __init__(self, params, lr, momentum=0.0):
        super().__init__(params, lr)
        if momentum < 0:
            raise ValueError(f"SGD: momentum must be >= 0, got {momentum}")
        self.momentum = momentum
        self.velocity = [None] * len(self.params)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "velocity": _copy_to_host(self.velocity)}

    def load_state_dict(self, state: dict):
        self.velocity = _arrays_like_params(state["velocity"], self.params, "velocity", "SGD.load_state_dict")
        super().load_state_dict(state)

    def step(self):
        self.step_count += 1
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            g = p.grad
            if self.momentum:
                v = self.velocity[i]
                self.velocity[i] = g.copy() if v is None else self.momentum * v + g
                g = self.velocity[i]
            p.data -= self.lr * g


class Adam(Optimizer):
    """Adam (Kingma & Ba), with decoupled weight decay when ``weight_decay`` > 0
    and ``decoupled=True`` (that is AdamW; see :class:`AdamW`)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, decoupled=False):
        super().__init__(params, lr)
        name = type(self).__name__
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"{name}: betas must be in [0, 1), got {betas}")
        if eps < 0:
            raise ValueError(f"{name}: eps must be >= 0, got {eps}")
        if weight_decay < 0:
            raise ValueError(f"{name}: weight_decay must be >= 0, got {weight_decay}")
        self.betas, self.eps = tuple(betas), eps
        self.weight_decay, self.decoupled = weight_decay, decoupled
        # C-contiguous whatever the parameter's layout: the kernels update them in place
        self.m = [get_array_module(p.data).zeros(p.data.shape, p.data.dtype) for p in self.params]
        self.v = [get_array_module(p.data).zeros(p.data.shape, p.data.dtype) for p in self.params]
        # steps taken per parameter: one without a gradient is skipped, moments and all
        self.steps = [0] * len(self.params)

    def step(self):
        """One step for every parameter with a gradient: kernels.adam_update, one fused pass
        per parameter (bias corrections folded into the step size; see minidiff/kernels/optim.py)."""
        self.step_count += 1
        b1, b2 = self.betas
        for i, (p, m, v) in enumerate(zip(self.params, self.m, self.v)):
            if p.grad is None:
                continue
            self.steps[i] += 1
            grad = p.grad if p.grad.dtype == p.data.dtype else p.grad.astype(p.data.dtype)
            _update_in_place(
                kernels.adam_update,
                p.data,
                grad,
                m,
                v,
                self.lr,
                b1,
                b2,
                self.eps,
                self.steps[i],
                self.weight_decay,
                self.decoupled,
            )

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "steps": list(self.steps),
            "m": _copy_to_host(self.m),
            "v": _copy_to_host(self.v),
        }

    def load_state_dict(self, state: dict):
        where = f"{type(self).__name__}.load_state_dict"
        m = _arrays_like_params(state["m"], self.params, "m", where)
        v = _arrays_like_params(state["v"], self.params, "v", where)
        steps = [int(s) for s in state.get("steps", [state["step_count"]] * len(self.params))]
        if len(steps) != len(self.params):
            raise ValueError(f"{where}: state has {len(steps)} step counts for {len(self.params)} parameters")
        self.m, self.v, self.steps = m, v, steps
        super().load_state_dict(state)


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
        super().__init__(params, lr, betas, eps, weight_decay, decoupled=True)


def clip_grad_norm(params, max_norm: float) -> float:
    """Scale all gradients together so their global L2 norm is at most ``max_norm``.
    Returns the norm before clipping."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    total = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads))
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            g *= scale
    return total


def warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from base_lr / warmup_steps to base_lr over ``warmup_steps`` steps."""
    if warmup_steps <= 0:
        return base_lr
    return base_lr * min(1.0, (step + 1) / warmup_steps)


class EMA:
    """Exponential moving average of parameters, with warm-up: the decay used
    at update k is min(decay, (1 + k) / (10 + k)), so early averages are not
    dominated by the random initialization."""

    def __init__(self, params, decay=0.9999):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA: decay must be in [0, 1], got {decay}")
        self.params = list(params)
        self.decay = decay
        self.updates = 0
        self.shadow = [p.data.copy() for p in self.params]

    def update(self):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        self.updates += 1
        for s, p in zip(self.shadow, self.params):
            kernels.ema_update(s, p.data if p.data.dtype == s.dtype else p.data.astype(s.dtype), d)

    def copy_to(self, params):
        for s, p in zip(self.shadow, params):
            p.data = s.copy()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": _copy_to_host(self.shadow)}

    def load_state_dict(self, state: dict):
        self.shadow = _arrays_like_params(state["shadow"], self.params, "averages", "EMA.load_state_dict")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
