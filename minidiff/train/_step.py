"""The end of a training step once its gradients are in, the same in every trainer of train/."""

from __future__ import annotations

import numpy as np

from ..optim import clip_grad_norm, warmup_lr


def apply_gradients(optimizer, ema, params, step: int, schedule, grad_clip):
    """Clip the gradients' global norm to ``grad_clip`` (0 or None: no clipping), set the learning
    rate of the 0-based ``step`` on the warm-up ramp of ``schedule`` (its ``lr`` and
    ``warmup_steps``), step the optimizer, update the EMA."""
    if grad_clip:
        clip_grad_norm(params, grad_clip)
    optimizer.lr = warmup_lr(step, schedule.lr, schedule.warmup_steps)
    optimizer.step()
    ema.update()


def progress_bar(name: str, total: int, initial: int, show: bool):
    """The steps' progress bar of a training loop (tqdm, imported only when a loop runs)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not show, desc=name, unit="step", dynamic_ncols=True)


def write_loss_row(log, writer, bar, step: int, losses, lr: float):
    """One loss.csv row: the step, the mean of ``losses`` (those since the last row) and the
    learning rate; flushed, so an interrupted run keeps it, and shown on the progress bar."""
    mean = float(np.mean(losses))
    writer.writerow([step, f"{mean:.6f}", f"{lr:.3g}"])
    log.flush()
    bar.set_postfix(loss=f"{mean:.4f}")


def optimizer_state(optimizer, ema) -> dict:
    """The JSON part of a checkpoint for the optimizer and the EMA (their arrays go beside it)."""
    return {
        "optimizer": {
            "step_count": optimizer.step_count,
            "lr": optimizer.lr,
            "steps": list(optimizer.steps),
        },
        "ema": {"decay": ema.decay, "updates": ema.updates},
    }
