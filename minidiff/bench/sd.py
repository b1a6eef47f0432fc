"""Stable Diffusion at full size: minidiff against diffusers on the same weights, side by side.

    python bench/sd.py                      # or, without the repository: minidiff bench --sd
    python bench/sd.py --parts unet --repeats 3
    python bench/sd.py --tiny               # small configs of the same blocks, in seconds

The SD v1.5 U-Net (block_out_channels 320, 640, 1280, 1280; 2 layers per block; 8 heads;
cross-attention over 768-wide text; 859,520,964 parameters), the SD v1.5 KL autoencoder's decoder
and the CLIP ViT-L/14 text encoder are built with random weights by diffusers and transformers and
saved as a folder; both frameworks then load that folder. Each part is timed on what the pipeline
gives it: the U-Net one forward at batch 2 (classifier-free guidance) on 4x64x64 latents with a
2x77x768 context, the decoder 4x64x64 latents to a 3x512x512 image, the text encoder 2x77 tokens;
and the self-attention of the 64x64 level alone (2 x 8 heads x 4096 x 40) against
PyTorch's scaled_dot_product_attention.
Every measurement runs in a fresh process (the median of --repeats runs after one warm-up), which
also gives its peak resident memory: loading the weights plus the forward. The two outputs are
compared, so a fast wrong answer shows. The wall time of one 512x512 image with N steps is put
together from the medians: the text encoder, N U-Net forwards, the decoder. Needs PyTorch (CPU
build), diffusers and transformers, and about 12 GiB of memory at full size.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from .harness import (
    command_parser,
    import_torch,
    positive_int,
    require_torch,
    torch_on_every_core,
    write_report,
)

PARTS = ("unet", "vae", "text", "attention")
REPEATS = 3

SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280],
    layers_per_block=2,
    attention_head_dim=8,
    cross_attention_dim=768,
    norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4,
    block_out_channels=[128, 256, 512, 512],
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
CLIP_L_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
)

# The same blocks, small: a run of seconds that exercises every code path above.
TINY_UNET = dict(
    SD15_UNET,
    sample_size=16,
    block_out_channels=[32, 64, 64, 64],
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
    norm_num_groups=8,
)
TINY_VAE = dict(SD15_VAE, block_out_channels=[16, 32, 32, 32], layers_per_block=1, norm_num_groups=8)
# The self-attention of the U-Net's 64x64 level: batch 2 x 8 heads, 4096 positions, 40 dims a head.
# (batch, heads, tokens, head dim) as diffusers calls it: PyTorch's fused CPU kernel takes the 4-D
# layout (a 3-D call runs its unfused path, about 6x slower).
ATTENTION = dict(batch=2, heads=8, tokens=4096, head_dim=40)
TINY_ATTENTION = dict(batch=1, heads=4, tokens=300, head_dim=8)
TINY_TEXT = dict(
    CLIP_L_TEXT,
    vocab_size=1000,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
)


def configs(tiny: bool) -> dict:
    if tiny:
        return {"unet": TINY_UNET, "vae": TINY_VAE, "text": TINY_TEXT, "attention": TINY_ATTENTION}
    return {"unet": SD15_UNET, "vae": SD15_VAE, "text": CLIP_L_TEXT, "attention": ATTENTION}


def inputs(part, config, seed=0) -> dict:
    """The arrays a part is timed on (float32; int64 token ids), as the pipeline gives them."""
    rng = np.random.default_rng(seed)
    if part == "unet":
        size, width = config["sample_size"], config["cross_attention_dim"]
        return {
            "sample": rng.standard_normal((2, 4, size, size)).astype(np.float32),
            "context": rng.standard_normal((2, 77, width)).astype(np.float32),
        }
    if part == "vae":
        latent = config["sample_size"] // 2 ** (len(config["block_out_channels"]) - 1)
        return {
            "latents": rng.standard_normal((1, config["latent_channels"], latent, latent)).astype(np.float32)
        }
    if part == "attention":
        shape = (config["batch"], config["heads"], config["tokens"], config["head_dim"])
        return {name: rng.standard_normal(shape).astype(np.float32) for name in ("q", "k", "v")}
    return {"ids": rng.integers(0, config["vocab_size"], (2, config["max_position_embeddings"]))}


TIMESTEP = 500


def build_folder(part, config, folder) -> None:
    """Random weights from diffusers / transformers (seeded), saved as float32 safetensors (the
    attention part has no weights)."""
    import torch

    if part == "attention":
        return

    torch.manual_seed(0)
    if part == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel(**config)
    elif part == "vae":
        from diffusers import AutoencoderKL

        model = AutoencoderKL(**config)
    else:
        from transformers import CLIPTextConfig, CLIPTextModel

        model = CLIPTextModel(CLIPTextConfig(**config))
    model.save_pretrained(folder, safe_serialization=True)


def _rss_mb() -> float:
    """This process's resident memory now (MiB), from /proc where there is one."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def _median_seconds(fn, repeats) -> tuple[float, list]:
    fn()  # warm-up: JIT caches, allocator pools, first-touch of the weights
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), times


