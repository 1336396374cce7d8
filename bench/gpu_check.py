"""GPU check: ours vs diffusers on one CUDA GPU, side by side in one run of at most ~8 minutes.

    python bench/gpu_check.py                   # ours, and diffusers if diffusers + transformers import
    python bench/gpu_check.py --wheels WHEELS/  # first pip-installs what is missing, offline, from WHEELS/
    python bench/gpu_check.py --smoke           # the same code at toy size on the CPU (checks the script)

NEEDS A CUDA GPU: without one it says so and exits (status 2), unless --smoke. Needs torch and
this project's runtime dependencies (numpy, pillow, tqdm, safetensors, huggingface_hub); the
side-by-side also needs diffusers and transformers (and peft for diffusers' LoRA row). On a
machine with nothing but torch, --wheels DIR installs the missing ones with
`pip install --no-index --find-links DIR`; make DIR where there is internet, for the GPU
machine's Python:
    pip download -d DIR numpy pillow tqdm safetensors huggingface_hub diffusers transformers peft
Without diffusers the diffusers columns say "-" and ours is measured alone.

The model: an SD 1.5-size pipeline with random weights (seed 0) built from this project's classes
with the SD 1.5 presets (unet.UNet 860 M, vae.VAE, clip_text.CLIPTextModel 768 x 12 layers; the
toy's tokenizer padded to 77 tokens: time and memory depend on the shapes, not on the vocabulary
or the weights' values), written by load_weights.save_pipeline in the diffusers layout, so that
both sides load the same files (--cache, 4.3 GB, reused).

Each row runs in a fresh process, so its peak CUDA memory (torch.cuda.max_memory_allocated over
its loading, set-up and steps: weights, gradients, optimizer state, activations) is its own:
  train         512 px, prior preservation (1 subject + 1 class image: UNet batch 2), bf16
                autocast, AdamW; s/it is the median of the timed steps after warm-up steps.
                ours: train.py's own phases (load_for_training, TrainingData, make_trainer,
                train_step) for the default, --cache_latents, and --lora_rank 4 --lr 1e-4.
                diffusers: train_dreambooth.py's step (the VAE encodes both images and the text
                encoder both prompts every step; fp32 UNet under autocast; torch AdamW;
                zero_grad(set_to_none=False)), and with peft train_dreambooth_lora.py's rank-4
                adapters on to_q, to_k, to_v, to_out.0 over a frozen bf16 UNet.
  sample        512 px, guidance 7.5, one image per call, DPM++ 2M Karras 25 steps and DDIM 50
                steps; s/image is the median of the timed images after a warm-up image, VAE
                decode included. ours: sample.generate on weights in bf16 (as sample.py loads
                them); diffusers: StableDiffusionPipeline(torch_dtype=bfloat16) with
                DPMSolverMultistepScheduler(use_karras_sigmas=True) / DDIMScheduler.
"""
import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
SAMPLE_PROMPT = "a photo of an astronaut riding a horse on mars"
SAMPLERS = (("dpmpp_2m_karras", 25), ("ddim", 50))
RUNTIME = {"numpy": "numpy", "PIL": "pillow", "tqdm": "tqdm", "safetensors": "safetensors",
           "huggingface_hub": "huggingface_hub"}
REFERENCE = {"diffusers": "diffusers", "transformers": "transformers", "peft": "peft"}
# (row, side, what it needs beyond ours) in the order they run: the most telling first
ROWS = (("train", "ours", ()), ("train", "diffusers", ("diffusers", "transformers")),
        ("train --cache_latents", "ours", ()), ("sample", "ours", ()),
        ("sample", "diffusers", ("diffusers", "transformers")), ("train --lora_rank 4", "ours", ()),
        ("train --lora_rank 4", "diffusers", ("diffusers", "transformers", "peft")))


# ----------------------------------------------------------------------------------------------
# Set-up: packages, the random SD 1.5-size folder, two photos


def missing(modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


def install_from_wheels(wheels):
    """pip-install (offline, from the folder `wheels`) whatever of RUNTIME and REFERENCE is missing."""
    names = [pip for m, pip in {**RUNTIME, **REFERENCE}.items() if m in missing([m])]
    if not names:
        return
    print(f"installing from {wheels}: {' '.join(names)}", flush=True)
    for name in names:  # one at a time: a missing wheel (e.g. peft) must not stop the others
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(wheels),
                               name], capture_output=True, text=True)
        if done.returncode:
            print(f"  {name}: not installed ({done.stderr.strip().splitlines()[-1:]})", flush=True)
    importlib.invalidate_caches()


