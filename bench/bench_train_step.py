"""Benchmark: one DreamBooth training step, our train.py vs diffusers' train_dreambooth.py (issue 6).

    python bench/bench_train_step.py                           # 3 rounds, then peak RSS per side
    python bench/bench_train_step.py --gradient-checkpointing  # both sides checkpointing
    python bench/bench_train_step.py --rss-steps 0             # timings only

SD 1.5-size random weights (common.build_sd15_folder), 512 px, prior preservation with one
instance and one class image (the paper's dog photos: shared/dreambooth-dataset/dog/00.jpg and
dog2/00.jpg), bf16 autocast, AdamW lr 5e-6, clip_grad_norm_ 1.0, seed 0.

ours: what `python train.py --cache_latents --mixed_precision bf16` does per step, with
  train.py's own pieces: latents cached once as dreambooth.LatentDistribution (a fresh latent
  sample every step), the two prompts' contexts computed once, dreambooth.prior_preservation_loss
  (one UNet forward/backward on the concatenated batch), clip_grad_norm_, the optimizer from
  train.make_optimizer (fused AdamW), zero_grad(set_to_none=True), the LR schedule step.
reference: a step assembled from diffusers/transformers components as train_dreambooth.py's
  loop does it: VAE (bf16) encodes both images, latent_dist.sample() * scaling_factor; randn
  noise, randint timesteps, DDPMScheduler.add_noise; the slow CLIPTokenizer tokenizes and the
  text encoder (bf16) encodes both prompts; UNet2DConditionModel forward under bf16 autocast,
  outputs to fp32, chunk into instance and prior halves, two MSEs; backward; clip_grad_norm_;
  torch.optim.AdamW (default implementation); lr_scheduler.step(); zero_grad(set_to_none=False)
  (its --set_grads_to_none is off by default). Image decoding and resizing (its DataLoader does
  them every step in the main process) are left out: the pixels are prepared once, which
  favours the reference.

Timing (one process): both UNets hold the same parameter objects and both optimizers the same
state dict (train_common.load_unet_pair), so the process holds one copy of weights, gradients
and AdamW state (~14 GB, not ~28). Every step really updates the shared weights. Gradients are
set to None before each side's step, so each starts as its own first step would (the
reference's zeroed gradients from the previous step are dropped). A warm-up round, then
--rounds rounds alternating the sides (order flipping every round); medians of wall and user
CPU time. Peak memory: one fresh process per side (nothing shared) running --rss-steps steps,
before the timing; VmHWM (peak resident set) from /proc/self/status.
Re-runs itself with REFERENCE.md's malloc settings unless --malloc default.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_common  # noqa: E402

DATASET = common.ROOT.parent / "shared" / "dreambooth-dataset"
INSTANCE_IMAGE, CLASS_IMAGE = DATASET / "dog" / "00.jpg", DATASET / "dog2" / "00.jpg"
INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks dog", "a photo of dog"
SIDES = ("ours", "reference")
LR, SEED, RESOLUTION = 5e-6, 0, 512


def build_ours(folder, checkpointing, unet=None):
    """train.py's setup for --cache_latents --mixed_precision bf16 (on `unet` if given)."""
    import torch

    import dreambooth
    import sample
    import train
    from load_weights import load_pipeline

    device = torch.device("cpu")
    pipeline = load_pipeline(folder, device=device)
    pipeline.unet = unet = unet or pipeline.unet
    pipeline.vae.to(torch.bfloat16)
    pipeline.text_encoder.to(torch.bfloat16)
    autocast = lambda: sample.autocast(device, "bf16")  # noqa: E731
    with torch.no_grad(), autocast():
        contexts = [sample.encode_prompts(pipeline, [p]).float() for p in (INSTANCE_PROMPT, CLASS_PROMPT)]
        posteriors = [dreambooth.LatentDistribution.encode(
            pipeline.vae, dreambooth.load_image(path, RESOLUTION)[None].to(torch.bfloat16))
            for path in (INSTANCE_IMAGE, CLASS_IMAGE)]
    unet.train().requires_grad_(True)
    unet.gradient_checkpointing = checkpointing
    groups = [{"params": list(unet.parameters()), "lr": LR}]
    args = SimpleNamespace(optimizer_state="fp32", adam_weight_decay=1e-2, adam_epsilon=1e-8, seed=SEED)
    optimizer = train.make_optimizer(groups, args, device)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 needs no loss scaling
    generator = torch.Generator().manual_seed(SEED)
    scaling_factor = pipeline.vae.config.scaling_factor
    num_timesteps = pipeline.scheduler.config.num_train_timesteps

    def step():
        """The body of train.py's loop for batch 1 + 1, grad_accum 1, one process."""
        shape = posteriors[0].mean.shape[1:]
        latent_noise = torch.randn((2, 1, *shape), generator=generator)
        noise = torch.randn((2, 1, *shape), generator=generator)
        timesteps = torch.randint(0, num_timesteps, (2, 1), generator=generator)
        instance_latents = posteriors[0].sample(latent_noise[0], scaling_factor).float()
        class_latents = posteriors[1].sample(latent_noise[1], scaling_factor).float()
        with autocast():
            loss, instance_loss, prior_loss = dreambooth.prior_preservation_loss(
                unet, pipeline.scheduler, instance_latents, contexts[0], class_latents, contexts[1], 1.0,
                noise=noise.flatten(0, 1), timesteps=timesteps.flatten())
        scaler.scale(loss).backward()
        totals = torch.stack([loss.detach().float(), instance_loss.float(), prior_loss.float()])
        if bool(torch.isfinite(totals).all()):
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(groups[0]["params"], 1.0)
            scaler.step(optimizer)
            scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr_schedule.step()
        return totals[0].item()
    return step, optimizer


