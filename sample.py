"""Text-to-image sampling: the project's one denoising loop (training's class images and
validation images call `generate` too).

    pipeline = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")
    images = generate(pipeline, ["a photo of sks dog"] * 4, seed=0)      # list of PIL images

The steps, in order:
  1. Text: the prompts and the unconditional prompt (empty, or the negative prompt) become
     token ids and then contexts c and c_uncond, [B, 77, D]. SDXL (Podell et al., 2023) has two
     text encoders, and its UNet also takes a pooled text embedding and the image size
     (added_cond); an empty negative prompt is zeros there.
  2. Noise: N(0, I), [B, 4, H/8, W/8], scaled to the sampler's first noise level (x_T; the factor
     is 1 except for Euler). Image i is seeded with seed + i through its own CPU torch.Generator,
     which also draws its step noise (DDPM, DDIM with eta > 0, Euler ancestral), so an image
     depends on its seed only, not on the batch it was made in or on the machine.
  3. Denoise: for each t of the sampler's grid, one UNet pass over [c_uncond; c] gives
     eps_uncond and eps_cond, combined by classifier-free guidance (Ho & Salimans 2022, Eq. 6):
         eps = eps_uncond + w (eps_cond - eps_uncond)
     and the sampler (SCHEDULERS below, from schedulers.py) steps x_t -> x_prev. For v-prediction
     models the same formula applies to v; the sampler turns it into x_0 and eps.
  4. Decode: x_0 / scaling_factor through the VAE decoder, [-1, 1] -> uint8 RGB (SDXL's VAE
     in fp32, as it overflows in fp16).

mixed_precision: "auto" runs under bf16 autocast on CUDA GPUs that support it (else fp16) and
on CPU (bf16 matmuls are several times faster on CPUs with AMX / AVX512-BF16); "no" runs in the
weights' own dtype (fp32 unless loaded otherwise), which is what exact comparisons need.

Command line (see --help):
    python sample.py --model out/dog --prompt "a [V] dog on the beach" --num_images 4
"""
import argparse
import contextlib
import json
import os
import re
import secrets
import sys
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

import lora
from clip_text import sdxl_text_conditioning
from load_weights import DEFAULT_MODEL, LoadError, disk_full_message, is_disk_full, load_pipeline, write_atomically
from schedulers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralScheduler, randn

# --scheduler name -> the sampler, built from the model's scheduler config; eta is DDIM's own setting.
SCHEDULERS = {
    "ddim": lambda config, eta: DDIMScheduler(config, eta=eta),
    "ddpm": lambda config, eta: DDPMScheduler(config),
    "dpmpp_2m": lambda config, eta: DPMSolverMultistepScheduler(config),
    "dpmpp_2m_karras": lambda config, eta: DPMSolverMultistepScheduler(config, use_karras_sigmas=True),
    "euler_a": lambda config, eta: EulerAncestralScheduler(config),
}
MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


def autocast_dtype(device: torch.device, mixed_precision: str):
    """The half precision that `mixed_precision` means on `device` (see the module docstring),
    or None for full precision. train.py makes the same choice with this function."""
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {MIXED_PRECISION}, got {mixed_precision!r}")
    if mixed_precision == "no" or device.type not in ("cuda", "cpu"):
        return None
    if mixed_precision == "auto":
        use_bf16 = device.type == "cpu" or torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if use_bf16 else "fp16"
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def autocast(device: torch.device, mixed_precision: str):
    """The autocast context for `mixed_precision` on `device`."""
    dtype = autocast_dtype(device, mixed_precision)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def downsampling_factors(pipeline) -> tuple[int, int]:
    """(pixels per latent, latents per UNet bottleneck cell): 8 and 8 for Stable Diffusion."""
    vae_factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
    unet_factor = 2 ** (len(pipeline.unet.config.block_out_channels) - 1)
    return vae_factor, unet_factor


def image_size(pipeline, height=None, width=None) -> tuple[int, int]:
    """Height and width in pixels (default: the UNet's training size), checked to be multiples
    of the VAE's and the UNet's downsampling together (64 for Stable Diffusion)."""
    vae_factor, unet_factor = downsampling_factors(pipeline)
    default = (pipeline.unet.config.sample_size or 64) * vae_factor
    height, width = height or default, width or default
    multiple = vae_factor * unet_factor
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(f"height and width must be multiples of {multiple} for this model "
                         f"(the VAE downsamples by {vae_factor}, the UNet by {unet_factor} more); "
                         f"got {height}x{width}")
    return height, width


