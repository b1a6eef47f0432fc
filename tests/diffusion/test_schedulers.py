"""The Stable Diffusion schedulers against diffusers' (the oracle), fed the same random model outputs.

Tolerances. diffusers computes a step's scalars (sqrt(alpha_bar), the DDIM variance, the sigma terms)
in float32 with PyTorch's square root, which on the CPU is not correctly rounded (one unit in the last
place off for about a fifth of float32 inputs); minidiff computes them in float64 from the same
float32 schedule. So:
- float32: each step, from diffusers' own sample, agrees with diffusers' step to STEP_RTOL_F32 of the
  sample's largest magnitude (measured: about 2e-7; see compare_loop for the steps that cancel);
- float64: diffusers is run on its schedule tensors taken to float64 (the Euler sigmas: ours, checked
  against diffusers' to one float32 unit separately), and the whole loop, each scheduler on its own
  samples, agrees to STEP_RTOL_F64 (measured: about 1e-15).
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
# diffusers' Euler add_noise converts a tensor with np.array, which NumPy 2 warns about
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
diffusers = pytest.importorskip("diffusers")

from minidiff.diffusion import (  # noqa: E402
    DDIMScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    diffusers_betas,
    linspace_float32,
    load_scheduler,
    make_scheduler,
    scaled_linear_betas,
    squaredcos_cap_v2_betas,
)
from minidiff.diffusion import schedulers as schedulers_module  # noqa: E402
from minidiff.nn.pretrained import ConfigError, PretrainedError  # noqa: E402

STEP_RTOL_F32 = 1e-6
STEP_RTOL_F64 = 1e-12
F32_UNIT = 2.0**-23  # one unit in the last place of a float32 in [1, 2), relative

OURS = {"ddim": DDIMScheduler, "pndm": PNDMScheduler, "euler": EulerDiscreteScheduler}
THEIRS = {
    "ddim": diffusers.DDIMScheduler,
    "pndm": diffusers.PNDMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
}
SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

# scheduler_config.json of Stable Diffusion folders as they are published
SD1_PNDM = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
SD2_DDIM = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD2_EULER = {**SD2_DDIM, "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.10.0.dev0"}


class StaysFloat64(torch.Tensor):
    """A sample diffusers' Euler step keeps in float64: it rounds its sample to float32 first
    (``sample.to(torch.float32)``), which would hide the float64 arithmetic being compared."""

    def to(self, *args, **kwargs):
        if args == (torch.float32,) and not kwargs:
            return self
        return super().to(*args, **kwargs)


WORST = {}


def close(ours, theirs, rtol, slack=0.0):
    """|ours - theirs| <= rtol * max|theirs| + slack; returns the difference relative to max|theirs|."""
    theirs = theirs.numpy() if hasattr(theirs, "numpy") else np.asarray(theirs)
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    scale = max(np.abs(theirs).max(), 1e-30)
    difference = np.abs(ours.astype(np.float64) - theirs).max()
    assert difference <= rtol * scale + slack, (
        f"difference {difference:.3g} > {rtol} * {scale:.3g} + {slack:.3g}"
    )
    if not slack:
        WORST[rtol] = max(WORST.get(rtol, 0.0), difference / scale)
    return difference / scale


def float64_reference(kind, ours, theirs):
    """diffusers' scheduler computing its scalars in float64 from its float32 schedule."""
    if kind == "euler":
        theirs.sigmas = torch.from_numpy(ours.sigmas.astype(np.float64))
    else:
        theirs.alphas_cumprod = theirs.alphas_cumprod.double()
        theirs.final_alpha_cumprod = torch.as_tensor(theirs.final_alpha_cumprod, dtype=torch.float64)


def as_float64(array):
    return torch.from_numpy(array.astype(np.float64)).as_subclass(StaysFloat64)


