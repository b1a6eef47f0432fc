"""Reading a PyTorch ``.pth`` file of tensors (a state dict saved by ``torch.save``) without torch.

``torch.save`` pickles the object and stores each tensor's storage apart from the pickle: since
PyTorch 1.6 in a zip archive (``NAME/data.pkl`` and one record ``NAME/data/KEY`` per storage),
before that in one stream (a magic number, the protocol version, system info, the pickle, the
list of storage keys, then each storage as an int64 element count and its raw bytes). In both the
pickle names a storage by a persistent id ``("storage", storage_type, key, location, numel, ...)``
and rebuilds each tensor with ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride,
...)``.

The unpickler here resolves only those names (the storage types, the rebuild functions and
``collections.OrderedDict``) and refuses every other global, so loading a file never runs code
from it. Tensors come back as NumPy arrays with their shape and values (strided views copied out).
"""

from __future__ import annotations

import collections
import io
import pathlib
import pickle
import struct
import zipfile

import numpy as np

# torch's pickled storage classes and the NumPy dtype of their elements
STORAGE_DTYPES = {
    "DoubleStorage": np.float64,
    "FloatStorage": np.float32,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a pre-1.6 torch.save stream
LEGACY_PROTOCOL = 1001


class TorchFileError(ValueError):
    """A file that is not a readable PyTorch file of tensors; the message names the file."""


class _Storage:
    """One storage: its element dtype, filled with the raw elements once they are read."""

    def __init__(self, dtype, numel):
        self.dtype, self.numel, self.array = np.dtype(dtype), numel, None


class _Tensor:
    """A tensor rebuilt from the pickle, made an array once its storage has been read."""

    def __init__(self, storage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, tuple(size), tuple(stride)

    def to_array(self, path):
        data = self.storage.array
        itemsize = data.dtype.itemsize
        # the furthest element the view reaches must lie inside the storage
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if 0 in self.size:
            return np.zeros(self.size, dtype=data.dtype)
        if self.offset < 0 or last >= data.size:
            raise TorchFileError(
                f"{path}: a tensor of size {self.size}, stride {self.stride} at offset {self.offset} "
                f"reaches past its storage of {data.size} elements"
            )
        view = np.lib.stride_tricks.as_strided(
            data[self.offset :], shape=self.size, strides=[s * itemsize for s in self.stride]
        )
        return np.array(view)  # a copy: the storage is shared between views


def _rebuild_tensor(storage, storage_offset, size, stride, *_):  # requires_grad, hooks, metadata
    return _Tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_):
    return data


SAFE_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, path, storage):
        super().__init__(file)
        self.path, self.storage = path, storage

    def load(self):
        try:
            return super().load()
        except (pickle.UnpicklingError, EOFError, AttributeError, IndexError, TypeError) as e:
            raise TorchFileError(f"{self.path}: a damaged pickle ({e})") from None

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return STORAGE_DTYPES[name]
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        raise TorchFileError(
            f"{self.path}: the pickle refers to {module}.{name}; minidiff reads only tensors "
            "(a state dict saved with torch.save(model.state_dict(), path))"
        )

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid or pid[0] not in ("storage", b"storage"):
            raise TorchFileError(f"{self.path}: unknown persistent id {pid!r} in the pickle")
        dtype, key, numel = pid[1], str(pid[2]), pid[4]
        if not isinstance(dtype, type):
            raise TorchFileError(f"{self.path}: storage {key} has an unsupported type {dtype!r}")
        return self.storage(key, dtype, numel, pid[5] if len(pid) > 5 else None)


def _state_dict(obj, path) -> dict[str, np.ndarray]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # a training checkpoint that wraps the weights
    if not isinstance(obj, dict):
        raise TorchFileError(f"{path}: holds a {type(obj).__name__}, not a dict of tensors (a state dict)")
    out = {}
    for name, value in obj.items():
        if not isinstance(value, _Tensor):
            raise TorchFileError(f"{path}: key {name!r} holds a {type(value).__name__}, not a tensor")
        out[str(name)] = value.to_array(path)
    return out


