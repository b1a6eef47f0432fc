"""Diffusion kernels: the forward process, the MSE against the noise, one sampler step.

Notation of minidiff/diffusion/gaussian.py: ``abar_t = prod_{s<=t} (1 - beta_s)``, its tables of
length T in float64, 0-based timesteps. Per element, with n the sample of the element:

    q_sample            x_t = sqrt_abar[t_n] x0 + sqrt_one_minus_abar[t_n] noise
    mse_loss_forward    loss = sum((pred - target)^2) / size          (summed in float64)
    mse_loss_backward   gpred = (pred - target) * (2 gloss / size)
    ddpm_step           x_prev = coef_x0 x0 + coef_xt x_t + sigma noise
    ddim_step           x_prev = sqrt_abar_prev x0 + direction eps + sigma noise

The sampler steps take scalars (every sample of a batch is at the same step); ``noise=None``
leaves the noise term out. With ``clip=True`` x0 is clipped to [-1, 1] first, and the DDIM step
then uses the eps that the clipped x0 implies, ``eps = (x_t - sqrt_abar x0) / sqrt_one_minus_abar``.

Rounding: coefficients are rounded to the data's dtype, then every product and sum is done in that
dtype in the order written above, as the NumPy statements of the samplers and of q_sample did; the
fast versions round the same way (no fused multiply-add), so they agree with the reference to the
bit. The loss is the exception: it is summed in float64, the fast versions over chunks of
``CHUNK`` elements (each in vector lanes, an order fixed for a build and a CPU) whose sums are
added in order, so it does not depend on the number of threads; it agrees with the reference to
float64 rounding. Division by zero gives inf or NaN, as in NumPy, in every version.

The CUDA versions round the coefficients the same way and compute in the data's dtype too, but
the CUDA compiler contracts a product and a sum into one fused multiply-add, so they agree with
the reference to about one rounding of the dtype rather than to the bit; their loss is summed in
float64 per block (a tree in shared memory, a fixed order) and the block sums added by one block.

Four implementations side by side: the reference (``xp`` code, NumPy or CuPy), Numba CPU, for
q_sample and the loss the C++ extension (kernels/diffusion.cpp), and Numba CUDA for CuPy arrays
(grid-stride loops over the elements).
"""

from __future__ import annotations

import warnings

import numpy as np

from minidiff.backend import get_array_module, to_device

from . import _cuda
from ._checks import FLOAT_DTYPES, float_dtype, same_shape
from ._cuda import BUFFER, block_sum
from .machine import cuda, native, njit, prange
from .registry import register

CHUNK = 4096  # elements per task of the elementwise kernels and per partial sum of the loss
# Below this many elements the fast kernels here and in optim.py run on one thread: waking the
# sleeping OpenMP workers (OMP_WAIT_POLICY=PASSIVE, see registry.py) costs more than a pass over
# data that sits in the cache takes. Measured on a 2-core machine with a 32 MiB cache: q_sample
# of 393,216 float32 values 49 us on one thread, 76 us on two; of 1,572,864 values 179 and 146 us.
# Read at every call, so benchmarks and tests may change it.
PARALLEL_MIN = 1 << 20


def _flat(a):
    """``a`` as a C-contiguous 1-D array: a view when it is C-contiguous, else a copy."""
    return a.ravel()


# -- argument checks -------------------------------------------------------------------------
#
# These run on every call of a kernel that may take a few microseconds, so the common case is a
# handful of comparisons; the messages come from the general checks in _checks.py.

_FLOAT64 = np.dtype(np.float64)


def _check_arrays(fn, names, *arrays):
    """The dtype shared by ``arrays`` (named ``names``; None skipped), which must be float32 or
    float64 and of one shape; TypeError or ValueError naming the arrays otherwise."""
    dtype, shape = arrays[0].dtype, arrays[0].shape
    if dtype in FLOAT_DTYPES:
        for a in arrays:
            if a is not None and (a.dtype != dtype or a.shape != shape):
                break
        else:
            return dtype
    named = {name: a for name, a in zip(names, arrays) if a is not None}
    dtype = float_dtype(fn, **named)
    same_shape(fn, **named)
    return dtype


def _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    """Validate everything but the range of t; return t as a host integer array."""
    fn = "q_sample"
    _check_arrays(fn, ("x0", "noise"), x0, noise)
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


