"""Data-parallel training on one machine: 1 rank x T threads against N ranks x T/N threads.

Each configuration trains the same run (the same global batch, split across the ranks) for a few
steps after warm-up; per step it reports the median wall time (the slowest rank's), steps per
second, and the share of the step the ranks spent inside communication calls: the bucketed
gradient sums that overlap backward (time blocked in them) and the loss sum. It also times one
blocking allreduce of all the gradients, what the step would wait without the overlap.

    python bench/distributed.py                        # the `minidiff train` model, batch 32
    python bench/distributed.py --ranks 2 --steps 12 --warmup 3 --batch 32
    python bench/distributed.py --image-size 32 --mults 1 2 2   # the bench/unet.py model
    python bench/distributed.py --compute cifar        # seconds per image of the 35.7M U-Net step

Writes bench/distributed.json beside itself and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def train_config(args) -> dict:
    values = {"dataset": "digits", "batch_size": args.batch, "steps": 10**6, "seed": 0}
    values.update(sample_every=10**6, checkpoint_every=10**6, log_every=10**6)
    if args.image_size:
        values["image_size"] = args.image_size
    if args.mults:
        values["model"] = {"channel_mults": list(args.mults)}
    return values


def worker(args) -> int:
    """One rank: time ``args.steps`` training steps after ``args.warmup``."""
    import numpy as np

    from minidiff.train import TrainConfig, Trainer

    out = Path(tempfile.mkdtemp(prefix="minidiff-bench-distributed-"))
    try:
        trainer = Trainer(TrainConfig.from_dict(train_config(args)), out, progress=False)
        world = trainer.world
        world.broadcast([p.data for p in trainer.params])
        loss_seconds = [0.0]
        plain_sum = world.sum

        def timed_sum(value):
            start = time.perf_counter()
            result = plain_sum(value)
            loss_seconds[0] += time.perf_counter() - start
            return result

        world.sum = timed_sum
        for _ in range(args.warmup):
            trainer.train_step()
        steps, comm = [], []
        for _ in range(args.steps):
            if world.comm is not None:
                world.comm.Barrier()  # every rank starts the step together
            before = (trainer.averager.comm_seconds if trainer.averager else 0.0) + loss_seconds[0]
            start = time.perf_counter()
            trainer.train_step()
            steps.append(time.perf_counter() - start)
            after = (trainer.averager.comm_seconds if trainer.averager else 0.0) + loss_seconds[0]
            comm.append(after - before)
        blocking = None
        if world.comm is not None:  # one blocking sum of every gradient, for comparison
            from mpi4py import MPI

            flat = np.ones(sum(p.data.size for p in trainer.params), np.float32)
            times = []
            for _ in range(5):
                world.comm.Barrier()
                start = time.perf_counter()
                world.comm.Allreduce(MPI.IN_PLACE, flat, op=MPI.SUM)
                times.append(time.perf_counter() - start)
            blocking = statistics.median(times)
        mine = {
            "step_s": statistics.median(steps),
            "comm_s": statistics.median(comm),
            "blocking_allreduce_s": blocking,
            "threads": world.threads.threads if world.threads else None,
            "buckets": len(trainer.averager.buckets) if trainer.averager else 0,
            "parameters": int(sum(p.data.size for p in trainer.params)),
        }
        everyone = world.gather(mine)
        if world.is_root:
            Path(args.report).write_text(json.dumps(everyone))
        world.close()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


def run_configuration(ranks, args) -> dict:
    report = Path(tempfile.mkstemp(suffix=".json")[1])
    command = [sys.executable, __file__, "--worker", "--report", str(report)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch", str(args.batch)]
    if args.image_size:
        command += ["--image-size", str(args.image_size)]
    if args.mults:
        command += ["--mults"] + [str(m) for m in args.mults]
    if ranks > 1:
        beside_python = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
        mpiexec = shutil.which("mpiexec", path=beside_python)
        if mpiexec is None:
            raise SystemExit("bench/distributed.py: no mpiexec (pip install 'minidiff[mpi]')")
        command = [mpiexec, "-n", str(ranks)] + command
    subprocess.run(command, check=True, timeout=1800)
    ranks_report = json.loads(report.read_text())
    report.unlink()
    step = max(r["step_s"] for r in ranks_report)
    comm = max(r["comm_s"] for r in ranks_report)
    threads = ranks_report[0]["threads"] or (os.cpu_count() or 1)
    return {
        "ranks": ranks,
        "threads_per_rank": threads,
        "step_ms": 1e3 * step,
        "steps_per_s": 1 / step,
        "comm_ms": 1e3 * comm,
        "comm_share": comm / step,
        "blocking_allreduce_ms": 1e3 * ranks_report[0]["blocking_allreduce_s"]
        if ranks_report[0]["blocking_allreduce_s"] is not None
        else None,
        "buckets": ranks_report[0]["buckets"],
        "parameters": ranks_report[0]["parameters"],
    }


def compute(args) -> int:
    """Seconds per image of one training step (forward, backward, Adam) of a large U-Net here."""
    from minidiff.bench import median_seconds
    from minidiff.bench.unet import make_steps

    cfg = dict(
        in_channels=3,
        base_channels=128,
        channel_mults=(1, 2, 2, 2),
        num_res_blocks=2,
        attn_resolutions=(16,),
        image_size=32,
    )
    step, _, count = make_steps("minidiff", cfg, args.batch)
    seconds = median_seconds(step, repeats=args.steps, warmup=args.warmup)
    result = {"model": "cifar", "parameters": count, "batch": args.batch, "step_s": seconds}
    result["seconds_per_image"] = seconds / args.batch
    print(json.dumps(result))
    return 0


def format_table(rows, machine) -> str:
    lines = [
        f"{machine['processor']}, {machine['cores']} cores; model of {rows[0]['parameters']:,} parameters",
        "| ranks x threads | step (ms) | steps/s | in communication (ms) | share | blocking allreduce (ms) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        blocking = f"{r['blocking_allreduce_ms']:.2f}" if r["blocking_allreduce_ms"] is not None else "-"
        lines.append(
            f"| {r['ranks']} x {r['threads_per_rank']} | {r['step_ms']:.1f} | {r['steps_per_s']:.2f} | "
            f"{r['comm_ms']:.2f} | {100 * r['comm_share']:.1f}% | {blocking} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/distributed.py", description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the data-parallel run (default 2)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--batch", type=int, default=32, help="global batch (default 32)")
    parser.add_argument("--image-size", type=int, help="digits resized to this size")
    parser.add_argument("--mults", type=int, nargs="+", help="the U-Net's channel multipliers")
    parser.add_argument("--compute", choices=("cifar",), help="time one step of a large U-Net instead")
    parser.add_argument("--json", default=str(HERE / "distributed.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--report", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if args.compute:
        return compute(args)
    from minidiff.bench.harness import machine

    rows = [run_configuration(1, args), run_configuration(args.ranks, args)]
    info = machine()
    report = {"command": " ".join(sys.argv), "machine": info, "rows": rows, "date": time.strftime("%Y-%m-%d")}
    Path(args.json).write_text(json.dumps(report, indent=1))
    print(format_table(rows, info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
