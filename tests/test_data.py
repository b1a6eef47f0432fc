"""The data layer: dataset sources, Dataset.split, resumable batches, uint8 conversion and grids.

Every file a loader reads here is written by the test itself (IDX, CIFAR-10 pickles, PNG/JPEG), so
the tests need no download and check exact round trips."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from minidiff.data import (
    BatchIterator,
    Dataset,
    batches,
    from_uint8,
    load_dataset,
    make_grid,
    read_idx,
    save_grid,
    to_uint8,
)
from minidiff.data.formats import _digits_arrays

# -- writers for the test files ---------------------------------------------------------------

_IDX_CODES = {"u1": 0x08, "i1": 0x09, "i2": 0x0B, "i4": 0x0C, "f4": 0x0D, "f8": 0x0E}


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written independently of the reader: header, then big-endian data."""
    kind = array.dtype.str[1:]
    header = bytes([0, 0, _IDX_CODES[kind], array.ndim])
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(">" + kind).tobytes()


def write(path: Path, data: bytes, gz: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def cifar_batch_bytes(data, labels, protocol=4) -> bytes:
    return pickle.dumps(
        {b"batch_label": b"test", b"data": data, b"labels": labels, b"filenames": [b"x.png"] * len(labels)},
        protocol=protocol,
    )


def indexed_dataset(n: int, channels: int = 1, size: int = 4, with_labels: bool = True) -> Dataset:
    """Random images whose labels are their own indices, so a batch tells where each image came from."""
    images = np.random.default_rng(n).uniform(-1, 1, (n, channels, size, size)).astype(np.float32)
    labels = np.arange(n) if with_labels else None
    return Dataset(images, labels, n if with_labels else None, f"indexed{n}")


def raises(exc, path: Path, what: str):
    """pytest.raises that wants the file's name and the problem, in that order, in the message."""
    return pytest.raises(exc, match=rf"{re.escape(path.name)}.*{what}")


def check_malformed(folder: Path, name: str, data: bytes, what: str, dataset: str):
    """Loading ``dataset`` from a folder whose file ``name`` holds ``data`` is a ValueError naming
    the file and ``what`` is wrong."""
    path = write(folder / name, data)
    with raises(ValueError, path, what):
        load_dataset(f"{dataset}:{folder}")


# -- digits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits_shape_range_and_labels(digits):
    assert len(digits) == 1797 and digits.images.shape == (1797, 1, 16, 16)
    assert digits.images.dtype == np.float32 and digits.images.flags.c_contiguous
    assert digits.images.min() == -1.0  # the background is exactly -1
    assert 0.9 < digits.images.max() <= 1.0
    assert digits.labels.dtype == np.int64 and digits.num_classes == 10
    assert set(np.unique(digits.labels)) == set(range(10))
    assert np.bincount(digits.labels).min() > 170  # about 180 of each digit


def test_digits_is_deterministic(digits):
    again = load_dataset("digits")
    assert np.array_equal(again.images, digits.images) and np.array_equal(again.labels, digits.labels)


def test_digits_at_native_size_are_the_raw_pixels_rescaled():
    pixels, labels = _digits_arrays()
    native = load_dataset("digits", image_size=8)
    assert np.array_equal(native.images[:, 0], (pixels / 8 - 1).astype(np.float32))
    assert np.array_equal(native.labels, labels)
    assert load_dataset("digits", image_size=12).images.shape == (1797, 1, 12, 12)


def test_digits_table_is_sklearn_load_digits():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels, labels = _digits_arrays()
    assert np.array_equal(pixels, bunch.images) and np.array_equal(labels, bunch.target)


def test_digits_falls_back_to_sklearn_when_the_table_is_not_found(monkeypatch):
    import importlib.util

    expected = _digits_arrays()
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    pixels, labels = _digits_arrays()
    assert np.array_equal(pixels, expected[0]) and np.array_equal(labels, expected[1])


# -- spec errors ----------------------------------------------------------------------------


def test_spec_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset spec 'imagenet:/x'.*digits"):
        load_dataset("imagenet:/x")
    with pytest.raises(ValueError, match="needs a path"):
        load_dataset("mnist:")
    with pytest.raises(ValueError, match="takes no path"):
        load_dataset("digits:/x")
    missing = tmp_path / "nowhere"
    for kind in ("mnist", "cifar10", "folder"):
        with raises(FileNotFoundError, missing, "does not exist"):
            load_dataset(f"{kind}:{missing}")
    for size in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="image_size"):
            load_dataset("digits", image_size=size)
    with pytest.raises(TypeError, match="spec must be a string"):
        load_dataset(tmp_path)


