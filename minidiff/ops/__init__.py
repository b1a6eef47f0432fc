"""Differentiable ops: one Function per op, over raw numpy/cupy arrays."""
