"""Stable Diffusion's samplers, step for step diffusers' ``DDIMScheduler``, ``PNDMScheduler`` and
``EulerDiscreteScheduler``, built from the ``scheduler_config.json`` a diffusers folder holds.

The training schedule is diffusers' to the bit: float32 betas (PyTorch's float32 linspace, see
``schedule.diffusers_betas``), alphas = 1 - betas in float32, and alphas_cumprod accumulated in
float64 and rounded to float32 (what ``torch.cumprod`` does on the CPU), held here in float64. The
scalars of a step (sqrt(alpha_bar), the DDIM variance, the Euler sigma terms) are computed in float64
from those numbers and enter the arrays rounded once to the sample's dtype; the arrays are combined
in the sample's dtype (float16 samples in float32, rounded back at the end), with ``xp`` the sample's
array module (NumPy or CuPy), in diffusers' order of operations. diffusers computes those scalars in
float32 with PyTorch's square root, which is not correctly rounded (off by one unit in the last place
for about a fifth of float32 inputs), so a float32 step agrees with diffusers' to about 1e-7 relative,
and a float64 step with diffusers' run on float64 schedule tensors to about 1e-15.

Use: ``scheduler.set_timesteps(n)``; ``x = noise * scheduler.init_noise_sigma``; for ``t`` in
``scheduler.timesteps``: ``out = model(scheduler.scale_model_input(x, t), t)``,
``x = scheduler.step(out, t, x)``. PNDM and Euler keep state between steps (PNDM its past model
outputs, Euler its position in the schedule), reset by ``set_timesteps``.
"""

from __future__ import annotations

import math
import numbers
import pathlib

import numpy as np

from ..backend import get_array_module
from ..nn.pretrained import DIFFUSERS_VERSION, ConfigError, config_error, read_config, write_config
from .schedule import DIFFUSERS_SCHEDULES, diffusers_betas

SCHEDULER_CONFIG = "scheduler_config.json"
SPACINGS = ("leading", "trailing", "linspace")


# -- config values ---------------------------------------------------------------------------------
# Each check returns None for a value it accepts, else the text saying what minidiff implements.


def _is_number(value):
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _one_of(*choices):
    return lambda value: None if value in choices and not isinstance(value, bool) else f"one of {choices}"


def _boolean(value):
    return None if isinstance(value, bool) else "true or false"


def _false_only(value):
    return None if value in (False, None) else "false only"


def _positive_int(value):
    return None if _is_int(value) and value >= 1 else "a positive integer"


def _nonnegative_int(value):
    return None if _is_int(value) and value >= 0 else "a non-negative integer"


def _positive_number(value):
    return None if _is_number(value) and value > 0 else "a positive number"


def _number_or_null(value):
    return None if value is None or _is_number(value) else "a number or null"


def _beta(value):
    return None if _is_number(value) and 0 <= value < 1 else "a number in [0, 1)"


def _betas_or_null(value):
    if value is None:
        return None
    ok = isinstance(value, (list, tuple)) and value and all(_beta(b) is None for b in value)
    return None if ok else "null or a list of numbers in [0, 1)"


# The keys every scheduler reads, with diffusers' defaults and their checks.
TRAINING_KEYS = {
    "num_train_timesteps": (1000, _positive_int),
    "beta_start": (0.0001, _beta),
    "beta_end": (0.02, _beta),
    "beta_schedule": ("linear", _one_of(*DIFFUSERS_SCHEDULES)),
    "trained_betas": (None, _betas_or_null),
}


def _zero_terminal_snr(betas):
    """Lin et al. (2023), Algorithm 1: shift and scale sqrt(alpha_bar) so that it ends at exactly 0
    and keeps its first value, then back to betas; in the betas' dtype (float32 for the schedulers,
    rounded step by step as diffusers rounds)."""
    one = betas.dtype.type(1)
    root = np.sqrt(_cumprod(one - betas))
    first, last = root[0], root[-1]
    root = (root - last) * (first / (first - last))
    alpha_bar = root * root
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return one - alphas


