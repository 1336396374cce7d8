"""Memory accounting of a DreamBooth step for a GPU user, and the 16 GB mode's loss curve.

    python bench/memory.py                          # the accounting table, full fine-tuning and LoRA
    python bench/memory.py --loss-steps 20 --instance-dir DATASET/dog --class-dir DATASET/dog2
                                                    # + same-seed loss curves, default vs --low_memory
    MALLOC_MMAP_THRESHOLD_=67108864 python bench/memory.py --sdxl --malloc default
                                                    # SDXL base at 1024 px instead: LoRA against full fine-tuning

SD 1.5 at 512 px, prior preservation with batch 1 + 1 (the UNet sees batch 2 at 64x64 latents),
bf16 autocast, AdamW. What a GPU has to hold during a step is

    total = trainable weights (fp32) + optimizer state + frozen modules left on the GPU
            + peak of the tensors the step creates (activations saved for backward, autocast's
              bf16 weight copies, temporaries, and the gradients once they exist)

- Weights, gradients, optimizer state and frozen modules: exact arithmetic from the parameter
  counts of the full-size SD 1.5 modules, built on the meta device (no memory, no compute); for
  the steps run by train.py itself, counted from the tensors of its trained pipeline.
- The peak of created tensors: measured by running the step for real on this CPU with
  common.LiveTensors (every storage an operation allocates, and its release): what a CUDA
  caching allocator must hold for them, less its rounding and fragmentation. Gradients are told
  apart at the end (the storages that became .grad), so the table also gives the activations
  alone. Not counted: the CUDA context (~0.3-0.5 GB), cuDNN / cuBLAS workspaces, fragmentation.
The measurement runs ours and diffusers' UNets (the same parameter objects) with and without
gradient checkpointing, diffusers' VAE encoding the two images (its trainer does so every step),
and steps of train.py itself, run by its own load_for_training, TrainingData, make_trainer and
train_step on two random 512 px photos: the memory mode (optim.AdamW with bf16 moments: its
per-parameter fp32 working copies are counted) and DreamBooth-LoRA (--lora_rank, the default
attention targets: fp32 adapters and their AdamW state, the frozen UNet in bf16) at each rank of
--lora-ranks with --cache_latents --gradient_checkpointing, and at the first rank also with
--cache_latents alone and with neither (then the VAE and text encoder stay on the GPU and the
VAE encodes both photos every step, inside the measured step). LoRA's totals are then compared
with the full fine-tune's with the same other flags.

--sdxl does the same for SDXL base (stabilityai/stable-diffusion-xl-base-1.0's architecture:
unet.PRESETS["sdxl-base"], clip_text.PRESETS["sdxl-base"] and ["sdxl-base-2"], SD's VAE) at 1024
px (128x128 latents), prior preservation with batch 1 + 1, bf16 autocast, in its own table:
DreamBooth-LoRA at --sdxl-lora-rank (default 4, the default attention targets) with
--cache_latents --gradient_checkpointing against the 16 GB of a consumer card, and full
fine-tuning of the UNet beside it. Parameter counts, adapters included, come from the meta
device. The LoRA step is measured as above, by train.py's own functions (load_for_training given
a full-size random pipeline built in memory: UNet and text encoders in bf16, the VAE in fp32),
at each of --sdxl-resolutions, default 256, 512 and 768 px (a 1024 px step passes 14 GB RSS on
the CPU). The 1024 px peak is then EXTRAPOLATED, by the least-squares line through those points
in the latent pixels (with gradient checkpointing and memory-efficient attention the kept
activations grow linearly in them), and the output says so; each point is printed against the
line through the others, the check of that linearity. With 1024 in the list, its measured peak
is used. With --cache_latents the
step holds the frozen UNet in bf16 and the cached latents, contexts and pooled embeddings: the
VAE and both text encoders leave the GPU after caching (TrainingData.encode_all). Full
fine-tuning is arithmetic, as train.py's check_sdxl_training gives it: fp32 weights and
gradients with AdamW's fp32 moments, 16 bytes a parameter, or bf16 moments with --low_memory, 12
bytes (+ optim.AdamW's fp32 working copies of the largest parameter); its totals are lower
bounds: activations come on top.

--loss-steps N runs train.py itself twice on the SD 1.5-size random pipeline (same seed, data,
noise and timesteps), `--cache_latents` and `--low_memory`, on the photos of --instance-dir with
those of --class-dir as class images, and compares the logged losses step by step.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def parameter_counts():
    """Parameter counts of the full-size SD 1.5 modules (built on the meta device)."""
    import torch

    import clip_text
    import unet
    import vae

    with torch.device("meta"):
        modules = {"unet": unet.UNet(unet.PRESETS["sd15"]), "vae": vae.VAE(vae.PRESETS["sd15"]),
                   "text_encoder": clip_text.CLIPTextModel(clip_text.PRESETS["sd15"])}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def measure_unet(unet, checkpointing, inputs):
    """Peaks of one bf16-autocast forward+backward (gradients start as None)."""
    import torch

    common.set_gradient_checkpointing(unet, checkpointing)
    params = list(unet.parameters())
    with common.LiveTensors() as meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = common.unet_forward(unet, *inputs)
        out.float().pow(2).mean().backward()
        del out
    grads = meter.uids_of([p.grad for p in params])
    result = dict(peak=meter.peak, activations=meter.peak_without(grads))
    for p in params:
        p.grad = None
    return result


def measure_vae_encode(folder):
    """Peak of diffusers' VAE (bf16, as train_dreambooth.py keeps it) encoding two 512-px images."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae", local_files_only=True).to(torch.bfloat16)
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 2 - 1
    with torch.no_grad(), common.LiveTensors() as meter:
        vae.encode(images).latent_dist.sample()
    return meter.peak


