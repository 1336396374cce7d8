"""Load public Stable Diffusion weights into the hand-written models, and save them back.

Three ways in, one way to build a model:
  - a Hub repo id ("stable-diffusion-v1-5/stable-diffusion-v1-5"), downloaded with
    huggingface_hub.snapshot_download (only the files we need),
  - a local folder in the diffusers layout (what the Hub holds, and what train.py writes),
  - a single original-format checkpoint (.safetensors or .ckpt, the CompVis/Stability layout
    that model sites share), whose names we map to diffusers' with short loops.
Every model is built on the meta device (no memory), then takes the checkpoint's tensors with
load_state_dict(strict=True, assign=True): safetensors files are memory-mapped, so a tensor that
already has the requested dtype is used in place and the weights are never held twice.

Two ways out: save_pipeline() writes a diffusers folder, export_single_file() an original-format
.safetensors. Both write to a temporary name and rename when complete.

Checkpoints are data, not code: pickles are read only with torch.load(weights_only=True).
"""

import dataclasses
import json
import os
import pickle
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import snapshot_download
from huggingface_hub import errors as hub_errors
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from clip_text import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
from schedulers import DDPMScheduler, SchedulerConfig
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SD2_MODEL = "stabilityai/stable-diffusion-2-1"  # 768 px, v-prediction
TOY_MODEL = Path(__file__).resolve().parent / "toy" / "model"  # `--model toy`: the project's tiny SD (toy/)

# component -> (model class, config class, config file, weights file stem) in a diffusers folder
COMPONENTS = {
    "text_encoder": (CLIPTextModel, CLIPTextConfig, "config.json", "model"),
    "unet": (UNet, UNetConfig, "config.json", "diffusion_pytorch_model"),
    "vae": (VAE, VAEConfig, "config.json", "diffusion_pytorch_model"),
}
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


# ----------------------------------------------------------------------------------------------
# Reading tensors


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
    try:
        try:  # mmap needs the zip format of torch >= 1.6; older pickles load without it
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise LoadError(
            f"{path} holds Python objects besides tensors, and loading them could run code "
            f"from the file, so it is refused ({str(e).splitlines()[0]}). Use a .safetensors "
            "version of this model, or convert this file with a tool you trust."
        ) from e
    except (RuntimeError, EOFError, OSError) as e:
        raise LoadError(f"{path} could not be read as a PyTorch checkpoint ({e}).") from e
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
    if any(k.startswith(("conditioner.", "add_embedding.")) for k in keys):
        return "This looks like an SDXL checkpoint; only SD 1.x and 2.x are supported."
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
    """The configs of a diffusers folder: raw dicts by component, and our dataclasses."""
    folder = Path(folder)
    raw = {name: _read_json(folder / name / spec[2]) for name, spec in COMPONENTS.items()}
    raw["scheduler"] = _read_json(folder / "scheduler" / "scheduler_config.json")
    configs = {name: spec[1].from_dict(raw[name]) for name, spec in COMPONENTS.items()}
    configs["scheduler"] = SchedulerConfig.from_dict(raw["scheduler"])
    for f in TOKENIZER_FILES[:2]:
        if not (folder / "tokenizer" / f).is_file():
            raise LoadError(f"{folder / 'tokenizer' / f} is missing: the tokenizer needs "
                            f"{' and '.join(TOKENIZER_FILES[:2])}.")
    return raw, configs


def _text_encoder_keys(state):
    """transformers >= 5 saves CLIPTextModel without the `text_model.` prefix the Hub files
    have, and older files carry a position_ids buffer (sometimes as float): accept both."""
    return {(k if k.startswith("text_model.") else "text_model." + k): v
            for k, v in state.items() if not k.endswith("position_ids")}


