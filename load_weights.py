"""Load public Stable Diffusion weights (SD 1.x, 2.x and SDXL base) into the hand-written models,
and save them back.

Three ways in, one way to build a model:
  - a Hub repo id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), downloaded with
    huggingface_hub.snapshot_download (only the files we need),
  - a local folder in the diffusers layout (what the Hub holds, and what train.py writes),
  - a single original-format checkpoint (.safetensors or .ckpt, the CompVis/Stability layout
    that model sites share), whose names we map to diffusers' with short loops.
Every model is built on the meta device (no memory), then takes the checkpoint's tensors with
load_state_dict(strict=True, assign=True): safetensors files are memory-mapped, so a tensor that
already has the requested dtype is used in place and the weights are never held twice.
Before that, each component's config.json is checked: a Hub config of a feature these models do
not implement (other block types, class embeddings, ...) is refused, naming the key. SDXL
pipelines have a second text encoder and tokenizer (text_encoder_2/, tokenizer_2/); SD 1.x/2.x
ones leave those fields of Pipeline None.

Two ways out: save_pipeline() writes a diffusers folder, export_single_file() an original-format
.safetensors. Both write to a temporary name and rename when complete.

Checkpoints are data, not code: pickles are read only with torch.load(weights_only=True).
"""

import dataclasses
import errno
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional

import torch
from huggingface_hub import snapshot_download
from huggingface_hub import errors as hub_errors
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clip_text import ACTIVATIONS, CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from schedulers import DDPMScheduler, SchedulerConfig
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD2_MODEL = "stabilityai/stable-diffusion-2-1"  # 768 px, v-prediction
SD2_BASE_MODEL = "stabilityai/stable-diffusion-2-1-base"  # 512 px, epsilon
SDXL_MODEL = "stabilityai/stable-diffusion-xl-base-1.0"  # 1024 px, epsilon, two text encoders
TOY_MODEL = Path(__file__).resolve().parent / "toy" / "model"  # `--model toy`: the project's tiny SD (toy/)


class Component(NamedTuple):
    """One model of a diffusers folder: its class, and its files in the component's subfolder."""
    model: type
    config_file: str
    weights_stem: str  # + ".safetensors" or ".bin", with ".fp16" etc. before it for a variant


COMPONENTS = {
    "text_encoder": Component(CLIPTextModel, "config.json", "model"),
    "text_encoder_2": Component(CLIPTextModelWithProjection, "config.json", "model"),  # SDXL only
    "unet": Component(UNet, "config.json", "diffusion_pytorch_model"),
    "vae": Component(VAE, "config.json", "diffusion_pytorch_model"),
}
SDXL_ONLY = ("text_encoder_2", "tokenizer_2")  # a folder has them exactly when it is SDXL
TOKENIZER_FILES = ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json")


class LoadError(Exception):
    """A checkpoint or model source that cannot be used; the message says what to do."""


@dataclass
class Pipeline:
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    unet: UNet
    vae: VAE
    scheduler: DDPMScheduler  # the training noise schedule; samplers are built from its config
    source: str = ""
    # The config.json dicts as the source wrote them (by component), so that saving keeps every
    # key we do not model. Empty for sources that had none.
    raw_configs: dict = field(default_factory=dict)
    # SDXL's second text encoder (OpenCLIP ViT-bigG, with the projection that gives the pooled
    # embedding) and its tokenizer, which pads with "!"; None for SD 1.x/2.x.
    text_encoder_2: Optional[CLIPTextModelWithProjection] = None
    tokenizer_2: Optional[CLIPTokenizer] = None
    # SDXL's model_index.json setting (diffusers' default: true): guidance's empty negative prompt
    # is zeros (context and pooled), not the encoding of "". False for SD 1.x/2.x.
    force_zeros_for_empty_prompt: bool = False


# ----------------------------------------------------------------------------------------------
# Reading tensors


def load_pickle(path, *, mmap=False):
    """torch.load(weights_only=True): tensors and plain values only. A file that asks for other
    Python objects is refused (loading them could run code from the file), and one that is not
    a readable checkpoint says so; both as LoadError."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's notes on odd pickle protocols
            try:  # mmap needs the zip format of torch >= 1.6; older pickles load without it
                return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as e:
                if not mmap or "mmap" not in str(e):
                    raise
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message ends with the unpickler's reason, after advice we do not give
        reason = next((line.strip() for line in str(e).split("WeightsUnpickler error:")[-1].splitlines()
                       if line.strip()), "")
        if "global" in reason.lower():
            what = reason.split(" was not an allowed global")[0].replace("Unsupported global: GLOBAL ", "")
            raise LoadError(f"{path} holds Python objects besides tensors ({what}), and loading them could run "
                            "code from the file, so it is refused. Use a .safetensors version of it, or convert "
                            "it with a tool you trust.") from None
        raise LoadError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {reason}.") from None
    except (RuntimeError, EOFError, OSError, ValueError, IndexError, KeyError, MemoryError) as e:
        # (garbage bytes fail inside the unpickler in many ways)
        raise LoadError(f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): "
                        f"{str(e).strip().rstrip('.')}.") from None


def read_state_dict(path):
    """Tensors of one checkpoint file, by name. safetensors: memory-mapped, lazily read;
    .ckpt/.pt/.bin: torch.load(weights_only=True), refusing pickles that hold more than tensors."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            with safe_open(path, framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise LoadError(
                f"{path} is not a readable safetensors file ({e}). It may be truncated or corrupt: "
                "download it again."
            ) from e
    state = load_pickle(path, mmap=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]  # Lightning checkpoints (the original SD .ckpt files)
    if not isinstance(state, dict):
        raise LoadError(f"{path} does not hold a dict of tensors (found {type(state).__name__}).")
    return state


def compact(keys, n=5):
    """The first n keys and a count of the rest, for error messages."""
    keys = sorted(keys)
    more = f" ... and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _hint(keys):
    keys = list(keys)
    if any("lora" in k.lower() for k in keys):
        return ("This looks like a LoRA file (an add-on), not a full model: load the base model "
                "it was trained on instead.")
    if any(k.startswith(("conditioner.", "add_embedding.", "text_projection.")) for k in keys):
        return ("This looks like an SDXL checkpoint: load it with an SDXL base config (by default, "
                "without config=, the single-file loader fetches SDXL base's).")
    return ("Is the checkpoint from another Stable Diffusion version or size than the config "
            "(SD 1.x vs 2.x)? Pass config= a diffusers folder that describes it.")