def write_photos(folder, size=512):
    """Two random `size` px photos in `folder` (the instance image, then the class image): what
    a step holds depends on the shapes, not on the pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = [Path(folder) / f"{name}.png" for name in ("instance", "class")]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return paths


def measure_train_step(folder, photos, flags, pipeline=None):
    """One step of `train.py FLAGS --mixed_precision bf16`, run by train.py's own functions in
    fine_tune's order (load_for_training, encode_contexts, encode_pooled, TrainingData,
    make_trainer; then next_batch and train_step: Eq. 2 under bf16 autocast, backward,
    clip_grad_norm_, the update), on the pipeline in `folder`, or on `pipeline` (built in memory).
    Measured in the second step (the optimizer state exists after the first): the peak of the
    tensors it creates, and within it the peak of next_batch alone (the per-step VAE encode
    without --cache_latents). Counted from the trained pipeline: the bytes held between steps,
    i.e. the trainable weights, the frozen weights left on the GPU and the optimizer state."""
    import sample
    import train

    instance, klass = photos
    # --instance_dir is required by the parser, never read here: TrainingData gets the photos
    argv = ["--model", str(folder), "--instance_dir", str(instance.parent), "--class_noun", "dog",
            "--identifier", "sks", "--mixed_precision", "bf16", "--device", "cpu", *flags]
    args = train.parse_args(train.build_parser(), argv)
    train.check_args(args)
    env = train.Distributed(args.device)
    autocast = lambda: sample.autocast(env.device, args.mixed_precision)  # noqa: E731
    pipeline = load_for_training(args, env.device, pipeline)
    prompts = train.Prompts("sks", "a photo of sks dog", "a photo of dog")
    contexts = train.encode_contexts(pipeline, prompts, autocast)
    pooled = train.encode_pooled(pipeline, prompts, autocast)  # SDXL's; {} for SD 1.5
    data = train.TrainingData(pipeline, [instance], [klass], args, env, autocast)
    trainer = train.make_trainer(pipeline, prompts, contexts, args, env, autocast, pooled)
    train.train_step(trainer, [data.next_batch()])
    with common.LiveTensors() as meter:
        batch = data.next_batch()
        encode_events = len(meter.events)
        train.train_step(trainer, [batch])
    assert all(p.grad is None for p in trainer.parameters), "gradients kept between steps"
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    frozen = [p for p in pipeline.unet.parameters() if not p.requires_grad]  # a LoRA run's base weights
    if not args.cache_latents:  # else the VAE and text encoder(s) leave the GPU after caching (encode_all)
        frozen += [p for m in (pipeline.vae, *train.text_encoders(pipeline)) for p in m.parameters()]
    state = [v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"]
    cached = [*contexts.values(), *pooled.values()] + [t for pair in data.cache or [] for c in pair if c is not None
                                                       for t in (c.plain.mean, c.plain.std, c.mirrored.mean,
                                                                 c.mirrored.std)]
    return dict(peak=meter.peak, encode_peak=running_peak(meter.events[:encode_events]),
                trainable=nbytes(trainer.parameters), trainable_count=sum(p.numel() for p in trainer.parameters),
                frozen=nbytes(frozen), state=nbytes(state), cached=nbytes(cached))


def load_for_training(args, device, pipeline=None):
    """train.load_for_training (its SDXL checks, the frozen modules' precisions), reading
    args.model, or given `pipeline` in its place: a full-size SDXL UNet read from a folder would
    first stand in fp32 (10 GB) before add_lora casts it to bf16."""
    import train

    if pipeline is None:
        return train.load_for_training(args, device)
    with mock.patch.object(train, "load_pipeline", lambda *_, **__: pipeline):
        return train.load_for_training(args, device)


def running_peak(events):
    """The most bytes alive at once over some of a LiveTensors record's (uid, +-bytes) events."""
    current = peak = 0
    for _, delta in events:
        current += delta
        peak = max(peak, current)
    return peak


def lora_flags(ranks):
    """{row key: train.py flags} of the LoRA rows: every rank with --cache_latents
    --gradient_checkpointing; the first rank also with --cache_latents alone, and with neither."""
    rows = {}
    for i, rank in enumerate(ranks):
        lora = ["--lora_rank", str(rank)]
        rows[f"lora-r{rank}-cache-ckpt"] = [*lora, "--cache_latents", "--gradient_checkpointing"]
        if i == 0:
            rows[f"lora-r{rank}-cache"] = [*lora, "--cache_latents"]
            rows[f"lora-r{rank}"] = lora
    return rows


def measure_peaks(folder, lora_ranks):
    """Every measured peak of created tensors the accounting needs, in bytes."""
    ours, ref = common.load_unet_pair(folder)
    inputs = common.unet_inputs()
    m = {}
    for side, unet in (("ours", ours), ("diffusers", ref)):
        for ckpt in (False, True):
            m[side + ("-ckpt" if ckpt else "")] = measure_unet(unet, ckpt, inputs)
    del ours, ref  # the train.py steps run on train.py's own pipelines
    m["vae-encode"] = measure_vae_encode(folder)
    with tempfile.TemporaryDirectory(prefix="memory-photos-") as photos:
        photos = write_photos(photos)
        for key, flags in {"low-memory-step": ["--low_memory"], **lora_flags(lora_ranks)}.items():
            print(f"measuring a step of train.py {' '.join(flags)}", file=sys.stderr, flush=True)
            m[key] = measure_train_step(folder, photos, flags)
    return m


def gb_cell(n):
    """GB with two decimals, or two significant digits below 0.01 GB (a LoRA's adapters)."""
    return common.gb(n) if n == 0 or n >= 5e6 else f"{n / 1e9:.2g}"


def lora_rows(m, ranks):
    """The accounting rows of the LoRA runs (same fields as accounting's modes)."""
    rows = []
    for key, flags in lora_flags(ranks).items():
        r = m[key]
        where = ("UNet base in bf16" if "--cache_latents" in flags else
                 "UNet base + VAE + text encoder in bf16 (no caching: they stay, the VAE encodes every step)")
        rows.append((f"LoRA r={flags[1]}", " ".join(flags), r["trainable"], 0, r["state"], r["frozen"], r["peak"],
                     f"{r['trainable_count']:,} adapter numbers train (fp32); frozen: {where}"))
    return rows


def full_with_same_flags(flags):
    """The full fine-tuning row (mode name) with a LoRA row's other flags."""
    if "--gradient_checkpointing" in flags:
        return "ours + checkpointing"
    return "ours, default + cache" if "--cache_latents" in flags else "ours, train.py defaults"


def print_lora_ratios(modes, ranks):
    """Each LoRA row's total over the full fine-tune's with the same flags, and over --low_memory."""
    totals = {name: sum(parts) for name, _, *parts, _ in modes}
    rows = []
    for name, flags, *parts, _ in modes:
        if name.startswith("LoRA"):
            full = full_with_same_flags(flags)
            rows.append([f"{name} `{flags}`", common.gb(sum(parts)), full, common.gb(totals[full]),
                         f"**{common.ratio(sum(parts), totals[full])}**",
                         common.ratio(sum(parts), totals["ours, 16 GB mode"])])
    print("\n### DreamBooth-LoRA against full fine-tuning (the totals above)\n")
    common.print_table(rows, ["LoRA run", "total GB", "full fine-tuning, same other flags", "its total GB",
                              "LoRA / full", "LoRA / full `--low_memory`"])
    target = [sum(parts) for name, flags, *parts, _ in modes
              if name == f"LoRA r={ranks[0]}" and "--gradient_checkpointing" in flags][0]
    print(f"\ntarget: LoRA (r={ranks[0]}) with --cache_latents --gradient_checkpointing <= 6 GB: "
          f"{common.gb(target)} GB, {'met' if target <= 6e9 else 'NOT met'}")


def accounting(args):
    counts = parameter_counts()
    print(f"parameters (meta device): UNet {counts['unet']:,}, VAE {counts['vae']:,}, text encoder "
          f"{counts['text_encoder']:,}", flush=True)
    m = measure_peaks(common.build_sd15_folder(args.cache), args.lora_ranks)
    weights = grads = 4 * counts["unet"]  # fp32
    adam32, low = 8 * counts["unet"], m["low-memory-step"]
    frozen_bf16 = 2 * (counts["vae"] + counts["text_encoder"])
    # (mode, flags, weights, grads kept between steps, optimizer state, frozen on GPU, peak created, note).
    # diffusers' rows count their kept gradients apart, so their peak is the activations alone.
    modes = [
        ("diffusers train_dreambooth.py", "--mixed_precision bf16 (defaults)", weights, grads, adam32, frozen_bf16,
         max(m["diffusers"]["activations"], m["vae-encode"]),
         "VAE + text encoder on the GPU in bf16; grads kept (zero_grad(set_to_none=False))"),
        ("diffusers + checkpointing", "--gradient_checkpointing", weights, grads, adam32, frozen_bf16,
         max(m["diffusers-ckpt"]["activations"], m["vae-encode"]), "as above"),
        ("ours, default + cache", "--cache_latents", weights, 0, adam32, 0, m["ours"]["peak"],
         "frozen modules leave the GPU after caching; grads set to None between steps"),
        ("ours + checkpointing", "--cache_latents --gradient_checkpointing", weights, 0, adam32, 0,
         m["ours-ckpt"]["peak"], "as above"),
        ("ours, 16 GB mode", "--low_memory", low["trainable"], 0, low["state"], low["frozen"], low["peak"],
         "= --cache_latents --gradient_checkpointing --optimizer_state bf16 (optim.py)"),
    ]
    if args.lora_ranks:
        # train.py's defaults keep the VAE and text encoder on the GPU and encode both photos every
        # step: that encode's peak is the one measured in the LoRA run without --cache_latents (the
        # same VAE, photos and next_batch; the adapters sit on the UNet alone).
        encode = m[f"lora-r{args.lora_ranks[0]}"]["encode_peak"]
        modes.insert(2, ("ours, train.py defaults", "(none)", weights, 0, adam32, frozen_bf16,
                         max(m["ours"]["peak"], encode), "VAE + text encoder stay on the GPU in bf16; the VAE "
                         "encodes both photos every step; grads set to None between steps"))
        modes += lora_rows(m, args.lora_ranks)
    rows = [[name, f"`{flags}`", *map(gb_cell, parts), f"**{common.gb(sum(parts))}**", note]
            for name, flags, *parts, note in modes]
    print("\n### Memory of one step, SD 1.5, 512 px, prior preservation (batch 1+1), bf16 autocast, AdamW "
          "(GB = 1e9 bytes)\n")
    common.print_table(rows, ["mode", "flags", "trainable weights fp32", "grads kept between steps",
                              "optimizer state", "frozen modules on GPU",
                              "peak created in a step (activations + grads + temporaries)", "total", "notes"])
    print("\nmeasured peaks of created tensors (GB): " + ", ".join(
        f"{k} {common.gb(v['peak'])} (activations alone {common.gb(v['activations'])})"
        for k, v in m.items() if isinstance(v, dict) and "activations" in v)
        + f"; diffusers VAE encode {common.gb(m['vae-encode'])}; " + ", ".join(
        f"train.py step {k} {common.gb(v['peak'])} (its next_batch {common.gb(v['encode_peak'])})"
        for k, v in m.items() if isinstance(v, dict) and "encode_peak" in v))
    if args.lora_ranks:
        print_lora_ratios(modes, args.lora_ranks)
    return dict(parameters=counts, measured=m, rows=rows)


# ----------------------------------------------------------------------------------------------
# SDXL base at 1024 px: DreamBooth-LoRA against full fine-tuning

SDXL_RESOLUTION = 1024  # SDXL base's training size: 128x128 latents
SDXL_VAE_SCALING = 0.13025  # SDXL's VAE: SD's architecture, its own weights and scaling factor
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)


