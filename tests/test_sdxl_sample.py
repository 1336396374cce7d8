"""sample.py with SDXL base against diffusers' StableDiffusionXLPipeline on a tiny random SDXL
folder (test_sdxl.py builds it): the two-encoder context, the pooled embedding and the size
numbers on every UNet call (doubled under guidance), the empty negative prompt as zeros where
model_index.json says force_zeros_for_empty_prompt, the VAE decoded in fp32 (force_upcast),
seeding, and the command line. Tolerances (fp32): final latents 1e-4, pixels one uint8 level."""
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from load_weights import load_pipeline, save_pipeline
from sample import (add_time_ids, decode_images, denoise, generate, image_size, main, make_added_cond,
                    negative_conditioning, text_conditioning)
from test_sdxl import reference_pipeline, save_hub_folder
from unet import PRESETS as UNET_PRESETS
from vae import VAEConfig

PROMPTS = ["a photo of a dog", "a red cube on a table"]
HEIGHT, WIDTH = 32, 16  # not square, so that a swapped (height, width) in the size numbers shows
GUIDANCE = 5.0  # diffusers' StableDiffusionXLPipeline default
LATENT_TOL = 1e-4  # fp32 max abs error of the final latents
# SDXL base's scheduler/scheduler_config.json as its Hub folder has it (a DDIM built from it does
# not clip x_0, unlike one built from diffusers' EulerDiscreteScheduler defaults alone)
SDXL_SCHEDULER_JSON = {
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """force_zeros_for_empty_prompt -> a tiny SDXL folder saved by diffusers whose model_index.json
    says so (the same weights in both)."""
    root = tmp_path_factory.mktemp("sdxl_sample")
    zeros = save_hub_folder(reference_pipeline(root / "tokenizers"), root / "zeros")
    (zeros / "scheduler" / "scheduler_config.json").write_text(json.dumps(SDXL_SCHEDULER_JSON))
    encoded = shutil.copytree(zeros, root / "encoded")
    index = json.loads((encoded / "model_index.json").read_text())
    assert index["force_zeros_for_empty_prompt"] is True  # diffusers' default, as SDXL base has it
    (encoded / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    return {True: zeros, False: encoded}


@pytest.fixture(scope="module")
def pipelines(folders):
    """force_zeros_for_empty_prompt -> (our Pipeline, diffusers' StableDiffusionXLPipeline)."""
    from diffusers import StableDiffusionXLPipeline

    out = {}
    for force_zeros, folder in folders.items():
        ref = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, add_watermarker=False)
        ref.set_progress_bar_config(disable=True)
        ref.folder_scheduler_config = ref.scheduler.config  # the tests swap ref.scheduler
        assert ref.config.force_zeros_for_empty_prompt is force_zeros
        out[force_zeros] = (load_pipeline(folder), ref)
    return out


def reference_scheduler(ref, name):
    """diffusers' sampler for our `name`, from_config of the folder's scheduler config (SDXL's
    names "leading" spacing: every sampler takes its leading grid, ours as diffusers')."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    config = ref.folder_scheduler_config
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "dpmpp_2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    return EulerAncestralDiscreteScheduler.from_config(config)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def unit_noise(seed=1):
    return torch.randn(2, 4, HEIGHT // 2, WIDTH // 2, generator=torch.Generator().manual_seed(seed))


def our_denoise(ours, latents, scheduler, negative, steps):
    """sample.denoise from `latents` with the conditioning generate builds for PROMPTS (through
    the module's names, which a test may replace)."""
    with torch.no_grad():
        context, pooled = text_conditioning(ours, PROMPTS)
        uncond, uncond_pooled = negative_conditioning(ours, negative)
    return denoise(ours, context, uncond.expand(2, -1, -1), latents,
                   added_cond=sample.make_added_cond(pooled, HEIGHT, WIDTH, 2),
                   uncond_added_cond=sample.make_added_cond(uncond_pooled, HEIGHT, WIDTH, 2),
                   scheduler=scheduler, steps=steps, guidance_scale=GUIDANCE, generators=generators([5, 6]),
                   progress=False)


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


def read_pixels(paths):
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image))
    return np.stack(arrays).astype(np.int16)


# ---------------------------------------------------------------------------------------------
# The conditioning and the loop, against diffusers


