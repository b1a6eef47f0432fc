"""CLIP's text encoder against transformers' CLIPTextModel: the last hidden state, the pooled
output and every parameter gradient in float64; folders saved by transformers (both key
conventions); config and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from sd_folders import clip_text_config, write_clip_tokenizer
from torch_compare import compare_with_torch

from minidiff.models.clip import CLIPTextModel
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.nn.pretrained import ConfigError, PretrainedError

PROMPTS = ["a red circle", "the blue square on a tree", "", "A GREEN triangle, painting of a cat and a dog!"]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_pretrained(write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer")))


def tiny_config(tokenizer, **overrides):
    # sdpa: eager attention takes its softmax in float32
    config = clip_text_config(tokenizer, 32, 37, heads=4, attn_implementation="sdpa")
    return transformers.CLIPTextConfig(**{**config, **overrides})


def torch_model(config, seed=0):
    torch.manual_seed(seed)
    model = transformers.CLIPTextModel(config).eval()
    with torch.no_grad():  # the norms start at 1 and 0, the embeddings tiny: draw every weight
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def ours_for(config, dtype=np.float64):
    return CLIPTextModel.from_config(config.to_dict(), dtype=dtype)


def test_parameter_names_are_transformers(tokenizer):
    config = tiny_config(tokenizer)
    theirs = {k: tuple(v.shape) for k, v in transformers.CLIPTextModel(config).named_parameters()}
    assert {k: p.shape for k, p in ours_for(config).named_parameters()} == theirs


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_last_hidden_state_and_gradients_match_transformers(tokenizer, hidden_act):
    config = tiny_config(tokenizer, hidden_act=hidden_act)
    ids = tokenizer(PROMPTS)
    compare_with_torch(
        ours_for(config),
        torch_model(config),
        [ids],
        torch_call=lambda m, ids: m(ids).last_hidden_state,
        rtol=1e-8,
        atol=1e-10,
    )


def random_ids(vocab_size, eos, shape=(4, 11), seed=0):
    """Ids with one end token per row at a different place, the largest id elsewhere: the
    end-token pooling and the largest-id pooling pick different positions."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, eos, size=shape)
    for row, at in zip(ids, [2, 5, 0, shape[1] - 1]):
        row[at] = eos
        row[(at + 3) % shape[1]] = eos  # a second one (padding): the first is pooled
        row[(at + 1) % shape[1]] = vocab_size - 1
    return ids


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("eos_token_id", [7, 2], ids=["first-end-token", "legacy-largest-id"])
def test_pooled_output_and_gradients_match_transformers(tokenizer, hidden_act, eos_token_id):
    config = tiny_config(tokenizer, hidden_act=hidden_act, eos_token_id=eos_token_id)
    ids = random_ids(config.vocab_size, eos=7)
    ours = ours_for(config)
    compare_with_torch(
        ours,
        torch_model(config, seed=1),
        [ids],
        call=lambda m, ids: m.encode(ids)[1],
        torch_call=lambda m, ids: m(ids).pooler_output,
        rtol=1e-8,
        atol=1e-10,
    )
    hidden, pooled = ours.encode(ids)
    picked = np.argmax(ids, -1) if eos_token_id == 2 else np.argmax(ids == 7, -1)
    assert len(set(picked)) > 1 and not np.array_equal(np.argmax(ids, -1), np.argmax(ids == 7, -1))
    np.testing.assert_array_equal(pooled.numpy(), hidden.numpy()[np.arange(len(ids)), picked])


def test_later_tokens_do_not_change_earlier_states(tokenizer):
    model = CLIPTextModel.from_config(tiny_config(tokenizer).to_dict(), dtype=np.float64)
    a, b = tokenizer(["a red circle", "a red square"])
    out = model(np.stack([a, b])).numpy()
    np.testing.assert_allclose(out[0, :3], out[1, :3], rtol=0, atol=1e-12)  # <bos> a red
    assert not np.allclose(out[0, 3], out[1, 3])


# -- folders saved by transformers --------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tokenizer, tmp_path_factory):
    """(folder, transformers' float32 model) as transformers' save_pretrained writes it."""
    model = torch_model(tiny_config(tokenizer, hidden_act="gelu"), seed=2).float()
    folder = tmp_path_factory.mktemp("text_encoder")
    model.save_pretrained(folder)
    return folder, model


