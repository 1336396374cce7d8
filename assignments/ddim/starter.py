"""Exercise ddim: the forward process, the training target, and one DDIM step.

Write the three bodies, then grade them:

    python -m assignments.grade ddim --file assignments/ddim/starter.py

Each function takes the schedule (a schedulers.NoiseSchedule, or a schedulers.DDIMScheduler for
ddim_step) as its first argument. Use only these of its attributes:
    schedule.alphas_cumprod            (T,) float32: abar_t = prod_{s<=t} (1 - beta_s), T = 1000
    schedule.config.prediction_type    "epsilon" (the UNet predicts the noise), "v_prediction" or "sample"
    schedule.config.clip_sample, schedule.config.clip_sample_range
    scheduler.eta                      DDIM's noise scale, a setting of the sampler
    scheduler.previous_timestep(t)     the timestep this step goes to (negative after the last one)
    scheduler.final_alpha_cumprod      abar to use when there is no previous timestep
and schedulers.randn(shape, generator, device=..., dtype=...) for noise (generator may be one
torch.Generator or a list with one per image).
"""
import torch  # noqa: F401

import schedulers  # noqa: F401  (schedulers.randn, schedulers.StepOutput)


def add_noise(schedule, x0, noise, timesteps):
    """Sample q(x_t | x_0) (DDPM, Ho et al. 2020, Eq. 4):

        x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise

    x0, noise: (B, C, H, W); timesteps: (B,) integers, one per image. Returns (B, C, H, W) in
    x0's dtype."""
    raise NotImplementedError


def training_target(schedule, x0, noise, timesteps):
    """What the UNet should output for x_t = add_noise(x0, noise, timesteps): the noise for
    "epsilon", the velocity v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 for "v_prediction"
    (Salimans & Ho 2022, section 4), x_0 for "sample". Shapes as add_noise."""
    raise NotImplementedError


def ddim_step(scheduler, model_output, timestep, sample, generator=None):
    """One DDIM update x_t -> x_prev (Song et al. 2021, Eq. 12 and 16), t = timestep:

        x0_pred, eps_pred from model_output and x_t (invert x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps;
                 clamp x0_pred to +-clip_sample_range when the config says clip_sample)
        sigma_t = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
        x_prev  = sqrt(abar_prev) x0_pred + sqrt(1 - abar_prev - sigma_t^2) eps_pred + sigma_t z

    with z ~ N(0, I) drawn from `generator` (only when eta > 0). model_output, sample:
    (B, C, H, W). Returns schedulers.StepOutput(prev_sample, pred_original_sample=x0_pred)."""
    raise NotImplementedError
