"""Evaluation: FID and KID on the FID Inception network (pytorch-fid's weights file) or on
minidiff's own classifier features, sample confidence and class histograms; the CLIP score of
images against prompts. (Bits per dimension lives with the diffusion process:
``GaussianDiffusion.bits_per_dim``.)"""

from __future__ import annotations

import numpy as np

from .classifier import FeatureClassifier, features_and_probs, train_classifier
from .clip_score import clip_score, clip_scores
from .fid import (
    INCEPTION_FILE,
    INCEPTION_SHA256_PREFIX,
    INCEPTION_URL,
    fid_from_features,
    file_sha256,
    frechet_distance,
    gaussian_fit,
    inception_features,
    kernel_inception_distance,
    load_inception,
)


def sample_quality(classifier, samples, reference_images) -> dict:
    """FID of ``samples`` against ``reference_images`` on the classifier's features,
    the classifier's mean confidence on the samples, and their class histogram."""
    f_samples, p_samples = features_and_probs(classifier, samples)
    f_ref, _ = features_and_probs(classifier, reference_images)
    predicted = p_samples.argmax(axis=1)
    return {
        "fid": fid_from_features(f_samples, f_ref),
        "mean_confidence": float(p_samples.max(axis=1).mean()),
        "class_histogram": np.bincount(predicted, minlength=p_samples.shape[1]).tolist(),
    }


__all__ = [
    "INCEPTION_FILE",
    "INCEPTION_SHA256_PREFIX",
    "INCEPTION_URL",
    "FeatureClassifier",
    "clip_score",
    "clip_scores",
    "features_and_probs",
    "fid_from_features",
    "file_sha256",
    "frechet_distance",
    "gaussian_fit",
    "inception_features",
    "kernel_inception_distance",
    "load_inception",
    "sample_quality",
    "train_classifier",
]