def build_module(model_cls, config, state_dict, *, what, dtype=torch.float32, device="cpu", hint=_hint):
    """Build model_cls(config) on the meta device, then move the checkpoint's tensors in with
    strict key and shape checks. `state_dict` maps our names to tensors; `what` names the model
    in errors and `hint(keys)` guesses the cause of a mismatch."""
    with torch.device("meta"):
        model = model_cls(config)
    expected = model.state_dict()
    missing, unexpected = expected.keys() - state_dict.keys(), state_dict.keys() - expected.keys()
    if missing or unexpected:
        raise LoadError(
            f"{what}: the checkpoint does not match the model.\n"
            f"  missing ({len(missing)}): {compact(missing) or '-'}\n"
            f"  unexpected ({len(unexpected)}): {compact(unexpected) or '-'}\n"
            f"  {hint(unexpected or missing)}"
        )
    tensors = {}
    for key, want in expected.items():
        tensor = state_dict[key]
        if tensor.shape != want.shape:
            cause = ("A UNet with 9 input channels is an inpainting model, which is not supported."
                     if key == "conv_in.weight" and tensor.shape[1] == 9 else hint([]))
            raise LoadError(f"{what}: {key} has shape {tuple(tensor.shape)} in the checkpoint, "
                            f"but the config gives {tuple(want.shape)}. {cause}")
        # Cast once, straight to the target; a tensor already right is used as it is (no copy).
        tensors[key] = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else None)
    model.load_state_dict(tensors, strict=True, assign=True)
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------------
# Hub configs
#
# A Hub config.json can describe more than the hand-written models build (SDXL's extra
# embeddings, other block types, dropout, ...). Such configs are refused here, at the boundary,
# so that the models' config dataclasses stay the plain list of what they use. Keys that are
# neither checked nor fields are kept in Pipeline.raw_configs and written back on save.

# Hub config keys with the only values the models support: for features they do not implement,
# the values that mean "off". An absent key is supported.
UNET_SUPPORTED = {
    "class_embed_type": (None,), "addition_embed_type": (None, "text_time"), "num_class_embeds": (None,),
    "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,), "time_cond_proj_dim": (None,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "num_attention_heads": (None,), "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,), "time_embedding_act_fn": (None,), "timestep_post_act": (None,),
    "conv_in_kernel": (3,), "conv_out_kernel": (3,), "attention_type": ("default",),
    "class_embeddings_concat": (False,), "cross_attention_norm": (None,),
    "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1.0,), "dropout": (0.0,),
    "mid_block_only_cross_attention": (None, False),
    "reverse_transformer_layers_per_block": (None,),
    "act_fn": ("silu",), "downsample_padding": (1,), "mid_block_scale_factor": (1,),
    "center_input_sample": (False,), "only_cross_attention": (False,),
    "dual_cross_attention": (False,), "resnet_time_scale_shift": ("default",),
}
VAE_SUPPORTED = {  # shift_factor and latents_mean/std: the latent statistics of SD3/Flux VAEs
    "act_fn": ("silu",), "shift_factor": (None, 0), "latents_mean": (None,), "latents_std": (None,)}
TEXT_ENCODER_SUPPORTED = {"attention_dropout": (0,), "dropout": (0,), "hidden_act": tuple(ACTIVATIONS)}
UNET_BLOCK_TYPES = {"down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
                    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D")}
VAE_BLOCK_TYPES = {"down_block_types": ("DownEncoderBlock2D",), "up_block_types": ("UpDecoderBlock2D",)}


def _refuse_unsupported(what, raw, supported):
    """ValueError for the first key of `supported` whose value in `raw` is not one it lists."""
    for key, allowed in supported.items():
        value = raw.get(key, allowed[0])
        # a per-block list of one value means that value: transformer_layers_per_block [1, 1, 1, 1] is 1
        single = value[0] if isinstance(value, list) and value and all(v == value[0] for v in value) else value
        if single not in allowed:
            raise ValueError(f"{what} config: {key}={value!r} is not supported "
                             f"(supported: {', '.join(map(repr, allowed))})")


def _check_block_types(what, config, block_types):
    """ValueError unless the down/up block types are known ones, one per resolution level."""
    n = len(config.block_out_channels)
    for key, allowed in block_types.items():
        types = getattr(config, key)
        if any(t not in allowed for t in types):
            raise ValueError(f"{what} config: {key}={list(types)!r} is not supported "
                             f"(supported: each one of {', '.join(allowed)})")
        if len(types) != n:
            raise ValueError(f"{what} config: {key} ({len(types)}) and block_out_channels ({n}) "
                             "must have equal lengths")


def unet_config(raw):
    """The UNetConfig of a Hub unet/config.json dict; ValueError for what the UNet lacks."""
    _refuse_unsupported("UNet", raw, UNET_SUPPORTED)
    config = UNetConfig.from_dict(raw)
    _check_block_types("UNet", config, UNET_BLOCK_TYPES)
    for key in ("layers_per_block", "cross_attention_dim", "norm_num_groups"):
        if not isinstance(getattr(config, key), int):
            raise ValueError(f"UNet config: {key}={getattr(config, key)!r} is not supported "
                             "(supported: a single int)")
    depth = config.transformer_depth_per_block  # nested lists describe asymmetric UNets
    if len(depth) != len(config.block_out_channels) or not all(isinstance(d, int) and d > 0 for d in depth):
        raise ValueError(f"UNet config: transformer_layers_per_block={raw['transformer_layers_per_block']!r} "
                         "is not supported (supported: a positive int, or one per block)")
    if len(set(depth)) == 1:  # [1, 1, 1, 1] is 1
        config = dataclasses.replace(config, transformer_layers_per_block=depth[0])
    sizes = ("addition_time_embed_dim", "projection_class_embeddings_input_dim")
    if config.addition_embed_type == "text_time" and not all(isinstance(getattr(config, k), int) for k in sizes):
        raise ValueError("UNet config: addition_embed_type='text_time' is not supported without "
                         "addition_time_embed_dim and projection_class_embeddings_input_dim (SDXL's config gives both)")
    heads = config.num_heads_per_block
    if len(heads) != len(config.block_out_channels) or any(
            c % h for c, h in zip(config.block_out_channels, heads)):
        raise ValueError(f"UNet config: attention_head_dim={config.attention_head_dim!r} must be "
                         "a head count (or one per block) dividing block_out_channels")
    return config


def vae_config(raw):
    """The VAEConfig of a Hub vae/config.json dict; ValueError for what the VAE lacks."""
    _refuse_unsupported("VAE", raw, VAE_SUPPORTED)
    config = VAEConfig.from_dict(raw)
    _check_block_types("VAE", config, VAE_BLOCK_TYPES)
    if any(c % config.norm_num_groups for c in config.block_out_channels):
        raise ValueError(f"VAE config: norm_num_groups={config.norm_num_groups} must divide every "
                         f"entry of block_out_channels={list(config.block_out_channels)}")
    return config


def text_encoder_config(raw):
    """The CLIPTextConfig of a Hub text_encoder/config.json dict (or a CLIP checkpoint's
    text_config); ValueError for what the text transformer lacks."""
    _refuse_unsupported("text encoder", raw, TEXT_ENCODER_SUPPORTED)
    config = CLIPTextConfig.from_dict(raw)
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"text encoder config: hidden_size={config.hidden_size} is not divisible "
                         f"by num_attention_heads={config.num_attention_heads}")
    return config