def _minidiff_forward(part, folder, arrays):
    import minidiff
    from minidiff.models import AutoencoderKL, CLIPTextModel, UNet2DConditionModel

    if part == "unet":
        model = UNet2DConditionModel.from_pretrained(folder)
        x, context = minidiff.tensor(arrays["sample"]), minidiff.tensor(arrays["context"])
        t = np.full(2, TIMESTEP)
        return lambda: model(x, t, context).data
    if part == "vae":
        model = AutoencoderKL.from_pretrained(folder)
        z = minidiff.tensor(arrays["latents"])
        return lambda: model.decode(z).data
    if part == "attention":
        from minidiff import functional as F

        q, k, v = (minidiff.tensor(arrays[name]) for name in ("q", "k", "v"))
        return lambda: F.scaled_dot_product_attention(q, k, v).data
    model = CLIPTextModel.from_pretrained(folder)
    return lambda: model(arrays["ids"]).data


def _torch_forward(part, folder, arrays):
    import torch

    if part == "unet":
        from diffusers import UNet2DConditionModel

        model = UNet2DConditionModel.from_pretrained(folder).eval()
        x, context = torch.from_numpy(arrays["sample"]), torch.from_numpy(arrays["context"])
        t = torch.full((2,), TIMESTEP)
        return lambda: model(x, t, context).sample.numpy()
    if part == "vae":
        from diffusers import AutoencoderKL

        model = AutoencoderKL.from_pretrained(folder).eval()
        z = torch.from_numpy(arrays["latents"])
        return lambda: model.decode(z).sample.numpy()
    if part == "attention":
        q, k, v = (torch.from_numpy(arrays[name]) for name in ("q", "k", "v"))
        return lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v).numpy()
    from transformers import CLIPTextModel

    model = CLIPTextModel.from_pretrained(folder).eval()
    ids = torch.from_numpy(arrays["ids"])
    return lambda: model(ids).last_hidden_state.numpy()


def measure(framework, part, folder, tiny, repeats, out_file) -> dict:
    """One part in one framework, in this (fresh) process; its output is saved to ``out_file``."""
    arrays = inputs(part, configs(tiny)[part])
    torch = import_torch() if framework == "torch" else None
    with torch_on_every_core(torch):
        if torch is not None:
            with torch.no_grad():
                forward = _torch_forward(part, folder, arrays)
        else:
            forward = _minidiff_forward(part, folder, arrays)
        loaded_mb = _rss_mb()
        if torch is not None:
            with torch.no_grad():
                seconds, times = _median_seconds(forward, repeats)
                output = forward()
        else:
            import minidiff

            with minidiff.no_grad():
                seconds, times = _median_seconds(forward, repeats)
                output = forward()
    np.save(out_file, np.asarray(output, dtype=np.float32))
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"seconds": seconds, "times": times, "loaded_mb": loaded_mb, "peak_mb": peak_mb}


# -c, not -m minidiff.bench.sd: -m would run this module a second time beside the copy its
# package imports.
WORKER = "import sys; from minidiff.bench.sd import main; sys.exit(main())"


