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
the UNet's weights, and the folder holds the adapters' files instead of a full model. SDXL trains
the same way (README, "DreamBooth-LoRA on SDXL"): LoRA on its UNet, conditioned on both text
encoders and each image's size numbers; a full fine-tune of its UNet only with --low_memory.

What practitioners add, each off by default (README, "Training"): a caption per photo (photo.txt),
several subjects in one run (--concepts), min-SNR loss weighting (--snr_gamma), offset noise
(--offset_noise), and the upload of the result to the Hugging Face Hub (--push_to_hub).

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
import hashlib
import io
import json
import os
import random
import re
import shutil
import socket
import string
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import huggingface_hub
import torch
import torch.distributed as dist
from huggingface_hub import errors as hub_errors
from PIL import Image, ImageDraw
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

import dreambooth
import lora
import optim
import sample
from load_weights import (DEFAULT_MODEL, PIPELINE_ENTRIES, TOY_MODEL, LoadError, disk_full_message,
                          export_single_file, finish_interrupted_save, is_disk_full, load_pickle, load_pipeline,
                          save_pipeline, write_atomically)


class TrainError(Exception):
    """A mistake in the user's input or environment. `main` prints the message and exits with
    `exit_code`; from Python, `train(args)` raises it."""

    def __init__(self, message, exit_code=2):
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------------------------
# 1-2. Prepare: the output folder, the model in training precision, the identifier and prompts
#
# A run trains one subject (--instance_dir, --class_noun) or several (--concepts FILE.json, as in
# ShivamShrirao's diffusers fork): each subject, a "concept", has its own identifier, prompts,
# class images and prior term, and the batches take turns between them (TrainingData).


@dataclass
class Concept:
    """One subject of the run, as the user gave it: --instance_dir and --class_noun, or one entry
    of --concepts (read_concepts)."""
    name: str                 # how prompts name it, [V:name]; by default its photos' folder name
    instance_dir: Path        # its photos (photo.txt beside photo.jpg: that photo's caption)
    class_noun: str
    identifier: str | None    # the user's [V], or None: a rare token is drawn
    instance_template: str
    class_dir: Path | None    # None: under OUTPUT_DIR (class_folder)
    num_class_images: int

    def class_folder(self, output_dir, several):
        """Where its class images are cached: class_dir, else OUTPUT_DIR/class_images (one
        concept) or OUTPUT_DIR/class_images/<name> (several)."""
        default = Path(output_dir) / "class_images"
        return self.class_dir or (default / self.name if several else default)


@dataclass
class Prompts:
    """The prompts of one concept."""
    identifier: str          # the rare token [V] (section 3.2)
    instance_prompt: str     # "a photo of [V] dog"
    class_prompt: str        # "a photo of dog"
    image_prompts: tuple = ()  # each photo's instance prompt (its caption's, else instance_prompt); () without captions
    captions: dict = field(default_factory=dict)  # photo file name -> its caption's prompt, for the captioned photos

    def image_prompt(self, k):
        """The instance prompt of the concept's photo k."""
        return self.image_prompts[k] if self.image_prompts else self.instance_prompt

    def training_prompts(self):
        """The distinct prompts training conditions on: the photos' instance prompts, the class prompt."""
        return list(dict.fromkeys([*(self.image_prompts or [self.instance_prompt]), self.class_prompt]))


def prepare_output_dir(args, env, concepts):
    """The output folder (and the class image folders given), created and probed for writing
    before any work."""
    output_dir = Path(args.output_dir)
    probe_writable("--output_dir", output_dir)
    for concept in concepts:
        if concept.class_dir:
            probe_writable("--class_dir" if not args.concepts else f"class_dir of concept {concept.name!r}",
                           concept.class_dir)
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
        check_sdxl_training(pipeline, args)
    frozen_dtype = sample.autocast_dtype(torch.device(device), args.mixed_precision) or torch.float32
    # SDXL's VAE overflows in fp16 (force_upcast): it stays fp32 and encodes outside autocast
    pipeline.vae.to(torch.float32 if sample.decodes_in_fp32(pipeline) else frozen_dtype)
    if not args.train_text_encoder:
        for encoder in text_encoders(pipeline):
            encoder.to(frozen_dtype)
    return pipeline


def text_encoders(pipeline):
    """The pipeline's text encoders: one, or SDXL's two."""
    return [e for e in (pipeline.text_encoder, pipeline.text_encoder_2) if e is not None]


SDXL_UNET_PARAMETERS = 2.567e9  # SDXL base's UNet (2,567,463,684 parameters); fp32 weights, gradients, AdamW's 2 moments: 16 bytes each


def check_sdxl_training(pipeline, args):
    """What this project trains of SDXL: LoRA on the UNet (the common recipe), or the whole UNet
    with --low_memory. Its text encoders stay frozen."""
    if args.train_text_encoder:
        raise TrainError(f"{args.model} is an SDXL model: training its text encoders (--train_text_encoder) is not "
                         "supported; leave the flag out (the UNet trains, with --lora_rank R or --low_memory)")
    if not args.lora_rank and not args.low_memory:
        n = sum(p.numel() for p in pipeline.unet.parameters())
        raise TrainError(
            f"{args.model} is an SDXL model: fine-tuning its whole UNet ({n / 1e9:.3g} B parameters here; SDXL "
            f"base's has ~{SDXL_UNET_PARAMETERS / 1e9:.1f} B) keeps fp32 weights, gradients and AdamW's two moments, "
            f"16 bytes a parameter: {16 * n / 1e9:.3g} GB here, ~{16 * SDXL_UNET_PARAMETERS / 1e9:.0f} GB for SDXL "
            "base, before activations. Train LoRA adapters instead (--lora_rank 4), or add --low_memory "
            "(bf16 optimizer state, gradient checkpointing, cached latents) on an accelerator with more memory.")


def choose_prompts(args, tokenizer, env, concepts=None, instance_paths=None, tokenizer_2=None):
    """Each concept's identifier and prompts, its photos' captions included: one Prompts per
    concept. (concepts and their photos default to those args names.) SDXL: the identifiers
    are drawn from the first tokenizer and checked against the second (tokenizer_2)."""
    concepts = concepts or read_concepts(args)
    instance_paths = instance_paths or list_instance_images(concepts)
    identifiers = choose_identifiers(args, tokenizer, env, concepts)
    if tokenizer_2 is not None:
        check_second_tokenizer(tokenizer, tokenizer_2, identifiers)
    return [concept_prompts(args, concept, identifier, photos, env)
            for concept, identifier, photos in zip(concepts, identifiers, instance_paths)]


def choose_identifiers(args, tokenizer, env, concepts):
    """The user's identifiers, checked, and rare tokens drawn with --seed for the others, in the
    concepts' order. Each draw excludes the words the other concepts use (their identifiers and
    class nouns), so no two concepts share [V]; the first draw is a one-subject run's."""
    taken = [c.identifier for c in concepts if c.identifier] + [c.class_noun for c in concepts]
    identifiers = []
    try:
        for concept in concepts:
            if concept.identifier:
                dreambooth.check_identifier(tokenizer, concept.identifier, concept.class_noun,
                                            concept.instance_template)
                if env.main:
                    dreambooth.warn_if_common(tokenizer, concept.identifier)
                identifiers.append(concept.identifier)
            else:
                identifiers.append(dreambooth.choose_identifier(tokenizer, concept.class_noun, seed=args.seed,
                                                                merge_ranks=args.rare_ranks,
                                                                exclude=taken + identifiers))
    except ValueError as e:
        raise TrainError(str(e)) from None
    return identifiers


