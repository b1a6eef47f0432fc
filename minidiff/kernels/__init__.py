"""Kernels: plain-array functions behind the ops, each with a reference and faster versions.

Kernels take and return NumPy or CuPy arrays, never Tensors. Each family file (conv.py,
norm.py, attention.py, activation.py, loss.py, diffusion.py, optim.py) holds the reference, Numba
CPU, native and Numba CUDA versions side by side; the functions below dispatch to the one
selected, by the device of the first array (NumPy: a CPU version; CuPy: the CUDA version) and the
user's choice:

    from minidiff import kernels
    kernels.available()            # {"reference": (True, ...), "numba": ..., "native": ..., "cuda": ...}
    kernels.use("numba")           # or "reference", "native", "cuda", "auto" (default; MINIDIFF_KERNELS)
    with kernels.use("reference"):
        cols = kernels.im2col(x, 3, 3, (1, 1), (1, 1))
    kernels.which("im2col")                  # the implementation that runs im2col on NumPy arrays now
    kernels.which("im2col", device="cuda")   # ... and on CuPy arrays
"""

# importing the family files registers their implementations
from . import activation, attention, conv, diffusion, loss, norm, optim  # noqa: F401

# conv.py's dispatchers, and the convolution's forward and backward, which choose the strategy
# (direct kernels, a matrix product for 1x1, or im2col and matrix products)
from .conv import col2im, conv2d, conv2d_backward, conv2d_forward, conv2d_weight_grad, im2col
from .registry import IMPLEMENTATIONS, available, current, dispatcher, implementations, register, use, which

# norm.py
group_norm_forward = dispatcher("group_norm_forward")
group_norm_backward = dispatcher("group_norm_backward")
group_norm_silu_forward = dispatcher("group_norm_silu_forward")
group_norm_silu_backward = dispatcher("group_norm_silu_backward")
layer_norm_forward = dispatcher("layer_norm_forward")
layer_norm_backward = dispatcher("layer_norm_backward")
# attention.py
softmax_forward = dispatcher("softmax_forward")
softmax_backward = dispatcher("softmax_backward")
attention_forward = dispatcher("attention_forward")
attention_backward = dispatcher("attention_backward")
# activation.py
gelu_forward = dispatcher("gelu_forward")
gelu_backward = dispatcher("gelu_backward")
geglu_forward = dispatcher("geglu_forward")
geglu_backward = dispatcher("geglu_backward")
# loss.py
mse_loss_forward = dispatcher("mse_loss_forward")
mse_loss_backward = dispatcher("mse_loss_backward")
# diffusion.py
q_sample = dispatcher("q_sample")
ddpm_step = dispatcher("ddpm_step")
ddim_step = dispatcher("ddim_step")
# optim.py
adam_update = dispatcher("adam_update")
ema_update = dispatcher("ema_update")

__all__ = [
    "IMPLEMENTATIONS",
    "available",
    "current",
    "implementations",
    "register",
    "use",
    "which",
    "im2col",
    "col2im",
    "conv2d",
    "conv2d_weight_grad",
    "conv2d_forward",
    "conv2d_backward",
    "group_norm_forward",
    "group_norm_backward",
    "group_norm_silu_forward",
    "group_norm_silu_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "softmax_forward",
    "softmax_backward",
    "attention_forward",
    "attention_backward",
    "gelu_forward",
    "gelu_backward",
    "geglu_forward",
    "geglu_backward",
    "q_sample",
    "mse_loss_forward",
    "mse_loss_backward",
    "ddpm_step",
    "ddim_step",
    "adam_update",
    "ema_update",
]
