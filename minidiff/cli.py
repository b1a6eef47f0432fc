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
    lines.append(f"  blas        {_blas_kernels()}")
    lines.append(f"  blas wait   {runtime.blas_note()}")
    lines.append(f"  omp wait    {runtime.omp_note()}")
    lines.append(f"  malloc      {runtime.malloc_note()}")
    lines.append(f"  jit cache   {runtime.jit_cache_note()}")
    try:
        selected = kernels.current()
    except (ValueError, RuntimeError) as exc:  # a bad MINIDIFF_KERNELS: the diagnostic still runs
        selected = f"none: {exc}"
    lines.append(f"kernels (selected: {selected}):")
    for name, (ok, why) in kernels.available().items():
        lines.append(f"  {name:<11} {'available' if ok else 'missing'}: {why}")
    return lines


def cmd_info(args) -> int:
    print("\n".join(info_lines()))
    return 0


class UsageError(SystemExit):
    """A mistake in the command's arguments or files: one line on stderr, then exit status 2,
    as argparse's usage errors (``main`` raises it as argparse raises its SystemExit)."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 2

    def __str__(self) -> str:
        return self.args[0]


def finite_float(text: str) -> float:
    """An argparse type: a float that is not NaN or infinite."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _requested_config(args) -> dict:
    """The TrainConfig fields that --config FILE and the flags give (flags win)."""
    import json
    from pathlib import Path

    values = {}
    if args.config:
        try:
            values = json.loads(Path(args.config).read_text())
        except FileNotFoundError:
            raise UsageError(f"minidiff train: config file {args.config} does not exist") from None
        except json.JSONDecodeError as exc:
            raise UsageError(f"minidiff train: config file {args.config} is not valid JSON: {exc}") from None
        if not isinstance(values, dict):
            raise UsageError(
                f"minidiff train: config file {args.config} must hold a JSON object of config keys "
                f"(minidiff train --help-config), got {type(values).__name__}"
            )
    for key in ("dataset", "steps", "batch_size", "lr", "seed"):
        if getattr(args, key) is not None:
            values[key] = getattr(args, key)
    return values


def cmd_train(args) -> int:
    from pathlib import Path

    from minidiff import io
    from minidiff.train import TrainConfig, Trainer
    from minidiff.train.ddpm import config_help, existing_run_outputs
    from minidiff.train.t2i import CONFIG_FILE

    if args.help_config:
        print(config_help())
        return 0
    if args.model == "clip":
        return _train_clip(args)
    values = _requested_config(args)
    out = Path(args.out or ("runs/shapes" if values.get("dataset") == "shapes" else "runs/digits"))
    if values.get("dataset") == "shapes" or (args.resume and (out / CONFIG_FILE).is_file()):
        return _train_text_to_image(args, values, out)
    args.out = out
    if args.resume:
        if args.overwrite:
            raise UsageError("minidiff train: --resume continues a run, --overwrite deletes it: give one")
        if not io.has_checkpoint(out):
            raise UsageError(f"minidiff train: nothing to resume: {out} holds no checkpoint")
        trainer = Trainer.resume(out, progress=not args.quiet, config=values)
        print(f"resuming {out} at step {trainer.step} of {trainer.config.steps}")
    else:
        found = existing_run_outputs(out)
        if found and not args.overwrite:
            held = (
                f"checkpoint {io.resolve_checkpoint(out).name}"
                if io.has_checkpoint(out)
                else ", ".join(found)
            )
            raise UsageError(
                f"minidiff train: {out} already holds a run ({held}); pass --resume to continue it, "
                "--overwrite to delete it and start afresh, or choose another --out"
            )
        config = TrainConfig.from_dict(values)
        config.validate()  # every key checked before the dataset is read
        trainer = Trainer(config, out, progress=not args.quiet, overwrite=args.overwrite)
    result = trainer.fit()
    if io.has_checkpoint(out):
        saved = f"newest checkpoint {io.resolve_checkpoint(out)}"
    else:
        saved = "no checkpoint written"
    print(
        f"{result['status']} at step {result['step']}: samples in {out / 'samples'}, "
        f"loss curve {out / 'loss.png'}, {saved}"
    )
    return 0 if result["status"] in ("finished", "interrupted") else 1


