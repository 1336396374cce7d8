"""SDXL base: the UNet's added conditioning and per-block transformer depth, the two text
encoders, and every way in and out of load_weights, against diffusers / transformers (the
test-only oracles). Tiny random models cover every path; the full-size models are built on the
meta device from SDXL base's public config values, written out below (no network)."""
import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import load_weights
from clip_text import PRESETS as TEXT_PRESETS
from clip_text import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, sdxl_text_conditioning
from load_weights import LoadError, export_single_file, load_pipeline, save_pipeline
from test_load_weights import FakeHub
from unet import PRESETS as UNET_PRESETS
from unet import UNet

TOL = 1e-5  # fp32 max abs error against the reference models

# ---------------------------------------------------------------------------------------------
# SDXL base's configs (stabilityai/stable-diffusion-xl-base-1.0), as its Hub folder has them

SDXL_UNET_JSON = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256, "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 2048, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
    "layers_per_block": 2, "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05, "norm_num_groups": 32,
    "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default", "sample_size": 128, "time_cond_proj_dim": None,
    "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None, "use_linear_projection": True}
_SDXL_TEXT_COMMON = {
    "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
    "initializer_factor": 1.0, "initializer_range": 0.02, "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77, "model_type": "clip_text_model", "pad_token_id": 1,
    "torch_dtype": "float16", "vocab_size": 49408}
SDXL_TEXT_JSON = {**_SDXL_TEXT_COMMON, "architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu",
                  "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                  "num_hidden_layers": 12, "projection_dim": 768}
SDXL_TEXT_2_JSON = {**_SDXL_TEXT_COMMON, "architectures": ["CLIPTextModelWithProjection"],
                    "hidden_act": "gelu", "hidden_size": 1280, "intermediate_size": 5120,
                    "num_attention_heads": 20, "num_hidden_layers": 32, "projection_dim": 1280}

# Tiny SDXL-shaped models: SDXL's block layout (no attention at the first level), a per-block
# transformer depth with 2- and 3-layer transformers, two text encoders of different widths whose
# penultimate states concatenate to the context (32 + 48), and a projection (48 -> 40) that is not
# square, so that a transposed text_projection cannot pass.
TINY_UNET = dict(
    block_out_channels=[32, 64, 64], layers_per_block=2, norm_num_groups=16,
    down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    transformer_layers_per_block=[1, 2, 3], attention_head_dim=[2, 4, 4], cross_attention_dim=80,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=40 + 6 * 8, sample_size=8)
TINY_VAE = dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                latent_channels=4, sample_size=16, scaling_factor=0.13025, force_upcast=True)
TINY_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=0, eos_token_id=2,
                 pad_token_id=1, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, hidden_act="quick_gelu", projection_dim=32)
TINY_TEXT_2 = dict(TINY_TEXT, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                   hidden_act="gelu", projection_dim=40)
SCHEDULER = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
             "prediction_type": "epsilon"}
PROMPTS = ["a photo of sks dog", "an oil painting of a castle on a hill, at dusk"]


def perturbed(model, scale):
    """diffusers zero-initialises some layers and LayerNorms start at (1, 0): add noise to every
    parameter so that every path counts in the comparison."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


TOKENIZER_PADS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}  # as SDXL base's folders have them


def reference_pipeline(tokenizer_dir):
    """A tiny random StableDiffusionXLPipeline of diffusers' and transformers' own models; the
    tokenizer files are written to tokenizer_dir first."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    from clip_vocab import write_hub_tokenizer
    torch.manual_seed(0)
    unet = perturbed(UNet2DConditionModel(**TINY_UNET), 0.02)
    vae = perturbed(AutoencoderKL(**TINY_VAE), 0.02)
    text_encoder = perturbed(transformers.CLIPTextModel(transformers.CLIPTextConfig(**TINY_TEXT)), 0.02)
    text_encoder_2 = transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**TINY_TEXT_2))
    text_encoder_2 = perturbed(text_encoder_2, 0.02)
    tokenizers = {}
    for name, pad in TOKENIZER_PADS.items():
        folder = write_hub_tokenizer(tokenizer_dir / name, pad=pad)
        tokenizers[name] = transformers.CLIPTokenizer.from_pretrained(folder)
    return StableDiffusionXLPipeline(vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     unet=unet, scheduler=EulerDiscreteScheduler(**SCHEDULER), **tokenizers)


