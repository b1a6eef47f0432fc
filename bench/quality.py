"""Sample quality of the default training run.

Trains with the default settings (``minidiff train``'s defaults), or takes an
existing run with --checkpoint, samples with DDIM, and prints the FID against
held-out images next to the FID of as many real training images, the
classifier's mean confidence and the class histogram. The bar a default run
must pass: mean confidence >= 0.9 and every class present.

    python bench/quality.py                         # train (about 10 minutes), then evaluate
    python bench/quality.py --checkpoint runs/digits
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minidiff.bench.harness import command_parser, dated_machine, trained_run
from minidiff.train import TrainConfig, Trainer
from minidiff.train.evaluate import sample_quality_report

MIN_CONFIDENCE = 0.9


def main(argv=None) -> int:
    parser = command_parser(None, __doc__)
    parser.add_argument("--checkpoint", help="evaluate this run instead of training a new one")
    parser.add_argument("--out", default="runs/quality", help="where to train (without --checkpoint)")
    parser.add_argument("--num", type=int, default=500, help="samples to draw")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--json", default="bench/quality.json", help="where to write the results")
    args = parser.parse_args(argv)

    checkpoint, train_seconds = trained_run(
        args.checkpoint, args.out, lambda: Trainer(TrainConfig(), args.out)
    )
    if checkpoint is None:
        return 1
    report = sample_quality_report(checkpoint, num=args.num, steps=args.steps, guidance=args.guidance)
    classes = len(report["class_histogram"])
    passed = report["mean_confidence"] >= MIN_CONFIDENCE and min(report["class_histogram"]) > 0
    report.update(
        **dated_machine(),
        train_seconds=train_seconds,
        checkpoint=str(checkpoint),
        passed=passed,
    )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=1))

    rows = [
        ("FID samples vs held-out (classifier features)", f"{report['fid']:.3f}"),
        ("FID real training images vs held-out", f"{report['real_fid']:.3f}"),
        ("mean classifier confidence", f"{report['mean_confidence']:.3f} (bar {MIN_CONFIDENCE})"),
        ("classes present", f"{sum(c > 0 for c in report['class_histogram'])} of {classes}"),
        ("class histogram", " ".join(map(str, report["class_histogram"]))),
        ("classifier accuracy on held-out", f"{report['classifier_accuracy']:.3f}"),
    ]
    if "label_agreement" in report:
        rows.append(("samples classified as their label", f"{report['label_agreement']:.3f}"))
    if train_seconds is not None:
        rows.append(("training time", f"{train_seconds / 60:.1f} min"))
    rows.append(("result", "PASS" if passed else "FAIL"))
    width = max(len(name) for name, _ in rows)
    print(f"\nsample quality: {report['num_samples']} samples, {report['ddim_steps']} DDIM steps")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
