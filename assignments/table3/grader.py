"""Grader of the table3 experiment. Two kinds of file:

  my_table3.py   the student's train_argv: parsed with train.py's own parser and checked for
                 the two settings (seconds);
  table3.json    the record assignments.table3.run writes: checked for having been produced by
                 that run (argv, seeds, the runs' own dreambooth.json and loss logs, the sample
                 files' checksums, the metrics recomputed from those files, samples drawn again
                 from the saved models), not for its values, which the report discusses.
"""
import contextlib
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

import dreambooth
import train
from assignments.checking import Check, Fail, expect, load_file
from assignments.table3 import run
from clip_text import CLIPTokenizer
from load_weights import TOY_MODEL, load_pipeline
from toy import ablation, world

FUNCTIONS = ("train_argv",)
MINUTES = ("about 20 min to write train_argv, 10 min to run, 1-2 h for the report; grading the .py takes 1 s, "
           "the run's .json 10-30 s")
RECIPE_KEYS = ("model", "max_steps", "lr", "resolution", "num_class_images", "class_steps", "class_guidance_scale",
               "prior_loss_weight", "batch_size", "train_text_encoder", "lora_rank", "mixed_precision",
               "instance_template", "class_template", "identifier", "rare_ranks")
RECORDED_KEYS = ("seed", "no_prior_preservation", "max_steps", "class_noun", "num_class_images", "lr",
                 "prior_loss_weight", "model", "output_dir", "instance_dir")


class Record(SimpleNamespace):
    """A table3.json and the folder it lies in (its paths are relative to that folder)."""


def load(path):
    if Path(path).suffix == ".json":
        return Record(path=Path(path), root=Path(path).resolve().parent, data=json.loads(Path(path).read_text()))
    return load_file(path, FUNCTIONS)


def solution():
    return SimpleNamespace(train_argv=run.reference_train_argv)


def notes(path):
    return []


def parse(argv):
    """train.py's arguments for argv, as train.main would read them (the toy recipe applied)."""
    expect(isinstance(argv, (list, tuple)) and all(isinstance(a, str) for a in argv),
           f"expected a list of strings (train.main's argv), got {argv!r}")
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return train.parse_args(train.build_parser(), list(argv))
    except SystemExit:
        raise Fail(f"train.py's parser refuses {argv}: {errors.getvalue().strip().splitlines()[-1]}") from None


# ----------------------------------------------------------------------------------------------
# The student's train_argv


def argv_of(student, config, seed, subject=run.SUBJECT, out_dir="experiment"):
    return parse(student.train_argv(config, subject, seed, out_dir))


def check_parses(student):
    for config in run.CONFIGS:
        argv_of(student, config, 0)


def check_settings(student):
    for config, off in (("prior", False), ("no_prior", True)):
        args = argv_of(student, config, 0)
        expect(args.no_prior_preservation == off, f"config {config!r}: prior preservation is "
                                                  f"{'off' if args.no_prior_preservation else 'on'}, expected "
                                                  f"{'off (--no_prior_preservation)' if off else 'on'}")


def check_subject_and_seed(student):
    for subject in (run.SUBJECT, "bee_square"):
        for config in run.CONFIGS:
            for seed in (0, 5):
                args = argv_of(student, config, seed, subject)
                expect(args.model == "toy", f"--model is {args.model!r}, expected 'toy'")
                expect(Path(args.instance_dir).resolve() == (ablation.SUBJECTS_DIR / subject).resolve(),
                       f"subject {subject!r}: --instance_dir is {args.instance_dir}, expected its photos, "
                       f"{ablation.SUBJECTS_DIR / subject}")
                noun = world.SUBJECTS[subject].noun
                expect(args.class_noun == noun, f"subject {subject!r}: --class_noun is {args.class_noun!r}, expected {noun!r}")
                expect(args.seed == seed, f"seed {seed}: --seed is {args.seed}")


def check_recipe(student):
    for config in run.CONFIGS:
        args, expected = argv_of(student, config, 0), argv_of(solution(), config, 0)
        for key in RECIPE_KEYS:
            expect(getattr(args, key) == getattr(expected, key),
                   f"config {config!r}: --{key} is {getattr(args, key)!r}, the toy recipe's is {getattr(expected, key)!r}: "
                   "Table 3 compares the method as its recipe runs it")


