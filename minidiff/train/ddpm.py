"""Training a DDPM: the Trainer, its config, checkpoints and resume.

    trainer = Trainer(TrainConfig(dataset="digits", steps=2000), out_dir="runs/digits")
    trainer.fit()          # progress bar, loss.csv/loss.png, sample grids, checkpoints

A run stopped at step k (Ctrl-C, a crash, ``steps=k``) and resumed with
``Trainer.resume(out_dir)`` reaches exactly the weights of an uninterrupted run:
the checkpoint holds the weights, the optimizer moments, the EMA, the batch
iterator's position and every random generator's state.

Under ``mpiexec -n N`` each rank trains on its share of every global batch (the
images, noise and timesteps of the one-process run) and the gradients are
averaged across the ranks (minidiff.distributed); rank 0 alone writes files and
output. A checkpoint is the one-process run's, so it resumes with any number of ranks.
"""

from __future__ import annotations

import csv
import dataclasses
import io as io_module
import json
import math
import os
import shutil
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import distributed, io
from ..data import BatchIterator, load_dataset, save_grid
from ..diffusion import PREDICTIONS, SCHEDULES, GaussianDiffusion, ddim_sample
from ..models import UNet
from ..nn.layers import Dropout
from ..optim import EMA, AdamW
from ._step import apply_gradients, optimizer_state, progress_bar, write_loss_row
from .plot import plot_loss


