"""Benchmarks: every kernel op against its reference and PyTorch (``kernels``), and the U-Net
training step and sampling pass against the same model in PyTorch (``unet``). Run them with
``minidiff bench`` or the scripts in the repository's bench/ folder. PyTorch is imported only
while a benchmark runs.
"""

from . import harness, kernels, unet
from .harness import median_seconds, positive_int, write_report

__all__ = ["harness", "kernels", "unet", "median_seconds", "positive_int", "write_report"]
