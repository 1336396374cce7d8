"""Grader of the class_images exercise: the student's ensure_class_images against
dreambooth.ensure_class_images, with sample.generate replaced by a recorder whose images carry
their seed and prompt in their pixels, so that each file says which seed made it."""
import contextlib
import io
import tempfile
import zlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from PIL import Image

import dreambooth
import sample
from assignments.checking import Check, Fail, expect, load_file, source_notes

FUNCTIONS = ("ensure_class_images",)
MINUTES = "about 40 min to write; grading takes under 1 s"
PROMPT, SEED, N, BATCH = "a photo of circle", 10, 6, 4
PIPELINE = object()  # generate must receive the pipeline it was given
SAMPLER = dict(steps=3, guidance_scale=2.0, scheduler="ddim")


class Interrupted(Exception):
    """The recorder's stand-in for an interruption (Ctrl-C, a lost machine)."""


def seed_image(seed, prompt):
    """An 8x8 image whose pixels say which seed and prompt made it."""
    pixel = (seed % 256, seed // 256 % 256, zlib.crc32(prompt.encode()) % 256)
    return Image.new("RGB", (8, 8), pixel)


def made_by(path):
    """(seed, prompt checksum) written in an image by seed_image."""
    r, g, b = np.asarray(Image.open(path).convert("RGB"))[0, 0]
    return int(r) + 256 * int(g), int(b)


class Recorder:
    """Stands in for sample.generate (same keywords): records every call; image k of a call is
    made from seed + k. interrupt_after: raise Interrupted instead of going past that many images."""

    def __init__(self):
        self.reset()

    def reset(self, interrupt_after=None):
        self.calls, self.interrupt_after = [], interrupt_after

    @property
    def total(self):
        return sum(len(c.prompts) for c in self.calls)

    def __call__(self, pipeline, prompts, *, negative_prompt="", scheduler="ddim", steps=50, guidance_scale=7.5,
                 eta=0.0, seed=None, height=None, width=None, batch_size=4, mixed_precision="auto", progress=True):
        if pipeline is not PIPELINE:
            raise TypeError(f"sample.generate was given {type(pipeline).__name__} instead of the pipeline")
        if self.interrupt_after is not None and self.total + len(prompts) > self.interrupt_after:
            raise Interrupted("interrupted")
        self.calls.append(SimpleNamespace(prompts=list(prompts), seed=seed, batch_size=batch_size,
                                          settings=dict(scheduler=scheduler, steps=steps, guidance_scale=guidance_scale)))
        return [seed_image(seed + k, p) for k, p in enumerate(prompts)]


RECORDER = Recorder()


@contextlib.contextmanager
def recording():
    """sample.generate is the recorder while inside; the progress output is swallowed."""
    original, sample.generate = sample.generate, RECORDER
    RECORDER.reset()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield RECORDER
    finally:
        sample.generate = original


def load(path):
    with recording():  # a file that imports generate by name gets the recorder too
        return load_file(path, FUNCTIONS)


def solution():
    return SimpleNamespace(ensure_class_images=dreambooth.ensure_class_images)


def notes(path):
    return source_notes(path, {"dreambooth.ensure_class_images": "your file calls the project's own "
                                                                 "ensure_class_images: write it yourself"})


def run(student, folder, num_images=N, **kwargs):
    paths = student.ensure_class_images(PIPELINE, folder, PROMPT, num_images, seed=SEED, batch_size=BATCH,
                                        **{**SAMPLER, **kwargs})
    expect(isinstance(paths, (list, tuple)), f"expected a list of paths, got {type(paths).__name__}")
    return [Path(p).name for p in paths]


def expect_images(folder, indices):
    """Each class-{i:05d}.png in folder exists and was made from SEED + i with the class prompt."""
    for i in indices:
        path = Path(folder) / f"class-{i:05d}.png"
        expect(path.is_file(), f"{path.name} is missing (image i is class-{{i:05d}}.png)")
        seed, prompt = made_by(path)
        expect(prompt == zlib.crc32(PROMPT.encode()) % 256, f"{path.name} was not made with the class prompt")
        expect(seed == SEED + i, f"{path.name} was made with seed {seed}, expected {SEED + i}: image i comes from "
                                 f"seed + i (and generate makes image k of a call from its seed + k)")


def image_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix.lower() in dreambooth.IMAGE_SUFFIXES)


def check_empty(student):
    with recording(), tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "out" / "class_images"  # does not exist yet
        names = run(student, folder)
        expect_images(folder, range(N))
        expected = [f"class-{i:05d}.png" for i in range(N)]
        expect(image_files(folder) == expected, f"the folder holds {image_files(folder)}, expected {expected}")
        expect(names == expected, f"returned {names}, expected the paths of {expected}")