@dataclass
class ModelConfig:
    base_channels: int = field(default=32, metadata={"help": "channels of the U-Net's first level (>= 1)"})
    channel_mults: tuple = field(
        default=(1, 2), metadata={"help": "channel multiplier of each level, one level per entry (each >= 1)"}
    )
    num_res_blocks: int = field(default=1, metadata={"help": "residual blocks per level (>= 1)"})
    attn_resolutions: tuple = field(
        default=(8,), metadata={"help": "feature-map sizes that get self-attention (may be empty)"}
    )
    dropout: float = field(default=0.0, metadata={"help": "dropout in the residual blocks, in [0, 1)"})
    norm_groups: int = field(
        default=8, metadata={"help": "group-norm groups; must divide every level's channel count"}
    )


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as JSON beside the checkpoints."""

    dataset: str = field(
        default="digits", metadata={"help": "digits | mnist:PATH | cifar10:PATH | folder:PATH"}
    )
    image_size: int | None = field(
        default=None, metadata={"help": "resize the images to this size (null: the dataset's own)"}
    )
    holdout: float = field(
        default=0.1, metadata={"help": "share of the images kept out of training for evaluation, in [0, 1)"}
    )
    # the default run: a few minutes on 2 CPU cores, recognizable digits (bench/quality.py)
    steps: int = field(default=900, metadata={"help": "optimizer steps of the run (>= 1)"})
    batch_size: int = field(default=32, metadata={"help": "images per step (>= 1)"})
    lr: float = field(default=1e-3, metadata={"help": "peak learning rate (> 0); may change on resume"})
    warmup_steps: int = field(default=100, metadata={"help": "steps of linear learning-rate warm-up (>= 0)"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (>= 0)"})
    grad_clip: float = field(
        default=1.0, metadata={"help": "clip the gradient norm to this (>= 0; 0: no clipping)"}
    )
    ema_decay: float = field(default=0.999, metadata={"help": "decay of the weights' EMA, in [0, 1]"})
    schedule: str = field(default="linear", metadata={"help": "noise schedule: linear | cosine | sigmoid"})
    timesteps: int = field(default=1000, metadata={"help": "diffusion steps T (>= 1)"})
    prediction: str = field(default="eps", metadata={"help": "what the U-Net predicts: eps | x0 | v"})
    min_snr_gamma: float | None = field(
        default=None, metadata={"help": "Min-SNR loss weighting gamma (> 0; null: none)"}
    )
    class_conditional: bool = field(default=True, metadata={"help": "condition on the labels (true | false)"})
    class_dropout: float = field(
        default=0.1,
        metadata={"help": "share of labels replaced by the null class (for guidance), in [0, 1)"},
    )
    flip: bool = field(default=False, metadata={"help": "random horizontal flips (true | false)"})
    seed: int = field(default=0, metadata={"help": "seed of the weights, batches and noise (>= 0)"})
    log_every: int = field(default=10, metadata={"help": "steps between loss.csv rows (>= 1)"})
    sample_every: int = field(default=300, metadata={"help": "steps between sample grids (>= 1)"})
    checkpoint_every: int = field(default=300, metadata={"help": "steps between checkpoints (>= 1)"})
    sample_steps: int = field(
        default=50, metadata={"help": "DDIM steps of the sample grids, in [1, timesteps]"}
    )
    max_loss: float | None = field(
        default=100.0,
        metadata={
            "help": "a loss above this stops the run as diverged (> 0; null: only non-finite losses); "
            "the losses of every prediction start near 1; may change on resume"
        },
    )
    model: ModelConfig = field(default_factory=ModelConfig, metadata={"help": "the U-Net (keys below)"})

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        if not isinstance(values, dict):
            raise ValueError(
                "config: must be a JSON object of TrainConfig fields, got "
                f"{type(values).__name__} {values!r:.60}"
            )
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(known)}")
        model = values.pop("model", {}) or {}
        if not isinstance(model, dict):
            raise ValueError(f"config: model must be an object of ModelConfig fields, got {model!r:.60}")
        model = dict(model)
        model_known = {f.name for f in dataclasses.fields(ModelConfig)}
        bad = sorted(set(model) - model_known)
        if bad:
            raise ValueError(f"config: unknown model keys {bad}; known keys are {sorted(model_known)}")
        for key in ("channel_mults", "attn_resolutions"):
            if key in model:
                if not isinstance(model[key], (list, tuple)):
                    raise ValueError(f"config: model.{key} must be a list of integers, got {model[key]!r}")
                model[key] = tuple(model[key])
        return cls(**values, model=ModelConfig(**model))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        """Check every field's type and range, naming the key, before anything is built."""
        for name in ("steps", "batch_size", "timesteps", "log_every", "sample_every", "checkpoint_every"):
            _check_int(name, getattr(self, name), low=1)
        _check_int("warmup_steps", self.warmup_steps, low=0)
        _check_int("seed", self.seed, low=0)
        _check_int("sample_steps", self.sample_steps, low=1, high=self.timesteps, high_name="timesteps")
        if self.image_size is not None:
            _check_int("image_size", self.image_size, low=1)
        _check_float("lr", self.lr, low=0, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0)
        _check_float("grad_clip", self.grad_clip, low=0)
        _check_float("ema_decay", self.ema_decay, low=0, high=1)
        _check_float("holdout", self.holdout, low=0, high=1, high_open=True)
        _check_float("class_dropout", self.class_dropout, low=0, high=1, high_open=True)
        for name in ("min_snr_gamma", "max_loss"):
            if getattr(self, name) is not None:
                _check_float(name, getattr(self, name), low=0, low_open=True)
        if not isinstance(self.dataset, str) or not self.dataset:
            raise ValueError(f"config: dataset must be a name such as 'digits', got {self.dataset!r}")
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_choice("prediction", self.prediction, PREDICTIONS)
        for name in ("class_conditional", "flip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config: {name} must be true or false, got {getattr(self, name)!r}")
        m = self.model
        if not isinstance(m, ModelConfig):
            raise ValueError(f"config: model must be a ModelConfig, got {m!r:.60}")
        _check_int("model.base_channels", m.base_channels, low=1)
        _check_int("model.num_res_blocks", m.num_res_blocks, low=1)
        _check_int("model.norm_groups", m.norm_groups, low=1)
        _check_float("model.dropout", m.dropout, low=0, high=1, high_open=True)
        for name in ("channel_mults", "attn_resolutions"):
            values = getattr(m, name)
            if not isinstance(values, (list, tuple)) or (name == "channel_mults" and not values):
                raise ValueError(f"config: model.{name} must be a list of integers, got {values!r}")
            for value in values:
                _check_int(f"model.{name}", value, low=1)
        for mult in m.channel_mults:
            if (m.base_channels * mult) % m.norm_groups:
                raise ValueError(
                    f"config: model.norm_groups ({m.norm_groups}) must divide every level's channels "
                    f"(model.base_channels {m.base_channels} x model.channel_mults {list(m.channel_mults)})"
                )


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _check_int(name, value, low, high=None, high_name=None):
    if not _is_int(value):
        raise ValueError(f"config: {name} must be an integer, got {value!r}")
    if value < low or (high is not None and value > high):
        if high is None:
            raise ValueError(f"config: {name} must be >= {low}, got {value}")
        bound = f"{high_name} ({high})" if high_name else str(high)
        raise ValueError(f"config: {name} must be in [{low}, {bound}], got {value}")


