"""CLIP score: how well images match their prompts, as torchmetrics defines it.

    clip_score(images, prompts, model) = max(0, mean_i 100 * cos(E_image(x_i), E_text(p_i)))

The features are CLIPModel's projected features, each divided by its L2 norm, so each term is
100 times a cosine similarity; the mean over the pairs is clamped at 0. The images go through
CLIP's own preprocessing first (the model's ``image_processor``: the shortest side resized with
Pillow's bicubic filter, a centre crop, CLIP's mean and std), the prompts through its tokenizer
(truncated to the text tower's length). Scores are comparable only under one CLIP model: a
small CLIP trained on one dataset scores on its own scale, not that of openai's models.
"""

from __future__ import annotations

import os

import numpy as np

from ..autograd import no_grad
from ..data import to_uint8
from ..models.clip import CLIPModel


def _load(model) -> CLIPModel:
    if isinstance(model, (str, os.PathLike)):
        model = CLIPModel.from_pretrained(model)
    if not isinstance(model, CLIPModel):
        raise TypeError(f"clip_score: model must be a CLIPModel or a CLIP folder, got {type(model).__name__}")
    for part, file in (("image_processor", "preprocessor_config.json"), ("tokenizer", "vocab.json")):
        if getattr(model, part) is None:
            raise ValueError(f"clip_score: the CLIP model has no {part} (its folder lacks {file})")
    return model


def _uint8(images) -> np.ndarray:
    """uint8 images as they are; floats are minidiff's [-1, 1] images."""
    if hasattr(images, "__cuda_array_interface__"):
        images = images.get()
    images = np.asarray(images)
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind != "f":
        raise ValueError(f"clip_score: images must be uint8 or floats in [-1, 1], got {images.dtype}")
    return to_uint8(images)


def clip_scores(images, prompts, model, batch_size=64) -> np.ndarray:
    """100 * cos(image feature, text feature) for each pair (images[i], prompts[i]), float64 (N,).

    ``images`` are (N, C, H, W), C 1 or 3: uint8, or floats in [-1, 1] (minidiff's samples);
    ``model`` a CLIPModel with its image_processor and tokenizer, or a folder to load one from.
    """
    model = _load(model)
    images = _uint8(images)
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if images.ndim != 4 or len(images) != len(prompts):
        raise ValueError(
            f"clip_score: need one prompt per image (N, C, H, W), got images {images.shape} and "
            f"{len(prompts)} prompts"
        )
    if not prompts:
        raise ValueError("clip_score: no images")
    scores = []
    with no_grad():
        for start in range(0, len(prompts), batch_size):
            pixels = model.image_processor(images[start : start + batch_size])
            ids = model.tokenizer(prompts[start : start + batch_size])
            image = model.get_image_features(pixels).numpy().astype(np.float64)
            text = model.get_text_features(ids).numpy().astype(np.float64)
            image /= np.linalg.norm(image, axis=-1, keepdims=True)
            text /= np.linalg.norm(text, axis=-1, keepdims=True)
            scores.append(100 * (image * text).sum(-1))
    return np.concatenate(scores)


def clip_score(images, prompts, model, batch_size=64) -> float:
    """The CLIP score of the pairs (images[i], prompts[i]): the mean of ``clip_scores``, clamped
    at 0, as torchmetrics' ``clip_score`` gives it."""
    return max(float(clip_scores(images, prompts, model, batch_size).mean()), 0.0)