def compare_loop(kind, ours, theirs, num_steps, dtype, seed=0, step_kwargs=None, their_kwargs=None):
    """set_timesteps, init_noise_sigma, then the whole sampling loop with the same random model
    outputs: scale_model_input and step at every timestep (see the module docstring).

    In float32 each step starts from diffusers' sample. Where a step cancels large terms (one PLMS
    step from t = 999 to the clean image multiplies the sample by sqrt(alpha_bar_0 / alpha_bar_999)
    = 14.6), float32 rounding alone moves the result by more than STEP_RTOL_F32 of its size, in
    diffusers as here; the bound then adds that rounding, measured as the distance from diffusers'
    float32 step to its float64 step on the same inputs (the twin)."""
    step_kwargs, their_kwargs = step_kwargs or {}, their_kwargs or {}
    twin = type(theirs).from_config(theirs.config) if dtype == np.float32 else None
    for scheduler in (ours, theirs) + ((twin,) if twin else ()):
        scheduler.set_timesteps(num_steps)
    np.testing.assert_array_equal(ours.timesteps, theirs.timesteps.numpy())
    assert ours.timesteps.dtype == theirs.timesteps.numpy().dtype
    assert ours.init_noise_sigma == pytest.approx(float(theirs.init_noise_sigma), rel=F32_UNIT, abs=0)
    if kind == "euler":
        np.testing.assert_allclose(ours.sigmas, theirs.sigmas.numpy(), rtol=F32_UNIT, atol=0)
    rtol = STEP_RTOL_F32 if dtype == np.float32 else STEP_RTOL_F64
    float64_reference(kind, ours, twin or theirs)
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((2, 3, 4, 4)) * ours.init_noise_sigma).astype(dtype)
    theirs_x = torch.from_numpy(x.copy())
    if dtype == np.float64:
        theirs_x = theirs_x.as_subclass(StaysFloat64)
    worst = 0.0
    # model outputs drift slowly between steps, as a denoiser's do (independent draws would make
    # PLMS's 55 e1 - 59 e2 + 37 e3 - 9 e4 several times larger than a real model's)
    drift = rng.standard_normal(x.shape)

    def slack(expected, exact):
        return 0.0 if exact is None else float(np.abs(expected.numpy() - exact.numpy()).max())

    for t, their_t in zip(ours.timesteps, theirs.timesteps):
        if dtype == np.float32:
            x = theirs_x.numpy().copy()  # each step from diffusers' sample
        scaled = ours.scale_model_input(x, t)
        expected = theirs.scale_model_input(theirs_x, their_t)
        exact = twin.scale_model_input(as_float64(x), their_t) if twin else None
        worst = max(worst, close(scaled, expected, rtol, slack(expected, exact)))
        out = (drift + 0.3 * rng.standard_normal(x.shape)).astype(dtype)
        noise = rng.standard_normal(x.shape).astype(dtype)
        extra = {k: (noise if v == "noise" else v) for k, v in step_kwargs.items()}

        def their_step(scheduler, sample, cast, out=out, noise=noise, t=their_t):
            their_extra = {k: (cast(noise) if v == "noise" else v) for k, v in their_kwargs.items()}
            return scheduler.step(cast(out), t, sample, **their_extra).prev_sample.detach()

        exact = their_step(twin, as_float64(x), as_float64) if twin else None
        theirs_x = their_step(theirs, theirs_x, torch.from_numpy)
        x = ours.step(out, t, x, **extra)
        assert x.dtype == dtype
        worst = max(worst, close(x, theirs_x, rtol, slack(theirs_x, exact)))
    return worst


def pair(kind, **config):
    return OURS[kind](config), THEIRS[kind](**config)


def step_counts(kind, config):
    if kind == "pndm" and not config.get("skip_prk_steps", False):
        return (4, 7, 50)  # the Runge-Kutta warm-up needs four timesteps
    return (1, 7, 50)


VARIANTS = {
    "ddim": [{"set_alpha_to_one": True}, {"set_alpha_to_one": False}],
    "pndm": [
        {"skip_prk_steps": True, "set_alpha_to_one": False},
        {"skip_prk_steps": True, "set_alpha_to_one": True},
        {"skip_prk_steps": False, "set_alpha_to_one": False},
    ],
    "euler": [{"final_sigmas_type": "zero"}, {"final_sigmas_type": "sigma_min"}],
}
PREDICTIONS = {
    "ddim": ("epsilon", "v_prediction", "sample"),
    "pndm": ("epsilon", "v_prediction"),
    "euler": ("epsilon", "v_prediction", "sample"),
}
CASES = [
    (kind, prediction, spacing, offset, variant)
    for kind in OURS
    for prediction, spacing, offset, variant in itertools.product(
        PREDICTIONS[kind], ("leading", "trailing", "linspace"), (0, 1), VARIANTS[kind]
    )
]


