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


# The beta schedules diffusers' scheduler_config.json files name (its `beta_schedule` key).
DIFFUSERS_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")


def scaled_linear_betas(T=1000, beta_start=0.00085, beta_end=0.012) -> np.ndarray:
    """Stable Diffusion's schedule: sqrt(beta) evenly spaced from sqrt(beta_start) to sqrt(beta_end)."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), T, dtype=np.float64) ** 2


def squaredcos_cap_v2_betas(T=1000, max_beta=0.999) -> np.ndarray:
    """The cosine schedule as diffusers writes it (``betas_for_alpha_bar``): alpha_bar(t) =
    cos^2((t + 0.008) / 1.008 * pi/2), beta_i = min(1 - alpha_bar((i+1)/T) / alpha_bar(i/T), max_beta),
    evaluated with Python's math (scalar libm) so the values are diffusers' to the last bit."""

    def alpha_bar(t):
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return np.array(betas, dtype=np.float64)


def linspace_float32(start, end, n) -> np.ndarray:
    """``n`` float32 values from ``start`` to ``end`` rounded as PyTorch's float32 ``linspace`` rounds
    them: the step (end - start) / (n - 1) in float32, then start + step * i for the first half and
    end - step * (n - 1 - i) for the second, each rounded once (a fused multiply-add). The products are
    exact in float64 and, for schedule-sized values, so are the sums, so float64 arithmetic followed by
    one rounding to float32 gives that single rounding."""
    start, end = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start], dtype=np.float32)
    step = np.float64((end - start) / np.float32(n - 1))
    i = np.arange(n, dtype=np.float64)
    front = np.float64(start) + step * i
    back = np.float64(end) - step * (n - 1 - i)
    return np.where(i < n // 2, front, back).astype(np.float32)


def diffusers_betas(name: str, T: int = 1000, beta_start=1e-4, beta_end=0.02) -> np.ndarray:
    """The float32 betas a diffusers scheduler holds for ``beta_schedule=name``, bit for bit:
    "linear" and "scaled_linear" come from float32 linspaces (squared in float32 for the latter),
    "squaredcos_cap_v2" is computed in float64 and rounded to float32."""
    if not isinstance(T, numbers.Integral) or T < 1:
        raise ValueError(f"schedule: T must be a positive int, got {T!r}")
    if name == "linear":
        return linspace_float32(beta_start, beta_end, T)
    if name == "scaled_linear":
        root = linspace_float32(math.sqrt(beta_start), math.sqrt(beta_end), T)
        return root * root
    if name == "squaredcos_cap_v2":
        return squaredcos_cap_v2_betas(T).astype(np.float32)
    raise ValueError(f"schedule: unknown schedule {name!r}; choose one of {DIFFUSERS_SCHEDULES}")
