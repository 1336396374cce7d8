"""DreamBooth training from the command line (the method itself is in dreambooth.py).

    python train.py --instance_dir dog/ --class_noun dog

Defaults follow common Stable Diffusion practice (REFERENCE.md section 1): SD 1.5, prior
preservation with 200 class images, lr 5e-6 constant, 800 steps, 512 px, batch 1 (+1 class
image). The output folder is a diffusers-layout model (load it with sample.py, this project's
loader, or diffusers), plus dreambooth.json (identifier, prompts, arguments), loss.jsonl,
loss.png, validation/ grids, checkpoints/ and class_images/.

Precision: trainable weights stay fp32; the forward pass runs under autocast (bf16, or fp16
with a GradScaler so small gradients do not underflow); the frozen VAE and text encoder are
kept in that half precision. On CPU the same code runs (fp32, or bf16 autocast).

Memory: --low_memory fits SD 1.5 at 512 px with prior preservation on a 16 GB GPU. It means
--cache_latents (the VAE and the frozen text encoder leave the GPU after encoding once),
--gradient_checkpointing and --optimizer_state bf16 (AdamW's moments stored in bf16, optim.py):
by bench/memory.py's accounting about 11 GB instead of about 20 GB (bench/README.md, issue 6).
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from PIL import Image, ImageDraw
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

import dreambooth
import optim
import sample
from load_weights import DEFAULT_MODEL, LoadError, load_pipeline, save_pipeline

# `--model toy` (toy/: the tiny Stable Diffusion pretrained by this project, 32 px) brings its own
# recipe, because the defaults above are for SD at 512 px; a flag given on the command line wins.
# 50 class images of 25 sampler steps, then 1000 training steps at a learning rate the tiny UNet
# needs: about a minute on 2 CPU cores, class images included (README, "Quick start"). fp32: at
# this size bf16 is no faster on a CPU.
TOY_RECIPE = dict(resolution=32, num_class_images=50, class_steps=25, class_guidance_scale=5.0, sample_batch_size=25,
                  max_steps=1000, lr=2e-4, mixed_precision="no", cache_latents=True, validation_steps=25)


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("subject and prompts")
    g.add_argument("--instance_dir", required=True, help="folder with 3-5 photos of the subject")
    g.add_argument("--class_noun", required=True, help="the subject's coarse class, e.g. dog")
    g.add_argument("--identifier", help="the [V] word (default: a rare token drawn from the vocabulary)")
    g.add_argument("--rare_ranks", type=int, nargs=2, metavar=("LOW", "HIGH"),
                   help="BPE merge ranks to draw the identifier from (default: the last fifth of the merges)")
    g.add_argument("--instance_template", default=dreambooth.INSTANCE_TEMPLATE)
    g.add_argument("--class_template", default=dreambooth.CLASS_TEMPLATE)
    g = p.add_argument_group("prior preservation")
    g.add_argument("--no_prior_preservation", action="store_true", help="train on the subject only")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="lambda of Eq. 2")
    g.add_argument("--class_dir", help="class image cache (default: OUTPUT_DIR/class_images)")
    g.add_argument("--num_class_images", type=int, default=200)
    g.add_argument("--class_steps", type=int, default=50, help="sampler steps per class image")
    g.add_argument("--class_scheduler", choices=sorted(sample.SCHEDULERS), default="ddim")
    g.add_argument("--class_guidance_scale", type=float, default=7.5)
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for class and validation images")
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=DEFAULT_MODEL, help="Hub id, diffusers folder, or .safetensors/.ckpt file")
    g.add_argument("--resolution", type=int, default=512)
    crop = g.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", dest="center_crop", action="store_true", default=True)
    crop.add_argument("--random_crop", dest="center_crop", action="store_false")
    g.add_argument("--flip", action="store_true", help="random horizontal flips")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_text_encoder", action="store_true")
    g.add_argument("--lr", type=float, default=5e-6)
    g.add_argument("--text_encoder_lr", type=float, help="default: --lr")
    g.add_argument("--warmup_steps", type=int, default=0)
    g.add_argument("--max_steps", type=int, default=800)
    g.add_argument("--batch_size", type=int, default=1, help="instance images per step (plus as many class images)")
    g.add_argument("--grad_accum", type=int, default=1)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss (each is skipped)")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--mixed_precision", choices=["auto", "no", "fp16", "bf16"], default="auto",
                   help="auto: bf16 where supported, else fp16 with a GradScaler")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode the images once (both flips); the VAE then leaves the accelerator")
    g.add_argument("--optimizer_state", choices=sorted(optim.STATE_DTYPES), default="fp32",
                   help="precision AdamW stores its moments in; bf16 halves the optimizer's memory (optim.py)")
    g.add_argument("--low_memory", action="store_true",
                   help="the 16 GB mode: --cache_latents --gradient_checkpointing --optimizer_state bf16")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", default="dreambooth-output")
    g.add_argument("--checkpoint_every", type=int, default=0, help="steps between resumable checkpoints (0: none)")
    g.add_argument("--keep_checkpoints", type=int, default=1, help="how many recent checkpoints to keep")
    g.add_argument("--resume", help="a checkpoint folder, or 'latest'")
    g.add_argument("--validation_prompt", action="append", default=[], help="repeatable; [V] becomes the identifier")
    g.add_argument("--validation_every", type=int, default=0)
    g.add_argument("--validation_steps", type=int, default=25)
    return p


def check_args(p, args):
    """Bad input stops here, with a message that says what to change."""
    if args.low_memory:  # a shorthand, expanded before the checks that apply to its parts
        args.cache_latents = args.gradient_checkpointing = True
        args.optimizer_state = "bf16"
    if args.resolution <= 0 or args.resolution % 8:
        p.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    for name in ("max_steps", "batch_size", "grad_accum", "num_class_images", "class_steps", "sample_batch_size",
                 "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.prior_loss_weight < 0:
        p.error("--lr must be positive and --prior_loss_weight non-negative")
    if args.cache_latents and not args.center_crop:
        p.error(f"--{'low_memory caches latents, which' if args.low_memory else 'cache_latents'} encodes each "
                "image once, so it needs --center_crop (not --random_crop)")
    if args.rare_ranks and not 0 <= args.rare_ranks[0] <= args.rare_ranks[1]:
        p.error(f"--rare_ranks LOW HIGH needs 0 <= LOW <= HIGH, got {args.rare_ranks}")
    if args.validation_every and not args.validation_prompt:
        p.error("--validation_every needs at least one --validation_prompt")
    if not args.class_noun.strip():
        p.error("--class_noun is empty: name the subject's coarse class, e.g. dog")
    if args.identifier and args.identifier.lower() in args.class_noun.lower().split():
        p.error(f"--class_noun {args.class_noun!r} contains the identifier {args.identifier!r}: "
                "the class noun names the class, the identifier this one subject")
    if args.resume and args.resume != "latest" and not Path(args.resume, "state.pt").is_file():
        p.error(f"--resume {args.resume}: no checkpoint there (expected {Path(args.resume, 'state.pt')})")


def make_optimizer(groups, args, device):
    """AdamW over the trainable parameter groups. With fp32 moments, torch's fused kernel: one
    pass over weights, gradients and moments instead of one per operation (1.7x faster than the
    default per-tensor loop on CPU, the fastest on CUDA); the same update up to rounding. With
    bf16 moments (--optimizer_state bf16), optim.AdamW: the same update, half the memory."""
    if args.optimizer_state == "bf16":
        return optim.AdamW(groups, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                           state_dtype=torch.bfloat16, seed=args.seed)
    return torch.optim.AdamW(groups, weight_decay=args.adam_weight_decay, eps=args.adam_epsilon,
                             fused=device.type in ("cuda", "cpu") or None)


# ----------------------------------------------------------------------------------------------
# Checkpoints: everything an exact resume needs (weights, optimizer, scaler, step, RNG states),
# written to a temporary folder and renamed when complete.


def trainable_modules(pipeline, args):
    return {"unet": pipeline.unet, **({"text_encoder": pipeline.text_encoder} if args.train_text_encoder else {})}


def save_checkpoint(folder, step, pipeline, args, env, optimizer, scaler, rng, generator):
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    for name, module in trainable_modules(pipeline, args).items():
        save_file({k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}, tmp / f"{name}.safetensors")
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "python_rng": rng.getstate(),
                "torch_rng": generator.get_state(), "train_text_encoder": args.train_text_encoder,
                "world_size": env.world_size, "batch_size": args.batch_size},
               tmp / "state.pt")
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    checkpoints = sorted(folder.parent.glob("step-*"))
    for old in checkpoints[:-args.keep_checkpoints]:
        shutil.rmtree(old)


def load_checkpoint(folder, pipeline, args, env, optimizer, scaler, rng, generator):
    state = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=True)
    if state["train_text_encoder"] != args.train_text_encoder:
        raise SystemExit(f"error: {folder} was made with train_text_encoder={state['train_text_encoder']}; "
                         "resume with the same setting")
    made, now = state["world_size"] * state["batch_size"], env.world_size * args.batch_size
    if made != now:
        raise SystemExit(
            f"error: {folder} was made with {state['world_size']} process(es) x batch {state['batch_size']} "
            f"= {made} images per step, but this run has {env.world_size} x {args.batch_size} = {now}. "
            "The data order and the meaning of a step depend on that global batch: resume with the same "
            f"--nproc_per_node and --batch_size (or any pair whose product is {made}).")
    for name, module in trainable_modules(pipeline, args).items():
        module.load_state_dict(load_file(Path(folder) / f"{name}.safetensors"), strict=True)
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    rng.setstate(state["python_rng"])
    generator.set_state(state["torch_rng"])
    return state["step"]


# ----------------------------------------------------------------------------------------------


def plot_losses(records, path):
    """A plain loss curve (total, and the instance and prior terms) drawn with PIL."""
    width, height, margin = 640, 360, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    keys = {"loss": (0, 0, 0), "instance_loss": (200, 60, 60), "prior_loss": (60, 60, 200)}
    records = [r for r in records if r["loss"] is not None]  # skipped non-finite steps
    values = [r[k] for r in records for k in keys]
    if not records or not values:
        return
    low, high = min(values), max(values) or 1.0
    steps = [r["step"] for r in records]
    x = lambda s: margin + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (width - 2 * margin)  # noqa: E731
    y = lambda v: height - margin - (v - low) / max(high - low, 1e-12) * (height - 2 * margin)  # noqa: E731
    draw.rectangle([margin, margin, width - margin, height - margin], outline=(180, 180, 180))
    for i, (k, colour) in enumerate(keys.items()):
        draw.line([(x(r["step"]), y(r[k])) for r in records], fill=colour, width=1)
        draw.text((margin + 150 * i, 10), k, fill=colour)
    draw.text((margin, height - margin + 5), f"step {steps[0]}", fill=(0, 0, 0))
    draw.text((width - margin - 70, height - margin + 5), f"step {steps[-1]}", fill=(0, 0, 0))
    draw.text((5, margin), f"{high:.3g}", fill=(0, 0, 0))
    draw.text((5, height - margin - 10), f"{low:.3g}", fill=(0, 0, 0))
    image.save(path)


class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process without a
    process group. NCCL joins CUDA processes, gloo CPU ones."""

    def __init__(self, device):
        self.world_size = int(os.environ.get("WORLD_SIZE", 1))
        self.rank, self.local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device(device)
        if self.world_size > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", self.local_rank)
                torch.cuda.set_device(self.device)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(minutes=60))

    @property
    def main(self):
        return self.rank == 0

    def barrier(self):
        if self.world_size > 1:
            dist.barrier()

    def wrap(self, module):
        if self.world_size == 1:
            return module
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def close(self):
        if self.world_size > 1:
            dist.barrier()
            dist.destroy_process_group()


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.model == "toy":
        parser.set_defaults(**TOY_RECIPE)
        args = parser.parse_args(argv)
    return args


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    check_args(parser, args)
    env = Distributed(args.device)
    try:
        return train(parser, args, env)
    except KeyboardInterrupt:
        # Checkpoints are written to a temporary name and renamed, so the last one is complete.
        found = sorted((Path(args.output_dir) / "checkpoints").glob("step-*"))
        where = f"the last checkpoint, {found[-1]}, is intact" if found else "no checkpoint was written yet"
        print(f"\ninterrupted: {where}; continue with --resume latest", file=sys.stderr)
        return 130
    except BaseException:
        if env.world_size > 1:  # say which process failed; torchrun then stops the others
            print(f"error: rank {env.rank} of {env.world_size} failed", file=sys.stderr)
        raise
    finally:
        if env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def train(parser, args, env):
    try:
        instance_paths = dreambooth.list_images(args.instance_dir)
    except FileNotFoundError as e:
        parser.error(str(e))
    output_dir = Path(args.output_dir)
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".writable-{env.rank}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        parser.error(f"--output_dir {output_dir} is not writable ({e.strerror or e})")
    device = env.device
    half = sample.autocast_dtype(device, args.mixed_precision)  # None: fp32 throughout
    frozen_dtype = half or torch.float32
    torch.manual_seed(args.seed)
    say = (lambda *a: print(*a, file=sys.stderr)) if env.main else (lambda *a: None)

    try:
        pipeline = load_pipeline(args.model, device=device)
    except LoadError as e:
        parser.exit(2, f"error: {e}\n")
    # Frozen parts run in the half precision too; trainable weights stay fp32 (the optimizer
    # must see fp32 weights and gradients, else updates as small as lr * grad round to zero).
    pipeline.vae.to(frozen_dtype)
    if not args.train_text_encoder:
        pipeline.text_encoder.to(frozen_dtype)
    autocast = lambda: sample.autocast(device, args.mixed_precision)  # noqa: E731

    # 1-2. identifier and prompts
    tokenizer = pipeline.tokenizer
    if args.identifier:
        try:
            dreambooth.check_identifier(tokenizer, args.identifier, args.class_noun, args.instance_template)
        except ValueError as e:
            parser.error(str(e))
        if env.main:
            dreambooth.warn_if_common(tokenizer, args.identifier)
        identifier = args.identifier
    else:
        try:
            identifier = dreambooth.choose_identifier(tokenizer, args.class_noun, seed=args.seed,
                                                      merge_ranks=args.rare_ranks)
        except ValueError as e:
            parser.error(str(e))
    instance_prompt, class_prompt = dreambooth.make_prompts(identifier, args.class_noun,
                                                             args.instance_template, args.class_template)
    say(f"identifier: {identifier!r}\ninstance prompt: {instance_prompt!r}")

    # 3. autogenous class images, from the frozen model before any training
    prior = not args.no_prior_preservation
    class_paths = []
    if prior:
        say(f"class prompt: {class_prompt!r}")
        class_paths = dreambooth.ensure_class_images(
            pipeline, args.class_dir or output_dir / "class_images", class_prompt, args.num_class_images,
            seed=args.seed, batch_size=args.sample_batch_size, steps=args.class_steps,
            scheduler=args.class_scheduler, guidance_scale=args.class_guidance_scale,
            mixed_precision=args.mixed_precision, height=args.resolution, width=args.resolution,
            rank=env.rank, world_size=env.world_size, barrier=env.barrier)

    # 4. data; the prompts' contexts are computed once unless the text encoder trains
    data = dreambooth.DreamBoothData(instance_paths, class_paths, args.resolution,
                                     center_crop=args.center_crop, flip=args.flip)
    scaling_factor = pipeline.vae.config.scaling_factor
    with torch.no_grad(), autocast():
        contexts = {p: sample.encode_prompts(pipeline, [p]).float() for p in (instance_prompt, class_prompt)}
        cache = None
        if args.cache_latents:  # each image's posterior, unflipped and flipped: [N, 4, h, w] each
            def encode(paths):
                images = torch.stack([dreambooth.load_image(p, args.resolution) for p in paths]).to(device, frozen_dtype)
                return [dreambooth.LatentDistribution.encode(pipeline.vae, x) for x in (images, images.flip(-1))]
            cache = [encode(data.instance_paths), encode(data.class_paths) if prior else None]
            pipeline.vae.to("cpu")  # frees the accelerator until validation needs it
            if not args.train_text_encoder:
                pipeline.text_encoder.to("cpu")

    # 5. optimisation
    unet = pipeline.unet.train().requires_grad_(True)
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    groups = [{"params": list(unet.parameters()), "lr": args.lr}]
    if args.train_text_encoder:
        pipeline.text_encoder.train().requires_grad_(True)
        groups.append({"params": list(pipeline.text_encoder.parameters()), "lr": args.text_encoder_lr or args.lr})
    trained = {"unet": env.wrap(unet)}
    if args.train_text_encoder:
        trained["text_encoder"] = env.wrap(pipeline.text_encoder)
    optimizer = make_optimizer(groups, args, device)
    base_lrs = [g["lr"] for g in optimizer.param_groups]  # constant after a linear warm-up
    scaler = torch.amp.GradScaler(device.type, enabled=half == torch.float16)
    # All randomness of a step is drawn for the GLOBAL batch, identically on every rank, and each
    # rank keeps its slice: N processes x batch B train exactly as 1 process x batch N*B, and one
    # checkpoint (written by rank 0) resumes every rank.
    rng = random.Random(args.seed)                            # data order, crops, flips
    generator = torch.Generator().manual_seed(args.seed)      # noise, timesteps, latent samples
    global_batch = env.world_size * args.batch_size
    say(f"batch: {args.batch_size} per process x {env.world_size} processes x {args.grad_accum} accumulation "
        f"= {global_batch * args.grad_accum} instance images per optimizer step"
        + (" (+ as many class images)" if prior else "")
        + f"; lr {args.lr:g} is used as given (not scaled with the batch)")

    step = 0
    checkpoints_dir = output_dir / "checkpoints"
    if args.resume:
        folder = args.resume
        if folder == "latest":
            found = sorted(checkpoints_dir.glob("step-*"))
            if not found:
                parser.exit(2, f"error: --resume latest: no checkpoint in {checkpoints_dir}\n")
            folder = found[-1]
        step = load_checkpoint(folder, pipeline, args, env, optimizer, scaler, rng, generator)
        say(f"resumed from {folder} at step {step}")
    log_path = output_dir / "loss.jsonl"
    records = [json.loads(line) for line in log_path.read_text().splitlines()] if log_path.exists() and step else []
    records = [r for r in records if r["step"] <= step]
    if env.main:
        log_path.write_text("".join(json.dumps(r) + "\n" for r in records))

    latent_shape = None
    mine = slice(env.rank * args.batch_size, (env.rank + 1) * args.batch_size)  # this rank's items

    def posteriors(indices, item_rngs):
        """LatentDistribution of this rank's instance and class images (or None)."""
        if cache is not None:
            def pick(distributions, count):
                flips = [int(args.flip and r.random() < 0.5) for r in item_rngs]
                mean = torch.stack([distributions[f].mean[k % count] for k, f in zip(indices, flips)])
                std = torch.stack([distributions[f].std[k % count] for k, f in zip(indices, flips)])
                return dreambooth.LatentDistribution(mean, std)
            return (pick(cache[0], len(data.instance_paths)),
                    pick(cache[1], len(data.class_paths)) if prior else None)
        items = [data.item(k, r) for k, r in zip(indices, item_rngs)]
        with torch.no_grad(), autocast():
            encode = lambda x: dreambooth.LatentDistribution.encode(pipeline.vae, torch.stack(x).to(device, frozen_dtype))  # noqa: E731
            return encode([i for i, _ in items]), encode([c for _, c in items]) if prior else None

    progress = tqdm(range(step, args.max_steps), initial=step, total=args.max_steps, desc="training",
                    disable=not env.main)
    skipped_steps = nonfinite_run = 0
    for step in progress:
        for group, base_lr in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base_lr * min(1.0, (step + 1) / (args.warmup_steps + 1))
        totals = torch.zeros(3)
        for micro in range(args.grad_accum):
            # the global batch's randomness, then this rank's part of it
            indices = [rng.randrange(len(data)) for _ in range(global_batch)]
            item_rngs = [random.Random(rng.getrandbits(64)) for _ in range(global_batch)]
            instance, klass = posteriors(indices[mine], item_rngs[mine])
            latent_shape = instance.mean.shape[1:]
            latent_noise = torch.randn((2, global_batch, *latent_shape), generator=generator)[:, mine]
            noise = torch.randn((2, global_batch, *latent_shape), generator=generator)[:, mine]
            timesteps = torch.randint(0, pipeline.scheduler.config.num_train_timesteps, (2, global_batch),
                                      generator=generator)[:, mine]
            instance_latents = instance.sample(latent_noise[0].to(device), scaling_factor).float()
            class_latents = klass.sample(latent_noise[1].to(device), scaling_factor).float() if prior else None
            n = args.batch_size
            sync = contextlib.ExitStack()
            if micro < args.grad_accum - 1:  # accumulate locally; all-reduce on the last micro-step only
                for module in trained.values():
                    if isinstance(module, DDP):
                        sync.enter_context(module.no_sync())
            with sync:
                with autocast():
                    if args.train_text_encoder:
                        encoder = trained["text_encoder"]
                        ids = tokenizer([instance_prompt] * n + ([class_prompt] * n if prior else [])).to(device)
                        instance_context, class_context = (encoder(ids).split(n) + (None,))[:2]
                    else:
                        instance_context = contexts[instance_prompt].expand(n, -1, -1)
                        class_context = contexts[class_prompt].expand(n, -1, -1) if prior else None
                    loss, instance_loss, prior_loss = dreambooth.prior_preservation_loss(
                        trained["unet"], pipeline.scheduler, instance_latents, instance_context,
                        class_latents, class_context, args.prior_loss_weight,
                        noise=noise.flatten(0, 1) if prior else noise[0],
                        timesteps=timesteps.flatten() if prior else timesteps[0])
                scaler.scale(loss / args.grad_accum).backward()
            totals += torch.stack([loss.detach().float().cpu(), instance_loss.float().cpu(),
                                   prior_loss.float().cpu()]) / args.grad_accum
        if env.world_size > 1:  # the mean over all ranks, for the log and for the finite check
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            totals /= env.world_size
        finite = bool(torch.isfinite(totals).all())
        scale = scaler.get_scale() if scaler.is_enabled() else None
        if finite:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], args.max_grad_norm)
            scaler.step(optimizer)  # fp16: skipped when the gradients overflowed
            scaler.update()
        elif scaler.is_enabled():  # lower the loss scale, as for overflowing gradients
            scaler.update(scale * scaler.get_backoff_factor())
        skipped = not finite or (scale is not None and scaler.get_scale() < scale)
        optimizer.zero_grad(set_to_none=True)
        skipped_steps += skipped
        nonfinite_run = 0 if finite else nonfinite_run + 1
        record = {"step": step + 1, **{k: (v.item() if finite else None) for k, v in
                                       zip(("loss", "instance_loss", "prior_loss"), totals)},
                  "lr": optimizer.param_groups[0]["lr"], "skipped": skipped}
        if nonfinite_run >= args.max_nonfinite_steps:
            parser.exit(1, f"error: the loss was not finite for {nonfinite_run} steps in a row (up to step "
                           f"{step + 1}); training stops without saving over earlier results (checkpoints "
                           "are intact). Try a lower --lr, or --mixed_precision bf16 or no.\n")
        records.append(record)
        done = step + 1
        if env.main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            if finite:
                progress.set_postfix(loss=f"{record['loss']:.4f}", inst=f"{record['instance_loss']:.4f}",
                                     prior=f"{record['prior_loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     skipped=skipped_steps)
            if args.checkpoint_every and done % args.checkpoint_every == 0 and done < args.max_steps:
                save_checkpoint(checkpoints_dir / f"step-{done:06d}", done, pipeline, args, env, optimizer,
                                scaler, rng, generator)
            if args.validation_every and (done % args.validation_every == 0 or done == args.max_steps):
                validate(pipeline, args, identifier, output_dir / "validation" / f"step-{done:06d}.png", device, half)

    # 6. the fine-tuned model: the trained modules into a fresh fp32 copy of the source, so the
    # frozen parts are saved exactly as they came (not rounded through the half precision).
    if env.main:
        final = load_pipeline(args.model)
        final.unet = pipeline.unet.float().cpu()
        if args.train_text_encoder:
            final.text_encoder = pipeline.text_encoder.float().cpu()
        save_pipeline(final, output_dir)
        info = {"identifier": identifier, "class_noun": args.class_noun, "instance_prompt": instance_prompt,
                "class_prompt": class_prompt if prior else None, "steps": args.max_steps,
                "world_size": env.world_size, "args": vars(args)}
        tmp = output_dir / ".dreambooth.json.tmp"
        tmp.write_text(json.dumps(info, indent=2))
        tmp.replace(output_dir / "dreambooth.json")
        plot_losses(records, output_dir / "loss.png")
        say(f"saved the fine-tuned model to {output_dir} (identifier {identifier!r}); try:\n"
            f"  python sample.py --model {output_dir} --prompt \"{instance_prompt.replace(identifier, '[V]')}\"")
    env.close()
    return 0


def validate(pipeline, args, identifier, path, device, half):
    """A grid of the validation prompts (one row each) from the current weights."""
    pipeline.unet.eval()
    moved = [m for m in (pipeline.vae, pipeline.text_encoder) if next(m.parameters()).device != device]
    for m in moved:
        m.to(device)
    prompts = [p.replace("[V]", identifier) for p in args.validation_prompt]
    images = sample.generate(pipeline, prompts, steps=args.validation_steps, seed=args.seed,
                             batch_size=args.sample_batch_size, mixed_precision=args.mixed_precision,
                             height=args.resolution, width=args.resolution, progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    sample.grid(images, rows=len(prompts)).save(path)
    for m in moved:
        m.to("cpu")
    pipeline.unet.train()


if __name__ == "__main__":
    sys.exit(main())
