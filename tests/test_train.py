"""train.py on tiny random pipelines: learning, exact resume, precision paths, outputs, errors."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import dreambooth
import train
from load_weights import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT.parent / "shared" / "dreambooth-dataset" / "dog"  # real photos from the paper's dataset


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    """Four small synthetic 'subject' photos: a red square on varied backgrounds."""
    folder = tmp_path_factory.mktemp("subject")
    for i, background in enumerate([(20, 120, 20), (200, 200, 200), (30, 30, 160), (120, 80, 40)]):
        image = Image.new("RGB", (40, 36), background)
        image.paste((220, 30, 30), (8 + i, 6, 28 + i, 26))
        image.save(folder / f"{i}.jpg" if i % 2 else folder / f"{i}.png")
    return folder


def run(tiny, instance_dir, out, *extra):
    argv = ["--model", str(tiny), "--instance_dir", str(instance_dir), "--class_noun", "square",
            "--resolution", "16", "--output_dir", str(out), "--num_class_images", "2", "--class_steps", "2",
            "--mixed_precision", "no", "--seed", "0", *extra]
    assert train.main(argv) == 0
    return out


def unet_weights(folder):
    return load_file(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")


def fixed_loss(pipeline, instance_dir, prompt):
    """The instance term of Eq. 2 under fixed noise and timesteps (a noise-free yardstick)."""
    images = torch.stack([dreambooth.load_image(p, 16) for p in dreambooth.list_images(instance_dir)])
    with torch.no_grad():
        latents = pipeline.vae.encode(images).mean * pipeline.vae.config.scaling_factor
        context = pipeline.text_encoder(pipeline.tokenizer([prompt] * len(images)))
        losses = [dreambooth.prior_preservation_loss(pipeline.unet, pipeline.scheduler, latents, context,
                                                     generator=torch.Generator().manual_seed(s))[1]
                  for s in range(8)]
    return torch.stack(losses).mean().item()


def test_instance_loss_falls(tiny_sd1, instance_dir, tmp_path):
    out = run(tiny_sd1, instance_dir, tmp_path / "out", "--no_prior_preservation", "--identifier", "sks",
              "--max_steps", "40", "--lr", "1e-3", "--batch_size", "2")
    prompt = "a photo of sks square"
    before = fixed_loss(load_pipeline(tiny_sd1), instance_dir, prompt)
    after = fixed_loss(load_pipeline(out), instance_dir, prompt)
    assert after < 0.8 * before, (before, after)
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 41))
    assert all(r["prior_loss"] == 0 for r in records)
    assert Image.open(out / "loss.png").size == (640, 360)


@pytest.mark.parametrize("extra", [[], ["--cache_latents", "--train_text_encoder", "--grad_accum", "2"]],
                         ids=["encode-every-step", "cached-latents+text-encoder"])
def test_exact_resume(tiny_sd1, instance_dir, tmp_path, extra):
    common = ["--max_steps", "4", "--checkpoint_every", "2", "--keep_checkpoints", "2", "--lr", "1e-3", "--flip",
              "--warmup_steps", "3", *(["--random_crop"] if not extra else []), *extra]
    straight = run(tiny_sd1, instance_dir, tmp_path / "a", *common)
    # every second step, and the last (so a finished run can be extended)
    assert sorted(p.name for p in (straight / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    # a run that "crashed" after step 2: its checkpoint, class images and log, and nothing else
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    shutil.copytree(straight / "class_images", resumed / "class_images")
    lines = (straight / "loss.jsonl").read_text().splitlines()
    (resumed / "loss.jsonl").write_text("\n".join(lines[:2]) + "\n")
    run(tiny_sd1, instance_dir, resumed, *common, "--resume", "latest")
    a, b = unet_weights(straight), unet_weights(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    assert (resumed / "loss.jsonl").read_text() == (straight / "loss.jsonl").read_text()
    if "--train_text_encoder" in extra:
        ta, tb = (load_file(f / "text_encoder" / "model.safetensors") for f in (straight, resumed))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        te0 = load_file(tiny_sd1 / "text_encoder" / "model.safetensors")
        assert not torch.equal(ta["text_model.final_layer_norm.weight"], te0["text_model.final_layer_norm.weight"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_weights(tiny_sd1, instance_dir, tmp_path, monkeypatch, precision):
    seen = {}
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):  # what the optimizer really updates
        seen["dtypes"] = {p.dtype for g in self.param_groups for p in g["params"]}
        seen["grad_dtypes"] = {p.grad.dtype for g in self.param_groups for p in g["params"] if p.grad is not None}
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    out = run(tiny_sd1, instance_dir, tmp_path / "out", "--max_steps", "3", "--checkpoint_every", "2", "--keep_checkpoints", "2",
              "--mixed_precision", precision, "--lr", "1e-4")
    assert seen["dtypes"] == seen["grad_dtypes"] == {torch.float32}
    state = torch.load(out / "checkpoints" / "step-000002" / "state.pt", weights_only=True)
    # fp16 trains with a GradScaler (its state holds the loss scale); bf16 needs none
    assert ("scale" in state["scaler"]) == (precision == "fp16")
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["loss"] > 0 for r in records)
    weights = unet_weights(out)
    assert {v.dtype for v in weights.values()} == {torch.float32}
    # the frozen VAE is saved exactly as it came, not rounded through the half precision
    vae0 = load_file(tiny_sd1 / "vae" / "diffusion_pytorch_model.safetensors")
    vae1 = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(vae0[k], vae1[k]) for k in vae0)


def test_output_folder(tiny_sd2, instance_dir, tmp_path):
    out = run(tiny_sd2, instance_dir, tmp_path / "out", "--max_steps", "2", "--identifier", "sks",
              "--validation_prompt", "a [V] square", "--validation_prompt", "a square",
              "--validation_every", "1", "--validation_steps", "2")
    info = json.loads((out / "dreambooth.json").read_text())
    assert (info["identifier"], info["class_noun"]) == ("sks", "square")
    assert info["instance_prompt"] == "a photo of sks square" and info["class_prompt"] == "a photo of square"
    assert info["args"]["max_steps"] == 2
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000001.png", "step-000002.png"]
    assert sorted(p.name for p in (out / "class_images").iterdir()) == ["class-00000.png", "class-00001.png"]
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    ours = unet_weights(out)
    assert all(torch.equal(v, ours[k]) for k, v in ref.unet.state_dict().items())
    assert ref.scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("argv,message", [
    (["--instance_dir", "/nonexistent"], "does not exist"),
    (["--resolution", "30"], "multiple of 8"),
    (["--cache_latents", "--random_crop"], "needs --center_crop"),
    (["--identifier", "square"], "contains the identifier"),
    (["--resume", "/nonexistent"], "no checkpoint there"),
    (["--validation_every", "5"], "needs at least one --validation_prompt"),
    (["--max_steps", "0"], "at least 1"),
    (["--model", "/nonexistent/model.safetensors"], "does not exist"),
])
def test_bad_input(tiny_sd1, instance_dir, tmp_path, capsys, argv, message):
    base = ["--model", str(tiny_sd1), "--instance_dir", str(instance_dir), "--class_noun", "square",
            "--resolution", "16", "--output_dir", str(tmp_path / "out")]
    with pytest.raises(SystemExit) as exit_info:
        train.main(base + argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_empty_instance_dir(tiny_sd1, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit):
        train.main(["--model", str(tiny_sd1), "--instance_dir", str(tmp_path / "empty"), "--class_noun", "dog"])
    assert "holds no images" in capsys.readouterr().err


def test_cli_end_to_end_on_real_photos(tiny_sd1, tmp_path):
    """train.py then sample.py as a user runs them, on the paper's dog photos at 32 px."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = tmp_path / "dog-model"
    subprocess.run([sys.executable, "train.py", "--model", str(tiny_sd1), "--instance_dir", str(DOG),
                    "--class_noun", "dog", "--resolution", "32", "--num_class_images", "2", "--class_steps", "2",
                    "--max_steps", "3", "--cache_latents", "--flip", "--output_dir", str(out)],
                   cwd=ROOT, env=env, check=True, capture_output=True)
    identifier = json.loads((out / "dreambooth.json").read_text())["identifier"]
    result = subprocess.run([sys.executable, "sample.py", "--model", str(out), "--prompt", "a [V] dog",
                             "--steps", "2", "--num_images", "2", "--out_dir", str(tmp_path / "samples")],
                            cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    pngs = sorted((tmp_path / "samples").glob("*-seed*.png"))
    assert len(pngs) == 2
    assert Image.open(pngs[0]).text["prompt"] == f"a {identifier} dog"


def test_rare_ranks_flag(tiny_sd1, instance_dir, tmp_path, capsys):
    out = run(tiny_sd1, instance_dir, tmp_path / "out", "--no_prior_preservation", "--max_steps", "1",
              "--rare_ranks", "47000", "47700")
    identifier = json.loads((out / "dreambooth.json").read_text())["identifier"]
    tokenizer = load_pipeline(tiny_sd1).tokenizer
    assert 47000 <= tokenizer.merge_rank(identifier + "</w>") <= 47700
    with pytest.raises(SystemExit):
        run(tiny_sd1, instance_dir, tmp_path / "bad", "--max_steps", "1", "--rare_ranks", "0", "0")
    assert "widen the range" in capsys.readouterr().err


def test_unreadable_instance_images(tiny_sd1, instance_dir, tmp_path, capsys):
    mixed = shutil.copytree(instance_dir, tmp_path / "mixed")
    (mixed / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    run(tiny_sd1, mixed, tmp_path / "out", "--no_prior_preservation", "--max_steps", "1")
    assert "skipping unreadable instance images (broken.jpg:" in capsys.readouterr().err
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"")
    (bad / "b.webp").write_text("text")
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_sd1, bad, tmp_path / "out2", "--max_steps", "1")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "none of the 2 images" in err and "a.png:" in err and "b.webp:" in err


