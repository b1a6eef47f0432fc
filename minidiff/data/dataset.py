"""The Dataset record: images in [-1, 1] as (N, C, H, W) float32, optional integer labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Dataset:
    """Images (N, C, H, W) float32 in [-1, 1], labels int64 (N,) or None, and a name.

    ``class_names`` is set where the source names its classes (folder datasets)."""

    images: np.ndarray
    labels: np.ndarray | None
    num_classes: int | None
    name: str
    class_names: tuple[str, ...] | None = None

    def __post_init__(self):
        images = np.ascontiguousarray(self.images, dtype=np.float32)
        if images.ndim != 4 or images.shape[0] == 0:
            raise ValueError(
                f"Dataset {self.name!r}: images must be (N, C, H, W) with N >= 1, got {images.shape}"
            )
        # Catches data left in [0, 1] or [0, 255], and NaN (which fails both comparisons).
        if not (images.min() >= -1.0 and images.max() <= 1.0):
            raise ValueError(
                f"Dataset {self.name!r}: images must lie in [-1, 1], found values in "
                f"[{images.min()}, {images.max()}]"
            )
        object.__setattr__(self, "images", images)
        if self.labels is None:
            if self.num_classes is not None:
                raise ValueError(f"Dataset {self.name!r}: num_classes given without labels")
            return
        labels = np.asarray(self.labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"Dataset {self.name!r}: labels must be integers of shape ({len(images)},), "
                f"got {labels.dtype} {labels.shape}"
            )
        labels = labels.astype(np.int64)
        if self.num_classes is None or not (labels.min() >= 0 and labels.max() < self.num_classes):
            raise ValueError(
                f"Dataset {self.name!r}: labels must lie in [0, num_classes), got "
                f"[{labels.min()}, {labels.max()}] with num_classes={self.num_classes}"
            )
        object.__setattr__(self, "labels", labels)

    def __len__(self) -> int:
        return len(self.images)

    def __repr__(self) -> str:
        labels = "None" if self.labels is None else f"{self.labels.shape}"
        return (
            f"Dataset(name={self.name!r}, images={self.images.shape} {self.images.dtype}, "
            f"labels={labels}, num_classes={self.num_classes})"
        )

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, indices, name: str | None = None) -> Dataset:
        """The images at ``indices`` (same classes), as a new Dataset."""
        indices = np.asarray(indices, dtype=np.int64)
        labels = None if self.labels is None else self.labels[indices]
        return Dataset(self.images[indices], labels, self.num_classes, name or self.name, self.class_names)

    def split(self, fraction: float, seed: int = 0) -> tuple[Dataset, Dataset]:
        """(train, held_out): a random ``fraction`` of the images (rounded) is held out.

        Deterministic in ``seed``; both parts keep the source order and are never empty."""
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"split: fraction must be in (0, 1), got {fraction}")
        n = len(self)
        n_held = round(fraction * n)
        if not 1 <= n_held <= n - 1:
            raise ValueError(f"split: holding out {fraction} of {n} images leaves an empty part")
        order = np.random.default_rng(seed).permutation(n)
        held, train = np.sort(order[:n_held]), np.sort(order[n_held:])
        return self.subset(train, f"{self.name}[train]"), self.subset(held, f"{self.name}[held_out]")
