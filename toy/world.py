"""The toy world: small procedural photos of one object in a named context, with captions.

Every image is a Scene: an object (a class noun: square, circle, triangle, star) of varied size,
near the centre, in front of one of five contexts (a background gradient: grass, sand, sky, snow,
night). Most objects are one colour, a few carry a pattern of two (stripes, a dot, two halves).
A colour is one of seven named ones (a little varied) or, for some objects, any colour at all,
which the caption does not name. The caption names what a user would:

    "a photo of a red square on the grass", "a blue striped star in the sky", "a photo of circle", ...

Colours and patterns the captions do not always name are what a photo of "a dog" has too: the
class noun covers every coat. They make the prior compositional (any colour, any pattern, in
any context), which is what lets a subject be redrawn in a context its photos never showed.

The pretraining world never contains the SUBJECTS below (resembles_subject() rejects any scene
near one): distinctive instances of a known class, in the part of the user's dog in DreamBooth.

Everything is deterministic given a seed. Images are drawn 4x larger and box-filtered down, so
edges are anti-aliased like a photo's rather than hard pixel steps.

    python -m toy.world OUT_DIR        # a contact sheet of the world and of each subject
    python -m toy.world --subjects     # (re)write toy/subjects/<name>/<k>.png
"""
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32                 # pixels per side of every image
SUPERSAMPLE = 4           # drawn at SIZE * SUPERSAMPLE, then averaged down (anti-aliasing)
MARGIN = 2                # pixels kept clear between the object and the image's sides

CLASSES = ("square", "circle", "triangle", "star")
COLOURS = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 215, 40), "green": (90, 230, 90),
    "blue": (40, 80, 220), "purple": (140, 60, 200), "pink": (250, 130, 190),
}
# context phrase -> (top colour, bottom colour) of its background gradient. The object colours
# above are chosen far from every background, so an object can be told from its context.
CONTEXTS = {
    "on the grass": ((70, 130, 50), (30, 90, 30)),
    "on the sand": ((235, 215, 165), (200, 175, 120)),
    "in the sky": ((90, 150, 230), (170, 210, 245)),
    "in the snow": ((215, 220, 230), (250, 250, 252)),
    "at night": ((10, 10, 35), (35, 35, 80)),
}
RADIUS = (7.0, 11.0)      # object size: radius in pixels (14 to 22 px across)
# Objects sit near the centre, as MNIST's digits do. A class's shape is then nearly the same
# pixels in every image, so even at high noise "circle" and "square" ask for different
# predictions and a tiny model learns the noun; with objects anywhere in the frame (5-10 px
# radius), the shapes differed by a few edge pixels at unpredictable places and the toy never
# learned them (30 % shape accuracy, chance 25 %: toy/README.md).
JITTER = 3.0              # the centre's largest offset from the image's centre, in pixels
PATTERNS = ("stripes", "eye", "split")          # the two-colour paints (paint_layer)
PATTERN_WORDS = {"stripes": "striped", "eye": "dotted", "split": "halved"}  # as captions name them
P_PATTERN = 0.4           # world objects with a pattern; the rest are one colour
P_UNNAMED_COLOUR = 0.3    # objects of any colour (no caption names it); the rest a named one
COLOUR_JITTER = 20        # a named colour varies by up to this much per channel
MIN_CONTRAST = 90.0       # RGB distance of a colour drawn at random from its background and the object's other colour
SUBJECT_DISTANCE = 100.0  # a world scene this near a subject in every colour is not drawn


@dataclass(frozen=True)
class Scene:
    noun: str                       # one of CLASSES: the shape
    context: str                    # one of CONTEXTS
    cx: float                       # centre and radius, in pixels
    cy: float
    radius: float
    colour: str | None = None       # the COLOURS name a caption may use, or None: no name (any colour, a subject)
    paint: str = "solid"            # solid, stripes, eye, split (see paint_layer)
    colours: tuple = ()             # RGB colours of the paint (default: COLOURS[colour])


# ----------------------------------------------------------------------------------------------
# Drawing


def background(context, size=SIZE * SUPERSAMPLE):
    """The context's vertical gradient, float [size, size, 3] in 0..255."""
    top, bottom = (np.array(c, dtype=np.float32) for c in CONTEXTS[context])
    w = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]  # (rows, 1, 1)
    return np.broadcast_to(top * (1 - w) + bottom * w, (size, size, 3))


