"""train.py --lora_rank (DreamBooth-LoRA) on tiny random pipelines: only the adapters train, the
output folder holds the adapters (both formats) and no base weights, exact resume, sample.py and
evaluate.py on the result against diffusers' load_lora_weights, bad LoRAs, and --save_single_file."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import evaluate
import lora
import sample
import train
from load_weights import load_pipeline
from test_distributed import torchrun, train_args
from test_train import fixed_loss, run, unet_weights

RANK, ALPHA = 4, 8  # alpha != rank: the files must carry alpha (kohya's .alpha, diffusers' metadata)
LORA = ["--lora_rank", str(RANK), "--lora_alpha", str(ALPHA)]
PROMPT = "a photo of sks square"


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Four small synthetic 'subject' photos: a red square on varied backgrounds (as test_train.py's)."""
    folder = tmp_path_factory.mktemp("subject")
    for i, background in enumerate([(20, 120, 20), (200, 200, 200), (30, 30, 160), (120, 80, 40)]):
        image = Image.new("RGB", (40, 36), background)
        image.paste((220, 30, 30), (8 + i, 6, 28 + i, 26))
        image.save(folder / f"{i}.png")
    return folder


def adapter_files(folder):
    """Both LoRA files of an output folder, as {key: tensor}."""
    folder = Path(folder)
    return load_file(folder / lora.LORA_FILE), load_file(folder / f"{folder.name}.safetensors")


@pytest.fixture(scope="module")
def lora_run(tiny_sd1, instance_dir, tmp_path_factory):
    """One LoRA run, UNet and text encoder, with prior preservation, at a learning rate high
    enough that the adapters change the images well beyond the comparisons' tolerances."""
    out = tmp_path_factory.mktemp("lora") / "dog-lora"
    return run(tiny_sd1, instance_dir, out, *LORA, "--train_text_encoder", "--identifier", "sks",
               "--max_steps", "30", "--lr", "1e-2", "--batch_size", "2")


def test_only_the_adapters_train_and_the_frozen_base_is_half(tiny_sd1, instance_dir, tmp_path,
                                                             monkeypatch, capsys):
    seen = {}
    real_make_trainer, real_step = train.make_trainer, torch.optim.AdamW.step

    def make_trainer(pipeline, *args, **kwargs):
        seen["pipeline"] = pipeline
        seen["trainer"] = real_make_trainer(pipeline, *args, **kwargs)
        return seen["trainer"]

    def step(self, *args, **kwargs):
        seen["grad_dtypes"] = {p.grad.dtype for g in self.param_groups for p in g["params"]}
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(train, "make_trainer", make_trainer)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    run(tiny_sd1, instance_dir, tmp_path / "out", *LORA, "--train_text_encoder", "--max_steps", "2",
        "--mixed_precision", "bf16", "--gradient_checkpointing", "--lr", "1e-3")
    pipeline, optimizer = seen["pipeline"], seen["trainer"].optimizer
    adapters = lora.lora_parameters(pipeline.unet) + lora.lora_parameters(pipeline.text_encoder)
    assert len(lora.lora_layers(pipeline.unet)) == 4 * 2 * 6  # to_q/k/v/out.0 x attn1/2 x 6 blocks
    assert len(lora.lora_layers(pipeline.text_encoder)) == 4 * 2  # q/k/v/out_proj x 2 layers
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert {id(p) for p in in_optimizer} == {id(p) for p in adapters} and len(in_optimizer) == len(adapters)
    assert set(optimizer.state) <= set(in_optimizer) and len(optimizer.state) == len(adapters)  # Adam moments
    for model in (pipeline.unet, pipeline.text_encoder):
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        assert trainable and all(train.is_adapter_weight(n) for n in trainable)
        # adapters, their gradients and moments fp32; the frozen base in the autocast precision
        assert {p.dtype for p in lora.lora_parameters(model)} == {torch.float32}
        assert {p.dtype for n, p in model.named_parameters() if not p.requires_grad} == {torch.bfloat16}
    assert seen["grad_dtypes"] == {torch.float32}
    # the base weights did not move: exactly the pretrained ones, rounded once to bf16
    base = load_pipeline(tiny_sd1).unet.state_dict()
    trained = pipeline.unet.state_dict()
    assert all(torch.equal(trained[k], v.to(torch.bfloat16)) for k, v in base.items())
    expected = sum(RANK * (m.in_features + m.out_features) for m in lora.lora_layers(pipeline.unet).values())
    assert f"trainable parameters: unet {expected:,} of " in capsys.readouterr().err