def check_second_tokenizer(tokenizer, tokenizer_2, identifiers):
    """SDXL's second text encoder must see each identifier as the same tokens as the first
    (its tokenizer shares the vocabulary, padded differently; a custom folder might not)."""
    for identifier in identifiers:
        if tokenizer_2.encode(identifier)[1:-1] != tokenizer.encode(identifier)[1:-1]:
            raise TrainError(f"the identifier {identifier!r} is split into other tokens by tokenizer_2 than by "
                             "tokenizer: give --identifier a word both tokenizers keep whole")


def concept_prompts(args, concept, identifier, photos, env):
    """A concept's prompts (section 3.2), and its photos' captions (dreambooth.read_caption)."""
    instance_prompt, class_prompt = dreambooth.make_prompts(identifier, concept.class_noun,
                                                             concept.instance_template, args.class_template)
    try:
        captions = {path.name: caption for path in photos if (caption := dreambooth.read_caption(path))}
    except ValueError as e:
        raise TrainError(str(e)) from None
    without_slot = [name for name, caption in captions.items() if dreambooth.IDENTIFIER_SLOT not in caption]
    if without_slot and env.main:
        print(f"warning: the captions of {', '.join(without_slot)} have no {dreambooth.IDENTIFIER_SLOT}: those "
              "photos do not teach the identifier", file=sys.stderr)
    captions = {name: dreambooth.caption_prompt(caption, identifier) for name, caption in captions.items()}
    image_prompts = tuple(captions.get(path.name, instance_prompt) for path in photos) if captions else ()
    return Prompts(identifier, instance_prompt, class_prompt, image_prompts, captions)


# ----------------------------------------------------------------------------------------------
# 3. Autogenous class images, from the frozen model before any training


def make_class_images(pipeline, args, prompts, output_dir, env, concepts=None):
    """Each concept's class images' paths (generating the shortfall), one list per concept; empty
    lists without prior preservation. (concepts default to those args names.)"""
    concepts = concepts or read_concepts(args)
    if args.no_prior_preservation:
        return [[] for _ in concepts]
    several = len(concepts) > 1
    return [dreambooth.ensure_class_images(
        pipeline, concept.class_folder(output_dir, several), p.class_prompt, concept.num_class_images,
        seed=args.seed, batch_size=args.sample_batch_size, steps=args.class_steps,
        scheduler=args.class_scheduler, guidance_scale=args.class_guidance_scale,
        mixed_precision=args.mixed_precision, height=args.resolution, width=args.resolution,
        rank=env.rank, world_size=env.world_size, barrier=env.barrier, progress=env.main)
        for concept, p in zip(concepts, prompts)]


# ----------------------------------------------------------------------------------------------
# 4. The data: latents of the subject and class images, and the noise and timesteps of Eq. 2


@dataclass
class Batch:
    """One micro-batch of this process: n instance latents (and n class latents), and the noise
    and timesteps of Eq. 2 for them, instance rows first. Its prompts: those of concept `concept`,
    each instance row under the prompt of the photo it shows (Prompts.image_prompt)."""
    instance_latents: torch.Tensor           # [n, C, h, w] scaled VAE latents
    class_latents: torch.Tensor | None       # [n, C, h, w], or None without prior preservation
    noise: torch.Tensor                      # [n or 2n, C, h, w]
    timesteps: torch.Tensor                  # [n or 2n]
    concept: int = 0                         # which of the run's concepts the batch trains
    photos: list = field(default_factory=list)  # n indices: the concept's photo of each instance row
    time_ids: torch.Tensor | None = None     # SDXL: [n or 2n, 6] each row's image sizes (load_image_and_sizes)


@dataclass
class CachedPosteriors:
    """Every image's VAE posterior, encoded once as it is and mirrored (`--cache_latents`)."""
    plain: dreambooth.LatentDistribution     # [N, C, h, w]
    mirrored: dreambooth.LatentDistribution  # [N, C, h, w]
    sizes: torch.Tensor                      # [N, 2, 6] SDXL's size numbers, as is and mirrored

    @classmethod
    def encode(cls, vae, paths, resolution, device, dtype):
        loaded = [dreambooth.load_image_and_sizes(p, resolution) for p in paths]
        images = torch.stack([image for image, _ in loaded]).to(device, dtype)
        return cls(*(dreambooth.LatentDistribution.encode(vae, x) for x in (images, images.flip(-1))),
                   torch.stack([sizes for _, sizes in loaded]))

    def pick(self, indices, mirror):
        """The posteriors of images `indices` (mod N), each mirrored where `mirror` says."""
        chosen = [(self.mirrored if m else self.plain, k % self.plain.mean.shape[0]) for k, m in zip(indices, mirror)]
        return dreambooth.LatentDistribution(torch.stack([d.mean[k] for d, k in chosen]),
                                             torch.stack([d.std[k] for d, k in chosen]))

    def pick_sizes(self, indices, mirror):
        """The size numbers [n, 6] of the images `pick` returns."""
        return torch.stack([self.sizes[k % self.sizes.shape[0], int(m)] for k, m in zip(indices, mirror)])


