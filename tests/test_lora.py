"""lora.py: the adapted layer, injection, merging, and both file formats. The oracle is diffusers
with peft: StableDiffusionPipeline.load_lora_weights on the same tiny random base model."""
import json

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lora import (LORA_FILE, TEXT_ENCODER_TARGETS, UNET_FF_TARGETS, UNET_TARGETS, LoRAConv2d,
                  LoRALinear, apply_lora, inject_lora, load_lora, load_lora_state_dict,
                  lora_layers, lora_parameters, lora_state_dict, merge_lora, parse_lora_spec,
                  remove_lora, save_lora, trainable_parameter_count, unmerge_lora)
from load_weights import LoadError, load_pipeline

TOL = 1e-5        # fp32 max abs error: our adapted pipeline vs diffusers with the same LoRA file
# fp32 max abs error, relative to the output's largest value: merged weight vs the adapter
# computed beside the base layer (a few float32 roundings of one sum: ~8 ulps)
MERGE_TOL = 1e-6
# Every kind of layer LoRA adapts here: attention and feed-forward Linears, proj_in / proj_out
# (1x1 convs in SD1, Linears in SD2) and the resnets' 3x3 conv1.
UNET_MORE = UNET_FF_TARGETS + ("proj_in", "proj_out", "conv1")


def diffusers_pipeline(folder):
    from diffusers import StableDiffusionPipeline
    return StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)