def _load_zip(path, archive: zipfile.ZipFile) -> dict[str, np.ndarray]:
    pickles = [n for n in archive.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pickles) != 1:
        raise TorchFileError(f"{path}: a zip archive without one data.pkl (not a torch.save file)")
    prefix = pickles[0][: -len("data.pkl")]
    order = "little"
    if f"{prefix}byteorder" in archive.namelist():
        order = archive.read(f"{prefix}byteorder").decode().strip()
    storages = {}

    def storage(key, dtype, numel, _view):
        if key not in storages:
            record = f"{prefix}data/{key}"
            try:
                raw = archive.read(record)
            except KeyError:
                raise TorchFileError(f"{path}: storage record {record} is missing") from None
            dt = np.dtype(dtype).newbyteorder("<" if order == "little" else ">")
            if len(raw) < numel * dt.itemsize:
                raise TorchFileError(
                    f"{path}: storage {record} holds {len(raw)} bytes, expected {numel} x {dt}"
                )
            s = _Storage(dtype, numel)
            s.array = np.frombuffer(raw, dtype=dt, count=numel).astype(np.dtype(dtype), copy=False)
            storages[key] = s
        return storages[key]

    obj = _Unpickler(io.BytesIO(archive.read(pickles[0])), path, storage).load()
    return _state_dict(obj, path)


def _load_legacy(path, f) -> dict[str, np.ndarray]:
    try:
        magic = pickle.load(f)
    except Exception:
        raise TorchFileError(
            f"{path}: not a PyTorch file (neither a zip archive nor a torch.save stream)"
        ) from None
    if magic != LEGACY_MAGIC:
        raise TorchFileError(f"{path}: not a PyTorch file (no torch.save magic number)")
    protocol = pickle.load(f)
    if protocol != LEGACY_PROTOCOL:
        raise TorchFileError(f"{path}: torch.save protocol {protocol!r}, minidiff reads {LEGACY_PROTOCOL}")
    sys_info = pickle.load(f)
    little = sys_info.get("little_endian", True) if isinstance(sys_info, dict) else True
    storages, views = {}, []

    def storage(key, dtype, numel, view):
        if key not in storages:
            storages[key] = _Storage(dtype, numel)
        if view is not None:  # (view_key, offset, size): a slice of the root storage
            views.append((view, storages[key]))
            view_key = str(view[0])
            if view_key not in storages:
                storages[view_key] = _Storage(dtype, view[2])
            return storages[view_key]
        return storages[key]

    obj = _Unpickler(f, path, storage).load()
    keys = pickle.load(f)
    for key in map(str, keys):
        if key not in storages:
            raise TorchFileError(f"{path}: storage {key} is listed but no tensor uses it")
        s = storages[key]
        dt = s.dtype.newbyteorder("<" if little else ">")
        header = f.read(8)
        if len(header) != 8:
            raise TorchFileError(f"{path}: the file ends before storage {key}")
        (numel,) = struct.unpack("<q" if little else ">q", header)
        raw = f.read(numel * dt.itemsize)
        if len(raw) != numel * dt.itemsize:
            raise TorchFileError(f"{path}: the file ends inside storage {key}")
        s.array = np.frombuffer(raw, dtype=dt).astype(s.dtype, copy=False)
    for (view_key, offset, size), root in views:
        storages[str(view_key)].array = root.array[offset : offset + size]
    return _state_dict(obj, path)


def load_torch_file(path) -> dict[str, np.ndarray]:
    """The state dict in a ``.pth`` file written by ``torch.save``: name -> NumPy array.

    Reads both of torch.save's formats (the zip archive of PyTorch >= 1.6 and the older single
    stream). Raises TorchFileError naming the file for anything else: a missing file, another
    format, a pickle of other objects than tensors.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise TorchFileError(f"{path}: no such file")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            return _load_zip(path, archive)
    with open(path, "rb") as f:
        return _load_legacy(path, f)