# -- MNIST (IDX) -------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_folder_round_trips_exactly(tmp_path, gz):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (7, 6, 6), dtype=np.uint8)
    labels = np.array([3, 1, 4, 1, 5, 9, 2], dtype=np.uint8)
    suffix = ".gz" if gz else ""
    write(tmp_path / f"train-images-idx3-ubyte{suffix}", idx_bytes(pixels), gz)
    write(tmp_path / f"train-labels-idx1-ubyte{suffix}", idx_bytes(labels), gz)

    ds = load_dataset(f"mnist:{tmp_path}")
    assert ds.images.shape == (7, 1, 6, 6) and ds.images.dtype == np.float32
    assert np.array_equal(to_uint8(ds.images)[:, 0], pixels)
    np.testing.assert_allclose(ds.images[:, 0], pixels / 127.5 - 1, rtol=0, atol=1e-6)
    assert np.array_equal(ds.labels, labels) and ds.labels.dtype == np.int64
    assert ds.num_classes == 10  # one more than the largest label
    assert ds.name == f"mnist:{tmp_path}"


def test_mnist_single_images_file_finds_its_labels(tmp_path):
    pixels = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    images = write(tmp_path / "t10k-images-idx3-ubyte", idx_bytes(pixels))
    ds = load_dataset(f"mnist:{images}")
    assert ds.labels is None and ds.num_classes is None  # no labels file beside it yet
    write(tmp_path / "t10k-labels-idx1-ubyte.gz", idx_bytes(np.array([0, 2], np.uint8)), gz=True)
    ds = load_dataset(f"mnist:{images}", image_size=8)
    assert ds.images.shape == (2, 1, 8, 8)
    assert ds.labels.tolist() == [0, 2] and ds.num_classes == 3


def test_mnist_gzip_is_detected_by_content(tmp_path):
    pixels = np.full((1, 2, 2), 255, np.uint8)
    # A .gz name on plain bytes (browsers unpack downloads and keep the name) and the reverse.
    plain = write(tmp_path / "a" / "train-images-idx3-ubyte.gz", idx_bytes(pixels))
    packed = write(tmp_path / "b" / "train-images-idx3-ubyte", idx_bytes(pixels), gz=True)
    for path in (plain, packed):
        assert np.array_equal(read_idx(path), pixels)


@given(
    kind=st.sampled_from(sorted(_IDX_CODES)),
    shape=st.lists(st.integers(0, 4), min_size=1, max_size=3),
    gz=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_read_idx_round_trips_every_type(kind, shape, gz, seed):
    rng = np.random.default_rng(seed)
    array = (rng.standard_normal(shape) * 100).astype(kind)
    with tempfile.TemporaryDirectory() as folder:
        got = read_idx(write(Path(folder) / "x.idx", idx_bytes(array), gz))
    assert got.dtype == np.dtype(kind) and got.dtype.isnative
    assert got.shape == tuple(shape) and np.array_equal(got, array)


_GOOD_HEADER = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (2, 3, 3))

