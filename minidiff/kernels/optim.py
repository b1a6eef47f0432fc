"""Optimizer kernels: one Adam step and one EMA update of a parameter array, in place.

Adam (Kingma & Ba) with the bias corrections folded into the step size (the paper's
Algorithm 1 footnote); ``step`` counts this parameter's steps, this one included (1, 2, ...):

    g      = grad + weight_decay param               (only without ``decoupled``: an L2 penalty)
    m      = beta1 m + (1 - beta1) g
    v      = beta2 v + (1 - beta2) g^2
    param  = param (1 - lr weight_decay)               (only with ``decoupled``: AdamW)
    param  = param - step_size m / (sqrt(v) + eps_hat)

    step_size = lr sqrt(1 - beta2^step) / (1 - beta1^step),   eps_hat = eps sqrt(1 - beta2^step)

EMA: ``shadow = decay shadow + (1 - decay) param``.

Rounding: the scalars (beta1, 1 - beta1, step_size, ...) are computed in Python floats, rounded
to the arrays' dtype, and every operation is then done in that dtype in the order written above,
as the NumPy statements ``m *= beta1; m += (1 - beta1) * g; ...`` did; the fast versions round
the same way, so a float32 model trains the same under every implementation.

Layout: the arrays updated in place (param, m, v; shadow) must be C-contiguous, writable and
distinct, of one shape and float dtype; grad (and EMA's param) may have any layout. The kernels
return None.

Three implementations: the reference (``xp`` code), Numba CPU and Numba CUDA for CuPy arrays
(grid-stride loops over the elements, in place). The CUDA kernels take the scalars in the
arrays' dtype too, but the CUDA compiler contracts products and sums into fused multiply-adds,
so they agree with the reference to about one rounding of the dtype rather than to the bit.
The per-element math of Adam and EMA is written once and compiled for both Numba targets.
There is no native one: an optimizer step calls the kernel once per parameter array, mostly
small ones, where a pybind11 call costs more than a Numba one; and GCC vectorizes the square root
only with -fno-math-errno, which the build does not set.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from minidiff.backend import get_array_module

from . import _cpu, _cuda
from ._checks import FLOAT_DTYPES, check_arrays, flat
from .machine import cuda, njit
from .registry import register


def _check_in_place(fn, names, *arrays):
    """The arrays a kernel writes (named ``names``): C-contiguous, writable, all distinct."""
    for name, a in zip(names, arrays):
        flags = a.flags
        if not flags.c_contiguous:
            raise ValueError(
                f"{fn}: {name} is updated in place, so it must be C-contiguous; got shape {a.shape} "
                f"with strides {a.strides} (update a contiguous copy, then copy it back)"
            )
        if not getattr(flags, "writeable", True):  # CuPy arrays have no such flag
            raise ValueError(f"{fn}: {name} is updated in place but is read-only")
    if len(arrays) > 1 and len({id(a) for a in arrays}) != len(arrays):
        raise ValueError(f"{fn}: {', '.join(names)} must be distinct arrays")


def _fast_checks_pass(target, source, *state):
    """The common case in a few comparisons (every optimizer step calls a kernel per parameter):
    NumPy arrays of one float dtype and shape, target and state C-contiguous, writable and
    distinct. False sends the caller to the full checks, which say what is wrong."""
    if type(target) is not np.ndarray:
        return False
    dtype, shape, flags = target.dtype, target.shape, target.flags
    if not (dtype in FLOAT_DTYPES and flags.c_contiguous and flags.writeable):
        return False
    if source.dtype != dtype or source.shape != shape:
        return False
    for a in state:
        flags = a.flags
        if a.dtype != dtype or a.shape != shape or not (flags.c_contiguous and flags.writeable):
            return False
    return len(state) < 2 or (state[0] is not state[1] and target is not state[0] and target is not state[1])


def _adam_scalars(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled):
    """Check the arrays; return the scalars of one step (see the module doc) as Python floats,
    ``(beta1, 1 - beta1, beta2, 1 - beta2, step_size, eps_hat, l2, shrink)``, and the flags
    ``use_l2``, ``use_shrink`` (an L2 term or a decoupled decay to apply)."""
    fn = "adam_update"
    if not _fast_checks_pass(param, grad, m, v):
        check_arrays(fn, ("param", "grad", "m", "v"), param, grad, m, v)
        _check_in_place(fn, ("param", "m", "v"), param, m, v)
    step = operator.index(step)
    if step < 1:
        raise ValueError(f"{fn}: step counts this parameter's steps from 1, got {step}")
    c2 = 1.0 - beta2**step
    use_l2 = bool(weight_decay) and not decoupled
    use_shrink = bool(weight_decay) and bool(decoupled)
    scalars = (
        float(beta1),
        float(1 - beta1),
        float(beta2),
        float(1 - beta2),
        float(lr * math.sqrt(c2) / (1 - beta1**step)),
        float(eps * math.sqrt(c2)),
        float(weight_decay) if use_l2 else 0.0,
        float(1 - lr * weight_decay) if use_shrink else 1.0,
    )
    return scalars, use_l2, use_shrink


def _check_ema(shadow, param, decay):
    """Check the arrays; return ``(decay, 1 - decay)`` as Python floats."""
    if not _fast_checks_pass(shadow, param):
        check_arrays("ema_update", ("shadow", "param"), shadow, param)
        _check_in_place("ema_update", ("shadow",), shadow)
    decay = float(decay)
    return decay, 1 - decay


# -- reference -------------------------------------------------------------------------------


@register("adam_update", "reference")
def adam_update_reference(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0, decoupled=False):
    """One Adam step, in place on param, m and v (see the module doc); returns None."""
    scalars, use_l2, use_shrink = _adam_scalars(
        param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled
    )
    # Python floats meet the arrays as NumPy's "weak" scalars: rounded to the arrays' dtype
    b1, omb1, b2, omb2, step_size, eps_hat, l2, shrink = scalars
    xp = get_array_module(param)
    g = grad + l2 * param if use_l2 else grad
    m *= b1
    m += omb1 * g
    v *= b2
    v += omb2 * (g * g)
    if use_shrink:
        param *= shrink
    param -= step_size * m / (xp.sqrt(v) + eps_hat)


@register("ema_update", "reference")
def ema_update_reference(shadow, param, decay):
    """``shadow = decay shadow + (1 - decay) param``, in place on shadow; returns None."""
    d, omd = _check_ema(shadow, param, decay)  # Python floats: rounded to shadow's dtype
    shadow *= d
    shadow += omd * param


# -- one element of each update, compiled for the CPU and for CUDA ---------------------------
#
# Plain functions of numbers in the arrays' dtype (sc: the scalars of the update, rounded to it),
# compiled as inlined Numba CPU functions (the spans below) and as CUDA device functions (the
# kernels of the last section).


def _adam(p, g, m, v, sc, use_l2, use_shrink):
    """``(param, m, v)`` after one step of the element."""
    b1, omb1, b2, omb2, step_size, eps_hat, l2, shrink = sc
    if use_l2:
        g = g + l2 * p
    m = m * b1 + omb1 * g
    v = v * b2 + omb2 * (g * g)
    if use_shrink:
        p = p * shrink
    # math.sqrt keeps float32 under Numba (on both targets)
    return p - (step_size * m) / (math.sqrt(v) + eps_hat), m, v


def _ema(shadow, param, d, omd):
    return shadow * d + omd * param


_adam_cpu, _adam_device = njit(inline="always")(_adam), cuda.jit(device=True)(_adam)
_ema_cpu, _ema_device = njit(inline="always")(_ema), cuda.jit(device=True)(_ema)


# -- Numba CPU: span functions over elements lo..hi, run by the drivers of _cpu.py -----------


def _adam_span(
    lo, hi, param, grad, m, v, b1, omb1, b2, omb2, step_size, eps_hat, l2, shrink, use_l2, use_shrink
):
    param, grad, m, v = param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi]
    f = param.dtype.type  # the scalars, Python floats, rounded to the arrays' dtype
    sc = (f(b1), f(omb1), f(b2), f(omb2), f(step_size), f(eps_hat), f(l2), f(shrink))
    for i in range(param.size):
        param[i], m[i], v[i] = _adam_cpu(param[i], grad[i], m[i], v[i], sc, use_l2, use_shrink)


def _ema_span(lo, hi, shadow, param, decay, one_minus_decay):
    shadow, param = shadow[lo:hi], param[lo:hi]
    f = shadow.dtype.type
    d, omd = f(decay), f(one_minus_decay)
    for i in range(shadow.size):
        shadow[i] = _ema_cpu(shadow[i], param[i], d, omd)


_ADAM = _cpu.drivers(_adam_span)
_EMA = _cpu.drivers(_ema_span)


@register("adam_update", "numba")
def adam_update_numba(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0, decoupled=False):
    scalars, use_l2, use_shrink = _adam_scalars(
        param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled
    )
    # ravel() of a C-contiguous array is a view: the kernel writes into the caller's arrays
    _ADAM.pick(param.size)(
        param.size, param.ravel(), flat(grad), m.ravel(), v.ravel(), *scalars, use_l2, use_shrink
    )


@register("ema_update", "numba")
def ema_update_numba(shadow, param, decay):
    scalars = _check_ema(shadow, param, decay)
    _EMA.pick(shadow.size)(shadow.size, shadow.ravel(), flat(param), *scalars)


# -- Numba CUDA ------------------------------------------------------------------------------


@cuda.jit(cache=True)
def _adam_cuda(param, grad, m, v, b1, omb1, b2, omb2, step_size, eps_hat, l2, shrink, use_l2, use_shrink):
    # grid-stride loop over the elements, updating param, m and v in place
    sc = (b1, omb1, b2, omb2, step_size, eps_hat, l2, shrink)
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        param[i], m[i], v[i] = _adam_device(param[i], grad[i], m[i], v[i], sc, use_l2, use_shrink)


@cuda.jit(cache=True)
def _ema_cuda(shadow, param, d, omd):
    # grid-stride loop over the elements, updating shadow in place
    for i in range(cuda.grid(1), shadow.size, cuda.gridsize(1)):
        shadow[i] = _ema_device(shadow[i], param[i], d, omd)


@register("adam_update", "cuda")
def adam_update_cuda(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0, decoupled=False):
    scalars, use_l2, use_shrink = _adam_scalars(
        param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled
    )
    scalars = _cuda.device_scalars(param.dtype, *scalars)
    # ravel() of a C-contiguous array is a view: the kernel writes into the caller's arrays
    args = (param.ravel(), flat(grad), m.ravel(), v.ravel(), *scalars, use_l2, use_shrink)
    _cuda.launch_elementwise(_adam_cuda, param.size, *args)


@register("ema_update", "cuda")
def ema_update_cuda(shadow, param, decay):
    scalars = _cuda.device_scalars(shadow.dtype, *_check_ema(shadow, param, decay))
    _cuda.launch_elementwise(_ema_cuda, shadow.size, shadow.ravel(), flat(param), *scalars)
