"""What the Numba CPU kernels of the family files share: the serial and the parallel driver.

A kernel is written as a span function ``span(lo, hi, *args)``, the formula over items lo..hi of
its flat arrays (elements, or rows). The drivers run it over n items, serially (one span over
all of them) or over a prange of chunks of ``CHUNK`` items; one pair per span, made once here:

    _ADAM = _cpu.drivers(_adam_span)       # elementwise: the span writes its part of the output
    _ADAM.pick(param.size)(param.size, param, grad, ...)
    _LOSS = _cpu.sum_drivers(_sum_span)    # a reduction: the span returns its float64 part

``pick(size)`` gives the parallel driver from ``PARALLEL_MIN`` elements on (read at every call,
so benchmarks and tests may change it). A reduction is summed over chunks of ``CHUNK`` by both
drivers, the parts added in order, so a sum does not depend on the number of threads.

Why it is built this way (Numba):

- Two drivers rather than one function compiled twice: Numba's cache does not tell a parallel and a
  serial compilation of the same function apart.
- Spans loop over ``range(n)`` of slices (``x = x[lo:hi]``), never over ``range(lo, hi)`` of whole
  arrays: Numba cannot tell that such an index is never negative and keeps a wraparound check on
  every access, which stops LLVM from vectorizing.
- The drivers close over the span, given as a plain Python function (``register_jitable``): the
  cache keys a closure on its cell contents, pickled, and a jitted function pickles with an id
  drawn anew in every process, so the cached drivers would never be found again. The cells also
  hold the span's file's modification time and size: the cache checks only the drivers' own file
  (this one), and without them an edited span would keep running its old cached code.
- Scalars are passed as separate floats, never in a tuple (a tuple cannot enter a prange body),
  and each span rounds them to the data's dtype (``x.dtype.type(c)``) before its loop, so that the
  arithmetic stays in that dtype.
- ``error_model="numpy"``: x / 0 is inf or NaN, as in NumPy, not an exception.
"""

from __future__ import annotations

import os

import numpy as np

from .machine import njit, numba, prange

if numba is not None:
    from numba.extending import register_jitable
else:

    def register_jitable(**options):
        """Stand-in: leaves the function as Python (the kernels are never registered)."""
        return lambda fn: fn


CHUNK = 4096  # elements per task of the elementwise kernels and per part of a sum
# Below this many elements the kernels run on one thread: waking the sleeping OpenMP workers
# (OMP_WAIT_POLICY=PASSIVE, see minidiff/runtime.py) costs more than a pass over data that sits
# in the cache takes (bench/RESULTS.md).
PARALLEL_MIN = 1 << 20

OPTIONS = {"error_model": "numpy"}


class Drivers:
    """The serial and the parallel driver of one span."""

    __slots__ = ("serial", "parallel")

    def __init__(self, serial, parallel):
        self.serial = serial
        self.parallel = parallel

    def pick(self, size):
        """The driver for a kernel over ``size`` elements: parallel from PARALLEL_MIN on."""
        return self.parallel if size >= PARALLEL_MIN else self.serial


def _source_stamp(span):
    """The modification time and size of the span's file, as Numba's cache stamps a file."""
    st = os.stat(span.__code__.co_filename)
    return (st.st_mtime, st.st_size)


def drivers(span, chunk=CHUNK, **options):
    """The drivers of an elementwise ``span(lo, hi, *args)``, which writes items lo..hi of its
    output; the parallel one runs chunks of ``chunk`` items.

    ``options``: Numba options of the span, beyond ``error_model="numpy"``."""
    register_jitable(**OPTIONS, **options)(span)
    source = _source_stamp(span)

    @njit(cache=True, **OPTIONS)
    def serial(n, *args):
        source  # noqa: B018 (in the closure: keys the cache on the span's file)
        span(0, n, *args)

    @njit(parallel=True, cache=True, **OPTIONS)
    def parallel(n, *args):
        source  # noqa: B018
        for c in prange((n + chunk - 1) // chunk):
            lo = c * chunk
            span(lo, min(n, lo + chunk), *args)

    return Drivers(serial, parallel)


def sum_drivers(span, **options):
    """The drivers of a reduction: the float64 sum of ``span(lo, hi, *args)`` over the chunks of
    ``CHUNK`` items, added in order."""
    register_jitable(**OPTIONS, **options)(span)
    source = _source_stamp(span)

    @njit(cache=True, **OPTIONS)
    def serial(n, *args):
        source  # noqa: B018
        total = 0.0
        for c in range((n + CHUNK - 1) // CHUNK):
            lo = c * CHUNK
            total += span(lo, min(n, lo + CHUNK), *args)
        return total

    @njit(parallel=True, cache=True, **OPTIONS)
    def parallel(n, *args):
        source  # noqa: B018
        chunks = (n + CHUNK - 1) // CHUNK
        part = np.empty(chunks)
        for c in prange(chunks):
            lo = c * CHUNK
            part[c] = span(lo, min(n, lo + CHUNK), *args)
        total = 0.0
        for c in range(chunks):  # in order: the same sum as the serial driver
            total += part[c]
        return total

    return Drivers(serial, parallel)
