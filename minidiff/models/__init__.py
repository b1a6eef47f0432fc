"""Networks built from minidiff.nn: the DDPM U-Net.

Models know nothing of diffusion, checkpoints or training; their attribute names are the keys of
the state dicts they load.
"""

from .unet import UNet, timestep_embedding

__all__ = ["UNet", "timestep_embedding"]
