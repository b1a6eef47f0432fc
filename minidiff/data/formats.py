"""Dataset sources: the bundled digits, MNIST IDX files, CIFAR-10 pickles and image folders.

Every reader checks what it parses and fails with FileNotFoundError or ValueError naming the file
and what is wrong with it."""

from __future__ import annotations

import gzip
import importlib.util
import io
import math
import pickle
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .dataset import Dataset
from .images import RESAMPLE, from_uint8, resize_square

SPECS = ("digits", "shapes", "mnist:PATH", "cifar10:PATH", "folder:PATH")


def load_dataset(spec: str = "digits", image_size: int | None = None) -> Dataset:
    """Load a dataset by spec: "digits", "shapes", "mnist:PATH", "cifar10:PATH" or "folder:PATH".

    ``image_size`` resizes to a square of that side (PIL bilinear); None keeps the native size
    (digits: 16, folder: 32). The captioned shapes are drawn at ``image_size`` (32 by default,
    or 64), not resized."""
    if not isinstance(spec, str):
        raise TypeError(f"dataset spec must be a string such as 'digits' or 'mnist:PATH', got {spec!r}")
    if image_size is not None:
        if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
            raise ValueError(f"image_size must be a positive int or None, got {image_size!r}")
        image_size = int(image_size)
    kind, sep, where = spec.partition(":")
    if kind == "digits":
        if sep:
            raise ValueError(f"dataset spec {spec!r}: digits is bundled and takes no path")
        return load_digits(image_size or 16)
    if kind == "shapes":
        if sep:
            raise ValueError(f"dataset spec {spec!r}: shapes are generated and take no path")
        from .shapes import load_shapes

        return load_shapes(image_size=image_size or 32)
    readers = {"mnist": load_mnist, "cifar10": load_cifar10, "folder": load_folder}
    if kind not in readers:
        raise ValueError(f"unknown dataset spec {spec!r}; expected one of {', '.join(SPECS)}")
    if not where:
        raise ValueError(f"dataset spec {spec!r} needs a path: {kind}:PATH")
    path = Path(where).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"dataset spec {spec!r}: {path} does not exist")
    return readers[kind](path, image_size=image_size, name=spec)


# -- digits ------------------------------------------------------------------------------------------


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(1797, 8, 8) pixels 0..16 and labels: the table behind sklearn.datasets.load_digits()."""
    # Importing sklearn.datasets takes seconds (it pulls in scipy.stats); the data is one small
    # CSV in sklearn's package data, read here the way load_digits reads it. The import is the
    # fallback should that file ever move.
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec else []:
        table_path = Path(root) / "datasets" / "data" / "digits.csv.gz"
        if table_path.is_file():
            table = np.loadtxt(table_path, delimiter=",")
            return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    return bunch.images, bunch.target.astype(np.int64)


def load_digits(image_size: int = 16) -> Dataset:
    """scikit-learn's 1,797 8x8 digits (values 0..16), resized with PIL bilinear, in [-1, 1]."""
    pixels, labels = _digits_arrays()
    pixels = resize_square(pixels.astype(np.float32)[:, None], image_size)  # PIL mode "F": no rounding
    images = np.clip(pixels / np.float32(8.0) - np.float32(1.0), -1.0, 1.0)
    return Dataset(images, labels, 10, "digits")


# -- MNIST (IDX files) ----------------------------------------------------------------------------

# IDX type codes (the third magic byte) -> big-endian NumPy dtypes.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    # Decide by content, not by name: browsers often unpack a .gz and keep the name.
    if data[:2] == b"\x1f\x8b":
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from None
    return data


