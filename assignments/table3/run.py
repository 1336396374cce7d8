"""Run the table3 experiment: DreamBooth with and without prior preservation on a toy subject,
over seeds, scored from pixels, with everything the grader needs to check that the numbers come
from this run.

    python -m assignments.table3.run --file my_table3.py --out results/table3

For each seed: the pretrained toy model (prompted with the identifier that seed draws) and the
two fine-tunings (train.main with the argv of your train_argv), each sampled with fixed seeds
("a photo of [V] circle <context>" in the five contexts, and the class prompt "a photo of
circle") and scored by toy/metrics.py: PRES, DIV, subject fidelity, prompt fidelity. Written to
OUT: table3.json (the record: argv, seeds, metrics, sample files with their checksums, times),
table3.md (the table), grid.png (the samples of the first seed), samples/ and the runs' model
folders (the grader samples them again).
"""
import argparse
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import dreambooth
import sample
import train
from assignments.checking import load_file
from load_weights import load_pipeline
from toy import ablation, metrics, world

SUBJECT, SEEDS, CONFIGS = "eye_circle", (0, 1, 2), ("prior", "no_prior")
# the samples scored per model (toy.ablation's evaluation): 4 per context, 16 of the class prompt
SAMPLING = dict(steps=ablation.EVAL["steps"], guidance_scale=ablation.EVAL["guidance_scale"], seed=1000,
                per_context=4, class_images=16, mixed_precision="no")
# --quick (CI): a few training and sampler steps, to test the pipeline and the grader, not the method
QUICK_FLAGS = ["--max_steps", "5", "--num_class_images", "2", "--class_steps", "2"]
QUICK_SAMPLING = dict(SAMPLING, steps=3, per_context=1, class_images=3)
METRICS = ("PRES", "DIV", "subject_fidelity", "prompt_fidelity")
FORMAT = 1


def reference_train_argv(config, subject, seed, out_dir):
    """The project's own answer: toy.ablation's command line for the two settings."""
    return ablation.train_args(config, subject, seed, Path(out_dir), ablation.TOY_FLAGS)


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def prompts(instance_prompt, class_prompt, sampling):
    """(subject prompts, their contexts, class prompts) that every model is scored on."""
    contexts = [c for c in world.CONTEXTS for _ in range(sampling["per_context"])]
    return [f"{instance_prompt} {c}" for c in contexts], contexts, [class_prompt] * sampling["class_images"]


def generate(pipeline, prompt_list, sampling, batch_size=20):
    return sample.generate(pipeline, prompt_list, seed=sampling["seed"], steps=sampling["steps"],
                           guidance_scale=sampling["guidance_scale"], mixed_precision=sampling["mixed_precision"],
                           batch_size=batch_size, progress=False)


def score(subject_images, contexts, class_images, photos):
    """The four numbers of one model, from its samples (PIL images or arrays) and the photos."""
    return {"PRES": metrics.pres(class_images, photos), "DIV": metrics.div(class_images),
            "subject_fidelity": metrics.subject_fidelity(subject_images, photos),
            "prompt_fidelity": metrics.prompt_fidelity(subject_images, contexts)}


def sample_and_score(pipeline, instance_prompt, class_prompt, photos, sampling, folder, root):
    """Sample one model, save every scored image under folder, and score them."""
    subject_prompts, contexts, class_prompts = prompts(instance_prompt, class_prompt, sampling)
    images = {"subject": generate(pipeline, subject_prompts, sampling), "class": generate(pipeline, class_prompts, sampling)}
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for kind, kind_prompts in (("subject", subject_prompts), ("class", class_prompts)):
        files[kind] = []
        for k, (image, prompt) in enumerate(zip(images[kind], kind_prompts)):
            path = folder / f"{kind}-{k:02d}.png"
            image.save(path)
            files[kind].append({"file": str(path.relative_to(root)), "sha256": sha256(path), "prompt": prompt})
    return score(images["subject"], contexts, images["class"], photos), files, images


def train_run(argv, config, seed, root, photos, sampling):
    """One fine-tuning: train.main(argv), then sample and score its model."""
    start = time.time()
    if train.main(argv) != 0:
        raise RuntimeError(f"train.py failed: {argv}")
    train_s = time.time() - start
    output_dir = Path(train.parse_args(train.build_parser(), argv).output_dir)
    info = json.loads((output_dir / "dreambooth.json").read_text())
    class_prompt = dreambooth.CLASS_TEMPLATE.format(class_noun=world.SUBJECTS[SUBJECT].noun)
    scores, files, images = sample_and_score(load_pipeline(output_dir), info["instance_prompt"], class_prompt, photos,
                                             sampling, root / "samples" / f"{config}-seed{seed}", root)
    run = {"config": config, "seed": seed, "identifier": info["identifier"], "argv": list(argv),
           "output_dir": os.path.relpath(output_dir, root), "instance_prompt": info["instance_prompt"],
           "class_prompt": class_prompt, "metrics": scores, "samples": files, "train_s": round(train_s, 1)}
    return run, images


def pretrained_run(pretrained, seed, root, photos, sampling):
    """The pretrained toy model, prompted with the identifier this seed draws (as train.py does)."""
    noun = world.SUBJECTS[SUBJECT].noun
    identifier = dreambooth.choose_identifier(pretrained.tokenizer, noun, seed=seed)
    instance_prompt, class_prompt = dreambooth.make_prompts(identifier, noun)
    scores, files, images = sample_and_score(pretrained, instance_prompt, class_prompt, photos, sampling,
                                             root / "samples" / f"pretrained-seed{seed}", root)
    return {"config": "pretrained", "seed": seed, "identifier": identifier, "argv": None, "output_dir": None,
            "instance_prompt": instance_prompt, "class_prompt": class_prompt, "metrics": scores, "samples": files}, images


