"""GaussianDiffusion: the forward process, its posterior, the parameterizations, the training loss
and the variational bound, each against formulas written out independently here."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import norm

import minidiff as md
from minidiff.diffusion import PREDICTIONS, GaussianDiffusion, linear_betas
from minidiff.diffusion.gaussian import _discretized_gaussian_log_likelihood
from minidiff.nn import Parameter
from minidiff.testing import tolerance

TOL = tolerance(np.float64)
T = 1000
BETAS = linear_betas(T)
ABAR = np.cumprod(1.0 - BETAS)


def col(values):
    """(N,) -> (N, 1, 1, 1)."""
    return np.asarray(values, dtype=np.float64).reshape(-1, 1, 1, 1)


def oracle(x0, prediction, abar=ABAR):
    """A model that knows the clean images x0: from x_t it recovers the true noise and returns
    exactly the target of ``prediction``."""

    def model(x_t, t, y=None):
        a, s = col(np.sqrt(abar[t])), col(np.sqrt(1.0 - abar[t]))
        eps = (x_t.data - a * x0) / s
        out = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
        return md.tensor(out, dtype=x_t.dtype)

    return model


def pixels(rng, shape):
    """8-bit images scaled to [-1, 1], with both extreme values present."""
    x = rng.integers(0, 256, size=shape) / 255.0 * 2.0 - 1.0
    x.reshape(-1)[:2] = [-1.0, 1.0]
    return x


# -- q(x_t | x_0) -------------------------------------------------------------------------------


def test_q_sample_formula():
    d = GaussianDiffusion(T=T)
    rng = np.random.default_rng(0)
    x0, noise = rng.standard_normal((4, 2, 3, 3)), rng.standard_normal((4, 2, 3, 3))
    t = np.array([0, 10, 500, 999])
    expected = col(np.sqrt(ABAR[t])) * x0 + col(np.sqrt(1 - ABAR[t])) * noise
    np.testing.assert_allclose(d.q_sample(x0, t, noise), expected, **TOL)
    out32 = d.q_sample(x0.astype(np.float32), t, noise.astype(np.float32))
    assert out32.dtype == np.float32
    np.testing.assert_allclose(out32, expected, **tolerance(np.float32))


def test_q_sample_statistics():
    """For fixed x0 and many noise draws: mean sqrt(abar) x0 and variance 1 - abar, within
    five standard errors (a fixed seed, so the check is deterministic)."""
    d = GaussianDiffusion(T=T)
    rng = np.random.default_rng(1234)
    x0 = rng.uniform(-1, 1, size=(1, 3, 2, 2))
    steps, n = np.array([0, 99, 500, 999]), 4000
    t = np.repeat(steps, n)
    x = np.broadcast_to(x0, (len(t),) + x0.shape[1:]).copy()
    xt = d.q_sample(x, t, rng.standard_normal(x.shape)).reshape(len(steps), n, -1)
    for k, step in enumerate(steps):
        abar = ABAR[step]
        mean, var = xt[k].mean(axis=0), xt[k].var(axis=0, ddof=1)
        se_mean = math.sqrt((1 - abar) / n)
        se_var = (1 - abar) * math.sqrt(2.0 / (n - 1))
        assert np.all(np.abs(mean - math.sqrt(abar) * x0.reshape(-1)) < 5 * se_mean), step
        assert np.all(np.abs(var - (1 - abar)) < 5 * se_var), step


@pytest.mark.parametrize(
    "t, match",
    [
        (np.array([1, 2]), "t must be 3"),
        (np.array([[1], [2], [3]]), "t must be 3"),
        (np.array([1.0, 2.0, 3.0]), "integer"),
        (np.array([0, 1, T]), r"\[0, 1000\)"),
        (np.array([-1, 1, 2]), r"\[0, 1000\)"),
    ],
)
def test_q_sample_rejects_bad_timesteps(t, match):
    d = GaussianDiffusion(T=T)
    x0 = np.zeros((3, 1, 2, 2))
    with pytest.raises(ValueError, match=match):
        d.q_sample(x0, t, np.zeros_like(x0))


def test_q_sample_rejects_mis_shaped_noise():
    d = GaussianDiffusion(T=T)
    with pytest.raises(ValueError, match="noise"):
        d.q_sample(np.zeros((2, 1, 2, 2)), np.array([1, 2]), np.zeros((2, 1, 2, 3)))


# -- q(x_{t-1} | x_t, x_0) ------------------------------------------------------------------------


def bayes_posterior(x0, x_t, t):
    """Mean and variance of x_{t-1} given x_t and x0, by Bayes' rule for Gaussians:
    prior q(x_{t-1} | x0) = N(sqrt(abar_{t-1}) x0, 1 - abar_{t-1}), likelihood
    q(x_t | x_{t-1}) = N(sqrt(alpha_t) x_{t-1}, beta_t); at t = 0, x_{t-1} is x0 itself."""
    if t == 0:
        return x0, 0.0
    abar_prev, alpha, beta = ABAR[t - 1], 1.0 - BETAS[t], BETAS[t]
    precision = 1.0 / (1.0 - abar_prev) + alpha / beta
    var = 1.0 / precision
    mean = var * (math.sqrt(abar_prev) * x0 / (1.0 - abar_prev) + math.sqrt(alpha) * x_t / beta)
    return mean, var


def test_posterior_against_bayes_rule():
    d = GaussianDiffusion(T=T)
    rng = np.random.default_rng(2)
    steps = np.array([0, 1, 2, 50, 500, 998, 999])
    x0 = rng.standard_normal((len(steps), 2, 2, 2))
    x_t = rng.standard_normal(x0.shape)
    mean, var, log_var = d.q_posterior(x0, x_t, steps)
    assert mean.shape == x0.shape and var.shape == log_var.shape == (len(steps), 1, 1, 1)
    for i, step in enumerate(steps):
        expected_mean, expected_var = bayes_posterior(x0[i], x_t[i], int(step))
        np.testing.assert_allclose(mean[i], expected_mean, **TOL)
        np.testing.assert_allclose(var[i, 0, 0, 0], expected_var, rtol=1e-10, atol=1e-300)
        # the log-variance is clipped at t = 0 (where the variance is 0) to the value at t = 1
        clipped = bayes_posterior(x0[i], x_t[i], 1)[1] if step == 0 else expected_var
        np.testing.assert_allclose(log_var[i, 0, 0, 0], math.log(clipped), rtol=1e-10)


def test_posterior_follows_the_input_dtype():
    d = GaussianDiffusion(T=T)
    x = np.ones((2, 1, 2, 2), dtype=np.float32)
    mean, var, log_var = d.q_posterior(x, x, np.array([3, 4]))
    assert mean.dtype == var.dtype == log_var.dtype == np.float32


# -- what the network predicts ------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_split_prediction_recovers_eps_and_x0(prediction):
    d = GaussianDiffusion(T=T, prediction=prediction)
    rng = np.random.default_rng(3)
    t = np.array([0, 1, 250, 999])
    x0, eps = rng.standard_normal((4, 3, 2, 2)), rng.standard_normal((4, 3, 2, 2))
    a, s = col(np.sqrt(ABAR[t])), col(np.sqrt(1.0 - ABAR[t]))
    x_t = a * x0 + s * eps
    target = {"eps": eps, "x0": x0, "v": a * eps - s * x0}[prediction]
    np.testing.assert_allclose(d.target(x0, eps, t), target, **TOL)
    eps_hat, x0_hat = d.split_prediction(target, x_t, t)
    np.testing.assert_allclose(eps_hat, eps, **TOL)
    np.testing.assert_allclose(x0_hat, x0, **TOL)
    np.testing.assert_allclose(d.eps_from_x0(x0, x_t, t), eps, **TOL)


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [None, 1.0, 5.0])
def test_min_snr_weights(prediction, gamma):
    d = GaussianDiffusion(T=T, prediction=prediction, min_snr_gamma=gamma)
    t = np.array([0, 10, 100, 400, 999])
    snr = ABAR[t] / (1.0 - ABAR[t])
    if gamma is None:
        expected = np.ones(len(t))
    else:
        clipped = np.minimum(snr, gamma)
        expected = {"eps": clipped / snr, "x0": clipped, "v": clipped / (snr + 1.0)}[prediction]
    np.testing.assert_allclose(d.loss_weights(t), expected, **TOL)
    if gamma is not None and prediction == "eps":
        assert d.loss_weights(np.array([0]))[0] < 1.0 and d.loss_weights(np.array([999]))[0] == 1.0


# -- the training loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_training_loss_of_a_perfect_model_is_zero(prediction, gamma):
    d = GaussianDiffusion(T=T, prediction=prediction, min_snr_gamma=gamma)
    x0 = np.random.default_rng(4).uniform(-1, 1, size=(6, 2, 4, 4))
    loss = d.training_loss(oracle(x0, prediction), x0, generator=5)  # random t and noise
    assert isinstance(loss, md.Tensor) and loss.size == 1
    assert loss.item() < 1e-20


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_training_loss_is_the_weighted_mse(prediction, gamma):
    d = GaussianDiffusion(T=T, prediction=prediction, min_snr_gamma=gamma)
    rng = np.random.default_rng(6)
    x0, noise = rng.uniform(-1, 1, size=(3, 1, 2, 2)), rng.standard_normal((3, 1, 2, 2))
    t = np.array([0, 200, 999])
    out = rng.standard_normal(x0.shape)
    seen = {}

    def model(x_t, tt):
        seen["x_t"], seen["t"] = x_t.data.copy(), np.array(tt)
        return md.tensor(out, dtype="float64")

    loss = d.training_loss(model, x0, t=t, noise=noise)
    a, s = col(np.sqrt(ABAR[t])), col(np.sqrt(1.0 - ABAR[t]))
    np.testing.assert_allclose(seen["x_t"], a * x0 + s * noise, **TOL)
    np.testing.assert_array_equal(seen["t"], t)
    target = {"eps": noise, "x0": x0, "v": a * noise - s * x0}[prediction]
    if gamma is None:
        w = np.ones(3)
    else:
        snr = ABAR[t] / (1 - ABAR[t])
        w = {
            "eps": np.minimum(snr, gamma) / snr,
            "x0": np.minimum(snr, gamma),
            "v": np.minimum(snr, gamma) / (snr + 1),
        }[prediction]
    expected = np.mean(col(w) * (out - target) ** 2)
    np.testing.assert_allclose(loss.item(), expected, **TOL)


def test_training_loss_gradient_and_seeding():
    d = GaussianDiffusion(T=T)
    x0 = np.random.default_rng(7).uniform(-1, 1, size=(4, 1, 3, 3))
    w = Parameter(np.array([0.3]), dtype="float64")

    def model(x_t, t, y=None):
        return x_t * w

    t, noise = np.array([5, 50, 500, 900]), np.random.default_rng(8).standard_normal(x0.shape)
    loss = d.training_loss(model, x0, t=t, noise=noise)
    loss.backward()
    x_t = col(np.sqrt(ABAR[t])) * x0 + col(np.sqrt(1 - ABAR[t])) * noise
    np.testing.assert_allclose(loss.item(), np.mean((0.3 * x_t - noise) ** 2), **TOL)
    np.testing.assert_allclose(w.grad, [np.mean(2 * (0.3 * x_t - noise) * x_t)], **TOL)
    # the same seed draws the same t and noise
    with md.no_grad():
        a = d.training_loss(model, x0, generator=9).item()
        b = d.training_loss(model, x0, generator=np.random.default_rng(9)).item()
        c = d.training_loss(model, x0, generator=10).item()
    assert a == b and a != c


def test_training_loss_passes_class_labels():
    d = GaussianDiffusion(T=T)
    x0 = np.zeros((2, 1, 2, 2))
    seen = {}

    def model(x_t, t, y):
        seen["y"] = y
        return x_t

    d.training_loss(model, x0, y=np.array([1, 0]), generator=0)
    np.testing.assert_array_equal(seen["y"], [1, 0])


# -- the variational bound ------------------------------------------------------------------------


def expected_decoder_bits(x0, log_var):
    """-log2 P(x0) per dimension for a decoder N(x0, exp(log_var)) over 256 bins of [-1, 1]."""
    std = math.exp(0.5 * log_var)
    upper = norm.cdf((x0 + 1 / 255) - x0, scale=std) * np.ones_like(x0)
    lower = norm.cdf((x0 - 1 / 255) - x0, scale=std) * np.ones_like(x0)
    p = np.where(x0 <= -1 + 1e-9, upper, np.where(x0 >= 1 - 1e-9, 1 - lower, upper - lower))
    return -np.log2(p).reshape(len(x0), -1).mean(axis=1)


def expected_prior_bits(x0):
    """KL(N(sqrt(abar_T) x0, 1 - abar_T) || N(0, 1)) per dimension, in bits."""
    m, v = math.sqrt(ABAR[-1]) * x0, 1.0 - ABAR[-1]
    kl = 0.5 * (v + m**2 - 1.0 - math.log(v))
    return kl.reshape(len(x0), -1).mean(axis=1) / math.log(2)


@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_bits_per_dim_of_an_oracle_is_the_decoder(prediction):
    """With the posterior variance, a model that knows x0 makes every KL term vanish: what is
    left is the prior term (tiny for T = 1000) and the decoder's discretization cost."""
    d = GaussianDiffusion(T=T, prediction=prediction)
    x0 = pixels(np.random.default_rng(10), (2, 3, 4, 4))
    bpd = d.bits_per_dim(oracle(x0, prediction), x0, variance="posterior", generator=0)
    assert set(bpd) == {"total", "prior", "terms", "decoder"}
    assert all(v.shape == (2,) and v.dtype == np.float64 for v in bpd.values())
    np.testing.assert_allclose(bpd["terms"], 0.0, atol=1e-9)
    np.testing.assert_allclose(bpd["prior"], expected_prior_bits(x0), rtol=1e-8, atol=1e-15)
    # decoder log-variance at t = 0: the posterior variance at t = 1 (clipped, as in DDPM)
    var1 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    np.testing.assert_allclose(bpd["decoder"], expected_decoder_bits(x0, math.log(var1)), rtol=1e-8)
    np.testing.assert_allclose(bpd["total"], bpd["prior"] + bpd["terms"] + bpd["decoder"], **TOL)
    assert np.all(bpd["decoder"] > 1000 * bpd["prior"])


