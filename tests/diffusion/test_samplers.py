"""Samplers: DDPM (Algorithm 2 of Ho et al.), DDIM, classifier-free guidance, on tiny toy models
(closures of x and t), so every test runs in milliseconds."""

from __future__ import annotations

import math

import numpy as np
import pytest

import minidiff as md
from minidiff.diffusion import GaussianDiffusion, ddim_sample, ddim_timesteps, ddpm_sample, model_output
from minidiff.testing import tolerance

T = 100
SHAPE = (3, 2, 4, 4)
NULL = 3  # the toy conditional model's "null" class


def toy(x, t, y=None):
    """A fixed function of x and t: 0.3 x + 0.002 t (per image)."""
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
    return md.tensor(0.3 * x.data + (0.002 * t).astype(x.dtype), dtype=x.dtype)


def toy_conditional(x, t, y):
    """Depends on the class: x (0.1 + 0.05 y) + 0.02 y + 0.001 t."""
    y = np.asarray(y, dtype=np.float64).reshape(-1, 1, 1, 1)
    t = np.asarray(t, dtype=np.float64).reshape(-1, 1, 1, 1)
    return md.tensor(x.data * (0.1 + 0.05 * y) + 0.02 * y + 0.001 * t, dtype=x.dtype)


class Spy:
    """Records the inputs of every call."""

    def __init__(self, fn=toy):
        self.fn, self.calls = fn, []

    def __call__(self, x, t, *rest):
        self.calls.append((x.data.copy(), np.array(t), *rest))
        return self.fn(x, t, *rest)


def diffusion(prediction="eps"):
    return GaussianDiffusion(T=T, schedule="linear", prediction=prediction)


# -- reproducibility --------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_the_same_seed_gives_the_same_samples(sampler):
    d = diffusion()
    a = sampler(toy, d, SHAPE, generator=0)
    b = sampler(toy, d, SHAPE, generator=0)
    c = sampler(toy, d, SHAPE, generator=np.random.default_rng(0))
    e = sampler(toy, d, SHAPE, generator=1)
    assert a.shape == SHAPE and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    assert not np.allclose(a, e)
    assert sampler(toy, d, SHAPE, generator=0, dtype=np.float64).dtype == np.float64


def test_ddim_eta_0_is_deterministic_given_x_T():
    d = diffusion()
    spy = Spy()
    g = np.random.default_rng(42)
    out = ddim_sample(spy, d, SHAPE, steps=10, eta=0.0, generator=g, clip_denoised=False, dtype=np.float64)
    # only x_T was drawn
    reference = np.random.default_rng(42)
    x_T = reference.standard_normal(SHAPE)
    assert g.standard_normal() == reference.standard_normal()
    np.testing.assert_array_equal(spy.calls[0][0], x_T)
    # and the rest is the deterministic DDIM update, written out here
    abar = np.cumprod(1 - d.betas)
    times = ddim_timesteps(T, 10)
    x = x_T
    for i, step in enumerate(times):
        eps = 0.3 * x + 0.002 * step
        x0 = (x - math.sqrt(1 - abar[step]) * eps) / math.sqrt(abar[step])
        a_prev = abar[times[i + 1]] if i + 1 < len(times) else 1.0
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
    np.testing.assert_allclose(out, x, **tolerance(np.float64))
    # a different seed: a different x_T, a different sample
    spy2 = Spy()
    out2 = ddim_sample(spy2, d, SHAPE, steps=10, eta=0.0, generator=43, clip_denoised=False, dtype=np.float64)
    assert not np.allclose(spy2.calls[0][0], x_T) and not np.allclose(out2, out)


# -- timesteps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "T_, steps", [(1000, 50), (1000, 1000), (1000, 999), (1000, 2), (100, 7), (10, 3), (2, 2)]
)
def test_ddim_timesteps(T_, steps):
    times = ddim_timesteps(T_, steps)
    assert times[0] == T_ - 1 and times[-1] == 0
    assert len(times) == steps == len(np.unique(times))
    assert np.all(np.diff(times) < 0)
    assert np.issubdtype(times.dtype, np.integer)


