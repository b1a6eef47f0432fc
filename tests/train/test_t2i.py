"""Text to image from scratch (minidiff.train.t2i) on tiny models and step counts: the run folder
is a Stable Diffusion folder that minidiff and diffusers load to the same image; a run stopped in
either stage and resumed reaches the weights of an uninterrupted one; a non-finite loss stops it
keeping the last good checkpoint; the command line trains and samples it."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from minidiff.cli import main
from minidiff.data import to_uint8
from minidiff.data.shapes import WORDS
from minidiff.pipelines import StableDiffusion
from minidiff.train.t2i import AutoencoderStage, DenoiserStage, T2IConfig, T2ITrainer

TINY = dict(
    num_images=120,
    sample_every=1000,  # a report only at each stage's end
    checkpoint_every=2,
    sample_steps=2,
    log_every=1,
    autoencoder=dict(block_out_channels=[8, 16, 16], norm_num_groups=4, steps=3, batch_size=8),
    denoiser=dict(
        block_out_channels=[16, 32],
        norm_num_groups=8,
        text_width=16,
        text_heads=2,
        attention_heads=2,
        text_layers=1,
        steps=3,
        batch_size=8,
    ),
)


def tiny_config(**changes) -> T2IConfig:
    values = json.loads(json.dumps(TINY))
    for key, value in changes.items():
        if isinstance(value, dict):
            values[key].update(value)
        else:
            values[key] = value
    return T2IConfig.from_dict(values)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("t2i") / "run"
    result = T2ITrainer(tiny_config(), out, progress=False).fit()
    assert result == {"status": "finished", "stage": "denoiser", "step": 3, "out_dir": str(out)}
    return out


def test_the_run_folder_holds_every_stage(run):
    for name in (
        "model_index.json",
        "t2i_config.json",
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "scheduler",
    ):
        assert (run / name).exists(), name
    for stage in ("autoencoder", "denoiser"):
        assert (run / stage / "loss.png").is_file()
        steps = [line.split(",")[0] for line in (run / stage / "loss.csv").read_text().split()[1:]]
        assert steps == ["1", "2", "3"]
    report = json.loads((run / "autoencoder" / "report.json").read_text())
    assert report["kl_bits_per_dim"] == pytest.approx(report["kl_nats"] / (3 * 32 * 32 * np.log(2)))
    assert {"psnr", "reconstruction_nats", "negative_elbo_bits_per_dim"} <= set(report)
    assert (run / "autoencoder" / "reconstructions" / "step-00000003.png").is_file()
    assert (run / "denoiser" / "samples" / "step-00000003.png").is_file()
    assert (run / "denoiser" / "strips" / "step-00000003.png").is_file()
    # the scaling factor is 1 / std of the posterior samples (variance: that of the means plus
    # the mean variance), kept in the autoencoder's config
    with np.load(run / "autoencoder" / "latents.npz") as f:
        scale = float(f["scaling_factor"])
        variance = f["mean"].astype(np.float64).var() + (f["std"].astype(np.float64) ** 2).mean()
        assert scale == pytest.approx(1 / np.sqrt(variance), rel=0.01)
    assert json.loads((run / "vae" / "config.json").read_text())["scaling_factor"] == scale
    # the tokenizer spells every caption word as one token
    sd = StableDiffusion.from_pretrained(run)
    for word in WORDS:
        assert len(sd.tokenizer.encode(word)) == 3, word


def test_minidiff_and_diffusers_load_the_run_to_the_same_image(run):
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    sd = StableDiffusion.from_pretrained(run)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(
        run, safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    latents = np.random.default_rng(0).standard_normal((2, 4, 8, 8)).astype(np.float32)
    prompts = ["a small red circle at the top left", "a blue square"]
    ours = sd(prompts, num_steps=4, guidance=3.0, latents=latents)
    with torch.no_grad():
        theirs = pipe(
            prompts,
            num_inference_steps=4,
            guidance_scale=3.0,
            latents=torch.tensor(latents),
            output_type="np",
        ).images
    np.testing.assert_allclose(ours, theirs.transpose(0, 3, 1, 2), atol=1e-5)
    np.testing.assert_array_equal(
        pipe.tokenizer(prompts, padding="max_length", max_length=12, return_tensors="np").input_ids,
        sd.tokenizer(prompts),
    )


def _stop_after(cls, monkeypatch, step):
    """Make ``cls``'s training stop (as on Ctrl-C) once it reaches ``step``."""
    original = cls.train_step

    def train_step(self):
        value = original(self)
        if self.step == step:
            self._stop_requested = True
        return value

    monkeypatch.setattr(cls, "train_step", train_step)