@pytest.mark.parametrize("kind,prediction,spacing,offset,variant", CASES)
def test_sampling_loop_matches_diffusers(kind, prediction, spacing, offset, variant):
    config = {**SD, "prediction_type": prediction, "timestep_spacing": spacing, "steps_offset": offset}
    config.update(variant)
    if kind == "ddim":
        config["clip_sample"] = False
    for num_steps in step_counts(kind, config):
        for dtype in (np.float32, np.float64):
            compare_loop(kind, *pair(kind, **config), num_steps, dtype)


@pytest.mark.parametrize("kind", list(OURS))
@pytest.mark.parametrize("schedule", ["linear", "squaredcos_cap_v2"])
def test_other_beta_schedules_sample_as_diffusers(kind, schedule):
    config = {"beta_schedule": schedule, "beta_start": 0.0001, "beta_end": 0.02}
    if kind == "pndm":
        config["skip_prk_steps"] = True
    for dtype in (np.float32, np.float64):
        compare_loop(kind, *pair(kind, **config), 20, dtype)


@pytest.mark.parametrize("clip_range", [1.0, 0.5])
@pytest.mark.parametrize("clipped_output", [False, True])
def test_ddim_clip_sample_matches_diffusers(clip_range, clipped_output):
    config = {**SD, "clip_sample": True, "clip_sample_range": clip_range}
    kwargs = {"use_clipped_model_output": clipped_output}
    for dtype in (np.float32, np.float64):
        compare_loop("ddim", *pair("ddim", **config), 10, dtype, step_kwargs=kwargs, their_kwargs=kwargs)


@pytest.mark.parametrize("eta", [0.3, 1.0])
@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_eta_adds_diffusers_variance(eta, prediction):
    config = {**SD, "clip_sample": False, "prediction_type": prediction}
    ours = {"eta": eta, "variance_noise": "noise"}
    theirs = {"eta": eta, "variance_noise": "noise"}
    for dtype in (np.float32, np.float64):
        compare_loop("ddim", *pair("ddim", **config), 10, dtype, step_kwargs=ours, their_kwargs=theirs)


def test_ddim_eta_draws_its_noise_from_rng():
    scheduler = DDIMScheduler(SD)
    scheduler.set_timesteps(10)
    rng = np.random.default_rng(1)
    x, out = rng.standard_normal((2, 4, 4, 4)), rng.standard_normal((2, 4, 4, 4))
    t = scheduler.timesteps[3]
    drawn = scheduler.step(out, t, x, eta=1.0, rng=np.random.default_rng(5))
    given = scheduler.step(
        out, t, x, eta=1.0, variance_noise=np.random.default_rng(5).standard_normal(x.shape)
    )
    np.testing.assert_array_equal(drawn, given)
    assert not np.array_equal(drawn, scheduler.step(out, t, x))
    with pytest.raises(ValueError, match="rng"):
        scheduler.step(out, t, x, eta=1.0)


def test_euler_churn_matches_diffusers(monkeypatch):
    """s_churn > 0: the noise diffusers draws is replaced by the one given to ours."""
    drawn = {}
    monkeypatch.setattr(
        diffusers.schedulers.scheduling_euler_discrete, "randn_tensor", lambda *a, **k: drawn["noise"]
    )
    ours, theirs = pair("euler", **SD)
    ours.set_timesteps(10)
    theirs.set_timesteps(10)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3, 4, 4)) * ours.init_noise_sigma).astype(np.float32)
    for t, their_t in zip(ours.timesteps, theirs.timesteps):
        out, noise = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
        drawn["noise"] = torch.from_numpy(noise)
        churn = {"s_churn": 5.0, "s_tmin": 0.5, "s_tmax": 10.0}
        expected = theirs.step(torch.from_numpy(out), their_t, torch.from_numpy(x), **churn).prev_sample
        got = ours.step(out, t, x, noise=noise, **churn)
        close(got, expected, STEP_RTOL_F32)
        x = expected.numpy()