def save_hub_folder(pipe, folder, **kwargs):
    """diffusers' StableDiffusionXLPipeline.save_pretrained. transformers 5 saves a tokenizer as
    tokenizer.json alone; the Hub's SDXL folders also hold the vocab.json, merges.txt and
    special-token files of the same vocabulary, which are added as they are there."""
    from clip_vocab import write_hub_tokenizer
    pipe.save_pretrained(folder, **kwargs)
    for name, pad in TOKENIZER_PADS.items():
        write_hub_tokenizer(folder / name, pad=pad)
    return folder


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    """A tiny SDXL folder saved by diffusers."""
    pipe = reference_pipeline(tmp_path_factory.mktemp("tokenizers"))
    return save_hub_folder(pipe, tmp_path_factory.mktemp("tiny_sdxl"))


def diffusers_sdxl(folder, **kwargs):
    from diffusers import StableDiffusionXLPipeline
    return StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, **kwargs)


def max_err(a, b):
    return (a - b).abs().max().item()


# ---------------------------------------------------------------------------------------------
# The UNet: added conditioning (text_time) and per-block transformer depth


def unet_pair(seed=0):
    from diffusers import UNet2DConditionModel
    torch.manual_seed(seed)
    ref = perturbed(UNet2DConditionModel(**TINY_UNET), 0.1)
    ours = UNet(load_weights.unet_config(TINY_UNET)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def unet_inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 16, 16, generator=g)
    context = torch.randn(2, 77, 80, generator=g)
    added_cond = {"text_embeds": torch.randn(2, 40, generator=g),
                  # (original h, w, crop top, left, target h, w): SDXL's usual values and a crop
                  "time_ids": torch.tensor([[1024., 1024., 0., 0., 1024., 1024.],
                                            [768., 512., 64., 32., 1024., 1024.]])}
    return latents, context, added_cond


def test_unet_layout_is_sdxl():
    _, ours = unet_pair()
    assert len(ours.down_blocks[0].attentions) == 0  # DownBlock2D first: no attention at full size
    depths = {name: len(m.transformer_blocks) for name, m in ours.named_modules()
              if hasattr(m, "transformer_blocks")}
    assert {d for n, d in depths.items() if n.startswith("down_blocks.1.")} == {2}
    assert {d for n, d in depths.items() if n.startswith(("down_blocks.2.", "mid_block.", "up_blocks.0."))} == {3}
    assert {d for n, d in depths.items() if n.startswith("up_blocks.1.")} == {2}
    assert not any(n.startswith("up_blocks.2.") for n in depths)
    assert {k for k in ours.state_dict() if k.startswith("add_")} == {
        "add_embedding.linear_1.weight", "add_embedding.linear_1.bias",
        "add_embedding.linear_2.weight", "add_embedding.linear_2.bias"}


def test_unet_matches_diffusers_fp32():
    ref, ours = unet_pair()
    latents, context, added_cond = unet_inputs()
    with torch.no_grad():
        for t in (torch.tensor([1, 981]), 500):
            expected = ref(latents, t, context, added_cond_kwargs=added_cond).sample
            out = ours(latents, t, context, added_cond=added_cond)
            err = max_err(out, expected)
            print(f"SDXL UNet, t={t}: fp32 max abs err {err:.2e} (tolerance {TOL}; "
                  f"output max {expected.abs().max():.2f})")
            assert out.shape == (2, 4, 16, 16) and err <= TOL
        # The added conditioning counts: another crop or pooled embedding changes the output.
        for key in ("time_ids", "text_embeds"):
            changed = dict(added_cond, **{key: added_cond[key].flip(0)})
            out = ours(latents, 500, context, added_cond=added_cond)
            assert max_err(ours(latents, 500, context, added_cond=changed), out) > 1e-3