def test_ddim_single_step_starts_at_T_minus_1():
    # one DDIM step must denoise pure noise x_T: it is taken at t = T-1, not at t = 0
    np.testing.assert_array_equal(ddim_timesteps(1000, 1), [999])


@pytest.mark.parametrize("steps", [0, -1, T + 1])
def test_ddim_timesteps_rejects_bad_steps(steps):
    with pytest.raises(ValueError, match="steps"):
        ddim_timesteps(T, steps)


@pytest.mark.parametrize(
    "sampler, expected",
    [
        (ddpm_sample, list(range(T - 1, -1, -1))),
        (ddim_sample, list(ddim_timesteps(T, 20))),
    ],
)
def test_the_model_sees_every_timestep_once(sampler, expected):
    spy = Spy()
    kwargs = {"steps": 20} if sampler is ddim_sample else {}
    sampler(spy, diffusion(), SHAPE, generator=0, **kwargs)
    ts = [c[1] for c in spy.calls]
    assert all(t.shape == (SHAPE[0],) and np.all(t == t[0]) for t in ts)
    assert [int(t[0]) for t in ts] == expected


def test_progress_wraps_the_steps():
    seen = []

    def progress(steps):
        steps = list(steps)
        seen.append(len(steps))
        return steps

    ddpm_sample(toy, diffusion(), SHAPE, generator=0, progress=progress)
    ddim_sample(toy, diffusion(), SHAPE, steps=10, generator=0, progress=progress)
    assert seen == [T, 10]


# -- DDPM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variance", ["beta", "posterior"])
def test_ddpm_without_clipping_is_algorithm_2(variance):
    """x_{t-1} = (x_t - beta_t / sqrt(1 - abar_t) eps) / sqrt(alpha_t) + sigma_t z, z = 0 at the
    last step, with sigma_t^2 = beta_t or the posterior variance."""
    d = diffusion()
    out = ddpm_sample(toy, d, SHAPE, generator=5, variance=variance, clip_denoised=False, dtype=np.float64)
    rng = np.random.default_rng(5)
    betas = d.betas.copy()
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    x = rng.standard_normal(SHAPE)
    for t in range(T - 1, -1, -1):
        eps = 0.3 * x + 0.002 * t
        z = rng.standard_normal(SHAPE) if t > 0 else 0.0
        var = betas[t] if variance == "beta" else betas[t] * (1 - abar_prev[t]) / (1 - abar[t])
        x = (x - betas[t] / math.sqrt(1 - abar[t]) * eps) / math.sqrt(alphas[t]) + math.sqrt(var) * z
    np.testing.assert_allclose(out, x, **tolerance(np.float64))


@pytest.mark.parametrize("prediction", ["eps", "x0", "v"])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_ddim_eta_1_with_all_steps_is_ddpm_with_posterior_variance(prediction, dtype):
    """Both samplers draw x_T, then one noise array per step t = T-1..1 (none at t = 0), from the
    same generator in the same order, so with a shared seed their samples coincide."""
    d = diffusion(prediction)
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    ddpm = ddpm_sample(toy, d, SHAPE, generator=g1, variance="posterior", clip_denoised=False, dtype=dtype)
    ddim = ddim_sample(toy, d, SHAPE, steps=T, eta=1.0, generator=g2, clip_denoised=False, dtype=dtype)
    assert g1.standard_normal() == g2.standard_normal()  # the same number of draws
    assert ddim.dtype == ddpm.dtype == dtype
    np.testing.assert_allclose(ddim, ddpm, **tolerance(dtype))


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_clip_denoised_keeps_the_final_sample_in_range(sampler):
    d = diffusion("x0")

    def wild(x, t):  # predicts x0 far outside [-1, 1]
        return md.tensor(5.0 * x.data + 3.0, dtype=x.dtype)

    clipped = sampler(wild, d, SHAPE, generator=0, clip_denoised=True)
    assert clipped.min() >= -1.0 and clipped.max() <= 1.0
    free = sampler(wild, d, SHAPE, generator=0, clip_denoised=False)
    assert np.abs(free).max() > 1.0