def _weights(folder):
    return {
        **load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
        **load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")),
        **load_file(str(folder / "text_encoder" / "model.safetensors")),
    }


@pytest.mark.parametrize("stage", [AutoencoderStage, DenoiserStage])
def test_a_run_stopped_in_a_stage_and_resumed_matches_an_uninterrupted_one(run, tmp_path, monkeypatch, stage):
    with monkeypatch.context() as patch:
        _stop_after(stage, patch, 1)
        result = T2ITrainer(tiny_config(), tmp_path / "stopped", progress=False).fit()
    assert result["status"] == "interrupted" and result["stage"] == stage.name and result["step"] == 1
    result = T2ITrainer.resume(tmp_path / "stopped", progress=False).fit()
    assert result["status"] == "finished"
    expected, resumed = _weights(run), _weights(tmp_path / "stopped")
    assert expected.keys() == resumed.keys()
    for name in expected:
        np.testing.assert_array_equal(resumed[name], expected[name], err_msg=name)
    rows = (tmp_path / "stopped" / stage.name / "loss.csv").read_text()
    assert rows == (run / stage.name / "loss.csv").read_text()


def test_a_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    original = DenoiserStage.loss

    def loss(self):
        value = original(self)
        return value * float("nan") if self.step == 2 else value

    monkeypatch.setattr(DenoiserStage, "loss", loss)
    result = T2ITrainer(tiny_config(), tmp_path / "run", progress=False).fit()
    assert result == {"status": "diverged", "stage": "denoiser", "step": 2, "out_dir": str(tmp_path / "run")}
    latest = (tmp_path / "run" / "denoiser" / "checkpoints" / "LATEST").read_text().strip()
    assert latest == "step-00000002"
    StableDiffusion.from_pretrained(tmp_path / "run")  # the folder of the last good checkpoint


def test_a_resumed_run_refuses_a_different_config(run):
    with pytest.raises(ValueError, match="denoiser.lr"):
        T2ITrainer.resume(run, config={"denoiser": {"lr": 0.5}})
    with pytest.raises(ValueError, match="unknown denoiser keys"):
        T2IConfig.from_dict({"denoiser": {"width": 3}})
    with pytest.raises(ValueError, match="no captions"):
        T2ITrainer(tiny_config(dataset="folder:/nowhere"), "unused")


def test_the_command_line_trains_and_samples_from_a_prompt(run, tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(TINY))
    out = tmp_path / "cli"
    args = ["train", "--dataset", "shapes", "--config", str(config), "--out", str(out), "--quiet"]
    assert main([*args, "--steps", "2"]) == 0
    assert (out / "model_index.json").is_file()
    with pytest.raises(SystemExit, match="already holds a run"):
        main(args)
    # stopped at 2 steps of the denoiser, resumed to 3: the run of the fixture
    assert main(["train", "--out", str(out), "--resume", "--steps", "3", "--quiet"]) == 0
    expected = _weights(run)
    for name, value in _weights(out).items():
        np.testing.assert_array_equal(value, expected[name], err_msg=name)
    sample = tmp_path / "s.npy"
    prompt = "a small red circle at the top left"
    code = main(
        [
            "sample",
            "--checkpoint",
            str(out),
            "--prompt",
            prompt,
            "--num",
            "3",
            "--steps",
            "2",
            "--out",
            str(sample),
        ]
    )
    assert code == 0
    images = np.load(sample)
    assert images.dtype == np.uint8 and images.shape == (3, 3, 32, 32)
    # the default guidance is the run's
    pipe = StableDiffusion.from_pretrained(out)
    expected = pipe([prompt] * 3, num_steps=2, guidance=T2IConfig().guidance, seed=0)
    np.testing.assert_array_equal(images, to_uint8(expected * 2 - 1))
