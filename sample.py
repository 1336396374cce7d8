"""Text-to-image sampling: the project's one denoising loop (training's class images and
validation images call `generate` too).

    pipeline = load_pipeline("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")
    images = generate(pipeline, ["a photo of sks dog"] * 4, seed=0)      # list of PIL images

The steps, in order:
  1. Text: the prompts and the unconditional prompt (empty, or the negative prompt) become
     token ids and then contexts c and c_uncond, [B, 77, D].
  2. Noise: x_T ~ N(0, I), [B, 4, H/8, W/8]. Image i is seeded with seed + i through its own
     CPU torch.Generator, which also draws its step noise (DDPM, DDIM with eta > 0), so an image
     depends on its seed only, not on the batch it was made in or on the machine.
  3. Denoise: for each t of the sampler's grid, one UNet pass over [c_uncond; c] gives
     eps_uncond and eps_cond, combined by classifier-free guidance (Ho & Salimans 2022, Eq. 6):
         eps = eps_uncond + w (eps_cond - eps_uncond)
     and the sampler (DDIM or DDPM, schedulers.py) steps x_t -> x_prev. For v-prediction models
     the same formula applies to v; the scheduler turns it into x_0 and eps.
  4. Decode: x_0 / scaling_factor through the VAE decoder, [-1, 1] -> uint8 RGB.

mixed_precision: "auto" runs under bf16 autocast on CUDA GPUs that support it (else fp16) and
on CPU (bf16 matmuls are several times faster on CPUs with AMX / AVX512-BF16); "no" runs in the
weights' own dtype (fp32 unless loaded otherwise), which is what exact comparisons need.

Command line (see --help):
    python sample.py --model out/dog --prompt "a [V] dog on the beach" --num_images 4
"""
import argparse
import contextlib
import json
import secrets
import sys
import warnings
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from clip_text import BYTE_TO_UNICODE, clean_text, pre_tokenize
from load_weights import DEFAULT_MODEL, LoadError, load_pipeline
from schedulers import DDIMScheduler, DDPMScheduler, randn

SCHEDULERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler}
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


def truncated_words(tokenizer, prompt: str) -> str:
    """The part of `prompt` beyond CLIP's 77 tokens (start and end tokens included), or ""."""
    tokens = [token for piece in pre_tokenize(clean_text(prompt))
              for token in tokenizer.bpe("".join(BYTE_TO_UNICODE[b] for b in piece.encode("utf-8")))]
    cut = tokens[tokenizer.max_length - 2:]
    return tokenizer.decode([tokenizer.token_to_id(t) for t in cut]) if cut else ""


def encode_prompts(pipeline, prompts: list[str]) -> torch.Tensor:
    """Prompts -> the text context [B, 77, D]. Warns when a prompt is cut at 77 tokens."""
    for prompt in dict.fromkeys(prompts):  # each distinct prompt once
        cut = truncated_words(pipeline.tokenizer, prompt)
        if cut:
            warnings.warn(f"prompt longer than {pipeline.tokenizer.max_length} tokens; "
                          f"these words were cut: {cut!r}", stacklevel=2)
    device = next(pipeline.text_encoder.parameters()).device
    return pipeline.text_encoder(pipeline.tokenizer(prompts).to(device))


def make_sampler(pipeline, scheduler: str):
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; choose one of {sorted(SCHEDULERS)}")
    return SCHEDULERS[scheduler](pipeline.scheduler.config)