def test_pndm_state_resets_at_set_timesteps():
    for skip in (True, False):
        scheduler = PNDMScheduler(SD, skip_prk_steps=skip)
        runs = []
        for _ in range(2):
            scheduler.set_timesteps(8)
            rng = np.random.default_rng(3)
            x = rng.standard_normal((1, 2, 4, 4))
            for t in scheduler.timesteps[: len(scheduler.timesteps) // 2]:  # stop half way once
                x = scheduler.step(rng.standard_normal(x.shape), t, x)
            runs.append(x)
        np.testing.assert_array_equal(runs[0], runs[1])


# -- Stable Diffusion's own configs -----------------------------------------------------------------


@pytest.mark.parametrize("config", [SD1_PNDM, SD2_DDIM, SD2_EULER], ids=["sd1-pndm", "sd2-ddim", "sd2-euler"])
def test_stable_diffusion_configs_from_their_folders(tmp_path, config):
    (tmp_path / "scheduler_config.json").write_text(json.dumps(config))
    ours = load_scheduler(tmp_path)
    kind = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}
    assert type(ours).__name__ == config["_class_name"]
    for num_steps in (25, 50):
        for dtype in (np.float32, np.float64):
            scheduler = load_scheduler(tmp_path)
            theirs = THEIRS[kind[config["_class_name"]]].from_config(config)
            compare_loop(kind[config["_class_name"]], scheduler, theirs, num_steps, dtype)


@pytest.mark.parametrize(
    "kind,config",
    [
        (
            "ddim",
            {**SD, "prediction_type": "v_prediction", "timestep_spacing": "trailing", "clip_sample": False},
        ),
        ("pndm", {**SD, "skip_prk_steps": True, "steps_offset": 1}),
        (
            "euler",
            {**SD, "prediction_type": "v_prediction", "timestep_spacing": "leading", "steps_offset": 1},
        ),
    ],
)
def test_load_scheduler_reads_diffusers_save_pretrained(tmp_path, kind, config):
    THEIRS[kind](**config).save_pretrained(tmp_path)
    ours = load_scheduler(tmp_path)
    assert isinstance(ours, OURS[kind])
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    for key, value in saved.items():
        assert ours.config[key] == value
    compare_loop(kind, ours, THEIRS[kind].from_pretrained(tmp_path), 30, np.float32)


def normalized(config):
    config = dict(config)
    config["_use_default_values"] = sorted(config.get("_use_default_values", []))
    return config


def test_config_fills_defaults_and_keeps_other_keys_as_diffusers():
    ours, theirs = PNDMScheduler(SD1_PNDM), diffusers.PNDMScheduler.from_config(SD1_PNDM)
    assert normalized(ours.config) == normalized(theirs.config)


@pytest.mark.parametrize("target", ["ddim", "euler", "pndm"])
@pytest.mark.parametrize("source", [SD1_PNDM, SD2_DDIM], ids=["sd1-pndm", "sd2-ddim"])
def test_make_scheduler_switches_like_from_config(target, source):
    ours_source = load_like_diffusers(source)
    their_source = THEIRS[KIND[source["_class_name"]]].from_config(source)
    ours = make_scheduler(target, ours_source.config)
    theirs = THEIRS[target].from_config(their_source.config)
    assert isinstance(ours, OURS[target])
    assert normalized(ours.config) == normalized(theirs.config)
    for dtype in (np.float32, np.float64):
        ours = make_scheduler(target, ours_source.config)
        theirs = THEIRS[target].from_config(their_source.config)
        compare_loop(target, ours, theirs, 20, dtype)


KIND = {"PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler"}


def load_like_diffusers(config):
    return OURS[KIND[config["_class_name"]]](config)


def test_make_scheduler_takes_class_names_and_refuses_others():
    assert isinstance(make_scheduler("EulerDiscreteScheduler", SD1_PNDM), EulerDiscreteScheduler)
    with pytest.raises(ValueError, match="'lms'.*ddim"):
        make_scheduler("lms", SD1_PNDM)


# -- the training schedule ---------------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("T", [1, 2, 17, 1000, 4000])
@pytest.mark.parametrize("beta_range", [(0.0001, 0.02), (0.00085, 0.012)])
def test_betas_and_alphas_cumprod_are_diffusers_to_the_bit(schedule, T, beta_range):
    config = {"num_train_timesteps": T, "beta_schedule": schedule}
    config["beta_start"], config["beta_end"] = beta_range
    ours, theirs = pair("ddim", **config)
    np.testing.assert_array_equal(ours.betas, theirs.betas.numpy())
    np.testing.assert_array_equal(ours.alphas, theirs.alphas.numpy())
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy().astype(np.float64))


