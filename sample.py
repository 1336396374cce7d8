"""Text-to-image sampling: the project's one denoising loop (training's class images and
validation images call `generate` too).

    pipeline = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")
    images = generate(pipeline, ["a photo of sks dog"] * 4, seed=0)      # list of PIL images

The steps, in order:
  1. Text: the prompts and the unconditional prompt (empty, or the negative prompt) become
     token ids and then contexts c and c_uncond, [B, 77, D].
  2. Noise: N(0, I), [B, 4, H/8, W/8], scaled to the sampler's first noise level (x_T; the factor
     is 1 except for Euler). Image i is seeded with seed + i through its own CPU torch.Generator,
     which also draws its step noise (DDPM, DDIM with eta > 0, Euler ancestral), so an image
     depends on its seed only, not on the batch it was made in or on the machine.
  3. Denoise: for each t of the sampler's grid, one UNet pass over [c_uncond; c] gives
     eps_uncond and eps_cond, combined by classifier-free guidance (Ho & Salimans 2022, Eq. 6):
         eps = eps_uncond + w (eps_cond - eps_uncond)
     and the sampler (SCHEDULERS below, from schedulers.py) steps x_t -> x_prev. For v-prediction
     models the same formula applies to v; the sampler turns it into x_0 and eps.
  4. Decode: x_0 / scaling_factor through the VAE decoder, [-1, 1] -> uint8 RGB.

mixed_precision: "auto" runs under bf16 autocast on CUDA GPUs that support it (else fp16) and
on CPU (bf16 matmuls are several times faster on CPUs with AMX / AVX512-BF16); "no" runs in the
weights' own dtype (fp32 unless loaded otherwise), which is what exact comparisons need.

Command line (see --help):
    python sample.py --model out/dog --prompt "a [V] dog on the beach" --num_images 4
"""
import argparse
import contextlib
import errno
import json
import os
import secrets
import sys
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

import lora
from load_weights import DEFAULT_MODEL, LoadError, load_pipeline
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
    """Prompts -> the text context [B, 77, D]. A prompt longer than the tokenizer's 77 tokens is
    cut there, and the words cut are named on stderr (warn_truncated)."""
    warn_truncated(pipeline.tokenizer, prompts)
    device = next(pipeline.text_encoder.parameters()).device
    return pipeline.text_encoder(pipeline.tokenizer(prompts).to(device))


def make_sampler(pipeline, scheduler: str, eta: float = 0.0):
    """The sampler named `scheduler` (a key of SCHEDULERS) for this model; eta is used by DDIM only."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[scheduler](pipeline.scheduler.config, eta)


@torch.inference_mode()
def denoise(pipeline, context, uncond_context, latents, *, scheduler="ddim", steps=50,
            guidance_scale=7.5, eta=0.0, generators=None, progress=True) -> torch.Tensor:
    """Run the sampler from `latents` [B, 4, h, w], unit-variance noise, down to x_0, guided by
    `context` and `uncond_context` [B, 77, D]; returns x_0 (scaled latents, fp32). `generators`:
    one per image for the step noise (see schedulers.randn). guidance_scale 1 skips the
    unconditional pass. The loop is the same for every sampler (schedulers.py's interface)."""
    sampler = make_sampler(pipeline, scheduler, eta)
    sampler.set_timesteps(steps)
    unet = pipeline.unet
    unet_dtype = next(unet.parameters()).dtype
    guided = guidance_scale != 1
    if guided:
        context = torch.cat([uncond_context, context])  # one UNet pass: [uncond; cond]
    # x_T at the sampler's first noise level; the sampler's arithmetic stays in fp32 under autocast
    latents = latents.float() * sampler.init_noise_sigma
    for t in tqdm(sampler.timesteps, desc="steps", leave=False, disable=not progress):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_input = sampler.scale_model_input(model_input, t)  # what the UNet was trained on: x_t
        model_output = unet(model_input.to(unet_dtype), t, context).float()
        if guided:
            output_uncond, output_cond = model_output.chunk(2)
            model_output = output_uncond + guidance_scale * (output_cond - output_uncond)
        latents = sampler.step(model_output, t, latents, generators).prev_sample
    return latents


@torch.inference_mode()
def decode_images(pipeline, latents) -> list[Image.Image]:
    """Scaled latents [B, 4, h, w] -> B RGB images (VAE decode, [-1, 1] -> uint8)."""
    vae = pipeline.vae
    latents = latents.to(next(vae.parameters()).dtype) / vae.config.scaling_factor
    images = ((vae.decode(latents).float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
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
        uncond = encode_prompts(pipeline, [negative_prompt])
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            seeds = [seed + start + i for i in range(len(batch))]
            generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
            latents = randn((len(batch), *latent_shape), generators, device=device, dtype=torch.float32)
            context = encode_prompts(pipeline, batch)
            latents = denoise(pipeline, context, uncond.expand(len(batch), -1, -1), latents,
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
    if pipeline.text_encoder_2 is not None:
        raise LoadError(f"{model} is an SDXL model: this project loads SDXL, but its sampler does not draw "
                        "with it yet; use an SD 1.x or 2.x model")
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


def read_identifier(model: str):
    """The DreamBooth identifier from `model`/dreambooth.json (written by train.py), or None."""
    path = Path(model).expanduser() / "dreambooth.json"
    if not path.is_file():
        return None
    try:
        identifier = json.loads(path.read_text())["identifier"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} has no readable \"identifier\" ({e!r})") from None
    return identifier


def fill_identifier(prompts: list[str], model: str) -> list[str]:
    """Replace "[V]" in the prompts with the identifier the DreamBooth model was trained with."""
    if not any("[V]" in p for p in prompts):
        return prompts
    identifier = read_identifier(model)
    if identifier is None:
        raise ValueError(f"a prompt contains [V], but {model} has no dreambooth.json: it is not a "
                         "DreamBooth output of train.py. Write the identifier into the prompt yourself.")
    return [p.replace("[V]", identifier) for p in prompts]


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
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        image.save(tmp, format="PNG", pnginfo=metadata)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


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
                   help="repeatable; [V] is replaced by the identifier in the model's dreambooth.json "
                        "(default: none; give --prompt or --prompts_file)")
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
        half = autocast_dtype(torch.device(args.device), args.mixed_precision)
        pipeline = load_model(args.model, loras=loras, lora_scale=args.lora_scale, device=args.device,
                              dtype=half or torch.float32, prediction_type=args.prediction_type)
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
        if e.errno != errno.ENOSPC:
            raise
        parser.exit(1, f"error: the disk is full (writing {e.filename or args.out_dir}): free some space and "
                       "run again (the same --seed gives the same images)\n")
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