def _subprocess(args: list) -> dict:
    out = subprocess.run([sys.executable, "-c", WORKER, *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the benchmark process {args[:3]} failed:\n{out.stderr.strip()[-3000:]}")
    lines = out.stdout.strip().splitlines()
    return json.loads(lines[-1]) if lines else {}


def run(parts, tiny, repeats, steps) -> dict:
    """Build each part's folder, time it in both frameworks, compare the outputs; the report."""
    torch = require_torch(
        "the Stable Diffusion benchmark compares against diffusers on PyTorch",
        "torch==2.13.0 diffusers transformers",
    )
    results = {}
    with tempfile.TemporaryDirectory(prefix="minidiff-bench-sd-") as tmp:
        for part in parts:
            folder = Path(tmp) / part
            _subprocess(["--build", part, "--folder", str(folder), *(["--tiny"] if tiny else [])])
            row = {}
            for framework in ("torch", "minidiff"):
                out_file = Path(tmp) / f"{part}-{framework}.npy"
                args = ["--worker", framework, "--part", part, "--folder", str(folder)]
                args += [
                    "--repeats",
                    str(repeats),
                    "--out-file",
                    str(out_file),
                    *(["--tiny"] if tiny else []),
                ]
                row[framework] = _subprocess(args)
            ours, theirs = (np.load(Path(tmp) / f"{part}-{fw}.npy") for fw in ("minidiff", "torch"))
            row["max_abs_diff"] = float(np.max(np.abs(ours - theirs)))
            row["max_abs_theirs"] = float(np.max(np.abs(theirs)))
            row["time_ratio"] = row["minidiff"]["seconds"] / row["torch"]["seconds"]
            row["peak_ratio"] = row["minidiff"]["peak_mb"] / row["torch"]["peak_mb"]
            results[part] = row
            shutil.rmtree(folder, ignore_errors=True)  # a full-size U-Net folder is 3.4 GB
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "tiny": tiny,
        "repeats": repeats,
        "results": results,
    }
    if {"unet", "vae", "text"} <= set(results):
        report["image"] = {
            fw: results["text"][fw]["seconds"]
            + steps * results["unet"][fw]["seconds"]
            + results["vae"][fw]["seconds"]
            for fw in ("minidiff", "torch")
        }
        report["image"]["steps"] = steps
    return report


def describe(part, config) -> str:
    """What a part's row times, in the shapes it is given."""
    shapes = {name: "x".join(map(str, a.shape)) for name, a in inputs(part, config).items()}
    if part == "unet":
        return f"U-Net forward, {shapes['sample']} + {shapes['context']}"
    if part == "vae":
        side = config["sample_size"]
        return f"VAE decode, {shapes['latents']} -> 1x3x{side}x{side}"
    if part == "attention":
        return f"self-attention, q k v {shapes['q']}"
    return f"CLIP text encoder, {shapes['ids']} tokens"


def format_report(report) -> str:
    size = "tiny configs" if report["tiny"] else "full size (SD v1.5)"
    lines = [
        f"Stable Diffusion {size}, {report['date']}, {report['machine']}, torch {report['torch']}; "
        f"median of {report['repeats']} after a warm-up; peak: resident memory of the process "
        "(weights loaded + forward)",
        f"{'':<44}{'minidiff s':>11}{'PyTorch s':>11}{'ratio':>7}{'minidiff MiB':>14}{'PyTorch MiB':>13}"
        f"{'ratio':>7}{'max |diff|':>12}",
    ]
    for part, r in report["results"].items():
        md, pt = r["minidiff"], r["torch"]
        lines.append(
            f"{describe(part, configs(report['tiny'])[part]):<44}{md['seconds']:>11.3f}"
            f"{pt['seconds']:>11.3f}{r['time_ratio']:>7.2f}"
            f"{md['peak_mb']:>14.0f}{pt['peak_mb']:>13.0f}{r['peak_ratio']:>7.2f}"
            f"{r['max_abs_diff']:>12.2e}"
        )
    if "image" in report:
        im = report["image"]
        lines.append(
            f"one image, text + {im['steps']} U-Net forwards + decode: minidiff {im['minidiff']:.1f} s, "
            f"PyTorch {im['torch']:.1f} s ({im['minidiff'] / im['torch']:.2f})"
        )
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser, *, repeats_and_json=True, default_json=None) -> None:
    group = parser.add_argument_group("the Stable Diffusion benchmark")
    group.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="(default: all four)")
    group.add_argument("--tiny", action="store_true", help="small configs of the same blocks (seconds)")
    group.add_argument(
        "--image-steps", type=positive_int, default=25, help="steps of the one-image estimate (default 25)"
    )
    if repeats_and_json:
        group.add_argument(
            "--repeats", type=positive_int, default=REPEATS, help=f"timed runs per part (default {REPEATS})"
        )
        group.add_argument(
            "--json", default=default_json, help=f"where to write the JSON (default: {default_json})"
        )


def run_from_args(args, default_json="minidiff-bench-sd.json") -> int:
    report = run(args.parts, args.tiny, args.repeats or REPEATS, args.image_steps)
    write_report(report, args.json or default_json, format_report(report))
    return 0


def main(argv=None, *, prog=None, default_json="minidiff-bench-sd.json") -> int:
    options = command_parser(prog, __doc__)
    add_arguments(options, default_json=default_json)
    for hidden in ("--worker", "--build", "--part", "--folder", "--out-file"):
        options.add_argument(hidden, help=argparse.SUPPRESS)
    args = options.parse_args(argv)
    if args.build:
        build_folder(args.build, configs(args.tiny)[args.build], args.folder)
        return 0
    if args.worker:  # one framework's measurement, as the last line of stdout
        result = measure(args.worker, args.part, args.folder, args.tiny, args.repeats, args.out_file)
        print(json.dumps(result))
        return 0
    try:
        return run_from_args(args, default_json)
    except RuntimeError as exc:
        options.exit(1, f"{options.prog}: {exc}\n")