def _cumprod(alphas):
    """alpha_bar: the running product accumulated in float64 and rounded to the alphas' dtype, as
    PyTorch's CPU cumprod does."""
    return np.cumprod(alphas.astype(np.float64)).astype(alphas.dtype)


def _host_int(t):
    """A timestep (Python number, NumPy or CuPy scalar / 0-d array) as a Python int."""
    value = t.item() if hasattr(t, "item") else t
    if float(value) != int(value):
        raise ValueError(f"timestep {value!r} is not an integer")
    return int(value)


def _host_array(t):
    return np.asarray(t.get() if hasattr(t, "get") else t)


def _work_dtype(sample):
    """The dtype a step computes in: the sample's, float16 taken up to float32."""
    return np.result_type(sample.dtype, np.float32)


class Scheduler:
    """The training schedule read from a diffusers scheduler config, shared by the samplers.

    ``config`` holds every key the class reads, with diffusers' defaults filled in, plus the keys it
    was given that it does not read (kept, as diffusers keeps them, for a switch to another sampler)
    and ``_use_default_values``, the keys filled from defaults (a switch drops them, so the other
    sampler takes its own defaults)."""

    name = ""
    # key -> (default, check); subclasses add theirs after TRAINING_KEYS
    keys: dict = {}
    init_noise_sigma = 1.0  # the scale of the starting noise (Euler's is its largest sigma)

    def __init__(self, config: dict | None = None, *, source: str | None = None, **values):
        source = source or f"{type(self).__name__} config"
        given = dict(config or {})
        given.update(values)
        defaulted = set(given.pop("_use_default_values", None) or [])
        given = {k: v for k, v in given.items() if k not in defaulted}
        settings, used_defaults = {}, []
        for key, (default, check) in self.keys.items():
            if key in given:
                value = given[key]
            else:
                value = default
                used_defaults.append(key)
            if key == "beta_schedule" and given.get("trained_betas") is not None:
                check = None  # diffusers ignores the schedule when the betas are given
            problem = check(value) if check else None
            if problem is not None:
                raise config_error(source, key, value, problem)
            settings[key] = value
        extras = {k: v for k, v in given.items() if k not in self.keys}
        if "_class_name" in extras:
            extras["_class_name"] = type(self).__name__
        self.config = {**settings, **extras}
        if used_defaults:
            self.config["_use_default_values"] = sorted(used_defaults)

        T = settings["num_train_timesteps"]
        if settings["trained_betas"] is not None:
            if len(settings["trained_betas"]) != T:
                raise config_error(
                    source, "trained_betas", f"<{len(settings['trained_betas'])} values>", f"{T} values"
                )
            betas = np.array(settings["trained_betas"], dtype=np.float64).astype(np.float32)
        else:
            betas = diffusers_betas(
                settings["beta_schedule"], T, settings["beta_start"], settings["beta_end"]
            )
        if settings.get("rescale_betas_zero_snr"):
            betas = _zero_terminal_snr(betas)
        self.betas = betas  # float32, diffusers' numbers
        self.alphas = np.float32(1) - betas
        # alpha_bar_t: diffusers' float32 numbers, in float64 for the arithmetic on them
        self.alphas_cumprod = _cumprod(self.alphas).astype(np.float64)
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config: dict, source: str | None = None):
        return cls(config, source=source)

    @property
    def num_train_timesteps(self) -> int:
        return self.config["num_train_timesteps"]

    def _spaced_timesteps(self, num_steps, spacing):
        """The inference timesteps in diffusers' order for each spacing (DDIM's; PNDM and Euler
        reorder or retype them). "leading": multiples of T // n (plus steps_offset), from the top;
        "trailing": T - 1 downward in steps of T / n; "linspace": n values evenly over [0, T - 1]."""
        T = self.num_train_timesteps
        if spacing == "linspace":
            return np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
        if spacing == "leading":
            step_ratio = T // num_steps
            return (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.int64) + self.config[
                "steps_offset"
            ]
        step_ratio = T / num_steps
        return np.round(np.arange(T, 0, -step_ratio)).astype(np.int64) - 1

    def _check_num_steps(self, num_steps):
        if not _is_int(num_steps) or num_steps < 1:
            raise ValueError(f"set_timesteps: num_steps must be a positive integer, got {num_steps!r}")
        if num_steps > self.num_train_timesteps:
            raise ValueError(
                f"set_timesteps: num_steps={num_steps} exceeds num_train_timesteps={self.num_train_timesteps}"
            )

    def _require_timesteps(self):
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_steps) before step")

    def _alpha_bar(self, t):
        """alpha_bar_t for a training timestep t."""
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(f"timestep {t} is outside the training schedule [0, {self.num_train_timesteps})")
        return float(self.alphas_cumprod[t])

    def _prev_alpha_bar(self, t_prev):
        """alpha_bar of the step landed on; before timestep 0 it is final_alpha_cumprod."""
        return float(self.alphas_cumprod[t_prev]) if t_prev >= 0 else self.final_alpha_cumprod

    def _train_coefficients(self, x, timesteps):
        """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t) for each timestep (computed in float64, rounded
        to x's dtype), shaped to broadcast over x's trailing axes."""
        t = _host_array(timesteps).reshape(-1).astype(np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps}), got {t}")
        alpha_bar = self.alphas_cumprod[t]
        shape = (-1,) + (1,) * (x.ndim - 1)
        xp, dtype = get_array_module(x), _work_dtype(x)
        root = xp.asarray(np.sqrt(alpha_bar).astype(dtype).reshape(shape))
        root_rest = xp.asarray(np.sqrt(1 - alpha_bar).astype(dtype).reshape(shape))
        return root, root_rest

    def add_noise(self, x0, noise, timesteps):
        """The forward process q(x_t | x_0): sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise."""
        root, root_rest = self._train_coefficients(x0, timesteps)
        return (root * x0 + root_rest * noise).astype(x0.dtype, copy=False)

    def get_velocity(self, x0, noise, timesteps):
        """The v-prediction target: sqrt(alpha_bar_t) noise - sqrt(1 - alpha_bar_t) x0."""
        root, root_rest = self._train_coefficients(x0, timesteps)
        return (root * noise - root_rest * x0).astype(x0.dtype, copy=False)

    def scale_model_input(self, sample, t=None):
        """The U-Net's input at t: the sample itself (Euler rescales it)."""
        return sample

    def save_pretrained(self, folder) -> pathlib.Path:
        """Write ``folder/scheduler_config.json`` as diffusers does (its class named in
        ``_class_name``; the record of defaulted keys left out), for ``load_scheduler``."""
        config = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        config.update(_class_name=type(self).__name__, _diffusers_version=DIFFUSERS_VERSION)
        write_config(folder, config, SCHEDULER_CONFIG)
        return pathlib.Path(folder)

    def __repr__(self):
        return f"{type(self).__name__}({self.config})"


