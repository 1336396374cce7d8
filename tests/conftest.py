"""Shared test fixtures: tiny random Stable Diffusion pipelines in the real Hub layout.

The reference models (diffusers' UNet2DConditionModel / AutoencoderKL, transformers'
CLIPTextModel) are built with tiny configs under a fixed seed and saved the way the Hub repos
are laid out: text-encoder keys under `text_model.` with a float `position_ids` buffer (as in
the SD 1.5 repo), and the tokenizer as vocab.json + merges.txt + special_tokens_map.json +
tokenizer_config.json, built from the real CLIP vocabulary.
"""
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the network

SCHEDULER_SD1 = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                 "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                 "trained_betas": None, "clip_sample": False}
SCHEDULER_SD2 = {"_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                 "set_alpha_to_one": False, "steps_offset": 1, "clip_sample": False,
                 "prediction_type": "v_prediction"}

TINY = {
    # SD1-style: conv projections, one head count, quick_gelu, pad with <|endoftext|>, epsilon.
    "sd1": dict(
        unet=dict(block_out_channels=[32, 64], layers_per_block=2, norm_num_groups=16,
                  down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                  attention_head_dim=4, sample_size=8),
        vae=dict(block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                 down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                 latent_channels=4, sample_size=16),
        text=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  hidden_act="quick_gelu", projection_dim=32),
        scheduler=SCHEDULER_SD1, pad="<|endoftext|>"),
    # SD2-style: linear projections, per-block head counts, fp32 attention, gelu, pad with "!",
    # v-prediction; three levels so that the up path has an attention block with an upsampler.
    "sd2": dict(
        unet=dict(block_out_channels=[32, 32, 64], layers_per_block=1, norm_num_groups=16,
                  down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                  up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                  cross_attention_dim=48, attention_head_dim=[2, 4, 4], use_linear_projection=True,
                  upcast_attention=True, sample_size=8),
        vae=dict(block_out_channels=[16, 32, 32], layers_per_block=2, norm_num_groups=8,
                 down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                 latent_channels=4, sample_size=32),
        text=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                  hidden_act="gelu", projection_dim=48),
        scheduler=SCHEDULER_SD2, pad="!"),
}


def make_tiny_pipeline(folder, kind="sd1", seed=0):
    """Write a tiny random SD pipeline (diffusers' and transformers' own models) to `folder`
    in the Hub layout, and return the folder."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from clip_vocab import write_hub_tokenizer

    spec = TINY[kind]
    folder = Path(folder)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**spec["unet"])
    vae = AutoencoderKL(**spec["vae"])
    text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, max_position_embeddings=77,
                                                bos_token_id=49406, eos_token_id=49407,
                                                pad_token_id=1, **spec["text"]))
    with torch.no_grad():  # diffusers zero-initialises some layers: make every path count
        for p in list(unet.parameters()) + list(vae.parameters()):
            p.add_(torch.randn_like(p) * 0.02)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    (folder / "text_encoder").mkdir(parents=True, exist_ok=True)
    text_encoder.config.to_json_file(folder / "text_encoder" / "config.json")
    state = {"text_model." + k: v.contiguous() for k, v in text_encoder.state_dict().items()
             if not k.endswith("position_ids")}
    if kind == "sd1":  # the SD 1.5 repo keeps this buffer, stored as float
        state["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.float32)[None]
    save_file(state, folder / "text_encoder" / "model.safetensors", metadata={"format": "pt"})
    (folder / "scheduler").mkdir(exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(spec["scheduler"]))
    write_hub_tokenizer(folder / "tokenizer", pad=spec["pad"])
    model_index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
                   "feature_extractor": [None, None], "safety_checker": [None, None],
                   "requires_safety_checker": False,
                   "scheduler": ["diffusers", spec["scheduler"]["_class_name"]],
                   "text_encoder": ["transformers", "CLIPTextModel"],
                   "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (folder / "model_index.json").write_text(json.dumps(model_index))
    return folder


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd1"), "sd1")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory):
    return make_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd2"), "sd2")


@pytest.fixture(params=["sd1", "sd2"])
def tiny_folder(request, tiny_sd1, tiny_sd2):
    return {"sd1": tiny_sd1, "sd2": tiny_sd2}[request.param]
