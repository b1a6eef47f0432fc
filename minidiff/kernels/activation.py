"""Activation kernels: GELU, and GEGLU (the gated GELU of Stable Diffusion's feed-forward).

    gelu(x)      = x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))                  (exact)
                 = 0.5 x (1 + tanh(k (x + 0.044715 x^3))), k = sqrt(2 / pi)   (approximate="tanh")
    gelu'(x)     = Phi(x) + x phi(x),  phi(x) = exp(-x^2 / 2) / sqrt(2 pi)     (exact)
    geglu(h)     = value * gelu(gate),  [value, gate] = h split in halves along the last axis
    geglu grads  = d value = g gelu(gate),  d gate = g value gelu'(gate)

Why kernels: written with NumPy, the exact GELU is an erf ufunc plus half a dozen temporaries
forward and again backward, and GEGLU adds two strided halves, a product and, backward, a
zero-filled gradient per half. One pass per direction computes each element where it lies.

Layout: any shape; the last axis of GEGLU's ``h`` has even length 2 d, and its output has d.
Outputs are new C-contiguous arrays of the input's dtype (float32 or float64); the arithmetic
stays in that dtype. Three implementations: the reference (``xp`` code, SciPy's erf), Numba CPU
and Numba CUDA, whose per-element math is written once and compiled for both targets. On the CPU,
float32 data takes erf from a rational approximation (``_erf_float32``, within 8 ulp of erf) that
vectorizes; float64 data, and CUDA, take the library's erf.
"""

from __future__ import annotations

import math

import numpy as np

from minidiff.backend import get_array_module

from . import _cpu, _cuda
from ._checks import FLOAT_DTYPES
from .machine import cuda, njit
from .registry import register

APPROXIMATIONS = ("none", "tanh")
_INV_SQRT2 = 1 / math.sqrt(2)
_INV_SQRT_2PI = 1 / math.sqrt(2 * math.pi)
_TANH_K = math.sqrt(2 / math.pi)
_TANH_C = 0.044715


def _check(fn, x, approximate="none"):
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{fn}: x has dtype {x.dtype}; kernels take float32 or float64")
    if approximate not in APPROXIMATIONS:
        raise ValueError(f"{fn}: approximate must be 'none' or 'tanh', got {approximate!r}")
    return approximate == "tanh"


def _check_grad(fn, g, x, name="x", shape=None):
    shape = x.shape if shape is None else shape
    if g.shape != shape or g.dtype != x.dtype:
        raise ValueError(
            f"{fn}: the gradient must have {name}'s output shape {shape} and dtype {x.dtype}, "
            f"got {g.shape} {g.dtype}"
        )


def _check_geglu(fn, h):
    _check(fn, h)
    if h.ndim == 0 or h.shape[-1] % 2:
        raise ValueError(
            f"{fn}: h's last axis holds [value, gate] and must have even length, got shape {h.shape}"
        )
    return h.shape[-1] // 2


def _special(xp):
    if xp is np:
        import scipy.special

        return scipy.special
    import cupyx.scipy.special  # pragma: no cover - needs a GPU

    return cupyx.scipy.special  # pragma: no cover


# -- reference -------------------------------------------------------------------------------


def _gelu_and_slope_reference(x, tanh):
    """(gelu(x), gelu'(x)) in x's dtype (Python floats meet the arrays as weak scalars)."""
    xp = get_array_module(x)
    if tanh:
        t = xp.tanh(_TANH_K * (x + _TANH_C * x**3))
        slope = 0.5 * (1 + t) + 0.5 * x * (1 - t * t) * _TANH_K * (1 + 3 * _TANH_C * x * x)
        return 0.5 * x * (1 + t), slope
    cdf = 0.5 * (1 + _special(xp).erf(x * _INV_SQRT2))
    return x * cdf, cdf + x * (xp.exp(-0.5 * x * x) * _INV_SQRT_2PI)


@register("gelu_forward", "reference")
def gelu_forward_reference(x, approximate="none"):
    tanh = _check("gelu_forward", x, approximate)
    xp = get_array_module(x)
    if tanh:
        return 0.5 * x * (1 + xp.tanh(_TANH_K * (x + _TANH_C * x**3)))
    return x * (0.5 * (1 + _special(xp).erf(x * _INV_SQRT2)))


