"""sample.py against diffusers' StableDiffusionPipeline on the same tiny checkpoints, seeding,
the [V] identifier, PNG metadata and the command line's bad-input messages."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from load_weights import load_pipeline
from sample import decode_images, denoise, encode_prompts, generate, main

PROMPTS = ["a photo of a dog", "a red cube on a table"]


@pytest.fixture(scope="module")
def pipelines(tiny_sd1, tiny_sd2):
    """kind -> (our Pipeline, diffusers' StableDiffusionPipeline), both from the same folder."""
    from diffusers import StableDiffusionPipeline

    out = {}
    for kind, folder in (("sd1", tiny_sd1), ("sd2", tiny_sd2)):
        ref = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        ref.set_progress_bar_config(disable=True)
        ref.folder_scheduler_config = ref.scheduler.config  # the tests swap ref.scheduler
        out[kind] = (load_pipeline(folder), ref)
    return out


SCHEDULER_NAMES = ["ddim", "ddpm", "dpmpp_2m", "dpmpp_2m_karras", "euler_a"]


def reference_scheduler(ref, name):
    """diffusers' sampler for our `name`, from_config of the folder's scheduler config."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    config = ref.folder_scheduler_config
    if name in ("dpmpp_2m", "dpmpp_2m_karras"):
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2,
                                                       use_karras_sigmas=name == "dpmpp_2m_karras")
    return {"ddim": DDIMScheduler, "ddpm": DDPMScheduler,
            "euler_a": EulerAncestralDiscreteScheduler}[name].from_config(config)


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def denoise_both(pipelines, kind, scheduler, eta=0.0, negative="", steps=20):
    """(ours, diffusers', the unit noise both started from): final latents of sample.denoise and
    of StableDiffusionPipeline with the same sampler, noise and per-image generators."""
    ours, ref = pipelines[kind]
    ref.scheduler = reference_scheduler(ref, scheduler)
    size = ours.unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(1))
    # Both multiply the given latents by the sampler's init_noise_sigma (1 except for Euler) and
    # draw the step noise (DDIM eta > 0, DDPM, Euler) from the same per-image generators in the same order.
    expected = ref(PROMPTS, negative_prompt=[negative] * 2 if negative else None, latents=latents.clone(),
                   num_inference_steps=steps, guidance_scale=7.5, eta=eta, generator=generators([5, 6]),
                   output_type="latent").images
    with torch.no_grad():
        context = encode_prompts(ours, PROMPTS)
        uncond = encode_prompts(ours, [negative]).expand(2, -1, -1)
    got = denoise(ours, context, uncond, latents, scheduler=scheduler, steps=steps, guidance_scale=7.5,
                  eta=eta, generators=generators([5, 6]), progress=False)
    return got, expected, latents


@pytest.mark.parametrize("kind", ["sd1", "sd2"])  # epsilon and v-prediction
@pytest.mark.parametrize("scheduler,eta,negative", [("ddim", 0.0, ""), ("ddim", 1.0, "blurry"), ("ddpm", 0.0, ""),
                                                    ("dpmpp_2m", 0.0, ""), ("dpmpp_2m_karras", 0.0, "blurry"),
                                                    ("euler_a", 0.0, "")])
def test_denoise_matches_diffusers(pipelines, kind, scheduler, eta, negative):
    got, expected, latents = denoise_both(pipelines, kind, scheduler, eta, negative)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, f"final latents differ by {err} (fp32 tolerance 1e-4)"
    assert (got - latents).abs().max() > 0.1  # the loop did move the latents


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
@pytest.mark.parametrize("steps", [1, 2])
def test_one_and_two_steps_match_diffusers(pipelines, kind, scheduler, steps):
    """The shortest grids: DPM-Solver++ is first order only there, Euler's single step goes from
    sigma_max straight to 0."""
    got, expected, _ = denoise_both(pipelines, kind, scheduler, eta=0.5, steps=steps)
    err = (got - expected).abs().max().item()
    assert err <= 1e-4, f"final latents differ by {err} (fp32 tolerance 1e-4)"
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_generate_matches_diffusers_pixels(pipelines, kind, scheduler):
    """End to end: seeds -> initial noise -> loop -> VAE -> uint8, against diffusers given the
    same per-image generators (it draws the initial latents, and then the step noise of DDPM and
    Euler ancestral, from them as we do)."""
    ours, ref = pipelines[kind]
    ref.scheduler = reference_scheduler(ref, scheduler)
    expected = ref(PROMPTS, negative_prompt=["ugly"] * 2, num_inference_steps=10, guidance_scale=5.0,
                   generator=generators([11, 12]), output_type="np").images  # floats in [0, 1]
    images = generate(ours, PROMPTS, negative_prompt="ugly", scheduler=scheduler, steps=10, guidance_scale=5.0,
                      seed=11, mixed_precision="no", progress=False)
    size = ours.unet.config.sample_size * 2 ** (len(ours.vae.config.block_out_channels) - 1)
    assert [im.size for im in images] == [(size, size)] * 2 and images[0].mode == "RGB"
    got = np.stack([np.asarray(im) for im in images]).astype(np.int16)
    # uint8 rounding of values a few 1e-6 apart may land one level apart
    err = np.abs(got - (expected * 255).round().astype(np.int16)).max()
    assert err <= 1, f"pixels differ by {err} levels (tolerance 1)"
    assert got.std() > 1  # not a flat image


def pixels(images):
    return np.stack([np.asarray(im) for im in images]).astype(np.int16)


@pytest.mark.parametrize("scheduler", SCHEDULER_NAMES)
def test_seeds_not_batches_decide_images(pipelines, scheduler):
    ours, _ = pipelines["sd1"]
    prompts = ["a dog", "a cat", "a dog", "a bird", "a cat"]
    kwargs = dict(scheduler=scheduler, eta=0.5, steps=4, progress=False, mixed_precision="no")
    by_one = generate(ours, prompts, seed=3, batch_size=1, **kwargs)
    by_four = generate(ours, prompts, seed=3, batch_size=4, **kwargs)
    assert [im.info["seed"] for im in by_four] == [3, 4, 5, 6, 7]
    # fp32 kernels may sum in another order for another batch size: allow one uint8 level
    assert np.abs(pixels(by_one) - pixels(by_four)).max() <= 1
    alone = generate(ours, [prompts[3]], seed=6, **kwargs)  # image 3 of the run is seed 3 + 3
    assert np.abs(pixels(alone) - pixels(by_four[3:4])).max() <= 1
    # the same prompt with different seeds (images 0 and 2) gives different images
    assert np.abs(pixels(by_four[:1]) - pixels(by_four[2:3])).mean() > 2


def test_same_seed_same_pixels_under_autocast(pipelines):
    ours, _ = pipelines["sd2"]
    run = lambda seed: pixels(generate(ours, ["a dog", "a cat"], seed=seed, steps=3, progress=False))
    first = run(0)
    assert np.array_equal(first, run(0))
    assert np.abs(first - run(1)).mean() > 2
    # "auto" on CPU is bf16 autocast: close to fp32 (mean ~1 uint8 level here), but not equal
    fp32 = pixels(generate(ours, ["a dog", "a cat"], seed=0, steps=3, progress=False, mixed_precision="no"))
    assert 0 < np.abs(first - fp32).mean() < 4


def test_generate_rejects_bad_sizes_and_schedulers(pipelines):
    ours, _ = pipelines["sd2"]  # VAE downsamples by 4, the UNet by 4 more: sizes are multiples of 16
    with pytest.raises(ValueError, match="multiples of 16"):
        generate(ours, ["a dog"], height=24, steps=1, progress=False)
    with pytest.raises(ValueError, match="unknown scheduler 'euler'"):
        generate(ours, ["a dog"], scheduler="euler", steps=1, progress=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        generate(ours, ["a dog"], mixed_precision="fp8", steps=1, progress=False)
    assert generate(ours, ["a dog"], height=48, width=16, steps=1, progress=False)[0].size == (16, 48)


def test_long_prompt_prints_the_cut_words_once(pipelines, capsys, monkeypatch):
    ours, _ = pipelines["sd1"]
    monkeypatch.setattr(sample, "_WARNED_TRUNCATIONS", set())  # as in a fresh process
    fits = " ".join(["dog"] * 75)  # 75 tokens + start + end = 77
    long = fits + " purple elephant"
    generate(ours, [long, long], steps=1, progress=False)
    encode_prompts(ours, [long])  # encoded again later in the process: not reported again
    err = capsys.readouterr().err
    assert err.count("warning:") == 1 and len(err.splitlines()) == 1, err
    assert "'purple elephant'" in err and "77 tokens" in err
    encode_prompts(ours, [fits])  # fits exactly: nothing to say
    assert capsys.readouterr().err == ""


def test_cut_words_are_whole_words(pipelines, capsys, monkeypatch):
    ours, _ = pipelines["sd1"]
    monkeypatch.setattr(sample, "_WARNED_TRUNCATIONS", set())
    # "photorealistic" is two tokens (photo + realistic): its first fits, its second does not
    prompt = " ".join(["dog"] * 74) + " photorealistic street"
    assert ours.tokenizer.encode(prompt)[-2] == ours.tokenizer.token_to_id("photo")
    encode_prompts(ours, [prompt])
    assert "the text encoder does not see 'photorealistic street'" in capsys.readouterr().err


def test_decode_images_range(pipelines):
    ours, _ = pipelines["sd1"]
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 50
    images = decode_images(ours, latents)
    assert len(images) == 3 and images[0].size == (16, 16)
    values = pixels(images)
    assert values.min() == 0 and values.max() == 255  # large latents saturate: clamped, not wrapped


def dreambooth_model(tiny_sd1, tmp_path, info):
    folder = shutil.copytree(tiny_sd1, tmp_path / "dreambooth-out")
    (folder / "dreambooth.json").write_text(json.dumps(info))
    return folder


def test_cli_identifier_metadata_and_grid(tiny_sd1, tmp_path):
    model = dreambooth_model(tiny_sd1, tmp_path, {"identifier": "sks", "class_noun": "dog"})
    out = tmp_path / "out"
    argv = ["--model", str(model), "--prompt", "a [V] dog", "--prompt", "a [V] dog in snow",
            "--negative_prompt", "blurry", "--num_images", "2", "--steps", "2", "--seed", "7",
            "--scheduler", "ddim", "--eta", "0.5", "--guidance_scale", "3", "--batch_size", "3",
            "--mixed_precision", "no", "--device", "cpu", "--out_dir", str(out)]
    assert main(argv) == 0
    files = sorted(out.glob("0000[0-3]-a_sks_dog*-seed*.png"))
    assert len(files) == 4
    text = Image.open(files[3]).text
    assert text == {"prompt": "a sks dog in snow", "negative_prompt": "blurry", "seed": "10", "steps": "2",
                    "scheduler": "ddim", "guidance_scale": "3.0", "eta": "0.5", "model": str(model)}
    grid = Image.open(out / "00000-grid.png")
    assert grid.size == (2 * 16, 2 * 16)  # rows = prompts, columns = images per prompt
    assert np.array_equal(np.asarray(grid)[16:, :16], np.asarray(Image.open(files[2]).convert("RGB")))
    # a second run into the same folder continues the numbering instead of overwriting
    assert main(argv[:-1] + [str(out)]) == 0
    assert (out / "00004-grid.png").is_file() and len(list(out.glob("*.png"))) == 10


@pytest.mark.parametrize("args,message", [
    (["--prompt", "x", "--height", "100"], "--height must be a positive multiple of 8"),
    (["--prompt", "x", "--width", "24"], "multiples of 16"),  # the tiny SD2 model needs 16
    (["--prompt", "x", "--steps", "0"], "--steps must be at least 1"),
    (["--prompt", "x", "--scheduler", "euler"], "invalid choice: 'euler'"),
    (["--prompt", "a [V] dog"], "no dreambooth.json"),
    ([], "no prompt given"),
    (["--prompt", "x", "--model", "MISSING"], "does not exist"),
    (["--prompts_file", "MISSING"], "cannot read --prompts_file"),
])
def test_cli_bad_input_exits_2(tiny_sd2, tmp_path, capsys, args, message):
    args = [str(tmp_path / "nope") if a == "MISSING" else a for a in args]
    argv = ["--model", str(tiny_sd2), "--out_dir", str(tmp_path / "out"), *args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_cli_prompts_file(tiny_sd1, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a dog\n\na cat\n")
    assert main(["--model", str(tiny_sd1), "--prompts_file", str(prompts), "--steps", "1",
                 "--out_dir", str(tmp_path), "--device", "cpu"]) == 0
    assert sorted(Image.open(p).text["prompt"] for p in tmp_path.glob("*seed*.png")) == ["a cat", "a dog"]


@pytest.mark.parametrize("num_images, message", [(1, "wrote 1 image and "), (3, "wrote 3 images and ")])
def test_cli_final_message_counts_images(tiny_sd1, tmp_path, capsys, num_images, message):
    assert main(["--model", str(tiny_sd1), "--prompt", "a dog", "--num_images", str(num_images),
                 "--scheduler", "euler_a", "--steps", "2", "--out_dir", str(tmp_path), "--device", "cpu"]) == 0
    assert capsys.readouterr().out.startswith(message)
    assert len(list(tmp_path.glob("*seed*.png"))) == num_images


def test_scheduler_names():
    """The samplers --scheduler offers (train.py's --class_scheduler and evaluate.py read the same table)."""
    assert sorted(sample.SCHEDULERS) == SCHEDULER_NAMES
    choices = next(a.choices for a in sample.build_parser()._actions if "--scheduler" in a.option_strings)
    assert choices == SCHEDULER_NAMES


def test_help_shows_every_default():
    """sample.py's and evaluate.py's --help: each flag says its default once, never "None"."""
    import evaluate

    for parser in (sample.build_parser(), evaluate.build_parser()):
        text = " ".join(parser.format_help().split())  # undo the line wrapping
        flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert text.count("(default:") == len(flags), text
        assert "(default: None)" not in text and "(default: )" not in text and "(default: [])" not in text
    text = " ".join(sample.build_parser().format_help().split())
    assert "--steps STEPS denoising steps (default: 50)" in text
    assert "--height HEIGHT pixels (default: the model's native size)" in text
