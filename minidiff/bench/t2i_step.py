"""The text-to-image training steps: minidiff against the same architecture in diffusers/PyTorch.

    python -m minidiff.bench.t2i_step        # the defaults of minidiff train --dataset shapes

Two steps, each forward, backward and AdamW: the latent step (the text encoder and the
conditional U-Net on a batch of 4x8x8 latents and token ids) and the autoencoder step (encode,
sample the posterior, decode, squared error plus KL). The PyTorch side is diffusers'
UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel loaded from the folders
minidiff's save_pretrained writes, so the two run the same architecture with the same weights.
The frameworks alternate for --rounds rounds in one process; each round times --repeats steps of
each (the median), and the ratio printed is the median of the rounds' ratios minidiff / PyTorch
(below 1: minidiff is faster). On a shared machine absolute times are inflated; the ratio of
back-to-back runs much less so.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from minidiff import functional as F
from minidiff.data.shapes import WORDS
from minidiff.models import CLIPTokenizer
from minidiff.models.tokenizer import write_clip_tokenizer
from minidiff.optim import AdamW
from minidiff.tensor import tensor
from minidiff.train.t2i import T2IConfig, build_autoencoder, build_text_encoder, build_unet


def _median(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def steps(config: T2IConfig, folder: Path, seed=0):
    """{name: (minidiff step, torch step)} for the latent and the autoencoder steps."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(seed)
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(folder / "tokenizer", WORDS, 12))
    text = build_text_encoder(config, tokenizer, rng)
    unet = build_unet(config, 8, rng)
    vae = build_autoencoder(config, 3, 32, rng)
    for name, model in (("text_encoder", text), ("unet", unet), ("vae", vae)):
        model.save_pretrained(folder / name)
    t_text = CLIPTextModel.from_pretrained(folder / "text_encoder")
    t_unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    t_vae = AutoencoderKL.from_pretrained(folder / "vae")
    for model in (t_text, t_unet, t_vae):
        model.train()

    d, a = config.denoiser, config.autoencoder
    ids = rng.integers(0, tokenizer.vocab_size, (d.batch_size, d.max_length))
    latents = rng.standard_normal((d.batch_size, 4, 8, 8)).astype(np.float32)
    noise = rng.standard_normal(latents.shape).astype(np.float32)
    t = rng.integers(0, 1000, d.batch_size)
    images = rng.uniform(-1, 1, (a.batch_size, 3, 32, 32)).astype(np.float32)
    eps = rng.standard_normal((a.batch_size, 4, 8, 8)).astype(np.float32)

    ours_latent = AdamW(text.parameters() + unet.parameters(), lr=1e-4, weight_decay=0.0)
    ours_vae = AdamW(vae.parameters(), lr=1e-4, weight_decay=0.0)
    theirs_latent = torch.optim.AdamW([*t_text.parameters(), *t_unet.parameters()], lr=1e-4, weight_decay=0.0)
    theirs_vae = torch.optim.AdamW(t_vae.parameters(), lr=1e-4, weight_decay=0.0)

    def ours_latent_step():
        loss = F.mse_loss(unet(tensor(latents), t, text(ids)), tensor(noise))
        ours_latent.zero_grad()
        loss.backward()
        ours_latent.step()

    def theirs_latent_step():
        context = t_text(torch.tensor(ids)).last_hidden_state
        out = t_unet(torch.tensor(latents), torch.tensor(t), context).sample
        loss = torch.nn.functional.mse_loss(out, torch.tensor(noise))
        theirs_latent.zero_grad()
        loss.backward()
        theirs_latent.step()

    def ours_vae_step():
        x = tensor(images)
        posterior = vae.encode(x)
        z = posterior.mean + posterior.std * tensor(eps)
        loss = F.mse_loss(vae.decode(z), x) + 1e-6 * F.mean(posterior.kl())
        ours_vae.zero_grad()
        loss.backward()
        ours_vae.step()

    def theirs_vae_step():
        x = torch.tensor(images)
        posterior = t_vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.tensor(eps)
        loss = torch.nn.functional.mse_loss(t_vae.decode(z).sample, x) + 1e-6 * posterior.kl().mean()
        theirs_vae.zero_grad()
        loss.backward()
        theirs_vae.step()

    return {
        f"latent step (text encoder + U-Net, batch {d.batch_size})": (ours_latent_step, theirs_latent_step),
        f"autoencoder step (batch {a.batch_size})": (ours_vae_step, theirs_vae_step),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench/t2i_step.json")
    args = parser.parse_args(argv)
    config = T2IConfig()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (ours, theirs) in steps(config, Path(tmp)).items():
            ours(), theirs()  # warm-up: JIT compilation, allocator
            pairs = [(_median(ours, args.repeats), _median(theirs, args.repeats)) for _ in range(args.rounds)]
            ratio = float(np.median([o / t for o, t in pairs]))
            rows.append(
                {
                    "step": name,
                    "minidiff_ms": 1e3 * float(np.median([o for o, _ in pairs])),
                    "torch_ms": 1e3 * float(np.median([t for _, t in pairs])),
                    "ratio": ratio,
                }
            )
    machine = f"{platform.machine()} {platform.processor() or ''}, {os.cpu_count()} cores".strip()
    print(f"{datetime.date.today().isoformat()}, {machine}; median of {args.rounds} rounds x {args.repeats}")
    print(f"{'step':<48} {'minidiff ms':>12} {'PyTorch ms':>11} {'ratio':>6}")
    for row in rows:
        print(f"{row['step']:<48} {row['minidiff_ms']:>12.1f} {row['torch_ms']:>11.1f} {row['ratio']:>6.2f}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps({"date": datetime.date.today().isoformat(), "machine": machine, "rows": rows}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
