"""Grader of the ddim exercise: the student's add_noise, training_target and ddim_step against
schedulers.NoiseSchedule.add_noise / .training_target and schedulers.DDIMScheduler.step, with
SD's schedules (sd15: the noise, sd21: the velocity) and a tiny UNet for a whole sampling loop."""
import dataclasses
from types import SimpleNamespace

import torch

import schedulers
from assignments import tiny
from assignments.checking import Check, compare, expect, load_file, seeded, source_notes

FUNCTIONS = ("add_noise", "training_target", "ddim_step")
MINUTES = "about 45 min to write; grading takes about 1 s"
SHAPE = (3, 4, 8, 8)
TIMESTEPS = torch.tensor([0, 250, 999])  # one per image: the two ends of the schedule and one between


def load(path):
    return load_file(path, FUNCTIONS)


def solution():
    return SimpleNamespace(add_noise=schedulers.NoiseSchedule.add_noise,
                           training_target=schedulers.NoiseSchedule.training_target,
                           ddim_step=schedulers.DDIMScheduler.step)


def notes(path):
    return source_notes(path, {pattern: f"your file calls the scheduler's own {pattern.strip('.(')}: write it yourself"
                               for pattern in (".add_noise(", ".velocity(", ".training_target(", ".step(",
                                               "._predict_x0_and_epsilon(")})


def per_sample(values):
    return values.reshape(-1, 1, 1, 1)  # (B,) -> (B, 1, 1, 1)


def forward_inputs(dtype=torch.float32):
    return tiny.randn(*SHAPE, seed=1, dtype=dtype), tiny.randn(*SHAPE, seed=2, dtype=dtype), TIMESTEPS


def forward_mistakes(schedule, x0, noise, t):
    abar = per_sample(schedule.alphas_cumprod[t])
    alpha = per_sample(schedule.alphas[t])
    return {"x_0 and the noise swapped": abar.sqrt() * noise + (1 - abar).sqrt() * x0,
            "abar_t and 1 - abar_t without the square roots": abar * x0 + (1 - abar) * noise,
            "the one-step alpha_t instead of the cumulative product abar_t": alpha.sqrt() * x0 + (1 - alpha).sqrt() * noise}


def check_add_noise(student):
    schedule = tiny.schedule("sd15")
    x0, noise, t = forward_inputs()
    compare("x_t", student.add_noise(schedule, x0, noise, t), schedule.add_noise(x0, noise, t), atol=1e-6,
            known=forward_mistakes(schedule, x0, noise, t))


def check_add_noise_dtype(student):
    schedule = tiny.schedule("sd15")
    x0, noise, t = forward_inputs(torch.bfloat16)
    compare("x_t of bfloat16 latents", student.add_noise(schedule, x0, noise, t),
            schedule.add_noise(x0, noise, t), atol=3e-2, rtol=2e-2)


def check_targets(student):
    x0, noise, t = forward_inputs()
    for preset, kind in (("sd15", "epsilon"), ("sd21", "v_prediction")):
        schedule = tiny.schedule(preset)
        abar = per_sample(schedule.alphas_cumprod[t])
        compare(f"training_target ({kind})", student.training_target(schedule, x0, noise, t),
                schedule.training_target(x0, noise, t), atol=1e-6, known={
                    "-v: the sign is flipped": (1 - abar).sqrt() * x0 - abar.sqrt() * noise,
                    "x_0 and the noise swapped in v": abar.sqrt() * x0 - (1 - abar).sqrt() * noise,
                    "the noise: read schedule.config.prediction_type": noise})
    schedule = tiny.schedule("sd15")
    schedule.config = dataclasses.replace(schedule.config, prediction_type="sample")
    compare("training_target (sample)", student.training_target(schedule, x0, noise, t), x0, atol=0)


def sampler(preset="sd15", eta=0.0, steps=10, **config):
    """A DDIMScheduler of an SD preset on a `steps`-step grid (sd15, 10 steps: 901, 801, ..., 1)."""
    scheduler = schedulers.DDIMScheduler(dataclasses.replace(schedulers.PRESETS[preset], **config), eta=eta)
    scheduler.set_timesteps(steps)
    return scheduler


def step_pair(out):
    expect(isinstance(out, tuple) and len(out) == 2,
           f"expected StepOutput(prev_sample, pred_original_sample), got {type(out).__name__}")
    return out