@register("gelu_backward", "reference")
def gelu_backward_reference(g, x, approximate="none"):
    tanh = _check("gelu_backward", x, approximate)
    _check_grad("gelu_backward", g, x)
    return g * _gelu_and_slope_reference(x, tanh)[1]


@register("geglu_forward", "reference")
def geglu_forward_reference(h):
    d = _check_geglu("geglu_forward", h)
    return h[..., :d] * gelu_forward_reference(h[..., d:])


@register("geglu_backward", "reference")
def geglu_backward_reference(g, h):
    d = _check_geglu("geglu_backward", h)
    _check_grad("geglu_backward", g, h, "h", h.shape[:-1] + (d,))
    xp = get_array_module(h)
    value, gate = h[..., :d], h[..., d:]
    gelu, slope = _gelu_and_slope_reference(gate, False)
    return xp.concatenate([g * gelu, g * value * slope], axis=-1)


# -- one element, compiled for the CPU and for CUDA ------------------------------------------
#
# Plain functions of numbers in the arrays' dtype; the constants come in rounded to it (a Python
# float would make Numba compute in float64).


def _erf_float32(x):
    """erf of a float32 as a rational function on [-4, 4] (erf(4) rounds to 1 in float32): only
    multiplications, additions and a division, which LLVM vectorizes, where the C library's erff
    is a scalar call. Eigen's coefficients (a minimax fit), within 8 float32 ulp of erf."""
    f = np.float32
    x = min(max(x, f(-4.0)), f(4.0))
    x2 = x * x
    p = f(-2.72614225801306e-10)
    p = p * x2 + f(2.77068142495902e-08)
    p = p * x2 + f(-2.10102402082508e-06)
    p = p * x2 + f(-5.69250639462346e-05)
    p = p * x2 + f(-7.34990630326855e-04)
    p = p * x2 + f(-2.95459980854025e-03)
    p = p * x2 + f(-1.60960333262415e-02)
    q = f(-1.45660718464996e-05)
    q = q * x2 + f(-2.13374055278905e-04)
    q = q * x2 + f(-1.68282697438203e-03)
    q = q * x2 + f(-7.37332916720468e-03)
    q = q * x2 + f(-1.42647390514189e-02)
    # the fit overshoots 1 by an ulp near the ends; erf never does
    return min(max(x * p / q, f(-1.0)), f(1.0))


def _gelu_slope(x, erf, tanh, c):
    """(gelu(x), gelu'(x)). erf: erf(x / sqrt 2), unused by the tanh formula; c: (1/sqrt 2,
    1/sqrt(2 pi), sqrt(2/pi), 0.044715, 0.5, 1, 3)."""
    inv_sqrt2, inv_sqrt_2pi, k, a, half, one, three = c
    if tanh:
        t = math.tanh(k * (x + a * x * x * x))
        slope = half * (one + t) + half * x * (one - t * t) * k * (one + three * a * x * x)
        return half * x * (one + t), slope
    cdf = half * (one + erf)
    return x * cdf, cdf + x * (math.exp(-half * x * x) * inv_sqrt_2pi)


_erf_float32_cpu = njit(inline="always")(_erf_float32)
_gelu_slope_cpu, _gelu_slope_device = njit(inline="always")(_gelu_slope), cuda.jit(device=True)(_gelu_slope)


@njit(inline="always")
def _erf_cpu(x, c, rational):
    """erf(x / sqrt 2): the rational one for float32 data (``rational``), else the C library's."""
    return _erf_float32_cpu(x * c[0]) if rational else math.erf(x * c[0])


def _cpu_constants(dtype):
    """The Numba CPU spans' flag ``rational`` (float32: the rational erf) and constants."""
    return (dtype == np.float32, *_constants(dtype))


def _constants(dtype):
    f = dtype.type
    return (f(_INV_SQRT2), f(_INV_SQRT_2PI), f(_TANH_K), f(_TANH_C), f(0.5), f(1.0), f(3.0))


# -- Numba CPU: spans over elements (GELU) or rows (GEGLU), run by the drivers of _cpu.py -----


def _gelu_forward_span(lo, hi, x, y, tanh, rational, c0, c1, c2, c3, c4, c5, c6):
    x, y = x[lo:hi], y[lo:hi]
    c = (c0, c1, c2, c3, c4, c5, c6)
    for i in range(x.size):
        y[i] = _gelu_slope_cpu(x[i], _erf_cpu(x[i], c, rational), tanh, c)[0]