@pytest.mark.parametrize("argv,message", [
    (["--class_noun", " "], "--class_noun is empty"),
    (["--class_noun", "sks dog", "--identifier", "sks"], "contains the identifier"),
])
def test_bad_class_noun(tiny_sd1, instance_dir, tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit):
        train.main(["--model", str(tiny_sd1), "--instance_dir", str(instance_dir), "--class_noun", "dog", *argv])
    assert message in capsys.readouterr().err


def test_output_dir_not_writable(tiny_sd1, instance_dir, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        run(tiny_sd1, instance_dir, tmp_path / "file" / "out", "--max_steps", "1")
    assert exit_info.value.code == 2 and "is not writable" in capsys.readouterr().err


def test_nonfinite_loss_is_skipped_then_stops_without_losing_results(tiny_sd1, instance_dir, tmp_path,
                                                                      monkeypatch, capsys):
    good = run(tiny_sd1, instance_dir, tmp_path / "out", "--no_prior_preservation", "--max_steps", "2",
               "--checkpoint_every", "2")
    before = unet_weights(good)
    real_loss = dreambooth.prior_preservation_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        calls["n"] += 1
        loss, instance_loss, prior_loss = real_loss(*args, **kwargs)
        if calls["n"] in bad_calls:
            return loss * float("nan"), instance_loss * float("nan"), prior_loss
        return loss, instance_loss, prior_loss
    monkeypatch.setattr(dreambooth, "prior_preservation_loss", sometimes_nan)

    bad_calls = {2, 3}  # two bad steps: skipped, counted, training goes on
    out = run(tiny_sd1, instance_dir, tmp_path / "other", "--no_prior_preservation", "--max_steps", "4")
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [False, True, True, False]
    assert records[1]["loss"] is None and records[3]["loss"] > 0
    assert all(torch.isfinite(v).all() for v in unet_weights(out).values())

    calls["n"] = 0
    bad_calls = set(range(1, 100))  # persistent: stop, and leave the earlier model alone
    with pytest.raises(SystemExit) as exit_info:  # extending the finished run
        run(tiny_sd1, instance_dir, good, "--no_prior_preservation", "--max_steps", "20", "--max_nonfinite_steps", "3",
            "--checkpoint_every", "2", "--resume", "latest")
    assert exit_info.value.code == 1
    assert "not finite for 3 steps in a row" in capsys.readouterr().err
    after = unet_weights(good)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_fp16_overflow_is_skipped_by_the_scaler(tiny_sd1, instance_dir, tmp_path, monkeypatch):
    real_loss = dreambooth.prior_preservation_loss
    calls = {"n": 0}

    def overflowing_first(*args, **kwargs):
        calls["n"] += 1
        loss, instance_loss, prior_loss = real_loss(*args, **kwargs)
        return (loss * 1e30 if calls["n"] == 1 else loss), instance_loss, prior_loss
    monkeypatch.setattr(dreambooth, "prior_preservation_loss", overflowing_first)
    out = run(tiny_sd1, instance_dir, tmp_path / "out", "--no_prior_preservation", "--max_steps", "3",
              "--mixed_precision", "fp16")
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in records] == [True, False, False]  # 1e30 * 65536 overflows fp32 grads
    assert all(torch.isfinite(v).all() for v in unet_weights(out).values())


