"""vae.py against diffusers.AutoencoderKL (a test-only oracle). fp32 tolerance: max abs error <= 1e-5."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from vae import PRESETS, VAE, VAEConfig  # noqa: E402

from diffusers import AutoencoderKL  # noqa: E402

TOL = 1e-5  # fp32 max abs error

TINY_2_LEVEL = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
                    up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, norm_num_groups=8,
                    latent_channels=4)
TINY_3_LEVEL = dict(block_out_channels=[16, 32, 48], down_block_types=["DownEncoderBlock2D"] * 3,
                    up_block_types=["UpDecoderBlock2D"] * 3, layers_per_block=2, norm_num_groups=16,
                    latent_channels=4)
TINY_NO_QUANT_NO_ATTN = dict(TINY_2_LEVEL, use_quant_conv=False, use_post_quant_conv=False,
                             mid_block_add_attention=False)

# The vae/config.json of stable-diffusion-v1-5 (as stored on the Hub).
SD15_VAE_JSON = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 512,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def make_pair(cfg: dict, seed=0):
    torch.manual_seed(seed)
    ref = AutoencoderKL(**cfg).eval()
    # Random weights leave GroupNorm affine at (1, 0); perturb them too so they are exercised.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    ours = VAE(VAEConfig.from_dict(cfg)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def max_err(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("cfg", [TINY_2_LEVEL, TINY_3_LEVEL, TINY_NO_QUANT_NO_ATTN],
                         ids=["2-level", "3-level", "no-quant-no-attn"])
@pytest.mark.parametrize("hw", [(32, 32), (48, 40)])
def test_encode_sample_decode_match_diffusers(cfg, hw):
    ref, ours = make_pair(cfg)
    images = torch.rand(2, 3, *hw, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        ref_post = ref.encode(images).latent_dist
        post = ours.encode(images)
        assert max_err(post.mean, ref_post.mean) <= TOL, "posterior mean, fp32 tol 1e-5"
        assert max_err(post.logvar, ref_post.logvar) <= TOL, "posterior logvar, fp32 tol 1e-5"
        assert max_err(post.std, ref_post.std) <= TOL, "posterior std, fp32 tol 1e-5"

        # The same seeded generator must give the same posterior sample as diffusers.
        z_ref = ref_post.sample(generator=torch.Generator().manual_seed(123))
        z = post.sample(generator=torch.Generator().manual_seed(123))
        assert z.shape == (2, cfg["latent_channels"], hw[0] // 2 ** (len(cfg["block_out_channels"]) - 1),
                           hw[1] // 2 ** (len(cfg["block_out_channels"]) - 1))
        assert max_err(z, z_ref) <= TOL, "posterior sample, fp32 tol 1e-5"
        # ...and a different seed a different one (the generator is really used).
        assert max_err(post.sample(generator=torch.Generator().manual_seed(124)), z) > 1e-3

        decoded_ref = ref.decode(z_ref).sample
        decoded = ours.decode(z_ref)
        assert decoded.shape == images.shape
        assert max_err(decoded, decoded_ref) <= TOL, "decode, fp32 tol 1e-5"


def test_odd_input_sizes_match_diffusers():
    # Odd sizes: the one-sided (0,1,0,1) pad decides the output size and alignment.
    ref, ours = make_pair(TINY_3_LEVEL)
    images = torch.rand(1, 3, 35, 29, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        ref_mean = ref.encode(images).latent_dist.mean
        mean = ours.encode(images).mean
    assert mean.shape == ref_mean.shape == (1, 4, 8, 7)
    assert max_err(mean, ref_mean) <= TOL, "odd-size encode, fp32 tol 1e-5"


class SymmetricDownsample(torch.nn.Module):
    """The known reimplementation bug: padding=1 on all sides instead of (0, 1, 0, 1)."""

    def __init__(self, conv):
        super().__init__()
        self.conv = conv

    def forward(self, x):
        return F.conv2d(x, self.conv.weight, self.conv.bias, stride=2, padding=1)


def test_symmetric_padding_would_fail_parity():
    ref, ours = make_pair(TINY_2_LEVEL)
    images = torch.rand(2, 3, 48, 40, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        ref_mean = ref.encode(images).latent_dist.mean
        assert max_err(ours.encode(images).mean, ref_mean) <= TOL
        for block in ours.encoder.down_blocks:
            if block.downsamplers is not None:
                block.downsamplers[0] = SymmetricDownsample(block.downsamplers[0].conv)
        buggy = ours.encode(images).mean
    assert buggy.shape == ref_mean.shape  # same size, so only a value check can catch it
    assert max_err(buggy, ref_mean) > 100 * TOL


def test_logvar_is_clamped_like_diffusers():
    ref, ours = make_pair(TINY_2_LEVEL)
    with torch.no_grad():
        for model in (ref, ours):  # push half the logvars far above 20 and half far below -30
            model.quant_conv.bias[4:6] += 100.0
            model.quant_conv.bias[6:8] -= 100.0
        images = torch.rand(1, 3, 32, 32) * 2 - 1
        post, ref_post = ours.encode(images), ref.encode(images).latent_dist
    assert post.logvar[:, :2].min().item() == 20.0 and post.logvar[:, 2:].max().item() == -30.0
    assert max_err(post.logvar, ref_post.logvar) == 0.0
    assert max_err(post.std, ref_post.std) <= TOL


def test_bf16_autocast_runs_close_to_fp32():
    _, ours = make_pair(TINY_2_LEVEL)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    with torch.no_grad():
        z = ours.encode(images).mean
        out32 = ours.decode(z)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z16 = ours.encode(images).mean
            out16 = ours.decode(z16)
    assert torch.isfinite(out16).all()
    assert max_err(z16.float(), z) < 0.1 and max_err(out16.float(), out32) < 0.1, "bf16 autocast, loose tol 0.1"


@pytest.mark.parametrize("preset", ["sd15", "sd21-base", "sd21"])
def test_full_size_keys_and_shapes_match_diffusers(preset):
    cfg = PRESETS[preset]
    ref_kwargs = {k: getattr(cfg, k) for k in ("in_channels", "out_channels", "down_block_types", "up_block_types",
                                               "block_out_channels", "layers_per_block", "latent_channels",
                                               "norm_num_groups", "sample_size", "scaling_factor")}
    with torch.device("meta"):
        ours = VAE(cfg)
        ref = AutoencoderKL(**ref_kwargs)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert ours_shapes["decoder.up_blocks.0.resnets.2.conv2.weight"] == (512, 512, 3, 3)
    assert ours_shapes["encoder.down_blocks.1.resnets.0.conv_shortcut.weight"] == (256, 128, 1, 1)
    assert "encoder.down_blocks.3.downsamplers.0.conv.weight" not in ours_shapes
    for m in ours.modules():
        if isinstance(m, torch.nn.GroupNorm):
            assert m.eps == 1e-6 and m.num_groups == 32


def test_hub_json_gives_the_preset(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(SD15_VAE_JSON))
    cfg = VAEConfig.from_json(path)
    assert cfg == PRESETS["sd15"]
    assert isinstance(cfg.block_out_channels, tuple) and cfg.scaling_factor == 0.18215
    # Keys the model does not use are ignored; defaults equal diffusers' AutoencoderKL.
    assert VAEConfig.from_dict({"force_upcast": False, "_name_or_path": "x"}).layers_per_block == \
        AutoencoderKL().config.layers_per_block
