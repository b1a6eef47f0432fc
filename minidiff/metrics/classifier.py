"""A small CNN classifier that minidiff trains on the dataset itself; its
penultimate activations are the features for the Frechet distance, and its
predictions give the confidence and class histogram of generated samples."""

from __future__ import annotations

import hashlib
import os

import numpy as np

from .. import functional as F
from .. import runtime
from ..autograd import no_grad
from ..nn import Conv2d, Linear, Module
from ..optim import Adam
from ..tensor import Tensor

CLASSIFIER_VERSION = 1


class FeatureClassifier(Module):
    """conv-SiLU-pool x2, then a 64-wide feature layer and a linear read-out."""

    def __init__(self, in_channels, image_size, num_classes, width=32, features=64, seed=0):
        rng = np.random.default_rng(seed)
        self.conv1 = Conv2d(in_channels, width, 3, padding=1, rng=rng)
        self.conv2 = Conv2d(width, 2 * width, 3, padding=1, rng=rng)
        self.flat = 2 * width * (image_size // 4) ** 2
        self.fc = Linear(self.flat, features, rng=rng)
        self.head = Linear(features, num_classes, rng=rng)

    def features(self, x):
        h = F.avg_pool2d(F.silu(self.conv1(x)), 2)
        h = F.avg_pool2d(F.silu(self.conv2(h)), 2)
        return F.silu(self.fc(F.reshape(h, (h.shape[0], self.flat))))

    def forward(self, x):
        return self.head(self.features(x))


def _fingerprint(images, labels, **settings) -> str:
    """A key for the cache: the data and every setting that changes the weights."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(images, dtype=np.float32).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    h.update(repr(sorted({"version": CLASSIFIER_VERSION, **settings}.items())).encode())
    return h.hexdigest()[:16]


def train_classifier(
    images, labels, num_classes, epochs=15, batch_size=64, lr=2e-3, seed=0, use_cache=True
) -> FeatureClassifier:
    """Train (or load from the cache) the classifier on images (N, C, H, W) in
    [-1, 1] with integer labels. Same data and seed give the same weights."""
    from safetensors.numpy import load_file, save_file

    images = np.asarray(images, dtype=np.float32)
    labels = np.asarray(labels, dtype=np.int64)
    if images.ndim != 4 or labels.shape != (images.shape[0],):
        raise ValueError(
            f"train_classifier: need images (N, C, H, W) and labels (N,), got {images.shape}, {labels.shape}"
        )
    if images.shape[-1] % 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"train_classifier: images must be square with a side divisible by 4, got {images.shape}"
        )
    if len(images) < batch_size:
        raise ValueError(f"train_classifier: {len(images)} images are fewer than one batch of {batch_size}")
    model = FeatureClassifier(images.shape[1], images.shape[-1], num_classes, seed=seed)
    key = _fingerprint(
        images, labels, num_classes=num_classes, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed
    )
    path = runtime.cache_dir() / f"classifier-{key}.safetensors"
    if use_cache and path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception:  # a corrupt or stale cache entry: train again and overwrite it
            pass
    rng = np.random.default_rng(seed)
    optimizer = Adam(model.parameters(), lr=lr)
    n = len(images)
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            loss = F.cross_entropy(model(Tensor.from_array(images[idx])), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file(model.state_dict(), str(tmp))
        os.replace(tmp, path)
    return model


@no_grad()
def features_and_probs(model: FeatureClassifier, images, batch_size=256):
    """Penultimate features (N, D) and class probabilities (N, K), float64."""
    feats, probs = [], []
    images = np.asarray(images, dtype=np.float32)
    for start in range(0, len(images), batch_size):
        f = model.features(Tensor.from_array(images[start : start + batch_size]))
        feats.append(f.data.astype(np.float64))
        probs.append(F.softmax(model.head(f), axis=1).data.astype(np.float64))
    return np.concatenate(feats), np.concatenate(probs)
