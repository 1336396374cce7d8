"""Grade a student's file against the project's own implementation.

    python -m assignments.grade --list                        # the exercises
    python -m assignments.grade prior_loss --file my_loss.py  # a student's file
    python -m assignments.grade prior_loss --solution         # the project's own code (must pass)

Every check runs the student's functions and the project's on the same seeded inputs and
prints PASS or FAIL with a hint that says what differs. The exit status is 0 when every check
passes, 1 when one fails, 2 when the command itself is wrong (no such exercise or file).
"""
import argparse
import importlib
import sys
import time
from pathlib import Path

import sample
from assignments.checking import Result, describe_exception, print_results, run_checks

# name -> what the student writes; each has assignments/<name>/handout.md, starter.py and grader.py
EXERCISES = {
    "prior_loss": "the prior-preservation loss, Eq. 2 in one UNet pass",
    "identifier": "the rare-token identifier (section 3.2)",
    "ddim": "the forward process, the v-target and one DDIM step with eta",
    "attention": "cross-attention in the UNet's transformer block",
    "class_images": "the autogenous class images (section 3.3): the shortfall, image i from seed + i",
    "lora": "a LoRA layer: W0 x + (alpha / r) B A x, merged and unmerged",
    "table3": "experiment: Table 3 (prior preservation) on the toy model, PRES and DIV over seeds",
}


def grader(name):
    return importlib.import_module(f"assignments.{name}.grader")


def list_exercises():
    for name, what in EXERCISES.items():
        g = grader(name)
        print(f"{name:13s} {what}\n{'':13s} handout: assignments/{name}/handout.md, starter: "
              f"assignments/{name}/starter.py ({g.MINUTES})")


def grade(name, file=None, solution=False, out=None):
    """Run the exercise's checks; returns the list of Results (printed to `out`, default stdout)."""
    out = out or sys.stdout
    g = grader(name)
    start = time.perf_counter()
    student_file = None
    if solution:
        student, what = g.solution(), "the project's own implementation"
    else:
        student_file = str(Path(file).resolve())
        what = Path(file).name
        try:
            student = g.load(file)
        except Exception as e:  # the file does not import: nothing else can run
            results = [Result(f"{Path(file).name} loads", False, describe_exception(e, student_file))]
            print_results(f"{name}: {EXERCISES[name]} [{what}]", results, time.perf_counter() - start, out)
            return results
    results = run_checks(g.checks(student), student_file)
    print_results(f"{name}: {EXERCISES[name]} [{what}]", results, time.perf_counter() - start, out)
    for note in g.notes(file) if student_file else []:
        print(f"note: {note}", file=out)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m assignments.grade", description=__doc__.split("\n\n")[0],
                                formatter_class=sample.DefaultsHelpFormatter)
    p.add_argument("exercise", nargs="?", choices=list(EXERCISES), help="which exercise, see --list (default: none)")
    p.add_argument("--file", help="the student's file (the starter, filled in); table3 also takes the run's "
                                  "table3.json (default: none)")
    p.add_argument("--solution", action="store_true", help="grade the project's own implementation instead")
    p.add_argument("--list", action="store_true", help="list the exercises and exit")
    args = p.parse_args(argv)
    if args.list:
        list_exercises()
        return 0
    if not args.exercise or bool(args.file) == args.solution:
        p.error("give an exercise and either --file PATH or --solution (or --list)")
    if args.file and not Path(args.file).is_file():
        p.error(f"--file {args.file} does not exist")
    results = grade(args.exercise, args.file, args.solution)
    return 0 if all(r.passed for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
