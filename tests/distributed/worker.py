"""One rank of a tiny training run, started by the tests under ``mpiexec -n N``:

    python worker.py CONFIG.json OUT [--resume] [--fail-at STEP --fail-rank R --how raise|kill|term]
                     [--report REPORT.json] [--stagger SECONDS]

Trains (or resumes) the run; with --report, rank 0 writes every rank's digests of the weights,
the EMA and the optimizer state, so a test can check that the ranks agree to the bit; with
--fail-at, rank R raises (or kills itself, or sends itself SIGTERM) at that step; with --stagger,
every rank but 0 waits that long before fit(), so rank 0 has begun writing the run."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import sys
import time

import numba
import numpy as np
from threadpoolctl import threadpool_info

from minidiff.train import TrainConfig, Trainer


def digest(arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--report")
    parser.add_argument("--fail-at", type=int)
    parser.add_argument("--fail-rank", type=int, default=1)
    parser.add_argument("--how", choices=("raise", "kill", "term"), default="raise")
    parser.add_argument("--stagger", type=float, default=0.0)
    args = parser.parse_args()
    values = json.loads(open(args.config).read())
    if args.resume:
        trainer = Trainer.resume(args.out, progress=False, steps=args.steps)
    else:
        trainer = Trainer(TrainConfig.from_dict(values), args.out, progress=False)
    if args.fail_at is not None and trainer.world.rank == args.fail_rank:
        step = trainer.train_step

        def failing_step():
            if trainer.step + 1 == args.fail_at:
                if args.how == "term":  # a request to stop, on this rank alone
                    os.kill(os.getpid(), signal.SIGTERM)
                    return step()
                if args.how == "kill":
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected failure at step {args.fail_at}")
            return step()

        trainer.train_step = failing_step
    if trainer.world.rank != 0:
        time.sleep(args.stagger)
    result = trainer.fit()
    if args.report:
        opt = trainer.optimizer
        mine = {
            "rank": trainer.world.rank,
            "size": trainer.world.size,
            "threads": trainer.world.threads.threads if trainer.world.threads else None,
            "numba_threads": numba.get_num_threads(),
            "blas_threads": sorted({i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}),
            "params": digest(p.data for p in trainer.params),
            "ema": digest(trainer.ema.shadow),
            "optimizer": digest(list(opt.m) + list(opt.v)) + f"/{opt.step_count}/{opt.steps}",
            "rng": json.dumps(trainer.rng.bit_generator.state, default=str),
            "step": result["step"],
        }
        everyone = trainer.world.gather(mine)
        if trainer.world.is_root:
            with open(args.report, "w") as f:
                json.dump(everyone, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
