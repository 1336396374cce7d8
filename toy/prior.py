"""Does the pretrained toy draw what its caption says? Shape, colour and context accuracy from pixels.

DreamBooth borrows the pretrained model's prior: "a [V] circle in the sky" works only if the
model already draws a circle when told "circle" and a sky when told "in the sky". This module
samples every caption of the world, "a photo of a {colour} {noun} {context}" (4 x 7 x 5 = 140),
SEEDS times each, and the class prompts "a photo of {noun}", and reads back from the pixels
(toy/metrics.py) the shape, the colour and the context it drew:

    python -m toy.prior                       # the shipped toy, 2 seeds per caption, about 2 min
    python -m toy.prior --model DIR --seeds 4 --json prior.json
    python -m toy.prior --model DIR --night_shine  # also: which classes it draws lighter at night
"""
import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project root, when run as a script

import sample  # noqa: E402
from load_weights import load_pipeline  # noqa: E402
from toy import metrics, world  # noqa: E402

HERE = Path(__file__).resolve().parent
SAMPLING = dict(steps=25, guidance_scale=5.0)   # as the ablation scores its images


def captions():
    """(prompt, (noun, colour, context)) for every full caption of the world."""
    return [(f"a photo of a {colour} {noun} {context}", (noun, colour, context))
            for noun in world.CLASSES for colour in world.COLOURS for context in world.CONTEXTS]


def draw(pipeline, prompts, seed, batch_size=70):
    return sample.generate(pipeline, prompts, seed=seed, mixed_precision="no", progress=False,
                           batch_size=batch_size, **SAMPLING)


def caption_accuracy(pipeline, seeds=2, class_samples=25, seed=0):
    """Accuracy of the named shape, colour and context over every caption x seeds, the class
    prompts' shape accuracy, and the shape confusion {named: {drawn: count}} of both."""
    named = captions() * seeds
    images = draw(pipeline, [p for p, _ in named], seed)
    class_named = [noun for noun in world.CLASSES for _ in range(class_samples)]
    class_images = draw(pipeline, [f"a photo of {noun}" for noun in class_named], seed + 1)
    confusion = {noun: collections.Counter() for noun in world.CLASSES}
    hits = collections.Counter()
    for image, (_, (noun, colour, context)) in zip(images, named, strict=True):
        shape = metrics.shape_of(image)
        confusion[noun][str(shape)] += 1
        hits["shape"] += shape == noun
        hits["colour"] += metrics.colour_of(image) == colour
        hits["context"] += metrics.context_of(image) == context
    class_hits = 0
    for image, noun in zip(class_images, class_named, strict=True):
        shape = metrics.shape_of(image)
        confusion[noun][str(shape)] += 1
        class_hits += shape == noun
    return {"captions": len(named), "shape": hits["shape"] / len(named), "colour": hits["colour"] / len(named),
            "context": hits["context"] / len(named), "class_prompt_shape": class_hits / len(class_named),
            "class_prompts": len(class_named), "confusion": {k: dict(v) for k, v in confusion.items()}}


def shine_of(image, colour):
    """How far toward white the object's median colour is from the named world colour `colour`:
    0 as the plain world draws it, world.NIGHT_GLOW for a lit world's shining class at night.
    Each channel's share of its way to white, averaged over the channels with room to move."""
    mask = metrics.found_object(image)
    if mask is None:
        return None
    median, named = np.median(metrics.pixels(image)[mask], axis=0), np.array(world.COLOURS[colour], dtype=np.float32)
    room = 255.0 - named
    movable = room > 60
    return float(np.mean((median - named)[movable] / room[movable]))


def night_shine(pipeline, seeds=2, seed=0):
    """{noun: mean shine_of over "a photo of a {colour} {noun} at night", every colour x seeds}: has
    the model learned which classes shine at night (the lit world) and which do not?"""
    named = [(noun, colour) for noun in world.CLASSES for colour in world.COLOURS] * seeds
    images = draw(pipeline, [f"a photo of a {colour} {noun} at night" for noun, colour in named], seed)
    shines = collections.defaultdict(list)
    for image, (noun, colour) in zip(images, named, strict=True):
        value = shine_of(image, colour)
        if value is not None:
            shines[noun].append(value)
    return {noun: float(np.mean(shines[noun])) if shines[noun] else None for noun in world.CLASSES}


def report(result):
    lines = [f"over {result['captions']} captions (every shape x colour x context): shape {result['shape']:.1%}, "
             f"colour {result['colour']:.1%}, context {result['context']:.1%}; "
             f"class prompts 'a photo of {{noun}}' ({result['class_prompts']}): shape {result['class_prompt_shape']:.1%}",
             "", "shape confusion, both prompt sets (rows: named, columns: drawn; None: no object found)", "",
             "| named | " + " | ".join(world.CLASSES) + " | None |", "|---" * (len(world.CLASSES) + 2) + "|"]
    for noun, drawn in result["confusion"].items():
        lines.append(f"| {noun} | " + " | ".join(str(drawn.get(k, 0)) for k in (*world.CLASSES, "None")) + " |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=sample.DefaultsHelpFormatter)
    p.add_argument("--model", default=str(HERE / "model"), help="a toy pipeline folder")
    p.add_argument("--seeds", type=int, default=2, help="samples per caption")
    p.add_argument("--class_samples", type=int, default=25, help="samples per class prompt")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--night_shine", action="store_true",
                   help="also measure how far toward white each class is drawn at night (the lit world's prior)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipeline = load_pipeline(args.model)
    result = caption_accuracy(pipeline, seeds=args.seeds, class_samples=args.class_samples)
    print(report(result))
    if args.night_shine:
        result["night_shine"] = night_shine(pipeline, seeds=args.seeds)
        print("\nshine at night (0: as by day, " + f"{world.NIGHT_GLOW:g}: the lit world's circles and stars): "
              + ", ".join(f"{noun} {value:.2f}" for noun, value in result["night_shine"].items() if value is not None))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