def table(runs):
    """{config: {metric: [mean, std over seeds]}} of the runs."""
    out = {}
    for config in ("pretrained", *CONFIGS):
        values = {m: [r["metrics"][m] for r in runs if r["config"] == config] for m in METRICS}
        out[config] = {m: [statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0] for m, v in values.items()}
    return out


def markdown(summary, seeds):
    lines = [f"| Table 3 (toy, {SUBJECT}, seeds {', '.join(map(str, seeds))}) | PRES (lower better) | "
             "DIV (higher better) | subject fidelity | prompt fidelity |", "| --- | --- | --- | --- | --- |"]
    for config, label in (("pretrained", "pretrained"), ("prior", "with prior pres."), ("no_prior", "w/o prior pres.")):
        lines.append(f"| {label} | " + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in (summary[config][k] for k in METRICS))
                     + " |")
    return "\n".join(lines) + "\n\nmean ± standard deviation over seeds\n"


def checked_train_argv(path):
    """The student's train_argv, once it passes the grader's checks: a wrong command line would
    only show after minutes of training."""
    from assignments import grade  # here: the grader imports this module

    if not Path(path).is_file():
        sys.exit(f"error: --file {path} does not exist")
    if not all(r.passed for r in grade.grade("table3", path)):
        sys.exit(f"error: fix train_argv first (python -m assignments.grade table3 --file {path})")
    return load_file(path, ("train_argv",)).train_argv


def build_parser():
    p = argparse.ArgumentParser(prog="python -m assignments.table3.run", description=__doc__.split("\n\n")[0],
                                formatter_class=sample.DefaultsHelpFormatter)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--file", help="your filled-in starter, which defines train_argv (default: none)")
    source.add_argument("--solution", action="store_true", help="use the project's own train_argv")
    p.add_argument("--out", required=True, help="the experiment's folder (created; must be empty or absent)")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS), help="training seeds")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's, the CPU count)")
    p.add_argument("--quick", action="store_true",
                   help=f"a few steps only ({' '.join(QUICK_FLAGS)}, 3 sampler steps): tests the pipeline, "
                        "the grader marks it as not the experiment")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = Path(args.out)
    if root.exists() and any(root.iterdir()):
        sys.exit(f"error: {root} is not empty: give a new --out folder (an experiment's folder holds one run)")
    if args.threads:
        torch.set_num_threads(args.threads)
    train_argv = reference_train_argv if args.solution else checked_train_argv(args.file)
    sampling, extra = (QUICK_SAMPLING, QUICK_FLAGS) if args.quick else (SAMPLING, [])
    root.mkdir(parents=True, exist_ok=True)
    start, load_start = time.time(), os.getloadavg()[0]
    photos, pretrained = ablation.subject_photos(SUBJECT), load_pipeline("toy")
    runs, grid_rows = [], []
    for seed in args.seeds:
        run, images = pretrained_run(pretrained, seed, root, photos, sampling)
        runs.append(run)
        for config in CONFIGS:
            run_argv = [str(a) for a in train_argv(config, SUBJECT, seed, str(root))] + extra
            run, trained_images = train_run(run_argv, config, seed, root, photos, sampling)
            runs.append(run)
            if seed == args.seeds[0]:
                grid_rows += [(f"{config}: [V]", trained_images["subject"][::sampling["per_context"]]),
                              (f"{config}: class", trained_images["class"][:8])]
            print(f"[{time.time() - start:5.0f} s] seed {seed} {config}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in run["metrics"].items()), file=sys.stderr, flush=True)
        if seed == args.seeds[0]:
            grid_rows = [("pretrained: [V]", images["subject"][::sampling["per_context"]]),
                         ("pretrained: class", images["class"][:8])] + grid_rows
    write_outputs(root, args, runs, grid_rows, sampling, start, load_start)
    return 0


def write_outputs(root, args, runs, grid_rows, sampling, start, load_start):
    summary = table(runs)
    student = None if args.solution else Path(args.file)
    record = {"exercise": "table3", "format": FORMAT, "quick": args.quick, "subject": SUBJECT,
              "class_noun": world.SUBJECTS[SUBJECT].noun, "seeds": list(args.seeds), "sampling": sampling,
              "student_file": str(student) if student else "the project's own train_argv (--solution)",
              "student_sha256": sha256(student) if student else None, "runs": runs, "table": summary,
              "timing": {"wall_s": round(time.time() - start, 1), "torch_threads": torch.get_num_threads(),
                         "cpus": os.cpu_count(), "load_average_at_start": load_start,
                         "load_average_at_end": os.getloadavg()[0]},
              "versions": {"python": platform.python_version(), "torch": torch.__version__}}
    (root / "table3.json").write_text(json.dumps(record, indent=2))
    (root / "table3.md").write_text(markdown(summary, args.seeds))
    ablation.labelled_grid([(label, list(images)) for label, images in grid_rows]).save(root / "grid.png")
    print(markdown(summary, args.seeds))
    print(f"wrote {root / 'table3.json'}, table3.md and grid.png ({record['timing']['wall_s'] / 60:.1f} min); "
          f"next: python -m assignments.grade table3 --file {root / 'table3.json'}")


if __name__ == "__main__":
    sys.exit(main())
