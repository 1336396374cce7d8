"""AutoencoderKL: the KL-regularised autoencoder of Latent Diffusion (Rombach et al., 2022, Sec. 3.1).

Stable Diffusion runs its diffusion model in the latent space of this autoencoder: a 512x512 RGB
image in [-1, 1] becomes a 4x64x64 latent (downsampling factor 8 = 2 ** (len(block_out_channels)-1)).

    encoder: conv_in -> down blocks (resnets, stride-2 conv) -> mid block (resnet, attention, resnet)
             -> GroupNorm, SiLU, conv_out -> quant_conv -> (mean, logvar) of a diagonal Gaussian
    decoder: post_quant_conv -> conv_in -> mid block -> up blocks (resnets, 2x nearest + conv)
             -> GroupNorm, SiLU, conv_out -> image

Parameter names equal diffusers' AutoencoderKL, so a Hub `vae/` folder loads with strict=True.
Latent scaling is NOT done here: callers multiply encoder samples by `config.scaling_factor`
(0.18215 for SD 1.x/2.x, which gives the latents roughly unit variance, LDM Sec. 4.3.2) before
the UNet, and divide by it before `decode`.
"""
import json
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class VAEConfig:
    """The autoencoder's shape, under the keys of a Hub vae/config.json (defaults: diffusers'
    AutoencoderKL's). Hub configs are checked by load_weights.vae_config, which refuses
    features this VAE lacks (SD3/Flux latent shifts, other block types)."""
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple = (64,)  # one entry per resolution level, widest last
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215  # used by the callers, see the module docstring
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # whether the VAE must run in fp32 when the rest runs in fp16 (diffusers' default: True). Not
    # read by the model: for the callers that choose its precision. SDXL's VAE overflows in fp16.
    force_upcast: bool = True
    # diffusers' description of the levels and the image size, not read by the model: written
    # back to config.json so that diffusers rebuilds the same layout
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    sample_size: int | tuple = 32

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        """The fields among the keys of `d` (lists as tuples); other keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path) -> "VAEConfig":
        with open(path) as f:
            return cls.from_dict(json.load(f))


_SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
               down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
               norm_num_groups=32, scaling_factor=0.18215)
PRESETS: dict[str, VAEConfig] = {
    "sd15": VAEConfig(**_SD_VAE, sample_size=512),
    "sd21-base": VAEConfig(**_SD_VAE, sample_size=512),
    "sd21": VAEConfig(**_SD_VAE, sample_size=768),
}


def group_norm(channels: int, num_groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups, channels, eps=1e-6)  # every VAE norm uses eps 1e-6


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a (1x1-projected when channels change) skip connection."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions, with a residual connection."""

    def __init__(self, channels: int, num_groups: int):
        super().__init__()
        self.group_norm = group_norm(channels, num_groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])  # a list only for the name "to_out.0"

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x.view(B, C, H * W)).transpose(1, 2)  # (B, C, HW) -> (B, HW, C): a token per pixel
        q, k, v = (proj(h).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1 head, HW, C)
        h = F.scaled_dot_product_attention(q, k, v).squeeze(1)  # softmax(q k^T / sqrt(C)) v: (B, HW, C)
        # (B, HW, C) -> (B, C, H, W) as a channels-last view; `h + x` keeps that memory layout for the
        # layers that follow, as diffusers does, which makes the two bit-identical (x + h would not be).
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        return h + x


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x):
        # Pad one zero row/column at the bottom/right only, then a stride-2 conv without padding (as the
        # original LDM code). Symmetric padding=1 gives the same output size but shifts the sampling grid
        # by one pixel, so pretrained weights see misaligned inputs: a known bug in reimplementations.
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownEncoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_channels if i == 0 else out_channels, out_channels, num_groups) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (the attention may be disabled)."""

    def __init__(self, channels: int, num_groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, num_groups) for _ in range(2)])
        self.attentions = nn.ModuleList([AttentionBlock(channels, num_groups)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class Encoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, groups = c.block_out_channels, c.norm_num_groups
        self.conv_in = nn.Conv2d(c.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block, groups, downsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups, c.mid_block_add_attention)
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], 2 * c.latent_channels, 3, padding=1)  # mean and logvar

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, c: VAEConfig):
        super().__init__()
        ch, groups = tuple(reversed(c.block_out_channels)), c.norm_num_groups  # widest first
        self.conv_in = nn.Conv2d(c.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], groups, c.mid_block_add_attention)
        # One more resnet per block than the encoder (LDM's num_res_blocks + 1).
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(ch[max(i - 1, 0)], ch[i], c.layers_per_block + 1, groups, upsample=i < len(ch) - 1)
            for i in range(len(ch))])
        self.conv_norm_out = group_norm(ch[-1], groups)
        self.conv_out = nn.Conv2d(ch[-1], c.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar))) over latents of shape (B, latent, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, self.logvar = moments.chunk(2, dim=1)  # (B, 2*latent, h, w) -> 2 x (B, latent, h, w)
        self.logvar = self.logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps. The noise is drawn on the generator's device (as diffusers does), then moved,
        so a seeded generator gives the same sample as diffusers' DiagonalGaussianDistribution.sample."""
        device = generator.device if generator is not None else self.mean.device
        eps = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * eps.to(self.mean.device)


class VAE(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        latent = config.latent_channels
        self.quant_conv = nn.Conv2d(2 * latent, 2 * latent, 1) if config.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent, latent, 1) if config.use_post_quant_conv else None

    def encode(self, images: torch.Tensor) -> DiagonalGaussian:
        """images (B, 3, H, W) in [-1, 1] -> posterior over unscaled latents (B, latent, H/8, W/8)."""
        moments = self.encoder(images)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (divide by config.scaling_factor first) -> images in about [-1, 1], not clamped."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)