HUB_CONFIGS = {"text_encoder": text_encoder_config, "text_encoder_2": text_encoder_config,
               "unet": unet_config, "vae": vae_config}


def check_pipeline_configs(where, configs):
    """LoadError unless the components' configs fit together: the UNet reads the VAE's latents,
    and an SDXL UNet (addition_embed_type "text_time") comes with two text encoders whose
    penultimate states make its context and whose second one's projection starts its added
    conditioning, followed by six size numbers."""
    unet, vae = configs["unet"], configs["vae"]
    if unet.in_channels != vae.latent_channels:
        raise LoadError(f"{where}: the UNet takes {unet.in_channels} input channels and the VAE makes "
                        f"{vae.latent_channels}: this is an inpainting or depth model; only text-to-image "
                        "models are supported.")
    sdxl_unet, two_encoders = unet.addition_embed_type == "text_time", "text_encoder_2" in configs
    if sdxl_unet != two_encoders:
        raise LoadError(f"{where}: " + ("the UNet is SDXL's (addition_embed_type 'text_time'), but there is no "
                                        "text_encoder_2: is the folder complete?" if sdxl_unet else
                                        "there is a text_encoder_2, but the UNet has no added conditioning "
                                        "(addition_embed_type 'text_time'): only SDXL base has two text encoders."))
    if not sdxl_unet:
        return
    text, text_2 = configs["text_encoder"], configs["text_encoder_2"]
    if unet.cross_attention_dim != text.hidden_size + text_2.hidden_size or \
            unet.projection_class_embeddings_input_dim != text_2.projection_dim + 6 * unet.addition_time_embed_dim:
        raise LoadError(f"{where}: the UNet's context width ({unet.cross_attention_dim}) and added conditioning "
                        f"({unet.projection_class_embeddings_input_dim}) are not SDXL base's: the two text "
                        f"encoders' widths ({text.hidden_size} + {text_2.hidden_size}) and the pooled width "
                        f"+ 6 x {unet.addition_time_embed_dim} ({text_2.projection_dim} + "
                        f"{6 * unet.addition_time_embed_dim}). The SDXL refiner is not supported.")


# ----------------------------------------------------------------------------------------------
# Diffusers folders and the Hub


def _read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LoadError(f"{path} is missing: is this a complete diffusers-layout folder?") from None
    except json.JSONDecodeError as e:
        raise LoadError(f"{path} is not valid JSON ({e}).") from None


def _weights_file(folder, stem, variant):
    """The weights file of one component: safetensors first, .bin only when there is none."""
    suffix = f".{variant}" if variant else ""
    for ext in (".safetensors", ".bin"):
        path = Path(folder) / f"{stem}{suffix}{ext}"
        if path.is_file():
            return path
    found = ", ".join(sorted(p.name for p in Path(folder).glob("*"))) or "nothing"
    raise LoadError(f"{folder} has no {stem}{suffix}.safetensors (nor .bin); it holds: {found}."
                    + (f" Is the '{variant}' variant there?" if variant else ""))


