"""The paper's evaluation (section 4.1) measured from pixels, on the toy world.

The paper embeds images with DINO and CLIP; in the toy world we know how images are made, so
each measure can read the pixels directly:

  object      Every image is one object in front of a context, a vertical gradient that fills
              the left and right borders (objects keep 2 px clear of the sides). The background
              of row y is the median of that row's border pixels; a pixel belongs to the object
              when its RGB distance to its row's background exceeds OBJECT_THRESHOLD.
  appearance  The object's bounding box, squared, cut out and resized to 16x16: RGB where the
              object is, grey elsewhere, plus the mask as a fourth channel, all in [0, 1]. It
              holds colour, pattern and shape, and ignores size and position. (No object found:
              all grey, empty mask.)
  similarity  1 - mean |a - b| between two appearances: 1 for the same object, about 0.6-0.7
              for another shape or colour. The analogue of DINO's cosine similarity.
  shape       The object's mask, cut to its bounding box and stretched to 16x16, against each
              class's outline drawn the same way: the class whose outline overlaps it most
              (intersection over union). Stretching to the box makes it blind to size, position
              and aspect ratio, so only the outline counts: a square fills its box, a circle
              misses the corners, a triangle is empty at the top corners, a star is mostly empty.
  colour      The median RGB of the object's pixels (its anti-aliased edge is outvoted), named
              by the nearest world colour.
  paint       For a subject: the median RGB of each of its two paint regions (an eye's centre and
              ring, a bee's dark and light stripes, a star's halves), placed by the object's
              bounding box; the sample keeps the subject's paint when both lie within
              PAINT_TOLERANCE of the subject's two colours. A teal disc without its white eye, or a
              ring turned green, fails; similarity alone barely tells them apart.

  subject fidelity  mean similarity between [V] samples and the subject's real photos, over
                    all pairs (the paper's DINO score, Table 1).
  prompt fidelity   fraction of samples whose context is the one the prompt names: the border
                    gradient is compared with each context's (the paper's CLIP-T).
  PRES              subject fidelity of class-prompt samples ("a photo of circle"): how much the
                    class now looks like the subject (language drift; lower is better).
  DIV               mean pixel distance (mean |a - b| / 255) between pairs of class-prompt
                    samples of different seeds (the paper's LPIPS diversity; higher is better).
"""
import itertools

import numpy as np
import torch
import torch.nn.functional as F

from toy import world

BORDER = 2                 # border columns per side that show the background (world.MARGIN)
OBJECT_THRESHOLD = 45.0    # RGB distance (0-255 units) from the background that makes a pixel object
MIN_OBJECT_PIXELS = 6      # fewer than this: no object
CROP = 16                  # appearance resolution
PAINT_TOLERANCE = 60.0     # RGB distance from a subject's colour that still counts as that colour


def pixels(image):
    """A PIL image or an array -> float array [H, W, 3] in 0..255."""
    return np.asarray(image, dtype=np.float32)[..., :3]


def background_rows(image):
    """The background colour of each row: median of its BORDER left and right pixels, [H, 3]."""
    a = pixels(image)
    return np.median(np.concatenate([a[:, :BORDER], a[:, -BORDER:]], axis=1), axis=1)


def object_mask(image):
    """Boolean [H, W]: pixels far from their row's background colour."""
    a = pixels(image)
    return np.linalg.norm(a - background_rows(image)[:, None, :], axis=-1) > OBJECT_THRESHOLD


def found_object(image):
    """object_mask(image), or None where it has too few pixels to be an object."""
    mask = object_mask(image)
    return None if mask.sum() < MIN_OBJECT_PIXELS else mask


def context_of(image):
    """The context whose background gradient is nearest to the image's border colours."""
    rows = background_rows(image)
    size = rows.shape[0]

    def distance(context):
        return np.abs(rows - world.background(context, size=size)[:, 0, :]).mean()
    return min(world.CONTEXTS, key=distance)


def appearance(image):
    """The object's appearance as a float array [4, CROP, CROP] (see the module docstring)."""
    a, mask = pixels(image) / 255.0, found_object(image)
    if mask is None:
        return np.concatenate([np.full((3, CROP, CROP), 0.5, np.float32), np.zeros((1, CROP, CROP), np.float32)])
    ys, xs = np.nonzero(mask)
    cy, cx = (ys.min() + ys.max() + 1) / 2, (xs.min() + xs.max() + 1) / 2
    half = max(ys.max() + 1 - ys.min(), xs.max() + 1 - xs.min()) / 2
    top, left, side = int(round(cy - half)), int(round(cx - half)), int(round(2 * half))
    rgb = np.where(mask[..., None], a, 0.5)
    planes = np.concatenate([rgb, mask[..., None].astype(np.float32)], axis=-1)  # (H, W, 4)
    # pad so the square box may cross the image's edge: grey, no object
    pad = side
    padded = np.pad(planes, ((pad, pad), (pad, pad), (0, 0)))
    padded[..., :3][padded[..., 3] == 0] = 0.5
    crop = padded[top + pad:top + pad + side, left + pad:left + pad + side]
    crop = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)[None]  # (1, 4, side, side)
    return F.interpolate(crop, size=(CROP, CROP), mode="bilinear", antialias=True, align_corners=False)[0].numpy()