_WARNED_TRUNCATIONS = set()  # (prompt, max_length) pairs already reported in this process


def warn_truncated(tokenizer, prompts: list[str]) -> None:
    """One line on stderr for each prompt longer than the tokenizer's max_length, naming the
    words cut; each prompt once per process, however often it is encoded."""
    for prompt in dict.fromkeys(prompts):
        key = (prompt, tokenizer.max_length)
        cut = "" if key in _WARNED_TRUNCATIONS else tokenizer.truncated_text(prompt)
        if cut:
            _WARNED_TRUNCATIONS.add(key)
            # tqdm.write: the line goes above the progress bars instead of through them
            tqdm.write(f"warning: {prompt!r} is longer than {tokenizer.max_length} tokens; "
                       f"the text encoder does not see {cut!r}", file=sys.stderr)


def encode_prompts(pipeline, prompts: list[str]) -> torch.Tensor:
    """Prompts -> the text context [B, 77, D] (text_conditioning without SDXL's pooled embedding)."""
    return text_conditioning(pipeline, prompts)[0]


def text_conditioning(pipeline, prompts: list[str]):
    """Prompts -> (context [B, 77, D], pooled [B, P] or None). SD 1.x/2.x: the text encoder's
    output, and no pooled embedding. SDXL: both encoders (clip_text.sdxl_text_conditioning), the
    context [B, 77, 768 + 1280] and the second encoder's pooled embedding [B, 1280]. A prompt
    longer than the tokenizer's 77 tokens is cut there, and the words cut are named on stderr
    (warn_truncated; SDXL's two tokenizers share the vocabulary, so they cut the same words)."""
    warn_truncated(pipeline.tokenizer, prompts)
    device = next(pipeline.text_encoder.parameters()).device
    ids = pipeline.tokenizer(prompts).to(device)
    if pipeline.text_encoder_2 is None:
        return pipeline.text_encoder(ids), None
    ids_2 = pipeline.tokenizer_2(prompts).to(device)  # padded with "!", not <|endoftext|>
    return sdxl_text_conditioning(pipeline.text_encoder, pipeline.text_encoder_2, ids, ids_2)


def negative_conditioning(pipeline, negative_prompt: str):
    """text_conditioning of guidance's unconditional branch, [1, ...]: the negative prompt's. An
    empty one is zeros where the model says force_zeros_for_empty_prompt (SDXL base): its
    reference sampler gives the unconditional branch zero text embeddings, not those of ""."""
    context, pooled = text_conditioning(pipeline, [negative_prompt])
    if negative_prompt == "" and pipeline.force_zeros_for_empty_prompt:
        return torch.zeros_like(context), torch.zeros_like(pooled)
    return context, pooled


def add_time_ids(original_size, crops_coords_top_left, target_size) -> torch.Tensor:
    """SDXL's size conditioning (Podell et al., 2023, section 2.2), [1, 6]: the size the training
    image had before it was resized, the top-left corner of its crop, and the size it was trained
    at, each (height, width) in pixels. Sampling asks for an uncropped image that was already at
    the size drawn: original = target = (height, width), crop (0, 0) (as diffusers does)."""
    return torch.tensor([[*original_size, *crops_coords_top_left, *target_size]], dtype=torch.float32)


def make_added_cond(pooled, height: int, width: int, batch_size: int):
    """The UNet's added_cond for SDXL (unet.UNet.added_embedding): the pooled text embedding and
    the size numbers, each [batch_size, ...]; None for SD 1.x/2.x (pooled None), whose UNet has none."""
    if pooled is None:
        return None
    time_ids = add_time_ids((height, width), (0, 0), (height, width)).to(pooled.device)
    return {"text_embeds": pooled.expand(batch_size, -1), "time_ids": time_ids.expand(batch_size, -1)}


def cat_for_guidance(uncond, cond):
    """[uncond; cond] on the batch, for one UNet pass over both: tensors, dicts of tensors (SDXL's
    added_cond), or None."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {key: torch.cat([uncond[key], cond[key]]) for key in cond}
    return torch.cat([uncond, cond])


def make_sampler(pipeline, scheduler: str, eta: float = 0.0):
    """The sampler named `scheduler` (a key of SCHEDULERS) for this model; eta is used by DDIM only."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[scheduler](pipeline.scheduler.config, eta)