def check_calls(student):
    with recording() as recorder, tempfile.TemporaryDirectory() as tmp:
        run(student, Path(tmp))
        expect(recorder.total == N, f"sample.generate made {recorder.total} images in all, expected {N}")
        for call in recorder.calls:
            expect(len(call.prompts) <= BATCH, f"one call made {len(call.prompts)} images: work in batches of at "
                                               f"most batch_size={BATCH}, saving each before the next")
            expect(set(call.prompts) == {PROMPT}, f"generate was asked for {sorted(set(call.prompts))}, "
                                                  f"expected only {PROMPT!r}")
            expect(call.settings == SAMPLER, f"generate got the sampler settings {call.settings}, expected {SAMPLER}: "
                                             "pass sampler_args on unchanged")


def write(folder, name, seed):
    seed_image(seed, PROMPT).save(Path(folder) / name)


def check_shortfall(student):
    with recording() as recorder, tempfile.TemporaryDirectory() as tmp:
        write(tmp, "class-00001.png", SEED + 1)
        write(tmp, "class-00003.png", SEED + 3)
        write(tmp, "holiday.jpg", 999)  # an image the user put there counts too
        before = {n: (Path(tmp) / n).read_bytes() for n in image_files(tmp)}
        names = run(student, tmp)
        expect(recorder.total != N, f"generated {N} images, expected 3: three of the {N} are already there "
                                    "(two class images and a photo the user put in the folder); make only the shortfall")
        expect(recorder.total != 4, "generated 4 images, expected 3: images the user put in the folder count too")
        expect(recorder.total == 3, f"generated {recorder.total} images, expected 3 (the shortfall)")
        for name, data in before.items():
            expect((Path(tmp) / name).read_bytes() == data, f"{name} was there and was rewritten: keep what is there")
        expect_images(tmp, [0, 2, 4])  # the missing indices, lowest first
        expected = image_files(tmp)
        expect(len(expected) == N, f"the folder holds {expected}, expected {N} images")
        expect(names == expected, f"returned {names}, expected {expected} (the folder's images, sorted)")


def check_full(student):
    with recording() as recorder, tempfile.TemporaryDirectory() as tmp:
        for i in range(N):
            write(tmp, f"class-{i:05d}.png", SEED + i)
        names = run(student, tmp)
        expect(recorder.total == 0, f"the folder already holds {N} images, yet {recorder.total} were generated")
        expect(names == image_files(tmp), f"returned {names}, expected {image_files(tmp)}")
        names = run(student, tmp, num_images=4)
        expect(names == image_files(tmp)[:4], f"num_images=4 of {N}: returned {names}, expected {image_files(tmp)[:4]}")


def check_unreadable(student):
    with recording() as recorder, tempfile.TemporaryDirectory() as tmp:
        for i in range(N):
            write(tmp, f"class-{i:05d}.png", SEED + i)
        (Path(tmp) / "class-00002.png").write_bytes(b"half a file")
        run(student, tmp)
        expect(dreambooth.image_problem(Path(tmp) / "class-00002.png") is None,
               "class-00002.png cannot be read and is still there: delete unreadable images and make them again")
        expect(recorder.total == 1, f"one image was unreadable, {recorder.total} were generated")
        expect_images(tmp, range(N))


def check_resume(student):
    with recording() as recorder, tempfile.TemporaryDirectory() as tmp:
        recorder.reset(interrupt_after=BATCH)  # the call that would go past image 4 is interrupted
        try:
            run(student, tmp)
        except Interrupted:
            pass
        else:
            raise Fail("sample.generate was interrupted, yet ensure_class_images returned normally: let it raise")
        made = recorder.total
        expect(len(image_files(tmp)) == made, f"{made} images were generated before the interruption and "
                                              f"{len(image_files(tmp))} are on disk: save each batch before the next")
        recorder.reset()
        run(student, tmp)
        expect(recorder.total == N - made, f"started again, it generated {recorder.total} images, expected the "
                                           f"{N - made} still missing")
        expect_images(tmp, range(N))


def checks(student):
    return [Check("an empty folder: class-{i:05d}.png, image i from seed + i", lambda: check_empty(student)),
            Check("batches of at most batch_size, the class prompt, sampler_args passed on", lambda: check_calls(student)),
            Check("only the shortfall, the missing indices first; images already there kept",
                  lambda: check_shortfall(student)),
            Check("a full folder: nothing generated; num_images below what is there", lambda: check_full(student)),
            Check("an unreadable image is replaced", lambda: check_unreadable(student)),
            Check("an interrupted run, started again, ends with the same images", lambda: check_resume(student))]