def _train_clip(args) -> int:
    """``minidiff train --model clip``: a small CLIP trained contrastively on a captioned dataset."""
    from pathlib import Path

    from minidiff.train.clip import CLIPTrainConfig, train_clip

    if args.resume:
        raise UsageError("minidiff train: --model clip runs start afresh (no --resume)")
    values = _requested_config(args)
    values.setdefault("dataset", "shapes")
    out = Path(args.out or f"runs/{values['dataset']}/clip")  # the run's own: eval's default
    if (out / "model.safetensors").is_file():
        raise UsageError(f"minidiff train: {out} already holds a CLIP; choose another --out")
    report = train_clip(CLIPTrainConfig.from_dict(values), out, progress=not args.quiet)
    accuracy = ", ".join(f"{name} {value:.1%}" for name, value in report["zero_shot_accuracy"].items())
    print(
        f"CLIP in {out} (loss {report['final_loss']:.4f} after {report['steps']} steps); zero-shot "
        f"accuracy on {report['num_held_out']} held-out images: {accuracy}; all attributes "
        f"{report['zero_shot_all_attributes']:.1%} (chance 1/{report['num_captions']})"
    )
    return 0


def _train_text_to_image(args, values, out) -> int:
    """``minidiff train --dataset shapes``: every stage of text to image (minidiff.train.t2i);
    --steps, --batch-size and --lr set the denoiser's (the U-Net and text encoder's)."""
    from minidiff.train.t2i import CONFIG_FILE, T2IConfig, T2ITrainer

    denoiser = dict(values.pop("denoiser", None) or {})
    for key in ("steps", "batch_size", "lr"):
        if key in values:
            denoiser[key] = values.pop(key)
    if denoiser:
        values["denoiser"] = denoiser
    if args.resume:
        if not (out / CONFIG_FILE).is_file():
            raise UsageError(f"minidiff train: nothing to resume: {out} holds no text-to-image run")
        trainer = T2ITrainer.resume(out, progress=not args.quiet, config=values)
        print(f"resuming the text-to-image run in {out}")
    else:
        if (out / CONFIG_FILE).is_file():
            raise UsageError(
                f"minidiff train: {out} already holds a run; pass --resume to continue it, or choose "
                "another --out"
            )
        trainer = T2ITrainer(T2IConfig.from_dict(values), out, progress=not args.quiet)
    result = trainer.fit()
    print(
        f"{result['status']} in stage {result['stage']} at step {result['step']}: a Stable Diffusion "
        f"folder in {out} (sample it with minidiff sample --checkpoint {out} --prompt ...); pictures and "
        f"loss curves in {out / 'autoencoder'} and {out / 'denoiser'}"
    )
    return 0 if result["status"] in ("finished", "interrupted") else 1


def _check_output_path(out, command: str):
    """--out checked (and its folder made) before any sampling, not after it."""
    if out.suffix not in (".png", ".npy"):
        raise UsageError(f"minidiff {command}: --out must end in .png or .npy, got {out}")
    if out.is_dir():
        raise UsageError(
            f"minidiff {command}: --out {out} is a folder; give a file name ending in {out.suffix}"
        )
    for parent in (out.parent, *out.parent.parents):
        if parent.exists():
            if not parent.is_dir():
                raise UsageError(f"minidiff {command}: --out's folder {parent} is a file")
            break
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"minidiff {command}: cannot create --out's folder {out.parent}: {exc}") from None


class SamplingFailed(RuntimeError):
    """The sampler gave non-finite values: a failure (exit status 1), nothing is written."""


def _check_finite_images(images, command: str):
    import numpy as np

    bad = ~np.isfinite(images).reshape(len(images), -1).all(axis=1)
    if bad.any():
        raise SamplingFailed(
            f"minidiff {command}: sampling gave non-finite values (NaN or inf) in {int(bad.sum())} of "
            f"{len(images)} images; nothing was written"
        )