def _loss_gradient_scale(fn, gloss, size):
    """``2 gloss / size`` as a Python float (gloss: a one-element array or a number)."""
    if getattr(gloss, "size", 1) != 1:
        raise ValueError(f"{fn}: gloss must hold one value (the loss gradient), got shape {gloss.shape}")
    return float(gloss.item() if hasattr(gloss, "item") else gloss) * 2.0 / size


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


@register("mse_loss_forward", "reference")
def mse_loss_forward_reference(pred, target):
    """``mean((pred - target)^2)`` computed in float64, returned as a 0-d array of pred's dtype."""
    _check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    xp = get_array_module(pred)
    diff = pred.astype(xp.float64, copy=False) - target.astype(xp.float64, copy=False)
    return xp.asarray((diff * diff).sum() / diff.size, dtype=pred.dtype)


@register("mse_loss_backward", "reference")
def mse_loss_backward_reference(pred, target, gloss):
    """Gradient wrt pred of the loss above: ``(pred - target) * (2 gloss / size)``, pred's dtype."""
    _check_arrays("mse_loss_backward", ("pred", "target"), pred, target)
    xp = get_array_module(pred)
    if not pred.size:
        return xp.empty(pred.shape, pred.dtype)
    gloss = xp.asarray(gloss, dtype=xp.float64)
    if gloss.size != 1:
        raise ValueError(
            f"mse_loss_backward: gloss must hold one value (the loss gradient), got shape {gloss.shape}"
        )
    scale = (gloss.reshape(()) * 2.0 / pred.size).astype(pred.dtype)
    return (pred - target) * scale


@register("ddpm_step", "reference")
def ddpm_step_reference(x_t, x0_pred, noise, coef_x0, coef_xt, sigma, clip=False):
    """One DDPM step: ``coef_x0 x0 + coef_xt x_t + sigma noise`` (x0 clipped to [-1, 1] first
    when ``clip``; no noise term when noise is None). The coefficients are numbers."""
    dtype = _check_arrays("ddpm_step", ("x_t", "x0_pred", "noise"), x_t, x0_pred, noise)
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
    dtype = _check_arrays("ddim_step", ("x_t", "eps", "x0_pred", "noise"), x_t, eps, x0_pred, noise)
    xp = get_array_module(x_t)
    scalars = (sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma)
    a, s, ap, dr, sg = (dtype.type(c) for c in scalars)
    x0, e = x0_pred, eps
    if clip:
        x0 = xp.clip(x0_pred, -1, 1)
        e = (x_t - a * x0) / s
    x_prev = ap * x0 + dr * e
    return x_prev if noise is None else x_prev + sg * noise


# -- Numba CPU -------------------------------------------------------------------------------
#
# Each kernel is a span function (the formula over whole flat arrays), run by two drivers: a
# serial one on the whole arrays and a parallel one on slices of CHUNK elements (a prange).
# Two drivers rather than one function compiled twice: Numba's cache does not tell a parallel
# and a serial compilation apart. Spans loop over range(n) of slices, never over range(lo, hi)
# of whole arrays: Numba cannot tell that such an index is never negative and keeps a
# wraparound check on every access, which stops LLVM from vectorizing (6x slower).
# Scalars arrive as a tuple of floats (cheap for Numba's dispatcher) and are rounded to the
# data's dtype by _rounded, so that the arithmetic stays in that dtype.


@njit(cache=True, error_model="numpy")
def _rounded(scalars, like):
    out = np.empty(len(scalars), like.dtype)
    for i in range(len(scalars)):
        out[i] = scalars[i]
    return out


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


@njit(cache=True, error_model="numpy")
def _q_sample_row(x0, noise, a, s, out):
    for k in range(out.size):
        out[k] = a * x0[k] + s * noise[k]


@njit(cache=True, error_model="numpy")
def _q_sample_serial(x0, noise, sqrt_abar, sqrt_one_minus_abar, t, M, out):
    a, s, bad = _q_sample_coefficients(sqrt_abar, sqrt_one_minus_abar, t, out)
    if bad < 0:
        for n in range(t.size):
            lo, hi = n * M, (n + 1) * M
            _q_sample_row(x0[lo:hi], noise[lo:hi], a[n], s[n], out[lo:hi])
    return bad