def read_configs(folder):
    """The configs of a diffusers folder: raw dicts by component, and our dataclasses; SDXL's
    text_encoder_2 where the folder has one. LoadError for configs that do not fit together."""
    folder = Path(folder)
    if (folder / "text_encoder_2").is_dir() and not (folder / "text_encoder").is_dir():
        raise LoadError(f"{folder} has a text_encoder_2/ but no text_encoder/: this is the SDXL refiner (one "
                        "OpenCLIP text encoder, conditioned on an aesthetic score), a second-stage image-to-image "
                        "model, which is not supported; use SDXL base.")
    names = [name for name in COMPONENTS if name not in SDXL_ONLY or (folder / name).is_dir()]
    raw = {name: _read_json(folder / name / COMPONENTS[name].config_file) for name in names}
    raw["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    configs = {}
    for name in names:
        try:
            configs[name] = HUB_CONFIGS[name](raw[name])
        except ValueError as e:
            raise LoadError(f"{folder / name / COMPONENTS[name].config_file}: {e}. Only the text-to-image models "
                            "of Stable Diffusion 1.x and 2.x and SDXL base are supported.") from None
    configs["scheduler"] = SchedulerConfig.from_dict(raw["scheduler"])
    for tokenizer in tokenizer_names(configs):
        for f in TOKENIZER_FILES[:2]:
            if not (folder / tokenizer / f).is_file():
                raise LoadError(f"{folder / tokenizer / f} is missing: the tokenizer needs "
                                f"{' and '.join(TOKENIZER_FILES[:2])}.")
    check_pipeline_configs(folder, configs)
    return raw, configs


def force_zeros_for_empty_prompt(folder, configs):
    """What the folder's model_index.json says for SDXL (true where it does not say, as in
    diffusers' StableDiffusionXLPipeline); False for SD 1.x/2.x, whose pipeline has no such setting."""
    if "text_encoder_2" not in configs:
        return False
    path = Path(folder) / "model_index.json"
    return bool((_read_json(path) if path.is_file() else {}).get("force_zeros_for_empty_prompt", True))


def tokenizer_names(configs):
    """The tokenizer folders a pipeline reads: tokenizer/, and tokenizer_2/ for SDXL."""
    return ["tokenizer", "tokenizer_2"] if "text_encoder_2" in configs else ["tokenizer"]


def read_tokenizers(folder, configs):
    """{Pipeline field: CLIPTokenizer} of the tokenizer folders (each reads its own pad token)."""
    return {name: CLIPTokenizer.from_folder(Path(folder) / name) for name in tokenizer_names(configs)}


def _text_encoder_keys(state):
    """transformers >= 5 saves CLIPTextModel without the `text_model.` prefix the Hub files
    have, and older files carry a position_ids buffer (sometimes as float): accept both. (The
    projection of CLIPTextModelWithProjection sits beside text_model., under text_projection.)"""
    return {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def load_folder(folder, *, dtype=torch.float32, device="cpu", variant=None, source=None):
    folder = Path(folder)
    check_save_complete(folder)
    if not (folder / "unet").is_dir():
        raise LoadError(f"{folder} is not a diffusers-layout folder (no unet/ inside). Expected "
                        "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.")
    raw, configs = read_configs(folder)
    modules = {}
    for name in (name for name in COMPONENTS if name in configs):
        component = COMPONENTS[name]
        state = read_state_dict(_weights_file(folder / name, component.weights_stem, variant))
        if name.startswith("text_encoder"):
            state = _text_encoder_keys(state)
        modules[name] = build_module(component.model, configs[name], state, what=name, dtype=dtype, device=device)
    return Pipeline(**read_tokenizers(folder, configs), scheduler=DDPMScheduler(configs["scheduler"]),
                    source=str(source or folder), raw_configs=raw,
                    force_zeros_for_empty_prompt=force_zeros_for_empty_prompt(folder, configs), **modules)


def _hub_patterns(variant, ext):
    suffix = f".{variant}" if variant else ""
    configs = ["model_index.json", "scheduler/scheduler_config.json",
               *(f"{tokenizer}/{f}" for tokenizer in ("tokenizer", "tokenizer_2") for f in TOKENIZER_FILES),
               *(f"{name}/{c.config_file}" for name, c in COMPONENTS.items())]
    weights = [f"{name}/{c.weights_stem}{suffix}{ext}" for name, c in COMPONENTS.items()]
    return configs, weights


def hub_snapshot(repo_id, allow_patterns, *, revision=None):
    """snapshot_download of the files matching allow_patterns (from the local cache when it has
    them), with errors that say what to do. Honours HF_HOME, HF_HUB_OFFLINE and HF_TOKEN /
    `hf auth login` like every Hub tool."""
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except hub_errors.GatedRepoError as e:
        raise LoadError(f"{repo_id} is gated: accept its licence on its Hub page, then log in with "
                        "`hf auth login` (or set HF_TOKEN).") from e
    except hub_errors.RepositoryNotFoundError as e:
        raise LoadError(f"There is no Hub repo named {repo_id!r} (or it is private: log in with "
                        "`hf auth login`). For local weights pass a folder or a .safetensors file.") from e
    except hub_errors.RevisionNotFoundError as e:
        raise LoadError(f"{repo_id} has no revision {revision!r}.") from e
    except hub_errors.LocalEntryNotFoundError as e:
        raise LoadError(
            f"{repo_id} is not in the local Hub cache ({os.environ.get('HF_HOME', '~/.cache/huggingface')}) "
            "and the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1). Download it where there "
            f"is network (`hf download {repo_id}`), or pass a local folder or .safetensors file."
        ) from e


def download(repo_id, *, variant=None, revision=None, weights=True):
    """Fetch what a pipeline needs from the Hub (or the local cache) and return the folder."""
    configs, safetensors_files = _hub_patterns(variant, ".safetensors")
    folder = hub_snapshot(repo_id, configs + (safetensors_files if weights else []), revision=revision)
    if weights:  # older repos hold only .bin files for some components (of those the repo has)
        lacking = [p.split("/")[0] for p in safetensors_files
                   if not (folder / p).is_file() and (folder / p).parent.is_dir()]
        if lacking:
            _, bins = _hub_patterns(variant, ".bin")
            folder = hub_snapshot(repo_id, configs + [b for b in bins if b.split("/")[0] in lacking],
                                  revision=revision)
    return folder


# ----------------------------------------------------------------------------------------------
# Original single-file checkpoints (CompVis / Stability layout)
#
# The models sit under their own prefixes. Inside them the UNet and VAE use LDM's module names;
# the tables below are built by loops over the config. A text encoder under ".transformer." keeps
# transformers' names (SD1's, SDXL's first), one under ".model." has OpenCLIP's (SD2's, SDXL's
# second).

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
SDXL_TEXT_PREFIX, SDXL_TEXT_PREFIX_2 = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
TEXT_PREFIXES = {"sd1": SD1_TEXT_PREFIX, "sd2": SD2_TEXT_PREFIX, "sdxl": SDXL_TEXT_PREFIX}  # by family
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_names(config):
    """(our module prefix, original module prefix, inner-name table) for every UNet module."""
    L = config.layers_per_block
    names = [("time_embedding.linear_1.", "time_embed.0.", {}),
             ("time_embedding.linear_2.", "time_embed.2.", {}),
             ("add_embedding.linear_1.", "label_emb.0.0.", {}),  # SDXL's added conditioning
             ("add_embedding.linear_2.", "label_emb.0.2.", {}),
             ("conv_in.", "input_blocks.0.0.", {}),
             ("mid_block.resnets.0.", "middle_block.0.", RESNET_NAMES),
             ("mid_block.attentions.0.", "middle_block.1.", {}),
             ("mid_block.resnets.1.", "middle_block.2.", RESNET_NAMES),
             ("conv_norm_out.", "out.0.", {}),
             ("conv_out.", "out.2.", {})]
    last = len(config.block_out_channels) - 1
    # input_blocks: conv_in, then per level L (resnet, attention) pairs and a downsampler.
    for b in range(last + 1):
        for l in range(L):
            i = b * (L + 1) + l + 1
            names += [(f"down_blocks.{b}.resnets.{l}.", f"input_blocks.{i}.0.", RESNET_NAMES),
                      (f"down_blocks.{b}.attentions.{l}.", f"input_blocks.{i}.1.", {})]
        if b < last:
            names.append((f"down_blocks.{b}.downsamplers.0.conv.", f"input_blocks.{(b + 1) * (L + 1)}.0.op.", {}))
    # output_blocks: per level L+1 (resnet, attention) pairs; the upsampler is the last module of
    # the level's last block (index 1 or 2, depending on whether that block has attention).
    for b in range(last + 1):
        for l in range(L + 1):
            i = b * (L + 1) + l
            names += [(f"up_blocks.{b}.resnets.{l}.", f"output_blocks.{i}.0.", RESNET_NAMES),
                      (f"up_blocks.{b}.attentions.{l}.", f"output_blocks.{i}.1.", {})]
        if b < last:
            upsampler = 2 if config.up_block_types[b].startswith("CrossAttn") else 1
            names.append((f"up_blocks.{b}.upsamplers.0.", f"output_blocks.{b * (L + 1) + L}.{upsampler}.", {}))
    return names


def vae_module_names(config):
    n = len(config.block_out_channels)
    names = [("quant_conv.", "quant_conv.", {}), ("post_quant_conv.", "post_quant_conv.", {})]
    for part in ("encoder", "decoder"):
        names += [(f"{part}.conv_in.", f"{part}.conv_in.", {}),
                  (f"{part}.conv_norm_out.", f"{part}.norm_out.", {}),
                  (f"{part}.conv_out.", f"{part}.conv_out.", {}),
                  (f"{part}.mid_block.resnets.0.", f"{part}.mid.block_1.", VAE_RESNET_NAMES),
                  (f"{part}.mid_block.resnets.1.", f"{part}.mid.block_2.", VAE_RESNET_NAMES),
                  (f"{part}.mid_block.attentions.0.", f"{part}.mid.attn_1.", VAE_ATTENTION_NAMES)]
    for i in range(n):
        names.append((f"encoder.down_blocks.{i}.downsamplers.0.conv.", f"encoder.down.{i}.downsample.conv.", {}))
        names.append((f"decoder.up_blocks.{i}.upsamplers.0.conv.", f"decoder.up.{n - 1 - i}.upsample.conv.", {}))
        for j in range(config.layers_per_block + 1):
            names.append((f"encoder.down_blocks.{i}.resnets.{j}.", f"encoder.down.{i}.block.{j}.", VAE_RESNET_NAMES))
            # the original decoder counts its levels from the bottom: up.{n-1-i} is our up_blocks.i
            names.append((f"decoder.up_blocks.{i}.resnets.{j}.", f"decoder.up.{n - 1 - i}.block.{j}.", VAE_RESNET_NAMES))
    return names


def _original_name(key, module_names):
    """Our parameter name -> the original one, by the longest matching module prefix."""
    ours, original, inner = max((m for m in module_names if key.startswith(m[0])), key=lambda m: len(m[0]))
    rest = key[len(ours):]
    for a, b in inner.items():
        if rest.startswith(a + "."):
            rest = b + rest[len(a):]
            break
    return original + rest


def openclip_name(key):
    """Our text-encoder name -> OpenCLIP's (SD2's and SDXL's second encoder). q/k/v map to one
    fused in_proj tensor, split or joined by the callers; OpenCLIP's text_projection is the
    transpose of our Linear's weight (it computes x @ P)."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "text_projection.weight": "text_projection"}
    if key in fixed:
        return fixed[key]
    key = key.replace("final_layer_norm.", "ln_final.").replace("encoder.layers.", "transformer.resblocks.")
    for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                 ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
        key = key.replace(a, b)
    return re.sub(r"self_attn\.[qkv]_proj\.(weight|bias)", r"attn.in_proj_\1", key)


def original_key_map(configs, text_prefix):
    """{our component: {our key: original key}} for a whole pipeline. text_prefix: where the file
    keeps the (first) text encoder, one of TEXT_PREFIXES; SDXL's second is under SDXL_TEXT_PREFIX_2."""
    key_map = {}
    for name, prefix, module_names in (("unet", UNET_PREFIX, unet_module_names(configs["unet"])),
                                       ("vae", VAE_PREFIX, vae_module_names(configs["vae"]))):
        with torch.device("meta"):
            keys = COMPONENTS[name].model(configs[name]).state_dict().keys()
        key_map[name] = {k: prefix + _original_name(k, module_names) for k in keys}
    text_prefixes = {"text_encoder": text_prefix}
    if "text_encoder_2" in configs:
        text_prefixes["text_encoder_2"] = SDXL_TEXT_PREFIX_2
    for name, prefix in text_prefixes.items():
        with torch.device("meta"):
            keys = COMPONENTS[name].model(configs[name]).state_dict().keys()
        rename = (lambda k: k) if prefix.endswith(".transformer.") else openclip_name
        key_map[name] = {k: prefix + rename(k) for k in keys}
    return key_map


def _qkv_index(key):
    return "qkv".index(key.split("self_attn.")[1][0])


def _from_original(checkpoint, our_key, original_key):
    """One tensor of ours from the original checkpoint, undoing the layout differences."""
    tensor = checkpoint[original_key]
    if ".in_proj_" in original_key:  # OpenCLIP fuses q, k, v: [3d, d] -> three [d, d]
        return tensor.chunk(3, dim=0)[_qkv_index(our_key)]
    if ".mid.attn_1." in original_key and tensor.ndim == 4:  # the VAE attention's 1x1 convs
        return tensor[:, :, 0, 0]
    if original_key.endswith(".text_projection"):  # OpenCLIP's x @ P: P [width, proj] -> weight [proj, width]
        return tensor.T.contiguous()
    return tensor


def detect_family(checkpoint):
    """'sd1', 'sd2' or 'sdxl' from the keys and shapes of an original checkpoint; else a clear error."""
    keys = checkpoint.keys()
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise LoadError(f"This file holds no Stable Diffusion UNet (no '{UNET_PREFIX}*' keys). "
                        f"First keys: {compact(keys)}. {_hint(keys)}")
    if any(k.startswith(("conditioner.", UNET_PREFIX + "label_emb")) for k in keys):
        return _sdxl_family(checkpoint)
    conv_in = checkpoint.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise LoadError(f"The UNet takes {conv_in.shape[1]} input channels: this is an inpainting or "
                        "depth model, and only text-to-image SD 1.x/2.x and SDXL base models are supported.")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        return "sd1"
    raise LoadError("Cannot tell the model family: no text encoder under "
                    f"'{SD1_TEXT_PREFIX}' or '{SD2_TEXT_PREFIX}'.")


def _sdxl_family(checkpoint):
    """'sdxl' for an SDXL base file; a LoadError naming the SDXL model that is not supported."""
    def holds(prefix):
        return any(k.startswith(prefix) for k in checkpoint)
    conv_in = checkpoint.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise LoadError(f"This is an SDXL inpainting model (its UNet takes {conv_in.shape[1]} input channels: "
                        "the latents, a mask and the masked image); only text-to-image models are supported: "
                        "use SDXL base.")
    if holds("conditioner.embedders.0.model."):
        raise LoadError("This is the SDXL refiner (its one text encoder, OpenCLIP ViT-bigG, is embedder 0, and "
                        "it is conditioned on an aesthetic score): a second-stage image-to-image model, which is "
                        "not supported; use SDXL base.")
    if not (holds(SDXL_TEXT_PREFIX) and holds(SDXL_TEXT_PREFIX_2)):
        raise LoadError(f"This looks like an SDXL checkpoint, but its text encoders are not under "
                        f"'{SDXL_TEXT_PREFIX}' and '{SDXL_TEXT_PREFIX_2}', as in SDXL base's file; only "
                        "SDXL base's layout is supported.")
    return "sdxl"


def family_hub_repo(family, prediction_type):
    """The Hub repo whose configs describe a single file of `family` (only configs are fetched)."""
    if family == "sdxl":
        return SDXL_MODEL
    if family == "sd1":
        return DEFAULT_MODEL
    return SD2_BASE_MODEL if prediction_type == "epsilon" else SD2_MODEL


def sd2_prediction_type(file_name):
    """(prediction_type, why) for an SD 2.x single file, from its name: Stability's files say
    "768-v" for the velocity model and "base" (512 px) for the noise one, as do most fine-tunes
    named after them. Without either, the 768 px v-prediction model, the more common download
    (diffusers' from_single_file assumes the same). A numerical probe (denoise a test image at a
    known t and see whether the output fits the noise or v better) would need the VAE and a text
    prompt the model was trained on; the name is the evidence used."""
    name = file_name.lower()
    if re.search(r"768-?v|(^|[-_.])v[-_]?pred|vpred|(^|[-_.])v($|[-_.])", name):
        return "v_prediction", "the file name marks the v-prediction (768-v) model"
    if re.search(r"base|512", name):
        return "epsilon", "the file name marks the 512 px base model, which predicts noise"
    return "v_prediction", "the name does not say; assumed the 768 px v-prediction SD 2.x, as diffusers does"


def load_single_file(path, *, config=None, prediction_type=None, dtype=torch.float32, device="cpu"):
    """An original-format checkpoint. The architecture comes from `config` (a diffusers folder);
    by default from the configs of the matching Hub repo (small files, fetched once and cached).
    SD2 files do not say whether they predict noise or velocity: without prediction_type, the
    file name decides (sd2_prediction_type), and what was chosen is printed."""
    path = Path(path)
    checkpoint = read_state_dict(path)
    family = detect_family(checkpoint)
    if family == "sd2" and prediction_type is None:
        prediction_type, why = sd2_prediction_type(path.name)
        print(f"note: {path.name} is an SD 2.x file, which does not record what its UNet predicts; using "
              f"{prediction_type} ({why}). Pass --prediction_type to choose.", file=sys.stderr)
    # Some SD1 files come from transformers < 4.20, before CLIPTextModel had a text_model level.
    checkpoint = {re.sub(rf"^{re.escape(SD1_TEXT_PREFIX)}(?!text_model\.)", SD1_TEXT_PREFIX + "text_model.", k): v
                  for k, v in checkpoint.items()}
    if config is None:
        config = download(family_hub_repo(family, prediction_type), weights=False)
    raw, configs = read_configs(config)
    if (family == "sdxl") != ("text_encoder_2" in configs):
        raise LoadError(f"{path} is an {'SDXL' if family == 'sdxl' else 'SD 1.x/2.x'} file, but the config "
                        f"{config} is not: pass config= a folder of the same model family.")
    modules = modules_from_original(path, checkpoint, configs, TEXT_PREFIXES[family], dtype=dtype, device=device)
    pipeline = Pipeline(**read_tokenizers(config, configs), scheduler=DDPMScheduler(configs["scheduler"]),
                        source=str(path), raw_configs=raw,
                        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt(config, configs), **modules)
    return with_prediction_type(pipeline, prediction_type)


def modules_from_original(path, checkpoint, configs, text_prefix, *, dtype, device):
    """{component: model} built from an original checkpoint's tensors (original_key_map names
    them); LoadError for tensors missing, and for tensors the config has no place for."""
    key_map = original_key_map(configs, text_prefix)
    # Files with EMA weights ("model_ema.diffusion_modelinput_blocks00weight": 'model.' dropped and
    # no dots) keep them beside the trained ones; the EMA copy is the better model for sampling.
    use_ema = any(k.startswith("model_ema.diffusion_model") for k in checkpoint)
    if use_ema:
        key_map["unet"] = {k: "model_ema." + v[len("model."):].replace(".", "") for k, v in key_map["unet"].items()}
    used = set()
    modules = {}
    for name, names in key_map.items():
        absent = [v for v in names.values() if v not in checkpoint]
        if absent:
            raise LoadError(f"{path}: the {name} weights are incomplete for this config; missing "
                            f"({len(absent)}): {compact(absent)}. {_hint(absent)}")
        state = {k: _from_original(checkpoint, k, v) for k, v in names.items()}
        used.update(names.values())
        modules[name] = build_module(COMPONENTS[name].model, configs[name], state, what=name, dtype=dtype, device=device)
    # Keys left over inside the models' prefixes mean a config that does not match (e.g. a
    # larger model). Outside them (schedules, the EMA copy's counters), SD2's OpenCLIP (its unused
    # last layer and projection) and OpenCLIP's temperature logit_scale are not part of the pipeline.
    prefixes = (VAE_PREFIX, SD1_TEXT_PREFIX, SDXL_TEXT_PREFIX, SDXL_TEXT_PREFIX_2) + (() if use_ema else (UNET_PREFIX,))
    leftover = [k for k in checkpoint if k.startswith(prefixes) and k not in used
                and not k.endswith(("position_ids", ".logit_scale"))]
    if leftover:
        raise LoadError(f"{path}: weights the config has no place for ({len(leftover)}): "
                        f"{compact(leftover)}. {_hint(leftover)}")
    return modules


# ----------------------------------------------------------------------------------------------
# The one entry point


def load_pipeline(source=DEFAULT_MODEL, *, dtype=torch.float32, device="cpu", config=None,
                  variant=None, revision=None, prediction_type=None):
    """A Pipeline from a Hub repo id, a diffusers folder, or a single .safetensors/.ckpt file;
    "toy" is the tiny model shipped in toy/model (offline, CPU-sized)."""
    if str(source) == "toy":
        source = TOY_MODEL
    path = Path(source).expanduser()
    if path.is_dir():
        return with_prediction_type(load_folder(path, dtype=dtype, device=device, variant=variant), prediction_type)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            raise LoadError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt.")
        return load_single_file(path, config=config, prediction_type=prediction_type, dtype=dtype, device=device)
    if path.suffix in (".safetensors", ".ckpt") or str(source).startswith((".", "/", "~")) \
            or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise LoadError(f"{source!r} does not exist. Pass a Hub repo id (like {DEFAULT_MODEL!r}), "
                        "a diffusers folder, or a .safetensors/.ckpt file.")
    folder = download(source, variant=variant, revision=revision)
    return with_prediction_type(load_folder(folder, dtype=dtype, device=device, variant=variant, source=source),
                                prediction_type)


def with_prediction_type(pipeline, prediction_type):
    """The pipeline with its scheduler's prediction_type set (a folder's config says what its
    model predicts; this is for a folder that says it wrongly)."""
    if prediction_type is None:
        return pipeline
    if prediction_type not in ("epsilon", "v_prediction"):
        raise LoadError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}.")
    pipeline.scheduler = type(pipeline.scheduler)(dataclasses.replace(pipeline.scheduler.config,
                                                                      prediction_type=prediction_type))
    pipeline.raw_configs["scheduler"] = {**pipeline.raw_configs.get("scheduler", {}), "prediction_type": prediction_type}
    return pipeline


# ----------------------------------------------------------------------------------------------
# Saving


def _config_dict(name, pipeline):
    """The component's config as the source wrote it, updated with every field we model."""
    module = pipeline.scheduler if name == "scheduler" else getattr(pipeline, name)
    config = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(module.config).items()}
    if name == "scheduler" and config["timestep_spacing"] is None:
        del config["timestep_spacing"]  # unnamed means each sampler's own default grid: keep it unnamed
    class_names = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDIMScheduler"}
    base = {"_class_name": class_names[name]} if name in class_names else {
        "architectures": [type(module).__name__], "model_type": "clip_text_model"}
    return {**base, **pipeline.raw_configs.get(name, {}), **config}


