"""The ``minidiff`` command line (minidiff.cli), run in-process through ``main([...])``.

One tiny run is trained once for the module (8x8 digits, 4 steps, 20 timesteps); sample and eval
read it. The classifier behind ``eval --metric fid`` is trained for a single epoch here (its own
quality is tested in test_metrics.py)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from tiny_runs import TINY, cli

import minidiff.metrics
from minidiff import io
from minidiff.cli import build_parser, main

pytestmark = pytest.mark.usefixtures("private_cache")  # every test: a cache of its own
SUBCOMMANDS = ["info", "train", "sample", "eval"]


def write_config(folder, **overrides) -> str:
    values = {**TINY, **overrides}
    path = folder / "tiny.json"
    path.write_text(json.dumps(values))
    return str(path)


def train_run(folder, **overrides):
    out = folder / "run"
    code = cli(["train", "--config", write_config(folder, **overrides), "--out", str(out), "--quiet"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny class-conditional run."""
    return train_run(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def unconditional_run(tmp_path_factory):
    return train_run(tmp_path_factory.mktemp("cli-uncond"), class_conditional=False, steps=1)


def numbers(text: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", text)]


# -- help and info ---------------------------------------------------------------------------------


def test_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: minidiff")
    for command in SUBCOMMANDS:
        assert command in out


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_subcommand_help(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: minidiff {command}" in capsys.readouterr().out


def test_no_command_prints_help_and_fails(capsys):
    assert cli([]) == 2
    assert "usage: minidiff" in capsys.readouterr().out


def test_unknown_command_and_bad_choice_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--checkpoint", "x", "--metric", "inception"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_parser_defaults():
    args = build_parser().parse_args(["sample", "--checkpoint", "c", "--out", "x.png"])
    # sampler and num default by mode (checkpoints: ddim and 20 images; pipelines: the folder's and 1)
    assert (args.sampler, args.num, args.eta, args.seed, args.raw_weights) == (None, None, 0.0, 0, False)


def test_info(capsys):
    assert cli(["info"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("minidiff ")
    for word in (
        "python",
        "numpy",
        "scipy",
        "numba",
        "devices:",
        "cpu",
        "cuda",
        "kernels (selected:",
        "reference",
    ):
        assert word in out, word
    numpy_line = next(line for line in out.splitlines() if line.strip().startswith("numpy"))
    assert np.__version__ in numpy_line


# -- train -----------------------------------------------------------------------------------------


def test_train_writes_a_run(run, capsys):
    assert io.resolve_checkpoint(run).name == "step-00000004"
    assert (run / "loss.png").is_file() and (run / "config.json").is_file()
    assert sorted(p.name for p in (run / "samples").iterdir()) == ["step-00000002.png", "step-00000004.png"]
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 4 and saved["model"]["base_channels"] == 8


def test_train_flags_override_the_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    config = write_config(tmp_path, steps=50)
    code = cli(["train", "--config", config, "--out", str(out), "--quiet", "--steps", "1", "--seed", "3"])
    assert code == 0
    assert "finished at step 1" in capsys.readouterr().out
    saved = json.loads((out / "config.json").read_text())
    assert saved["steps"] == 1 and saved["seed"] == 3


def test_train_resume_continues_a_run(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    assert cli(["train", "--out", str(copy), "--resume", "--steps", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {copy} at step 4 of 5" in out
    assert "finished at step 5" in out
    assert io.resolve_checkpoint(copy).name == "step-00000005"


def test_train_into_a_folder_holding_a_run(run, capsys):
    assert cli(["train", "--config", str(run.parent / "tiny.json"), "--out", str(run), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "already holds a run" in message and "--resume" in message
    assert io.resolve_checkpoint(run).name == "step-00000004"  # untouched


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    assert cli(["train", "--out", str(tmp_path / "empty"), "--resume", "--quiet"]) == 2
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_accepts_the_runs_own_config(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    own = str(copy / "config.json")
    assert cli(["train", "--out", str(copy), "--resume", "--config", own, "--steps", "5", "--quiet"]) == 0
    assert "finished at step 5" in capsys.readouterr().out
    # the file that started the run, and flags equal to the saved values, are the same config
    code = cli(
        ["train", "--out", str(copy), "--resume", "--config", str(run.parent / "tiny.json"), "--steps", "6"]
        + ["--seed", "0", "--batch-size", "8", "--quiet"]
    )
    assert code == 0 and io.resolve_checkpoint(copy).name == "step-00000006"


def test_resume_names_the_keys_that_differ(run, tmp_path, capsys):
    changed = tmp_path / "changed.json"
    changed.write_text(
        json.dumps({**TINY, "warmup_steps": 5, "model": {**TINY["model"], "base_channels": 16}})
    )
    assert cli(["train", "--out", str(run), "--resume", "--config", str(changed), "--quiet"]) == 2
    message = capsys.readouterr().err
    assert "differs from the given one in warmup_steps, model.base_channels" in message
    assert "(only steps, lr, max_loss may change)" in message
    assert cli(["train", "--out", str(run), "--resume", "--seed", "7", "--quiet"]) == 2
    assert "in seed (only steps" in capsys.readouterr().err
    assert io.resolve_checkpoint(run).name == "step-00000004"  # untouched


def test_train_config_errors(tmp_path, capsys):
    assert cli(["train", "--config", str(tmp_path / "missing.json"), "--out", str(tmp_path / "a")]) == 2
    assert "does not exist" in capsys.readouterr().err

    bad_json = tmp_path / "bad.json"
    bad_json.write_text("{steps: 3")
    assert cli(["train", "--config", str(bad_json), "--out", str(tmp_path / "b")]) == 2
    assert "not valid JSON" in capsys.readouterr().err

    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"stepz": 3}))
    assert cli(["train", "--config", str(unknown), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "minidiff train: error:" in err and "stepz" in err and "Traceback" not in err

    # a bad count on the command line is refused by the parser ...
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--config", write_config(tmp_path), "--steps", "0", "--out", str(tmp_path / "d")])
    assert exit_info.value.code == 2
    assert "--steps: must be a positive integer" in capsys.readouterr().err
    # ... and in a config file by TrainConfig.validate
    assert cli(["train", "--config", write_config(tmp_path, steps=0), "--out", str(tmp_path / "e")]) == 2
    assert "steps must be >= 1" in capsys.readouterr().err


# -- sample ----------------------------------------------------------------------------------------


def sample(run, out, *extra) -> int:
    return cli(["sample", "--checkpoint", str(run), "--num", "4", "--steps", "2", "--out", str(out), *extra])


def load_npy(path) -> np.ndarray:
    images = np.load(path)
    assert images.dtype == np.uint8
    assert images.shape == (4, 1, 8, 8)
    return images


def test_sample_png(run, tmp_path, capsys):
    out = tmp_path / "nested" / "x.png"
    assert sample(run, out) == 0
    assert f"wrote 4 samples to {out}" in capsys.readouterr().out
    with Image.open(out) as image:
        assert image.format == "PNG"
        image.load()
        assert min(image.size) >= 8


def test_sample_npy_is_deterministic_in_the_seed(run, tmp_path):
    assert sample(run, tmp_path / "a.npy") == 0
    assert sample(run, tmp_path / "b.npy") == 0
    assert sample(run, tmp_path / "c.npy", "--seed", "1") == 0
    a, b, c = (load_npy(tmp_path / f"{n}.npy") for n in "abc")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_sample_from_a_checkpoint_folder_and_raw_weights(run, tmp_path):
    checkpoint = io.resolve_checkpoint(run)
    assert sample(checkpoint, tmp_path / "a.npy") == 0
    assert sample(run, tmp_path / "b.npy") == 0
    assert np.array_equal(load_npy(tmp_path / "a.npy"), load_npy(tmp_path / "b.npy"))
    assert sample(run, tmp_path / "raw.npy", "--raw-weights") == 0
    load_npy(tmp_path / "raw.npy")


@pytest.mark.parametrize(
    "extra",
    [
        ("--sampler", "ddpm"),
        ("--class", "3"),
        ("--class", "0", "--guidance", "2.0"),
        ("--guidance", "1.5", "--sampler", "ddpm"),
        ("--eta", "1.0"),
    ],
)
def test_sample_options(run, tmp_path, extra):
    assert sample(run, tmp_path / "x.npy", *extra) == 0
    load_npy(tmp_path / "x.npy")


def test_sample_unconditional(unconditional_run, tmp_path, capsys):
    assert sample(unconditional_run, tmp_path / "x.npy") == 0
    load_npy(tmp_path / "x.npy")
    assert sample(unconditional_run, tmp_path / "y.npy", "--class", "1") == 2
    assert "not class-conditional" in capsys.readouterr().err
    assert sample(unconditional_run, tmp_path / "y.npy", "--guidance", "2") == 2
    assert "not class-conditional" in capsys.readouterr().err


def test_sample_bad_suffix(run, tmp_path, capsys):
    assert sample(run, tmp_path / "x.jpg") == 2
    assert "--out must end in .png or .npy" in capsys.readouterr().err
    assert not (tmp_path / "x.jpg").exists()


@pytest.mark.parametrize("label", ["10", "-1"])
def test_sample_class_out_of_range(run, tmp_path, label, capsys):
    assert sample(run, tmp_path / "x.npy", "--class", label) == 2
    assert "--class must be in [0, 10)" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_num_must_be_positive(run, tmp_path, capsys, command):
    extra = ["--out", str(tmp_path / "x.npy"), "--steps", "2"] if command == "sample" else ["--metric", "bpd"]
    try:
        code = cli([command, "--checkpoint", str(run), "--num", "0", *extra])
        message = capsys.readouterr().err
    except SystemExit as exc:  # argparse's usage error, or a SystemExit with a message
        code, message = exc.code, capsys.readouterr().err + str(exc.code)
    assert code not in (0, None)
    assert "--num" in message, message


def test_sample_too_many_ddim_steps_is_a_clean_error(run, tmp_path, capsys):
    code = cli(["sample", "--checkpoint", str(run), "--num", "2", "--out", str(tmp_path / "x.npy")])
    assert code == 2  # the default 50 DDIM steps exceed this model's 20 timesteps
    err = capsys.readouterr().err
    assert "steps must be in [1, 20]" in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_missing_checkpoint(tmp_path, capsys, command):
    missing = tmp_path / "no-such-run"
    extra = ["--out", str(tmp_path / "x.png")] if command == "sample" else ["--metric", "bpd"]
    assert cli([command, "--checkpoint", str(missing), *extra]) == 2
    captured = capsys.readouterr()
    assert f"minidiff {command}: error:" in captured.err and str(missing) in captured.err
    assert "Traceback" not in captured.err and captured.out == ""


def test_corrupt_checkpoint(run, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    weights = io.resolve_checkpoint(copy) / "ema.safetensors"
    weights.write_bytes(b"garbage")
    assert sample(copy, tmp_path / "x.npy") == 2
    err = capsys.readouterr().err
    assert "ema.safetensors" in err and "corrupt" in err and "Traceback" not in err


def test_missing_checkpoint_in_a_real_process(tmp_path):
    """The installed entry point: exit status 2 and a one-line message, no traceback."""
    code = (
        "import sys; from minidiff.cli import main; "
        f"sys.exit(main(['sample', '--checkpoint', {str(tmp_path / 'none')!r}, '--out', 'x.png']))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "Traceback" not in result.stderr
    # a usage error found by minidiff, not argparse, exits with argparse's status too
    code = code.replace("'x.png'", "'x.jpg'")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "minidiff sample: --out must end in .png or .npy, got x.jpg"


# -- eval ------------------------------------------------------------------------------------------


def test_eval_bpd(run, capsys):
    assert cli(["eval", "--checkpoint", str(run), "--metric", "bpd", "--num", "4", "--timesteps", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bits/dim ")
    assert re.search(r"over 4 [\w-]*\s*images, 3 timesteps", out), out
    total, prior, terms, decoder = numbers(out)[:4]
    assert all(np.isfinite([total, prior, terms, decoder]))
    assert total > 0 and prior >= 0
    assert total == pytest.approx(prior + terms + decoder, abs=2e-4)


def test_eval_fid(run, capsys, monkeypatch, private_cache):
    real_train = minidiff.metrics.train_classifier
    calls = []

    def one_epoch(*args, **kwargs):
        calls.append(kwargs)
        return real_train(*args, **{**kwargs, "epochs": 1})

    # wherever the eval command takes train_classifier from
    monkeypatch.setattr(minidiff.metrics, "train_classifier", one_epoch)
    evaluate = sys.modules.get("minidiff.train.evaluate")
    if evaluate is None:
        try:
            import minidiff.train.evaluate as evaluate
        except ImportError:
            evaluate = None
    if evaluate is not None and hasattr(evaluate, "train_classifier"):
        monkeypatch.setattr(evaluate, "train_classifier", one_epoch)
    assert cli(["eval", "--checkpoint", str(run), "--metric", "fid", "--num", "20", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert len(calls) == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith("FID (minidiff classifier features, not Inception)")
    fid, halves = numbers(lines[0])
    assert np.isfinite(fid) and fid > 0 and halves >= 0
    assert lines[1].startswith("mean classifier confidence")
    confidence = numbers(lines[1])[0]
    assert 0.1 <= confidence <= 1.0
    histogram = json.loads(lines[1].split("class histogram ")[1])
    assert len(histogram) == 10 and sum(histogram) == 20
    assert any(p.name.startswith("classifier-") for p in private_cache.iterdir())  # cached where told
