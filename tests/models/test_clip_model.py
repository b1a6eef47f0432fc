"""CLIP's image tower and CLIPModel against transformers: the hidden states, pooled outputs,
features and logits with every gradient in float64; folders saved by transformers (weights,
preprocessor_config.json, tokenizer) in float32; config and input errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file
from sd_folders import clip_text_config, clip_vision_config, write_clip_tokenizer
from torch_compare import compare_with_torch

from minidiff.models.clip import CLIPModel, CLIPVisionModel, normalize
from minidiff.models.tokenizer import CLIPTokenizer
from minidiff.nn.pretrained import ConfigError, PretrainedError

PROMPTS = ["a red circle", "the blue square on a tree", "a big green triangle", "a photo of a cat"]


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    return write_clip_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="module")
def tokenizer(tokenizer_folder):
    return CLIPTokenizer.from_pretrained(tokenizer_folder)


def vision_config(**overrides):
    config = clip_vision_config(10, attn_implementation="sdpa")  # eager: a float32 softmax
    return transformers.CLIPVisionConfig(**{**config, **overrides})


def clip_config(tokenizer, hidden_act="quick_gelu", **vision):
    text = clip_text_config(tokenizer, 24, 29, heads=2, hidden_act=hidden_act)
    return transformers.CLIPConfig(
        text_config=text,
        vision_config=vision_config(hidden_act=hidden_act, **vision).to_dict(),
        projection_dim=16,
        attn_implementation="sdpa",
    )


def randomized(model, seed=0):
    """``model`` in eval mode with every weight drawn (the norms start at 1 and 0)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.eval()


def pixels(config, n=3, seed=0):
    size = config.image_size
    return np.random.default_rng(seed).standard_normal((n, config.num_channels, size, size))


def test_parameter_names_are_transformers(tokenizer):
    config = clip_config(tokenizer)
    theirs = {k: tuple(v.shape) for k, v in transformers.CLIPModel(config).named_parameters()}
    ours = CLIPModel.from_config(config.to_dict())
    assert {k: p.shape for k, p in ours.named_parameters()} == theirs
    assert "vision_model.pre_layrnorm.weight" in theirs


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("image_size, patch_size", [(30, 10), (20, 6)], ids=["exact", "ragged-edge"])
@pytest.mark.parametrize("output", ["last_hidden_state", "pooler_output"])
def test_vision_tower_and_gradients_match_transformers(hidden_act, image_size, patch_size, output):
    """The image tower's outputs, the gradient of the pixels and of every parameter; a patch
    grid that leaves pixels over at the right and bottom edges drops them as the convolution
    does."""
    config = vision_config(hidden_act=hidden_act, image_size=image_size, patch_size=patch_size)
    ours = CLIPVisionModel.from_config(config.to_dict(), dtype=np.float64)
    index = 0 if output == "last_hidden_state" else 1
    compare_with_torch(
        ours,
        randomized(transformers.CLIPVisionModel(config)),
        [pixels(config)],
        call=lambda m, x: m.encode(x)[index],
        torch_call=lambda m, x: getattr(m(x), output),
        rtol=1e-8,
        atol=1e-10,
    )


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
@pytest.mark.parametrize("output", ["logits_per_image", "image_embeds", "text_embeds"])
def test_clip_model_and_gradients_match_transformers(tokenizer, hidden_act, output):
    """CLIPModel's logits (through the temperature) and normalized features, with the gradient
    of the pixels and of every parameter, logit_scale included."""
    config = clip_config(tokenizer, hidden_act)
    ours = CLIPModel.from_config(config.to_dict(), dtype=np.float64)
    ids = tokenizer(PROMPTS[:3])
    calls = {
        "logits_per_image": lambda m, ids, x: m(ids, x)[0],
        "image_embeds": lambda m, ids, x: normalize(m.get_image_features(x)),
        "text_embeds": lambda m, ids, x: normalize(m.get_text_features(ids)),
    }
    compare_with_torch(
        ours,
        randomized(transformers.CLIPModel(config), seed=1),
        [ids, pixels(config.vision_config)],
        call=calls[output],
        torch_call=lambda m, ids, x: getattr(m(input_ids=ids, pixel_values=x), output),
        grad_inputs=[] if output == "text_embeds" else [1],
        rtol=1e-8,
        atol=1e-10,
    )


def test_logits_per_text_is_the_transpose(tokenizer):
    config = clip_config(tokenizer)
    model = CLIPModel.from_config(config.to_dict(), dtype=np.float64)
    per_image, per_text = model(tokenizer(PROMPTS), pixels(config.vision_config, n=2))
    assert per_image.shape == (2, 4) and per_text.shape == (4, 2)
    np.testing.assert_array_equal(per_image.numpy(), per_text.numpy().T)


# -- folders saved by transformers --------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tokenizer, tokenizer_folder, tmp_path_factory):
    """(folder, transformers' float32 CLIPModel): the model, a CLIPImageProcessor and the
    tokenizer files, as a transformers CLIP folder holds them."""
    model = randomized(transformers.CLIPModel(clip_config(tokenizer, "gelu")), seed=2).float()
    folder = tmp_path_factory.mktemp("clip")
    model.save_pretrained(folder)
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}
    )
    processor.save_pretrained(folder)
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).write_bytes((tokenizer_folder / name).read_bytes())
    return folder, model


