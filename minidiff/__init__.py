"""minidiff: diffusion models and reverse-mode autodiff, from scratch on NumPy and CuPy."""

import os as _os
import signal as _signal
import sys as _sys


def _interrupted_while_loading(signum, frame):
    """Ctrl-C while the ``minidiff`` command is still importing NumPy, Numba and the kernels:
    one line and exit status 130, as later on, not a traceback from inside an import.
    ``cli.main`` puts Python's own handler back before it runs the command."""
    print("minidiff: interrupted", file=_sys.stderr)
    raise SystemExit(130)


if (
    _sys.argv
    and _os.path.basename(_sys.argv[0]) in ("minidiff", "minidiff.exe")
    and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler
):
    try:
        _signal.signal(_signal.SIGINT, _interrupted_while_loading)
    except ValueError:  # imported outside the main thread: leave signals alone
        pass

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
