"""Diffusion: noise schedules, the Gaussian forward process and its bound, samplers."""

from .gaussian import PREDICTIONS, VARIANCES, GaussianDiffusion
from .samplers import ddim_sample, ddim_timesteps, ddpm_sample, model_output
from .schedule import SCHEDULES, cosine_betas, linear_betas, make_betas, sigmoid_betas

__all__ = [
    "PREDICTIONS",
    "SCHEDULES",
    "VARIANCES",
    "GaussianDiffusion",
    "cosine_betas",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "linear_betas",
    "make_betas",
    "model_output",
    "sigmoid_betas",
]
