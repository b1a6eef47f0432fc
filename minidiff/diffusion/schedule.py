"""Noise schedules: beta_t for t = 0..T-1, computed in float64."""

from __future__ import annotations

import math
import numbers

import numpy as np

SCHEDULES = ("linear", "cosine", "sigmoid")


def linear_betas(T=1000, beta_start=1e-4, beta_end=0.02) -> np.ndarray:
    """The DDPM schedule: betas evenly spaced from beta_start to beta_end."""
    return np.linspace(beta_start, beta_end, T, dtype=np.float64)


def cosine_betas(T=1000, s=0.008, max_beta=0.999) -> np.ndarray:
    """Nichol & Dhariwal (2021): alpha_bar(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
    beta_t = 1 - alpha_bar(t+1)/alpha_bar(t), clipped at max_beta."""
    steps = np.arange(T + 1, dtype=np.float64) / T
    alpha_bar = np.cos((steps + s) / (1 + s) * math.pi / 2) ** 2
    return np.minimum(1 - alpha_bar[1:] / alpha_bar[:-1], max_beta)


def sigmoid_betas(T=1000, beta_start=1e-4, beta_end=0.02, width=6.0) -> np.ndarray:
    """betas following a logistic curve over [-width, width] between beta_start and beta_end."""
    x = np.linspace(-width, width, T, dtype=np.float64)
    return beta_start + (beta_end - beta_start) / (1 + np.exp(-x))


def make_betas(name: str, T: int = 1000) -> np.ndarray:
    if not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"schedule: T must be a positive int, got {T!r}")
    if name == "linear":
        return linear_betas(T)
    if name == "cosine":
        return cosine_betas(T)
    if name == "sigmoid":
        return sigmoid_betas(T)
    raise ValueError(f"schedule: unknown schedule {name!r}; choose one of {SCHEDULES}")
