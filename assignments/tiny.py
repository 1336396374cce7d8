"""Tiny seeded inputs for the graders: the project's own classes at sizes that run in milliseconds."""
import torch

import schedulers
from unet import UNet, UNetConfig

# The SD 1.x layout at toy size (tests/conftest.py's "sd1" UNet): conv projections, 4 heads,
# cross-attention at the first level, a 32-wide text context.
UNET = UNetConfig(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16,
                  down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
                  attention_head_dim=4, sample_size=8)
CONTEXT_LENGTH = 7  # text tokens per prompt (SD: 77)


def unet(seed=0):
    torch.manual_seed(seed)
    return UNet(UNET).eval()


def schedule(preset="sd15", cls=schedulers.NoiseSchedule, **kwargs):
    """A noise schedule (or sampler class `cls`) with an SD preset: sd15 predicts the noise,
    sd21 the velocity."""
    return cls(schedulers.PRESETS[preset], **kwargs)


def randn(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class CountingUNet(torch.nn.Module):
    """Wraps a UNet and records the batch size of every call: Eq. 2 is one pass, not two."""

    def __init__(self, unet):
        super().__init__()
        self.unet, self.batches = unet, []

    @property
    def config(self):
        return self.unet.config

    def forward(self, latents, timesteps, context):
        self.batches.append(latents.shape[0])
        return self.unet(latents, timesteps, context)
