"""The Trainer (minidiff.train): exact resume, divergence, Ctrl-C, logs and plots, configs, load_model.

Every run here is tiny (8x8 digits, a 2-level U-Net with 8 base channels, 20 timesteps, a handful of
steps), so the whole file takes seconds; what is checked is bookkeeping, not image quality."""

from __future__ import annotations

import copy
import csv
import dataclasses
import json
import math
import os
import signal
import threading

import numpy as np
import pytest
from PIL import Image
from tiny_runs import tiny_run

from minidiff import io
from minidiff.train import ModelConfig, TrainConfig, Trainer, TrainingDiverged, load_model
from minidiff.train.plot import plot_loss

TINY = tiny_run(warmup_steps=2)
# every source of randomness in play: model dropout, label dropout and flips
RANDOM = {"class_dropout": 0.3, "flip": True, "model": {"dropout": 0.2}}


# nothing here trains the classifier; should anything, it stays out of the home directory
pytestmark = pytest.mark.usefixtures("private_cache")


def tiny_config(**overrides) -> TrainConfig:
    return TrainConfig.from_dict(tiny_run(**{"warmup_steps": 2, **overrides}))


def tiny_trainer(out, **overrides) -> Trainer:
    return Trainer(tiny_config(**overrides), out, progress=False)


def snapshot(trainer: Trainer) -> dict:
    """Everything that determines the rest of a run, as arrays and plain values."""
    names = [n for n, _ in trainer.model.named_parameters()]
    return {
        "step": trainer.step,
        "model": {n: p.data.copy() for n, p in trainer.model.named_parameters()},
        "ema": {n: s.copy() for n, s in zip(names, trainer.ema.shadow)},
        "ema_updates": trainer.ema.updates,
        "adam_m": {n: m.copy() for n, m in zip(names, trainer.optimizer.m)},
        "adam_v": {n: v.copy() for n, v in zip(names, trainer.optimizer.v)},
        "adam_steps": list(trainer.optimizer.steps),
        "adam_step_count": trainer.optimizer.step_count,
        "lr": trainer.optimizer.lr,
        "rng": copy.deepcopy(trainer.rng.bit_generator.state),
        "batches": trainer.batches.state_dict(),
    }


def assert_bitwise_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict) and a[key] and isinstance(next(iter(a[key].values())), np.ndarray):
            assert a[key].keys() == b[key].keys(), key
            for name in a[key]:
                x, y = a[key][name], b[key][name]
                assert x.dtype == y.dtype and x.shape == y.shape, f"{key}/{name}"
                assert np.array_equal(x, y), f"{key}/{name} differs (max |diff| {np.abs(x - y).max()})"
        else:
            assert a[key] == b[key], key


def stop_requested_at(trainer, step, signum=None):
    """``trainer.train_step`` that asks the trainer to stop once ``step`` steps are done: a real
    ``signum`` sent to this process (fit's handler must be in place, else it would stop pytest),
    or without signum a Ctrl-C handed to the trainer's handler directly."""
    real_step = trainer.train_step

    def step_then_stop():
        if trainer.step == step:
            if signum is None:
                trainer._request_stop(signal.SIGINT, None)
            else:
                assert signal.getsignal(signum) == trainer._request_stop
                os.kill(os.getpid(), signum)
        return real_step()

    return step_then_stop


def read_log(out) -> list[list[str]]:
    with open(out / "loss.csv", newline="") as f:
        return list(csv.reader(f))


def latest(out) -> str:
    return (out / "checkpoints" / io.LATEST).read_text().strip()


def assert_png(path):
    assert path.is_file(), path
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.verify()
    with Image.open(path) as image:  # verify() leaves the image unusable; decode fully too
        image.load()
        assert image.size[0] > 0 and image.size[1] > 0


@pytest.fixture(scope="module")
def straight_runs(tmp_path_factory):
    """Uninterrupted 6-step runs, with and without the random paths: (snapshot, loss.csv rows)."""
    runs = {}
    for name, overrides in (("plain", {}), ("random", RANDOM)):
        out = tmp_path_factory.mktemp(f"straight-{name}")
        trainer = tiny_trainer(out, steps=6, **copy.deepcopy(overrides))
        assert trainer.fit()["status"] == "finished"
        runs[name] = (snapshot(trainer), read_log(out), out)
    return runs