def _state_dict(module, fp16):
    """The module's tensors on the CPU, floating-point ones in fp16 if `fp16`, dense for saving."""
    dtype = torch.float16 if fp16 else None
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else None).contiguous()
            for k, v in module.state_dict().items()}


PIPELINE_ENTRIES = ("model_index.json", "scheduler", "tokenizer", *(c for c in COMPONENTS if c not in SDXL_ONLY))


SAVE_JOURNAL = ".save-in-progress.json"  # present only while a save swaps its entries in


def save_pipeline(pipeline, folder, *, fp16=False, extra_files=None):
    """Write a diffusers-layout folder that this loader and diffusers' StableDiffusionPipeline
    (StableDiffusionXLPipeline for SDXL) both open. extra_files ({name: bytes}, e.g. train.py's
    dreambooth.json and loss log) are part of the model and swapped in with it. Other files in the
    folder (checkpoints, class images) are left alone. fp16: floating-point weights written in
    float16 (half the size); by default they are written in the dtype they have.

    The save is one unit. Everything is written into a staging folder beside the entries; then a
    journal names the staging folder, and each old entry moves aside and the new one in. Before
    the journal the old model is untouched; after it the new one is whole, and an interruption
    in between leaves the journal, which the loaders report and finish_interrupted_save
    completes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        write_pipeline_files(pipeline, staging, fp16)
        for name, data in (extra_files or {}).items():
            (staging / name).write_bytes(data)
        entries = [*PIPELINE_ENTRIES, *(SDXL_ONLY if pipeline.text_encoder_2 is not None else ()), *(extra_files or {})]
        journal = folder / f".{SAVE_JOURNAL}.tmp"
        journal.write_text(json.dumps({"staging": staging.name, "entries": entries}))
        journal.rename(folder / SAVE_JOURNAL)
        swap_in(folder, staging.name, entries)
    finally:
        if not (folder / SAVE_JOURNAL).exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def model_index(pipeline):
    """model_index.json: the diffusers pipeline class and the class of each component."""
    index = {"_diffusers_version": "0.30.0", "feature_extractor": [None, None], "image_encoder": [None, None],
             "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"]}
    if pipeline.text_encoder_2 is None:
        return {"_class_name": "StableDiffusionPipeline", **index, "safety_checker": [None, None],
                "requires_safety_checker": False}
    return {"_class_name": "StableDiffusionXLPipeline", **index,
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "force_zeros_for_empty_prompt": pipeline.force_zeros_for_empty_prompt}


def write_pipeline_files(pipeline, folder, fp16):
    """model_index.json, scheduler/, tokenizer/ (and tokenizer_2/) and each component's config and weights."""
    (folder / "model_index.json").write_text(json.dumps(model_index(pipeline), indent=2))
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(_config_dict("scheduler", pipeline), indent=2))
    pipeline.tokenizer.save(folder / "tokenizer")
    if pipeline.tokenizer_2 is not None:
        pipeline.tokenizer_2.save(folder / "tokenizer_2")
    for name, component in COMPONENTS.items():
        if getattr(pipeline, name) is None:  # text_encoder_2 of SD 1.x/2.x
            continue
        (folder / name).mkdir()
        (folder / name / component.config_file).write_text(json.dumps(_config_dict(name, pipeline), indent=2))
        save_file(_state_dict(getattr(pipeline, name), fp16),
                  folder / name / f"{component.weights_stem}.safetensors", metadata={"format": "pt"})


