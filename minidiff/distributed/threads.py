"""Threads per rank: the ranks on one machine share its cores, ranks x threads = cores.

Each rank left at the libraries' defaults would start one kernel thread and one BLAS thread per
core, and N ranks would run N threads on every core, each evicting the others' caches. A rank
sets Numba's threads, the OpenMP threads of the native kernels and the BLAS threads to
``cores // ranks on this machine`` (at least 1, at most the cores this process may run on).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

# how many ranks share this machine, as MPI launchers put it in each process's environment
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")


@dataclass(frozen=True)
class ThreadPlan:
    local_ranks: int  # ranks on this machine
    cores: int  # cores of this machine
    threads: int  # threads each rank runs
    source: str  # where local_ranks came from

    def describe(self) -> str:
        rank_word = "rank" if self.local_ranks == 1 else "ranks"
        thread_word = "thread" if self.threads == 1 else "threads"
        return (
            f"{self.local_ranks} {rank_word} on this machine x {self.threads} {thread_word} "
            f"(numba, native OpenMP, BLAS) for {self.cores} cores ({self.source})"
        )


def _local_ranks_from_env() -> tuple[int, str]:
    for var in _LOCAL_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), f"{var}={value}"
    return 1, "no MPI launcher"


def thread_plan(local_ranks: int | None = None) -> ThreadPlan:
    """The threads each rank runs when ``local_ranks`` ranks (default: as the launcher's
    environment says) share this machine."""
    source = "MPI shared-memory communicator"
    if local_ranks is None:
        local_ranks, source = _local_ranks_from_env()
    cores = os.cpu_count() or 1
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    threads = max(1, min(allowed, cores // max(1, local_ranks)))
    return ThreadPlan(local_ranks, cores, threads, source)


def apply_thread_plan(local_ranks: int) -> ThreadPlan:
    """Set this process's kernel and BLAS threads for ``local_ranks`` ranks on the machine."""
    import numba
    from threadpoolctl import threadpool_limits

    from .. import kernels  # noqa: F401  (loads the native extension and its OpenMP runtime first)

    plan = thread_plan(local_ranks)
    numba.set_num_threads(min(plan.threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(limits=plan.threads)  # every BLAS and OpenMP runtime loaded
    return plan