# -- classifier-free guidance ------------------------------------------------------------------------


def test_guidance_1_is_the_conditional_output():
    d = diffusion()
    rng = np.random.default_rng(0)
    x, t, y = rng.standard_normal(SHAPE), np.array([5, 50, 99]), np.array([0, 2, 1])
    cond = model_output(toy_conditional, d, x, t, y)
    expected = toy_conditional(md.tensor(x, dtype="float64"), t, y).data
    np.testing.assert_allclose(cond, expected, **tolerance(np.float64))
    guided = model_output(toy_conditional, d, x, t, y, guidance=1.0, null_class=NULL)
    np.testing.assert_allclose(guided, cond, **tolerance(np.float64))


@pytest.mark.parametrize("guidance", [0.0, 0.5, 3.0, 7.5])
def test_guidance_mixing_formula(guidance):
    d = diffusion()
    rng = np.random.default_rng(1)
    x, t, y = rng.standard_normal(SHAPE), np.array([1, 2, 3]), np.array([2, 0, 1])
    spy = Spy(toy_conditional)
    out = model_output(spy, d, x, t, y, guidance=guidance, null_class=NULL)
    xt = md.tensor(x, dtype="float64")
    cond = toy_conditional(xt, t, y).data
    uncond = toy_conditional(xt, t, np.full(3, NULL)).data
    np.testing.assert_allclose(out, uncond + guidance * (cond - uncond), **tolerance(np.float64))
    assert len(spy.calls) == 1  # conditional and null halves in one batch
    np.testing.assert_array_equal(spy.calls[0][2], [2, 0, 1, NULL, NULL, NULL])


def test_unconditional_model_output_passes_no_labels():
    d = diffusion()
    x = np.ones(SHAPE)
    np.testing.assert_allclose(model_output(toy, d, x, np.zeros(3, dtype=int)), 0.3 * x)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampling_with_guidance_1_is_conditional_sampling(eta):
    d = diffusion()
    y = np.array([0, 1, 2])
    plain = ddim_sample(toy_conditional, d, SHAPE, steps=10, eta=eta, generator=3, y=y, dtype=np.float64)
    guided = ddim_sample(
        toy_conditional,
        d,
        SHAPE,
        steps=10,
        eta=eta,
        generator=3,
        y=y,
        guidance=1.0,
        null_class=NULL,
        dtype=np.float64,
    )
    np.testing.assert_allclose(guided, plain, **tolerance(np.float64))
    strong = ddpm_sample(toy_conditional, d, SHAPE, generator=3, y=y, guidance=4.0, null_class=NULL)
    assert strong.shape == SHAPE and np.all(np.isfinite(strong))


def test_guidance_needs_the_null_class():
    with pytest.raises(ValueError, match="null"):
        labels = np.zeros(3, dtype=int)
        model_output(toy_conditional, diffusion(), np.zeros(SHAPE), labels, labels, guidance=2.0)


# -- argument checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", [ddpm_sample, ddim_sample])
def test_samplers_reject_bad_shapes_and_labels(sampler):
    with pytest.raises(ValueError, match="shape"):
        sampler(toy, diffusion(), (4,), generator=0)
    with pytest.raises(ValueError, match="one class per image"):
        sampler(toy_conditional, diffusion(), SHAPE, generator=0, y=np.array([0, 1]))


def test_ddpm_rejects_unknown_variance():
    with pytest.raises(ValueError, match="variance"):
        ddpm_sample(toy, diffusion(), SHAPE, variance="learned")


def test_ddim_rejects_bad_eta_and_steps():
    with pytest.raises(ValueError, match="eta"):
        ddim_sample(toy, diffusion(), SHAPE, eta=-0.5)
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(toy, diffusion(), SHAPE, steps=T + 1)