def swap_in(folder, staging_name, entries):
    """Move each entry of the staging folder into `folder`, the old one aside first, then drop
    the journal and the staging folder (with the old entries). Entries already moved are
    skipped, so an interrupted swap is finished by running this again."""
    staging = folder / staging_name
    replaced = staging / ".replaced"
    replaced.mkdir(exist_ok=True)
    for entry in entries:
        new, target = staging / entry, folder / entry
        if not new.exists():
            continue  # swapped in before the interruption
        if target.exists():
            target.rename(replaced / entry)
        new.rename(target)
    (folder / SAVE_JOURNAL).unlink()
    shutil.rmtree(staging, ignore_errors=True)


def finish_interrupted_save(folder):
    """Complete a save that was interrupted while swapping in (see save_pipeline); True if there
    was one. `python load_weights.py --finish_save FOLDER` runs this."""
    folder = Path(folder)
    try:
        journal = json.loads((folder / SAVE_JOURNAL).read_text())
    except FileNotFoundError:
        return False
    except ValueError:
        raise LoadError(f"{folder / SAVE_JOURNAL} is unreadable: the save it records cannot be completed; "
                        "train again into this folder with --overwrite") from None
    if not (folder / journal["staging"]).is_dir():  # it had finished but for the journal
        (folder / SAVE_JOURNAL).unlink()
        return True
    swap_in(folder, journal["staging"], journal["entries"])
    return True


