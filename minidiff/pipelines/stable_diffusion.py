"""Stable Diffusion, text to image (Rombach et al. 2022), from a folder in diffusers' layout.

    prompt ──tokenizer──▶ ids ──text_encoder──▶ context (N, 77, D) ──────────────┐
    noise (N, 4, h, w) × init_noise_sigma ─▶ for t in the sampler's timesteps:   │
        eps = unet(scale_model_input(latents, t), t, context)  ◀─────────────────┘
        (guidance: the unconditional and conditional halves as one batch of 2N,
         eps = eps_uncond + guidance (eps_text - eps_uncond))
        latents = scheduler.step(eps, t, latents)
    image = vae.decode(latents / scaling_factor) / 2 + 1/2, clipped to [0, 1]

Every step is the one diffusers' StableDiffusionPipeline takes, so given the same initial
latents the image is the one diffusers gives.
"""

from __future__ import annotations

import pathlib

import numpy as np

from .. import no_grad
from ..backend import Device
from ..diffusion import DDIMScheduler, load_scheduler, make_scheduler
from ..models import AutoencoderKL, CLIPTextModel, CLIPTokenizer, UNet2DConditionModel
from ..nn.pretrained import DIFFUSERS_VERSION, PretrainedError, read_config, write_config
from ..tensor import Tensor

# model_index.json component -> the classes of that name minidiff loads
COMPONENTS = {
    "unet": ("UNet2DConditionModel",),
    "vae": ("AutoencoderKL",),
    "text_encoder": ("CLIPTextModel",),
    "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    "scheduler": ("DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler"),
}
# components a folder may name that image generation does not need
IGNORED = ("safety_checker", "feature_extractor", "image_encoder")


class PipelineError(PretrainedError):
    """A pipeline folder that cannot be loaded or a call that cannot run; the message names the
    file, the component or the argument."""


def read_model_index(folder) -> dict:
    """The components of a diffusers pipeline folder: model_index.json, checked."""
    folder = pathlib.Path(folder)
    path = folder / "model_index.json"
    try:
        index = read_config(folder, "model_index.json")
    except PretrainedError as e:
        raise PipelineError(str(e)) from None
    for name, classes in COMPONENTS.items():
        entry = index.get(name)
        if not (isinstance(entry, list) and len(entry) == 2):
            raise PipelineError(f"{path}: no {name} component (expected [library, class])")
        if entry[1] not in classes:
            raise PipelineError(f"{path}: {name} is {entry[1]}; minidiff loads {' or '.join(classes)}")
        if not (folder / name).is_dir():
            raise PipelineError(f"{folder / name}: missing (model_index.json names it)")
    return index


def model_index(scheduler="DDIMScheduler") -> dict:
    """The model_index.json of a Stable Diffusion folder with the five components minidiff
    loads, without a safety checker."""
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