def outline(scene, scale=SUPERSAMPLE):
    """The shape as a polygon (list of (x, y)) or, for a circle, its bounding box."""
    cx, cy, r = scene.cx * scale, scene.cy * scale, scene.radius * scale

    def at_centre(points):
        return [(cx + x, cy + y) for x, y in points]

    if scene.noun == "circle":
        r *= 0.9
        return [(cx - r, cy - r), (cx + r, cy + r)]
    if scene.noun == "square":
        h = 0.8 * r
        return at_centre([(-h, -h), (h, -h), (h, h), (-h, h)])
    if scene.noun == "triangle":  # pointing up, centred on its centroid shifted a little down
        return at_centre([(r * math.cos(math.radians(-90 + 120 * k)), r * math.sin(math.radians(-90 + 120 * k)) + 0.15 * r)
                       for k in range(3)])
    if scene.noun == "star":  # five points; inner radius 0.45 of the outer
        return at_centre([((r if k % 2 == 0 else 0.45 * r) * math.cos(math.radians(-90 + 36 * k)),
                        (r if k % 2 == 0 else 0.45 * r) * math.sin(math.radians(-90 + 36 * k))) for k in range(10)])
    raise ValueError(f"unknown object class {scene.noun!r}; the world has {CLASSES}")


def paint_layer(scene, size=SIZE * SUPERSAMPLE, scale=SUPERSAMPLE):
    """The object's colours at every pixel, float [size, size, 3]; the shape's mask cuts it out.
    Patterns are laid out relative to the object's centre and radius:
      solid   one colour
      stripes five horizontal bands across the object, alternating colours[0] and colours[1]
      eye     colours[0] with a disc of colours[1] of 0.45 the radius in the centre
      split   left half colours[0], right half colours[1]"""
    colours = [np.array(c, dtype=np.float32) for c in (scene.colours or (COLOURS[scene.colour],))]
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u, v = (x / scale - scene.cx) / scene.radius, (y / scale - scene.cy) / scene.radius  # object coordinates
    if scene.paint == "solid":
        second = np.zeros_like(u, dtype=bool)
    elif scene.paint == "stripes":
        second = np.floor((v + 1) * 2.5).astype(int) % 2 == 1
    elif scene.paint == "eye":
        second = u ** 2 + v ** 2 < 0.45 ** 2
    elif scene.paint == "split":
        second = u > 0
    else:
        raise ValueError(f"unknown paint {scene.paint!r}")
    layer = np.where(second[..., None], colours[-1], colours[0])
    return layer


def shape_mask(scene, size=SIZE * SUPERSAMPLE):
    """The object's shape filled white on black, an L-mode PIL image of size x size (drawn at 4x)."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    (draw.ellipse if scene.noun == "circle" else draw.polygon)(outline(scene), fill=255)
    return mask


def render(scene):
    """The scene as a SIZE x SIZE RGB PIL image."""
    alpha = np.asarray(shape_mask(scene), dtype=np.float32)[..., None] / 255.0
    pixels = background(scene.context) * (1 - alpha) + lit(paint_layer(scene), scene.noun, scene.context) * alpha
    # box filter: average each SUPERSAMPLE x SUPERSAMPLE block, (big, big, 3) -> (SIZE, SIZE, 3)
    pixels = pixels.reshape(SIZE, SUPERSAMPLE, SIZE, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(pixels.round(), 0, 255).astype(np.uint8))


# ----------------------------------------------------------------------------------------------
# The lit world: a class prior that the subject's photos cannot show
#
# In the plain world a class noun says only an outline, and a subject's photos show all of it, so
# DreamBooth's class noun has nothing left to contribute (Table 4: a wrong noun costs nothing).
# In the lit world (python -m toy.pretrain --world lit) the class also decides how an object looks
# at night: circles and stars shine, their paint drawn NIGHT_GLOW of the way to white; squares and
# triangles do not. The subjects are photographed by day, so only the class noun can tell the model
# that "[V] circle at night" is lighter than its photos, as only "dog" tells Stable Diffusion how
# the user's dog looks swimming (paper, section 4.3).

WORLDS = ("plain", "lit")
SHINING = ("circle", "star")    # the lit world's classes that shine at night
NIGHT_GLOW = 0.25               # a shining object's paint at night: this fraction of the way to white
world_name = "plain"            # the world render() draws; use_world() sets it


def use_world(name):
    """Draw the plain or the lit world from now on (the pretraining and the scoring of a toy must agree)."""
    global world_name
    if name not in WORLDS:
        raise ValueError(f"unknown world {name!r}; the toy has {WORLDS}")
    world_name = name


def lit(paint, noun, context):
    """Paint colours (any array of RGB in 0..255) as the current world shows them on a `noun` in `context`."""
    if world_name == "lit" and noun in SHINING and context == "at night":
        return paint + NIGHT_GLOW * (255.0 - np.asarray(paint, dtype=np.float32))
    return paint


# ----------------------------------------------------------------------------------------------
# Sampling scenes and captions


def place(rng, radius_range=RADIUS):
    """A random size and position: within JITTER of the centre, MARGIN clear of the sides."""
    r = rng.uniform(*radius_range)
    room = min(JITTER, SIZE / 2 - r - MARGIN)
    cx, cy = (SIZE / 2 + rng.uniform(-room, room) for _ in range(2))
    return dict(cx=cx, cy=cy, radius=r)


def visible(colour, context, others=()):
    """Whether a paint colour stands out from the context's background (its top, middle and
    bottom colour) and from the object's other colours by at least MIN_CONTRAST."""
    top, bottom = CONTEXTS[context]
    middle = tuple((t + b) / 2 for t, b in zip(top, bottom))
    return all(math.dist(colour, c) >= MIN_CONTRAST for c in (top, middle, bottom, *others))