_BAD_IDX = {
    "bad_magic": (b"\x12\x34\x56\x78" + bytes(30), "bad magic number 0x12345678"),
    "unknown_type": (bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 5]), "bad magic number 0x00000701"),
    "too_short": (b"\0\0", "too short for an IDX header"),
    "truncated_header": (bytes([0, 0, 0x08, 3, 0, 0, 0, 2]), "truncated IDX header"),
    "truncated_data": (_GOOD_HEADER + bytes(10), "truncated.*need 18 bytes of data, the file has 10"),
    "trailing_bytes": (_GOOD_HEADER + bytes(20), "too long.*need 18 bytes of data, the file has 20"),
    "corrupt_gzip": (b"\x1f\x8b" + b"not really gzip", "corrupt gzip data"),
    "labels_as_images": (idx_bytes(np.zeros(4, np.uint8)), "expected unsigned-byte images"),
    "float_images": (idx_bytes(np.zeros((1, 2, 2), np.float32)), "expected unsigned-byte images"),
}


@pytest.mark.parametrize("case", sorted(_BAD_IDX))
def test_malformed_idx_images_raise(tmp_path, case):
    check_malformed(tmp_path, "train-images-idx3-ubyte", *_BAD_IDX[case], "mnist")


def test_mnist_label_problems_raise(tmp_path):
    write(tmp_path / "train-images-idx3-ubyte", idx_bytes(np.zeros((4, 2, 2), np.uint8)))
    labels = write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8)))
    with raises(ValueError, labels, "3 labels for 4 images"):
        load_dataset(f"mnist:{tmp_path}")
    write(labels, idx_bytes(np.zeros((4, 1), np.uint8)))
    with raises(ValueError, labels, "expected unsigned-byte labels"):
        load_dataset(f"mnist:{tmp_path}")


def test_mnist_folder_without_images_file(tmp_path):
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(3, np.uint8)))
    with pytest.raises(FileNotFoundError, match="no MNIST images file.*train-images-idx3-ubyte"):
        load_dataset(f"mnist:{tmp_path}")


# -- CIFAR-10 --------------------------------------------------------------------------------


def test_cifar10_folder_loads_data_batches_in_order_with_channels_in_place(tmp_path):
    rng = np.random.default_rng(2)
    data1 = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    data2 = rng.integers(0, 256, (2, 3072), dtype=np.uint8)
    # One marked pixel per channel: red at (0, 0), green at (1, 2), blue at (31, 30).
    data1[0] = 0
    data1[0, 0] = 255
    data1[0, 1024 + 32 * 1 + 2] = 255
    data1[0, 2048 + 32 * 31 + 30] = 255
    write(tmp_path / "data_batch_1", cifar_batch_bytes(data1, [1, 2, 3]))
    write(tmp_path / "data_batch_2", cifar_batch_bytes(data2, [9, 0]))
    write(tmp_path / "test_batch", cifar_batch_bytes(data2[:1], [7]))  # not used: data batches exist

    ds = load_dataset(f"cifar10:{tmp_path}")
    assert ds.images.shape == (5, 3, 32, 32) and ds.num_classes == 10
    assert ds.labels.tolist() == [1, 2, 3, 9, 0]
    lit = np.argwhere(ds.images[0] == 1.0).tolist()
    assert lit == [[0, 0, 0], [1, 1, 2], [2, 31, 30]]
    assert (ds.images[0] == -1.0).sum() == 3072 - 3
    expected = np.concatenate([data1, data2]).reshape(5, 3, 32, 32)
    assert np.array_equal(to_uint8(ds.images), expected)


def test_cifar10_test_batch_single_file_and_python2_pickles(tmp_path):
    data = np.random.default_rng(3).integers(0, 256, (2, 3072), dtype=np.uint8)
    # A protocol-2 pickle naming numpy.core.multiarray, as the official (Python 2) files do.
    old = cifar_batch_bytes(data, [4, 5], protocol=2)
    old = old.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in old
    write(tmp_path / "test_batch", old)
    for spec in (f"cifar10:{tmp_path}", f"cifar10:{tmp_path / 'test_batch'}"):
        ds = load_dataset(spec)
        assert np.array_equal(to_uint8(ds.images), data.reshape(2, 3, 32, 32))
        assert ds.labels.tolist() == [4, 5]
    assert load_dataset(f"cifar10:{tmp_path}", image_size=8).images.shape == (2, 3, 8, 8)


