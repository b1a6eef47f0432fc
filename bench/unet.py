"""The U-Net training step and sampling forward pass: minidiff against PyTorch.

Same architecture on both sides (parameter counts are checked equal), the same
batch, run in one process: the median of repeated runs after warm-up, and the
ratio minidiff / PyTorch (below 1 means minidiff is faster). Peak resident
memory of a training step is measured in a fresh subprocess per framework.

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


def make_steps(framework, cfg, batch, seed=0):
    """(train_step, sample_forward, parameter count) for one framework."""
    rng = np.random.default_rng(seed)
    size, channels = cfg["image_size"], cfg["in_channels"]
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    target = rng.standard_normal(x.shape).astype(np.float32)
    t = rng.integers(0, 1000, batch)
    if framework == "minidiff":
        import minidiff
        from minidiff import functional as F
        from minidiff.optim import Adam

        model = minidiff.nn.UNet(**cfg)
        opt = Adam(model.parameters(), lr=1e-4)
        xt, tt = minidiff.Tensor._wrap(x), minidiff.Tensor._wrap(target)

        def train_step():
            loss = F.mse_loss(model(xt, t), tt)
            opt.zero_grad()
            loss.backward()
            opt.step()

        def sample_forward():
            with minidiff.no_grad():
                model(xt, t)

        return train_step, sample_forward, model.num_parameters()

    import torch

    model = torch_unet_class()(**cfg)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    xt, tt, t_t = torch.from_numpy(x), torch.from_numpy(target), torch.from_numpy(t)

    def train_step():
        loss = ((model(xt, t_t) - tt) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    def sample_forward():
        with torch.no_grad():
            model(xt, t_t)

    return train_step, sample_forward, sum(p.numel() for p in model.parameters())


def peak_memory_mb(framework, cfg, batch) -> float:
    """Peak resident memory (MiB) of a process that runs three training steps."""
    code = (
        "import json, resource, sys; sys.path.insert(0, sys.argv[1]); import unet as b; "
        "step, _, _ = b.make_steps(sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])); "
        "[step() for _ in range(3)]; "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE), framework, json.dumps(cfg), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", default=str(HERE / "unet.json"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = dict(
        in_channels=1,
        base_channels=args.channels,
        channel_mults=tuple(args.mults),
        num_res_blocks=1,
        attn_resolutions=(8,),
        image_size=args.image_size,
        norm_groups=args.norm_groups,
    )
    results = {}
    for framework in ("minidiff", "torch"):
        train_step, sample_forward, params = make_steps(framework, cfg, args.batch)
        results[framework] = {
            "params": params,
            "train_ms": median_ms(train_step, args.repeats),
            "sample_ms": median_ms(sample_forward, args.repeats),
        }
        if not args.no_memory:
            results[framework]["peak_mb"] = peak_memory_mb(framework, cfg, args.batch)
    if results["minidiff"]["params"] != results["torch"]["params"]:
        raise SystemExit(f"parameter counts differ: {results}")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": {**cfg, "batch": args.batch},
        "torch": torch.__version__,
        "results": results,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    md, pt = results["minidiff"], results["torch"]
    print(
        f"UNet{tuple(cfg.values())[:6]} batch {args.batch}, {md['params']:,} parameters, "
        f"median of {args.repeats}"
    )
    print(f"{'':<26}{'minidiff':>12}{'PyTorch':>12}{'ratio':>8}")
    rows = [("training step (ms)", "train_ms"), ("sampling forward (ms)", "sample_ms")]
    if not args.no_memory:
        rows.append(("peak memory, train (MiB)", "peak_mb"))
    for name, key in rows:
        print(f"{name:<26}{md[key]:>12.1f}{pt[key]:>12.1f}{md[key] / pt[key]:>8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
