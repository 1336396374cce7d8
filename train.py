"""DreamBooth training from the command line; the method itself is in dreambooth.py.

    python train.py --instance_dir dog/ --class_noun dog

Read `train` and `fine_tune` first (after the phases they call): the phases come in the order of
dreambooth.py's sections (prepare the model and the prompts, class images, data, the training
step, then checkpoints, validation and the final save).

Defaults follow common Stable Diffusion practice: SD 1.5, prior preservation with 200 class
images, lr 5e-6 constant, 800 steps, 512 px, batch 1 (+1 class image). The output folder is a
diffusers-layout model (load it with sample.py, this project's loader, or diffusers), plus
dreambooth.json (identifier, prompts, arguments), loss.jsonl, loss.png, validation/ grids,
checkpoints/ and class_images/. With --lora_rank R, low-rank adapters (lora.py) train instead of
the UNet's weights, and the folder holds the adapters' files instead of a full model.

Precision: trainable weights stay fp32; the forward pass runs under autocast (bf16, or fp16
with a GradScaler so small gradients do not underflow); the frozen VAE and text encoder are
kept in that half precision. On CPU the same code runs (fp32, or bf16 autocast).

Memory: --low_memory fits SD 1.5 at 512 px with prior preservation on a 16 GB GPU. It means
--cache_latents (the VAE and the frozen text encoder leave the GPU after encoding once),
--gradient_checkpointing and --optimizer_state bf16 (AdamW's moments stored in bf16, optim.py):
10.8 GB by bench/memory.py's accounting, against 14.3 GB for --cache_latents alone and 17.8 GB
for diffusers' train_dreambooth.py defaults (bench/README.md).
"""
import argparse
import atexit
import contextlib
import datetime
import errno
import hashlib
import io
import json
import os
import random
import shutil
import socket
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import dreambooth
import lora
import optim
import sample
from load_weights import (DEFAULT_MODEL, TOY_MODEL, LoadError, export_single_file, finish_interrupted_save,
                          load_pickle, load_pipeline, save_pipeline)