def cmd_sample(args) -> int:
    from pathlib import Path

    import numpy as np

    from minidiff.data import save_grid, to_uint8
    from minidiff.diffusion import ddim_sample, ddpm_sample
    from minidiff.train import load_model

    out = Path(args.out)
    if (args.checkpoint is None) == (args.pipeline is None):
        raise UsageError(
            "minidiff sample: give --checkpoint (a minidiff run) or --pipeline (a Stable Diffusion folder)"
        )
    if args.pipeline is not None:
        return _sample_pipeline(args, out)
    from minidiff.train.t2i import load_run_config

    run = load_run_config(args.checkpoint)
    if run is not None:  # a text-to-image run: a Stable Diffusion folder
        if args.guidance is None:
            args.guidance = run.guidance  # the guidance the run was checked with
        args.pipeline = args.checkpoint
        return _sample_pipeline(args, out)
    for flag, value in (
        ("--prompt", args.prompt),
        ("--negative-prompt", args.negative_prompt),
        ("--height", args.height),
        ("--width", args.width),
    ):
        if value is not None:
            raise UsageError(
                f"minidiff sample: {flag} needs --pipeline (or a text-to-image run as --checkpoint)"
            )
    if args.sampler in ("pndm", "euler"):
        raise UsageError(
            f"minidiff sample: --sampler {args.sampler} needs --pipeline (checkpoints: ddpm, ddim)"
        )
    args.sampler = args.sampler or "ddim"
    args.num = 20 if args.num is None else args.num
    _check_output_path(out, "sample")
    model, diffusion, state = load_model(args.checkpoint, weights="model" if args.raw_weights else "ema")
    num_classes = state["num_classes"]
    y = None
    if num_classes is not None:
        if args.class_label is not None and not 0 <= args.class_label < num_classes:
            raise UsageError(
                f"minidiff sample: --class must be in [0, {num_classes}), got {args.class_label}"
            )
        y = (
            np.full(args.num, args.class_label)
            if args.class_label is not None
            else np.arange(args.num) % num_classes
        )
    elif args.class_label is not None or args.guidance is not None:
        raise UsageError("minidiff sample: this model is not class-conditional (no --class/--guidance)")
    shape = (args.num, *state["image_shape"])
    common = dict(generator=args.seed, y=y, guidance=args.guidance, null_class=num_classes)
    if args.sampler == "ddpm":
        images = ddpm_sample(model, diffusion, shape, **common)
    else:
        images = ddim_sample(model, diffusion, shape, steps=args.steps, eta=args.eta, **common)
    _check_finite_images(images, "sample")
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
        raise UsageError("minidiff sample: --pipeline needs --prompt")
    for flag, value in (("--class", args.class_label), ("--raw-weights", args.raw_weights or None)):
        if value is not None:
            raise UsageError(f"minidiff sample: {flag} applies to --checkpoint runs only")
    if args.sampler == "ddpm":
        raise UsageError("minidiff sample: --pipeline samples with ddim, pndm or euler")
    _check_output_path(out, "sample")
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
    _check_finite_images(images, "sample")
    images = images * 2 - 1  # [0, 1] -> [-1, 1], what the image writers take
    if out.suffix == ".npy":
        np.save(out, to_uint8(images))
    else:
        save_grid(images, out, nrow=None)
    print(f"wrote {args.num} images to {out}")
    return 0


