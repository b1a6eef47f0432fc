"""Diffusion: noise schedules, the Gaussian forward process and its bound, samplers, and the
Stable Diffusion schedulers (diffusers' DDIM, PNDM and Euler, from a scheduler_config.json)."""

from .gaussian import PREDICTIONS, VARIANCES, GaussianDiffusion
from .samplers import ddim_sample, ddim_timesteps, ddpm_sample, model_output
from .schedule import (
    DIFFUSERS_SCHEDULES,
    SCHEDULES,
    cosine_betas,
    diffusers_betas,
    linear_betas,
    linspace_float32,
    make_betas,
    scaled_linear_betas,
    sigmoid_betas,
    squaredcos_cap_v2_betas,
)
from .schedulers import (
    SCHEDULERS,
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    Scheduler,
    load_scheduler,
    make_scheduler,
)

__all__ = [
    "DIFFUSERS_SCHEDULES",
    "PREDICTIONS",
    "SCHEDULERS",
    "SCHEDULES",
    "VARIANCES",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "GaussianDiffusion",
    "PNDMScheduler",
    "Scheduler",
    "cosine_betas",
    "ddim_sample",
    "ddim_timesteps",
    "ddpm_sample",
    "diffusers_betas",
    "linear_betas",
    "linspace_float32",
    "load_scheduler",
    "make_betas",
    "make_scheduler",
    "model_output",
    "scaled_linear_betas",
    "sigmoid_betas",
    "squaredcos_cap_v2_betas",
]
