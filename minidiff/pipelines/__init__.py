"""Pipelines: models and a sampler put together into one callable.

from minidiff.pipelines import StableDiffusion
sd = StableDiffusion.from_pretrained("path/to/stable-diffusion-v1-5")   # a diffusers folder
images = sd("a watercolor fox", num_steps=25, guidance=7.5, seed=0)   # (N, 3, H, W) in [0, 1]
"""

from .stable_diffusion import PipelineError, StableDiffusion

__all__ = ["PipelineError", "StableDiffusion"]