def _check_float(name, value, low=None, high=None, low_open=False, high_open=False):
    if not (_is_int(value) or isinstance(value, (float, np.floating))) or not math.isfinite(value):
        raise ValueError(f"config: {name} must be a finite number, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            raise ValueError(f"config: {name} must be {'>' if low_open else '>='} {low}, got {value}")
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"config: {name} must be in {left}{low}, {high}{right}, got {value}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"config: {name} must be one of {', '.join(choices)}, got {value!r}")


def config_help() -> str:
    """Every config key with its default and meaning (``minidiff train --help-config``)."""
    lines = ["TrainConfig keys (a JSON object for --config; the command-line flags override them):"]
    for cls, prefix in ((TrainConfig, ""), (ModelConfig, "model.")):
        defaults = cls()
        for f in dataclasses.fields(cls):
            if f.name == "model":
                continue
            value = json.dumps(getattr(defaults, f.name))
            lines.append(f"  {prefix + f.name:<24} {value:<10} {f.metadata.get('help', '')}")
    return "\n".join(lines)


# Keys a resumed run may change: the target step count, and the learning rate and divergence
# threshold (to recover a run that diverged from its newest checkpoint).
RESUMABLE_CHANGES = ("steps", "lr", "max_loss")


def config_differences(saved: TrainConfig, requested: dict) -> list[str]:
    """The keys (``model.<key>`` for the model's) whose value in ``requested``, a config or part
    of one as a JSON file or the command line gives it, differs from ``saved``'s. Keys it does
    not name keep the saved value."""
    old = saved.to_dict()
    merged = {**old, **requested, "model": {**old["model"], **(requested.get("model") or {})}}
    new = TrainConfig.from_dict(merged).to_dict()
    differing = [k for k in old if k != "model" and new[k] != old[k]]
    return differing + [f"model.{k}" for k in old["model"] if new["model"][k] != old["model"][k]]


CHECKPOINT_FORMAT = "minidiff-checkpoint-2"
# Format 1 held the U-Net's attention projections as 1x1 convolutions named q, k, v, proj_out;
# format 2 has the shared nn.Attention's linear to_q, to_k, to_v, to_out.0 (the same numbers).
_FORMAT_1_ATTENTION = {"q": "attn.to_q", "k": "attn.to_k", "v": "attn.to_v", "proj_out": "attn.to_out.0"}


def upgrade_checkpoint_arrays(group: dict, state: dict) -> dict:
    """The arrays of one checkpoint group (model, ema, optimizer) under the current names."""
    if state.get("format") != "minidiff-checkpoint-1":
        return group
    upgraded = {}
    for key, value in group.items():
        head, _, leaf = key.rpartition(".")
        block, _, layer = head.rpartition(".")
        if block.endswith("attn") and layer in _FORMAT_1_ATTENTION:
            key = f"{block}.{_FORMAT_1_ATTENTION[layer]}.{leaf}"
            value = value.reshape(value.shape[:2]) if value.ndim == 4 else value
        upgraded[key] = value
    return upgraded


def load_split(config: TrainConfig):
    """(training images, held-out images or None), the same for every run with this config."""
    data = load_dataset(config.dataset, image_size=config.image_size)
    if not config.holdout:
        return data, None
    return data.split(config.holdout, seed=config.seed)


class TrainingDiverged(RuntimeError):
    pass


class RunExistsError(ValueError):
    """A fresh run asked to start in a folder that holds another run's outputs."""


LOG_HEADER = ["step", "loss", "lr"]
# What a run writes into its folder; a fresh run refuses a folder holding any of them.
RUN_OUTPUTS = ("checkpoints", "loss.csv", "loss.png", "config.json", "samples")


def existing_run_outputs(out_dir) -> list[str]:
    """The names of ``RUN_OUTPUTS`` present in ``out_dir``."""
    out_dir = Path(out_dir)
    return [name for name in RUN_OUTPUTS if (out_dir / name).exists()]


def agreed_run_outputs(out_dir, refuse=False) -> list[str]:
    """``existing_run_outputs`` as rank 0 finds them, on every rank: under mpiexec a rank
    looking for itself could find the files rank 0 has just begun writing. ``refuse``: the
    caller refuses the folder when any are found, which every rank then does together, so
    their exits are not a failure that aborts the others."""
    world = distributed.setup()
    found = world.from_root(existing_run_outputs(out_dir) if world.is_root else None)
    if found and refuse:
        world.close()
    return found


def require_one_process(what: str):
    """Refuse to run ``what``, which trains in one process, under mpiexec: each rank would
    train the same run into the same folder."""
    ranks = distributed.launched_ranks()
    if ranks > 1:
        raise ValueError(
            f"{what} runs in one process, not across {ranks} MPI ranks (each would write the same "
            "folder); start it without mpiexec"
        )


def _loss_rows_up_to(path: Path, step: int) -> list[list[str]]:
    """The rows of an existing loss.csv up to ``step`` (none for a fresh run); a row torn
    by a kill mid-write is dropped."""
    if step == 0 or not path.exists():
        return []
    rows = []
    with open(path, newline="") as f:
        for row in csv.reader(f):
            try:
                if len(row) == 3 and int(row[0]) <= step:
                    rows.append(row)
            except ValueError:  # the header, or a torn row
                pass
    return rows


def _log_text(header, rows) -> str:
    """The text of a loss.csv holding ``rows``."""
    buffer = io_module.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def _write_text_atomically(path: Path, text: str):
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(text)
        f.flush()
    tmp.replace(path)


def copy_state(state: dict) -> dict:
    return json.loads(json.dumps(state))


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict):
    rng.bit_generator.state = state