def test_ctrl_c_leaves_a_resumable_checkpoint(tiny_sd1, instance_dir, tmp_path):
    import signal
    import time
    out = tmp_path / "out"
    argv = [sys.executable, "train.py", "--model", str(tiny_sd1), "--instance_dir", str(instance_dir),
            "--class_noun", "square", "--resolution", "16", "--output_dir", str(out), "--mixed_precision", "no",
            "--no_prior_preservation", "--max_steps", "100000", "--checkpoint_every", "1"]
    import threading
    # A shell starts background jobs with SIGINT ignored, and a child inherits that: then Python
    # never turns Ctrl-C into KeyboardInterrupt. Start the child with the default disposition.
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        process = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                   stderr=subprocess.PIPE, text=True)
    finally:
        signal.signal(signal.SIGINT, inherited)
    # Read stderr all along, as a terminal would, so the progress bar never blocks on a full pipe.
    captured = []
    reader = threading.Thread(target=lambda: captured.append(process.stderr.read()))
    reader.start()
    deadline = time.monotonic() + 120
    while not (out / "checkpoints").is_dir() or not list((out / "checkpoints").glob("step-*")):
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    process.wait(timeout=60)
    reader.join()
    err = captured[0]
    assert process.returncode == 130
    assert "is intact; continue with --resume latest" in err
    # every checkpoint folder is complete, and the run continues from the latest one
    (checkpoint,) = (out / "checkpoints").glob("step-*")
    step = int(checkpoint.name.split("-")[1])
    assert train.main(argv[2:-4] + ["--max_steps", str(step + 1), "--resume", "latest"]) == 0
    records = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, step + 2))


