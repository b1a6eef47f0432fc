"""The data layer: datasets as NumPy arrays in [-1, 1], resumable minibatches, image grids.

    load_dataset("digits")                   bundled scikit-learn digits, 16x16, labels 0..9
    load_dataset("shapes")                   generated captioned shapes, 32x32 RGB (shapes.py)
    load_dataset("mnist:PATH")               IDX files (optionally gzipped)
    load_dataset("cifar10:PATH")             the CIFAR-10 python batches
    load_dataset("folder:PATH", 32)          PNG/JPEG files, center-cropped and resized

See docs/data.md."""

from .batching import BatchIterator, batches
from .dataset import Dataset
from .formats import load_cifar10, load_dataset, load_digits, load_folder, load_mnist, read_idx
from .images import from_uint8, make_grid, save_grid, to_uint8
from .shapes import CaptionedDataset, caption_digits, load_shapes, read_attributes

__all__ = [
    "BatchIterator",
    "CaptionedDataset",
    "Dataset",
    "batches",
    "caption_digits",
    "from_uint8",
    "load_cifar10",
    "load_dataset",
    "load_digits",
    "load_folder",
    "load_mnist",
    "load_shapes",
    "make_grid",
    "read_attributes",
    "read_idx",
    "save_grid",
    "to_uint8",
]
