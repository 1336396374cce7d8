"""The text-conditioned UNet of Stable Diffusion 1.x, 2.x and XL: the denoiser eps_theta(z_t, t, c).

It maps noisy VAE latents z_t [B, 4, h, w], the timestep t and the text-encoder output c
[B, 77, D] to the predicted noise (or v) [B, 4, h, w]. Architecture of the latent diffusion
paper (Rombach et al., 2022, section 3.3): a ResNet UNet whose blocks are interleaved with
transformers that cross-attend to the text.

SDXL (Podell et al., 2023, section 2.1) is the same network with three levels instead of four,
no attention at the highest resolution, deeper transformers lower down (2 and 10 blocks per
transformer), and one more conditioning added to the time embedding: the pooled text
embedding and six image-size numbers (`added_cond`, section 2.2).

Parameter names are exactly those of diffusers' UNet2DConditionModel, so a Hub
unet/diffusion_pytorch_model.safetensors loads with load_state_dict(strict=True).
"""
import json
import math
from dataclasses import dataclass, fields
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


@dataclass
class UNetConfig:
    """The UNet's shape, under the keys of a Hub unet/config.json (defaults: diffusers'). Hub
    configs are checked by load_weights.unet_config, which refuses features this UNet lacks."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    # one per entry of block_out_channels; "CrossAttn..." blocks add the text transformers
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    # Despite its name, diffusers' attention_head_dim is the NUMBER of attention heads (an
    # old naming mistake kept for compatibility): an int for every block or one per block.
    # The head size is channels // num_heads.
    attention_head_dim: Union[int, tuple] = 8
    # transformer blocks stacked in each SpatialTransformer: an int for every block or one per
    # block (SDXL: (1, 2, 10); its first level has no attention, so the 1 is unused)
    transformer_layers_per_block: Union[int, tuple] = 1
    cross_attention_dim: int = 1280          # width of the text context
    use_linear_projection: bool = False      # proj_in/proj_out: Linear (SD2) or 1x1 conv (SD1)
    upcast_attention: bool = False           # compute attention in fp32 (needed by SD2.1-768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: Optional[int] = None        # latent size the model was trained at
    # SDXL's added conditioning: "text_time" embeds the pooled text embedding and the six size
    # numbers (added_cond in UNet.forward); None (SD 1.x/2.x): no added conditioning.
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None  # sinusoid width of each size number (256)
    projection_class_embeddings_input_dim: Optional[int] = None  # pooled width + 6 x that (2816)

    @property
    def num_heads_per_block(self):
        heads = self.attention_head_dim
        return (heads,) * len(self.block_out_channels) if isinstance(heads, int) else tuple(heads)

    @property
    def transformer_depth_per_block(self):
        depth = self.transformer_layers_per_block
        return (depth,) * len(self.block_out_channels) if isinstance(depth, int) else tuple(depth)

    @classmethod
    def from_dict(cls, d):
        """The fields among the keys of `d` (lists as tuples); other keys are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path):
        with open(path) as f:
            return cls.from_dict(json.load(f))


PRESETS = {
    "sd15": UNetConfig(attention_head_dim=8, cross_attention_dim=768, sample_size=64),
    "sd21-base": UNetConfig(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                            use_linear_projection=True, sample_size=64, upcast_attention=False),
    "sd21": UNetConfig(attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                       use_linear_projection=True, sample_size=96, upcast_attention=True),
    "sdxl-base": UNetConfig(
        block_out_channels=(320, 640, 1280), attention_head_dim=(5, 10, 20),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,  # 768 + 1280: both encoders
        use_linear_projection=True, upcast_attention=None,  # the Hub config's null: off
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, sample_size=128),
}


