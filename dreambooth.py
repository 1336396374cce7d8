"""DreamBooth (Ruiz et al., "DreamBooth: Fine Tuning Text-to-Image Diffusion Models for
Subject-Driven Generation", CVPR 2023), the whole method in one file.

Given 3-5 photos of a subject, fine-tune every UNet weight of a text-to-image model so that
"a photo of [V] dog" draws *this* dog, while "a photo of a dog" still draws any dog:

  1. A rare-token identifier [V] (section 3.2): a short token with little prior meaning, so the
     model can bind the subject to it without unlearning a word it knows.
  2. Prompts: "a photo of [V] dog" for the subject, "a photo of dog" for its class (section 3.2).
  3. Autogenous class images (section 3.3): the FROZEN model's own samples of the class prompt.
  4. The data: the subject's photos, each paired with a class image.
  5. The class-specific prior-preservation loss (Eq. 2): the usual denoising loss on the subject,
     plus lambda times the same loss on the class images, which keeps the class prior (and the
     diversity of its samples) from drifting towards the subject ("language drift").

Practitioners' additions, each off by default and marked where it lives: a caption per photo
(section 2), min-SNR loss weighting (section 5). Offset noise and several subjects in one run are
train.py's (they are about drawing the batches).

train.py turns these parts into a command-line trainer (optimizer, mixed precision, checkpoints).
"""
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

import sample
from load_weights import write_atomically

# ----------------------------------------------------------------------------------------------
# 1. The rare-token identifier (section 3.2)
#
# The paper looks up rare tokens in the vocabulary and de-tokenizes them: a random letter string
# such as "xxy5syt00" is split into letters that each carry a strong prior, and a real word
# keeps its meaning. For CLIP's byte-level BPE, a token is rare when its merge was learned late
# (merges are learned most-frequent first), so we sample among whole-word tokens of at most three
# letters whose merge rank is high. Community practice ("sks") is such a token too, but a chosen
# one: it is a rifle's name, and that prior leaks into images.

RARE_FRACTION = 0.2  # rare = among the last fifth of the merges (CLIP: ranks 39115-48893)


def rare_merge_ranks(tokenizer, fraction=RARE_FRACTION):
    """(lowest, highest) merge rank of the last `fraction` of the tokenizer's merges."""
    n = len(tokenizer.merges)
    return int(n * (1 - fraction)), n - 1


def rare_token_candidates(tokenizer, merge_ranks=None, max_letters=3):
    """Whole-word vocabulary tokens (ending in </w>) of 1..max_letters ASCII letters whose BPE
    merge rank lies in merge_ranks (default: rare_merge_ranks), rarest last."""
    low, high = merge_ranks or rare_merge_ranks(tokenizer)
    candidates = []
    for token in tokenizer.vocab:
        word = token.removesuffix("</w>")
        rank = tokenizer.merge_rank(token)
        if (token.endswith("</w>") and word.isascii() and word.isalpha() and len(word) <= max_letters
                and rank is not None and low <= rank <= high):
            candidates.append((rank, word))
    return [word for _, word in sorted(candidates)]


def choose_identifier(tokenizer, class_noun, *, seed=0, num_tokens=1, merge_ranks=None, exclude=()):
    """Sample `num_tokens` rare tokens (seeded, so a run is repeatable) and join them into [V].
    exclude: words not to draw (the identifiers and class nouns of a run's other subjects)."""
    taken = set(class_noun.lower().split()) | {w.lower() for words in exclude for w in words.split()}
    candidates = [w for w in rare_token_candidates(tokenizer, merge_ranks) if w not in taken]
    if len(candidates) < num_tokens:
        raise ValueError(f"only {len(candidates)} rare tokens in merge ranks "
                         f"{merge_ranks or rare_merge_ranks(tokenizer)}: widen the range")
    identifier = " ".join(random.Random(seed).sample(candidates, num_tokens))
    check_identifier(tokenizer, identifier, class_noun)
    return identifier


