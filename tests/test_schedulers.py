"""schedulers.py against diffusers' DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
(dpmsolver++, order 2, with and without Karras sigmas) and EulerAncestralDiscreteScheduler, each
built from the same config dict, with timestep_spacing left out (each sampler's default grid) and
named "leading". Grids (timesteps, sigmas) must be identical; step outputs: max abs error <= 1e-6
in fp32 (the arithmetic is the same, so in practice it is exact)."""
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import schedulers  # noqa: E402
from schedulers import (PRESETS, DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler,  # noqa: E402
                        EulerAncestralScheduler, SchedulerConfig, karras_sigmas, randn)

import diffusers  # noqa: E402
from diffusers.utils.torch_utils import randn_tensor  # noqa: E402

TOL = 1e-6

# scheduler/scheduler_config.json of stable-diffusion-v1-5 (a PNDM config) and of stable-diffusion-2-1.
SD15_PNDM = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
             "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
             "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
             "trained_betas": None}
SD21_V = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
          "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
          "num_train_timesteps": 1000, "prediction_type": "v_prediction", "set_alpha_to_one": False,
          "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None}
# DDPM-paper style: linear betas, x_0 clipping on, no offset, abar_prev = 1 at the end.
LINEAR = {"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
          "num_train_timesteps": 1000, "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True,
          "steps_offset": 0, "variance_type": "fixed_small"}
CONFIGS = {"sd15-pndm": SD15_PNDM, "sd21-v": SD21_V, "linear": LINEAR}
# The same configs naming "leading" spacing, as SDXL base's does (and the ones saved from it).
LEADING = {f"{name}-leading": {**cfg, "timestep_spacing": "leading"} for name, cfg in CONFIGS.items()}
ALL_CONFIGS = {**CONFIGS, **LEADING}


# sample.py's sampler names -> (ours from a SchedulerConfig, diffusers' from the config dict)
SAMPLERS = {
    "ddim": (lambda c, eta: DDIMScheduler(c, eta=eta), diffusers.DDIMScheduler.from_config),
    "ddpm": (lambda c, eta: DDPMScheduler(c), diffusers.DDPMScheduler.from_config),
    "dpmpp_2m": (lambda c, eta: DPMSolverMultistepScheduler(c),
                 lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(
                     cfg, algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": (lambda c, eta: DPMSolverMultistepScheduler(c, use_karras_sigmas=True),
                        lambda cfg: diffusers.DPMSolverMultistepScheduler.from_config(
                            cfg, algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True)),
    "euler_a": (lambda c, eta: EulerAncestralScheduler(c), diffusers.EulerAncestralDiscreteScheduler.from_config),
}
SIGMA_SAMPLERS = ["dpmpp_2m", "dpmpp_2m_karras", "euler_a"]


def ours_and_ref(kind: str, cfg: dict, eta: float = 0.0):
    ours, ref = SAMPLERS[kind]
    return ours(SchedulerConfig.from_dict(cfg), eta), ref(cfg)


def fake_model(sample, t):
    """A deterministic stand-in for the UNet: depends on the sample and on t, magnitude about 1."""
    return torch.tanh(1.5 * sample) + 0.3 * (t / 1000.0) * sample.flip(-1) - 0.1 * sample.roll(1, dims=-2)


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("name", ALL_CONFIGS)
@pytest.mark.parametrize("kind", ["ddim", "ddpm"])
def test_schedule_tensors_and_timesteps_equal(kind, name):
    ours, ref = ours_and_ref(kind, ALL_CONFIGS[name])
    for attr in ("betas", "alphas", "alphas_cumprod"):
        assert getattr(ours, attr).dtype == torch.float32
        assert torch.equal(getattr(ours, attr), getattr(ref, attr)), attr
    for n in (1, 7, 25, 50, 333, 999):
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == torch.int64
        assert torch.equal(ours.timesteps, ref.timesteps), n
    if kind == "ddim":
        assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)


