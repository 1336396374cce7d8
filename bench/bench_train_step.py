"""Benchmark: one DreamBooth training step, our train.py vs diffusers' train_dreambooth.py.

    python bench/bench_train_step.py --instance-image DATASET/dog/00.jpg --class-image DATASET/dog2/00.jpg

DATASET is the DreamBooth dataset's folder. 3 rounds, then peak RSS per side; add
--gradient-checkpointing for both sides checkpointing, --rss-steps 0 for timings only.
--lora-rank R times `train.py --lora_rank R` against our full fine-tuning instead (both ours,
the same other flags; the reference is not run).

SD 1.5-size random weights (common.build_sd15_folder), 512 px, prior preservation with one
instance image (--instance-image) and one class image (--class-image; the measured runs used the
paper's dog photos, dog/00.jpg and dog2/00.jpg of the DreamBooth dataset), bf16 autocast, AdamW
lr 5e-6, clip_grad_norm_ 1.0, seed 0.

ours: a step of `python train.py --cache_latents --mixed_precision bf16`, run by train.py's own
  functions: latents cached once (train.TrainingData: a fresh latent sample every step), the two
  prompts' contexts computed once, then train.train_step: dreambooth.prior_preservation_loss
  (one UNet forward/backward on the concatenated batch), clip_grad_norm_, the optimizer from
  train.make_optimizer (fused AdamW), zero_grad(set_to_none=True).
reference: a step assembled from diffusers/transformers components as train_dreambooth.py's
  loop does it: VAE (bf16) encodes both images, latent_dist.sample() * scaling_factor; randn
  noise, randint timesteps, DDPMScheduler.add_noise; the slow CLIPTokenizer tokenizes and the
  text encoder (bf16) encodes both prompts; UNet2DConditionModel forward under bf16 autocast,
  outputs to fp32, chunk into instance and prior halves, two MSEs; backward; clip_grad_norm_;
  torch.optim.AdamW (default implementation); lr_scheduler.step(); zero_grad(set_to_none=False)
  (its --set_grads_to_none is off by default). Image decoding and resizing (its DataLoader does
  them every step in the main process) are left out: the pixels are prepared once, which
  favours the reference.

lora (with --lora-rank R): ours with --lora_rank R and the LoRA learning rate 1e-4 (as
  README.md advises; the time does not depend on it): the same step, on train.py's own pipeline
  with rank-R adapters on the attention projections (the default targets) and the frozen UNet
  in bf16 (train.add_lora); the optimizer updates the adapters alone.

Timing (one process): both UNets hold the same parameter objects and both optimizers the same
state dict (common.load_unet_pair), so the process holds one copy of weights, gradients and
AdamW state (~14 GB, not ~28). Every step really updates the shared weights. Gradients are set
to None before each side's step, so each starts as its own first step would (the reference's
zeroed gradients from the previous step are dropped). A warm-up round, then --rounds rounds
alternating the sides (order flipping every round); medians of wall and user CPU time. Peak
memory: one fresh process per side (nothing shared) running --rss-steps steps, before the
timing; VmHWM (peak resident set) from /proc/self/status. With --lora-rank the two sides load
their own pipelines (the LoRA side's UNet is bf16 with adapters, so no weights can be shared):
the timing process holds both, ~20 GB.
Re-runs itself with the stable malloc settings unless --malloc default.
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
SIDES, LORA_SIDES = ("ours", "reference"), ("lora", "ours")  # the ratio row is first / second
LR, LORA_LR, SEED, RESOLUTION = 5e-6, 1e-4, 0, 512


def sides(args):
    return LORA_SIDES if args.lora_rank else SIDES


def build_ours(folder, images, checkpointing, unet=None, lora_rank=0):
    """train.py's own phases for --cache_latents --mixed_precision bf16 (on `unet` if given;
    with --lora_rank `lora_rank` if not 0): TrainingData with cached posteriors of `images`
    (instance image path, class image path), make_trainer, and per call one step of train.py's
    loop (set_learning_rate, next_batch, train_step)."""
    import sample
    import train

    instance_image, class_image = images
    argv = ["--model", str(folder), "--instance_dir", str(Path(instance_image).parent), "--class_noun", "dog",
            "--identifier", "sks", "--resolution", str(RESOLUTION), "--cache_latents", "--mixed_precision", "bf16",
            "--lr", str(LORA_LR if lora_rank else LR), "--seed", str(SEED), "--device", "cpu"]
    argv += ["--lora_rank", str(lora_rank)] if lora_rank else []
    args = train.parse_args(train.build_parser(), argv + (["--gradient_checkpointing"] if checkpointing else []))
    train.check_args(args)
    env = train.Distributed(args.device)
    autocast = lambda: sample.autocast(env.device, args.mixed_precision)  # noqa: E731
    pipeline = train.load_for_training(args, env.device)
    if unet is not None:
        pipeline.unet = unet
    prompts = train.Prompts("sks", INSTANCE_PROMPT, CLASS_PROMPT)
    contexts = train.encode_contexts(pipeline, prompts, autocast)
    data = train.TrainingData(pipeline, [instance_image], [class_image], args, env, autocast)
    trainer = train.make_trainer(pipeline, prompts, contexts, args, env, autocast)
    steps = iter(range(10**9))

    def step():
        train.set_learning_rate(trainer, next(steps), args.warmup_steps)
        return train.train_step(trainer, [data.next_batch()]).losses[0].item()
    return step, trainer.optimizer


def build_reference(folder, images, unet, checkpointing):
    """train_dreambooth.py's setup (--with_prior_preservation --mixed_precision bf16), on `unet`,
    training on `images` (instance image path, class image path)."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    import dreambooth

    folder = Path(folder)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")  # use_fast=False, as the script
    noise_scheduler = DDPMScheduler.from_pretrained(folder, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder").requires_grad_(False).to(torch.bfloat16)
    vae = AutoencoderKL.from_pretrained(folder / "vae").requires_grad_(False).to(torch.bfloat16)
    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train().requires_grad_(True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=LR, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)  # "constant"
    # collate_fn: instance then class, in one batch; pixels in [-1, 1] (Normalize([0.5], [0.5]))
    pixel_values = torch.stack([dreambooth.load_image(p, RESOLUTION) for p in images])
    torch.manual_seed(SEED)

    def step():
        input_ids = torch.cat([tokenizer(p, truncation=True, padding="max_length",
                                         max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
                               for p in (INSTANCE_PROMPT, CLASS_PROMPT)])
        model_input = vae.encode(pixel_values.to(dtype=torch.bfloat16)).latent_dist.sample()
        model_input = model_input * vae.config.scaling_factor
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (model_input.shape[0],)).long()
        noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps)
        encoder_hidden_states = text_encoder(input_ids, attention_mask=None)[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):  # accelerate's bf16 wrapper of unet.forward
            model_pred = unet(noisy_model_input, timesteps, encoder_hidden_states).sample
        model_pred = model_pred.float()  # accelerate's convert_outputs_to_fp32
        target = noise
        model_pred, model_pred_prior = torch.chunk(model_pred, 2, dim=0)
        target, target_prior = torch.chunk(target, 2, dim=0)
        prior_loss = F.mse_loss(model_pred_prior.float(), target_prior.float(), reduction="mean")
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
        loss = loss + 1.0 * prior_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=False)
        return loss.detach().item()
    return step, optimizer


