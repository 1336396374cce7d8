"""Pretrain the toy Stable Diffusion on the toy world, from scratch, on a laptop CPU.

The model is made of the project's own classes (vae.VAE, unet.UNet, clip_text.CLIPTextModel and
CLIPTokenizer, schedulers.DDPMScheduler) with tiny configs, and is trained the way Stable
Diffusion was (Rombach et al., 2022), in three stages:

  1. Tokenizer: byte-level BPE learned on the captions (toy/bpe.py), plus a few made-up words
     that never occur in a caption: the rare identifiers DreamBooth needs.
  2. VAE: 32x32x3 images <-> 16x16x8 latents, trained alone on reconstruction (L1 + MSE) with a
     small KL term (LDM section 3.1), on the world's images and as many of any colour and
     pattern (world.random_codec_scene, half of their colours near a corner of the RGB cube:
     near-white, near-black), so that it also encodes the subjects' photos (pretrain.json
     records how many of each subject's photos keep their paint through the VAE alone); then
     scaling_factor = 1 / std of the latents, so the diffusion model sees unit-variance data
     (LDM section 4.3.2; SD's is 0.18215).
  3. UNet, on the denoising loss (DDPM; the same function DreamBooth uses,
     dreambooth.prior_preservation_loss, without class images) over the frozen VAE's latents,
     conditioned by a text encoder that stays frozen, as SD's CLIP and Imagen's T5 are: here at
     its random initialisation, one vector per word (no layers, no positions: TEXT_CONFIG), which
     already tells every word apart. (Trained jointly from
     scratch, the encoder let the nouns collapse together and the UNet never learned shapes:
     toy/README.md.) 10% of captions are empty (toy/world.py) for classifier-free guidance. An
     exponential moving average of the weights is what gets saved.

The result is written with load_weights.save_pipeline: a diffusers-layout folder that our
loader, diffusers' StableDiffusionPipeline and `--model toy` open, with pretrain.json: the
arguments, the time of each stage and how well the model draws what its captions say
(toy/prior.py: shape, colour and context read back from the pixels of 280 samples).

    python -m toy.pretrain --threads 1            # writes toy/model: about 64 min on one CPU thread
    python -m toy.pretrain --vae toy/model --out /tmp/m   # the UNet stage alone, on the shipped VAE
    python -m toy.pretrain --out /tmp/m --vae_steps 200 --unet_steps 300    # a smoke run
"""
import argparse
import copy
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, when run as a script

import dreambooth  # noqa: E402
import sample  # noqa: E402
from clip_text import CLIPTextConfig, CLIPTextModel  # noqa: E402
from load_weights import Pipeline, load_pipeline, save_pipeline  # noqa: E402
from schedulers import DDPMScheduler, SchedulerConfig  # noqa: E402
from toy import bpe, metrics, prior, world  # noqa: E402
from unet import UNet, UNetConfig  # noqa: E402
from vae import VAE, VAEConfig  # noqa: E402

HERE = Path(__file__).resolve().parent
MAX_TOKENS = 16  # the longest caption is 11 tokens with start and end; SD's CLIP has 77 positions

# The tiny configs. Same classes and config keys as Stable Diffusion's, scaled down:
#   SD 1.5: VAE (128, 256, 512, 512) 8x down, UNet (320, 640, 1280, 1280), CLIP 768 x 12 layers.
VAE_CONFIG = VAEConfig(
    block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=8,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    sample_size=world.SIZE)  # 32x32x3 pixels -> 16x16x8 latents; scaling_factor is measured below
# 8 latent channels (SD has 4) keep the codec nearly lossless: a 2x2 pixel block (12 numbers)
# becomes 8, so the subjects' stripes and eyes survive the round trip.
UNET_CONFIG = UNetConfig(
    in_channels=VAE_CONFIG.latent_channels, out_channels=VAE_CONFIG.latent_channels,
    block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=16,
    # cross-attention at 8x8 and 4x4 latent cells (4x4 and 8x8 pixels each): enough to place an
    # object and colour it; the 16x16 level is convolutions only (attention there doubles the cost)
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2, 2), cross_attention_dim=64, sample_size=world.SIZE // 2)
# The text encoder is CLIP's embedding layer and final LayerNorm, no transformer layers, and (set in
# init_text_encoder) no position embeddings: frozen, it gives each word one vector wherever it stands,
# as a pretrained CLIP nearly does ("at night" means night after "[V] circle" too). A random
# 2-layer CLIP mixed every word into the later ones, so putting the identifier in moved "at night"
# as far as changing the context did, and a fine-tuning on "a photo of [V] circle" redrew the night
# as grass (toy/README.md); the UNet's cross-attention reads the words as a set, which the toy's
# captions (one object, one colour, one context) need no more than.
TEXT_CONFIG = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=0, num_attention_heads=4,
                   max_position_embeddings=MAX_TOKENS, hidden_act="quick_gelu",
                   projection_dim=64)  # + vocab_size; projection_dim only names the (unused) pooled width
