"""Module and Parameter: named trees of trainable tensors."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from ..backend import as_float_dtype, is_device_spec, to_device
from ..tensor import Tensor


class Parameter(Tensor):
    """A Tensor that a Module trains: ``requires_grad`` is True."""

    __slots__ = ()

    def __init__(self, data, dtype=None, device=None):
        super().__init__(data, requires_grad=True, dtype=dtype, device=device)


class Module:
    """Base class of layers and models.

    Parameters and sub-modules are plain attributes, found by walking
    ``vars(self)``: a module's own parameters first, then each sub-module's in
    assignment order (lists and tuples of modules included), so names are
    stable: ``"down.0.block.conv1.weight"``.
    """

    training = True

    def forward(self, *args, **kwargs):  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} does not define forward()")

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # -- the tree ------------------------------------------------------------
    def named_children(self) -> Iterator[tuple[str, Module]]:
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value
            elif isinstance(value, (list, tuple)):
                for i, item in enumerate(value):
                    if isinstance(item, Module):
                        yield f"{name}.{i}", item

    def named_modules(self, prefix="") -> Iterator[tuple[str, Module]]:
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def modules(self) -> Iterator[Module]:
        for _, m in self.named_modules():
            yield m

    def named_parameters(self, prefix="") -> Iterator[tuple[str, Parameter]]:
        for name, value in vars(self).items():
            if isinstance(value, Parameter):
                yield (f"{prefix}.{name}" if prefix else name), value
        for name, child in self.named_children():
            yield from child.named_parameters(f"{prefix}.{name}" if prefix else name)

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def num_parameters(self) -> int:
        return sum(p.size for p in self.parameters())

    # -- modes and devices -----------------------------------------------------
    def train(self, mode: bool = True) -> Module:
        for m in self.modules():
            m.training = mode
        return self

    def eval(self) -> Module:
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    def to(self, device=None, dtype=None) -> Module:
        """Move (and/or convert) every parameter in place; returns self."""
        if device is not None and not is_device_spec(device):
            device, dtype = None, device  # model.to(np.float64) or model.to("float64")
        if dtype is not None:
            dtype = as_float_dtype(dtype, f"{type(self).__name__}.to")
        for p in self.parameters():
            data = p.data if device is None else to_device(p.data, device)
            p.data = data if dtype is None else data.astype(dtype)
            p.grad = None
        return self

    # -- state ------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Name -> a NumPy copy of every parameter."""
        return {name: p.numpy().copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy arrays into the parameters. Missing, unexpected or mis-shaped
        keys raise a KeyError/ValueError that lists them (``strict=False``
        ignores missing and unexpected ones, never mis-shaped ones)."""
        own = dict(self.named_parameters())
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if strict and (missing or unexpected):
            raise KeyError(
                f"load_state_dict for {type(self).__name__}: missing keys {missing}, "
                f"unexpected keys {unexpected}"
            )
        wrong = [
            f"{k}: expected {own[k].shape}, got {tuple(np.shape(state[k]))}"
            for k in own
            if k in state and tuple(np.shape(state[k])) != own[k].shape
        ]
        if wrong:
            raise ValueError(
                f"load_state_dict for {type(self).__name__}: shape mismatch for " + "; ".join(wrong)
            )
        for k, p in own.items():
            if k in state:
                value = state[k].data if isinstance(state[k], Tensor) else state[k]
                p.data = p.device.xp.array(to_device(value, p.device), dtype=p.dtype)  # a copy

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        children = list(self.named_children())
        if not children:
            return f"{type(self).__name__}({self.extra_repr()})"
        lines = [f"{type(self).__name__}("]
        for name, child in children:
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)