class DDIMScheduler(Scheduler):
    """DDIM (Song et al. 2021): x_{t'} = sqrt(alpha_bar_t') x0_hat + sqrt(1 - alpha_bar_t' - sigma^2)
    eps_hat + sigma z, with sigma = eta * sqrt(the DDPM posterior variance); eta = 0 is deterministic."""

    name = "ddim"
    keys = {
        **TRAINING_KEYS,
        "clip_sample": (True, _boolean),
        "set_alpha_to_one": (True, _boolean),
        "steps_offset": (0, _nonnegative_int),
        "prediction_type": ("epsilon", _one_of("epsilon", "sample", "v_prediction")),
        "thresholding": (False, _false_only),
        "dynamic_thresholding_ratio": (0.995, _positive_number),
        "clip_sample_range": (1.0, _positive_number),
        "sample_max_value": (1.0, _positive_number),
        "timestep_spacing": ("leading", _one_of(*SPACINGS)),
        "rescale_betas_zero_snr": (False, _boolean),
    }

    def __init__(self, config: dict | None = None, *, source: str | None = None, **values):
        super().__init__(config, source=source, **values)
        # alpha_bar "before" t = 0: 1 (a clean image) or alpha_bar_0
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self.timesteps = np.arange(self.num_train_timesteps)[::-1].astype(np.int64)

    def set_timesteps(self, num_steps: int):
        self._check_num_steps(num_steps)
        self.num_inference_steps = num_steps
        self.timesteps = self._spaced_timesteps(num_steps, self.config["timestep_spacing"])

    def _variance(self, t, t_prev):
        """The DDPM posterior variance between the two steps: (1 - a_prev)/(1 - a_t) (1 - a_t/a_prev)."""
        alpha_bar, alpha_bar_prev = self._alpha_bar(t), self._prev_alpha_bar(t_prev)
        return ((1 - alpha_bar_prev) / (1 - alpha_bar)) * (1 - alpha_bar / alpha_bar_prev)

    def step(
        self,
        model_output,
        t,
        sample,
        eta: float = 0.0,
        rng=None,
        variance_noise=None,
        use_clipped_model_output: bool = False,
    ):
        """x_{t - T/n} from x_t and the model output at t. With eta > 0 the added noise is
        ``variance_noise`` when given, else drawn from ``rng`` (a NumPy Generator or a seed)."""
        self._require_timesteps()
        t = _host_int(t)
        t_prev = t - self.num_train_timesteps // self.num_inference_steps
        alpha_bar = self._alpha_bar(t)
        alpha_bar_prev = self._prev_alpha_bar(t_prev)
        root_a, root_b = math.sqrt(alpha_bar), math.sqrt(1 - alpha_bar)

        dtype = _work_dtype(sample)
        x, out = sample.astype(dtype, copy=False), model_output.astype(dtype, copy=False)
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            x0 = (x - root_b * out) / root_a  # x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t)
            eps = out
        elif prediction == "sample":
            x0 = out
            eps = (x - root_a * x0) / root_b  # eps = (x_t - sqrt(a_t) x0) / sqrt(1 - a_t)
        else:  # v = sqrt(a_t) eps - sqrt(1 - a_t) x0
            x0 = root_a * x - root_b * out
            eps = root_a * out + root_b * x
        if self.config["clip_sample"]:
            limit = self.config["clip_sample_range"]
            x0 = get_array_module(x0).clip(x0, -limit, limit)

        std = eta * math.sqrt(self._variance(t, t_prev))  # sigma_t = eta * sqrt(variance)
        if use_clipped_model_output:
            eps = (x - root_a * x0) / root_b  # the noise the clipped x0 implies
        # the direction pointing to x_t: sqrt(1 - a_prev - sigma^2) eps
        direction = math.sqrt(1 - alpha_bar_prev - std * std) * eps
        prev = math.sqrt(alpha_bar_prev) * x0 + direction
        if eta > 0:
            if variance_noise is None:
                if rng is None:
                    raise ValueError("DDIMScheduler.step: eta > 0 needs rng (or variance_noise)")
                rng = rng if hasattr(rng, "standard_normal") else np.random.default_rng(rng)
                # drawn on the host, so every device sees the same numbers for a seed
                variance_noise = rng.standard_normal(sample.shape).astype(dtype)
            xp = get_array_module(sample)
            prev = prev + std * xp.asarray(variance_noise).astype(dtype, copy=False)
        return prev.astype(sample.dtype, copy=False)