def read_idx(path) -> np.ndarray:
    """Parse one IDX file (optionally gzipped) into a native-endian array, checking its size."""
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise ValueError(f"{path}: {len(data)} bytes is too short for an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if data[:2] != b"\0\0" or data[2] not in _IDX_TYPES or data[3] == 0:
        raise ValueError(
            f"{path}: bad magic number 0x{magic:08x}; not an IDX file "
            f"(expected 0x0000TTDD: TT a type code, DD the number of dimensions)"
        )
    dtype, ndim = np.dtype(_IDX_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(data)} bytes, {ndim} dimensions need {header})")
    dims = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected, found = math.prod(dims) * dtype.itemsize, len(data) - header
    if found != expected:
        what = "truncated" if found < expected else "too long"
        raise ValueError(
            f"{path}: {what}: dimensions {dims} of {dtype.str[1:]} need {expected} bytes "
            f"of data, the file has {found}"
        )
    array = np.frombuffer(data, dtype, count=math.prod(dims), offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _find(folder: Path, names: tuple[str, ...]) -> Path | None:
    for name in names:
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def load_mnist(path, image_size: int | None = None, name: str = "mnist") -> Dataset:
    """MNIST-format IDX data: a folder with train-images-idx3-ubyte[.gz] (and train-labels-idx1-ubyte[.gz],
    if present), or one images file (its labels file is used when it sits beside it)."""
    path = Path(path)
    if path.is_dir():
        images_path = _find(path, ("train-images-idx3-ubyte", "train-images.idx3-ubyte"))
        if images_path is None:
            raise FileNotFoundError(
                f"{path}: no MNIST images file (train-images-idx3-ubyte or .gz) in this folder"
            )
        labels_path = _find(path, ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"))
    else:
        images_path = path
        base = path.name.removesuffix(".gz")
        sibling = base.replace("images", "labels").replace("idx3", "idx1")
        labels_path = _find(path.parent, (sibling,)) if sibling != base else None

    pixels = read_idx(images_path)
    if pixels.ndim != 3 or pixels.dtype != np.uint8:
        raise ValueError(
            f"{images_path}: expected unsigned-byte images (N, H, W), magic 0x00000803; "
            f"found {pixels.dtype} with shape {pixels.shape}"
        )
    if pixels.shape[1] != pixels.shape[2] or pixels.shape[0] == 0:
        raise ValueError(f"{images_path}: expected N >= 1 square images, found shape {pixels.shape}")
    labels = num_classes = None
    if labels_path is not None:
        labels = read_idx(labels_path)
        if labels.ndim != 1 or labels.dtype != np.uint8:
            raise ValueError(
                f"{labels_path}: expected unsigned-byte labels (N,), magic 0x00000801; "
                f"found {labels.dtype} with shape {labels.shape}"
            )
        if len(labels) != len(pixels):
            raise ValueError(f"{labels_path}: {len(labels)} labels for {len(pixels)} images in {images_path}")
        labels = labels.astype(np.int64)
        num_classes = int(labels.max()) + 1
    pixels = pixels[:, None]
    if image_size is not None:
        pixels = resize_square(pixels, image_size)
    return Dataset(from_uint8(pixels), labels, num_classes, name)


# -- CIFAR-10 (python pickles) -------------------------------------------------------------------

# The only globals a CIFAR-10 batch needs: NumPy's array reconstruction (old and new module paths)
# and the bytes codec Python 3 uses at protocol <= 2. Refusing everything else means a bad or
# hostile pickle fails with a message instead of running code.
_PICKLE_GLOBALS = {
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: not part of a CIFAR-10 batch")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        # encoding="bytes": the official batches were pickled by Python 2 (keys are b"data", ...).
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    except Exception as exc:  # pickle raises many types on bad input; all mean the same here
        raise ValueError(
            f"{path}: not a readable CIFAR-10 batch pickle ({type(exc).__name__}: {exc})"
        ) from None
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: a CIFAR-10 batch is a dict, found {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path}: a CIFAR-10 batch needs b'data' and b'labels', found keys {sorted(batch)}")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        found = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"{path}: b'data' must be a uint8 array of shape (N, 3072), found {found}")
    try:
        labels = np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError, OverflowError):
        labels = None
    if labels is None or labels.shape != (len(data),):
        raise ValueError(f"{path}: b'labels' must be {len(data)} integers, one per image")
    if len(labels) and not (labels.min() >= 0 and labels.max() < 10):
        raise ValueError(f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, each a row-major 32x32 plane.
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(path, image_size: int | None = None, name: str = "cifar10") -> Dataset:
    """CIFAR-10 python version: a folder with data_batch_1..5 (those present, in order; test_batch
    only when there is none of them), or one batch file."""
    path = Path(path)
    if path.is_dir():
        files = [path / f"data_batch_{i}" for i in range(1, 6) if (path / f"data_batch_{i}").is_file()]
        files = files or [p for p in (path / "test_batch",) if p.is_file()]
        if not files:
            raise FileNotFoundError(
                f"{path}: no CIFAR-10 batches (data_batch_1..5 or test_batch) in this folder"
            )
    else:
        files = [path]
    parts = [_read_cifar_batch(f) for f in files]
    pixels = np.concatenate([p for p, _ in parts])
    labels = np.concatenate([lab for _, lab in parts])
    if len(pixels) == 0:
        raise ValueError(f"{path}: the CIFAR-10 batches hold no images")
    if image_size is not None:
        pixels = resize_square(pixels, image_size)
    return Dataset(from_uint8(pixels), labels, 10, name)


# -- folders of images --------------------------------------------------------------------------

_EXTENSIONS = {".png", ".jpg", ".jpeg"}
_GRAY_MODES = {"1", "L", "LA", "La"}
_COLOR_MODES = {"RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}


def _image_mode(path: Path) -> str:
    """The file's pixel mode, read from its header only."""
    try:
        with Image.open(path) as image:
            mode = image.mode
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: unreadable image ({exc})") from None
    if mode not in _GRAY_MODES | _COLOR_MODES:
        raise ValueError(
            f"{path}: image mode {mode!r} (16-bit or float pixels) is not supported; "
            f"save it as 8-bit grayscale or RGB"
        )
    return mode


def _read_image(path: Path, mode: str, size: int) -> np.ndarray:
    """Decode, convert to ``mode``, center-crop to a square, resize: (size, size[, 3]) uint8."""
    try:
        with Image.open(path) as image:
            image.load()  # decode now, so truncated data fails here with the file's name
            image = ImageOps.exif_transpose(image)  # camera JPEGs store their rotation in EXIF
            image = _center_square(image.convert(mode)).resize((size, size), RESAMPLE)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ValueError(f"{path}: unreadable image ({exc})") from None
    return np.asarray(image)


def _center_square(image: Image.Image) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side))


def load_folder(path, image_size: int | None = None, name: str = "folder") -> Dataset:
    """PNG/JPEG files under ``path`` (recursive, sorted by relative path), center-cropped to a
    square and resized to ``image_size`` (default 32) with PIL bilinear.

    Grayscale when every image is grayscale (C = 1), else RGB (C = 3; alpha is dropped). When every
    image sits in a first-level subfolder, the sorted subfolder names are the classes."""
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"{root}: folder datasets need a directory of PNG/JPEG images")
    size = image_size or 32
    files = sorted(
        (p for p in root.rglob("*") if p.suffix.lower() in _EXTENSIONS and p.is_file()),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"{root}: no PNG or JPEG images found (searched recursively)")
    # Two passes: headers first to choose the channel count, then decode one image at a time.
    mode = "L" if all(_image_mode(f) in _GRAY_MODES for f in files) else "RGB"
    pixels = np.empty((len(files), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
    for i, f in enumerate(files):
        hwc = _read_image(f, mode, size)
        pixels[i] = hwc[None] if mode == "L" else hwc.transpose(2, 0, 1)

    labels = num_classes = class_names = None
    parents = [f.relative_to(root).parts for f in files]
    if all(len(parts) >= 2 for parts in parents):
        class_names = tuple(sorted({parts[0] for parts in parents}))
        index = {c: i for i, c in enumerate(class_names)}
        labels = np.array([index[parts[0]] for parts in parents], dtype=np.int64)
        num_classes = len(class_names)
    return Dataset(from_uint8(pixels), labels, num_classes, name, class_names)
