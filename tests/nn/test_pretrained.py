"""Loading a model folder (config.json + safetensors) by parameter name, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import save_file

from minidiff.nn import Linear, Module
from minidiff.nn.pretrained import ConfigError, Pretrained, PretrainedError, config_error


class Tiny(Module, Pretrained):
    def __init__(self, width, dtype=None):
        self.proj = Linear(3, width, dtype=dtype)
        self.head = [Linear(width, 2, dtype=dtype)]

    @classmethod
    def from_config(cls, config, dtype=None, source="config"):
        if config.get("act", "silu") != "silu":
            raise config_error(source, "act", config["act"], "silu")
        return cls(config["width"], dtype=dtype)


def weights(width=4, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {
        "proj.weight": (width, 3),
        "proj.bias": (width,),
        "head.0.weight": (2, width),
        "head.0.bias": (2,),
    }
    return {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}


def write(folder, config=None, tensors=None, name="diffusion_pytorch_model.safetensors"):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config or {"width": 4}))
    if tensors is not None:
        save_file(tensors, str(folder / name))
    return folder


@pytest.mark.parametrize(
    "name", ["diffusion_pytorch_model.safetensors", "model.safetensors", "model.fp16.safetensors"]
)
def test_loads_weights_by_name_in_the_model_dtype(tmp_path, name):
    dtype = np.float16 if "fp16" in name else np.float32
    w = weights(dtype=dtype)
    model = Tiny.from_pretrained(write(tmp_path / "m", tensors=w, name=name))
    for key, value in model.state_dict().items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(value, w[key].astype(np.float32))


def test_variant_prefers_its_file(tmp_path):
    folder = write(tmp_path / "m", tensors=weights(seed=1))
    save_file(weights(seed=2, dtype=np.float16), str(folder / "diffusion_pytorch_model.fp16.safetensors"))
    plain = Tiny.from_pretrained(folder).state_dict()["proj.bias"]
    fp16 = Tiny.from_pretrained(folder, variant="fp16").state_dict()["proj.bias"]
    np.testing.assert_array_equal(plain, weights(seed=1)["proj.bias"])
    np.testing.assert_array_equal(fp16, weights(seed=2, dtype=np.float16)["proj.bias"].astype(np.float32))


def test_sharded_weights(tmp_path):
    folder = write(tmp_path / "m")
    w = weights()
    save_file({k: v for k, v in w.items() if k.startswith("proj")}, str(folder / "model-1.safetensors"))
    save_file({k: v for k, v in w.items() if k.startswith("head")}, str(folder / "model-2.safetensors"))
    index = {
        "weight_map": {k: "model-1.safetensors" if k.startswith("proj") else "model-2.safetensors" for k in w}
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    got = Tiny.from_pretrained(folder).state_dict()
    for k in w:
        np.testing.assert_array_equal(got[k], w[k])


def test_bad_folders_name_the_file_and_the_key(tmp_path):
    with pytest.raises(PretrainedError, match="no such folder"):
        Tiny.from_pretrained(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedError, match=r"config\.json: missing"):
        Tiny.from_pretrained(tmp_path / "empty")
    folder = write(tmp_path / "broken")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(PretrainedError, match="not valid JSON"):
        Tiny.from_pretrained(folder)
    with pytest.raises(PretrainedError, match="no weights"):
        Tiny.from_pretrained(write(tmp_path / "noweights"))
    folder = write(tmp_path / "pickle")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02")
    with pytest.raises(
        PretrainedError, match=r"pickle format \(pytorch_model\.bin\).*safe_serialization=True"
    ):
        Tiny.from_pretrained(folder)
    w = weights()
    del w["head.0.bias"]
    w["extra.weight"] = np.zeros(2, np.float32)
    with pytest.raises(
        PretrainedError,
        match=r"safetensors: does not fit Tiny: missing head\.0\.bias; unexpected extra\.weight",
    ):
        Tiny.from_pretrained(write(tmp_path / "keys", tensors=w))
    with pytest.raises(
        PretrainedError, match=r"mis-shaped: proj\.weight is \(5, 3\), the model's is \(4, 3\)"
    ):
        Tiny.from_pretrained(
            write(tmp_path / "shape", tensors={**weights(5), "head.0.weight": weights()["head.0.weight"]})
        )
    with pytest.raises(
        ConfigError, match=r"config\.json: act='gelu' is not supported \(minidiff implements silu\)"
    ):
        Tiny.from_pretrained(
            write(tmp_path / "config", config={"width": 4, "act": "gelu"}, tensors=weights())
        )
    folder = write(tmp_path / "corrupt")
    (folder / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PretrainedError, match="cannot be read as safetensors"):
        Tiny.from_pretrained(folder)


def test_layers_built_without_init_are_not_drawn():
    from minidiff.nn.layers import without_init

    rng = np.random.default_rng(0)
    with without_init():
        layer = Linear(3, 4, rng=rng)
    assert rng.random() == np.random.default_rng(0).random()  # nothing was drawn from rng
    assert layer.weight.shape == (4, 3) and layer.weight.dtype == np.float32
    drawn = Linear(3, 4, rng=np.random.default_rng(0))  # outside: drawn as before
    assert np.all(np.abs(drawn.weight.numpy()) <= 1 / np.sqrt(3)) and np.any(drawn.weight.numpy())