class PNDMScheduler(Scheduler):
    """PNDM (Liu et al. 2022): the DDIM-like transfer x_t -> x_{t'} driven by a linear multistep
    combination of past noise predictions. With skip_prk_steps (Stable Diffusion 1.x) it is PLMS,
    warmed up by one second-order (Heun-like) step; otherwise four Runge-Kutta steps (12 model calls)
    come first."""

    name = "pndm"
    keys = {
        **TRAINING_KEYS,
        "skip_prk_steps": (False, _boolean),
        "set_alpha_to_one": (False, _boolean),
        "prediction_type": ("epsilon", _one_of("epsilon", "v_prediction")),
        "timestep_spacing": ("leading", _one_of(*SPACINGS)),
        "steps_offset": (0, _nonnegative_int),
    }
    pndm_order = 4

    def __init__(self, config: dict | None = None, *, source: str | None = None, **values):
        super().__init__(config, source=source, **values)
        self.final_alpha_cumprod = 1.0 if self.config["set_alpha_to_one"] else float(self.alphas_cumprod[0])
        self.timesteps = None
        self._reset()

    def _reset(self):
        self.ets = []  # past noise predictions, newest last
        self.counter = 0  # steps taken since set_timesteps
        self.cur_sample = None  # the sample a multi-call step starts from
        self.cur_model_output = 0  # the Runge-Kutta sum being accumulated

    def set_timesteps(self, num_steps: int):
        self._check_num_steps(num_steps)
        if not self.config["skip_prk_steps"] and num_steps < self.pndm_order:
            raise ValueError(
                f"PNDMScheduler.set_timesteps: the Runge-Kutta warm-up (skip_prk_steps=false) needs "
                f"num_steps >= {self.pndm_order}, got {num_steps}"
            )
        self.num_inference_steps = num_steps
        # ascending here, as diffusers builds them
        spacing = self.config["timestep_spacing"]
        ascending = self._spaced_timesteps(num_steps, spacing)[::-1]
        if self.config["skip_prk_steps"]:
            # PLMS: the second timestep is repeated, its two calls make the warm-up's second-order step
            self.prk_timesteps = np.array([], dtype=np.int64)
            self.plms_timesteps = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            # Runge-Kutta over the top four timesteps: each step evaluated at t, twice at t - T/n/2
            # (the midpoint) and at t - T/n; the multistep phase starts after them
            half = self.num_train_timesteps // num_steps // 2
            top = ascending[-self.pndm_order :].repeat(2) + np.tile([0, half], self.pndm_order)
            self.prk_timesteps = top[:-1].repeat(2)[1:-1][::-1]
            self.plms_timesteps = ascending[:-3][::-1]
        self.timesteps = np.concatenate([self.prk_timesteps, self.plms_timesteps]).astype(np.int64)
        self._reset()

    def step(self, model_output, t, sample, eta: float = 0.0, rng=None):
        """The next sample; PNDM is deterministic (eta must be 0)."""
        if eta:
            raise ValueError(f"PNDMScheduler.step: eta={eta!r} is not supported (PNDM is deterministic)")
        self._require_timesteps()
        dtype = _work_dtype(sample)
        x, out = sample.astype(dtype, copy=False), model_output.astype(dtype, copy=False)
        if self.counter < len(self.prk_timesteps) and not self.config["skip_prk_steps"]:
            prev = self._step_runge_kutta(out, _host_int(t), x)
        else:
            prev = self._step_multistep(out, _host_int(t), x)
        self.counter += 1
        return prev.astype(sample.dtype, copy=False)

    def _step_runge_kutta(self, out, t, x):
        """One of the four calls of a fourth-order Runge-Kutta step: eps = (e1 + 2 e2 + 2 e3 + e4) / 6
        accumulated over the calls; each call moves from the step's start to the next evaluation point."""
        half = self.num_train_timesteps // self.num_inference_steps // 2
        t_prev = t - (0 if self.counter % 2 else half)
        t_start = int(self.prk_timesteps[self.counter // 4 * 4])
        stage = self.counter % 4
        if stage == 0:
            self.cur_model_output = self.cur_model_output + (1 / 6) * out
            self.ets.append(out)
            self.cur_sample = x
        elif stage in (1, 2):
            self.cur_model_output = self.cur_model_output + (1 / 3) * out
        else:
            out = self.cur_model_output + (1 / 6) * out
            self.cur_model_output = 0
        start = self.cur_sample if self.cur_sample is not None else x
        return self._transfer(start, t_start, t_prev, out)

    def _step_multistep(self, out, t, x):
        """Pseudo linear multistep: Adams-Bashforth combinations of the last 1-4 noise predictions."""
        if not self.config["skip_prk_steps"] and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: the multistep phase needs the 12 Runge-Kutta calls first")
        step = self.num_train_timesteps // self.num_inference_steps
        t_prev = t - step
        if self.counter != 1:
            self.ets = self.ets[-3:] + [out]
        else:
            # the warm-up's second call: redo the first step (from t + T/n) with the averaged slope
            t_prev, t = t, t + step
        ets = self.ets
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = x  # first call: a first-order step, kept to be redone
        elif len(ets) == 1 and self.counter == 1:
            out = (out + ets[-1]) / 2  # Heun: the mean of the slopes at both ends
            x, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            out = (3 * ets[-1] - ets[-2]) / 2  # second-order Adams-Bashforth
        elif len(ets) == 3:
            out = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12  # third order
        else:
            out = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])  # fourth order
        return self._transfer(x, t, t_prev, out)

    def _transfer(self, x, t, t_prev, out):
        """PNDM's transfer (its eq. 11), x_t -> x_{t_prev} given the noise prediction:
        sqrt(a'/a) x - (a' - a) eps / (a sqrt(1 - a') + sqrt(a (1 - a) a'))."""
        alpha_bar = self._alpha_bar(t)
        alpha_bar_prev = self._prev_alpha_bar(t_prev)
        beta_bar, beta_bar_prev = 1 - alpha_bar, 1 - alpha_bar_prev
        if self.config["prediction_type"] == "v_prediction":
            out = math.sqrt(alpha_bar) * out + math.sqrt(beta_bar) * x  # eps from v
        sample_coeff = math.sqrt(alpha_bar_prev / alpha_bar)
        denominator = alpha_bar * math.sqrt(beta_bar_prev) + math.sqrt(alpha_bar * beta_bar * alpha_bar_prev)
        return sample_coeff * x - (alpha_bar_prev - alpha_bar) * out / denominator