def images(args):
    """(instance image, class image) of the step."""
    return Path(args.instance_image), Path(args.class_image)


def child(args):
    """One side alone in a fresh process: --rss-steps steps, then its peak RSS."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = common.build_sd15_folder(args.cache)
    side = args.child
    t0 = time.perf_counter()
    if side in ("ours", "lora"):
        step, _ = build_ours(folder, images(args), args.gradient_checkpointing,
                             lora_rank=args.lora_rank if side == "lora" else 0)
    else:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        step, _ = build_reference(folder, images(args), unet, args.gradient_checkpointing)
    setup = time.perf_counter() - t0
    steps = []
    for _ in range(args.rss_steps):
        loss, t = common.measure(step)
        steps.append(dict(t, loss=loss))
    common.child_report(side=side, setup_s=setup, steps=steps, threads=torch.get_num_threads())


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--instance-image", required=True, help="the subject's photo (a dog: the class noun is 'dog')")
    p.add_argument("--class-image", required=True, help="a photo standing in for the class image")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds of both sides, after one warm-up round")
    p.add_argument("--gradient-checkpointing", action="store_true", help="both sides")
    p.add_argument("--lora-rank", type=int, default=0,
                   help="time train.py --lora_rank R (side 'lora') against our full fine-tuning (side 'ours') "
                        "instead of ours against the reference (0: ours vs reference)")
    p.add_argument("--rss-steps", type=int, default=2, help="steps of each fresh peak-RSS process (0: skip)")
    p.add_argument("--skip-timing", action="store_true", help="only the fresh peak-RSS processes")
    p.add_argument("--child", choices=SIDES + ("lora",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for flag, path in (("--instance-image", args.instance_image), ("--class-image", args.class_image)):
        if not Path(path).is_file():
            p.error(f"{flag} {path}: no such image file; the measured runs used the DreamBooth dataset's "
                    "dog/00.jpg and dog2/00.jpg")
    common.start(args, __file__, argv, header=not args.child)
    if args.child:
        return child(args)
    folder = common.build_sd15_folder(args.cache)
    ckpt = "with" if args.gradient_checkpointing else "without"
    lora = f", sides: train.py --lora_rank {args.lora_rank} vs full fine-tuning" if args.lora_rank else ""
    print(f"512 px, prior preservation (1 + 1 images), bf16 autocast, AdamW, {ckpt} gradient checkpointing{lora}",
          flush=True)
    raw = dict(gradient_checkpointing=args.gradient_checkpointing, lora_rank=args.lora_rank)
    # The fresh peak-RSS processes first: with the malloc settings above this process never gives
    # memory back, so after timing it would still hold ~18 GB.
    if args.rss_steps:
        raw["rss"] = fresh_process_peaks(args, folder)
    if not args.skip_timing:
        raw.update(time_sides(args, folder))
    report(raw, args)
    common.finish(args, raw)


def fresh_process_peaks(args, folder):
    """Each side alone in a fresh process (child): {side: its steps and proc_status}."""
    rss = {}
    for side in sides(args):
        out, _ = common.run_child([__file__, "--child", side, "--cache", str(folder), "--rss-steps",
                                   str(args.rss_steps), "--malloc", args.malloc, "--threads", str(args.threads),
                                   "--instance-image", args.instance_image, "--class-image", args.class_image,
                                   "--lora-rank", str(args.lora_rank)]
                                  + (["--gradient-checkpointing"] if args.gradient_checkpointing else []),
                                  env={"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"})
        rss[side] = out
        walls = ", ".join(f"{s['wall']:.1f}" for s in out["steps"])
        losses = ", ".join(f"{s['loss']:.4f}" for s in out["steps"])
        peak = common.gib(out["status"]["VmHWM"])
        print(f"  [fresh process, {args.rss_steps} steps] {side}: peak RSS {peak:.2f} GiB, steps {walls} s, "
              f"losses {losses}", file=sys.stderr, flush=True)
    return rss


def time_sides(args, folder):
    """Both sides in this process on shared weights and AdamW state, alternating; then the FLOPs
    of our step and the machine's matmul throughput (measured before and after). With
    --lora-rank: time_lora_sides."""
    if args.lora_rank:
        return time_lora_sides(args, folder)
    matmul = common.MatmulPeak().measure()
    ours_unet, ref_unet = common.load_unet_pair(folder)
    ours_step, ours_opt = build_ours(folder, images(args), args.gradient_checkpointing, ours_unet)
    ref_step, ref_opt = build_reference(folder, images(args), ref_unet, args.gradient_checkpointing)
    ref_opt.state = ours_opt.state  # one AdamW state for the shared parameters (same keys and layout)
    params = list(ours_unet.parameters())
    losses = {side: [] for side in SIDES}

    def timed(side, fn):
        def run():
            for q in params:
                q.grad = None
            losses[side].append(fn())
        return run
    timings = common.alternate({"ours": timed("ours", ours_step), "reference": timed("reference", ref_step)},
                               rounds=args.rounds, warmup=1)
    flops, _ = common.count_flops(timed("ours", ours_step))
    matmul.measure()
    return dict(timings=timings, losses=losses, flops=flops, matmul_tflops=dict(
        bf16=matmul.best("bf16"), fp32=matmul.best("fp32"), samples=matmul.samples))


def time_lora_sides(args, folder):
    """train.py --lora_rank R against our full fine-tuning, each on its own pipeline, alternating;
    then the FLOPs of both steps and the matmul throughput (measured before and after)."""
    matmul = common.MatmulPeak().measure()
    full_step, _ = build_ours(folder, images(args), args.gradient_checkpointing)
    lora_step, _ = build_ours(folder, images(args), args.gradient_checkpointing, lora_rank=args.lora_rank)
    losses = {side: [] for side in LORA_SIDES}

    def timed(side, fn):
        return lambda: losses[side].append(fn())  # train_step leaves no gradients behind
    fns = {"lora": timed("lora", lora_step), "ours": timed("ours", full_step)}
    timings = common.alternate(fns, rounds=args.rounds, warmup=1)
    flops = {side: common.count_flops(fn)[0] for side, fn in fns.items()}
    matmul.measure()
    return dict(timings=timings, losses=losses, flops=flops["ours"], flops_lora=flops["lora"], matmul_tflops=dict(
        bf16=matmul.best("bf16"), fp32=matmul.best("fp32"), samples=matmul.samples))


def report(raw, args):
    m = common.median
    rows = []
    cells = {}
    first, second = sides(args)
    for side in (first, second):
        c = {}
        if "timings" in raw:
            ts = raw["timings"][side]
            c.update(wall=m([t["wall"] for t in ts]), user=m([t["user"] for t in ts]),
                     lo=min(t["wall"] for t in ts), hi=max(t["wall"] for t in ts))
        if side in raw.get("rss", {}):
            c["peak"] = raw["rss"][side]["status"]["VmHWM"]
            c["fresh"] = [s["wall"] for s in raw["rss"][side]["steps"]]
        cells[side] = c
    for side in (first, second):
        c = cells[side]
        rows.append([side, f"{c['wall']:.2f} ({c['lo']:.2f}-{c['hi']:.2f})" if "wall" in c else "-",
                     f"{c['user']:.2f}" if "user" in c else "-",
                     f"{common.gib(c['peak']):.2f}" if "peak" in c else "-",
                     ", ".join(f"{w:.1f}" for w in c.get("fresh", [])) or "-"])
    o, r = cells[first], cells[second]
    rows.append([f"{first}/{second}", common.ratio(o["wall"], r["wall"]) if "wall" in o else "-",
                 common.ratio(o["user"], r["user"]) if "user" in o else "-",
                 common.ratio(o["peak"], r["peak"]) if "peak" in o else "-", ""])
    ckpt = "with" if args.gradient_checkpointing else "without"
    lora = f", lora: --lora_rank {args.lora_rank}, ours: full fine-tuning" if args.lora_rank else ""
    print(f"\n### DreamBooth step, SD 1.5 size, 512 px, 1 + 1 images, bf16 autocast, AdamW, {ckpt} gradient "
          f"checkpointing{lora} ({args.rounds} rounds, medians)\n")
    common.print_table(rows, ["side", "s/step (min-max)", "user CPU s/step", "peak RSS GiB (fresh process)",
                              "fresh-process steps s (first includes page faults)"])
    if "flops" in raw:
        for side, flops in (("ours", raw["flops"]), ("lora", raw.get("flops_lora"))):
            if flops is None:
                continue
            tf = flops / cells[side]["wall"] / 1e12
            print(f"\n{side}: {flops / 1e12:.2f} TFLOP counted per step, {tf:.3f} TFLOP/s = "
                  f"{100 * tf / raw['matmul_tflops']['bf16']:.0f}% of this run's bf16 matmul throughput "
                  f"({raw['matmul_tflops']['bf16']:.2f} TFLOP/s; fp32 {raw['matmul_tflops']['fp32']:.3f})")
        losses = {s: ", ".join(f"{v:.4f}" for v in raw["losses"][s]) for s in (first, second)}
        how = "two pipelines" if args.lora_rank else "shared weights"
        print(f"losses in the timing process ({how}, so not a same-seed comparison): "
              + "; ".join(f"{s}: {v}" for s, v in losses.items()))


if __name__ == "__main__":
    sys.exit(main())
