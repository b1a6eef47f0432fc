"""Normalization: group_norm (a fused kernel) and layer_norm."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from strategies import arrays, leaf

import minidiff as md
import minidiff.functional as F
from minidiff import kernels
from minidiff.testing import check_function, gradcheck, tolerance

EPS = 1e-5


def ref_group_norm(x, groups, weight, bias, eps):
    """Loop over (sample, group): mean, biased variance, normalize; then the affine per channel."""
    n, c = x.shape[:2]
    per = c // groups
    out = np.empty_like(x, dtype=np.float64)
    for b in range(n):
        for g in range(groups):
            block = x[b, g * per : (g + 1) * per].astype(np.float64)
            mean = block.sum() / block.size
            var = ((block - mean) ** 2).sum() / block.size
            out[b, g * per : (g + 1) * per] = (block - mean) / np.sqrt(var + eps)
    shape = (1, c) + (1,) * (x.ndim - 2)
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


AFFINE = ["none", "both", "weight", "bias"]


@st.composite
def group_norm_case(draw, affine=None):
    groups = draw(st.integers(1, 3))
    c = groups * draw(st.integers(1, 2))
    n = draw(st.integers(1, 2))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    if n * c * int(np.prod(spatial)) > 36:
        spatial = spatial[:1]
    # a variance well above eps: the numerical derivative of 1/sqrt(var + eps) stays accurate
    x = draw(arrays((n, c) + spatial))
    x += np.linspace(-2.0, 2.0, x.size).reshape(x.shape)
    affine = draw(st.sampled_from(AFFINE)) if affine is None else affine
    weight = draw(arrays((c,))) if affine in ("both", "weight") else None
    bias = draw(arrays((c,))) if affine in ("both", "bias") else None
    return x, groups, weight, bias


def _group_norm(groups):
    return lambda x, w, b: F.group_norm(x, groups, weight=w, bias=b, eps=EPS)


def _ref_group_norm(groups):
    return lambda x, w, b: ref_group_norm(x, groups, w, b, EPS)


@given(case=group_norm_case())
def test_group_norm(case):
    x, groups, weight, bias = case
    check_function(_group_norm(groups), [x, weight, bias], reference=_ref_group_norm(groups))


# Regression test, minidiff bug fixed in ec78413: functional.group_norm fills in a weight of ones
# when only bias is given, but not a bias of zeros when only weight is given, so the kernel raises
# 'pass both weight and bias, or neither'
def test_group_norm_with_weight_only():
    rng = np.random.default_rng(0)
    x, weight = rng.standard_normal((2, 4, 3)), rng.standard_normal(4)
    out = F.group_norm(leaf(x), 2, weight=leaf(weight), eps=EPS)
    np.testing.assert_allclose(out.numpy(), ref_group_norm(x, 2, weight, None, EPS), **tolerance(np.float64))
    assert gradcheck(lambda t, w: F.group_norm(t, 2, weight=w, eps=EPS), leaf(x), leaf(weight))


def ref_group_norm_silu(x, groups, weight, bias, shift, eps):
    """silu(group_norm(x + shift)) from the loop formula above, in float64."""
    z = x.astype(np.float64)
    if shift is not None:
        z = z + shift.reshape(shift.shape + (1,) * (x.ndim - 2))
    u = ref_group_norm(z, groups, weight, bias, eps)
    return u / (1 + np.exp(-u))


@st.composite
def group_norm_silu_case(draw):
    x, groups, weight, bias = draw(group_norm_case(affine=draw(st.sampled_from(["none", "both"]))))
    shift = draw(arrays(x.shape[:2])) if draw(st.booleans()) else None
    return x, groups, weight, bias, shift


@pytest.mark.parametrize("impl", [i for i in kernels.IMPLEMENTATIONS if kernels.available()[i][0]])
@given(case=group_norm_silu_case())
def test_group_norm_silu(impl, case):
    x, groups, weight, bias, shift = case
    with kernels.use(impl):
        check_function(
            lambda x, w, b, shift: F.group_norm_silu(x, groups, w, b, eps=EPS, shift=shift),
            [x, weight, bias, shift],
            reference=lambda x, w, b, shift: ref_group_norm_silu(x, groups, w, b, shift, EPS),
        )


def test_group_norm_silu_rejects_bad_input():
    x = md.tensor(np.ones((2, 4, 3, 3)))
    with pytest.raises(ValueError, match=r"group_norm_silu: shift must have shape \(2, 4\)"):
        F.group_norm_silu(x, 2, shift=md.tensor(np.ones((2, 3))))
    with pytest.raises(ValueError, match="group_norm_silu: num_groups=3"):
        F.group_norm_silu(x, 3)
    with pytest.raises(TypeError, match="group_norm_silu: x has dtype int64"):
        F.group_norm_silu(md.tensor(np.ones((2, 4), np.int64)), 2)


def ref_layer_norm(x, k, weight, bias, eps):
    lead = x.shape[: x.ndim - k]
    rows = x.reshape(lead + (-1,)).astype(np.float64)
    out = np.empty_like(rows)
    for idx in np.ndindex(*lead):
        row = rows[idx]
        mean = row.sum() / row.size
        var = ((row - mean) ** 2).sum() / row.size
        out[idx] = (row - mean) / np.sqrt(var + eps)
    out = out.reshape(x.shape)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out


@st.composite
def layer_norm_case(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    if int(np.prod(shape)) > 36:
        shape = shape[-2:]
    k = draw(st.integers(1, len(shape)))
    x = draw(arrays(shape))
    x += np.linspace(-2.0, 2.0, x.size).reshape(x.shape)  # variance well above eps
    normalized = shape[len(shape) - k :]
    weight = draw(arrays(normalized)) if draw(st.booleans()) else None
    bias = draw(arrays(normalized)) if draw(st.booleans()) else None
    as_int = k == 1 and draw(st.booleans())
    return x, (normalized[0] if as_int else normalized), weight, bias


@given(case=layer_norm_case())
def test_layer_norm(case):
    x, normalized, weight, bias = case
    k = 1 if isinstance(normalized, int) else len(normalized)
    check_function(
        lambda x, w, b: F.layer_norm(x, normalized, weight=w, bias=b, eps=EPS),
        [x, weight, bias],
        reference=lambda x, w, b: ref_layer_norm(x, k, w, b, EPS),
    )


@pytest.mark.parametrize("impl", sorted(kernels.implementations("group_norm_forward")))
@pytest.mark.parametrize("affine", [True, False])
def test_group_norm_under_each_kernel_implementation(impl, affine):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 3, 2)) * 2 + 1
    w, b = (rng.standard_normal(4), rng.standard_normal(4)) if affine else (None, None)
    with kernels.use(impl):
        for layout in (x, np.asfortranarray(x)):
            check_function(_group_norm(2), [layout, w, b], reference=_ref_group_norm(2), dtypes=[np.float64])


# -- bad input -----------------------------------------------------------------------------------------


def test_group_norm_rejects_group_count_that_does_not_divide_channels():
    x = md.tensor(np.ones((2, 6, 3)))
    for groups in (4, 0, -2, 2.0):
        with pytest.raises(
            ValueError,
            match=rf"group_norm: num_groups={groups!r} must be a positive divisor of the 6 channels "
            r"of x \(shape \(2, 6, 3\)\)",
        ):
            F.group_norm(x, groups)


def test_group_norm_rejects_bad_shapes_and_dtypes():
    with pytest.raises(
        ValueError, match=r"group_norm: x must have at least 2 dims \(N, C, ...\), got shape \(6,\)"
    ):
        F.group_norm(md.tensor(np.ones(6)), 2)
    x = md.tensor(np.ones((2, 6, 3)))
    with pytest.raises(ValueError, match=r"group_norm: weight must have shape \(6,\), got \(3,\)"):
        F.group_norm(x, 2, weight=md.tensor(np.ones(3)), bias=md.tensor(np.ones(6)))
    with pytest.raises(ValueError, match=r"group_norm: bias must have shape \(6,\), got \(2, 3\)"):
        F.group_norm(x, 2, weight=md.tensor(np.ones(6)), bias=md.tensor(np.ones((2, 3))))
    with pytest.raises(TypeError, match=r"group_norm: x has dtype int64"):
        F.group_norm(md.tensor(np.ones((2, 6), dtype=np.int64)), 2)


def test_layer_norm_float32_rows_whose_mean_dwarfs_their_spread():
    # Rows of values about 2.35 apart by 0.0025: the float32 mean is off by up to 1.2e-7 (half an
    # ulp), 1e-4 of the deviations; the normalized values must not inherit that error.
    x = np.array([[-2.34528764, -2.34778585], [1000.0, 1000.001], [0.5, 0.5001]], dtype=np.float32)
    weight, bias = np.array([0.5, 2.0], dtype=np.float32), np.array([1.0, 1.0], dtype=np.float32)
    out = F.layer_norm(md.tensor(x), 2, weight=md.tensor(weight), bias=md.tensor(bias), eps=1e-9)
    x64 = x.astype(np.float64)
    expected = ref_layer_norm(x64, 1, weight.astype(np.float64), bias.astype(np.float64), 1e-9)
    np.testing.assert_allclose(out.numpy(), expected, **tolerance(np.float32))


def test_layer_norm_rejects_bad_shapes():
    x = md.tensor(np.ones((2, 3, 4)))
    for normalized in [(3,), (2, 3), 5, ()]:
        with pytest.raises(
            ValueError, match=r"layer_norm: normalized_shape .* does not end x's shape \(2, 3, 4\)"
        ):
            F.layer_norm(x, normalized)
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(3, 4\), got \(4,\)"):
        F.layer_norm(x, (3, 4), weight=md.tensor(np.ones(4)))
    with pytest.raises(TypeError, match=r"layer_norm: x has dtype int64"):
        F.layer_norm(md.tensor(np.ones((2, 3), dtype=np.int64)), 3)
