"""LoRA: low-rank adapters on the UNet and the text encoder (DreamBooth-LoRA), and their files.

The method (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1,
Eq. 3): a pretrained layer h = W0 x keeps W0 [out, in] frozen and learns a low-rank update,

    h = W0 x + (alpha / r) B A x,        A [r, in],  B [out, r],  r << min(in, out)

  - B starts at zero, so at step 0 the adapted model IS the pretrained model, exactly.
  - A starts random: kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), which is
    nn.Linear's own default and what peft (hence diffusers' train_dreambooth_lora.py) and the
    paper's code use. (A = 0 as well would leave both gradients zero forever.)
  - alpha / r: the paper scales the update by alpha / r with alpha fixed, so that trying another
    rank needs no new learning rate ("tuning alpha is roughly the same as tuning the learning
    rate"). alpha defaults to r (factor 1), as in diffusers.
  - Only r (in + out) numbers per layer train: rank 4 on SD 1.5's 128 attention projections is
    0.8 M parameters against the UNet's 860 M, a 3 MB file instead of a 3.4 GB model.
  - After training, B A folds into W0 (W = W0 + (alpha / r) B A): sampling costs nothing extra.

Names: A is `lora_down` and B is `lora_up` (kohya's names; peft and diffusers call them lora_A and
lora_B). A layer with an adapter keeps the base layer's own parameter names, so a UNet with
adapters has `...attn1.to_q.weight` (W0, frozen), `...attn1.to_q.lora_down.weight` [r, in] and
`...attn1.to_q.lora_up.weight` [out, r].

Files (save_lora / load_lora), both in safetensors:
  - "diffusers": diffusers' own format, `pytorch_lora_weights.safetensors`, read by
    `StableDiffusionPipeline.load_lora_weights(folder)`. Keys `unet.<module>.lora_A.weight` /
    `.lora_B.weight` and `text_encoder.<module>...` (peft names). The file holds no alpha tensors:
    diffusers reads rank and alpha from the safetensors metadata entry `lora_adapter_metadata`
    (peft LoraConfig fields: r, lora_alpha, rank_pattern, alpha_pattern), which is what we write.
    A file without it means alpha = rank. Diffusers releases older than that metadata, and tools
    other than diffusers, ignore it: for alpha != rank outside diffusers, use "kohya".
  - "kohya": the format of kohya-ss/sd-scripts, read by AUTOMATIC1111, ComfyUI and diffusers.
    Keys `lora_unet_<module path, dots as _>.lora_down.weight`, `.lora_up.weight` and `.alpha`
    (a scalar tensor), `lora_te_...` for the text encoder. Module paths are diffusers' names
    (`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`): that is what
    sd-scripts writes for SD 1.x/2.x (it trains a diffusers-named UNet), what A1111 and ComfyUI
    map to their own modules, and what diffusers' converter reads back. (Files named after the
    original SD modules, `lora_unet_input_blocks_1_1_...`, also exist; diffusers' SD 1.x loader
    does not map them by default, and neither do we.)
  SDXL: train.py adapts the UNet alone, and both formats keep the same diffusers module names
  (SDXL's UNet has them too); StableDiffusionXLPipeline.load_lora_weights reads both files.
  LoRAs that adapt SDXL's two text encoders (lora_te1_/lora_te2_, text_encoder_2.) are refused.
"""
import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from load_weights import LoadError, compact, read_state_dict, write_atomically

# Module-name suffixes that inject_lora adapts (a name matches when it is the suffix or ends with
# "." + suffix). The UNet's are diffusers' train_dreambooth_lora.py defaults: the attention
# projections of every transformer block, self- (attn1) and cross-attention (attn2).
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
UNET_FF_TARGETS = ("ff.net.0.proj", "ff.net.2")  # the GEGLU feed-forward, optional
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")

LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights(folder) reads
FORMATS = ("diffusers", "kohya")
COMPONENTS = ("unet", "text_encoder")
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
LABELS = {"unet": "UNet", "text_encoder": "text encoder"}  # in messages
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry for LoraConfig


# ----------------------------------------------------------------------------------------------
# The adapted layer