def test_bits_per_dim_of_an_oracle_with_beta_variance():
    """With sigma_t^2 = beta_t the means still agree, so each term is the KL between two
    zero-mean-difference Gaussians of variances beta~_t and beta_t, the same in every pixel."""
    d = GaussianDiffusion(T=T)
    x0 = pixels(np.random.default_rng(11), (2, 1, 4, 4))
    bpd = d.bits_per_dim(oracle(x0, "eps"), x0, variance="beta", generator=0)
    t = np.arange(1, T)
    post = BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t])
    kl = 0.5 * (-1.0 + np.log(BETAS[t]) - np.log(post) + post / BETAS[t])
    np.testing.assert_allclose(bpd["terms"], kl.sum() / math.log(2), rtol=1e-8)
    var1 = BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1])
    np.testing.assert_allclose(bpd["decoder"], expected_decoder_bits(x0, math.log(var1)), rtol=1e-8)


def test_bits_per_dim_estimate_with_sampled_timesteps():
    d = GaussianDiffusion(T=T)
    x0 = pixels(np.random.default_rng(12), (2, 1, 4, 4))
    model = oracle(x0, "eps")
    est = d.bits_per_dim(model, x0, variance="posterior", timesteps=5, generator=3)
    np.testing.assert_allclose(est["terms"], 0.0, atol=1e-9)
    beta = d.bits_per_dim(model, x0, variance="beta", timesteps=5, generator=3)
    again = d.bits_per_dim(model, x0, variance="beta", timesteps=5, generator=3)
    np.testing.assert_array_equal(beta["total"], again["total"])
    assert np.all(beta["terms"] > 0)