def cmd_eval(args) -> int:
    from pathlib import Path

    from minidiff import io
    from minidiff.train.evaluate import bits_per_dim_report, inception_report, sample_quality_report

    if args.metric == "clip":
        for flag, value in (("--inception", args.inception), ("--reference", args.reference)):
            if value is not None:
                raise UsageError(f"minidiff eval: {flag} applies to --metric fid only")
        return _eval_clip(args)
    if args.clip is not None:
        raise UsageError("minidiff eval: --clip applies to --metric clip")
    # the run's T and holdout, from its state alone, to check the arguments before the work
    _, state, where = io.load_checkpoint(args.checkpoint, groups=())
    config = state.get("config") if isinstance(state.get("config"), dict) else {}
    T = config.get("timesteps", 1000)
    reference = "held-out" if config.get("holdout", 0.1) else "training (this run holds none out: holdout 0)"
    if args.metric == "bpd":
        for flag, value in (("--inception", args.inception), ("--reference", args.reference)):
            if value is not None:
                raise UsageError(f"minidiff eval: {flag} applies to --metric fid only")
        if args.timesteps > T:
            raise UsageError(
                f"minidiff eval: --timesteps ({args.timesteps}) is above the model's {T} timesteps "
                f"({where}); give at most {T}, or 0 for all"
            )
        num = 500 if args.num is None else args.num
        r = bits_per_dim_report(args.checkpoint, num=num, timesteps=args.timesteps, seed=args.seed)
        print(
            f"bits/dim {r['total']:.4f} (prior {r['prior']:.4f}, diffusion terms {r['terms']:.4f}, "
            f"decoder {r['decoder']:.4f}) over {r['num_images']} {reference} images, "
            f"{r['timesteps']} timesteps"
        )
        return 0
    if args.inception is not None and not Path(args.inception).is_file():
        raise UsageError(f"minidiff eval: --inception {args.inception}: no such file")
    if args.reference is not None and args.inception is None:
        raise UsageError("minidiff eval: --reference applies with --inception only")
    if not 1 <= args.steps <= T:
        raise UsageError(
            f"minidiff eval: --steps must be in [1, {T}] (the model's timesteps), got {args.steps}"
        )
    if args.inception is not None:
        num = 10_000 if args.num is None else args.num
        r = inception_report(
            args.checkpoint,
            args.inception,
            num=num,
            reference_num=args.reference,
            steps=args.steps,
            guidance=args.guidance,
            seed=args.seed,
        )
        print(
            f"FID-{_count(num)} (Inception pool3 features, {Path(r['weights']).name}) {r['fid']:.3f} "
            f"of {num} samples against {r['num_reference']} training images"
        )
        print(f"KID {r['kid']:.5f} +- {r['kid_std']:.5f} (the same features)")
        if not r["standard_weights"]:
            print(
                f"warning: {r['weights']} has sha256 {r['weights_sha256'][:8]}..., not the standard "
                f"pytorch-fid weights (6726825d...): not comparable with published FIDs"
            )
        return 0
    num = 500 if args.num is None else args.num
    r = sample_quality_report(
        args.checkpoint, num=num, steps=args.steps, guidance=args.guidance, seed=args.seed
    )
    if not all(np_isfinite(r[k]) for k in ("fid", "real_fid", "mean_confidence")):
        raise SamplingFailed(f"minidiff eval: the FID came out non-finite ({r['fid']}): the samples hold NaN")
    print(
        f"FID (minidiff classifier features, not Inception) {r['fid']:.3f} against {reference} images; "
        f"{r['real_fid']:.3f} for as many real training images"
    )
    print(f"mean classifier confidence {r['mean_confidence']:.3f}; class histogram {r['class_histogram']}")
    print(
        f"KID {r['kid']:.5f} +- {r['kid_std']:.5f} (classifier features). For the FID papers report, "
        "pass --inception pt_inception-2015-12-05-6726825d.pth (pytorch-fid's weights)"
    )
    return 0


def _count(num: int) -> str:
    """10000 -> "10k", as FID-10k and FID-50k are written."""
    return f"{num // 1000}k" if num % 1000 == 0 else str(num)


def _eval_clip(args) -> int:
    """``minidiff eval --metric clip``: the CLIP score of a text-to-image run's samples for held-out
    captions, beside that of the real pairs and of mismatched pairs."""
    from pathlib import Path

    from minidiff.pipelines import StableDiffusion
    from minidiff.train.evaluate import clip_score_report
    from minidiff.train.t2i import load_run_config

    run = Path(args.checkpoint)
    clip = Path(args.clip) if args.clip is not None else run / "clip"
    if not (clip / "config.json").is_file():
        raise UsageError(
            f"minidiff eval: no CLIP in {clip}: train the run's own with `minidiff train --dataset shapes "
            f"--model clip --out {clip}`, or give --clip DIR (a transformers CLIP folder)"
        )
    pipe = StableDiffusion.from_pretrained(run)
    guidance = args.guidance
    if guidance is None:  # a minidiff run's own guidance, else Stable Diffusion's usual 7.5
        config = load_run_config(run)
        guidance = 7.5 if config is None else config.guidance

    def sample(prompts):
        return pipe(prompts, num_steps=args.steps, guidance=guidance, seed=args.seed) * 2 - 1

    r = clip_score_report(clip, sample=sample, num=100 if args.num is None else args.num, seed=args.seed)

    def score(name):  # the clamp at 0 hides how far below: say it
        below = f" (mean {r[name + '_unclamped']:.2f} before the clamp)" if r[name + "_unclamped"] < 0 else ""
        return f"{r[name]:.2f}{below}"

    print(
        f"CLIP score ({clip}) {score('samples')} for {r['num_pairs']} samples of held-out captions; "
        f"real image-caption pairs {score('real')}, mismatched pairs {score('mismatched')}"
    )
    return 0


def np_isfinite(value) -> bool:
    import math

    return math.isfinite(float(value))


