"""load_weights.py: every way in and out, against diffusers / transformers as the oracles."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import errors as hub_errors
from safetensors.torch import load_file, save_file

import load_weights
from clip_text import CLIPTextConfig
from load_weights import LoadError, export_single_file, load_pipeline, save_pipeline
from unet import PRESETS as UNET_PRESETS
from unet import UNetConfig
from vae import PRESETS as VAE_PRESETS

TOL = 1e-5  # fp32 max abs error between our modules and the reference ones


def diffusers_pipeline(folder):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def inputs(pipe, seed=0):
    g = torch.Generator().manual_seed(seed)
    unet_cfg = pipe.unet.config
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, unet_cfg.cross_attention_dim, generator=g)
    images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    return ids, latents, torch.tensor([10, 900]), context, images


@torch.no_grad()
def assert_same_outputs(ours, ref):
    """Our Pipeline and a diffusers StableDiffusionPipeline compute the same numbers."""
    ids, latents, t, context, images = inputs(ours)
    err = (ours.text_encoder(ids) - ref.text_encoder(ids).last_hidden_state).abs().max()
    assert err <= TOL, f"text encoder differs by {err}"
    err = (ours.unet(latents, t, context) - ref.unet(latents, t, context).sample).abs().max()
    assert err <= TOL, f"unet differs by {err}"
    err = (ours.vae.encode(images).mean - ref.vae.encode(images).latent_dist.mean).abs().max()
    assert err <= TOL, f"vae encoder differs by {err}"
    err = (ours.vae.decode(latents) - ref.vae.decode(latents).sample).abs().max()
    assert err <= TOL, f"vae decoder differs by {err}"


def test_folder_matches_diffusers(tiny_folder):
    ours = load_pipeline(tiny_folder)
    assert_same_outputs(ours, diffusers_pipeline(tiny_folder))
    ref_ids = diffusers_pipeline(tiny_folder).tokenizer(["a photo of sks dog"], padding="max_length",
                                                        max_length=77, return_tensors="pt").input_ids
    assert torch.equal(ours.tokenizer(["a photo of sks dog"]), ref_ids)
    raw = json.loads((tiny_folder / "scheduler" / "scheduler_config.json").read_text())
    assert ours.scheduler.config.prediction_type == raw.get("prediction_type", "epsilon")


def test_dtype_and_no_copy(tiny_sd1):
    bf16 = load_pipeline(tiny_sd1, dtype=torch.bfloat16)
    assert {p.dtype for p in bf16.unet.parameters()} == {torch.bfloat16}
    full = load_pipeline(tiny_sd1)
    assert not any(p.requires_grad for p in full.unet.parameters())  # frozen until a trainer says so
    assert not any(p.is_meta for m in (full.unet, full.vae, full.text_encoder) for p in m.state_dict().values())


def test_save_pipeline_opens_in_diffusers_and_ours(tiny_folder, tmp_path):
    ours = load_pipeline(tiny_folder)
    with torch.no_grad():  # make it a different model than the source
        for p in ours.unet.parameters():
            p.add_(0.01)
    out = save_pipeline(ours, tmp_path / "saved")
    # The Hub layout: text-encoder keys under text_model., the four tokenizer files.
    assert all(k.startswith("text_model.") for k in load_file(out / "text_encoder" / "model.safetensors"))
    assert {p.name for p in (out / "tokenizer").iterdir()} >= set(load_weights.TOKENIZER_FILES)
    assert_same_outputs(ours, diffusers_pipeline(out))
    again = load_pipeline(out)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert again.scheduler.config == ours.scheduler.config


def test_save_pipeline_keeps_old_folder_on_failure(tiny_sd1, tmp_path, monkeypatch):
    ours = load_pipeline(tiny_sd1)
    good = save_pipeline(ours, tmp_path / "model")
    before = load_file(good / "unet" / "diffusion_pytorch_model.safetensors")

    def broken(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(load_weights, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_pipeline(ours, tmp_path / "model")
    after = load_file(good / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not list(good.glob(".saving-*"))  # no temporary left behind
    (good / "notes.txt").write_text("mine")  # other files in the folder survive a save
    monkeypatch.undo()
    save_pipeline(ours, good)
    assert (good / "notes.txt").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# Original single files. diffusers' own conversion functions are the independent oracle for
# the original <-> diffusers names.


def diffusers_configs(folder):
    return {name: json.loads((folder / name / "config.json").read_text())
            for name in ("unet", "vae")}


def test_export_matches_diffusers_conversion(tiny_folder, tmp_path):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    ours = load_pipeline(tiny_folder)
    path = export_single_file(ours, tmp_path / "model.safetensors", fp16=False)
    original = load_file(path)
    configs = diffusers_configs(tiny_folder)
    expected = {"unet": convert_ldm_unet_checkpoint(original, configs["unet"]),
                "vae": convert_ldm_vae_checkpoint(original, configs["vae"])}
    if ours.text_encoder.config.hidden_act == "quick_gelu":
        text = convert_ldm_clip_checkpoint(original)
    else:
        text = convert_open_clip_checkpoint(diffusers_pipeline(tiny_folder).text_encoder, original)
    expected["text_encoder"] = {k if k.startswith("text_model.") else "text_model." + k: v
                                for k, v in text.items() if not k.endswith("position_ids")}
    for name, want in expected.items():
        have = getattr(ours, name).state_dict()
        assert want.keys() == have.keys(), f"{name}: {sorted(want.keys() ^ have.keys())[:5]}"
        for k in have:
            assert torch.equal(want[k].reshape(have[k].shape), have[k]), f"{name}: {k}"


def test_single_file_loads_like_the_folder(tiny_folder, tmp_path):
    ours = load_pipeline(tiny_folder)
    path = export_single_file(ours, tmp_path / "model.safetensors", fp16=False)
    prediction = ours.scheduler.config.prediction_type
    again = load_pipeline(path, config=tiny_folder, prediction_type=prediction)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(ours, name).state_dict(), getattr(again, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # diffusers opens our export too, and computes what the folder computes
    from diffusers import StableDiffusionPipeline
    ref = StableDiffusionPipeline.from_single_file(str(path), config=str(tiny_folder), local_files_only=True)
    assert_same_outputs(ours, ref)


def test_fp16_export_and_ckpt(tiny_sd1, tmp_path):
    ours = load_pipeline(tiny_sd1)
    path = export_single_file(ours, tmp_path / "fp16.safetensors")  # fp16=True by default
    assert {t.dtype for t in load_file(path).values()} == {torch.float16}
    again = load_pipeline(path, config=tiny_sd1)
    w, w2 = ours.unet.conv_in.weight, again.unet.conv_in.weight
    assert torch.equal(w.half().float(), w2)
    # The same tensors as a Lightning .ckpt ({"state_dict": ...}) load with weights_only=True.
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": load_file(path), "global_step": 1}, ckpt)
    from_ckpt = load_pipeline(ckpt, config=tiny_sd1)
    assert torch.equal(from_ckpt.unet.conv_in.weight, w2)


def test_ema_weights_preferred(tiny_sd1, tmp_path):
    ours = load_pipeline(tiny_sd1)
    original = load_file(export_single_file(ours, tmp_path / "m.safetensors", fp16=False))
    unet_keys = [k for k in original if k.startswith("model.diffusion_model.")]
    for k in unet_keys:  # the EMA copy: 'model.' dropped, dots removed
        original["model_ema." + k[len("model."):].replace(".", "")] = original[k] + 1
    original["model_ema.decay"] = torch.tensor(0.9999)
    save_file(original, tmp_path / "ema.safetensors")
    ema = load_pipeline(tmp_path / "ema.safetensors", config=tiny_sd1)
    assert torch.equal(ema.unet.conv_in.weight, ours.unet.conv_in.weight + 1)


@pytest.mark.parametrize("preset,text", [("sd15", "sd1"), ("sd21", "sd2")])
def test_full_size_key_maps_are_complete(preset, text):
    """SD 1.5 / 2.1 at full size on the meta device: every key of ours has an original name,
    no two share one, and diffusers' conversion of those names gives back exactly our keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from clip_text import PRESETS as TEXT_PRESETS
    configs = {"unet": UNET_PRESETS[preset], "vae": VAE_PRESETS[preset], "text_encoder": TEXT_PRESETS[preset]}
    prefix = load_weights.SD1_TEXT_PREFIX if text == "sd1" else load_weights.SD2_TEXT_PREFIX
    key_map = load_weights.original_key_map(configs, prefix)
    for name, names in key_map.items():
        originals = list(names.values())
        if name == "text_encoder" and text == "sd2":  # q, k, v share one fused tensor
            assert len(set(originals)) == len(originals) - 2 * 2 * configs[name].num_hidden_layers
        else:
            assert len(set(originals)) == len(originals), name
    with torch.device("meta"):
        fake = {v: torch.empty(1, 1, 1, 1) for names in key_map.values() for v in names.values()}
    unet_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(configs["unet"]).items()}
    vae_cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(configs["vae"]).items()}
    assert convert_ldm_unet_checkpoint(fake, unet_cfg).keys() == key_map["unet"].keys()
    assert convert_ldm_vae_checkpoint(fake, vae_cfg).keys() == key_map["vae"].keys()