class EulerDiscreteScheduler(Scheduler):
    """Euler's method on the probability-flow ODE in the noise level sigma = sqrt((1 - a) / a)
    (Karras et al. 2022, Algorithm 2 with s_churn = 0): x <- x + (x - x0_hat) / sigma * (sigma' - sigma).
    The sample lives at scale sqrt(1 + sigma^2) (x = x0 + sigma eps), so ``init_noise_sigma`` is the
    largest sigma and ``scale_model_input`` divides by sqrt(sigma^2 + 1) for the U-Net.

    ``timesteps`` are float32 (diffusers' values; "linspace" gives fractional ones). One difference
    from diffusers: it rounds a float64 sample to float32 before the step; here float64 stays
    float64 (float16 and float32 samples step in float32, as there)."""

    name = "euler"
    keys = {
        **TRAINING_KEYS,
        "prediction_type": ("epsilon", _one_of("epsilon", "sample", "original_sample", "v_prediction")),
        "interpolation_type": ("linear", _one_of("linear")),
        "use_karras_sigmas": (False, _false_only),
        "use_exponential_sigmas": (False, _false_only),
        "use_beta_sigmas": (False, _false_only),
        "sigma_min": (None, _number_or_null),
        "sigma_max": (None, _number_or_null),
        "timestep_spacing": ("linspace", _one_of(*SPACINGS)),
        "timestep_type": ("discrete", _one_of("discrete")),
        "steps_offset": (0, _nonnegative_int),
        "rescale_betas_zero_snr": (False, _boolean),
        "final_sigmas_type": ("zero", _one_of("zero", "sigma_min")),
    }

    def __init__(self, config: dict | None = None, *, source: str | None = None, **values):
        super().__init__(config, source=source, **values)
        if self.config["rescale_betas_zero_snr"]:
            # a zero terminal alpha_bar would make sigma infinite: diffusers sets it to 2^-24
            self.alphas_cumprod[-1] = 2.0**-24
        # before set_timesteps: every training timestep, as diffusers starts
        T = self.num_train_timesteps
        self.timesteps = np.linspace(0, T - 1, T, dtype=np.float64)[::-1].astype(np.float32)
        self.sigmas = np.concatenate([self._training_sigmas()[::-1], [0.0]]).astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def _training_sigmas(self):
        """sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t) for every training timestep."""
        return np.sqrt((1 - self.alphas_cumprod) / self.alphas_cumprod)

    @property
    def init_noise_sigma(self) -> float:
        """The scale of the starting noise: sigma_max, or sqrt(sigma_max^2 + 1) for "leading" spacing."""
        largest = float(self.sigmas.max())
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return largest
        return math.sqrt(largest * largest + 1)

    def set_timesteps(self, num_steps: int):
        self._check_num_steps(num_steps)
        self.num_inference_steps = num_steps
        T = self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, T - 1, num_steps, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            step_ratio = T // num_steps
            timesteps = (np.arange(0, num_steps) * step_ratio).round()[::-1].astype(np.float32)
            timesteps += self.config["steps_offset"]
        else:
            step_ratio = T / num_steps
            timesteps = np.arange(T, 0, -step_ratio).round().astype(np.float32) - 1
        # sigma at each (possibly fractional) timestep, linearly interpolated; diffusers holds the
        # sigmas in float32, so they are rounded to it
        sigmas = np.interp(timesteps, np.arange(T), self._training_sigmas())
        last = self._training_sigmas()[0] if self.config["final_sigmas_type"] == "sigma_min" else 0.0
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps.astype(np.float32)
        self._step_index = None
        self._begin_index = None

    def set_begin_index(self, begin_index: int = 0):
        """Start at this position of the schedule (image-to-image) instead of finding t's."""
        self._begin_index = begin_index

    @property
    def step_index(self):
        return self._step_index

    def index_for_timestep(self, t, schedule_timesteps=None):
        """The position of t in the schedule (the second one if it appears twice, as diffusers picks)."""
        schedule = self.timesteps if schedule_timesteps is None else schedule_timesteps
        value = t.item() if hasattr(t, "item") else t
        indices = np.flatnonzero(schedule == np.float32(value))
        if len(indices) == 0:
            raise ValueError(f"EulerDiscreteScheduler: timestep {value!r} is not one of scheduler.timesteps")
        return int(indices[1 if len(indices) > 1 else 0])

    def _init_step_index(self, t):
        if self._begin_index is None:
            self._step_index = self.index_for_timestep(t)
        else:
            self._step_index = self._begin_index

    def scale_model_input(self, sample, t=None):
        """x / sqrt(sigma^2 + 1): the U-Net sees inputs of unit variance, as in training."""
        if self._step_index is None:
            self._init_step_index(t)
        sigma = float(self.sigmas[self._step_index])
        dtype = _work_dtype(sample)
        scaled = sample.astype(dtype, copy=False) / math.sqrt(sigma * sigma + 1)
        return scaled.astype(sample.dtype, copy=False)

    def step(
        self,
        model_output,
        t,
        sample,
        eta: float = 0.0,
        rng=None,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        noise=None,
    ):
        """One Euler step from sigma_i to sigma_{i+1}. With s_churn > 0 the sample is first noised up
        to sigma_hat = sigma (1 + gamma) with ``noise`` (or draws from ``rng``)."""
        if eta:
            raise ValueError(f"EulerDiscreteScheduler.step: eta={eta!r} is not supported (use s_churn)")
        self._require_timesteps()
        if self._step_index is None:
            self._init_step_index(t)
        if self._step_index + 1 >= len(self.sigmas):
            raise ValueError("EulerDiscreteScheduler.step: past the last timestep; call set_timesteps again")
        dtype = _work_dtype(sample)
        x, out = sample.astype(dtype, copy=False), model_output.astype(dtype, copy=False)
        sigma = float(self.sigmas[self._step_index])
        sigma_next = float(self.sigmas[self._step_index + 1])
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
        sigma_hat = sigma * (gamma + 1)  # the raised noise level (sigma itself for s_churn = 0)
        if gamma > 0:
            if noise is None:
                if rng is None:
                    raise ValueError("EulerDiscreteScheduler.step: s_churn > 0 needs rng (or noise)")
                rng = rng if hasattr(rng, "standard_normal") else np.random.default_rng(rng)
                noise = rng.standard_normal(sample.shape).astype(dtype)
            eps = get_array_module(x).asarray(noise).astype(dtype, copy=False) * s_noise
            x = x + eps * math.sqrt(sigma_hat * sigma_hat - sigma * sigma)  # noise up to sigma_hat

        prediction = self.config["prediction_type"]
        if prediction in ("sample", "original_sample"):
            x0 = out
        elif prediction == "epsilon":
            x0 = x - sigma_hat * out  # x = x0 + sigma eps
        else:  # v-prediction on the unit-variance input x / sqrt(sigma^2 + 1)
            var = sigma * sigma + 1
            x0 = out * (-sigma / math.sqrt(var)) + x / var
        derivative = (x - x0) / sigma_hat  # dx/dsigma of the probability-flow ODE
        prev = x + derivative * (sigma_next - sigma_hat)
        self._step_index += 1
        return prev.astype(sample.dtype, copy=False)

    def add_noise(self, x0, noise, timesteps):
        """x0 + sigma noise at each timestep's position in the schedule (set_timesteps first)."""
        t = _host_array(timesteps).reshape(-1)
        if self._begin_index is None:
            indices = [self.index_for_timestep(v) for v in t]
        elif self._step_index is not None:
            indices = [self._step_index] * len(t)
        else:
            indices = [self._begin_index] * len(t)
        sigma = self.sigmas.astype(_work_dtype(x0))[indices].reshape((-1,) + (1,) * (x0.ndim - 1))
        return (x0 + noise * get_array_module(x0).asarray(sigma)).astype(x0.dtype, copy=False)

    def get_velocity(self, x0, noise, timesteps):
        """The v-prediction target at each timestep's position in the schedule."""
        t = _host_array(timesteps).reshape(-1)
        positions = np.array([self.index_for_timestep(v) for v in t], dtype=np.int64)
        return super().get_velocity(x0, noise, positions)


