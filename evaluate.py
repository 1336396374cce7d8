"""Evaluate a DreamBooth model with the paper's protocol (Ruiz et al., 2023, section 4.1).

    python evaluate.py --model out/dog --instance_dir dog/
    python evaluate.py --compare out/dog/evaluation.json out/dog-no-prior/evaluation.json

For one subject, the fine-tuned model draws 4 images for each of the paper's 25 prompts (the
object list, or the live-subject list for cats and dogs: eval_prompts.json), e.g. "a [V] dog in
the jungle", and the images are scored against the subject's real photos:

  DINO    subject fidelity: cosine similarity of DINO ViT-S/16 embeddings, averaged over every
          (generated, real) pair. DINO is self-supervised without labels, so unlike a classifier
          it tells two dogs of the same breed apart (section 4.1).
  CLIP-I  subject fidelity: the same with CLIP image embeddings.
  CLIP-T  prompt fidelity: cosine of each image's CLIP embedding with its prompt's CLIP text
          embedding, averaged. The prompt is scored WITHOUT the identifier ("a dog in the
          jungle"): [V] is a rare token that means nothing to CLIP, so leaving it in would only
          add noise; the class noun and the context are what the image should show.
  PRES    language drift (Table 3; lower is better): DINO between the model's images of the
          same prompts without the identifier ("a dog in the jungle") and the real subject. A
          model that drifted draws *this* dog for every dog.
  DIV     diversity (Table 3; higher is better). The paper's DIV is the mean LPIPS distance
          between images of the same prompt; LPIPS needs pretrained AlexNet/VGG weights plus its
          learned heads, which this project does not ship. We report a SUBSTITUTE, labelled as such
          everywhere: 1 - mean pairwise DINO cosine among the images of one prompt, averaged over
          prompts. It rises with diversity as LPIPS does, but its values are not LPIPS values.
Also reported: DINO and CLIP-I among the real photos themselves (Table 1's "Real Images" row,
the ceiling of subject fidelity).

Encoders (vision.py, hand-written): --dino (default facebook/dino-vits16) and --clip (default
openai/clip-vit-base-patch32, the CLIP that Textual Inversion's and later subject-driven papers'
CLIP scores use; the paper does not say which it used), each a Hub id or a local folder.
--random_encoders uses tiny random encoders instead, for offline smoke runs: their numbers are
not comparable to anything.

Images are made with sample.generate (DDIM, 50 steps, guidance 7.5 by default); image i of a set
uses seed + i, and the class-prompt images use the same seeds as the subject images.
"""
import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import dreambooth
import lora
import sample
from clip_text import CLIPTokenizer
from load_weights import LoadError, write_atomically
from vision import (CLIP_MODEL, DINO_MODEL, TINY_CLIP, TINY_DINO, CLIPTextModelWithProjection,
                    CLIPVisionModelWithProjection, ViTModel, load_clip, load_dino, preprocess, random_encoder)

PROMPTS_FILE = Path(__file__).with_name("eval_prompts.json")
DIV_SUBSTITUTE = "1 - mean pairwise DINO cosine among same-prompt images (LPIPS weights not available)"
RANDOM_NOTE = "random encoders: numbers are not comparable to the paper"

# The paper's numbers (SD rows where there are some), shown beside ours for orientation.
PAPER = {"DINO": (0.668, "Table 1, DreamBooth (Stable Diffusion)"),
         "CLIP-I": (0.803, "Table 1, DreamBooth (Stable Diffusion)"),
         "CLIP-T": (0.305, "Table 1, DreamBooth (Stable Diffusion)"),
         "PRES": (0.493, "Table 3, with prior preservation"),
         "DIV_substitute": (0.391, "Table 3, with prior preservation; LPIPS, not comparable"),
         "DINO_real": (0.774, "Table 1, Real Images"),
         "CLIP-I_real": (0.885, "Table 1, Real Images")}


# ----------------------------------------------------------------------------------------------
# 1. Prompts