def check_folders(student, out_dir="experiment"):
    out = Path(out_dir).resolve()
    runs = {(c, s): argv_of(student, c, s, out_dir=out_dir) for c in run.CONFIGS for s in (0, 1, 2)}
    outputs = [Path(a.output_dir).resolve() for a in runs.values()]
    expect(len(set(outputs)) == len(outputs), "two runs write the same --output_dir: each (config, seed) needs its own")
    for path in outputs:
        expect(path.is_relative_to(out), f"--output_dir {path} is outside out_dir {out}")
    class_dirs = {a.class_dir for (c, _), a in runs.items() if c == "prior"}
    expect(None not in class_dirs, "--class_dir is not given: the default (OUTPUT_DIR/class_images) makes the 50 class "
                                   "images again for every seed")
    expect(len({Path(d).resolve() for d in class_dirs}) == 1,
           f"the prior runs use {len(class_dirs)} class-image folders: share one, so they are made once")
    expect(Path(class_dirs.pop()).resolve().is_relative_to(out), "--class_dir is outside out_dir")


def code_checks(student):
    return [Check("train_argv gives a command line train.py parses, for both settings", lambda: check_parses(student)),
            Check("prior preservation on for 'prior', off for 'no_prior'", lambda: check_settings(student)),
            Check("the toy model, the subject's photos and class noun, the run's seed",
                  lambda: check_subject_and_seed(student)),
            Check("the toy recipe unchanged", lambda: check_recipe(student)),
            Check("each run its own folder inside out_dir; one shared class-image folder",
                  lambda: check_folders(student))]


# ----------------------------------------------------------------------------------------------
# The run's record


def trained(record):
    return [r for r in record.data["runs"] if r["config"] != "pretrained"]


def check_format(record):
    data = record.data
    expect(data.get("exercise") == "table3" and data.get("format") == run.FORMAT,
           f"{record.path.name} is not a table3 record of format {run.FORMAT} (written by assignments.table3.run)")
    for key in ("subject", "class_noun", "seeds", "sampling", "runs", "table", "timing", "quick"):
        expect(key in data, f"the record has no {key!r}")


def check_coverage(record):
    seeds = record.data["seeds"]
    expect(len(seeds) >= 2 and len(set(seeds)) == len(seeds), f"seeds {seeds}: a spread needs two different seeds or more")
    for config in ("pretrained", *run.CONFIGS):
        got = sorted(r["seed"] for r in record.data["runs"] if r["config"] == config)
        expect(got == sorted(seeds), f"{config}: runs for seeds {got}, expected one for each of {sorted(seeds)}")


def check_argv(record):
    noun = record.data["class_noun"]
    expect(noun == world.SUBJECTS[record.data["subject"]].noun, f"class noun {noun!r} is not the subject's")
    for r in trained(record):
        args, what = parse(r["argv"]), f"{r['config']} seed {r['seed']}"
        expect(args.seed == r["seed"], f"{what}: its argv has --seed {args.seed}")
        expect(args.no_prior_preservation == (r["config"] == "no_prior"),
               f"{what}: its argv has prior preservation {'off' if args.no_prior_preservation else 'on'}")
        expect(args.model == "toy" and args.class_noun == noun, f"{what}: its argv is not the toy model with {noun!r}")
        expect(Path(args.instance_dir).parts[-2:] == ("subjects", record.data["subject"]),
               f"{what}: --instance_dir {args.instance_dir} is not the subject's photos")
        expect(Path(args.output_dir).name == Path(r["output_dir"]).name, f"{what}: its argv writes elsewhere")


def check_outputs(record):
    tokenizer = CLIPTokenizer.from_folder(TOY_MODEL / "tokenizer")
    for r in record.data["runs"]:
        what = f"{r['config']} seed {r['seed']}"
        if r["config"] == "pretrained":
            drawn = dreambooth.choose_identifier(tokenizer, record.data["class_noun"], seed=r["seed"])
            expect(r["identifier"] == drawn, f"{what}: identifier {r['identifier']!r}, but seed {r['seed']} draws {drawn!r}")
            continue
        folder = record.root / r["output_dir"]
        expect((folder / "dreambooth.json").is_file(), f"{what}: {folder} holds no dreambooth.json (the run's model)")
        info, args = json.loads((folder / "dreambooth.json").read_text()), parse(r["argv"])
        for key in RECORDED_KEYS:
            expect(info["args"][key] == getattr(args, key),
                   f"{what}: the run's dreambooth.json has {key}={info['args'][key]!r}, its argv {getattr(args, key)!r}")
        expect(info["identifier"] == r["identifier"], f"{what}: the model's identifier is {info['identifier']!r}")
        losses = [json.loads(line) for line in (folder / "loss.jsonl").read_text().splitlines()]
        expect(len(losses) == args.max_steps, f"{what}: loss.jsonl has {len(losses)} steps, the argv {args.max_steps}")
        with_prior = all(x["prior_loss"] > 0 for x in losses)
        expect(with_prior == (r["config"] == "prior") and (with_prior or all(x["prior_loss"] == 0 for x in losses)),
               f"{what}: its loss log says prior preservation was {'on' if with_prior else 'off'}")


