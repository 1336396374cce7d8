"""Noise schedules, the forward (noising) process for training, and the samplers: DDPM, DDIM,
DPM-Solver++(2M) (optionally on Karras sigmas) and Euler ancestral.

Forward process (Ho et al. 2020, "DDPM", Eq. 4):  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,
with abar_t = prod_{s<=t} (1 - beta_s) (`alphas_cumprod`). The UNet predicts eps ("epsilon") or the
velocity v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction", Salimans & Ho 2022, Sec. 4).

Read every setting from the checkpoint's scheduler/scheduler_config.json (SD 1.5 ships a PNDMScheduler
config, SD 2.1 a DDIMScheduler one; the same keys are read whatever the _class_name). Class defaults
are diffusers' and differ from what SD uses (e.g. linear betas 1e-4..0.02, clip_sample True).

Sampler interface, the same for every sampler (sample.denoise is the loop that drives it):

    sampler.set_timesteps(n)                     # fills sampler.timesteps, descending
    x = noise * sampler.init_noise_sigma         # noise ~ N(0, I): x_T at the sampler's first noise level
    for t in sampler.timesteps:
        model_output = unet(sampler.scale_model_input(x, t), t, c)
        x = sampler.step(model_output, t, x, generator).prev_sample

`step` returns StepOutput(prev_sample, pred_original_sample). Samplers that add noise at a step (DDPM,
DDIM with eta > 0, Euler ancestral) draw it from `generator` through randn(). DDIM and DDPM work on
x_t itself (init_noise_sigma 1, scale_model_input the identity) and are stateless; DPM-Solver++ and
Euler keep a step counter (DPM-Solver++ also its previous x_0 estimate), so they take the timesteps of
their grid once each, in order, and set_timesteps starts them again.
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
    # and variance_type is DDPM's; timestep_spacing's default is per sampler (below). SD's config
    # files set every key that matters.
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    trained_betas: list | None = None  # must stay None: explicit beta tables are not supported
    prediction_type: str = "epsilon"
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM: abar "before" the last step is 1 (True) or abar_0 (False)
    clip_sample: bool = True  # DDIM / DDPM: clamp the predicted x_0 to [-clip_sample_range, clip_sample_range]
    clip_sample_range: float = 1.0
    # The inference grid. None (the key absent): each sampler's diffusers default, "leading" for
    # DDIM / DDPM, "linspace" for DPM-Solver++ and Euler. An explicit "leading": every sampler's
    # leading grid (SDXL's config names it), as in diffusers.
    timestep_spacing: str | None = None
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
        if self.timestep_spacing not in (None, "leading"):
            raise ValueError(f"scheduler config timestep_spacing={self.timestep_spacing!r} is not supported: "
                             "name \"leading\", or leave the key out for each sampler's default grid")
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

    # DDIM and DDPM start from x_T ~ N(0, I) and give the UNet x_t as it is.
    init_noise_sigma = 1.0
    default_timestep_spacing = "leading"  # the grid when the config names none (diffusers' default)

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """What the UNet is given at `timestep` for the sampler's `sample`: x_t itself here."""
        return sample

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

    @property
    def timestep_spacing(self) -> str:
        """The grid this sampler uses: the config's, or the sampler's default when it names none."""
        return self.config.timestep_spacing or self.default_timestep_spacing

    def _check_steps(self, num_inference_steps: int) -> None:
        T = self.config.num_train_timesteps
        if not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")

    def leading_timesteps(self, num_inference_steps: int, points: int) -> torch.Tensor:
        """"leading" spacing, int64, descending: t = k * (T // points) + steps_offset for
        k = points-1, ..., 0 (e.g. 50 points, offset 1: 981, 961, ..., 1). `points` is num_inference_steps
        for DDIM, DDPM and Euler; DPM-Solver++ takes n + 1 points and drops the last (see there)."""
        T, offset = self.config.num_train_timesteps, self.config.steps_offset
        step_ratio = T // points
        timesteps = torch.arange(points - 1, -1, -1) * step_ratio + offset
        if step_ratio == 0:  # only DPM-Solver++ with n = T: every timestep would be the same
            raise ValueError(f"num_inference_steps={num_inference_steps} is too many for {type(self).__name__} "
                             f"on the leading grid: at most {T - 1}")
        if timesteps[0] >= T:
            raise ValueError(f"num_inference_steps={num_inference_steps} with steps_offset={offset} "
                             f"gives timestep {int(timesteps[0])}, outside the {T} training timesteps")
        return timesteps

    def set_timesteps(self, num_inference_steps: int) -> None:
        """"leading" spacing (DDIM and DDPM have only this one; see leading_timesteps)."""
        self._check_steps(num_inference_steps)
        self.timesteps = self.leading_timesteps(num_inference_steps, num_inference_steps)
        self.num_inference_steps = num_inference_steps

    def previous_timestep(self, timestep) -> int:
        """The timestep a step from `timestep` goes to: the one below it on the evenly spaced grid,
        T // n lower; negative after the last one."""
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
    """DDIM (Song et al. 2021) with the noise scale `eta`, a setting of the sampler: eta = 0 is
    deterministic, eta = 1 matches the DDPM posterior variance."""

    def __init__(self, config: SchedulerConfig, eta: float = 0.0):
        super().__init__(config)
        self.eta = eta
        # abar used as the "previous" value at the last step, where there is no previous timestep.
        self.final_alpha_cumprod = torch.tensor(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
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
        sigma_t = self.eta * variance**0.5
        direction_to_x_t = (1 - alpha_bar_prev - sigma_t**2) ** 0.5 * pred_epsilon
        prev_sample = alpha_bar_prev**0.5 * pred_x0 + direction_to_x_t
        if self.eta > 0:
            noise = randn(model_output.shape, generator, device=model_output.device, dtype=model_output.dtype)
            prev_sample = prev_sample + sigma_t * noise
        return StepOutput(prev_sample, pred_x0)


class DDPMScheduler(NoiseSchedule):
    """Ancestral sampling (Ho et al. 2020, Algorithm 2), on a possibly strided grid of timesteps."""

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
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


# ---- samplers on the noise level sigma: DPM-Solver++ and Euler ancestral -------------------------


class _SigmaSampler(NoiseSchedule):
    """Shared by DPM-Solver++ and Euler: samplers that work with the noise level

        sigma_t = sqrt((1 - abar_t) / abar_t),   so that   x_t / sqrt(abar_t) = x_0 + sigma_t eps

    (the sigma of Karras et al. 2022; in DPM-Solver's notation sigma_t / alpha_t). set_timesteps fills
    `timesteps` (what the UNet is told) and `sigmas` (n + 1 noise levels, float32, ending at 0: the
    last step lands on x_0). Their default grid is diffusers' default for these samplers,
    "linspace": n points spread evenly over [0, T - 1] from T - 1 down (SD 1.x/2.x's config files
    name no spacing). A config that names "leading" (SDXL's; this project's saved folders keep
    what their source named) gives them diffusers' leading grid instead, where steps_offset counts
    too. clip_sample is not applied (nor is it by diffusers' versions).
    """

    default_timestep_spacing = "linspace"

    def __init__(self, config: SchedulerConfig):
        super().__init__(config)
        self.train_sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5  # (T,) increasing in t
        # Until set_timesteps is called: n = T on the linspace grid; one step on the leading grid,
        # where n = T does not fit (leading_timesteps).
        self.set_timesteps(config.num_train_timesteps if self.timestep_spacing == "linspace" else 1)

    def _start(self, timesteps: torch.Tensor, sigmas: torch.Tensor) -> None:
        """Install a grid: `sigmas` float64 (n,) becomes float32 (n + 1,) with sigma = 0 appended."""
        self.timesteps = timesteps
        self.sigmas = torch.cat([sigmas, sigmas.new_zeros(1)]).float()
        self.num_inference_steps = len(timesteps)
        self.step_index = 0  # the grid entry the next step starts from

    def _sigma_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        """sigma at (fractional) timesteps, float64: linear interpolation of the float32 training
        table (numpy.interp's arithmetic, so that the values equal diffusers')."""
        table = self.train_sigmas.double()
        t = timesteps.double()
        low = t.floor().long()
        high = (low + 1).clamp(max=len(table) - 1)
        return (table[high] - table[low]) * (t - low) + table[low]  # exactly table[low] at whole t

    def _index(self, timestep) -> int:
        """The grid entry `timestep` is at, checked against the step counter."""
        i = self.step_index
        if i >= len(self.timesteps) or self.timesteps[i] != timestep:
            expected = "none: the grid is done" if i >= len(self.timesteps) else f"{self.timesteps[i].item()}"
            raise ValueError(f"{type(self).__name__} takes its timesteps in order, once each: got "
                             f"{float(timestep)}, expected {expected}. Call set_timesteps to start again.")
        return i


def evenly_spaced(stop: float, n: int) -> torch.Tensor:
    """n points from 0 to stop, float64, computed as numpy.linspace does (k * (stop / (n - 1)), the
    last exactly stop), which decides how ties such as 499.5 round, as in diffusers' grids."""
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    points = torch.arange(n, dtype=torch.float64) * (stop / (n - 1))
    points[-1] = stop
    return points


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models", Eq. 5:

        sigma_i = (sigma_max^(1/rho) + i / (n - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,  i = 0..n-1,

    n noise levels from sigma_max down to sigma_min, the steps shrinking on the way down (rho = 7,
    the paper's choice). Float64, (n,); n = 1 gives [sigma_max].
    """
    ramp = evenly_spaced(1.0, n)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


class DPMSolverMultistepScheduler(_SigmaSampler):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++: Fast Solver for Guided Sampling of Diffusion
    Probabilistic Models", Algorithm 2): a second-order multistep solver of the diffusion ODE written
    in the data prediction x_theta (the model's x_0 estimate), with
    alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), lambda_t = log(alpha_t / sigma_t) and
    h_i = lambda_{t_i} - lambda_{t_{i-1}}:

        first step:  x_{t_1} = (sigma_{t_1} / sigma_{t_0}) x_{t_0} - alpha_{t_1} (e^{-h_1} - 1) x_theta(x_{t_0}, t_0)
        then:        r_i = h_{i-1} / h_i,
                     D_i = (1 + 1 / (2 r_i)) x_theta(x_{t_{i-1}}, t_{i-1}) - 1 / (2 r_i) x_theta(x_{t_{i-2}}, t_{i-2}),
                     x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i

    The first-order update is DDIM's (eta 0) in these variables. As diffusers' defaults
    (lower_order_final, final sigma 0), the last step is first order too: it goes to sigma = 0,
    where lambda = inf and the update returns x_theta itself. Deterministic.

    use_karras_sigmas: the noise levels of Karras et al. 2022 Eq. 5 (karras_sigmas) between the
    training table's smallest and largest sigma instead of a spaced grid (so timestep_spacing does
    not matter); the UNet is then told the training timestep nearest each level (log-sigma
    interpolation, rounded).
    """

    def __init__(self, config: SchedulerConfig, use_karras_sigmas: bool = False):
        self.use_karras_sigmas = use_karras_sigmas
        super().__init__(config)

    def set_timesteps(self, num_inference_steps: int) -> None:
        """linspace grid: t_k = round(k (T - 1) / n) for k = n, ..., 1 (e.g. n = 20: 999, 949, ..., 50).
        leading grid: the leading grid of n + 1 points without its lowest, t_k = k (T // (n + 1)) +
        steps_offset for k = n, ..., 1 (n = 20, offset 1: 941, 894, ..., 48), as diffusers spaces it."""
        self._check_steps(num_inference_steps)
        T, n = self.config.num_train_timesteps, num_inference_steps
        if self.use_karras_sigmas:
            sigmas = karras_sigmas(self.train_sigmas[0].item(), self.train_sigmas[-1].item(), n)
            timesteps = self._timesteps_for(sigmas).round().long()
        else:
            if self.timestep_spacing == "leading":
                timesteps = self.leading_timesteps(n, points=n + 1)[:-1]
            else:  # "linspace"
                timesteps = evenly_spaced(T - 1, n + 1).round().flip(0)[:-1].long()
            sigmas = self._sigma_at(timesteps)
        self._start(timesteps, sigmas)
        self.previous_data_prediction = None  # x_theta at the previous grid point (the multistep memory)

    def _timesteps_for(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The fractional training timestep of each sigma (n,): log sigma interpolated linearly
        between the two neighbouring entries of the training table."""
        log_table = self.train_sigmas.log().double()  # (T,) increasing; computed in float32 as diffusers does
        log_sigma = sigmas.clamp(min=1e-10).log()
        below = torch.searchsorted(log_table, log_sigma, right=True)  # how many entries are <= log sigma
        low = (below - 1).clamp(0, len(log_table) - 2)
        weight = ((log_table[low] - log_sigma) / (log_table[low] - log_table[low + 1])).clamp(0, 1)
        return (1 - weight) * low + weight * (low + 1)

    @staticmethod
    def _alpha_sigma_lambda(sigma: torch.Tensor):
        """(alpha_t, sigma_t, lambda_t) of DPM-Solver from the noise level sigma = sigma_t / alpha_t."""
        alpha_t = 1 / (sigma**2 + 1) ** 0.5
        sigma_t = sigma * alpha_t
        return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)

    def _data_prediction(self, model_output, sample, alpha_t, sigma_t):
        """x_theta, the x_0 estimate, by inverting x_t = alpha_t x_0 + sigma_t eps."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        if kind == "v_prediction":  # v = alpha_t eps - sigma_t x_0
            return alpha_t * sample - sigma_t * model_output
        return model_output  # "sample"

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """One DPM-Solver++(2M) update from grid point t_{i-1} = `timestep` to the next one, t_i (see
        the class docstring). model_output, sample: (B, C, H, W), computed in fp32; generator: unused."""
        i = self._index(timestep)
        model_output, sample = model_output.float(), sample.float()
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.sigmas[i])  # where x is: t_{i-1}
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])  # where it goes: t_i
        h = lambda_t - lambda_s
        data_prediction = self._data_prediction(model_output, sample, alpha_s, sigma_s)

        coefficient = alpha_t * (torch.exp(-h) - 1.0)
        prev_sample = (sigma_t / sigma_s) * sample - coefficient * data_prediction  # first order
        last_step = i == len(self.timesteps) - 1
        if self.previous_data_prediction is not None and not last_step:
            # Second order, D_i = x_theta + (x_theta - x_theta_previous) / (2 r_i), added as its own term
            # (the order of operations of diffusers, so that the two agree to the last bit).
            _, _, lambda_previous = self._alpha_sigma_lambda(self.sigmas[i - 1])
            r = (lambda_s - lambda_previous) / h
            difference = (1.0 / r) * (data_prediction - self.previous_data_prediction)
            prev_sample = prev_sample - 0.5 * coefficient * difference

        self.previous_data_prediction = data_prediction
        self.step_index += 1
        return StepOutput(prev_sample, data_prediction)


class EulerAncestralScheduler(_SigmaSampler):
    """Euler ancestral: Euler steps of the probability-flow ODE in sigma (Karras et al. 2022,
    Algorithm 1 without its second-order correction), each followed by fresh noise, as in ancestral
    sampling. The sampler's variable is x = x_t / sqrt(abar_t) = x_0 + sigma eps; a step from sigma
    to sigma_next:

        sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        d          = (x - x0_pred) / sigma                        (the ODE's dx/dsigma)
        x_next     = x + (sigma_down - sigma) d + sigma_up z,      z ~ N(0, I)

    so x_next has noise level sqrt(sigma_down^2 + sigma_up^2) = sigma_next. The noise is drawn at every
    step (sigma_up = 0 at the last). The UNet expects x_t, so scale_model_input divides x by
    sqrt(sigma^2 + 1); x_T = init_noise_sigma * noise, with diffusers' init_noise_sigma per grid:
    on the leading grid sqrt(sigma_max^2 + 1), the spread of x_T / sqrt(abar_T) for x_T ~ N(0, I);
    on the linspace grid sigma_max itself (0.2% less for SD).
    """

    def set_timesteps(self, num_inference_steps: int) -> None:
        """linspace grid of fractional timesteps (float32): n points from T - 1 down to 0, e.g.
        n = 4: 999, 666, 333, 0; sigma interpolated linearly in the training table between them.
        leading grid: DDIM's (see leading_timesteps), as float32, e.g. n = 4, offset 1: 751, 501, 251, 1."""
        self._check_steps(num_inference_steps)
        T, n = self.config.num_train_timesteps, num_inference_steps
        if self.timestep_spacing == "leading":
            timesteps = self.leading_timesteps(n, points=n).float()
        else:  # "linspace"
            timesteps = evenly_spaced(T - 1, n).flip(0).float()
        self._start(timesteps, self._sigma_at(timesteps))
        sigma_max = self.sigmas.max()
        self.init_noise_sigma = sigma_max if self.timestep_spacing == "linspace" else (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """x -> x_t = x / sqrt(sigma^2 + 1), what the UNet was trained on."""
        sigma = self.sigmas[self._index(timestep)]
        return sample / (sigma**2 + 1) ** 0.5

    def _data_prediction(self, model_output, sample, sigma):
        """x0_pred from the model output, in the sampler's variable x = x_0 + sigma eps."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return sample - sigma * model_output
        if kind == "v_prediction":  # x_0 = alpha x_t - sigma_t v with x_t = x / sqrt(sigma^2 + 1)
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + sample / (sigma**2 + 1)
        return model_output  # "sample"

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """One Euler ancestral step from `timestep` to the next grid point (see the class docstring).
        model_output, sample: (B, C, H, W), computed in fp32; generator: see randn()."""
        i = self._index(timestep)
        model_output, sample = model_output.float(), sample.float()
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        pred_x0 = self._data_prediction(model_output, sample, sigma)

        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        derivative = (sample - pred_x0) / sigma
        prev_sample = sample + derivative * (sigma_down - sigma)
        noise = randn(model_output.shape, generator, device=model_output.device, dtype=torch.float32)
        prev_sample = prev_sample + noise * sigma_up

        self.step_index += 1
        return StepOutput(prev_sample, pred_x0)
