"""StableDiffusion.from_pretrained on tiny random folders that diffusers writes: the image
diffusers' StableDiffusionPipeline gives from the same latents, for every sampler and
prediction type, with and without a negative prompt; and the folders it refuses."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from sd_folders import clip_text_config, write_clip_tokenizer

from minidiff.pipelines import PipelineError, StableDiffusion

SD1_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    skip_prk_steps=True,
    steps_offset=1,
    set_alpha_to_one=False,
)


def build_folder(path, prediction_type="epsilon", seed=0):
    """A tiny Stable Diffusion folder (random weights) and the diffusers pipeline it holds."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    tokenizer_dir = write_clip_tokenizer(path / "_tokenizer", model_max_length=12)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=24,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**clip_text_config(tokenizer, 24, 37, heads=4)))
    scheduler = PNDMScheduler(**SD1_SCHEDULER, prediction_type=prediction_type)
    for model in (unet, vae, text_encoder):  # random weights away from the zero initialisations
        for p in model.parameters():
            p.data += 0.05 * torch.randn_like(p)
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path / "sd")
    # the oracle is the pipeline as diffusers loads the folder (a scheduler built in memory
    # records which keys took defaults, and another sampler made from its config takes those
    # keys' own defaults; one read from a file does not)
    pipe = StableDiffusionPipeline.from_pretrained(
        path / "sd", safety_checker=None, requires_safety_checker=False
    )
    pipe.set_progress_bar_config(disable=True)
    return path / "sd", pipe


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def folder_and_pipe(request, tmp_path_factory):
    return build_folder(tmp_path_factory.mktemp(request.param), prediction_type=request.param)


def diffusers_image(pipe, sampler, prompt, negative_prompt, latents, steps, guidance):
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    classes = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}
    pipe.scheduler = classes[sampler].from_config(pipe.scheduler.config)
    with torch.no_grad():
        out = pipe(
            prompt,
            negative_prompt=negative_prompt,
            num_inference_steps=steps,
            guidance_scale=guidance,
            latents=torch.tensor(latents),
            output_type="np",
        ).images
    return out.transpose(0, 3, 1, 2)  # (N, H, W, 3) -> (N, 3, H, W)


@pytest.mark.parametrize("sampler", ["pndm", "ddim", "euler"])
@pytest.mark.parametrize("negative", [None, ["a blue square", "red"]])
def test_the_image_is_diffusers_image(folder_and_pipe, sampler, negative):
    folder, pipe = folder_and_pipe
    prompts = ["a red circle", "the blue circle at the top"]
    latents = np.random.default_rng(1).standard_normal((2, 4, 8, 8)).astype(np.float32)
    expected = diffusers_image(pipe, sampler, prompts, negative, latents, steps=4, guidance=7.5)
    sd = StableDiffusion.from_pretrained(folder)
    got = sd(prompts, negative_prompt=negative, num_steps=4, guidance=7.5, latents=latents, sampler=sampler)
    assert got.shape == expected.shape == (2, 3, 16, 16) and got.dtype == np.float32
    assert np.ptp(expected) > 0.05  # the images are not flat: the comparison means something
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)


def test_without_guidance_and_from_a_seed(folder_and_pipe):
    folder, pipe = folder_and_pipe
    sd = StableDiffusion.from_pretrained(folder)
    latents = np.random.default_rng(3).standard_normal((1, 4, 8, 8)).astype(np.float32)
    expected = diffusers_image(pipe, "pndm", "a red circle", None, latents, steps=3, guidance=1.0)
    got = sd("a red circle", num_steps=3, guidance=1.0, latents=latents, sampler="pndm")
    np.testing.assert_allclose(got, expected, atol=2e-3, rtol=0)
    a = sd("a red circle", num_steps=2, seed=5)
    b = sd("a red circle", num_steps=2, seed=5)
    c = sd("a red circle", num_steps=2, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert sd("a red circle", num_steps=2, seed=5, height=24, width=32).shape == (1, 3, 24, 32)


def test_bad_folders_and_arguments(folder_and_pipe, tmp_path):
    folder, _ = folder_and_pipe
    with pytest.raises(PipelineError, match="no such folder"):
        StableDiffusion.from_pretrained(tmp_path / "absent")
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    (broken / "model_index.json").unlink()
    with pytest.raises(PipelineError, match=r"model_index\.json: missing"):
        StableDiffusion.from_pretrained(broken)
    index = json.loads((folder / "model_index.json").read_text())
    (broken / "model_index.json").write_text(json.dumps({**index, "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(PipelineError, match="unet is UNet2DModel; minidiff loads UNet2DConditionModel"):
        StableDiffusion.from_pretrained(broken)
    (broken / "model_index.json").write_text(json.dumps(index))
    shutil.rmtree(broken / "vae")
    with pytest.raises(PipelineError, match=r"vae: missing"):
        StableDiffusion.from_pretrained(broken)

    sd = StableDiffusion.from_pretrained(folder)
    with pytest.raises(PipelineError, match="prompt must be a string"):
        sd(3)
    with pytest.raises(PipelineError, match="negative_prompt: 1 prompts for 2 prompts"):
        sd(["a", "b"], negative_prompt=["c"])
    with pytest.raises(PipelineError, match="num_steps must be a positive integer"):
        sd("a", num_steps=0)
    with pytest.raises(PipelineError, match="guidance must be a finite number"):
        sd("a", guidance=float("nan"))
    with pytest.raises(PipelineError, match="height must be a positive multiple of 2"):
        sd("a", height=15)
    with pytest.raises(PipelineError, match=r"latents must be \(1, 4, h, w\)"):
        sd("a", latents=np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(PipelineError, match="eta applies to the DDIM sampler only"):
        sd("a", eta=0.5, sampler="euler")


def test_minidiff_sample_with_a_pipeline(folder_and_pipe, tmp_path):
    from minidiff.cli import main

    folder, _ = folder_and_pipe
    out = tmp_path / "fox.npy"
    args = ["sample", "--pipeline", str(folder), "--prompt", "a red circle", "--steps", "2", "--num", "2"]
    assert main([*args, "--seed", "4", "--sampler", "ddim", "--out", str(out)]) == 0
    images = np.load(out)
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.uint8
    expected = StableDiffusion.from_pretrained(folder)(
        ["a red circle"] * 2, num_steps=2, seed=4, sampler="ddim"
    )
    np.testing.assert_array_equal(images, np.clip(np.rint(expected * 255), 0, 255).astype(np.uint8))
    assert main([*args, "--out", str(tmp_path / "grid.png")]) == 0 and (tmp_path / "grid.png").is_file()
    with pytest.raises(SystemExit, match="--checkpoint .* or --pipeline"):
        main(["sample", "--out", str(out)])
    with pytest.raises(SystemExit, match="--pipeline needs --prompt"):
        main(["sample", "--pipeline", str(folder), "--out", str(out)])
    with pytest.raises(SystemExit, match="--prompt needs --pipeline"):
        main(["sample", "--checkpoint", str(folder), "--prompt", "x", "--out", str(out)])