def sdxl_modules():
    """The four full-size SDXL base modules (unet.PRESETS / clip_text.PRESETS; the VAE is SD's
    with SDXL's scaling factor), built on the current default device."""
    import dataclasses

    import clip_text
    import unet
    import vae

    return {"unet": unet.UNet(unet.PRESETS["sdxl-base"]),
            "vae": vae.VAE(dataclasses.replace(vae.PRESETS["sd15"], scaling_factor=SDXL_VAE_SCALING,
                                               sample_size=SDXL_RESOLUTION)),
            "text_encoder": clip_text.CLIPTextModel(clip_text.PRESETS["sdxl-base"]),
            "text_encoder_2": clip_text.CLIPTextModelWithProjection(clip_text.PRESETS["sdxl-base-2"])}


def sdxl_parameter_counts(rank):
    """Parameter counts of the full-size SDXL base modules, and of the LoRA adapters train.py
    puts on its UNet at `rank` (its default attention targets), all on the meta device."""
    import torch

    import lora
    import train

    with torch.device("meta"):
        modules = sdxl_modules()
        counts = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
        counts["largest_unet_parameter"] = max(p.numel() for p in modules["unet"].parameters())
        lora.inject_lora(modules["unet"], train.LORA_TARGETS["attention"], rank=rank)
    counts["lora"] = lora.trainable_parameter_count(modules["unet"])
    return counts