def test_lora_run_learns_and_writes_only_the_adapters(lora_run, tiny_sd1, instance_dir):
    before = fixed_loss(load_pipeline(tiny_sd1), instance_dir, PROMPT)
    after = fixed_loss(sample.load_model(lora_run), instance_dir, PROMPT)  # base + the LoRA merged
    assert after < 0.8 * before, (before, after)
    # the adapters, the log and dreambooth.json; no copy of the base model
    names = {p.name for p in lora_run.iterdir()}
    assert {lora.LORA_FILE, "dog-lora.safetensors", "dreambooth.json", "loss.jsonl", "loss.png"} <= names
    assert not names & {"unet", "text_encoder", "vae", "tokenizer", "scheduler", "model_index.json"}
    assert not [n for n in names if n.endswith(".tmp")]
    info = json.loads((lora_run / "dreambooth.json").read_text())
    assert info["base_model"] == str(tiny_sd1.resolve()) and info["identifier"] == "sks"
    assert info["lora"] == {"rank": RANK, "alpha": ALPHA, "dropout": 0.0,
                            "targets": {"unet": list(lora.UNET_TARGETS), "text_encoder": list(lora.TEXT_ENCODER_TARGETS)},
                            "files": {"diffusers": lora.LORA_FILE, "kohya": "dog-lora.safetensors"}}
    diffusers_file, kohya_file = adapter_files(lora_run)
    assert all(k.startswith(("unet.", "text_encoder.")) for k in diffusers_file)
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya_file)
    assert any(k.startswith("lora_te_") for k in kohya_file)
    assert {v.item() for k, v in kohya_file.items() if k.endswith(".alpha")} == {ALPHA}
    # both files hold the same adapters, exactly
    base = load_pipeline(tiny_sd1)
    states = [lora.load_lora(lora_run / name, base.unet, base.text_encoder)[0]
              for name in (lora.LORA_FILE, "dog-lora.safetensors")]
    for component in ("unet", "text_encoder"):
        a, b = states[0][component], states[1][component]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert any(v.abs().max() > 0 for k, v in a.items() if ".lora_up." in k)  # B trained away from 0


