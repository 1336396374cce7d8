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


def context_of(image):
    """The context whose background gradient is nearest to the image's border colours."""
    rows = background_rows(image)
    size = rows.shape[0]

    def distance(context):
        return np.abs(rows - world.background(context, size=size)[:, 0, :]).mean()
    return min(world.CONTEXTS, key=distance)


def appearance(image):
    """The object's appearance as a float array [4, CROP, CROP] (see the module docstring)."""
    a, mask = pixels(image) / 255.0, object_mask(image)
    if mask.sum() < MIN_OBJECT_PIXELS:
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