@torch.inference_mode()
def denoise(pipeline, context, uncond_context, latents, *, added_cond=None, uncond_added_cond=None,
            scheduler="ddim", steps=50, guidance_scale=7.5, eta=0.0, generators=None,
            progress=True) -> torch.Tensor:
    """Run the sampler from `latents` [B, 4, h, w], unit-variance noise, down to x_0, guided by
    `context` and `uncond_context` [B, 77, D] (and for SDXL by `added_cond` and
    `uncond_added_cond`, see make_added_cond); returns x_0 (scaled latents, fp32). `generators`:
    one per image for the step noise (see schedulers.randn). guidance_scale 1 skips the
    unconditional pass. The loop is the same for every sampler (schedulers.py's interface) and
    every model."""
    sampler = make_sampler(pipeline, scheduler, eta)
    sampler.set_timesteps(steps)
    unet = pipeline.unet
    unet_dtype = next(unet.parameters()).dtype
    guided = guidance_scale != 1
    if guided:  # one UNet pass: [uncond; cond]
        context = cat_for_guidance(uncond_context, context)
        added_cond = cat_for_guidance(uncond_added_cond, added_cond)
    # x_T at the sampler's first noise level; the sampler's arithmetic stays in fp32 under autocast
    latents = latents.float() * sampler.init_noise_sigma
    for t in tqdm(sampler.timesteps, desc="steps", leave=False, disable=not progress):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = sampler.scale_model_input(model_input, t)  # what the UNet was trained on: x_t
        model_output = unet(model_input.to(unet_dtype), t, context, added_cond=added_cond).float()
        if guided:
            output_uncond, output_cond = model_output.chunk(2)
            model_output = output_uncond + guidance_scale * (output_cond - output_uncond)
        latents = sampler.step(model_output, t, latents, generators).prev_sample
    return latents


def decodes_in_fp32(pipeline) -> bool:
    """SDXL's VAE overflows in fp16 (its config says force_upcast): it decodes in fp32, whatever
    the weights' and the autocast precision. diffusers reads force_upcast in its SDXL pipelines
    only; SD 1.x/2.x VAEs (whose configs leave it at its default, true) decode in the sampling
    precision, there and here."""
    return pipeline.text_encoder_2 is not None and pipeline.vae.config.force_upcast


