"""The image and text encoders of the evaluation (evaluate.py): the Vision Transformer as DINO's
ViT-S/16 and as CLIP's image tower, and CLIP's text tower with its projection.

One architecture, the Vision Transformer (Dosovitskiy et al., 2021, section 3.1), serves both
image encoders:

    pixels [B, 3, S, S] -> P x P patches, each linearly embedded (a stride-P convolution)
        -> [B, N, D], N = (S / P)^2
    prepend a learned class token, add learned position embeddings -> [B, 1 + N, D]
    pre-LayerNorm transformer blocks (bidirectional: every token sees every token)
    LayerNorm of the class token's output -> the image embedding [B, D]

  - DINO (Caron et al., 2021), `ViTModel`: exact GELU, conv patches with a bias. Its embedding is
    the class token after the final LayerNorm, which is what the DreamBooth paper's DINO metric
    compares (section 4.1).
  - CLIP (Radford et al., 2021), `CLIPVisionModelWithProjection`: quick_gelu, a LayerNorm before
    the blocks too ("pre_layrnorm", so spelled in the checkpoints), and a linear projection into
    the joint image-text space [B, projection_dim].
  - CLIP's text tower is clip_text.CLIPTextModel (causal, the same blocks as SD1's prompt encoder);
    `CLIPTextModelWithProjection` adds the pooling at the end token and the text projection.

Parameter names are those of the Hub files (facebook/dino-vits16: `embeddings.`, `encoder.layer.N.`
...; openai/clip-vit-*: `vision_model.`, `visual_projection`, `text_model.`, `text_projection`), so
checkpoints load with strict=True and no renaming. (transformers >= 5 renames ViT's modules
in memory, `layers.N.attention.q_proj`, but still saves the Hub names.)

Images go in as PIL images through `preprocess`: shorter side resized to the encoder's input size
(bicubic), centre crop, scaled to [0, 1] and normalised with the statistics the encoder was trained
with (CLIP's own, ImageNet's for DINO).
"""
import json
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from clip_text import ACTIVATIONS, CLIPEncoderLayer, CLIPTextConfig, CLIPTextModel, CLIPTokenizer, embedding
from load_weights import (TOKENIZER_FILES, LoadError, build_module, compact, hub_snapshot, read_state_dict,
                          text_encoder_config)

DINO_MODEL = "facebook/dino-vits16"
CLIP_MODEL = "openai/clip-vit-base-patch32"

# Normalisation statistics (per RGB channel) of the images each encoder was trained on.
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def preprocess(images, size, mean, std):
    """PIL images -> [B, 3, size, size]: RGB, shorter side to `size` (bicubic), centre crop,
    [0, 1], then (x - mean) / std per channel."""
    pixels = []
    for image in images:
        image = image.convert("RGB")
        scale = size / min(image.size)
        image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))),
                             Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1))  # (H, W, 3) -> (3, H, W)
    mean, std = torch.tensor(mean).view(3, 1, 1), torch.tensor(std).view(3, 1, 1)
    return (torch.stack(pixels) - mean) / std


# ----------------------------------------------------------------------------------------------
# Configs


def _from_dict(cls, d, what):
    names = {f.name for f in fields(cls)}
    config = cls(**{k: v for k, v in d.items() if k in names and not k.startswith("_")})
    if config.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{what} config: hidden_act={config.hidden_act!r} is not supported "
                         f"(supported: {', '.join(map(repr, ACTIVATIONS))})")
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"{what} config: hidden_size={config.hidden_size} is not divisible by "
                         f"num_attention_heads={config.num_attention_heads}")
    if not isinstance(config.image_size, int) or config.image_size % config.patch_size:
        raise ValueError(f"{what} config: image_size={config.image_size!r} must be an integer multiple "
                         f"of patch_size={config.patch_size}")
    return config


@dataclass
class ViTConfig:
    """Keys of a Hub ViT config.json (facebook/dino-vits16); defaults are transformers' ViTConfig's."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-12
    qkv_bias: bool = True

    @classmethod
    def from_dict(cls, d):
        """Ignores keys that are not fields (dropout rates, pooler settings, _name_or_path, ...)."""
        if d.get("model_type", "vit") != "vit":
            raise ValueError(f"DINO encoder config: model_type={d['model_type']!r} is not supported "
                             "(supported: 'vit', the ViT of facebook/dino-vits16 and dino-vitb16)")
        return _from_dict(cls, d, "DINO encoder")

    @classmethod
    def from_json(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


@dataclass
class CLIPVisionConfig:
    """The `vision_config` keys of a Hub CLIP config.json; defaults are transformers'."""
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_dict(cls, d):
        return _from_dict(cls, d, "CLIP vision")


