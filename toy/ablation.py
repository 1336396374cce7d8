"""The paper's ablations (Tables 3 and 4) at toy scale, over several subjects and seeds.

Every run is the real trainer, train.main([... "--model", "toy" ...]), in this process, with
the toy recipe (TOY_FLAGS); its output is sampled with sample.generate and scored from pixels
(toy/metrics.py). Per subject and seed, four fine-tunings:

  prior         correct class noun, prior preservation on (the method)
  no_prior      correct class noun, no prior preservation
  no_class      "a photo of [V]": no class noun, no prior preservation
  wrong_class   a wrong class noun (a circle taught as "[V] square"), no prior preservation

  Table 3 (prior preservation): prior vs no_prior: PRES, DIV, subject fidelity.
  Table 4 (class noun): no_prior (correct) vs no_class vs wrong_class: subject fidelity. These
  runs leave prior preservation out, so that only the text supervision differs (with no class
  noun there is no class prior to preserve).

Each run is scored on [V] samples in all five contexts (two of them never in the subject's
photos) and on class-prompt samples ("a photo of circle"). The pretrained toy model, prompted
with the same identifier, is the baseline; the subject's photos against each other are the
ceiling ("real photos", Table 1's first row).

The class-image sampler comparison (--class_samplers) asks how cheaply the class images of
prior preservation can be made: per subject and seed, one "prior" fine-tuning per sampler
(SCHEDULER:STEPS, e.g. ddim:50 dpmpp_2m_karras:20), each from its own class images (made with
train.py's own code before the runs, and timed), everything else identical (same seeds, same
training noise), so that the arms differ only in their class images. It tables PRES, DIV and
subject fidelity per sampler, and each arm's paired difference from the first arm.

LoRA vs full fine-tuning (--lora RANK ...): per subject and seed, full fine-tuning and one LoRA
per rank (train.py --lora_rank), all with prior preservation from the same class images, the same
identifier and training noise. It tables PRES, DIV, subject and prompt fidelity, the numbers each
trains and the bytes of weights it writes, and each LoRA's paired difference from full fine-tuning.

    python -m toy.ablation                       # 3 subjects x 3 seeds (see --help), about 30 min
    python -m toy.ablation --quick --out /tmp/a  # the reduced CI mode, about a minute
    python -m toy.ablation --train_flags "--max_steps 250" --out /tmp/b   # the same tables, another recipe
    python -m toy.ablation --class_samplers ddim:50 dpmpp_2m_karras:20 --out toy-samplers --threads 1
    python -m toy.ablation --lora 4 16 --out toy-lora --threads 1   # about 22 min
    python -m toy.ablation --toy_model toy-lit --configs no_prior no_class wrong_class  # Table 4 in the lit world

Every run is also scored per context against the subject as the world draws it there
(world_views): in the subject's photos' contexts much as its photos, in the sky and at night what
no photo shows. In the lit world (toy.pretrain --world lit) circles and stars shine at night, so
there "[V] square" for a circle subject must fight what "square" says about the night.
"""
import argparse
import json
import math
import random
import shlex
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, when run as a script

import dreambooth  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from load_weights import load_pipeline  # noqa: E402
from toy import metrics, world  # noqa: E402

HERE = Path(__file__).resolve().parent
SUBJECTS_DIR = HERE / "subjects"

# train.py's own toy recipe (train.TOY_RECIPE: 32 px, 50 class images, 2000 steps, ...)
TOY_FLAGS = ["--model", "toy"]
QUICK_FLAGS = ["--num_class_images", "4", "--class_steps", "5", "--max_steps", "30"]  # override TOY_FLAGS
EVAL = dict(steps=25, guidance_scale=5.0)          # sampler settings of every scored image
WRONG_CLASS = {"square": "circle", "circle": "square", "triangle": "circle", "star": "circle"}
CONFIGS = ("prior", "no_prior", "no_class", "wrong_class")
LABELS = {"pretrained": "pretrained", "prior": "with prior pres.", "no_prior": "w/o prior pres.",
          "no_class": "no class noun", "wrong_class": "wrong class noun"}


def subject_photos(name):
    return [Image.open(p).convert("RGB") for p in dreambooth.list_images(SUBJECTS_DIR / name)]