def delta_weight(down, up, factor):
    """factor * B A as one tensor shaped like the base weight: [out, in] for a Linear,
    [out, in, kh, kw] for a Conv2d (where B is a 1x1 conv). Computed in fp32."""
    # (out, r) @ (r, in * kh * kw) -> (out, in, kh, kw)
    delta = up.float().flatten(1) @ down.float().flatten(1)
    return (delta * factor).reshape(up.shape[0], *down.shape[1:])


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a low-rank update: y = W0 x + b + factor * B (A dropout(x)),
    factor = scale * alpha / rank.

    `weight` and `bias` are the wrapped layer's own Parameters (same tensors, same state-dict
    names). `scale` is the strength chosen when the adapter is used (`--lora PATH:0.7`), not part
    of the trained adapter: it is never saved. The adapter is fp32 whatever the base's dtype
    (trainable weights stay fp32); inputs are cast to it and the update back to the output's."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        self.register_parameter("weight", base.weight)
        self.register_parameter("bias", base.bias)
        self.rank, self.alpha, self.scale = rank, float(rank if alpha is None else alpha), 1.0
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_down, self.lora_up = self._adapter(base, rank)
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))  # A: U(+-1/sqrt(in))
        nn.init.zeros_(self.lora_up.weight)  # B = 0: the model starts as the pretrained one
        # The exact pretrained weight while merged (see merge); not saved with the model.
        self.register_buffer("unmerged_weight", None, persistent=False)

    def _adapter(self, base, rank):
        self.in_features, self.out_features = base.in_features, base.out_features
        device = base.weight.device
        return (nn.Linear(base.in_features, rank, bias=False, device=device),   # A [r, in]
                nn.Linear(rank, base.out_features, bias=False, device=device))  # B [out, r]

    def base_forward(self, x):
        return F.linear(x, self.weight, self.bias)

    @property
    def factor(self):
        return self.scale * self.alpha / self.rank

    @property
    def merged(self):
        return self.unmerged_weight is not None

    def forward(self, x):
        y = self.base_forward(x)
        if self.merged:  # the update is inside self.weight
            return y
        update = self.lora_up(self.lora_down(self.dropout(x.to(self.lora_down.weight.dtype))))
        return y + (update * self.factor).to(y.dtype)

    @torch.no_grad()
    def merge(self):
        """W0 -> W0 + factor B A, for sampling at the base layer's cost. A copy of W0 is kept so
        that unmerge restores it bit for bit: subtracting the update again would not, since
        (W0 + D) - D != W0 in floating point."""
        if not self.merged:
            self.unmerged_weight = self.weight.detach().clone()
            merged = self.weight.float() + delta_weight(self.lora_down.weight, self.lora_up.weight, self.factor)
            self.weight.copy_(merged.to(self.weight.dtype))

    @torch.no_grad()
    def unmerge(self):
        if self.merged:
            self.weight.copy_(self.unmerged_weight)
            self.unmerged_weight = None

    def plain(self):
        """The base layer alone, as a plain nn.Linear holding the same weight and bias."""
        with torch.device("meta"):
            layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
        layer.weight, layer.bias = self.weight, self.bias
        return layer

    def extra_repr(self):
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha:g}"


class LoRAConv2d(LoRALinear):
    """The same for a Conv2d (peft's and kohya's conv LoRA): A is a conv with the base's kernel,
    stride and padding down to r channels, B a 1x1 conv up to the output channels."""

    def _adapter(self, base, rank):
        if base.groups != 1 or base.padding_mode != "zeros":
            raise ValueError(f"LoRA supports plain convolutions only, not {base}")
        self.in_features, self.out_features = base.in_channels, base.out_channels
        self.conv_args = dict(kernel_size=base.kernel_size, stride=base.stride,
                              padding=base.padding, dilation=base.dilation)
        device = base.weight.device
        return (nn.Conv2d(base.in_channels, rank, bias=False, device=device, **self.conv_args),
                nn.Conv2d(rank, base.out_channels, 1, bias=False, device=device))

    def base_forward(self, x):
        args = self.conv_args
        return F.conv2d(x, self.weight, self.bias, args["stride"], args["padding"], args["dilation"])

    def plain(self):
        with torch.device("meta"):
            layer = nn.Conv2d(self.in_features, self.out_features, bias=self.bias is not None, **self.conv_args)
        layer.weight, layer.bias = self.weight, self.bias
        return layer


LORA_CLASSES = {nn.Linear: LoRALinear, nn.Conv2d: LoRAConv2d}


# ----------------------------------------------------------------------------------------------
# Adapting a model


def _matches(name, targets):
    return any(name == t or name.endswith("." + t) for t in targets)


def _replace(model, name, module):
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)  # "to_out.0": setattr(to_out, "0", ...)


