"""Training and the reports on a trained run.

ddpm.py      the DDPM Trainer, its config, checkpoints and exact resume; load_model
plot.py      the loss curve (loss.png)
evaluate.py  sample quality (FID and KID on Inception or minidiff's classifier) and bits/dim of a run

    from minidiff.train import Trainer, TrainConfig
    Trainer(TrainConfig(dataset="digits", steps=2000), out_dir="runs/digits").fit()
"""

from .ddpm import (
    CHECKPOINT_FORMAT,
    ModelConfig,
    TrainConfig,
    Trainer,
    TrainingDiverged,
    config_differences,
    load_model,
    load_split,
    upgrade_checkpoint_arrays,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "ModelConfig",
    "TrainConfig",
    "Trainer",
    "TrainingDiverged",
    "config_differences",
    "load_model",
    "load_split",
    "upgrade_checkpoint_arrays",
]
