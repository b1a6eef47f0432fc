"""Loading a model saved by diffusers or transformers: a folder with ``config.json`` and its
weights in safetensors files, loaded by parameter name.

A model class that loads this way mixes in ``Pretrained`` and defines ``from_config(config,
dtype=None, source=...)``, which builds the model the config describes (refusing, with
``ConfigError``, any value it does not implement); ``from_pretrained(folder)`` then reads the
config and the weights and copies them in, name by name. Names that differ in the files can be
mapped by overriding ``adapt_weights`` (the text encoder's optional ``text_model.`` prefix).

Every failure is one ``PretrainedError`` naming the file and the key: a missing folder or file,
weights only in PyTorch's pickle format (``.bin``), a missing, unexpected or mis-shaped tensor.

The save side, ``model.save_pretrained(folder)``, writes the folder the same libraries would:
``config.json`` (the model's ``config`` plus the library's bookkeeping keys) and the weights as
``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors`` (transformers), under
the names ``export_weights`` gives (the inverse of ``adapt_weights``).
"""

from __future__ import annotations

import json
import pathlib

import numpy as np

from .layers import without_init

WEIGHT_FILES = ("diffusion_pytorch_model", "model")  # diffusers' name, transformers' name
# The releases whose file layout the saved folders follow (each library reads newer and older).
DIFFUSERS_VERSION = "0.30.0"
TRANSFORMERS_VERSION = "4.40.0"


class PretrainedError(ValueError):
    """A model folder that cannot be loaded; the message names the file and the key."""


class ConfigError(PretrainedError):
    """A config value the model does not implement."""


def config_error(source, key, value, supported) -> ConfigError:
    return ConfigError(f"{source}: {key}={value!r} is not supported (minidiff implements {supported})")


def read_config(folder, name="config.json") -> dict:
    """The JSON object in ``folder/name``."""
    path = pathlib.Path(folder) / name
    if not pathlib.Path(folder).is_dir():
        raise PretrainedError(f"{folder}: no such folder")
    if not path.is_file():
        raise PretrainedError(f"{path}: missing (a model folder as diffusers' save_pretrained writes it)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PretrainedError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PretrainedError(f"{path}: expected a JSON object, got {type(config).__name__}")
    return config


def weight_files(folder, variant=None) -> list[pathlib.Path]:
    """The safetensors files holding the weights in ``folder``: ``<name>.safetensors``, or the
    shards listed in ``<name>.safetensors.index.json``; ``variant="fp16"`` prefers
    ``<name>.fp16.safetensors``, and the fp16 files are taken when no other exists."""
    folder = pathlib.Path(folder)
    suffixes = [f".{variant}", ""] if variant else ["", ".fp16"]
    for suffix in suffixes:
        for name in WEIGHT_FILES:
            single = folder / f"{name}{suffix}.safetensors"
            if single.is_file():
                return [single]
            index = folder / f"{name}{suffix}.safetensors.index.json"
            if index.is_file():
                try:
                    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
                except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                    raise PretrainedError(f"{index}: not a safetensors index ({e!r})") from None
                missing = [s for s in shards if not (folder / s).is_file()]
                if missing:
                    raise PretrainedError(f"{index}: names shards that are missing: {missing}")
                return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.glob("*.bin"))
    if pickles:
        raise PretrainedError(
            f"{folder}: weights only in PyTorch's pickle format ({', '.join(pickles)}); minidiff reads "
            "safetensors. Convert once with diffusers or transformers: load the folder and "
            "save_pretrained(folder, safe_serialization=True)"
        )
    raise PretrainedError(
        f"{folder}: no weights ({' or '.join(n + '.safetensors' for n in WEIGHT_FILES)} missing)"
    )


