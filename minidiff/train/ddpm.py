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
import json
import math
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import distributed, io
from ..data import BatchIterator, load_dataset, save_grid
from ..diffusion import GaussianDiffusion, ddim_sample
from ..models import UNet
from ..nn.layers import Dropout
from ..optim import EMA, AdamW, clip_grad_norm, warmup_lr
from .plot import plot_loss


@dataclass
class ModelConfig:
    base_channels: int = 32
    channel_mults: tuple = (1, 2)
    num_res_blocks: int = 1
    attn_resolutions: tuple = (8,)
    dropout: float = 0.0
    norm_groups: int = 8


@dataclass
class TrainConfig:
    """Everything that defines a run; saved as JSON beside the checkpoints."""

    dataset: str = "digits"
    image_size: int | None = None
    holdout: float = 0.1  # share of the images kept out of training, for evaluation
    # the default run: about 10 minutes on 2 CPU cores, recognizable digits (bench/quality.py)
    steps: int = 900
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    schedule: str = "linear"
    timesteps: int = 1000
    prediction: str = "eps"
    min_snr_gamma: float | None = None
    class_conditional: bool = True
    class_dropout: float = 0.1  # labels replaced by the null class, for classifier-free guidance
    flip: bool = False
    seed: int = 0
    log_every: int = 10
    sample_every: int = 300
    checkpoint_every: int = 300
    sample_steps: int = 50
    model: ModelConfig = field(default_factory=ModelConfig)

    @classmethod
    def from_dict(cls, values: dict) -> TrainConfig:
        values = dict(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(known)}")
        model = values.pop("model", {}) or {}
        model_known = {f.name for f in dataclasses.fields(ModelConfig)}
        bad = sorted(set(model) - model_known)
        if bad:
            raise ValueError(f"config: unknown model keys {bad}; known keys are {sorted(model_known)}")
        for key in ("channel_mults", "attn_resolutions"):
            if key in model:
                model[key] = tuple(model[key])
        return cls(**values, model=ModelConfig(**model))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        for name in ("steps", "batch_size", "timesteps", "log_every", "sample_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"config: lr must be positive, got {self.lr}")
        if not 0 <= self.holdout < 1:
            raise ValueError(f"config: holdout must be in [0, 1), got {self.holdout}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"config: class_dropout must be in [0, 1), got {self.class_dropout}")


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


def _loss_rows_up_to(path: Path, step: int) -> list[list[str]]:
    """The rows of an existing loss.csv up to ``step`` (none for a fresh run)."""
    if step == 0 or not path.exists():
        return []
    with open(path, newline="") as f:
        return [
            [row["step"], row["loss"], row["lr"]] for row in csv.DictReader(f) if int(row["step"]) <= step
        ]


def _rng_state(rng: np.random.Generator) -> dict:
    return rng.bit_generator.state


def _set_rng_state(rng: np.random.Generator, state: dict):
    rng.bit_generator.state = state


class Trainer:
    def __init__(self, config: TrainConfig, out_dir, progress=True):
        config.validate()
        self.world = distributed.setup()  # a world of one outside mpiexec
        self.world.shard(config.batch_size)  # refuses a batch smaller than the ranks
        self.config, self.out_dir, self.progress = config, Path(out_dir), progress and self.world.is_root
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
        self.optimizer.zero_grad()
        if self.averager is None:
            loss.backward()
        else:
            self.averager.backward(loss, weight=(hi - lo) / n)
        if self.config.grad_clip:
            clip_grad_norm(self.params, self.config.grad_clip)
        self.optimizer.lr = warmup_lr(self.step, self.config.lr, self.config.warmup_steps)
        self.optimizer.step()
        self.ema.update()
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
            "optimizer": {
                "step_count": self.optimizer.step_count,
                "lr": self.optimizer.lr,
                "steps": list(self.optimizer.steps),
            },
            "ema": {"decay": self.ema.decay, "updates": self.ema.updates},
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint (rank 0 alone; other ranks return None)."""
        if not self.world.is_root:
            return None
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
        return io.save_checkpoint(self.checkpoint_dir, f"step-{self.step:08d}", arrays, self.state())

    @classmethod
    def resume(cls, out_dir, progress=True, steps=None, config=None) -> Trainer:
        """Rebuild a trainer from the newest checkpoint under ``out_dir``. ``steps`` may change
        the target step count; ``config`` (a dict of config fields, e.g. the run's own
        config.json) must agree with the saved config on every key it names but ``steps``."""
        arrays, state, where = io.load_checkpoint(Path(out_dir), groups=("model", "ema", "optimizer"))
        arrays = {group: upgrade_checkpoint_arrays(values, state) for group, values in arrays.items()}
        try:
            saved = TrainConfig.from_dict(state["config"])
        except (KeyError, ValueError, TypeError) as exc:
            raise io.CheckpointError(f"checkpoint {where} has no usable config: {exc}") from None
        if config:
            differing = [k for k in config_differences(saved, config) if k != "steps"]
            if differing:
                raise ValueError(
                    f"config: a resumed run keeps its saved config ({where / io.STATE_FILE}), which "
                    f"differs from the given one in {', '.join(differing)} (only steps may change)"
                )
            if steps is None and "steps" in config:
                steps = config["steps"]
        config = saved
        if steps is not None:
            config.steps = steps
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
        return trainer

    # -- the loop ---------------------------------------------------------------------------
    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def fit(self) -> dict:
        """Train until ``config.steps``. Ctrl-C finishes the current step, saves
        a checkpoint and returns; a non-finite loss stops the run, keeping the
        last good checkpoint. Returns a summary dict."""
        from tqdm import tqdm

        root = self.world.is_root
        self.world.begin()
        self.world.broadcast([p.data for p in self.params] + self.ema.shadow)
        log_path = self.out_dir / "loss.csv"
        if root:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / "config.json").write_text(json.dumps(self.config.to_dict(), indent=1))
            rows = _loss_rows_up_to(log_path, self.step)  # rows past a resumed step are redone
        log = open(log_path if root else os.devnull, "w", newline="")
        writer = csv.writer(log)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(rows if root else [])
        self._stop_requested = False
        # signal handlers can only be installed from the main thread
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous_handler = signal.signal(signal.SIGINT, self._request_stop) if in_main_thread else None
        bar = tqdm(
            total=self.config.steps,
            initial=self.step,
            disable=not self.progress,
            desc="train",
            unit="step",
            dynamic_ncols=True,
        )
        status, recent = "finished", []
        try:
            while self.step < self.config.steps:
                loss = self.train_step()
                recent.append(loss)
                bar.update(1)
                if self.step % self.config.log_every == 0 or self.step == self.config.steps:
                    mean_loss = float(np.mean(recent))
                    writer.writerow([self.step, f"{mean_loss:.6f}", f"{self.optimizer.lr:.3g}"])
                    log.flush()
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    recent = []
                if self.step % self.config.sample_every == 0 or self.step == self.config.steps:
                    self.save_samples()
                if self.step % self.config.checkpoint_every == 0 or self.step == self.config.steps:
                    self.save_checkpoint()
                if self.world.any(self._stop_requested):  # every rank stops at the same step
                    status = "interrupted"
                    self.save_checkpoint()
                    break
        except TrainingDiverged as exc:
            status = "diverged"
            if root:
                bar.write(f"stopping: {exc}; the last good checkpoint is kept in {self.checkpoint_dir}")
        except BaseException as exc:
            self.world.fail(exc)  # with several ranks: stop the others, which would wait forever
            raise
        finally:
            bar.close()
            log.close()
            if in_main_thread:
                signal.signal(signal.SIGINT, previous_handler)
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


def load_model(checkpoint, weights="ema"):
    """(model, diffusion, state) from a checkpoint directory (or a run's output
    folder): the U-Net with its EMA weights (``weights="ema"``) or its raw
    training weights (``"model"``), and the diffusion process it was trained with."""
    if weights not in ("ema", "model"):
        raise ValueError(f"load_model: weights must be 'ema' or 'model', got {weights!r}")
    arrays, state, where = io.load_checkpoint(checkpoint, groups=(weights,))
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