def check_save_complete(folder):
    """A LoadError for a folder whose last save was interrupted while swapping in."""
    if (Path(folder) / SAVE_JOURNAL).exists():
        raise LoadError(f"{folder} holds an interrupted save: the run that wrote it was stopped while swapping "
                        f"in the new model (which is complete). Finish it with: python load_weights.py "
                        f"--finish_save {folder}  (train.py does it too when it resumes there)")


def export_single_file(pipeline, path, *, fp16=True):
    """Write the pipeline as one original-format .safetensors (CompVis/Stability names), the
    format single-file tools open. SD2 text encoders are written in OpenCLIP's layout with the
    23 layers SD uses (the original files also hold OpenCLIP's unused 24th layer); SDXL's in
    conditioner.embedders.0 (transformers' names) and .1 (OpenCLIP's). fp16 (the default, the
    usual form of shared files): floating-point weights in float16; False keeps the dtype they have."""
    path = Path(path)
    if pipeline.text_encoder_2 is not None:
        family = "sdxl"
    else:
        family = "sd1" if pipeline.text_encoder.config.hidden_act == "quick_gelu" else "sd2"
    configs = {name: getattr(pipeline, name).config for name in COMPONENTS if getattr(pipeline, name) is not None}
    key_map = original_key_map(configs, TEXT_PREFIXES[family])
    out = {}
    for name, names in key_map.items():
        module = getattr(pipeline, name)
        state = _state_dict(module, fp16)
        for ours, original in names.items():
            tensor = state[ours]
            if ".in_proj_" in original:  # re-fuse q, k, v in order
                if _qkv_index(ours) != 0:
                    continue
                base = ours.replace(".q_proj.", ".{}_proj.")
                tensor = torch.cat([state[base.format(c)] for c in "qkv"], dim=0)
            elif ".mid.attn_1." in original and tensor.ndim == 2 and original.endswith(".weight"):
                tensor = tensor[:, :, None, None]  # linear -> 1x1 conv, as the original stores it
            elif original.endswith(".text_projection"):
                tensor = tensor.T  # our Linear's weight [proj, width] -> OpenCLIP's P [width, proj]
            out[original] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(out, tmp, metadata={"format": "pt"}))
    return path