def test_float64_schedules_follow_their_formulas():
    np.testing.assert_allclose(scaled_linear_betas(5, 0.01, 0.04), np.linspace(0.1, 0.2, 5) ** 2, rtol=1e-15)
    reference = diffusers.schedulers.scheduling_ddim.betas_for_alpha_bar(1000).numpy()
    np.testing.assert_array_equal(squaredcos_cap_v2_betas(1000).astype(np.float32), reference)
    for start, end, n in [(0.1, 0.7, 1000), (1e-4, 0.02, 37), (0.3, 0.3, 4), (0.5, 0.1, 9)]:
        np.testing.assert_array_equal(
            linspace_float32(start, end, n), torch.linspace(start, end, n, dtype=torch.float32).numpy()
        )
    with pytest.raises(ValueError, match="cosine"):
        diffusers_betas("cosine")


def test_trained_betas_are_used_as_given():
    betas = np.linspace(1e-3, 0.03, 100).tolist()
    ours, theirs = pair("ddim", num_train_timesteps=100, trained_betas=betas, clip_sample=False)
    np.testing.assert_array_equal(ours.alphas_cumprod, theirs.alphas_cumprod.numpy().astype(np.float64))
    compare_loop("ddim", ours, theirs, 10, np.float32)


def test_zero_terminal_snr_rescaling_follows_diffusers():
    """Its arithmetic against diffusers' in float64, and the float32 schedule to the error of
    diffusers' float32 square roots (amplified by the cancellation near the terminal step)."""
    betas = diffusers_betas("scaled_linear", 1000, 0.00085, 0.012)
    reference = diffusers.schedulers.scheduling_ddim.rescale_zero_terminal_snr
    ours64 = schedulers_module._zero_terminal_snr(betas.astype(np.float64))
    theirs64 = reference(torch.from_numpy(betas.astype(np.float64))).numpy()
    np.testing.assert_allclose(ours64, theirs64, rtol=1e-12, atol=0)
    for kind in ("ddim", "euler"):
        ours, theirs = pair(kind, **SD, rescale_betas_zero_snr=True)
        assert ours.alphas_cumprod[-1] == theirs.alphas_cumprod[-1].item()  # 0, or 2^-24 for Euler
        np.testing.assert_allclose(ours.alphas_cumprod, theirs.alphas_cumprod.numpy(), rtol=1e-5, atol=0)


