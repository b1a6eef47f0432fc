"""The ``minidiff`` command line."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import sys


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"
    except Exception as exc:  # a package that is present but fails to import
        return f"broken ({type(exc).__name__}: {exc})"


def _blas_kernels() -> str:
    """The BLAS NumPy uses and the CPU kernels it picked (through threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return "unknown (threadpoolctl is not installed)"
    found = [i for i in threadpool_info() if i.get("user_api") == "blas"]
    if not found:
        return "unknown"
    # NumPy's own copy first: SciPy may have loaded another build of the same library
    blas = sorted(found, key=lambda i: "numpy" not in str(i.get("filepath", "")))[0]
    arch = f", {blas['architecture']} kernels" if blas.get("architecture") else ""
    name = f"{blas.get('internal_api', 'blas')} {blas.get('version', '')}"
    return f"{name}{arch}, {blas.get('num_threads')} threads"


def info_lines() -> list[str]:
    """What ``minidiff info`` prints: versions, devices, kernel implementations."""
    import minidiff
    from minidiff import backend, kernels, runtime
    from minidiff.train import thread_plan  # what each rank runs under mpiexec

    lines = [f"minidiff {minidiff.__version__}", f"python {platform.python_version()} ({sys.executable})"]
    lines.append("packages:")
    for module in ("numpy", "scipy", "numba", "numba_cuda", "cupy", "torch"):
        lines.append(f"  {module:<11} {_version(module)}")
    lines.append("devices:")
    lines.append(f"  cpu         {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
    reason = backend.cuda_unavailable_reason()
    if reason is None:
        cupy = backend.Device("cuda").xp
        for i in range(cupy.cuda.runtime.getDeviceCount()):
            name = cupy.cuda.runtime.getDeviceProperties(i)["name"]
            name = name.decode() if isinstance(name, bytes) else name
            lines.append(f"  cuda:{i:<6} {name}")
    else:
        lines.append(f"  cuda        unavailable: {reason}")
    lines.append("process settings:")
    lines.append(f"  threads     {thread_plan().describe()}")
    lines.append(f"  blas        {_blas_kernels()}")
    lines.append(f"  blas wait   {runtime.blas_note()}")
    lines.append(f"  omp wait    {runtime.omp_note()}")
    lines.append(f"  malloc      {runtime.malloc_note()}")
    lines.append(f"  jit cache   {runtime.jit_cache_note()}")
    lines.append(f"kernels (selected: {kernels.current()}):")
    for name, (ok, why) in kernels.available().items():
        lines.append(f"  {name:<11} {'available' if ok else 'missing'}: {why}")
    return lines


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


def _requested_config(args) -> dict:
    """The TrainConfig fields that --config FILE and the flags give (flags win)."""
    import json
    from pathlib import Path

    values = {}
    if args.config:
        try:
            values = json.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise SystemExit(f"minidiff train: config file {args.config} does not exist") from None
        except json.JSONDecodeError as exc:
            raise SystemExit(f"minidiff train: config file {args.config} is not valid JSON: {exc}") from None
    for key in ("dataset", "steps", "batch_size", "lr", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return values


def cmd_train(args) -> int:
    from pathlib import Path

    from minidiff import io
    from minidiff.train import TrainConfig, Trainer

    out = Path(args.out)
    has_run = (out / "checkpoints" / io.LATEST).is_file()
    values = _requested_config(args)
    if args.resume:
        if not has_run:
            raise SystemExit(f"minidiff train: nothing to resume: {out} holds no checkpoint")
        trainer = Trainer.resume(out, progress=not args.quiet, config=values)
        if trainer.world.is_root:  # under mpiexec, rank 0 alone prints
            print(f"resuming {out} at step {trainer.step} of {trainer.config.steps}")
    else:
        if has_run:
            raise SystemExit(
                f"minidiff train: {out} already holds a run; pass --resume to continue it, or choose "
                "another --out"
            )
        trainer = Trainer(TrainConfig.from_dict(values), out, progress=not args.quiet)
    result = trainer.fit()
    if trainer.world.is_root:
        print(
            f"{result['status']} at step {result['step']}: samples in {out / 'samples'}, "
            f"loss curve {out / 'loss.png'}, checkpoints in {out / 'checkpoints'}"
        )
    return 0 if result["status"] in ("finished", "interrupted") else 1


def cmd_sample(args) -> int:
    from pathlib import Path

    import numpy as np

    from minidiff.data import save_grid, to_uint8
    from minidiff.diffusion import ddim_sample, ddpm_sample
    from minidiff.train import load_model

    out = Path(args.out)
    if out.suffix not in (".png", ".npy"):
        raise SystemExit(f"minidiff sample: --out must end in .png or .npy, got {out}")
    if (args.checkpoint is None) == (args.pipeline is None):
        raise SystemExit(
            "minidiff sample: give --checkpoint (a minidiff run) or --pipeline (a Stable Diffusion folder)"
        )
    if args.pipeline is not None:
        return _sample_pipeline(args, out)
    for flag, value in (
        ("--prompt", args.prompt),
        ("--negative-prompt", args.negative_prompt),
        ("--height", args.height),
        ("--width", args.width),
    ):
        if value is not None:
            raise SystemExit(f"minidiff sample: {flag} needs --pipeline")
    if args.sampler in ("pndm", "euler"):
        raise SystemExit(
            f"minidiff sample: --sampler {args.sampler} needs --pipeline (checkpoints: ddpm, ddim)"
        )
    args.sampler = args.sampler or "ddim"
    args.num = 20 if args.num is None else args.num
    model, diffusion, state = load_model(args.checkpoint, weights="model" if args.raw_weights else "ema")
    num_classes = state["num_classes"]
    y = None
    if num_classes is not None:
        if args.class_label is not None and not 0 <= args.class_label < num_classes:
            raise SystemExit(
                f"minidiff sample: --class must be in [0, {num_classes}), got {args.class_label}"
            )
        y = (
            np.full(args.num, args.class_label)
            if args.class_label is not None
            else np.arange(args.num) % num_classes
        )
    elif args.class_label is not None or args.guidance is not None:
        raise SystemExit("minidiff sample: this model is not class-conditional (no --class/--guidance)")
    shape = (args.num, *state["image_shape"])
    common = dict(generator=args.seed, y=y, guidance=args.guidance, null_class=num_classes)
    if args.sampler == "ddpm":
        images = ddpm_sample(model, diffusion, shape, **common)
    else:
        images = ddim_sample(model, diffusion, shape, steps=args.steps, eta=args.eta, **common)
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".npy":
        np.save(out, to_uint8(images))
    else:
        save_grid(images, out, nrow=None, scale=max(1, 64 // images.shape[-1]))
    print(f"wrote {args.num} samples to {out}")
    return 0


def _sample_pipeline(args, out) -> int:
    """``minidiff sample --pipeline DIR --prompt ...``: text to image with a Stable Diffusion folder."""
    import numpy as np

    from minidiff.data import save_grid, to_uint8
    from minidiff.pipelines import StableDiffusion

    if args.prompt is None:
        raise SystemExit("minidiff sample: --pipeline needs --prompt")
    for flag, value in (("--class", args.class_label), ("--raw-weights", args.raw_weights or None)):
        if value is not None:
            raise SystemExit(f"minidiff sample: {flag} applies to --checkpoint runs only")
    if args.sampler == "ddpm":
        raise SystemExit("minidiff sample: --pipeline samples with ddim, pndm or euler")
    if out.parent.exists() and not out.parent.is_dir():
        raise SystemExit(f"minidiff sample: --out's folder {out.parent} is a file")
    args.num = 1 if args.num is None else args.num
    sd = StableDiffusion.from_pretrained(args.pipeline)
    negative = None if args.negative_prompt is None else [args.negative_prompt] * args.num
    images = sd(
        [args.prompt] * args.num,
        negative_prompt=negative,
        num_steps=args.steps,
        guidance=7.5 if args.guidance is None else args.guidance,
        seed=args.seed,
        height=args.height,
        width=args.width,
        sampler=args.sampler,
        eta=args.eta,
        progress=True,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    images = images * 2 - 1  # [0, 1] -> [-1, 1], what the image writers take
    if out.suffix == ".npy":
        np.save(out, to_uint8(images))
    else:
        save_grid(images, out, nrow=None)
    print(f"wrote {args.num} images to {out}")
    return 0


def cmd_eval(args) -> int:
    from minidiff.train.evaluate import bits_per_dim_report, sample_quality_report

    if args.metric == "bpd":
        r = bits_per_dim_report(args.checkpoint, num=args.num, timesteps=args.timesteps, seed=args.seed)
        print(
            f"bits/dim {r['total']:.4f} (prior {r['prior']:.4f}, diffusion terms {r['terms']:.4f}, "
            f"decoder {r['decoder']:.4f}) over {r['num_images']} held-out images, {r['timesteps']} timesteps"
        )
        return 0
    r = sample_quality_report(
        args.checkpoint, num=args.num, steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    print(
        f"FID (minidiff classifier features, not Inception) {r['fid']:.3f} against held-out images; "
        f"{r['real_fid']:.3f} for as many real training images"
    )
    print(f"mean classifier confidence {r['mean_confidence']:.3f}; class histogram {r['class_histogram']}")
    return 0


def cmd_bench(args) -> int:
    if args.unet:
        from minidiff.bench import unet

        kernel_only = [name for name, given in (("--ops", args.ops), ("--quick", args.quick)) if given]
        kernel_only += ["--shapes"] if args.shapes != "full" else []
        if kernel_only:
            print(f"minidiff bench: {', '.join(kernel_only)} only apply without --unet", file=sys.stderr)
            return 2

        try:
            return unet.run_from_args(args)
        except RuntimeError as exc:  # no PyTorch, or a failed measurement process
            print(f"minidiff bench --unet: {exc}", file=sys.stderr)
            return 1
    from minidiff.bench import kernels
    from minidiff.bench.unet import OPTION_DEFAULTS

    unet_only = [f"--{k.replace('_', '-')}" for k, v in OPTION_DEFAULTS.items() if getattr(args, k) != v]
    if unet_only:
        print(f"minidiff bench: {', '.join(unet_only)} only apply with --unet", file=sys.stderr)
        return 2
    if args.json is None:
        args.json = "minidiff-bench.json"
    return kernels.run_from_args(args)


def build_parser() -> argparse.ArgumentParser:
    from minidiff.bench import positive_int

    parser = argparse.ArgumentParser(
        prog="minidiff",
        description="Diffusion models and autodiff from scratch on NumPy and CuPy.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    info = commands.add_parser(
        "info",
        help="versions, devices and available kernel implementations",
        description="Print versions, devices (CPU; GPU via CuPy, or why not) and which kernel "
        "implementations (reference, numba, native) are available.",
    )
    info.set_defaults(run=cmd_info)

    train = commands.add_parser(
        "train",
        help="train a DDPM (default: the bundled digits)",
        description="Train a DDPM U-Net. Writes checkpoints, loss.csv, loss.png and sample grids "
        "to --out. Ctrl-C saves a checkpoint; --resume continues from the newest one.",
    )
    train.add_argument("--dataset", help="digits (default) | mnist:PATH | cifar10:PATH | folder:PATH")
    train.add_argument("--out", default="runs/digits", help="output folder (default: runs/digits)")
    train.add_argument("--steps", type=positive_int, help="training steps")
    train.add_argument("--batch-size", type=positive_int, help="images per step")
    train.add_argument("--lr", type=float, help="peak learning rate")
    train.add_argument("--seed", type=int, help="random seed")
    train.add_argument("--config", help="JSON file of TrainConfig fields")
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    sample = commands.add_parser(
        "sample",
        help="generate images from a checkpoint",
        description="Sample images with DDPM or DDIM from a minidiff run (--checkpoint), or from a "
        "prompt with a Stable Diffusion folder in diffusers' layout (--pipeline). .png writes a grid, "
        ".npy a uint8 array (N, C, H, W).",
    )
    sample.add_argument("--checkpoint", help="a run folder or a checkpoint folder")
    sample.add_argument("--pipeline", help="a Stable Diffusion folder (model_index.json, unet/, vae/, ...)")
    sample.add_argument("--prompt", help="the text to draw (--pipeline)")
    sample.add_argument("--negative-prompt", help="what to steer away from (--pipeline)")
    sample.add_argument("--height", type=positive_int, help="image height (--pipeline; default: the model's)")
    sample.add_argument("--width", type=positive_int, help="image width (--pipeline; default: the model's)")
    sample.add_argument("--num", type=positive_int, help="number of images (default: 20; --pipeline: 1)")
    sample.add_argument(
        "--sampler",
        choices=("ddpm", "ddim", "pndm", "euler"),
        help="checkpoints: ddpm or ddim (default); pipelines: ddim, pndm or euler (default: the folder's)",
    )
    sample.add_argument("--steps", type=int, default=50, help="DDIM steps (DDPM always uses all T)")
    sample.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0: deterministic)")
    sample.add_argument(
        "--class", dest="class_label", type=int, help="class to generate (conditional models)"
    )
    sample.add_argument(
        "--guidance",
        type=float,
        help="classifier-free guidance scale (1: plain conditional; --pipeline default 7.5)",
    )
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--raw-weights", action="store_true", help="use the training weights, not the EMA")
    sample.add_argument("--out", required=True, help="FILE.png or FILE.npy")
    sample.set_defaults(run=cmd_sample)

    evaluate = commands.add_parser(
        "eval",
        help="FID (on minidiff's own classifier) or bits per dimension",
        description="fid: Frechet distance between samples and the data on the features of a small "
        "classifier minidiff trains on the dataset (not Inception FID: not comparable with published "
        "numbers), plus mean confidence and class histogram. bpd: the variational bound in bits/dim.",
    )
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--metric", choices=("fid", "bpd"), required=True)
    evaluate.add_argument("--num", type=positive_int, default=500, help="samples (fid) or images (bpd)")
    evaluate.add_argument("--steps", type=int, default=50, help="DDIM steps for fid samples")
    evaluate.add_argument("--guidance", type=float, help="classifier-free guidance for fid samples")
    evaluate.add_argument(
        "--timesteps",
        type=int,
        default=100,
        help="bpd: random timesteps per image for the estimate (0: all T)",
    )
    evaluate.add_argument("--seed", type=int, default=0)
    evaluate.set_defaults(run=cmd_eval)

    from minidiff.bench.kernels import add_arguments as add_bench_arguments
    from minidiff.bench.unet import add_arguments as add_unet_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="time every kernel implementation (or, with --unet, the U-Net) against PyTorch",
        description="Measure this machine's ceilings (float32 GEMM GFLOP/s, copy GB/s), then every "
        "kernel op on realistic U-Net shapes with each implementation (reference, numba, native) and "
        "the same work in PyTorch if it is installed: median ms, ratios, GB/s and % of the ceiling. "
        "Prints a table and writes JSON. With --unet: the U-Net training step and sampling forward "
        "pass against the same model in PyTorch (needs PyTorch), each in its own process, alternating.",
    )
    add_bench_arguments(bench, default_json=None)
    bench.add_argument(
        "--unet",
        action="store_true",
        help="the U-Net benchmark instead of the kernels (--repeats default 5; JSON default: "
        "minidiff-bench-unet.json)",
    )
    add_unet_bench_arguments(bench, repeats_and_json=False)
    bench.set_defaults(run=cmd_bench)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from minidiff.io import CheckpointError

    try:
        return args.run(args)
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"minidiff {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