class TrainingData:
    """The training batches. It owns the two random sources of training, and draws every random
    number for the GLOBAL batch (all processes together), identically on every process, keeping
    this process's slice: N processes x batch B train exactly as 1 process x batch N*B, and one
    checkpoint (written by rank 0) resumes every process.

    Several concepts take turns, round robin: batch i holds concept i mod K only. Each concept
    then trains for the same number of steps whatever its number of photos (drawing among all
    photos would favour the concept with the most), each batch is Eq. 2 for one concept (its
    photos under its prompts, its own class images), and the loss log can tell them apart. With
    --grad_accum K, every optimizer step sees each concept once."""

    def __init__(self, pipeline, instance_paths, class_paths, args, env, autocast):
        """instance_paths, class_paths: each concept's photos and class images, one list per
        concept (a one-concept run may give its two lists of paths as they are)."""
        if instance_paths and not isinstance(instance_paths[0], (list, tuple)):
            instance_paths, class_paths = [instance_paths], [class_paths]
        self.pipeline, self.args, self.autocast = pipeline, args, autocast
        self.images = [dreambooth.DreamBoothData(photos, klass, args.resolution, center_crop=args.center_crop,
                                                 flip=args.flip) for photos, klass in zip(instance_paths, class_paths)]
        self.prior = bool(class_paths[0])
        self.batches_drawn = 0  # the round robin's position
        self.global_batch = env.world_size * args.batch_size
        self.mine = slice(env.rank * args.batch_size, (env.rank + 1) * args.batch_size)  # this process's items
        self.rng = random.Random(args.seed)                        # data order, crops, flips
        self.generator = torch.Generator().manual_seed(args.seed)  # noise, timesteps, latent samples
        self.device = env.device
        self.dtype = next(pipeline.vae.parameters()).dtype
        self.sdxl = pipeline.text_encoder_2 is not None  # the UNet also takes each image's sizes
        # SDXL's VAE encodes in fp32 (load_for_training), outside autocast
        fp32 = lambda: torch.autocast(env.device.type, enabled=False)  # noqa: E731
        self.vae_autocast = fp32 if sample.decodes_in_fp32(pipeline) else autocast
        self.cache = None  # per concept: (instance, class) CachedPosteriors
        if args.cache_latents:
            self.cache = self.encode_all()

    @torch.no_grad()
    def encode_all(self):
        """Encode every image once (both mirror images); the VAE and a frozen text encoder then
        leave the accelerator until validation needs them."""
        with self.vae_autocast():
            encode = lambda paths: CachedPosteriors.encode(  # noqa: E731
                self.pipeline.vae, paths, self.args.resolution, self.device, self.dtype)
            cache = [(encode(images.instance_paths), encode(images.class_paths) if self.prior else None)
                     for images in self.images]
        self.pipeline.vae.to("cpu")
        if not self.args.train_text_encoder:
            for encoder in text_encoders(self.pipeline):
                encoder.to("cpu")
        return cache

    def posteriors(self, concept, indices, item_rngs):
        """LatentDistribution of this process's instance images, and of its class images (or
        None), and SDXL's size numbers of every row, [n or 2n, 6] (None for SD 1.x/2.x)."""
        if self.cache is not None:
            mirror = [self.args.flip and r.random() < 0.5 for r in item_rngs]
            instance_cache, class_cache = self.cache[concept]
            sizes = [c.pick_sizes(indices, mirror) for c in (instance_cache, class_cache) if c is not None]
            return (instance_cache.pick(indices, mirror), class_cache.pick(indices, mirror) if self.prior else None,
                    torch.cat(sizes) if self.sdxl else None)
        # ((instance, its sizes), (class, its sizes) or None) of each item
        items = [self.images[concept].sized_item(k, r) for k, r in zip(indices, item_rngs)]
        rows = [i for i, _ in items] + ([c for _, c in items] if self.prior else [])
        with torch.no_grad(), self.vae_autocast():
            encode = lambda x: dreambooth.LatentDistribution.encode(  # noqa: E731
                self.pipeline.vae, torch.stack([image for image, _ in x]).to(self.device, self.dtype))
            return (encode([i for i, _ in items]), encode([c for _, c in items]) if self.prior else None,
                    torch.stack([sizes for _, sizes in rows]) if self.sdxl else None)

    def next_batch(self):
        g, mine = self.global_batch, self.mine
        concept = self.batches_drawn % len(self.images)  # the concepts' turn (class docstring)
        self.batches_drawn += 1
        images = self.images[concept]
        indices = [self.rng.randrange(len(images)) for _ in range(g)]
        item_rngs = [random.Random(self.rng.getrandbits(64)) for _ in range(g)]
        instance, klass, time_ids = self.posteriors(concept, indices[mine], item_rngs[mine])
        # row 0: the instance images, row 1: the class images; (2, g, C, h, w) -> (2, n, C, h, w)
        shape = (2, g, *instance.mean.shape[1:])
        latent_noise = torch.randn(shape, generator=self.generator)[:, mine]  # samples of the posteriors
        noise = torch.randn(shape, generator=self.generator)[:, mine]         # e of Eq. 2
        timesteps = torch.randint(0, self.pipeline.scheduler.config.num_train_timesteps, (2, g),
                                  generator=self.generator)[:, mine]          # (2, n)
        if self.args.offset_noise:  # 0: nothing drawn, so the run is the one without the flag
            noise = noise + self.args.offset_noise * self.offsets(shape)[:, mine]
        scaling_factor = self.pipeline.vae.config.scaling_factor
        instance_latents = instance.sample(latent_noise[0].to(self.device), scaling_factor).float()
        photos = [k % len(images.instance_paths) for k in indices[mine]]  # as DreamBoothData.item pairs them
        if not self.prior:
            return Batch(instance_latents, None, noise[0], timesteps[0], concept, photos, time_ids)
        class_latents = klass.sample(latent_noise[1].to(self.device), scaling_factor).float()
        # (2, n, C, h, w) -> (2n, C, h, w): instance rows then class rows, as the loss concatenates
        return Batch(instance_latents, class_latents, noise.flatten(0, 1), timesteps.flatten(), concept, photos,
                     time_ids)

    def offsets(self, shape):
        """Offset noise (Guttenberg, 2023, "Diffusion with Offset Noise"), N(0, 1) per image and
        channel, (2, g, C, 1, 1), constant over the pixels. Training noise e ~ N(0, I) barely moves
        an image's mean (its per-channel mean has std 1/sqrt(h w)), so the model never learns to
        change it, and samples keep the middle brightness of their all-noise start; a shared
        offset per channel teaches it to set the mean: very dark and very bright images."""
        return torch.randn((*shape[:3], 1, 1), generator=self.generator)

    def state_dict(self):
        return {"python_rng": self.rng.getstate(), "torch_rng": self.generator.get_state(),
                "batches_drawn": self.batches_drawn}

    def load_state_dict(self, state):
        self.rng.setstate(state["python_rng"])
        self.generator.set_state(state["torch_rng"])
        self.batches_drawn = state.get("batches_drawn", 0)  # older checkpoints: one concept, no turns


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
    prompts: list             # one Prompts per concept (Batch.concept indexes it)
    contexts: dict            # prompt -> [1, 77, D]
    prior_loss_weight: float
    max_grad_norm: float
    autocast: object          # () -> the autocast context
    world_size: int = 1
    base_lrs: list = None     # each group's learning rate after warm-up (a resumed optimizer holds the current one)
    snr_gamma: float | None = None  # min-SNR weighting of Eq. 2 (dreambooth.min_snr_weights), or None
    pooled: dict = field(default_factory=dict)  # SDXL: prompt -> its pooled text embedding [1, 1280]; else {}

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
    by_concept: torch.Tensor | None = None  # several concepts: [K, 3] sums of (instance, prior loss, batches)


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
    """The text context [1, 77, D] of every distinct prompt training uses (each concept's
    captions, instance and class prompts), each encoded once, for a frozen text encoder.
    prompts: one Prompts per concept (or the Prompts of a one-concept run)."""
    prompts = [prompts] if isinstance(prompts, Prompts) else prompts
    distinct = dict.fromkeys(p for each in prompts for p in each.training_prompts())
    with autocast():
        return {p: sample.encode_prompts(pipeline, [p]).float() for p in distinct}


@torch.no_grad()
def encode_pooled(pipeline, prompts, autocast):
    """SDXL: the pooled text embedding [1, 1280] (the second encoder's) of every distinct prompt
    training uses, beside encode_contexts' [1, 77, 2048] context; {} for SD 1.x/2.x."""
    if pipeline.text_encoder_2 is None:
        return {}
    prompts = [prompts] if isinstance(prompts, Prompts) else prompts
    distinct = dict.fromkeys(p for each in prompts for p in each.training_prompts())
    with autocast():
        return {p: sample.text_conditioning(pipeline, [p])[1].float() for p in distinct}


def make_trainer(pipeline, prompts, contexts, args, env, autocast, pooled=None):
    """Trainable modules, optimizer and loss scaler, for `train_step`. prompts: one Prompts per
    concept (or one Prompts); contexts: each prompt's text context (encode_contexts), or {} when
    the text encoder trains. With --lora_rank, only the adapters add_lora puts on the trained
    modules train; their base weights stay frozen."""
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
                   noise_schedule=pipeline.scheduler, tokenizer=pipeline.tokenizer,
                   prompts=[prompts] if isinstance(prompts, Prompts) else prompts,
                   contexts=contexts, prior_loss_weight=args.prior_loss_weight,
                   max_grad_norm=args.max_grad_norm, autocast=autocast, world_size=env.world_size,
                   snr_gamma=args.snr_gamma, pooled=pooled or {})


