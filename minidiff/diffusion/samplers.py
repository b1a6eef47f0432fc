"""Samplers: DDPM ancestral sampling (Ho et al. 2020, Algorithm 2) and DDIM (Song et al. 2021).

Both call ``model(x_t, t)`` (or ``model(x_t, t, y)``) under ``no_grad`` and take a
``generator`` (a numpy Generator or a seed): the same seed gives the same images.
"""

from __future__ import annotations

import numpy as np

from .. import kernels
from ..autograd import no_grad
from ..backend import Device, get_array_module
from ..tensor import Tensor
from .gaussian import VARIANCES, GaussianDiffusion


def _rng(generator):
    return generator if hasattr(generator, "standard_normal") else np.random.default_rng(generator)


def _normal(rng, shape, dtype, xp):
    """Noise drawn on the host so every device sees the same numbers for a seed."""
    return xp.asarray(rng.standard_normal(shape).astype(dtype))


def model_output(model, diffusion: GaussianDiffusion, x_t, t, y=None, guidance=None, null_class=None):
    """The network output for x_t (raw array), with classifier-free guidance when
    ``guidance`` is set: out = out_null + guidance * (out_class - out_null).
    guidance = 1 is plain conditional sampling; larger values follow the class harder."""
    n = x_t.shape[0]
    if y is None:
        return model(Tensor.from_array(x_t), t).data
    labels = np.asarray(y)
    if guidance is None:
        return model(Tensor.from_array(x_t), t, labels).data
    if null_class is None:
        raise ValueError("guidance needs the model's null class (its num_classes)")
    xp = get_array_module(x_t)
    both = model(
        Tensor.from_array(xp.concatenate([x_t, x_t])),
        np.concatenate([t, t]),
        np.concatenate([labels, np.full(n, null_class)]),
    ).data
    cond, uncond = both[:n], both[n:]
    return uncond + guidance * (cond - uncond)


def _check_sampling_args(diffusion, shape, y):
    if len(shape) < 2:
        raise ValueError(f"sample: shape must be (N, C, ...), got {shape}")
    if y is not None and np.shape(y) != (shape[0],):
        raise ValueError(f"sample: y must hold one class per image ({shape[0]},), got shape {np.shape(y)}")


@no_grad()
def ddpm_sample(
    model,
    diffusion: GaussianDiffusion,
    shape,
    generator=None,
    variance="beta",
    clip_denoised=True,
    y=None,
    guidance=None,
    null_class=None,
    device="cpu",
    dtype=np.float32,
    progress=None,
):
    """Ancestral sampling through all T steps: x_{t-1} = mu(x_t, x0_pred) + sigma_t z.

    ``variance``: "beta" (sigma_t^2 = beta_t) or "posterior" (the posterior variance
    beta~_t). ``clip_denoised`` clips the predicted x0 to [-1, 1] before the mean is
    formed; without clipping the mean equals Algorithm 2's
    (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t).
    """
    if variance not in VARIANCES:
        raise ValueError(f"ddpm_sample: variance must be one of {VARIANCES}, got {variance!r}")
    _check_sampling_args(diffusion, shape, y)
    rng, xp = _rng(generator), Device(device).xp
    x = _normal(rng, shape, dtype, xp)
    sigmas = np.sqrt(diffusion.betas if variance == "beta" else diffusion.posterior_variance)
    steps = range(diffusion.T - 1, -1, -1)
    for step in progress(steps) if progress else steps:
        t = np.full(shape[0], step)
        out = model_output(model, diffusion, x, t, y, guidance, null_class)
        _, x0 = diffusion.split_prediction(out, x, t)
        noise = _normal(rng, shape, dtype, xp) if step > 0 else None
        # the posterior mean of q(x_{t-1} | x_t, x0) plus sigma_t z, x0 clipped first: one pass
        x = kernels.ddpm_step(
            x,
            x0.astype(x.dtype, copy=False),  # a model may answer in another dtype
            noise,
            diffusion.posterior_mean_coef_x0[step],
            diffusion.posterior_mean_coef_xt[step],
            sigmas[step],
            clip=clip_denoised,
        )
    return x


def ddim_timesteps(T: int, steps: int) -> np.ndarray:
    """``steps`` distinct timesteps, evenly spaced, from T-1 down (a single step is T-1)."""
    if not 1 <= steps <= T:
        raise ValueError(f"ddim: steps must be in [1, {T}], got {steps}")
    return np.unique(np.round(np.linspace(T - 1, 0, steps)).astype(np.int64))[::-1]


@no_grad()
def ddim_sample(
    model,
    diffusion: GaussianDiffusion,
    shape,
    steps=50,
    eta=0.0,
    generator=None,
    clip_denoised=True,
    y=None,
    guidance=None,
    null_class=None,
    device="cpu",
    dtype=np.float32,
    progress=None,
):
    """DDIM: x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma z with
    sigma = eta sqrt((1 - abar_prev)/(1 - abar_t)) sqrt(1 - abar_t/abar_prev).

    eta = 0 is deterministic given x_T; eta = 1 with all T steps is DDPM with the
    posterior variance.
    """
    if eta < 0:
        raise ValueError(f"ddim_sample: eta must be >= 0, got {eta}")
    _check_sampling_args(diffusion, shape, y)
    rng, xp = _rng(generator), Device(device).xp
    x = _normal(rng, shape, dtype, xp)
    times = ddim_timesteps(diffusion.T, steps)
    abar = diffusion.alphas_cumprod
    pairs = list(zip(times, list(times[1:]) + [-1]))
    for step, prev in progress(pairs) if progress else pairs:
        t = np.full(shape[0], step)
        out = model_output(model, diffusion, x, t, y, guidance, null_class)
        eps, x0 = diffusion.split_prediction(out, x, t)
        a_t, a_prev = abar[step], (abar[prev] if prev >= 0 else 1.0)
        sigma = eta * np.sqrt((1 - a_prev) / (1 - a_t)) * np.sqrt(1 - a_t / a_prev)
        direction = np.sqrt(max(1 - a_prev - sigma**2, 0.0))
        noise = _normal(rng, shape, dtype, xp) if sigma > 0 else None
        # with clip_denoised the kernel clips x0 and uses the eps it implies (eps_from_x0)
        x = kernels.ddim_step(
            x,
            eps.astype(x.dtype, copy=False),  # a model may answer in another dtype
            x0.astype(x.dtype, copy=False),
            noise,
            diffusion.sqrt_alphas_cumprod[step],
            diffusion.sqrt_one_minus_alphas_cumprod[step],
            np.sqrt(a_prev),
            direction,
            sigma,
            clip=clip_denoised,
        )
    return x