def test_low_memory_mode_trains_resumes_exactly_and_tracks_the_default(tiny_sd1, instance_dir, tmp_path, monkeypatch):
    """--low_memory = cached latents + gradient checkpointing + AdamW moments stored in bf16
    (optim.py): weights and gradients stay fp32, the checkpoint holds bf16 moments, a resumed run
    is bit-identical, and the loss follows the default mode's under the same seed."""
    import optim
    seen = {}
    real_step = optim.AdamW.step

    def step(self, *args, **kwargs):
        seen["dtypes"] = {p.dtype for g in self.param_groups for p in g["params"]}
        seen["grad_dtypes"] = {p.grad.dtype for g in self.param_groups for p in g["params"] if p.grad is not None}
        return real_step(self, *args, **kwargs)
    monkeypatch.setattr(optim.AdamW, "step", step)
    common = ["--max_steps", "6", "--lr", "1e-3", "--mixed_precision", "bf16", "--flip"]
    default = run(tiny_sd1, instance_dir, tmp_path / "default", "--cache_latents", *common)
    low = run(tiny_sd1, instance_dir, tmp_path / "low", "--low_memory", "--checkpoint_every", "3", "--keep_checkpoints", "2", *common)
    assert seen["dtypes"] == seen["grad_dtypes"] == {torch.float32}
    state = torch.load(low / "checkpoints" / "step-000003" / "state.pt", weights_only=True)
    moments = [v for s in state["optimizer"]["state"].values() for k, v in s.items() if k != "step"]
    assert moments and {m.dtype for m in moments} == {torch.bfloat16}
    assert {v.dtype for v in unet_weights(low).values()} == {torch.float32}

    def losses(folder):
        return [json.loads(line)["loss"] for line in (folder / "loss.jsonl").read_text().splitlines()]
    # same data, noise and timesteps; only the moments' rounding differs. Tolerance: 0.5% of the
    # loss per step at lr 1e-3, 200x the default lr, so that the rounding matters more than in use
    # (seen: <= 0.05%)
    a, b = losses(default), losses(low)
    assert a[0] == b[0]  # before any update: identical (checkpointing recomputes exactly)
    assert all(abs(x - y) <= 0.005 * x for x, y in zip(a, b)), (a, b)
    assert unet_weights(default).keys() == unet_weights(low).keys()
    assert not all(torch.equal(u, v) for u, v in zip(unet_weights(default).values(), unet_weights(low).values()))

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(low / "checkpoints" / "step-000003", resumed / "checkpoints" / "step-000003")
    shutil.copytree(low / "class_images", resumed / "class_images")
    (resumed / "loss.jsonl").write_text("\n".join((low / "loss.jsonl").read_text().splitlines()[:3]) + "\n")
    run(tiny_sd1, instance_dir, resumed, "--low_memory", *common, "--resume", "latest")
    x, y = unet_weights(low), unet_weights(resumed)
    assert all(torch.equal(x[k], y[k]) for k in x), "resumed weights differ from the uninterrupted run"
    assert (resumed / "loss.jsonl").read_text() == (low / "loss.jsonl").read_text()


def test_low_memory_needs_center_crop(tiny_sd1, instance_dir, tmp_path, capsys):
    with pytest.raises(SystemExit):
        run(tiny_sd1, instance_dir, tmp_path / "out", "--low_memory", "--random_crop")
    assert "--low_memory caches latents" in capsys.readouterr().err


def test_toy_model_brings_its_recipe():
    """--model toy trains at 32 px with the toy's recipe; flags given on the command line win."""
    parser = train.build_parser()
    base = ["--instance_dir", "x", "--class_noun", "circle"]
    args = train.parse_args(parser, ["--model", "toy", *base])
    assert {k: getattr(args, k) for k in train.TOY_RECIPE} == train.TOY_RECIPE  # every value of the recipe
    assert args.resolution == 32 and args.cache_latents and args.mixed_precision == "no"
    args = train.parse_args(train.build_parser(), ["--model", "toy", *base, "--lr", "1e-3"])
    assert args.lr == 1e-3 and args.max_steps == train.TOY_RECIPE["max_steps"]
    args = train.parse_args(train.build_parser(), base)  # other models keep SD's defaults
    assert args.resolution == 512 and args.lr == 5e-6 and not args.cache_latents
