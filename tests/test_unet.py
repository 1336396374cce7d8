"""Tests for unet.py: parity with diffusers' UNet2DConditionModel (the test-only oracle)."""
import inspect
import json
import sys
from dataclasses import asdict, fields
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import unet as unet_module  # noqa: E402
from unet import PRESETS, UNet, UNetConfig  # noqa: E402

from diffusers import UNet2DConditionModel  # noqa: E402

# Tiny configs covering every code path.
SD1_STYLE = dict(  # 1x1-conv projections, one head count for all blocks, 1 layer per block
    block_out_channels=[32, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
    attention_head_dim=2, down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8)
SD2_STYLE = dict(  # Linear projections, per-block head list, fp32 attention, 2 layers per block
    block_out_channels=[32, 64], layers_per_block=2, norm_num_groups=16, cross_attention_dim=32,
    attention_head_dim=[2, 4], use_linear_projection=True, upcast_attention=True,
    down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], sample_size=8)
THREE_LEVEL = dict(  # 3 resolutions, 2 cross-attention levels, other sinusoid layout, 6 channels
    block_out_channels=[32, 64, 64], layers_per_block=1, norm_num_groups=8, cross_attention_dim=16,
    attention_head_dim=[1, 2, 4], in_channels=6, out_channels=5,
    flip_sin_to_cos=False, freq_shift=1,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], sample_size=8)
CONFIGS = {"sd1-style": SD1_STYLE, "sd2-style": SD2_STYLE, "three-level": THREE_LEVEL}


def make_pair(config_dict, seed=0):
    """diffusers model with random weights (+ noise on every parameter, so GroupNorm/LayerNorm
    affine and all biases differ from their 1/0 init and every path matters) and ours with the
    same weights, loaded strictly."""
    torch.manual_seed(seed)
    ref = UNet2DConditionModel(**config_dict)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ours = UNet(UNetConfig.from_dict(config_dict))
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), ours.eval()


def make_inputs(cfg: UNetConfig, batch=2, size=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, cfg.in_channels, size, size, generator=g)
    context = torch.randn(batch, 7, cfg.cross_attention_dim, generator=g)
    return latents, context


@pytest.mark.parametrize("name", CONFIGS)
def test_parity_with_diffusers_fp32(name):
    ref, ours = make_pair(CONFIGS[name])
    for p in ref.parameters():
        assert p.abs().max() > 0, "a zero parameter would hide a path from the parity check"
    latents, context = make_inputs(ours.config)
    per_sample = torch.tensor([1, 981])
    with torch.no_grad():
        for t in [per_sample, 500, torch.tensor(37.5)]:  # per sample, python scalar, 0-d tensor
            out = ours(latents, t, context)
            expected = ref(latents, t, context).sample
            assert out.shape == (2, ours.config.out_channels, 16, 16)
            err = (out - expected).abs().max().item()
            assert err <= 1e-5, f"{name}, t={t}: fp32 max abs err {err} > 1e-5"
        # A scalar timestep means the same timestep for every sample.
        scalar = ours(latents, 981, context)
        broadcast = ours(latents, torch.tensor([981, 981]), context)
        assert torch.equal(scalar, broadcast)
        # ...and per-sample timesteps really are per sample.
        mixed = ours(latents, per_sample, context)  # t = 1 and 981
        assert torch.allclose(mixed[1], scalar[1], atol=1e-6)
        assert not torch.allclose(mixed[0], scalar[0], atol=1e-3)


@pytest.mark.parametrize("name", ["sd1-style", "sd2-style"])
def test_gradient_checkpointing_same_output_and_grads(name, monkeypatch):
    _, ours = make_pair(CONFIGS[name])
    ours.train()
    latents, context = make_inputs(ours.config)
    t = torch.tensor([10, 600])

    def loss_and_grads():
        ours.zero_grad()
        out = ours(latents, t, context)
        (out.square().mean()).backward()
        return out.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    out_plain, grads_plain = loss_and_grads()

    calls = []
    real_checkpoint = unet_module.checkpoint
    monkeypatch.setattr(unet_module, "checkpoint",
                        lambda *a, **k: calls.append(k) or real_checkpoint(*a, **k))
    ours.enable_gradient_checkpointing()
    out_ckpt, grads_ckpt = loss_and_grads()

    # One checkpointed call per resnet and per spatial transformer, all non-reentrant.
    n_checkpointed = sum(isinstance(m, (unet_module.ResnetBlock, unet_module.SpatialTransformer))
                         for m in ours.modules())
    assert len(calls) == n_checkpointed and all(k == {"use_reentrant": False} for k in calls)
    # Recomputation in backward is the same fp32 arithmetic: tolerance 1e-6 absolute.
    assert (out_plain - out_ckpt).abs().max() <= 1e-6
    for n in grads_plain:
        err = (grads_plain[n] - grads_ckpt[n]).abs().max().item()
        assert err <= 1e-6, f"grad of {n} differs by {err} with checkpointing (tolerance 1e-6)"

    # In eval mode (or without grad) checkpointing is off.
    calls.clear()
    ours.eval()
    with torch.no_grad():
        ours(latents, t, context)
    assert calls == []