class _Sneaky:
    def __reduce__(self):
        return (os.getcwd, ())


_GOOD_DATA = np.zeros((2, 3072), np.uint8)
_GOOD_BATCH = cifar_batch_bytes(_GOOD_DATA, [0, 1])

_BAD_CIFAR = {
    "not_a_pickle": (b"hello, world", "not a readable CIFAR-10 batch pickle"),
    "truncated": (_GOOD_BATCH[: len(_GOOD_BATCH) // 2], "not a readable CIFAR-10 batch pickle"),
    "a_list": (pickle.dumps([1, 2]), "is a dict, found list"),
    "no_labels": (pickle.dumps({b"data": _GOOD_DATA}), "needs b'data' and b'labels'"),
    "wrong_width": (cifar_batch_bytes(np.zeros((2, 100), np.uint8), [0, 1]), r"shape \(N, 3072\)"),
    "float_data": (cifar_batch_bytes(_GOOD_DATA.astype(np.float32), [0, 1]), "must be a uint8 array"),
    "label_count": (cifar_batch_bytes(_GOOD_DATA, [0]), "must be 2 integers"),
    "label_text": (cifar_batch_bytes(_GOOD_DATA, ["cat", "dog"]), "must be 2 integers"),
    "label_range": (cifar_batch_bytes(_GOOD_DATA, [0, 10]), "labels must be in 0..9"),
    "code": (pickle.dumps({b"data": _Sneaky(), b"labels": [0]}), "refusing to load"),
}


@pytest.mark.parametrize("case", sorted(_BAD_CIFAR))
def test_malformed_cifar10_batches_raise(tmp_path, case):
    check_malformed(tmp_path, "data_batch_1", *_BAD_CIFAR[case], "cifar10")


def test_cifar10_folder_without_batches(tmp_path):
    with pytest.raises(FileNotFoundError, match="no CIFAR-10 batches"):
        load_dataset(f"cifar10:{tmp_path}")


# -- folders of images -----------------------------------------------------------------------


def save_image(path: Path, array: np.ndarray, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kwargs)
    return path


def solid(color, w=12, h=12) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.uint8), (h, w, len(color))).copy()


def test_folder_loads_recursively_sorted_with_subfolder_classes(tmp_path):
    save_image(tmp_path / "dog" / "x.png", solid((0, 0, 255), 20, 10))
    save_image(tmp_path / "cat" / "b.png", solid((0, 255, 0)))
    save_image(tmp_path / "dog" / "sub" / "y.PNG", solid((255, 255, 255), 7, 9))
    save_image(tmp_path / "cat" / "a.jpg", solid((255, 0, 0), 16, 16), quality=95)
    (tmp_path / "notes.txt").write_text("not an image")

    ds = load_dataset(f"folder:{tmp_path}", image_size=8)
    assert ds.images.shape == (4, 3, 8, 8)
    # Sorted by relative path: cat/a.jpg, cat/b.png, dog/sub/y.PNG, dog/x.png.
    assert ds.class_names == ("cat", "dog") and ds.num_classes == 2
    assert ds.labels.tolist() == [0, 0, 1, 1]
    colors = to_uint8(ds.images).mean(axis=(2, 3))
    np.testing.assert_allclose(colors[0], [255, 0, 0], atol=3)  # JPEG: close, not exact
    assert colors[1:].tolist() == [[0, 255, 0], [255, 255, 255], [0, 0, 255]]
    assert load_dataset(f"folder:{tmp_path}").images.shape == (4, 3, 32, 32)  # the default size


@pytest.mark.parametrize("wide", [True, False])
def test_folder_center_crops_to_a_square(tmp_path, wide):
    # Three 10-pixel bands: red, blue, green. The center square is the blue band.
    red, blue, green = (255, 0, 0), (0, 0, 255), (0, 255, 0)
    bands = np.concatenate([solid(color, 10, 10) for color in (red, blue, green)], axis=1)
    save_image(tmp_path / "band.png", bands if wide else np.ascontiguousarray(bands.transpose(1, 0, 2)))
    ds = load_dataset(f"folder:{tmp_path}", image_size=10)
    assert np.array_equal(to_uint8(ds.images[0]), solid(blue, 10, 10).transpose(2, 0, 1))
    assert ds.labels is None and ds.class_names is None  # the image sits at the root