def test_conditioning_matches_diffusers_encode_prompt(pipelines):
    """Both encoders' context [B, 77, 32 + 48] and the pooled embedding [B, 40]; the negative
    branch: the empty prompt is zeros (force_zeros_for_empty_prompt true) or the encoding of ""
    (false), a negative prompt its encoding."""
    for force_zeros, (ours, ref) in pipelines.items():
        for negative in ("", "blurry"):
            with torch.no_grad():
                context, pooled = text_conditioning(ours, PROMPTS)
                uncond, uncond_pooled = negative_conditioning(ours, negative)
                want = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=True,
                                         negative_prompt=[negative] * 2 if negative else None)
            have = (context, uncond.expand(2, -1, -1), pooled, uncond_pooled.expand(2, -1))
            errors = [(a - b).abs().max().item() for a, b in zip(have, want)]
            print(f"force_zeros {force_zeros}, negative {negative!r}: fp32 max abs err {errors} (tolerance 1e-5)")
            assert context.shape == (2, 77, 80) and pooled.shape == (2, 40) and max(errors) <= 1e-5
            zeroed = force_zeros and not negative
            assert (uncond.abs().max() == 0) == zeroed and (uncond_pooled.abs().max() == 0) == zeroed


@pytest.mark.parametrize("scheduler,negative,force_zeros", [
    ("ddim", "", True),  # the empty negative prompt as zeros (SDXL base)
    ("ddim", "", False),  # ... as the encoding of ""
    ("ddim", "blurry", True),
    ("euler_a", "", True),  # step noise from the per-image generators; init_noise_sigma > 1
    ("dpmpp_2m", "blurry", False),
])
def test_denoise_matches_diffusers(pipelines, scheduler, negative, force_zeros):
    ours, ref = pipelines[force_zeros]
    ref.scheduler = reference_scheduler(ref, scheduler)
    latents = unit_noise()
    # diffusers' negative_prompt=None is our empty negative prompt: zeros or "" as the folder says
    expected = ref(PROMPTS, negative_prompt=[negative] * 2 if negative else None, latents=latents.clone(),
                   height=HEIGHT, width=WIDTH, num_inference_steps=8, guidance_scale=GUIDANCE,
                   generator=generators([5, 6]), output_type="latent").images
    got = our_denoise(ours, latents, scheduler, negative, steps=8)
    err = (got - expected).abs().max().item()
    print(f"SDXL {scheduler}, negative {negative!r}, force_zeros {force_zeros}: final latents max abs err "
          f"{err:.2e} (tolerance {LATENT_TOL}; latents max {expected.abs().max():.2f})")
    assert got.shape == (2, 4, HEIGHT // 2, WIDTH // 2) and err <= LATENT_TOL
    assert (got - latents).abs().max() > 0.1  # the loop did move the latents


def test_the_parity_tests_see_the_conditioning(pipelines, monkeypatch):
    """The parts SDXL adds change the final latents by far more than LATENT_TOL, so the
    comparisons above would catch a mistake in any of them: the zeroed empty prompt, the pooled
    embedding, and the size numbers (swapped height and width, a crop)."""
    ours, _ = pipelines[True]
    latents = unit_noise()
    base = our_denoise(ours, latents, "ddim", "", steps=4)
    changes = {"the empty prompt encoded, not zeros": our_denoise(pipelines[False][0], latents, "ddim", "", steps=4)}
    real_add_time_ids = add_time_ids
    for name, change in (("height and width swapped", lambda o, c, t: real_add_time_ids(o[::-1], c, t[::-1])),
                         ("crop (8, 4)", lambda o, c, t: real_add_time_ids(o, (8, 4), t))):
        monkeypatch.setattr(sample, "add_time_ids", change)
        changes[name] = our_denoise(ours, latents, "ddim", "", steps=4)
    monkeypatch.setattr(sample, "add_time_ids", real_add_time_ids)
    real_make_added_cond = make_added_cond
    monkeypatch.setattr(sample, "make_added_cond", lambda pooled, *size: real_make_added_cond(0 * pooled, *size))
    changes["pooled embedding zeroed"] = our_denoise(ours, latents, "ddim", "", steps=4)
    differences = {name: (latents - base).abs().max().item() for name, latents in changes.items()}
    print(f"final latents change (tolerance of the parity tests {LATENT_TOL}): {differences}")
    assert min(differences.values()) > 100 * LATENT_TOL


def test_add_time_ids_order():
    """(original height, width, crop top, left, target height, width), as the UNet's added_embedding reads them."""
    assert add_time_ids((768, 512), (64, 32), (1024, 896)).tolist() == [[768., 512., 64., 32., 1024., 896.]]
    cond = make_added_cond(torch.ones(1, 40), 1024, 768, 3)
    assert cond["text_embeds"].shape == (3, 40)
    assert cond["time_ids"].tolist() == [[1024., 768., 0., 0., 1024., 768.]] * 3
    assert make_added_cond(None, 512, 512, 3) is None  # SD 1.x/2.x: no added conditioning


# ---------------------------------------------------------------------------------------------
# generate: seeds -> noise -> loop -> VAE -> uint8


@pytest.mark.parametrize("scheduler,negative,force_zeros", [
    ("ddim", "", True), ("ddim", "", False), ("euler_a", "ugly", True), ("dpmpp_2m", "", True)])
def test_generate_matches_diffusers_pixels(pipelines, scheduler, negative, force_zeros):
    """End to end against diffusers given the same per-image generators (it draws the initial
    latents, and Euler ancestral's step noise, from them as we do)."""
    ours, ref = pipelines[force_zeros]
    ref.scheduler = reference_scheduler(ref, scheduler)
    expected = ref(PROMPTS, negative_prompt=[negative] * 2 if negative else None, height=HEIGHT, width=WIDTH,
                   num_inference_steps=10, guidance_scale=GUIDANCE, generator=generators([11, 12]),
                   output_type="np").images  # floats in [0, 1]
    images = generate(ours, PROMPTS, negative_prompt=negative, scheduler=scheduler, steps=10, guidance_scale=GUIDANCE,
                      seed=11, height=HEIGHT, width=WIDTH, mixed_precision="no", progress=False)
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * 2 and images[0].mode == "RGB"
    got = pixels(images)
    # uint8 rounding of values a few 1e-6 apart may land one level apart
    err = np.abs(got - (expected * 255).round().astype(np.int16)).max()
    print(f"SDXL {scheduler}, negative {negative!r}, force_zeros {force_zeros}: pixels differ by {err} levels")
    assert err <= 1, f"pixels differ by {err} levels (tolerance 1)"
    assert got.std() > 1  # not a flat image


def test_default_size_is_the_unets_sample_size_times_the_vae_factor(pipelines):
    ours, _ = pipelines[True]
    assert image_size(ours) == (16, 16)  # the tiny UNet's sample_size 8 x the tiny VAE's 2
    assert generate(ours, ["a dog"], steps=1, progress=False)[0].size == (16, 16)
    sdxl_base = SimpleNamespace(unet=SimpleNamespace(config=UNET_PRESETS["sdxl-base"]),
                                vae=SimpleNamespace(config=VAEConfig(block_out_channels=(128, 256, 512, 512))))
    assert image_size(sdxl_base) == (1024, 1024)  # sample_size 128 x 8
    with pytest.raises(ValueError, match="multiples of 32"):  # VAE 8 x UNet 4 (three levels)
        image_size(sdxl_base, 1000, 1024)


@pytest.mark.parametrize("scheduler", ["ddim", "euler_a"])
def test_seeds_not_batches_decide_images(pipelines, scheduler):
    ours, _ = pipelines[True]
    prompts = ["a dog", "a cat", "a dog"]
    kwargs = dict(scheduler=scheduler, steps=4, height=HEIGHT, width=WIDTH, progress=False, mixed_precision="no")
    by_one = generate(ours, prompts, seed=3, batch_size=1, **kwargs)
    by_three = generate(ours, prompts, seed=3, batch_size=3, **kwargs)
    assert [im.info["seed"] for im in by_three] == [3, 4, 5]
    # fp32 kernels may sum in another order for another batch size: allow one uint8 level
    assert np.abs(pixels(by_one) - pixels(by_three)).max() <= 1
    alone = generate(ours, [prompts[2]], seed=5, **kwargs)  # image 2 of the run is seed 3 + 2
    assert np.abs(pixels(alone) - pixels(by_three[2:])).max() <= 1
    assert np.abs(pixels(by_three[:1]) - pixels(by_three[2:])).mean() > 2  # same prompt, other seed


# ---------------------------------------------------------------------------------------------
# Precision: SDXL's VAE decodes in fp32 (force_upcast); SD 1.x's keeps the sampling precision


def test_sdxl_vae_decodes_in_fp32_under_autocast(folders):
    half = load_pipeline(folders[True], dtype=torch.float16)
    fp32 = load_pipeline(folders[True])
    with torch.no_grad():  # the same weights, rounded to fp16 as the half pipeline has them
        for p, q in zip(fp32.vae.parameters(), half.vae.parameters()):
            p.copy_(q.float())
    latents = unit_noise()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = pixels(decode_images(half, latents))
    assert all(p.dtype == torch.float32 and not p.is_inference() for p in half.vae.parameters())
    assert next(half.unet.parameters()).dtype == torch.float16  # only the VAE is upcast
    assert np.array_equal(under_autocast, pixels(decode_images(fp32, latents)))  # the same fp32 arithmetic


def test_sd1_vae_keeps_the_sampling_precision(tiny_sd1):
    """SD 1.x VAE configs leave force_upcast at its default (true), which diffusers reads for SDXL only."""
    ours = load_pipeline(tiny_sd1, dtype=torch.bfloat16)
    assert ours.vae.config.force_upcast and not sample.decodes_in_fp32(ours)
    decode_images(ours, unit_noise())
    assert next(ours.vae.parameters()).dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# force_zeros_for_empty_prompt through the loader, and the command line


def test_force_zeros_for_empty_prompt_is_read_and_saved(folders, tiny_sd1, tmp_path):
    assert load_pipeline(folders[True]).force_zeros_for_empty_prompt is True
    encoded = load_pipeline(folders[False])
    assert encoded.force_zeros_for_empty_prompt is False
    saved = save_pipeline(encoded, tmp_path / "saved")
    assert json.loads((saved / "model_index.json").read_text())["force_zeros_for_empty_prompt"] is False
    assert load_pipeline(saved).force_zeros_for_empty_prompt is False
    no_index = shutil.copytree(folders[True], tmp_path / "no_index")
    (no_index / "model_index.json").unlink()  # not said: diffusers' default, true
    assert load_pipeline(no_index).force_zeros_for_empty_prompt is True
    assert load_pipeline(tiny_sd1).force_zeros_for_empty_prompt is False  # SD 1.x/2.x have no such setting


def test_cli_end_to_end(pipelines, folders, tmp_path, capsys):
    out = tmp_path / "samples"
    args = ["--model", str(folders[True]), "--prompt", "a photo of a dog", "--prompt", "a red cube",
            "--num_images", "2", "--steps", "4", "--seed", "7", "--height", str(HEIGHT), "--width", str(WIDTH),
            "--device", "cpu", "--out_dir", str(out)]
    assert main(args + ["--mixed_precision", "no"]) == 0
    assert "wrote 4 images" in capsys.readouterr().out
    files = sorted(out.glob("*-seed*.png"))
    assert [f.name for f in files] == ["00000-a_photo_of_a_dog-seed7.png", "00001-a_photo_of_a_dog-seed8.png",
                                       "00002-a_red_cube-seed9.png", "00003-a_red_cube-seed10.png"]
    with Image.open(files[0]) as image:
        assert image.size == (WIDTH, HEIGHT) and image.text["model"] == str(folders[True])
    ours, _ = pipelines[True]
    expected = generate(ours, ["a photo of a dog"] * 2 + ["a red cube"] * 2, steps=4, seed=7, height=HEIGHT,
                        width=WIDTH, mixed_precision="no", progress=False)
    assert np.array_equal(read_pixels(files), pixels(expected))
    # The default precision on CPU: bf16 weights and autocast, the VAE in fp32. Close to fp32, not equal.
    assert main(args + ["--mixed_precision", "auto"]) == 0
    half = read_pixels(sorted(out.glob("*-seed*.png"))[4:])
    assert half.shape == (4, HEIGHT, WIDTH, 3) and 0 < np.abs(half - pixels(expected)).mean() < 4