def test_leading_spacing_sd_numbers():
    s = DDIMScheduler(PRESETS["sd15"])
    s.set_timesteps(50)
    assert s.timesteps[:3].tolist() == [981, 961, 941] and s.timesteps[-1].item() == 1 and len(s.timesteps) == 50
    assert s.betas[0].item() == pytest.approx(0.00085) and s.betas[-1].item() == pytest.approx(0.012)


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_noise_velocity_training_target(name, dtype):
    ours, ref = ours_and_ref("ddpm", CONFIGS[name])
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    noise = torch.randn(4, 4, 8, 8, generator=g).to(dtype)
    timesteps = torch.tensor([0, 1, 500, 999])
    tol = TOL if dtype == torch.float32 else 0.0  # bf16: both compute in bf16 the same way -> identical
    noisy = ours.add_noise(x0, noise, timesteps)
    velocity = ours.velocity(x0, noise, timesteps)
    assert noisy.dtype == velocity.dtype == dtype
    assert max_err(noisy.float(), ref.add_noise(x0, noise, timesteps).float()) <= tol
    assert max_err(velocity.float(), ref.get_velocity(x0, noise, timesteps).float()) <= tol
    # Per-sample broadcasting: item i only sees its own timestep.
    solo = ours.add_noise(x0[2:3], noise[2:3], timesteps[2:3])
    assert torch.equal(solo, noisy[2:3])
    target = ours.training_target(x0, noise, timesteps)
    expected = velocity if ours.config.prediction_type == "v_prediction" else noise
    assert torch.equal(target, expected)


def test_training_target_sample_prediction():
    s = DDPMScheduler(SchedulerConfig.from_dict({**SD15_PNDM, "prediction_type": "sample"}))
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    assert torch.equal(s.training_target(x0, noise, torch.tensor([3, 900])), x0)


def run_both(kind, cfg, num_inference_steps, batch=2, eta=None, seed=0, generators=None, **extra):
    """Run both samplers side by side on their own trajectories; compare every step's outputs.
    The loop is sample.denoise's: x_T = noise * init_noise_sigma, the model sees scale_model_input.
    generators: seeds of one generator per item instead of one generator for the batch."""
    ours, ref = ours_and_ref(kind, cfg, eta=eta or 0.0)
    if num_inference_steps is not None:
        ours.set_timesteps(num_inference_steps)
        ref.set_timesteps(num_inference_steps)
    assert torch.equal(ours.timesteps, ref.timesteps)
    assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma)
    x = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(100)) * ours.init_noise_sigma
    x_ref = x.clone()
    if generators is None:
        g, g_ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    else:
        g, g_ref = ([torch.Generator().manual_seed(s) for s in generators] for _ in range(2))
    kw_ref = {} if eta is None else {"eta": eta}
    worst = 0.0
    for t in ours.timesteps:
        out = ours.step(fake_model(ours.scale_model_input(x, t), t), t, x, g)
        out_ref = ref.step(fake_model(ref.scale_model_input(x_ref, t), t), t, x_ref, generator=g_ref, **kw_ref)
        step_err = max_err(out.prev_sample, out_ref.prev_sample)
        if hasattr(out_ref, "pred_original_sample"):  # diffusers' DPM-Solver does not return it
            step_err = max(step_err, max_err(out.pred_original_sample, out_ref.pred_original_sample))
        assert step_err <= TOL, f"t={int(t)}: {step_err}"
        worst = max(worst, step_err)
        x, x_ref = out.prev_sample, out_ref.prev_sample
    assert torch.isfinite(x).all()
    return x, worst


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_50_steps_match_diffusers(name, eta):
    x, _ = run_both("ddim", CONFIGS[name], 50, eta=eta)
    if eta > 0:  # the generator is really used: another seed changes the result
        x_other, _ = run_both("ddim", CONFIGS[name], 50, eta=eta, seed=1)
        assert max_err(x, x_other) > 1e-3


def test_ddim_sample_prediction_and_odd_step_count_match_diffusers():
    run_both("ddim", {**LINEAR, "prediction_type": "sample"}, 50, eta=0.5)
    run_both("ddim", SD15_PNDM, 7, eta=1.0)  # T // n = 142: a grid with a remainder