def test_folder_is_grayscale_only_when_every_image_is(tmp_path):
    gray = np.tile(np.arange(0, 240, 20, dtype=np.uint8), (12, 1))
    save_image(tmp_path / "a.png", gray)
    save_image(tmp_path / "b.jpg", gray)
    ds = load_dataset(f"folder:{tmp_path}", image_size=12)
    assert ds.images.shape == (2, 1, 12, 12)
    assert np.array_equal(to_uint8(ds.images[0, 0]), gray)

    save_image(tmp_path / "c.png", solid((10, 20, 30)))
    ds = load_dataset(f"folder:{tmp_path}", image_size=12)
    assert ds.images.shape == (3, 3, 12, 12)
    for channel in range(3):  # grayscale images repeat their values in R, G and B
        assert np.array_equal(to_uint8(ds.images[0, channel]), gray)


def test_folder_problems_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="no PNG or JPEG images found"):
        load_dataset(f"folder:{tmp_path}")
    not_a_dir = write(tmp_path / "file.png", b"x")
    with raises(ValueError, not_a_dir, "need a directory"):
        load_dataset(f"folder:{not_a_dir}")

    good = save_image(
        tmp_path / "ok" / "good.png", np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    )
    garbage = write(tmp_path / "ok" / "garbage.png", b"definitely not a PNG")
    with raises(ValueError, garbage, "unreadable image"):
        load_dataset(f"folder:{tmp_path / 'ok'}")
    garbage.unlink()
    truncated = write(tmp_path / "ok" / "half.png", good.read_bytes()[: len(good.read_bytes()) // 2])
    with raises(ValueError, truncated, "unreadable image"):
        load_dataset(f"folder:{tmp_path / 'ok'}")
    truncated.unlink()
    deep = save_image(tmp_path / "ok" / "deep.png", np.full((4, 4), 40000, np.uint16))
    with raises(ValueError, deep, "not supported"):
        load_dataset(f"folder:{tmp_path / 'ok'}")


# -- Dataset ------------------------------------------------------------------------------------


@given(n=st.integers(2, 60), fraction=st.floats(0.01, 0.99), seed=st.integers(0, 1000))
def test_split_partitions_deterministically(n, fraction, seed):
    ds = indexed_dataset(n)
    held_count = round(fraction * n)
    if not 1 <= held_count <= n - 1:
        with pytest.raises(ValueError, match="empty part"):
            ds.split(fraction, seed)
        return
    train, held = ds.split(fraction, seed)
    assert len(held) == held_count and len(train) == n - held_count
    assert sorted(train.labels.tolist() + held.labels.tolist()) == list(range(n))
    assert np.all(np.diff(train.labels) > 0) and np.all(np.diff(held.labels) > 0)  # source order kept
    assert np.array_equal(train.images, ds.images[train.labels])
    again_train, again_held = ds.split(fraction, seed)
    assert np.array_equal(again_held.labels, held.labels)
    assert held.name == f"{ds.name}[held_out]" and train.num_classes == ds.num_classes


def test_split_depends_on_the_seed_and_checks_the_fraction():
    ds = indexed_dataset(50)
    assert not np.array_equal(ds.split(0.2, 0)[1].labels, ds.split(0.2, 1)[1].labels)
    for fraction in (0.0, 1.0, -0.5, 2):
        with pytest.raises(ValueError, match="fraction"):
            ds.split(fraction)


def test_dataset_checks_its_fields():
    ok = np.zeros((2, 1, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Dataset(ok + 2, None, None, "x")
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        Dataset(ok * np.nan, None, None, "x")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        Dataset(ok[0], None, None, "x")
    with pytest.raises(ValueError, match="labels must be integers"):
        Dataset(ok, np.zeros(3, np.int64), 1, "x")
    with pytest.raises(ValueError, match="num_classes"):
        Dataset(ok, np.array([0, 5]), 5, "x")
    ds = Dataset(ok.astype(np.float64), np.array([0, 1], np.int32), 2, "x")
    assert ds.images.dtype == np.float32 and ds.labels.dtype == np.int64
    assert "images=(2, 1, 3, 3)" in repr(ds) and ds.channels == 1 and ds.image_size == 3


# -- batches ------------------------------------------------------------------------------------


def take(iterator, count):
    return [next(iterator) for _ in range(count)]


def assert_same_batches(got, expected):
    assert len(got) == len(expected)
    for (images, labels), (want_images, want_labels) in zip(got, expected, strict=True):
        assert np.array_equal(images, want_images)
        assert (labels is None and want_labels is None) or np.array_equal(labels, want_labels)


@given(
    n=st.integers(1, 23),
    data=st.data(),
    shuffle=st.booleans(),
    flip=st.booleans(),
    drop_last=st.booleans(),
    seed=st.integers(0, 2**32),
)
def test_resumed_iterator_yields_exactly_the_uninterrupted_batches(n, data, shuffle, flip, drop_last, seed):
    batch_size = data.draw(st.integers(1, n), label="batch_size")
    stop = data.draw(st.integers(0, 3 * n), label="stop after")
    more = data.draw(st.integers(1, 2 * n), label="then take")
    ds = indexed_dataset(n, channels=2, with_labels=data.draw(st.booleans(), label="labels"))
    make = lambda: BatchIterator(ds, batch_size, seed, shuffle=shuffle, flip=flip, drop_last=drop_last)

    reference = take(make(), stop + more)
    first = make()
    assert_same_batches(take(first, stop), reference[:stop])
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints keep it as JSON
    resumed = make()
    resumed.load_state_dict(state)
    assert_same_batches(take(resumed, more), reference[stop:])


def test_resume_keeps_the_epoch_limit():
    ds = indexed_dataset(10)
    everything = list(batches(ds, 3, seed=5, epochs=2, flip=True))
    assert len(everything) == 6
    first = batches(ds, 3, seed=5, epochs=2, flip=True)
    take(first, 4)
    resumed = batches(ds, 3, seed=5, epochs=2, flip=True)
    resumed.load_state_dict(first.state_dict())
    assert_same_batches(list(resumed), everything[4:])


def test_every_epoch_visits_each_image_once_in_a_new_order():
    ds = indexed_dataset(10)
    it = batches(ds, 3, seed=0, drop_last=False)
    assert it.steps_per_epoch == 4
    epochs = []
    for _ in range(3):
        chunk = take(it, 4)
        assert [len(labels) for _, labels in chunk] == [3, 3, 3, 1]
        order = np.concatenate([labels for _, labels in chunk])
        assert sorted(order.tolist()) == list(range(10))
        epochs.append(order.tolist())
    assert epochs[0] != epochs[1] != epochs[2]
    again = np.concatenate([labels for _, labels in take(batches(ds, 3, seed=0, drop_last=False), 4)])
    assert again.tolist() == epochs[0]
    other = np.concatenate([labels for _, labels in take(batches(ds, 3, seed=1, drop_last=False), 4)])
    assert other.tolist() != epochs[0]


def test_drop_last_shuffle_off_and_epochs():
    ds = indexed_dataset(10)
    it = batches(ds, 3, seed=0, shuffle=False, epochs=2)
    assert it.steps_per_epoch == 3
    got = [labels.tolist() for _, labels in it]
    assert got == [[0, 1, 2], [3, 4, 5], [6, 7, 8]] * 2
    with pytest.raises(StopIteration):
        next(it)  # stays exhausted
    assert list(batches(ds, 3, epochs=0)) == []
    ((images, labels),) = list(batches(ds, 25, drop_last=False, shuffle=False, epochs=1))
    assert np.array_equal(images, ds.images) and labels.tolist() == list(range(10))


def test_flip_mirrors_about_half_the_images_and_nothing_else():
    ds = indexed_dataset(400, channels=3, size=5)
    source = ds.images.copy()
    flipped = 0
    for images, labels in batches(ds, 16, seed=3, flip=True, epochs=1):
        for image, label in zip(images, labels, strict=True):
            same = np.array_equal(image, source[label])
            mirrored = np.array_equal(image, source[label][..., ::-1])
            assert same != mirrored  # random images are never symmetric
            flipped += mirrored
    assert 140 < flipped < 260  # Binomial(400, 1/2): mean 200, sd 10
    assert np.array_equal(ds.images, source)  # batches are copies
    for images, labels in batches(ds, 16, seed=3, flip=False, epochs=1):
        assert np.array_equal(images, source[labels])


def test_batches_without_labels():
    images, labels = next(batches(indexed_dataset(5, with_labels=False), 2))
    assert images.shape == (2, 1, 4, 4) and labels is None


def test_bad_batch_arguments():
    ds = indexed_dataset(10)
    for size in (0, -1, 2.5, True, None):
        with pytest.raises(ValueError, match="batch_size"):
            BatchIterator(ds, size)
    with pytest.raises(ValueError, match="batch_size 11 exceeds the 10 images"):
        BatchIterator(ds, 11)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(ds, 2, seed=-1)
    with pytest.raises(ValueError, match="epochs"):
        BatchIterator(ds, 2, epochs=-1)
    state = BatchIterator(ds, 2).state_dict()
    with pytest.raises(ValueError, match="batch_size=2"):
        BatchIterator(ds, 3).load_state_dict(state)
    with pytest.raises(ValueError, match="num_images=10"):
        BatchIterator(indexed_dataset(12), 2).load_state_dict(state)


# -- pixels and grids --------------------------------------------------------------------------


def test_to_uint8_inverts_from_uint8_and_rounds_clips():
    every = np.arange(256, dtype=np.uint8)
    assert np.array_equal(to_uint8(from_uint8(every)), every)
    values = np.array([-1.0, 1.0, 0.0, -3.0, 7.0, np.nan, np.inf, -np.inf, 0.996, 0.997])
    assert to_uint8(values).tolist() == [0, 255, 128, 0, 255, 128, 255, 0, 254, 255]
    assert to_uint8(np.zeros((2, 3), np.float32)).dtype == np.uint8


def test_save_grid_writes_a_png_of_the_right_size(tmp_path):
    images = np.random.default_rng(4).uniform(-1, 1, (10, 3, 8, 6)).astype(np.float32)
    path = save_grid(images, tmp_path / "samples" / "grid.png", nrow=4)  # 4 rows of 3
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == (2 + 3 * (6 + 2), 2 + 4 * (8 + 2))
        grid = np.asarray(png)
    top, left = 2 + 1 * 10, 2 + 1 * 8  # image 4: row 1, column 1
    assert np.array_equal(grid[top : top + 8, left : left + 6], to_uint8(images[4]).transpose(1, 2, 0))
    assert grid[:2].max() == 0  # the padding is black

    save_grid(images[:, :1], tmp_path / "gray.png")  # default: a near-square grid, 3 rows of 4
    with Image.open(tmp_path / "gray.png") as png:
        assert png.mode == "L" and png.size == (2 + 4 * 8, 2 + 3 * 10)


def test_make_grid_rows():
    images = np.zeros((20, 1, 2, 2), np.float32)
    assert make_grid(images, nrow=10, padding=0).shape == (20, 4, 1)  # 10 rows of 2 (a class per row)
    assert make_grid(images[:3], nrow=10, padding=0).shape == (6, 2, 1)  # no empty rows
    for bad in (np.zeros((2, 2, 4, 4)), np.zeros((0, 3, 4, 4)), np.zeros((3, 4, 4))):
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            make_grid(bad)
    with pytest.raises(ValueError, match="nrow"):
        make_grid(images, nrow=0)