def prompt_lists(path=PROMPTS_FILE):
    """{"object": [25 templates], "live": [25 templates], "live_classes": [...], "subjects": {...}}."""
    return json.loads(Path(path).read_text(encoding="utf-8"))


def subject_type(class_noun, lists=None):
    """"live" for the live-subject classes (cats and dogs), else "object"."""
    lists = lists or prompt_lists()
    return "live" if class_noun.strip().lower() in lists["live_classes"] else "object"


def make_prompts(templates, identifier, class_noun):
    """(subject prompts "a [V] dog in the jungle", class prompts "a dog in the jungle"); the class
    prompts are the PRES prompts and the texts CLIP-T compares with."""
    subject = [t.format(identifier=identifier, class_noun=class_noun) for t in templates]
    klass = [t.replace("{identifier} ", "").format(class_noun=class_noun) for t in templates]
    return subject, klass


# ----------------------------------------------------------------------------------------------
# 2. The metrics: pure functions of embeddings [N, E] (float64 arithmetic)


def cosine_matrix(a, b):
    """cos(a_i, b_j) for every pair: [N, M]."""
    return F.normalize(a.double(), dim=-1) @ F.normalize(b.double(), dim=-1).T


def mean_pairwise_cosine(a, b):
    """Mean of cos(a_i, b_j) over all N x M pairs."""
    return cosine_matrix(a, b).mean().item()


def mean_cosine_within(x):
    """Mean of cos(x_i, x_j) over the N (N - 1) ordered pairs i != j (N >= 2)."""
    n = len(x)
    if n < 2:
        raise ValueError("a mean over distinct pairs needs at least 2 embeddings")
    similarities = cosine_matrix(x, x)
    return ((similarities.sum() - similarities.diagonal().sum()) / (n * (n - 1))).item()


def dino_score(generated, real):
    """DINO (section 4.1): mean pairwise cosine similarity between the DINO ViT-S/16 embeddings
    of the generated and the real images."""
    return mean_pairwise_cosine(generated, real)


def clip_i_score(generated, real):
    """CLIP-I (section 4.1): mean pairwise cosine similarity between the CLIP image embeddings of
    the generated and the real images."""
    return mean_pairwise_cosine(generated, real)


def clip_t_score(image_embeddings, text_embeddings):
    """CLIP-T (section 4.1): mean cosine similarity between each image's CLIP embedding and the
    CLIP embedding of its prompt (row k of each)."""
    return F.cosine_similarity(image_embeddings.double(), text_embeddings.double(), dim=-1).mean().item()


def pres_score(class_generated, real):
    """PRES (section 4.3, Table 3): mean pairwise DINO cosine similarity between images of the
    class prompts (no identifier) and the real subject; high = the class drifted to the subject."""
    return mean_pairwise_cosine(class_generated, real)


def div_substitute(embeddings, groups):
    """SUBSTITUTE for DIV (section 4.3, Table 3, which averages LPIPS distances between images of
    the same prompt): 1 - mean pairwise cosine within each group (one group per prompt), averaged
    over groups. `groups`: a list of index lists, each of 2+ images."""
    return sum(1 - mean_cosine_within(embeddings[list(g)]) for g in groups) / len(groups)


# ----------------------------------------------------------------------------------------------
# 3. Encoders


@dataclass
class Encoders:
    dino: ViTModel
    clip_vision: CLIPVisionModelWithProjection
    clip_text: CLIPTextModelWithProjection
    tokenizer: CLIPTokenizer
    names: dict        # {"dino": ..., "clip": ...}, as the report shows them
    random: bool = False