def text_contexts(trainer, batch):
    """The contexts of the batch's n instance prompts (each photo's own: its caption's, or the
    concept's instance prompt) and of n class prompts (or None), [n, 77, D] each: through the
    text encoder when it trains, else the cached ones."""
    prompts = trainer.prompts[batch.concept]
    instance = [prompts.image_prompt(k) for k in batch.photos]
    klass = [prompts.class_prompt] * len(instance) if batch.class_latents is not None else []
    if trainer.text_encoder is None:
        return stack_contexts(trainer.contexts, instance), stack_contexts(trainer.contexts, klass) if klass else None
    device = next(trainer.text_encoder.parameters()).device
    ids = trainer.tokenizer(instance + klass).to(device)
    return (trainer.text_encoder(ids).split(len(instance)) + (None,))[:2]


def added_conditioning(trainer, batch):
    """SDXL's added_cond of the batch's rows (instance rows, then class rows): each row's
    prompt's pooled embedding and its image's size numbers (Batch.time_ids); None for SD 1.x/2.x."""
    if batch.time_ids is None:
        return None
    prompts = trainer.prompts[batch.concept]
    rows = [prompts.image_prompt(k) for k in batch.photos]
    rows += [prompts.class_prompt] * len(rows) if batch.class_latents is not None else []
    return {"text_embeds": torch.cat([trainer.pooled[p] for p in rows]),
            "time_ids": batch.time_ids.to(batch.instance_latents.device)}


def stack_contexts(contexts, prompts):
    """The cached contexts of `prompts`, [n, 77, D]."""
    if len(set(prompts)) == 1:  # one prompt: a view of its context, no copy
        return contexts[prompts[0]].expand(len(prompts), -1, -1)
    return torch.cat([contexts[p] for p in prompts])


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
    by_concept = torch.zeros(len(trainer.prompts), 3)  # per concept: instance loss, prior loss, batches
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with contextlib.nullcontext() if last else no_sync(trainer):
            with trainer.autocast():
                instance_context, class_context = text_contexts(trainer, batch)
                loss, instance_loss, prior_loss = dreambooth.prior_preservation_loss(
                    trainer.unet, trainer.noise_schedule, batch.instance_latents, instance_context,
                    batch.class_latents, class_context, trainer.prior_loss_weight,
                    noise=batch.noise, timesteps=batch.timesteps, snr_gamma=trainer.snr_gamma,
                    added_cond=added_conditioning(trainer, batch))
            trainer.scaler.scale(loss / len(batches)).backward()
        losses = torch.stack([loss.detach().float().cpu(), instance_loss.float().cpu(), prior_loss.float().cpu()])
        totals += losses / len(batches)
        by_concept[batch.concept] += torch.cat([losses[1:], torch.ones(1)])
    several = len(trainer.prompts) > 1
    if trainer.world_size > 1:  # the mean over all processes, for the log and the finite check
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        totals /= trainer.world_size
        if several:  # sums over the processes; every process had the same concepts (global batches)
            dist.all_reduce(by_concept, op=dist.ReduceOp.SUM)
    result = apply_update(trainer, totals)
    result.by_concept = by_concept if several else None
    return result


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
    """A TrainError for a full disk, else `error`."""
    if not is_disk_full(error):
        return error
    return TrainError(disk_full_message(path, "Free some space (or lower --keep_checkpoints) and run again with "
                                              "--resume latest."), exit_code=1)


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
    records its checkpoint holds, so the log reads as if the run had never stopped. With several
    concepts (concept_names), a record also holds each trained concept's own losses, "by_concept"."""

    def __init__(self, path, records, writer, concept_names=()):
        self.path, self.writer, self.records = Path(path), writer, list(records)
        self.concept_names = list(concept_names)
        if writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, step, result, lr):
        values = {k: (v.item() if result.finite else None)
                  for k, v in zip(("loss", "instance_loss", "prior_loss"), result.losses)}
        record = {"step": step, **values, "lr": lr, "skipped": result.skipped}
        if result.by_concept is not None:  # the mean over the concept's micro-batches of this step
            record["by_concept"] = {
                name: {k: (v.item() / batches.item() if result.finite else None)
                       for k, v in zip(("instance_loss", "prior_loss"), sums)}
                for name, (*sums, batches) in zip(self.concept_names, result.by_concept) if batches}
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


def validate(pipeline, args, identifiers, path, device):
    """A grid of the validation prompts (one row each) from the current weights, sampled in
    eval mode (no dropout). identifiers: [{"name", "identifier"}] of the concepts, for [V] and
    [V:name] (sample.fill_identifiers)."""
    training = [m for m in (pipeline.unet, pipeline.text_encoder) if m.training]
    for m in training:
        m.eval()
    moved = [m for m in (pipeline.vae, *text_encoders(pipeline)) if next(m.parameters()).device != device]
    for m in moved:
        m.to(device)
    prompts = sample.fill_identifiers(args.validation_prompt, identifiers, "this run")
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


def model_info(pipeline, args, concepts, prompts, record, world_size):
    """dreambooth.json: every concept (name, identifier, class noun, prompts, captions), which
    tells sample.py and evaluate.py what [V] and [V:name] mean, with the run's settings. A
    one-concept run also keeps its identifier, class noun and prompts at the top."""
    prior = not args.no_prior_preservation
    entries = [{"name": concept.name, "identifier": p.identifier, "class_noun": concept.class_noun,
                "instance_prompt": p.instance_prompt, "class_prompt": p.class_prompt if prior else None,
                "instance_dir": str(concept.instance_dir), **({"captions": p.captions} if p.captions else {})}
               for concept, p in zip(concepts, prompts)]
    top = {k: entries[0][k] for k in ("identifier", "class_noun", "instance_prompt", "class_prompt")}
    return {**(top if len(concepts) == 1 else {}),
            "prediction_type": pipeline.scheduler.config.prediction_type, "steps": args.max_steps,
            "base_model": base_model_name(args), "world_size": world_size, "concepts": entries, "run": record,
            "args": vars(args)}


def save_final_model(pipeline, args, concepts, prompts, record, output_dir, log, world_size):
    """The trained modules into a fresh fp32 copy of the source, so the frozen parts are saved
    exactly as they came (not rounded through the half precision), with dreambooth.json
    (model_info), the loss log and its curve, and with --push_to_hub the model card README.md.
    save_pipeline swaps all of it in as one unit: an interruption leaves the old model or the new
    one, never a mix. --save_single_file adds OUTPUT_DIR/<name>.safetensors for A1111 / ComfyUI.
    A LoRA run writes its adapters instead of a model (save_lora_output)."""
    info = model_info(pipeline, args, concepts, prompts, record, world_size)
    files = {"loss.jsonl": "".join(json.dumps(r) + "\n" for r in log.records).encode()}
    if args.push_to_hub:
        files["README.md"] = model_card(info, args, output_dir, sdxl=pipeline.text_encoder_2 is not None).encode()
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
# Sharing the result: --push_to_hub REPO_ID uploads the finished output folder to the Hugging Face
# Hub with huggingface_hub (HfApi().create_repo, then upload_folder): the model (or the LoRA's
# files), dreambooth.json, the loss log, a model card (README.md) and the last validation grid.
# checkpoints/ goes only with --push_checkpoints; class_images/ and run/ stay local. The token is
# checked before any work and the repo is created at the start, so that a missing token, no
# network or a refused permission stops the run before hours of training, not after.