@torch.inference_mode()
def decode_images(pipeline, latents) -> list[Image.Image]:
    """Scaled latents [B, 4, h, w] -> B RGB images (VAE decode, [-1, 1] -> uint8)."""
    vae = pipeline.vae
    fp32 = decodes_in_fp32(pipeline)
    if fp32 and next(vae.parameters()).dtype != torch.float32:
        with torch.inference_mode(False):  # ordinary tensors: the weights outlive this call
            vae.float()  # once: the VAE stays in fp32 (SDXL's: 84 M numbers, 0.3 GB)
    latents = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
    with torch.autocast(latents.device.type, enabled=False) if fp32 else contextlib.nullcontext():
        images = vae.decode(latents).float()
    images = ((images / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    # (B, 3, H, W) -> (B, H, W, 3) for PIL
    return [Image.fromarray(image.numpy()) for image in images.permute(0, 2, 3, 1).cpu()]


@torch.inference_mode()
def generate(pipeline, prompts: list[str], *, negative_prompt: str = "", scheduler: str = "ddim",
             steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, seed: int | None = None,
             height: int | None = None, width: int | None = None, batch_size: int = 4,
             mixed_precision: str = "auto", progress: bool = True) -> list[Image.Image]:
    """One image per prompt; image i is made from seed + i (seed None: a random base seed).
    Each image's .info holds what made it (prompt, seed, steps, ...), for PNG metadata."""
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be at least 1, got {steps} and {batch_size}")
    make_sampler(pipeline, scheduler, eta)  # fail on an unknown name before any work
    height, width = image_size(pipeline, height, width)
    seed = secrets.randbelow(2**31) if seed is None else seed
    device = next(pipeline.unet.parameters()).device
    vae_factor, _ = downsampling_factors(pipeline)
    latent_shape = (pipeline.unet.config.in_channels, height // vae_factor, width // vae_factor)
    images = []
    with autocast(device, mixed_precision), tqdm(total=len(prompts), desc="images", disable=not progress) as bar:
        uncond, uncond_pooled = negative_conditioning(pipeline, negative_prompt)
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            seeds = [seed + start + i for i in range(len(batch))]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            latents = randn((len(batch), *latent_shape), generators, device=device, dtype=torch.float32)
            context, pooled = text_conditioning(pipeline, batch)
            latents = denoise(pipeline, context, uncond.expand(len(batch), -1, -1), latents,
                              added_cond=make_added_cond(pooled, height, width, len(batch)),
                              uncond_added_cond=make_added_cond(uncond_pooled, height, width, len(batch)),
                              scheduler=scheduler, steps=steps, guidance_scale=guidance_scale, eta=eta,
                              generators=generators, progress=progress)
            for image, prompt, image_seed in zip(decode_images(pipeline, latents), batch, seeds):
                image.info.update(prompt=prompt, negative_prompt=negative_prompt, seed=image_seed,
                                  steps=steps, scheduler=scheduler, guidance_scale=guidance_scale,
                                  eta=eta, model=pipeline.source)
                images.append(image)
            bar.update(len(batch))
    return images


# ----------------------------------------------------------------------------------------------
# LoRA: a LoRA output folder of train.py as the model, and LoRA files on top of any model


def read_lora_output(model):
    """dreambooth.json of a LoRA output folder of train.py (it has a "lora" entry, names the base
    model, and the folder holds lora.LORA_FILE), or None for any other model."""
    folder = Path(model).expanduser()
    path = folder / "dreambooth.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not readable JSON ({e})") from None
    if not isinstance(info, dict) or "lora" not in info:
        return None
    if "base_model" not in info or not (folder / lora.LORA_FILE).is_file():
        raise LoadError(f"{folder} is an incomplete LoRA output of train.py: its dreambooth.json needs a "
                        f"\"base_model\" and the folder {lora.LORA_FILE}")
    return info


def load_model(model, *, loras=(), lora_scale=1.0, device="cpu", dtype=torch.float32, prediction_type=None):
    """A Pipeline for `model` (a Hub id, folder or file; a LoRA output folder of train.py means
    its base model with the folder's LoRA at strength lora_scale), then each (path, scale) of
    `loras` on top. Every LoRA is merged into the weights once (lora.apply_lora): sampling costs
    what the base model costs."""
    info = read_lora_output(model)
    if info is None and lora_scale != 1.0:
        raise LoadError(f"--lora_scale scales the LoRA of a LoRA output folder given as --model, and {model} is "
                        "not one; give a LoRA's strength as --lora PATH:SCALE")
    if info is None:
        pipeline = load_pipeline(model, device=device, dtype=dtype, prediction_type=prediction_type)
    else:
        try:  # a base model from a single file: its prediction type is recorded with the LoRA
            pipeline = load_pipeline(info["base_model"], device=device, dtype=dtype,
                                     prediction_type=prediction_type or info.get("prediction_type"))
        except LoadError as e:
            raise LoadError(f"{model} is a LoRA for the base model {info['base_model']} (its dreambooth.json), "
                            f"which cannot be loaded: {e}") from None
    applied = ([(model, lora_scale)] if info else []) + list(loras)
    for path, scale in applied:
        try:
            lora.apply_lora(pipeline, path, scale=scale)
        except LoadError as e:
            trained_on = (read_lora_output(path) or {}).get("base_model")
            raise LoadError(f"{e} (This LoRA was trained on {trained_on}.)" if trained_on else str(e)) from None
    if applied:  # what made the images, for their PNG metadata
        pipeline.source = " + ".join([pipeline.source] + [f"LoRA {path}:{scale:g}" for path, scale in applied])
    return pipeline


def subject_folder(model, lora_paths=()):
    """The folder whose dreambooth.json names the subject: the model's, else the first LoRA
    folder (of --lora) that has one."""
    for folder in (model, *lora_paths):
        if (Path(folder).expanduser() / "dreambooth.json").is_file():
            return folder
    return model


# ----------------------------------------------------------------------------------------------
# Command line


IDENTIFIER_SLOT = re.compile(r"\[V(?::([^\]]*))?\]")  # [V], or [V:name]: the identifier of concept `name`


def read_concepts(model: str):
    """The concepts (subjects) a DreamBooth model was trained on, [{"name", "identifier",
    "class_noun", ...}], from `model`/dreambooth.json (written by train.py), or None without one.
    A dreambooth.json written before train.py took several concepts holds its one concept at the
    top; its name is then its photos' folder name."""
    path = Path(model).expanduser() / "dreambooth.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text())
        concepts = info.get("concepts") or [{"name": Path(info.get("args", {}).get("instance_dir") or "").name,
                                            "identifier": info["identifier"], "class_noun": info.get("class_noun")}]
        if not all(isinstance(c["identifier"], str) and isinstance(c["name"], str) for c in concepts):
            raise TypeError("an identifier or a concept name is not a string")
    except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} has no readable \"identifier\" ({e!r})") from None
    return concepts


