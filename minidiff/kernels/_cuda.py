"""What the Numba CUDA kernels of the family files share: launch geometry and block reductions.

Two thread layouts cover every kernel:

- Elementwise kernels run a grid-stride loop: ``launch_elementwise(kernel, n, ...)`` starts
  ``min(MAX_BLOCKS, ceil(n / THREADS))`` blocks of ``THREADS`` threads, and thread k handles
  elements k, k + (threads in the grid), ... up to n.
- Reductions run one block per row (a group, a softmax row, a channel): ``launch_per_block(kernel,
  blocks, work, ...)`` starts ``blocks`` blocks of ``block_threads(work)`` threads (a power of two,
  at most ``THREADS``). Each thread accumulates its strided share of the row in float64, then
  ``block_sum`` (or ``block_max``) combines the per-thread values in a tree in shared memory: a fixed
  order of additions, so the result is the same at every run (no atomics).

``THREADS`` and ``MAX_BLOCKS`` are read at every launch, so the tests may lower them: under Numba's
CUDA simulator each thread is a Python thread, and a few threads striding over many elements also
exercise the loops that a GPU runs with large inputs. ``THREADS`` must stay a power of two no larger
than ``BUFFER``, the size of the shared reduction buffers (a compile-time constant).

The kernels are compiled on first use and cached on disk (``cache=True``) like the Numba CPU
ones; Numba keys a cached kernel on its own file, so after editing the device functions here,
delete Numba's cache folder (``minidiff info`` names it) to recompile the kernels that call them.
"""

from __future__ import annotations

import numpy as np

from minidiff.backend import get_array_module

from .machine import cuda

THREADS = 256  # threads per block (a power of two)
MAX_BLOCKS = 4096  # blocks of an elementwise launch; larger arrays loop over the grid
# float64 slots of a shared reduction buffer: the most threads a block may have (THREADS, unless
# raised up to this); a compile-time constant. No larger than needed: shared memory per block
# bounds how many blocks a multiprocessor runs at once.
BUFFER = 256


def block_threads(work: int) -> int:
    """Threads for one block over ``work`` elements: the power of two >= work, at most THREADS."""
    if THREADS & (THREADS - 1) or not 1 <= THREADS <= BUFFER:
        raise ValueError(f"_cuda.THREADS must be a power of two in [1, {BUFFER}], got {THREADS}")
    threads = 1
    while threads < min(work, THREADS):
        threads *= 2
    return threads


def elementwise_blocks(n: int) -> int:
    """How many blocks ``launch_elementwise`` starts for ``n`` elements (n >= 1)."""
    return min(MAX_BLOCKS, -(-n // block_threads(THREADS)))


def launch_stream(args):
    """The stream to launch on: CuPy's current stream when an argument is a CuPy array, so that the
    kernel runs after the CuPy work that made its inputs and before the CuPy work that reads its
    outputs (and CuPy's memory pool does not reuse a buffer the kernel still reads); else Numba's
    default stream (0, which CuPy's default stream also is)."""
    xp = get_array_module(*args)
    if xp is np:
        return 0
    ptr = xp.cuda.get_current_stream().ptr
    return cuda.external_stream(ptr) if ptr else 0


def launch_elementwise(kernel, n: int, *args) -> None:
    """Run a grid-stride ``kernel`` over ``n`` elements (no launch when n is 0)."""
    if n:
        kernel[elementwise_blocks(n), block_threads(THREADS), launch_stream(args)](*args)


def launch_per_block(kernel, blocks: int, work: int, *args) -> None:
    """Run ``kernel`` with one block per row, ``blocks`` rows of ``work`` elements each."""
    if blocks:
        kernel[blocks, block_threads(work), launch_stream(args)](*args)


@cuda.jit(device=True)
def block_sum(buf, value):
    """The sum of ``value`` over the threads of the block, returned to every thread.

    ``buf``: a shared float64 array of at least blockDim.x slots (a power of two)."""
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:  # a tree: each round adds the upper half of the slots to the lower half
        if t < half:
            buf[t] += buf[t + half]
        cuda.syncthreads()
        half //= 2
    total = buf[0]
    cuda.syncthreads()  # every thread has read the total before buf is written again
    return total


@cuda.jit(device=True)
def block_sum2(buf_a, buf_b, a, b):
    """``block_sum`` of two values at once (one tree, two buffers)."""
    t = cuda.threadIdx.x
    buf_a[t] = a
    buf_b[t] = b
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            buf_a[t] += buf_a[t + half]
            buf_b[t] += buf_b[t + half]
        cuda.syncthreads()
        half //= 2
    total_a, total_b = buf_a[0], buf_b[0]
    cuda.syncthreads()
    return total_a, total_b


@cuda.jit(device=True)
def block_max(buf, value):
    """The maximum of ``value`` over the threads of the block, returned to every thread."""
    t = cuda.threadIdx.x
    buf[t] = value
    cuda.syncthreads()
    half = cuda.blockDim.x // 2
    while half > 0:
        if t < half:
            buf[t] = max(buf[t], buf[t + half])
        cuda.syncthreads()
        half //= 2
    top = buf[0]
    cuda.syncthreads()
    return top


def device_scalars(dtype, *values):
    """``values`` as NumPy scalars of ``dtype``: the kernel then computes in that dtype (a Python
    float would make it compute in float64), as the reference does."""
    return tuple(dtype.type(v) for v in values)
