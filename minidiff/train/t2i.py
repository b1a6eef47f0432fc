"""Text to image from scratch: the stages that train a small Stable Diffusion on captioned data.

    trainer = T2ITrainer(T2IConfig(), out_dir="runs/shapes")
    trainer.fit()        # autoencoder, latent scaling, text encoder + U-Net; a diffusers folder

1. the autoencoder (AutoencoderKL, 4x downsampling: 3x32x32 images to 4x8x8 latents), trained on
   reconstruction (mean squared error) plus a small KL term; at its end it writes
   reconstructions and a report of the held-out PSNR and the ELBO terms;
2. the latent scaling factor, 1 / std of the training latents (the LDM paper's choice), kept in
   the autoencoder's config as Stable Diffusion keeps it;
3. the text encoder (a small CLIPTextModel over a tokenizer of the captions' words) and the
   conditional U-Net, trained together on the scaled latents to predict the noise, the caption
   replaced by the empty prompt 10% of the time (classifier-free guidance); every
   ``sample_every`` steps a grid of fixed prompts (each row labelled) and a denoising strip.

Each stage is resumable as the DDPM trainer is (its checkpoints under ``<stage>/checkpoints`` hold
the weights, the Adam moments, the EMA, the batch position and the generator), stops cleanly on
Ctrl-C, refuses a non-finite loss keeping the last good checkpoint, and writes ``loss.csv`` and
``loss.png`` in its folder. The run folder is a Stable Diffusion folder in diffusers' layout
(model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/), rewritten with the EMA
weights at each checkpoint of stage 3, so ``StableDiffusion.from_pretrained(run)`` (and
diffusers') loads it while it trains.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import shutil
import signal
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import functional as F
from .. import io, no_grad
from ..data import BatchIterator, Dataset, load_dataset, make_grid
from ..data.shapes import WORDS, CaptionedDataset, caption_digits, drop_attributes, load_shapes
from ..diffusion import DDIMScheduler
from ..models import AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel
from ..models.tokenizer import write_clip_tokenizer
from ..nn.pretrained import write_config
from ..optim import EMA, AdamW
from ..pipelines import StableDiffusion
from ..pipelines.stable_diffusion import model_index
from ..tensor import Tensor, tensor
from ._step import apply_gradients, optimizer_state, progress_bar, write_loss_row
from .ddpm import TrainingDiverged, _loss_rows_up_to, require_one_process
from .plot import plot_loss

CONFIG_FILE = "t2i_config.json"  # beside model_index.json; the run's config, read on resume
STAGES = ("autoencoder", "denoiser")
# Stable Diffusion's training schedule; DDIM samples it (no clipping: latents are not in [-1, 1])
SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)
PROMPTS = (  # the rows of the sample grid
    "a small red circle at the top left",
    "a large blue square in the center",
    "a small yellow triangle at the bottom right",
    "a large green circle at the top right",
    "a large white triangle at the bottom left",
    "a small purple square in the center",
    "a red triangle",
    "a blue circle",
)


@dataclass
class AutoencoderConfig:
    block_out_channels: tuple = (32, 64, 64)  # three levels: 4x downsampling
    layers_per_block: int = 1
    norm_num_groups: int = 16
    latent_channels: int = 4
    steps: int = 600
    batch_size: int = 16
    lr: float = 2e-3
    warmup_steps: int = 30
    kl_weight: float = 1e-6
    ema_decay: float = 0.95  # a short average: the autoencoder is still improving at its end


@dataclass
class DenoiserConfig:
    block_out_channels: tuple = (32, 64)  # 8x8 and 4x4 latents, cross-attention at both
    layers_per_block: int = 1
    attention_heads: int = 2
    norm_num_groups: int = 8
    text_width: int = 64
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 12  # "a small red circle at the top left" is 8 words + start and end
    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 100
    ema_decay: float = 0.995
    caption_dropout: float = 0.1  # the empty prompt, for classifier-free guidance
    attribute_dropout: float = 0.15  # each of size, colour, position left out of a caption


@dataclass
class T2IConfig:
    """Everything that defines a text-to-image run; saved as JSON in the run folder."""

    dataset: str = "shapes"  # shapes, or digits (captioned "a handwritten seven")
    image_size: int | None = None
    num_images: int = 8000  # shapes drawn (train and held out together)
    holdout: float = 0.05
    seed: int = 0
    grad_clip: float = 1.0
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 250
    sample_steps: int = 25
    guidance: float = 3.0  # the default guidance of sampling and of the quality benchmark
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    denoiser: DenoiserConfig = field(default_factory=DenoiserConfig)

    @classmethod
    def from_dict(cls, values: dict) -> T2IConfig:
        values = dict(values)
        parts = {"autoencoder": AutoencoderConfig, "denoiser": DenoiserConfig}
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"config: unknown keys {unknown}; known keys are {sorted(known)}")
        built = {}
        for key, part in parts.items():
            given = dict(values.pop(key, None) or {})
            part_known = {f.name for f in dataclasses.fields(part)}
            bad = sorted(set(given) - part_known)
            if bad:
                raise ValueError(f"config: unknown {key} keys {bad}; known keys are {sorted(part_known)}")
            if "block_out_channels" in given:
                given["block_out_channels"] = tuple(given["block_out_channels"])
            built[key] = part(**given)
        return cls(**values, **built)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self):
        for part in ("autoencoder", "denoiser"):
            c = getattr(self, part)
            for name in ("steps", "batch_size"):
                if getattr(c, name) < 1:
                    raise ValueError(f"config: {part}.{name} must be >= 1, got {getattr(c, name)}")
            if c.lr <= 0:
                raise ValueError(f"config: {part}.lr must be positive, got {c.lr}")
        for name in ("log_every", "sample_every", "checkpoint_every", "sample_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"config: {name} must be >= 1, got {getattr(self, name)}")
        if self.dataset not in ("shapes", "digits"):
            raise ValueError(
                f"config: dataset {self.dataset!r} has no captions (text to image takes shapes or digits)"
            )
        if not 0 < self.holdout < 1:
            raise ValueError(f"config: holdout must be in (0, 1), got {self.holdout}")
        d = self.denoiser
        for name in ("caption_dropout", "attribute_dropout"):
            if not 0 <= getattr(d, name) < 1:
                raise ValueError(f"config: denoiser.{name} must be in [0, 1), got {getattr(d, name)}")


def load_captioned(config: T2IConfig) -> tuple[CaptionedDataset, CaptionedDataset]:
    """(training, held-out) captioned images, the same for every run with this config."""
    if config.dataset == "shapes":
        data = load_shapes(config.num_images, image_size=config.image_size or 32, seed=config.seed)
    else:
        data = load_dataset(config.dataset, image_size=config.image_size)
    if not isinstance(data, CaptionedDataset):
        data = caption_digits(data)
    return data.split(config.holdout, seed=config.seed)


# -- the components ------------------------------------------------------------------------------


def build_autoencoder(config: T2IConfig, channels: int, image_size: int, rng) -> AutoencoderKL:
    a = config.autoencoder
    return AutoencoderKL(
        in_channels=channels,
        out_channels=channels,
        block_out_channels=tuple(a.block_out_channels),
        layers_per_block=a.layers_per_block,
        latent_channels=a.latent_channels,
        norm_num_groups=a.norm_num_groups,
        sample_size=image_size,
        scaling_factor=1.0,  # set from the data after the autoencoder is trained
        mid_block_add_attention=False,  # an 8x8 map is seen whole by the convolutions already
        rng=rng,
    )


def build_text_encoder(config: T2IConfig, tokenizer: CLIPTokenizer, rng) -> CLIPTextModel:
    d = config.denoiser
    model = CLIPTextModel(
        vocab_size=tokenizer.vocab_size,
        hidden_size=d.text_width,
        intermediate_size=4 * d.text_width,
        num_hidden_layers=d.text_layers,
        num_attention_heads=d.text_heads,
        max_position_embeddings=d.max_length,
        hidden_act="gelu",
        eos_token_id=tokenizer.eos_token_id,
        rng=rng,
    )
    model.config.update(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def build_unet(config: T2IConfig, latent_size: int, rng) -> UNet2DConditionModel:
    d = config.denoiser
    levels = len(d.block_out_channels)
    return UNet2DConditionModel(
        dict(
            sample_size=latent_size,
            in_channels=config.autoencoder.latent_channels,
            out_channels=config.autoencoder.latent_channels,
            block_out_channels=list(d.block_out_channels),
            layers_per_block=d.layers_per_block,
            down_block_types=["CrossAttnDownBlock2D"] * levels,
            up_block_types=["CrossAttnUpBlock2D"] * levels,
            cross_attention_dim=d.text_width,
            attention_head_dim=d.attention_heads,  # diffusers' name for the number of heads
            norm_num_groups=d.norm_num_groups,
        ),
        rng=rng,
    )


def _named_parameters(modules: dict) -> list[tuple[str, object]]:
    return [(f"{key}.{name}", p) for key, module in modules.items() for name, p in module.named_parameters()]


def _replace_folder(build, final: Path):
    """Write a folder through ``build(tmp)`` into a temporary sibling, then swap it into place, so
    a run killed mid-write leaves the previous folder whole (or, at worst, the new one under its
    temporary name beside it)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        build(tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- one stage: the loop every stage shares -----------------------------------------------------------


class Stage:
    """A resumable training loop over ``modules`` (name -> Module) with AdamW, warm-up, gradient
    clipping, an EMA and a NaN guard; ``loss()`` draws a batch and returns the loss Tensor.
    Checkpoints live in ``folder/checkpoints``, the log in ``folder/loss.csv``."""

    name = "stage"

    def __init__(self, trainer: T2ITrainer, modules: dict, part, batches: BatchIterator, rng):
        self.trainer, self.config = trainer, trainer.config
        self.part = part  # the stage's section of the config
        self.modules, self.batches, self.rng = modules, batches, rng
        self.named = _named_parameters(modules)
        self.params = [p for _, p in self.named]
        self.optimizer = AdamW(self.params, lr=part.lr, weight_decay=0.0)
        self.ema = EMA(self.params, decay=part.ema_decay)
        self.step = 0
        self.folder = trainer.out_dir / self.name
        self._stop_requested = False

    def loss(self) -> Tensor:  # pragma: no cover - each stage defines it
        raise NotImplementedError

    def report(self):
        """Called every ``sample_every`` steps and at the end (the stage's pictures)."""

    def on_checkpoint(self):
        """Called after each checkpoint is written."""

    # -- one step ----------------------------------------------------------------------------
    def train_step(self) -> float:
        loss = self.loss()
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingDiverged(f"{self.name}: loss became {value} at step {self.step + 1}")
        self.optimizer.zero_grad()
        loss.backward()
        apply_gradients(self.optimizer, self.ema, self.params, self.step, self.part, self.config.grad_clip)
        self.step += 1
        return value

    @property
    def done(self) -> bool:
        return self.step >= self.part.steps

    # -- checkpoints ---------------------------------------------------------------------------
    def extra_state(self) -> dict:
        return {}

    def save_checkpoint(self) -> Path:
        names = [n for n, _ in self.named]
        opt = self.optimizer.state_dict()
        arrays = {
            "model": {n: p.numpy().copy() for n, p in self.named},
            "ema": dict(zip(names, self.ema.state_dict()["shadow"])),
            "optimizer": {
                **{f"m.{n}": m for n, m in zip(names, opt["m"])},
                **{f"v.{n}": v for n, v in zip(names, opt["v"])},
            },
        }
        state = {
            "format": "minidiff-t2i-1",
            "stage": self.name,
            "config": self.config.to_dict(),
            "step": self.step,
            "rng": self.rng.bit_generator.state,
            "batches": self.batches.state_dict(),
            **optimizer_state(self.optimizer, self.ema),
            **self.extra_state(),
        }
        path = io.save_checkpoint(self.folder / "checkpoints", f"step-{self.step:08d}", arrays, state)
        self.on_checkpoint()
        return path

    def has_checkpoint(self) -> bool:
        return (self.folder / "checkpoints" / io.LATEST).is_file()

    def load_checkpoint(self):
        """Continue from the newest checkpoint in ``folder/checkpoints``."""
        arrays, state, where = io.load_checkpoint(
            self.folder / "checkpoints", groups=("model", "ema", "optimizer")
        )
        names = [n for n, _ in self.named]
        try:
            if state.get("stage") != self.name:
                raise ValueError(f"it belongs to stage {state.get('stage')!r}, not {self.name!r}")
            for name, p in self.named:
                value = arrays["model"][name]
                if value.shape != p.shape:
                    raise ValueError(f"{name} is {value.shape}, the model's is {p.shape}")
                p.data = value.astype(p.dtype)
            self.ema.load_state_dict({**state["ema"], "shadow": [arrays["ema"][n] for n in names]})
            self.optimizer.load_state_dict(
                {
                    **state["optimizer"],
                    "m": [arrays["optimizer"][f"m.{n}"] for n in names],
                    "v": [arrays["optimizer"][f"v.{n}"] for n in names],
                }
            )
            self.batches.load_state_dict(state["batches"])
            self.rng.bit_generator.state = state["rng"]
            self.step = int(state["step"])
        except (KeyError, ValueError, TypeError) as exc:
            raise io.CheckpointError(f"checkpoint {where} does not fit this run: {exc}") from None
        return state

    def ema_weights(self) -> dict:
        """Module name -> {parameter name -> EMA array}."""
        out = {key: {} for key in self.modules}
        for (name, _), shadow in zip(self.named, self.ema.shadow):
            key, _, rest = name.partition(".")
            out[key][rest] = shadow
        return out

    # -- the loop ------------------------------------------------------------------------------
    def _request_stop(self, signum, frame):
        self._stop_requested = True

    def fit(self, progress=True) -> str:
        """Train to ``steps``: "finished", "interrupted" (Ctrl-C: a checkpoint is saved) or
        "diverged" (a non-finite loss: the last good checkpoint is kept)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        log_path = self.folder / "loss.csv"
        rows = _loss_rows_up_to(log_path, self.step)  # rows past a resumed step are redone
        log = open(log_path, "w", newline="")
        writer = csv.writer(log)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(rows)
        self._stop_requested = False
        in_main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, self._request_stop) if in_main_thread else None
        total = self.part.steps
        bar = progress_bar(self.name, total, self.step, progress)
        status, recent = "finished", []
        try:
            while self.step < total:
                recent.append(self.train_step())
                bar.update(1)
                last = self.step == total
                if self.step % self.config.log_every == 0 or last:
                    write_loss_row(log, writer, bar, self.step, recent, self.optimizer.lr)
                    recent = []
                if self.step % self.config.sample_every == 0 or last:
                    self.report()
                if self.step % self.config.checkpoint_every == 0 or last:
                    self.save_checkpoint()
                if self._stop_requested and not last:
                    status = "interrupted"
                    self.save_checkpoint()
                    break
        except TrainingDiverged as exc:
            status = "diverged"
            bar.write(f"stopping: {exc}; the last good checkpoint is kept in {self.folder / 'checkpoints'}")
        finally:
            bar.close()
            log.close()
            if in_main_thread:
                signal.signal(signal.SIGINT, previous)
            plot_loss(log_path, self.folder / "loss.png")
        return status


# -- stage 1: the autoencoder --------------------------------------------------------------------------


class AutoencoderStage(Stage):
    name = "autoencoder"

    def __init__(self, trainer):
        c = trainer.config
        rng = np.random.default_rng(c.seed + 1)
        self.vae = build_autoencoder(c, trainer.channels, trainer.image_size, rng)
        batches = BatchIterator(trainer.train, c.autoencoder.batch_size, seed=c.seed)
        super().__init__(trainer, {"vae": self.vae}, c.autoencoder, batches, rng)

    def loss(self) -> Tensor:
        images, _ = next(self.batches)
        x = tensor(images)
        posterior = self.vae.encode(x)
        reconstruction = self.vae.decode(posterior.sample(self.rng))
        kl = F.mean(posterior.kl()) / float(np.prod(images.shape[1:]))  # nats per dimension
        return F.mse_loss(reconstruction, x) + self.part.kl_weight * kl

    def ema_autoencoder(self) -> AutoencoderKL:
        vae = build_autoencoder(self.config, self.trainer.channels, self.trainer.image_size, None)
        vae.load_state_dict(self.ema_weights()["vae"])
        return vae.eval()

    def report(self):
        """Reconstructions of held-out images (top row the images, bottom row decoded from the
        posterior mean) and the held-out PSNR and ELBO terms, with the EMA weights."""
        vae = self.ema_autoencoder()
        held = self.trainer.held_out.images[:256]
        stats = autoencoder_report(vae, held)
        stats["step"] = self.step
        (self.folder / "report.json").write_text(json.dumps(stats, indent=1))
        with no_grad():
            shown = held[:16]
            decoded = np.clip(vae(tensor(shown)).numpy(), -1, 1)
        path = self.folder / "reconstructions" / f"step-{self.step:08d}.png"
        _save_png(make_grid(np.concatenate([shown, decoded]), nrow=2), path, scale=2)
        self.trainer.say(
            f"autoencoder step {self.step}: held-out PSNR {stats['psnr']:.2f} dB, KL "
            f"{stats['kl_nats']:.1f} nats/image ({stats['kl_bits_per_dim']:.4f} bits/dim)"
        )


def autoencoder_report(vae: AutoencoderKL, images: np.ndarray, batch: int = 64) -> dict:
    """PSNR of the reconstructions (from the posterior mean, images in [-1, 1] as peak-to-peak 2)
    and the ELBO's terms per image: the reconstruction's negative log-likelihood under a Gaussian
    decoder whose variance is the measured mean squared error (the best fixed variance), the KL
    to N(0, I) in nats, and the negative ELBO in bits per dimension."""
    errors, kls = [], []
    with no_grad():
        for lo in range(0, len(images), batch):
            x = tensor(images[lo : lo + batch])
            posterior = vae.encode(x)
            reconstruction = vae.decode(posterior.mode()).numpy()
            errors.append(((reconstruction - images[lo : lo + batch]) ** 2).reshape(len(reconstruction), -1))
            kls.append(posterior.kl().numpy())
    errors, kl = np.concatenate(errors), np.concatenate(kls)
    dims = errors.shape[1]
    mse = float(errors.mean())
    psnr = 10 * math.log10(4.0 / mse)  # the range [-1, 1] spans 2
    nll = 0.5 * dims * (math.log(2 * math.pi * mse) + 1.0)  # sum of squares / (2 mse) = dims / 2
    kl_nats = float(kl.mean())
    return {
        "psnr": psnr,
        "mse": mse,
        "reconstruction_nats": nll,
        "kl_nats": kl_nats,
        "kl_bits_per_dim": kl_nats / (dims * math.log(2)),
        "negative_elbo_bits_per_dim": (nll + kl_nats) / (dims * math.log(2)),
        "images": len(images),
    }


# -- stage 2: the latent scale ---------------------------------------------------------------------


def encode_latents(vae: AutoencoderKL, images: np.ndarray, batch: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 of the posterior of each image."""
    means, stds = [], []
    with no_grad():
        for lo in range(0, len(images), batch):
            posterior = vae.encode(tensor(images[lo : lo + batch]))
            means.append(posterior.mean.numpy())
            stds.append(posterior.std.numpy())
    return np.concatenate(means), np.concatenate(stds)


def latent_scaling_factor(mean: np.ndarray, std: np.ndarray, seed: int = 0) -> float:
    """1 / the standard deviation of posterior samples (all latent elements together), as the
    LDM paper sets its scale factor, so the diffusion sees latents of unit variance."""
    rng = np.random.default_rng(seed)
    samples = mean + std * rng.standard_normal(mean.shape, dtype=np.float32)
    return float(1.0 / samples.astype(np.float64).std())


# -- stage 3: the text encoder and the U-Net ------------------------------------------------------------


class DenoiserStage(Stage):
    name = "denoiser"

    def __init__(self, trainer, latents):
        c = trainer.config
        rng = np.random.default_rng(c.seed + 2)
        self.tokenizer = trainer.tokenizer
        self.text_encoder = build_text_encoder(c, self.tokenizer, rng)
        self.unet = build_unet(c, trainer.latent_size, rng)
        self.scheduler = DDIMScheduler(SCHEDULER)
        self.mean, self.std = latents  # of each training image's posterior
        self.scale = trainer.scaling_factor
        train = trainer.train
        # batches of image indices: the latents, attributes and captions are looked up by index
        indexed = Dataset(train.images[:, :1, :1, :1], np.arange(len(train)), len(train), train.name)
        batches = BatchIterator(indexed, c.denoiser.batch_size, seed=c.seed)
        modules = {"text_encoder": self.text_encoder, "unet": self.unet}
        super().__init__(trainer, modules, c.denoiser, batches, rng)

    def captions(self, index) -> list[str]:
        """Training captions: attributes dropped at random (shapes), then the empty prompt for a
        ``caption_dropout`` share of them."""
        train = self.trainer.train
        if train.attributes:
            attributes = {k: v[index] for k, v in train.attributes.items()}
            texts = drop_attributes(attributes, self.rng, self.part.attribute_dropout)
        else:
            texts = [train.captions[i] for i in index]
        empty = self.rng.random(len(texts)) < self.part.caption_dropout
        return ["" if e else t for t, e in zip(texts, empty)]

    def loss(self) -> Tensor:
        _, index = next(self.batches)
        rng = self.rng
        x0 = self.mean[index] + self.std[index] * rng.standard_normal(
            self.mean[index].shape, dtype=np.float32
        )
        x0 = (x0 * np.float32(self.scale)).astype(np.float32)
        context = self.text_encoder(self.tokenizer(self.captions(index)))
        t = rng.integers(0, self.scheduler.num_train_timesteps, len(index))
        noise = rng.standard_normal(x0.shape, dtype=np.float32)
        noisy = self.scheduler.add_noise(x0, noise, t)
        return F.mse_loss(self.unet(tensor(noisy), t, context), tensor(noise))

    def pipeline(self) -> StableDiffusion:
        """The Stable Diffusion the EMA weights make, with the trained autoencoder."""
        weights = self.ema_weights()
        text_encoder = build_text_encoder(self.config, self.tokenizer, None)
        text_encoder.load_state_dict(weights["text_encoder"])
        unet = build_unet(self.config, self.trainer.latent_size, None)
        unet.load_state_dict(weights["unet"])
        return StableDiffusion(unet, self.trainer.vae, text_encoder, self.tokenizer, DDIMScheduler(SCHEDULER))

    def on_checkpoint(self):
        self.trainer.write_pipeline(self.pipeline())

    def report(self):
        pipe = self.pipeline()
        c = self.config
        prompts = self.trainer.prompts
        per_row = 8
        images = pipe(
            [p for p in prompts for _ in range(per_row)],
            num_steps=c.sample_steps,
            guidance=c.guidance,
            seed=1234,
        )
        grid = make_grid(images * 2 - 1, nrow=len(prompts))
        scale = max(1, 64 // images.shape[-1])
        labelled = _label_rows(grid.repeat(scale, 0).repeat(scale, 1), prompts)
        _save_png(labelled, self.folder / "samples" / f"step-{self.step:08d}.png")
        strip = denoising_strip(pipe, prompts[0], c.sample_steps, c.guidance, seed=1234)
        _save_png(
            make_grid(strip * 2 - 1, nrow=1),
            self.folder / "strips" / f"step-{self.step:08d}.png",
            scale=scale,
        )


def denoising_strip(pipe: StableDiffusion, prompt: str, steps: int, guidance: float, seed=0, frames=10):
    """The decoded prediction of the clean image at ``frames`` points along one sample's DDIM
    trajectory, noisiest first, then the sample itself: (frames + 1, C, H, W) in [0, 1]."""
    scheduler = pipe.sampler_for(None)
    scheduler.set_timesteps(steps)
    rng = np.random.default_rng(seed)
    shape = (1, pipe.unet.in_channels, pipe.unet.sample_size, pipe.unet.sample_size)
    latents = rng.standard_normal(shape).astype(np.float32) * scheduler.init_noise_sigma
    keep = set(np.linspace(0, steps - 1, frames).round().astype(int).tolist())
    predictions = []
    with no_grad():
        context = pipe.encode_prompt([prompt])
        uncond = pipe.encode_prompt([""])
        both = Tensor.from_array(np.concatenate([uncond.data, context.data]))
        for i, t in enumerate(scheduler.timesteps):
            eps = pipe.unet(Tensor.from_array(np.concatenate([latents, latents])), t, both).data
            eps = eps[:1] + guidance * (eps[1:] - eps[:1])
            if i in keep:
                alpha_bar = float(scheduler.alphas_cumprod[int(t)])
                x0 = (latents - math.sqrt(1 - alpha_bar) * eps) / math.sqrt(alpha_bar)
                predictions.append(x0)
            latents = scheduler.step(eps, t, latents)
        predictions.append(latents)
        decoded = pipe.vae.decode(Tensor.from_array(np.concatenate(predictions) / pipe.vae.scaling_factor))
    return np.clip(decoded.numpy() / 2 + 0.5, 0.0, 1.0)


def _save_png(pixels: np.ndarray, path: Path, scale: int = 1) -> Path:
    from PIL import Image

    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, format="PNG")
    return path


def _label_rows(grid: np.ndarray, labels) -> np.ndarray:
    """The grid (rows, cols, C) uint8 with a white margin on the left naming each row."""
    from PIL import Image, ImageDraw

    if grid.shape[-1] == 1:
        grid = grid.repeat(3, axis=-1)
    margin = 7 * max(len(label) for label in labels) + 10
    canvas = Image.new("RGB", (grid.shape[1] + margin, grid.shape[0]), "white")
    canvas.paste(Image.fromarray(grid), (margin, 0))
    draw = ImageDraw.Draw(canvas)
    row_height = grid.shape[0] / len(labels)
    for i, label in enumerate(labels):
        draw.text((4, int((i + 0.5) * row_height) - 5), label, fill="black")
    return np.asarray(canvas)


# -- the run ----------------------------------------------------------------------------------------


class T2ITrainer:
    """Runs the stages in order into ``out_dir``; ``T2ITrainer.resume(out_dir)`` continues."""

    def __init__(self, config: T2IConfig, out_dir, progress=True):
        require_one_process("text-to-image training")
        config.validate()
        self.config, self.out_dir, self.progress = config, Path(out_dir), progress
        self.train, self.held_out = load_captioned(config)
        self.channels, self.image_size = self.train.channels, self.train.image_size
        self.autoencoder = AutoencoderStage(self)
        self.vae = None  # the trained autoencoder (EMA weights), once stage 1 is done
        self.latent_size = self.image_size // self.autoencoder.vae.scale_factor
        self.scaling_factor = None
        self.denoiser = None
        self.prompts = PROMPTS if self.train.attributes else tuple(dict.fromkeys(self.train.captions))[:8]

    @property
    def tokenizer_folder(self) -> Path:
        return self.out_dir / "tokenizer"

    def say(self, text: str):
        if self.progress:
            from tqdm import tqdm

            tqdm.write(text)

    @classmethod
    def resume(cls, out_dir, progress=True, config: dict | None = None) -> T2ITrainer:
        """The trainer of the run in ``out_dir``, with its saved config; ``config`` (fields to
        compare, e.g. from the command line) must agree with it, except the stages' step counts."""
        out_dir = Path(out_dir)
        path = out_dir / CONFIG_FILE
        if not path.is_file():
            raise io.CheckpointError(f"{out_dir} holds no text-to-image run ({CONFIG_FILE} is missing)")
        try:
            saved = T2IConfig.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, ValueError, TypeError) as exc:
            raise io.CheckpointError(f"{path} is not a usable config: {exc}") from None
        if config:
            requested = T2IConfig.from_dict(_merge(saved.to_dict(), config)).to_dict()
            old = saved.to_dict()
            differing = [
                k if not isinstance(old[k], dict) else f"{k}.{sub}"
                for k in old
                for sub in (old[k] if isinstance(old[k], dict) else [None])
                if (old[k][sub] if sub else old[k]) != (requested[k][sub] if sub else requested[k])
                and sub != "steps"
            ]
            if differing:
                raise ValueError(
                    f"config: a resumed run keeps its saved config ({path}), which differs from the given "
                    f"one in {', '.join(differing)} (only the stages' steps may change)"
                )
            saved = T2IConfig.from_dict(requested)
        return cls(saved, out_dir, progress=progress)

    def fit(self) -> dict:
        """Run (or continue) every stage; returns {"status", "stage", "step", "out_dir"}."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=1))
        if not (self.tokenizer_folder / "vocab.json").is_file():
            _replace_folder(
                lambda tmp: write_clip_tokenizer(
                    tmp, WORDS, model_max_length=self.config.denoiser.max_length
                ),
                self.tokenizer_folder,
            )
        self.tokenizer = CLIPTokenizer.from_pretrained(self.tokenizer_folder)

        stage = self.autoencoder
        status = self._run(stage)
        if status != "finished":
            return self._result(status, stage)
        self.vae = stage.ema_autoencoder()

        latents = self._latents()
        self.vae.scaling_factor = self.scaling_factor
        self.vae.config["scaling_factor"] = self.scaling_factor

        self.denoiser = stage = DenoiserStage(self, latents)
        return self._result(self._run(stage), stage)

    def _run(self, stage) -> str:
        """Resume ``stage`` from its checkpoint where it has one and train it to its last step;
        its status ("finished" for a stage already done)."""
        if stage.has_checkpoint():
            stage.load_checkpoint()
        return "finished" if stage.done else stage.fit(self.progress)

    def _latents(self):
        """Stage 2: the posterior of every training image and the scaling factor, computed once
        and kept in ``latents.npz`` (a resumed run reads them back)."""
        path = self.out_dir / "autoencoder" / "latents.npz"
        if path.is_file():
            with np.load(path) as f:
                mean, std, scale = f["mean"], f["std"], float(f["scaling_factor"])
        else:
            mean, std = encode_latents(self.vae, self.train.images)
            scale = latent_scaling_factor(mean, std, seed=self.config.seed)
            tmp = path.with_name(".latents.tmp.npz")
            np.savez(tmp, mean=mean, std=std, scaling_factor=scale)
            os.replace(tmp, path)
            self.say(f"latent scaling factor {scale:.4f} (1 / std of {mean.size} latent values)")
        self.scaling_factor = scale
        return mean, std

    def write_pipeline(self, pipe: StableDiffusion):
        """The run folder's Stable Diffusion components, each folder swapped in whole."""
        for name, part in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
            _replace_folder(part.save_pretrained, self.out_dir / name)
        _replace_folder(pipe.scheduler.save_pretrained, self.out_dir / "scheduler")
        write_config(self.out_dir, model_index(type(pipe.scheduler).__name__), "model_index.json")

    def _result(self, status, stage) -> dict:
        if status == "interrupted":
            print(f"interrupted in stage {stage.name} at step {stage.step}; resume with --resume")
        return {"status": status, "stage": stage.name, "step": stage.step, "out_dir": str(self.out_dir)}


def _merge(saved: dict, given: dict) -> dict:
    merged = {**saved, **{k: v for k, v in given.items() if not isinstance(v, dict)}}
    for key in ("autoencoder", "denoiser"):
        merged[key] = {**saved[key], **(given.get(key) or {})}
    return merged


def load_run_config(folder) -> T2IConfig | None:
    """The T2IConfig of a run folder, or None for a Stable Diffusion folder made elsewhere."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file() or not (Path(folder) / "model_index.json").is_file():
        return None
    return T2IConfig.from_dict(json.loads(path.read_text()))