def read_identifier(model: str):
    """The identifier of a one-concept DreamBooth model (its dreambooth.json), or None without one."""
    concepts = read_concepts(model)
    return None if concepts is None else fill_identifiers(["[V]"], concepts, model)[0]


def fill_identifiers(prompts: list[str], concepts: list[dict], where: str) -> list[str]:
    """Replace [V] with the identifier of the one concept, and [V:name] with the identifier of
    the concept named `name` ({"name", "identifier"} dicts); a ValueError for a name `where` has
    no concept of, or for a bare [V] when there are several concepts."""
    identifiers = {c["name"]: c["identifier"] for c in concepts}
    names = ", ".join(identifiers)

    def identifier(slot):
        name = slot.group(1)
        if name is None and len(concepts) > 1:
            raise ValueError(f"{where} has {len(concepts)} concepts ({names}), so [V] does not say which: write "
                             f"[V:name], e.g. [V:{concepts[0]['name']}]")
        if name is not None and name not in identifiers:
            raise ValueError(f"[V:{name}]: {where} has no concept named {name!r} (its concepts: {names})")
        return concepts[0]["identifier"] if name is None else identifiers[name]
    return [IDENTIFIER_SLOT.sub(identifier, p) for p in prompts]


def fill_identifier(prompts: list[str], model: str) -> list[str]:
    """Replace [V] (a model of one subject) and [V:name] (any of its subjects, by name) in the
    prompts with the identifiers the DreamBooth model was trained with."""
    if not any(IDENTIFIER_SLOT.search(p) for p in prompts):
        return prompts
    concepts = read_concepts(model)
    if concepts is None:
        raise ValueError(f"a prompt contains [V], but {model} has no dreambooth.json: it is not a "
                         "DreamBooth output of train.py. Write the identifier into the prompt yourself.")
    return fill_identifiers(prompts, concepts, model)


def grid(images: list[Image.Image], rows: int) -> Image.Image:
    cols = -(-len(images) // rows)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % cols) * w, (i // cols) * h))
    return sheet


def save_png(image: Image.Image, path: Path) -> None:
    """The image with its .info as PNG text, written to a temporary name and renamed: a full disk
    or a kill never leaves a partial image under the final name."""
    metadata = PngInfo()
    for key, value in image.info.items():
        metadata.add_text(key, str(value))
    write_atomically(path, lambda tmp: image.save(tmp, format="PNG", pnginfo=metadata))


def check_writable_folder(flag, folder):
    """Create `folder` and probe it for writing, before any work; ValueError says what is wrong."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{flag} {folder} is a file: give a folder (it is created if missing)")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".writable-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"{flag} {folder} is not writable ({e.strerror or e})") from None


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every flag's default. A help text that says "(default: ...)" itself is left as
    it is: flags whose default is None (or empty) say there what that means."""

    def _get_help_string(self, action):
        if "(default:" in (action.help or "") or action.required:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with a (DreamBooth) Stable Diffusion model.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="training output folder (a LoRA one too), Hub id, diffusers folder or single "
                        ".safetensors/.ckpt file")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="repeatable: a LoRA (a LoRA output folder of train.py, or a .safetensors file in "
                        "diffusers' or kohya's format) merged into the model at strength SCALE (default: "
                        "none; SCALE 1)")
    p.add_argument("--lora_scale", type=float, default=1.0,
                   help="strength of the LoRA of a LoRA output folder given as --model")
    p.add_argument("--prompt", action="append", default=[],
                   help="repeatable; [V] is replaced by the identifier in the model's dreambooth.json, [V:name] "
                        "by that of its concept `name` (a model of several) (default: none; give --prompt or "
                        "--prompts_file)")
    p.add_argument("--prompts_file", help="a text file with one prompt per line (default: none)")
    p.add_argument("--negative_prompt", default="",
                   help="the prompt guidance steers away from (default: empty, the unconditional prompt)")
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (default: what the model says; an SD 2.x single file, which does "
                        "not say, is judged by its name)")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim",
                   help="the sampler: DDIM, DDPM ancestral, DPM-Solver++(2M) (with Karras sigmas), Euler ancestral")
    p.add_argument("--steps", type=int, default=50, help="denoising steps")
    p.add_argument("--guidance_scale", type=float, default=7.5,
                   help="classifier-free guidance weight w; 1 turns guidance off")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--seed", type=int, default=0, help="image i of the run uses seed + i")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch_size", type=int, default=4, help="images per UNet batch (the images do not depend on it)")
    p.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="auto",
                   help="auto: bf16 (fp16 on GPUs without bf16) autocast; no: fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda if this PyTorch sees a GPU, else cpu)")
    p.add_argument("--out_dir", default="samples", help="PNG files and a grid go here")
    return p