def box_mask(mask):
    """A boolean mask cut to its bounding box and stretched to CROP x CROP, float [CROP, CROP]."""
    ys, xs = np.nonzero(mask)
    box = torch.from_numpy(mask[ys.min():ys.max() + 1, xs.min():xs.max() + 1].astype(np.float32))
    return F.interpolate(box[None, None], size=(CROP, CROP), mode="bilinear", align_corners=False)[0, 0].numpy()


def class_outlines():
    """Each class's outline as box_mask() sees it, drawn large (so it is exact), {noun: array}."""
    outlines = {}
    for noun in world.CLASSES:
        scene = world.Scene(noun=noun, context="on the grass", cx=world.SIZE / 2, cy=world.SIZE / 2,
                            radius=world.SIZE / 2 - world.MARGIN, colour="red")
        outlines[noun] = box_mask(np.asarray(world.shape_mask(scene)) > 127)
    return outlines


OUTLINES = class_outlines()


def shape_of(image):
    """The class noun whose outline best overlaps the object's mask (IoU), or None: no object."""
    mask = found_object(image)
    if mask is None:
        return None
    box = box_mask(mask)

    def iou(outline):
        return np.minimum(box, outline).sum() / np.maximum(box, outline).sum()
    return max(world.CLASSES, key=lambda noun: iou(OUTLINES[noun]))


def colour_of(image):
    """The world colour nearest to the median colour of the object's pixels, or None."""
    mask = found_object(image)
    if mask is None:
        return None
    median = np.median(pixels(image)[mask], axis=0)
    return min(world.COLOURS, key=lambda name: np.linalg.norm(median - np.array(world.COLOURS[name])))


def paint_regions(mask, paint):
    """Two boolean [H, W] masks inside the object: where a subject of this paint shows its first
    and its second colour (world.paint_layer), away from the borders between them. Coordinates
    are the object's bounding box scaled to [-1, 1], so size and position do not matter. An
    inner region is not cut by the object mask: a white eye in the snow, or a black stripe at
    night, is as far from the object's edge as ever but no farther from the background."""
    ys, xs = np.nonzero(mask)
    y, x = np.mgrid[0:mask.shape[0], 0:mask.shape[1]].astype(np.float32) + 0.5
    u = (x - (xs.min() + xs.max() + 1) / 2) / ((xs.max() + 1 - xs.min()) / 2)
    v = (y - (ys.min() + ys.max() + 1) / 2) / ((ys.max() + 1 - ys.min()) / 2)
    if paint == "eye":        # the eye is a disc of 0.5 the box's half-size
        rho = np.hypot(u, v)
        return (rho > 0.65) & (rho < 0.9) & mask, rho < 0.3
    if paint == "stripes":    # five bands: first, second, first, second, first
        inside = np.abs(u) < 0.8
        return (np.abs(v) < 0.12) & mask, (np.abs(v) > 0.38) & (np.abs(v) < 0.62) & inside
    if paint == "split":      # left half first, right half second
        return (u < -0.2) & mask, (u > 0.2) & mask
    raise ValueError(f"unknown paint {paint!r}")


def keeps_paint(image, subject):
    """Whether the object shows the subject's two colours where its pattern puts them
    (subject: a world.Subject)."""
    mask = found_object(image)
    if mask is None:
        return False
    a = pixels(image)
    for region, colour in zip(paint_regions(mask, subject.paint), subject.colours, strict=True):
        if not region.any() or np.linalg.norm(np.median(a[region], axis=0) - np.array(colour)) > PAINT_TOLERANCE:
            return False
    return True


def shine(image, subject):
    """How far toward white the object shows the subject's colours (subject: a world.Subject),
    where its pattern puts them: each paint region's median, each channel's share of its way from
    the subject's colour to white, averaged over the channels with room to move (more than 60).
    0 drawn as in its photos, world.NIGHT_GLOW as the lit world draws a circle at night; None: no
    object found."""
    mask = found_object(image)
    if mask is None:
        return None
    a, shares = pixels(image), []
    for region, colour in zip(paint_regions(mask, subject.paint), subject.colours, strict=True):
        colour = np.array(colour, dtype=np.float32)
        room = 255.0 - colour
        if region.any() and (room > 60).any():
            shares += list(((np.median(a[region], axis=0) - colour) / room)[room > 60])
    return float(np.mean(shares)) if shares else None


def similarity(a, b):
    """1 - mean absolute difference of two appearances (arrays from appearance())."""
    return 1.0 - float(np.abs(a - b).mean())


def mean_similarity(samples, references):
    """Mean similarity over every (sample, reference) pair of images."""
    sample_features = [appearance(s) for s in samples]
    reference_features = [appearance(r) for r in references]
    return float(np.mean([similarity(s, r) for s in sample_features for r in reference_features]))


def subject_fidelity(samples, subject_images):
    return mean_similarity(samples, subject_images)


def self_similarity(subject_images):
    """Subject fidelity of the real photos against each other (the paper's 'real images' row)."""
    features = [appearance(s) for s in subject_images]
    return float(np.mean([similarity(a, b) for a, b in itertools.permutations(features, 2)]))


def prompt_fidelity(samples, contexts):
    """Fraction of samples whose context (context_of) is the one their prompt named."""
    return float(np.mean([context_of(s) == c for s, c in zip(samples, contexts, strict=True)]))


def pres(class_samples, subject_images):
    return mean_similarity(class_samples, subject_images)


def div(class_samples):
    """Mean pixel distance between every pair of samples, in [0, 1]."""
    arrays = [pixels(s) / 255.0 for s in class_samples]
    return float(np.mean([np.abs(a - b).mean() for a, b in itertools.combinations(arrays, 2)]))
