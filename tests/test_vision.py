"""vision.py: the hand-written DINO ViT and CLIP towers against transformers (ViTModel, CLIPModel)
on tiny random weights, full-size key/shape checks on the meta device, preprocessing, and the
loaders' layouts and error messages."""
import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

import vision
from clip_text import CLIPTokenizer
from clip_vocab import write_hub_tokenizer
from load_weights import LoadError

TOL = 1e-5  # fp32 max abs error of our encoders against transformers'
PROMPTS = ["a photo of a dog", "a red backpack in the jungle", "a cube shaped teapot on top of a mirror, 4k"]

TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                image_size=32, patch_size=8)
TINY_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def perturb(model, seed):
    """transformers initialises LayerNorms to (1, 0) and some tensors to zero: make every weight count."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def reference_vit(seed=0, pooler=False, **overrides):
    from transformers import ViTConfig, ViTModel
    torch.manual_seed(seed)
    return perturb(ViTModel(ViTConfig(**{**TINY_VIT, **overrides}), add_pooling_layer=pooler), seed)


def reference_clip(seed=0, hidden_act="quick_gelu"):
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    config = CLIPConfig(text_config=dict(TINY_TOWER, hidden_act=hidden_act),
                        vision_config=dict(TINY_TOWER, hidden_act=hidden_act, image_size=32, patch_size=8),
                        projection_dim=16)
    return perturb(CLIPModel(config), seed)


def write_tiny_dino(folder, seed=0, **kwargs):
    """A tiny random DINO-style ViT saved by transformers (the Hub layout). Returns (folder, model)."""
    model = reference_vit(seed, **kwargs)
    model.save_pretrained(folder)
    return folder, model


def write_tiny_clip(folder, seed=0, pad="<|endoftext|>", **kwargs):
    """A tiny random CLIPModel saved by transformers, with a CLIP tokenizer folder beside it."""
    model = reference_clip(seed, **kwargs)
    model.save_pretrained(folder)
    write_hub_tokenizer(folder, pad=pad)
    return folder, model


def images(seed=0, n=2, size=32):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_err(a, b):
    return (a - b).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Parity on tiny random weights


@pytest.mark.parametrize("qkv_bias", [True, False])
@pytest.mark.parametrize("pooler", [False, True])
def test_dino_vit_matches_transformers(tmp_path, qkv_bias, pooler):
    folder, ref = write_tiny_dino(tmp_path / "dino", pooler=pooler, qkv_bias=qkv_bias)
    ours = vision.load_dino(folder)
    x = images()
    with torch.no_grad():
        expected = ref(pixel_values=x).last_hidden_state[:, 0]  # DINO's embedding: CLS after the final LN
        got = ours(x)
    assert got.shape == (2, 32)
    assert max_err(got, expected) <= TOL, f"DINO embedding differs by {max_err(got, expected)} (tol {TOL})"
    assert max_err(got[0], got[1]) > 1e-3  # the two images give different embeddings


@pytest.mark.parametrize("hidden_act", ["quick_gelu", "gelu"])
def test_clip_towers_match_transformers(tmp_path, hidden_act):
    folder, ref = write_tiny_clip(tmp_path / "clip", hidden_act=hidden_act)
    vision_tower, text_tower, tokenizer = vision.load_clip(folder)
    x, ids = images(1), tokenizer(PROMPTS)
    with torch.no_grad():
        expected_image = ref.get_image_features(pixel_values=x).pooler_output
        expected_text = ref.get_text_features(input_ids=ids).pooler_output
        got_image, got_text = vision_tower(x), text_tower(ids)
    assert got_image.shape == (2, 16) and got_text.shape == (3, 16)
    assert max_err(got_image, expected_image) <= TOL, f"image embedding differs by {max_err(got_image, expected_image)}"
    assert max_err(got_text, expected_text) <= TOL, f"text embedding differs by {max_err(got_text, expected_text)}"


def test_clip_text_pools_at_end_token_with_either_padding(tmp_path):
    """SD1 pads with <|endoftext|>, SD2 with "!" (id 0): both pool at the first end token, as
    transformers does (random encoders read the SD pipeline's tokenizer)."""
    folder, ref = write_tiny_clip(tmp_path / "clip")
    _, text_tower, _ = vision.load_clip(folder)
    write_hub_tokenizer(tmp_path / "sd2_tokenizer", pad="!")
    sd2 = CLIPTokenizer.from_folder(tmp_path / "sd2_tokenizer")
    ids = sd2(PROMPTS)
    assert (ids == 0).any()
    with torch.no_grad():
        expected = ref.get_text_features(input_ids=ids).pooler_output
        got = text_tower(ids)
        # the prompt's end decides, not the padding after it
        assert max_err(got, text_tower(torch.where(ids == 0, 49407, ids))) <= TOL
    assert max_err(got, expected) <= TOL


def test_clip_vision_model_with_projection_file_loads(tmp_path):
    """transformers' CLIPVisionModelWithProjection has our image tower's names exactly."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(0)
    ref = perturb(CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_TOWER, image_size=32, patch_size=8,
                                                                 projection_dim=16)), 3)
    config = vision.CLIPConfig(vision_config=vision.CLIPVisionConfig(**TINY_TOWER, image_size=32, patch_size=8),
                               projection_dim=16)
    ours = vision.build_encoder(vision.CLIPVisionModelWithProjection, config, ref.state_dict(), "test")
    with torch.no_grad():
        assert max_err(ours(images()), ref(pixel_values=images()).image_embeds) <= TOL


# ----------------------------------------------------------------------------------------------
# Hub layouts


# transformers >= 5 renames ViT's modules in memory and back to the Hub names when saving; the
# Hub names from the in-memory ones (the inverse of transformers' ViTModel conversion rules):
VIT_HUB_NAMES = [(r"^layers\.", "encoder.layer."), (r"\.attention\.q_proj\.", ".attention.attention.query."),
                 (r"\.attention\.k_proj\.", ".attention.attention.key."),
                 (r"\.attention\.v_proj\.", ".attention.attention.value."),
                 (r"\.attention\.o_proj\.", ".attention.output.dense."), (r"\.mlp\.fc1\.", ".intermediate.dense."),
                 (r"\.mlp\.fc2\.", ".output.dense.")]


def vit_hub_name(key):
    for pattern, replacement in VIT_HUB_NAMES:
        key = re.sub(pattern, replacement, key)
    return key


def test_vit_hub_names_are_what_transformers_saves(tmp_path):
    folder, ref = write_tiny_dino(tmp_path / "dino")
    saved = load_file(folder / "model.safetensors")
    assert {vit_hub_name(k) for k in ref.state_dict()} == set(saved)
    with torch.device("meta"):
        ours = vision.ViTModel(vision.ViTConfig(**TINY_VIT))
    assert set(ours.state_dict()) == set(saved)


def shapes(state):
    return {k: tuple(v.shape) for k, v in state.items()}


def test_full_size_dino_vits16_keys_and_shapes():
    from transformers import ViTConfig, ViTModel
    config = vision.PRESETS["facebook/dino-vits16"]
    with torch.device("meta"):
        ref = ViTModel(ViTConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
                                 num_attention_heads=6, patch_size=16, image_size=224), add_pooling_layer=False)
        ours = vision.ViTModel(config)
    assert shapes(ours.state_dict()) == {vit_hub_name(k): s for k, s in shapes(ref.state_dict()).items()}
    assert ours.state_dict()["embeddings.position_embeddings"].shape == (1, 197, 384)  # 14 x 14 patches + CLS


@pytest.mark.parametrize("name,vision_config,text_config,projection_dim", [
    ("openai/clip-vit-base-patch32", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                          num_attention_heads=12, patch_size=32),
     dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=8), 512),
    ("openai/clip-vit-large-patch14", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                           num_attention_heads=16, patch_size=14),
     dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12), 768),
])
def test_full_size_clip_keys_and_shapes(name, vision_config, text_config, projection_dim):
    from transformers import CLIPConfig, CLIPModel
    config = vision.PRESETS[name]
    with torch.device("meta"):
        ref = CLIPModel(CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=projection_dim))
        towers = {**vision.CLIPVisionModelWithProjection(config).state_dict(),
                  **vision.CLIPTextModelWithProjection(config).state_dict()}
    expected = shapes(ref.state_dict())
    del expected["logit_scale"]  # the temperature: not needed for cosine similarities
    assert shapes(towers) == expected


def test_old_hub_layout_bin_with_buffers_and_config_dicts(tmp_path):
    """Older Hub CLIP repos: pytorch_model.bin (read with weights_only), position_ids buffers,
    logit_scale, and text_config_dict / vision_config_dict beside the full sub-configs."""
    folder, ref = write_tiny_clip(tmp_path / "new")
    state = load_file(folder / "model.safetensors")
    state["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None]
    state["vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    old = tmp_path / "old"
    old.mkdir()
    torch.save(state, old / "pytorch_model.bin")
    config = json.loads((folder / "config.json").read_text())
    config["text_config_dict"] = dict(config["text_config"])
    config["text_config"] = {**config["text_config"], "hidden_size": 999}  # overridden by text_config_dict
    config["vision_config_dict"] = None
    (old / "config.json").write_text(json.dumps(config))
    write_hub_tokenizer(old)
    vision_tower, text_tower, tokenizer = vision.load_clip(old)
    ids = tokenizer(PROMPTS)
    with torch.no_grad():
        assert max_err(text_tower(ids), ref.get_text_features(input_ids=ids).pooler_output) <= TOL
        assert max_err(vision_tower(images()), ref.get_image_features(pixel_values=images()).pooler_output) <= TOL


def test_vit_prefix_accepted(tmp_path):
    """Files saved from a ViT with a head keep the backbone under `vit.`."""
    folder, ref = write_tiny_dino(tmp_path / "dino")
    state = load_file(folder / "model.safetensors")
    (tmp_path / "prefixed").mkdir()
    save_file({"vit." + k: v for k, v in state.items()}, tmp_path / "prefixed" / "model.safetensors")
    (tmp_path / "prefixed" / "config.json").write_text((folder / "config.json").read_text())
    with torch.no_grad():
        assert max_err(vision.load_dino(tmp_path / "prefixed")(images()), vision.load_dino(folder)(images())) == 0


# ----------------------------------------------------------------------------------------------
# Errors at the boundary


def test_missing_and_extra_keys_are_named(tmp_path):
    folder, _ = write_tiny_dino(tmp_path / "dino")
    state = load_file(folder / "model.safetensors")
    del state["layernorm.weight"]
    state["head.weight"] = torch.zeros(3)
    save_file(state, folder / "model.safetensors")
    with pytest.raises(LoadError, match=r"missing \(1\): layernorm.weight[\s\S]*unexpected \(1\): head.weight"):
        vision.load_dino(folder)


def test_shape_mismatch_is_named(tmp_path):
    folder, _ = write_tiny_dino(tmp_path / "dino")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    with pytest.raises(LoadError, match="intermediate.dense.weight has shape"):
        vision.load_dino(folder)


def test_clip_leftover_tensors_and_missing_tokenizer(tmp_path):
    folder, _ = write_tiny_clip(tmp_path / "clip")
    state = load_file(folder / "model.safetensors")
    save_file({**state, "extra.weight": torch.zeros(2)}, folder / "model.safetensors")
    with pytest.raises(LoadError, match="neither tower.*extra.weight"):
        vision.load_clip(folder)
    save_file(state, folder / "model.safetensors")
    (folder / "merges.txt").unlink()
    with pytest.raises(LoadError, match="merges.txt is missing"):
        vision.load_clip(folder)


def test_configs_refuse_what_is_not_implemented():
    with pytest.raises(ValueError, match="model_type='dinov2'"):
        vision.ViTConfig.from_dict({"model_type": "dinov2"})
    with pytest.raises(ValueError, match="hidden_act='relu'"):
        vision.ViTConfig.from_dict({"hidden_act": "relu"})
    with pytest.raises(ValueError, match="full CLIP checkpoint"):
        vision.CLIPConfig.from_dict({"model_type": "clip_vision_model"})
    with pytest.raises(ValueError, match="image_size=30"):
        vision.CLIPConfig.from_dict({"vision_config": {"image_size": 30, "patch_size": 16}})
    config = vision.CLIPConfig.from_dict({"projection_dim": 768, "vision_config": {"patch_size": 14},
                                          "text_config": {"hidden_size": 768}, "_name_or_path": "x"})
    assert (config.projection_dim, config.vision_config.patch_size, config.text_config.hidden_size) == (768, 14, 768)


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(LoadError, match="does not exist"):
        vision.load_dino(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoadError, match="config.json is missing"):
        vision.load_dino(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(LoadError, match="model.safetensors or pytorch_model.bin"):
        vision.load_dino(tmp_path / "empty")
    # conftest sets HF_HUB_OFFLINE=1: a Hub id that is not cached fails with what to do
    with pytest.raises(LoadError, match="random_encoders"):
        vision.load_dino("someone/not-a-cached-dino")


# ----------------------------------------------------------------------------------------------
# Preprocessing and random encoders


def test_preprocess_resizes_crops_and_normalises():
    # 90 x 30: three 30-px colour bands; the shorter side is already 30, so the centre crop is the middle band
    image = Image.new("RGB", (90, 30), (255, 0, 0))
    image.paste((10, 200, 60), (30, 0, 60, 30))
    image.paste((0, 0, 255), (60, 0, 90, 30))
    x = vision.preprocess([image], 30, vision.IMAGENET_MEAN, vision.IMAGENET_STD)
    assert x.shape == (1, 3, 30, 30)
    expected = (np.array([10, 200, 60]) / 255 - np.array(vision.IMAGENET_MEAN)) / np.array(vision.IMAGENET_STD)
    assert np.allclose(x[0].mean(dim=(1, 2)).numpy(), expected, atol=1e-6)
    assert np.allclose(x[0].std(dim=(1, 2)).numpy(), 0, atol=1e-6)
    # a tall grey image is resized (shorter side 20 -> 10) and cropped to 10 x 10
    y = vision.preprocess([Image.new("L", (20, 50), 128)], 10, vision.CLIP_MEAN, vision.CLIP_STD)
    assert y.shape == (1, 3, 10, 10)
    assert np.allclose(y[0, :, 0, 0].numpy(), (128 / 255 - np.array(vision.CLIP_MEAN)) / np.array(vision.CLIP_STD), atol=1e-6)


def test_random_encoders_are_seeded_and_leave_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = vision.random_encoder(vision.ViTModel, vision.TINY_DINO, seed=0)
    b = vision.random_encoder(vision.ViTModel, vision.TINY_DINO, seed=0)
    c = vision.random_encoder(vision.ViTModel, vision.TINY_DINO, seed=1)
    assert torch.equal(torch.random.get_rng_state(), before)
    x = images(size=64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x)) and max_err(a(x), c(x)) > 1e-3
