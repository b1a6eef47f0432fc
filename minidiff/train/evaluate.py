"""Evaluate a trained checkpoint: sample quality, bits per dimension, and the CLIP score of
text-to-image samples beside that of real and of mismatched pairs.

Sample quality is FID and KID on the FID Inception network when its weights file is given (the
numbers papers report: ``inception_report``), else the Frechet distance on minidiff's own
classifier with its confidence and class histogram (``sample_quality_report``)."""

from __future__ import annotations

import hashlib
import pathlib

import numpy as np

from .. import runtime
from ..diffusion import ddim_sample
from ..metrics import (
    INCEPTION_SHA256_PREFIX,
    clip_scores,
    features_and_probs,
    fid_from_features,
    file_sha256,
    inception_features,
    kernel_inception_distance,
    load_inception,
    train_classifier,
)
from .ddpm import TrainConfig, load_model, load_split


def _reference_images(config: TrainConfig):
    train, held_out = load_split(config)
    return train, (held_out if held_out is not None else train)


def _samples(model, diffusion, state, num, steps, guidance, seed, progress):
    """``num`` DDIM samples (classes in turn for a class-conditional model) and their labels."""
    num_classes = state["num_classes"]
    y = np.arange(num) % num_classes if num_classes is not None else None
    samples = ddim_sample(
        model,
        diffusion,
        (num, *state["image_shape"]),
        steps=steps,
        generator=seed,
        y=y,
        guidance=guidance,
        null_class=num_classes,
        progress=progress,
    )
    return samples, y


def _cached_inception_features(network, images, weights_sha256):
    """Inception features of a dataset's images, kept in minidiff's cache folder: the reference
    side of FID is the same for every checkpoint of a dataset, and costs as much as the samples."""
    images = np.ascontiguousarray(images, dtype=np.float32)
    h = hashlib.sha256(weights_sha256.encode())
    h.update(repr(images.shape).encode())
    h.update(images.tobytes())
    path = runtime.cache_dir() / f"inception-features-{h.hexdigest()[:16]}.npy"
    if path.is_file():
        try:
            cached = np.load(path)
            if cached.shape == (len(images), 2048):
                return cached
        except (OSError, ValueError):  # a damaged entry: compute it again and overwrite it
            pass
    features = inception_features(network, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, features)
    tmp.replace(path)  # atomic: a concurrent reader sees the old file or the whole new one
    return features