def any_colour(rng, context, others=()):
    """A uniformly random RGB colour, visible in the context and beside the object's others."""
    while True:
        colour = tuple(rng.randrange(256) for _ in range(3))
        if visible(colour, context, others):
            return colour


def named_colour(rng, name):
    """A named world colour, each channel varied by up to COLOUR_JITTER."""
    return tuple(min(255, max(0, c + rng.randint(-COLOUR_JITTER, COLOUR_JITTER))) for c in COLOURS[name])


def resembles_subject(scene):
    """Whether a scene could pass for one of the SUBJECTS: its class and pattern, with each of its
    colours within SUBJECT_DISTANCE of the subject's."""
    return any(scene.noun == s.noun and scene.paint == s.paint and len(scene.colours) == len(s.colours)
               and all(math.dist(a, b) < SUBJECT_DISTANCE for a, b in zip(scene.colours, s.colours))
               for s in SUBJECTS.values())


def random_scene(rng):
    """One scene of the pretraining world: class and context uniform; a named colour, or with
    probability P_UNNAMED_COLOUR any colour; with probability P_PATTERN a pattern whose second
    colour is any colour; never a look-alike of a subject."""
    noun, context, where = rng.choice(CLASSES), rng.choice(list(CONTEXTS)), place(rng)
    while True:
        name = None if rng.random() < P_UNNAMED_COLOUR else rng.choice(list(COLOURS))
        first = any_colour(rng, context) if name is None else named_colour(rng, name)
        paint = rng.choice(PATTERNS) if rng.random() < P_PATTERN else "solid"
        colours = (first,) if paint == "solid" else (first, any_colour(rng, context, others=(first,)))
        scene = Scene(noun=noun, context=context, colour=name, paint=paint, colours=colours, **where)
        if not resembles_subject(scene):
            return scene


def codec_colour(rng):
    """Any RGB colour; half of them near a corner of the RGB cube (near-white, near-black,
    saturated), which a uniform draw almost never gives but the subjects' white eye and black
    stripes are."""
    if rng.random() < 0.5:
        return tuple(rng.randrange(256) for _ in range(3))
    return tuple(min(255, max(0, rng.choice((0, 255)) + rng.randint(-30, 30))) for _ in range(3))


def random_codec_scene(rng):
    """A scene for training the VAE only: any colour and any paint. Like Stable Diffusion's VAE
    (trained on a broader image set than the diffusion model), the toy's VAE must encode photos
    of subjects the diffusion model never saw, so it sees every colour and pattern; these images
    have no captions and never reach the UNet."""
    paint = rng.choice(("solid", *PATTERNS))
    colours = tuple(codec_colour(rng) for _ in range(1 if paint == "solid" else 2))
    return Scene(noun=rng.choice(CLASSES), context=rng.choice(list(CONTEXTS)), paint=paint, colours=colours,
                 **place(rng))


# The templates use the forms DreamBooth's prompts take: "a photo of {identifier} {class}",
# "a photo of {class}" (train.py's defaults, without an article) and "a {identifier} {class}
# {context}" (the README's sampling example), so that the identifier lands where the world's
# captions put an adjective.
TEMPLATES = ("a photo of a {object}", "a photo of {object}", "a {object}")
P_DROP_COLOUR, P_DROP_PATTERN, P_DROP_CONTEXT, P_EMPTY = 0.3, 0.3, 0.3, 0.1