def world_views(subject, num_images=world.SUBJECT_IMAGES):
    """{context: the subject as the world draws it there}: in its photos' contexts much like its
    photos, in the others what its photos cannot show (in the lit world, a circle's shine at night)."""
    rng = random.Random(f"{subject}-views")
    return {c: [world.render(world.subject_scene(subject, c, rng)) for _ in range(num_images)] for c in world.CONTEXTS}


def evaluate(pipeline, instance_prompt, class_prompt, photos, *, views=None, subject=None, per_context=4,
             class_images=16, seed=1000, steps=EVAL["steps"], guidance_scale=EVAL["guidance_scale"]):
    """Sample "<instance prompt> <context>" for every context and the class prompt, and score
    them; with `views` (world_views()), also each context's samples against the subject as the
    world draws it there (context_fidelity); with `subject` (a name), also how far toward white
    its night samples are drawn (night_shine: metrics.shine). Returns (scores, [V] images (first of each context),
    class images)."""
    contexts = [c for c in world.CONTEXTS for _ in range(per_context)]
    kwargs = dict(steps=steps, guidance_scale=guidance_scale, mixed_precision="no", progress=False, batch_size=20)
    subject_samples = sample.generate(pipeline, [f"{instance_prompt} {c}" for c in contexts], seed=seed, **kwargs)
    class_samples = sample.generate(pipeline, [class_prompt] * class_images, seed=seed, **kwargs)
    scores = {"subject_fidelity": metrics.subject_fidelity(subject_samples, photos),
              "prompt_fidelity": metrics.prompt_fidelity(subject_samples, contexts),
              "PRES": metrics.pres(class_samples, photos), "DIV": metrics.div(class_samples)}
    if views:
        scores["context_fidelity"] = {c: metrics.subject_fidelity(subject_samples[i * per_context:(i + 1) * per_context],
                                                                  views[c]) for i, c in enumerate(world.CONTEXTS)}
    if subject:
        night = list(world.CONTEXTS).index("at night")
        shines = [metrics.shine(im, world.SUBJECTS[subject]) for im in subject_samples[night * per_context:(night + 1) * per_context]]
        shines = [v for v in shines if v is not None]
        scores["night_shine"] = statistics.fmean(shines) if shines else float("nan")
    return scores, subject_samples[::per_context], class_samples


def train_args(config, subject, seed, out, flags, arm="", class_set=None):
    """train.py's argv for one run. `arm` (a class-image sampler, e.g. "ddim-50") gives the run
    folder a name of their own, and the class images too unless `class_set` names theirs
    ("": the class images every arm shares)."""
    noun = world.SUBJECTS[subject].noun
    name = f"{subject}-{config}-{arm}-seed{seed}" if arm else f"{subject}-{config}-seed{seed}"
    argv = [*flags, "--instance_dir", str(SUBJECTS_DIR / subject), "--seed", str(seed),
            "--output_dir", str(out / "runs" / name)]
    if config == "prior":
        class_dir = out / "class_images" / (arm if class_set is None else class_set) / noun
        return argv + ["--class_noun", noun, "--class_dir", str(class_dir)]
    argv += ["--no_prior_preservation"]
    if config == "no_class":  # the class noun is only used to check the identifier against
        return argv + ["--class_noun", noun, "--instance_template", "a photo of {identifier}"]
    return argv + ["--class_noun", WRONG_CLASS[noun] if config == "wrong_class" else noun]


def fine_tune(argv):
    """Run train.py with argv; returns its output folder and dreambooth.json."""
    if train.main(argv) != 0:
        raise RuntimeError(f"train.py failed: {argv}")
    folder = Path(argv[argv.index("--output_dir") + 1])
    return folder, json.loads((folder / "dreambooth.json").read_text())


def score(folder, info, subject, **sizes):
    """evaluate() on a train.py output folder: a fine-tuned model, or a LoRA merged into its base
    model (sample.load_model reads which from dreambooth.json)."""
    class_prompt = dreambooth.CLASS_TEMPLATE.format(class_noun=world.SUBJECTS[subject].noun)
    return evaluate(sample.load_model(str(folder)), info["instance_prompt"], class_prompt, subject_photos(subject),
                    views=world_views(subject), subject=subject, **sizes)