# -- resume ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "random"])
def test_resume_reaches_the_weights_of_an_uninterrupted_run(tmp_path, straight_runs, variant):
    overrides = copy.deepcopy(RANDOM if variant == "random" else {})
    first = tiny_trainer(tmp_path, steps=3, **overrides)
    assert first.fit() == {"status": "finished", "step": 3, "out_dir": str(tmp_path)}
    assert latest(tmp_path) == "step-00000003"

    resumed = Trainer.resume(tmp_path, progress=False, steps=6)
    assert resumed.step == 3 and resumed.config.steps == 6
    assert_bitwise_equal(snapshot(resumed), snapshot(first))  # the checkpoint restores everything
    assert resumed.fit()["status"] == "finished"

    expected, expected_log, _ = straight_runs[variant]
    assert_bitwise_equal(snapshot(resumed), expected)
    # the log was appended to (one header), and matches the straight run's row for row
    assert read_log(tmp_path) == expected_log
    # and the checkpoint on disk at step 6 holds the same arrays
    arrays, state, _ = io.load_checkpoint(tmp_path, groups=("model", "ema", "optimizer"))
    assert state["step"] == 6
    for name, value in expected["ema"].items():
        assert np.array_equal(arrays["ema"][name], value)


def test_the_random_paths_are_really_taken(straight_runs):
    plain, random = straight_runs["plain"][0], straight_runs["random"][0]
    assert not all(np.array_equal(plain["model"][n], random["model"][n]) for n in plain["model"])


def test_resume_of_a_finished_run_does_nothing_more(tmp_path):
    trainer = tiny_trainer(tmp_path, steps=2)
    trainer.fit()
    before = snapshot(trainer)
    resumed = Trainer.resume(tmp_path, progress=False)
    assert resumed.fit()["status"] == "finished"
    assert_bitwise_equal(snapshot(resumed), before)
    assert [row[0] for row in read_log(tmp_path)] == ["step", "1", "2"]


def test_resume_with_a_state_lacking_its_config_is_a_checkpoint_error(tmp_path):
    tiny_trainer(tmp_path, steps=2).fit()
    state_file = tmp_path / "checkpoints" / latest(tmp_path) / io.STATE_FILE
    state = json.loads(state_file.read_text())
    del state["config"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(io.CheckpointError):
        Trainer.resume(tmp_path, progress=False)


def test_resume_with_mismatched_weights_is_a_checkpoint_error(tmp_path):
    tiny_trainer(tmp_path, steps=2).fit()
    state_file = tmp_path / "checkpoints" / latest(tmp_path) / io.STATE_FILE
    state = json.loads(state_file.read_text())
    state["config"]["model"]["base_channels"] = 16  # the arrays no longer fit the model
    state_file.write_text(json.dumps(state))
    with pytest.raises(io.CheckpointError, match="does not match"):
        Trainer.resume(tmp_path, progress=False)


def test_resume_without_a_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError):
        Trainer.resume(tmp_path / "nothing", progress=False)
    tmp_path.joinpath("empty").mkdir()
    with pytest.raises(io.CheckpointError):
        Trainer.resume(tmp_path / "empty", progress=False)