def caption(scene, rng):
    """A caption of a world scene. The colour, the pattern and the context are each left out at
    times, so that "a photo of square" means a square of any colour and pattern anywhere; 10% of
    captions are empty, which teaches the unconditional prediction that classifier-free guidance
    needs."""
    if rng.random() < P_EMPTY:
        return ""
    words = [scene.colour] if scene.colour and rng.random() >= P_DROP_COLOUR else []
    if scene.paint != "solid" and rng.random() >= P_DROP_PATTERN:
        words.append(PATTERN_WORDS[scene.paint])
    obj = " ".join(words + [scene.noun])
    text = rng.choice(TEMPLATES).format(object=obj)
    if rng.random() >= P_DROP_CONTEXT:
        text += " " + scene.context
    return text


def caption_words():
    """Every word a caption can contain."""
    words = {w for t in TEMPLATES for w in t.replace("{object}", "").split()}
    words |= set(CLASSES) | set(COLOURS) | set(PATTERN_WORDS.values()) | {w for c in CONTEXTS for w in c.split()}
    return sorted(words)


def make_dataset(num_images, seed=0, scene=random_scene):
    """(uint8 array [N, SIZE, SIZE, 3], list of N scenes), the same for the same seed."""
    rng = random.Random(seed)
    scenes = [scene(rng) for _ in range(num_images)]
    return np.stack([np.asarray(render(s)) for s in scenes]), scenes


# ----------------------------------------------------------------------------------------------
# Subjects: distinctive instances the pretraining world never shows


@dataclass(frozen=True)
class Subject:
    noun: str                   # its class noun (the paper's "dog")
    paint: str
    colours: tuple
    contexts: tuple             # the contexts its photos are taken in; the others are novel to it


SUBJECTS = {
    "bee_square": Subject("square", "stripes", ((250, 200, 0), (30, 30, 30)), ("on the grass", "on the sand", "in the snow")),
    "eye_circle": Subject("circle", "eye", ((0, 160, 160), (250, 250, 250)), ("on the grass", "on the sand", "in the snow")),
    "split_star": Subject("star", "split", ((220, 40, 40), (40, 80, 220)), ("on the grass", "on the sand", "in the snow")),
}
SUBJECT_RADIUS = (8.0, 10.0)    # large enough for the pattern to show at 32 px
SUBJECT_IMAGES = 5


def subject_scene(name, context, rng):
    subject = SUBJECTS[name]
    return Scene(noun=subject.noun, context=context, paint=subject.paint, colours=subject.colours,
                 **place(rng, SUBJECT_RADIUS))


def subject_images(name, num_images=SUBJECT_IMAGES, seed=0):
    """The subject's photos: varied size and position, cycling through its contexts."""
    rng = random.Random(f"{name}-{seed}")
    contexts = SUBJECTS[name].contexts
    return [render(subject_scene(name, contexts[i % len(contexts)], rng)) for i in range(num_images)]


def write_subjects(folder):
    """toy/subjects/<name>/<k>.png for every subject."""
    for name in SUBJECTS:
        out = Path(folder) / name
        out.mkdir(parents=True, exist_ok=True)
        for k, image in enumerate(subject_images(name)):
            image.save(out / f"{k}.png")
    return Path(folder)


def contact_sheet(images, columns=8, scale=2):
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (columns * SIZE, rows * SIZE), "white")
    for i, image in enumerate(images):
        sheet.paste(image, ((i % columns) * SIZE, (i // columns) * SIZE))
    return sheet.resize((sheet.width * scale, sheet.height * scale), Image.NEAREST)


def main(argv=None):
    import argparse
    from sample import DefaultsHelpFormatter
    p = argparse.ArgumentParser(description="Contact sheets of the toy world, or (--subjects) the subjects' photos.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("out", nargs="?", default="toy-world", help="folder for world.png, captions.txt, subjects.png")
    p.add_argument("--subjects", action="store_true", help="(re)write toy/subjects/<name>/<k>.png instead")
    args = p.parse_args(argv)
    if args.subjects:
        print(f"wrote the subjects' photos to {write_subjects(Path(__file__).resolve().parent / 'subjects')}")
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images, scenes = make_dataset(32, seed=0)
    contact_sheet([Image.fromarray(a) for a in images]).save(out / "world.png")
    rng = random.Random(0)
    (out / "captions.txt").write_text("\n".join(caption(s, rng) for s in scenes) + "\n")
    contact_sheet([im for name in SUBJECTS for im in subject_images(name)], columns=SUBJECT_IMAGES).save(out / "subjects.png")
    print(f"wrote {out / 'world.png'}, {out / 'captions.txt'} and {out / 'subjects.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