def main(argv=None) -> int:
    """Bad input ends in parser.error: a message on stderr and SystemExit(2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    prompts = check_args(parser, args)
    try:
        loras = [lora.parse_lora_spec(spec) for spec in args.lora]
        prompts = fill_identifier(prompts, subject_folder(args.model, [path for path, _ in loras]))
        # Sampling only: weights in the autocast precision. Under autocast, frozen fp32 weights
        # would be cast again at every UNet call (bench/README.md, Sampling).
        weights_dtype = autocast_dtype(torch.device(args.device), args.mixed_precision) or torch.float32
        pipeline = load_model(args.model, loras=loras, lora_scale=args.lora_scale, device=args.device,
                              dtype=weights_dtype, prediction_type=args.prediction_type)
        image_size(pipeline, args.height, args.width)
        check_writable_folder("--out_dir", args.out_dir)  # before the work, so no image is made to be lost
    except (ValueError, LoadError) as e:
        parser.error(str(e))
    images = generate(pipeline, [p for p in prompts for _ in range(args.num_images)],
                      negative_prompt=args.negative_prompt, scheduler=args.scheduler, steps=args.steps,
                      guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed,
                      height=args.height, width=args.width, batch_size=args.batch_size,
                      mixed_precision=args.mixed_precision)
    try:
        grid_path = write_images(images, len(prompts), Path(args.out_dir))
    except OSError as e:
        if not is_disk_full(e):
            raise
        parser.exit(1, "error: " + disk_full_message(e.filename or args.out_dir, "Free some space and run again "
                                                     "(the same --seed gives the same images).") + "\n")
    print(f"wrote {len(images)} image{'s' if len(images) != 1 else ''} and {grid_path} to {args.out_dir}")
    return 0


def check_args(parser, args):
    """Bad input stops here (parser.error), before any work; returns the prompts of --prompt and
    --prompts_file."""
    prompts = list(args.prompt)
    if args.prompts_file:
        try:
            prompts += [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
        except OSError as e:
            parser.error(f"cannot read --prompts_file: {e}")
    if not prompts:
        parser.error("no prompt given: pass --prompt TEXT (repeatable) or --prompts_file FILE")
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    if args.num_images < 1 or args.batch_size < 1:
        parser.error("--num_images and --batch_size must be at least 1")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this PyTorch sees no CUDA GPU; use --device cpu")
    for name in ("height", "width"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            parser.error(f"--{name} must be a positive multiple of 8, got {value}")
    if args.guidance_scale < 0:
        parser.error(f"--guidance_scale must be at least 0 (1: no guidance), got {args.guidance_scale}")
    return prompts


def write_images(images, num_prompts, out_dir):
    """Each image as a PNG with its metadata, and a grid (one row per prompt); returns the grid's path.
    Files are numbered after those already there, so that runs into one folder never overwrite."""
    first = 1 + max((int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")), default=-1)
    for n, image in enumerate(images, first):
        slug = "".join(c if c.isalnum() else "_" for c in image.info["prompt"])[:48].strip("_")
        save_png(image, out_dir / f"{n:05d}-{slug}-seed{image.info['seed']}.png")
    grid_path = out_dir / f"{first:05d}-grid.png"
    save_png(grid(images, rows=num_prompts), grid_path)
    return grid_path


if __name__ == "__main__":
    sys.exit(main())
