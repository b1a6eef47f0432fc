"""The tiny DDPM training run the command-line, trainer, fault, FID and MPI tests build on (8x8
digits, a 2-level U-Net with 8 base channels, 20 timesteps, a few steps), and ``cli``: the
command line run in-process."""

from __future__ import annotations

import copy

from minidiff.cli import main

TINY = {
    "dataset": "digits",
    "image_size": 8,
    "steps": 4,
    "batch_size": 8,
    "timesteps": 20,
    "sample_steps": 2,
    "sample_every": 2,
    "checkpoint_every": 2,
    "log_every": 1,
    "model": {
        "base_channels": 8,
        "channel_mults": [1, 2],
        "num_res_blocks": 1,
        "attn_resolutions": [4],
        "norm_groups": 4,
    },
}


def tiny_run(**overrides) -> dict:
    """A fresh copy of TINY with ``overrides``; those under "model" update the model's keys."""
    values = copy.deepcopy(TINY)
    model = overrides.pop("model", {})
    values.update(overrides)
    values["model"].update(model)
    return values


def cli(argv) -> int:
    """``main``'s exit status, returned or raised (argparse and usage errors raise SystemExit)."""
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code