# DDPM's linear schedule rather than SD's scaled_linear: at these tiny latent sizes SD's schedule
# leaves too much signal at t = 999 (the mean colour of a 16x16 latent survives the noise).
# v-prediction (as SD 2.1): the noise-prediction loss weighs the x_0 error by the signal-to-noise
# ratio, which is almost 0 at the high noise levels where the prompt decides the layout and
# colours; the v loss weighs it by SNR + 1, so the text conditioning is learned in far fewer steps.
SCHEDULER_CONFIG = SchedulerConfig(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02,
    prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False, clip_sample=False)

PREVIEW_PROMPTS = ["a photo of a red square on the grass", "a photo of a blue circle in the snow",
                   "a photo of a yellow triangle at night", "a photo of a purple star on the sand",
                   "a photo of circle", "a green star in the sky"]


def log(message, start):
    print(f"[{time.time() - start:7.1f}s] {message}", flush=True)


def to_pixels(images_uint8):
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1


def cosine_lr(step, total, warmup, peak, floor=0.1):
    """Linear warm-up, then cosine decay to floor * peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def update_ema(ema, model, decay):
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def write_preview(pipeline, path, per_prompt=6):
    """A grid of samples (rows: PREVIEW_PROMPTS), scaled up 2x."""
    images = sample.generate(pipeline, [p for p in PREVIEW_PROMPTS for _ in range(per_prompt)], seed=0, steps=25,
                             guidance_scale=5.0, mixed_precision="no", progress=False, batch_size=12)
    sheet = sample.grid(images, rows=len(PREVIEW_PROMPTS))
    sheet.resize((sheet.width * 2, sheet.height * 2)).save(path)


# ----------------------------------------------------------------------------------------------
# Stage 2: the VAE


def train_vae(images, steps, batch_size, lr, kl_weight, generator, start, seed):
    torch.manual_seed(seed)  # the initial weights: one command, one model
    vae = VAE(VAE_CONFIG)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, steps, steps // 20 + 1, lr)
        x = to_pixels(images[torch.randint(0, len(images), (batch_size,), generator=generator)])
        posterior = vae.encode(x)
        reconstruction = vae.decode(posterior.sample(generator))
        # KL(q(z|x) || N(0, I)) per latent element (LDM's regulariser, weighted small)
        kl = 0.5 * (posterior.mean ** 2 + posterior.std ** 2 - 1 - posterior.logvar).mean()
        l1, mse = (reconstruction - x).abs().mean(), F.mse_loss(reconstruction, x)
        loss = l1 + mse + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step + 1}/{steps} l1 {l1.item():.4f} mse {mse.item():.5f} kl {kl.item():.3f}", start)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def subject_round_trip(vae):
    """{subject: how many of its photos keep their paint (metrics.keeps_paint) through the VAE's
    encode and decode alone}: a subject the codec cannot carry, no fine-tuning can draw."""
    kept = {}
    for name, subject in world.SUBJECTS.items():
        photos = torch.from_numpy(np.stack([np.asarray(image) for image in world.subject_images(name)]))
        decoded = vae.decode(vae.encode(to_pixels(photos)).mean)
        decoded = ((decoded.clamp(-1, 1) + 1) * 127.5).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()
        kept[name] = sum(metrics.keeps_paint(image, subject) for image in decoded)
    return kept


@torch.no_grad()
def encode_all(vae, images, batch_size=500):
    """The VAE posterior of every image, as one dreambooth.LatentDistribution (unscaled)."""
    parts = [dreambooth.LatentDistribution.encode(vae, to_pixels(images[i:i + batch_size]))
             for i in range(0, len(images), batch_size)]
    return dreambooth.LatentDistribution(torch.cat([p.mean for p in parts]), torch.cat([p.std for p in parts]))


# ----------------------------------------------------------------------------------------------
# Stage 3: UNet and text encoder


def init_text_encoder(config, seed):
    """CLIP's initialisation of the token embeddings (std 0.02), and position embeddings of zero:
    a word's vector does not depend on where it stands (TEXT_CONFIG). Frozen by default; trained
    jointly, the tokens that never occur in a caption (the rare identifiers) still keep this
    initial embedding: they get no gradient."""
    torch.manual_seed(seed)
    model = CLIPTextModel(config)
    embeddings = model.text_model.embeddings
    torch.nn.init.normal_(embeddings.token_embedding.weight, std=0.02)
    torch.nn.init.zeros_(embeddings.position_embedding.weight)
    return model


def train_unet(latents, scaling_factor, scenes, tokenizer, args, generator, start, snapshot=None):
    """Returns the EMA copies of the UNet and text encoder, and the losses. snapshot(unet,
    text_encoder, step), if given, is called with the EMA copies every args.snapshot_every steps."""
    torch.manual_seed(args.seed)
    unet = UNet(UNET_CONFIG)
    text_encoder = init_text_encoder(CLIPTextConfig(vocab_size=tokenizer.vocab_size, **TEXT_CONFIG), args.seed)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    if args.freeze_text_encoder:  # as SD's CLIP and Imagen's T5 are frozen: here at its random init
        text_encoder.requires_grad_(False)
    parameters = [p for p in [*unet.parameters(), *text_encoder.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=args.lr, weight_decay=0.01)
    schedule = DDPMScheduler(SCHEDULER_CONFIG)
    rng = random.Random(args.seed)  # captions
    losses = []
    for step in range(args.unet_steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, args.unet_steps, args.warmup_steps, args.lr)
        index = torch.randint(0, len(scenes), (args.batch_size,), generator=generator)
        x0 = dreambooth.LatentDistribution(latents.mean[index], latents.std[index]).sample(
            torch.randn(latents.mean[index].shape, generator=generator), scaling_factor)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.mixed_precision == "bf16"):
            context = text_encoder(tokenizer([world.caption(scenes[i], rng) for i in index.tolist()]))
            loss, _, _ = dreambooth.prior_preservation_loss(unet, schedule, x0, context, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        decay = min(args.ema_decay, (1 + step) / (10 + step))  # short memory early on
        update_ema(ema_unet, unet, decay)
        if not args.freeze_text_encoder:  # a frozen encoder is its own average
            update_ema(ema_text, text_encoder, decay)
        losses.append(loss.item())
        if step % 100 == 0 or step == args.unet_steps - 1:
            recent = sum(losses[-100:]) / len(losses[-100:])
            log(f"unet step {step + 1}/{args.unet_steps} loss {recent:.4f} lr {optimizer.param_groups[0]['lr']:.2e}", start)
        if snapshot and args.snapshot_every and (step + 1) % args.snapshot_every == 0 and step + 1 < args.unet_steps:
            snapshot(ema_unet, ema_text, step + 1)
    return ema_unet.eval(), ema_text.eval(), losses


# ----------------------------------------------------------------------------------------------


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=sample.DefaultsHelpFormatter)
    p.add_argument("--out", default=str(HERE / "model"), help="the diffusers-layout folder to write")
    p.add_argument("--num_images", type=int, default=30000, help="world images rendered for training")
    p.add_argument("--num_codec_images", type=int, default=20000, help="images of any colour and pattern for the VAE")
    p.add_argument("--vae_steps", type=int, default=5000, help="VAE training steps (stage 2)")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate (cosine schedule)")
    p.add_argument("--vae_batch_size", type=int, default=32, help="VAE images per step")
    p.add_argument("--kl_weight", type=float, default=1e-4, help="weight of the VAE's KL term beside L1 + MSE")
    p.add_argument("--unet_steps", type=int, default=12000, help="UNet (and text encoder) training steps (stage 3)")
    p.add_argument("--lr", type=float, default=1e-3, help="UNet and text encoder peak learning rate")
    p.add_argument("--warmup_steps", type=int, default=300, help="linear learning-rate warm-up of stage 3")
    p.add_argument("--batch_size", type=int, default=32, help="captioned images per UNet step")
    p.add_argument("--ema_decay", type=float, default=0.999, help="decay of the weights' moving average that is saved")
    p.add_argument("--seed", type=int, default=0, help="seeds the world's images, the captions and every weight")
    p.add_argument("--freeze_text_encoder", action=argparse.BooleanOptionalAction, default=True,
                   help="keep the text encoder at its random initialisation and train the UNet alone; "
                        "--no-freeze_text_encoder trains both jointly (the encoder's word embeddings and final "
                        "norm; trained so, the earlier toys' 2-layer encoder let the nouns collapse)")
    p.add_argument("--mixed_precision", choices=("no", "bf16"), default="bf16",
                   help="bf16 autocast for the UNet stage (the weights stay fp32; about 25%% faster on a CPU with "
                        "AVX512-BF16)")
    p.add_argument("--world", choices=world.WORLDS, default="plain",
                   help="the world to learn: plain, or lit (circles and stars shine at night: toy/world.py)")
    p.add_argument("--vae", help="reuse the VAE of a toy pipeline folder written by this script (skips stage 2, "
                                 "13 min; the UNet stage then draws another random stream than a full run's) "
                                 "(default: train a new one)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (1 is the safe choice on a busy machine: two threads that wait on "
                        "each other slow to a crawl when other jobs share the cores)")
    p.add_argument("--preview", help="also write a grid of samples of a few prompts here (PNG) (default: none)")
    p.add_argument("--prior_seeds", type=int, default=2,
                   help="samples per caption for the accuracy recorded in pretrain.json (toy/prior.py; 0: skip it)")
    p.add_argument("--snapshot_every", type=int, default=0,
                   help="save the model so far to --out (and a preview PREVIEW-stepN.png) every N UNet steps")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    timings = {}
    generator = torch.Generator().manual_seed(args.seed)
    world.use_world(args.world)

    images, scenes = world.make_dataset(args.num_images, seed=args.seed)
    images = torch.from_numpy(images)
    codec_images = None if args.vae else world.make_dataset(args.num_codec_images, seed=args.seed + 1,
                                                            scene=world.random_codec_scene)[0]
    timings["render_s"] = time.time() - start
    log(f"rendered {len(images)} world images" + ("" if args.vae else f" and {len(codec_images)} for the VAE only"),
        start)

    caption_rng = random.Random(args.seed + 1)
    tokenizer = bpe.train_tokenizer([world.caption(s, caption_rng) for s in scenes], max_length=MAX_TOKENS)
    log(f"BPE vocabulary: {tokenizer.vocab_size} tokens ({len(tokenizer.merges)} merges); rare identifiers "
        f"in merge ranks {bpe.rare_merge_ranks(tokenizer)}", start)

    t = time.time()
    if args.vae:
        vae = load_pipeline(args.vae).vae.eval().requires_grad_(False)
    else:
        vae = train_vae(torch.cat([images, torch.from_numpy(codec_images)]), args.vae_steps, args.vae_batch_size,
                        args.vae_lr, args.kl_weight, generator, start, args.seed)
    latents = encode_all(vae, images)
    if not args.vae:
        # 1 / std of the latent samples, as LDM set SD's 0.18215; rounded like it
        samples = latents.sample(torch.randn(latents.mean.shape, generator=generator), 1.0)
        vae.config.scaling_factor = float(f"{1 / samples.std().item():.4g}")
    timings["vae_s"] = time.time() - t
    round_trip = subject_round_trip(vae)
    log(f"VAE done; scaling_factor {vae.config.scaling_factor}; subjects' photos that keep their paint through "
        f"the VAE: {round_trip} of {world.SUBJECT_IMAGES}", start)

    def save(unet, text_encoder, step=None):
        special = {"bos_token_id": tokenizer.start_id, "eos_token_id": tokenizer.end_id, "pad_token_id": tokenizer.pad_id}
        pipeline = Pipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet, vae=vae,
                            scheduler=DDPMScheduler(SCHEDULER_CONFIG), source="toy",
                            raw_configs={"text_encoder": special})
        save_pipeline(pipeline, args.out)
        if args.preview:
            path = Path(args.preview) if step is None else Path(args.preview).with_name(
                f"{Path(args.preview).stem}-step{step}.png")
            write_preview(pipeline, path)
            log(f"saved {args.out} and {path}", start)
        return pipeline

    t = time.time()
    unet, text_encoder, losses = train_unet(latents, vae.config.scaling_factor, scenes, tokenizer, args, generator, start,
                                            snapshot=save)
    timings["unet_s"] = time.time() - t
    timings["total_s"] = time.time() - start
    timings["cpu_s"] = time.process_time()  # CPU time of this process: wall time under other jobs' load says little
    pipeline = save(unet, text_encoder)
    accuracy = None
    if args.prior_seeds:
        accuracy = prior.caption_accuracy(pipeline, seeds=args.prior_seeds)
        log(prior.report(accuracy), start)
    out = Path(args.out)
    record = {"args": vars(args), "seconds": {k: round(v, 1) for k, v in timings.items()},
              "threads": torch.get_num_threads(), "final_loss_mean_last_200": sum(losses[-200:]) / len(losses[-200:]),
              "rare_merge_ranks": bpe.rare_merge_ranks(tokenizer), "subject_round_trip": round_trip,
              "caption_accuracy": accuracy}
    (out / "pretrain.json").write_text(json.dumps(record, indent=2))
    log(f"wrote {out} ({timings['total_s'] / 60:.1f} min of training)", start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