def build_reference(folder, unet, checkpointing):
    """train_dreambooth.py's setup (--with_prior_preservation --mixed_precision bf16), on `unet`."""
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
    pixel_values = torch.stack([dreambooth.load_image(p, RESOLUTION) for p in (INSTANCE_IMAGE, CLASS_IMAGE)])
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


def child(args):
    """One side alone in a fresh process: --rss-steps steps, then its peak RSS."""
    import torch
    from diffusers import UNet2DConditionModel

    folder = common.build_sd15_folder(args.cache)
    side = args.child
    t0 = time.perf_counter()
    if side == "ours":
        step, _ = build_ours(folder, args.gradient_checkpointing)
    else:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet")
        step, _ = build_reference(folder, unet, args.gradient_checkpointing)
    setup = time.perf_counter() - t0
    steps = []
    for _ in range(args.rss_steps):
        loss, t = common.measure(step)
        steps.append(dict(t, loss=loss))
    print(json.dumps(dict(side=side, setup_s=setup, steps=steps, status=common.proc_status(),
                          threads=torch.get_num_threads())), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_cache_arg(p)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action="store_true", help="both sides")
    p.add_argument("--rss-steps", type=int, default=2, help="steps of each fresh peak-RSS process (0: skip)")
    p.add_argument("--skip-timing", action="store_true", help="only the fresh peak-RSS processes")
    p.add_argument("--malloc", choices=["stable", "default"], default="stable")
    train_common.add_threads_arg(p)
    p.add_argument("--json", help="also write the raw numbers to this file")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    train_common.reexec_with_stable_malloc(__file__, argv or sys.argv[1:], args.malloc)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train_common.set_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.child:
        return child(args)
    folder = common.build_sd15_folder(args.cache)
    for line in train_common.header_lines():
        print(line, flush=True)
    ckpt = "with" if args.gradient_checkpointing else "without"
    print(f"512 px, prior preservation (1 + 1 images), bf16 autocast, AdamW, {ckpt} gradient checkpointing",
          flush=True)
    raw = dict(gradient_checkpointing=args.gradient_checkpointing)
    # The fresh peak-RSS processes first: with the malloc settings above this process never gives
    # memory back, so after timing it would still hold ~18 GB.
    rss = {}
    if args.rss_steps:
        for side in SIDES:
            out, _ = common.run_child([__file__, "--child", side, "--cache", str(folder), "--rss-steps",
                                       str(args.rss_steps), "--malloc", args.malloc, "--threads", str(args.threads)]
                                      + (["--gradient-checkpointing"] if args.gradient_checkpointing else []),
                                      env={"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"})
            rss[side] = out
            walls = ", ".join(f"{s['wall']:.1f}" for s in out["steps"])
            losses = ", ".join(f"{s['loss']:.4f}" for s in out["steps"])
            peak = common.gib(out["status"]["VmHWM"])
            print(f"  [fresh process, {args.rss_steps} steps] {side}: peak RSS {peak:.2f} GiB, steps {walls} s, "
                  f"losses {losses}", file=sys.stderr, flush=True)
        raw["rss"] = rss
    if not args.skip_timing:
        matmul = train_common.MatmulPeak().measure()
        ours_unet, ref_unet = train_common.load_unet_pair(folder)
        ours_step, ours_opt = build_ours(folder, args.gradient_checkpointing, ours_unet)
        ref_step, ref_opt = build_reference(folder, ref_unet, args.gradient_checkpointing)
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
        flops, _ = train_common.count_flops(timed("ours", ours_step))
        matmul.measure()
        raw.update(timings=timings, losses=losses, flops=flops, matmul_tflops=dict(
            bf16=matmul.best("bf16"), fp32=matmul.best("fp32"), samples=matmul.samples))
        del ours_step, ref_step, ours_opt, ref_opt, ours_unet, ref_unet, params
    report(raw, args)
    print(f"\nload average at end: {' '.join(common.load_average())}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


def report(raw, args):
    m = common.median
    rows = []
    cells = {}
    for side in SIDES:
        c = {}
        if "timings" in raw:
            ts = raw["timings"][side]
            c.update(wall=m([t["wall"] for t in ts]), user=m([t["user"] for t in ts]),
                     lo=min(t["wall"] for t in ts), hi=max(t["wall"] for t in ts))
        if side in raw.get("rss", {}):
            c["peak"] = raw["rss"][side]["status"]["VmHWM"]
            c["fresh"] = [s["wall"] for s in raw["rss"][side]["steps"]]
        cells[side] = c
    for side in SIDES:
        c = cells[side]
        rows.append([side, f"{c['wall']:.2f} ({c['lo']:.2f}-{c['hi']:.2f})" if "wall" in c else "-",
                     f"{c['user']:.2f}" if "user" in c else "-",
                     f"{common.gib(c['peak']):.2f}" if "peak" in c else "-",
                     ", ".join(f"{w:.1f}" for w in c.get("fresh", [])) or "-"])
    o, r = cells["ours"], cells["reference"]
    rows.append(["ours/reference", common.ratio(o["wall"], r["wall"]) if "wall" in o else "-",
                 common.ratio(o["user"], r["user"]) if "user" in o else "-",
                 common.ratio(o["peak"], r["peak"]) if "peak" in o else "-", ""])
    ckpt = "with" if args.gradient_checkpointing else "without"
    print(f"\n### DreamBooth step, SD 1.5 size, 512 px, 1 + 1 images, bf16 autocast, AdamW, {ckpt} gradient "
          f"checkpointing ({args.rounds} rounds, medians)\n")
    common.print_table(rows, ["side", "s/step (min-max)", "user CPU s/step", "peak RSS GiB (fresh process)",
                              "fresh-process steps s (first includes page faults)"])
    if "flops" in raw:
        tf = raw["flops"] / o["wall"] / 1e12
        print(f"\nours: {raw['flops'] / 1e12:.2f} TFLOP counted per step, {tf:.3f} TFLOP/s = "
              f"{100 * tf / raw['matmul_tflops']['bf16']:.0f}% of this run's bf16 matmul throughput "
              f"({raw['matmul_tflops']['bf16']:.2f} TFLOP/s; fp32 {raw['matmul_tflops']['fp32']:.3f})")
        losses = {s: ", ".join(f"{v:.4f}" for v in raw["losses"][s]) for s in SIDES}
        print("losses in the timing process (shared weights, so not a same-seed comparison): "
              + "; ".join(f"{s}: {v}" for s, v in losses.items()))


if __name__ == "__main__":
    sys.exit(main())