# -- add_noise and the velocity ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ddim", "pndm"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_add_noise_and_velocity_match_diffusers(kind, dtype):
    ours, theirs = pair(kind, **SD)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((4, 3, 8, 8)).astype(dtype) for _ in range(2))
    t = np.array([0, 1, 500, 999])
    their = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    # the square roots of alpha_bar: correctly rounded here, within a unit of the last place there
    rtol = 2 * F32_UNIT if dtype == np.float32 else 1e-15
    close(ours.add_noise(x0, noise, t), theirs.add_noise(*their), rtol)
    if kind == "ddim":
        close(ours.get_velocity(x0, noise, t), theirs.get_velocity(*their), rtol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_euler_add_noise_matches_diffusers(dtype):
    ours, theirs = pair("euler", **SD)
    ours.set_timesteps(20)
    theirs.set_timesteps(20)
    rng = np.random.default_rng(0)
    x0, noise = (rng.standard_normal((3, 3, 8, 8)).astype(dtype) for _ in range(2))
    t = ours.timesteps[[0, 7, 19]]
    expected = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t)).numpy()
    # the same float32 sigmas up to one unit in the last place, see compare_loop
    close(ours.add_noise(x0, noise, t), expected, 2 * F32_UNIT)
    # diffusers' Euler velocity indexes alpha_bar by the timesteps' positions in the schedule
    their = (torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
    rtol = 2 * F32_UNIT if dtype == np.float32 else 1e-15
    close(ours.get_velocity(x0, noise, t), theirs.get_velocity(*their), rtol)


# -- errors -----------------------------------------------------------------------------------------

BAD_VALUES = [
    ("ddim", "num_train_timesteps", 0),
    ("ddim", "num_train_timesteps", "1000"),
    ("ddim", "num_train_timesteps", True),
    ("ddim", "beta_start", 1.5),
    ("ddim", "beta_schedule", "cosine"),
    ("ddim", "prediction_type", "x0"),
    ("ddim", "timestep_spacing", "uniform"),
    ("ddim", "steps_offset", -1),
    ("ddim", "clip_sample", "no"),
    ("ddim", "clip_sample_range", 0),
    ("ddim", "thresholding", True),
    ("ddim", "set_alpha_to_one", 1),
    ("ddim", "trained_betas", [0.1, 2.0]),
    ("pndm", "prediction_type", "sample"),
    ("pndm", "skip_prk_steps", None),
    ("euler", "interpolation_type", "log_linear"),
    ("euler", "use_karras_sigmas", True),
    ("euler", "use_exponential_sigmas", True),
    ("euler", "use_beta_sigmas", True),
    ("euler", "timestep_type", "continuous"),
    ("euler", "final_sigmas_type", "max"),
    ("euler", "sigma_min", "small"),
]


@pytest.mark.parametrize("kind,key,value", BAD_VALUES)
def test_unsupported_config_values_name_the_key(kind, key, value):
    with pytest.raises(ConfigError, match=f"{key}={value!r}".replace("[", r"\[").replace("]", r"\]")):
        OURS[kind]({**SD, key: value})


def test_trained_betas_must_cover_the_training_steps():
    with pytest.raises(ConfigError, match="trained_betas"):
        DDIMScheduler(num_train_timesteps=10, trained_betas=[0.01] * 9)


def test_keys_other_schedulers_read_are_ignored():
    """SD 1.x's PNDM config carries clip_sample, which PNDM does not read; a DDIM config may carry
    Euler's keys. diffusers ignores them; so does minidiff, keeping them in the config."""
    assert PNDMScheduler({**SD, "clip_sample": "anything"}).config["clip_sample"] == "anything"
    DDIMScheduler({**SD, "use_karras_sigmas": True})


def test_load_scheduler_errors_name_the_file_and_key(tmp_path):
    with pytest.raises(PretrainedError, match="no such folder"):
        load_scheduler(tmp_path / "absent")
    with pytest.raises(PretrainedError, match="scheduler_config.json: missing"):
        load_scheduler(tmp_path)
    path = tmp_path / "scheduler_config.json"
    path.write_text("{not json")
    with pytest.raises(PretrainedError, match="not valid JSON"):
        load_scheduler(tmp_path)
    path.write_text(json.dumps({**SD1_PNDM, "_class_name": "LMSDiscreteScheduler"}))
    with pytest.raises(ConfigError, match="_class_name='LMSDiscreteScheduler'.*DDIMScheduler, PNDMScheduler"):
        load_scheduler(tmp_path)
    path.write_text(json.dumps({key: v for key, v in SD1_PNDM.items() if key != "_class_name"}))
    with pytest.raises(ConfigError, match="_class_name=None"):
        load_scheduler(tmp_path)
    path.write_text(json.dumps({**SD1_PNDM, "timestep_spacing": "uniform"}))
    with pytest.raises(ConfigError, match=r"scheduler_config.json: timestep_spacing='uniform'"):
        load_scheduler(tmp_path)


def test_step_errors():
    for kind in OURS:
        scheduler = OURS[kind](SD)
        x = np.zeros((1, 1, 2, 2), np.float32)
        with pytest.raises(ValueError, match="set_timesteps"):
            scheduler.step(x, 999, x)
        for bad in (0, 1001, 2.5):
            with pytest.raises(ValueError, match="num_steps"):
                scheduler.set_timesteps(bad)
    with pytest.raises(ValueError, match="Runge-Kutta"):
        PNDMScheduler(SD).set_timesteps(3)
    with pytest.raises(ValueError, match="eta"):
        scheduler = PNDMScheduler(SD, skip_prk_steps=True)
        scheduler.set_timesteps(5)
        scheduler.step(x, scheduler.timesteps[0], x, eta=0.5)
    euler = EulerDiscreteScheduler(SD)
    euler.set_timesteps(5)
    with pytest.raises(ValueError, match="not one of scheduler.timesteps"):
        euler.scale_model_input(x, 3.5)


@pytest.mark.parametrize("kind", list(OURS))
def test_float16_samples_stay_float16(kind):
    scheduler = OURS[kind](SD, **({"skip_prk_steps": True} if kind == "pndm" else {}))
    scheduler.set_timesteps(4)
    x = np.ones((1, 1, 2, 2), np.float16)
    for t in scheduler.timesteps:
        x = scheduler.step(scheduler.scale_model_input(x, t) * 0.1, t, x)
        assert x.dtype == np.float16
    assert np.isfinite(x).all()


def test_report_worst_differences():
    print({rtol: f"{worst:.3g}" for rtol, worst in WORST.items()})