def build_random_folder(folder, device, smoke):
    """The SD 1.5-size pipeline with random weights (seed 0), or a toy-size one with --smoke,
    written once to `folder` (reused while its marker is there)."""
    marker = Path(folder) / "GPU_CHECK_COMPLETE"
    if marker.is_file():
        return Path(folder)
    import torch

    import clip_text
    import schedulers
    import unet
    import vae
    from load_weights import Pipeline, save_pipeline

    if smoke:
        from toy import pretrain
        configs = (pretrain.UNET_CONFIG, pretrain.VAE_CONFIG,
                   clip_text.CLIPTextConfig(vocab_size=1000, **pretrain.TEXT_CONFIG))
    else:
        configs = (unet.PRESETS["sd15"], vae.PRESETS["sd15"], clip_text.PRESETS["sd15"])
    print(f"building the random {'toy' if smoke else 'SD 1.5'}-size pipeline in {folder} ...", flush=True)
    torch.manual_seed(0)
    with torch.device(device):  # initialising 1 B weights is quick on the GPU, slow on a CPU
        modules = unet.UNet(configs[0]), vae.VAE(configs[1]), clip_text.CLIPTextModel(configs[2])
    tokenizer = clip_text.CLIPTokenizer.from_folder(ROOT / "toy" / "model" / "tokenizer")
    tokenizer.max_length = configs[2].max_position_embeddings
    special = {"bos_token_id": tokenizer.start_id, "eos_token_id": tokenizer.end_id, "pad_token_id": tokenizer.pad_id}
    pipeline = Pipeline(tokenizer=tokenizer, unet=modules[0].cpu(), vae=modules[1].cpu(),
                        text_encoder=modules[2].cpu(), scheduler=schedulers.DDPMScheduler(schedulers.PRESETS["sd15"]),
                        source="random", raw_configs={"text_encoder": special})
    save_pipeline(pipeline, folder)
    marker.write_text("done\n")
    return Path(folder)


def write_photos(folder, size):
    """Two smooth random photos, the subject's and a class image: (instance path, class path)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for name in ("instance", "class"):
        (Path(folder) / name).mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        path = Path(folder) / name / "00.png"
        Image.fromarray(coarse).resize((size, size), Image.BICUBIC).save(path)
        paths.append(path)
    return tuple(paths)


# ----------------------------------------------------------------------------------------------
# The training steps


def ours_train_step(folder, photos, flags, device, resolution):
    """One step of train.py (--mixed_precision bf16 plus `flags`), built from its own phases."""
    import itertools

    import sample
    import train

    instance, class_image = photos
    argv = ["--model", str(folder), "--instance_dir", str(instance.parent), "--class_noun", "dog",
            "--identifier", "sks", "--resolution", str(resolution), "--mixed_precision", "bf16",
            "--device", device, *flags]
    args = train.parse_args(train.build_parser(), argv)
    train.check_args(args)
    env = train.Distributed(args.device)
    autocast = lambda: sample.autocast(env.device, args.mixed_precision)  # noqa: E731
    pipeline = train.load_for_training(args, env.device)
    prompts = train.Prompts("sks", INSTANCE_PROMPT, CLASS_PROMPT)
    contexts = train.encode_contexts(pipeline, prompts, autocast)
    data = train.TrainingData(pipeline, [instance], [class_image], args, env, autocast)
    trainer = train.make_trainer(pipeline, prompts, contexts, args, env, autocast)
    steps = itertools.count()

    def step():
        train.set_learning_rate(trainer, next(steps), args.warmup_steps)
        return train.train_step(trainer, [data.next_batch()]).losses[0].item()
    return step


def diffusers_unet_and_params(folder, device, lora_rank):
    """train_dreambooth.py's UNet (fp32, every weight trains), or train_dreambooth_lora.py's
    (frozen in bf16, rank-`lora_rank` peft adapters in fp32); (unet, trainable params, lr)."""
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").to(device)
    if not lora_rank:
        unet.train().requires_grad_(True)
        return unet, list(unet.parameters()), 5e-6
    from peft import LoraConfig

    unet.requires_grad_(False).to(torch.bfloat16)
    unet.add_adapter(LoraConfig(r=lora_rank, lora_alpha=lora_rank, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # its cast_training_params: the adapters train in fp32
    return unet.train(), params, 1e-4


def diffusers_train_step(folder, photos, device, resolution, lora_rank=0):
    """One step of diffusers' train_dreambooth.py --with_prior_preservation --mixed_precision bf16
    (train_dreambooth_lora.py with `lora_rank`)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    import dreambooth

    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")  # use_fast=False, as the script
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").requires_grad_(False).to(device, torch.bfloat16)
    vae = AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False).to(device, torch.bfloat16)
    unet, params, lr = diffusers_unet_and_params(folder, device, lora_rank)
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    pixels = torch.stack([dreambooth.load_image(p, resolution) for p in photos]).to(device)  # instance, class

    def step():
        ids = torch.cat([tokenizer(p, truncation=True, padding="max_length", max_length=tokenizer.model_max_length,
                                   return_tensors="pt").input_ids for p in (INSTANCE_PROMPT, CLASS_PROMPT)]).to(device)
        latents = vae.encode(pixels.to(torch.bfloat16)).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        context = text_encoder(ids, attention_mask=None)[0]
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):  # accelerate's bf16 forward
            prediction = unet(noisy, timesteps, context).sample.float()
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(latents, noise, timesteps)
        pred, pred_prior = prediction.chunk(2)
        target, target_prior = target.float().chunk(2)
        loss = F.mse_loss(pred, target) + F.mse_loss(pred_prior, target_prior)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # its --set_grads_to_none is off by default
        return loss.item()
    return step