def inception_report(
    checkpoint, inception, num=10_000, reference_num=None, steps=50, guidance=None, seed=0, progress=None
) -> dict:
    """FID-``num`` and KID of ``num`` DDIM samples against the training images on the FID
    Inception network with the weights in the file ``inception``, as papers report them: FID-10k
    as the field monitors training, FID-50k for final numbers. ``reference_num`` takes that many
    training images at random (default: all of them). The samples are rounded to 8 bits first, as
    the PNG files the field's tools read."""
    weights_sha256 = file_sha256(inception)
    network = load_inception(inception)
    model, diffusion, state = load_model(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    train, _ = load_split(config)
    reference = train.images
    if reference_num is not None and reference_num < len(reference):
        idx = np.random.default_rng(seed).choice(len(reference), size=reference_num, replace=False)
        reference = reference[np.sort(idx)]
    samples, _ = _samples(model, diffusion, state, num, steps, guidance, seed, progress)
    f_samples = inception_features(network, samples)
    f_ref = _cached_inception_features(network, reference, weights_sha256)
    kid, kid_std = kernel_inception_distance(f_samples, f_ref, seed=seed)
    return {
        "num_samples": num,
        "num_reference": len(reference),
        "ddim_steps": steps,
        "guidance": guidance,
        "fid": fid_from_features(f_samples, f_ref),
        "kid": kid,
        "kid_std": kid_std,
        "weights": str(pathlib.Path(inception)),
        "weights_sha256": weights_sha256,
        "standard_weights": weights_sha256.startswith(INCEPTION_SHA256_PREFIX),
    }


def sample_quality_report(checkpoint, num=500, steps=50, guidance=None, seed=0, progress=None) -> dict:
    """Sample ``num`` images with DDIM and compare them with the held-out images.

    Returns fid (samples vs held-out), real_fid (as many training images vs
    held-out: the floor the sample FID can reach at this sample size),
    mean_confidence and class_histogram of the samples under the classifier,
    and the classifier's accuracy on the held-out images.
    """
    model, diffusion, state = load_model(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    train, reference = _reference_images(config)
    if train.labels is None:
        raise ValueError("FID uses a classifier trained on the labels; this dataset has none")
    classifier = train_classifier(train.images, train.labels, train.num_classes, seed=config.seed)
    samples, y = _samples(model, diffusion, state, num, steps, guidance, seed, progress)
    f_samples, p_samples = features_and_probs(classifier, samples)
    f_ref, p_ref = features_and_probs(classifier, reference.images)
    rng = np.random.default_rng(seed)
    real = train.images[rng.choice(len(train), size=min(num, len(train)), replace=False)]
    f_real, _ = features_and_probs(classifier, real)
    report = {
        "num_samples": num,
        "ddim_steps": steps,
        "guidance": guidance,
        "fid": fid_from_features(f_samples, f_ref),
        "real_fid": fid_from_features(f_real, f_ref),
        "mean_confidence": float(p_samples.max(axis=1).mean()),
        "class_histogram": np.bincount(p_samples.argmax(axis=1), minlength=p_samples.shape[1]).tolist(),
        "classifier_accuracy": float((p_ref.argmax(axis=1) == reference.labels).mean()),
    }
    report["kid"], report["kid_std"] = kernel_inception_distance(f_samples, f_ref, seed=seed)
    if y is not None:
        report["label_agreement"] = float((p_samples.argmax(axis=1) == y).mean())
    return report


def bits_per_dim_report(checkpoint, num=64, timesteps=100, seed=0) -> dict:
    """The variational bound on ``num`` held-out images (``timesteps`` random
    terms per image; None or 0 for all T)."""
    model, diffusion, state = load_model(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    _, reference = _reference_images(config)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(reference), size=min(num, len(reference)), replace=False)
    y = reference.labels[idx] if state["num_classes"] is not None else None
    result = diffusion.bits_per_dim(
        model, reference.images[idx], timesteps=timesteps or None, y=y, generator=rng
    )
    return {key: float(value.mean()) for key, value in result.items()} | {
        "num_images": len(idx),
        "timesteps": timesteps or diffusion.T,
    }


def clip_score_report(clip, sample=None, task=None, num=100, seed=0, batch_size=16) -> dict:
    """CLIP scores (``metrics.clip_score``) under the CLIP model or folder ``clip``, on ``num``
    held-out image-caption pairs of ``task`` (default: the captioned shapes): of the real pairs,
    of mismatched pairs (each image against the caption of another image with a different
    caption: the floor a model that ignores its prompt stays near), and, given ``sample``
    (prompts -> images (N, 3, H, W), uint8 or in [-1, 1]), of images sampled for those captions,
    ``batch_size`` prompts at a time. Each score is clamped at 0, as clip_score's is; the
    ``*_unclamped`` entries hold the means before the clamp.
    """
    from ..models.clip import CLIPModel
    from .clip import load_task

    model = clip if isinstance(clip, CLIPModel) else CLIPModel.from_pretrained(clip)
    task = task if task is not None else load_task("shapes", seed=seed)
    rng = np.random.default_rng(seed)
    count = min(num, len(task.held_out_captions))
    index = rng.choice(len(task.held_out_captions), size=count, replace=False)
    images = task.held_out_images[index]
    captions = [task.held_out_captions[i] for i in index]
    others = _mismatched(captions, rng)
    pairs = {"real": (images, captions), "mismatched": (images, others)}
    if sample is not None:
        samples = np.concatenate([sample(captions[i : i + batch_size]) for i in range(0, count, batch_size)])
        pairs["samples"] = (samples, captions)
    report = {"num_pairs": count}
    for name, (x, texts) in pairs.items():
        mean = float(clip_scores(x, texts, model).mean())
        report[name] = max(mean, 0.0)  # clip_score's clamp
        report[f"{name}_unclamped"] = mean  # where the clamp hides how far below 0 it is
    return report


def _mismatched(captions, rng) -> list:
    """For each caption, the caption of another pair, one that says something else."""
    out = []
    for text in captions:
        others = [j for j, other in enumerate(captions) if other != text]
        if not others:
            raise ValueError("clip_score_report: every pair has the same caption; nothing to mismatch")
        out.append(captions[others[rng.integers(len(others))]])
    return out
