"""Noise schedules, the forward (noising) process for training, and the DDPM / DDIM samplers.

Forward process (Ho et al. 2020, "DDPM", Eq. 4):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
with abar_t = prod_{s<=t} (1 - beta_s) (`alphas_cumprod`). The UNet predicts eps ("epsilon") or the
velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction", Salimans & Ho 2022, Sec. 4).

Read every setting from the checkpoint's scheduler/scheduler_config.json (SD 1.5 ships a PNDMScheduler
config, SD 2.1 a DDIMScheduler one; the same keys are read whatever the _class_name). Class defaults
are diffusers' and differ from what SD uses (e.g. linear betas 1e-4..0.02, clip_sample True).

Sampler interface: `set_timesteps(n)` fills `timesteps` (descending LongTensor), then for each t in it
`step(model_output, t, sample, ...)` returns StepOutput(prev_sample, pred_original_sample).
"""
import json
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch


def randn(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Standard normal noise drawn like diffusers' randn_tensor, so the same seeds give the same numbers.

    generator: None, a torch.Generator, or a list with one generator per batch item; each item then
    draws its own (1, ...) slice, so an image's noise does not depend on the batch it is in.
    Noise is drawn on the generator's device (a CPU generator gives the same numbers on any machine)
    and then moved to `device`.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


@dataclass
class SchedulerConfig:
    # Keys of a Hub scheduler_config.json. Defaults are diffusers' DDIMScheduler / DDPMScheduler
    # defaults, which agree on every key they share; set_alpha_to_one is DDIM's (True; PNDM's is False)
    # and variance_type is DDPM's. SD's config files set every key that matters.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None  # must stay None: explicit beta tables are not supported
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM: abar "before" the last step is 1 (True) or abar_0 (False)
    clip_sample: bool = True  # clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    timestep_spacing: str = "leading"
    variance_type: str = "fixed_small"  # DDPM: sigma_t^2 = beta~_t ("fixed_small") or beta_t ("fixed_large")
    thresholding: bool = False  # Imagen's dynamic thresholding: not supported
    rescale_betas_zero_snr: bool = False  # Lin et al. 2023: not supported

    def __post_init__(self):
        def check(key, supported):
            value = getattr(self, key)
            if value not in supported:
                raise ValueError(f"scheduler config {key}={value!r} is not supported (supported: {supported})")

        check("beta_schedule", ("linear", "scaled_linear"))
        check("trained_betas", (None,))
        check("prediction_type", ("epsilon", "v_prediction", "sample"))
        check("timestep_spacing", ("leading",))
        check("variance_type", ("fixed_small", "fixed_large"))
        check("thresholding", (False,))
        check("rescale_betas_zero_snr", (False,))

    @classmethod
    def from_dict(cls, d: dict) -> "SchedulerConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and not k.startswith("_")})

    @classmethod
    def from_json(cls, path) -> "SchedulerConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


_SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
           steps_offset=1, set_alpha_to_one=False, clip_sample=False)
PRESETS: dict[str, SchedulerConfig] = {
    "sd15": SchedulerConfig(**_SD, prediction_type="epsilon"),
    "sd21-base": SchedulerConfig(**_SD, prediction_type="epsilon"),
    "sd21": SchedulerConfig(**_SD, prediction_type="v_prediction"),
}


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # x_{t_prev}
    pred_original_sample: torch.Tensor  # the model's estimate of x_0 (after clipping, if configured)