def assert_features_match(ours, theirs, tokenizer, seed=0):
    ids = tokenizer(PROMPTS)
    x = pixels(theirs.config.vision_config, n=4, seed=seed).astype(np.float32)
    with torch.no_grad():
        image = theirs.get_image_features(pixel_values=torch.tensor(x)).pooler_output.numpy()
        text = theirs.get_text_features(input_ids=torch.tensor(ids)).pooler_output.numpy()
    ours_image, ours_text = ours.get_image_features(x), ours.get_text_features(ids)
    assert ours_image.dtype == np.float32
    for got, expected in ((ours_image.numpy(), image), (ours_text.numpy(), text)):
        relative = np.abs(got - expected).max() / np.abs(expected).max()
        assert relative < 1e-4


def test_from_pretrained_matches_transformers_in_float32(saved, tokenizer):
    folder, theirs = saved
    ours = CLIPModel.from_pretrained(folder)
    assert_features_match(ours, theirs, tokenizer)
    assert ours.config["vision_config"]["patch_size"] == 10
    assert ours.image_processor.crop_size == (30, 30) and ours.image_processor.size == 30
    np.testing.assert_array_equal(ours.tokenizer(PROMPTS), tokenizer(PROMPTS))


def test_a_folder_without_processor_or_tokenizer_loads_the_model(saved, tmp_path):
    folder, _ = saved
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    ours = CLIPModel.from_pretrained(tmp_path)
    assert ours.image_processor is None and ours.tokenizer is None


def test_position_ids_buffers_load_too(saved, tokenizer, tmp_path):
    """Files of older transformers hold each tower's position_ids buffer."""
    folder, theirs = saved
    weights = load_file(folder / "model.safetensors")
    weights["text_model.embeddings.position_ids"] = np.arange(16, dtype=np.int64)[None]
    weights["vision_model.embeddings.position_ids"] = np.arange(10, dtype=np.int64)[None]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(weights, str(tmp_path / "model.safetensors"))
    assert_features_match(CLIPModel.from_pretrained(tmp_path), theirs, tokenizer)


def test_a_missing_tower_weight_is_named(saved, tmp_path):
    folder, _ = saved
    weights = load_file(folder / "model.safetensors")
    del weights["vision_model.pre_layrnorm.bias"]
    (tmp_path / "config.json").write_text((folder / "config.json").read_text())
    save_file(weights, str(tmp_path / "model.safetensors"))
    with pytest.raises(PretrainedError, match="missing vision_model.pre_layrnorm.bias"):
        CLIPModel.from_pretrained(tmp_path)


def test_a_vision_model_folder_loads(tmp_path):
    theirs = randomized(transformers.CLIPVisionModel(vision_config())).float()
    theirs.save_pretrained(tmp_path)
    x = pixels(theirs.config).astype(np.float32)
    with torch.no_grad():
        expected = theirs(torch.tensor(x)).pooler_output.numpy()
    got = CLIPVisionModel.from_pretrained(tmp_path).encode(x)[1].numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


# -- configs ------------------------------------------------------------------------------------


def test_the_config_dicts_of_older_files_override(tokenizer):
    """openai's folders carry text_config_dict / vision_config_dict beside the full configs;
    transformers takes their values."""
    config = clip_config(tokenizer).to_dict()
    config["vision_config_dict"] = {"num_hidden_layers": 1}
    # what transformers 4.16 wrote into each tower's config (openai/clip-vit-large-patch14)
    generic = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, "sep_token_id": None}
    config["vision_config"].update(generic, dropout=0.0, top_k=50, pruned_heads={}, tie_word_embeddings=True)
    config["text_config_dict"] = {"hidden_act": "quick_gelu", "projection_dim": 16}
    model = CLIPModel.from_config(config)
    assert len(model.vision_model.encoder.layers) == 1 and len(model.text_model.encoder.layers) == 2


@pytest.mark.parametrize(
    "where, key, value",
    [
        ("vision_config", "hidden_act", "relu"),
        ("vision_config", "num_attention_heads", 5),
        ("vision_config", "patch_size", 31),
        ("vision_config", "image_size", [30, 30]),
        ("vision_config", "attention_dropout", 0.1),
        ("vision_config", "model_type", "clip_text_model"),
        ("vision_config", "mlp_ratio", 4),
        ("text_config", "hidden_act", "relu"),
        ("text_config", "model_type", "clip_vision_model"),
        (None, "model_type", "clip_text_model"),
        (None, "projection_dim", 0),
        (None, "architectures", ["CLIPTextModel"]),
        (None, "vision_config", [1]),
        (None, "logit_bias", 1.0),
    ],
)
def test_unsupported_config_value_is_named(tokenizer, tmp_path, where, key, value):
    config = clip_config(tokenizer).to_dict()
    (config[where] if where else config)[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    name = f"{where}.{key}" if where else key
    with pytest.raises(ConfigError, match=f"config.json: {name}="):
        CLIPModel.from_pretrained(tmp_path)


def test_bad_pixel_values_are_refused():
    model = CLIPVisionModel.from_config(vision_config().to_dict())
    with pytest.raises(
        ValueError, match=r"pixel_values must be floats \(N, 3, 30, 30\), got float32 \(2, 3, 32, 32\)"
    ):
        model(np.zeros((2, 3, 32, 32), np.float32))
    with pytest.raises(ValueError, match="got uint8"):
        model(np.zeros((2, 3, 30, 30), np.uint8))
