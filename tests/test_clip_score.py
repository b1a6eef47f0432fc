"""CLIP's preprocessing against transformers' CLIPImageProcessor (Pillow's bicubic on uint8), and
clip_score against torchmetrics' formula computed with transformers' CLIPModel, tokenizer and
processor on the same images and prompts."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from sd_folders import clip_text_config, clip_vision_config, write_clip_tokenizer

from minidiff.data import to_uint8
from minidiff.metrics import clip_score, clip_scores
from minidiff.models.clip import CLIPImageProcessor, CLIPModel

# transformers 5 names its Pillow processor apart (the default one needs torchvision); 4 has one
PilProcessor = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
PROMPTS = ["a red circle", "the blue square on a tree", "a big green triangle", "a photo of a cat", "a dog"]


def random_images(shape, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def transformers_pixels(processor, images):
    out = processor(list(images), input_data_format="channels_first", return_tensors="np")
    return out["pixel_values"]


@pytest.mark.parametrize(
    "shape",
    [(2, 3, 40, 40), (2, 3, 37, 61), (2, 3, 64, 33), (1, 3, 20, 26), (2, 1, 45, 50)],
    ids=["square", "wide", "tall", "smaller-than-the-crop", "grey"],
)
def test_preprocessing_equals_the_clip_image_processor(shape):
    """Shortest side to 30 (long side truncated), centre crop 28x26 (odd offsets), CLIP's mean and
    std; an image smaller than the crop is padded with zeros, a grey one repeated to RGB."""
    theirs = PilProcessor(size={"shortest_edge": 30}, crop_size={"height": 28, "width": 26})
    ours = CLIPImageProcessor.from_config(theirs.to_dict())
    images = random_images(shape)
    expected = transformers_pixels(theirs, np.repeat(images, 3, axis=1) if shape[1] == 1 else images)
    got = ours(images)
    assert got.dtype == np.float32 and got.shape == (shape[0], 3, 28, 26)
    np.testing.assert_array_equal(got, expected)


def test_bicubic_is_not_bilinear():
    """The filter matters: the bilinear resize gives other pixels (so the test above can fail)."""
    config = PilProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).to_dict()
    images = random_images((1, 3, 41, 47))
    bicubic = CLIPImageProcessor.from_config(config)(images)
    bilinear = CLIPImageProcessor.from_config({**config, "resample": 2})(images)
    assert np.abs(bicubic - bilinear).max() > 0.1


def test_the_older_config_of_openai_folders():
    """openai's folders give ``size`` and ``crop_size`` as plain integers."""
    config = {
        "crop_size": 24,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "resample": 3,
        "size": 24,
    }
    images = random_images((2, 3, 31, 40))
    np.testing.assert_array_equal(
        CLIPImageProcessor.from_config(config)(images), transformers_pixels(PilProcessor(**config), images)
    )


@pytest.mark.parametrize(
    "key, value",
    [("size", {"longest_edge": 3}), ("crop_size", 0), ("image_std", [1, 0, 1]), ("do_pad", True)],
)
def test_unsupported_preprocessor_values_are_named(key, value):
    with pytest.raises(ValueError, match=f"{key}="):
        CLIPImageProcessor.from_config({key: value})


def test_images_must_be_uint8():
    with pytest.raises(ValueError, match=r"uint8 \(N, 1 or 3, H, W\), got float32"):
        CLIPImageProcessor()(np.zeros((1, 3, 8, 8), np.float32))


# -- the score ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny random CLIP folder as transformers writes one: model, processor, tokenizer."""
    folder = tmp_path_factory.mktemp("clip")
    write_clip_tokenizer(folder)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    assert tokenizer.model_max_length == 16
    text, vision = clip_text_config(tokenizer, 24, 29, heads=2), clip_vision_config(6)
    torch.manual_seed(0)
    model = transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    PilProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30}).save_pretrained(folder)
    return folder


def torchmetrics_clip_score(images, prompts, folder):
    """torchmetrics' clip_score, written out on transformers' CLIPModel and processor."""
    model = transformers.CLIPModel.from_pretrained(folder).eval()
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder)
    pixels = torch.tensor(transformers_pixels(PilProcessor.from_pretrained(folder), images))
    text = tokenizer(prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        image_features = model.get_image_features(pixel_values=pixels).pooler_output
        text_features = model.get_text_features(
            input_ids=text["input_ids"], attention_mask=text["attention_mask"]
        ).pooler_output
    image_features = image_features / image_features.norm(p=2, dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(p=2, dim=-1, keepdim=True)
    score = 100 * (image_features * text_features).sum(axis=-1)
    return score.numpy(), max(float(score.mean()), 0.0)


def test_clip_score_equals_the_formula_on_transformers(folder):
    images = random_images((5, 3, 36, 44))
    scores, expected = torchmetrics_clip_score(images, PROMPTS, folder)
    model = CLIPModel.from_pretrained(folder)
    np.testing.assert_allclose(
        clip_scores(images, PROMPTS, model, batch_size=2), scores, rtol=1e-4, atol=1e-3
    )
    assert clip_score(images, PROMPTS, folder) == pytest.approx(expected, rel=1e-4, abs=1e-3)
    assert len(set(np.round(scores, 3))) == len(scores)  # the pairs score differently


def test_the_mean_is_clamped_at_zero(folder):
    """Turning the image features around turns every cosine around: of the two means one is
    negative, and clip_score gives 0 for it."""
    images, prompts = random_images((4, 3, 30, 30), seed=1), PROMPTS[:4]
    models = [CLIPModel.from_pretrained(folder), CLIPModel.from_pretrained(folder)]
    models[1].visual_projection.weight.data = -models[1].visual_projection.weight.data
    means = [clip_scores(images, prompts, m).mean() for m in models]
    assert means[1] == pytest.approx(-means[0]) and abs(means[0]) > 1
    for model, mean in zip(models, means):
        assert clip_score(images, prompts, model) == (pytest.approx(mean) if mean > 0 else 0.0)


def test_float_images_are_minidiffs_minus_one_to_one(folder):
    x = np.random.default_rng(2).uniform(-1, 1, size=(2, 3, 30, 30))
    model = CLIPModel.from_pretrained(folder)
    np.testing.assert_array_equal(
        clip_scores(x, PROMPTS[:2], model), clip_scores(to_uint8(x), PROMPTS[:2], model)
    )


def test_errors_name_the_problem(folder, tmp_path):
    model = CLIPModel.from_pretrained(folder)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip_score(random_images((3, 3, 30, 30)), PROMPTS[:2], model)
    with pytest.raises(ValueError, match="uint8 or floats"):
        clip_score(np.zeros((1, 3, 30, 30), np.int32), PROMPTS[:1], model)
    model.image_processor = None
    with pytest.raises(ValueError, match="no image_processor .*preprocessor_config.json"):
        clip_score(random_images((1, 3, 30, 30)), PROMPTS[:1], model)