SCHEDULERS = {cls.__name__: cls for cls in (DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler)}
SCHEDULER_NAMES = {cls.name: cls for cls in SCHEDULERS.values()}


def load_scheduler(folder) -> Scheduler:
    """The scheduler ``folder/scheduler_config.json`` describes, of the class its ``_class_name`` names."""
    path = pathlib.Path(folder) / SCHEDULER_CONFIG
    config = read_config(folder, SCHEDULER_CONFIG)
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise config_error(str(path), "_class_name", name, ", ".join(SCHEDULERS))
    return SCHEDULERS[name](config, source=str(path))


def make_scheduler(name: str, config: dict) -> Scheduler:
    """The sampler ``name`` ("ddim", "pndm", "euler", or a class name) on the training schedule of
    ``config`` (another scheduler's ``.config`` or a scheduler_config.json dict), as diffusers'
    ``XScheduler.from_config(other.config)``: keys the target does not read are ignored (and kept in
    its config), keys the source only defaulted take the target's defaults."""
    cls = SCHEDULER_NAMES.get(name) or SCHEDULERS.get(name)
    if cls is None:
        raise ValueError(
            f"make_scheduler: unknown scheduler {name!r}; choose one of {tuple(SCHEDULER_NAMES)}"
        )
    if not isinstance(config, dict):
        raise ConfigError(f"make_scheduler: config must be a dict, got {type(config).__name__}")
    return cls(config, source=f"{cls.__name__} config")