def _add_adapter(model, name, rank, alpha=None, dropout=0.0):
    """Wrap the layer `name` of `model` (an nn.Linear or nn.Conv2d) in place; return the wrapper."""
    base = model.get_submodule(name)
    if isinstance(base, LoRALinear):
        raise ValueError(f"{name} already has a LoRA adapter (rank {base.rank})")
    if type(base) not in LORA_CLASSES:
        raise ValueError(f"{name} is a {type(base).__name__}; LoRA adapts nn.Linear and nn.Conv2d layers")
    layer = LORA_CLASSES[type(base)](base, rank, alpha, dropout)
    _replace(model, name, layer)
    return layer


def freeze_all_but_lora(model):
    """requires_grad on the adapters' A and B only; every base weight is frozen."""
    for name, p in model.named_parameters():
        p.requires_grad_(".lora_down." in name or ".lora_up." in name)


def inject_lora(model, targets, rank=4, alpha=None, dropout=0.0):
    """Add a fresh adapter (A random, B = 0) to every layer of `model` whose name matches
    `targets` (see UNET_TARGETS), freeze everything else, and return {name: adapted layer}.
    alpha None means alpha = rank; dropout acts on the adapter's input in train mode."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be at least 1, got {rank}")
    names = [name for name, _ in model.named_modules() if _matches(name, targets)]
    if not names:
        raise ValueError(f"no layer of this {type(model).__name__} matches the LoRA targets "
                         f"{tuple(targets)}; targets are module-name suffixes such as 'to_q'")
    layers = {name: _add_adapter(model, name, rank, alpha, dropout) for name in names}
    freeze_all_but_lora(model)
    return layers


def lora_layers(model):
    """{module name: LoRALinear / LoRAConv2d} of every adapted layer of `model`."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model):
    """The adapters' A and B weights: what the optimizer trains."""
    return [p for layer in lora_layers(model).values()
            for p in (layer.lora_down.weight, layer.lora_up.weight)]