def test_bits_per_dim_rejects_bad_variance():
    d = GaussianDiffusion(T=10)
    with pytest.raises(ValueError, match="variance"):
        d.bits_per_dim(oracle(np.zeros((1, 1, 2, 2)), "eps"), np.zeros((1, 1, 2, 2)), variance="learned")


GRID = np.linspace(-1.0, 1.0, 256)  # the 256 bin centres of 8-bit data scaled to [-1, 1]


@pytest.mark.parametrize(
    "mean, std",
    [
        (0.0, 0.01),
        (0.3, 1e-3),
        (-0.999, 0.05),
        (0.5, 1.0),
        (1.7, 0.2),
        (-3.0, 2.0),
        (0.123, 1e-5),
        (GRID[100], 1e-4),
        (0.0, 30.0),
    ],
)
def test_discretized_gaussian_sums_to_one_over_the_bins(mean, std):
    log_p = _discretized_gaussian_log_likelihood(GRID, np.full(256, mean), 2 * math.log(std))
    assert np.all(np.isfinite(log_p))
    np.testing.assert_allclose(logsumexp(log_p), 0.0, atol=TOL["atol"])


@pytest.mark.parametrize("mean, std", [(0.0, 0.01), (0.3, 0.2), (-0.9, 0.5), (0.99, 0.02)])
def test_discretized_gaussian_against_scipy(mean, std):
    log_p = _discretized_gaussian_log_likelihood(GRID, np.full(256, mean), 2 * math.log(std))
    hi, lo = GRID + 1 / 255, GRID - 1 / 255
    # differences of the cdf below the mean, of the survival function above it (no cancellation)
    p = np.where(
        GRID > mean,
        norm.sf(lo, mean, std) - norm.sf(hi, mean, std),
        norm.cdf(hi, mean, std) - norm.cdf(lo, mean, std),
    )
    p[0], p[-1] = norm.cdf(hi[0], mean, std), norm.sf(lo[-1], mean, std)
    big = p > 1e-200
    np.testing.assert_allclose(log_p[big], np.log(p[big]), rtol=1e-9, atol=1e-12)


def test_discretized_gaussian_keeps_precision_in_the_tails():
    # 0.5 is ~50 standard deviations above the mean: Phi(upper) - Phi(lower) is 1 - 1 = 0 in
    # float64, but the bin's mass is the upper tail from its lower edge (the rest is ~e^-40 of it)
    x, mean = np.array([0.5, -0.5]), np.array([0.0, 0.0])
    log_p = _discretized_gaussian_log_likelihood(x, mean, 2 * math.log(0.01))
    expected = norm.logsf((0.5 - 1 / 255) / 0.01)
    assert expected < -1200
    np.testing.assert_allclose(log_p, [expected, expected], rtol=1e-12)