def _per_sample(coefficients: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return coefficients.flatten().reshape(-1, *[1] * (like.ndim - 1))  # (B,) -> (B, 1, 1, 1) to broadcast


class NoiseSchedule:
    """The beta schedule, the forward process used in training, and the inference timestep grid."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        T = config.num_train_timesteps
        if config.beta_schedule == "linear":
            self.betas = torch.linspace(config.beta_start, config.beta_end, T, dtype=torch.float32)
        else:  # "scaled_linear" (LDM / SD): linear in sqrt(beta)
            self.betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, T, dtype=torch.float32) ** 2
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)  # abar_t
        # Until set_timesteps is called: the full chain T-1, ..., 0.
        self.num_inference_steps = T
        self.timesteps = torch.arange(T - 1, -1, -1)

    # ---- training: the forward process --------------------------------------------------------

    def _sqrt_alphas(self, timesteps, like):
        """sqrt(abar_t) and sqrt(1 - abar_t) per sample, in like's dtype (as diffusers computes them)."""
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        alpha_bar = alphas_cumprod[torch.as_tensor(timesteps, device=like.device)]
        return _per_sample(alpha_bar**0.5, like), _per_sample((1 - alpha_bar) ** 0.5, like)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) (DDPM Eq. 4): x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise.
        x0, noise: (B, C, H, W); timesteps: (B,) integers in [0, num_train_timesteps)."""
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._sqrt_alphas(timesteps, x0)
        return sqrt_alpha_bar * x0 + sqrt_one_minus_alpha_bar * noise

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (Salimans & Ho 2022, Sec. 4)."""
        sqrt_alpha_bar, sqrt_one_minus_alpha_bar = self._sqrt_alphas(timesteps, x0)
        return sqrt_alpha_bar * noise - sqrt_one_minus_alpha_bar * x0

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model should output for x_t = add_noise(x0, noise, timesteps), per prediction_type."""
        if self.config.prediction_type == "epsilon":
            return noise
        if self.config.prediction_type == "v_prediction":
            return self.velocity(x0, noise, timesteps)
        return x0  # "sample"

    # ---- sampling: the timestep grid and x_0 prediction -----------------------------------------

    def set_timesteps(self, num_inference_steps: int) -> None:
        """"leading" spacing: t = k * (T // n) + steps_offset for k = n-1, ..., 0 (e.g. 981, 961, ..., 1)."""
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        step_ratio = T // num_inference_steps
        timesteps = torch.arange(num_inference_steps - 1, -1, -1) * step_ratio + self.config.steps_offset
        if timesteps[0] >= T:
            raise ValueError(f"num_inference_steps={num_inference_steps} with steps_offset={self.config.steps_offset} "
                             f"gives timestep {int(timesteps[0])}, outside the {T} training timesteps")
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps

    def previous_timestep(self, timestep) -> int:
        """The next timestep of the (evenly spaced) grid; negative after the last one."""
        return int(timestep) - self.config.num_train_timesteps // self.num_inference_steps

    def _predict_x0_and_epsilon(self, model_output, sample, alpha_bar_t):
        """Turn the model output into (x_0, eps) estimates by inverting x_t = sqrt(abar) x_0 + sqrt(1-abar) eps."""
        beta_bar_t = 1 - alpha_bar_t  # 1 - abar_t
        kind = self.config.prediction_type
        if kind == "epsilon":
            pred_x0 = (sample - beta_bar_t**0.5 * model_output) / alpha_bar_t**0.5
            pred_epsilon = model_output
        elif kind == "v_prediction":  # x_0 = sqrt(abar) x_t - sqrt(1-abar) v,  eps = sqrt(abar) v + sqrt(1-abar) x_t
            pred_x0 = alpha_bar_t**0.5 * sample - beta_bar_t**0.5 * model_output
            pred_epsilon = alpha_bar_t**0.5 * model_output + beta_bar_t**0.5 * sample
        else:  # "sample"
            pred_x0 = model_output
            pred_epsilon = (sample - alpha_bar_t**0.5 * pred_x0) / beta_bar_t**0.5
        if self.config.clip_sample:
            r = self.config.clip_sample_range
            pred_x0 = pred_x0.clamp(-r, r)
        return pred_x0, pred_epsilon


class DDIMScheduler(NoiseSchedule):
    """DDIM (Song et al. 2021): eta = 0 is deterministic, eta = 1 matches the DDPM posterior variance."""

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        # abar used as the "previous" value at the last step, where there is no previous timestep.
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output, timestep, sample, *, eta: float = 0.0, generator=None) -> StepOutput:
        """One DDIM update x_t -> x_prev (Song et al. 2021, Eq. 12):

            x_prev = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma_t^2) eps_pred + sigma_t z,
            sigma_t = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)   (Eq. 16).

        model_output, sample: (B, C, H, W); timestep: an entry of self.timesteps; generator: see randn().
        """
        t, t_prev = int(timestep), self.previous_timestep(timestep)
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else self.final_alpha_cumprod
        pred_x0, pred_epsilon = self._predict_x0_and_epsilon(model_output, sample, alpha_bar_t)

        variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
        sigma_t = eta * variance**0.5
        direction_to_x_t = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_bar_prev**0.5 * pred_x0 + direction_to_x_t
        if eta > 0:
            noise = randn(model_output.shape, generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + sigma_t * noise
        return StepOutput(prev_sample, pred_x0)


class DDPMScheduler(NoiseSchedule):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), on a possibly strided grid of timesteps."""

    def step(self, model_output, timestep, sample, *, generator=None) -> StepOutput:
        """Sample x_prev ~ q(x_prev | x_t, x0_pred), the posterior of Ho et al. Eq. 6-7:

            mean = sqrt(abar_prev) beta_t / (1 - abar_t) x0_pred + sqrt(alpha_t) (1 - abar_prev) / (1 - abar_t) x_t
            var  = beta~_t = (1 - abar_prev) / (1 - abar_t) beta_t      ("fixed_small"; "fixed_large": beta_t)

        where, for a grid that skips timesteps, alpha_t = abar_t / abar_prev and beta_t = 1 - alpha_t.
        No noise is added at t = 0. model_output, sample: (B, C, H, W); generator: see randn().
        """
        t, t_prev = int(timestep), self.previous_timestep(timestep)
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[t_prev] if t_prev >= 0 else torch.tensor(1.0)
        alpha_t = alpha_bar_t / alpha_bar_prev
        beta_t = 1 - alpha_t
        pred_x0, _ = self._predict_x0_and_epsilon(model_output, sample, alpha_bar_t)

        x0_coefficient = (alpha_bar_prev**0.5 * beta_t) / (1 - alpha_bar_t)
        x_t_coefficient = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
        prev_sample = x0_coefficient * pred_x0 + x_t_coefficient * sample
        if t > 0:
            noise = randn(model_output.shape, generator, device=model_output.device, dtype=model_output.dtype)
            if self.config.variance_type == "fixed_small":
                variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)
            else:  # "fixed_large"
                variance = beta_t
            prev_sample = prev_sample + variance**0.5 * noise
        return StepOutput(prev_sample, pred_x0)