# ----------------------------------------------------------------------------------------------
# Sampling


def ours_sampler(folder, device, size):
    """image(scheduler, steps) with sample.generate, weights in bf16 as sample.py loads them."""
    import torch

    import sample
    from load_weights import load_pipeline

    pipeline = load_pipeline(folder, dtype=torch.bfloat16, device=device)
    return lambda scheduler, steps: sample.generate(
        pipeline, [SAMPLE_PROMPT], scheduler=scheduler, steps=steps, guidance_scale=7.5, seed=0,
        height=size, width=size, mixed_precision="bf16", progress=False)[0]


def diffusers_sampler(folder, device, size):
    """image(scheduler, steps) with StableDiffusionPipeline in bf16."""
    import torch
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    config = pipe.scheduler.config
    samplers = {"dpmpp_2m_karras": DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True),
                "ddim": DDIMScheduler.from_config(config)}

    def image(scheduler, steps):
        pipe.scheduler = samplers[scheduler]
        return pipe(SAMPLE_PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=size, width=size,
                    generator=torch.Generator(device).manual_seed(0)).images[0]
    return image


# ----------------------------------------------------------------------------------------------
# One row, in a fresh process


def timed(fn, device, warmup, repeats):
    """Median seconds of `repeats` calls of fn after `warmup` calls, synchronising the GPU."""
    import statistics

    import torch

    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run_row(args):
    """The child: one row (args.row, args.side); prints its result as the last JSON line."""
    import torch

    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.init()
        torch.cuda.reset_peak_memory_stats()
    folder, size = Path(args.cache), (32 if args.smoke else 512)
    warmup, repeats = (1, 2) if args.smoke else (args.warmup, args.repeats)
    result = {}
    if args.row.startswith("train"):
        photos = write_photos(folder / "photos", size)
        flags = args.row.split()[1:] + (["--lr", "1e-4"] if "--lora_rank" in args.row else [])
        if args.side == "ours":
            step = ours_train_step(folder, photos, flags, args.device, size)
        else:
            step = diffusers_train_step(folder, photos, args.device, size, lora_rank=4 if flags else 0)
        result["s/it"] = timed(step, args.device, warmup, repeats)
    else:
        image = (ours_sampler if args.side == "ours" else diffusers_sampler)(folder, args.device, size)
        for scheduler, steps in SAMPLERS:
            steps = 3 if args.smoke else steps
            result[f"s/image {scheduler} {steps}"] = timed(lambda: image(scheduler, steps), args.device, 1,
                                                           2 if args.smoke else 3)
    result["peak GB"] = torch.cuda.max_memory_allocated() / 1e9 if cuda else None
    print(json.dumps(result), flush=True)


def child(args, row, side, timeout):
    """Run one row in a fresh process: its result dict, or {"error": why}."""
    argv = [sys.executable, __file__, "--row", row, "--side", side, "--cache", args.cache, "--device", args.device,
            "--warmup", str(args.warmup), "--repeats", str(args.repeats)] + (["--smoke"] if args.smoke else [])
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore"})
    except subprocess.TimeoutExpired:
        return {"error": f"over {timeout:.0f} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": (done.stderr.strip().splitlines() or ["no output"])[-1][:200]}
    return json.loads(lines[-1])


