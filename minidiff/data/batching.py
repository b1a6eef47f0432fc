"""Minibatches: shuffled each epoch, optionally flipped, resumable from a small state dict."""

from __future__ import annotations

import copy
import math

import numpy as np

from .dataset import Dataset


def _check_int(name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"BatchIterator: {name} must be an int >= {low}, got {value!r}")
    return int(value)


class BatchIterator:
    """Yields ``(images, labels)`` NumPy batches of ``dataset``; ``labels`` is None when it has none.

    Each epoch visits the images in a fresh random order (``shuffle``); ``flip`` mirrors each image
    horizontally with probability 1/2; ``drop_last`` skips an epoch's short final batch; ``epochs``
    stops after that many epochs (None: endless). Everything random comes from two generators
    spawned from ``seed``, one for the orders and one for the flips, so ``state_dict()`` taken after
    any batch and loaded into a fresh iterator continues with exactly the same batches."""

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int,
        seed: int = 0,
        *,
        shuffle: bool = True,
        flip: bool = False,
        drop_last: bool = True,
        epochs: int | None = None,
    ):
        if len(dataset) == 0:
            raise ValueError("BatchIterator: the dataset is empty")
        self.batch_size = _check_int("batch_size", batch_size, 1)
        if drop_last and self.batch_size > len(dataset):
            raise ValueError(
                f"BatchIterator: batch_size {batch_size} exceeds the {len(dataset)} images of "
                f"{dataset.name!r}; with drop_last=True no batch could be made"
            )
        self.epochs = None if epochs is None else _check_int("epochs", epochs, 0)
        self.dataset = dataset
        self.shuffle, self.flip, self.drop_last = bool(shuffle), bool(flip), bool(drop_last)
        order_seed, flip_seed = np.random.SeedSequence(_check_int("seed", seed, 0)).spawn(2)
        self._order_rng = np.random.default_rng(order_seed)
        self._flip_rng = np.random.default_rng(flip_seed)
        self.epoch, self.position = 0, 0
        self._draw_order()

    def _draw_order(self):
        # The state before the draw is what a checkpoint keeps: replaying the draw rebuilds the order.
        self._order_state = copy.deepcopy(self._order_rng.bit_generator.state)
        n = len(self.dataset)
        self._order = self._order_rng.permutation(n) if self.shuffle else np.arange(n)

    @property
    def steps_per_epoch(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[np.ndarray, np.ndarray | None]:
        n, b = len(self.dataset), self.batch_size
        if self.position >= n or (self.drop_last and self.position + b > n):
            if self.epochs is not None and self.epoch + 1 >= self.epochs:
                raise StopIteration
            self.epoch, self.position = self.epoch + 1, 0
            self._draw_order()
        if self.epochs is not None and self.epoch >= self.epochs:
            raise StopIteration
        index = self._order[self.position : self.position + b]
        self.position += len(index)
        images = self.dataset.images[index]  # fancy indexing copies, so flipping in place is safe
        if self.flip:
            mirror = self._flip_rng.random(len(index)) < 0.5
            images[mirror] = images[mirror, :, :, ::-1]
        labels = None if self.dataset.labels is None else self.dataset.labels[index]
        return images, labels

    def state_dict(self) -> dict:
        """Where the iterator stands, as plain JSON-serialisable values."""
        return {
            "epoch": self.epoch,
            "position": self.position,
            "order_rng": copy.deepcopy(self._order_state),
            "flip_rng": copy.deepcopy(self._flip_rng.bit_generator.state),
            "num_images": len(self.dataset),
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "flip": self.flip,
            "drop_last": self.drop_last,
        }

    def load_state_dict(self, state: dict):
        """Continue from ``state_dict()`` output; the dataset and settings must match it."""
        for key in ("num_images", "batch_size", "shuffle", "flip", "drop_last"):
            mine = len(self.dataset) if key == "num_images" else getattr(self, key)
            if state[key] != mine:
                raise ValueError(
                    f"BatchIterator.load_state_dict: the state has {key}={state[key]!r}, "
                    f"this iterator has {mine!r}"
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position <= len(self.dataset):
            raise ValueError(f"BatchIterator.load_state_dict: bad epoch {epoch} or position {position}")
        self._order_rng.bit_generator.state = copy.deepcopy(state["order_rng"])
        self._draw_order()
        self._flip_rng.bit_generator.state = copy.deepcopy(state["flip_rng"])
        self.epoch, self.position = epoch, position


def batches(
    dataset: Dataset,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    flip: bool = False,
    drop_last: bool = True,
    epochs: int | None = None,
) -> BatchIterator:
    """An iterator of ``(images, labels)`` batches; see ``BatchIterator`` (which it returns)."""
    return BatchIterator(
        dataset, batch_size, seed, shuffle=shuffle, flip=flip, drop_last=drop_last, epochs=epochs
    )
