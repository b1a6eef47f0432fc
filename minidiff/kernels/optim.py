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
There is no native one: an optimizer step calls the kernel once per parameter array, mostly
small ones, where a pybind11 call costs more than a Numba one; and GCC vectorizes the square root
only with -fno-math-errno, which the build does not set, so a C++ Adam ran at half the speed of
the Numba one.
"""

from __future__ import annotations

import math
import operator

import numpy as np

from minidiff.backend import get_array_module

from . import _cuda, diffusion
from ._checks import FLOAT_DTYPES
from .diffusion import CHUNK, _check_arrays, _flat, _rounded
from .machine import cuda, njit, prange
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
        _check_arrays(fn, ("param", "grad", "m", "v"), param, grad, m, v)
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
        _check_arrays("ema_update", ("shadow", "param"), shadow, param)
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


# -- Numba CPU (the drivers as in diffusion.py: spans over slices, serial or prange) ---------


@njit(cache=True, error_model="numpy")
def _adam_span(param, grad, m, v, sc, use_l2, use_shrink):
    # sc = (beta1, 1 - beta1, beta2, 1 - beta2, step_size, eps_hat, l2, shrink) in the dtype
    b1, omb1, b2, omb2 = sc[0], sc[1], sc[2], sc[3]
    step_size, eps_hat, l2, shrink = sc[4], sc[5], sc[6], sc[7]
    for i in range(param.size):
        g = grad[i]
        if use_l2:
            g = g + l2 * param[i]
        mi = m[i] * b1 + omb1 * g
        vi = v[i] * b2 + omb2 * (g * g)
        m[i] = mi
        v[i] = vi
        p = param[i]
        if use_shrink:
            p = p * shrink
        # np.sqrt keeps float32; error_model="numpy": x / 0 is inf, as in NumPy, not an exception
        param[i] = p - (step_size * mi) / (np.sqrt(vi) + eps_hat)


@njit(cache=True, error_model="numpy")
def _adam_serial(param, grad, m, v, scalars, use_l2, use_shrink):
    _adam_span(param, grad, m, v, _rounded(scalars, param), use_l2, use_shrink)


@njit(parallel=True, cache=True, error_model="numpy")
def _adam_parallel(param, grad, m, v, scalars, use_l2, use_shrink):
    sc = _rounded(scalars, param)
    n = param.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        _adam_span(param[lo:hi], grad[lo:hi], m[lo:hi], v[lo:hi], sc, use_l2, use_shrink)


@njit(cache=True, error_model="numpy")
def _ema_span(shadow, param, d, omd):
    for i in range(shadow.size):
        shadow[i] = shadow[i] * d + omd * param[i]


@njit(cache=True, error_model="numpy")
def _ema_serial(shadow, param, scalars):
    sc = _rounded(scalars, shadow)
    _ema_span(shadow, param, sc[0], sc[1])


@njit(parallel=True, cache=True, error_model="numpy")
def _ema_parallel(shadow, param, scalars):
    sc = _rounded(scalars, shadow)
    n = shadow.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        _ema_span(shadow[lo:hi], param[lo:hi], sc[0], sc[1])


@register("adam_update", "numba")
def adam_update_numba(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0, decoupled=False):
    scalars, use_l2, use_shrink = _adam_scalars(
        param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled
    )
    kernel = _adam_parallel if param.size >= diffusion.PARALLEL_MIN else _adam_serial
    # ravel() of a C-contiguous array is a view: the kernel writes into the caller's arrays
    kernel(param.ravel(), _flat(grad), m.ravel(), v.ravel(), scalars, use_l2, use_shrink)


@register("ema_update", "numba")
def ema_update_numba(shadow, param, decay):
    scalars = _check_ema(shadow, param, decay)
    kernel = _ema_parallel if shadow.size >= diffusion.PARALLEL_MIN else _ema_serial
    kernel(shadow.ravel(), _flat(param), scalars)


# -- Numba CUDA ------------------------------------------------------------------------------


@cuda.jit(cache=True)
def _adam_cuda(param, grad, m, v, b1, omb1, b2, omb2, step_size, eps_hat, l2, shrink, use_l2, use_shrink):
    # grid-stride loop over the elements, updating param, m and v in place
    for i in range(cuda.grid(1), param.size, cuda.gridsize(1)):
        g = grad[i]
        if use_l2:
            g = g + l2 * param[i]
        mi = m[i] * b1 + omb1 * g
        vi = v[i] * b2 + omb2 * (g * g)
        m[i] = mi
        v[i] = vi
        p = param[i]
        if use_shrink:
            p = p * shrink
        param[i] = p - (step_size * mi) / (math.sqrt(vi) + eps_hat)  # float32 sqrt for float32


@cuda.jit(cache=True)
def _ema_cuda(shadow, param, d, omd):
    # grid-stride loop over the elements, updating shadow in place
    for i in range(cuda.grid(1), shadow.size, cuda.gridsize(1)):
        shadow[i] = shadow[i] * d + omd * param[i]


@register("adam_update", "cuda")
def adam_update_cuda(param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay=0.0, decoupled=False):
    scalars, use_l2, use_shrink = _adam_scalars(
        param, grad, m, v, lr, beta1, beta2, eps, step, weight_decay, decoupled
    )
    scalars = _cuda.device_scalars(param.dtype, *scalars)
    # ravel() of a C-contiguous array is a view: the kernel writes into the caller's arrays
    args = (param.ravel(), _flat(grad), m.ravel(), v.ravel(), *scalars, use_l2, use_shrink)
    _cuda.launch_elementwise(_adam_cuda, param.size, *args)


@register("ema_update", "cuda")
def ema_update_cuda(shadow, param, decay):
    scalars = _cuda.device_scalars(shadow.dtype, *_check_ema(shadow, param, decay))
    _cuda.launch_elementwise(_ema_cuda, shadow.size, shadow.ravel(), _flat(param), *scalars)