# ----------------------------------------------------------------------------------------------
# The parent: check, build, run the rows within the time budget, print the table


def machine_line(device):
    import torch

    if torch.device(device).type != "cuda":
        return f"CPU (--smoke), torch {torch.__version__}"
    props = torch.cuda.get_device_properties(0)
    return (f"{props.name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}, "
            f"python {sys.version.split()[0]}")


def versions():
    out = []
    for module in ("diffusers", "transformers", "peft"):
        if not missing([module]):
            out.append(f"{module} {__import__(module).__version__}")
    return ", ".join(out) or "no diffusers / transformers / peft: ours alone"


def run_rows(args, start):
    """{(row, side): result} of every row that fits in the budget."""
    results = {}
    for row, side, needs in ROWS:
        left = args.budget - (time.time() - start)
        if missing(needs):
            results[row, side] = {"error": f"needs {', '.join(missing(needs))}"}
        elif left < 45:
            results[row, side] = {"error": "skipped: time budget spent"}
        else:
            results[row, side] = child(args, row, side, timeout=left - 15)
        print(f"[{time.time() - start:5.0f} s] {row} / {side}: {results[row, side]}", flush=True)
    return results


def report(results):
    """The markdown table: per row and measure, ours, diffusers and the ratio. diffusers has no
    latent cache, so ours --cache_latents is set against its one training step."""
    def value(row, side, key):
        r = results.get((row, side), {})
        return r.get(key), r.get("error")

    lines = ["| row | measure | ours | diffusers | ours / diffusers |", "|---|---|---|---|---|"]
    for row in dict.fromkeys(r for r, _, _ in ROWS):
        reference = "train" if row == "train --cache_latents" else row
        keys = [k for k in results.get((row, "ours"), {}) if k != "error"] or ["s/it", "peak GB"]
        for key in keys:
            (ours, ours_error), (theirs, their_error) = value(row, "ours", key), value(reference, "diffusers", key)
            cells = [f"{v:.3f}" if v is not None else (e or "-") for v, e in ((ours, ours_error), (theirs, their_error))]
            ratio = f"{ours / theirs:.2f}" if ours and theirs else "-"
            label = f"{row} (diffusers: its one step)" if reference != row else row
            lines.append(f"| {label} | {key} | {cells[0]} | {cells[1]} | {ratio} |")
    print("\n".join(lines))


def build_parser():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheels", help="folder of wheels to pip-install offline what is missing (default: none)")
    p.add_argument("--cache", default="/tmp/gpu-check-sd15", help="folder of the random pipeline (default: %(default)s)")
    p.add_argument("--budget", type=float, default=480, help="seconds for the whole run; rows that do not fit are "
                                                               "skipped (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps / images first (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=10, help="timed training steps (sampling: 3 timed images) "
                                                            "(default: %(default)s)")
    p.add_argument("--smoke", action="store_true", help="toy size on the CPU, to check the script itself; "
                                                        "its numbers mean nothing")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--side", help=argparse.SUPPRESS)
    return p


def stop(message):
    print(f"gpu_check.py: {message}", file=sys.stderr)
    return 2


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.row:
        return run_row(args)
    start = time.time()
    if args.wheels:
        install_from_wheels(args.wheels)
    if missing(RUNTIME) or missing(["torch"]):
        return stop(f"missing {', '.join(missing(['torch', *RUNTIME]))}: pip install -r requirements.txt, "
                    "or give --wheels DIR with their wheels")
    import torch

    if args.smoke:
        args.device, args.cache = "cpu", args.cache + "-smoke"
    elif not torch.cuda.is_available():
        return stop("needs a CUDA GPU: torch.cuda.is_available() is False here "
                    f"(torch {torch.__version__}, CUDA build {torch.version.cuda}). Nothing was measured. "
                    "--smoke runs the same code at toy size on the CPU to check the script.")
    print(f"machine: {machine_line(args.device)}\nreference: {versions()}", flush=True)
    build_random_folder(args.cache, args.device, args.smoke)
    results = run_rows(args, start)
    if args.smoke:
        print("--smoke: toy size on the CPU; these numbers only show that every row runs")
    report(results)
    print(f"total {time.time() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