class Trainer:
    """``overwrite=True`` lets a fresh run start in a folder holding another run, whose
    checkpoints, logs and samples it deletes first; else such a folder is refused."""

    def __init__(self, config: TrainConfig, out_dir, progress=True, overwrite=False):
        config.validate()
        self.world = distributed.setup()  # a world of one outside mpiexec
        self.world.shard(config.batch_size)  # refuses a batch smaller than the ranks
        self.config, self.out_dir, self.progress = config, Path(out_dir), progress and self.world.is_root
        self.overwrite = overwrite
        self.dataset, self.held_out = load_split(config)
        images = self.dataset.images
        num_classes = self.dataset.num_classes if config.class_conditional else None
        m = config.model
        self.model = UNet(
            images.shape[1],
            m.base_channels,
            m.channel_mults,
            m.num_res_blocks,
            m.attn_resolutions,
            images.shape[-1],
            dropout=m.dropout,
            norm_groups=m.norm_groups,
            num_classes=num_classes,
            seed=config.seed,
        )
        self.num_classes = num_classes
        self.diffusion = GaussianDiffusion(
            schedule=config.schedule,
            T=config.timesteps,
            prediction=config.prediction,
            min_snr_gamma=config.min_snr_gamma,
        )
        self.params = self.model.parameters()
        self.optimizer = AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.ema = EMA(self.params, decay=config.ema_decay)
        # One generator for timesteps, noise, label dropout and the model's dropout
        # layers, so a checkpoint captures all randomness in one state.
        self.rng = np.random.default_rng(config.seed + 1)
        # What a step draws from: self.rng, or with several ranks this rank's rows of its draws
        self.draws = self.world.generator(self.rng)
        for module in self.model.modules():
            if isinstance(module, Dropout):
                module.rng = self.draws
        self.averager = self.world.averager(self.params)  # None in a world of one
        self.batches = BatchIterator(self.dataset, config.batch_size, seed=config.seed, flip=config.flip)
        self.step = 0
        self._stop_requested = False
        # whether this trainer owns what is in out_dir (it resumed it, or has trained there)
        self._continuing = False

    # -- one step ---------------------------------------------------------------------
    def train_step(self) -> float:
        images, labels = next(self.batches)
        y = None
        if self.num_classes is not None:
            y = np.asarray(labels, dtype=np.int64).copy()
            y[self.rng.random(len(y)) < self.config.class_dropout] = self.num_classes  # the null class
        n = len(images)
        lo, hi = self.world.shard(n)
        if self.averager is not None:  # this rank's rows of the step (the whole of it in a world of one)
            self.draws.shard(lo, hi, n)
            images, y = images[lo:hi], (y[lo:hi] if y is not None else None)
        loss = self.diffusion.training_loss(self.model, images, y=y, generator=self.draws)
        value = loss.item()
        if self.averager is not None:  # the mean over the whole batch, so every rank agrees
            value = self.world.sum(value * (hi - lo) / n)
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss became {value} at step {self.step + 1}")
        if self.config.max_loss is not None and value > self.config.max_loss:
            raise TrainingDiverged(
                f"loss became {value:.4g} at step {self.step + 1}, above max_loss {self.config.max_loss:g}"
            )
        self.optimizer.zero_grad()
        if self.averager is None:
            loss.backward()
        else:
            self.averager.backward(loss, weight=(hi - lo) / n)
        apply_gradients(self.optimizer, self.ema, self.params, self.step, self.config, self.config.grad_clip)
        self.step += 1
        return value

    # -- checkpoints ----------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoints"

    def state(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "step": self.step,
            "num_classes": self.num_classes,
            "image_shape": list(self.dataset.images.shape[1:]),
            "rng": _rng_state(self.rng),
            "batches": self.batches.state_dict(),
            **optimizer_state(self.optimizer, self.ema),
        }

    def checkpoint_payload(self, copy=False) -> tuple[str, dict, dict]:
        """(name, arrays, state) of a checkpoint of the current step; ``copy`` detaches the
        arrays from the training buffers, which the next steps change in place."""
        names = [n for n, _ in self.model.named_parameters()]
        opt = self.optimizer.state_dict()
        arrays = {
            "model": self.model.state_dict(),
            "ema": dict(zip(names, self.ema.state_dict()["shadow"])),
            "optimizer": {
                **{f"m.{n}": m for n, m in zip(names, opt["m"])},
                **{f"v.{n}": v for n, v in zip(names, opt["v"])},
            },
        }
        if copy:
            arrays = {g: {k: np.array(v, copy=True) for k, v in group.items()} for g, group in arrays.items()}
        return f"step-{self.step:08d}", arrays, copy_state(self.state()) if copy else self.state()

    def save_checkpoint(self, payload=None) -> Path | None:
        """Write ``payload`` (from checkpoint_payload), or the current step's checkpoint; rank 0
        alone (other ranks return None)."""
        if not self.world.is_root:
            return None
        name, arrays, state = payload or self.checkpoint_payload()
        return io.save_checkpoint(self.checkpoint_dir, name, arrays, state)

    @classmethod
    def resume(cls, out_dir, progress=True, steps=None, config=None) -> Trainer:
        """Rebuild a trainer from the newest checkpoint under ``out_dir``. ``steps`` may change
        the target step count (not below the checkpoint's step); ``config`` (a dict of config
        fields, e.g. the run's own config.json) must agree with the saved config on every key
        it names but those of ``RESUMABLE_CHANGES`` (steps, lr, max_loss)."""
        arrays, state, where = io.load_checkpoint(Path(out_dir), groups=("model", "ema", "optimizer"))
        for group in ("model", "ema"):
            _check_finite(arrays[group], where / f"{group}.safetensors")
        arrays = {group: upgrade_checkpoint_arrays(values, state) for group, values in arrays.items()}
        try:
            saved = TrainConfig.from_dict(state["config"])
        except (KeyError, ValueError, TypeError) as exc:
            raise io.CheckpointError(f"checkpoint {where} has no usable config: {exc}") from None
        changes = {}
        if config:
            differing = [k for k in config_differences(saved, config) if k not in RESUMABLE_CHANGES]
            if differing:
                raise ValueError(
                    f"config: a resumed run keeps its saved config ({where / io.STATE_FILE}), which "
                    f"differs from the given one in {', '.join(differing)} (only "
                    f"{', '.join(RESUMABLE_CHANGES)} may change)"
                )
            changes = {k: config[k] for k in RESUMABLE_CHANGES if k in config}
        if steps is not None:
            changes["steps"] = steps
        at = state.get("step")
        if _is_int(changes.get("steps")) and _is_int(at) and changes["steps"] < at:
            raise ValueError(
                f"config: steps ({changes['steps']}) is below the step the run has reached ({at}, "
                f"{where}); give at least {at}"
            )
        config = dataclasses.replace(saved, **changes)
        trainer = cls(config, out_dir, progress=progress)
        try:
            names = [n for n, _ in trainer.model.named_parameters()]
            trainer.model.load_state_dict(arrays["model"])
            trainer.ema.load_state_dict({**state["ema"], "shadow": [arrays["ema"][n] for n in names]})
            trainer.optimizer.load_state_dict(
                {
                    **state["optimizer"],
                    "m": [arrays["optimizer"][f"m.{n}"] for n in names],
                    "v": [arrays["optimizer"][f"v.{n}"] for n in names],
                }
            )
            trainer.batches.load_state_dict(state["batches"])
            _set_rng_state(trainer.rng, state["rng"])
            trainer.step = int(state["step"])
        except (KeyError, ValueError, TypeError) as exc:
            raise io.CheckpointError(f"checkpoint {where} does not match its config: {exc}") from None
        trainer._continuing = True
        return trainer

    # -- the loop ---------------------------------------------------------------------------
    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def _claim_out_dir(self):
        """A fresh run never takes over a folder holding another run, unless told to."""
        if self._continuing:
            return
        found = existing_run_outputs(self.out_dir)
        if found and not self.overwrite:
            newest = ""
            if io.has_checkpoint(self.out_dir):
                newest = f", checkpoint {io.resolve_checkpoint(self.out_dir).name}"
            raise RunExistsError(
                f"{self.out_dir} already holds a run ({', '.join(found)}{newest}); resume it "
                "(--resume), choose another --out, or pass --overwrite to delete it and start afresh"
            )
        for name in found:
            path = self.out_dir / name
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        self._continuing = True

    def _open_log(self):
        """loss.csv opened for appending, holding exactly the rows up to the current step: a
        run resumed from an older checkpoint redoes the later rows. The file is rebuilt in a
        temporary file and renamed, so a kill at any moment leaves the old or the new one."""
        path = self.out_dir / "loss.csv"
        rows = _loss_rows_up_to(path, self.step)
        text = _log_text(LOG_HEADER, rows)
        if not path.exists() or path.read_text() != text:
            _write_text_atomically(path, text)
        return open(path, "a", newline="")

    def _divergence_note(self) -> str:
        """What exists to go back to after a divergence, said as it is."""
        if not io.has_checkpoint(self.out_dir):
            return (
                "no checkpoint was written before it, so there is nothing to resume; start again "
                "with a lower --lr (and --overwrite)"
            )
        where = io.resolve_checkpoint(self.out_dir)
        return (
            f"the newest checkpoint, {where.name} in {where.parent}, was written while the loss was "
            "finite and below max_loss; resume it with --resume and a lower --lr"
        )

    def fit(self) -> dict:
        """Train until ``config.steps``. Ctrl-C or SIGTERM finishes the current step, saves
        a checkpoint and returns; a non-finite loss, or one above ``max_loss``, stops the
        run. A checkpoint is written only once the loss of the step after it was sane, so
        the one kept after a divergence is not already blown up. Returns a summary dict."""
        # Under mpiexec rank 0 alone makes, locks and claims the folder, and the others take its
        # answer: a rank never sees rank 0's fresh files as another run's, nor is refused rank
        # 0's lock, and a refusal stops every rank at once (not a rank left waiting).
        lock = refused = None
        if self.world.is_root:
            try:
                self.out_dir.mkdir(parents=True, exist_ok=True)
                lock = io.RunLock(self.out_dir).acquire()  # a second trainer on this folder is refused
                self._claim_out_dir()
            except (RunExistsError, io.RunLockedError, OSError) as exc:
                refused = exc
        refused = self.world.from_root(refused)
        if refused is not None:
            if lock is not None:
                lock.release()
            self.world.close()  # every rank refuses: a clean end, not a failure
            raise refused
        self._continuing = True
        try:
            return self._fit_locked()
        finally:
            if lock is not None:
                lock.release()

    def _fit_locked(self) -> dict:
        root = self.world.is_root
        self.world.begin()
        self.world.broadcast([p.data for p in self.params] + self.ema.shadow)
        log_path = self.out_dir / "loss.csv"
        if root:
            _write_text_atomically(self.out_dir / "config.json", json.dumps(self.config.to_dict(), indent=1))
        log = self._open_log() if root else open(os.devnull, "w", newline="")
        writer = csv.writer(log)
        self._stop_requested = False
        # signal handlers can only be installed from the main thread; SIGTERM (kill, timeout)
        # is a request to stop like Ctrl-C
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = {}
        if in_main_thread:
            for signum in (signal.SIGINT, signal.SIGTERM):
                previous[signum] = signal.signal(signum, self._request_stop)
        bar = progress_bar("train", self.config.steps, self.step, self.progress)
        status, recent, pending = "finished", [], None
        try:
            while self.step < self.config.steps:
                loss = self.train_step()
                if pending is not None:  # the loss of the weights it holds was sane: keep it
                    self.save_checkpoint(pending)
                    pending = None
                recent.append(loss)
                bar.update(1)
                last = self.step == self.config.steps
                if self.step % self.config.log_every == 0 or last:
                    write_loss_row(log, writer, bar, self.step, recent, self.optimizer.lr)
                    recent = []
                if self.step % self.config.sample_every == 0 or last:
                    self.save_samples()
                # one answer per step, the same on every rank: all stop at the same step, and
                # the step that stops is the one checkpointed
                stop = self.world.any(self._stop_requested)
                if stop or last:
                    self.save_checkpoint()
                elif self.step % self.config.checkpoint_every == 0 and root:
                    pending = self.checkpoint_payload(copy=True)  # kept once the next loss is sane
                if stop:
                    status = "interrupted"
                    break
        except TrainingDiverged as exc:
            status = "diverged"
            if root:
                bar.write(f"stopping: {exc}; {self._divergence_note()}")
        except BaseException as exc:
            self.world.fail(exc)  # with several ranks: stop the others, which would wait forever
            raise
        finally:
            bar.close()
            log.close()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if root:
                plot_loss(log_path, self.out_dir / "loss.png")
        self.world.close()
        if status == "interrupted" and root:
            print(f"interrupted at step {self.step}; checkpoint saved, resume with --resume")
        return {"status": status, "step": self.step, "out_dir": str(self.out_dir)}

    def ema_model(self) -> UNet:
        """A copy of the model carrying the EMA weights (what sampling uses)."""
        names = [n for n, _ in self.model.named_parameters()]
        model = UNet(**self.model.config, seed=self.config.seed)
        model.load_state_dict({n: s for n, s in zip(names, self.ema.shadow)})
        return model.eval()

    def save_samples(self, count=None) -> Path:
        """A grid of DDIM samples from the EMA weights (when conditional: two rows,
        each with every class in order); rank 0 alone, other ranks return None."""
        if not self.world.is_root:
            return None
        model = self.ema_model()
        y = None
        if self.num_classes is not None:
            y = np.tile(np.arange(self.num_classes), 2)
        n = len(y) if y is not None else (count or 16)
        shape = (n,) + tuple(self.dataset.images.shape[1:])
        images = ddim_sample(
            model, self.diffusion, shape, steps=self.config.sample_steps, generator=1234, y=y
        )
        path = self.out_dir / "samples" / f"step-{self.step:08d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        save_grid(images, path, nrow=2 if y is not None else None, scale=max(1, 64 // shape[-1]))
        return path