def load_encoders(dino=DINO_MODEL, clip=CLIP_MODEL, *, random_encoders=False, tokenizer=None, device="cpu", seed=0):
    """The pretrained encoders (Hub ids or folders), or with random_encoders tiny random ones whose
    text tower reads `tokenizer`'s ids (the SD pipeline's)."""
    if random_encoders:
        names = {"dino": f"random tiny ViT (seed {seed})", "clip": f"random tiny CLIP (seed {seed})"}
        return Encoders(random_encoder(ViTModel, TINY_DINO, seed=seed, device=device),
                        random_encoder(CLIPVisionModelWithProjection, TINY_CLIP, seed=seed + 1, device=device),
                        random_encoder(CLIPTextModelWithProjection, TINY_CLIP, seed=seed + 2, device=device),
                        tokenizer, names, random=True)
    dino_model = load_dino(dino, device=device)
    clip_vision, clip_text, clip_tokenizer = load_clip(clip, device=device)
    return Encoders(dino_model, clip_vision, clip_text, clip_tokenizer, {"dino": str(dino), "clip": str(clip)})


@torch.no_grad()
def embed_images(model, images, batch_size=32):
    """PIL images -> embeddings [N, E] (fp32, on the CPU), with the model's own preprocessing."""
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        pixels = preprocess(images[start:start + batch_size], model.image_size, model.image_mean, model.image_std)
        out.append(model(pixels.to(device)).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def embed_texts(model, tokenizer, prompts):
    sample.warn_truncated(tokenizer, prompts)
    device = next(model.parameters()).device
    return model(tokenizer(prompts).to(device)).float().cpu()


# ----------------------------------------------------------------------------------------------
# 4. Scoring and generation


def score(encoders, real_images, subject_images, clip_prompts, num_images, class_images=None):
    """The metrics of one subject. subject_images: num_images per prompt, prompt-major;
    clip_prompts: the prompts CLIP-T compares with (one per prompt); class_images: the class-prompt
    images in the same order, or None to skip PRES. Returns (metrics, per-prompt rows)."""
    real_dino, real_clip = embed_images(encoders.dino, real_images), embed_images(encoders.clip_vision, real_images)
    dino, clip = embed_images(encoders.dino, subject_images), embed_images(encoders.clip_vision, subject_images)
    texts = embed_texts(encoders.clip_text, encoders.tokenizer, clip_prompts).repeat_interleave(num_images, dim=0)
    groups = [range(k * num_images, (k + 1) * num_images) for k in range(len(clip_prompts))]
    metrics = {"DINO": dino_score(dino, real_dino), "CLIP-I": clip_i_score(clip, real_clip),
               "CLIP-T": clip_t_score(clip, texts),
               "PRES": pres_score(embed_images(encoders.dino, class_images), real_dino) if class_images else None,
               "DIV_substitute": div_substitute(dino, groups) if num_images >= 2 else None,
               "DINO_real": mean_cosine_within(real_dino) if len(real_images) >= 2 else None,
               "CLIP-I_real": mean_cosine_within(real_clip) if len(real_images) >= 2 else None}
    rows = [{"prompt": prompt, "DINO": dino_score(dino[list(g)], real_dino),
             "CLIP-I": clip_i_score(clip[list(g)], real_clip), "CLIP-T": clip_t_score(clip[list(g)], texts[list(g)])}
            for prompt, g in zip(clip_prompts, groups)]
    return metrics, rows


def generate_set(pipeline, prompts, num_images, **sampler_args):
    """num_images images per prompt, prompt-major, through the project's one sampler."""
    sample.warn_truncated(pipeline.tokenizer, prompts)  # before the progress bars, once per prompt
    return sample.generate(pipeline, [p for p in prompts for _ in range(num_images)], **sampler_args)


def save_images(images, folder, prefix):
    folder.mkdir(parents=True, exist_ok=True)
    for k, image in enumerate(images):
        slug = "".join(c if c.isalnum() else "_" for c in image.info["prompt"])[:48].strip("_")
        sample.save_png(image, folder / f"{prefix}-{k:03d}-{slug}.png")


# ----------------------------------------------------------------------------------------------
# 5. Reports


ROWS = [("DINO", "DINO    subject fidelity"), ("CLIP-I", "CLIP-I  subject fidelity"),
        ("CLIP-T", "CLIP-T  prompt fidelity"), ("PRES", "PRES    language drift (lower: less)"),
        ("DIV_substitute", "DIV (substitute: 1 - DINO cos within a prompt)"),
        ("DINO_real", "DINO    real photos among themselves"),
        ("CLIP-I_real", "CLIP-I  real photos among themselves")]


def _value(v):
    return "-" if v is None else f"{v:.4f}"


def format_report(result):
    """The printed table of one run."""
    s = result["settings"]
    lines = [f"DreamBooth evaluation of {result['model']} (identifier {result['identifier']!r}, "
             f"class {result['class_noun']!r}, {result['subject_type']} prompts)",
             f"{s['num_prompts']} prompts x {s['num_images']} images, {s['steps']} {s['scheduler']} steps, "
             f"guidance {s['guidance_scale']}, seed {s['seed']}; real photos: {result['num_real_images']}",
             f"encoders: DINO {result['encoders']['dino']}; CLIP {result['encoders']['clip']}"]
    if result["encoders"]["random"]:
        lines.append(f"*** {RANDOM_NOTE} ***")
    lines += ["", f"{'metric':48} {'value':>8}   paper"]
    for key, label in ROWS:
        value, source = PAPER[key]
        lines.append(f"{label:48} {_value(result['metrics'][key]):>8}   {value:.3f} ({source})")
    lines.append(f"\nDIV here is a substitute: {DIV_SUBSTITUTE}; the paper's DIV is LPIPS.")
    if result["encoders"]["random"]:
        lines.append(RANDOM_NOTE)
    return "\n".join(lines)


def format_comparison(a, b, name_a="A", name_b="B"):
    """Two runs' metrics side by side, with B - A."""
    lines = [f"{name_a}: {a['model']} ({a['settings']['num_prompts']} prompts x {a['settings']['num_images']} images)",
             f"{name_b}: {b['model']} ({b['settings']['num_prompts']} prompts x {b['settings']['num_images']} images)"]
    if a["encoders"] != b["encoders"]:
        lines.append(f"note: the runs used different encoders ({a['encoders']} vs {b['encoders']}): "
                     "their numbers are not comparable")
    if a["encoders"]["random"] or b["encoders"]["random"]:
        lines.append(f"*** {RANDOM_NOTE} ***")
    lines += ["", f"{'metric':48} {name_a:>8} {name_b:>8} {name_b + ' - ' + name_a:>9}"]
    for key, label in ROWS:
        va, vb = a["metrics"].get(key), b["metrics"].get(key)
        diff = "-" if va is None or vb is None else f"{vb - va:+.4f}"
        lines.append(f"{label:48} {_value(va):>8} {_value(vb):>8} {diff:>9}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Command line


def build_parser():
    p = argparse.ArgumentParser(description="Evaluate a DreamBooth model with the paper's metrics "
                                            "(DINO, CLIP-I, CLIP-T, PRES, DIV substitute).",
                                formatter_class=sample.DefaultsHelpFormatter)
    p.add_argument("--model",
                   help="a train.py output folder (holds dreambooth.json; a LoRA one too), or any model with "
                        "--lora such a folder (default: none; needed unless --compare)")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="repeatable: a LoRA merged into the model at strength SCALE, as in sample.py (default: none)")
    p.add_argument("--lora_scale", type=float, default=1.0,
                   help="strength of the LoRA of a LoRA output folder given as --model")
    p.add_argument("--instance_dir", help="the subject's real photos (default: none; needed unless --compare)")
    p.add_argument("--concept", metavar="NAME",
                   help="the subject to evaluate, by name, in a model trained on several (train.py --concepts) "
                        "(default: the model's one subject)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two evaluation JSONs side by side (no generation) (default: none)")
    p.add_argument("--out", help="JSON path (default: MODEL/evaluation.json)")
    p.add_argument("--images_dir", help="also save the generated images (PNG with metadata) here (default: not saved)")
    g = p.add_argument_group("prompts and sampling")
    g.add_argument("--prompt_type", choices=["auto", "object", "live"], default="auto",
                   help="auto: live-subject prompts for cats and dogs, object prompts otherwise")
    g.add_argument("--max_prompts", type=int, default=25, help="use the first N of the 25 prompts (quick runs)")
    g.add_argument("--num_images", type=int, default=4, help="images per prompt (the paper: 4)")
    g.add_argument("--no_pres", action="store_true", help="skip the class-prompt images (and PRES): half the time")
    g.add_argument("--steps", type=int, default=50, help="denoising steps")
    g.add_argument("--scheduler", choices=sorted(sample.SCHEDULERS), default="ddim", help="the sampler (see sample.py)")
    g.add_argument("--prediction_type", choices=["epsilon", "v_prediction"],
                   help="what the UNet predicts (default: what the model says; an SD 2.x single file, which does "
                        "not say, is judged by its name)")
    g.add_argument("--guidance_scale", type=float, default=7.5, help="classifier-free guidance weight")
    g.add_argument("--seed", type=int, default=0, help="image i of a set uses seed + i")
    g.add_argument("--batch_size", type=int, default=4, help="images per UNet batch (the images do not depend on it)")
    g.add_argument("--mixed_precision", choices=sample.MIXED_PRECISION, default="auto",
                   help="for generation; the encoders always run in fp32")
    g.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to run (default: cuda if this PyTorch sees a GPU, else cpu)")
    g = p.add_argument_group("encoders")
    g.add_argument("--dino", default=DINO_MODEL, help="Hub id or folder of a DINO ViT")
    g.add_argument("--clip", default=CLIP_MODEL, help="Hub id or folder of a CLIP model (with its tokenizer)")
    g.add_argument("--random_encoders", action="store_true",
                   help=f"tiny random encoders for offline smoke runs ({RANDOM_NOTE})")
    return p


def read_result(parser, path):
    try:
        result = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        parser.error(f"--compare: cannot read {path} ({e})")
    missing = {"model", "metrics", "settings", "encoders"} - (result.keys() if isinstance(result, dict) else set())
    if missing:
        parser.error(f"--compare: {path} is not an evaluation JSON written by evaluate.py "
                     f"(no {', '.join(sorted(missing))})")
    return result


def read_dreambooth_json(parser, args):
    """(identifier, class noun) of the subject evaluated: the one concept of the model (or of its
    first --lora folder with a dreambooth.json), or with several the one --concept names."""
    model, concept = sample.subject_folder(args.model, [p for p, _ in args.lora]), args.concept
    path = Path(model) / "dreambooth.json"
    if not path.is_file():
        parser.error(f"{path} is missing: --model must be an output folder of train.py (or --lora one)")
    try:
        concepts = sample.read_concepts(model)
    except ValueError as e:
        parser.error(str(e))
    names = [c["name"] for c in concepts]
    if concept is None and len(concepts) > 1:
        parser.error(f"{model} was trained on {len(concepts)} concepts ({', '.join(names)}): choose the one to "
                     "evaluate with --concept NAME (and its photos with --instance_dir)")
    if concept is not None and concept not in names:
        parser.error(f"--concept {concept}: {model} has no concept of that name (its concepts: {', '.join(names)})")
    chosen = concepts[names.index(concept) if concept is not None else 0]
    if not isinstance(chosen.get("class_noun"), str):
        parser.error(f"{path} has no readable \"class_noun\"")
    return chosen["identifier"], chosen["class_noun"]


def check_args(parser, args):
    if not args.model or not args.instance_dir:
        parser.error("--model and --instance_dir are required (or --compare A.json B.json)")
    args.lora = [lora.parse_lora_spec(spec) for spec in args.lora]  # [(path, scale)]
    if not 1 <= args.max_prompts <= 25:
        parser.error(f"--max_prompts must be between 1 and 25, got {args.max_prompts}")
    for name in ("num_images", "steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: this PyTorch sees no CUDA GPU; use --device cpu")
    if args.guidance_scale < 0:
        parser.error(f"--guidance_scale must be at least 0 (1: no guidance), got {args.guidance_scale}")
    try:  # outputs probed before the work, so that no score is computed only to be lost
        sample.check_writable_folder("--out", output_path(args).parent)
        if args.images_dir:
            sample.check_writable_folder("--images_dir", args.images_dir)
    except ValueError as e:
        parser.error(str(e))


def output_path(args):
    return Path(args.out) if args.out else Path(args.model) / "evaluation.json"


def main(argv=None):
    """Bad input ends in parser.error: a message on stderr and SystemExit(2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.compare:
        a, b = (read_result(parser, path) for path in args.compare)
        print(format_comparison(a, b))
        return 0
    check_args(parser, args)
    identifier, class_noun = read_dreambooth_json(parser, args)
    try:
        real_paths = dreambooth.list_images(args.instance_dir)
        real_images = [dreambooth.open_rgb(p) for p in real_paths]
    except (FileNotFoundError, OSError) as e:
        parser.error(f"--instance_dir: {e}")
    lists = prompt_lists()
    kind = subject_type(class_noun, lists) if args.prompt_type == "auto" else args.prompt_type
    subject_prompts, class_prompts = make_prompts(lists[kind][:args.max_prompts], identifier, class_noun)

    try:  # the encoders first, so that a missing download fails in seconds
        encoders = None if args.random_encoders else load_encoders(args.dino, args.clip, device=args.device)
        pipeline = sample.load_model(args.model, loras=args.lora, lora_scale=args.lora_scale, device=args.device,
                                     prediction_type=args.prediction_type)
        encoders = encoders or load_encoders(random_encoders=True, tokenizer=pipeline.tokenizer, device=args.device)
    except (LoadError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")

    sampler_args = dict(steps=args.steps, scheduler=args.scheduler, guidance_scale=args.guidance_scale,
                        seed=args.seed, batch_size=args.batch_size, mixed_precision=args.mixed_precision)
    print(f"generating {len(subject_prompts)} x {args.num_images} images of {subject_prompts[0]!r} ...", file=sys.stderr)
    subject_images = generate_set(pipeline, subject_prompts, args.num_images, **sampler_args)
    class_images = None
    if not args.no_pres:
        print(f"generating {len(class_prompts)} x {args.num_images} class images ({class_prompts[0]!r} ...) for PRES",
              file=sys.stderr)
        class_images = generate_set(pipeline, class_prompts, args.num_images, **sampler_args)
    if args.images_dir:
        save_images(subject_images, Path(args.images_dir), "subject")
        save_images(class_images or [], Path(args.images_dir), "class")

    metrics, rows = score(encoders, real_images, subject_images, class_prompts, args.num_images, class_images)
    result = {"model": str(args.model), "instance_dir": str(args.instance_dir), "identifier": identifier,
              "class_noun": class_noun, "subject_type": kind, "num_real_images": len(real_images),
              "encoders": {**encoders.names, "random": encoders.random},
              "note": RANDOM_NOTE if encoders.random else None,
              "metrics": metrics,
              "metric_notes": {"DIV_substitute": f"substitute for the paper's DIV: {DIV_SUBSTITUTE}",
                               "CLIP-T": "prompts scored without the identifier, e.g. " + repr(class_prompts[0]),
                               "PRES": None if class_images else "skipped (--no_pres)"},
              "settings": {"num_prompts": len(subject_prompts), "num_images": args.num_images, "steps": args.steps,
                           "scheduler": args.scheduler, "guidance_scale": args.guidance_scale, "seed": args.seed,
                           "mixed_precision": args.mixed_precision},
              "per_prompt": [{"subject_prompt": s, **row} for s, row in zip(subject_prompts, rows)]}
    out = output_path(args)
    write_atomically(out, lambda tmp: tmp.write_text(json.dumps(result, indent=2)))
    print(format_report(result))
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