def test_ddpm_full_1000_step_ancestral_loop_matches_diffusers():
    # LINEAR has steps_offset 0, so set_timesteps(1000) is the full chain 999..0 (as is the default).
    run_both("ddpm", LINEAR, 1000)
    run_both("ddpm", LINEAR, None, batch=1)


@pytest.mark.parametrize("name", CONFIGS)
def test_ddpm_strided_matches_diffusers(name):
    run_both("ddpm", CONFIGS[name], 50)


def test_ddpm_fixed_large_and_sample_prediction_match_diffusers():
    run_both("ddpm", {**SD21_V, "variance_type": "fixed_large"}, 25)
    run_both("ddpm", {**SD15_PNDM, "prediction_type": "sample", "clip_sample": True}, 25)


def test_randn_matches_diffusers_and_is_batch_size_independent():
    shape = (3, 4, 8, 8)
    gens = lambda: [torch.Generator().manual_seed(s) for s in (10, 11, 12)]  # noqa: E731
    batch = randn(shape, gens())
    assert torch.equal(batch, randn_tensor(shape, generator=gens()))
    for i, seed in enumerate((10, 11, 12)):  # each item equals that seed drawn alone
        assert torch.equal(batch[i:i + 1], randn((1, 4, 8, 8), torch.Generator().manual_seed(seed)))
    single = randn(shape, torch.Generator().manual_seed(10))
    assert torch.equal(single, randn_tensor(shape, generator=torch.Generator().manual_seed(10)))
    assert torch.equal(single[:1], batch[:1]) and not torch.equal(single[1:], batch[1:])
    assert randn(shape, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        randn(shape, gens()[:2])


@pytest.mark.parametrize("kind", SAMPLERS)
def test_stochastic_steps_are_batch_size_independent(kind):
    """With one generator per image, an image's trajectory does not depend on the batch it is in."""
    s, _ = ours_and_ref(kind, SD21_V, eta=1.0)
    seeds = [5, 6, 7]
    x0 = torch.cat([torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(s_)) for s_ in seeds])

    def sample(x, seeds_):
        gens = [torch.Generator().manual_seed(s_) for s_ in seeds_]
        s.set_timesteps(20)  # DPM-Solver++ and Euler start their step counter again
        x = x * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(fake_model(s.scale_model_input(x, t), t), t, x, gens).prev_sample
        return x

    together = sample(x0, seeds)
    alone = sample(x0[1:2], seeds[1:2])
    assert max_err(together[1:2], alone) <= TOL
    assert max_err(together[0], together[1]) > 1e-3


def test_presets_equal_hub_configs(tmp_path):
    path = tmp_path / "scheduler_config.json"
    path.write_text(json.dumps(SD15_PNDM))
    assert SchedulerConfig.from_json(path) == PRESETS["sd15"]
    assert SchedulerConfig.from_dict(SD21_V) == PRESETS["sd21"]
    assert PRESETS["sd21-base"].prediction_type == "epsilon"
    # A DDIM built from the preset equals diffusers' DDIM built from the Hub file.
    ours, ref = DDIMScheduler(PRESETS["sd21"]), diffusers.DDIMScheduler.from_config(SD21_V)
    assert torch.equal(ours.alphas_cumprod, ref.alphas_cumprod)
    assert torch.equal(ours.final_alpha_cumprod, ref.final_alpha_cumprod)


def test_defaults_follow_diffusers():
    """Absent keys take diffusers' defaults (DDIM's for set_alpha_to_one, DDPM's for variance_type);
    an absent timestep_spacing is None, which each sampler reads as diffusers' default for it."""
    ours = SchedulerConfig()
    assert ours.timestep_spacing is None
    for ref_cls in (diffusers.DDIMScheduler, diffusers.DDPMScheduler):
        ref = ref_cls().config
        for key in ref:
            if hasattr(ours, key) and key != "timestep_spacing":
                assert getattr(ours, key) == ref[key], (ref_cls.__name__, key)
    for kind, (make_ours, make_ref) in SAMPLERS.items():
        ours_sampler, ref_sampler = make_ours(ours, 0.0), make_ref({})
        assert ours_sampler.timestep_spacing == ref_sampler.config.timestep_spacing, kind
    assert DDIMScheduler(ours).timestep_spacing == "leading"
    assert EulerAncestralScheduler(ours).timestep_spacing == "linspace"