# ---------------------------------------------------------------------------------------------
# The Hub, with snapshot_download replaced by a fake that serves a local folder.


class FakeHub:
    def __init__(self, folder, error=None):
        self.folder, self.error, self.calls = Path(folder), error, []

    def __call__(self, repo_id, *, revision=None, allow_patterns=None, **kwargs):
        self.calls.append((repo_id, revision, list(allow_patterns)))
        if self.error:
            raise self.error
        import fnmatch
        return_dir = self.folder.parent / "snapshot"  # one cache folder, filled call by call
        for f in self.folder.rglob("*"):
            rel = f.relative_to(self.folder).as_posix()
            if f.is_file() and any(fnmatch.fnmatch(rel, p) for p in allow_patterns):
                (return_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, return_dir / rel)
        return str(return_dir)


def test_hub_fetches_only_what_is_needed(tiny_sd1, tmp_path, monkeypatch):
    hub = FakeHub(shutil.copytree(tiny_sd1, tmp_path / "repo"))
    monkeypatch.setattr(load_weights, "snapshot_download", hub)
    pipe = load_pipeline("someone/tiny-sd", revision="main")
    assert pipe.source == "someone/tiny-sd"
    (repo_id, revision, patterns), = hub.calls  # safetensors everywhere: one call, no .bin
    assert (repo_id, revision) == ("someone/tiny-sd", "main")
    assert "unet/diffusion_pytorch_model.safetensors" in patterns
    assert "text_encoder/model.safetensors" in patterns
    assert not any(p.endswith(".bin") for p in patterns)
    assert "tokenizer/merges.txt" in patterns and "scheduler/scheduler_config.json" in patterns


