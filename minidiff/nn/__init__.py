"""Modules: the Module base, layers, and attention (self and cross, written once)."""

from .attention import Attention
from .layers import Conv2d, Dropout, Embedding, GroupNorm, Identity, LayerNorm, Linear, Sequential, SiLU
from .module import Module, Parameter

__all__ = [
    "Attention",
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
]
