"""The diffusion training step's own arithmetic: q_sample and the MSE loss, fused kernels against
the plain NumPy expressions they replace.

A training step draws x_t = sqrt_abar[t] x0 + sqrt(1 - abar[t]) noise, runs the model, and takes
the mean squared error against the noise. The plain NumPy version:

    x_t  = sqrt_abar[t].astype(f32)[:, None, None, None] * x0 + (...)[t] * noise
    loss = ((pred - noise) ** 2).mean()

against ``kernels.q_sample`` and ``kernels.mse_loss_forward`` (the implementation ``auto`` picks,
and each one by name), float32, median of repeated calls; the ratio is plain time / kernel time.

    python bench/qsample_loss.py
"""

from __future__ import annotations

import sys

import numpy as np

from minidiff import kernels
from minidiff.bench import median_seconds

SHAPES = [(64, 1, 16, 16), (32, 3, 32, 32), (128, 3, 32, 32)]
REPEATS = 15


def main() -> int:
    rng = np.random.default_rng(0)
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    sqrt_abar, sqrt_one_minus_abar = np.sqrt(abar), np.sqrt(1 - abar)
    print(f"{'shape':<18}{'impl':<10}{'plain us':>10}{'fused us':>10}{'speedup':>9}")
    for shape in SHAPES:
        x0, noise, pred = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
        t = rng.integers(0, abar.size, shape[0])
        data = (x0, noise, pred, t, (-1,) + (1,) * (len(shape) - 1))

        def plain(data=data):
            x0, noise, pred, t, view = data
            a = sqrt_abar[t].astype(np.float32).reshape(view)
            s = sqrt_one_minus_abar[t].astype(np.float32).reshape(view)
            a * x0 + s * noise
            return ((pred - noise) ** 2).mean()

        plain_s = median_seconds(plain, REPEATS)
        q_impls = kernels.implementations("q_sample")
        loss_impls = kernels.implementations("mse_loss_forward")
        choices = [("auto", kernels.q_sample, kernels.mse_loss_forward)]
        choices += [(n, q_impls[n], loss_impls[n]) for n in ("numba", "native") if n in q_impls]
        for name, q_sample, loss in choices:

            def fused(q_sample=q_sample, loss=loss, data=data):
                x0, noise, pred, t, _ = data
                q_sample(x0, noise, sqrt_abar, sqrt_one_minus_abar, t)
                return loss(pred, noise)

            fused_s = median_seconds(fused, REPEATS)
            print(
                f"{str(shape):<18}{name:<10}{1e6 * plain_s:>10.1f}{1e6 * fused_s:>10.1f}"
                f"{plain_s / fused_s:>8.1f}x"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