def assert_matches_saved(ours, theirs, tokenizer):
    ids = tokenizer(PROMPTS)
    with torch.no_grad():
        expected = theirs(torch.tensor(ids))
    hidden, pooled = ours.encode(ids)
    assert hidden.dtype == np.float32
    np.testing.assert_allclose(hidden.numpy(), expected.last_hidden_state.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(pooled.numpy(), expected.pooler_output.numpy(), rtol=1e-4, atol=1e-4)


def test_from_pretrained_matches_transformers_in_float32(saved, tokenizer):
    folder, theirs = saved
    assert not any(k.startswith("text_model.") for k in load_file(folder / "model.safetensors"))
    ours = CLIPTextModel.from_pretrained(folder)
    assert ours.config["hidden_act"] == "gelu" and ours.config["projection_dim"] == 512  # defaults kept
    assert_matches_saved(ours, theirs, tokenizer)


def rewrite(folder, tmp_path, weights):
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text((folder / "config.json").read_text())
    save_file(weights, str(other / "model.safetensors"))
    return other


def test_the_text_model_prefix_and_position_ids_load_too(saved, tokenizer, tmp_path):
    """transformers 4 wrote CLIPTextModel's keys under ``text_model.``, some files with the
    position_ids buffer."""
    folder, theirs = saved
    weights = {f"text_model.{k}": v for k, v in load_file(folder / "model.safetensors").items()}
    weights["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    assert_matches_saved(CLIPTextModel.from_pretrained(rewrite(folder, tmp_path, weights)), theirs, tokenizer)


def test_a_text_model_with_projection_loads_without_its_head(tokenizer, tmp_path):
    theirs = transformers.CLIPTextModelWithProjection(tiny_config(tokenizer)).eval()
    theirs.save_pretrained(tmp_path)
    assert "text_projection.weight" in load_file(tmp_path / "model.safetensors")
    ours = CLIPTextModel.from_pretrained(tmp_path)
    ids = tokenizer(PROMPTS)
    with torch.no_grad():
        expected = theirs(torch.tensor(ids)).last_hidden_state.numpy()
    np.testing.assert_allclose(ours(ids).numpy(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "extra", ["text_projection.weight", "vision_model.embeddings.class_embedding", "logit_scale"]
)
def test_keys_of_other_models_are_named(saved, tmp_path, extra):
    """A CLIPTextModel's file holds no projection head or vision tower: such keys are errors."""
    folder, _ = saved
    weights = {**load_file(folder / "model.safetensors"), extra: np.zeros(3, np.float32)}
    with pytest.raises(PretrainedError, match=f"unexpected {extra}"):
        CLIPTextModel.from_pretrained(rewrite(folder, tmp_path, weights))


def test_keys_both_with_and_without_the_prefix_are_refused(saved, tmp_path):
    folder, _ = saved
    weights = load_file(folder / "model.safetensors")
    weights["text_model.final_layer_norm.bias"] = weights["final_layer_norm.bias"]
    with pytest.raises(PretrainedError, match="final_layer_norm.bias both with and without"):
        CLIPTextModel.from_pretrained(rewrite(folder, tmp_path, weights))


# -- configs ------------------------------------------------------------------------------------

# A Stable Diffusion 1.x text_encoder/config.json as transformers 4 wrote it (sizes made tiny).
SD1_CONFIG = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 16,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 24,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 8,
    "model_type": "clip_text_model",
    "num_attention_heads": 2,
    "num_hidden_layers": 1,
    "pad_token_id": 1,
    "projection_dim": 16,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 50,
}


def test_a_stable_diffusion_config_builds():
    model = CLIPTextModel.from_config(SD1_CONFIG)
    assert model.config["eos_token_id"] == 2 and model.hidden_size == 16
    assert model(np.zeros((1, 8), np.int64)).shape == (1, 8, 16)


@pytest.mark.parametrize(
    "key, value",
    [
        ("hidden_act", "relu"),
        ("attention_dropout", 0.1),
        ("dropout", 0.1),
        ("num_attention_heads", 3),
        ("hidden_size", "16"),
        ("vocab_size", True),
        ("layer_norm_eps", 0),
        ("model_type", "clip"),
        ("architectures", ["CLIPModel"]),
        ("eos_token_id", [2, 3]),
        ("text_config", {}),
    ],
)
def test_unsupported_config_value_is_named(tmp_path, key, value):
    (tmp_path / "config.json").write_text(json.dumps({**SD1_CONFIG, key: value}))
    with pytest.raises(ConfigError, match=f"config.json: {key}="):
        CLIPTextModel.from_pretrained(tmp_path)


def test_bad_input_ids_are_refused():
    model = CLIPTextModel.from_config(SD1_CONFIG)
    with pytest.raises(ValueError, match="integer array"):
        model(np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match=r"integer array \(N, L\)"):
        model(np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="more than max_position_embeddings=8"):
        model(np.zeros((1, 9), np.int64))
