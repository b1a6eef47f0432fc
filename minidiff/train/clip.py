"""Training a small CLIP contrastively on captioned images, and its zero-shot report.

    report = train_clip(CLIPTrainConfig(), "runs/shapes/clip")   # the shapes captions

Each step draws a batch of (image, caption) pairs, no two with the same caption, embeds both,
and minimises the symmetric InfoNCE loss: with logits = exp(logit_scale) * cos(text_i, image_j),
the mean of the cross entropy of each caption over the batch's images and of each image over the
batch's captions, the true pair being the target. ``logit_scale`` (the log temperature) is
learned with the rest and kept at most log(100), as CLIP does. The run folder is a transformers
CLIP folder (config.json, model.safetensors, preprocessor_config.json, the tokenizer's files over
the captions' words), so ``CLIPModel.from_pretrained``, ``clip_score`` and transformers' own
CLIPModel read it; loss.csv, loss.png and report.json sit beside it.

Zero-shot accuracy: every caption the grammar can write (each combination of attribute values)
is embedded once; each held-out image takes the caption it is most similar to, and an attribute
counts as right where that caption names the image's true value.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import functional as F
from ..autograd import no_grad
from ..data import to_uint8
from ..models.clip import CLIPImageProcessor, CLIPModel, CLIPTextModel, CLIPVisionModel, normalize
from ..models.tokenizer import BOS, EOS, CLIPTokenizer
from ..optim import AdamW, clip_grad_norm, warmup_lr
from .plot import plot_loss

MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 100


@dataclass
class CLIPTrainConfig:
    """A small CLIP for small images: both towers ``width`` wide and ``layers`` deep."""

    dataset: str = "shapes"
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_steps: int = 100
    grad_clip: float = 1.0
    seed: int = 0
    patch_size: int = 8
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp_ratio: int = 4
    projection_dim: int = 64
    log_every: int = 50

    def validate(self):
        for key in ("steps", "batch_size", "patch_size", "width", "layers", "heads", "mlp_ratio"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) > 0):
                raise ValueError(
                    f"CLIPTrainConfig: {key} must be a positive integer, got {getattr(self, key)!r}"
                )
        if self.projection_dim <= 0 or self.log_every <= 0:
            raise ValueError("CLIPTrainConfig: projection_dim and log_every must be positive")
        if self.batch_size < 2:
            raise ValueError(
                "CLIPTrainConfig: batch_size must be at least 2 (the other pairs are the negatives), "
                f"got {self.batch_size}"
            )
        if self.width % self.heads:
            raise ValueError(f"CLIPTrainConfig: heads={self.heads} must divide width={self.width}")
        if not self.lr > 0 or self.weight_decay < 0 or self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError(
                "CLIPTrainConfig: lr must be positive; weight_decay, warmup_steps, grad_clip >= 0"
            )

    @classmethod
    def from_dict(cls, values: dict) -> CLIPTrainConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"CLIPTrainConfig: unknown fields {unknown} (known: {sorted(known)})")
        return cls(**values)


@dataclass(frozen=True)
class CaptionTask:
    """Images (N, C, H, W) in [-1, 1] with one caption each, split for training and held out;
    ``attributes`` (name -> the held-out images' value indices), ``choices`` (name -> the value
    names) and ``caption`` (values by name -> text) describe the grammar the zero-shot report
    enumerates."""

    train_images: np.ndarray
    train_captions: list
    held_out_images: np.ndarray
    held_out_captions: list
    attributes: dict
    choices: dict
    caption: object


# -- the loss ------------------------------------------------------------------------------------


def contrastive_loss(logits_per_text):
    """Symmetric InfoNCE on the (N, N) logits of N captions against their N images: the mean of
    cross_entropy(logits, arange(N)) and cross_entropy(logits.T, arange(N))."""
    n = logits_per_text.shape[0]
    if logits_per_text.ndim != 2 or logits_per_text.shape[1] != n:
        raise ValueError(f"contrastive_loss: logits must be (N, N), got {logits_per_text.shape}")
    target = np.arange(n)
    caption_loss = F.cross_entropy(logits_per_text, target)
    image_loss = F.cross_entropy(F.transpose(logits_per_text), target)
    return (caption_loss + image_loss) * 0.5


# -- the files of a CLIP folder ------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, in the order of CLIP's first tokens."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(others)}


def write_word_tokenizer(folder, texts) -> CLIPTokenizer:
    """Write a CLIP tokenizer folder whose BPE merges spell the words of ``texts`` (any other
    text still tokenizes, byte by byte) and return it loaded. BPE applies merges by rank, so a
    word can still split where another word's merge comes first ("triangle" meets the "ri" of
    "right"); ``model_max_length`` is therefore measured, the longest of ``texts`` encoded."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbol = bytes_to_unicode()
    words = sorted({w for text in texts for w in text.lower().split()})
    merges, seen = [], set()
    for word in words:  # left to right, the last symbol carrying the end-of-word mark
        parts = [symbol[b] for b in word.encode("utf-8")]
        parts[-1] += "</w>"
        merged = parts[0]
        for part in parts[1:]:
            if (merged, part) not in seen:
                seen.add((merged, part))
                merges.append((merged, part))
            merged += part
    tokens = [*symbol.values(), *(s + "</w>" for s in symbol.values()), *(a + b for a, b in merges), BOS, EOS]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    config = {**special, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 2**20}))
    measuring = CLIPTokenizer.from_pretrained(folder)
    longest = max(len(measuring.encode(text)) for text in set(texts))
    (folder / "tokenizer_config.json").write_text(
        json.dumps({**config, "model_max_length": longest}, indent=2)
    )
    return CLIPTokenizer.from_pretrained(folder)