def write_atomically(path, write):
    """write(tmp) fills .NAME.tmp beside `path`; one rename then replaces `path`, so a kill or a
    full disk never leaves a partial file under the final name (a failed write's .tmp is removed;
    train.py's clean_leftovers removes one a kill leaves)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_disk_full(error):
    """Whether a failed write failed for want of space (torch.save reports it as "unexpected pos")."""
    return getattr(error, "errno", None) == errno.ENOSPC or "unexpected pos" in str(error)


def disk_full_message(path, advice):
    """The one message for a full disk: what failed, how much room is left there, what to do."""
    where = Path(path)
    while not where.exists():
        where = where.parent
    free = shutil.disk_usage(where).free
    return f"the disk is full: writing {path} failed with {free / 2**20:.1f} MiB left on that disk. {advice}"


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Repair a model folder whose save was interrupted.")
    parser.add_argument("--finish_save", metavar="FOLDER", required=True,
                        help="complete the interrupted save in FOLDER (see save_pipeline)")
    cli = parser.parse_args()
    try:
        done = finish_interrupted_save(cli.finish_save)
    except LoadError as e:
        parser.exit(2, f"error: {e}\n")
    print(f"completed the interrupted save in {cli.finish_save}" if done else f"{cli.finish_save}: no interrupted save")
    sys.exit(0)