@dataclass
class CLIPConfig:
    """A Hub CLIP config.json: the two towers and the width of the joint embedding space."""
    text_config: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    vision_config: CLIPVisionConfig = field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512

    @classmethod
    def from_dict(cls, d):
        """Older Hub files also hold `text_config_dict` / `vision_config_dict`; as in transformers,
        their values win over those of `text_config` / `vision_config`."""
        if d.get("model_type", "clip") != "clip":
            raise ValueError(f"CLIP encoder config: model_type={d['model_type']!r} is not supported "
                             "(supported: 'clip', a full CLIP checkpoint with both towers, e.g. "
                             f"{CLIP_MODEL})")
        text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
        vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        return cls(text_encoder_config(text), CLIPVisionConfig.from_dict(vision),
                   d.get("projection_dim", 512))

    @classmethod
    def from_json(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))


PRESETS = {
    # DINO ViT-S/16, the paper's DINO metric (section 4.1).
    "facebook/dino-vits16": ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                      num_attention_heads=6, patch_size=16),
    "openai/clip-vit-base-patch32": CLIPConfig(
        CLIPTextConfig(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8),
        CLIPVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, patch_size=32),
        projection_dim=512),
    "openai/clip-vit-large-patch14": CLIPConfig(
        CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12),
        CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                         num_attention_heads=16, patch_size=14),
        projection_dim=768),
}

# Tiny encoders for offline smoke runs (random weights: their numbers mean nothing).
TINY_DINO = ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      image_size=64, patch_size=16)
TINY_CLIP = CLIPConfig(
    CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4),
    CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     image_size=64, patch_size=16),
    projection_dim=16)


# ----------------------------------------------------------------------------------------------
# The transformer blocks


def bidirectional_attention(x, q_proj, k_proj, v_proj, num_heads):
    """Multi-head self-attention without a mask (every token sees every token), before the
    output projection. x [B, T, D] -> [B, T, D]."""
    B, T, D = x.shape
    # (B, T, D) -> (B, heads, T, head_dim)
    q, k, v = (proj(x).view(B, T, num_heads, -1).transpose(1, 2) for proj in (q_proj, k_proj, v_proj))
    out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(d)) v
    # (B, heads, T, head_dim) -> (B, T, heads * head_dim)
    return out.transpose(1, 2).reshape(B, T, D)


class ViTLayer(nn.Module):
    """The same pre-LayerNorm block under the Hub ViT names:
    x + attention(layernorm_before(x)), then x + mlp(layernorm_after(x))."""

    def __init__(self, config):
        super().__init__()
        width, bias = config.hidden_size, config.qkv_bias
        self.num_heads = config.num_attention_heads
        self.layernorm_before = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.attention = nn.ModuleDict(dict(
            attention=nn.ModuleDict(dict(query=nn.Linear(width, width, bias=bias),
                                         key=nn.Linear(width, width, bias=bias),
                                         value=nn.Linear(width, width, bias=bias))),
            output=nn.ModuleDict(dict(dense=nn.Linear(width, width))),
        ))
        self.layernorm_after = nn.LayerNorm(width, eps=config.layer_norm_eps)
        self.intermediate = nn.ModuleDict(dict(dense=nn.Linear(width, config.intermediate_size)))
        self.activation = ACTIVATIONS[config.hidden_act]
        self.output = nn.ModuleDict(dict(dense=nn.Linear(config.intermediate_size, width)))

    def forward(self, x):
        qkv = self.attention.attention
        attended = bidirectional_attention(self.layernorm_before(x), qkv.query, qkv.key, qkv.value, self.num_heads)
        x = x + self.attention.output.dense(attended)
        return x + self.output.dense(self.activation(self.intermediate.dense(self.layernorm_after(x))))


def patchify(conv, pixel_values):
    """Patch embeddings: a stride-P convolution, then (B, D, S/P, S/P) -> (B, N, D)."""
    return conv(pixel_values).flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# The encoders


class ViTEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, num_patches = config.hidden_size, (config.image_size // config.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.patch_embeddings = nn.ModuleDict(dict(projection=nn.Conv2d(
            config.num_channels, width, kernel_size=config.patch_size, stride=config.patch_size)))
        self.position_embeddings = nn.Parameter(torch.randn(1, 1 + num_patches, width) * 0.02)

    def forward(self, pixel_values):
        patches = patchify(self.patch_embeddings.projection, pixel_values)
        cls_token = self.cls_token.expand(len(patches), -1, -1)
        return torch.cat([cls_token, patches], dim=1) + self.position_embeddings  # (B, 1 + N, D)


class ViTModel(nn.Module):
    """DINO's ViT: pixels [B, 3, S, S] (ImageNet-normalised) -> the class token after the final
    LayerNorm [B, hidden_size] (transformers' ViTModel last_hidden_state[:, 0])."""
    image_mean, image_std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embeddings = ViTEmbeddings(config)
        self.encoder = nn.ModuleDict(dict(layer=nn.ModuleList(ViTLayer(config) for _ in range(config.num_hidden_layers))))
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    @property
    def image_size(self):
        return self.config.image_size

    def forward(self, pixel_values):
        x = self.embeddings(pixel_values)
        for layer in self.encoder.layer:
            x = layer(x)
        return self.layernorm(x[:, 0])


class CLIPVisionEmbeddings(nn.Module):
    def __init__(self, config):
        super().__init__()
        width, num_patches = config.hidden_size, (config.image_size // config.patch_size) ** 2
        self.class_embedding = nn.Parameter(torch.randn(width) * width ** -0.5)
        self.patch_embedding = nn.Conv2d(config.num_channels, width, kernel_size=config.patch_size,
                                         stride=config.patch_size, bias=False)
        self.position_embedding = embedding(1 + num_patches, width)

    def forward(self, pixel_values):
        patches = patchify(self.patch_embedding, pixel_values)
        class_token = self.class_embedding.expand(len(patches), 1, -1)
        return torch.cat([class_token, patches], dim=1) + self.position_embedding.weight  # (B, 1 + N, D)


class CLIPVisionModelWithProjection(nn.Module):
    """CLIP's image tower: pixels [B, 3, S, S] (CLIP-normalised) -> image embedding
    [B, projection_dim] (transformers' image_embeds / CLIPModel.get_image_features)."""
    image_mean, image_std = CLIP_MEAN, CLIP_STD

    def __init__(self, config):
        super().__init__()
        self.config = config
        vision = config.vision_config
        self.vision_model = nn.ModuleDict(dict(
            embeddings=CLIPVisionEmbeddings(vision),
            pre_layrnorm=nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(
                CLIPEncoderLayer(vision, causal=False) for _ in range(vision.num_hidden_layers)))),
            post_layernorm=nn.LayerNorm(vision.hidden_size, eps=vision.layer_norm_eps),
        ))
        self.visual_projection = nn.Linear(vision.hidden_size, config.projection_dim, bias=False)

    @property
    def image_size(self):
        return self.config.vision_config.image_size

    def forward(self, pixel_values):
        model = self.vision_model
        x = model.pre_layrnorm(model.embeddings(pixel_values))
        for layer in model.encoder.layers:
            x = layer(x)
        return self.visual_projection(model.post_layernorm(x[:, 0]))


class CLIPTextModelWithProjection(CLIPTextModel):
    """CLIP's text tower: token ids [B, 77] -> text embedding [B, projection_dim]
    (transformers' text_embeds / CLIPModel.get_text_features). The sentence is read at its end
    token, the only position that has attended to the whole prompt under the causal mask; as in
    the original CLIP, that is the position of the largest id (<|endoftext|>, 49407, is the last
    id of the vocabulary; with it as padding, argmax gives its first occurrence)."""

    def __init__(self, config):
        super().__init__(config.text_config)
        self.config = config
        self.text_projection = nn.Linear(config.text_config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids):
        hidden = super().forward(input_ids)  # (B, T, D), after the final LayerNorm
        end = input_ids.argmax(dim=-1)
        return self.text_projection(hidden[torch.arange(len(hidden), device=hidden.device), end])


# ----------------------------------------------------------------------------------------------
# Loading: a local folder (config.json + model.safetensors or pytorch_model.bin) or a Hub id


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # safetensors first