def load_folder(folder, *, dtype=torch.float32, device="cpu", variant=None, source=None):
    folder = Path(folder)
    if not (folder / "unet").is_dir():
        raise LoadError(f"{folder} is not a diffusers-layout folder (no unet/ inside). Expected "
                        "model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/.")
    raw, configs = read_configs(folder)
    modules = {}
    for name, (_, _, _, stem) in COMPONENTS.items():
        state = read_state_dict(_weights_file(folder / name, stem, variant))
        if name == "text_encoder":
            state = _text_encoder_keys(state)
        modules[name] = build_module(COMPONENTS[name][0], configs[name], state, what=name, dtype=dtype, device=device)
    return Pipeline(tokenizer=CLIPTokenizer.from_folder(folder / "tokenizer"),
                    scheduler=DDPMScheduler(configs["scheduler"]),
                    source=str(source or folder), raw_configs=raw, **modules)


def _hub_patterns(variant, ext):
    suffix = f".{variant}" if variant else ""
    configs = ["model_index.json", "scheduler/scheduler_config.json",
               *(f"tokenizer/{f}" for f in TOKENIZER_FILES),
               *(f"{name}/{spec[2]}" for name, spec in COMPONENTS.items())]
    weights = [f"{name}/{spec[3]}{suffix}{ext}" for name, spec in COMPONENTS.items()]
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
    if weights:  # older repos hold only .bin files for some components
        lacking = [p.split("/")[0] for p in safetensors_files if not (folder / p).is_file()]
        if lacking:
            _, bins = _hub_patterns(variant, ".bin")
            folder = hub_snapshot(repo_id, configs + [b for b in bins if b.split("/")[0] in lacking],
                                  revision=revision)
    return folder


# ----------------------------------------------------------------------------------------------
# Original single-file checkpoints (CompVis / Stability layout)
#
# The three models sit under their own prefixes. Inside them the UNet and VAE use LDM's module
# names; the tables below are built by loops over the config (see ../shared/REFERENCE.md).

UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."
SD1_TEXT_PREFIX, SD2_TEXT_PREFIX = "cond_stage_model.transformer.", "cond_stage_model.model."
RESNET_NAMES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET_NAMES = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def unet_module_names(config):
    """(our module prefix, original module prefix, inner-name table) for every UNet module."""
    L = config.layers_per_block
    names = [("time_embedding.linear_1.", "time_embed.0.", {}),
             ("time_embedding.linear_2.", "time_embed.2.", {}),
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
    """Our SD2 text-encoder name -> OpenCLIP's (under cond_stage_model.model.). q/k/v map to one
    fused in_proj tensor, split or joined by the callers."""
    key = key.removeprefix("text_model.")
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding"}
    if key in fixed:
        return fixed[key]
    key = key.replace("final_layer_norm.", "ln_final.").replace("encoder.layers.", "transformer.resblocks.")
    for a, b in (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                 ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj")):
        key = key.replace(a, b)
    return re.sub(r"self_attn\.[qkv]_proj\.(weight|bias)", r"attn.in_proj_\1", key)


def original_key_map(configs, text_prefix):
    """{our component: {our key: original key}} for a whole pipeline."""
    key_map = {}
    for name, prefix, module_names in (("unet", UNET_PREFIX, unet_module_names(configs["unet"])),
                                       ("vae", VAE_PREFIX, vae_module_names(configs["vae"]))):
        with torch.device("meta"):
            keys = COMPONENTS[name][0](configs[name]).state_dict().keys()
        key_map[name] = {k: prefix + _original_name(k, module_names) for k in keys}
    with torch.device("meta"):
        keys = CLIPTextModel(configs["text_encoder"]).state_dict().keys()
    if text_prefix == SD1_TEXT_PREFIX:
        key_map["text_encoder"] = {k: text_prefix + k for k in keys}
    else:
        key_map["text_encoder"] = {k: text_prefix + openclip_name(k) for k in keys}
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
    return tensor


def detect_family(checkpoint):
    """'sd1' or 'sd2' from the keys and shapes of an original checkpoint; else a clear error."""
    keys = checkpoint.keys()
    if not any(k.startswith(UNET_PREFIX) for k in keys):
        raise LoadError(f"This file holds no Stable Diffusion UNet (no '{UNET_PREFIX}*' keys). "
                        f"First keys: {compact(keys)}. {_hint(keys)}")
    if any(k.startswith(("conditioner.", "model.diffusion_model.label_emb")) for k in keys):
        raise LoadError("This is an SDXL checkpoint; only SD 1.x and 2.x are supported.")
    conv_in = checkpoint.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if conv_in is not None and conv_in.shape[1] != 4:
        raise LoadError(f"The UNet takes {conv_in.shape[1]} input channels: this is an inpainting or "
                        "depth model, and only text-to-image SD 1.x/2.x models are supported.")
    if any(k.startswith(SD2_TEXT_PREFIX) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_TEXT_PREFIX) for k in keys):
        return "sd1"
    raise LoadError("Cannot tell the model family: no text encoder under "
                    f"'{SD1_TEXT_PREFIX}' or '{SD2_TEXT_PREFIX}'.")


def load_single_file(path, *, config=None, prediction_type=None, dtype=torch.float32, device="cpu"):
    """An original-format checkpoint. The architecture comes from `config` (a diffusers folder);
    by default from the configs of the matching Hub repo (small files, fetched once and cached).
    SD2 files do not say whether they predict noise or velocity: we assume the 768-px
    v-prediction SD 2.1, as diffusers does; pass prediction_type="epsilon" for 2.x-base files."""
    path = Path(path)
    checkpoint = read_state_dict(path)
    family = detect_family(checkpoint)
    # Some SD1 files come from transformers < 4.20, before CLIPTextModel had a text_model level.
    checkpoint = {re.sub(rf"^{re.escape(SD1_TEXT_PREFIX)}(?!text_model\.)", SD1_TEXT_PREFIX + "text_model.", k): v
                  for k, v in checkpoint.items()}
    if config is None:
        config = download(DEFAULT_MODEL if family == "sd1" else SD2_MODEL, weights=False)
    raw, configs = read_configs(config)
    if prediction_type is not None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise LoadError(f"prediction_type must be 'epsilon' or 'v_prediction', not {prediction_type!r}.")
        raw["scheduler"] = {**raw["scheduler"], "prediction_type": prediction_type}
        configs["scheduler"] = dataclasses.replace(configs["scheduler"], prediction_type=prediction_type)

    key_map = original_key_map(configs, SD1_TEXT_PREFIX if family == "sd1" else SD2_TEXT_PREFIX)
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
        modules[name] = build_module(COMPONENTS[name][0], configs[name], state, what=name, dtype=dtype, device=device)
    # Keys left over inside the models' prefixes mean a config that does not match (e.g. a
    # larger model). Outside them (schedules, the EMA copy's counters) and OpenCLIP's unused
    # last layer and projections are not part of the pipeline.
    prefixes = (VAE_PREFIX, SD1_TEXT_PREFIX) + (() if use_ema else (UNET_PREFIX,))
    leftover = [k for k in checkpoint
                if k.startswith(prefixes) and k not in used and not k.endswith("position_ids")]
    if leftover:
        raise LoadError(f"{path}: weights the config has no place for ({len(leftover)}): "
                        f"{compact(leftover)}. {_hint(leftover)}")
    return Pipeline(tokenizer=CLIPTokenizer.from_folder(Path(config) / "tokenizer"),
                    scheduler=DDPMScheduler(configs["scheduler"]), source=str(path),
                    raw_configs=raw, **modules)


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
        return load_folder(path, dtype=dtype, device=device, variant=variant)
    if path.is_file():
        if path.suffix not in (".safetensors", ".ckpt", ".pt", ".pth", ".bin"):
            raise LoadError(f"{path}: unknown checkpoint type {path.suffix!r}; expected .safetensors or .ckpt.")
        return load_single_file(path, config=config, prediction_type=prediction_type, dtype=dtype, device=device)
    if path.suffix in (".safetensors", ".ckpt") or str(source).startswith((".", "/", "~")) \
            or not re.fullmatch(r"[\w.-]+/[\w.-]+", str(source)):
        raise LoadError(f"{source!r} does not exist. Pass a Hub repo id (like {DEFAULT_MODEL!r}), "
                        "a diffusers folder, or a .safetensors/.ckpt file.")
    folder = download(source, variant=variant, revision=revision)
    return load_folder(folder, dtype=dtype, device=device, variant=variant, source=source)


# ----------------------------------------------------------------------------------------------
# Saving


def _config_dict(name, pipeline):
    """The component's config as the source wrote it, updated with every field we model."""
    module = pipeline.scheduler if name == "scheduler" else getattr(pipeline, name)
    config = {k: list(v) if isinstance(v, tuple) else v
              for k, v in dataclasses.asdict(module.config).items()}
    class_names = {"unet": "UNet2DConditionModel", "vae": "AutoencoderKL", "scheduler": "DDIMScheduler"}
    base = {"_class_name": class_names[name]} if name in class_names else {
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model"}
    return {**base, **pipeline.raw_configs.get(name, {}), **config}


def _state_dict(module, half):
    dtype = torch.float16 if half else None
    return {k: v.detach().to("cpu", dtype if v.is_floating_point() else None).contiguous()
            for k, v in module.state_dict().items()}


PIPELINE_ENTRIES = ("model_index.json", "scheduler", "tokenizer", *COMPONENTS)


def save_pipeline(pipeline, folder, *, half=False):
    """Write a diffusers-layout folder that this loader and diffusers' StableDiffusionPipeline
    both open. Everything is written beside the target first; then each entry (model_index.json,
    scheduler/, tokenizer/, text_encoder/, unet/, vae/) replaces its old version, which is removed
    only once the new one is in place. Other files in the folder (a training run's logs,
    checkpoints, dreambooth.json) are left alone."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".saving-", dir=folder))
    try:
        model_index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                       "feature_extractor": [None, None], "safety_checker": [None, None],
                       "requires_safety_checker": False, "image_encoder": [None, None],
                       "scheduler": ["diffusers", "DDIMScheduler"],
                       "text_encoder": ["transformers", "CLIPTextModel"],
                       "tokenizer": ["transformers", "CLIPTokenizer"],
                       "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
        (tmp / "model_index.json").write_text(json.dumps(model_index, indent=2))
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(_config_dict("scheduler", pipeline), indent=2))
        pipeline.tokenizer.save(tmp / "tokenizer")
        for name, (_, _, config_file, stem) in COMPONENTS.items():
            (tmp / name).mkdir()
            (tmp / name / config_file).write_text(json.dumps(_config_dict(name, pipeline), indent=2))
            save_file(_state_dict(getattr(pipeline, name), half), tmp / name / f"{stem}.safetensors",
                      metadata={"format": "pt"})
        for entry in PIPELINE_ENTRIES:
            target, old = folder / entry, tmp / f"{entry}.old"
            if target.exists():
                target.rename(old)
            (tmp / entry).rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def export_single_file(pipeline, path, *, half=True):
    """Write the pipeline as one original-format .safetensors (CompVis/Stability names), the
    format single-file tools open. SD2 text encoders are written in OpenCLIP's layout with the
    23 layers SD uses (the original files also hold OpenCLIP's unused 24th layer)."""
    path = Path(path)
    sd2 = pipeline.text_encoder.config.hidden_act != "quick_gelu"
    configs = {"unet": pipeline.unet.config, "vae": pipeline.vae.config,
               "text_encoder": pipeline.text_encoder.config}
    key_map = original_key_map(configs, SD2_TEXT_PREFIX if sd2 else SD1_TEXT_PREFIX)
    out = {}
    for name, names in key_map.items():
        module = getattr(pipeline, name)
        state = _state_dict(module, half)
        for ours, original in names.items():
            tensor = state[ours]
            if ".in_proj_" in original:  # re-fuse q, k, v in order
                if _qkv_index(ours) != 0:
                    continue
                base = ours.replace(".q_proj.", ".{}_proj.")
                tensor = torch.cat([state[base.format(c)] for c in "qkv"], dim=0)
            elif ".mid.attn_1." in original and tensor.ndim == 2 and original.endswith(".weight"):
                tensor = tensor[:, :, None, None]  # linear -> 1x1 conv, as the original stores it
            out[original] = tensor.contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(out, tmp, metadata={"format": "pt"})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
