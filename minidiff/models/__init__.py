"""Networks built from minidiff.nn.

unet.py                the DDPM U-Net
blocks.py              ResnetBlock2D, Downsample2D, Upsample2D (shared by the two below)
unet_2d_condition.py   Stable Diffusion's U-Net (transformer_2d.py: its cross-attention blocks)
autoencoder_kl.py      Stable Diffusion's KL autoencoder
clip.py, tokenizer.py  CLIP: the text encoder, the image tower, CLIPModel, the image
                       preprocessing; the tokenizer

Models know nothing of diffusion, checkpoints or training; their attribute names are the keys of
the state dicts they load (diffusers' and transformers' spelling for the Stable Diffusion parts),
and ``from_pretrained(folder)`` reads the folders those libraries write.
"""

from .autoencoder_kl import AutoencoderKL, DiagonalGaussian
from .blocks import Downsample2D, ResnetBlock2D, Upsample2D
from .clip import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPVisionModel
from .tokenizer import CLIPTokenizer
from .transformer_2d import BasicTransformerBlock, Transformer2DModel
from .unet import UNet, timestep_embedding
from .unet_2d_condition import UNet2DConditionModel, timestep_sinusoids

__all__ = [
    "AutoencoderKL",
    "BasicTransformerBlock",
    "CLIPImageProcessor",
    "CLIPModel",
    "CLIPTextModel",
    "CLIPVisionModel",
    "CLIPTokenizer",
    "DiagonalGaussian",
    "Downsample2D",
    "ResnetBlock2D",
    "Transformer2DModel",
    "UNet",
    "UNet2DConditionModel",
    "Upsample2D",
    "timestep_embedding",
    "timestep_sinusoids",
]