def _check_finite(arrays: dict, file):
    """Weights holding NaN or infinity sample NaN images: refused when loaded."""
    bad = [name for name, value in arrays.items() if not np.isfinite(value).all()]
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise io.CheckpointError(
            f"checkpoint file {file} holds non-finite values (NaN or inf) in {', '.join(bad[:3])}{more}"
        )


def load_model(checkpoint, weights="ema"):
    """(model, diffusion, state) from a checkpoint directory (or a run's output
    folder): the U-Net with its EMA weights (``weights="ema"``) or its raw
    training weights (``"model"``), and the diffusion process it was trained with."""
    if weights not in ("ema", "model"):
        raise ValueError(f"load_model: weights must be 'ema' or 'model', got {weights!r}")
    arrays, state, where = io.load_checkpoint(checkpoint, groups=(weights,))
    _check_finite(arrays[weights], where / f"{weights}.safetensors")
    try:
        config = TrainConfig.from_dict(state["config"])
        channels, size = state["image_shape"][0], state["image_shape"][-1]
        m = config.model
        model = UNet(
            channels,
            m.base_channels,
            m.channel_mults,
            m.num_res_blocks,
            m.attn_resolutions,
            size,
            dropout=m.dropout,
            norm_groups=m.norm_groups,
            num_classes=state["num_classes"],
        )
        model.load_state_dict(upgrade_checkpoint_arrays(arrays[weights], state))
    except (KeyError, ValueError, TypeError) as exc:
        raise io.CheckpointError(f"checkpoint {where} is inconsistent: {exc}") from None
    diffusion = GaussianDiffusion(
        schedule=config.schedule,
        T=config.timesteps,
        prediction=config.prediction,
        min_snr_gamma=config.min_snr_gamma,
    )
    return model.eval(), diffusion, state