@pytest.mark.parametrize("name", ["sd1-style", "sd2-style"])
def test_bf16_autocast_close_to_fp32(name):
    _, ours = make_pair(CONFIGS[name])
    latents, context = make_inputs(ours.config)
    t = torch.tensor([10, 600])
    with torch.no_grad():
        ref = ours(latents, t, context)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(latents, t, context)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    # bf16 keeps ~3 significant digits; loose tolerance: 3% of the output's range.
    err = (out.float() - ref).abs().max().item()
    assert err <= 0.03 * ref.abs().max().item(), f"bf16 autocast max abs err {err}"


class _SDPADtypes(TorchDispatchMode):
    """Records the dtype of the query at every attention kernel actually dispatched
    (below autocast, so it sees what autocast made of the inputs)."""

    def __init__(self):
        super().__init__()
        self.dtypes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "scaled_dot_product" in func.__name__:
            self.dtypes.append(args[0].dtype)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("upcast, expected", [(True, torch.float32), (False, torch.bfloat16)])
def test_upcast_attention_runs_attention_in_fp32_under_autocast(upcast, expected):
    _, ours = make_pair(dict(SD2_STYLE, upcast_attention=upcast))
    latents, context = make_inputs(ours.config)
    mode = _SDPADtypes()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), mode:
        out = ours(latents, 5, context)
    # 2 attention calls (self + cross) per transformer: 2 down, 1 mid, 3 up.
    assert len(mode.dtypes) == 12 and set(mode.dtypes) == {expected}
    assert out.dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["sd15", "sd21-base", "sd21"])
def test_full_size_keys_and_shapes_match_diffusers(preset):
    cfg = PRESETS[preset]
    with torch.device("meta"):
        ours = UNet(cfg)
        ref = UNet2DConditionModel(**asdict(cfg))
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert set(ours_shapes) == set(ref_shapes), set(ours_shapes) ^ set(ref_shapes)
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == 686  # the SD 1.x/2.x UNet checkpoint tensor count
    # Head size 64 everywhere in SD2; 8 heads in every block in SD1.5.
    heads = ours.config.num_heads_per_block
    if preset == "sd15":
        assert heads == (8, 8, 8, 8)
    else:
        assert [c // h for c, h in zip(cfg.block_out_channels, heads)] == [64] * 4


SD21_HUB_CONFIG = {  # stabilityai/stable-diffusion-2-1 unet/config.json
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.10.0.dev0",
    "act_fn": "silu", "attention_head_dim": [5, 10, 20, 20],
    "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False,
    "cross_attention_dim": 1024,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                         "DownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1,
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "sample_size": 96,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                       "CrossAttnUpBlock2D"],
    "upcast_attention": True, "use_linear_projection": True,
}


def test_from_json_of_hub_config_equals_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(SD21_HUB_CONFIG, some_future_key=123)))
    cfg = UNetConfig.from_json(path)
    assert cfg == PRESETS["sd21"]
    assert isinstance(cfg.attention_head_dim, tuple) and isinstance(cfg.block_out_channels, tuple)


def test_defaults_are_diffusers_defaults():
    # A key absent from config.json takes the default of UNet2DConditionModel.__init__.
    signature = inspect.signature(UNet2DConditionModel.__init__).parameters
    ours = UNetConfig.from_dict({})
    for field in fields(UNetConfig):
        default = signature[field.name].default
        default = tuple(default) if isinstance(default, list) else default
        assert getattr(ours, field.name) == default, field.name
