"""The U-Net training step and sampling forward pass: minidiff against PyTorch.

    python bench/unet.py                     # or, without the repository: minidiff bench --unet
    python bench/unet.py --batch 64 --image-size 16 --mults 1 2

The same architecture on both sides (minidiff.testing.torch_unet, written independently; parameter
counts are checked equal), the same batch: the median of repeated runs after warm-up, and the
ratio minidiff / PyTorch (below 1 means minidiff is faster). Each framework runs in a fresh
subprocess, which also gives its peak resident memory during training. Both subprocesses import
minidiff, so PyTorch runs under the process settings minidiff applies (minidiff.runtime: the
allocator keeps freed memory, OpenMP workers spin briefly; PyTorch shares the OpenMP runtime the
native kernels loaded): they make its training step a few percent faster than in a process of
its own, its sampling pass about as fast (bench/RESULTS.md), so the ratio does not flatter
minidiff. A shared machine's speed drifts over seconds to minutes, so the two alternate for
--rounds rounds, and the ratio printed is the median of the rounds' ratios (each round's pair ran
back to back). The default model is UNet(1, 32, (1, 2, 2), 1, (8,), 32, norm_groups=8) at batch
32. Needs PyTorch (CPU build).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys

import numpy as np

from .harness import (
    command_parser,
    import_torch,
    median_seconds,
    positive_int,
    require_torch,
    torch_on_every_core,
    write_report,
)

REPEATS = 5  # timed runs per measurement, by default


def unet_config(channels=32, mults=(1, 2, 2), image_size=32, norm_groups=8) -> dict:
    """The benchmarked model's keyword arguments (one input channel, one residual block per
    level, attention at 8x8)."""
    return dict(
        in_channels=1,
        base_channels=channels,
        channel_mults=tuple(mults),
        num_res_blocks=1,
        attn_resolutions=(8,),
        image_size=image_size,
        norm_groups=norm_groups,
    )


def make_steps(framework, cfg, batch, seed=0, device="cpu"):
    """(train_step, sample_forward, parameter count) for one framework, on ``device`` ("cpu" or
    "cuda"; on "cuda" each step waits for the device to finish)."""
    rng = np.random.default_rng(seed)
    size, channels = cfg["image_size"], cfg["in_channels"]
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    target = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    if framework == "minidiff":
        import minidiff
        from minidiff import functional as F
        from minidiff.optim import Adam

        model = minidiff.models.UNet(**cfg).to(device)
        opt = Adam(model.parameters(), lr=1e-4)
        xt, tt = minidiff.tensor(x, device=device), minidiff.tensor(target, device=device)
        sync = minidiff.Device(device).xp.cuda.Device().synchronize if device != "cpu" else lambda: None

        def train_step():
            loss = F.mse_loss(model(xt, t), tt)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sync()

        def sample_forward():
            with minidiff.no_grad():
                model(xt, t)
            sync()

        return train_step, sample_forward, model.num_parameters()

    import torch

    from minidiff.testing.torch_unet import TorchUNet

    model = TorchUNet(**cfg).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xt, tt, t_t = (torch.from_numpy(a).to(device) for a in (x, target, t))
    sync = torch.cuda.synchronize if device != "cpu" else lambda: None

    def train_step():
        loss = ((model(xt, t_t) - tt) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sync()

    def sample_forward():
        with torch.no_grad():
            model(xt, t_t)
        sync()

    return train_step, sample_forward, sum(p.numel() for p in model.parameters())


def measure(framework, cfg, batch, repeats) -> dict:
    """Time the training step and the sampling forward pass; the peak resident memory
    of this process (it runs nothing else) is that of the training steps."""
    import resource

    with torch_on_every_core(import_torch() if framework == "torch" else None):
        train_step, sample_forward, params = make_steps(framework, cfg, batch)
        result = {"params": params, "train_ms": 1e3 * median_seconds(train_step, repeats)}
        result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result["sample_ms"] = 1e3 * median_seconds(sample_forward, repeats)
    return result


# -c, not -m minidiff.bench.unet: -m would run this module a second time beside the copy its
# package imports.
WORKER = "import sys; from minidiff.bench.unet import main; sys.exit(main())"


def measure_in_subprocess(framework, cfg, batch, repeats) -> dict:
    """Each framework in a fresh process: its own threads, its own peak memory."""
    command = [sys.executable, "-c", WORKER, "--worker", framework]
    out = subprocess.run(
        [*command, "--worker-args", json.dumps([cfg, batch, repeats])], capture_output=True, text=True
    )
    if out.returncode != 0:
        raise RuntimeError(f"the {framework} U-Net benchmark process failed:\n{out.stderr.strip()}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(cfg, batch, repeats, rounds) -> dict:
    """Alternate the two frameworks for ``rounds`` rounds; the report (JSON-ready)."""
    torch = require_torch("the U-Net benchmark compares against PyTorch")
    per_round = [
        {fw: measure_in_subprocess(fw, cfg, batch, repeats) for fw in ("minidiff", "torch")}
        for _ in range(rounds)
    ]
    if per_round[0]["minidiff"]["params"] != per_round[0]["torch"]["params"]:
        raise RuntimeError(f"the two models' parameter counts differ: {per_round[0]}")
    keys = ("train_ms", "sample_ms", "peak_mb")
    results = {}
    for fw in ("minidiff", "torch"):
        results[fw] = {"params": per_round[0][fw]["params"]}
        results[fw] |= {k: float(np.median([r[fw][k] for r in per_round])) for k in keys}
    ratios = {k: float(np.median([r["minidiff"][k] / r["torch"][k] for r in per_round])) for k in keys}
    return {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {**cfg, "batch": batch},
        "repeats": repeats,
        "torch": torch.__version__,
        "results": results,
        "ratios": ratios,
        "rounds": per_round,
    }


def format_report(report) -> str:
    cfg, md, pt = report["config"], report["results"]["minidiff"], report["results"]["torch"]
    args = ", ".join(str(cfg[k]) for k in ("in_channels", "base_channels", "channel_mults", "num_res_blocks"))
    lines = [
        f"UNet({args}, {cfg['attn_resolutions']}, {cfg['image_size']}, norm_groups={cfg['norm_groups']}) "
        f"batch {cfg['batch']}, {md['params']:,} parameters, median of {report['repeats']} per run, "
        f"{len(report['rounds'])} alternating rounds"
    ]
    for name, key in (("training step (ms)", "train_ms"), ("sampling forward (ms)", "sample_ms")):
        pairs = " ".join(f"{r['minidiff'][key]:.0f}/{r['torch'][key]:.0f}" for r in report["rounds"])
        lines.append(f"  {name:<24} rounds (minidiff/PyTorch): {pairs}")
    lines.append(f"{'':<26}{'minidiff':>12}{'PyTorch':>12}{'ratio':>8}")
    rows = (
        ("training step (ms)", "train_ms"),
        ("sampling forward (ms)", "sample_ms"),
        ("peak memory, train (MiB)", "peak_mb"),
    )
    for name, key in rows:
        lines.append(f"{name:<26}{md[key]:>12.1f}{pt[key]:>12.1f}{report['ratios'][key]:>8.2f}")
    return "\n".join(lines)


# The model and schedule options and their defaults (the default config at batch 32).
OPTION_DEFAULTS = dict(batch=32, image_size=32, channels=32, mults=[1, 2, 2], norm_groups=8, rounds=3)


def add_arguments(parser: argparse.ArgumentParser, *, repeats_and_json=True, default_json=None) -> None:
    """The model and schedule options (``--repeats`` and ``--json`` too unless the parser has
    them already, as ``minidiff bench`` does)."""
    d = OPTION_DEFAULTS
    group = parser.add_argument_group("the U-Net benchmark")
    group.add_argument("--batch", type=positive_int, default=d["batch"], help="images per step (default 32)")
    group.add_argument("--image-size", type=positive_int, default=d["image_size"], help="(default 32)")
    group.add_argument(
        "--channels", type=positive_int, default=d["channels"], help="base channels (default 32)"
    )
    group.add_argument(
        "--mults",
        type=positive_int,
        nargs="+",
        default=d["mults"],
        help="channel multipliers (default 1 2 2)",
    )
    group.add_argument("--norm-groups", type=positive_int, default=d["norm_groups"], help="(default 8)")
    group.add_argument(
        "--rounds",
        type=positive_int,
        default=d["rounds"],
        help="minidiff/PyTorch pairs, alternating (default 3)",
    )
    if repeats_and_json:
        group.add_argument(
            "--repeats",
            type=positive_int,
            default=REPEATS,
            help=f"timed runs per measurement (default {REPEATS})",
        )
        group.add_argument(
            "--json", default=default_json, help=f"where to write the JSON (default: {default_json})"
        )


def run_from_args(args, default_json="minidiff-bench-unet.json") -> int:
    """Run what the parsed options ask, write the JSON, print the table last."""
    cfg = unet_config(args.channels, args.mults, args.image_size, args.norm_groups)
    report = run(cfg, args.batch, args.repeats or REPEATS, args.rounds)
    write_report(report, args.json or default_json, format_report(report))
    return 0


def main(argv=None, *, prog=None, default_json="minidiff-bench-unet.json") -> int:
    options = command_parser(prog, __doc__)
    add_arguments(options, default_json=default_json)
    options.add_argument("--worker", help=argparse.SUPPRESS)
    options.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = options.parse_args(argv)
    if args.worker:  # one framework's measurements, as the last line of stdout
        print(json.dumps(measure(args.worker, *json.loads(args.worker_args))))
        return 0
    try:
        return run_from_args(args, default_json)
    except RuntimeError as exc:
        options.exit(1, f"{options.prog}: {exc}\n")
