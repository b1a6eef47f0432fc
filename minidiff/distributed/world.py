"""This process's place in a run: ``World`` (rank, size and the collectives the trainer uses).

A process started by ``mpiexec -n N`` (N > 1) joins the others through mpi4py; any other process
is a world of one and never imports MPI, so one-process training is unchanged where mpi4py or
an MPI library is missing.

A rank that raises would leave the others waiting in a collective forever, so in a world of
several ranks a process that exits without ``World.close()`` (an exception that escaped, a
``sys.exit``) calls ``MPI_Abort``: the launcher then stops every rank within seconds. A rank that
is killed outright is noticed by the launcher, which stops the others the same way.
"""

from __future__ import annotations

import atexit
import os
import sys

import numpy as np

from ..backend import to_device
from .reducer import GradientAverager, bucket_bytes_from_env
from .sharding import ShardedGenerator, shard_bounds
from .threads import apply_thread_plan

# the world sizes that MPI launchers put in each process's environment
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MV2_COMM_WORLD_SIZE")


class DistributedError(RuntimeError):
    pass


def launched_ranks() -> int:
    """How many ranks the MPI launcher started (1 outside one), from its environment."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 1


class _MPIAllreduce:
    """Non-blocking in-place sums of host arrays over an mpi4py communicator."""

    def __init__(self, comm):
        from mpi4py import MPI

        self.MPI, self.comm = MPI, comm

    def start(self, buffer):
        return self.comm.Iallreduce(self.MPI.IN_PLACE, buffer, op=self.MPI.SUM)

    def progress(self, handles):
        # MPICH and Open MPI move a non-blocking collective forward only inside MPI calls
        self.MPI.Request.Testall(handles)

    def wait(self, handles):
        self.MPI.Request.Waitall(handles)


class World:
    """One rank of ``size``. The world of one process (``World()``) runs every method without
    communicating."""

    def __init__(self, comm=None, device="cpu"):
        self.comm, self.device = comm, device
        self.rank = comm.Get_rank() if comm is not None else 0
        self.size = comm.Get_size() if comm is not None else 1
        self.threads = None  # the ThreadPlan applied, for a world of several ranks
        self.local_rank = 0  # among the ranks on this machine
        self._allreduce = None
        self._closed = comm is None

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    def __repr__(self):
        return f"World(rank={self.rank}, size={self.size}, device={self.device!r})"

    # -- splitting a step ---------------------------------------------------------------
    def shard(self, n: int) -> tuple[int, int]:
        """This rank's rows ``[lo, hi)`` of an ``n``-image batch."""
        return shard_bounds(n, self.rank, self.size)

    def generator(self, rng):
        """What this rank draws a step's randomness from: ``rng`` itself in a world of one,
        else a ShardedGenerator over it (``.shard(lo, hi, n)`` before each step)."""
        return rng if self.size == 1 else ShardedGenerator(rng)

    # -- collectives ----------------------------------------------------------------------
    def sum(self, value: float) -> float:
        """The sum over the ranks of a number (blocking)."""
        return value if self.comm is None else self.comm.allreduce(float(value))

    def any(self, flag: bool) -> bool:
        """Whether any rank passed True (blocking)."""
        return bool(flag) if self.comm is None else bool(self.comm.allreduce(int(bool(flag))))

    def from_root(self, value):
        """Rank 0's ``value`` (a picklable object) on every rank, for a decision made once where
        each rank looking for itself could see another answer (blocking)."""
        return value if self.comm is None else self.comm.bcast(value if self.is_root else None, root=0)

    def broadcast(self, arrays):
        """Overwrite each array (NumPy or CuPy) in place with rank 0's."""
        if self.comm is None:
            return
        for a in arrays:
            host = np.ascontiguousarray(to_device(a, "cpu"))
            self.comm.Bcast(host, root=0)
            if not self.is_root:
                a[...] = host if isinstance(a, np.ndarray) else to_device(host, self.device)

    def gather(self, value):
        """Rank 0 gets the list of every rank's ``value`` (a picklable object); others get None."""
        return [value] if self.comm is None else self.comm.gather(value, root=0)

    def averager(self, params, bucket_bytes=None):
        """A GradientAverager of ``params`` over this world (None in a world of one)."""
        if self.comm is None:
            return None
        if self._allreduce is None:
            self._allreduce = self._make_allreduce()
        return GradientAverager(params, self._allreduce, bucket_bytes or bucket_bytes_from_env())

    def _make_allreduce(self):
        if self.device == "cuda":
            from .nccl import NcclAllreduce

            return NcclAllreduce(self.comm)
        return _MPIAllreduce(self.comm)

    # -- the end ----------------------------------------------------------------------------
    def begin(self):
        """Mark the run as going on: exiting before ``close()`` aborts every rank."""
        self._closed = self.comm is None

    def close(self):
        """Mark a clean end: exiting after this does not abort the other ranks."""
        self._closed = True

    def fail(self, exc: BaseException):
        """Report ``exc`` from this rank and stop every rank (in a world of one: nothing)."""
        if self.comm is None:
            return
        sys.stderr.write(f"minidiff: rank {self.rank} of {self.size} failed: {type(exc).__name__}: {exc}\n")
        self._abort()

    def _abort_unless_closed(self):
        if not self._closed:
            self._abort()

    def _abort(self):
        sys.stderr.write(
            f"minidiff: rank {self.rank} of {self.size} stopped before the run ended; stopping every rank\n"
        )
        sys.stderr.flush()
        self.comm.Abort(1)


_worlds: dict[str, World] = {}  # one per process and device: MPI starts once, one exit guard


def setup(device: str = "cpu") -> World:
    """This process's World: a world of one unless an MPI launcher started several ranks."""
    if launched_ranks() <= 1:
        return World()
    if device not in _worlds:
        _worlds[device] = _join(device)
    return _worlds[device]


def _join(device: str) -> World:
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise DistributedError(
            f"this process is one of {launched_ranks()} MPI ranks but mpi4py cannot be imported ({exc}); "
            "install it with pip install 'minidiff[mpi]'"
        ) from None
    comm = MPI.COMM_WORLD
    if comm.Get_size() == 1:
        return World()
    world = World(comm, device)
    atexit.register(world._abort_unless_closed)
    local = comm.Split_type(MPI.COMM_TYPE_SHARED)
    local_rank, local_size = local.Get_rank(), local.Get_size()
    local.Free()
    world.local_rank = local_rank
    if device == "cuda":
        from .nccl import use_device

        use_device(local_rank)
    world.threads = apply_thread_plan(local_size)
    return world
