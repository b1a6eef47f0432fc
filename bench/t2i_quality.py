"""Text-to-image quality of the default shapes run, read by the analytic checker.

Trains with ``minidiff train --dataset shapes``'s defaults (or takes a run with --checkpoint),
draws prompts from the caption grammar (every attribute named), samples several images per
prompt with the run's default guidance, and reads each image back with
``minidiff.data.shapes.read_attributes``: the share of samples right in size, colour, shape and
position, and in all four at once, printed beside the same checker's score on real held-out
images. The bar a default run must pass: every attribute right in at least 90% of the samples,
all four at once in at least 70%.

    python bench/t2i_quality.py                          # train (about 10 minutes), then check
    python bench/t2i_quality.py --checkpoint runs/shapes
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from minidiff.bench.harness import command_parser, dated_machine, trained_run
from minidiff.data import save_grid
from minidiff.data.shapes import (
    ATTRIBUTES,
    CHOICES,
    attributes_of,
    caption,
    load_shapes,
    parse_caption,
    score,
)
from minidiff.pipelines import StableDiffusion
from minidiff.train.t2i import T2IConfig, T2ITrainer, load_run_config

MIN_ATTRIBUTE, MIN_ALL = 0.9, 0.7


def grammar_prompts(count: int, seed: int) -> list[str]:
    """``count`` full captions with every attribute drawn uniformly."""
    rng = np.random.default_rng(seed)
    return [
        caption(**{name: CHOICES[name][rng.integers(len(CHOICES[name]))] for name in ATTRIBUTES})
        for _ in range(count)
    ]


def main(argv=None) -> int:
    parser = command_parser(None, __doc__)
    parser.add_argument("--checkpoint", help="check this run instead of training a new one")
    parser.add_argument("--out", default="runs/t2i-quality", help="where to train (without --checkpoint)")
    parser.add_argument("--prompts", type=int, default=40, help="prompts drawn from the grammar")
    parser.add_argument("--per-prompt", type=int, default=5, help="samples per prompt")
    parser.add_argument(
        "--steps", type=int, default=None, help="DDIM steps (default: the run's sample_steps)"
    )
    parser.add_argument("--guidance", type=float, default=None, help="default: the run's guidance")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="bench/t2i_quality.json", help="where to write the results")
    args = parser.parse_args(argv)

    run, train_seconds = trained_run(args.checkpoint, args.out, lambda: T2ITrainer(T2IConfig(), args.out))
    if run is None:
        return 1
    config = load_run_config(run) or T2IConfig()
    guidance = config.guidance if args.guidance is None else args.guidance
    steps = config.sample_steps if args.steps is None else args.steps
    pipe = StableDiffusion.from_pretrained(run)

    prompts = grammar_prompts(args.prompts, args.seed)
    start = time.perf_counter()
    images = []
    for i, prompt in enumerate(prompts):
        batch = pipe([prompt] * args.per_prompt, num_steps=steps, guidance=guidance, seed=args.seed + i)
        images.append(batch * 2 - 1)
    sample_seconds = time.perf_counter() - start
    images = np.concatenate(images)
    wanted = [parse_caption(p) for p in prompts for _ in range(args.per_prompt)]
    samples = score(images, wanted)
    held = load_shapes(len(images), image_size=config.image_size or 32, seed=config.seed, split="held_out")
    real = score(held.images, attributes_of(held))
    passed = all(samples[name] >= MIN_ATTRIBUTE for name in ATTRIBUTES) and samples["all"] >= MIN_ALL
    grid = Path(args.json).with_suffix(".png")
    save_grid(images[: 10 * args.per_prompt], grid, nrow=10, scale=2)

    print(
        f"{len(images)} samples ({args.prompts} prompts x {args.per_prompt}), guidance {guidance}, "
        f"{steps} DDIM steps"
    )
    print(f"{'attribute':<10} {'samples':>8} {'real held-out':>14}")
    for name in (*ATTRIBUTES, "all"):
        print(f"{name:<10} {samples[name]:>8.3f} {real[name]:>14.3f}")
    print(f"bar: each attribute >= {MIN_ATTRIBUTE}, all >= {MIN_ALL}: {'passed' if passed else 'FAILED'}")
    report = {
        **dated_machine(),
        "run": str(run),
        "train_seconds": train_seconds,
        "sample_seconds": sample_seconds,
        "prompts": args.prompts,
        "per_prompt": args.per_prompt,
        "guidance": guidance,
        "steps": steps,
        "samples": samples,
        "real_held_out": real,
        "passed": passed,
        "grid": str(grid),
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
