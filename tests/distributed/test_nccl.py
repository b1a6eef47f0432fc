"""The NCCL path (minidiff/distributed/nccl.py) against a stand-in for cupy.cuda.nccl, so its
wiring runs everywhere: the unique id made on rank 0 and broadcast, one allreduce per bucket on
the communication stream after the filling work, the compute stream waiting for it. On a GPU
machine with CuPy and two devices, ``mpiexec -n 2`` with ``device="cuda"`` runs the real one."""

from __future__ import annotations

import sys
import types

import numpy as np
import pytest

from minidiff.distributed.nccl import NcclAllreduce


class FakeArray:
    def __init__(self, size, dtype):
        self.size, self.dtype = size, np.dtype(dtype)
        self.data = types.SimpleNamespace(ptr=1000 + size)


@pytest.fixture
def fake_cupy(monkeypatch):
    log = []

    class Stream:
        def __init__(self, non_blocking=False, name="comm"):
            self.name, self.ptr = name, id(self)

        def record(self):
            log.append(("record", self.name))
            return ("event", self.name, len(log))

        def wait_event(self, event):
            log.append(("wait", self.name, event[1]))

    compute = Stream(name="compute")

    class Communicator:
        def __init__(self, size, uid, rank):
            log.append(("init", size, uid, rank))

        def allReduce(self, send, recv, count, dtype, op, stream):  # noqa: N802 (cupy's name)
            log.append(("allreduce", send, recv, count, dtype, op, stream))

    nccl = types.SimpleNamespace(
        get_unique_id=lambda: "uid-0",
        NcclCommunicator=Communicator,
        NCCL_SUM="sum",
        NCCL_FLOAT16="f16",
        NCCL_FLOAT32="f32",
        NCCL_FLOAT64="f64",
    )
    cuda = types.SimpleNamespace(Stream=Stream, get_current_stream=lambda: compute, nccl=nccl)
    cupy = types.SimpleNamespace(cuda=cuda, ndarray=FakeArray)
    monkeypatch.setitem(sys.modules, "cupy", cupy)
    monkeypatch.setitem(sys.modules, "cupy.cuda", cuda)
    monkeypatch.setitem(sys.modules, "cupy.cuda.nccl", nccl)
    return log


class FakeMPI:
    def __init__(self, rank):
        self.rank = rank

    def Get_rank(self):  # noqa: N802 (mpi4py's names)
        return self.rank

    def Get_size(self):  # noqa: N802
        return 2

    def bcast(self, value, root=0):
        return "uid-0"  # what rank 0 sent


@pytest.mark.parametrize("rank", [0, 1])
def test_nccl_sums_on_its_stream_after_the_fill(fake_cupy, rank):
    reduce = NcclAllreduce(FakeMPI(rank))
    assert ("init", 2, "uid-0", rank) in fake_cupy
    buffer = FakeArray(12, "float32")
    done = reduce.start(buffer)
    reduce.wait([done])
    calls = [e[0] for e in fake_cupy[1:]]
    assert calls == ["record", "wait", "allreduce", "record", "wait"]
    assert fake_cupy[2] == ("wait", "comm", "compute")  # the sum waits for the gradient copies
    assert fake_cupy[3] == (
        "allreduce",
        buffer.data.ptr,
        buffer.data.ptr,
        12,
        "f32",
        "sum",
        reduce.stream.ptr,
    )
    assert fake_cupy[5] == ("wait", "compute", "comm")  # the optimizer waits for the sum, on the GPU
    with pytest.raises(TypeError, match="NCCL sums CuPy arrays; got a ndarray"):
        reduce.start(np.zeros(3, np.float32))
