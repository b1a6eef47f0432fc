"""The tolerance table, ``TOLERANCES``, and its lookup by dtype."""

from __future__ import annotations

import numpy as np

# One table for every comparison in the test suite.
#   "gradcheck": analytic vs central-difference gradients, in float64;
#   float32 / float64: a fast kernel or op against its reference formula.
TOLERANCES = {
    "gradcheck": {"eps": 1e-6, "atol": 1e-5, "rtol": 1e-4},
    np.dtype(np.float32): {"atol": 1e-5, "rtol": 1e-4},
    np.dtype(np.float64): {"atol": 1e-10, "rtol": 1e-8},
}


def tolerance(dtype) -> dict:
    """``{"atol": ..., "rtol": ...}`` for comparing values of ``dtype``."""
    return dict(TOLERANCES[np.dtype(dtype)])