def check_identifier(tokenizer, identifier, class_noun, template="a photo of {identifier} {class_noun}"):
    """The identifier must reach the model as its own tokens: the prompt must tokenize to the
    identifier's tokens followed by the class noun's, and the two must differ. Returns the
    identifier's token ids."""
    def pieces(text):
        return tokenizer.encode(text)[1:-1]  # without the start and end tokens
    identifier_ids, class_ids = pieces(identifier), pieces(class_noun)
    prompt_ids = pieces(template.format(identifier=identifier, class_noun=class_noun))
    if not identifier_ids or identifier_ids == class_ids or set(identifier_ids) <= set(class_ids):
        raise ValueError(f"identifier {identifier!r} is empty or is the class noun {class_noun!r}; "
                         "pick a short rare word (or leave --identifier out to draw one)")
    n = len(identifier_ids)
    if not any(prompt_ids[i:i + n] == identifier_ids and prompt_ids[i + n:i + n + len(class_ids)] == class_ids
               for i in range(len(prompt_ids))):
        raise ValueError(f"identifier {identifier!r} does not keep its tokens inside the prompt "
                         f"{template.format(identifier=identifier, class_noun=class_noun)!r}; "
                         "use letters only, separated from the class noun by a space")
    return identifier_ids


def warn_if_common(tokenizer, identifier):
    """A user-chosen identifier may carry a prior of its own: say so when it is not rare."""
    ranks = [tokenizer.merge_rank(tokenizer.id_to_token(i)) for i in tokenizer.encode(identifier)[1:-1]]
    common = [r for r in ranks if r is None or r < rare_merge_ranks(tokenizer)[0]]
    note = f"is made of frequent tokens (merge ranks {ranks})" if common else "is a chosen word"
    print(f"note: identifier {identifier!r} {note}; it may carry a meaning of its own that leaks "
          "into images (e.g. 'sks' is a rifle). Leave --identifier out to draw a rare token.", file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# 2. Prompts (section 3.2): "a [identifier] [class noun]". The class noun ties the subject to
# the model's prior of its class (Table 4: a wrong or missing class noun hurts fidelity).

INSTANCE_TEMPLATE = "a photo of {identifier} {class_noun}"
CLASS_TEMPLATE = "a photo of {class_noun}"


def make_prompts(identifier, class_noun, instance_template=INSTANCE_TEMPLATE, class_template=CLASS_TEMPLATE):
    return (instance_template.format(identifier=identifier, class_noun=class_noun),
            class_template.format(identifier=identifier, class_noun=class_noun))


# A caption per photo (common practice after the paper, e.g. kohya-ss/sd-scripts' caption files):
# photo.txt beside photo.jpg holds that photo's instance prompt, [V] standing for the identifier,
# e.g. "a photo of [V] dog on the sofa". Words for what else a photo shows (the sofa, the night)
# give those parts of the image a name of their own, so that [V] binds to the subject rather than
# to its usual surroundings. A photo without a caption, or with an empty one, uses the template.

IDENTIFIER_SLOT = "[V]"


def read_caption(image_path):
    """The caption beside an image (photo.jpg -> photo.txt), its whitespace collapsed to single
    spaces, or None when there is none or it is empty."""
    path = Path(image_path).with_suffix(".txt")
    if not path.is_file():
        return None
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    return " ".join(text.split()) or None


def caption_prompt(caption, identifier):
    """A caption as the prompt it trains: [V] replaced by the identifier."""
    return caption.replace(IDENTIFIER_SLOT, identifier)


# ----------------------------------------------------------------------------------------------
# 3. Autogenous class images (section 3.3): the frozen model's samples of the class prompt,
# generated once with the project's one sampler and cached in a folder. Only the shortfall is
# generated; image i always comes from seed + i, so an interrupted run resumes where it stopped.

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def image_problem(path):
    """Why an image file cannot be read, or None when it can."""
    try:
        with Image.open(path) as image:
            image.load()
        return None
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        return str(e) or type(e).__name__


def ensure_class_images(pipeline, class_dir, class_prompt, num_images, *, seed=0, batch_size=4,
                        rank=0, world_size=1, barrier=lambda: None, progress=True, **sampler_args):
    """Make class_dir hold num_images readable images of class_prompt and return their paths.
    Unreadable files (an interrupted write, a corrupt download) are replaced, not fatal.
    sampler_args go to sample.generate (steps, scheduler, guidance_scale, mixed_precision, ...).
    With several processes (rank of world_size; `barrier` waits for all of them), each
    generates one contiguous share of the shortfall, and all return the full set. progress: a
    bar of this process's images (done / total, time left)."""
    class_dir = Path(class_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        for path in sorted(class_dir.iterdir()):
            if path.suffix.lower() in IMAGE_SUFFIXES and image_problem(path):
                print(f"replacing unreadable class image {path}", file=sys.stderr)
                path.unlink()
    barrier()  # every rank plans from the same folder contents...
    names = {p.name for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    # image i is class-{i:05d}.png, from seed + i; images the user put there count too
    missing = [i for i in range(num_images) if f"class-{i:05d}.png" not in names]
    todo = missing[:max(0, num_images - len(names))]
    barrier()  # ...before any rank writes to it
    if todo and rank == 0:
        print(f"generating {len(todo)} class images of {class_prompt!r} in {class_dir}", file=sys.stderr)
    share = -(-len(todo) // world_size)  # ceil
    todo = todo[rank * share:(rank + 1) * share]
    bar = tqdm(total=len(todo), desc="class images", unit="image", disable=not (progress and todo))
    for start in range(0, len(todo), batch_size):
        chunk = todo[start:start + batch_size]
        # generate() seeds image k of a call with seed + k: one call per run of consecutive indices
        runs = [[chunk[0]]]
        for i in chunk[1:]:
            (runs[-1].append(i) if i == runs[-1][-1] + 1 else runs.append([i]))
        for run in runs:
            images = sample.generate(pipeline, [class_prompt] * len(run), seed=seed + run[0],
                                     batch_size=batch_size, progress=False, **sampler_args)
            for i, image in zip(run, images):
                # never a half-written image under its final name
                write_atomically(class_dir / f"class-{i:05d}.png", lambda tmp: image.save(tmp, format="PNG"))  # noqa: B023
            bar.update(len(run))
    bar.close()
    barrier()
    return sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:num_images]


# ----------------------------------------------------------------------------------------------
# 4. The data: the subject's photos and the class images, as tensors in [-1, 1].


def to_8_bit(image):
    """Grey images of 16-bit or 32-bit integers, or of floats, scaled to 8 bits as a viewer shows
    them (PIL's own convert("RGB") clips them, so a 16-bit photo would turn white): 16-bit and
    integers up to 65535 by 255/65535, larger integers by 255/(2^32 - 1), floats in [0, 1] by 255
    (other floats are taken as 0-255)."""
    if image.mode not in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and values.max() <= 1.0 else 1.0
    else:
        scale = 255.0 / (65535 if image.mode.startswith("I;16") or values.max(initial=0) <= 65535 else 2**32 - 1)
        values = values - min(0.0, values.min(initial=0))  # signed 32-bit: shift negatives up
    return Image.fromarray(np.clip(np.round(values * scale), 0, 255).astype(np.uint8), mode="L")


def open_rgb(path):
    """An image the way a photo is meant to be seen: EXIF orientation applied; 16-bit, 32-bit
    and float grey images scaled to 8 bits; alpha, grey and palette images made RGB,
    transparency on white."""
    with Image.open(path) as image:
        image = to_8_bit(ImageOps.exif_transpose(image))
        if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        return image.convert("RGB")


def load_image(path, resolution, *, center_crop=True, rng=None):
    """open_rgb, then resize the shorter side to `resolution` and crop a square (centre, or
    random with `rng`). Returns [3, resolution, resolution] in [-1, 1]."""
    return load_image_and_sizes(path, resolution, center_crop=center_crop, rng=rng)[0]


def load_image_and_sizes(path, resolution, *, center_crop=True, rng=None):
    """load_image, and SDXL's size conditioning of the image it returns (Podell et al., 2023,
    section 2.2), [2, 6] (the UNet's time_ids): original height and width (the photo's size
    before the resize), the crop's top-left corner (top, left) in the resized photo, and the
    target size (resolution, resolution). Row 0 is the image as cropped, row 1 the same image
    mirrored: its crop's left edge counted from the mirrored photo's left, as diffusers'
    SDXL trainer (which flips, then crops) records it."""
    image = open_rgb(path)
    original = (image.height, image.width)
    scale = resolution / min(image.size)
    size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
    image = image.resize(size, Image.BICUBIC)
    if center_crop:
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    else:
        rng = rng or random
        left, top = rng.randint(0, image.width - resolution), rng.randint(0, image.height - resolution)
    sizes = torch.tensor([[*original, top, left, resolution, resolution],
                          [*original, top, image.width - resolution - left, resolution, resolution]],
                         dtype=torch.float32)
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return pixels / 127.5 - 1, sizes


def list_images(folder, what="instance"):
    """The readable images of a folder. Unreadable ones are named with the reason and skipped;
    a folder with none to train on is an error."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} is a file: give the folder that holds the photos")
    if not folder.is_dir():
        raise FileNotFoundError(f"{what} folder {folder} does not exist")
    paths = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise FileNotFoundError(f"{what} folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    problems = {p.name: why for p in paths if (why := image_problem(p))}
    report = "; ".join(f"{name}: {why}" for name, why in problems.items())
    if len(problems) == len(paths):
        raise FileNotFoundError(f"none of the {len(paths)} images in {what} folder {folder} can be read ({report})")
    if problems:
        print(f"warning: skipping unreadable {what} images ({report})", file=sys.stderr)
    return [p for p in paths if p.name not in problems]


class DreamBoothData:
    """Instance images paired one to one with class images, as in the paper's training batches:
    item k is (instance image k mod N, class image k mod M). flip: random horizontal flips.
    Each item takes its own random source, so an item's crop and flip do not depend on which
    batch (or which GPU) loads it."""

    def __init__(self, instance_paths, class_paths, resolution, *, center_crop=True, flip=False):
        self.instance_paths, self.class_paths = list(instance_paths), list(class_paths)
        self.resolution, self.center_crop, self.flip = resolution, center_crop, flip

    def __len__(self):
        return max(len(self.instance_paths), len(self.class_paths))

    def _image(self, path, rng):
        """(the image [3,H,W], its size conditioning [6], see load_image_and_sizes)."""
        image, sizes = load_image_and_sizes(path, self.resolution, center_crop=self.center_crop, rng=rng)
        return (image.flip(-1), sizes[1]) if self.flip and rng.random() < 0.5 else (image, sizes[0])

    def item(self, k, rng):
        """(instance image [3,H,W], class image [3,H,W] or None) of item k."""
        instance, klass = self.sized_item(k, rng)
        return instance[0], klass[0] if klass else None

    def sized_item(self, k, rng):
        """item k with each image's SDXL size conditioning [6]: ((instance image, its sizes),
        (class image, its sizes) or None)."""
        instance = self._image(self.instance_paths[k % len(self.instance_paths)], rng)
        if not self.class_paths:
            return instance, None
        return instance, self._image(self.class_paths[k % len(self.class_paths)], rng)


class LatentDistribution:
    """The VAE posterior q(z | x) of images, kept as mean and std: a cached posterior still
    gives a fresh latent sample every step, without running the encoder again (diffusers'
    trainer re-encodes every image every step, a third of its step time)."""

    def __init__(self, mean, std):
        self.mean, self.std = mean, std

    @classmethod
    def encode(cls, vae, images):
        posterior = vae.encode(images)
        return cls(posterior.mean, posterior.std)

    def sample(self, noise, scaling_factor):
        """z = (mean + std * noise) * scaling_factor, the scaled latent SD's UNet works on."""
        return (self.mean + self.std * noise.to(self.mean.dtype)) * scaling_factor


# ----------------------------------------------------------------------------------------------
# 5. The loss (Eq. 2)
#
#   E[ w_t || x^(a_t x + s_t e, c) - x ||^2  +  lambda w_t' || x^(a_t' x_pr + s_t' e', c_pr) - x_pr ||^2 ]
#
# written, as Stable Diffusion is trained, as a noise (or velocity) prediction loss on VAE latents:
# the first term fits the subject's latents under "a photo of [V] dog", the second the class
# images' latents under "a photo of dog". Both halves go through the UNet as ONE batch.
#
# Min-SNR weighting (optional; Hang et al., 2023, "Efficient Diffusion Training via Min-SNR
# Weighting Strategy", arXiv 2303.09556): the timesteps' losses pull the weights in conflicting
# directions, and the nearly noise-free ones, easy but numerous, dominate. The paper weights the
# x_0 loss of timestep t by min(SNR(t), gamma), SNR(t) = abar_t / (1 - abar_t), which caps the
# weight of the low-noise steps (gamma = 5 is the paper's and diffusers' choice). Written for the
# target the model predicts (an eps loss is SNR times the x_0 loss, a v loss SNR + 1 times):
#
#   w_t = min(SNR(t), gamma) / SNR(t)         eps targets
#   w_t = min(SNR(t), gamma) / (SNR(t) + 1)   v targets
#   w_t = min(SNR(t), gamma)                  x_0 targets
#
# and applied to both terms of Eq. 2: each sample's MSE times its w_t, then the mean over samples.


def min_snr_weights(noise_schedule, timesteps, gamma):
    """The min-SNR-gamma weight w_t of each timestep [B] for the schedule's prediction type (above)."""
    alpha_bar = noise_schedule.alphas_cumprod.to(timesteps.device)[timesteps].float()
    snr = alpha_bar / (1 - alpha_bar)
    clamped = torch.clamp(snr, max=gamma)
    kind = noise_schedule.config.prediction_type
    if kind == "epsilon":
        return clamped / snr
    if kind == "v_prediction":
        return clamped / (snr + 1)
    return clamped  # "sample": the model predicts x_0


def prior_preservation_loss(unet, noise_schedule, instance_latents, instance_context,
                            class_latents=None, class_context=None, prior_loss_weight=1.0, *,
                            noise=None, timesteps=None, generator=None, snr_gamma=None, added_cond=None):
    """Returns (loss, instance_loss, prior_loss); prior_loss is 0 without class latents.
    latents: scaled VAE latents [B, 4, h, w]; context: text-encoder output [B, 77, D].
    noise and timesteps (for the instance then the class latents) are drawn from `generator`
    unless given: train.py draws them itself so that every GPU sees the same random stream.
    snr_gamma: min-SNR weighting of both terms (above); None: the plain MSE of Eq. 2.
    added_cond: SDXL's pooled text embeddings and size numbers ({"text_embeds", "time_ids"}),
    rows as the concatenated latents (instance rows, then class rows); None for SD 1.x/2.x."""
    latents, context = instance_latents, instance_context
    if class_latents is not None:
        latents = torch.cat([instance_latents, class_latents])
        context = torch.cat([instance_context, class_context])
    # x_t = a_t x + s_t e, with e ~ N(0, I) and t uniform over the training timesteps (DDPM Eq. 4)
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else None)
    if timesteps is None:
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator, device=generator.device if generator else None)
    noise, timesteps = noise.to(latents.device, latents.dtype), timesteps.to(latents.device)
    noisy_latents = noise_schedule.add_noise(latents, noise, timesteps)
    extra = {} if added_cond is None else {"added_cond": added_cond}  # SD 1.x/2.x UNets take none
    prediction = unet(noisy_latents, timesteps, context, **extra).float()
    target = noise_schedule.training_target(latents, noise, timesteps).float()  # e, or v for v-models
    n, prior = instance_latents.shape[0], class_latents is not None
    if snr_gamma is None:  # Eq. 2 as written: the mean squared error of each term
        instance_loss = F.mse_loss(prediction[:n], target[:n])
        prior_loss = F.mse_loss(prediction[n:], target[n:]) if prior else None
    else:  # each sample's MSE [B] times its w_t, then the mean of each term
        weights = min_snr_weights(noise_schedule, timesteps, snr_gamma)
        weighted = (prediction - target).square().mean(dim=tuple(range(1, prediction.ndim))) * weights
        instance_loss = weighted[:n].mean()
        prior_loss = weighted[n:].mean() if prior else None
    if not prior:
        return instance_loss, instance_loss.detach(), torch.zeros((), device=latents.device)
    return instance_loss + prior_loss_weight * prior_loss, instance_loss.detach(), prior_loss.detach()


if __name__ == "__main__":  # a quick look at the identifiers a vocabulary offers
    if len(sys.argv) != 2:
        sys.exit("usage: python dreambooth.py TOKENIZER_FOLDER")
    from clip_text import CLIPTokenizer
    tok = CLIPTokenizer.from_folder(sys.argv[1])
    words = rare_token_candidates(tok)
    print(f"{len(words)} rare identifiers in merge ranks {rare_merge_ranks(tok)}, e.g.:", " ".join(words[-40:]))
