"""Diffusion kernels: the forward process and one sampler step (the MSE against the noise, the
training loss, is in loss.py).

Notation of minidiff/diffusion/gaussian.py: ``abar_t = prod_{s<=t} (1 - beta_s)``, its tables of
length T in float64, 0-based timesteps. Per element, with n the sample of the element:

    q_sample            x_t = sqrt_abar[t_n] x0 + sqrt_one_minus_abar[t_n] noise
    ddpm_step           x_prev = coef_x0 x0 + coef_xt x_t + sigma noise
    ddim_step           x_prev = sqrt_abar_prev x0 + direction eps + sigma noise

The sampler steps take scalars (every sample of a batch is at the same step); ``noise=None``
leaves the noise term out. With ``clip=True`` x0 is clipped to [-1, 1] first, and the DDIM step
then uses the eps that the clipped x0 implies, ``eps = (x_t - sqrt_abar x0) / sqrt_one_minus_abar``.

Rounding: coefficients are rounded to the data's dtype, then every product and sum is done in that
dtype in the order written above, as the NumPy statements of the samplers and of q_sample did; the
fast versions round the same way (no fused multiply-add), so they agree with the reference to the
bit. Division by zero gives inf or NaN, as in NumPy, in every version.

The CUDA versions round the coefficients the same way and compute in the data's dtype too, but
the CUDA compiler contracts a product and a sum into one fused multiply-add, so they agree with
the reference to about one rounding of the dtype rather than to the bit.

Four implementations side by side: the reference (``xp`` code, NumPy or CuPy), Numba CPU, for
q_sample the C++ extension (kernels/diffusion.cpp), and Numba CUDA for CuPy arrays
(grid-stride loops over the elements). The sampler steps' math per element is written once and
compiled for both Numba targets.
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import get_array_module, to_device

from . import _cpu, _cuda
from ._checks import check_arrays, flat
from .machine import cuda, native, njit
from .registry import register

# -- argument checks -------------------------------------------------------------------------
#
# These run on every call of a kernel that may take a few microseconds, so the common case is a
# handful of comparisons; the messages come from the general checks in _checks.py.

_FLOAT64 = np.dtype(np.float64)


def _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    """Validate everything but the range of t; return t as a host integer array."""
    fn = "q_sample"
    check_arrays(fn, ("x0", "noise"), x0, noise)
    if not x0.ndim:
        raise ValueError(f"{fn}: x0 must have shape (N, ...), got {x0.shape}")
    if not (_is_table(sqrt_abar) and _is_table(sqrt_one_minus_abar)):
        raise TypeError(f"{fn}: sqrt_abar and sqrt_one_minus_abar must be 1-D float64 NumPy arrays")
    if sqrt_abar.size != sqrt_one_minus_abar.size or not sqrt_abar.size:
        raise ValueError(
            f"{fn}: the tables must be non-empty and of one length, got {sqrt_abar.shape} "
            f"and {sqrt_one_minus_abar.shape}"
        )
    if type(t) is not np.ndarray:
        t = np.asarray(to_device(t, "cpu"))
    if t.ndim != 1 or t.size != x0.shape[0] or t.dtype.kind not in "iu":
        raise ValueError(
            f"{fn}: t must be {x0.shape[0]} integer timesteps, got shape {t.shape} dtype {t.dtype}"
        )
    return t


def _is_table(a):
    return type(a) is np.ndarray and a.ndim == 1 and a.dtype == _FLOAT64


def _timestep_error(t, T):
    return ValueError(f"q_sample: timesteps must lie in [0, {T}), got {t.min()}..{t.max()}")


def _check_timesteps(t, T):
    if t.size and (t.min() < 0 or t.max() >= T):
        raise _timestep_error(t, T)


# -- reference -------------------------------------------------------------------------------


@register("q_sample", "reference")
def q_sample_reference(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    """``x_t = sqrt_abar[t] x0 + sqrt_one_minus_abar[t] noise`` per sample, in x0's dtype.

    x0 and noise ``(N, ...)`` share dtype and shape; the tables are float64 NumPy arrays
    ``(T,)``; t holds N integers in [0, T) (on the host or the device).
    """
    t = _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    _check_timesteps(t, sqrt_abar.size)
    xp = get_array_module(x0)
    shape = (-1,) + (1,) * (x0.ndim - 1)
    a = xp.asarray(sqrt_abar[t].astype(x0.dtype)).reshape(shape)
    s = xp.asarray(sqrt_one_minus_abar[t].astype(x0.dtype)).reshape(shape)
    return a * x0 + s * noise


@register("ddpm_step", "reference")
def ddpm_step_reference(x_t, x0_pred, noise, coef_x0, coef_xt, sigma, clip=False):
    """One DDPM step: ``coef_x0 x0 + coef_xt x_t + sigma noise`` (x0 clipped to [-1, 1] first
    when ``clip``; no noise term when noise is None). The coefficients are numbers."""
    dtype = check_arrays("ddpm_step", ("x_t", "x0_pred", "noise"), x_t, x0_pred, noise)
    xp = get_array_module(x_t)
    c0, ct, sg = dtype.type(coef_x0), dtype.type(coef_xt), dtype.type(sigma)
    x0 = xp.clip(x0_pred, -1, 1) if clip else x0_pred
    mean = c0 * x0 + ct * x_t
    return mean if noise is None else mean + sg * noise


@register("ddim_step", "reference")
def ddim_step_reference(
    x_t, eps, x0_pred, noise, sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, clip=False
):
    """One DDIM step: ``sqrt_abar_prev x0 + direction eps + sigma noise``.

    With ``clip``, x0 is clipped to [-1, 1] and eps recomputed from it,
    ``(x_t - sqrt_abar x0) / sqrt_one_minus_abar`` (sqrt_abar and sqrt_one_minus_abar, of the
    current step, are used only then). No noise term when noise is None.
    """
    dtype = check_arrays("ddim_step", ("x_t", "eps", "x0_pred", "noise"), x_t, eps, x0_pred, noise)
    xp = get_array_module(x_t)
    scalars = (sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma)
    a, s, ap, dr, sg = (dtype.type(c) for c in scalars)
    x0, e = x0_pred, eps
    if clip:
        x0 = xp.clip(x0_pred, -1, 1)
        e = (x_t - a * x0) / s
    x_prev = ap * x0 + dr * e
    return x_prev if noise is None else x_prev + sg * noise


# -- one element of the sampler steps, compiled for the CPU and for CUDA ---------------------
#
# Plain functions of numbers, in the data's dtype (sc: the scalars of the step, rounded to it),
# compiled as inlined Numba CPU functions (the spans below) and as CUDA device functions (the
# kernels of the last section).


def _ddpm(x_t, x0, noise, sc, clip, has_noise):
    c0, ct, sg, one = sc  # coef_x0, coef_xt, sigma, 1
    if clip:
        if x0 < -one:  # NaN compares false both ways and stays NaN, as with np.clip
            x0 = -one
        elif x0 > one:
            x0 = one
    r = c0 * x0 + ct * x_t
    if has_noise:
        r = r + sg * noise
    return r


def _ddim(x_t, eps, x0, noise, sc, clip, has_noise):
    a, s, ap, dr, sg, one = sc  # sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, 1
    if clip:
        if x0 < -one:
            x0 = -one
        elif x0 > one:
            x0 = one
        eps = (x_t - a * x0) / s
    r = ap * x0 + dr * eps
    if has_noise:
        r = r + sg * noise
    return r


_ddpm_cpu, _ddpm_device = njit(inline="always")(_ddpm), cuda.jit(device=True)(_ddpm)
_ddim_cpu, _ddim_device = njit(inline="always")(_ddim), cuda.jit(device=True)(_ddim)


# -- Numba CPU -------------------------------------------------------------------------------
#
# Span functions over elements lo..hi of the flat arrays (q_sample: over rows lo..hi, one per
# sample), run by the drivers of _cpu.py. The scalars arrive as Python floats and are rounded to
# the data's dtype before the loop. noise=None is passed as has_noise=False with x_t in its place.


@njit(cache=True, error_model="numpy")
def _q_sample_coefficients(sqrt_abar, sqrt_one_minus_abar, t, like):
    """The tables at t, rounded to like's dtype; and -1, or the index of the first t out of
    [0, T) (then nothing is read out of bounds)."""
    T = sqrt_abar.size
    a = np.empty(t.size, like.dtype)
    s = np.empty(t.size, like.dtype)
    for n in range(t.size):
        k = t[n]
        if k < 0 or k >= T:
            return a, s, n
        a[n] = sqrt_abar[k]
        s[n] = sqrt_one_minus_abar[k]
    return a, s, -1


def _q_sample_span(lo, hi, x0, noise, a, s, M, out):
    for n in range(lo, hi):  # rows: row n is sample n
        start, stop = n * M, (n + 1) * M
        x0_n, noise_n, out_n = x0[start:stop], noise[start:stop], out[start:stop]
        an, sn = a[n], s[n]
        for k in range(out_n.size):
            out_n[k] = an * x0_n[k] + sn * noise_n[k]


def _ddpm_span(lo, hi, x_t, x0, noise, coef_x0, coef_xt, sigma, clip, has_noise, out):
    x_t, x0, noise, out = x_t[lo:hi], x0[lo:hi], noise[lo:hi], out[lo:hi]
    f = out.dtype.type
    sc = (f(coef_x0), f(coef_xt), f(sigma), f(1.0))
    for i in range(out.size):
        out[i] = _ddpm_cpu(x_t[i], x0[i], noise[i], sc, clip, has_noise)


def _ddim_span(
    lo,
    hi,
    x_t,
    eps,
    x0,
    noise,
    sqrt_abar,
    sqrt_one_minus_abar,
    sqrt_abar_prev,
    direction,
    sigma,
    clip,
    has_noise,
    out,
):
    x_t, eps, x0, noise, out = x_t[lo:hi], eps[lo:hi], x0[lo:hi], noise[lo:hi], out[lo:hi]
    f = out.dtype.type
    sc = (f(sqrt_abar), f(sqrt_one_minus_abar), f(sqrt_abar_prev), f(direction), f(sigma), f(1.0))
    for i in range(out.size):
        out[i] = _ddim_cpu(x_t[i], eps[i], x0[i], noise[i], sc, clip, has_noise)


_Q_SAMPLE = _cpu.drivers(_q_sample_span, chunk=1)  # a sample per task
_DDPM = _cpu.drivers(_ddpm_span)
_DDIM = _cpu.drivers(_ddim_span)


def _timesteps(t):
    return np.ascontiguousarray(t, dtype=np.int64)  # uint64 beyond int64 wraps negative: rejected


def _row_size(x):
    return x.size // x.shape[0] if x.shape[0] else 0


def _noise_or(noise, x_t):
    """``(noise, has_noise)`` for the sampler kernels: x_t stands in for a missing noise (its
    term is left out)."""
    return (x_t, False) if noise is None else (flat(noise), True)


@register("q_sample", "numba")
def q_sample_numba(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    t = _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    out = np.empty(x0.shape, x0.dtype)
    tables = np.ascontiguousarray(sqrt_abar), np.ascontiguousarray(sqrt_one_minus_abar)
    a, s, bad = _q_sample_coefficients(*tables, _timesteps(t), out)
    if bad >= 0:
        raise _timestep_error(t, sqrt_abar.size)
    _Q_SAMPLE.pick(x0.size)(t.size, flat(x0), flat(noise), a, s, _row_size(x0), out.ravel())
    return out


@register("ddpm_step", "numba")
def ddpm_step_numba(x_t, x0_pred, noise, coef_x0, coef_xt, sigma, clip=False):
    dtype = check_arrays("ddpm_step", ("x_t", "x0_pred", "noise"), x_t, x0_pred, noise)
    out = np.empty(x_t.shape, dtype)
    x_t = flat(x_t)
    noise, has_noise = _noise_or(noise, x_t)
    scalars = (float(coef_x0), float(coef_xt), float(sigma))
    _DDPM.pick(out.size)(out.size, x_t, flat(x0_pred), noise, *scalars, bool(clip), has_noise, out.ravel())
    return out


@register("ddim_step", "numba")
def ddim_step_numba(
    x_t, eps, x0_pred, noise, sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, clip=False
):
    dtype = check_arrays("ddim_step", ("x_t", "eps", "x0_pred", "noise"), x_t, eps, x0_pred, noise)
    out = np.empty(x_t.shape, dtype)
    x_t = flat(x_t)
    noise, has_noise = _noise_or(noise, x_t)
    scalars = map(float, (sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma))
    args = (x_t, flat(eps), flat(x0_pred), noise, *scalars, bool(clip), has_noise, out.ravel())
    _DDIM.pick(out.size)(out.size, *args)
    return out


# -- native (kernels/diffusion.cpp) ----------------------------------------------------------


@register("q_sample", "native")
def q_sample_native(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    t = _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    try:
        out = native.q_sample(
            flat(x0),
            flat(noise),
            np.ascontiguousarray(sqrt_abar),
            np.ascontiguousarray(sqrt_one_minus_abar),
            _timesteps(t),
            x0.size >= _cpu.PARALLEL_MIN,
        )
    except ValueError as exc:
        if "timesteps" in str(exc):
            raise _timestep_error(t, sqrt_abar.size) from None
        raise
    return out.reshape(x0.shape)


# -- Numba CUDA ------------------------------------------------------------------------------
#
# Elementwise kernels over flat C-contiguous arrays; the scalars arrive as NumPy scalars of the
# data's dtype (_cuda.device_scalars), so every product and sum is done in that dtype, in the
# order written in the module doc. noise=None is passed as has_noise=False with x_t in its place.
# The sampler steps run the device functions of the section "one element of the sampler steps".


@cuda.jit(cache=True)
def _q_sample_cuda(x0, noise, a, s, M, out):
    # grid-stride loop over the elements; element i belongs to sample i // M
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n = i // M
        out[i] = a[n] * x0[i] + s[n] * noise[i]


@cuda.jit(cache=True)
def _ddpm_cuda(x_t, x0, noise, c0, ct, sg, one, clip, has_noise, out):
    # grid-stride loop over the elements
    sc = (c0, ct, sg, one)
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = _ddpm_device(x_t[i], x0[i], noise[i], sc, clip, has_noise)


@cuda.jit(cache=True)
def _ddim_cuda(x_t, eps, x0, noise, a, s, ap, dr, sg, one, clip, has_noise, out):
    # grid-stride loop over the elements
    sc = (a, s, ap, dr, sg, one)
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = _ddim_device(x_t[i], eps[i], x0[i], noise[i], sc, clip, has_noise)


@register("q_sample", "cuda")
def q_sample_cuda(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    t = _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    _check_timesteps(t, sqrt_abar.size)
    xp = get_array_module(x0)
    a = xp.asarray(sqrt_abar[t].astype(x0.dtype))  # per sample, rounded to the dtype on the host
    s = xp.asarray(sqrt_one_minus_abar[t].astype(x0.dtype))
    out = xp.empty(x0.shape, x0.dtype)
    _cuda.launch_elementwise(
        _q_sample_cuda, out.size, flat(x0), flat(noise), a, s, _row_size(x0), out.ravel()
    )
    return out


@register("ddpm_step", "cuda")
def ddpm_step_cuda(x_t, x0_pred, noise, coef_x0, coef_xt, sigma, clip=False):
    dtype = check_arrays("ddpm_step", ("x_t", "x0_pred", "noise"), x_t, x0_pred, noise)
    xp = get_array_module(x_t)
    out = xp.empty(x_t.shape, dtype)
    scalars = _cuda.device_scalars(dtype, coef_x0, coef_xt, sigma, 1.0)
    x_t = flat(x_t)
    noise, has_noise = _noise_or(noise, x_t)
    args = (x_t, flat(x0_pred), noise, *scalars, bool(clip), has_noise, out.ravel())
    _cuda.launch_elementwise(_ddpm_cuda, out.size, *args)
    return out


@register("ddim_step", "cuda")
def ddim_step_cuda(
    x_t, eps, x0_pred, noise, sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, clip=False
):
    dtype = check_arrays("ddim_step", ("x_t", "eps", "x0_pred", "noise"), x_t, eps, x0_pred, noise)
    xp = get_array_module(x_t)
    out = xp.empty(x_t.shape, dtype)
    scalars = (sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, 1.0)
    x_t = flat(x_t)
    noise, has_noise = _noise_or(noise, x_t)
    args = (x_t, flat(eps), flat(x0_pred), noise, *_cuda.device_scalars(dtype, *scalars))
    _cuda.launch_elementwise(_ddim_cuda, out.size, *args, bool(clip), has_noise, out.ravel())
    return out