def fill_random_(module, seed=0):
    """Finite random weights in place (what a step holds depends on the shapes, not the values):
    N(0, 1/fan_in) for matrices and kernels, 1 for the norms' scales, 0 for every bias."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, p[0].numel() ** -0.5, generator=generator)
            else:
                p.fill_(0 if name.endswith("bias") else 1)


def random_sdxl_pipeline(tokenizer_dir):
    """A full-size SDXL base Pipeline with random weights, in memory: the UNet and both text
    encoders in bf16 (the precision a bf16 LoRA run keeps them in: train.py casts them so
    anyway), the VAE in fp32 (as load_for_training keeps SDXL's), the real CLIP tokenizers."""
    import torch

    from clip_text import CLIPTokenizer
    from clip_vocab import write_hub_tokenizer
    from load_weights import Pipeline
    from schedulers import DDPMScheduler, SchedulerConfig

    with torch.device("meta"):
        modules = sdxl_modules()
    for name, module in modules.items():
        dtype = torch.float32 if name == "vae" else torch.bfloat16
        modules[name] = module.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)
        fill_random_(modules[name])
    tokenizers = {name: CLIPTokenizer.from_folder(write_hub_tokenizer(Path(tokenizer_dir) / name, pad=pad))
                  for name, pad in (("tokenizer", "<|endoftext|>"), ("tokenizer_2", "!"))}  # SDXL base's pads
    return Pipeline(**tokenizers, **modules, scheduler=DDPMScheduler(SchedulerConfig(**SDXL_SCHEDULER)),
                    source="random SDXL base", force_zeros_for_empty_prompt=True)


