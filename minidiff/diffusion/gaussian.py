"""Gaussian diffusion (DDPM): the forward process, its posterior, the training
objective and the variational bound in bits per dimension.

Notation follows Ho et al. (2020): alpha_t = 1 - beta_t, abar_t = prod_{s<=t} alpha_s,
q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I). Timesteps are 0-based: t = 0 is
the first noising step, t = T-1 the last.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import log_ndtr

from .. import functional as F
from .. import kernels
from ..autograd import no_grad
from ..backend import get_array_module, to_device
from ..tensor import Tensor
from .schedule import make_betas

PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("beta", "posterior")


def _per_sample(coef, t, like):
    """coef[t] as an array of shape (N, 1, ..., 1) in like's dtype and on its device."""
    xp = get_array_module(like)
    values = xp.asarray(coef[to_device(t, "cpu")], dtype=like.dtype)
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


class GaussianDiffusion:
    """The fixed forward process and everything computed from its schedule.

    ``prediction`` is what the network outputs: "eps" (the noise, as in DDPM),
    "x0" (the clean image) or "v" (sqrt(abar) eps - sqrt(1-abar) x0).
    ``min_snr_gamma`` (e.g. 5.0) turns on min-SNR loss weighting (Hang et al. 2023).
    """

    def __init__(self, betas=None, schedule="linear", T=1000, prediction="eps", min_snr_gamma=None):
        if prediction not in PREDICTIONS:
            raise ValueError(
                f"GaussianDiffusion: prediction must be one of {PREDICTIONS}, got {prediction!r}"
            )
        self.schedule = schedule if betas is None else "custom"
        betas = make_betas(schedule, T) if betas is None else np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas < 1)).all():
            raise ValueError("GaussianDiffusion: betas must be a 1-D array with values in (0, 1)")
        self.prediction, self.min_snr_gamma = prediction, min_snr_gamma
        self.betas = betas
        self.T = len(betas)
        self.alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(self.alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        # q(x_{t-1} | x_t, x_0) = N(c0 x_0 + ct x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # the variance is 0 at t = 0: clip its log to the next value, as in the DDPM code
        self.posterior_log_variance_clipped = (
            np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
            if self.T > 1
            else np.log(np.maximum(self.posterior_variance, 1e-20))
        )
        self.posterior_mean_coef_x0 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef_xt = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(self.alphas) / (1.0 - self.alphas_cumprod)
        )
        self.snr = self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    # -- the forward process --------------------------------------------------------
    def _check_t(self, t, n):
        t = np.asarray(to_device(t, "cpu"))
        if t.shape != (n,) or t.dtype.kind not in "iu":
            raise ValueError(
                f"diffusion: t must be {n} integer timesteps, got shape {t.shape} dtype {t.dtype}"
            )
        if t.size and (t.min() < 0 or t.max() >= self.T):
            raise ValueError(f"diffusion: timesteps must lie in [0, {self.T}), got {t.min()}..{t.max()}")
        return t

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, on raw arrays (kernels.q_sample;
        x0 and noise of different dtypes are first promoted to a common one)."""
        t = self._check_t(t, x0.shape[0])
        if noise.shape != x0.shape:
            raise ValueError(f"q_sample: noise {noise.shape} and x0 {x0.shape} differ in shape")
        if noise.dtype != x0.dtype:
            dtype = np.result_type(x0.dtype, noise.dtype)
            x0, noise = x0.astype(dtype, copy=False), noise.astype(dtype, copy=False)
        return kernels.q_sample(x0, noise, self.sqrt_alphas_cumprod, self.sqrt_one_minus_alphas_cumprod, t)

    def q_posterior(self, x0, x_t, t):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (
            _per_sample(self.posterior_mean_coef_x0, t, x_t) * x0
            + _per_sample(self.posterior_mean_coef_xt, t, x_t) * x_t
        )
        return (
            mean,
            _per_sample(self.posterior_variance, t, x_t),
            _per_sample(self.posterior_log_variance_clipped, t, x_t),
        )

    # -- converting what the network predicts ---------------------------------------
    def split_prediction(self, out, x_t, t):
        """(eps, x0) implied by the network output ``out`` (raw arrays)."""
        a = _per_sample(self.sqrt_alphas_cumprod, t, x_t)
        s = _per_sample(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        if self.prediction == "eps":
            return out, (x_t - s * out) / a
        if self.prediction == "x0":
            return (x_t - a * out) / s, out
        return s * x_t + a * out, a * x_t - s * out  # v

    def eps_from_x0(self, x0, x_t, t):
        a = _per_sample(self.sqrt_alphas_cumprod, t, x_t)
        s = _per_sample(self.sqrt_one_minus_alphas_cumprod, t, x_t)
        return (x_t - a * x0) / s

    def target(self, x0, noise, t):
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        a = _per_sample(self.sqrt_alphas_cumprod, t, x0)
        s = _per_sample(self.sqrt_one_minus_alphas_cumprod, t, x0)
        return a * noise - s * x0

    def loss_weights(self, t):
        """Per-sample weights of the MSE: ones, or min-SNR-gamma weights."""
        if self.min_snr_gamma is None:
            return np.ones(len(t))
        snr = self.snr[t]
        clipped = np.minimum(snr, self.min_snr_gamma)
        return {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1)}[self.prediction]

    # -- training -------------------------------------------------------------------
    def training_loss(self, model, x0, t=None, noise=None, y=None, generator=None) -> Tensor:
        """L_simple: the mean squared error of the network's prediction at a random
        timestep (or at ``t``), weighted per sample when min-SNR weighting is on."""
        data = x0.data if isinstance(x0, Tensor) else x0
        n = data.shape[0]
        xp = get_array_module(data)
        rng = generator if hasattr(generator, "integers") else np.random.default_rng(generator)
        t = rng.integers(0, self.T, size=n) if t is None else self._check_t(t, n)
        if noise is None:
            noise = xp.asarray(rng.standard_normal(data.shape, dtype=np.float32).astype(data.dtype))
        x_t = self.q_sample(data, t, noise)
        out = model(Tensor.from_array(x_t), t, y) if y is not None else model(Tensor.from_array(x_t), t)
        target = Tensor.from_array(self.target(data, noise, t))
        if self.min_snr_gamma is None:
            return F.mse_loss(out, target)
        weights = xp.asarray(self.loss_weights(t), dtype=data.dtype).reshape((-1,) + (1,) * (data.ndim - 1))
        return F.mean(F.mse_loss(out, target, reduction="none") * Tensor.from_array(weights))

    # -- the variational bound ----------------------------------------------------------
    @no_grad()
    def bits_per_dim(
        self, model, x0, variance="beta", timesteps=None, y=None, generator=None, clip_denoised=False
    ):
        """The variational bound -log p(x0) <= L_T + sum_t L_t + L_0, in bits per
        dimension, for each image of x0 (data scaled to [-1, 1] from 8-bit pixels).

        With ``timesteps=None`` every term is computed (T network evaluations per
        batch); otherwise ``timesteps`` random t per image give an unbiased
        estimate of the sum. Returns a dict of float64 arrays (N,): "total",
        "prior", "terms" (sum of L_{1..T-1}), "decoder" (L_0).
        """
        if variance not in VARIANCES:
            raise ValueError(f"bits_per_dim: variance must be one of {VARIANCES}, got {variance!r}")
        data = x0.data if isinstance(x0, Tensor) else x0
        n = data.shape[0]
        dims = math.prod(data.shape[1:])
        x0_host = np.asarray(to_device(data, "cpu"), dtype=np.float64)
        rng = generator if hasattr(generator, "integers") else np.random.default_rng(generator)
        xp = get_array_module(data)

        # prior: KL(q(x_T | x0) || N(0, I))
        mean_T = self.sqrt_alphas_cumprod[-1] * x0_host
        var_T = 1.0 - self.alphas_cumprod[-1]
        prior = _normal_kl(mean_T, math.log(var_T), 0.0, 0.0).reshape(n, -1).sum(1)

        def term(t_value):
            t = np.full(n, t_value)
            noise = rng.standard_normal(data.shape)
            x_t = self.q_sample(x0_host, t, noise)
            x_t_dev = xp.asarray(x_t.astype(data.dtype))
            out = model(Tensor.from_array(x_t_dev), t, y) if y is not None else model(Tensor.from_array(x_t_dev), t)
            out = np.asarray(to_device(out.data, "cpu"), dtype=np.float64)
            _, x0_pred = self.split_prediction(out, x_t, t)
            if clip_denoised:
                x0_pred = np.clip(x0_pred, -1, 1)
            model_mean, _, _ = self.q_posterior(x0_pred, x_t, t)
            if variance == "posterior":
                log_var = self.posterior_log_variance_clipped[t_value]
            else:  # "beta", with the first value replaced as in the DDPM code
                log_var = math.log(self.posterior_variance[1] if t_value == 0 else self.betas[t_value])
            if t_value == 0:
                return (
                    -_discretized_gaussian_log_likelihood(x0_host, model_mean, log_var).reshape(n, -1).sum(1)
                )
            true_mean, _, true_log_var = self.q_posterior(x0_host, x_t, t)
            return _normal_kl(true_mean, true_log_var, model_mean, log_var).reshape(n, -1).sum(1)

        decoder = term(0)
        if timesteps is None:
            terms = sum((term(s) for s in range(1, self.T)), np.zeros(n))
        else:
            draws = rng.integers(1, self.T, size=int(timesteps)) if self.T > 1 else []
            terms = sum((term(int(s)) for s in draws), np.zeros(n)) * (self.T - 1) / max(len(draws), 1)
        to_bits = 1.0 / (dims * math.log(2.0))
        return {
            "total": (prior + terms + decoder) * to_bits,
            "prior": prior * to_bits,
            "terms": terms * to_bits,
            "decoder": decoder * to_bits,
        }


def _normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, exp(logvar1)) || N(mean2, exp(logvar2))), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + np.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * np.exp(-logvar2)
    )


def _log_prob_between(lower, upper):
    """log(Phi(upper) - Phi(lower)) for lower < upper, from whichever tail keeps precision."""
    flip = lower + upper > 0  # in the upper tail use 1 - Phi: Phi(-lower) - Phi(-upper)
    a, b = np.where(flip, -upper, lower), np.where(flip, -lower, upper)
    log_b = log_ndtr(b)
    return log_b + np.log(-np.expm1(log_ndtr(a) - log_b))


def _discretized_gaussian_log_likelihood(x, mean, log_var):
    """log P(x) for data x in [-1, 1] quantized to 256 bins of width 2/255, under
    N(mean, exp(log_var)); the end bins extend to -inf and +inf."""
    inv_std = np.exp(-0.5 * log_var)
    centered = x - mean
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    return np.where(
        x < -0.999, log_ndtr(upper), np.where(x > 0.999, log_ndtr(-lower), _log_prob_between(lower, upper))
    )
