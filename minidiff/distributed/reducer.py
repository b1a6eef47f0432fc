"""Gradient averaging in buckets, overlapped with backward (the scheme of PyTorch's DDP).

The parameters are grouped, in reverse order (backward finishes the last layers' gradients
first), into buckets of about 25 MiB of one dtype. ``backward(grad_ready=averager.ready)`` reports
each parameter as its gradient becomes final; when every gradient of a bucket is in, the bucket's
flat buffer is filled and a non-blocking allreduce of it starts, so the buckets travel while
backward computes the earlier layers. ``finish()`` starts what is left (a parameter that got no
gradient counts as zero), waits, and writes the sums back into ``p.grad``.

Buckets start strictly in order, 0, 1, 2, ...: a collective must be started in the same order on
every rank, and each rank's graph, and so the order its gradients finish in, is the same.

Each rank's gradient is of the mean loss over its own ``b`` images; it enters the sum weighted by
``b / n``, so the sum is the gradient of the mean over all ``n`` images of the step, the one the
one-process run computes (with equal shares of a power-of-two count of ranks the weight is exact).
"""

from __future__ import annotations

import os
import time

from ..backend import get_array_module

DEFAULT_BUCKET_BYTES = 25 << 20  # PyTorch DDP's bucket_cap_mb
BUCKET_VAR = "MINIDIFF_BUCKET_MB"


def bucket_bytes_from_env() -> int:
    value = os.environ.get(BUCKET_VAR)
    if not value:
        return DEFAULT_BUCKET_BYTES
    try:
        megabytes = float(value)
    except ValueError:
        raise ValueError(f"{BUCKET_VAR} must be a number of MiB, got {value!r}") from None
    if megabytes <= 0:
        raise ValueError(f"{BUCKET_VAR} must be positive, got {value!r}")
    return max(1, int(megabytes * (1 << 20)))


class _Bucket:
    def __init__(self, params):
        self.params = params
        xp = get_array_module(params[0].data)
        self.offsets, total = [], 0
        for p in params:
            self.offsets.append(total)
            total += p.data.size
        self.buffer = xp.empty(total, dtype=params[0].data.dtype)
        self.pending = 0
        self.handle = None

    def fill(self, weight):
        xp = get_array_module(self.buffer)
        for p, offset in zip(self.params, self.offsets):
            view = self.buffer[offset : offset + p.data.size]
            if p.grad is None:  # no gradient on this rank: it adds nothing to the sum
                view[...] = 0
            else:
                xp.multiply(p.grad.reshape(-1), weight, out=view, casting="same_kind")

    def write_back(self):
        for p, offset in zip(self.params, self.offsets):
            p.grad = self.buffer[offset : offset + p.data.size].reshape(p.data.shape).copy()


class GradientAverager:
    """Sums the ranks' weighted gradients of ``params`` over ``comm`` (see the module docstring).

    ``comm`` has ``start(buffer) -> handle`` (a non-blocking in-place sum), ``progress(handles)``
    (lets the library move pending messages) and ``wait(handles)``."""

    def __init__(self, params, comm, bucket_bytes: int = DEFAULT_BUCKET_BYTES):
        self.comm = comm
        params = [p for p in params if p.requires_grad]
        self.buckets, current, size = [], [], 0
        for p in reversed(params):
            nbytes = p.data.size * p.data.dtype.itemsize
            if current and (size + nbytes > bucket_bytes or p.data.dtype != current[0].data.dtype):
                self.buckets.append(_Bucket(current))
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self.buckets.append(_Bucket(current))
        self._bucket_of = {id(p): b for b in self.buckets for p in b.params}
        self.weight, self._next = 1.0, 0
        self.comm_seconds = 0.0  # time this rank spent inside the communication calls, summed

    def prepare(self, weight: float):
        """Before backward: this rank's gradients enter the sum times ``weight``."""
        self.weight, self._next = weight, 0
        for bucket in self.buckets:
            bucket.pending, bucket.handle = len(bucket.params), None

    def ready(self, param):
        """``backward``'s report that ``param.grad`` is final."""
        bucket = self._bucket_of.get(id(param))
        if bucket is None:
            return
        bucket.pending -= 1
        while self._next < len(self.buckets) and self.buckets[self._next].pending == 0:
            self._start(self.buckets[self._next])
        started = [b.handle for b in self.buckets[: self._next]]
        if started:
            begin = time.perf_counter()
            self.comm.progress(started)
            self.comm_seconds += time.perf_counter() - begin

    def _start(self, bucket):
        bucket.fill(self.weight)
        begin = time.perf_counter()
        bucket.handle = self.comm.start(bucket.buffer)
        self.comm_seconds += time.perf_counter() - begin
        self._next += 1

    def backward(self, loss, weight: float):
        """``loss.backward()`` with the buckets sent as they fill; the summed gradients in
        ``p.grad`` after it."""
        self.prepare(weight)
        loss.backward(grad_ready=self.ready)
        self.finish()

    def finish(self):
        """After backward: start the buckets still waiting, wait for all, set ``p.grad``."""
        while self._next < len(self.buckets):
            self._start(self.buckets[self._next])
        begin = time.perf_counter()
        self.comm.wait([b.handle for b in self.buckets])
        self.comm_seconds += time.perf_counter() - begin
        for bucket in self.buckets:
            bucket.write_back()
            bucket.handle = None
