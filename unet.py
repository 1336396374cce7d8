"""The text-conditioned UNet of Stable Diffusion 1.x and 2.x: the denoiser eps_theta(z_t, t, c).

It maps noisy VAE latents z_t [B, 4, h, w], the timestep t and the text-encoder output c
[B, 77, D] to the predicted noise (or v) [B, 4, h, w]. Architecture of the latent diffusion
paper (Rombach et al., 2022, section 3.3): a ResNet UNet whose blocks are interleaved with
transformers that cross-attend to the text.

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

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")

# Hub config keys for features this UNet does not implement (SDXL, class conditioning, ...),
# with the values we accept (the ones that mean "feature off").
_FEATURE_OFF = {
    "class_embed_type": (None,), "addition_embed_type": (None,), "num_class_embeds": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "time_cond_proj_dim": (None,),
    "transformer_layers_per_block": (1,), "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "num_attention_heads": (None,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,), "dropout": (0.0,),
    "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,),
    # Fields of UNetConfig that exist only to be checked: one value is supported.
    "act_fn": ("silu",), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "center_input_sample": (False,), "only_cross_attention": (False,),
    "dual_cross_attention": (False,), "resnet_time_scale_shift": ("default",),
}


def _check_feature_off(key, value):
    if isinstance(value, (list, tuple)) and value and all(v == value[0] for v in value):
        value = value[0]  # e.g. transformer_layers_per_block [1, 1, 1, 1] means 1
    if key in _FEATURE_OFF and value not in _FEATURE_OFF[key]:
        raise ValueError(f"UNet config: {key}={value!r} is not supported "
                         f"(supported: {' or '.join(map(repr, _FEATURE_OFF[key]))})")


@dataclass
class UNetConfig:
    """Keys of the Hub unet/config.json; defaults are diffusers' when a key is absent."""
    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: int = 2
    # Despite its name, diffusers' attention_head_dim is the NUMBER of attention heads (an
    # old naming mistake kept for compatibility): an int for every block or one per block.
    # The head size is channels // num_heads.
    attention_head_dim: Union[int, tuple] = 8
    cross_attention_dim: int = 1280          # width of the text context
    use_linear_projection: bool = False      # proj_in/proj_out: Linear (SD2) or 1x1 conv (SD1)
    upcast_attention: bool = False           # compute attention in fp32 (needed by SD2.1-768)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    sample_size: Optional[int] = None        # latent size the model was trained at
    act_fn: str = "silu"
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    center_input_sample: bool = False
    only_cross_attention: bool = False
    dual_cross_attention: bool = False
    resnet_time_scale_shift: str = "default"

    def __post_init__(self):
        for key in ("act_fn", "downsample_padding", "mid_block_scale_factor",
                    "center_input_sample", "only_cross_attention", "dual_cross_attention",
                    "resnet_time_scale_shift"):
            _check_feature_off(key, getattr(self, key))
        n = len(self.block_out_channels)
        for key, allowed in (("down_block_types", DOWN_BLOCK_TYPES),
                             ("up_block_types", UP_BLOCK_TYPES)):
            types = getattr(self, key)
            if len(types) != n or any(t not in allowed for t in types):
                raise ValueError(f"UNet config: {key}={types!r} is not supported (supported: "
                                 f"one per entry of block_out_channels, each one of "
                                 f"{', '.join(allowed)})")
        for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
            if not isinstance(getattr(self, key), int):
                raise ValueError(f"UNet config: {key}={getattr(self, key)!r} is not supported "
                                 "(supported: a single int)")
        heads = self.num_heads_per_block
        if len(heads) != n or any(c % h for c, h in zip(self.block_out_channels, heads)):
            raise ValueError(f"UNet config: attention_head_dim={self.attention_head_dim!r} must be "
                             f"a head count (or one per block) dividing block_out_channels")

    @property
    def num_heads_per_block(self):
        heads = self.attention_head_dim
        return (heads,) * len(self.block_out_channels) if isinstance(heads, int) else tuple(heads)

    @classmethod
    def from_dict(cls, d):
        for key, value in d.items():
            _check_feature_off(key, value)
        known = {f.name for f in fields(cls)}
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in known}
        return cls(**kwargs)

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
}


def timestep_embedding(timesteps, dim, flip_sin_to_cos, freq_shift, max_period=10000):
    """Sinusoidal embedding of the timesteps [B] -> [B, dim] in fp32 (Transformer positional
    encoding, as in DDPM): frequencies max_period^(-i / (dim/2 - freq_shift))."""
    half = dim // 2
    i = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    exponent = -math.log(max_period) * i
    angles = timesteps[:, None].float() * torch.exp(exponent / (half - freq_shift))[None, :]
    sin, cos = torch.sin(angles), torch.cos(angles)
    emb = torch.cat([cos, sin] if flip_sin_to_cos else [sin, cos], dim=-1)
    return F.pad(emb, (0, dim % 2))