# no network: requests' errors are OSErrors, httpx's (huggingface_hub >= 1.0) derive from errors.HTTPError
HUB_ERRORS = (OSError, ValueError, getattr(hub_errors, "HTTPError", OSError))


def check_hub_args(args):
    """The upload's flags, and a token to upload with (huggingface_hub.get_token: HF_TOKEN or `hf auth login`)."""
    if not args.push_to_hub:
        given = [flag for flag, on in (("--hub_private", args.hub_private),
                                       ("--push_checkpoints", args.push_checkpoints)) if on]
        if given:
            raise TrainError(f"{', '.join(given)} set(s) up the upload: add --push_to_hub USER/REPO")
        return
    try:
        huggingface_hub.utils.validate_repo_id(args.push_to_hub)
    except ValueError as e:
        raise TrainError(f"--push_to_hub {args.push_to_hub!r} is not a Hub repo id ({e}); write USER/NAME") from None
    if huggingface_hub.get_token() is None:
        raise TrainError(f"--push_to_hub {args.push_to_hub}: no Hugging Face token, so the upload would fail after "
                         "training. Log in with `hf auth login` (a token with write access, from "
                         "https://huggingface.co/settings/tokens) or set HF_TOKEN, then run again.")


def create_hub_repo(args):
    """The --push_to_hub repo, created if it does not exist (nothing else is written yet)."""
    try:
        huggingface_hub.HfApi().create_repo(args.push_to_hub, private=args.hub_private or None, exist_ok=True)
    except HUB_ERRORS as e:
        raise hub_failure(e, args, "creating the repo") from None


def push_to_hub(args, output_dir):
    """Upload the finished model folder (upload_patterns); returns the repo's address."""
    try:
        huggingface_hub.HfApi().upload_folder(
            repo_id=args.push_to_hub, folder_path=output_dir, allow_patterns=upload_patterns(args, output_dir),
            ignore_patterns=[".*", "*/.*"], commit_message=f"DreamBooth: {args.max_steps} steps")
    except HUB_ERRORS as e:
        raise hub_failure(e, args, "the upload", after=(
            f" The model is saved in {output_dir}; upload it once the Hub can be reached with `hf upload "
            f"{args.push_to_hub} {output_dir} . --exclude 'checkpoints/*' --exclude 'class_images/*' --exclude "
            "'run/*'`.")) from None
    return f"https://huggingface.co/{args.push_to_hub}"


def upload_patterns(args, output_dir):
    """What is uploaded: what the final save wrote, the last validation grid, and with
    --push_checkpoints the checkpoints (never class_images/ or run/)."""
    single_file = [single_file_name(output_dir)] if args.save_single_file or args.lora_rank else []
    written = (lora.LORA_FILE,) if args.lora_rank else PIPELINE_ENTRIES
    names = (*written, *single_file, "dreambooth.json", "loss.jsonl", "loss.png", "README.md")
    patterns = [name if "." in name else f"{name}/*" for name in names]  # a folder (no dot): all it holds
    grid = last_validation_grid(output_dir)
    return patterns + ([grid] if grid else []) + (["checkpoints/*"] if args.push_checkpoints else [])


def last_validation_grid(output_dir):
    """validation/step-NNNNNN.png of the latest step, as a path in the folder, or None."""
    grids = sorted((Path(output_dir) / "validation").glob("step-*.png"))
    return f"validation/{grids[-1].name}" if grids else None


def hub_failure(error, args, doing, after=""):
    """A TrainError that says why the Hub refused or could not be reached, and what to do."""
    repo, status = args.push_to_hub, getattr(getattr(error, "response", None), "status_code", None)
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, hub_errors.HfHubHTTPError) and status in (401, 403):
        why = (f"permission denied (HTTP {status}): this token cannot write to {repo}. Use a token with write "
               "access (https://huggingface.co/settings/tokens, then `hf auth login`) and a namespace you may write "
               "to (your user name, or an organisation you belong to)")
    elif isinstance(error, hub_errors.HfHubHTTPError):
        why = f"the Hub refused (HTTP {status}): {first_line}"
    elif isinstance(error, ValueError):
        why = f"{first_line}"
    else:
        why = (f"the Hub cannot be reached ({type(error).__name__}: {first_line}); check the network (and that "
               "HF_HUB_OFFLINE is not set)")
    return TrainError(f"--push_to_hub {repo}: {doing} failed: {why}.{after}")