def save_clip(model: CLIPModel, folder) -> Path:
    """Write ``model`` as transformers writes a CLIPModel: config.json, model.safetensors and,
    where the model has one, preprocessor_config.json. (The tokenizer's files are written where
    it is made, ``write_word_tokenizer``.)"""
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(model.config, indent=2))
    weights = {
        name: np.array(value, order="C") for name, value in model.state_dict().items()
    }  # 0-d stays 0-d
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if model.image_processor is not None:
        (folder / "preprocessor_config.json").write_text(
            json.dumps(model.image_processor.to_dict(), indent=2)
        )
    return folder


def build_clip(config: CLIPTrainConfig, tokenizer: CLIPTokenizer, image_shape) -> CLIPModel:
    """A CLIPModel for images of ``image_shape`` (C, H, W) and the tokenizer's captions."""
    channels, height, width = image_shape
    rng = np.random.default_rng(config.seed)
    sizes = dict(
        hidden_size=config.width,
        intermediate_size=config.width * config.mlp_ratio,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        hidden_act="gelu",
    )
    text = CLIPTextModel(
        vocab_size=tokenizer.vocab_size,
        max_position_embeddings=tokenizer.model_max_length,
        eos_token_id=tokenizer.eos_token_id,
        rng=rng,
        **sizes,
    )
    text.config.update(bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionModel(
        num_channels=3, image_size=height, patch_size=config.patch_size, rng=rng, **sizes
    )
    model = CLIPModel(text, vision, projection_dim=config.projection_dim, rng=rng)
    model.tokenizer = tokenizer
    model.image_processor = CLIPImageProcessor(size=height, crop_size=(height, width))
    return model


# -- training ------------------------------------------------------------------------------------


def pixel_values(model: CLIPModel, images) -> np.ndarray:
    """[-1, 1] images -> the model's pixel_values, through CLIP's preprocessing on uint8."""
    return model.image_processor(to_uint8(images))


def distinct_caption_batch(codes, batch_size, rng) -> np.ndarray:
    """Indices of up to ``batch_size`` random pairs, no two with the same caption (``codes``:
    one integer per caption text): InfoNCE takes every other caption in the batch for a wrong
    one, and a repeated caption would be a positive counted as a negative."""
    order = rng.permutation(len(codes))
    _, first = np.unique(codes[order], return_index=True)  # a random image of each caption
    return order[np.sort(first)[:batch_size]]


def train_clip(config: CLIPTrainConfig, out_dir, task: CaptionTask | None = None, progress=True) -> dict:
    """Train a CLIP on ``task`` (default: the captions of ``config.dataset``), write the CLIP
    folder to ``out_dir`` and return the report (also in ``out_dir/report.json``): the final
    loss and the zero-shot accuracy per attribute on the held-out images."""
    from tqdm import tqdm

    config.validate()
    task = task if task is not None else load_task(config.dataset, config.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = write_word_tokenizer(out, task.train_captions + all_captions(task)[0])
    model = build_clip(config, tokenizer, task.train_images.shape[1:])
    pixels = pixel_values(model, task.train_images)
    ids = tokenizer(task.train_captions)
    _, caption_codes = np.unique(np.asarray(task.train_captions), return_inverse=True)
    params = model.parameters()
    optimizer = AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    rng = np.random.default_rng(config.seed + 1)
    (out / "train_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
    log_path = out / "loss.csv"
    recent, loss_value = [], float("nan")
    with open(log_path, "w", newline="") as log:
        writer = csv.writer(log)
        writer.writerow(["step", "loss", "lr", "temperature"])
        for step in tqdm(
            range(config.steps), disable=not progress, desc="clip", unit="step", dynamic_ncols=True
        ):
            batch = distinct_caption_batch(caption_codes, config.batch_size, rng)
            _, logits_per_text = model(ids[batch], pixels[batch])
            loss = contrastive_loss(logits_per_text)
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise RuntimeError(f"train_clip: the loss became {loss_value} at step {step + 1}")
            optimizer.zero_grad()
            loss.backward()
            if config.grad_clip:
                clip_grad_norm(params, config.grad_clip)
            optimizer.lr = warmup_lr(step, config.lr, config.warmup_steps)
            optimizer.step()
            scale = model.logit_scale
            scale.device.xp.clip(scale.data, 0.0, MAX_LOGIT_SCALE, out=scale.data)  # in place: 0-d
            recent.append(loss_value)
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                temperature = float(np.exp(scale.numpy()))
                writer.writerow(
                    [step + 1, f"{np.mean(recent):.6f}", f"{optimizer.lr:.3g}", f"{temperature:.3f}"]
                )
                recent = []
    plot_loss(log_path, out / "loss.png")
    save_clip(model, out)
    report = {"steps": config.steps, "final_loss": loss_value, **zero_shot_accuracy(model, task)}
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


# -- zero-shot evaluation ------------------------------------------------------------------------


def all_captions(task: CaptionTask):
    """Every caption of the task's grammar, with the value indices it names: (captions, (K, A)
    indices in the order of ``task.choices``)."""
    names = list(task.choices)
    combos = list(itertools.product(*(range(len(task.choices[n])) for n in names)))
    captions = [task.caption(**{n: task.choices[n][i] for n, i in zip(names, combo)}) for combo in combos]
    return captions, np.array(combos, dtype=np.int64).reshape(len(combos), len(names))


def zero_shot_accuracy(model: CLIPModel, task: CaptionTask, batch_size=256) -> dict:
    """Each held-out image classified by the grammar caption it is most similar to: accuracy per
    attribute, of all attributes at once, and chance (one over the number of captions)."""
    captions, values = all_captions(task)
    with no_grad():
        text = normalize(model.get_text_features(model.tokenizer(captions))).numpy()
        images = [
            normalize(
                model.get_image_features(pixel_values(model, task.held_out_images[i : i + batch_size]))
            ).numpy()
            for i in range(0, len(task.held_out_images), batch_size)
        ]
    best = np.argmax(np.concatenate(images) @ text.T, axis=1)
    predicted = values[best]
    right = np.stack(
        [predicted[:, a] == np.asarray(task.attributes[n]) for a, n in enumerate(task.choices)], 1
    )
    accuracy = {name: float(right[:, a].mean()) for a, name in enumerate(task.choices)}
    return {
        "zero_shot_accuracy": accuracy,
        "zero_shot_all_attributes": float(right.all(axis=1).mean()),
        "num_held_out": len(predicted),
        "num_captions": len(captions),
    }


def load_task(dataset: str, seed: int = 0, count: int = 8000, held_out: int = 1000) -> CaptionTask:
    """The captioned dataset ``dataset`` ("shapes": ``count`` training images and ``held_out``
    held-out ones, drawn from ``seed``) as a CaptionTask."""
    if dataset != "shapes":
        raise ValueError(f"train_clip: dataset must be 'shapes' (a captioned dataset), got {dataset!r}")
    from ..data import shapes

    train = shapes.load_shapes(count, seed=seed, split="train")
    test = shapes.load_shapes(held_out, seed=seed, split="held_out")
    return CaptionTask(
        train.images,
        list(train.captions),
        test.images,
        list(test.captions),
        dict(test.attributes),
        dict(shapes.CHOICES),
        shapes.caption,
    )