def _gelu_backward_span(lo, hi, g, x, gx, tanh, rational, c0, c1, c2, c3, c4, c5, c6):
    g, x, gx = g[lo:hi], x[lo:hi], gx[lo:hi]
    c = (c0, c1, c2, c3, c4, c5, c6)
    for i in range(x.size):
        gx[i] = g[i] * _gelu_slope_cpu(x[i], _erf_cpu(x[i], c, rational), tanh, c)[1]


def _geglu_forward_span(lo, hi, h, y, rational, c0, c1, c2, c3, c4, c5, c6):
    h, y = h[lo:hi], y[lo:hi]  # rows: h (rows, 2 d), y (rows, d)
    c = (c0, c1, c2, c3, c4, c5, c6)
    d = y.shape[1]
    for r in range(y.shape[0]):
        for j in range(d):
            y[r, j] = h[r, j] * _gelu_slope_cpu(h[r, d + j], _erf_cpu(h[r, d + j], c, rational), False, c)[0]


def _geglu_backward_span(lo, hi, g, h, gh, rational, c0, c1, c2, c3, c4, c5, c6):
    g, h, gh = g[lo:hi], h[lo:hi], gh[lo:hi]
    c = (c0, c1, c2, c3, c4, c5, c6)
    d = g.shape[1]
    for r in range(g.shape[0]):
        for j in range(d):
            gelu, slope = _gelu_slope_cpu(h[r, d + j], _erf_cpu(h[r, d + j], c, rational), False, c)
            gh[r, j] = g[r, j] * gelu
            gh[r, d + j] = g[r, j] * h[r, j] * slope


_GELU_FORWARD = _cpu.drivers(_gelu_forward_span)
_GELU_BACKWARD = _cpu.drivers(_gelu_backward_span)
_GEGLU_ROW_CHUNK = 64
_GEGLU_FORWARD = _cpu.drivers(_geglu_forward_span, chunk=_GEGLU_ROW_CHUNK)
_GEGLU_BACKWARD = _cpu.drivers(_geglu_backward_span, chunk=_GEGLU_ROW_CHUNK)
# erf and exp cost tens of cycles an element, far more than the memory traffic the elementwise
# threshold is set for: a second thread pays off on arrays this many times smaller.
_COMPUTE_WEIGHT = 16


@register("gelu_forward", "numba")
def gelu_forward_numba(x, approximate="none"):
    tanh = _check("gelu_forward", x, approximate)
    x_flat = np.ascontiguousarray(x).ravel()
    y = np.empty_like(x_flat)
    _GELU_FORWARD.pick(x.size * _COMPUTE_WEIGHT)(x.size, x_flat, y, tanh, *_cpu_constants(x.dtype))
    return y.reshape(x.shape)


@register("gelu_backward", "numba")
def gelu_backward_numba(g, x, approximate="none"):
    tanh = _check("gelu_backward", x, approximate)
    _check_grad("gelu_backward", g, x)
    x_flat = np.ascontiguousarray(x).ravel()
    gx = np.empty_like(x_flat)
    driver = _GELU_BACKWARD.pick(x.size * _COMPUTE_WEIGHT)
    driver(x.size, np.ascontiguousarray(g).ravel(), x_flat, gx, tanh, *_cpu_constants(x.dtype))
    return gx.reshape(x.shape)


@register("geglu_forward", "numba")
def geglu_forward_numba(h):
    d = _check_geglu("geglu_forward", h)
    rows = h.size // (2 * d) if d else 0
    h2 = np.ascontiguousarray(h).reshape(rows, 2 * d)
    y = np.empty((rows, d), h.dtype)
    _GEGLU_FORWARD.pick(y.size * _COMPUTE_WEIGHT)(rows, h2, y, *_cpu_constants(h.dtype))
    return y.reshape(h.shape[:-1] + (d,))


@register("geglu_backward", "numba")
def geglu_backward_numba(g, h):
    d = _check_geglu("geglu_backward", h)
    _check_grad("geglu_backward", g, h, "h", h.shape[:-1] + (d,))
    rows = h.size // (2 * d) if d else 0
    h2 = np.ascontiguousarray(h).reshape(rows, 2 * d)
    gh = np.empty_like(h2)
    driver = _GEGLU_BACKWARD.pick(g.size * _COMPUTE_WEIGHT)
    driver(rows, np.ascontiguousarray(g).reshape(rows, d), h2, gh, *_cpu_constants(h.dtype))
    return gh.reshape(h.shape)