def trainable_parameter_count(model):
    """Numbers the optimizer updates (after inject_lora: the adapters' r (in + out) per layer)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model):
    """Fold every adapter into its base weight (sampling at the base model's speed); reversible
    exactly with unmerge_lora, at the memory of one copy of each adapted weight."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model):
    """Restore the pretrained weights merge_lora changed, bit for bit."""
    for layer in lora_layers(model).values():
        layer.unmerge()


def remove_lora(model, merge=True):
    """Replace every adapted layer by a plain nn.Linear / nn.Conv2d holding W0 + factor B A
    (merge) or W0: a model with the state-dict keys of the original, e.g. to save in full."""
    for name, layer in lora_layers(model).items():
        layer.unmerge()
        if merge:
            layer.merge()
        _replace(model, name, layer.plain())


# ----------------------------------------------------------------------------------------------
# State dicts: one model's adapters as tensors


def lora_state_dict(model):
    """`<module>.lora_down.weight` [r, in(, kh, kw)], `<module>.lora_up.weight` [out, r(, 1, 1)]
    and `<module>.alpha` (a 0-d fp32 tensor) for every adapted layer of `model`. A and B are
    the parameters themselves (detached, not copied): save or clone them before training on."""
    state = {}
    for name, layer in lora_layers(model).items():
        state[f"{name}.lora_down.weight"] = layer.lora_down.weight.detach()
        state[f"{name}.lora_up.weight"] = layer.lora_up.weight.detach()
        state[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=torch.float32)
    return state


def _by_module(state):
    """{module: (A, B, alpha)} from a lora_state_dict-style dict."""
    modules = [k.removesuffix(".lora_down.weight") for k in state if k.endswith(".lora_down.weight")]
    return {m: (state[f"{m}.lora_down.weight"], state[f"{m}.lora_up.weight"], float(state[f"{m}.alpha"]))
            for m in modules}


@torch.no_grad()
def load_lora_state_dict(model, state):
    """Put the adapters of `state` (as lora_state_dict returns) into `model`, adding an adapter
    of the state's rank where a layer has none; freezes all but the adapters. Returns
    {name: adapted layer}. For files, use load_lora, which checks names and shapes first."""
    layers = {}
    for name, (down, up, alpha) in _by_module(state).items():
        layer = model.get_submodule(name)
        if not isinstance(layer, LoRALinear):
            layer = _add_adapter(model, name, rank=down.shape[0])
        elif layer.rank != down.shape[0]:
            raise ValueError(f"{name} has a rank-{layer.rank} adapter; the state's is rank {down.shape[0]}")
        layer.lora_down.weight.copy_(down)
        layer.lora_up.weight.copy_(up)
        layer.alpha = alpha
        layers[name] = layer
    freeze_all_but_lora(model)
    return layers


@torch.no_grad()
def fold_lora_state_dict(model, state, scale=1.0):
    """W0 += scale * (alpha / r) B A for every adapter of `state`, with no adapter layers left
    behind: the model stays a plain model (irreversible; reload it to undo)."""
    for name, (down, up, alpha) in _by_module(state).items():
        weight = model.get_submodule(name).weight
        delta = delta_weight(down.to(weight.device), up.to(weight.device), scale * alpha / down.shape[0])
        weight.copy_((weight.float() + delta).to(weight.dtype))


# ----------------------------------------------------------------------------------------------
# Files: diffusers' and kohya's formats (see the module docstring)

# The tensor-name endings of each format, and which part of an adapter each holds.
PARTS = {"diffusers": {".lora_A.weight": "down", ".lora_B.weight": "up"},
         "kohya": {".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}}


def _file_name(module, component, fmt):
    """How `fmt` names the layer `module` of `component`: `unet.down_blocks.0...to_q` or
    `lora_unet_down_blocks_0_..._to_q`."""
    if fmt == "diffusers":
        return f"{component}.{module}"
    return KOHYA_PREFIX[component] + module.replace(".", "_")


def _peft_name(module):
    """A module name as peft sees it in a diffusers pipeline's text encoder: transformers >= 5
    dropped the `text_model.` level of CLIPTextModel. As a target suffix, the shorter name
    matches both layouts."""
    return module.removeprefix("text_model.")


def _diffusers_metadata(states):
    """diffusers' `lora_adapter_metadata`: each component's peft LoraConfig fields, flattened as
    `<component>.<field>`: the most common rank and alpha, and patterns for the other layers.
    diffusers builds the LoraConfig from these fields alone, so target_modules must be there."""
    metadata = {}
    for component, state in states.items():
        adapters = {_peft_name(m): (down.shape[0], alpha) for m, (down, _, alpha) in _by_module(state).items()}
        r = Counter(rank for rank, _ in adapters.values()).most_common(1)[0][0]
        alpha = Counter(alpha for _, alpha in adapters.values()).most_common(1)[0][0]
        metadata.update({
            f"{component}.r": r, f"{component}.lora_alpha": alpha,
            f"{component}.target_modules": sorted(adapters),
            f"{component}.rank_pattern": {m: rank for m, (rank, _) in adapters.items() if rank != r},
            f"{component}.alpha_pattern": {m: a for m, (_, a) in adapters.items() if a != alpha}})
    return metadata


def to_file_tensors(states, fmt):
    """{component: lora_state_dict} -> (tensors by file key, safetensors metadata) in `fmt`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; choose one of {FORMATS}")
    tensors, names = {}, {v: k for k, v in PARTS[fmt].items()}
    for component, state in states.items():
        for module, (down, up, alpha) in _by_module(state).items():
            name = _file_name(module, component, fmt)
            tensors[name + names["down"]] = down.contiguous()
            tensors[name + names["up"]] = up.contiguous()
            if fmt == "kohya":
                tensors[name + names["alpha"]] = torch.tensor(alpha, dtype=torch.float32)
    metadata = {"format": "pt"}
    if fmt == "diffusers":
        metadata[METADATA_KEY] = json.dumps(_diffusers_metadata(states), sort_keys=True)
    return tensors, metadata


def save_lora(path, unet, text_encoder=None, fmt="diffusers"):
    """Write the adapters of `unet` (and of `text_encoder`, if given and adapted) in `fmt`. `path`
    is a .safetensors file, or a folder that gets LORA_FILE (what load_lora_weights(folder)
    reads). Written to a temporary name and renamed when complete. Returns the file's path."""
    path = Path(path)
    path = path if path.suffix == ".safetensors" else path / LORA_FILE
    models = {"unet": unet, "text_encoder": text_encoder}
    states = {c: lora_state_dict(m) for c, m in models.items() if m is not None and lora_layers(m)}
    if not states:
        raise ValueError("the models have no LoRA adapters to save: call inject_lora first")
    tensors, metadata = to_file_tensors(states, fmt)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return path


def _lora_file(path):
    """The file to read: `path` itself, or LORA_FILE in the folder `path`."""
    path = Path(path)
    if path.is_dir():
        if (path / LORA_FILE).is_file():
            return path / LORA_FILE
        if (path / "unet").is_dir():
            raise LoadError(f"{path} is a model folder, not a LoRA: pass it as the model (--model); "
                            f"a LoRA folder holds {LORA_FILE}.")
        found = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
        raise LoadError(f"{path} has no {LORA_FILE} (it holds: {found}); pass the LoRA file itself.")
    if not path.is_file():
        raise LoadError(f"LoRA file {path} does not exist.")
    return path


def _file_metadata(path):
    if path.suffix != ".safetensors":
        return {}
    with safe_open(path, framework="pt") as f:
        return f.metadata() or {}


def detect_format(keys, path):
    """"diffusers" or "kohya" from the tensor names; anything else raises with the reason."""
    keys = list(keys)
    if not any("lora" in k.lower() for k in keys):
        raise LoadError(f"{path} holds no LoRA weights ({len(keys)} tensors such as {compact(keys, 3)}, "
                        "none named lora). It looks like a full model: pass it as the model "
                        "(--model), not as a LoRA.")
    if any(k.startswith(("lora_te1_", "lora_te2_", "text_encoder_2.")) for k in keys):
        raise LoadError(f"{path} is an SDXL LoRA that adapts the two text encoders; of SDXL LoRAs, only "
                        "those of the UNet alone (as train.py writes) are supported.")
    if all(k.startswith(tuple(KOHYA_PREFIX.values())) for k in keys):
        return "kohya"
    if all(k.startswith(tuple(c + "." for c in COMPONENTS)) for k in keys):
        return "diffusers"
    raise LoadError(f"{path}: unknown LoRA layout (tensors such as {compact(keys, 3)}). Readable are "
                    "diffusers' format (unet.<module>.lora_A.weight, text_encoder....) and kohya's "
                    "(lora_unet_<module>.lora_down.weight, .alpha, lora_te_...).")


def _file_names(models, fmt):
    """{layer name as `fmt` writes it: (component, our module name)} for every layer of the
    models that LoRA can adapt."""
    names = {}
    for component, model in models.items():
        for module, layer in model.named_modules():
            adaptable = isinstance(layer, LoRALinear) or type(layer) in LORA_CLASSES
            if adaptable and not module.endswith((".lora_down", ".lora_up")):
                for alias in (module, _peft_name(module)):  # files from transformers >= 5 lack text_model.
                    names[_file_name(alias, component, fmt)] = (component, module)
    return names


def _unknown_keys_message(path, unknown, models):
    if any(k.startswith(("lora_unet_input_blocks", "lora_unet_middle_block", "lora_unet_output_blocks"))
           for k in unknown):
        hint = ("Its UNet names are the original SD modules' (input_blocks, middle_block, "
                "output_blocks), which this loader does not map; convert the file to diffusers' "
                "names (lora_unet_down_blocks_...) first.")
    elif "text_encoder" not in models and any(k.startswith(("lora_te_", "text_encoder.")) for k in unknown):
        hint = "The file adapts the text encoder too: pass the text encoder as well."
    elif any("_lora.down." in k or ".lora.down." in k for k in unknown):
        hint = ("This is diffusers' layout from before peft (2023): load it in diffusers and save "
                "it again with save_lora_weights.")
    else:
        hint = ("Was the LoRA made for another model (SDXL, another UNet layout), or with adapter "
                "types other than LoRA (LoHa, LoKr, DoRA)?")
    return (f"{path}: {len(unknown)} tensors name no layer that LoRA can adapt in this model: "
            f"{compact(unknown, 3)}. {hint}")


def _group_by_layer(tensors, fmt, models, path):
    """{(component, module): {"down" / "up" / "alpha": (file key, tensor)}}; unknown keys raise."""
    names, layers, unknown = _file_names(models, fmt), {}, []
    for key, tensor in tensors.items():
        suffix = next((s for s in PARTS[fmt] if key.endswith(s)), None)
        layer = names.get(key.removesuffix(suffix)) if suffix else None
        if layer is None:
            unknown.append(key)
        else:
            layers.setdefault(layer, {})[PARTS[fmt][suffix]] = (key, tensor)
    if unknown:
        raise LoadError(_unknown_keys_message(path, unknown, models))
    return layers


def _check_shapes(path, what, layer, parts):
    """A [r, in(, kh, kw)] and B [out, r(, 1, 1)] must fit the base layer's weight."""
    for part, label in (("down", "down (A)"), ("up", "up (B)")):
        if part not in parts:
            key = next(iter(parts.values()))[0]
            raise LoadError(f"{path}: {key} has no matching {label} tensor: the file is incomplete.")
    (down_key, down), (up_key, up) = parts["down"], parts["up"]
    weight, rank = layer.weight, down.shape[0]
    wanted = {down_key: (rank, *weight.shape[1:]), up_key: (weight.shape[0], rank) + (1,) * (weight.ndim - 2)}
    for key, tensor in ((down_key, down), (up_key, up)):
        if tuple(tensor.shape) != wanted[key]:
            raise LoadError(
                f"{path}: {key} has shape {tuple(tensor.shape)}, but this {what}'s layer (weight "
                f"{tuple(weight.shape)}) needs {wanted[key]}. The LoRA was made for another base "
                "model (SD 1.x and 2.x differ in widths): use it with the model it was trained on.")


def _pattern_value(patterns, module, default):
    """peft's rank_pattern / alpha_pattern lookup: a key matches a module name ending in it."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _alpha(fmt, component, module, parts, configs):
    """kohya: the .alpha tensor; diffusers: the LoraConfig in the metadata. Absent: alpha = rank
    (the update unscaled), as both diffusers and kohya's tools read such files."""
    rank = parts["down"][1].shape[0]
    if fmt == "kohya":
        return float(parts["alpha"][1]) if "alpha" in parts else float(rank)
    config = configs.get(component)
    if not config:
        return float(rank)
    return float(_pattern_value(config.get("alpha_pattern") or {}, _peft_name(module),
                                config.get("lora_alpha", rank)))


def _diffusers_configs(metadata, path):
    """{component: LoraConfig fields} from diffusers' metadata entry (empty when absent)."""
    flat = json.loads(metadata.get(METADATA_KEY, "{}"))
    configs = {c: {k.removeprefix(c + "."): v for k, v in flat.items() if k.startswith(c + ".")}
               for c in COMPONENTS}
    for component, config in configs.items():
        for field in ("use_dora", "use_rslora"):
            if config.get(field):
                raise LoadError(f"{path}: the {component} adapter uses {field} (peft), which this "
                                "loader does not implement; only plain LoRA is supported.")
    return configs


def load_lora(path, unet, text_encoder=None):
    """Read a LoRA file (either format, detected from its tensor names) for these models: returns
    ({component: lora_state_dict-style dict}, format). The models are needed because kohya's
    names replace dots by underscores (to_q vs to.q), which only the model's layer names undo;
    every name and shape is checked against them, so a file for another base fails here with
    the tensor and both shapes named. The models are not changed."""
    path = _lora_file(path)
    tensors = read_state_dict(path)
    fmt = detect_format(tensors, path)
    configs = _diffusers_configs(_file_metadata(path), path) if fmt == "diffusers" else {}
    models = {"unet": unet} | ({"text_encoder": text_encoder} if text_encoder is not None else {})
    states = {}
    for (component, module), parts in _group_by_layer(tensors, fmt, models, path).items():
        _check_shapes(path, LABELS[component], models[component].get_submodule(module), parts)
        state = states.setdefault(component, {})
        state[f"{module}.lora_down.weight"] = parts["down"][1]
        state[f"{module}.lora_up.weight"] = parts["up"][1]
        alpha = _alpha(fmt, component, module, parts, configs)
        state[f"{module}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
    return states, fmt


def apply_lora(pipeline, path, scale=1.0, merge=True):
    """Adapt a loaded Pipeline (its UNet and text encoder) with the LoRA file `path` at strength
    `scale` (the update becomes scale * (alpha / r) B A). merge=True folds it into the weights:
    sampling runs at the base model's speed, several LoRAs add up, and it is undone only by
    reloading the model. merge=False adds adapter layers instead (unmerge / remove_lora work).
    Returns the file's format."""
    states, fmt = load_lora(path, pipeline.unet, pipeline.text_encoder)
    for component, state in states.items():
        model = getattr(pipeline, component)
        if merge:
            fold_lora_state_dict(model, state, scale)
        else:
            for layer in load_lora_state_dict(model, state).values():
                layer.scale = scale
    return fmt


def parse_lora_spec(spec):
    """"PATH" or "PATH:SCALE" (the --lora argument) -> (path, scale); a path may hold colons."""
    path, sep, scale = spec.rpartition(":")
    if sep:
        try:
            return path, float(scale)
        except ValueError:
            pass
    return spec, 1.0