class StableDiffusion:
    """Text-to-image with a U-Net denoising the latents of a KL autoencoder, conditioned on a
    CLIP text encoder's last hidden state through cross-attention."""

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        self.unet, self.vae = unet, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler = scheduler
        for model in (unet, vae, text_encoder):
            model.eval()

    @classmethod
    def from_pretrained(cls, folder, dtype=None, device=None, variant=None) -> StableDiffusion:
        """Load a Stable Diffusion folder in diffusers' layout (model_index.json, unet/, vae/,
        text_encoder/, tokenizer/, scheduler/; weights in safetensors), in ``dtype`` (float32
        by default) on ``device`` ("cpu" by default, or "cuda")."""
        folder = pathlib.Path(folder)
        read_model_index(folder)
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype, variant=variant)
        vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, variant=variant)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, variant=variant)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = load_scheduler(folder / "scheduler")
        pipe = cls(unet, vae, text_encoder, tokenizer, scheduler)
        return pipe.to(device) if device is not None else pipe

    def save_pretrained(self, folder, tokenizer_folder=None) -> pathlib.Path:
        """Write ``folder`` in diffusers' layout, which ``from_pretrained`` and diffusers'
        ``StableDiffusionPipeline.from_pretrained`` load: model_index.json and unet/, vae/,
        text_encoder/, scheduler/; tokenizer/ is copied from ``tokenizer_folder`` (the files the
        tokenizer was loaded from, e.g. written by ``write_clip_tokenizer``) unless it is there."""
        import shutil

        folder = pathlib.Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(folder / "unet")
        self.vae.save_pretrained(folder / "vae")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.scheduler.save_pretrained(folder / "scheduler")
        if tokenizer_folder is not None and pathlib.Path(tokenizer_folder) != folder / "tokenizer":
            shutil.copytree(tokenizer_folder, folder / "tokenizer", dirs_exist_ok=True)
        if not (folder / "tokenizer").is_dir():
            raise PipelineError(f"{folder / 'tokenizer'}: missing; pass tokenizer_folder")
        write_config(folder, model_index(type(self.scheduler).__name__), "model_index.json")
        return folder

    def to(self, device) -> StableDiffusion:
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(device)
        return self

    @property
    def device(self) -> Device:
        return next(iter(self.unet.parameters())).device

    @property
    def dtype(self):
        return next(iter(self.unet.parameters())).dtype

    def encode_prompt(self, prompts: list[str]) -> Tensor:
        """The text encoder's last hidden state (N, L, D) for each prompt."""
        ids = self.tokenizer(prompts)
        context = self.text_encoder(ids)
        return context if context.dtype == self.dtype else context.to(dtype=self.dtype)

    def sampler_for(self, sampler) -> object:
        """The folder's scheduler, or ``sampler`` ("ddim", "pndm", "euler") built from its config."""
        if sampler is None:
            return self.scheduler
        return make_scheduler(sampler, self.scheduler.config)

    def __call__(
        self,
        prompt,
        negative_prompt=None,
        num_steps=50,
        guidance=7.5,
        seed=0,
        latents=None,
        height=None,
        width=None,
        sampler=None,
        eta=0.0,
        progress=False,
    ) -> np.ndarray:
        """Images for ``prompt`` (a string or a list): float32 (N, 3, H, W) in [0, 1].

        ``latents`` is the initial noise, standard normal (N, 4, h, w) (drawn from ``seed``
        when None); it is scaled by the sampler's initial sigma here, as diffusers does.
        ``guidance`` > 1 runs classifier-free guidance against ``negative_prompt`` (the empty
        prompt when None). ``sampler`` overrides the folder's scheduler; ``eta`` > 0 (DDIM)
        adds noise at each step, drawn from ``seed`` too."""
        prompts = _prompts(prompt, "prompt")
        n = len(prompts)
        negatives = [""] * n if negative_prompt is None else _prompts(negative_prompt, "negative_prompt")
        if len(negatives) != n:
            raise PipelineError(f"negative_prompt: {len(negatives)} prompts for {n} prompts")
        if not isinstance(num_steps, (int, np.integer)) or num_steps < 1:
            raise PipelineError(f"num_steps must be a positive integer, got {num_steps!r}")
        if not np.isfinite(guidance):
            raise PipelineError(f"guidance must be a finite number, got {guidance!r}")
        rng = np.random.default_rng(seed)
        latents = self._initial_latents(n, rng, latents, height, width)
        scheduler = self.sampler_for(sampler)
        if eta and not isinstance(scheduler, DDIMScheduler):
            raise PipelineError(f"eta applies to the DDIM sampler only, not {type(scheduler).__name__}")
        scheduler.set_timesteps(num_steps)
        xp = self.device.xp
        guided = guidance > 1.0
        with no_grad():
            context = self.encode_prompt(prompts)
            if guided:
                uncond = self.encode_prompt(negatives)
                context = Tensor.from_array(xp.concatenate([uncond.data, context.data]))
            latents = latents * scheduler.init_noise_sigma
            steps = scheduler.timesteps
            if progress:
                from tqdm import tqdm

                steps = tqdm(steps, desc="denoising", unit="step")
            for t in steps:
                model_input = xp.concatenate([latents, latents]) if guided else latents
                model_input = scheduler.scale_model_input(model_input, t)
                eps = self.unet(Tensor.from_array(model_input), t, context).data
                if guided:
                    eps_uncond, eps_text = eps[:n], eps[n:]
                    eps = eps_uncond + guidance * (eps_text - eps_uncond)
                if eta:
                    latents = scheduler.step(eps, t, latents, eta=eta, rng=rng)
                else:
                    latents = scheduler.step(eps, t, latents)
            image = self.vae.decode(Tensor.from_array(latents / self.vae.scaling_factor)).data
        image = xp.clip(image / 2 + 0.5, 0.0, 1.0).astype(np.float32)
        if not bool(xp.isfinite(image).all()):
            raise PipelineError("the sampled images hold non-finite values (NaN or inf weights or latents?)")
        return image if xp is np else xp.asnumpy(image)

    def _initial_latents(self, n, rng, latents, height, width):
        xp, dtype = self.device.xp, self.dtype
        c = self.unet.in_channels
        scale = self.vae.scale_factor
        if latents is not None:
            latents = np.asarray(latents) if not hasattr(latents, "__cuda_array_interface__") else latents
            if latents.ndim != 4 or latents.shape[:2] != (n, c):
                raise PipelineError(f"latents must be ({n}, {c}, h, w) for {n} prompts, got {latents.shape}")
            return xp.asarray(latents, dtype=dtype)
        height = self.unet.sample_size * scale if height is None else height
        width = self.unet.sample_size * scale if width is None else width
        for name, value in (("height", height), ("width", width)):
            if not isinstance(value, (int, np.integer)) or value <= 0 or value % scale:
                raise PipelineError(f"{name} must be a positive multiple of {scale}, got {value!r}")
        noise = rng.standard_normal((n, c, height // scale, width // scale))
        return xp.asarray(noise, dtype=dtype)


def _prompts(value, name) -> list[str]:
    prompts = [value] if isinstance(value, str) else value
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise PipelineError(f"{name} must be a string or a non-empty list of strings, got {value!r}")
    return list(prompts)
