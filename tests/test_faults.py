"""Faults injected into training and sampling: no work is lost and no wrong result is written.

Kills are simulated where they can be without a process: a hook in io.save_checkpoint copies the
run folder at each stage of a checkpoint write (what a kill at that moment leaves on disk), and each
copy is loaded and resumed; one test kills a real process inside the write. Every run is tiny (8x8
digits, 8 base channels, 20 timesteps, a few steps)."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from test_train import (
    TINY,
    assert_bitwise_equal,
    latest,
    read_log,
    snapshot,
    stop_requested_at,
    tiny_config,
    tiny_trainer,
)
from tiny_runs import cli

import minidiff.diffusion
from minidiff import io
from minidiff.cli import main
from minidiff.io import checkpoint as ckpt
from minidiff.train import Trainer
from minidiff.train.ddpm import RunExistsError, config_help

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("private_cache")  # every test: a cache of its own


@pytest.fixture(scope="module")
def straight6(tmp_path_factory):
    """An uninterrupted 6-step run: (snapshot, loss.csv rows)."""
    out = tmp_path_factory.mktemp("straight6")
    trainer = tiny_trainer(out, steps=6)
    trainer.fit()
    return snapshot(trainer), read_log(out)


def cli_config(folder, **overrides) -> str:
    values = json.loads(json.dumps(TINY))
    values.update(overrides)
    path = folder / "tiny.json"
    path.write_text(json.dumps(values))
    return str(path)


def sample(checkpoint, out, *extra) -> int:
    argv = ["sample", "--checkpoint", str(checkpoint), "--num", "2", "--steps", "2", "--out", str(out)]
    return cli([*argv, *extra])


def files_of(folder) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def hidden(root) -> list[str]:
    return sorted(
        p.name for p in Path(root).iterdir() if p.name.startswith(".") and p.name != io.checkpoint.LOCK_FILE
    )


# -- work lost: LATEST missing or stale, fresh runs on a run's folder, two trainers ---------------------


def test_missing_latest_resumes_the_newest_checkpoint(tmp_path, straight6, capsys):
    out = tmp_path / "run"
    tiny_trainer(out, steps=4).fit()  # checkpoints at steps 2 and 4
    (out / "checkpoints" / io.LATEST).unlink()
    assert io.resolve_checkpoint(out).name == "step-00000004"
    resumed = Trainer.resume(out, progress=False, steps=6)
    assert resumed.step == 4
    resumed.fit()
    assert_bitwise_equal(snapshot(resumed), straight6[0])
    assert read_log(out) == straight6[1]


def test_stale_latest_is_overruled_by_a_newer_complete_checkpoint(tmp_path):
    out = tmp_path / "run"
    tiny_trainer(out, steps=4).fit()
    # a kill between the rename of step 4 and the write of LATEST leaves LATEST at step 2
    (out / "checkpoints" / io.LATEST).write_text("step-00000002\n")
    assert io.resolve_checkpoint(out).name == "step-00000004"
    assert Trainer.resume(out, progress=False).step == 4


def test_a_fresh_run_never_takes_over_a_folder_holding_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    config = cli_config(tmp_path)
    assert cli(["train", "--config", config, "--out", str(out), "--quiet"]) == 0
    (out / "checkpoints" / io.LATEST).unlink()
    before = files_of(out)
    capsys.readouterr()
    # the CLI refuses, naming the checkpoint it found, and touches nothing
    assert cli(["train", "--config", config, "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "step-00000004" in err and "--overwrite" in err
    assert files_of(out) == before
    # --resume finds the checkpoint without LATEST
    assert cli(["train", "--out", str(out), "--resume", "--steps", "6", "--quiet"]) == 0
    assert "resuming" in capsys.readouterr().out and latest(out) == "step-00000006"
    # the library refuses too
    with pytest.raises(RunExistsError, match="already holds a run"):
        tiny_trainer(out).fit()
    assert latest(out) == "step-00000006"


def test_overwrite_starts_afresh(tmp_path, capsys):
    out = tmp_path / "run"
    config = cli_config(tmp_path)
    assert cli(["train", "--config", config, "--out", str(out), "--quiet", "--steps", "6"]) == 0
    (out / "notes.txt").write_text("mine")  # not a run output: kept
    assert (
        main(["train", "--config", config, "--out", str(out), "--quiet", "--overwrite", "--steps", "2"]) == 0
    )
    assert latest(out) == "step-00000002"
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.is_dir()) == ["step-00000002"]
    assert [r[0] for r in read_log(out)] == ["step", "1", "2"]
    assert (out / "notes.txt").read_text() == "mine"
    assert cli(["train", "--out", str(out), "--resume", "--overwrite", "--quiet"]) == 2


def test_a_second_trainer_on_a_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "run"
    tiny_trainer(out, steps=2).fit()
    with io.RunLock(out):  # another trainer holds the folder
        with pytest.raises(io.RunLockedError, match=f"pid {os.getpid()}"):
            Trainer.resume(out, progress=False, steps=4).fit()
        assert cli(["train", "--out", str(out), "--resume", "--steps", "4", "--quiet"]) == 2
        assert "in use by another trainer" in capsys.readouterr().err
    assert latest(out) == "step-00000002"
    assert Trainer.resume(out, progress=False, steps=4).fit()["status"] == "finished"  # released


# -- work lost: signals ------------------------------------------------------------------------------


def test_sigterm_stops_like_ctrl_c_and_saves_a_checkpoint(tmp_path, straight6):
    trainer = tiny_trainer(tmp_path, steps=6)
    before = signal.getsignal(signal.SIGTERM)
    trainer.train_step = stop_requested_at(trainer, 2, signal.SIGTERM)
    assert trainer.fit()["status"] == "interrupted"
    assert latest(tmp_path) == "step-00000003"
    assert signal.getsignal(signal.SIGTERM) is before
    resumed = Trainer.resume(tmp_path, progress=False)
    resumed.fit()
    assert_bitwise_equal(snapshot(resumed), straight6[0])


def test_ctrl_c_on_a_checkpoint_step_writes_it_once(tmp_path, monkeypatch):
    trainer = tiny_trainer(tmp_path, steps=6)
    real_step = trainer.train_step
    written = []
    real_save = io.save_checkpoint
    monkeypatch.setattr(
        io,
        "save_checkpoint",
        lambda root, name, *a, **k: written.append(name) or real_save(root, name, *a, **k),
    )

    def step_with_ctrl_c():
        if trainer.step == 3:  # during the 4th step, a checkpoint step
            trainer._request_stop(signal.SIGINT, None)
        return real_step()

    trainer.train_step = step_with_ctrl_c
    assert trainer.fit() == {"status": "interrupted", "step": 4, "out_dir": str(tmp_path)}
    assert written == ["step-00000002", "step-00000004"]


def test_ctrl_c_before_training_starts_is_not_a_traceback(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("minidiff.train.ddpm.load_split", interrupted)  # Ctrl-C while the data loads
    assert cli(["train", "--config", cli_config(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "minidiff train: interrupted"


def test_ctrl_c_while_the_command_is_still_importing_is_not_a_traceback():
    """SIGINT in the first second or two of ``minidiff ...``, while NumPy, Numba and the kernels
    load: the process sends itself SIGINT as the import reaches minidiff.kernels."""
    program = textwrap.dedent(
        """
        import os, signal, sys
        sys.argv[0] = os.path.join(os.path.dirname(sys.executable), "minidiff")  # the console script

        class InterruptAtKernels:
            def find_spec(self, name, path=None, target=None):
                if name == "minidiff.kernels":
                    os.kill(os.getpid(), signal.SIGINT)
                return None

        sys.meta_path.insert(0, InterruptAtKernels())
        import minidiff.cli
        print("imported")
        """
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (130, ""), done.stderr
    assert done.stderr.strip() == "minidiff: interrupted"


def test_after_the_import_ctrl_c_is_a_keyboard_interrupt_again(monkeypatch):
    """cli.main hands SIGINT back to Python's handler, so the commands' own Ctrl-C handling runs."""
    import minidiff

    monkeypatch.setattr(signal, "getsignal", lambda signum: minidiff._interrupted_while_loading)
    handlers = []
    monkeypatch.setattr(signal, "signal", lambda signum, handler: handlers.append((signum, handler)))
    main(["info"])
    assert handlers == [(signal.SIGINT, signal.default_int_handler)]


# -- work lost: a kill at each stage of a checkpoint write ---------------------------------------------


def snapshots_of_a_save(monkeypatch, tmp_path, out, save) -> dict:
    """Run ``save()`` with the folder copied at each stage: {stage: copy}."""
    copies = {}

    def hook(stage):
        copies[stage] = tmp_path / f"killed-at-{stage}"
        shutil.copytree(out, copies[stage], ignore=shutil.ignore_patterns(io.checkpoint.LOCK_FILE))

    monkeypatch.setattr(ckpt, "_stage_hook", hook)
    save()
    monkeypatch.setattr(ckpt, "_stage_hook", None)
    return copies


@pytest.mark.parametrize("same_name", [False, True], ids=["new-checkpoint", "same-name-overwrite"])
def test_a_kill_at_any_stage_of_a_checkpoint_write_leaves_a_loadable_run(
    tmp_path, monkeypatch, straight6, same_name
):
    out = tmp_path / "run"
    if same_name:
        trainer = tiny_trainer(out, steps=4)
        trainer.fit()  # step-2 and step-4; now step 4 is written again
        copies = snapshots_of_a_save(monkeypatch, tmp_path, out, trainer.save_checkpoint)
        newest = {stage: 4 for stage in copies}
    else:
        trainer = tiny_trainer(out, steps=3)
        trainer.fit()  # step-2 and step-3; the 4th step's checkpoint is the one killed
        trainer.config.steps = 4
        copies = snapshots_of_a_save(monkeypatch, tmp_path, out, trainer.fit)
        newest = {"temp-written": 3, "renamed": 4, "latest-written": 4, "cleaned": 4}
    expected_stages = set(ckpt.STAGES) - (set() if same_name else {"old-moved-aside"})
    assert set(copies) == expected_stages
    for stage, left in copies.items():
        _, state, _ = io.load_checkpoint(left, groups=("model", "ema", "optimizer"))
        assert state["step"] == newest[stage], stage
        resumed = Trainer.resume(left, progress=False, steps=6)
        resumed.fit()
        assert_bitwise_equal(snapshot(resumed), straight6[0])
        assert read_log(left) == straight6[1], stage
        # the next write removed what the killed one left behind
        assert hidden(left / "checkpoints") == [], stage
        assert not any(p.name.endswith(".replaced") for p in (left / "checkpoints").iterdir()), stage


def test_a_process_killed_between_moving_the_old_checkpoint_aside_and_renaming_the_new(tmp_path, straight6):
    out = tmp_path / "run"
    tiny_trainer(out, steps=4).fit()
    script = textwrap.dedent(
        f"""
        import os, sys
        sys.path.insert(0, {str(ROOT / "tests")!r})
        from test_train import tiny_config
        from minidiff.io import checkpoint
        from minidiff.train import Trainer
        checkpoint._stage_hook = lambda stage: stage == "old-moved-aside" and os._exit(9)
        Trainer.resume({str(out)!r}, progress=False).save_checkpoint()  # step 4 again
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 9, result.stderr
    assert not (out / "checkpoints" / "step-00000004").exists()  # the window the old code deleted in
    assert latest(out) == "step-00000004"
    _, state, where = io.load_checkpoint(out)
    assert state["step"] == 4 and where.name == "step-00000004.replaced"
    assert sample(out, tmp_path / "x.npy") == 0
    resumed = Trainer.resume(out, progress=False, steps=6)
    resumed.fit()
    assert_bitwise_equal(snapshot(resumed), straight6[0])