# -- divergence ------------------------------------------------------------------------------------


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, steps=6)
    real_loss = trainer.diffusion.training_loss
    calls = []

    def loss_going_nan(*args, **kwargs):
        loss = real_loss(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 4 else loss

    monkeypatch.setattr(trainer.diffusion, "training_loss", loss_going_nan)
    result = trainer.fit()
    assert result["status"] == "diverged"
    assert result["step"] == 3  # the 4th step never happened
    assert latest(tmp_path) == "step-00000002"
    for p in trainer.params:  # the NaN never reached the weights: no backward, no update
        assert np.isfinite(p.data).all()
    arrays, state, _ = io.load_checkpoint(tmp_path, groups=("model", "ema", "optimizer"))
    assert state["step"] == 2
    for group in arrays.values():
        for value in group.values():
            assert np.isfinite(value).all()
    rows = read_log(tmp_path)
    assert rows[0] == ["step", "loss", "lr"]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3"]
    assert all(math.isfinite(float(r[1])) for r in rows[1:])
    assert_png(tmp_path / "loss.png")


def test_poisoned_weight_after_a_checkpoint(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, steps=6)
    real_step = trainer.train_step

    def step_then_poison():
        value = real_step()
        if trainer.step == 3:  # after the checkpoint at step 2, before the next one at step 4
            trainer.params[0].data[...] = np.nan
        return value

    monkeypatch.setattr(trainer, "train_step", step_then_poison)
    result = trainer.fit()
    # the poison lands after step 3 (no checkpoint there), the 4th loss is NaN
    assert result == {"status": "diverged", "step": 3, "out_dir": str(tmp_path)}
    assert latest(tmp_path) == "step-00000002"
    arrays, _, _ = io.load_checkpoint(tmp_path, groups=("model", "ema"))
    assert all(np.isfinite(v).all() for g in arrays.values() for v in g.values())
    # the kept checkpoint resumes fine
    resumed = Trainer.resume(tmp_path, progress=False)
    assert resumed.step == 2


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
def test_train_step_raises_training_diverged(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path)
    trainer.params[0].data[...] = np.inf
    with pytest.raises(TrainingDiverged, match="step 1"):
        trainer.train_step()
    assert trainer.step == 0


# -- Ctrl-C ---------------------------------------------------------------------------------------------


def test_interrupt_saves_a_checkpoint_that_resumes_exactly(tmp_path, straight_runs, monkeypatch):
    trainer = tiny_trainer(tmp_path, steps=6)
    # Ctrl-C arrives during the 3rd step
    monkeypatch.setattr(trainer, "train_step", stop_requested_at(trainer, 2))
    result = trainer.fit()
    assert result == {"status": "interrupted", "step": 3, "out_dir": str(tmp_path)}
    assert latest(tmp_path) == "step-00000003"  # not a checkpoint_every step: saved for the interrupt

    resumed = Trainer.resume(tmp_path, progress=False)
    assert resumed.step == 3
    assert resumed.fit()["status"] == "finished"
    expected, expected_log, _ = straight_runs["plain"]
    assert_bitwise_equal(snapshot(resumed), expected)
    assert read_log(tmp_path) == expected_log


def test_a_real_sigint_is_handled_and_the_handler_restored(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, steps=4)
    before = signal.getsignal(signal.SIGINT)
    monkeypatch.setattr(trainer, "train_step", stop_requested_at(trainer, 1, signal.SIGINT))
    result = trainer.fit()
    assert result["status"] == "interrupted" and result["step"] == 2
    assert latest(tmp_path) == "step-00000002"
    assert signal.getsignal(signal.SIGINT) is before


def test_fit_again_after_an_interrupt_continues(tmp_path):
    trainer = tiny_trainer(tmp_path, steps=4)
    real_step = trainer.train_step
    trainer.train_step = stop_requested_at(trainer, 1)
    assert trainer.fit()["status"] == "interrupted"
    trainer.train_step = real_step
    assert trainer.fit() == {"status": "finished", "step": 4, "out_dir": str(tmp_path)}


def test_fit_in_a_worker_thread(tmp_path):
    trainer = tiny_trainer(tmp_path, steps=1)
    results, errors = [], []

    def work():
        try:
            results.append(trainer.fit())
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert errors == []
    assert results[0]["status"] == "finished"


def test_loss_log_after_a_crash_between_checkpoints_has_no_duplicate_steps(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, steps=6)
    real_step = trainer.train_step

    def step_then_crash():
        if trainer.step == 3:  # steps 1-3 logged, the newest checkpoint is step 2
            raise RuntimeError("the machine went away")
        return real_step()

    monkeypatch.setattr(trainer, "train_step", step_then_crash)
    with pytest.raises(RuntimeError):
        trainer.fit()
    assert latest(tmp_path) == "step-00000002"
    resumed = Trainer.resume(tmp_path, progress=False)
    resumed.fit()
    steps = [int(row[0]) for row in read_log(tmp_path)[1:]]
    assert steps == [1, 2, 3, 4, 5, 6]


# -- outputs: loss.csv, loss.png, samples, config.json ---------------------------------------------


def test_outputs_of_a_run(tmp_path):
    out = tmp_path / "run"
    config = tiny_config(steps=5, log_every=2, sample_every=2, checkpoint_every=2)
    trainer = Trainer(config, out, progress=False)
    assert trainer.fit()["status"] == "finished"

    rows = read_log(out)
    assert rows[0] == ["step", "loss", "lr"]
    assert [int(r[0]) for r in rows[1:]] == [2, 4, 5]  # every log_every, and the last step
    for row in rows[1:]:
        assert len(row) == 3
        assert 0 < float(row[1]) < 100 and float(row[2]) > 0
    assert float(rows[1][2]) == pytest.approx(config.lr)  # warm-up of 2 steps is over by step 2

    assert_png(out / "loss.png")
    samples = sorted(p.name for p in (out / "samples").iterdir())
    assert samples == ["step-00000002.png", "step-00000004.png", "step-00000005.png"]
    for name in samples:
        assert_png(out / "samples" / name)
    # conditional: a grid of two rows with every class (8x8 digits, 10 classes)
    with Image.open(out / "samples" / "step-00000005.png") as image:
        width, height = image.size
        assert width > height > 8

    saved = json.loads((out / "config.json").read_text())
    assert saved == json.loads(json.dumps(config.to_dict()))
    assert TrainConfig.from_dict(saved) == config

    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["step-00000004", "step-00000005"]  # keep=2
    assert latest(out) == "step-00000005"


def test_resume_appends_to_loss_csv_without_a_second_header(tmp_path):
    tiny_trainer(tmp_path, steps=2).fit()
    Trainer.resume(tmp_path, progress=False, steps=4).fit()
    rows = read_log(tmp_path)
    assert sum(row == ["step", "loss", "lr"] for row in rows) == 1
    assert [r[0] for r in rows] == ["step", "1", "2", "3", "4"]
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 4


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "lr"])
        writer.writerows(rows)
    return path