def sample_files(record, r, kind):
    return [record.root / s["file"] for s in r["samples"][kind]]


def check_files(record):
    for r in record.data["runs"]:
        for kind in ("subject", "class"):
            for entry, path in zip(r["samples"][kind], sample_files(record, r, kind)):
                expect(path.is_file(), f"{r['config']} seed {r['seed']}: {entry['file']} is missing")
                expect(run.sha256(path) == entry["sha256"], f"{entry['file']} is not the file the run saved (checksum)")


def check_metrics(record):
    photos = ablation.subject_photos(record.data["subject"])
    for r in record.data["runs"]:
        subject_prompts, contexts, class_prompts = run.prompts(r["instance_prompt"], r["class_prompt"],
                                                               record.data["sampling"])
        expect([s["prompt"] for s in r["samples"]["subject"]] == subject_prompts and
               [s["prompt"] for s in r["samples"]["class"]] == class_prompts,
               f"{r['config']} seed {r['seed']}: the samples' prompts are not the sampling plan's")
        images = {kind: [Image.open(p).convert("RGB") for p in sample_files(record, r, kind)] for kind in ("subject", "class")}
        scores = run.score(images["subject"], contexts, images["class"], photos)
        for metric, value in scores.items():
            expect(math.isclose(r["metrics"][metric], value, abs_tol=1e-9),
                   f"{r['config']} seed {r['seed']}: {metric} is {r['metrics'][metric]:.6f} in the record, "
                   f"{value:.6f} from its sample files")


def check_resample(record):
    sampling = record.data["sampling"]
    for r in record.data["runs"]:
        pipeline = load_pipeline("toy" if r["output_dir"] is None else record.root / r["output_dir"])
        for kind in ("subject", "class"):
            entry = r["samples"][kind][0]
            again = np.asarray(run.generate(pipeline, [entry["prompt"]], sampling, batch_size=1)[0], dtype=np.int16)
            saved = np.asarray(Image.open(record.root / entry["file"]).convert("RGB"), dtype=np.int16)
            difference = int(np.abs(again - saved).max())
            expect(difference <= 1, f"{r['config']} seed {r['seed']}: {entry['file']} drawn again from "
                                    f"{r['output_dir'] or 'the pretrained toy'} differs by {difference} levels (tolerance 1)")


def check_table(record):
    expected = run.table(record.data["runs"])
    for config, row in expected.items():
        for metric, (mean, std) in row.items():
            got = record.data["table"][config][metric]
            expect(math.isclose(got[0], mean, abs_tol=1e-9) and math.isclose(got[1], std, abs_tol=1e-9),
                   f"table {config} {metric}: {got}, but the runs give mean {mean:.6f}, std {std:.6f}")


def check_full(record):
    data = record.data
    expect(not data["quick"], "a --quick run (a few steps): run the experiment without --quick for the report")
    expect(len(data["seeds"]) >= 3, f"{len(data['seeds'])} seeds: the experiment uses 3 or more")
    expect(data["sampling"] == run.SAMPLING, f"sampling {data['sampling']}, the experiment's is {run.SAMPLING}")
    for r in trained(record):
        args = parse(r["argv"])
        for key in ("max_steps", "num_class_images"):
            expect(getattr(args, key) == train.TOY_RECIPE[key],
                   f"{r['config']} seed {r['seed']}: --{key} {getattr(args, key)}, the recipe's {train.TOY_RECIPE[key]}")


def record_checks(record):
    return [Check("a table3 record", lambda: check_format(record)),
            Check("the pretrained model and both settings, once per seed, two seeds or more",
                  lambda: check_coverage(record)),
            Check("each run's argv: its seed, its setting, the toy subject", lambda: check_argv(record)),
            Check("each run's model folder: its dreambooth.json, its loss log, the identifier",
                  lambda: check_outputs(record)),
            Check("the sample files are the ones the run saved", lambda: check_files(record)),
            Check("the metrics are those of the sample files", lambda: check_metrics(record)),
            Check("the samples come from the saved models (drawn again)", lambda: check_resample(record)),
            Check("the table is the runs' mean and standard deviation", lambda: check_table(record)),
            Check("the full experiment: the toy recipe, 3 seeds or more, not --quick", lambda: check_full(record))]


def checks(student):
    return record_checks(student) if isinstance(student, Record) else code_checks(student)
