"""Modules: layers and the DDPM U-Net."""

from .layers import Conv2d, Dropout, Embedding, GroupNorm, Identity, LayerNorm, Linear, Sequential, SiLU
from .module import Module, Parameter
from .unet import UNet, timestep_embedding

__all__ = [
    "Conv2d",
    "Dropout",
    "Embedding",
    "GroupNorm",
    "Identity",
    "LayerNorm",
    "Linear",
    "Module",
    "Parameter",
    "Sequential",
    "SiLU",
    "UNet",
    "timestep_embedding",
]