@torch.inference_mode()
def denoise(pipeline, context, uncond_context, latents, *, scheduler="ddim", steps=50,
            guidance_scale=7.5, eta=0.0, generators=None, progress=True) -> torch.Tensor:
    """Run the sampler from x_T = `latents` [B, 4, h, w] down to x_0, guided by `context` and
    `uncond_context` [B, 77, D]; returns x_0 (scaled latents, fp32). `generators`: one per
    image for the step noise (see schedulers.randn). guidance_scale 1 skips the unconditional pass.
    x_T is used as given: DDIM and DDPM start from unit-variance noise (init_noise_sigma = 1)."""
    sampler = make_sampler(pipeline, scheduler)
    sampler.set_timesteps(steps)
    unet = pipeline.unet
    unet_dtype = next(unet.parameters()).dtype
    guided = guidance_scale != 1
    if guided:
        context = torch.cat([uncond_context, context])  # one UNet pass: [uncond; cond]
    latents = latents.float()  # the sampler's arithmetic stays in fp32 under autocast
    for t in tqdm(sampler.timesteps, desc="steps", leave=False, disable=not progress):
        model_input = torch.cat([latents] * 2) if guided else latents
        model_output = unet(model_input.to(unet_dtype), t, context).float()
        if guided:
            output_uncond, output_cond = model_output.chunk(2)
            model_output = output_uncond + guidance_scale * (output_cond - output_uncond)
        step_kwargs = dict(eta=eta) if scheduler == "ddim" else {}
        latents = sampler.step(model_output, t, latents, generator=generators, **step_kwargs).prev_sample
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
    make_sampler(pipeline, scheduler)  # fail on an unknown name before any work
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
    metadata = PngInfo()
    for key, value in image.info.items():
        metadata.add_text(key, str(value))
    image.save(path, pnginfo=metadata)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Generate images with a (DreamBooth) Stable Diffusion model.")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="training output folder, Hub id, diffusers folder or single .safetensors/.ckpt file")
    p.add_argument("--prompt", action="append", default=[],
                   help="repeatable; [V] is replaced by the identifier in the model's dreambooth.json")
    p.add_argument("--prompts_file", help="a text file with one prompt per line")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--scheduler", choices=sorted(SCHEDULERS), default="ddim")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--eta", type=float, default=0.0, help="DDIM only: 0 deterministic, 1 DDPM-like noise")
    p.add_argument("--seed", type=int, default=0, help="image i of the run uses seed + i")
    p.add_argument("--num_images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    p.add_argument("--width", type=int)
    p.add_argument("--mixed_precision", choices=MIXED_PRECISION, default="auto",
                   help="auto: bf16 (fp16 on GPUs without bf16) autocast; no: fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out_dir", default="samples")
    return p


def main(argv=None) -> int:
    """Bad input ends in parser.error: a message on stderr and SystemExit(2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
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
    try:
        prompts = fill_identifier(prompts, args.model)
        # Sampling only: weights in the autocast precision. Under autocast, frozen fp32 weights
        # would be cast again at every UNet call (bench/README.md: 0.75x the time per step).
        half = autocast_dtype(torch.device(args.device), args.mixed_precision)
        pipeline = load_pipeline(args.model, device=args.device, dtype=half or torch.float32)
        image_size(pipeline, args.height, args.width)
    except (ValueError, LoadError) as e:
        parser.error(str(e))

    images = generate(pipeline, [p for p in prompts for _ in range(args.num_images)],
                      negative_prompt=args.negative_prompt, scheduler=args.scheduler, steps=args.steps,
                      guidance_scale=args.guidance_scale, eta=args.eta, seed=args.seed,
                      height=args.height, width=args.width, batch_size=args.batch_size,
                      mixed_precision=args.mixed_precision)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Number files after those already there, so that runs into one folder never overwrite.
    first = 1 + max((int(p.name[:5]) for p in out_dir.glob("[0-9][0-9][0-9][0-9][0-9]-*.png")), default=-1)
    for n, image in enumerate(images, first):
        slug = "".join(c if c.isalnum() else "_" for c in image.info["prompt"])[:48].strip("_")
        save_png(image, out_dir / f"{n:05d}-{slug}-seed{image.info['seed']}.png")
    grid_path = out_dir / f"{first:05d}-grid.png"
    grid(images, rows=len(prompts)).save(grid_path)
    print(f"wrote {len(images)} images and {grid_path} to {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