def test_unet_asks_for_added_cond():
    _, ours = unet_pair()
    latents, context, added_cond = unet_inputs()
    for missing in (None, {"text_embeds": added_cond["text_embeds"]}):
        with pytest.raises(ValueError, match="text_embeds.*time_ids"):
            ours(latents, 10, context, added_cond=missing)


def test_unet_gradient_checkpointing_with_deep_transformers():
    _, ours = unet_pair()
    latents, context, added_cond = unet_inputs()
    ours.train().requires_grad_(True)

    def grads():
        ours.zero_grad()
        ours(latents, torch.tensor([3, 700]), context, added_cond=added_cond).square().mean().backward()
        return {n: p.grad.clone() for n, p in ours.named_parameters()}
    plain = grads()
    ours.enable_gradient_checkpointing()
    checkpointed = grads()
    # the same fp32 arithmetic recomputed in backward: tolerance 1e-6
    assert all(max_err(plain[n], checkpointed[n]) <= 1e-6 for n in plain)
    assert plain["add_embedding.linear_1.weight"].abs().max() > 0


def test_full_size_unet_keys_and_shapes_equal_diffusers():
    from diffusers import UNet2DConditionModel
    config = load_weights.unet_config(SDXL_UNET_JSON)
    assert config == UNET_PRESETS["sdxl-base"]
    with torch.device("meta"):
        ours = UNet(config)
        ref = UNet2DConditionModel(**{k: v for k, v in SDXL_UNET_JSON.items() if not k.startswith("_")})
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    n = sum(v.numel() for v in ours.state_dict().values())
    print(f"SDXL base UNet: {len(ours_shapes)} tensors, {n / 1e9:.3f} B parameters")
    assert 2.56e9 < n < 2.57e9  # SDXL's 2.6 B UNet (Podell et al., 2023, Table 1)
    assert ours_shapes["add_embedding.linear_1.weight"] == (1280, 2816)
    assert len(ours.mid_block.attentions[0].transformer_blocks) == 10


def test_full_size_text_encoders_keys_and_shapes_equal_transformers():
    assert load_weights.text_encoder_config(SDXL_TEXT_JSON) == TEXT_PRESETS["sdxl-base"]
    assert load_weights.text_encoder_config(SDXL_TEXT_2_JSON) == TEXT_PRESETS["sdxl-base-2"]
    with torch.device("meta"):
        pairs = [(CLIPTextModel(TEXT_PRESETS["sdxl-base"]),
                  transformers.CLIPTextModel(transformers.CLIPTextConfig(**SDXL_TEXT_JSON))),
                 (CLIPTextModelWithProjection(TEXT_PRESETS["sdxl-base-2"]),
                  transformers.CLIPTextModelWithProjection(transformers.CLIPTextConfig(**SDXL_TEXT_2_JSON)))]
    for ours, ref in pairs:
        # transformers >= 5.6 keeps CLIPTextModel's keys without the Hub files' text_model. prefix
        expected = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): tuple(v.shape)
                    for k, v in ref.state_dict().items() if not k.endswith("position_ids")}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
    assert dict(pairs[1][0].named_parameters())["text_projection.weight"].shape == (1280, 1280)
    assert len(pairs[1][0].text_model.encoder.layers) == 32


