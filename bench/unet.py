"""The U-Net training step and sampling forward pass: minidiff against PyTorch.

Same architecture on both sides (parameter counts are checked equal), the same
batch, run in one process: the median of repeated runs after warm-up, and the
ratio minidiff / PyTorch (below 1 means minidiff is faster). Each framework
runs in a fresh subprocess, with its own threading defaults, which also gives
its peak resident memory during training. A shared machine's speed drifts over
seconds to minutes, so the two alternate for --rounds rounds, and the ratio
printed is the median of the rounds' ratios (each round's pair ran back to back).

    python bench/unet.py                     # UNet(1, 32, (1,2,2), 1, (8,), 32, norm_groups=8), batch 32
    python bench/unet.py --batch 64 --image-size 16 --mults 1 2
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent


def torch_unet_class():
    """The PyTorch reference U-Net that the tests compare minidiff's against."""
    path = HERE.parent / "tests" / "nn" / "torch_unet.py"
    spec = importlib.util.spec_from_file_location("torch_unet", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TorchUNet


def median_ms(fn, repeats, warmup=2):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times))


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

        model = minidiff.nn.UNet(**cfg).to(device)
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

    model = torch_unet_class()(**cfg).to(device)
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
    if framework == "torch":
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
    train_step, sample_forward, params = make_steps(framework, cfg, batch)
    result = {"params": params, "train_ms": median_ms(train_step, repeats)}
    result["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result["sample_ms"] = median_ms(sample_forward, repeats)
    return result


def measure_in_subprocess(framework, cfg, batch, repeats) -> dict:
    """Each framework in a fresh process: its own threading defaults, its own peak memory."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", framework, "--worker-args", json.dumps([cfg, batch, repeats])],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--mults", type=int, nargs="+", default=[1, 2, 2])
    parser.add_argument("--norm-groups", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="minidiff/PyTorch pairs, alternating")
    parser.add_argument("--json", default=str(HERE / "unet.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--worker-args", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(measure(args.worker, *json.loads(args.worker_args))))
        return 0
    import torch

    cfg = dict(
        in_channels=1,
        base_channels=args.channels,
        channel_mults=tuple(args.mults),
        num_res_blocks=1,
        attn_resolutions=(8,),
        image_size=args.image_size,
        norm_groups=args.norm_groups,
    )
    rounds = [
        {fw: measure_in_subprocess(fw, cfg, args.batch, args.repeats) for fw in ("minidiff", "torch")}
        for _ in range(args.rounds)
    ]
    if rounds[0]["minidiff"]["params"] != rounds[0]["torch"]["params"]:
        raise SystemExit(f"parameter counts differ: {rounds[0]}")
    keys = ("train_ms", "sample_ms", "peak_mb")
    results = {}
    for fw in ("minidiff", "torch"):
        results[fw] = {"params": rounds[0][fw]["params"]}
        results[fw] |= {k: float(np.median([r[fw][k] for r in rounds])) for k in keys}
    ratios = {k: float(np.median([r["minidiff"][k] / r["torch"][k] for r in rounds])) for k in keys}
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {**cfg, "batch": args.batch},
        "torch": torch.__version__,
        "results": results,
        "ratios": ratios,
        "rounds": rounds,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    md, pt = results["minidiff"], results["torch"]
    print(
        f"UNet{tuple(cfg.values())[:6]} batch {args.batch}, {md['params']:,} parameters, "
        f"median of {args.repeats} per run, {args.rounds} alternating rounds"
    )
    for name, key in (("training step (ms)", "train_ms"), ("sampling forward (ms)", "sample_ms")):
        per_round = " ".join(f"{r['minidiff'][key]:.0f}/{r['torch'][key]:.0f}" for r in rounds)
        print(f"  {name:<24} rounds (minidiff/PyTorch): {per_round}")
    print(f"{'':<26}{'minidiff':>12}{'PyTorch':>12}{'ratio':>8}")
    rows = [
        ("training step (ms)", "train_ms"),
        ("sampling forward (ms)", "sample_ms"),
        ("peak memory, train (MiB)", "peak_mb"),
    ]
    for name, key in rows:
        print(f"{name:<26}{md[key]:>12.1f}{pt[key]:>12.1f}{ratios[key]:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