def test_hub_variant_and_bin_fallback(tiny_sd1, tmp_path, monkeypatch):
    repo = shutil.copytree(tiny_sd1, tmp_path / "repo")
    unet = repo / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    vae = repo / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(vae), vae.with_name("diffusion_pytorch_model.fp16.bin"))  # an old repo
    vae.unlink()
    text = repo / "text_encoder" / "model.safetensors"
    text.rename(text.with_name("model.fp16.safetensors"))
    hub = FakeHub(repo)
    monkeypatch.setattr(load_weights, "snapshot_download", hub)
    pipe = load_pipeline("someone/tiny-sd", variant="fp16")
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.calls[0][2]
    assert len(hub.calls) == 2 and "vae/diffusion_pytorch_model.fp16.bin" in hub.calls[1][2]
    assert "unet/diffusion_pytorch_model.fp16.bin" not in hub.calls[1][2]
    assert torch.equal(pipe.vae.encoder.conv_in.weight, load_pipeline(tiny_sd1).vae.encoder.conv_in.weight)


def hub_error(cls, text):
    """An instance of a huggingface_hub error without the HTTP response its __init__ wants."""
    error = cls.__new__(cls)
    Exception.__init__(error, text)
    return error


@pytest.mark.parametrize("error,message", [
    (hub_errors.LocalEntryNotFoundError, "not in the local Hub cache"),
    (hub_errors.GatedRepoError, "hf auth login"),
    (hub_errors.RepositoryNotFoundError, "no Hub repo named"),
])
def test_hub_errors_say_what_to_do(tmp_path, monkeypatch, error, message):
    monkeypatch.setattr(load_weights, "snapshot_download", FakeHub(tmp_path, error=hub_error(error, "x")))
    with pytest.raises(LoadError, match=message):
        load_pipeline("someone/tiny-sd")


def test_single_file_without_config_fetches_matching_hub_configs(tiny_sd1, tmp_path, monkeypatch):
    ours = load_pipeline(tiny_sd1)
    path = export_single_file(ours, tmp_path / "m.safetensors")
    hub = FakeHub(shutil.copytree(tiny_sd1, tmp_path / "repo"))
    monkeypatch.setattr(load_weights, "snapshot_download", hub)
    load_pipeline(path)
    (repo_id, _, patterns), = hub.calls
    assert repo_id == load_weights.DEFAULT_MODEL
    assert not any(p.endswith((".safetensors", ".bin")) for p in patterns)  # configs only