def test_full_size_single_file_key_map_is_complete():
    """At full size: every key of ours has an original name (q, k, v of OpenCLIP share a fused
    one), and diffusers' conversion of those names gives back exactly our UNet's keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
    configs = {"unet": UNET_PRESETS["sdxl-base"], "vae": load_weights.vae_config({}),
               "text_encoder": TEXT_PRESETS["sdxl-base"], "text_encoder_2": TEXT_PRESETS["sdxl-base-2"]}
    key_map = load_weights.original_key_map(configs, load_weights.SDXL_TEXT_PREFIX)
    for name, names in key_map.items():
        fused = 2 * 2 * 32 if name == "text_encoder_2" else 0
        assert len(set(names.values())) == len(names) - fused, name
    assert key_map["unet"]["add_embedding.linear_2.bias"] == "model.diffusion_model.label_emb.0.2.bias"
    assert key_map["text_encoder_2"]["text_projection.weight"] == "conditioner.embedders.1.model.text_projection"
    with torch.device("meta"):
        fake = {v: torch.empty(1, 1, 1, 1) for v in key_map["unet"].values()}
    assert convert_ldm_unet_checkpoint(fake, SDXL_UNET_JSON).keys() == key_map["unet"].keys()


def test_hub_config_checks():
    assert load_weights.unet_config(TINY_UNET).transformer_layers_per_block == (1, 2, 3)
    for bad, match in ((dict(addition_embed_type="text_image"), "addition_embed_type='text_image'"),
                       (dict(transformer_layers_per_block=[1, 2]), r"transformer_layers_per_block=\[1, 2\]"),
                       (dict(transformer_layers_per_block=0), "transformer_layers_per_block=0"),
                       (dict(addition_time_embed_dim=None), "without addition_time_embed_dim"),
                       (dict(reverse_transformer_layers_per_block=[[3, 3], [2, 2], [1, 1]]),
                        "reverse_transformer_layers_per_block")):
        with pytest.raises(ValueError, match=match):
            load_weights.unet_config({**TINY_UNET, **bad})


# ---------------------------------------------------------------------------------------------
# The text encoders: penultimate states, the projection, SDXL's conditioning


def text_pair(spec, cls, seed=0):
    torch.manual_seed(seed)
    ref = perturbed(getattr(transformers, cls.__name__)(transformers.CLIPTextConfig(**spec)), 0.1)
    ours = cls(CLIPTextConfig.from_dict(spec)).eval()
    state = {(k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k): v
             for k, v in ref.state_dict().items()}
    ours.load_state_dict(state, strict=True)
    return ref, ours


def prompt_ids(pad_id, seed=0):
    """[2, 77] ids as a tokenizer makes them: start, words, end (49407), padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((2, 77), pad_id)
    for row, length in enumerate((9, 40)):
        ids[row, 0], ids[row, length + 1] = 49406, 49407
        ids[row, 1:length + 1] = torch.randint(256, 49406, (length,), generator=g)
    return ids


@pytest.mark.parametrize("eos_token_id", [2, 49407])  # SDXL's configs say 2 (argmax), newer ones the id
@pytest.mark.parametrize("pad_id", [49407, 0])  # tokenizer/ pads with <|endoftext|>, tokenizer_2/ with "!"
def test_text_encoders_match_transformers(eos_token_id, pad_id):
    ids = prompt_ids(pad_id)
    for spec, cls in ((TINY_TEXT, CLIPTextModel), (TINY_TEXT_2, CLIPTextModelWithProjection)):
        ref, ours = text_pair(dict(spec, eos_token_id=eos_token_id), cls)
        with torch.no_grad():
            expected = ref(ids, output_hidden_states=True)
            states = ours.hidden_states(ids)
            errors = {"last_hidden_state": max_err(CLIPTextModel.forward(ours, ids), expected.last_hidden_state)}
            assert len(states) == len(expected.hidden_states) == spec["num_hidden_layers"] + 1
            errors["hidden_states"] = max(max_err(a, b) for a, b in zip(states, expected.hidden_states))
            if cls is CLIPTextModelWithProjection:
                errors["text_embeds"] = max_err(ours(ids), expected.text_embeds)
                assert ours(ids).shape == (2, 40)
        print(f"{cls.__name__} (eos_token_id {eos_token_id}, pad {pad_id}): fp32 max abs err {errors} "
              f"(tolerance {TOL})")
        assert max(errors.values()) <= TOL
        # the penultimate state is not layer-normed: it differs from the final output
        assert max_err(states[-2], states[-1]) > 0.1