class TimestepEmbedding(nn.Module):
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

    def __init__(self, in_ch, out_ch, temb_dim, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]  # (B, C) -> (B, C, 1, 1)
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

    def __init__(self, channels, num_heads, cfg: UNetConfig):
        super().__init__()
        self.linear = cfg.use_linear_projection
        self.norm = nn.GroupNorm(cfg.norm_num_groups, channels, eps=1e-6)
        proj = nn.Linear if self.linear else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(channels, channels)
        self.transformer_blocks = nn.ModuleList(
            [TransformerBlock(channels, num_heads, cfg.cross_attention_dim, cfg.upcast_attention)])
        self.proj_out = proj(channels, channels)

    def forward(self, x, context, ckpt=False):
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
            h = _maybe_checkpoint(block, h, context, enabled=ckpt)
        h = self.proj_out(h) if self.linear else h
        # (B, HW, C) -> (B, C, H, W), made contiguous: the transposed view has channels-last
        # strides, and a convolution given one runs (and differentiates) in channels-last, whose
        # bf16 weight gradient oneDNN computes several times slower on CPU; the layout would then
        # spread to the following blocks through the residual add. This halved the UNet's
        # convolution-backward time (bench/README.md, issue 6).
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

    def __init__(self, in_ch, out_ch, num_heads, has_attention, add_downsample, cfg, temb_dim):
        super().__init__()
        n, g, eps = cfg.layers_per_block, cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_dim, g, eps) for i in range(n)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, num_heads, cfg) for _ in range(n)]
            if has_attention else [])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)] if add_downsample else [])

    def forward(self, x, temb, context, ckpt):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = _maybe_checkpoint(resnet, x, temb, enabled=ckpt)
            if self.attentions:
                x = self.attentions[i](x, context, ckpt)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet -> transformer -> resnet at the lowest resolution."""

    def __init__(self, channels, num_heads, cfg, temb_dim):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock(channels, channels, temb_dim, g, eps) for _ in range(2)])
        self.attentions = nn.ModuleList([SpatialTransformer(channels, num_heads, cfg)])

    def forward(self, x, temb, context, ckpt):
        x = _maybe_checkpoint(self.resnets[0], x, temb, enabled=ckpt)
        x = self.attentions[0](x, context, ckpt)
        return _maybe_checkpoint(self.resnets[1], x, temb, enabled=ckpt)


class UpBlock(nn.Module):
    """(layers_per_block + 1) x (concat a skip, resnet [+ transformer]), then optional upsample."""

    def __init__(self, in_ch, skip_channels, out_ch, num_heads, has_attention, add_upsample, cfg,
                 temb_dim):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList(
            [ResnetBlock((in_ch if i == 0 else out_ch) + skip, out_ch, temb_dim, g, eps)
             for i, skip in enumerate(skip_channels)])
        self.attentions = nn.ModuleList(
            [SpatialTransformer(out_ch, num_heads, cfg) for _ in skip_channels]
            if has_attention else [])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)] if add_upsample else [])

    def forward(self, x, skips, temb, context, ckpt):
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C, H, W) + (B, C_skip, H, W) on channels
            x = _maybe_checkpoint(resnet, x, temb, enabled=ckpt)
            if self.attentions:
                x = self.attentions[i](x, context, ckpt)
        for up in self.upsamplers:
            x = up(x)
        return x


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        chans, heads = cfg.block_out_channels, cfg.num_heads_per_block
        temb_dim = 4 * chans[0]
        self.gradient_checkpointing = False

        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(chans[0], temb_dim)

        # Down path; skip_channels records the channels of every skip connection it produces.
        skip_channels = [chans[0]]
        self.down_blocks = nn.ModuleList()
        for i, block_type in enumerate(cfg.down_block_types):
            in_ch, is_last = chans[max(i - 1, 0)], i == len(chans) - 1
            has_attention = block_type == "CrossAttnDownBlock2D"
            self.down_blocks.append(
                DownBlock(in_ch, chans[i], heads[i], has_attention, not is_last, cfg, temb_dim))
            skip_channels += [chans[i]] * (cfg.layers_per_block + (not is_last))

        self.mid_block = MidBlock(chans[-1], heads[-1], cfg, temb_dim)

        # Up path mirrors the down path, consuming the skips last-in first-out.
        self.up_blocks = nn.ModuleList()
        rev_chans, rev_heads = chans[::-1], heads[::-1]
        for i, block_type in enumerate(cfg.up_block_types):
            skips = [skip_channels.pop() for _ in range(cfg.layers_per_block + 1)]
            in_ch, is_last = rev_chans[max(i - 1, 0)], i == len(chans) - 1
            has_attention = block_type == "CrossAttnUpBlock2D"
            self.up_blocks.append(UpBlock(in_ch, skips, rev_chans[i], rev_heads[i], has_attention,
                                          not is_last, cfg, temb_dim))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

    def enable_gradient_checkpointing(self):
        """Trade compute for memory in training: recompute each resnet and transformer block in backward."""
        self.gradient_checkpointing = True

    def forward(self, latents, timesteps, context):
        """latents [B, C_in, h, w], timesteps [B] or a scalar, context [B, L, D] (the text
        encoder's output) -> [B, C_out, h, w]. h and w must be multiples of 2^(number of
        downsamples): 8 for SD."""
        B = latents.shape[0]
        timesteps = torch.as_tensor(timesteps, device=latents.device)
        timesteps = timesteps.reshape(-1).expand(B) if timesteps.ndim == 0 else timesteps
        t_emb = timestep_embedding(timesteps, self.config.block_out_channels[0],
                                   self.config.flip_sin_to_cos, self.config.freq_shift)
        temb = self.time_embedding(t_emb.to(latents.dtype))
        ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()

        x = self.conv_in(latents)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context, ckpt)
            skips += block_skips
        x = self.mid_block(x, temb, context, ckpt)
        for block in self.up_blocks:
            x = block(x, skips, temb, context, ckpt)  # pops the skips it uses
        return self.conv_out(F.silu(self.conv_norm_out(x)))