@pytest.mark.parametrize("override, message", [
    ({"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
    ({"trained_betas": [0.1] * 1000}, "trained_betas"),
    ({"prediction_type": "flow"}, "prediction_type"),
    ({"timestep_spacing": "trailing"}, "timestep_spacing='trailing' is not supported.*leave the key out"),
    ({"timestep_spacing": "linspace"}, "timestep_spacing='linspace' is not supported"),
    ({"variance_type": "learned_range"}, "variance_type"),
    ({"thresholding": True}, "thresholding"),
    ({"rescale_betas_zero_snr": True}, "rescale_betas_zero_snr"),
])
def test_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig.from_dict({**SD15_PNDM, **override})


def test_set_timesteps_errors():
    s = DDIMScheduler(PRESETS["sd15"])
    with pytest.raises(ValueError, match="outside the 1000 training timesteps"):
        s.set_timesteps(1000)  # steps_offset 1 would give t = 1000 (diffusers fails later with an IndexError)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    s.set_timesteps(500)  # the largest count that fits with steps_offset 1
    assert s.timesteps[0].item() == 999
    assert schedulers.SchedulerConfig.from_dict({"timestep_spacing": "leading"}).timestep_spacing == "leading"


def test_leading_grid_errors():
    """On the leading grid steps_offset can push the top timestep past T - 1 (diffusers then reads
    past its sigma table): refused, as DDIM refuses it. DPM-Solver++ spaces n + 1 points."""
    sd15 = SchedulerConfig.from_dict(LEADING["sd15-pndm-leading"])
    euler, dpm = EulerAncestralScheduler(sd15), DPMSolverMultistepScheduler(sd15)
    assert len(euler.timesteps) == len(dpm.timesteps) == 1  # the grid before set_timesteps
    euler.set_timesteps(500)  # (500 - 1) * 2 + 1 = 999
    with pytest.raises(ValueError, match="gives timestep 1000, outside the 1000 training timesteps"):
        euler.set_timesteps(1000)
    dpm.set_timesteps(998)  # 998 * (1000 // 999) + 1 = 999
    with pytest.raises(ValueError, match="gives timestep 1000, outside"):
        dpm.set_timesteps(999)
    dpm_no_offset = DPMSolverMultistepScheduler(SchedulerConfig.from_dict(LEADING["linear-leading"]))
    dpm_no_offset.set_timesteps(999)
    with pytest.raises(ValueError, match="num_inference_steps=1000 is too many .* at most 999"):
        dpm_no_offset.set_timesteps(1000)  # 1000 // 1001 = 0: every timestep would be the same
    dpm_karras = DPMSolverMultistepScheduler(sd15, use_karras_sigmas=True)
    dpm_karras.set_timesteps(1000)  # Karras sigmas ignore the spacing


def test_saved_config_names_the_spacing_only_when_its_source_did():
    """load_weights writes timestep_spacing only when it is not None, so a saved folder keeps
    its source's meaning (unnamed: each sampler's default grid; "leading": every sampler's)."""
    from load_weights import _config_dict

    for raw in (SD15_PNDM, LEADING["sd15-pndm-leading"]):
        config = SchedulerConfig.from_dict(raw)
        for raw_configs in ({"scheduler": raw}, {}):  # read from a folder; a preset (no file)
            pipeline = SimpleNamespace(scheduler=DDPMScheduler(config), raw_configs=raw_configs)
            saved = _config_dict("scheduler", pipeline)
            assert saved.get("timestep_spacing") == raw.get("timestep_spacing")
            assert SchedulerConfig.from_dict(saved) == config


# ---- DPM-Solver++(2M), with and without Karras sigmas, and Euler ancestral ----------------------


def assert_same_grids(ours, ref, step_counts):
    for n in step_counts:
        ours.set_timesteps(n)
        ref.set_timesteps(n)
        assert ours.timesteps.dtype == ref.timesteps.dtype, n
        assert torch.equal(ours.timesteps, ref.timesteps), n
        assert ours.sigmas.dtype == torch.float32 and torch.equal(ours.sigmas, ref.sigmas), n
        assert float(ours.init_noise_sigma) == float(ref.init_noise_sigma), n


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("kind", SIGMA_SAMPLERS)
def test_sigma_sampler_grids_equal_diffusers(kind, name):
    """timesteps (what the UNet is told), sigmas (n + 1, ending at 0) and init_noise_sigma are
    identical for every step count tried, among them grids with ties such as 499.5 (n = 26)."""
    ours, ref = ours_and_ref(kind, CONFIGS[name])
    assert ours.timestep_spacing == ref.config.timestep_spacing == "linspace"
    assert_same_grids(ours, ref, [*range(1, 61), 99, 100, 101, 250, 333, 500, 999, 1000])


@pytest.mark.parametrize("name", LEADING)
@pytest.mark.parametrize("kind", SIGMA_SAMPLERS)
def test_sigma_sampler_leading_grids_equal_diffusers(kind, name):
    """A config naming "leading" gives diffusers' leading grids (steps_offset included; Karras
    sigmas do not depend on it), identical for every step count whose grid fits in [0, T - 1]."""
    ours, ref = ours_and_ref(kind, LEADING[name])
    assert ours.timestep_spacing == ref.config.timestep_spacing == "leading"
    assert_same_grids(ours, ref, [*range(1, 61), 99, 100, 101, 250, 333, 500])


def test_sigma_sampler_grid_numbers():
    dpm = DPMSolverMultistepScheduler(PRESETS["sd15"])
    dpm.set_timesteps(20)  # round(k * 999 / 20) for k = 20, ..., 1
    assert dpm.timesteps[:3].tolist() == [999, 949, 899] and dpm.timesteps[-1].item() == 50
    assert len(dpm.sigmas) == 21 and dpm.sigmas[-1].item() == 0 and dpm.init_noise_sigma == 1
    assert torch.equal(dpm.sigmas[:-1], dpm.train_sigmas[dpm.timesteps])
    euler = EulerAncestralScheduler(PRESETS["sd15"])
    euler.set_timesteps(4)
    assert euler.timesteps.tolist() == [999, 666, 333, 0] and euler.timesteps.dtype == torch.float32
    assert euler.init_noise_sigma == euler.sigmas[0] == euler.train_sigmas[-1]
    assert euler.train_sigmas[-1].item() == pytest.approx(14.61, abs=0.01)  # SD's sigma_max
    # Karras et al. Eq. 5, rho = 7: from sigma_max down to sigma_min
    s = karras_sigmas(0.03, 14.6, 10)
    assert s[0].item() == pytest.approx(14.6) and s[-1].item() == pytest.approx(0.03) and (s.diff() < 0).all()
    assert s[4].item() == pytest.approx((14.6 ** (1 / 7) + 4 / 9 * (0.03 ** (1 / 7) - 14.6 ** (1 / 7))) ** 7)
    assert (-s.diff()).diff().lt(0).all()  # the steps shrink on the way down to sigma_min
    assert karras_sigmas(0.03, 14.6, 1).tolist() == [pytest.approx(14.6)]


def test_sigma_sampler_leading_grid_numbers():
    sd15_leading = SchedulerConfig.from_dict(LEADING["sd15-pndm-leading"])
    dpm = DPMSolverMultistepScheduler(sd15_leading)
    dpm.set_timesteps(20)  # k * (1000 // 21) + 1 for k = 20, ..., 1
    assert dpm.timesteps[:3].tolist() == [941, 894, 847] and dpm.timesteps[-1].item() == 48
    assert torch.equal(dpm.sigmas[:-1], dpm.train_sigmas[dpm.timesteps])
    euler = EulerAncestralScheduler(sd15_leading)
    euler.set_timesteps(4)  # DDIM's grid: k * 250 + 1 for k = 3, ..., 0
    assert euler.timesteps.tolist() == [751, 501, 251, 1] and euler.timesteps.dtype == torch.float32
    assert euler.init_noise_sigma == (euler.sigmas[0] ** 2 + 1) ** 0.5
    ddim = DDIMScheduler(sd15_leading)
    ddim.set_timesteps(4)
    assert ddim.timesteps.tolist() == [751, 501, 251, 1]
    karras = DPMSolverMultistepScheduler(sd15_leading, use_karras_sigmas=True)
    karras_default = DPMSolverMultistepScheduler(PRESETS["sd15"], use_karras_sigmas=True)
    karras.set_timesteps(15)
    karras_default.set_timesteps(15)
    assert torch.equal(karras.timesteps, karras_default.timesteps) and torch.equal(karras.sigmas, karras_default.sigmas)


@pytest.mark.parametrize("name", ALL_CONFIGS)
@pytest.mark.parametrize("kind", SIGMA_SAMPLERS)
@pytest.mark.parametrize("steps", [1, 2, 3, 20, 50])
def test_sigma_samplers_match_diffusers(kind, name, steps):
    """Every step within TOL of diffusers (epsilon, v-prediction, linear betas; default and leading
    grids), with one generator per item for Euler's noise; 1 and 2 steps are first-order steps
    only (DPM-Solver++)."""
    run_both(kind, ALL_CONFIGS[name], steps, generators=[0, 1])


def test_dpm_solver_sample_prediction_matches_diffusers():
    run_both("dpmpp_2m", {**SD15_PNDM, "prediction_type": "sample"}, 20)
    run_both("dpmpp_2m_karras", {**SD21_V, "prediction_type": "sample"}, 7)


def test_euler_ancestral_noise_comes_from_each_items_generator():
    x, _ = run_both("euler_a", SD15_PNDM, 20, generators=[0, 1])
    x_other, _ = run_both("euler_a", SD15_PNDM, 20, generators=[0, 2])
    assert torch.equal(x[0], x_other[0]) and max_err(x[1], x_other[1]) > 1e-3


def test_euler_sample_prediction_equals_the_epsilon_form():
    """x_0-predicting models (diffusers' Euler raises for them, so no reference): an x_0 output and
    the eps it implies, (x - x_0) / sigma, make the same step."""
    by_eps = EulerAncestralScheduler(SchedulerConfig.from_dict(SD15_PNDM))
    by_x0 = EulerAncestralScheduler(SchedulerConfig.from_dict({**SD15_PNDM, "prediction_type": "sample"}))
    for s in (by_eps, by_x0):
        s.set_timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g) * by_eps.init_noise_sigma
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    t, sigma = by_eps.timesteps[0], by_eps.sigmas[0]
    a = by_eps.step((x - x0) / sigma, t, x, torch.Generator().manual_seed(1))
    b = by_x0.step(x0, t, x, torch.Generator().manual_seed(1))
    assert max_err(a.pred_original_sample, x0) <= 1e-5 and torch.equal(b.pred_original_sample, x0)
    assert max_err(a.prev_sample, b.prev_sample) <= 1e-5


@pytest.mark.parametrize("kind", SIGMA_SAMPLERS)
def test_sigma_samplers_take_their_grid_in_order(kind):
    """They count their steps: a timestep out of turn is an error, set_timesteps starts again."""
    s, _ = ours_and_ref(kind, SD15_PNDM)
    s.set_timesteps(3)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t0, t1, t2 = s.timesteps
    first = s.step(fake_model(x, t0).bfloat16(), t0, x.bfloat16(), torch.Generator().manual_seed(0))
    assert first.prev_sample.dtype == torch.float32  # fp32 arithmetic whatever the inputs
    with pytest.raises(ValueError, match="in order"):
        s.step(fake_model(x, t0), t0, x)  # the same timestep twice
    s.step(fake_model(x, t1), t1, x)
    s.step(fake_model(x, t2), t2, x)
    with pytest.raises(ValueError, match="the grid is done"):
        s.step(fake_model(x, t2), t2, x)
    s.set_timesteps(3)
    again = s.step(fake_model(x, t0).bfloat16(), t0, x.bfloat16(), torch.Generator().manual_seed(0))
    assert torch.equal(again.prev_sample, first.prev_sample)
