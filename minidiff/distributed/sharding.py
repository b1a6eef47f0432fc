"""Each rank's share of a global batch, and the random draws that make the ranks one run.

Every rank reads the whole global batch (the same images in the same order as one process) and
keeps rows ``[lo, hi)``. Every random draw of a step (timesteps, noise, dropout masks) is made
for the whole batch from the same generator, in the same order as one process makes it, and the
rank keeps its rows: the generators of all ranks stay in the one-process state, so a checkpoint
of any rank is the checkpoint of the one-process run.
"""

from __future__ import annotations

import numpy as np


def shard_bounds(n: int, rank: int, size: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of an ``n``-row batch that ``rank`` of ``size`` ranks takes: contiguous,
    in rank order, sizes differing by at most one."""
    if n < size:
        raise ValueError(f"a batch of {n} images cannot be split across {size} ranks (at least one each)")
    return rank * n // size, (rank + 1) * n // size


class ShardedGenerator:
    """A ``numpy.random.Generator`` stand-in for one rank's rows of a batch.

    A draw of shape ``(hi - lo, ...)`` is drawn from ``rng`` as ``(n, ...)``, the shape the
    one-process run draws, and rows ``[lo, hi)`` are returned. Draws of any other shape would
    leave the ranks' generators out of step with the one-process run, so they are refused."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng
        self.lo, self.hi, self.n = 0, 0, 0

    def shard(self, lo: int, hi: int, n: int) -> ShardedGenerator:
        """Set this step's rows ``[lo, hi)`` of ``n``."""
        self.lo, self.hi, self.n = lo, hi, n
        return self

    def _global_shape(self, size, what):
        shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size or ())
        if not shape or shape[0] != self.hi - self.lo:
            raise ValueError(
                f"distributed training: a {what} draw of shape {shape} is not one row per image of this "
                f"rank's {self.hi - self.lo} (rows {self.lo}:{self.hi} of {self.n}); only per-image draws "
                "can be made the one-process run's"
            )
        return (self.n,) + shape[1:]

    def integers(self, low, high=None, size=None, dtype=np.int64, endpoint=False):
        shape = self._global_shape(size, "integers")
        return self.rng.integers(low, high, size=shape, dtype=dtype, endpoint=endpoint)[self.lo : self.hi]

    def standard_normal(self, size=None, dtype=np.float64):
        shape = self._global_shape(size, "standard_normal")
        return self.rng.standard_normal(shape, dtype=dtype)[self.lo : self.hi]

    def random(self, size=None, dtype=np.float64):
        shape = self._global_shape(size, "random")
        return self.rng.random(shape, dtype=dtype)[self.lo : self.hi]
