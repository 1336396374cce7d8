"""dreambooth.py: the identifier, class images, data and the loss of Eq. 2."""
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import dreambooth
import sample
from clip_text import CLIPTokenizer
from clip_vocab import write_hub_tokenizer
from load_weights import load_pipeline
from schedulers import PRESETS, DDPMScheduler


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return CLIPTokenizer.from_folder(write_hub_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer"))


# ---- 1. identifier ----------------------------------------------------------------------------


def test_identifier_is_one_rare_whole_word_token(tokenizer):
    low, high = dreambooth.rare_merge_ranks(tokenizer)
    assert (low, high) == (39115, 48893)  # the last fifth of CLIP's 48894 merges
    for seed in range(20):
        identifier = dreambooth.choose_identifier(tokenizer, "dog", seed=seed)
        (token_id,) = tokenizer.encode(identifier)[1:-1]  # exactly one token
        token = tokenizer.id_to_token(token_id)
        assert token == identifier + "</w>" and identifier.isalpha() and len(identifier) <= 3
        assert low <= tokenizer.merge_rank(token) <= high
    assert dreambooth.choose_identifier(tokenizer, "dog", seed=3) == dreambooth.choose_identifier(tokenizer, "dog", seed=3)
    assert len({dreambooth.choose_identifier(tokenizer, "dog", seed=s) for s in range(20)}) > 10


def test_identifier_never_the_class_noun(tokenizer):
    candidates = dreambooth.rare_token_candidates(tokenizer)
    # with the class noun one of the few candidates of a narrow range, it is never drawn
    rank = tokenizer.merge_rank(candidates[-1] + "</w>")
    narrow = (rank - 2000, rank)
    pool = dreambooth.rare_token_candidates(tokenizer, narrow)
    assert candidates[-1] in pool
    for seed in range(len(pool) * 3):
        assert dreambooth.choose_identifier(tokenizer, candidates[-1], seed=seed, merge_ranks=narrow) != candidates[-1]


def test_check_identifier(tokenizer):
    assert dreambooth.check_identifier(tokenizer, "sks", "dog") == [tokenizer.token_to_id("sks</w>")]
    with pytest.raises(ValueError, match="is the class noun"):
        dreambooth.check_identifier(tokenizer, "dog", "dog")
    with pytest.raises(ValueError, match="empty"):
        dreambooth.check_identifier(tokenizer, "  ", "dog")
    # "'s" splits off as a contraction and "dog's" no longer contains the class noun's tokens
    with pytest.raises(ValueError, match="does not keep its tokens"):
        dreambooth.check_identifier(tokenizer, "sks", "dog", template="a photo of {identifier}{class_noun}")


def test_prompts():
    assert dreambooth.make_prompts("sks", "dog") == ("a photo of sks dog", "a photo of dog")
    assert dreambooth.make_prompts("sks", "dog", "{identifier} {class_noun} plush", "{class_noun} plush") == (
        "sks dog plush", "dog plush")


# ---- 2. the loss ------------------------------------------------------------------------------


def fake_unet(x, t, c):
    """A deterministic stand-in whose output depends on the latents, timesteps and context."""
    return torch.tanh(x * 0.7 + t.float().view(-1, 1, 1, 1) / 1000 + c.mean(dim=(1, 2)).view(-1, 1, 1, 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_is_eq2(prediction_type):
    config = PRESETS["sd15"].__class__(**{**vars(PRESETS["sd15"]), "prediction_type": prediction_type})
    schedule = DDPMScheduler(config)
    g = torch.Generator().manual_seed(0)
    x, x_pr = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    c, c_pr = torch.randn(2, 77, 16, generator=g), torch.randn(2, 77, 16, generator=g)
    loss, instance_loss, prior_loss = dreambooth.prior_preservation_loss(
        fake_unet, schedule, x, c, x_pr, c_pr, prior_loss_weight=0.3, generator=torch.Generator().manual_seed(1))

    # by hand, with the same draws: noise for all four latents, then four timesteps
    g = torch.Generator().manual_seed(1)
    latents = torch.cat([x, x_pr])
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    abar = schedule.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * latents + (1 - abar).sqrt() * noise
    target = noise if prediction_type == "epsilon" else abar.sqrt() * noise - (1 - abar).sqrt() * latents
    prediction = fake_unet(x_t, t, torch.cat([c, c_pr]))
    want_instance = ((prediction[:2] - target[:2]) ** 2).mean()
    want_prior = ((prediction[2:] - target[2:]) ** 2).mean()
    # tolerance 1e-6: the same fp32 arithmetic in a different order
    assert torch.allclose(instance_loss, want_instance, atol=1e-6)
    assert torch.allclose(prior_loss, want_prior, atol=1e-6)
    assert torch.allclose(loss, want_instance + 0.3 * want_prior, atol=1e-6)


def test_loss_without_prior_and_gradients():
    schedule = DDPMScheduler(PRESETS["sd15"])
    x, c = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    loss, instance_loss, prior_loss = dreambooth.prior_preservation_loss(
        fake_unet, schedule, x, c, generator=torch.Generator().manual_seed(0))
    assert prior_loss == 0 and torch.equal(loss.detach(), instance_loss)
    # the class term carries gradient into the UNet with weight lambda
    weight = torch.ones((), requires_grad=True)
    unet = lambda x, t, c: fake_unet(x, t, c) * weight  # noqa: E731
    grads = []
    for lam in (0.0, 1.0):
        loss, *_ = dreambooth.prior_preservation_loss(unet, schedule, x, c, x + 1, c, lam,
                                                      generator=torch.Generator().manual_seed(0))
        grads.append(torch.autograd.grad(loss, weight)[0])
    assert grads[0] != grads[1]


# ---- 3. class images --------------------------------------------------------------------------


def test_class_images_top_up_and_reuse(tiny_sd1, tmp_path, monkeypatch):
    pipeline = load_pipeline(tiny_sd1)
    calls = []
    real_generate = sample.generate

    def counting_generate(pipeline, prompts, **kwargs):
        calls.append((len(prompts), kwargs["seed"]))
        return real_generate(pipeline, prompts, **kwargs)
    monkeypatch.setattr(sample, "generate", counting_generate)
    args = dict(steps=2, height=16, width=16, mixed_precision="no", batch_size=2)
    paths = dreambooth.ensure_class_images(pipeline, tmp_path, "a photo of dog", 3, seed=10, **args)
    assert [p.name for p in paths] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    assert calls == [(2, 10), (1, 12)]  # seeds follow the image index
    first = paths[0].read_bytes()

    calls.clear()
    paths = dreambooth.ensure_class_images(pipeline, tmp_path, "a photo of dog", 5, seed=10, **args)
    assert len(paths) == 5 and calls == [(2, 13)]  # only the shortfall
    assert paths[0].read_bytes() == first

    calls.clear()
    (tmp_path / "class-00001.png").write_bytes(b"not a png")  # an interrupted write
    Image.new("RGB", (16, 16)).save(tmp_path / "mine.jpg")    # the user's own class image counts
    paths = dreambooth.ensure_class_images(pipeline, tmp_path, "a photo of dog", 6, seed=10, **args)
    assert calls == [(1, 11)] and len(paths) == 6
    assert dreambooth.image_problem(tmp_path / "class-00001.png") is None
    # the regenerated image is the one its seed gives
    again = real_generate(pipeline, ["a photo of dog"], seed=11, progress=False, **args)[0]
    assert list(Image.open(tmp_path / "class-00001.png").getdata()) == list(again.getdata())


# ---- 4. data ----------------------------------------------------------------------------------


def test_load_image_orientation_modes_and_crops(tmp_path):
    # a 40x20 image, left half red, right half blue, stored rotated with EXIF orientation 6
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    x = dreambooth.load_image(tmp_path / "rotated.jpg", 16)
    assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    # displayed upright: a 40x20 landscape, centre-cropped to its middle 20x20 (red | blue)
    assert x[0, 8, 2] > 0.5 and x[2, 8, 13] > 0.5

    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))  # fully transparent: white, not black
    rgba.save(tmp_path / "clear.png")
    assert torch.allclose(dreambooth.load_image(tmp_path / "clear.png", 16), torch.ones(3, 16, 16))
    Image.new("L", (16, 16), 0).save(tmp_path / "grey.png")
    Image.new("P", (16, 16), 0).save(tmp_path / "palette.png")
    for name in ("grey.png", "palette.png"):
        assert dreambooth.load_image(tmp_path / name, 8).shape == (3, 8, 8)

    import random
    crops = {tuple(dreambooth.load_image(tmp_path / "rotated.jpg", 8, center_crop=False,
                                         rng=random.Random(s)).flatten()[:50].tolist()) for s in range(8)}
    assert len(crops) > 1  # random crops move


def test_data_pairs_instances_with_class_images(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(tmp_path / f"i{i}.png")
        Image.new("RGB", (8, 8), (0, i * 100, 0)).save(tmp_path / f"c{i}.png")
    instance_paths = [tmp_path / f"i{i}.png" for i in range(3)]
    class_paths = [tmp_path / f"c{i}.png" for i in range(2)]
    data = dreambooth.DreamBoothData(instance_paths, class_paths, 8)
    import random
    assert len(data) == 3
    instance, klass = data.item(2, random.Random(0))
    assert instance.shape == klass.shape == (3, 8, 8)
    assert torch.allclose(instance[0], torch.full((8, 8), 200 / 127.5 - 1))
    assert torch.allclose(data.item(4, random.Random(0))[1][1], torch.full((8, 8), -1.0))  # 4 -> class 0
    assert dreambooth.DreamBoothData(instance_paths, [], 8).item(0, random.Random(0))[1] is None
    # flips come from the item's own random source
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    half = Image.new("RGB", (8, 8), (255, 255, 255))
    half.paste((0, 0, 0), (0, 0, 4, 8))
    half.save(tmp_path / "half.png")
    flipping = dreambooth.DreamBoothData([tmp_path / "half.png"], [], 8, flip=True)
    lefts = {flipping.item(0, random.Random(s))[0][0, 0, 0].item() for s in range(10)}
    assert lefts == {-1.0, 1.0}


def test_list_images_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dreambooth.list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="holds no images"):
        dreambooth.list_images(tmp_path)


def test_latent_distribution_sample():
    mean, std = torch.full((1, 4, 2, 2), 2.0), torch.full((1, 4, 2, 2), 0.5)
    noise = torch.randn(1, 4, 2, 2)
    z = dreambooth.LatentDistribution(mean, std).sample(noise, 0.18215)
    assert torch.allclose(z, (2.0 + 0.5 * noise) * 0.18215)


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_high_bit_depth_images_read_as_a_viewer_shows_them(tmp_path, mode):
    """A 16-bit grey gradient (and its 32-bit integer and float forms) scales to 8 bits, v * 255
    / 65535 rounded; PIL's own convert("RGB") would clip it to white."""
    import numpy as np
    values = (np.arange(1024).reshape(4, 256) * 64).astype(np.uint16)  # 0 .. 65472
    data = {"I;16": values, "I": values.astype(np.int32), "F": (values / 65535).astype(np.float32)}[mode]
    path = tmp_path / ("g.png" if mode == "I;16" else "g.tif")
    Image.fromarray(data).save(path)
    assert Image.open(path).mode == mode
    pixels = np.asarray(dreambooth.open_rgb(path))
    expected = np.round(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert pixels.shape == (4, 256, 3) and (pixels == expected[..., None]).all()
    assert pixels.max() == 255 and pixels.min() == 0