def sdxl_lora_flags(rank, resolution):
    return ["--lora_rank", str(rank), "--cache_latents", "--gradient_checkpointing", "--resolution", str(resolution)]


def measure_sdxl_steps(resolutions, rank):
    """{resolution: measure_train_step of `train.py sdxl_lora_flags`} on one full-size random SDXL
    base pipeline (its adapters are removed after each measurement), and the seconds each took."""
    import lora

    out = {}
    with tempfile.TemporaryDirectory(prefix="memory-sdxl-") as tmp:
        print("building the full-size random SDXL base in memory ...", file=sys.stderr, flush=True)
        pipeline = random_sdxl_pipeline(Path(tmp) / "tokenizers")
        for resolution in resolutions:
            folder = Path(tmp) / f"photos-{resolution}"
            folder.mkdir()
            flags = sdxl_lora_flags(rank, resolution)
            print(f"measuring a step of train.py {' '.join(flags)} on SDXL base", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            out[resolution] = measure_train_step("random-sdxl-base", write_photos(folder, resolution), flags, pipeline)
            out[resolution]["seconds"] = time.perf_counter() - t0
            out[resolution]["rss"] = common.proc_status()["VmHWM"]
            lora.remove_lora(pipeline.unet, merge=False)  # the plain UNet again, for the next resolution
            pipeline.unet.gradient_checkpointing = False
    return out


def fit_line(xs, ys):
    """Least squares (a, b) of y = a + b x."""
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def latent_pixels(resolution):
    return (resolution // 8) ** 2  # the VAE downsamples 8x


def sdxl_peak(measured, resolution=SDXL_RESOLUTION):
    """The peak of created tensors at `resolution`: measured there, or else extrapolated by the
    least-squares line peak = a + b * latent pixels through the measured points (with gradient
    checkpointing and memory-efficient attention the kept activations grow linearly in the
    latent pixels). Returns (bytes, how it was obtained)."""
    if resolution in measured:
        return measured[resolution]["peak"], f"measured at {resolution} px"
    points = sorted(measured)
    if len(points) < 2:
        raise ValueError(f"extrapolating to {resolution} px needs at least two measured resolutions, got {points}")
    a, b = fit_line([latent_pixels(r) for r in points], [measured[r]["peak"] for r in points])
    return a + b * latent_pixels(resolution), (
        f"EXTRAPOLATED to {resolution} px from the points measured at {', '.join(f'{r}' for r in points)} px "
        f"by the least-squares line {a / 1e9:.3f} GB + {b / 1e3:.2f} kB x latent pixels")


def print_sdxl_points(measured):
    """The measured peaks by resolution, against the line through the others (linearity check)."""
    rows = []
    for r in sorted(measured):
        m, others = measured[r], {k: v for k, v in measured.items() if k != r}
        predicted = sdxl_peak(others, r)[0] if len(others) >= 2 else None
        rows.append([f"{r} px ({r // 8}x{r // 8})", f"{latent_pixels(r):,}", f"{m['peak'] / 1e9:.3f}",
                     f"{m['peak'] / latent_pixels(r) / 1e3:.1f}",
                     f"{predicted / 1e9:.3f}" if predicted is not None else "-", f"{m['seconds']:.0f}",
                     f"{m['rss'] / 1e9:.1f}"])
    print("\nmeasured peaks of created tensors, train.py --lora_rank R --cache_latents --gradient_checkpointing "
          "--mixed_precision bf16 on the full-size SDXL base (random weights), prior preservation:\n")
    common.print_table(rows, ["resolution (latents)", "latent pixels", "peak created GB", "kB per latent pixel",
                              "GB predicted by the line through the other points", "s (2 steps + caching)",
                              "process peak RSS GB so far"])


def sdxl_rows(counts, rank, peak, how):
    """The rows of the SDXL table (same fields as accounting's modes): the LoRA run, and full
    fine-tuning of the UNet by exact arithmetic (train.py's check_sdxl_training: fp32 weights
    and gradients, AdamW's two moments; --low_memory stores the moments in bf16)."""
    n, adapters = counts["unet"], counts["lora"]
    working = 16 * counts["largest_unet_parameter"]  # optim.AdamW's fp32 m, v, sqrt(v), denom of one parameter
    return [
        (f"LoRA r={rank}", " ".join(sdxl_lora_flags(rank, SDXL_RESOLUTION)[:4]), 4 * adapters, 0, 8 * adapters,
         2 * n, peak, f"{adapters:,} adapter numbers train (fp32); frozen: the UNet base in bf16 (the VAE and "
         f"both text encoders leave the GPU after caching); peak {how}"),
        ("full fine-tune (refused by train.py)", "--cache_latents --gradient_checkpointing", 4 * n, 0, 8 * n, 0,
         4 * n, "AdamW fp32 moments, 16 bytes a parameter; peak: the fp32 gradients alone, a lower bound "
                "(+ activations and autocast's bf16 weight copies)"),
        ("full fine-tune `--low_memory`", "--low_memory", 4 * n, 0, 4 * n, 0, 4 * n + working,
         "bf16 moments, 12 bytes a parameter; peak: the fp32 gradients + optim.AdamW's fp32 working copies of "
         "the largest parameter, a lower bound (+ activations)"),
    ]


def accounting_sdxl(args):
    rank = args.sdxl_lora_rank
    counts = sdxl_parameter_counts(rank)
    print(f"SDXL base parameters (meta device): UNet {counts['unet']:,}, VAE {counts['vae']:,}, text encoder "
          f"{counts['text_encoder']:,}, text encoder 2 {counts['text_encoder_2']:,}; LoRA r={rank} on the UNet's "
          f"attention (train.py's default targets): {counts['lora']:,}", flush=True)
    measured = measure_sdxl_steps(args.sdxl_resolutions, rank)
    for r, m in measured.items():  # the step's own tensors agree with the arithmetic
        assert (m["trainable"], m["state"], m["frozen"]) == (4 * counts["lora"], 8 * counts["lora"],
                                                            2 * counts["unet"]), (r, m)
    print_sdxl_points(measured)
    peak, how = sdxl_peak(measured)
    modes = sdxl_rows(counts, rank, peak, how)
    bound = lambda name: "≥ " if name.startswith("full") else ""  # noqa: E731
    rows = [[name, f"`{flags}`", *map(gb_cell, parts), f"**{bound(name)}{common.gb(sum(parts))}**", note]
            for name, flags, *parts, note in modes]
    print(f"\n### Memory of one step, SDXL base, {SDXL_RESOLUTION} px ({SDXL_RESOLUTION // 8}x{SDXL_RESOLUTION // 8} "
          "latents), prior preservation (batch 1+1), bf16 autocast, AdamW (GB = 1e9 bytes)\n")
    common.print_table(rows, ["mode", "flags", "trainable weights fp32", "grads kept between steps",
                              "optimizer state", "frozen modules on GPU",
                              "peak created in a step (activations + grads + temporaries)", "total", "notes"])
    totals = [sum(parts) for _, _, *parts, _ in modes]
    cached = measured[max(measured)]["cached"]
    print(f"\nnot in the totals: the cached latents and text embeddings on the GPU ({cached / 1e6:.1f} MB at "
          f"{max(measured)} px), the CUDA context (~0.3-0.5 GB), cuDNN / cuBLAS workspaces, fragmentation")
    extrapolated = " (its peak extrapolated)" if SDXL_RESOLUTION not in measured else ""
    print(f"target: SDXL LoRA (r={rank}) with --cache_latents --gradient_checkpointing at {SDXL_RESOLUTION} px "
          f"<= 16 GB: {common.gb(totals[0])} GB{extrapolated}, {'met' if totals[0] <= 16e9 else 'NOT met'}; "
          "full fine-tuning "
          f"of the UNet >= {common.gb(totals[1])} GB (--low_memory >= {common.gb(totals[2])} GB) before "
          f"activations: {common.ratio(totals[1], 16e9)} x (--low_memory {common.ratio(totals[2], 16e9)} x) "
          "a 16 GB card, NOT met")
    return dict(parameters=counts, measured=measured, peak_1024=peak, peak_from=how, rows=rows)


# ----------------------------------------------------------------------------------------------
# Same-seed loss curves of train.py: default vs --low_memory


def train_losses(args, folder, class_dir, out, flags):
    """Run train.py on the random pipeline with `flags`; its logged losses."""
    argv = [str(common.ROOT / "train.py"), "--model", str(folder), "--instance_dir", args.instance_dir,
            "--class_noun", "dog", "--identifier", "sks", "--class_dir", str(class_dir),
            "--num_class_images", str(args.class_images), "--resolution", str(args.loss_resolution),
            "--max_steps", str(args.loss_steps), "--lr", str(args.lr), "--mixed_precision", "bf16",
            "--seed", "0", "--output_dir", str(out), *flags]
    print(f"running: python {' '.join(argv)}", file=sys.stderr, flush=True)
    threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
    subprocess.run([sys.executable, *argv], check=True, env={**os.environ, "TQDM_DISABLE": "1", **threads})
    losses = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
    shutil.rmtree(out)  # the trained model, 4 GB: the log is what we compare
    return losses


def loss_curves(args):
    folder = common.build_sd15_folder(args.cache)
    work = Path(tempfile.mkdtemp(prefix="memory-loss-", dir=args.workdir))
    class_dir = work / "class_images"
    class_dir.mkdir()
    for i, path in enumerate(sorted(Path(args.class_dir).iterdir())[:args.class_images]):
        shutil.copy(path, class_dir / f"class-{i:05d}{path.suffix}")
    a = train_losses(args, folder, class_dir, work / "default", ["--cache_latents"])
    b = train_losses(args, folder, class_dir, work / "low_memory", ["--low_memory"])
    shutil.rmtree(work)
    rows = [[r["step"], f"{r['loss']:.5f}", f"{s['loss']:.5f}", f"{s['loss'] - r['loss']:+.2e}"] for r, s in zip(a, b)]
    print(f"\n### Same-seed loss, train.py --cache_latents vs --low_memory ({args.loss_resolution} px, lr {args.lr:g}, "
          f"SD 1.5-size random weights, {args.loss_steps} steps)\n")
    common.print_table(rows, ["step", "default", "--low_memory", "difference"])
    diffs = [abs(s["loss"] - r["loss"]) for r, s in zip(a, b)]
    rel = [d / abs(r["loss"]) for d, r in zip(diffs, a)]
    print(f"\nmax |difference| {max(diffs):.2e} (relative {max(rel):.2e}); mean |difference| "
          f"{sum(diffs) / len(diffs):.2e}; mean loss over the run: default "
          f"{sum(r['loss'] for r in a) / len(a):.5f}, --low_memory {sum(r['loss'] for r in b) / len(b):.5f}")
    return dict(default=a, low_memory=b, max_abs_diff=max(diffs), max_rel_diff=max(rel))


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--skip-accounting", action="store_true", help="no SD 1.5 accounting: only the loss curves")
    p.add_argument("--lora-ranks", type=lambda v: [int(r) for r in v.split(",") if r.strip()], default="4,32",
                   help="ranks of the train.py --lora_rank rows, comma-separated ('' skips them); the first rank "
                        "also runs without --gradient_checkpointing, and without --cache_latents")
    p.add_argument("--sdxl", action="store_true",
                   help="the SDXL base accounting (1024 px, LoRA against full fine-tuning) instead of SD 1.5's. "
                        "Run it as `MALLOC_MMAP_THRESHOLD_=67108864 python bench/memory.py --sdxl --malloc default`: "
                        "the fp32 VAE caching's large buffers then go back to the system when freed, and the "
                        "process peaks at ~12 GB RSS (the recorded run); with --malloc stable they stay in it")
    p.add_argument("--sdxl-resolutions", type=lambda v: [int(r) for r in v.split(",") if r.strip()],
                   default="256,512,768", help="train.py --resolution of the measured SDXL steps, comma-separated; "
                                               "without 1024 the 1024 px peak is extrapolated by a line through "
                                               "them (a 1024 px step passes 14 GB RSS on the CPU)")
    p.add_argument("--sdxl-lora-rank", type=int, default=4, help="train.py --lora_rank of the SDXL LoRA row")
    p.add_argument("--loss-steps", type=int, default=0, help="steps of each same-seed train.py run (0: skip)")
    p.add_argument("--loss-resolution", type=int, default=512, help="train.py --resolution of the loss curves")
    p.add_argument("--lr", type=float, default=5e-6, help="train.py's default")
    p.add_argument("--instance-dir", help="photos of the subject (a dog: the class noun is 'dog'); "
                                          "needed with --loss-steps")
    p.add_argument("--class-dir", help="photos standing in for class images; needed with --loss-steps")
    p.add_argument("--class-images", type=int, default=2, help="how many of --class-dir's photos")
    p.add_argument("--workdir", default=None, help="where the train.py runs write (None: the system temp dir)")
    args = p.parse_args(argv)
    if args.loss_steps:
        for flag, value in (("--instance-dir", args.instance_dir), ("--class-dir", args.class_dir)):
            if not value or not Path(value).is_dir():
                p.error(f"--loss-steps needs {flag}, a folder of photos (got {value}); the measured curves "
                        "used the DreamBooth dataset's dog/ and dog2/")
    common.start(args, __file__, argv)
    raw = {}
    if args.loss_steps:  # first: with the stable malloc settings this process never gives memory back
        raw["loss_curves"] = loss_curves(args)
    if args.sdxl:
        raw["sdxl"] = accounting_sdxl(args)
    elif not args.skip_accounting:
        raw["accounting"] = accounting(args)
    common.finish(args, raw)


if __name__ == "__main__":
    sys.exit(main())
