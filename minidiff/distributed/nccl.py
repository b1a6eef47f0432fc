"""Gradient sums on GPUs: NCCL through CuPy (``cupy.cuda.nccl``), one GPU per rank.

Rank 0 makes the NCCL unique id and MPI broadcasts it; every rank then joins one NCCL
communicator. The sums run on a stream of their own: each waits (on the GPU, not the host) for
the work that filled its buffer, and the compute stream waits for the sums before the gradients
are read, so the host never blocks on communication during backward.
"""

from __future__ import annotations


def use_device(local_rank: int):
    """Make GPU ``local_rank mod (GPUs on this machine)`` this rank's current device."""
    import cupy

    count = cupy.cuda.runtime.getDeviceCount()
    cupy.cuda.Device(local_rank % count).use()


class NcclAllreduce:
    def __init__(self, mpi_comm):
        import cupy
        from cupy.cuda import nccl

        self.cupy, self.nccl = cupy, nccl
        uid = nccl.get_unique_id() if mpi_comm.Get_rank() == 0 else None
        uid = mpi_comm.bcast(uid, root=0)
        self.comm = nccl.NcclCommunicator(mpi_comm.Get_size(), uid, mpi_comm.Get_rank())
        self.stream = cupy.cuda.Stream(non_blocking=True)
        self._types = {
            "float16": nccl.NCCL_FLOAT16,
            "float32": nccl.NCCL_FLOAT32,
            "float64": nccl.NCCL_FLOAT64,
        }

    def start(self, buffer):
        if not isinstance(buffer, self.cupy.ndarray):
            raise TypeError(f"NCCL sums CuPy arrays; got a {type(buffer).__name__} (a CPU run uses MPI)")
        filled = self.cupy.cuda.get_current_stream().record()
        self.stream.wait_event(filled)
        self.comm.allReduce(
            buffer.data.ptr,
            buffer.data.ptr,
            buffer.size,
            self._types[buffer.dtype.name],
            self.nccl.NCCL_SUM,
            self.stream.ptr,
        )
        return self.stream.record()

    def progress(self, handles):
        pass  # NCCL progresses on the GPU by itself

    def wait(self, handles):
        current = self.cupy.cuda.get_current_stream()
        for done in handles:
            current.wait_event(done)