def compare_step(student, scheduler, timestep, *, seed=None, generators=None, scale=1.0, known=None, label=""):
    """The student's step against the project's on the same inputs and the same noise."""
    model_output, sample = tiny.randn(2, 4, 8, 8, seed=3) * scale, tiny.randn(2, 4, 8, 8, seed=4)

    def noise():
        if generators:
            return [seeded(seed + i) for i in range(generators)]
        return None if seed is None else seeded(seed)
    prev, x0 = step_pair(student.ddim_step(scheduler, model_output, timestep, sample, noise()))
    expected = scheduler.step(model_output, timestep, sample, noise())
    where = f"t={int(timestep)} -> {scheduler.previous_timestep(timestep)}, eta={scheduler.eta}{label}"
    compare(f"pred_original_sample ({where})", x0, expected.pred_original_sample, atol=1e-5)
    mistakes = {name: fn(model_output, sample) for name, fn in (known or {}).items()}
    compare(f"prev_sample ({where})", prev, expected.prev_sample, atol=1e-5, known=mistakes)


def check_step(student):
    scheduler = sampler()
    compare_step(student, scheduler, scheduler.timesteps[4])


def check_step_eta(student):
    scheduler, deterministic = sampler(eta=0.7), sampler(eta=0.0)
    t = scheduler.timesteps[4]
    ignored = {"the eta=0 step: the scheduler's eta is ignored":
               lambda m, s: deterministic.step(m, t, s).prev_sample}
    compare_step(student, scheduler, t, seed=5, known=ignored)
    compare_step(student, sampler(eta=1.0), t, generators=2, seed=5, label=", one generator per image")


def check_last_step(student):
    scheduler = sampler()
    t = scheduler.timesteps[-1]
    one = sampler(set_alpha_to_one=True)
    compare_step(student, scheduler, t, known={
        "abar_prev = 1: this config has set_alpha_to_one=False, use scheduler.final_alpha_cumprod":
            lambda m, s: one.step(m, t, s).prev_sample})


def check_v_step(student):
    scheduler, eps = sampler("sd21"), sampler("sd15")
    t = scheduler.timesteps[4]
    compare_step(student, scheduler, t, known={"the step of an epsilon model: this one predicts v":
                                               lambda m, s: eps.step(m, t, s).prev_sample})


def check_clip(student):
    scheduler, unclipped = sampler(clip_sample=True), sampler()
    t = scheduler.timesteps[2]
    compare_step(student, scheduler, t, scale=4.0, label=", clip_sample", known={
        "the step without clipping x0_pred": lambda m, s: unclipped.step(m, t, s).prev_sample})


def sampling_loop(step, eta=0.5, steps=10):
    """`steps` DDIM steps from seeded noise with the tiny UNet, text context fixed: the final x_0."""
    unet, scheduler = tiny.unet(), sampler(eta=eta, steps=steps)
    context, generator = tiny.randn(1, tiny.CONTEXT_LENGTH, 32, seed=6), seeded(7)
    x = schedulers.randn((1, 4, 8, 8), generator)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x = step(scheduler, unet(x, t, context), t, x, generator)[0]
    return x


def check_loop(student):
    compare("x_0 after 10 steps", sampling_loop(student.ddim_step), sampling_loop(schedulers.DDIMScheduler.step),
            atol=1e-4)


def checks(student):
    return [Check("add_noise: x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, per image", lambda: check_add_noise(student)),
            Check("add_noise keeps the latents' dtype (bfloat16)", lambda: check_add_noise_dtype(student)),
            Check("training_target: noise, velocity or x_0 by prediction_type", lambda: check_targets(student)),
            Check("ddim_step, eta 0: prev_sample and pred_original_sample", lambda: check_step(student)),
            Check("ddim_step, eta > 0: sigma_t z from the generator (one, or one per image)",
                  lambda: check_step_eta(student)),
            Check("ddim_step, the last step (no previous timestep)", lambda: check_last_step(student)),
            Check("ddim_step, a v-prediction model", lambda: check_v_step(student)),
            Check("ddim_step with clip_sample", lambda: check_clip(student)),
            Check("a 10-step DDIM loop (eta 0.5) on a tiny UNet ends where the project's does",
                  lambda: check_loop(student))]
