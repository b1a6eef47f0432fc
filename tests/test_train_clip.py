"""Contrastive training of a small CLIP: the symmetric InfoNCE loss and its gradients (logit_scale
included) against transformers' loss in torch; a tiny run on coloured squares that learns; its
folder, read back by minidiff and by transformers."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

import minidiff as md
from minidiff.models.clip import CLIPModel
from minidiff.train.clip import CaptionTask, CLIPTrainConfig, contrastive_loss, train_clip

COLORS = {"red": (1.0, -1.0, -1.0), "green": (-1.0, 1.0, -1.0), "blue": (-1.0, -1.0, 1.0)}
SIDES = ("on the left", "on the right")


def squares(n, seed):
    """16x16 images of one 6x6 square of a colour on one side, captioned 'a {color} square {side}'."""
    rng = np.random.default_rng(seed)
    color, side = rng.integers(0, 3, n), rng.integers(0, 2, n)
    images = np.full((n, 3, 16, 16), -1.0, np.float32)
    captions = []
    for i in range(n):
        top, left = rng.integers(2, 9), rng.integers(0, 3) + 9 * side[i]
        images[i, :, top : top + 6, left : left + 6] = np.array(list(COLORS.values())[color[i]])[
            :, None, None
        ]
        captions.append(square_caption(list(COLORS)[color[i]], SIDES[side[i]]))
    return images, captions, {"color": color, "side": side}


def square_caption(color, side):
    return f"a {color} square {side}"


def squares_task():
    train, train_captions, _ = squares(240, seed=0)
    held_out, held_out_captions, attributes = squares(60, seed=1)
    return CaptionTask(
        train,
        train_captions,
        held_out,
        held_out_captions,
        attributes,
        {"color": list(COLORS), "side": SIDES},
        square_caption,
    )


def test_contrastive_loss_and_gradients_match_transformers():
    rng = np.random.default_rng(0)
    text, image, scale = rng.standard_normal((5, 8)), rng.standard_normal((5, 8)), np.array(1.3)
    ours = [md.tensor(a, dtype=np.float64, requires_grad=True) for a in (text, image, scale)]
    theirs = [torch.tensor(a, requires_grad=True) for a in (text, image, scale)]

    def logits(t, i, s, lib):
        norm = (
            (lambda x: x / md.functional.sqrt((x * x).sum(axis=-1, keepdims=True)))
            if lib is md
            else (lambda x: x / x.norm(dim=-1, keepdim=True))
        )
        return (norm(t) @ norm(i).T) * (md.functional.exp(s) if lib is md else s.exp())

    loss = contrastive_loss(logits(*ours, md))
    expected = image_text_contrastive_loss(logits(*theirs, torch))
    loss.backward()
    expected.backward()
    np.testing.assert_allclose(loss.item(), expected.item(), rtol=1e-12)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a.grad, b.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_contrastive_loss_is_symmetric_not_one_sided():
    """An asymmetric logit matrix: the two directions differ, and the loss is their mean."""
    logits = np.random.default_rng(1).standard_normal((4, 4))
    one_way = md.functional.cross_entropy(md.tensor(logits, dtype=np.float64), np.arange(4)).item()
    other_way = md.functional.cross_entropy(md.tensor(logits.T, dtype=np.float64), np.arange(4)).item()
    assert abs(one_way - other_way) > 1e-3
    assert contrastive_loss(md.tensor(logits, dtype=np.float64)).item() == pytest.approx(
        (one_way + other_way) / 2
    )


def test_contrastive_loss_needs_square_logits():
    with pytest.raises(ValueError, match=r"logits must be \(N, N\), got \(3, 4\)"):
        contrastive_loss(md.tensor(np.zeros((3, 4))))


TINY = dict(
    steps=80,
    batch_size=24,
    lr=3e-3,
    warmup_steps=10,
    width=32,
    layers=1,
    heads=2,
    projection_dim=16,
    log_every=10,
)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("clip-run")
    return out, train_clip(CLIPTrainConfig(**TINY), out, task=squares_task(), progress=False)


def test_a_tiny_run_learns_the_captions(run):
    out, report = run
    with open(out / "loss.csv") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    assert losses[-1] < 0.7 * losses[0]
    assert report["num_captions"] == 6 and report["num_held_out"] == 60
    assert report["zero_shot_accuracy"]["color"] > 0.8, report  # chance: 1/3
    assert report["zero_shot_all_attributes"] > 1 / 6 + 0.2, report


def test_the_run_is_a_clip_folder_transformers_reads(run):
    out, _ = run
    ours = CLIPModel.from_pretrained(out)
    theirs = transformers.CLIPModel.from_pretrained(out).eval()
    images, captions, _ = squares(4, seed=2)
    ids = ours.tokenizer(captions)
    np.testing.assert_array_equal(
        ids,
        transformers.CLIPTokenizer.from_pretrained(out)(captions, return_tensors="np")["input_ids"],
    )
    pixels = ours.image_processor(((images + 1) * 127.5).round().astype(np.uint8))
    with torch.no_grad():
        output = theirs(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels))
    np.testing.assert_allclose(
        ours(ids, pixels)[0].numpy(), output.logits_per_image.numpy(), rtol=1e-4, atol=1e-4
    )


def test_bad_configs_are_named():
    with pytest.raises(ValueError, match="batch_size must be at least 2"):
        CLIPTrainConfig(batch_size=1).validate()
    with pytest.raises(ValueError, match="heads=3 must divide width=64"):
        CLIPTrainConfig(heads=3).validate()
    with pytest.raises(ValueError, match=r"unknown fields \['depth'\]"):
        CLIPTrainConfig.from_dict({"depth": 3})