@njit(parallel=True, cache=True, error_model="numpy")
def _q_sample_parallel(x0, noise, sqrt_abar, sqrt_one_minus_abar, t, M, out):
    a, s, bad = _q_sample_coefficients(sqrt_abar, sqrt_one_minus_abar, t, out)
    if bad < 0:
        for n in prange(t.size):
            lo, hi = n * M, (n + 1) * M
            _q_sample_row(x0[lo:hi], noise[lo:hi], a[n], s[n], out[lo:hi])
    return bad


@njit(cache=True, error_model="numpy", fastmath={"reassoc"})
def _squared_error_span(pred, target):
    """float64 sum of (pred - target)^2. "reassoc" (and nothing else of fastmath: NaN and inf
    still propagate) lets LLVM split the sum into vector lanes, 3x faster."""
    total = 0.0
    for i in range(pred.size):
        d = np.float64(pred[i]) - np.float64(target[i])
        total += d * d
    return total


@njit(cache=True, error_model="numpy")
def _squared_error_serial(pred, target):
    n = pred.size
    total = 0.0
    for c in range((n + CHUNK - 1) // CHUNK):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        total += _squared_error_span(pred[lo:hi], target[lo:hi])
    return total


@njit(parallel=True, cache=True, error_model="numpy")
def _squared_error_parallel(pred, target):
    n = pred.size
    chunks = (n + CHUNK - 1) // CHUNK
    partial = np.empty(chunks)
    for c in prange(chunks):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        partial[c] = _squared_error_span(pred[lo:hi], target[lo:hi])
    total = 0.0
    for c in range(chunks):  # in order: the same sum as the serial driver
        total += partial[c]
    return total


@njit(cache=True, error_model="numpy")
def _scaled_difference_span(pred, target, scale, out):
    for i in range(out.size):
        out[i] = (pred[i] - target[i]) * scale


@njit(cache=True, error_model="numpy")
def _scaled_difference_serial(pred, target, scalars, out):
    _scaled_difference_span(pred, target, _rounded(scalars, out)[0], out)


@njit(parallel=True, cache=True, error_model="numpy")
def _scaled_difference_parallel(pred, target, scalars, out):
    scale = _rounded(scalars, out)[0]
    n = out.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        _scaled_difference_span(pred[lo:hi], target[lo:hi], scale, out[lo:hi])


@njit(cache=True, error_model="numpy")
def _ddpm_span(x_t, x0, noise, sc, clip, out):
    # sc = (coef_x0, coef_xt, sigma, 1) in the data's dtype
    c0, ct, sg, one = sc[0], sc[1], sc[2], sc[3]
    for i in range(out.size):
        v = x0[i]
        if clip:
            if v < -one:  # NaN compares false both ways and stays NaN, as with np.clip
                v = -one
            elif v > one:
                v = one
        r = c0 * v + ct * x_t[i]
        if noise is not None:  # resolved when compiling: None is a type of its own
            r = r + sg * noise[i]
        out[i] = r


@njit(cache=True, error_model="numpy")
def _ddpm_serial(x_t, x0, noise, scalars, clip, out):
    _ddpm_span(x_t, x0, noise, _rounded(scalars, out), clip, out)


@njit(parallel=True, cache=True, error_model="numpy")
def _ddpm_parallel(x_t, x0, noise, scalars, clip, out):
    sc = _rounded(scalars, out)
    n = out.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        if noise is None:
            _ddpm_span(x_t[lo:hi], x0[lo:hi], None, sc, clip, out[lo:hi])
        else:
            _ddpm_span(x_t[lo:hi], x0[lo:hi], noise[lo:hi], sc, clip, out[lo:hi])


@njit(cache=True, error_model="numpy")
def _ddim_span(x_t, eps, x0, noise, sc, clip, out):
    # sc = (sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, 1) in the dtype
    a, s, ap, dr, sg, one = sc[0], sc[1], sc[2], sc[3], sc[4], sc[5]
    for i in range(out.size):
        v = x0[i]
        if clip:
            if v < -one:
                v = -one
            elif v > one:
                v = one
            e = (x_t[i] - a * v) / s
        else:
            e = eps[i]
        r = ap * v + dr * e
        if noise is not None:
            r = r + sg * noise[i]
        out[i] = r


@njit(cache=True, error_model="numpy")
def _ddim_serial(x_t, eps, x0, noise, scalars, clip, out):
    _ddim_span(x_t, eps, x0, noise, _rounded(scalars, out), clip, out)


@njit(parallel=True, cache=True, error_model="numpy")
def _ddim_parallel(x_t, eps, x0, noise, scalars, clip, out):
    sc = _rounded(scalars, out)
    n = out.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo, hi = c * CHUNK, min(n, (c + 1) * CHUNK)
        if noise is None:
            _ddim_span(x_t[lo:hi], eps[lo:hi], x0[lo:hi], None, sc, clip, out[lo:hi])
        else:
            _ddim_span(x_t[lo:hi], eps[lo:hi], x0[lo:hi], noise[lo:hi], sc, clip, out[lo:hi])


def _timesteps(t):
    return np.ascontiguousarray(t, dtype=np.int64)  # uint64 beyond int64 wraps negative: rejected


def _row_size(x):
    return x.size // x.shape[0] if x.shape[0] else 0


def _mean_of_sum(total, size, dtype):
    """The loss as a 0-d array of ``dtype``: ``total / size`` (NaN with a warning when size is 0,
    as np.mean)."""
    if not size:
        warnings.warn("mean of an empty array", RuntimeWarning, stacklevel=3)
        return np.array(np.nan, dtype=dtype)
    return np.array(total / size, dtype=dtype)


@register("q_sample", "numba")
def q_sample_numba(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    t = _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    out = np.empty(x0.shape, x0.dtype)
    kernel = _q_sample_parallel if x0.size >= PARALLEL_MIN else _q_sample_serial
    bad = kernel(
        _flat(x0),
        _flat(noise),
        np.ascontiguousarray(sqrt_abar),
        np.ascontiguousarray(sqrt_one_minus_abar),
        _timesteps(t),
        _row_size(x0),
        out.ravel(),
    )
    if bad >= 0:
        raise _timestep_error(t, sqrt_abar.size)
    return out


@register("mse_loss_forward", "numba")
def mse_loss_forward_numba(pred, target):
    _check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    kernel = _squared_error_parallel if pred.size >= PARALLEL_MIN else _squared_error_serial
    return _mean_of_sum(kernel(_flat(pred), _flat(target)), pred.size, pred.dtype)


@register("mse_loss_backward", "numba")
def mse_loss_backward_numba(pred, target, gloss):
    _check_arrays("mse_loss_backward", ("pred", "target"), pred, target)
    if not pred.size:
        return np.empty(pred.shape, pred.dtype)
    scale = _loss_gradient_scale("mse_loss_backward", gloss, pred.size)
    out = np.empty(pred.shape, pred.dtype)
    kernel = _scaled_difference_parallel if pred.size >= PARALLEL_MIN else _scaled_difference_serial
    kernel(_flat(pred), _flat(target), (scale,), out.ravel())
    return out


@register("ddpm_step", "numba")
def ddpm_step_numba(x_t, x0_pred, noise, coef_x0, coef_xt, sigma, clip=False):
    dtype = _check_arrays("ddpm_step", ("x_t", "x0_pred", "noise"), x_t, x0_pred, noise)
    out = np.empty(x_t.shape, dtype)
    kernel = _ddpm_parallel if x_t.size >= PARALLEL_MIN else _ddpm_serial
    kernel(
        _flat(x_t),
        _flat(x0_pred),
        None if noise is None else _flat(noise),
        (float(coef_x0), float(coef_xt), float(sigma), 1.0),
        bool(clip),
        out.ravel(),
    )
    return out


@register("ddim_step", "numba")
def ddim_step_numba(
    x_t, eps, x0_pred, noise, sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, clip=False
):
    dtype = _check_arrays("ddim_step", ("x_t", "eps", "x0_pred", "noise"), x_t, eps, x0_pred, noise)
    out = np.empty(x_t.shape, dtype)
    kernel = _ddim_parallel if x_t.size >= PARALLEL_MIN else _ddim_serial
    scalars = (float(sqrt_abar), float(sqrt_one_minus_abar), float(sqrt_abar_prev), float(direction))
    kernel(
        _flat(x_t),
        _flat(eps),
        _flat(x0_pred),
        None if noise is None else _flat(noise),
        (*scalars, float(sigma), 1.0),
        bool(clip),
        out.ravel(),
    )
    return out


# -- native (kernels/diffusion.cpp) ----------------------------------------------------------


@register("q_sample", "native")
def q_sample_native(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    t = _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    try:
        out = native.q_sample(
            _flat(x0),
            _flat(noise),
            np.ascontiguousarray(sqrt_abar),
            np.ascontiguousarray(sqrt_one_minus_abar),
            _timesteps(t),
            x0.size >= PARALLEL_MIN,
        )
    except ValueError as exc:
        if "timesteps" in str(exc):
            raise _timestep_error(t, sqrt_abar.size) from None
        raise
    return out.reshape(x0.shape)


@register("mse_loss_forward", "native")
def mse_loss_forward_native(pred, target):
    _check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    total = native.squared_error_sum(_flat(pred), _flat(target), pred.size >= PARALLEL_MIN)
    return _mean_of_sum(total, pred.size, pred.dtype)


@register("mse_loss_backward", "native")
def mse_loss_backward_native(pred, target, gloss):
    _check_arrays("mse_loss_backward", ("pred", "target"), pred, target)
    if not pred.size:
        return np.empty(pred.shape, pred.dtype)
    scale = _loss_gradient_scale("mse_loss_backward", gloss, pred.size)
    out = native.scaled_difference(_flat(pred), _flat(target), scale, pred.size >= PARALLEL_MIN)
    return out.reshape(pred.shape)


# -- Numba CUDA ------------------------------------------------------------------------------
#
# Elementwise kernels over flat C-contiguous arrays; the scalars arrive as NumPy scalars of the
# data's dtype (_cuda.device_scalars), so every product and sum is done in that dtype, in the
# order written in the module doc. noise=None is passed as has_noise=False with x_t in its place.


@cuda.jit(device=True)
def _clip_unit(v, one):
    """v clipped to [-one, one]; NaN compares false both ways and stays NaN, as with np.clip."""
    if v < -one:
        return -one
    if v > one:
        return one
    return v


@cuda.jit(cache=True)
def _q_sample_cuda(x0, noise, a, s, M, out):
    # grid-stride loop over the elements; element i belongs to sample i // M
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        n = i // M
        out[i] = a[n] * x0[i] + s[n] * noise[i]


@cuda.jit(cache=True)
def _squared_error_partials_cuda(pred, target, partial):
    # grid-stride loop over the elements, then one float64 partial sum per block
    total = 0.0
    for i in range(cuda.grid(1), pred.size, cuda.gridsize(1)):
        d = np.float64(pred[i]) - np.float64(target[i])
        total += d * d
    buf = cuda.shared.array(BUFFER, np.float64)
    total = block_sum(buf, total)
    if cuda.threadIdx.x == 0:
        partial[cuda.blockIdx.x] = total


@cuda.jit(cache=True)
def _mean_of_partials_cuda(partial, size, out):
    # a single block; its threads stride over the partial sums
    total = 0.0
    for k in range(cuda.threadIdx.x, partial.size, cuda.blockDim.x):
        total += partial[k]
    buf = cuda.shared.array(BUFFER, np.float64)
    total = block_sum(buf, total)
    if cuda.threadIdx.x == 0:
        out[0] = total / size


@cuda.jit(cache=True)
def _scaled_difference_cuda(pred, target, scale, out):
    # grid-stride loop over the elements; scale: one value of the dtype, in device memory
    sc = scale[0]
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        out[i] = (pred[i] - target[i]) * sc


@cuda.jit(cache=True)
def _ddpm_cuda(x_t, x0, noise, c0, ct, sg, one, clip, has_noise, out):
    # grid-stride loop over the elements
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = _clip_unit(x0[i], one) if clip else x0[i]
        r = c0 * v + ct * x_t[i]
        if has_noise:
            r = r + sg * noise[i]
        out[i] = r


@cuda.jit(cache=True)
def _ddim_cuda(x_t, eps, x0, noise, a, s, ap, dr, sg, one, clip, has_noise, out):
    # grid-stride loop over the elements
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        v = x0[i]
        e = eps[i]
        if clip:
            v = _clip_unit(v, one)
            e = (x_t[i] - a * v) / s
        r = ap * v + dr * e
        if has_noise:
            r = r + sg * noise[i]
        out[i] = r


@register("q_sample", "cuda")
def q_sample_cuda(x0, noise, sqrt_abar, sqrt_one_minus_abar, t):
    t = _check_q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
    _check_timesteps(t, sqrt_abar.size)
    xp = get_array_module(x0)
    a = xp.asarray(sqrt_abar[t].astype(x0.dtype))  # per sample, rounded to the dtype on the host
    s = xp.asarray(sqrt_one_minus_abar[t].astype(x0.dtype))
    out = xp.empty(x0.shape, x0.dtype)
    _cuda.launch_elementwise(
        _q_sample_cuda, out.size, _flat(x0), _flat(noise), a, s, _row_size(x0), out.ravel()
    )
    return out


@register("mse_loss_forward", "cuda")
def mse_loss_forward_cuda(pred, target):
    _check_arrays("mse_loss_forward", ("pred", "target"), pred, target)
    xp = get_array_module(pred)
    if not pred.size:
        return xp.asarray(_mean_of_sum(0.0, 0, pred.dtype))
    partial = xp.empty(_cuda.elementwise_blocks(pred.size), np.float64)
    _cuda.launch_elementwise(_squared_error_partials_cuda, pred.size, _flat(pred), _flat(target), partial)
    mean = xp.empty(1, np.float64)
    _cuda.launch_per_block(_mean_of_partials_cuda, 1, partial.size, partial, np.float64(pred.size), mean)
    return mean.astype(pred.dtype).reshape(())


@register("mse_loss_backward", "cuda")
def mse_loss_backward_cuda(pred, target, gloss):
    _check_arrays("mse_loss_backward", ("pred", "target"), pred, target)
    xp = get_array_module(pred)
    if not pred.size:
        return xp.empty(pred.shape, pred.dtype)
    gloss = xp.asarray(gloss, dtype=np.float64)
    if gloss.size != 1:
        raise ValueError(
            f"mse_loss_backward: gloss must hold one value (the loss gradient), got shape {gloss.shape}"
        )
    # 2 gloss / size in float64, rounded to the dtype, as the reference computes it; on the device,
    # so that a gloss there is not copied to the host
    scale = (gloss.reshape(1) * 2.0 / pred.size).astype(pred.dtype)
    out = xp.empty(pred.shape, pred.dtype)
    _cuda.launch_elementwise(
        _scaled_difference_cuda, out.size, _flat(pred), _flat(target), scale, out.ravel()
    )
    return out


@register("ddpm_step", "cuda")
def ddpm_step_cuda(x_t, x0_pred, noise, coef_x0, coef_xt, sigma, clip=False):
    dtype = _check_arrays("ddpm_step", ("x_t", "x0_pred", "noise"), x_t, x0_pred, noise)
    xp = get_array_module(x_t)
    out = xp.empty(x_t.shape, dtype)
    scalars = _cuda.device_scalars(dtype, coef_x0, coef_xt, sigma, 1.0)
    has_noise = noise is not None
    x_t = _flat(x_t)
    noise = _flat(noise) if has_noise else x_t  # not read without noise
    args = (x_t, _flat(x0_pred), noise, *scalars, bool(clip), has_noise, out.ravel())
    _cuda.launch_elementwise(_ddpm_cuda, out.size, *args)
    return out


@register("ddim_step", "cuda")
def ddim_step_cuda(
    x_t, eps, x0_pred, noise, sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, clip=False
):
    dtype = _check_arrays("ddim_step", ("x_t", "eps", "x0_pred", "noise"), x_t, eps, x0_pred, noise)
    xp = get_array_module(x_t)
    out = xp.empty(x_t.shape, dtype)
    scalars = (sqrt_abar, sqrt_one_minus_abar, sqrt_abar_prev, direction, sigma, 1.0)
    has_noise = noise is not None
    x_t = _flat(x_t)
    noise = _flat(noise) if has_noise else x_t  # not read without noise
    args = (x_t, _flat(eps), _flat(x0_pred), noise, *_cuda.device_scalars(dtype, *scalars))
    _cuda.launch_elementwise(_ddim_cuda, out.size, *args, bool(clip), has_noise, out.ravel())
    return out