def read_weights(files) -> dict[str, np.ndarray]:
    """Name -> array of every tensor in the safetensors ``files``."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    weights = {}
    for path in files:
        try:
            weights.update(load_file(str(path)))
        except (SafetensorError, OSError, TypeError, ValueError) as e:
            raise PretrainedError(f"{path}: cannot be read as safetensors ({e})") from None
    return weights


def load_weights(module, weights: dict, source) -> None:
    """Move ``weights`` into ``module``'s parameters by name, cast to each parameter's dtype (the
    dict is emptied: a float32 array for a CPU float32 parameter becomes that parameter); a missing,
    unexpected or mis-shaped tensor is a PretrainedError naming ``source`` and the keys."""
    own = dict(module.named_parameters())
    missing = sorted(set(own) - set(weights))
    unexpected = sorted(set(weights) - set(own))
    wrong = [
        f"{k} is {tuple(np.shape(weights[k]))}, the model's is {own[k].shape}"
        for k in own
        if k in weights and tuple(np.shape(weights[k])) != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {_some(missing)}")
    if unexpected:
        problems.append(f"unexpected {_some(unexpected)}")
    if wrong:
        problems.append("mis-shaped: " + _some(wrong))
    if problems:
        raise PretrainedError(f"{source}: does not fit {type(module).__name__}: " + "; ".join(problems))
    for name in own:
        if np.asarray(weights[name]).dtype.kind != "f":
            raise PretrainedError(f"{source}: {name} holds {weights[name].dtype}, expected floating point")
    for name, p in own.items():
        # Each file tensor leaves the dict as it is taken, so a large model is never held twice.
        value = np.asarray(weights.pop(name))
        fresh = value.flags.c_contiguous and value.flags.writeable
        if p.device.type == "cpu" and value.dtype == p.dtype and fresh:
            p.data = value  # the file's own fresh array: nothing else refers to it
        else:
            p.data = p.device.xp.asarray(value.astype(p.dtype, copy=False)).copy()


def _some(keys, limit=8):
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def write_config(folder, config: dict, name="config.json") -> pathlib.Path:
    """``config`` as indented JSON in ``folder/name`` (the folder is made if missing)."""
    folder = pathlib.Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def save_weights(weights: dict, path) -> pathlib.Path:
    """Name -> array as one safetensors file, with the ``format: pt`` metadata that transformers
    and diffusers check before reading a file."""
    from safetensors.numpy import save_file

    path = pathlib.Path(path)
    save_file({k: np.ascontiguousarray(v) for k, v in weights.items()}, str(path), metadata={"format": "pt"})
    return path


class Pretrained:
    """``from_pretrained(folder)`` for a Module class that defines ``from_config``, and
    ``save_pretrained(folder)`` for one that keeps its ``config``."""

    library = "diffusers"  # whose folder layout save_pretrained writes: "diffusers" or "transformers"

    @classmethod
    def from_config(cls, config: dict, dtype=None, source="config"):  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def from_pretrained(cls, folder, dtype=None, variant=None):
        """The model in ``folder`` (``config.json`` and safetensors weights), in ``dtype``
        (float32 by default; fp16 files are cast)."""
        folder = pathlib.Path(folder)
        config = read_config(folder)
        with without_init():  # every weight is loaded below (or the load fails)
            model = cls.from_config(config, dtype=dtype, source=folder / "config.json")
        files = weight_files(folder, variant)
        source = files[0] if len(files) == 1 else folder
        load_weights(model, model.adapt_weights(read_weights(files)), source)
        return model

    def adapt_weights(self, weights: dict) -> dict:
        """The file's tensors renamed to this model's parameter names (default: unchanged)."""
        return weights

    def export_weights(self) -> dict:
        """Name -> NumPy array of every parameter, as the library's files name them (default:
        the parameter names)."""
        return self.state_dict()

    def pretrained_config(self) -> dict:
        """The config.json the library writes for this model: ``config`` and its bookkeeping."""
        config = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        if self.library == "transformers":
            return {
                **config,
                "architectures": [type(self).__name__],
                "transformers_version": TRANSFORMERS_VERSION,
            }
        return {**config, "_class_name": type(self).__name__, "_diffusers_version": DIFFUSERS_VERSION}

    def save_pretrained(self, folder) -> pathlib.Path:
        """Write ``folder`` (config.json and the weights in safetensors) so that this class's
        ``from_pretrained`` and the library's own load it; returns the folder."""
        folder = pathlib.Path(folder)
        write_config(folder, self.pretrained_config())
        name = WEIGHT_FILES[0] if self.library == "diffusers" else WEIGHT_FILES[1]
        save_weights(self.export_weights(), folder / f"{name}.safetensors")
        return folder
