"""Contrastive training of a small CLIP: the symmetric InfoNCE loss and its gradients (logit_scale
included) against transformers' loss in torch; a tiny run on coloured squares that learns; its
folder, read back by minidiff and by transformers."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
import transformers
from transformers.models.clip.modeling_clip import image_text_contrastive_loss

import minidiff as md
from minidiff.models.clip import CLIPModel
from minidiff.train.clip import (
    CaptionTask,
    CLIPTrainConfig,
    all_captions,
    contrastive_loss,
    distinct_caption_batch,
    load_task,
    train_clip,
    write_word_tokenizer,
)
from minidiff.train.evaluate import clip_score_report

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


# -- minidiff train --model clip, minidiff eval --metric clip ------------------------------------


def test_the_report_scores_real_pairs_above_mismatched_ones(run):
    out, _ = run
    report = clip_score_report(out, task=squares_task(), num=30)
    assert report["num_pairs"] == 30 and "samples" not in report
    assert report["real"] > report["mismatched"] + 10, report


def test_eval_clip_scores_a_pipelines_samples(run, tmp_path, capsys, monkeypatch):
    """``eval --metric clip`` on a Stable Diffusion folder with its own CLIP in RUN/clip: the
    samples' score printed beside the real and mismatched pairs', as the report computes them."""
    from pipelines.test_stable_diffusion import build_folder

    from minidiff.cli import main
    from minidiff.pipelines import StableDiffusion

    out, _ = run
    folder, _ = build_folder(tmp_path)
    monkeypatch.setattr("minidiff.train.clip.load_task", lambda dataset, seed=0: squares_task())
    args = ["eval", "--checkpoint", str(folder), "--metric", "clip", "--num", "5", "--steps", "2"]
    with pytest.raises(SystemExit, match="no CLIP in .*clip: train the run's own"):
        main(args)
    shutil.copytree(out, folder / "clip")
    assert main(args) == 0
    printed = capsys.readouterr().out
    pipe = StableDiffusion.from_pretrained(folder)
    expected = clip_score_report(
        out, sample=lambda p: pipe(p, num_steps=2, guidance=7.5, seed=0) * 2 - 1, task=squares_task(), num=5
    )

    def shown(name):  # as printed: the clamped mean, and the mean before the clamp when below 0
        below = expected[f"{name}_unclamped"]
        return f"{expected[name]:.2f}" + (f" (mean {below:.2f} before the clamp)" if below < 0 else "")

    assert f"{shown('samples')} for 5 samples of held-out captions" in printed
    assert f"real image-caption pairs {shown('real')}, mismatched pairs {shown('mismatched')}" in printed
    assert expected["real"] > expected["mismatched"] + 10
    assert main([*args, "--clip", str(out)]) == 0 and printed in capsys.readouterr().out.replace(
        str(out), str(folder / "clip")
    )


def test_train_model_clip_from_the_command_line(tmp_path, monkeypatch, capsys):
    from minidiff.cli import main

    monkeypatch.setattr("minidiff.train.clip.load_task", lambda dataset, seed=0: squares_task())
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({k: v for k, v in TINY.items() if k != "steps"}))
    out = tmp_path / "clip"
    args = ["train", "--model", "clip", "--config", str(config), "--steps", "3", "--out", str(out), "--quiet"]
    assert main(args) == 0
    assert "zero-shot accuracy on 60 held-out images: color" in capsys.readouterr().out
    assert CLIPModel.from_pretrained(out).tokenizer is not None
    with pytest.raises(SystemExit, match="already holds a CLIP"):
        main(args)
    monkeypatch.chdir(tmp_path)  # by default the shapes run's own CLIP, where eval looks for it
    assert main(args[:-3] + ["--quiet"]) == 0 and (tmp_path / "runs/shapes/clip/model.safetensors").is_file()


def test_a_batch_never_repeats_a_caption():
    codes = np.repeat(np.arange(5), 7)  # 5 captions, 7 images each
    rng = np.random.default_rng(0)
    batches = [distinct_caption_batch(codes, 4, rng) for _ in range(50)]
    assert all(len(b) == 4 and len(set(codes[b])) == 4 for b in batches)
    assert len({int(i) for b in batches for i in b}) > 25  # every image takes its turn
    assert sorted(codes[distinct_caption_batch(codes, 9, rng)]) == [0, 1, 2, 3, 4]  # at most one each


def test_the_tokenizer_fits_every_caption_whole(tmp_path):
    """'triangle' meets the 'ri' merge of 'right' first and splits; the length is measured, so no
    caption loses its end (the position) to truncation."""
    texts = ["a large purple triangle at the bottom right", "a small red circle at the top left"]
    tokenizer = write_word_tokenizer(tmp_path, texts)
    lengths = [len(tokenizer.encode(t)) for t in texts]
    assert lengths[0] > len(texts[0].split()) + 2  # more tokens than words
    assert tokenizer.model_max_length == max(lengths)
    for text, ids in zip(texts, tokenizer(texts)):
        assert ids.tolist()[: len(tokenizer.encode(text))] == tokenizer.encode(text)
    theirs = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    assert theirs(texts)["input_ids"][0] == tokenizer.encode(texts[0])


def test_the_shapes_task_and_its_grammar():
    """The captioned shapes as a task: every held-out caption is the grammar's caption of its
    image's attributes, so the zero-shot report's truth and its candidates agree."""
    task = load_task("shapes", count=20, held_out=10)
    captions, values = all_captions(task)
    assert len(captions) == len(set(captions)) == 2 * 6 * 3 * 5 and len(task.train_captions) == 20
    truth = np.stack([task.attributes[name] for name in task.choices], axis=1)
    lookup = {tuple(v): c for c, v in zip(captions, values)}
    assert [lookup[tuple(row)] for row in truth] == task.held_out_captions
    with pytest.raises(ValueError, match="dataset must be 'shapes'"):
        load_task("digits")