def test_a_kill_soon_after_a_resume_keeps_loss_csv(tmp_path):
    tiny_trainer(tmp_path, steps=4).fit()
    before = read_log(tmp_path)
    resumed = Trainer.resume(tmp_path, progress=False, steps=6)
    real_step = resumed.train_step
    on_disk = []

    def step_reading_the_log():
        # what a SIGKILL now would leave: the file as it is on disk
        on_disk.append((tmp_path / "loss.csv").read_text())
        return real_step()

    resumed.train_step = step_reading_the_log
    resumed.fit()
    assert on_disk[0].splitlines() == [",".join(r) for r in before]
    # each row is on disk as soon as it is logged
    assert len(on_disk[1].splitlines()) == len(before) + 1


def test_loss_csv_with_a_torn_row_is_rebuilt(tmp_path, straight6):
    tiny_trainer(tmp_path, steps=4).fit()
    with open(tmp_path / "loss.csv", "a") as f:
        f.write("1")  # a kill in the middle of a row: the first digit of step 10's
    resumed = Trainer.resume(tmp_path, progress=False, steps=6)
    resumed.fit()
    assert read_log(tmp_path) == straight6[1]


def test_a_bad_sample_steps_is_refused_before_the_first_step(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"sample_steps must be in \[1, timesteps \(20\)\], got 50"):
        tiny_trainer(tmp_path / "run", sample_steps=50)
    assert not (tmp_path / "run").exists()
    config = cli_config(tmp_path, sample_steps=50)
    assert cli(["train", "--config", config, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert "sample_steps" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


# -- wrong results: NaN ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults-cli")
    out = folder / "run"
    assert cli(["train", "--config", cli_config(folder), "--out", str(out), "--quiet"]) == 0
    return out


@pytest.mark.parametrize("flag", ["--eta", "--guidance"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_nan_arguments_are_refused(run, tmp_path, capsys, flag, value):
    assert sample(run, tmp_path / "x.png", flag, value) == 2
    assert f"{flag}: must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(run), "--metric", "fid", "--guidance", value])
    assert info.value.code == 2


def test_weights_holding_nan_are_refused_on_load(run, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    for group in ("ema", "model"):
        file = io.resolve_checkpoint(copy) / f"{group}.safetensors"
        arrays = load_file(str(file))
        name = sorted(arrays)[0]
        arrays[name][...] = np.nan
        save_file(arrays, str(file))
    assert sample(copy, tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "ema.safetensors holds non-finite values" in err and name in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(io.CheckpointError, match="non-finite"):
        Trainer.resume(copy, progress=False)


def test_a_non_finite_sample_batch_is_a_failure(run, tmp_path, monkeypatch, capsys):
    real = minidiff.diffusion.ddim_sample

    def half_nan(*args, **kwargs):
        images = real(*args, **kwargs)
        images[0] = np.nan
        return images

    monkeypatch.setattr(minidiff.diffusion, "ddim_sample", half_nan)
    assert sample(run, tmp_path / "x.png") == 1
    assert "non-finite values (NaN or inf) in 1 of 2 images" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


# -- wrong results: config ranges, divergence, resume ---------------------------------------------------


@pytest.mark.parametrize(
    "bad, key",
    [
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"warmup_steps": -5}, "warmup_steps"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"ema_decay": 1.5}, "ema_decay"),
        ({"lr": float("nan")}, "lr"),
        ({"seed": -1}, "seed"),
        ({"steps": "ten"}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"batch_size": True}, "batch_size"),
        ({"image_size": 0}, "image_size"),
        ({"schedule": "cubic"}, "schedule"),
        ({"prediction": "noise"}, "prediction"),
        ({"min_snr_gamma": 0}, "min_snr_gamma"),
        ({"max_loss": -1}, "max_loss"),
        ({"flip": "yes"}, "flip"),
        ({"dataset": ""}, "dataset"),
        ({"model": {"norm_groups": 3}}, "model.norm_groups"),
        ({"model": {"base_channels": 0}}, "model.base_channels"),
        ({"model": {"channel_mults": []}}, "model.channel_mults"),
        ({"model": {"dropout": 1.0}}, "model.dropout"),
    ],
)
def test_every_config_key_is_range_checked_by_name(tmp_path, bad, key):
    with pytest.raises(ValueError, match=f"config: {re.escape(key)}( \\(.*\\))? must"):
        tiny_trainer(tmp_path, **copy.deepcopy(bad))


@pytest.mark.parametrize(
    "config, key",
    [
        ("[1, 2]", "JSON object"),
        ('{"steps": "ten"}', "steps must be an integer"),
        ('{"model": 3}', "model must be"),
    ],
)
def test_config_files_of_the_wrong_shape_are_errors(tmp_path, capsys, config, key):
    (tmp_path / "c.json").write_text(config)
    assert (
        cli(["train", "--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    )
    err = capsys.readouterr().err
    assert key in err and "Traceback" not in err


def test_negative_grad_clip_no_longer_trains_backwards(tmp_path):
    # the old code accepted it: clip_grad_norm scaled the gradient by a negative factor
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        tiny_config(grad_clip=-1.0).validate()


def test_a_blown_up_loss_stops_the_run_and_keeps_only_a_sane_checkpoint(tmp_path, monkeypatch, capsys):
    trainer = tiny_trainer(tmp_path, steps=8, checkpoint_every=1)
    real_loss = trainer.diffusion.training_loss
    calls = []

    def loss_blowing_up(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * 1e11 if len(calls) == 4 else loss  # the weights after step 3 are "blown up"

    monkeypatch.setattr(trainer.diffusion, "training_loss", loss_blowing_up)
    result = trainer.fit()
    assert result["status"] == "diverged" and result["step"] == 3
    # step 3's checkpoint would hold the weights that gave the insane loss: not kept
    assert latest(tmp_path) == "step-00000002"
    assert not (tmp_path / "checkpoints" / "step-00000003").exists()
    out = capsys.readouterr().out
    assert "above max_loss 100" in out and "step-00000002" in out and "lower --lr" in out


def test_a_run_diverging_before_any_checkpoint_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    config = cli_config(tmp_path, warmup_steps=0)
    code = cli(["train", "--config", config, "--lr", "1e6", "--out", str(out), "--quiet"])
    assert code == 1
    text = capsys.readouterr().out
    assert "diverged" in text
    if io.has_checkpoint(out):
        assert io.resolve_checkpoint(out).name in text
    else:
        assert "no checkpoint was written" in text and "kept" not in text


def test_resume_takes_a_lower_lr_to_recover(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli(["train", "--config", cli_config(tmp_path, steps=2), "--out", str(out), "--quiet"]) == 0
    assert cli(["train", "--out", str(out), "--resume", "--steps", "4", "--lr", "1e-4", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["lr"] == 1e-4
    _, state, _ = io.load_checkpoint(out)
    assert state["config"]["lr"] == 1e-4 and state["optimizer"]["lr"] == pytest.approx(1e-4)


def test_resume_refuses_steps_below_the_runs_step(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = files_of(copy)
    assert cli(["train", "--out", str(copy), "--resume", "--steps", "2", "--quiet"]) == 2
    assert "steps (2) is below the step the run has reached (4" in capsys.readouterr().err
    assert files_of(copy) == before  # config.json not rewritten
    with pytest.raises(ValueError, match="below the step"):
        Trainer.resume(copy, progress=False, steps=3)


# -- wrong results: eval -------------------------------------------------------------------------------


def test_eval_timesteps_are_checked(run, capsys):
    with pytest.raises(SystemExit) as info:
        main(["eval", "--checkpoint", str(run), "--metric", "bpd", "--timesteps", "-3"])
    assert info.value.code == 2 and "--timesteps: must be 0 or more" in capsys.readouterr().err
    assert cli(["eval", "--checkpoint", str(run), "--metric", "bpd", "--timesteps", "5000"]) == 2
    assert "above the model's 20 timesteps" in capsys.readouterr().err


def test_eval_bpd_without_held_out_images_says_training_images(tmp_path, capsys):
    out = tmp_path / "run"
    config = cli_config(tmp_path, holdout=0, steps=1)
    assert cli(["train", "--config", config, "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert cli(["eval", "--checkpoint", str(out), "--metric", "bpd", "--num", "2", "--timesteps", "2"]) == 0
    text = capsys.readouterr().out
    assert "held-out" not in text and "training (this run holds none out" in text


# -- tracebacks: output paths, info ---------------------------------------------------------------------


def test_sample_output_paths_are_checked_before_sampling(run, tmp_path, monkeypatch, capsys):
    def never(*args, **kwargs):
        raise AssertionError("sampled before checking --out")

    monkeypatch.setattr(minidiff.diffusion, "ddim_sample", never)
    (tmp_path / "afile").write_text("")
    assert sample(run, tmp_path / "afile" / "x.png") == 2
    assert "--out's folder" in capsys.readouterr().err
    (tmp_path / "d.png").mkdir()
    assert sample(run, tmp_path / "d.png") == 2
    assert "is a folder" in capsys.readouterr().err


def test_info_survives_an_unusable_kernel_choice(monkeypatch, capsys):
    from minidiff.kernels import registry

    monkeypatch.setenv("MINIDIFF_KERNELS", "nonsense")
    monkeypatch.setattr(registry, "_choice", None)
    assert cli(["info"]) == 0
    assert "selected: none: unknown kernel implementation 'nonsense'" in capsys.readouterr().out


# -- documentation ------------------------------------------------------------------------------------


def test_every_config_key_is_documented():
    text = (ROOT / "docs" / "config.md").read_text()
    keys = [line.split()[0] for line in config_help().splitlines()[1:]]
    assert len(keys) > 25
    for key in keys:
        assert f"`{key}`" in text, key


def test_help_config_lists_every_key(capsys):
    assert cli(["train", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "grad_clip" in out and "model.norm_groups" in out and "sample_steps" in out


def test_help_shows_the_defaults(capsys):
    for command, expected in (
        ("train", "(default: 900)"),
        ("sample", "(default: 50"),
        ("eval", "(default: 100"),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert expected in " ".join(capsys.readouterr().out.split()), command


def test_bench_says_where_its_json_goes(monkeypatch, capsys):
    import minidiff.bench.kernels

    monkeypatch.setattr(minidiff.bench.kernels, "run_from_args", lambda args: 0)
    assert cli(["bench"]) == 0
    assert "results go to minidiff-bench.json" in capsys.readouterr().err


def test_readme_says_what_stops_and_overwrites_do():
    text = " ".join((ROOT / "README.md").read_text().split())
    for phrase in (
        "python3 -m venv",
        "Python 3.10",
        "Ctrl-C or SIGTERM",
        "`--overwrite` deletes",
        "112 GFLOP/s",
        "from minidiff.testing import gradcheck",
        "docs/config.md",
    ):
        assert phrase in text, phrase
