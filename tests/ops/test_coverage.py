"""Every public op of minidiff.functional has tests here: a new op without them fails this check."""

from __future__ import annotations

import inspect
import pathlib
import re

import minidiff.functional as F

# Public functions of minidiff.functional that are not ops with a gradient and a formula to check.
NOT_OPS = {
    "constant_like": "makes a constant operand, no op (tests/test_autograd.py checks it)",
    "shape_op": "a helper that applies a shape Function (covered through every shape op)",
    "to_device": "needs a second device; tests/ops/test_elementwise.py checks the CPU round trip",
}


def public_ops():
    return sorted(
        name
        for name, fn in vars(F).items()
        if inspect.isfunction(fn) and fn.__module__ == F.__name__ and not name.startswith("_")
    )


def test_every_functional_op_is_tested():
    source = "\n".join(p.read_text() for p in pathlib.Path(__file__).parent.glob("test_*.py"))
    missing = [
        name for name in public_ops() if name not in NOT_OPS and not re.search(rf"\bF\.{name}\b", source)
    ]
    assert not missing, f"ops of minidiff.functional without tests in tests/ops: {missing}"