# ---------------------------------------------------------------------------------------------
# Bad input: a clear message for each.


def test_missing_file_in_folder(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1, tmp_path / "m")
    (folder / "vae" / "config.json").unlink()
    with pytest.raises(LoadError, match=r"vae/config.json is missing"):
        load_pipeline(folder)
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.copy(tiny_sd1 / "vae" / "config.json", folder / "vae" / "config.json")
    with pytest.raises(LoadError, match=r"no diffusion_pytorch_model.safetensors \(nor .bin\)"):
        load_pipeline(folder)


def test_truncated_safetensors(tiny_sd1, tmp_path):
    folder = shutil.copytree(tiny_sd1, tmp_path / "m")
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(LoadError, match="truncated or corrupt"):
        load_pipeline(folder)


class NotATensor:
    pass


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(1)}, "payload": NotATensor()}, path)
    with pytest.raises(LoadError, match="could run code"):
        load_pipeline(path)


def test_lora_sdxl_inpainting_are_named(tiny_sd1, tmp_path):
    save_file({"lora_unet_down_blocks_0.lora_down.weight": torch.zeros(4, 4)}, tmp_path / "lora.safetensors")
    with pytest.raises(LoadError, match="LoRA file"):
        load_pipeline(tmp_path / "lora.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
               "conditioner.embedders.0.x": torch.zeros(1)}, tmp_path / "xl.safetensors")
    with pytest.raises(LoadError, match="SDXL"):
        load_pipeline(tmp_path / "xl.safetensors")
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 9, 3, 3)},
              tmp_path / "inpaint.safetensors")
    with pytest.raises(LoadError, match="inpainting"):
        load_pipeline(tmp_path / "inpaint.safetensors")


def test_wrong_config_names_the_keys_and_shapes(tiny_sd1, tiny_sd2, tmp_path):
    path = export_single_file(load_pipeline(tiny_sd1), tmp_path / "m.safetensors")
    with pytest.raises(LoadError, match="missing") as info:
        load_pipeline(path, config=tiny_sd2)  # SD1 weights, SD2-shaped config
    assert "SD 1.x vs 2.x" in str(info.value)
    folder = shutil.copytree(tiny_sd1, tmp_path / "wide")
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["cross_attention_dim"] = 64
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoadError, match=r"attn2.to_k.weight has shape \(\d+, 32\) in the checkpoint, "
                                        r"but the config gives \(\d+, 64\)"):
        load_pipeline(folder)


def test_unknown_sources(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        load_pipeline(str(tmp_path / "nothing.safetensors"))
    with pytest.raises(LoadError, match="does not exist"):
        load_pipeline("not a repo id")
    (tmp_path / "weights.onnx").write_bytes(b"x")
    with pytest.raises(LoadError, match="unknown checkpoint type"):
        load_pipeline(tmp_path / "weights.onnx")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="not a diffusers-layout folder"):
        load_pipeline(tmp_path / "empty")


def test_text_encoder_keys_without_prefix(tiny_sd1, tmp_path):
    """transformers 5 writes CLIPTextModel keys without `text_model.`; both layouts load."""
    folder = shutil.copytree(tiny_sd1, tmp_path / "m")
    f = folder / "text_encoder" / "model.safetensors"
    state = load_file(f)
    save_file({k.removeprefix("text_model."): v for k, v in state.items()}, f)
    a, b = load_pipeline(folder).text_encoder.state_dict(), load_pipeline(tiny_sd1).text_encoder.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------------------------------------
# Hub configs: features the models do not implement are refused by the loader, with the key,
# the value and what is supported.

UNET_SD1_STYLE = dict(  # tests/test_unet.py's SD1_STYLE
    block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
    attention_head_dim=2, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8)
VAE_TINY_2_LEVEL = dict(  # tests/test_vae.py's TINY_2_LEVEL
    block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
    up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8, latent_channels=4)
SD15_TEXT_JSON = {  # stable-diffusion-v1-5 text_encoder/config.json
    "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
    "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0", "vocab_size": 49408}


