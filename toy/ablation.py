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

    python -m toy.ablation                       # 3 subjects x 3 seeds (see --help), about 30 min
    python -m toy.ablation --quick --out /tmp/a  # the reduced CI mode, about a minute
"""
import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, when run as a script

import dreambooth  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
from load_weights import load_pipeline  # noqa: E402
from toy import metrics, world  # noqa: E402

HERE = Path(__file__).resolve().parent
SUBJECTS_DIR = HERE / "subjects"

# train.py's own toy recipe (train.TOY_RECIPE: 32 px, 50 class images, 1000 steps, ...)
TOY_FLAGS = ["--model", "toy"]
QUICK_FLAGS = ["--num_class_images", "4", "--class_steps", "5", "--max_steps", "30"]  # override TOY_FLAGS
EVAL = dict(steps=25, guidance_scale=5.0)          # sampler settings of every scored image
WRONG_CLASS = {"square": "circle", "circle": "square", "triangle": "circle", "star": "circle"}
CONFIGS = ("prior", "no_prior", "no_class", "wrong_class")
LABELS = {"pretrained": "pretrained", "prior": "with prior pres.", "no_prior": "w/o prior pres.",
          "no_class": "no class noun", "wrong_class": "wrong class noun"}


def subject_photos(name):
    return [Image.open(p).convert("RGB") for p in dreambooth.list_images(SUBJECTS_DIR / name)]


def evaluate(pipeline, instance_prompt, class_prompt, photos, *, per_context=4, class_images=16, seed=1000,
             steps=EVAL["steps"], guidance_scale=EVAL["guidance_scale"]):
    """Sample "<instance prompt> <context>" for every context and the class prompt, and score
    them. Returns (scores, [V] images (first of each context), class images)."""
    contexts = [c for c in world.CONTEXTS for _ in range(per_context)]
    kwargs = dict(steps=steps, guidance_scale=guidance_scale, mixed_precision="no", progress=False, batch_size=20)
    subject_samples = sample.generate(pipeline, [f"{instance_prompt} {c}" for c in contexts], seed=seed, **kwargs)
    class_samples = sample.generate(pipeline, [class_prompt] * class_images, seed=seed, **kwargs)
    scores = {"subject_fidelity": metrics.subject_fidelity(subject_samples, photos),
              "prompt_fidelity": metrics.prompt_fidelity(subject_samples, contexts),
              "PRES": metrics.pres(class_samples, photos), "DIV": metrics.div(class_samples)}
    return scores, subject_samples[::per_context], class_samples


def train_args(config, subject, seed, out, flags):
    """train.py's argv for one run."""
    noun = world.SUBJECTS[subject].noun
    argv = [*flags, "--instance_dir", str(SUBJECTS_DIR / subject), "--seed", str(seed),
            "--output_dir", str(out / "runs" / f"{subject}-{config}-seed{seed}")]
    if config == "prior":
        return argv + ["--class_noun", noun, "--class_dir", str(out / "class_images" / noun)]
    argv += ["--no_prior_preservation"]
    if config == "no_class":  # the class noun is only used to check the identifier against
        return argv + ["--class_noun", noun, "--instance_template", "a photo of {identifier}"]
    return argv + ["--class_noun", WRONG_CLASS[noun] if config == "wrong_class" else noun]


def run(config, subject, seed, out, flags, keep=False):
    argv = train_args(config, subject, seed, out, flags)
    if train.main(argv) != 0:
        raise RuntimeError(f"train.py failed: {argv}")
    folder = Path(argv[argv.index("--output_dir") + 1])
    info = json.loads((folder / "dreambooth.json").read_text())
    result = evaluate(load_pipeline(folder), info["instance_prompt"],
                      dreambooth.CLASS_TEMPLATE.format(class_noun=world.SUBJECTS[subject].noun), subject_photos(subject))
    if not keep:
        shutil.rmtree(folder)
    return info["identifier"], result


# ----------------------------------------------------------------------------------------------
# Reporting


def summarise(values):
    values = list(values)
    mean = statistics.fmean(values)
    return f"{mean:.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1 else f"{mean:.3f}"


def tables(scores, real):
    """Markdown tables from scores[config] = list of dicts (one per subject and seed)."""
    def row(name, keys):
        return f"| {LABELS[name]} | " + " | ".join(summarise(s[k] for s in scores[name]) for k in keys) + " |"
    t3 = ["| Table 3 (toy) | PRES (lower better) | DIV (higher better) | subject fidelity | prompt fidelity |",
          "| --- | --- | --- | --- | --- |"]
    t3 += [row(c, ("PRES", "DIV", "subject_fidelity", "prompt_fidelity")) for c in ("pretrained", "prior", "no_prior")]
    t4 = ["| Table 4 (toy) | subject fidelity | prompt fidelity |", "| --- | --- | --- |"]
    t4 += [row(c, ("subject_fidelity", "prompt_fidelity")) for c in ("pretrained", "no_prior", "no_class", "wrong_class")]
    t4[-3] = t4[-3].replace(LABELS["no_prior"], "correct class noun")
    n = len(scores["prior"])
    note = f"mean ± std over {n} runs (subjects x seeds); real photos against each other: subject fidelity {summarise(real)}"
    return "\n".join(t3) + "\n\n" + "\n".join(t4) + "\n\n" + note + "\n"


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
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="toy-ablation", help="folder for the table, the grids and the runs")
    p.add_argument("--subjects", nargs="+", default=list(world.SUBJECTS), choices=list(world.SUBJECTS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--quick", action="store_true", help="CI mode: one subject, one seed, short runs, few samples")
    p.add_argument("--keep_runs", action="store_true", help="keep each fine-tuned model folder")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    flags, sizes = TOY_FLAGS, {}
    if args.quick:
        args.subjects, args.seeds = args.subjects[:1], args.seeds[:1]
        flags, sizes = TOY_FLAGS + QUICK_FLAGS, dict(per_context=1, class_images=4, steps=10)
    start = time.time()
    pretrained = load_pipeline("toy")
    scores = {c: [] for c in ("pretrained", *CONFIGS)}
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
                class_prompt, photos, **sizes)
            scores["pretrained"].append(base)
            rows.append((f"pretrained [V]", base_subject))
            class_rows = [(f"pretrained: {class_prompt}", base_class)]
            for config in CONFIGS:
                used, (result, subject_images, class_images) = run(config, subject, seed, out, flags, args.keep_runs)
                assert used == identifier, f"train.py drew {used!r}, expected {identifier!r}"
                scores[config].append(result)
                rows.append((f"{LABELS[config]} [V]", subject_images))
                if config in ("prior", "no_prior"):
                    class_rows.append((f"{LABELS[config]}: class", class_images))
                print(f"[{time.time() - start:6.0f}s] {subject} seed {seed} {config}: "
                      + ", ".join(f"{k} {v:.3f}" for k, v in result.items()), file=sys.stderr, flush=True)
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
