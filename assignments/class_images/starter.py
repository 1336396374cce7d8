"""Exercise class_images: the autogenous class images of prior preservation (DreamBooth, section 3.3).

Write the body of ensure_class_images, then grade it:

    python -m assignments.grade class_images --file assignments/class_images/starter.py
"""
import sys  # noqa: F401
from pathlib import Path  # noqa: F401

import dreambooth  # noqa: F401  (dreambooth.IMAGE_SUFFIXES, dreambooth.image_problem(path))
import sample  # noqa: F401  (call it as sample.generate(...): the grader watches the calls)


def ensure_class_images(pipeline, class_dir, class_prompt, num_images, *, seed=0, batch_size=4, **sampler_args):
    """Make class_dir hold num_images readable images of class_prompt, sampled from the frozen
    model with the project's sampler, and return the paths of num_images of them (sorted).

    - Create class_dir if it does not exist.
    - Images already there count, whatever their name (a suffix of dreambooth.IMAGE_SUFFIXES);
      unreadable ones (dreambooth.image_problem(path) is not None) are deleted and made again.
    - Generate only the shortfall: image i is class_dir / f"class-{i:05d}.png" and always comes
      from seed + i, so an interrupted run that is started again makes the same images. Make the
      missing indices, lowest first, until the folder holds num_images.
    - sample.generate(pipeline, prompts, seed=s, batch_size=..., progress=False, **sampler_args)
      makes image k of its call from seed s + k. Work in batches of at most batch_size images
      and save each batch before generating the next (an interruption loses one batch at most).
    - sampler_args (steps, guidance_scale, scheduler, ...) go to sample.generate unchanged.
    """
    raise NotImplementedError