class TrainError(Exception):
    """A mistake in the user's input or environment. `main` prints the message and exits with
    `exit_code`; from Python, `train(args)` raises it."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------
# 1-2. Prepare: the output folder, the model in training precision, the identifier and prompts


@dataclass
class Prompts:
    identifier: str          # the rare token [V] (section 3.2)
    instance_prompt: str     # "a photo of [V] dog"
    class_prompt: str        # "a photo of dog"


def prepare_output_dir(args, env):
    """The output folder (and the class image folder), created and probed for writing before
    any work."""
    output_dir = Path(args.output_dir)
    for flag, folder in (("--output_dir", output_dir), ("--class_dir", args.class_dir and Path(args.class_dir))):
        if folder:
            probe_writable(flag, folder)
    return output_dir


def probe_writable(flag, folder):
    try:
        sample.check_writable_folder(flag, folder)
    except ValueError as e:
        raise TrainError(str(e)) from None


def load_for_training(args, device):
    """The pipeline with its frozen parts in the half precision. Trainable weights stay fp32: the
    optimizer must see fp32 weights and gradients, else updates as small as lr * grad round to
    zero."""
    try:
        pipeline = load_pipeline(args.model, device=device, prediction_type=args.prediction_type)
    except LoadError as e:
        raise TrainError(str(e)) from None
    if pipeline.text_encoder_2 is not None:
        raise TrainError(f"{args.model} is an SDXL model: this project loads SDXL, but does not train it yet; "
                         "use an SD 1.x or 2.x model")
    frozen_dtype = sample.autocast_dtype(torch.device(device), args.mixed_precision) or torch.float32
    pipeline.vae.to(frozen_dtype)
    if not args.train_text_encoder:
        pipeline.text_encoder.to(frozen_dtype)
    return pipeline


def choose_prompts(args, tokenizer, env):
    """The identifier (drawn from the vocabulary, or the user's checked choice) and the prompts."""
    try:
        if args.identifier:
            dreambooth.check_identifier(tokenizer, args.identifier, args.class_noun, args.instance_template)
            if env.main:
                dreambooth.warn_if_common(tokenizer, args.identifier)
            identifier = args.identifier
        else:
            identifier = dreambooth.choose_identifier(tokenizer, args.class_noun, seed=args.seed,
                                                      merge_ranks=args.rare_ranks)
    except ValueError as e:
        raise TrainError(str(e)) from None
    instance_prompt, class_prompt = dreambooth.make_prompts(identifier, args.class_noun,
                                                             args.instance_template, args.class_template)
    return Prompts(identifier, instance_prompt, class_prompt)


# ----------------------------------------------------------------------------------------------
# 3. Autogenous class images, from the frozen model before any training


def make_class_images(pipeline, args, prompts, output_dir, env):
    """The class images' paths (generating the shortfall), or [] without prior preservation."""
    if args.no_prior_preservation:
        return []
    return dreambooth.ensure_class_images(
        pipeline, args.class_dir or output_dir / "class_images", prompts.class_prompt, args.num_class_images,
        seed=args.seed, batch_size=args.sample_batch_size, steps=args.class_steps,
        scheduler=args.class_scheduler, guidance_scale=args.class_guidance_scale,
        mixed_precision=args.mixed_precision, height=args.resolution, width=args.resolution,
        rank=env.rank, world_size=env.world_size, barrier=env.barrier, progress=env.main)


# ----------------------------------------------------------------------------------------------
# 4. The data: latents of the subject and class images, and the noise and timesteps of Eq. 2


@dataclass
class Batch:
    """One micro-batch of this process: n instance latents (and n class latents), and the noise
    and timesteps of Eq. 2 for them, instance rows first."""
    instance_latents: torch.Tensor           # [n, C, h, w] scaled VAE latents
    class_latents: torch.Tensor | None       # [n, C, h, w], or None without prior preservation
    noise: torch.Tensor                      # [n or 2n, C, h, w]
    timesteps: torch.Tensor                  # [n or 2n]


@dataclass
class CachedPosteriors:
    """Every image's VAE posterior, encoded once as it is and mirrored (`--cache_latents`)."""
    plain: dreambooth.LatentDistribution     # [N, C, h, w]
    mirrored: dreambooth.LatentDistribution  # [N, C, h, w]

    @classmethod
    def encode(cls, vae, paths, resolution, device, dtype):
        images = torch.stack([dreambooth.load_image(p, resolution) for p in paths]).to(device, dtype)
        return cls(*(dreambooth.LatentDistribution.encode(vae, x) for x in (images, images.flip(-1))))

    def pick(self, indices, mirror):
        """The posteriors of images `indices` (mod N), each mirrored where `mirror` says."""
        chosen = [(self.mirrored if m else self.plain, k % self.plain.mean.shape[0]) for k, m in zip(indices, mirror)]
        return dreambooth.LatentDistribution(torch.stack([d.mean[k] for d, k in chosen]),
                                             torch.stack([d.std[k] for d, k in chosen]))


class TrainingData:
    """The training batches. It owns the two random sources of training, and draws every random
    number for the GLOBAL batch (all processes together), identically on every process, keeping
    this process's slice: N processes x batch B train exactly as 1 process x batch N*B, and one
    checkpoint (written by rank 0) resumes every process."""

    def __init__(self, pipeline, instance_paths, class_paths, args, env, autocast):
        self.pipeline, self.args, self.autocast = pipeline, args, autocast
        self.images = dreambooth.DreamBoothData(instance_paths, class_paths, args.resolution,
                                                center_crop=args.center_crop, flip=args.flip)
        self.prior = bool(class_paths)
        self.global_batch = env.world_size * args.batch_size
        self.mine = slice(env.rank * args.batch_size, (env.rank + 1) * args.batch_size)  # this process's items
        self.rng = random.Random(args.seed)                        # data order, crops, flips
        self.generator = torch.Generator().manual_seed(args.seed)  # noise, timesteps, latent samples
        self.device = env.device
        self.dtype = next(pipeline.vae.parameters()).dtype
        self.cache = None  # (instance, class) CachedPosteriors
        if args.cache_latents:
            self.cache = self.encode_all()

    @torch.no_grad()
    def encode_all(self):
        """Encode every image once (both mirror images); the VAE and a frozen text encoder then
        leave the accelerator until validation needs them."""
        with self.autocast():
            encode = lambda paths: CachedPosteriors.encode(  # noqa: E731
                self.pipeline.vae, paths, self.args.resolution, self.device, self.dtype)
            cache = (encode(self.images.instance_paths), encode(self.images.class_paths) if self.prior else None)
        self.pipeline.vae.to("cpu")
        if not self.args.train_text_encoder:
            self.pipeline.text_encoder.to("cpu")
        return cache

    def posteriors(self, indices, item_rngs):
        """LatentDistribution of this process's instance images, and of its class images (or None)."""
        if self.cache is not None:
            mirror = [self.args.flip and r.random() < 0.5 for r in item_rngs]
            instance_cache, class_cache = self.cache
            return instance_cache.pick(indices, mirror), class_cache.pick(indices, mirror) if self.prior else None
        items = [self.images.item(k, r) for k, r in zip(indices, item_rngs)]  # (instance, class) pixels
        with torch.no_grad(), self.autocast():
            encode = lambda x: dreambooth.LatentDistribution.encode(  # noqa: E731
                self.pipeline.vae, torch.stack(x).to(self.device, self.dtype))
            return encode([i for i, _ in items]), encode([c for _, c in items]) if self.prior else None

    def next_batch(self):
        g, mine = self.global_batch, self.mine
        indices = [self.rng.randrange(len(self.images)) for _ in range(g)]
        item_rngs = [random.Random(self.rng.getrandbits(64)) for _ in range(g)]
        instance, klass = self.posteriors(indices[mine], item_rngs[mine])
        # row 0: the instance images, row 1: the class images; (2, g, C, h, w) -> (2, n, C, h, w)
        shape = (2, g, *instance.mean.shape[1:])
        latent_noise = torch.randn(shape, generator=self.generator)[:, mine]  # samples of the posteriors
        noise = torch.randn(shape, generator=self.generator)[:, mine]         # e of Eq. 2
        timesteps = torch.randint(0, self.pipeline.scheduler.config.num_train_timesteps, (2, g),
                                  generator=self.generator)[:, mine]          # (2, n)
        scaling_factor = self.pipeline.vae.config.scaling_factor
        instance_latents = instance.sample(latent_noise[0].to(self.device), scaling_factor).float()
        if not self.prior:
            return Batch(instance_latents, None, noise[0], timesteps[0])
        class_latents = klass.sample(latent_noise[1].to(self.device), scaling_factor).float()
        # (2, n, C, h, w) -> (2n, C, h, w): instance rows then class rows, as the loss concatenates
        return Batch(instance_latents, class_latents, noise.flatten(0, 1), timesteps.flatten())

    def state_dict(self):
        return {"python_rng": self.rng.getstate(), "torch_rng": self.generator.get_state()}

    def load_state_dict(self, state):
        self.rng.setstate(state["python_rng"])
        self.generator.set_state(state["torch_rng"])


# ----------------------------------------------------------------------------------------------
# 5. One training step: Eq. 2 over the micro-batches, then one optimizer update


@dataclass
class Trainer:
    """What a training step needs. `unet` and `text_encoder` are the trained modules (wrapped in
    DistributedDataParallel with several processes); text_encoder is None when it is frozen, and
    `contexts` then holds each prompt's text context, computed once."""
    unet: torch.nn.Module
    text_encoder: torch.nn.Module | None
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    noise_schedule: object
    tokenizer: object
    prompts: Prompts
    contexts: dict            # prompt -> [1, 77, D]
    prior_loss_weight: float
    max_grad_norm: float
    autocast: object          # () -> the autocast context
    world_size: int = 1
    base_lrs: list = None     # each group's learning rate after warm-up (a resumed optimizer holds the current one)

    def __post_init__(self):
        self.base_lrs = self.base_lrs or [group["lr"] for group in self.optimizer.param_groups]

    @property
    def parameters(self):
        return [p for group in self.optimizer.param_groups for p in group["params"]]


@dataclass
class StepResult:
    losses: torch.Tensor      # (loss, instance_loss, prior_loss), averaged over micro-batches and processes
    finite: bool              # False: the update was skipped (non-finite loss)
    skipped: bool             # no update: non-finite loss, or fp16 gradients that overflowed


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


@torch.no_grad()
def encode_contexts(pipeline, prompts, autocast):
    """Each prompt's text context [1, 77, D], for a frozen text encoder."""
    with autocast():
        return {p: sample.encode_prompts(pipeline, [p]).float() for p in (prompts.instance_prompt, prompts.class_prompt)}


def make_trainer(pipeline, prompts, contexts, args, env, autocast):
    """Trainable modules, optimizer and loss scaler, for `train_step`. contexts: each prompt's
    text context (encode_contexts), or {} when the text encoder trains. With --lora_rank, only
    the adapters add_lora puts on the trained modules train; their base weights stay frozen."""
    if args.lora_rank:
        add_lora(pipeline, args, env.device)
    else:
        for module in trained_modules(pipeline, args).values():
            module.requires_grad_(True)
    if env.main:
        print(trainable_parameters_line(trained_modules(pipeline, args)), file=sys.stderr)
    trainable = lambda module: [p for p in module.parameters() if p.requires_grad]  # noqa: E731
    unet = pipeline.unet.train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    groups = [{"params": trainable(unet), "lr": args.lr}]
    text_encoder = None
    if args.train_text_encoder:
        text_encoder = pipeline.text_encoder.train()
        groups.append({"params": trainable(text_encoder), "lr": args.text_encoder_lr or args.lr})
    fp16 = sample.autocast_dtype(env.device, args.mixed_precision) == torch.float16
    return Trainer(unet=env.wrap(unet), text_encoder=env.wrap(text_encoder) if text_encoder is not None else None,
                   optimizer=make_optimizer(groups, args, env.device),
                   scaler=torch.amp.GradScaler(env.device.type, enabled=fp16),
                   noise_schedule=pipeline.scheduler, tokenizer=pipeline.tokenizer, prompts=prompts,
                   contexts=contexts, prior_loss_weight=args.prior_loss_weight,
                   max_grad_norm=args.max_grad_norm, autocast=autocast, world_size=env.world_size)


def text_contexts(trainer, n, prior):
    """The contexts of n instance prompts and n class prompts (or None) [n, 77, D] each: through
    the text encoder when it trains, else the cached ones."""
    instance_prompt, class_prompt = trainer.prompts.instance_prompt, trainer.prompts.class_prompt
    if trainer.text_encoder is None:
        return (trainer.contexts[instance_prompt].expand(n, -1, -1),
                trainer.contexts[class_prompt].expand(n, -1, -1) if prior else None)
    device = next(trainer.text_encoder.parameters()).device
    ids = trainer.tokenizer([instance_prompt] * n + ([class_prompt] * n if prior else [])).to(device)
    return (trainer.text_encoder(ids).split(n) + (None,))[:2]


def no_sync(trainer):
    """DDP's no_sync on every trained module: accumulate gradients locally, all-reduce once."""
    stack = contextlib.ExitStack()
    for module in (trainer.unet, trainer.text_encoder):
        if isinstance(module, DDP):
            stack.enter_context(module.no_sync())
    return stack


def train_step(trainer, batches):
    """One optimizer update over the micro-batches `batches` (gradient accumulation): the loss of
    Eq. 2 under autocast, backward through the loss scaler, gradient clipping, AdamW. A step
    whose loss is not finite is skipped (no update; with fp16 the loss scale is lowered)."""
    totals = torch.zeros(3)
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else no_sync(trainer):
            with trainer.autocast():
                n, prior = batch.instance_latents.shape[0], batch.class_latents is not None
                instance_context, class_context = text_contexts(trainer, n, prior)
                loss, instance_loss, prior_loss = dreambooth.prior_preservation_loss(
                    trainer.unet, trainer.noise_schedule, batch.instance_latents, instance_context,
                    batch.class_latents, class_context, trainer.prior_loss_weight,
                    noise=batch.noise, timesteps=batch.timesteps)
            trainer.scaler.scale(loss / len(batches)).backward()
        totals += torch.stack([loss.detach().float().cpu(), instance_loss.float().cpu(),
                               prior_loss.float().cpu()]) / len(batches)
    if trainer.world_size > 1:  # the mean over all processes, for the log and the finite check
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        totals /= trainer.world_size
    return apply_update(trainer, totals)


def apply_update(trainer, totals):
    """Unscale, clip and step when the loss is finite; the GradScaler skips fp16 steps whose
    gradients overflowed and lowers its scale, and a non-finite loss lowers it the same way."""
    scaler, optimizer = trainer.scaler, trainer.optimizer
    finite = bool(torch.isfinite(totals).all())
    scale = scaler.get_scale() if scaler.is_enabled() else None
    if finite:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(trainer.parameters, trainer.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
    elif scaler.is_enabled():
        scaler.update(scale * scaler.get_backoff_factor())
    skipped = not finite or (scale is not None and scaler.get_scale() < scale)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(totals, finite, skipped)


def set_learning_rate(trainer, step, warmup_steps):
    """Constant after a linear warm-up over the first warmup_steps steps."""
    for group, base_lr in zip(trainer.optimizer.param_groups, trainer.base_lrs):
        group["lr"] = base_lr * min(1.0, (step + 1) / (warmup_steps + 1))


# ----------------------------------------------------------------------------------------------
# 6. Checkpoints: everything an exact resume needs (trained weights, optimizer, loss scaler,
# step, the data's random states), written to a temporary folder and renamed when complete.


def trained_modules(pipeline, args):
    """{name: module} of the modules that train (their adapters only, with --lora_rank)."""
    return {"unet": pipeline.unet, **({"text_encoder": pipeline.text_encoder} if args.train_text_encoder else {})}


def save_checkpoint(folder, step, pipeline, trainer, data, log, record, args, env):
    """Write checkpoint `folder` (step-NNNNNN), then prune to the newest --keep_checkpoints.
    The run's record and its loss log up to `step` travel inside, so a resume can check that it
    continues the same run and its log reads as if the run had never stopped."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name, module in trained_modules(pipeline, args).items():  # a LoRA run: the adapters only
            save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint_tensors(module, args).items()},
                      tmp / f"{name}.safetensors", metadata={"lora": json.dumps(lora_settings(args))})
        torch.save({"step": step, "optimizer": trainer.optimizer.state_dict(), "scaler": trainer.scaler.state_dict(),
                    **data.state_dict(), "train_text_encoder": args.train_text_encoder, "run": record,
                    "log": log.records, "world_size": env.world_size, "batch_size": args.batch_size},
                   tmp / "state.pt")
    except (OSError, RuntimeError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_failure(e, folder) from None
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    for old in sorted(folder.parent.glob("step-*"))[:-args.keep_checkpoints]:
        shutil.rmtree(old)


def write_failure(error, path):
    """A TrainError for a full disk (torch.save reports one as "unexpected pos"), else `error`."""
    full = getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error)
    if not full:
        return error
    where = Path(path).parent if not Path(path).exists() else Path(path)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    return TrainError(f"the disk is full: writing {path} failed with {free / 2**20:.1f} MiB left on that disk. "
                      "Free some space (or lower --keep_checkpoints) and run again with --resume latest.", exit_code=1)


def find_checkpoint(args, checkpoints_dir):
    """The checkpoint folder `--resume` names ('latest': the newest in checkpoints_dir)."""
    if args.resume != "latest":
        return Path(args.resume)
    found = sorted(checkpoints_dir.glob("step-*"))
    if not found:
        raise TrainError(f"--resume latest: no checkpoint in {checkpoints_dir}, so nothing to resume; start without --resume "
                         "(--checkpoint_every N writes resumable checkpoints)")
    return found[-1]


def read_checkpoint_state(folder):
    """state.pt of a checkpoint, or a TrainError that says why it cannot be used."""
    path = Path(folder) / "state.pt"
    try:
        state = load_pickle(path)
    except LoadError as e:
        raise TrainError(f"{e} Resume from an earlier checkpoint, or start afresh with --overwrite.") from None
    missing = {"step", "optimizer", "scaler", "python_rng", "torch_rng"} - set(state if isinstance(state, dict) else {})
    if missing:
        raise TrainError(f"{path} is not a checkpoint of train.py (no {', '.join(sorted(missing))})")
    return state


def load_module_weights(module, path):
    """A trained module's weights from a checkpoint file, with an error naming what is wrong."""
    try:
        module.load_state_dict(load_file(path), strict=True)
    except (OSError, SafetensorError) as e:
        raise TrainError(f"{path} cannot be read (truncated or corrupt?): {e}") from None
    except RuntimeError as e:
        raise TrainError(f"{path} does not fit this model (a checkpoint of another model?): "
                         f"{str(e).splitlines()[-1].strip()[:300]}") from None


def load_checkpoint(folder, pipeline, trainer, data, record, args, env):
    """Restore a checkpoint into the trained modules, optimizer, scaler and data; returns its
    step and loss records."""
    state = read_checkpoint_state(folder)
    check_same_run(state.get("run"), record, folder)
    if state["train_text_encoder"] != args.train_text_encoder:
        raise TrainError(f"{folder} was made with train_text_encoder={state['train_text_encoder']}; "
                         "resume with the same setting")
    made, now = state["world_size"] * state["batch_size"], env.world_size * args.batch_size
    if made != now:
        raise TrainError(
            f"{folder} was made with {state['world_size']} process(es) x batch {state['batch_size']} "
            f"= {made} images per step, but this run has {env.world_size} x {args.batch_size} = {now}. "
            "The data order and the meaning of a step depend on that global batch: resume with the same "
            f"--nproc_per_node and --batch_size (or any pair whose product is {made}).")
    for name, module in trained_modules(pipeline, args).items():
        path = Path(folder) / f"{name}.safetensors"
        check_checkpoint_lora(path, args)
        (load_lora_weights if args.lora_rank else load_module_weights)(module, path)
    try:
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.scaler.load_state_dict(state["scaler"])
        data.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise TrainError(f"{folder}/state.pt does not fit this run's optimizer ({e})") from None
    return state["step"], state.get("log")


# ----------------------------------------------------------------------------------------------
# 7. The loss log (loss.jsonl, loss.png) and validation grids


class LossLog:
    """The loss log, one record per step, written as it goes to OUTPUT_DIR/run/loss.jsonl by
    rank 0 (the final save puts it beside the model as loss.jsonl). A resumed run starts from the
    records its checkpoint holds, so the log reads as if the run had never stopped."""

    def __init__(self, path, records, writer):
        self.path, self.writer, self.records = Path(path), writer, list(records)
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, step, result, lr):
        values = {k: (v.item() if result.finite else None)
                  for k, v in zip(("loss", "instance_loss", "prior_loss"), result.losses)}
        record = {"step": step, **values, "lr": lr, "skipped": result.skipped}
        self.records.append(record)
        if self.writer:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        return record

    def summary(self):
        """The latest losses and the count of skipped steps, for the progress bar."""
        last = self.records[-1]
        shown = {} if last["loss"] is None else {
            "loss": f"{last['loss']:.4f}", "inst": f"{last['instance_loss']:.4f}", "prior": f"{last['prior_loss']:.4f}"}
        return {**shown, "lr": f"{last['lr']:.2e}", "skipped": sum(r["skipped"] for r in self.records)}


def plot_losses(records):
    """A plain loss curve (total, and the instance and prior terms) drawn with PIL, or None."""
    width, height, margin = 640, 360, 40
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    keys = {"loss": (0, 0, 0), "instance_loss": (200, 60, 60), "prior_loss": (60, 60, 200)}
    records = [r for r in records if r["loss"] is not None]  # skipped non-finite steps
    values = [r[k] for r in records for k in keys]
    if not records or not values:
        return None
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
    return image


def validate(pipeline, args, identifier, path, device):
    """A grid of the validation prompts (one row each) from the current weights, sampled in
    eval mode (no dropout)."""
    training = [m for m in (pipeline.unet, pipeline.text_encoder) if m.training]
    for m in training:
        m.eval()
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
    for m in training:
        m.train()


# ----------------------------------------------------------------------------------------------
# LoRA (--lora_rank R > 0): low-rank adapters train instead of the weights (lora.py). Everything
# else is the same run: Eq. 2, prior preservation, precision, checkpoints, several processes.
# Checkpoints hold the adapters alone, and the output folder holds the adapters' files beside
# dreambooth.json, which names the base model: no copy of the base weights.

LORA_TARGETS = {"attention": lora.UNET_TARGETS, "attention+ff": lora.UNET_TARGETS + lora.UNET_FF_TARGETS}


def lora_settings(args):
    """What makes the adapters of a LoRA run (None for a full fine-tune); a checkpoint records
    it, and the output folder's dreambooth.json too."""
    if not args.lora_rank:
        return None
    targets = args.lora_targets or "attention"
    unet = LORA_TARGETS.get(targets) or tuple(t.strip() for t in targets.split(",") if t.strip())
    text_encoder = {"text_encoder": list(lora.TEXT_ENCODER_TARGETS)} if args.train_text_encoder else {}
    return {"rank": args.lora_rank, "alpha": float(args.lora_alpha or args.lora_rank), "dropout": args.lora_dropout,
            "targets": {"unet": list(unet), **text_encoder}}


def check_lora_args(args):
    if args.lora_rank < 0:
        raise TrainError(f"--lora_rank must be at least 0 (0: full fine-tuning), got {args.lora_rank}")
    if not args.lora_rank:
        given = [flag for flag, value in (("--lora_alpha", args.lora_alpha), ("--lora_dropout", args.lora_dropout),
                                          ("--lora_targets", args.lora_targets)) if value]
        if given:
            raise TrainError(f"{', '.join(given)} set(s) up LoRA adapters: add --lora_rank R (e.g. 4)")
        return
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise TrainError(f"--lora_alpha must be positive, got {args.lora_alpha:g}")
    if not 0 <= args.lora_dropout < 1:
        raise TrainError(f"--lora_dropout must be in [0, 1), got {args.lora_dropout:g}")
    if not lora_settings(args)["targets"]["unet"]:
        raise TrainError(f"--lora_targets {args.lora_targets!r} names no layer: give 'attention', 'attention+ff' "
                         "or comma-separated layer-name suffixes such as to_q,to_v")
    if args.save_single_file:
        raise TrainError("--save_single_file is for full fine-tunes: a LoRA run writes its single file anyway "
                         "(OUTPUT_DIR/<name>.safetensors, kohya's format, for AUTOMATIC1111 and ComfyUI)")


def add_lora(pipeline, args, device):
    """Fresh adapters (B = 0: training starts from the base model exactly) on the trained
    modules, everything else frozen. The frozen base weights are kept in the autocast
    precision like the VAE: only the fp32 adapters are updated, so no base weight needs fp32,
    and the UNet takes half the memory."""
    settings = lora_settings(args)
    frozen_dtype = sample.autocast_dtype(device, args.mixed_precision) or torch.float32
    for name, module in trained_modules(pipeline, args).items():
        layer_names = [n for n, _ in module.named_modules()]
        unmatched = [t for t in settings["targets"][name] if not any(n == t or n.endswith("." + t) for n in layer_names)]
        if unmatched:  # most likely a typo: say so rather than train fewer layers than asked
            raise TrainError(f"--lora_targets: no layer of the {name} is named {', '.join(unmatched)} (or ends in "
                             "it); targets are layer-name suffixes such as to_q or ff.net.2")
        module.to(frozen_dtype)
        try:
            lora.inject_lora(module, settings["targets"][name], rank=settings["rank"], alpha=settings["alpha"],
                             dropout=settings["dropout"])
        except ValueError as e:  # a target that names a module LoRA cannot adapt
            raise TrainError(f"--lora_targets: {e}") from None


def trainable_parameters_line(modules):
    """How many numbers the optimizer trains in each module, printed at the start."""
    counts = []
    for name, module in modules.items():
        trained, total = lora.trainable_parameter_count(module), sum(p.numel() for p in module.parameters())
        counts.append(f"{name} {trained:,} of {total:,} ({100 * trained / total:.3g}%)")
    return "trainable parameters: " + ", ".join(counts)


def is_adapter_weight(name):
    return ".lora_down." in name or ".lora_up." in name


def checkpoint_tensors(module, args):
    """What a checkpoint keeps of a trained module: its state dict, or a LoRA run's adapters."""
    state = module.state_dict()
    return {k: v for k, v in state.items() if is_adapter_weight(k)} if args.lora_rank else state


def check_checkpoint_lora(path, args):
    """A checkpoint continues only a run with the same adapters (or none, both full fine-tunes)."""
    try:
        with safe_open(path, framework="pt") as f:
            made = json.loads((f.metadata() or {}).get("lora", "null"))
    except (OSError, SafetensorError, ValueError):
        return  # loading it says what is wrong with the file
    now = lora_settings(args)
    if made != now:
        describe = lambda s: "a full fine-tune" if s is None else f"LoRA {json.dumps(s)}"  # noqa: E731
        raise TrainError(f"{path} was made by {describe(made)}, but this run is {describe(now)}: resume with the "
                         "same --lora_rank, --lora_alpha, --lora_dropout, --lora_targets and --train_text_encoder")


def load_lora_weights(module, path):
    """A LoRA checkpoint's adapters into the module's (made by add_lora with the same settings)."""
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as e:
        raise TrainError(f"{path} cannot be read (truncated or corrupt?): {e}") from None
    expected = {k for k in module.state_dict() if is_adapter_weight(k)}
    if set(state) != expected:
        odd = sorted(set(state) ^ expected)
        raise TrainError(f"{path} does not hold this run's adapters ({len(odd)} names differ, e.g. {odd[0]})")
    try:
        module.load_state_dict(state, strict=False)
    except RuntimeError as e:
        raise TrainError(f"{path} does not fit this run's adapters: {str(e).splitlines()[-1].strip()[:300]}") from None


def base_model_name(args):
    """The model this run started from, as sample.py and diffusers find it again: a local path
    made absolute (--model toy: the toy's folder), else the Hub id."""
    source = TOY_MODEL if args.model == "toy" else Path(args.model).expanduser()
    return str(source.resolve()) if source.exists() else args.model


def single_file_name(output_dir):
    """The one-file form of the output (a model, or a LoRA in kohya's format): <folder name>.safetensors."""
    return f"{Path(output_dir).resolve().name}.safetensors"


def write_atomically(path, write):
    """write(tmp) fills .NAME.tmp beside `path` (clean_leftovers removes one an interruption
    leaves); one rename then replaces `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_lora_output(pipeline, args, info, files, output_dir):
    """A LoRA run's output: the adapters in diffusers' format (lora.LORA_FILE, what
    load_lora_weights(folder) reads) and in kohya's (<name>.safetensors, for AUTOMATIC1111 and
    ComfyUI), `files` (the loss log), then dreambooth.json with the settings and the base model.
    Each file is renamed into place when complete; dreambooth.json goes last, so a folder whose
    dreambooth.json says "lora" holds the files it names."""
    states = {name: {k: v.cpu() for k, v in lora.lora_state_dict(module).items()}
              for name, module in trained_modules(pipeline, args).items()}
    names = {"diffusers": lora.LORA_FILE, "kohya": single_file_name(output_dir)}
    for fmt, name in names.items():
        tensors, metadata = lora.to_file_tensors(states, fmt)
        write_atomically(output_dir / name, lambda tmp: save_file(tensors, tmp, metadata=metadata))  # noqa: B023
    info["lora"] = {**lora_settings(args), "files": names}
    for name, data in {**files, "dreambooth.json": json.dumps(info, indent=2).encode()}.items():
        write_atomically(output_dir / name, lambda tmp: tmp.write_bytes(data))  # noqa: B023


# ----------------------------------------------------------------------------------------------
# 8. The fine-tuned model


def save_final_model(pipeline, args, prompts, record, output_dir, log, world_size):
    """The trained modules into a fresh fp32 copy of the source, so the frozen parts are saved
    exactly as they came (not rounded through the half precision), with dreambooth.json (which
    tells sample.py the identifier), the loss log and its curve. save_pipeline swaps all of it in
    as one unit: an interruption leaves the old model or the new one, never a mix.
    --save_single_file adds OUTPUT_DIR/<name>.safetensors for A1111 / ComfyUI. A LoRA run
    writes its adapters instead of a model (save_lora_output)."""
    prior = not args.no_prior_preservation
    info = {"identifier": prompts.identifier, "class_noun": args.class_noun,
            "instance_prompt": prompts.instance_prompt, "class_prompt": prompts.class_prompt if prior else None,
            "prediction_type": pipeline.scheduler.config.prediction_type, "steps": args.max_steps,
            "base_model": base_model_name(args), "world_size": world_size, "run": record, "args": vars(args)}
    files = {"loss.jsonl": "".join(json.dumps(r) + "\n" for r in log.records).encode()}
    curve = plot_losses(log.records)
    if curve is not None:
        buffer = io.BytesIO()
        curve.save(buffer, format="PNG")
        files["loss.png"] = buffer.getvalue()
    try:
        if args.lora_rank:
            return save_lora_output(pipeline, args, info, files, output_dir)
        final = load_pipeline(args.model, prediction_type=args.prediction_type)
        final.unet = pipeline.unet.float().cpu()
        if args.train_text_encoder:
            final.text_encoder = pipeline.text_encoder.float().cpu()
        save_pipeline(final, output_dir, extra_files={"dreambooth.json": json.dumps(info, indent=2).encode(), **files})
        if args.save_single_file:
            export_single_file(final, output_dir / single_file_name(output_dir), fp16=args.single_file_dtype == "fp16")
    except OSError as e:
        raise write_failure(e, output_dir) from None


# ----------------------------------------------------------------------------------------------
# Training, phase by phase


def train(args, env=None):
    """Fine-tune args.model on the photos in args.instance_dir (the arguments: build_parser).
    Raises TrainError for bad input; returns 0. The output folder is this run's while it trains
    (its lock), and leftovers of an interrupted earlier run are cleaned first."""
    env = env or Distributed(args.device)
    output_dir = prepare_output_dir(args, env)
    with RunLock(output_dir) if env.main else contextlib.nullcontext():
        if env.main:
            clean_leftovers(output_dir, args)
        return fine_tune(args, env, output_dir)


def fine_tune(args, env, output_dir):
    """The phases of DreamBooth, in the order of dreambooth.py, then the training loop."""
    say = (lambda *a: print(*a, file=sys.stderr)) if env.main else (lambda *a: None)
    autocast = lambda: sample.autocast(env.device, args.mixed_precision)  # noqa: E731
    instance_paths = list_instance_images(args)
    checkpoint = find_checkpoint(args, output_dir / "checkpoints") if args.resume else None
    torch.manual_seed(args.seed)
    pipeline = load_for_training(args, env.device)                               # 1. model
    prompts = choose_prompts(args, pipeline.tokenizer, env)                      # 2. [V], prompts
    record = start_run(output_dir, run_record(args, prompts, instance_paths), checkpoint, args, env)
    say(f"identifier: {prompts.identifier!r}\ninstance prompt: {prompts.instance_prompt!r}")
    contexts = {} if args.train_text_encoder else encode_contexts(pipeline, prompts, autocast)
    class_paths = make_class_images(pipeline, args, prompts, output_dir, env)     # 3. class images
    data = TrainingData(pipeline, instance_paths, class_paths, args, env, autocast)  # 4. data
    trainer = make_trainer(pipeline, prompts, contexts, args, env, autocast)     # 5. the step
    say(batch_line(args, env, bool(class_paths)))
    start, records = load_checkpoint(checkpoint, pipeline, trainer, data, record, args, env) if checkpoint else (0, [])
    if checkpoint:
        say(f"resumed from {checkpoint} at step {start}")
    log = LossLog(output_dir / RUN_DIR / "loss.jsonl", records, writer=env.main)
    progress = tqdm(range(start, args.max_steps), initial=start, total=args.max_steps, desc="training",
                    disable=not env.main)
    nonfinite_run = 0
    for step in progress:
        set_learning_rate(trainer, step, args.warmup_steps)
        torch.manual_seed(args.seed + step)  # dropout draws from torch's global generator: per step, so resumable
        result = train_step(trainer, [data.next_batch() for _ in range(args.grad_accum)])
        nonfinite_run = 0 if result.finite else nonfinite_run + 1
        if nonfinite_run >= args.max_nonfinite_steps:
            raise TrainError(f"the loss was not finite for {nonfinite_run} steps in a row (up to step {step + 1}); "
                             "training stops without saving over earlier results (checkpoints are intact). "
                             "Try a lower --lr, or --mixed_precision bf16 or no.", exit_code=1)
        log.append(step + 1, result, trainer.optimizer.param_groups[0]["lr"])
        if env.main:
            progress.set_postfix(log.summary())
            save_along_the_way(step + 1, pipeline, trainer, data, log, record, args, env, prompts, output_dir)
    if env.main:                                                                 # 8. the model
        save_final_model(pipeline, args, prompts, record, output_dir, log, env.world_size)
        what = "the LoRA adapters" if args.lora_rank else "the fine-tuned model"
        say(f"saved {what} to {output_dir} (identifier {prompts.identifier!r}); try:\n"
            f"  python sample.py --model {output_dir} --prompt "
            f"\"{prompts.instance_prompt.replace(prompts.identifier, '[V]')}\" --out_dir {output_dir / 'samples'}")
    env.close()
    return 0


def start_run(output_dir, record, checkpoint, args, env):
    """A fresh run claims the folder (refused if it holds another run's outputs); a resumed one
    is checked against its checkpoint when that is loaded. The record goes to run/run.json."""
    if env.main:
        if checkpoint is None:
            check_folder_is_ours(output_dir, record, args)
        write_run_record(output_dir, record)
    env.barrier()
    return record


def save_along_the_way(done, pipeline, trainer, data, log, record, args, env, prompts, output_dir):
    """After step `done`: a checkpoint (always at the last step, so a finished run can be
    extended) and a validation grid, when their intervals say so."""
    if args.checkpoint_every and (done % args.checkpoint_every == 0 or done == args.max_steps):
        save_checkpoint(output_dir / "checkpoints" / f"step-{done:06d}", done, pipeline, trainer, data, log, record,
                        args, env)
    if args.validation_every and (done % args.validation_every == 0 or done == args.max_steps):
        validate(pipeline, args, prompts.identifier, output_dir / "validation" / f"step-{done:06d}.png", env.device)


def list_instance_images(args):
    try:
        return dreambooth.list_images(args.instance_dir)
    except FileNotFoundError as e:
        raise TrainError(str(e)) from None


def batch_line(args, env, prior):
    """What one optimizer step holds, printed at the start."""
    return (f"batch: {args.batch_size} per process x {env.world_size} processes x {args.grad_accum} accumulation "
            f"= {env.world_size * args.batch_size * args.grad_accum} instance images per optimizer step"
            + (" (+ as many class images)" if prior else "")
            + f"; lr {args.lr:g} is used as given (not scaled with the batch)")


# ----------------------------------------------------------------------------------------------
# The output folder: one run per folder. A run's record (run_record) says what makes it this run;
# a new run into a folder that holds another run's outputs is refused, a resume must continue the
# same run, and a lock keeps a second process out while one trains.

RUN_DIR = "run"  # OUTPUT_DIR/run/: this run's record (run.json) and live loss log
OUTPUTS = ("model_index.json", "unet", "text_encoder", "vae", "tokenizer", "scheduler", "dreambooth.json",
           "loss.jsonl", "loss.png", "validation", "checkpoints", RUN_DIR)


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_record(args, prompts, instance_paths):
    """The settings that change a run's result. A checkpoint holds them; resuming with other
    values would put two runs into one model. (--max_steps, checkpoint and validation settings
    may change: they do not change the steps already taken.)"""
    prior = not args.no_prior_preservation
    model = str(Path(args.model).resolve()) if args.model != "toy" and Path(args.model).exists() else args.model
    return {"model": model, "instance_images": {p.name: file_digest(p) for p in instance_paths},
            "identifier": prompts.identifier, "instance_prompt": prompts.instance_prompt,
            "class_prompt": prompts.class_prompt if prior else None, "resolution": args.resolution,
            "prior_loss_weight": args.prior_loss_weight if prior else None,
            "num_class_images": args.num_class_images if prior else None,
            "train_text_encoder": args.train_text_encoder, "center_crop": args.center_crop, "flip": args.flip}


def check_same_run(recorded, record, where):
    """Refuse to continue `where` (a checkpoint) unless it was made by a run with this record."""
    if recorded is None:
        print(f"warning: {where} holds no run record (an older checkpoint); it is not checked", file=sys.stderr)
        return
    differ = [k for k in record if recorded.get(k) != record[k]]
    if differ:
        details = "; ".join(f"{k}: {recorded.get(k)!r} there, {record[k]!r} now" for k in differ)
        raise TrainError(f"{where} belongs to another run ({details}). Resume with that run's settings, or "
                         "start this one in a new --output_dir (or with --overwrite, which removes the old run).")


def check_folder_is_ours(output_dir, record, args):
    """A fresh run (no --resume) starts only in a folder without another run's outputs; with
    --overwrite, those outputs and checkpoints are removed first."""
    names = (*OUTPUTS, lora.LORA_FILE, f"{output_dir.name}.safetensors")  # + the LoRA and single files
    found = [name for name in names if (output_dir / name).exists()]
    previous = read_json(output_dir / RUN_DIR / "run.json")
    if found == [RUN_DIR] and previous == record and not list((output_dir / "checkpoints").glob("step-*")):
        found = []  # this same run, stopped before its first checkpoint: start it again
    if not found:
        return
    if not args.overwrite:
        raise TrainError(f"{output_dir} holds another run's outputs ({', '.join(found)}). Continue that run with "
                         "--resume latest (a finished one too: --resume latest --max_steps N extends it), choose a "
                         "new --output_dir, or pass --overwrite to remove its outputs and checkpoints first.")
    for name in found:
        path = output_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    print(f"--overwrite: removed the earlier run's {', '.join(found)} from {output_dir}", file=sys.stderr)


def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_run_record(output_dir, record):
    path = output_dir / RUN_DIR / "run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".run.json.tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(path)


def clean_leftovers(output_dir, args):
    """Remove what an interrupted earlier run in this folder left half-written: checkpoints being
    written, a final save that never got to swap in, temporary files. A final save that was
    interrupted while swapping in is completed (the new model was whole by then)."""
    if finish_interrupted_save(output_dir):
        print(f"completed the interrupted final save in {output_dir}", file=sys.stderr)
    class_dir = Path(args.class_dir) if args.class_dir else output_dir / "class_images"
    for pattern, folder in ((".step-*", output_dir / "checkpoints"), (".saving-*", output_dir),
                            (".*.tmp", output_dir), (".*.tmp", output_dir / RUN_DIR), (".*.tmp", class_dir)):
        for path in folder.glob(pattern) if folder.is_dir() else ():
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)


class RunLock:
    """OUTPUT_DIR/.lock, created exclusively by the training run that owns the folder and removed
    when it ends. It holds the owner's PID and host; a lock whose process is gone (same host) is
    stale and taken over."""

    def __init__(self, output_dir):
        self.path, self.pid = Path(output_dir) / ".lock", None

    def __enter__(self):
        self.acquire()
        atexit.register(self.release)  # also when the process ends without unwinding (SystemExit)
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                self.take_over_if_stale()
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(),
                           "started": datetime.datetime.now().isoformat(timespec="seconds")}, f)
            self.pid = os.getpid()
            return
        raise TrainError(f"cannot take the lock {self.path}")

    def take_over_if_stale(self):
        owner = read_json(self.path)
        if not isinstance(owner, dict) or "pid" not in owner:
            raise TrainError(f"{self.path} is an unreadable lock: if no other training run uses "
                             f"{self.path.parent}, delete that file and run again")
        if owner.get("host") == socket.gethostname() and not process_alive(owner["pid"]):
            print(f"note: removing the stale lock of process {owner['pid']} (no longer running)", file=sys.stderr)
            self.path.unlink(missing_ok=True)
            return
        raise TrainError(f"another training run (process {owner['pid']} on {owner.get('host')}, started "
                         f"{owner.get('started')}) is using {self.path.parent}: wait for it to end, or choose "
                         f"another --output_dir. If that process is gone, delete {self.path}.")

    def release(self):
        if self.pid == os.getpid():
            self.path.unlink(missing_ok=True)
            self.pid = None


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


# ----------------------------------------------------------------------------------------------
# Several processes (torchrun)


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


# ----------------------------------------------------------------------------------------------
# Command line

# `--model toy` (toy/: the tiny Stable Diffusion pretrained by this project, 32 px) brings its own
# recipe, because the defaults below are for SD at 512 px; a flag given on the command line wins.
# 50 class images of 25 sampler steps, then 1000 training steps at a learning rate the tiny UNet
# needs: about a minute on 2 CPU cores, class images included (README, "Quick start"). fp32: at
# this size bf16 is no faster on a CPU.
TOY_RECIPE = dict(resolution=32, num_class_images=50, class_steps=25, class_guidance_scale=5.0, sample_batch_size=25,
                  max_steps=1000, lr=2e-4, mixed_precision="no", cache_latents=True, validation_steps=25)


def toy_recipe_text():
    return ", ".join(f"--{k} {v}" if not isinstance(v, bool) else f"--{k}" for k, v in TOY_RECIPE.items())


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=sample.DefaultsHelpFormatter)
    add_subject_args(p.add_argument_group("subject and prompts"))
    add_prior_args(p.add_argument_group("prior preservation"))
    add_model_args(p.add_argument_group("model and data"))
    add_optimisation_args(p.add_argument_group("optimisation"))
    add_output_args(p.add_argument_group("output"))
    return p


def add_subject_args(g):
    g.add_argument("--instance_dir", required=True, help="folder with 3-5 photos of the subject")
    g.add_argument("--class_noun", required=True, help="the subject's coarse class, e.g. dog")
    g.add_argument("--identifier", help="the [V] word (default: a rare token drawn from the vocabulary with --seed)")
    g.add_argument("--rare_ranks", type=int, nargs=2, metavar=("LOW", "HIGH"),
                   help="BPE merge ranks to draw the identifier from (default: the last fifth of the merges)")
    g.add_argument("--instance_template", default=dreambooth.INSTANCE_TEMPLATE, help="the subject's prompt")
    g.add_argument("--class_template", default=dreambooth.CLASS_TEMPLATE, help="the class images' prompt")


def add_prior_args(g):
    g.add_argument("--no_prior_preservation", action="store_true", help="train on the subject only")
    g.add_argument("--prior_loss_weight", type=float, default=1.0, help="lambda of Eq. 2")
    g.add_argument("--class_dir", help="class image cache (default: OUTPUT_DIR/class_images)")
    g.add_argument("--num_class_images", type=int, default=200, help="class images to generate (or reuse)")
    g.add_argument("--class_steps", type=int, default=50, help="sampler steps per class image")
    g.add_argument("--class_scheduler", choices=sorted(sample.SCHEDULERS), default="ddim",
                   help="sampler for the class images")
    g.add_argument("--class_guidance_scale", type=float, default=7.5, help="classifier-free guidance of the class images")
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size for class and validation images")


def add_model_args(g):
    g.add_argument("--model", default=DEFAULT_MODEL,
                   help="Hub id, diffusers folder, .safetensors/.ckpt file, or 'toy': the tiny offline model in "
                        f"toy/, which also brings its recipe ({toy_recipe_text()}; flags you give win)")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"],
                   help="what the model's UNet predicts (default: what the model says; an SD 2.x single file, "
                        "which does not say, is judged by its name)")
    g.add_argument("--resolution", type=int, default=512, help="training image size in pixels (multiple of 8)")
    crop = g.add_mutually_exclusive_group()
    crop.add_argument("--center_crop", dest="center_crop", action="store_true", default=True,
                      help="crop the centre square of each image")
    crop.add_argument("--random_crop", dest="center_crop", action="store_false",
                      help="crop a random square each step (default: --center_crop)")
    g.add_argument("--flip", action="store_true", help="random horizontal flips")


def add_optimisation_args(g):
    g.add_argument("--train_text_encoder", action="store_true", help="fine-tune the text encoder too")
    g.add_argument("--lr", type=float, default=5e-6, help="learning rate (not scaled with the batch)")
    g.add_argument("--text_encoder_lr", type=float, help="the text encoder's learning rate (default: --lr)")
    g.add_argument("--warmup_steps", type=int, default=0, help="linear learning-rate warm-up steps")
    g.add_argument("--max_steps", type=int, default=800, help="optimizer steps")
    g.add_argument("--batch_size", type=int, default=1, help="instance images per step and process (plus as many class images)")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches accumulated per optimizer step")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="stop after this many steps in a row with a non-finite loss (each is skipped)")
    g.add_argument("--adam_weight_decay", type=float, default=1e-2, help="AdamW weight decay")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--mixed_precision", choices=sample.MIXED_PRECISION, default="auto",
                   help="auto: bf16 where supported, else fp16 with a GradScaler")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--cache_latents", action="store_true",
                   help="encode the images once (both flips); the VAE then leaves the accelerator")
    g.add_argument("--optimizer_state", choices=sorted(optim.STATE_DTYPES), default="fp32",
                   help="precision AdamW stores its moments in; bf16 halves the optimizer's memory (optim.py)")
    g.add_argument("--low_memory", action="store_true",
                   help="the 16 GB mode: --cache_latents --gradient_checkpointing --optimizer_state bf16")
    g.add_argument("--lora_rank", type=int, default=0,
                   help="DreamBooth-LoRA: train rank-R adapters (lora.py) instead of the weights, usually with a "
                        "higher --lr (1e-4); 0: full fine-tuning")
    g.add_argument("--lora_alpha", type=float,
                   help="LoRA's alpha: the update is (alpha / rank) B A (default: the rank, a factor of 1)")
    g.add_argument("--lora_dropout", type=float, default=0.0, help="dropout on the adapters' input while training")
    g.add_argument("--lora_targets",
                   help="UNet layers that get adapters: 'attention' (to_q, to_k, to_v, to_out.0 of every "
                        "attention), 'attention+ff' (also the feed-forward ff.net.0.proj, ff.net.2), or "
                        "comma-separated layer-name suffixes; with --train_text_encoder the text encoder's "
                        "q/k/v/out_proj get adapters too (default: attention)")
    g.add_argument("--seed", type=int, default=0, help="seeds the identifier, data order, noise and class images")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device")


def add_output_args(g):
    g.add_argument("--output_dir", default="dreambooth-output", help="the model folder this run writes")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output_dir that holds another run: its outputs and checkpoints are removed")
    g.add_argument("--checkpoint_every", type=int, default=0, help="steps between resumable checkpoints (0: none)")
    g.add_argument("--keep_checkpoints", type=int, default=1, help="how many recent checkpoints to keep")
    g.add_argument("--resume", help="a checkpoint folder, or 'latest' (default: start afresh)")
    g.add_argument("--validation_prompt", action="append", default=[], help="repeatable; [V] becomes the identifier")
    g.add_argument("--validation_every", type=int, default=0, help="steps between validation grids (0: none)")
    g.add_argument("--validation_steps", type=int, default=25, help="sampler steps of the validation images")
    g.add_argument("--save_single_file", action="store_true",
                   help="also write OUTPUT_DIR/<its name>.safetensors, one original-format file for AUTOMATIC1111 "
                        "and ComfyUI (a LoRA run always writes its kohya-format file there)")
    g.add_argument("--single_file_dtype", choices=["fp16", "fp32"], default="fp16",
                   help="precision of --save_single_file's weights")


def parse_args(parser, argv=None):
    args = parser.parse_args(argv)
    if args.model == "toy":
        parser.set_defaults(**TOY_RECIPE)
        args = parser.parse_args(argv)
    return args


def check_args(args):
    """Bad input stops here, before any work, with a message that says what to change."""
    if args.low_memory:  # a shorthand, expanded before the checks that apply to its parts
        args.cache_latents = args.gradient_checkpointing = True
        args.optimizer_state = "bf16"
    if args.resolution <= 0 or args.resolution % 8:
        raise TrainError(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    for name in ("max_steps", "batch_size", "grad_accum", "num_class_images", "class_steps", "sample_batch_size",
                 "max_nonfinite_steps"):
        if getattr(args, name) < 1:
            raise TrainError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.lr <= 0 or args.prior_loss_weight < 0:
        raise TrainError("--lr must be positive and --prior_loss_weight non-negative")
    if args.cache_latents and not args.center_crop:
        raise TrainError(f"--{'low_memory caches latents, which' if args.low_memory else 'cache_latents'} encodes "
                         "each image once, so it needs --center_crop (not --random_crop)")
    if args.rare_ranks and not 0 <= args.rare_ranks[0] <= args.rare_ranks[1]:
        raise TrainError(f"--rare_ranks LOW HIGH needs 0 <= LOW <= HIGH, got {args.rare_ranks}")
    if args.validation_every and not args.validation_prompt:
        raise TrainError("--validation_every needs at least one --validation_prompt")
    if not args.class_noun.strip():
        raise TrainError("--class_noun is empty: name the subject's coarse class, e.g. dog")
    if args.identifier and args.identifier.lower() in args.class_noun.lower().split():
        raise TrainError(f"--class_noun {args.class_noun!r} contains the identifier {args.identifier!r}: "
                         "the class noun names the class, the identifier this one subject")
    if args.resume and args.resume != "latest" and not Path(args.resume, "state.pt").is_file():
        raise TrainError(f"--resume {args.resume}: no checkpoint there (expected {Path(args.resume, 'state.pt')})")
    if args.resume and args.overwrite:
        raise TrainError("--resume continues the run in --output_dir and --overwrite removes it: choose one")
    if args.class_guidance_scale < 0:
        raise TrainError(f"--class_guidance_scale must be at least 0 (1: no guidance), got {args.class_guidance_scale}")
    check_templates(args)
    check_lora_args(args)


def check_templates(args):
    """Templates may name {identifier} and {class_noun} only; the instance prompt needs the identifier."""
    for flag, template in (("--instance_template", args.instance_template), ("--class_template", args.class_template)):
        try:
            names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
        except ValueError as e:
            raise TrainError(f"{flag} {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
        unknown = names - {"identifier", "class_noun"}
        if unknown:
            raise TrainError(f"{flag} {template!r} has unknown placeholder(s) {', '.join(sorted(unknown))}: "
                             "use {identifier} and {class_noun}")
        if flag == "--instance_template" and "identifier" not in names:
            raise TrainError(f"--instance_template {template!r} has no {{identifier}}: without it the subject's "
                             "prompt would be the class prompt, and nothing would bind the subject to [V]")


def interrupted_advice(output_dir):
    """What a Ctrl-C leaves: checkpoints are written to a temporary name and renamed, so the last
    one is complete."""
    found = sorted((output_dir / "checkpoints").glob("step-*"))
    if found:
        return f"the last checkpoint, {found[-1]}, is intact; continue with --resume latest"
    return ("no checkpoint was written, so nothing can be resumed; run again from the start, with "
            "--checkpoint_every N to write resumable checkpoints every N steps")


def main(argv=None):
    parser = build_parser()
    args = parse_args(parser, argv)
    env = None
    try:
        try:
            check_args(args)
            env = Distributed(args.device)
            return train(args, env)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise TrainError(f"the disk is full (writing {e.filename or args.output_dir}): free some space, then "
                             "run again (with --resume latest if a checkpoint was written)", exit_code=1) from None
    except TrainError as e:
        name_failed_rank(env)
        parser.exit(e.exit_code, f"error: {e}\n")
    except KeyboardInterrupt:
        print(f"\ninterrupted: {interrupted_advice(Path(args.output_dir))}", file=sys.stderr)
        return 130
    except BaseException:
        name_failed_rank(env)
        raise
    finally:
        if env is not None and env.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def name_failed_rank(env):
    """With several processes, say which one failed; torchrun then stops the others."""
    if env is not None and env.world_size > 1:
        print(f"error: rank {env.rank} of {env.world_size} failed", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
