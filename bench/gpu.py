"""The CUDA kernels on a GPU: bandwidth of the memory-bound kernels, and the U-Net step.

Runs every memory-bound kernel's Numba CUDA version on CuPy arrays and reports its achieved
bandwidth (the bytes one call must read and write at least, over the median time) against the
card's measured device-to-device copy bandwidth (a kernel that reads its input again from the
card's L2 cache can pass 100%); then the U-Net training step and sampling forward pass on
``device="cuda"``, against PyTorch eager on the same card when PyTorch has CUDA.

    python bench/gpu.py                       # needs CuPy and a CUDA device
    python bench/gpu.py --simulate            # tiny shapes in Numba's CUDA simulator: checks
                                              # that the script runs, its numbers mean nothing

Writes bench/gpu.json beside itself (or --json).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
F32 = 4


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--simulate", action="store_true", help="NumPy arrays in the CUDA simulator")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", default=str(HERE / "gpu.json"))
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.simulate:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported
        args.repeats, args.batch = 2, 2
    import minidiff  # noqa: F401  (after the simulator switch)
    from minidiff import kernels

    if args.simulate:
        xp, sync, device = np, (lambda: None), "simulator"
    else:
        import cupy as xp

        sync = xp.cuda.Device().synchronize
        props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
        device = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]

    def median_ms(fn, repeats=args.repeats, warmup=2, calls=1 if args.simulate else 10):
        """Median over ``repeats`` samples of the time per call, a sample being ``calls`` calls
        and one wait for the device: the launches queue up while the device works, as in a
        training loop, and the wait's latency is shared by the calls (a kernel over 64 MiB takes
        tens of microseconds on a large card, as long as a wait)."""
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(calls):
                fn()
            sync()
            times.append((time.perf_counter() - start) / calls)
        return 1e3 * float(np.median(times))

    rng = np.random.default_rng(0)
    big = 512 if args.simulate else 1 << 24  # elements of the elementwise cases (64 MiB on a GPU)

    def randn(*shape):
        return xp.asarray(rng.standard_normal(shape, dtype=np.float32))

    copy_n = 64 if args.simulate else 1 << 26
    src, dst = randn(copy_n), xp.empty(copy_n, np.float32)
    copy_gbs = 2 * F32 * copy_n / median_ms(lambda: xp.copyto(dst, src)) / 1e6
    print(f"device: {device}; device-to-device copy {copy_gbs:.1f} GB/s")

    T = 1000
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, T))
    tables = (np.sqrt(abar), np.sqrt(1 - abar))

    def cases():
        """(op, label, args, bytes moved by one call) for the memory-bound kernels."""
        for n in (big,):
            x0, noise, pred = randn(n // 256, 256), randn(n // 256, 256), randn(n // 256, 256)
            t = rng.integers(0, T, n // 256)
            yield "q_sample", f"x({n // 256},256)", (x0, noise, *tables, t), 3 * F32 * n
            yield "mse_loss_forward", f"x({n // 256},256)", (pred, noise), 2 * F32 * n
            yield "mse_loss_backward", f"x({n // 256},256)", (pred, noise, 1.0), 3 * F32 * n
            yield "ddpm_step", f"x({n // 256},256)", (x0, pred, noise, 0.5, 0.5, 0.1), 4 * F32 * n
            p, g, m, v = randn(n), randn(n), xp.zeros(n, np.float32), xp.zeros(n, np.float32)
            yield "adam_update", f"p({n})", (p, g, m, v, 1e-3, 0.9, 0.999, 1e-8, 1), 7 * F32 * n
            yield "ema_update", f"p({n})", (m, p, 0.999), 3 * F32 * n
        b = args.batch
        norm_cases = (
            (((b, 64, 32, 32), 8), ((b, 128, 16, 16), 32)) if not args.simulate else (((b, 8, 4, 4), 4),)
        )
        for shape, groups in norm_cases:
            x, gy = randn(*shape), randn(*shape)
            w, bias, shift = randn(shape[1]), randn(shape[1]), randn(shape[0], shape[1])
            n = x.size
            forward = kernels.implementations("group_norm_silu_forward", device="cuda")["reference"]
            _, mean, rstd = forward(x, w, bias, shift, groups, 1e-5)
            yield "group_norm_forward", f"x{shape} g{groups}", (x, w, bias, groups, 1e-5), 2 * F32 * n
            yield (
                "group_norm_silu_forward",
                f"x{shape} g{groups} +shift",
                (
                    x,
                    w,
                    bias,
                    shift,
                    groups,
                    1e-5,
                ),
                2 * F32 * n,
            )
            yield (
                "group_norm_silu_backward",
                f"x{shape} g{groups} +shift",
                (
                    gy,
                    x,
                    w,
                    bias,
                    shift,
                    mean,
                    rstd,
                    groups,
                ),
                3 * F32 * n,
            )
        rows = randn(b * 4, 256, 256) if not args.simulate else randn(2, 4, 4)
        yield "softmax_forward", f"x{tuple(rows.shape)} rows", (rows,), 2 * F32 * rows.size
        yield "softmax_backward", f"x{tuple(rows.shape)} rows", (rows, rows), 3 * F32 * rows.size

    results = []
    print(f"{'op':<26}{'shape':<30}{'ms':>9}{'GB/s':>9}{'% copy':>8}")
    for op, label, op_args, nbytes in cases():
        fn = kernels.implementations(op, device="cuda").get("cuda")
        if fn is None:
            print(f"{op:<26}{label:<30}  no CUDA version usable here")
            continue
        ms = median_ms(lambda fn=fn, op_args=op_args: fn(*op_args))
        gbs = nbytes / ms / 1e6
        results.append({"op": op, "shape": label, "ms": ms, "gb_s": gbs, "of_copy": gbs / copy_gbs})
        print(f"{op:<26}{label:<30}{ms:>9.3f}{gbs:>9.1f}{100 * gbs / copy_gbs:>7.0f}%")

    unet = unet_step(args, xp, sync, median_ms)
    report = {
        "date": datetime.date.today().isoformat(),
        "device": device,
        "copy_gb_s": copy_gbs,
        "kernels": results,
        "unet": unet,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


def unet_step(args, xp, sync, median_ms) -> dict:
    """The bench/unet.py model on the GPU: minidiff, then PyTorch eager when it has CUDA."""
    from minidiff.bench.unet import make_steps, unet_config

    cfg = unet_config()
    if args.simulate:  # a toy model; the simulator has no CuPy, so it runs on NumPy arrays
        cfg.update(base_channels=8, channel_mults=(1, 2), attn_resolutions=(), image_size=8, norm_groups=4)
    device = "cpu" if args.simulate else "cuda"
    repeats = max(3, args.repeats // 4)
    result = {"config": {**cfg, "batch": args.batch, "device": device}}
    frameworks = ["minidiff"]
    try:
        import torch

        if not args.simulate and torch.cuda.is_available():
            frameworks.append("torch")
    except ImportError:
        pass
    for framework in frameworks:
        train_step, sample_forward, params = make_steps(framework, cfg, args.batch, device=device)
        result[framework] = {
            "params": params,
            "train_ms": median_ms(train_step, repeats, calls=1),
            "sample_ms": median_ms(sample_forward, repeats, calls=1),
        }
    print(f"U-Net {cfg} batch {args.batch} on {device}")
    for key in ("train_ms", "sample_ms"):
        mine = result["minidiff"][key]
        line = f"  {key}: minidiff {mine:.1f}"
        if "torch" in result:
            theirs = result["torch"][key]
            line += f", PyTorch {theirs:.1f}, ratio {mine / theirs:.2f}"
        print(line)
    return result


if __name__ == "__main__":
    sys.exit(main())