def model_card(info, args, output_dir, sdxl=False):
    """README.md of the uploaded model: what it is, its identifiers and how to use it (sdxl: with
    diffusers' SDXL pipeline)."""
    pipeline_class = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    concepts, base = info["concepts"], info["base_model"]
    hub_base = not Path(base).exists()  # the card's metadata names Hub models only
    base = base if hub_base else Path(base).name  # a local model: its folder's name, not the path on this machine
    example = concepts[0]["instance_prompt"]
    front = ["---", "tags:", "- dreambooth", "- text-to-image", "- stable-diffusion",
             *(["- lora"] if args.lora_rank else []), *([f"base_model: {base}"] if hub_base else []),
             *([f"instance_prompt: {json.dumps(example)}"] if len(concepts) == 1 else []), "---", ""]
    what = f"DreamBooth-LoRA adapters (rank {args.lora_rank})" if args.lora_rank else "A DreamBooth fine-tune"
    base_text = f"`{base}`" if hub_base else f"the local model `{base}`"
    prior = "with" if not args.no_prior_preservation else "without"
    lines = [f"# {args.push_to_hub}", "",
             f"{what} of {base_text} (Ruiz et al., 2023, *DreamBooth: Fine Tuning Text-to-Image Diffusion Models for "
             f"Subject-Driven Generation*): {info['steps']} steps at {args.resolution} px, {prior} prior preservation.",
             "", "| concept | identifier | class noun | instance prompt |", "| --- | --- | --- | --- |",
             *(f"| {c['name']} | `{c['identifier']}` | {c['class_noun']} | {c['instance_prompt']} |" for c in concepts),
             "", f"Write the identifier before the class noun in a prompt, e.g. \"{example}\"."]
    grid = last_validation_grid(output_dir)
    if grid:
        shown = "; ".join(sample.fill_identifiers(args.validation_prompt, concepts, "this run"))
        lines += ["", f"![validation images after {int(Path(grid).stem.split('-')[1])} steps]({grid})", "",
                  f"Rows: {shown}."]
    load = (f'pipe = {pipeline_class}.from_pretrained("{base}")\npipe.load_lora_weights("{args.push_to_hub}")'
            if args.lora_rank else f'pipe = {pipeline_class}.from_pretrained("{args.push_to_hub}")')
    lines += ["", "## Use", "", "```python", f"from diffusers import {pipeline_class}", "", load,
              f'image = pipe("{example}").images[0]', "```"]
    return "\n".join(front + lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Training, phase by phase


def train(args, env=None):
    """Fine-tune args.model on the photos in args.instance_dir (the arguments: build_parser).
    Raises TrainError for bad input; returns 0. The output folder is this run's while it trains
    (its lock), and leftovers of an interrupted earlier run are cleaned first."""
    env = env or Distributed(args.device)
    concepts = read_concepts(args)
    instance_paths = list_instance_images(concepts)  # one list per concept; before any folder is made
    output_dir = prepare_output_dir(args, env, concepts)
    with RunLock(output_dir) if env.main else contextlib.nullcontext():
        if env.main:
            clean_leftovers(output_dir, concepts)
            if args.push_to_hub:  # now: a refusal (permission, network) must not wait for the end of training
                create_hub_repo(args)
        return fine_tune(args, env, output_dir, concepts, instance_paths)


def fine_tune(args, env, output_dir, concepts, instance_paths):
    """The phases of DreamBooth, in the order of dreambooth.py, then the training loop."""
    say = (lambda *a: print(*a, file=sys.stderr)) if env.main else (lambda *a: None)
    autocast = lambda: sample.autocast(env.device, args.mixed_precision)  # noqa: E731
    checkpoint = find_checkpoint(args, output_dir / "checkpoints") if args.resume else None
    torch.manual_seed(args.seed)
    pipeline = load_for_training(args, env.device)                               # 1. model
    prompts = choose_prompts(args, pipeline.tokenizer, env, concepts, instance_paths,  # 2. [V], prompts
                             tokenizer_2=pipeline.tokenizer_2)
    record = start_run(output_dir, run_record(args, concepts, prompts, instance_paths), checkpoint, args, env)
    say(prompts_line(concepts, prompts))
    contexts = {} if args.train_text_encoder else encode_contexts(pipeline, prompts, autocast)
    pooled = encode_pooled(pipeline, prompts, autocast)  # SDXL's second conditioning; {} otherwise
    class_paths = make_class_images(pipeline, args, prompts, output_dir, env, concepts)  # 3. class images
    data = TrainingData(pipeline, instance_paths, class_paths, args, env, autocast)  # 4. data
    trainer = make_trainer(pipeline, prompts, contexts, args, env, autocast, pooled)  # 5. the step
    say(batch_line(args, env, bool(class_paths[0]), len(concepts)))
    start, records = load_checkpoint(checkpoint, pipeline, trainer, data, record, args, env) if checkpoint else (0, [])
    if checkpoint:
        say(f"resumed from {checkpoint} at step {start}")
    log = LossLog(output_dir / RUN_DIR / "loss.jsonl", records, writer=env.main,
                  concept_names=[c.name for c in concepts] if len(concepts) > 1 else ())
    identifiers = [{"name": c.name, "identifier": p.identifier} for c, p in zip(concepts, prompts)]
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
            save_along_the_way(step + 1, pipeline, trainer, data, log, record, args, env, identifiers, output_dir)
    if env.main:                                                                 # 8. the model
        save_final_model(pipeline, args, concepts, prompts, record, output_dir, log, env.world_size)
        say(saved_line(args, concepts, prompts, output_dir))
        if args.push_to_hub:
            say(f"uploaded to {push_to_hub(args, output_dir)}")
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


def save_along_the_way(done, pipeline, trainer, data, log, record, args, env, identifiers, output_dir):
    """After step `done`: a checkpoint (always at the last step, so a finished run can be
    extended) and a validation grid, when their intervals say so."""
    if args.checkpoint_every and (done % args.checkpoint_every == 0 or done == args.max_steps):
        save_checkpoint(output_dir / "checkpoints" / f"step-{done:06d}", done, pipeline, trainer, data, log, record,
                        args, env)
    if args.validation_every and (done % args.validation_every == 0 or done == args.max_steps):
        validate(pipeline, args, identifiers, output_dir / "validation" / f"step-{done:06d}.png", env.device)


def list_instance_images(concepts):
    """Each concept's readable photos, one list per concept."""
    try:
        return [dreambooth.list_images(concept.instance_dir) for concept in concepts]
    except FileNotFoundError as e:
        raise TrainError(str(e)) from None


def prompts_line(concepts, prompts):
    """Each concept's identifier and instance prompt (and how many photos have captions), printed at the start."""
    lines = []
    for concept, p in zip(concepts, prompts):
        captioned = f" (captions for {len(p.captions)} of its {len(p.image_prompts)} photos)" if p.captions else ""
        if len(concepts) == 1:
            lines.append(f"identifier: {p.identifier!r}\ninstance prompt: {p.instance_prompt!r}{captioned}")
        else:
            lines.append(f"concept {concept.name!r}: identifier {p.identifier!r}, instance prompt "
                         f"{p.instance_prompt!r}{captioned}")
    return "\n".join(lines)


def saved_line(args, concepts, prompts, output_dir):
    """Where the result is, and a sample.py command to try it, printed at the end."""
    what = "the LoRA adapters" if args.lora_rank else "the fine-tuned model"
    first, p = concepts[0], prompts[0]
    slot = "[V]" if len(concepts) == 1 else f"[V:{first.name}]"
    named = (f"identifier {p.identifier!r}" if len(concepts) == 1 else
             "identifiers " + ", ".join(f"{c.name}: {q.identifier!r}" for c, q in zip(concepts, prompts)))
    return (f"saved {what} to {output_dir} ({named}); try:\n"
            f"  python sample.py --model {output_dir} --prompt "
            f"\"{p.instance_prompt.replace(p.identifier, slot)}\" --out_dir {output_dir / 'samples'}")


def batch_line(args, env, prior, num_concepts=1):
    """What one optimizer step holds, printed at the start."""
    return (f"batch: {args.batch_size} per process x {env.world_size} processes x {args.grad_accum} accumulation "
            f"= {env.world_size * args.batch_size * args.grad_accum} instance images per optimizer step"
            + (" (+ as many class images)" if prior else "")
            + f"; lr {args.lr:g} is used as given (not scaled with the batch)"
            + (f"; the {num_concepts} concepts take turns, one per micro-batch" if num_concepts > 1 else ""))


# ----------------------------------------------------------------------------------------------
# The output folder: one run per folder. A run's record (run_record) says what makes it this run;
# a new run into a folder that holds another run's outputs is refused, a resume must continue the
# same run, and a lock keeps a second process out while one trains.

RUN_DIR = "run"  # OUTPUT_DIR/run/: this run's record (run.json) and live loss log
OUTPUTS = ("model_index.json", "unet", "text_encoder", "vae", "tokenizer", "scheduler", "dreambooth.json",
           "loss.jsonl", "loss.png", "README.md", "validation", "checkpoints", RUN_DIR)


def file_digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def run_record(args, concepts, prompts, instance_paths):
    """The settings that change a run's result. A checkpoint holds them; resuming with other
    values would put two runs into one model. (--max_steps, checkpoint and validation settings
    may change: they do not change the steps already taken.) A one-concept run keeps its
    concept's settings at the top, several concepts list theirs under "concepts"; settings off by
    default (captions, --snr_gamma, --offset_noise) appear only when used, so the record of a
    run without them is what it always was."""
    prior = not args.no_prior_preservation
    model = str(Path(args.model).resolve()) if args.model != "toy" and Path(args.model).exists() else args.model
    prior_loss_weight = args.prior_loss_weight if prior else None
    subjects = [concept_record(p, photos, prior) for p, photos in zip(prompts, instance_paths)]
    if len(concepts) == 1:
        record = {"model": model, **subjects[0], "resolution": args.resolution, "prior_loss_weight": prior_loss_weight,
                  "num_class_images": concepts[0].num_class_images if prior else None}
    else:
        record = {"model": model, "resolution": args.resolution, "prior_loss_weight": prior_loss_weight,
                  "concepts": [{"name": c.name, **subject, "num_class_images": c.num_class_images if prior else None}
                               for c, subject in zip(concepts, subjects)]}
    record.update({"train_text_encoder": args.train_text_encoder, "center_crop": args.center_crop, "flip": args.flip})
    return {**record, **{k: v for k, v in (("snr_gamma", args.snr_gamma), ("offset_noise", args.offset_noise)) if v}}


def concept_record(prompts, photos, prior):
    """What makes one concept of a run: its photos (by checksum), prompts and captions."""
    return {"instance_images": {path.name: file_digest(path) for path in photos},
            "identifier": prompts.identifier, "instance_prompt": prompts.instance_prompt,
            "class_prompt": prompts.class_prompt if prior else None,
            **({"captions": prompts.captions} if prompts.captions else {})}


def check_same_run(recorded, record, where):
    """Refuse to continue `where` (a checkpoint) unless it was made by a run with this record."""
    if recorded is None:
        print(f"warning: {where} holds no run record (an older checkpoint); it is not checked", file=sys.stderr)
        return
    # a setting either record lacks differs too (e.g. --snr_gamma given to only one of them)
    differ = [k for k in (*record, *(k for k in recorded if k not in record)) if recorded.get(k) != record.get(k)]
    if differ:
        details = "; ".join(f"{k}: {recorded.get(k)!r} there, {record.get(k)!r} now" for k in differ)
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
    write_atomically(path, lambda tmp: tmp.write_text(json.dumps(record, indent=2)))


def clean_leftovers(output_dir, concepts):
    """Remove what an interrupted earlier run in this folder left half-written: checkpoints being
    written, a final save that never got to swap in, temporary files. A final save that was
    interrupted while swapping in is completed (the new model was whole by then)."""
    if finish_interrupted_save(output_dir):
        print(f"completed the interrupted final save in {output_dir}", file=sys.stderr)
    class_dirs = [(".*.tmp", c.class_folder(output_dir, len(concepts) > 1)) for c in concepts]
    for pattern, folder in ((".step-*", output_dir / "checkpoints"), (".saving-*", output_dir),
                            (".*.tmp", output_dir), (".*.tmp", output_dir / RUN_DIR), *class_dirs):
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
# 50 class images of 15 DPM++ 2M Karras steps, then 2000 training steps at lr 2e-4 with the prior
# loss weighted 0.3, chosen on all three toy subjects (toy/README.md: at 5e-5 and 1e-4 the subject
# is barely learned; at the paper's weight 1 the teal ring's white eye took the sky's colour in
# every sky sample, a context its photos never show, and at 0.3 it kept it in 7 of 8 with seed 0,
# 4 and 3 of 8 with seeds 1 and 2): under 2 minutes on 2 CPU cores,
# class images included (README, "Quick start"). fp32: at this size bf16 is no faster on a CPU.
TOY_RECIPE = dict(resolution=32, num_class_images=50, class_steps=15, class_guidance_scale=5.0, sample_batch_size=25,
                  max_steps=2000, lr=2e-4, prior_loss_weight=0.3, mixed_precision="no", cache_latents=True,
                  validation_steps=25)


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
    g.add_argument("--instance_dir",
                   help="folder with 3-5 photos of the subject; photo.txt beside photo.jpg is that photo's own "
                        "instance prompt, [V] standing for the identifier (default: none; give it, or --concepts)")
    g.add_argument("--class_noun", help="the subject's coarse class, e.g. dog (default: none; give it, or --concepts)")
    g.add_argument("--concepts", metavar="FILE.json",
                   help="several subjects in one run: a JSON list of objects with \"instance_dir\" and "
                        "\"class_noun\", and optionally \"identifier\", \"class_dir\", \"num_class_images\", "
                        "\"instance_template\", \"name\" (for [V:name]); relative paths are read from the file's "
                        "folder (default: none: the one subject of --instance_dir and --class_noun)")
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
    g.add_argument("--class_steps", type=int, default=15,
                   help="sampler steps per class image; 15 DPM++ 2M Karras steps make the images 50 DDIM steps make "
                        "(mean pixel difference under 0.01) and keep prior preservation, with 0.3 x the UNet calls "
                        "(measured on the toy: bench/README.md)")
    g.add_argument("--class_scheduler", choices=sorted(sample.SCHEDULERS), default="dpmpp_2m_karras",
                   help="sampler for the class images: DPM-Solver++(2M) with Karras sigmas (ddim at 50 steps, the "
                        "earlier default, makes nearly the same images with 3.3 x the UNet calls)")
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
    g.add_argument("--snr_gamma", type=float,
                   help="min-SNR loss weighting (Hang et al. 2023): each sample's loss times min(SNR, G) / SNR "
                        "(/ (SNR + 1) for v-prediction); 5 is the paper's choice (default: none, the plain loss)")
    g.add_argument("--offset_noise", type=float, default=0.0,
                   help="offset noise (Guttenberg 2023): S * N(0, 1) per image and channel added to the training "
                        "noise, so the model learns very dark and very bright images; 0.1 is common (0: off)")
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
    g.add_argument("--push_to_hub", metavar="REPO_ID",
                   help="upload the finished model (with a model card README.md) to this Hugging Face Hub repo, "
                        "created if needed; needs a write token (`hf auth login`), checked before training "
                        "(default: no upload)")
    g.add_argument("--hub_private", action="store_true", help="create the --push_to_hub repo private")
    g.add_argument("--push_checkpoints", action="store_true",
                   help="upload checkpoints/ too (by default checkpoints/, class_images/ and run/ stay local)")


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
    concepts = read_concepts(args)  # the subjects, each checked
    if args.resume and args.resume != "latest" and not Path(args.resume, "state.pt").is_file():
        raise TrainError(f"--resume {args.resume}: no checkpoint there (expected {Path(args.resume, 'state.pt')})")
    if args.resume and args.overwrite:
        raise TrainError("--resume continues the run in --output_dir and --overwrite removes it: choose one")
    if args.class_guidance_scale < 0:
        raise TrainError(f"--class_guidance_scale must be at least 0 (1: no guidance), got {args.class_guidance_scale}")
    if args.snr_gamma is not None and not args.snr_gamma > 0:
        raise TrainError(f"--snr_gamma must be positive (5 is the paper's choice), got {args.snr_gamma:g}")
    if args.offset_noise < 0:
        raise TrainError(f"--offset_noise must be at least 0 (0: off; 0.1 is common), got {args.offset_noise:g}")
    try:  # [V] and [V:name] must name this run's concepts; the identifiers are not drawn yet
        sample.fill_identifiers(args.validation_prompt, [{"name": c.name, "identifier": ""} for c in concepts],
                                "this run")
    except ValueError as e:
        raise TrainError(f"--validation_prompt: {e}") from None
    check_lora_args(args)
    check_hub_args(args)


def check_template(flag, template, needs_identifier):
    """Templates may name {identifier} and {class_noun} only; the instance prompt needs the identifier."""
    try:
        names = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as e:
        raise TrainError(f"{flag} {template!r}: {e} (write a literal brace as {{{{ or }}}})") from None
    unknown = names - {"identifier", "class_noun"}
    if unknown:
        raise TrainError(f"{flag} {template!r} has unknown placeholder(s) {', '.join(sorted(unknown))}: "
                         "use {identifier} and {class_noun}")
    if needs_identifier and "identifier" not in names:
        raise TrainError(f"{flag} {template!r} has no {{identifier}}: without it the subject's "
                         "prompt would be the class prompt, and nothing would bind the subject to [V]")


# --concepts FILE.json: the subjects of a run, checked at the boundary. The one-subject flags
# (--instance_dir, --class_noun, ...) are the shorthand for a file of one entry, and --concepts
# reads every setting of a subject from its entry (--num_class_images and --instance_template
# are the defaults of the entries that leave them out).

CONCEPT_FIELDS = ("instance_dir", "class_noun", "identifier", "class_dir", "num_class_images", "instance_template",
                  "name")
CONCEPTS_EXAMPLE = '[{"instance_dir": "dog", "class_noun": "dog"}, {"instance_dir": "cat", "class_noun": "cat"}]'
CONCEPT_NAME = re.compile(r"\w[\w .-]*")  # a name [V:name] can hold, and a folder name


def read_concepts(args):
    """The run's subjects: the one of --instance_dir and --class_noun, or the entries of
    --concepts; each checked, names and identifiers distinct."""
    if args.concepts:
        given = [f"--{k}" for k in ("instance_dir", "class_noun", "identifier", "class_dir") if getattr(args, k)]
        if given:
            raise TrainError(f"--concepts {args.concepts} names the subjects, so {', '.join(given)} cannot be given "
                             "too: put them in the file's entries")
        concepts = [concept_from_entry(entry, i, args) for i, entry in enumerate(load_concepts_file(args.concepts))]
        check_distinct(concepts, args.concepts)
    elif args.instance_dir is None or args.class_noun is None:
        raise TrainError("name the subject: --instance_dir PHOTOS --class_noun NOUN (e.g. dog), or several "
                         "subjects with --concepts FILE.json")
    else:
        concepts = [Concept(folder_name(args.instance_dir), Path(args.instance_dir), args.class_noun,
                            args.identifier or None, args.instance_template,
                            Path(args.class_dir) if args.class_dir else None, args.num_class_images)]
        check_concept(concepts[0], lambda name: f"--{name}")
    check_template("--class_template", args.class_template, needs_identifier=False)
    return concepts


def folder_name(folder):
    return Path(folder).expanduser().resolve().name


def load_concepts_file(path):
    """The entries of a --concepts file: a non-empty JSON list of objects."""
    try:
        entries = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise TrainError(f"--concepts {path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise TrainError(f"--concepts {path} is not valid JSON ({e}); write a list of objects such as "
                         f"{CONCEPTS_EXAMPLE}") from None
    if not isinstance(entries, list) or not entries or not all(isinstance(entry, dict) for entry in entries):
        raise TrainError(f"--concepts {path} must hold a non-empty JSON list of objects, e.g. {CONCEPTS_EXAMPLE}")
    return entries


def concept_from_entry(entry, i, args):
    """One entry of a --concepts file as a Concept, its fields checked; relative paths are read
    from the file's folder."""
    where = f"--concepts {args.concepts}, entry {i + 1}"
    unknown = sorted(set(entry) - set(CONCEPT_FIELDS))
    if unknown:
        raise TrainError(f"{where}: unknown field(s) {', '.join(unknown)}; the fields are {', '.join(CONCEPT_FIELDS)}")
    missing = [name for name in ("instance_dir", "class_noun") if name not in entry]
    if missing:
        raise TrainError(f"{where} has no {' and no '.join(missing)}: each concept needs its photos' folder "
                         f"and its class noun, e.g. {CONCEPTS_EXAMPLE}")
    for name, value in entry.items():
        kind = int if name == "num_class_images" else str
        if not isinstance(value, kind) or isinstance(value, bool):
            raise TrainError(f"{where}: {name} must be a {'whole number' if kind is int else 'string'}, got {value!r}")
    def folder(key):
        return Path(args.concepts).parent / Path(entry[key]).expanduser() if key in entry else None
    concept = Concept(entry.get("name") or folder_name(folder("instance_dir")), folder("instance_dir"),
                      entry["class_noun"], entry.get("identifier"),
                      entry.get("instance_template", args.instance_template), folder("class_dir"),
                      entry.get("num_class_images", args.num_class_images))
    check_concept(concept, lambda name: f"{where} ({concept.name}): {name}")
    return concept


def check_concept(concept, where):
    """One subject's settings; where(field) names the flag or file entry in the messages."""
    if not concept.class_noun.strip():
        raise TrainError(f"{where('class_noun')} is empty: name the subject's coarse class, e.g. dog")
    if concept.identifier is not None and not concept.identifier.strip():
        raise TrainError(f"{where('identifier')} is empty: give a short rare word, or leave it out to draw one")
    if concept.identifier and concept.identifier.lower() in concept.class_noun.lower().split():
        raise TrainError(f"{where('class_noun')} {concept.class_noun!r} contains the identifier "
                         f"{concept.identifier!r}: the class noun names the class, the identifier this one subject")
    if concept.num_class_images < 1:
        raise TrainError(f"{where('num_class_images')} must be at least 1, got {concept.num_class_images}")
    check_template(where("instance_template"), concept.instance_template, needs_identifier=True)


def check_distinct(concepts, path):
    """Several concepts need distinct names (prompts say [V:name]) and distinct identifiers; class
    images are shared only between concepts of one class."""
    seen_names, seen_identifiers, class_dirs = {}, {}, {}
    for concept in concepts:
        if not CONCEPT_NAME.fullmatch(concept.name):
            raise TrainError(f"--concepts {path}: the concept name {concept.name!r} cannot stand in a prompt as "
                             "[V:name]: give the entry a \"name\" of letters, digits, spaces, _ . or -")
        if concept.name in seen_names:
            raise TrainError(f"--concepts {path}: two concepts are named {concept.name!r} (a name defaults to the "
                             "photos' folder name): give each entry its own \"name\"")
        seen_names[concept.name] = concept
        if concept.identifier:
            key = " ".join(concept.identifier.lower().split())
            if key in seen_identifiers:
                raise TrainError(f"--concepts {path}: concepts {seen_identifiers[key]!r} and {concept.name!r} have the "
                                 f"same identifier {concept.identifier!r}; each concept needs its own (leave "
                                 "\"identifier\" out to draw distinct rare tokens)")
            seen_identifiers[key] = concept.name
        if concept.class_dir:
            other = class_dirs.setdefault(concept.class_dir.resolve(), concept)
            if other.class_noun.strip().lower() != concept.class_noun.strip().lower():
                raise TrainError(f"--concepts {path}: concepts {other.name!r} and {concept.name!r} share the class_dir "
                                 f"{concept.class_dir} but not their class noun: their class images would mix")


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
            if not is_disk_full(e):
                raise
            raise TrainError(disk_full_message(e.filename or args.output_dir, "Free some space, then run again (with "
                                               "--resume latest if a checkpoint was written)."), exit_code=1) from None
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