# -- Numba CUDA: grid-stride loops over the elements -----------------------------------------


@cuda.jit(cache=True)
def _gelu_forward_cuda(x, y, tanh, c0, c1, c2, c3, c4, c5, c6):
    c = (c0, c1, c2, c3, c4, c5, c6)
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        y[i] = _gelu_slope_device(x[i], math.erf(x[i] * c0), tanh, c)[0]


@cuda.jit(cache=True)
def _gelu_backward_cuda(g, x, gx, tanh, c0, c1, c2, c3, c4, c5, c6):
    c = (c0, c1, c2, c3, c4, c5, c6)
    for i in range(cuda.grid(1), x.size, cuda.gridsize(1)):
        gx[i] = g[i] * _gelu_slope_device(x[i], math.erf(x[i] * c0), tanh, c)[1]


@cuda.jit(cache=True)
def _geglu_forward_cuda(h, y, d, c0, c1, c2, c3, c4, c5, c6):
    # element i of y: row i // d, column i % d; h's row has 2 d entries
    c = (c0, c1, c2, c3, c4, c5, c6)
    for i in range(cuda.grid(1), y.size, cuda.gridsize(1)):
        r, j = i // d, i % d
        y[i] = (
            h[r * 2 * d + j]
            * _gelu_slope_device(h[r * 2 * d + d + j], math.erf(h[r * 2 * d + d + j] * c0), False, c)[0]
        )


@cuda.jit(cache=True)
def _geglu_backward_cuda(g, h, gh, d, c0, c1, c2, c3, c4, c5, c6):
    c = (c0, c1, c2, c3, c4, c5, c6)
    for i in range(cuda.grid(1), g.size, cuda.gridsize(1)):
        r, j = i // d, i % d
        value, at = h[r * 2 * d + j], r * 2 * d + d + j
        gelu, slope = _gelu_slope_device(h[at], math.erf(h[at] * c0), False, c)
        gh[r * 2 * d + j] = g[i] * gelu
        gh[at] = g[i] * value * slope


def _contiguous_flat(a):
    return get_array_module(a).ascontiguousarray(a).ravel()


@register("gelu_forward", "cuda")
def gelu_forward_cuda(x, approximate="none"):
    tanh = _check("gelu_forward", x, approximate)
    xp = get_array_module(x)
    x_flat = _contiguous_flat(x)
    y = xp.empty_like(x_flat)
    _cuda.launch_elementwise(_gelu_forward_cuda, x.size, x_flat, y, tanh, *_constants(x.dtype))
    return y.reshape(x.shape)


@register("gelu_backward", "cuda")
def gelu_backward_cuda(g, x, approximate="none"):
    tanh = _check("gelu_backward", x, approximate)
    _check_grad("gelu_backward", g, x)
    xp = get_array_module(x)
    x_flat = _contiguous_flat(x)
    gx = xp.empty_like(x_flat)
    args = (_contiguous_flat(g), x_flat, gx, tanh, *_constants(x.dtype))
    _cuda.launch_elementwise(_gelu_backward_cuda, x.size, *args)
    return gx.reshape(x.shape)


@register("geglu_forward", "cuda")
def geglu_forward_cuda(h):
    d = _check_geglu("geglu_forward", h)
    xp = get_array_module(h)
    y = xp.empty(h.shape[:-1] + (d,), h.dtype)
    args = (_contiguous_flat(h), y.ravel(), d, *_constants(h.dtype))
    _cuda.launch_elementwise(_geglu_forward_cuda, y.size, *args)
    return y


@register("geglu_backward", "cuda")
def geglu_backward_cuda(g, h):
    d = _check_geglu("geglu_backward", h)
    _check_grad("geglu_backward", g, h, "h", h.shape[:-1] + (d,))
    xp = get_array_module(h)
    gh = xp.empty(h.shape, h.dtype)
    args = (_contiguous_flat(g), _contiguous_flat(h), gh.ravel(), d, *_constants(h.dtype))
    _cuda.launch_elementwise(_geglu_backward_cuda, g.size, *args)
    return gh
