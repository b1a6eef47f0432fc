"""minidiff: diffusion models and reverse-mode autodiff, from scratch on NumPy and CuPy."""

# runtime first: it sets variables that libraries read when they load (OpenBLAS, with NumPy)
from . import runtime  # isort: skip
from . import diffusion, functional, models, nn, optim
from .autograd import Function, is_grad_enabled, no_grad
from .backend import Device, cuda_available
from .tensor import Tensor, ones, randn, tensor, zeros

runtime.apply()

__version__ = "0.1.0"

__all__ = [
    "Device",
    "Function",
    "Tensor",
    "cuda_available",
    "diffusion",
    "functional",
    "is_grad_enabled",
    "models",
    "nn",
    "no_grad",
    "optim",
    "ones",
    "randn",
    "tensor",
    "zeros",
]
