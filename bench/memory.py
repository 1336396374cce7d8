"""Memory accounting of a DreamBooth step for a GPU user, and the 16 GB mode's loss curve.

    python bench/memory.py                          # the accounting table, full fine-tuning and LoRA
    python bench/memory.py --loss-steps 20 --instance-dir DATASET/dog --class-dir DATASET/dog2
                                                    # + same-seed loss curves, default vs --low_memory

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
from pathlib import Path

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


def write_photos(folder):
    """Two random 512 px photos in `folder` (the instance image, then the class image): what a
    step holds depends on the shapes, not on the pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = [Path(folder) / f"{name}.png" for name in ("instance", "class")]
    for path in paths:
        Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(path)
    return paths


def measure_train_step(folder, photos, flags):
    """One step of `train.py FLAGS --mixed_precision bf16`, run by train.py's own functions in
    fine_tune's order (load_for_training, encode_contexts, TrainingData, make_trainer; then
    next_batch and train_step: Eq. 2 under bf16 autocast, backward, clip_grad_norm_, the update).
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
    pipeline = train.load_for_training(args, env.device)
    prompts = train.Prompts("sks", "a photo of sks dog", "a photo of dog")
    contexts = train.encode_contexts(pipeline, prompts, autocast)
    data = train.TrainingData(pipeline, [instance], [klass], args, env, autocast)
    trainer = train.make_trainer(pipeline, prompts, contexts, args, env, autocast)
    train.train_step(trainer, [data.next_batch()])
    with common.LiveTensors() as meter:
        batch = data.next_batch()
        encode_events = len(meter.events)
        train.train_step(trainer, [batch])
    assert all(p.grad is None for p in trainer.parameters), "gradients kept between steps"
    nbytes = lambda tensors: sum(t.numel() * t.element_size() for t in tensors)  # noqa: E731
    frozen = [p for p in pipeline.unet.parameters() if not p.requires_grad]  # a LoRA run's base weights
    if not args.cache_latents:  # else the VAE and text encoder leave the GPU after caching (encode_all)
        frozen += [*pipeline.vae.parameters(), *pipeline.text_encoder.parameters()]
    state = [v for s in trainer.optimizer.state.values() for k, v in s.items() if k != "step"]
    return dict(peak=meter.peak, encode_peak=running_peak(meter.events[:encode_events]),
                trainable=nbytes(trainer.parameters), trainable_count=sum(p.numel() for p in trainer.parameters),
                frozen=nbytes(frozen), state=nbytes(state))


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
    p.add_argument("--skip-accounting", action="store_true", help="only the loss curves")
    p.add_argument("--lora-ranks", type=lambda v: [int(r) for r in v.split(",") if r.strip()], default="4,32",
                   help="ranks of the train.py --lora_rank rows, comma-separated ('' skips them); the first rank "
                        "also runs without --gradient_checkpointing, and without --cache_latents")
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
    if not args.skip_accounting:
        raw["accounting"] = accounting(args)
    common.finish(args, raw)


if __name__ == "__main__":
    sys.exit(main())