def randomize(model, seed):
    """Non-zero B (B = 0 would make every comparison trivially pass)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_up.weight.copy_(torch.randn(layer.lora_up.weight.shape, generator=g) * 0.1)


def adapt(pipeline, seed=0, heterogeneous=True):
    """Adapters with alpha != rank on the UNet and the text encoder; with `heterogeneous`, the
    UNet's other layers get another rank and alpha (peft's rank_pattern / alpha_pattern)."""
    inject_lora(pipeline.unet, UNET_TARGETS, rank=4, alpha=8)
    inject_lora(pipeline.unet, UNET_MORE, rank=2, alpha=3 if heterogeneous else 8)
    inject_lora(pipeline.text_encoder, TEXT_ENCODER_TARGETS, rank=2, alpha=0.5)
    randomize(pipeline.unet, seed)
    randomize(pipeline.text_encoder, seed + 1)


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 49406, (2, 77), generator=g)
    return ids, torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 900])


@torch.no_grad()
def ours_out(pipeline, seed=0):
    ids, latents, t = inputs(seed)
    return pipeline.unet(latents, t, pipeline.text_encoder(ids))


@torch.no_grad()
def ref_out(pipe, seed=0):
    ids, latents, t = inputs(seed)
    return pipe.unet(latents, t, pipe.text_encoder(ids).last_hidden_state).sample


def assert_states_equal(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------------------------
# The layer


LAYERS = {"linear": (lambda: nn.Linear(12, 10), (3, 5, 12)),
          "conv3x3": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=1), (2, 6, 9, 9)),
          "conv1x1": (lambda: nn.Conv2d(6, 8, 1), (2, 6, 5, 5))}


@pytest.mark.parametrize("kind", LAYERS)
def test_zero_update_is_the_base_layer_exactly(kind):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    base = make()
    x = torch.randn(shape)
    expected = base(x)
    layer = (LoRAConv2d if "conv" in kind else LoRALinear)(base, rank=3, alpha=7)
    assert torch.equal(layer(x), expected)  # B = 0 at the start: exactly the pretrained layer
    assert layer.weight is base.weight and layer.bias is base.bias


def test_init_is_kaiming_uniform_a_sqrt5_and_b_zero():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(400, 300), rank=64)
    a = layer.lora_down.weight
    bound = 1 / 400 ** 0.5  # kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), peft's default
    assert a.shape == (64, 400) and layer.lora_up.weight.shape == (300, 64)
    assert a.abs().max() <= bound and a.abs().max() > 0.99 * bound
    assert abs(a.std().item() - bound / 3 ** 0.5) < 0.02 * bound  # uniform, not normal(1/r)
    assert torch.equal(layer.lora_up.weight, torch.zeros(300, 64))
    assert layer.alpha == 64.0 and layer.factor == 1.0  # alpha defaults to the rank


@pytest.mark.parametrize("kind", LAYERS)
def test_forward_is_w0x_plus_alpha_over_r_bax(kind):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    base = make()
    layer = (LoRAConv2d if "conv" in kind else LoRALinear)(base, rank=3, alpha=7)
    nn.init.normal_(layer.lora_up.weight)
    layer.scale = 0.5
    x = torch.randn(shape)
    with torch.no_grad():
        update = layer.lora_up(layer.lora_down(x))
        err = (layer(x) - (base(x) + 0.5 * 7 / 3 * update)).abs().max().item()
    assert err <= 1e-6, err


@pytest.mark.parametrize("kind", LAYERS)
def test_merge_matches_adapter_and_unmerge_restores_bit_for_bit(kind):
    torch.manual_seed(0)
    make, shape = LAYERS[kind]
    layer = (LoRAConv2d if "conv" in kind else LoRALinear)(make(), rank=3, alpha=5)
    nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(shape)
    original = layer.weight.detach().clone()
    with torch.no_grad():
        expected = layer(x)
        layer.merge()
        assert not torch.equal(layer.weight, original)
        err = (layer(x) - expected).abs().max().item()
        assert err <= MERGE_TOL * expected.abs().max(), f"merged forward differs by {err}"
        assert set(layer.state_dict()) == {"weight", "bias", "lora_down.weight", "lora_up.weight"}  # copy not saved
        layer.unmerge()
    assert torch.equal(layer.weight, original)
    assert torch.equal(layer(x), expected)


def test_dropout_acts_on_the_adapter_input_in_train_mode_only():
    torch.manual_seed(0)
    base = nn.Linear(64, 64)
    layer = LoRALinear(base, rank=4, dropout=0.5)
    nn.init.normal_(layer.lora_up.weight)
    x = torch.randn(8, 64)
    with torch.no_grad():
        assert not torch.equal(layer.train()(x), layer(x))  # two dropout masks
        assert torch.equal(layer.eval()(x), layer(x))
        layer.lora_up.weight.zero_()
        assert torch.equal(layer.train()(x), base(x))  # the base path never drops


def test_merge_of_a_bf16_base_weight_rounds_once():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 8).to(torch.bfloat16), rank=2)
    nn.init.normal_(layer.lora_up.weight)
    original = layer.weight.detach().clone()
    delta = layer.lora_up.weight @ layer.lora_down.weight
    layer.merge()
    assert torch.equal(layer.weight, (original.float() + delta).to(torch.bfloat16))
    layer.unmerge()
    assert torch.equal(layer.weight, original)


# ----------------------------------------------------------------------------------------------
# Adapting the models


def test_inject_freezes_everything_but_the_adapters(tiny_sd1):
    pipeline = load_pipeline(tiny_sd1)
    base_keys = set(pipeline.unet.state_dict())
    before = ours_out(pipeline)
    layers = inject_lora(pipeline.unet, UNET_TARGETS, rank=4)
    inject_lora(pipeline.text_encoder, TEXT_ENCODER_TARGETS, rank=2, dropout=0.1)
    assert torch.equal(ours_out(pipeline), before)  # B = 0 (and dropout is off in eval mode)
    assert set(layers) == {n for n, _ in pipeline.unet.named_modules()
                           if n.endswith((".to_q", ".to_k", ".to_v", ".to_out.0"))}
    assert len(layers) == 4 * 2 * 6  # 4 projections x 2 attentions x (2 down + 1 mid + 3 up) blocks
    for model in (pipeline.unet, pipeline.text_encoder):
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_down." in n or ".lora_up." in n for n in trainable)
        assert {id(p) for p in lora_parameters(model)} == {id(p) for p in model.parameters() if p.requires_grad}
    # the base weights keep their names: the model still saves and loads as diffusers' UNet
    assert base_keys == {k for k in pipeline.unet.state_dict() if ".lora_" not in k}
    assert trainable_parameter_count(pipeline.unet) == sum(
        4 * (m.in_features + m.out_features) for m in layers.values())
    # At step 0 (B = 0) only B receives a gradient: dL/dA = B^T (dL/dh) x^T = 0.
    ids, latents, t = inputs()
    pipeline.unet(latents, t, pipeline.text_encoder(ids)).square().mean().backward()
    for layer in layers.values():
        assert layer.lora_up.weight.grad.abs().max() > 0
        assert torch.equal(layer.lora_down.weight.grad, torch.zeros_like(layer.lora_down.weight))
    assert all(p.grad is None for n, p in pipeline.unet.named_parameters() if ".lora_" not in n)


def test_inject_errors(tiny_sd1):
    unet = load_pipeline(tiny_sd1).unet
    with pytest.raises(ValueError, match="matches the LoRA targets"):
        inject_lora(unet, ("q_proj",))  # a text-encoder name
    with pytest.raises(ValueError, match="LoRA adapts nn.Linear and nn.Conv2d"):
        inject_lora(unet, ("ff.net.0",))  # the GEGLU module, not its Linear
    inject_lora(unet, UNET_TARGETS)
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(unet, ("to_q",))


def test_merge_unmerge_and_remove_on_the_whole_model(tiny_sd2):
    pipeline = load_pipeline(tiny_sd2)
    base_keys = set(pipeline.unet.state_dict())
    before = ours_out(pipeline)
    weights = {k: v.clone() for k, v in pipeline.unet.state_dict().items()}
    adapt(pipeline)
    adapted = ours_out(pipeline)
    assert (adapted - before).abs().max() > 1e-2  # the adapters do something
    merge_lora(pipeline.unet)
    merge_lora(pipeline.text_encoder)
    err = (ours_out(pipeline) - adapted).abs().max().item()
    assert err <= 1e-5, f"merged UNet + text encoder differ by {err}"  # fp32, after 2 models of rounding
    unmerge_lora(pipeline.unet)
    assert all(torch.equal(pipeline.unet.state_dict()[k], v) for k, v in weights.items())
    remove_lora(pipeline.unet, merge=False)
    assert set(pipeline.unet.state_dict()) == base_keys and not lora_layers(pipeline.unet)
    remove_lora(pipeline.text_encoder, merge=True)
    assert not any(isinstance(m, LoRALinear) for m in pipeline.text_encoder.modules())
    expected = load_pipeline(tiny_sd2)
    expected.text_encoder = pipeline.text_encoder  # adapted text encoder, base UNet
    assert torch.equal(ours_out(pipeline), ours_out(expected))


# ----------------------------------------------------------------------------------------------
# Files


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_file_round_trip_is_exact(tiny_sd1, tmp_path, fmt):
    pipeline = load_pipeline(tiny_sd1)
    adapt(pipeline, heterogeneous=True)  # two ranks and two alphas in one UNet, alpha != rank
    path = save_lora(tmp_path, pipeline.unet, pipeline.text_encoder, fmt=fmt)
    assert path == tmp_path / LORA_FILE
    states, detected = load_lora(tmp_path, pipeline.unet, pipeline.text_encoder)
    assert detected == fmt
    assert_states_equal(states["unet"], lora_state_dict(pipeline.unet))
    assert_states_equal(states["text_encoder"], lora_state_dict(pipeline.text_encoder))
    alphas = {float(v) for k, v in states["unet"].items() if k.endswith(".alpha")}
    assert alphas == {8.0, 3.0} and float(states["text_encoder"][
        "text_model.encoder.layers.0.self_attn.q_proj.alpha"]) == 0.5
    # into a fresh copy of the base: the same model, exactly
    fresh = load_pipeline(tiny_sd1)
    apply_lora(fresh, tmp_path, merge=False)
    assert torch.equal(ours_out(fresh), ours_out(pipeline))


def test_file_key_names(tiny_sd1, tmp_path):
    pipeline = load_pipeline(tiny_sd1)
    adapt(pipeline)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    diffusers = load_file(save_lora(tmp_path / "d.safetensors", pipeline.unet, pipeline.text_encoder))
    assert diffusers[f"unet.{block}.attn1.to_q.lora_A.weight"].shape == (4, 32)
    assert diffusers[f"unet.{block}.attn1.to_out.0.lora_B.weight"].shape == (32, 4)
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in diffusers
    with safe_open(tmp_path / "d.safetensors", "pt") as f:
        config = json.loads(f.metadata()["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 8 and config["text_encoder.lora_alpha"] == 0.5
    kohya = load_file(save_lora(tmp_path / "k.safetensors", pipeline.unet, pipeline.text_encoder, fmt="kohya"))
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert kohya[f"{name}.lora_down.weight"].shape == (4, 32) and kohya[f"{name}.lora_up.weight"].shape == (32, 4)
    assert kohya[f"{name}.alpha"].ndim == 0 and kohya[f"{name}.alpha"].item() == 8.0
    assert "lora_te_text_model_encoder_layers_1_self_attn_out_proj.alpha" in kohya
    assert all(k.startswith(("lora_unet_", "lora_te_")) for k in kohya)


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_matches_diffusers_load_lora_weights(tiny_folder, tmp_path, fmt):
    pipeline = load_pipeline(tiny_folder)
    base = ours_out(pipeline)
    # diffusers reads per-layer alphas from kohya files into misnamed alpha patterns, so kohya
    # files get one alpha per model (ranks still differ)
    adapt(pipeline, heterogeneous=fmt == "diffusers")
    save_lora(tmp_path, pipeline.unet, pipeline.text_encoder, fmt=fmt)
    ref = diffusers_pipeline(tiny_folder)
    ref.load_lora_weights(tmp_path)
    ours = ours_out(pipeline)
    err = (ours - ref_out(ref)).abs().max().item()
    assert err <= TOL, f"{fmt}: our adapted UNet + text encoder differ from diffusers' by {err}"
    assert (ours - base).abs().max() > 1000 * TOL  # the LoRA changes the output well beyond TOL
    # the same file applied by us to a fresh base, merged into the weights
    fresh = load_pipeline(tiny_folder)
    assert apply_lora(fresh, tmp_path) == fmt
    assert not lora_layers(fresh.unet)  # merged: plain layers
    err = (ours_out(fresh) - ref_out(ref)).abs().max().item()
    assert err <= TOL, f"{fmt}: merged LoRA differs from diffusers' by {err}"


@pytest.mark.parametrize("merge", [True, False])
def test_scale_matches_diffusers_adapter_weight(tiny_sd1, tmp_path, merge):
    pipeline = load_pipeline(tiny_sd1)
    adapt(pipeline)
    save_lora(tmp_path, pipeline.unet, pipeline.text_encoder)
    ref = diffusers_pipeline(tiny_sd1)
    ref.load_lora_weights(tmp_path, adapter_name="subject")
    ref.set_adapters(["subject"], adapter_weights=[0.4])
    ours = load_pipeline(tiny_sd1)
    apply_lora(ours, tmp_path, scale=0.4, merge=merge)
    err = (ours_out(ours) - ref_out(ref)).abs().max().item()
    assert err <= TOL, f"scale 0.4 (merge={merge}) differs from diffusers' adapter weight by {err}"


@pytest.mark.parametrize("with_metadata", [True, False])
def test_reads_files_written_by_diffusers(tiny_sd1, tmp_path, with_metadata):
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    ref = diffusers_pipeline(tiny_sd1)
    torch.manual_seed(0)
    # init_lora_weights=False: B random too. Without metadata diffusers assumes alpha = r. With
    # transformers >= 5 the text-encoder keys lack text_model. (text_encoder.encoder.layers...).
    alpha = 3 if with_metadata else 4
    unet_config = LoraConfig(r=4, lora_alpha=alpha, init_lora_weights=False,
                             target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"])
    text_config = LoraConfig(r=2, lora_alpha=alpha / 2, init_lora_weights=False,
                             target_modules=["q_proj", "k_proj", "v_proj", "out_proj", "fc1"])
    ref.unet.add_adapter(unet_config)
    ref.text_encoder.add_adapter(text_config)
    metadata = {} if not with_metadata else dict(
        unet_lora_adapter_metadata={**unet_config.to_dict(), "base_model_name_or_path": None},
        text_encoder_lora_adapter_metadata={**text_config.to_dict(), "base_model_name_or_path": None})
    StableDiffusionPipeline.save_lora_weights(
        tmp_path, unet_lora_layers=get_peft_model_state_dict(ref.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(ref.text_encoder), **metadata)
    ours = load_pipeline(tiny_sd1)
    assert apply_lora(ours, tmp_path, merge=False) == "diffusers"
    assert {m.alpha for m in lora_layers(ours.unet).values()} == {float(alpha)}
    err = (ours_out(ours) - ref_out(ref)).abs().max().item()
    assert err <= TOL, f"diffusers-written LoRA: ours differs by {err}"


# ----------------------------------------------------------------------------------------------
# Bad files


def test_lora_for_another_base_names_the_tensor_and_both_shapes(tiny_sd1, tiny_sd2, tmp_path):
    sd1 = load_pipeline(tiny_sd1)
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    inject_lora(sd1.unet, (layer,), rank=4)
    for fmt, key in (("diffusers", f"unet.{layer}.lora_A.weight"),
                     ("kohya", f"lora_unet_{layer.replace('.', '_')}.lora_down.weight")):
        path = save_lora(tmp_path / f"{fmt}.safetensors", sd1.unet, fmt=fmt)
        sd2 = load_pipeline(tiny_sd2)  # cross-attention context 48 wide, not 32
        with pytest.raises(LoadError) as e:
            apply_lora(sd2, path)
        assert f"{key} has shape (4, 32), but this UNet's layer (weight (32, 48)) needs (4, 48)" in str(e.value)
        assert "made for another base model" in str(e.value)
    sd1, sd2 = load_pipeline(tiny_sd1), load_pipeline(tiny_sd2)
    adapt(sd1)
    path = save_lora(tmp_path / "full.safetensors", sd1.unet, fmt="kohya")
    with pytest.raises(LoadError, match="tensors name no layer that LoRA can adapt in this model: "
                                        "lora_unet_down_blocks_0_attentions_1_"):
        apply_lora(sd2, path)  # SD1's second attention of block 0: SD2's tiny UNet has one


def test_full_model_passed_as_lora(tiny_sd1, tmp_path):
    pipeline = load_pipeline(tiny_sd1)
    with pytest.raises(LoadError, match=r"holds no LoRA weights .* It looks like a full model: pass it "
                                        r"as the model \(--model\), not as a LoRA"):
        apply_lora(pipeline, tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LoadError, match="is a model folder, not a LoRA"):
        apply_lora(pipeline, tiny_sd1)
    with pytest.raises(LoadError, match="does not exist"):
        apply_lora(pipeline, tmp_path / "missing.safetensors")


def test_unknown_and_unsupported_keys(tiny_sd1, tmp_path):
    pipeline = load_pipeline(tiny_sd1)
    adapt(pipeline)
    good = load_file(save_lora(tmp_path / "good.safetensors", pipeline.unet, pipeline.text_encoder, fmt="kohya"))
    cases = {
        "typo": ({**good, "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_z.lora_down.weight":
                  torch.zeros(4, 64)}, "1 tensors name no layer that LoRA can adapt in this model: lora_unet_mid"),
        "ldm": ({"lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 32)},
                "original SD modules' \\(input_blocks"),
        "sdxl": ({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.zeros(4, 32)},
                 "is an SDXL LoRA"),
        "mixed": ({**good, "conv_in.weight": torch.zeros(32, 4, 3, 3)}, "unknown LoRA layout"),
        "half": ({k: v for k, v in good.items() if "lora_up" not in k}, r"has no matching up \(B\) tensor"),
        "old diffusers": ({"unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight":
                           torch.zeros(4, 64)}, "layout from before peft"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, path)
        with pytest.raises(LoadError, match=message):
            load_lora(path, pipeline.unet, pipeline.text_encoder)
    with pytest.raises(LoadError, match="adapts the text encoder too: pass the text encoder"):
        load_lora(tmp_path / "good.safetensors", pipeline.unet)
    with pytest.raises(ValueError, match="unknown LoRA format"):
        save_lora(tmp_path, pipeline.unet, fmt="a1111")


def test_parse_lora_spec():
    assert parse_lora_spec("out/dog") == ("out/dog", 1.0)
    assert parse_lora_spec("out/dog/lora.safetensors:0.7") == ("out/dog/lora.safetensors", 0.7)
    assert parse_lora_spec(r"C:\loras\dog.safetensors") == (r"C:\loras\dog.safetensors", 1.0)
    assert parse_lora_spec(r"C:\loras\dog.safetensors:-1") == (r"C:\loras\dog.safetensors", -1.0)