def test_sdxl_conditioning_matches_diffusers_encode_prompt(tiny_sdxl):
    ref = diffusers_sdxl(tiny_sdxl)
    ours = load_pipeline(tiny_sdxl)
    assert ours.tokenizer.pad_id == 49407 and ours.tokenizer_2.pad_token == "!" and ours.tokenizer_2.pad_id == 0
    ids, ids_2 = ours.tokenizer(PROMPTS), ours.tokenizer_2(PROMPTS)
    for tokenizer, have in ((ref.tokenizer, ids), (ref.tokenizer_2, ids_2)):
        want = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(have, want)
    with torch.no_grad():
        context, pooled = sdxl_text_conditioning(ours.text_encoder, ours.text_encoder_2, ids, ids_2)
        want_context, _, want_pooled, _ = ref.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    errors = (max_err(context, want_context), max_err(pooled, want_pooled))
    print(f"SDXL text conditioning: context {tuple(context.shape)}, pooled {tuple(pooled.shape)}; "
          f"fp32 max abs err {errors[0]:.2e}, {errors[1]:.2e} (tolerance {TOL})")
    assert context.shape == (2, 77, 80) and pooled.shape == (2, 40) and max(errors) <= TOL


# ---------------------------------------------------------------------------------------------
# load_weights: diffusers folders, the Hub, saving, original single files


@torch.no_grad()
def assert_same_outputs(ours, ref):
    """Our Pipeline and a diffusers StableDiffusionXLPipeline compute the same numbers."""
    ids = prompt_ids(0)
    latents, context, added_cond = unet_inputs()
    g = torch.Generator().manual_seed(2)
    images = torch.rand(1, 3, 32, 32, generator=g) * 2 - 1
    errors = {
        "text_encoder": max_err(ours.text_encoder.hidden_states(ids)[-2],
                                ref.text_encoder(ids, output_hidden_states=True).hidden_states[-2]),
        "text_encoder_2": max_err(ours.text_encoder_2(ids), ref.text_encoder_2(ids).text_embeds),
        "unet": max_err(ours.unet(latents, [10, 900], context, added_cond=added_cond),
                        ref.unet(latents, torch.tensor([10, 900]), context, added_cond_kwargs=added_cond).sample),
        "vae encoder": max_err(ours.vae.encode(images).mean, ref.vae.encode(images).latent_dist.mean),
        "vae decoder": max_err(ours.vae.decode(latents), ref.vae.decode(latents).sample)}
    assert all(e <= TOL for e in errors.values()), errors
    return errors


def test_folder_saved_by_diffusers_loads_strictly(tiny_sdxl):
    ours = load_pipeline(tiny_sdxl)
    assert isinstance(ours.text_encoder_2, CLIPTextModelWithProjection)
    assert ours.vae.config.scaling_factor == 0.13025 and ours.vae.config.force_upcast
    errors = assert_same_outputs(ours, diffusers_sdxl(tiny_sdxl))
    print(f"SDXL folder: fp32 max abs err {errors} (tolerance {TOL})")