def run(config, subject, seed, out, flags, keep=False, arm="", **sizes):
    folder, info = fine_tune(train_args(config, subject, seed, out, flags, arm))
    result = score(folder, info, subject, **sizes)
    if not keep:
        shutil.rmtree(folder)
    return info["identifier"], result


# ----------------------------------------------------------------------------------------------
# The class-image sampler comparison (--class_samplers)


def sampler_spec(text):
    """argparse type of one arm: "SCHEDULER:STEPS" -> (scheduler, steps)."""
    name, _, steps = text.partition(":")
    if name not in sample.SCHEDULERS or not steps.isdigit() or int(steps) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: write SCHEDULER:STEPS, SCHEDULER one of "
                                         f"{', '.join(sorted(sample.SCHEDULERS))} (e.g. dpmpp_2m_karras:20)")
    return name, int(steps)


def arm_name(arm):
    return f"{arm[0]}-{arm[1]}"


def sampler_flags(arm):
    return ["--class_scheduler", arm[0], "--class_steps", str(arm[1])]


def make_class_images(argv):
    """Make the class images of a train.py run (argv) with train.py's own phases 1-3, before the
    run, which then finds them in its --class_dir. Returns (seconds, UNet evaluations: the rows
    of every UNet call, so guidance's unconditional half counts), or (0, 0) if they were there."""
    args = train.parse_args(train.build_parser(), argv)
    env = train.Distributed(args.device)
    pipeline = train.load_for_training(args, env.device)
    prompts = train.choose_prompts(args, pipeline.tokenizer, env)
    rows = []
    hook = pipeline.unet.register_forward_pre_hook(lambda module, inputs: rows.append(inputs[0].shape[0]))
    start = time.perf_counter()
    train.make_class_images(pipeline, args, prompts, Path(args.output_dir), env)
    seconds = time.perf_counter() - start
    hook.remove()
    return (seconds, sum(rows)) if rows else (0.0, 0)


