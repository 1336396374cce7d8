"""Exercise prior_loss: the class-specific prior-preservation loss (DreamBooth, Eq. 2).

Write the body of prior_preservation_loss, then grade it:

    python -m assignments.grade prior_loss --file assignments/prior_loss/starter.py
"""
import torch
import torch.nn.functional as F  # noqa: F401  (you will want F.mse_loss)


def prior_preservation_loss(unet, noise_schedule, instance_latents, instance_context,
                            class_latents=None, class_context=None, prior_loss_weight=1.0, *,
                            noise=None, timesteps=None, generator=None):
    """The loss of Eq. 2 as Stable Diffusion is trained, on VAE latents:

        loss = || eps_theta(x_t, t, c) - target ||^2  +  lambda || eps_theta(x_t', t', c_pr) - target' ||^2

    unet(noisy_latents [N, 4, h, w], timesteps [N], context [N, L, D]) -> prediction [N, 4, h, w].
    noise_schedule.add_noise(x0, noise, timesteps) gives x_t; noise_schedule.training_target(x0,
    noise, timesteps) gives the target (the noise, or the velocity for v-prediction models).

    instance_latents [B, 4, h, w], instance_context [B, L, D]: the subject, "a photo of [V] dog".
    class_latents [B, 4, h, w], class_context [B, L, D]: the class images, "a photo of dog"; None
        to train without prior preservation.
    prior_loss_weight: lambda of Eq. 2.
    noise [N, 4, h, w] and timesteps [N] (N = B, or 2B with class latents: the instance rows
        first, then the class rows): the grader always passes them. (Drawing them from
        `generator` when they are None is optional.)

    Both terms go through the UNet as ONE batch: concatenate instance and class rows.
    Each term is the mean squared error over its own rows.

    Returns (loss, instance_loss, prior_loss), three 0-d float32 tensors: loss carries the
    graph (it is what .backward() is called on); instance_loss and prior_loss are for the log,
    detached; prior_loss is a 0 tensor without class latents.
    """
    raise NotImplementedError