def test_save_pipeline_opens_in_diffusers_sdxl(tiny_sdxl, tmp_path):
    ours = load_pipeline(tiny_sdxl)
    with torch.no_grad():  # a different model than the source
        for p in list(ours.unet.add_embedding.parameters()) + list(ours.text_encoder_2.parameters()):
            p.add_(0.01)
    out = save_pipeline(ours, tmp_path / "saved")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer_2"] == ["transformers", "CLIPTokenizer"]
    assert json.loads((out / "tokenizer_2" / "special_tokens_map.json").read_text())["pad_token"] == "!"
    assert json.loads((out / "vae" / "config.json").read_text())["force_upcast"] is True
    assert_same_outputs(ours, diffusers_sdxl(out))
    again = load_pipeline(out)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_hub_id_with_fp16_variant(tiny_sdxl, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    save_hub_folder(diffusers_sdxl(tiny_sdxl, torch_dtype=torch.float16), repo, variant="fp16")
    hub = FakeHub(repo)
    monkeypatch.setattr(load_weights, "snapshot_download", hub)
    pipe = load_pipeline("someone/tiny-sdxl", variant="fp16", dtype=torch.float16)
    (_, _, patterns), = hub.calls  # every component has its safetensors: one call
    assert {"text_encoder_2/model.fp16.safetensors", "text_encoder_2/config.json",
            "tokenizer_2/vocab.json", "tokenizer_2/special_tokens_map.json"} <= set(patterns)
    assert pipe.tokenizer_2.pad_id == 0
    fp32 = load_pipeline(tiny_sdxl)
    for name in ("unet", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(fp32, name).state_dict()
        assert all(a[k].dtype == torch.float16 and torch.equal(a[k], b[k].half()) for k in a), name


def test_single_file_matches_diffusers_conversion(tiny_sdxl, tmp_path):
    """Our export, read back by diffusers' own SDXL conversion functions, is our weights."""
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)
    ours = load_pipeline(tiny_sdxl)
    original = load_file(export_single_file(ours, tmp_path / "sdxl.safetensors", fp16=False))
    assert not any(k.startswith("cond_stage_model.") for k in original)
    assert original["conditioner.embedders.1.model.text_projection"].shape == (48, 40)  # OpenCLIP's [width, proj]
    assert original["model.diffusion_model.label_emb.0.0.weight"].shape == (128, 88)
    assert "conditioner.embedders.1.model.transformer.resblocks.2.attn.in_proj_weight" in original
    configs = {name: json.loads((tiny_sdxl / name / "config.json").read_text()) for name in ("unet", "vae")}
    ref_text_2 = diffusers_sdxl(tiny_sdxl).text_encoder_2
    expected = {"unet": convert_ldm_unet_checkpoint(original, configs["unet"]),
                "vae": convert_ldm_vae_checkpoint(original, configs["vae"]),
                "text_encoder": convert_ldm_clip_checkpoint(original),
                "text_encoder_2": convert_open_clip_checkpoint(ref_text_2, original,
                                                               prefix=load_weights.SDXL_TEXT_PREFIX_2)}
    for name, want in expected.items():
        want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
        have = getattr(ours, name).state_dict()
        assert want.keys() == have.keys(), f"{name}: {sorted(want.keys() ^ have.keys())[:5]}"
        assert all(torch.equal(want[k].reshape(have[k].shape), have[k]) for k in have), name


def test_single_file_loads_like_the_folder(tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline
    ours = load_pipeline(tiny_sdxl)
    path = export_single_file(ours, tmp_path / "sdxl.safetensors", fp16=False)
    again = load_pipeline(path, config=tiny_sdxl)
    assert again.tokenizer_2.pad_id == 0
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(ours, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    # OpenCLIP's temperature, which SDXL's files carry, has no place in the pipeline: ignored
    save_file({**load_file(path), "conditioner.embedders.1.model.logit_scale": torch.tensor(4.6)}, path)
    load_pipeline(path, config=tiny_sdxl)
    # diffusers opens our export too, and computes what the folder computes
    ref = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tiny_sdxl), local_files_only=True)
    errors = assert_same_outputs(ours, ref)
    print(f"SDXL single file in diffusers: fp32 max abs err {errors} (tolerance {TOL})")


def test_single_file_without_config_fetches_sdxl_base_configs(tiny_sdxl, tmp_path, monkeypatch):
    path = export_single_file(load_pipeline(tiny_sdxl), tmp_path / "sdxl.safetensors")
    hub = FakeHub(shutil.copytree(tiny_sdxl, tmp_path / "repo"))
    monkeypatch.setattr(load_weights, "snapshot_download", hub)
    pipe = load_pipeline(path)
    (repo_id, _, patterns), = hub.calls
    assert repo_id == load_weights.SDXL_MODEL == "stabilityai/stable-diffusion-xl-base-1.0"
    assert not any(p.endswith((".safetensors", ".bin")) for p in patterns)  # configs only
    assert pipe.text_encoder_2 is not None and pipe.unet.config.addition_embed_type == "text_time"


# ---------------------------------------------------------------------------------------------
# What is not SDXL base: clear errors


@pytest.fixture(scope="module")
def sdxl_file(tiny_sdxl, tmp_path_factory):
    path = tmp_path_factory.mktemp("file") / "sdxl.safetensors"
    return load_file(export_single_file(load_pipeline(tiny_sdxl), path, fp16=False))


def test_refiner_and_inpainting_files_are_refused(sdxl_file, tmp_path):
    # the refiner keeps its only text encoder, OpenCLIP ViT-bigG, as embedder 0
    refiner = {k.replace(load_weights.SDXL_TEXT_PREFIX_2, "conditioner.embedders.0.model."): v
               for k, v in sdxl_file.items() if not k.startswith(load_weights.SDXL_TEXT_PREFIX)}
    inpainting = dict(sdxl_file)
    conv_in = inpainting["model.diffusion_model.input_blocks.0.0.weight"]
    inpainting["model.diffusion_model.input_blocks.0.0.weight"] = torch.cat([conv_in, conv_in, conv_in[:, :1]], dim=1)
    no_text = {k: v for k, v in sdxl_file.items() if not k.startswith("conditioner.")}
    no_text["conditioner.embedders.0.x"] = torch.zeros(1)
    for name, state, match in (("refiner", refiner, "SDXL refiner.*not supported"),
                               ("inpainting", inpainting, "SDXL inpainting model.*9 input channels"),
                               ("odd", no_text, "text encoders are not under 'conditioner.embedders.0.transformer.'")):
        save_file(state, tmp_path / f"{name}.safetensors")
        with pytest.raises(LoadError, match=match):
            load_pipeline(tmp_path / f"{name}.safetensors")


def test_family_and_config_must_agree(sdxl_file, tiny_sdxl, tiny_sd1, tmp_path):
    save_file(sdxl_file, tmp_path / "sdxl.safetensors")
    with pytest.raises(LoadError, match="is an SDXL file, but the config"):
        load_pipeline(tmp_path / "sdxl.safetensors", config=tiny_sd1)
    sd1 = export_single_file(load_pipeline(tiny_sd1), tmp_path / "sd1.safetensors")
    with pytest.raises(LoadError, match="is an SD 1.x/2.x file, but the config"):
        load_pipeline(sd1, config=tiny_sdxl)


@pytest.mark.parametrize("change, match", [
    ("refiner", "SDXL refiner"),
    ("no text_encoder_2", "no text_encoder_2"),
    ("text_encoder_2 beside an SD UNet", "only SDXL base has two text encoders"),
    ("refiner conditioning", "not SDXL base's.*refiner"),
    ("inpainting UNet", "inpainting"),
])
def test_folders_that_are_not_sdxl_base_are_refused(tiny_sdxl, tiny_sd1, tmp_path, change, match):
    folder = shutil.copytree(tiny_sdxl, tmp_path / "m")
    unet_json = folder / "unet" / "config.json"
    unet_cfg = json.loads(unet_json.read_text())
    if change == "refiner":  # text_encoder_2 and its tokenizer only
        shutil.rmtree(folder / "text_encoder")
        shutil.rmtree(folder / "tokenizer")
    elif change == "no text_encoder_2":
        shutil.rmtree(folder / "text_encoder_2")
    elif change == "text_encoder_2 beside an SD UNet":
        folder = shutil.copytree(tiny_sd1, tmp_path / "sd1")
        shutil.copytree(tiny_sdxl / "text_encoder_2", folder / "text_encoder_2")
        shutil.copytree(tiny_sdxl / "tokenizer_2", folder / "tokenizer_2")
    elif change == "refiner conditioning":  # an aesthetic score in place of the target size: 5 numbers
        unet_json.write_text(json.dumps({**unet_cfg, "projection_class_embeddings_input_dim": 40 + 5 * 8}))
    else:
        unet_json.write_text(json.dumps({**unet_cfg, "in_channels": 9}))
    with pytest.raises(LoadError, match=match):
        load_pipeline(folder)