def _encoder_hint(keys):
    return "Is this the right kind of checkpoint (DINO ViT for --dino, CLIPModel for --clip)?"


def build_encoder(model_cls, config, state_dict, what, *, device="cpu"):
    """load_weights.build_module for an encoder: strict keys and shapes, fp32, frozen."""
    return build_module(model_cls, config, state_dict, what=what, device=device, hint=_encoder_hint)


def _download(repo_id, extra_files):
    """config.json, the weights (safetensors, else the pickle) and `extra_files` of a Hub repo."""
    try:
        for weights in WEIGHT_FILES:
            folder = hub_snapshot(repo_id, ["config.json", weights, *extra_files])
            if (folder / weights).is_file():
                return folder
    except LoadError as e:
        raise LoadError(f"{e} For an offline smoke run, use --random_encoders.") from e
    raise LoadError(f"{repo_id} has no {' or '.join(WEIGHT_FILES)}.")


def encoder_folder(source, extra_files=()):
    """A local folder as it is, or a Hub id downloaded (cached) with huggingface_hub."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if str(source).startswith((".", "/", "~")) or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise LoadError(f"{source!r} does not exist. Pass a Hub repo id (like {DINO_MODEL!r} or "
                        f"{CLIP_MODEL!r}) or a folder with config.json and model.safetensors.")
    return _download(str(source), extra_files)


def _read_config(folder):
    path = Path(folder) / "config.json"
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} is missing: an encoder folder holds config.json and model.safetensors "
                        "(or pytorch_model.bin), as the Hub repos do.") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not valid JSON ({e}).") from None


def _state_dict(folder):
    for name in WEIGHT_FILES:
        if (Path(folder) / name).is_file():
            state = read_state_dict(Path(folder) / name)
            # buffers some files carry (position_ids, sometimes as float): recomputed here
            return {k: v for k, v in state.items() if not k.endswith("position_ids")}
    raise LoadError(f"{folder} has no {' or '.join(WEIGHT_FILES)}.")


def load_dino(source=DINO_MODEL, *, device="cpu"):
    """DINO's ViT from a Hub id or a folder. Also accepts files saved from a model with a head
    (keys under `vit.`); transformers' pooler (a dense + tanh head that DINO does not have, absent
    from facebook/dino-vits16) is not part of the embedding and is dropped if present."""
    folder = encoder_folder(source)
    config = ViTConfig.from_dict(_read_config(folder))
    state = {k.removeprefix("vit."): v for k, v in _state_dict(folder).items()}
    state = {k: v for k, v in state.items() if not k.startswith("pooler.")}
    return build_encoder(ViTModel, config, state, f"DINO encoder {source}", device=device)


def load_clip(source=CLIP_MODEL, *, device="cpu"):
    """(image tower, text tower, tokenizer) of a full CLIP checkpoint (Hub id or folder) whose
    folder also holds the tokenizer files. The temperature `logit_scale` is not needed (cosine
    similarities only) and is dropped; every other tensor must find its place."""
    folder = Path(encoder_folder(source, TOKENIZER_FILES))
    config = CLIPConfig.from_dict(_read_config(folder))
    state = {k: v for k, v in _state_dict(folder).items() if k != "logit_scale"}
    towers = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}
    split = {tower: {k: v for k, v in state.items() if k.startswith(prefixes)} for tower, prefixes in towers.items()}
    leftover = state.keys() - split["vision"].keys() - split["text"].keys()
    if leftover:
        raise LoadError(f"CLIP encoder {source}: tensors that belong to neither tower ({len(leftover)}): "
                        f"{compact(leftover)}. Is this a CLIPModel checkpoint?")
    vision = build_encoder(CLIPVisionModelWithProjection, config, split["vision"], f"CLIP image tower {source}", device=device)
    text = build_encoder(CLIPTextModelWithProjection, config, split["text"], f"CLIP text tower {source}", device=device)
    try:
        tokenizer = CLIPTokenizer.from_folder(folder)
    except (FileNotFoundError, ValueError) as e:
        raise LoadError(f"CLIP encoder {source}: {e}") from e
    return vision, text, tokenizer


def random_encoder(model_cls, config, *, seed=0, device="cpu"):
    """An encoder with seeded random weights (PyTorch's default initialisation), for offline smoke
    runs; the global random state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls(config)
    return model.to(device).eval().requires_grad_(False)