def compare_samplers(args, out, flags):
    """Per seed and subject, one prior-preservation fine-tuning per arm of args.class_samplers.
    Yields (scores, cost) after each seed and subject, so that a cut-short run leaves a table:
    scores[arm] = list of dicts, the same (seed, subject) order in every arm; cost[arm] = the
    class images' seconds and UNet evaluations, summed over the class sets it made."""
    arms = [arm_name(a) for a in args.class_samplers]
    scores = {a: [] for a in arms}
    cost = {a: {"seconds": 0.0, "unet_evaluations": 0, "class_sets": 0} for a in arms}
    start = time.time()
    for seed in args.seeds:
        for subject in args.subjects:
            rows = [("real photos", subject_photos(subject))]
            for arm, name in zip(args.class_samplers, arms):
                arm_flags = flags + sampler_flags(arm)
                seconds, evaluations = make_class_images(train_args("prior", subject, seed, out, arm_flags, name))
                if evaluations:
                    cost[name]["seconds"] += seconds
                    cost[name]["unet_evaluations"] += evaluations
                    cost[name]["class_sets"] += 1
                _, (result, subject_images, class_images) = run("prior", subject, seed, out, arm_flags,
                                                                args.keep_runs, name)
                scores[name].append(dict(result, subject=subject, seed=seed))
                rows += [(f"{name} [V]", subject_images), (f"{name}: class", class_images)]
                print(f"[{time.time() - start:6.0f}s] {subject} seed {seed} {name}: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), file=sys.stderr, flush=True)
            columns = len(world.CONTEXTS)
            labelled_grid([(label, images[:columns]) for label, images in rows]).save(
                out / f"samplers-{subject}-seed{seed}.png")
            yield scores, cost


def class_set_distances(out, arms):
    """Per arm: its class images against the first arm's, image i with image i (the same seed,
    so the same starting noise), as the mean pixel distance |a - b| / 255 over every class set
    both have; and the DIV of its own class images. A sampler that solves the same ODE as the
    first arm lands near the same images; a stochastic one draws other samples of the class."""
    root = out / "class_images"
    first, result = arms[0], {}
    for arm in arms:
        same_seed, div = [], []
        for folder in sorted(p for p in (root / arm).iterdir() if (root / first / p.name).is_dir()):
            images = [Image.open(q).convert("RGB") for q in dreambooth.list_images(folder)]
            references = [Image.open(q).convert("RGB") for q in dreambooth.list_images(root / first / folder.name)]
            same_seed += [float(abs(metrics.pixels(a) - metrics.pixels(b)).mean()) / 255
                          for a, b in zip(images, references)]
            div.append(metrics.div(images))
        result[arm] = {"same_seed_distance": statistics.fmean(same_seed), "class_DIV": statistics.fmean(div)}
    return result


def seed_spread(runs, key):
    """The spread over seeds alone: sqrt of the mean over subjects of each subject's variance
    over its seeds (the table's ± also holds the larger spread between subjects)."""
    by_subject = {}
    for r in runs:
        by_subject.setdefault(r["subject"], []).append(r[key])
    variances = [statistics.variance(v) for v in by_subject.values() if len(v) > 1]
    return statistics.fmean(variances) ** 0.5 if variances else float("nan")


# Each metric's good direction: +1 higher is better, -1 lower is better.
SAMPLER_METRICS = {"PRES": -1, "DIV": +1, "subject_fidelity": +1, "prompt_fidelity": +1}


def sampler_table(scores, cost, distances):
    """Markdown: per arm the class images' cost, their distance from the first arm's
    (class_set_distances) and the scores after fine-tuning; then each arm's paired difference
    from the first arm, and whether it holds the first arm's outcome: no metric worse by more
    than the first arm's seed spread."""
    arms = list(scores)
    reference = scores[arms[0]]
    spread = {k: seed_spread(reference, k) for k in SAMPLER_METRICS}
    lines = ["| class images | UNet evaluations per class set | s per class set | class images: same-seed "
             f"distance from {arms[0]}'s, their DIV | PRES (lower better) | DIV (higher better) | subject fidelity | "
             "prompt fidelity |", "| --- |" + " --- |" * 7]
    for arm in arms:
        c, d = cost[arm], distances[arm]
        per_set = c["unet_evaluations"] / max(c["class_sets"], 1)
        lines.append(f"| {arm} | {per_set:.0f} | {c['seconds'] / max(c['class_sets'], 1):.1f} | "
                     f"{d['same_seed_distance']:.3f}, {d['class_DIV']:.3f} | "
                     + " | ".join(summarise(r[k] for r in scores[arm]) for k in SAMPLER_METRICS) + " |")
    lines += ["", *paired_differences(scores)]
    note = (f"mean ± std over {len(reference)} runs (subjects x seeds); paired: the same subject, seed and "
            f"training noise, only the class images differ. Seed spread of {arms[0]} (within subjects): "
            + ", ".join(f"{k} {v:.3f}" for k, v in spread.items())
            + "; holds = no metric's mean paired difference worse than that")
    return "\n".join(lines) + "\n\n" + note + "\n"


def paired_differences(scores):
    """Markdown rows: each arm's mean ± std paired difference from the first arm (the same subject
    and seed), and whether it holds the first arm's outcome: no metric worse by more than the
    first arm's seed spread."""
    arms = list(scores)
    reference = scores[arms[0]]
    spread = {k: seed_spread(reference, k) for k in SAMPLER_METRICS}
    lines = [f"| paired difference from {arms[0]} | PRES | DIV | subject fidelity | prompt fidelity | "
             f"holds {arms[0]}'s outcome |", "| --- |" + " --- |" * 5]
    for arm in arms[1:]:
        cells, holds = [], True
        for k, sign in SAMPLER_METRICS.items():
            diffs = [a[k] - b[k] for a, b in zip(scores[arm], reference)]
            cells.append(f"{statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs) if len(diffs) > 1 else 0:.3f}")
            holds &= sign * statistics.fmean(diffs) >= -spread[k]
        verdict = "n/a (one seed: no seed spread)" if any(v != v for v in spread.values()) else "yes" if holds else "no"
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {verdict} |")
    return lines


def sampler_main(args, out, flags):
    """The comparison, its table rewritten after every seed and subject (samplers.md, .json)."""
    start = time.time()
    for scores, cost in compare_samplers(args, out, flags):
        text = sampler_table(scores, cost, class_set_distances(out, list(scores)))
        minutes = (time.time() - start) / 60
        runs = len(next(iter(scores.values())))
        (out / "samplers.md").write_text(text + f"\n{runs} of {len(args.subjects) * len(args.seeds)} runs per arm "
                                         f"({len(args.subjects)} subjects x {len(args.seeds)} seeds), {minutes:.1f} min\n")
        (out / "samplers.json").write_text(json.dumps({"scores": scores, "cost": cost, "args": vars(args),
                                                        "flags": flags, "minutes": minutes}, indent=2))
    print(text)
    print(f"wrote {out / 'samplers.md'} and the grids in {out} ({minutes:.1f} min)")
    return 0


# ----------------------------------------------------------------------------------------------
# LoRA vs full fine-tuning (--lora RANK ...)

# The LoRA arms' learning rate. On Stable Diffusion LoRA wants 20x full fine-tuning's 5e-6; on the
# earlier toy, whose full fine-tuning recipe was 2e-4, rank 4 scored the same subject fidelity at
# 2e-4, 1e-3 and 3e-3 and lost prompt fidelity at 3e-3 (measured on seed 10, which the comparison
# does not use; toy/README.md). The full recipe is 2e-4 again (2000 steps); LoRA keeps 2e-4.
LORA_LR = 2e-4


def lora_arms(ranks, lr, targets=None):
    """[(name, train.py flags added to the toy recipe's)]: full fine-tuning, then a LoRA per rank
    (on train.py's default layers, or on `targets`, a --lora_targets value, named in the arm)."""
    where = (["--lora_targets", targets], "-" + targets.replace(",", "+")) if targets else ([], "")
    return [("full", [])] + [(f"lora-r{r}{where[1]}", ["--lora_rank", str(r), "--lr", f"{lr:g}", *where[0]])
                             for r in ranks]


def output_weights(folder, info):
    """What a run leaves to use: the bytes of its weight files and the numbers it trained. A full
    fine-tune's weight files are the whole model (UNet, VAE, text encoder) and it trained the UNet;
    a LoRA's are its adapters, twice (diffusers' and kohya's formats), counted once."""
    if "lora" in info:
        files = [folder / name for name in info["lora"]["files"].values()]
        trained = folder / info["lora"]["files"]["diffusers"]
    else:
        files = sorted(folder.rglob("*.safetensors"))
        trained = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with safe_open(trained, "pt") as f:
        numbers = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {"weight_bytes": sum(p.stat().st_size for p in files), "weight_files": len(files),
            "trained_numbers": numbers}


def lora_run(arm, subject, seed, out, flags, keep, sizes):
    """One fine-tuning of the comparison: (its record: scores, output weights, training seconds;
    its [V] images; its class images)."""
    name, extra = arm
    start = time.perf_counter()
    folder, info = fine_tune(train_args("prior", subject, seed, out, flags + extra, name, class_set=""))
    seconds = time.perf_counter() - start
    result, subject_images, class_images = score(folder, info, subject, **sizes)
    record = dict(result, **output_weights(folder, info), train_seconds=seconds, identifier=info["identifier"])
    if not keep:
        shutil.rmtree(folder)
    return record, subject_images, class_images


def compare_lora(args, out, flags, sizes):
    """Per seed and subject: the pretrained model, full fine-tuning, and a LoRA per rank of
    args.lora, every fine-tuning with prior preservation from the same class images (made first)
    and with the same identifier, data order and training noise: the arms differ in what trains
    and its learning rate. Yields scores[arm] = list of records after each seed and subject."""
    pretrained = load_pipeline("toy")
    arms = lora_arms(args.lora, args.lora_lr, args.lora_targets)
    scores = {name: [] for name in ("pretrained", *(name for name, _ in arms))}
    start = time.time()
    for seed in args.seeds:
        for subject in args.subjects:
            noun, photos = world.SUBJECTS[subject].noun, subject_photos(subject)
            identifier = dreambooth.choose_identifier(pretrained.tokenizer, noun, seed=seed)  # as train.py draws it
            make_class_images(train_args("prior", subject, seed, out, flags, class_set=""))  # not timed as training
            base, base_subject, base_class = evaluate(
                pretrained, dreambooth.INSTANCE_TEMPLATE.format(identifier=identifier, class_noun=noun),
                dreambooth.CLASS_TEMPLATE.format(class_noun=noun), photos, **sizes)
            scores["pretrained"].append(dict(base, subject=subject, seed=seed))
            rows = [("real photos", photos), ("pretrained [V]", base_subject)]
            class_rows = [("pretrained: class", base_class)]
            for arm in arms:
                record, subject_images, class_images = lora_run(arm, subject, seed, out, flags, args.keep_runs, sizes)
                drew = record["identifier"]
                assert drew == identifier, f"train.py drew {drew!r}, expected {identifier!r}"
                scores[arm[0]].append(dict(record, subject=subject, seed=seed))
                rows.append((f"{arm[0]} [V]", subject_images))
                class_rows.append((f"{arm[0]}: class", class_images))
                print(f"[{time.time() - start:6.0f}s] {subject} seed {seed} {arm[0]}: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in result_items(record)), file=sys.stderr, flush=True)
            columns = len(world.CONTEXTS)
            labelled_grid([(label, images[:columns]) for label, images in rows + class_rows]).save(
                out / f"lora-{subject}-seed{seed}.png")
            yield scores


def result_items(record):
    return [(k, record[k]) for k in (*SAMPLER_METRICS, "train_seconds")]


def megabytes(runs):
    files = {r["weight_files"] for r in runs}
    return f"{statistics.fmean(r['weight_bytes'] for r in runs) / 1e6:.2f} MB in {'/'.join(map(str, files))} files"


def lora_table(scores):
    """Markdown: per arm what trains, what it writes and how long it trains, and the scores; then
    each LoRA's paired difference from full fine-tuning (paired_differences)."""
    lines = ["| fine-tuning | trained numbers | weights written | training s | PRES (lower better) | "
             "DIV (higher better) | subject fidelity | prompt fidelity |", "| --- |" + " --- |" * 7]
    for arm, runs in scores.items():
        what = ("0 | - | -" if arm == "pretrained" else
                f"{runs[0]['trained_numbers']:,} | {megabytes(runs)} | {summarise((r['train_seconds'] for r in runs), digits=0)}")
        lines.append(f"| {arm} | {what} | " + " | ".join(summarise(r[k] for r in runs) for k in SAMPLER_METRICS) + " |")
    fine_tunings = {arm: runs for arm, runs in scores.items() if arm != "pretrained"}
    lines += ["", *paired_differences(fine_tunings)]
    spread = {k: seed_spread(scores["full"], k) for k in SAMPLER_METRICS}
    note = (f"mean ± std over {len(scores['full'])} runs (subjects x seeds), every fine-tuning with prior "
            "preservation; paired: the same subject, seed, class images and training noise. Training s: train.py's "
            "wall time, the class images made before it. Seed spread of full (within subjects): "
            + ", ".join(f"{k} {v:.3f}" for k, v in spread.items())
            + "; holds = no metric's mean paired difference worse than that")
    return "\n".join(lines) + "\n\n" + note + "\n"


def lora_main(args, out, flags, sizes):
    """The comparison, its table rewritten after every seed and subject (lora.md, lora.json)."""
    start = time.time()
    for scores in compare_lora(args, out, flags, sizes):
        text = lora_table(scores)
        minutes = (time.time() - start) / 60
        done = len(scores["full"])
        (out / "lora.md").write_text(text + f"\n{done} of {len(args.subjects) * len(args.seeds)} runs per arm "
                                     f"({len(args.subjects)} subjects x {len(args.seeds)} seeds), {minutes:.1f} min\n")
        (out / "lora.json").write_text(json.dumps({"scores": scores, "args": vars(args), "flags": flags,
                                                    "minutes": minutes}, indent=2))
    print(text)
    print(f"wrote {out / 'lora.md'} and the grids in {out} ({minutes:.1f} min)")
    return 0


# ----------------------------------------------------------------------------------------------
# Reporting


def summarise(values, digits=3):
    values = list(values)
    mean = statistics.fmean(values)
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


NOVEL_CONTEXTS = [c for c in world.CONTEXTS if c not in world.SUBJECTS["eye_circle"].contexts]  # every subject's


def tables(scores, real):
    """Markdown tables from scores[config] = list of dicts (one per subject and seed); a table
    whose configs did not run (--configs) is left out. Fidelity "in the sky" / "at night" is
    against the subject as the world draws it there (world_views), which no photo shows."""
    def value(s, key):
        return s["context_fidelity"][key] if key in world.CONTEXTS else s[key]

    def row(name, keys):
        return f"| {LABELS[name]} | " + " | ".join(summarise(value(s, k) for s in scores[name]) for k in keys) + " |"
    novel = [c for c in NOVEL_CONTEXTS if all("context_fidelity" in s for runs in scores.values() for s in runs)]
    heads = " | ".join(f"fidelity {c}" for c in novel)
    out = []
    if scores.get("prior") and scores.get("no_prior"):
        t3 = ["| Table 3 (toy) | PRES (lower better) | DIV (higher better) | subject fidelity | prompt fidelity |",
              "| --- | --- | --- | --- | --- |"]
        out.append(t3 + [row(c, ("PRES", "DIV", "subject_fidelity", "prompt_fidelity"))
                         for c in ("pretrained", "prior", "no_prior")])
    if all(scores.get(c) for c in ("no_prior", "no_class", "wrong_class")):
        arms = ("pretrained", "no_prior", "no_class", "wrong_class")
        shine = ["night_shine"] if all("night_shine" in s for c in arms for s in scores[c]) else []
        t4 = [f"| Table 4 (toy) | subject fidelity | {heads + ' | ' if heads else ''}prompt fidelity |"
              + (" shine at night |" if shine else ""), "| --- " * (3 + len(novel) + len(shine)) + "|"]
        t4 += [row(c, ("subject_fidelity", *novel, "prompt_fidelity", *shine)) for c in arms]
        out.append([line.replace(LABELS["no_prior"], "correct class noun") for line in t4])
    n = len(scores["pretrained"])
    note = f"mean ± std over {n} runs (subjects x seeds); real photos against each other: subject fidelity {summarise(real)}"
    return "\n\n".join("\n".join(t) for t in out) + "\n\n" + note + "\n"


def recipe_flags(recipe=train.TOY_RECIPE):
    """train.py's toy recipe as command-line flags, for a toy pipeline given by its folder
    (--toy_model), which train.py does not know to bring the recipe for."""
    flags = []
    for key, value in recipe.items():
        flags += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    return flags


def toy_world(folder):
    """The world a toy pipeline folder was pretrained on (its pretrain.json), plain if unrecorded."""
    record = Path(folder) / "pretrain.json"
    return json.loads(record.read_text())["args"].get("world", "plain") if record.exists() else "plain"


def labelled_grid(rows, scale=2, label_width=130):
    """rows: [(label, [PIL images])] -> one image, a label column then the images scaled up."""
    cell = world.SIZE * scale
    columns = max(len(images) for _, images in rows)
    sheet = Image.new("RGB", (label_width + columns * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (label, images) in enumerate(rows):
        draw.text((4, r * cell + cell // 2 - 6), label, fill=(0, 0, 0))
        for c, image in enumerate(images):
            sheet.paste(image.resize((cell, cell), Image.NEAREST), (label_width + c * cell, r * cell))
    return sheet


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=sample.DefaultsHelpFormatter)
    p.add_argument("--out", default="toy-ablation", help="folder for the table, the grids and the runs")
    p.add_argument("--subjects", nargs="+", default=list(world.SUBJECTS), choices=list(world.SUBJECTS),
                   help="the subjects to fine-tune on")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="train.py --seed values, per subject")
    p.add_argument("--quick", action="store_true", help="CI mode: one subject, one seed, short runs, few samples")
    p.add_argument("--keep_runs", action="store_true", help="keep each fine-tuned model folder")
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS),
                   help="the fine-tunings to run per subject and seed (Table 3 needs prior and no_prior; "
                        "Table 4 no_prior, no_class and wrong_class)")
    p.add_argument("--toy_model", help="another toy pipeline folder written by toy.pretrain (e.g. one of "
                                       "--world lit), fine-tuned with train.py's toy recipe; it is scored in "
                                       "the world it was pretrained on (default: the shipped toy/model)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--train_flags", default="",
                   help='more train.py flags for every fine-tuning, one string: another recipe to ablate '
                        '(e.g. "--max_steps 250")')
    p.add_argument("--class_samplers", nargs="+", type=sampler_spec, metavar="SCHEDULER:STEPS",
                   help="instead of Tables 3 and 4, compare class-image samplers: one prior-preservation "
                        "fine-tuning per sampler (e.g. ddim:50 dpmpp_2m_karras:20; the first is the reference "
                        "the others are compared with); writes samplers.md (default: off)")
    p.add_argument("--lora", nargs="+", type=lora_rank, metavar="RANK",
                   help="instead of Tables 3 and 4, compare full fine-tuning with LoRA of each rank (e.g. 4 16), "
                        "every fine-tuning with prior preservation; writes lora.md (default: off)")
    p.add_argument("--lora_lr", type=float, default=LORA_LR,
                   help="the LoRA fine-tunings' learning rate (full fine-tuning keeps the toy recipe's "
                        f"{train.TOY_RECIPE['lr']:g})")
    p.add_argument("--lora_targets", help="the LoRA fine-tunings' train.py --lora_targets (default: train.py's, "
                                          "the attention projections)")
    return p


def lora_rank(text):
    """argparse type of a --lora rank: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: a LoRA rank is a whole number of at least 1 (e.g. 4)")
    return int(text)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.lora and args.class_samplers:
        parser.error("--lora and --class_samplers are two different comparisons: give one")
    if args.lora_targets and not args.lora:
        parser.error("--lora_targets chooses the layers of --lora's LoRA fine-tunings: add --lora RANK (e.g. 4)")
    if args.lora_lr <= 0:
        parser.error(f"--lora_lr must be positive, got {args.lora_lr:g}")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = TOY_FLAGS if args.toy_model is None else ["--model", str(Path(args.toy_model).resolve()), *recipe_flags()]
    world.use_world(toy_world(train.TOY_MODEL if args.toy_model is None else args.toy_model))
    flags, sizes = base + shlex.split(args.train_flags), {}
    if args.quick:
        args.subjects, args.seeds = args.subjects[:1], args.seeds[:1]
        flags, sizes = flags + QUICK_FLAGS, dict(per_context=1, class_images=4, steps=10)
    if args.class_samplers:
        return sampler_main(args, out, flags)
    if args.lora:
        return lora_main(args, out, flags, sizes)
    start = time.time()
    pretrained = load_pipeline(args.toy_model or "toy")
    scores = {c: [] for c in ("pretrained", *args.configs)}
    real = []
    for subject in args.subjects:
        noun, photos = world.SUBJECTS[subject].noun, subject_photos(subject)
        real.append(metrics.self_similarity(photos))
        for seed in args.seeds:
            rows = [("real photos", photos)]
            identifier = dreambooth.choose_identifier(pretrained.tokenizer, noun, seed=seed)  # as train.py draws it
            class_prompt = dreambooth.CLASS_TEMPLATE.format(class_noun=noun)
            base, base_subject, base_class = evaluate(
                pretrained, dreambooth.INSTANCE_TEMPLATE.format(identifier=identifier, class_noun=noun),
                class_prompt, photos, views=world_views(subject), subject=subject, **sizes)
            scores["pretrained"].append(base)
            rows.append(("pretrained [V]", base_subject))
            class_rows = [(f"pretrained: {class_prompt}", base_class)]
            for config in args.configs:
                used, (result, subject_images, class_images) = run(config, subject, seed, out, flags, args.keep_runs,
                                                                   **sizes)
                assert used == identifier, f"train.py drew {used!r}, expected {identifier!r}"
                scores[config].append(result)
                rows.append((f"{LABELS[config]} [V]", subject_images))
                if config in ("prior", "no_prior"):
                    class_rows.append((f"{LABELS[config]}: class", class_images))
                print(f"[{time.time() - start:6.0f}s] {subject} seed {seed} {config}: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "context_fidelity")
                      + "; by context " + ", ".join(f"{v:.3f}" for v in result["context_fidelity"].values()),
                      file=sys.stderr, flush=True)
            columns = len(world.CONTEXTS)
            grid = labelled_grid([(label, images[:columns]) for label, images in rows + class_rows])
            grid.save(out / f"grid-{subject}-seed{seed}.png")
    text = tables(scores, real)
    minutes = (time.time() - start) / 60
    (out / "ablation.md").write_text(text + f"\n{len(args.subjects)} subjects x {len(args.seeds)} seeds, {minutes:.1f} min\n")
    (out / "ablation.json").write_text(json.dumps({"scores": scores, "real": real, "args": vars(args),
                                                    "flags": flags, "minutes": minutes}, indent=2))
    print(text)
    print(f"wrote {out / 'ablation.md'} and the grids in {out} ({minutes:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
