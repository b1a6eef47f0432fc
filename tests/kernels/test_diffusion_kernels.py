"""Diffusion kernels (q_sample, the DDPM and DDIM steps): every implementation
against the reference, the reference against NumPy formulas written out here, non-contiguous
inputs, the serial and the parallel drivers, and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from kernel_params import (
    CPU_IMPLEMENTATIONS,
    cases,
    check_reference_and_doc,
    close,
    implementation,
    impls,
    make_array,
    reference,
    threads,
)

from minidiff import kernels

DTYPES = (np.float32, np.float64)
FAST = ("numba", "native")
OPS = ("q_sample", "ddpm_step", "ddim_step")


def schedule(rng, T):
    """The float64 tables of a random schedule of length T."""
    abar = np.cumprod(1 - rng.uniform(1e-3, 0.3, size=T))
    return np.sqrt(abar), np.sqrt(1 - abar)


def q_sample_case(rng, shape, dtype, layout, T):
    x0 = make_array(rng, shape, dtype, layout)
    noise = make_array(rng, shape, dtype, layout)
    a, s = schedule(rng, T)
    return x0, noise, a, s, rng.integers(0, T, size=shape[0])


def per_sample(values, ndim):
    return values.reshape((-1,) + (1,) * (ndim - 1))


# -- the registry --------------------------------------------------------------------------------


@pytest.mark.parametrize("op", OPS)
def test_every_op_has_a_reference_and_documents_it(op):
    check_reference_and_doc(op)


# -- q_sample ------------------------------------------------------------------------------------


@given(cases(), st.integers(1, 30))
def test_q_sample_reference_is_the_formula(case, T):
    rng, shape, dtype, layout = case
    x0, noise, a, s, t = q_sample_case(rng, shape, dtype, layout, T)
    expected = per_sample(a[t], x0.ndim) * x0.astype(np.float64) + per_sample(s[t], x0.ndim) * noise
    close(reference("q_sample")(x0, noise, a, s, t), expected, dtype)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("impl", impls("q_sample", FAST))
@given(case=cases(), T=st.integers(1, 30))
def test_q_sample_matches_the_reference(impl, parallel, case, T):
    rng, shape, dtype, layout = case
    x0, noise, a, s, t = q_sample_case(rng, shape, dtype, layout, T)
    if rng.random() < 0.5:
        t = t.astype(np.int32)  # any integer dtype
    with threads(parallel):
        out = impl(x0, noise, a, s, t)
    close(out, reference("q_sample")(x0, noise, a, s, t), dtype)


@pytest.mark.parametrize("impl", impls("q_sample"))
@pytest.mark.parametrize(
    "t, match",
    [
        ([0, 1, 10], r"timesteps must lie in \[0, 10\), got 0..10"),
        ([-1, 0, 1], r"timesteps must lie in \[0, 10\)"),
        ([0, 1], "t must be 3 integer timesteps"),
        ([[0], [1], [2]], "t must be 3 integer timesteps"),
        ([0.0, 1.0, 2.0], "integer"),
    ],
)
def test_q_sample_rejects_bad_timesteps(impl, t, match):
    x0 = np.zeros((3, 2, 2))
    a, s = schedule(np.random.default_rng(0), 10)
    with pytest.raises(ValueError, match=match):
        impl(x0, x0.copy(), a, s, np.array(t))


@pytest.mark.parametrize("impl", impls("q_sample"))
def test_q_sample_rejects_bad_arrays(impl):
    a, s = schedule(np.random.default_rng(0), 10)
    x0, t = np.zeros((2, 3)), np.array([1, 2])
    with pytest.raises(ValueError, match="shapes must match"):
        impl(x0, np.zeros((2, 4)), a, s, t)
    with pytest.raises(TypeError, match="same dtype"):
        impl(x0, x0.astype(np.float32), a, s, t)
    with pytest.raises(TypeError, match="float32 or float64"):
        impl(x0.astype(np.int64), x0.astype(np.int64), a, s, t)
    with pytest.raises(TypeError, match="float64"):
        impl(x0, x0, a.astype(np.float32), s, t)
    with pytest.raises(ValueError, match="one length"):
        impl(x0, x0, a, s[:-1], t)
    with pytest.raises(ValueError, match=r"\(N, \.\.\.\)"):
        impl(np.zeros(()), np.zeros(()), a, s, t)


# -- the sampler steps ---------------------------------------------------------------------------


@st.composite
def step_cases(draw):
    """x_t, eps, x0 (beyond [-1, 1] at times), noise or None, the scalars, clip."""
    rng, shape, dtype, layout = draw(cases())
    x_t, eps, noise = (make_array(rng, shape, dtype, layout) for _ in range(3))
    x0 = make_array(rng, shape, dtype, layout, scale=2.0)
    scalars = tuple(rng.uniform(0.1, 1.0, size=5))
    return x_t, eps, x0, (noise if draw(st.booleans()) else None), scalars, draw(st.booleans())


def ddpm_args(case):
    x_t, _, x0, noise, (c0, ct, sigma, _, _), clip = case
    return (x_t, x0, noise, c0, ct, sigma), {"clip": clip}


def ddim_args(case):
    x_t, eps, x0, noise, (a, s, a_prev, direction, sigma), clip = case
    return (x_t, eps, x0, noise, a, s, a_prev, direction, sigma), {"clip": clip}


@given(step_cases())
def test_ddpm_step_reference_is_the_formula(case):
    x_t, _, x0, noise, (c0, ct, sigma, _, _), clip = case
    f = [a.astype(np.float64) if a is not None else None for a in (x_t, x0, noise)]
    x0_used = np.clip(f[1], -1, 1) if clip else f[1]
    expected = c0 * x0_used + ct * f[0] + (sigma * f[2] if noise is not None else 0.0)
    args, kwargs = ddpm_args(case)
    close(reference("ddpm_step")(*args, **kwargs), expected, x_t.dtype)


@given(step_cases())
def test_ddim_step_reference_is_the_formula(case):
    x_t, eps, x0, noise, (a, s, a_prev, direction, sigma), clip = case
    f = [v.astype(np.float64) if v is not None else None for v in (x_t, eps, x0, noise)]
    x0_used, eps_used = f[2], f[1]
    if clip:  # the eps that the clipped x0 implies
        x0_used = np.clip(f[2], -1, 1)
        eps_used = (f[0] - a * x0_used) / s
    expected = a_prev * x0_used + direction * eps_used  # a_prev: the sqrt_abar_prev given
    if noise is not None:
        expected = expected + sigma * f[3]
    args, kwargs = ddim_args(case)
    close(reference("ddim_step")(*args, **kwargs), expected, x_t.dtype)


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
@pytest.mark.parametrize("name", FAST)
@given(case=step_cases())
def test_steps_match_the_reference(name, op, parallel, case):
    impl = implementation(op, name)
    args, kwargs = (ddpm_args if op == "ddpm_step" else ddim_args)(case)
    with threads(parallel):
        out = impl(*args, **kwargs)
    close(out, reference(op)(*args, **kwargs), case[0].dtype)


@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
@pytest.mark.parametrize("name", CPU_IMPLEMENTATIONS)
def test_steps_keep_nan_through_the_clip(name, op):
    """NaN stays NaN, as with np.clip (a diverged model must not look converged)."""
    impl = implementation(op, name)
    zeros, x0 = np.zeros(4), np.array([np.nan, 3.0, -3.0, 0.5])
    if op == "ddpm_step":  # x_prev = 1 * clip(x0) + 0 * x_t
        out = impl(zeros, x0, None, 1.0, 0.0, 0.0, clip=True)
    else:  # x_prev = 1 * clip(x0) + 0 * eps, eps = (x_t - 1 * clip(x0)) / 1
        out = impl(zeros, zeros, x0, None, 1.0, 1.0, 1.0, 0.0, 0.0, clip=True)
    np.testing.assert_array_equal(out, [np.nan, 1.0, -1.0, 0.5])


@pytest.mark.parametrize("op", ["ddpm_step", "ddim_step"])
@pytest.mark.parametrize("name", CPU_IMPLEMENTATIONS)
def test_steps_reject_bad_inputs(name, op):
    impl = implementation(op, name)
    x = np.zeros((2, 3))
    pack = ddpm_args if op == "ddpm_step" else ddim_args
    for bad, error, match in [
        ((x, x, x[:, :2], None), ValueError, "shapes must match"),  # x0 of another shape
        ((x, x, x, x.astype(np.float32)), TypeError, "same dtype"),  # noise of another dtype
        ((x.astype(np.int64), x, x, None), TypeError, "float32 or float64"),
    ]:
        x_t, eps, x0, noise = bad
        args, kwargs = pack((x_t, eps, x0, noise, (0.5,) * 5, False))
        with pytest.raises(error, match=match):
            impl(*args, **kwargs)


# -- bit for bit what gaussian.py and the samplers did before the kernels --------------------------


@pytest.mark.parametrize("parallel", [False, True], ids=["serial", "parallel"])
@pytest.mark.parametrize("shape", [(4, 3, 5, 5), (4, 3, 33, 33)], ids=["one chunk", "several chunks"])
@pytest.mark.parametrize("name", ["reference", "numba"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_and_steps_are_bit_for_bit_the_previous_numpy_code(name, dtype, shape, parallel):
    """Coefficients rounded to the dtype as the (N, 1, 1, 1) coefficient arrays were, operations in
    the same order, no fused multiply-add (the native build may contract on some CPUs); with either
    driver, over one chunk or several with a ragged end."""
    rng = np.random.default_rng(0)
    x0, noise, x_t, eps = (rng.standard_normal(shape).astype(dtype) for _ in range(4))
    x0_pred = 2 * x0
    a, s = schedule(rng, 50)
    t = rng.integers(0, 50, size=4)
    col = lambda v: np.asarray(v, dtype=dtype).reshape(-1, 1, 1, 1)  # gaussian._per_sample
    impl = kernels.implementations("q_sample").get(name)
    if impl is None:
        pytest.skip(f"no {name} version")
    with threads(parallel):
        out = impl(x0, noise, a, s, t)
    np.testing.assert_array_equal(out, col(a[t]) * x0 + col(s[t]) * noise)

    c0, ct, sigma = 0.3, 0.6, 0.1
    clipped = np.clip(x0_pred, -1, 1)
    previous = col([c0] * 4) * clipped + col([ct] * 4) * x_t + np.float64(sigma).astype(dtype) * noise
    ddpm = kernels.implementations("ddpm_step")[name]
    with threads(parallel):
        out = ddpm(x_t, x0_pred, noise, c0, ct, sigma, clip=True)
    np.testing.assert_array_equal(out, previous)

    a_t, a_prev, direction = 0.49, 0.64, 0.5
    sa, ss, sp = np.sqrt(a_t), np.sqrt(1 - a_t), np.sqrt(a_prev)  # float64, as in ddim_sample
    eps_clipped = (x_t - col([sa] * 4) * clipped) / col([ss] * 4)  # diffusion.eps_from_x0
    previous = sp.astype(dtype) * clipped + np.float64(direction).astype(dtype) * eps_clipped
    ddim = kernels.implementations("ddim_step")[name]
    with threads(parallel):
        out = ddim(x_t, eps, x0_pred, None, sa, ss, sp, direction, 0.0, clip=True)
    np.testing.assert_array_equal(out, previous)
