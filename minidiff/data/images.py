"""Pixel conversions and image grids: uint8 <-> [-1, 1] floats, PIL resizing, PNG grids."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

# One resampling filter everywhere, so every source is resized the same way. For downscaling PIL
# widens the bilinear kernel with the scale factor, which antialiases.
RESAMPLE = Image.Resampling.BILINEAR


def from_uint8(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] (same shape)."""
    x = pixels.astype(np.float32)
    x /= np.float32(127.5)
    x -= np.float32(1.0)
    return x


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 [0, 255], rounded and clipped; NaN becomes 128 (mid gray).

    Accepts NumPy or CuPy arrays (CuPy is copied to the host)."""
    if hasattr(images, "__cuda_array_interface__"):
        images = images.get()
    x = np.asarray(images, dtype=np.float64)
    # Samples from a diverging model may hold NaN or inf; show them instead of failing the cast.
    x = np.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0)
    return np.clip(np.rint((x + 1.0) * 127.5), 0, 255).astype(np.uint8)


def resize_square(images: np.ndarray, size: int) -> np.ndarray:
    """Resize an (N, C, H, W) stack to (N, C, size, size) with PIL bilinear, image by image.

    uint8 stacks keep C in {1, 3}; float32 stacks must have C == 1 (PIL mode "F")."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    out = np.empty((n, c, size, size), dtype=images.dtype)
    for i, image in enumerate(images):
        hwc = image[0] if c == 1 else image.transpose(1, 2, 0)
        resized = np.asarray(Image.fromarray(hwc).resize((size, size), RESAMPLE))
        out[i] = resized[None] if c == 1 else resized.transpose(2, 0, 1)
    return out


def make_grid(images, nrow: int | None = None, padding: int = 2) -> np.ndarray:
    """Tile (N, C, H, W) images in [-1, 1] (C in {1, 3}) into one uint8 (rows, cols, C) array.

    ``nrow`` is the number of rows (default: a near-square grid); images fill the grid row by row,
    with ``padding`` black pixels between and around the tiles."""
    x = to_uint8(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[0] == 0:
        raise ValueError(
            f"make_grid: expected images of shape (N, C, H, W) with N >= 1 and C in {{1, 3}}, got {x.shape}"
        )
    n, c, h, w = x.shape
    if nrow is None:
        ncol = math.ceil(math.sqrt(n))
        nrow = math.ceil(n / ncol)
    elif nrow < 1:
        raise ValueError(f"make_grid: nrow must be >= 1, got {nrow}")
    else:
        ncol = math.ceil(n / nrow)
        nrow = math.ceil(n / ncol)  # no empty rows when nrow > n
    if padding < 0:
        raise ValueError(f"make_grid: padding must be >= 0, got {padding}")
    grid = np.zeros((padding + nrow * (h + padding), padding + ncol * (w + padding), c), dtype=np.uint8)
    for i in range(n):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top : top + h, left : left + w] = x[i].transpose(1, 2, 0)
    return grid


def save_grid(images, path, nrow: int | None = None, padding: int = 2, scale: int = 1) -> Path:
    """Write (N, C, H, W) images in [-1, 1] as one PNG grid (see ``make_grid``); returns the path.

    ``scale`` enlarges the grid by pixel repetition, so 16x16 samples can be seen."""
    if not isinstance(scale, (int, np.integer)) or scale < 1:
        raise ValueError(f"save_grid: scale must be a positive int, got {scale!r}")
    grid = make_grid(images, nrow=nrow, padding=padding)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(path, format="PNG")
    return path