@pytest.mark.parametrize("key, value", [
    ("addition_embed_type", "text_time"),          # SDXL's, without its sizes (tests/test_sdxl.py)
    ("addition_embed_type", "text"),
    ("class_embed_type", "timestep"),
    ("num_class_embeds", 10),
    ("transformer_layers_per_block", [[1, 2], [2, 1]]),  # per-layer lists: an asymmetric UNet
    ("transformer_layers_per_block", [1, 2, 10, 10]),
    ("encoder_hid_dim", 768),
    ("time_cond_proj_dim", 256),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("act_fn", "gelu"),
    ("only_cross_attention", True),
    ("resnet_time_scale_shift", "scale_shift"),
    ("center_input_sample", True),
])
def test_unsupported_unet_features_raise(key, value):
    with pytest.raises(ValueError, match=key) as info:
        load_weights.unet_config(dict(UNET_SD1_STYLE, **{key: value}))
    assert repr(value) in str(info.value) and "supported" in str(info.value)


def test_unknown_unet_block_type_raises():
    bad = dict(UNET_SD1_STYLE, down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"])
    match = "down_block_types.*SimpleCrossAttnDownBlock2D.*CrossAttnDownBlock2D"
    with pytest.raises(ValueError, match=match):
        load_weights.unet_config(bad)
    bad = dict(UNET_SD1_STYLE, up_block_types=["UpBlock2D", "AttnUpBlock2D"])
    with pytest.raises(ValueError, match="up_block_types.*AttnUpBlock2D"):
        load_weights.unet_config(bad)


def test_unet_feature_off_values_are_accepted():
    # Explicit "off" values as Hub configs write them must not raise.
    cfg = load_weights.unet_config(dict(UNET_SD1_STYLE, class_embed_type=None, addition_embed_type=None,
                                        transformer_layers_per_block=[1, 1], dropout=0.0,
                                        mid_block_only_cross_attention=None))
    assert cfg == UNetConfig.from_dict(UNET_SD1_STYLE)


@pytest.mark.parametrize("override, message", [
    (dict(shift_factor=0.1159), "shift_factor"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "AttnDownEncoderBlock2D"),
    (dict(up_block_types=["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]), "AttnUpDecoderBlock2D"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(latents_mean=[0.0] * 4, latents_std=[1.0] * 4), "latents_mean"),
    (dict(block_out_channels=[32, 64, 64]), "equal lengths"),
    (dict(norm_num_groups=12), "norm_num_groups"),
])
def test_vae_config_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_weights.vae_config({**VAE_TINY_2_LEVEL, **override})
    load_weights.vae_config({**VAE_TINY_2_LEVEL, "shift_factor": None})  # None / 0 are fine
    load_weights.vae_config({**VAE_TINY_2_LEVEL, "shift_factor": 0.0})


def test_text_encoder_config_errors():
    with pytest.raises(ValueError, match=r"hidden_act='relu'.*'quick_gelu', 'gelu'"):
        load_weights.text_encoder_config(dict(SD15_TEXT_JSON, hidden_act="relu"))
    with pytest.raises(ValueError, match="attention_dropout=0.1"):
        load_weights.text_encoder_config(dict(SD15_TEXT_JSON, attention_dropout=0.1))
    with pytest.raises(ValueError, match="not divisible"):
        load_weights.text_encoder_config(dict(hidden_size=30, num_attention_heads=4))
    assert load_weights.text_encoder_config(SD15_TEXT_JSON) == CLIPTextConfig.from_dict(SD15_TEXT_JSON)


@pytest.mark.parametrize("component, key, value", [
    ("unet", "addition_embed_type", "text_time"),
    ("vae", "shift_factor", 0.1159),
    ("text_encoder", "hidden_act", "relu"),
])
def test_unsupported_config_in_a_folder_is_a_load_error(tiny_sd1, tmp_path, component, key, value):
    """Through load_pipeline the refusal is a LoadError naming the file, the key and the value."""
    folder = shutil.copytree(tiny_sd1, tmp_path / "m")
    path = folder / component / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(LoadError, match=rf"{component}/config.json: .*{key}={value!r} is not supported") as info:
        load_pipeline(folder)
    assert "Stable Diffusion 1.x and 2.x" in str(info.value)


def test_save_keeps_config_keys_the_models_do_not_read(tiny_sd1, tmp_path):
    """Hub keys that are not config fields (act_fn, force_upcast, ...) round-trip through saving."""
    saved = save_pipeline(load_pipeline(tiny_sd1), tmp_path / "saved")
    for component in ("unet", "vae", "text_encoder"):
        before = json.loads((tiny_sd1 / component / "config.json").read_text())
        after = json.loads((saved / component / "config.json").read_text())
        kept = {k: v for k, v in before.items() if not k.startswith("_") and k != "transformers_version"}
        assert {k: after.get(k) for k in kept} == kept, component