def test_plot_loss(tmp_path):
    log = write_csv(tmp_path / "loss.csv", [[s, f"{1.0 / s:.6f}", "0.001"] for s in range(1, 30)])
    png = plot_loss(log, tmp_path / "loss.png")
    assert png == tmp_path / "loss.png"
    assert_png(png)
    with Image.open(png) as image:
        assert image.size == (640, 360)
        assert image.getpixel((0, 0)) == (255, 255, 255)
        # some pixels carry the blue curve
        assert (31, 119, 180) in {color for _, color in image.getcolors(maxcolors=1 << 16)}


def test_plot_loss_of_a_single_row_or_a_flat_curve(tmp_path):
    assert_png(plot_loss(write_csv(tmp_path / "a.csv", [[1, "0.5", "0.001"]]), tmp_path / "a.png"))
    flat = write_csv(tmp_path / "b.csv", [[s, "0.25", "0.001"] for s in range(1, 5)])
    assert_png(plot_loss(flat, tmp_path / "b.png"))


def test_plot_loss_with_nothing_to_plot(tmp_path):
    assert plot_loss(write_csv(tmp_path / "a.csv", []), tmp_path / "a.png") is None
    assert not (tmp_path / "a.png").exists()
    # non-finite and non-positive losses cannot go on a log scale: skipped
    bad = write_csv(
        tmp_path / "b.csv", [[1, "nan", "0.1"], [2, "0", "0.1"], [3, "-1", "0.1"], [4, "inf", "0.1"]]
    )
    assert plot_loss(bad, tmp_path / "b.png") is None
    mixed = write_csv(tmp_path / "c.csv", [[1, "nan", "0.1"], [2, "0.3", "0.1"], [3, "0.2", "0.1"]])
    assert_png(plot_loss(mixed, tmp_path / "c.png"))


# -- configs ---------------------------------------------------------------------------------------


def test_from_dict_round_trip():
    config = tiny_config(min_snr_gamma=5.0, model={"dropout": 0.1})
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
    assert isinstance(again.model, ModelConfig)
    assert again.model.channel_mults == (1, 2) and again.model.attn_resolutions == (4,)
    assert TrainConfig.from_dict({}) == TrainConfig()
    assert TrainConfig.from_dict({"model": None}) == TrainConfig()


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown keys \['stepz'\]"):
        TrainConfig.from_dict({"stepz": 10})
    with pytest.raises(ValueError, match=r"unknown model keys \['channels'\]"):
        TrainConfig.from_dict({"model": {"channels": 8}})
    with pytest.raises(ValueError, match="known keys") as info:
        TrainConfig.from_dict({"steps": 1, "learning_rate": 1.0})
    assert "learning_rate" in str(info.value) and "lr" in str(info.value)


