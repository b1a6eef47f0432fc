"""Noise schedules: beta_t for t = 0..T-1, float64."""

from __future__ import annotations

import math

import numpy as np
import pytest

from minidiff.diffusion import (
    SCHEDULES,
    GaussianDiffusion,
    cosine_betas,
    linear_betas,
    make_betas,
    sigmoid_betas,
)
from minidiff.testing import tolerance

TOL = tolerance(np.float64)


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("T", [1, 2, 10, 1000])
def test_every_schedule_is_float64_of_length_T_in_range(name, T):
    betas = make_betas(name, T)
    assert betas.dtype == np.float64
    assert betas.shape == (T,)
    assert np.all(betas > 0) and np.all(betas < 1)


def test_linear_endpoints_and_spacing():
    betas = linear_betas(1000)
    assert betas[0] == pytest.approx(1e-4, abs=1e-15)
    assert betas[-1] == pytest.approx(0.02, abs=1e-15)
    np.testing.assert_allclose(np.diff(betas), (0.02 - 1e-4) / 999, **TOL)
    np.testing.assert_array_equal(make_betas("linear", 1000), betas)
    np.testing.assert_allclose(linear_betas(5, 0.1, 0.5), [0.1, 0.2, 0.3, 0.4, 0.5], **TOL)


def _nichol_alpha_bar(t, T, s=0.008):
    return math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2


@pytest.mark.parametrize("T", [10, 1000])
def test_cosine_alpha_bar_formula(T):
    betas = cosine_betas(T)
    f0 = _nichol_alpha_bar(0, T)
    alpha_bar = np.cumprod(1 - betas)
    expected_betas = [min(1 - _nichol_alpha_bar(t + 1, T) / _nichol_alpha_bar(t, T), 0.999) for t in range(T)]
    np.testing.assert_allclose(betas, expected_betas, **TOL)
    # before any clipping, alpha_bar_t = f(t + 1) / f(0): the ratios telescope
    unclipped = betas < 0.999
    first_clipped = np.argmin(unclipped) if not unclipped.all() else T
    expected = np.array([_nichol_alpha_bar(t + 1, T) / f0 for t in range(first_clipped)])
    np.testing.assert_allclose(alpha_bar[:first_clipped], expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(make_betas("cosine", T), cosine_betas(T))


def test_cosine_is_clipped_at_0_999():
    betas = cosine_betas(1000)
    assert betas.max() == 0.999
    assert betas[-1] == 0.999  # alpha_bar(T) = cos^2(pi/2) = 0: the last beta would be 1
    assert np.all(np.diff(betas) >= 0)
    assert cosine_betas(1000, max_beta=0.5).max() == 0.5


def test_sigmoid_is_monotone_and_within_its_endpoints():
    betas = sigmoid_betas(1000)
    assert np.all(np.diff(betas) > 0)
    assert np.all(betas > 1e-4) and np.all(betas < 0.02)
    # the logistic curve is symmetric about its middle
    np.testing.assert_allclose(betas + betas[::-1], 1e-4 + 0.02, **TOL)
    x = np.linspace(-6, 6, 1000)
    np.testing.assert_allclose(betas, 1e-4 + (0.02 - 1e-4) / (1 + np.exp(-x)), **TOL)
    np.testing.assert_array_equal(make_betas("sigmoid", 1000), betas)


@pytest.mark.parametrize("name", ["Linear", "quadratic", ""])
def test_unknown_schedule(name):
    with pytest.raises(ValueError, match="unknown schedule"):
        make_betas(name, 10)


@pytest.mark.parametrize("T", [0, -5, 2.5, "10", None])
def test_bad_T(T):
    with pytest.raises(ValueError):
        make_betas("linear", T)


@pytest.mark.parametrize("betas", [[0.1, 1.0], [0.0, 0.1], [-0.1, 0.2], [[0.1, 0.2]], [0.1, np.nan]])
def test_diffusion_rejects_bad_betas(betas):
    with pytest.raises(ValueError):
        GaussianDiffusion(betas=betas)


def test_diffusion_rejects_bad_prediction():
    with pytest.raises(ValueError, match="prediction"):
        GaussianDiffusion(T=10, prediction="noise")


def test_diffusion_derived_quantities():
    d = GaussianDiffusion(schedule="linear", T=50)
    assert d.T == 50 and d.schedule == "linear"
    betas = linear_betas(50)
    np.testing.assert_array_equal(d.betas, betas)
    abar = np.cumprod(1 - betas)
    np.testing.assert_allclose(d.alphas_cumprod, abar, **TOL)
    np.testing.assert_allclose(d.alphas_cumprod_prev, np.concatenate([[1.0], abar[:-1]]), **TOL)
    np.testing.assert_allclose(d.sqrt_alphas_cumprod**2 + d.sqrt_one_minus_alphas_cumprod**2, 1.0, **TOL)
    np.testing.assert_allclose(d.snr, abar / (1 - abar), **TOL)
    assert GaussianDiffusion(betas=[0.1, 0.2]).schedule == "custom"