def test_exact_resume_of_a_lora_run(tiny_sd1, instance_dir, tmp_path, capsys):
    common = [*LORA, "--train_text_encoder", "--cache_latents", "--grad_accum", "2", "--max_steps", "4",
              "--checkpoint_every", "2", "--keep_checkpoints", "2", "--lr", "1e-3", "--flip", "--warmup_steps", "3"]
    straight = run(tiny_sd1, instance_dir, tmp_path / "a", *common)
    checkpoint = straight / "checkpoints" / "step-000002"
    for name in ("unet", "text_encoder"):  # a checkpoint holds the adapters only
        keys = load_file(checkpoint / f"{name}.safetensors").keys()
        assert keys and all(train.is_adapter_weight(k) for k in keys)
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, resumed / "checkpoints" / "step-000002")
    shutil.copytree(straight / "class_images", resumed / "class_images")
    run(tiny_sd1, instance_dir, resumed, *common, "--resume", "latest")
    for a, b in zip(adapter_files(straight), adapter_files(resumed)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed adapters differ"
    assert (resumed / "loss.jsonl").read_text() == (straight / "loss.jsonl").read_text()
    # other adapters (or none) cannot continue this run
    for other, message in ((["--lora_rank", "8"], 'LoRA {"rank": 4'), (["--lora_rank", "0"], "this run is a full fine-tune")):
        argv = common[len(LORA):] + other + ["--resume", str(checkpoint)]
        with pytest.raises(SystemExit) as exit_info:
            run(tiny_sd1, instance_dir, tmp_path / "c", *argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


def test_two_ranks_train_the_adapters_like_one_process(tiny_sd1, instance_dir, tmp_path):
    """torchrun, 2 processes x batch 1 == 1 process x batch 2 (see test_distributed.py), LoRA."""
    common = [*LORA, "--max_steps", "3", "--adam_epsilon", "1e-3"]
    two, one = tmp_path / "two", tmp_path / "one"
    torchrun(2, train_args(tiny_sd1, instance_dir, two, "--batch_size", "1", *common))
    torchrun(1, train_args(tiny_sd1, instance_dir, one, "--batch_size", "2", *common,
                           "--class_dir", str(two / "class_images")))
    (a, _), (b, _) = adapter_files(two), adapter_files(one)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max(a[k].abs().max().item() for k in a if ".lora_B." in k) > 1e-4  # it did train


def reference_pixels(folder, prompt, seed, steps, lora_file=None):
    """diffusers: the base model, load_lora_weights, DDIM, fp32, as uint8 pixels."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    info = json.loads((Path(folder) / "dreambooth.json").read_text())
    ref = StableDiffusionPipeline.from_pretrained(info["base_model"], local_files_only=True)
    ref.scheduler = DDIMScheduler.from_config(ref.scheduler.config)
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(folder, **({"weight_name": lora_file} if lora_file else {}))
    images = ref(prompt, num_inference_steps=steps, guidance_scale=7.5,
                 generator=torch.Generator().manual_seed(seed), output_type="np").images
    return (images[0] * 255).round().astype(np.int16)


def sample_pixels(tmp_path, *argv):
    out = tmp_path / f"samples-{len(list(tmp_path.iterdir()))}"
    assert sample.main([*argv, "--steps", "10", "--seed", "3", "--scheduler", "ddim", "--mixed_precision", "no",
                        "--device", "cpu", "--out_dir", str(out)]) == 0
    (png,) = out.glob("*-seed3.png")
    return np.asarray(Image.open(png)).astype(np.int16), Image.open(png).text


def test_sample_on_the_lora_folder_matches_diffusers_load_lora_weights(lora_run, tiny_sd1, tmp_path):
    ours, text = sample_pixels(tmp_path, "--model", str(lora_run), "--prompt", "a [V] square")
    assert text["prompt"] == "a sks square" and "LoRA" in text["model"]
    # uint8 rounding of values a few 1e-6 apart may land one level apart
    for lora_file in (None, "dog-lora.safetensors"):  # diffusers' format, then kohya's
        err = np.abs(ours - reference_pixels(lora_run, "a sks square", 3, 10, lora_file)).max()
        assert err <= 1, f"{lora_file or lora.LORA_FILE}: pixels differ from diffusers' by {err} levels (tolerance 1)"
    base, _ = sample_pixels(tmp_path, "--model", str(tiny_sd1), "--prompt", "a sks square")
    assert np.abs(ours - base).mean() > 5  # the LoRA changes the image far beyond the tolerance
    # the same LoRA on top of its base with --lora, and --lora_scale 0 gives back the base model
    on_top, _ = sample_pixels(tmp_path, "--model", str(tiny_sd1), "--lora", str(lora_run), "--prompt", "a [V] square")
    assert np.array_equal(on_top, ours)
    off, _ = sample_pixels(tmp_path, "--model", str(lora_run), "--lora_scale", "0", "--prompt", "a [V] square")
    assert np.array_equal(off, base)


def test_bad_loras_exit_2_with_the_reason(lora_run, tiny_sd1, tiny_sd2, tmp_path, capsys):
    cases = [(["--model", str(tiny_sd2), "--lora", str(lora_run)],
              "tensors name no layer that LoRA can adapt in this model"),
             (["--model", str(tiny_sd2), "--lora", str(lora_run)], f"This LoRA was trained on {tiny_sd1.resolve()}"),
             (["--model", str(tiny_sd1), "--lora", str(tiny_sd1)], "is a model folder, not a LoRA: pass it as the model"),
             (["--model", str(tiny_sd1), "--lora", str(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")],
              "It looks like a full model"),
             (["--model", str(tiny_sd1), "--lora_scale", "0.5"], "is not one; give a LoRA's strength as --lora PATH:SCALE")]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            sample.main([*argv, "--prompt", "a square", "--steps", "1", "--out_dir", str(tmp_path / "x")])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv,message", [
    (["--lora_alpha", "8"], "set(s) up LoRA adapters: add --lora_rank R"),
    (["--lora_rank", "-1"], "--lora_rank must be at least 0"),
    (["--lora_rank", "4", "--lora_dropout", "1"], "--lora_dropout must be in [0, 1)"),
    (["--lora_rank", "4", "--lora_targets", ","], "names no layer"),
    (["--lora_rank", "4", "--lora_targets", "to_q,to_z"], "no layer of the unet is named to_z"),
    (["--lora_rank", "4", "--lora_targets", "ff.net.0"], "LoRA adapts nn.Linear and nn.Conv2d layers"),
    (["--lora_rank", "4", "--save_single_file"], "--save_single_file is for full fine-tunes"),
])
def test_bad_lora_flags(tiny_sd1, instance_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_sd1, instance_dir, tmp_path / "out", "--no_prior_preservation", "--max_steps", "1", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_feed_forward_targets(tiny_sd1, instance_dir, tmp_path):
    out = run(tiny_sd1, instance_dir, tmp_path / "ff", "--lora_rank", "2", "--lora_targets", "attention+ff",
              "--no_prior_preservation", "--max_steps", "1")
    diffusers_file, _ = adapter_files(out)
    layers = {k.removesuffix(".lora_A.weight") for k in diffusers_file if k.endswith(".lora_A.weight")}
    assert len(layers) == 6 * (2 * 4 + 2)  # 6 transformer blocks x (2 attentions x 4 projections + 2 feed-forward)
    assert "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2" in layers


def test_evaluate_takes_the_lora_folder_or_the_base_with_lora(lora_run, tiny_sd1, instance_dir, tmp_path):
    common = ["--instance_dir", str(instance_dir), "--max_prompts", "1", "--num_images", "1", "--steps", "2",
              "--no_pres", "--random_encoders", "--mixed_precision", "no", "--device", "cpu"]
    assert evaluate.main(["--model", str(lora_run), *common, "--out", str(tmp_path / "a.json")]) == 0
    assert evaluate.main(["--model", str(tiny_sd1), "--lora", str(lora_run), *common, "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / name).read_text()) for name in ("a.json", "b.json"))
    assert a["identifier"] == b["identifier"] == "sks"
    assert a["metrics"] == b["metrics"]  # the same model, reached two ways


def test_save_single_file(tiny_sd1, instance_dir, tmp_path):
    out = run(tiny_sd1, instance_dir, tmp_path / "dog-model", "--save_single_file", "--no_prior_preservation",
              "--max_steps", "2", "--lr", "1e-3")
    path = out / "dog-model.safetensors"
    assert {v.dtype for v in load_file(path).values()} == {torch.float16}  # fp16 by default
    trained = unet_weights(out)
    again = load_pipeline(path, config=tiny_sd1).unet.state_dict()
    assert trained.keys() == again.keys()
    assert all(torch.equal(trained[k].half().float(), again[k]) for k in trained)
    from diffusers import StableDiffusionPipeline  # A1111 / ComfyUI read the same layout
    ref = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_sd1), local_files_only=True)
    assert all(torch.equal(trained[k].half().float(), v.float()) for k, v in ref.unet.state_dict().items())
