"""Data-parallel training across processes, on an existing engine: MPI (mpi4py) on CPUs, NCCL
(CuPy) on GPUs. Imported by train/ alone; the models and ops know nothing of it.

    mpiexec -n 4 minidiff train --batch-size 64      # 16 images per rank, the same run

world.py     World: this process's rank among the others (one process needs no MPI at all);
             launched_ranks() reads the launcher's environment without starting MPI
sharding.py  shard_bounds (each rank's rows of the global batch), ShardedGenerator (the random
             draws of the one-process run, this rank's rows of them)
reducer.py   GradientAverager: gradients summed in buckets, each started as soon as backward
             has finished its gradients
threads.py   ranks x threads = cores
nccl.py      the NCCL allreduce for CuPy arrays (one GPU per rank)
"""

from .reducer import DEFAULT_BUCKET_BYTES, GradientAverager
from .sharding import ShardedGenerator, shard_bounds
from .threads import ThreadPlan, apply_thread_plan, thread_plan
from .world import DistributedError, World, launched_ranks, setup

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "DistributedError",
    "GradientAverager",
    "ShardedGenerator",
    "ThreadPlan",
    "World",
    "apply_thread_plan",
    "launched_ranks",
    "setup",
    "shard_bounds",
    "thread_plan",
]