@pytest.mark.parametrize(
    "bad",
    [
        {"steps": 0},
        {"batch_size": 0},
        {"timesteps": 0},
        {"log_every": 0},
        {"sample_every": -1},
        {"checkpoint_every": 0},
        {"lr": 0.0},
        {"lr": -1e-3},
        {"class_dropout": 1.0},
        {"class_dropout": -0.1},
    ],
)
def test_validate_rejects_bad_values(tmp_path, bad):
    config = tiny_config(**bad)
    (key,) = bad
    with pytest.raises(ValueError, match=key):
        config.validate()
    with pytest.raises(ValueError, match=key):
        Trainer(config, tmp_path, progress=False)
    assert not (tmp_path / "loss.csv").exists()


@pytest.mark.skipif(
    "holdout" not in {f.name for f in dataclasses.fields(TrainConfig)},
    reason="this TrainConfig has no holdout",
)
@pytest.mark.parametrize("holdout", [1.0, -0.1])
def test_validate_rejects_a_bad_holdout(holdout):
    with pytest.raises(ValueError, match="holdout"):
        tiny_config(holdout=holdout).validate()


def test_validate_accepts_the_defaults():
    TrainConfig().validate()
    tiny_config().validate()


# -- load_model ------------------------------------------------------------------------------------


def test_load_model_returns_the_ema_or_the_training_weights(tmp_path):
    trainer = tiny_trainer(tmp_path, steps=3)
    trainer.fit()
    names = [n for n, _ in trainer.model.named_parameters()]
    ema = dict(zip(names, trainer.ema.shadow))
    raw = {n: p.data for n, p in trainer.model.named_parameters()}
    assert not all(np.array_equal(ema[n], raw[n]) for n in names)

    for where in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "step-00000003"):
        model, diffusion, state = load_model(where)
        assert not model.training
        loaded = dict(model.named_parameters())
        assert sorted(loaded) == sorted(names)
        for n in names:
            assert np.array_equal(loaded[n].data, ema[n]), n
        assert diffusion.T == 20
        assert state["step"] == 3 and state["num_classes"] == 10
        assert state["image_shape"] == [1, 8, 8]

    model, _, _ = load_model(tmp_path, weights="model")
    for n, p in model.named_parameters():
        assert np.array_equal(p.data, raw[n]), n

    # the EMA model of the trainer and the loaded one agree on a forward pass
    x = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    t = np.array([3, 15])
    y = np.array([1, 7])
    loaded_model, _, _ = load_model(tmp_path)
    from minidiff.tensor import Tensor

    a = loaded_model(Tensor.from_array(x), t, y).data
    b = trainer.ema_model()(Tensor.from_array(x), t, y).data
    assert np.array_equal(a, b)


def test_load_model_errors(tmp_path):
    with pytest.raises(ValueError, match="weights"):
        load_model(tmp_path, weights="best")
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing")


def _as_format_1(key, value):
    """A current checkpoint key and array as format 1 wrote them (attention as 1x1 convolutions)."""
    old_names = {"attn.to_q": "q", "attn.to_k": "k", "attn.to_v": "v", "attn.to_out.0": "proj_out"}
    for new, old in old_names.items():
        if f".{new}." in key:
            return key.replace(f".{new}.", f".{old}."), value[..., None, None] if value.ndim == 2 else value
    return key, value


def test_a_format_1_checkpoint_loads_and_resumes_with_the_same_numbers(tmp_path):
    from safetensors.numpy import load_file, save_file

    trainer = tiny_trainer(tmp_path / "new", steps=2)
    trainer.fit()
    old = tmp_path / "old"
    import shutil

    shutil.copytree(tmp_path / "new", old)
    folder = old / "checkpoints" / latest(old)
    for group in ("model", "ema", "optimizer"):
        arrays = load_file(str(folder / f"{group}.safetensors"))
        save_file(dict(_as_format_1(k, v) for k, v in arrays.items()), str(folder / f"{group}.safetensors"))
    assert any(".attn.q.weight" in k for k in load_file(str(folder / "model.safetensors")))
    state = json.loads((folder / io.STATE_FILE).read_text())
    state["format"] = "minidiff-checkpoint-1"
    (folder / io.STATE_FILE).write_text(json.dumps(state))

    for weights in ("ema", "model"):
        a, _, _ = load_model(tmp_path / "new", weights=weights)
        b, _, _ = load_model(old, weights=weights)
        for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
            assert np.array_equal(p.data, q.data), name
    resumed_new = Trainer.resume(tmp_path / "new", progress=False, steps=3)
    resumed_old = Trainer.resume(old, progress=False, steps=3)
    resumed_new.fit(), resumed_old.fit()
    assert_bitwise_equal(snapshot(resumed_old), snapshot(resumed_new))
