"""Loss kernels (the fused MSE): every implementation against the reference, the reference
against the NumPy formula, long inputs over several chunks, the serial and the parallel drivers,
and bad inputs."""

from __future__ import annotations

import kernel_params as kp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minidiff.kernels import _cpu

FAST = ("numba", "native")


@pytest.mark.parametrize("op", ["mse_loss_forward", "mse_loss_backward"])
def test_every_op_has_a_reference_and_documents_it(op):
    kp.check_reference_and_doc(op)


@st.composite
def mse_cases(draw):
    """pred, target (any shape, long ones spanning several CHUNKs included) and gloss."""
    rng, shape, dtype, layout = draw(kp.cases(min_dims=0))
    if draw(st.booleans()):
        shape = (draw(st.integers(1, 3 * _cpu.CHUNK + 7)),)
        layout = draw(st.sampled_from(["contiguous", "strided"]))
    pred = kp.make_array(rng, shape, dtype, layout, scale=draw(st.sampled_from([0.1, 1.0, 10.0])))
    target = kp.make_array(rng, shape, dtype, layout)
    return pred, target, np.asarray(rng.standard_normal(), dtype=dtype)


@given(mse_cases())
def test_mse_reference_is_the_formula(case):
    pred, target, gloss = case
    dtype = pred.dtype
    diff = pred.astype(np.float64) - target.astype(np.float64)
    kp.close(kp.reference("mse_loss_forward")(pred, target), np.asarray(np.mean(diff**2)), dtype)
    kp.close(
        kp.reference("mse_loss_backward")(pred, target, gloss), 2 * diff * float(gloss) / diff.size, dtype
    )


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("op", ["mse_loss_forward", "mse_loss_backward"])
@pytest.mark.parametrize("name", FAST)
@given(case=mse_cases())
def test_mse_matches_the_reference(name, op, parallel, case):
    impl = kp.implementation(op, name)
    pred, target, gloss = case
    args = (pred, target) if op == "mse_loss_forward" else (pred, target, gloss)
    with kp.threads(parallel):
        out = impl(*args)
    kp.close(out, kp.reference(op)(*args), pred.dtype)


@pytest.mark.parametrize("impl", kp.impls("mse_loss_forward", FAST))
def test_mse_sum_does_not_depend_on_the_threads(impl):
    """The loss is summed over fixed chunks, in order: serial and parallel agree to the bit."""
    rng = np.random.default_rng(1)
    for n in (1, 5, _cpu.CHUNK - 1, _cpu.CHUNK, 7 * _cpu.CHUNK + 3):
        pred, target = rng.standard_normal(n), rng.standard_normal(n)
        with kp.threads(False):
            serial = impl(pred, target)
        with kp.threads(True):
            parallel = impl(pred, target)
        assert serial.shape == () and serial == parallel


@pytest.mark.parametrize("op", ["mse_loss_forward", "mse_loss_backward"])
@pytest.mark.parametrize("name", kp.CPU_IMPLEMENTATIONS)
def test_mse_rejects_bad_inputs(name, op):
    impl = kp.implementation(op, name)
    extra = (np.ones(()),) if op == "mse_loss_backward" else ()
    with pytest.raises(ValueError, match="shapes must match"):
        impl(np.zeros((2, 3)), np.zeros((3, 2)), *extra)
    with pytest.raises(TypeError, match="same dtype"):
        impl(np.zeros(3), np.zeros(3, np.float32), *extra)
    with pytest.raises(TypeError, match="float32 or float64"):
        impl(np.zeros(3, np.int32), np.zeros(3, np.int32), *extra)
    if op == "mse_loss_backward":
        with pytest.raises(ValueError, match="gloss must hold one value"):
            impl(np.zeros(3), np.zeros(3), np.ones(2))
