"""What every grader shares: load a student's file, run named checks, and say what differs.

A check is a named function that returns when the student's code does the right thing and
raises Fail(hint) when it does not. The hint says what differs (which output, the first
mismatching element, expected vs got) and, where a known mistake explains it, names that
mistake; it never shows the solution's code.
"""
import importlib.util
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]  # the project root: students' files import its modules


class Fail(Exception):
    """A check failed; the message is the hint shown to the student."""


@dataclass
class Check:
    name: str
    run: Callable[[], None]


@dataclass
class Result:
    name: str
    passed: bool
    hint: str = ""


def load_file(path, names):
    """Import the student's file and return its `names` as a namespace. A missing name becomes
    a function that fails when called, so every other check still runs."""
    path = Path(path).resolve()
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    spec = importlib.util.spec_from_file_location(f"student_{path.stem}_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # errors here are the student's: grade.py reports them

    def missing(name):
        def fail(*args, **kwargs):
            raise Fail(f"{path.name} defines no {name}: write it with the starter's signature")
        return fail
    return SimpleNamespace(**{n: getattr(module, n, None) or missing(n) for n in names}, __file__=str(path))


def describe_exception(error, student_file=None):
    """'NotImplementedError: ... (my.py line 12)': the error and where in the student's file it happened."""
    if isinstance(error, NotImplementedError):
        what = "not written yet (raises NotImplementedError)"
    else:
        what = f"raised {type(error).__name__}: {error}"
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if student_file and Path(f.filename).resolve() == Path(student_file).resolve()]
    return what + (f" ({Path(frames[-1].filename).name} line {frames[-1].lineno})" if frames else "")


def run_checks(checks, student_file=None):
    results = []
    for check in checks:
        try:
            check.run()
            results.append(Result(check.name, True))
        except Fail as e:
            results.append(Result(check.name, False, str(e)))
        except Exception as e:  # the student's code raised: say what and where
            results.append(Result(check.name, False, describe_exception(e, student_file)))
    return results


def print_results(title, results, seconds, out):
    print(title, file=out)
    for r in results:
        print(f"  {'PASS' if r.passed else 'FAIL'}  {r.name}" + (f"\n        {r.hint}" if r.hint else ""), file=out)
    passed = sum(r.passed for r in results)
    print(f"{passed}/{len(results)} checks passed ({seconds:.1f} s)", file=out)


def source_notes(path, patterns):
    """Notes (not failures) for a student's file that calls what it was asked to write:
    patterns maps a piece of source text to the note."""
    text = Path(path).read_text(errors="replace")
    return [note for pattern, note in patterns.items() if pattern in text]


# ----------------------------------------------------------------------------------------------
# Comparing values


def expect(condition, hint):
    if not condition:
        raise Fail(hint)


def _format_index(index):
    return "[" + ", ".join(str(i) for i in index) + "]"


def first_mismatch(got, expected, atol, rtol):
    """(index, expected value, got value) of the first element outside the tolerance, or None."""
    bad = ~torch.isclose(got.double(), expected.double(), rtol=rtol, atol=atol, equal_nan=True)
    if not bad.any():
        return None
    index = tuple(int(i) for i in bad.nonzero()[0])
    return index, expected.double()[index].item(), got.double()[index].item()


def compare(what, got, expected, *, atol=1e-5, rtol=1e-5, dtype=True, known=None):
    """Fail unless tensor `got` matches `expected`: a tensor, the same shape (and dtype, unless
    dtype=False), every element within atol + rtol * |expected|. known: {name of a mistake:
    tensor that mistake gives}; when got matches one of them the hint names the mistake."""
    if not isinstance(got, torch.Tensor):
        raise Fail(f"{what}: expected a tensor, got {type(got).__name__}")
    if tuple(got.shape) != tuple(expected.shape):
        raise Fail(f"{what}: expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if dtype and got.dtype != expected.dtype:
        raise Fail(f"{what}: expected dtype {expected.dtype}, got {got.dtype}")
    mismatch = first_mismatch(got.detach(), expected.detach(), atol, rtol)
    if mismatch is None:
        return
    index, e, g = mismatch
    diff = (got.detach().double() - expected.detach().double()).abs().max().item()
    where = f" at {_format_index(index)}" if index else ""
    hint = (f"{what}: first mismatch{where}: expected {e:.6g}, got {g:.6g} "
            f"(largest difference {diff:.3g}; tolerance {atol:g} + {rtol:g} x |expected|)")
    for mistake, value in (known or {}).items():
        if value.shape == got.shape and first_mismatch(got.detach(), value.detach(), atol, rtol) is None:
            hint += f"; it matches {mistake}"
            break
    raise Fail(hint)


def compare_number(what, got, expected, *, rtol=1e-5, atol=1e-7, known=None):
    """compare() for a scalar: a Python number or a 0-d tensor."""
    if isinstance(got, torch.Tensor):
        expect(got.ndim == 0, f"{what}: expected a scalar (0-d tensor), got shape {tuple(got.shape)}")
        got = got.item()
    expect(isinstance(got, (int, float)), f"{what}: expected a number, got {type(got).__name__}")
    if abs(got - expected) <= atol + rtol * abs(expected):
        return
    hint = f"{what}: expected {expected:.6g}, got {got:.6g}"
    for mistake, value in (known or {}).items():
        if abs(got - value) <= atol + rtol * abs(value):
            hint += f"; it matches {mistake}"
            break
    raise Fail(hint)


def seeded(seed):
    return torch.Generator().manual_seed(seed)