def sinusoidal_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """The Transformer's sinusoidal position encoding of the timesteps, as in DDPM: [B] ->
    [B, dim] in fp32, frequencies max_period^(-i / (dim/2 - freq_shift))."""
    num_freqs = dim // 2
    i = torch.arange(num_freqs, dtype=torch.float32, device=timesteps.device)
    exponent = -math.log(max_period) * i
    angles = timesteps[:, None].float() * torch.exp(exponent / (num_freqs - freq_shift))[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """The MLP that turns the sinusoidal encoding into the time embedding the resnets add."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


def _maybe_checkpoint(module, *args, enabled):
    """Run module(*args); with enabled, keep no activations and recompute them in backward."""
    return checkpoint(module, *args, use_reentrant=False) if enabled else module(*args)


class ResnetBlock(nn.Module):
    """Two 3x3 convs with GroupNorm+SiLU, the time embedding added in between, and a skip."""

    def __init__(self, in_ch, out_ch, time_emb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(time_emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, time_emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(time_emb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 omitted)
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Attention(nn.Module):
    """Multi-head attention; self-attention when context is None, else cross-attention."""

    def __init__(self, dim, num_heads, context_dim=None, upcast=False):
        super().__init__()
        self.num_heads, self.upcast = num_heads, upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])  # diffusers names it to_out.0

    def forward(self, x, context=None):
        context = x if context is None else context
        # (B, L, heads*d) -> (B, heads, L, d); L = HW for queries, 77 (text) or HW for keys
        q, k, v = (t.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)
                   for t in (self.to_q(x), self.to_k(context), self.to_v(context)))
        if self.upcast:
            # fp32 softmax(QK^T/sqrt(d))V even under autocast (which would cast SDPA back down):
            # SD2.1-768 overflows in fp16 otherwise (NaN latents, black images).
            with torch.autocast(device_type=x.device.type, enabled=False):
                out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2)  # (B, heads, L, d) -> (B, L, heads*d)
        return self.to_out[0](out)


class GEGLU(nn.Module):
    """Gated GELU (Shazeer, 2020): one projection gives value and gate, out = value * gelu(gate)."""

    def __init__(self, dim, inner_dim):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner_dim)

    def forward(self, x):
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        # net.1 is diffusers' dropout (p=0 in SD); kept so the indices match its names.
        self.net = nn.Sequential(GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: self-attention, cross-attention to the text, GEGLU MLP, residuals."""

    def __init__(self, dim, num_heads, context_dim, upcast):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, num_heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, num_heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: run a transformer over the pixels of a feature map."""

    def __init__(self, channels, num_heads, depth, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(  # `depth` blocks: 1 in SD 1.x/2.x, up to 10 in SDXL
            [TransformerBlock(channels, num_heads, cfg.cross_attention_dim, cfg.upcast_attention)
             for _ in range(depth)])
        self.proj_out = proj(channels, channels)

    def forward(self, x, context, gradient_checkpointing=False):
        _, _, H, W = x.shape
        h = self.norm(x)
        h = h if self.linear else self.proj_in(h)
        # (B, C, H, W) -> (B, HW, C): one token per pixel. Copied to dense rows once here: left a
        # strided view, every LayerNorm of the blocks would copy it again and every residual add
        # would run strided (speed only; the values are the same).
        h = h.flatten(2).transpose(1, 2).contiguous()
        h = self.proj_in(h) if self.linear else h
        for block in self.transformer_blocks:
            # with gradient checkpointing only the block is recomputed: that is where the
            # activations are; the norm and projections around it are cheap to keep
            h = _maybe_checkpoint(block, h, context, enabled=gradient_checkpointing)
        h = self.proj_out(h) if self.linear else h
        # (B, HW, C) -> (B, C, H, W), made contiguous: the transposed view has channels-last
        # strides, and a convolution given one runs (and differentiates) in channels-last, whose
        # bf16 weight gradient oneDNN computes several times slower on CPU; the layout would then
        # spread to the following blocks through the residual add. This halved the UNet's
        # convolution-backward time when it was profiled (bench/README.md).
        h = h.transpose(1, 2).unflatten(2, (H, W)).contiguous()
        h = h if self.linear else self.proj_out(h)
        return x + h


class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class DownBlock(nn.Module):
    """`layers_per_block` x (resnet [+ transformer]), then an optional stride-2 downsample.
    Every intermediate output is kept as a skip connection for the up path."""

    def __init__(self, in_ch, out_ch, num_heads, depth, has_attention, add_downsample, cfg, time_emb_dim):
        super().__init__()
        n, g, eps = cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, time_emb_dim, g, eps) for i in range(n)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, num_heads, depth, cfg) for _ in range(n)]
            if has_attention else [])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if add_downsample else [])

    def forward(self, x, time_emb, context, gradient_checkpointing):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = _maybe_checkpoint(resnet, x, time_emb, enabled=gradient_checkpointing)
            if self.attentions:
                x = self.attentions[i](x, context, gradient_checkpointing)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, channels, num_heads, depth, cfg, time_emb_dim):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, time_emb_dim, g, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, num_heads, depth, cfg)])

    def forward(self, x, time_emb, context, gradient_checkpointing):
        x = _maybe_checkpoint(self.resnets[0], x, time_emb, enabled=gradient_checkpointing)
        x = self.attentions[0](x, context, gradient_checkpointing)
        return _maybe_checkpoint(self.resnets[1], x, time_emb, enabled=gradient_checkpointing)


class UpBlock(nn.Module):
    """(layers_per_block + 1) x (concat a skip, resnet [+ transformer]), then optional upsample."""

    def __init__(self, in_ch, skip_channels, out_ch, num_heads, depth, has_attention, add_upsample,
                 cfg, time_emb_dim):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock((in_ch if i == 0 else out_ch) + skip, out_ch, time_emb_dim, g, eps)
             for i, skip in enumerate(skip_channels)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, num_heads, depth, cfg) for _ in skip_channels]
            if has_attention else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if add_upsample else [])

    def forward(self, x, skips, time_emb, context, gradient_checkpointing):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C, H, W) + (B, C_skip, H, W) on channels
            x = _maybe_checkpoint(resnet, x, time_emb, enabled=gradient_checkpointing)
            if self.attentions:
                x = self.attentions[i](x, context, gradient_checkpointing)
        for up in self.upsamplers:
            x = up(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        chans, heads, depths = cfg.block_out_channels, cfg.num_heads_per_block, cfg.transformer_depth_per_block
        time_emb_dim = 4 * chans[0]
        self.gradient_checkpointing = False

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], time_emb_dim)
        # SDXL: an MLP from [pooled text embedding, sinusoids of the six size numbers] to the time
        # embedding's width (added_embedding). diffusers' add_time_proj, the sinusoids, has no weights.
        self.add_embedding = (TimestepEmbedding(cfg.projection_class_embeddings_input_dim, time_emb_dim)
                              if cfg.addition_embed_type == "text_time" else None)

        # Down path; skip_channels records the channels of every skip connection it produces.
        skip_channels = [chans[0]]
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(cfg.down_block_types):
            in_ch, is_last = chans[max(i - 1, 0)], i == len(chans) - 1
            has_attention = block_type == "CrossAttnDownBlock2D"
            self.down_blocks.append(DownBlock(in_ch, chans[i], heads[i], depths[i], has_attention,
                                              not is_last, cfg, time_emb_dim))
            skip_channels += [chans[i]] * (cfg.layers_per_block + (not is_last))

        self.mid_block = MidBlock(chans[-1], heads[-1], depths[-1], cfg, time_emb_dim)

        # Up path mirrors the down path, consuming the skips last-in first-out.
        self.up_blocks = nn.ModuleList()
        rev_chans, rev_heads, rev_depths = chans[::-1], heads[::-1], depths[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            skips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            in_ch, is_last = rev_chans[max(i - 1, 0)], i == len(chans) - 1
            has_attention = block_type == "CrossAttnUpBlock2D"
            self.up_blocks.append(UpBlock(in_ch, skips, rev_chans[i], rev_heads[i], rev_depths[i],
                                          has_attention, not is_last, cfg, time_emb_dim))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self):
        """Trade compute for memory in training: recompute each resnet and transformer block in backward."""
        self.gradient_checkpointing = True

    def added_embedding(self, added_cond, dtype):
        """SDXL's added conditioning (Podell et al., 2023, sections 2.1-2.2), [B, 4 * C0]: each of
        the six size numbers in added_cond["time_ids"] [B, 6] (original height and width, crop top
        and left, target height and width, in pixels) is encoded with the timestep's sinusoids,
        addition_time_embed_dim channels each; they follow the pooled text embedding
        added_cond["text_embeds"] [B, D], and the MLP add_embedding maps the whole to the time
        embedding's width."""
        if added_cond is None or not {"text_embeds", "time_ids"} <= added_cond.keys():
            raise ValueError("this UNet (addition_embed_type 'text_time', SDXL) needs "
                             "added_cond={'text_embeds': [B, D], 'time_ids': [B, 6]}")
        cfg, text_embeds, time_ids = self.config, added_cond["text_embeds"], added_cond["time_ids"]
        # (B, 6) -> (B * 6, C) -> (B, 6 * C): one sinusoid encoding per number, side by side
        ids_sinusoid = sinusoidal_embedding(time_ids.flatten(), cfg.addition_time_embed_dim,
                                            cfg.flip_sin_to_cos, cfg.freq_shift).reshape(len(text_embeds), -1)
        return self.add_embedding(torch.cat([text_embeds.to(dtype), ids_sinusoid.to(dtype)], dim=-1))

    def forward(self, latents, timesteps, context, added_cond=None):
        """latents [B, C_in, h, w], timesteps [B] or a scalar, context [B, L, D] (the text
        encoder's output) -> [B, C_out, h, w]. h and w must be multiples of 2^(number of
        downsamples): 8 for SD 1.x/2.x, 4 for SDXL. added_cond: SDXL's pooled text embedding and
        size numbers, {"text_embeds": [B, D], "time_ids": [B, 6]} (see added_embedding); only
        for a UNet with addition_embed_type "text_time", which needs it."""
        B = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        timesteps = timesteps.reshape(-1).expand(B) if timesteps.ndim == 0 else timesteps
        # sinusoidal encoding [B, C0] -> MLP -> the time embedding [B, 4 * C0] every resnet adds
        t_sinusoid = sinusoidal_embedding(timesteps, self.config.block_out_channels[0],
                                          self.config.flip_sin_to_cos, self.config.freq_shift)
        time_emb = self.time_embedding(t_sinusoid.to(latents.dtype))
        if self.add_embedding is not None:
            time_emb = time_emb + self.added_embedding(added_cond, time_emb.dtype)
        gradient_checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, time_emb, context, gradient_checkpointing)
            skips += block_skips
        x = self.mid_block(x, time_emb, context, gradient_checkpointing)
        for block in self.up_blocks:
            x = block(x, skips, time_emb, context, gradient_checkpointing)  # pops the skips it uses
        return self.conv_out(F.silu(self.conv_norm_out(x)))