def cmd_bench(args) -> int:
    sd_only = [flag for flag, given in (("--parts", args.parts), ("--tiny", args.tiny)) if given]
    if args.sd:
        from minidiff.bench import sd

        if args.unet:
            print("minidiff bench: give --sd or --unet, not both", file=sys.stderr)
            return 2
        where = args.json or "minidiff-bench-sd.json"
        print(f"minidiff bench: the results go to {where} (--json PATH to choose)", file=sys.stderr)
        args.parts = args.parts or list(sd.PARTS)
        try:
            return sd.run_from_args(args)
        except RuntimeError as exc:  # no PyTorch / diffusers, or a failed measurement process
            print(f"minidiff bench --sd: {exc}", file=sys.stderr)
            return 1
    if sd_only:
        print(f"minidiff bench: {', '.join(sd_only)} only apply with --sd", file=sys.stderr)
        return 2
    if args.unet:
        from minidiff.bench import unet

        kernel_only = [name for name, given in (("--ops", args.ops), ("--quick", args.quick)) if given]
        kernel_only += ["--shapes"] if args.shapes != "full" else []
        if kernel_only:
            print(f"minidiff bench: {', '.join(kernel_only)} only apply without --unet", file=sys.stderr)
            return 2

        where = args.json or "minidiff-bench-unet.json"
        print(f"minidiff bench: the results go to {where} (--json PATH to choose)", file=sys.stderr)
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
    print(f"minidiff bench: the results go to {args.json} (--json PATH to choose)", file=sys.stderr)
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

    from minidiff.train.ddpm import TrainConfig

    defaults = TrainConfig()
    train = commands.add_parser(
        "train",
        help="train a DDPM (default: the bundled digits)",
        description="Train a DDPM U-Net. Writes checkpoints, loss.csv, loss.png and sample grids "
        "to --out. Ctrl-C or SIGTERM (kill, timeout) finishes the step, saves a checkpoint and "
        "stops; --resume continues from the newest checkpoint. A folder holding a run is never "
        "started afresh without --overwrite. Unset flags take the --config file's values, then "
        "the defaults shown (all keys: --help-config).",
    )
    train.add_argument(
        "--dataset",
        help=f"digits | mnist:PATH | cifar10:PATH | folder:PATH (default: {defaults.dataset}); shapes: "
        "text to image (autoencoder, text encoder and U-Net, into a Stable Diffusion folder)",
    )
    train.add_argument(
        "--model",
        choices=("unet", "clip"),
        default="unet",
        help="unet: a DDPM (default); clip: a small CLIP, contrastively on the captions (--dataset shapes)",
    )
    train.add_argument("--out", help="output folder (default: runs/DATASET; --model clip: runs/DATASET/clip)")
    train.add_argument("--steps", type=positive_int, help=f"training steps (default: {defaults.steps})")
    train.add_argument(
        "--batch-size", type=positive_int, help=f"images per step (default: {defaults.batch_size})"
    )
    train.add_argument(
        "--lr",
        type=positive_float,
        help=f"peak learning rate (default: {defaults.lr}); may change on --resume",
    )
    train.add_argument("--seed", type=non_negative_int, help=f"random seed (default: {defaults.seed})")
    train.add_argument("--config", help="JSON file of TrainConfig fields (see --help-config)")
    train.add_argument(
        "--help-config", action="store_true", help="list every --config key with its default, and exit"
    )
    train.add_argument("--resume", action="store_true", help="continue the run in --out")
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="start afresh in an --out that holds a run, deleting its checkpoints, logs and samples",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    sample = commands.add_parser(
        "sample",
        help="generate images from a checkpoint",
        description="Sample images with DDPM or DDIM from a minidiff run (--checkpoint), or from a "
        "prompt with a Stable Diffusion folder in diffusers' layout (--pipeline). .png writes a grid, "
        ".npy a uint8 array (N, C, H, W).",
    )
    sample.add_argument(
        "--checkpoint",
        help="a run folder or a checkpoint folder (a text-to-image run samples from --prompt)",
    )
    sample.add_argument("--pipeline", help="a Stable Diffusion folder (model_index.json, unet/, vae/, ...)")
    sample.add_argument("--prompt", help="the text to draw (--pipeline, or a text-to-image run)")
    sample.add_argument("--negative-prompt", help="what to steer away from (--pipeline)")
    sample.add_argument("--height", type=positive_int, help="image height (--pipeline; default: the model's)")
    sample.add_argument("--width", type=positive_int, help="image width (--pipeline; default: the model's)")
    sample.add_argument("--num", type=positive_int, help="number of images (default: 20; --pipeline: 1)")
    sample.add_argument(
        "--sampler",
        choices=("ddpm", "ddim", "pndm", "euler"),
        help="checkpoints: ddpm or ddim (default); pipelines: ddim, pndm or euler (default: the folder's)",
    )
    sample.add_argument(
        "--steps", type=int, default=50, help="DDIM steps (default: 50; DDPM always uses all T)"
    )
    sample.add_argument(
        "--eta", type=non_negative_float, default=0.0, help="DDIM eta (default: 0, deterministic)"
    )
    sample.add_argument(
        "--class", dest="class_label", type=int, help="class to generate (conditional models)"
    )
    sample.add_argument(
        "--guidance",
        type=finite_float,
        help="classifier-free guidance scale (default: none, plain conditional; --pipeline: 7.5)",
    )
    sample.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    sample.add_argument("--raw-weights", action="store_true", help="use the training weights, not the EMA")
    sample.add_argument("--out", required=True, help="FILE.png or FILE.npy")
    sample.set_defaults(run=cmd_sample)

    evaluate = commands.add_parser(
        "eval",
        help="FID and KID (Inception, or minidiff's own classifier), bits per dimension or CLIP score",
        description="fid with --inception FILE: FID and KID of samples against the training images "
        "on the FID Inception network (pytorch-fid's pt_inception-2015-12-05-6726825d.pth), the "
        "numbers papers report; FID-10k by default, --num 50000 for FID-50k. fid without it: the "
        "Frechet distance and KID on the features of a small classifier minidiff trains on the "
        "dataset (not comparable with published numbers), plus mean confidence and class histogram. "
        "bpd: the variational bound in bits/dim. clip: the CLIP score of a text-to-image run's samples "
        "for held-out captions, beside the score of the real image-caption pairs and of mismatched pairs.",
    )
    evaluate.add_argument("--checkpoint", required=True)
    evaluate.add_argument("--metric", choices=("fid", "bpd", "clip"), required=True)
    evaluate.add_argument(
        "--num",
        type=positive_int,
        help="samples (fid: 10000 with --inception, else 500), held-out images (bpd: 500) or "
        "held-out captions (clip: 100)",
    )
    evaluate.add_argument(
        "--inception",
        metavar="FILE",
        help="the FID Inception weights (pt_inception-2015-12-05-6726825d.pth from "
        "github.com/mseitzer/pytorch-fid/releases); read without torch",
    )
    evaluate.add_argument(
        "--reference",
        type=positive_int,
        metavar="N",
        help="fid with --inception: N random training images as the reference (default: all)",
    )
    evaluate.add_argument(
        "--clip", help="clip: a transformers CLIP folder to score with (default: the run's own, RUN/clip)"
    )
    evaluate.add_argument("--steps", type=int, default=50, help="DDIM steps for fid samples (default: 50)")
    evaluate.add_argument(
        "--guidance", type=finite_float, help="classifier-free guidance for fid samples (default: none)"
    )
    evaluate.add_argument(
        "--timesteps",
        type=non_negative_int,
        default=100,
        help="bpd: random timesteps per image for the estimate, at most T (default: 100; 0: all T)",
    )
    evaluate.add_argument("--seed", type=non_negative_int, default=0, help="random seed (default: 0)")
    evaluate.set_defaults(run=cmd_eval)

    from minidiff.bench.kernels import add_arguments as add_bench_arguments
    from minidiff.bench.unet import add_arguments as add_unet_bench_arguments

    bench = commands.add_parser(
        "bench",
        help="time every kernel implementation (or, with --unet, the U-Net; with --sd, Stable "
        "Diffusion at full size) against PyTorch",
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
    bench.add_argument(
        "--sd",
        action="store_true",
        help="Stable Diffusion at full size instead: the SD v1.5 U-Net, VAE decoder and CLIP text "
        "encoder against diffusers (needs PyTorch, diffusers, transformers; JSON default: "
        "minidiff-bench-sd.json)",
    )
    bench.add_argument(
        "--parts", nargs="+", choices=("unet", "vae", "text"), help="--sd: which (default: all)"
    )
    bench.add_argument("--tiny", action="store_true", help="--sd: small configs of the same blocks")
    bench.set_defaults(run=cmd_bench, image_steps=25)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    from minidiff.io import CheckpointError, RunLockedError

    # exit status: 0 done, 2 a user error (as argparse's), 1 a failure, 130 interrupted
    try:
        return args.run(args)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        raise
    except (CheckpointError, FileNotFoundError, ValueError, RunLockedError) as exc:
        print(f"minidiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except SamplingFailed as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # before training started (or outside it): nothing half-written to save
        print(f"minidiff {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
