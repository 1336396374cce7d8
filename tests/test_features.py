"""train.py's practitioners' features on tiny random pipelines: min-SNR weighting, offset noise,
a caption per photo, several concepts in one run, and --push_to_hub (with huggingface_hub's HfApi
replaced by a fake: no network)."""
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import huggingface_hub
import pytest
import torch
from huggingface_hub.errors import HfHubHTTPError
from PIL import Image
from safetensors.torch import load_file

import dreambooth
import evaluate
import sample
import train
from load_weights import load_pipeline


def make_photos(folder, colour, shape="square", n=3):
    """n small synthetic photos of one subject (a coloured square or circle) on varied backgrounds."""
    folder.mkdir(parents=True)
    from PIL import ImageDraw
    for i, background in enumerate([(20, 120, 20), (200, 200, 200), (30, 30, 160), (120, 80, 40)][:n]):
        image = Image.new("RGB", (24, 20), background)
        draw = ImageDraw.Draw(image)
        box = (4 + i, 4, 16 + i, 16)
        draw.rectangle(box, fill=colour) if shape == "square" else draw.ellipse(box, fill=colour)
        image.save(folder / f"{i}.png")
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return make_photos(tmp_path_factory.mktemp("subject") / "red_square", (220, 30, 30))


def argv_for(tiny, out, *extra, instance_dir=None):
    subject = ["--instance_dir", str(instance_dir), "--class_noun", "square"] if instance_dir else []
    return ["--model", str(tiny), *subject, "--resolution", "16", "--output_dir", str(out), "--num_class_images", "1",
            "--class_steps", "1", "--mixed_precision", "no", "--seed", "0", "--lr", "1e-3", *extra]


def run(tiny, out, *extra, instance_dir=None):
    assert train.main(argv_for(tiny, out, *extra, instance_dir=instance_dir)) == 0
    return out


def fails(argv, capsys, code=2):
    """train.main(argv) exits with `code`; returns stderr (which must hold no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def unet_weights(folder):
    return load_file(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")


def losses(folder):
    return [json.loads(line) for line in (Path(folder) / "loss.jsonl").read_text().splitlines()]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------------
# Min-SNR weighting (Hang et al., 2023)


def hand_snr(t):
    """SNR(t) = abar_t / (1 - abar_t) of SD's scaled-linear schedule, in float64 from its definition:
    betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2, abar_t = prod_{s <= t} (1 - beta_s)."""
    low, high = math.sqrt(0.00085), math.sqrt(0.012)
    alpha_bar = math.prod(1 - (low + (high - low) * s / 999) ** 2 for s in range(t + 1))
    return alpha_bar / (1 - alpha_bar)


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_min_snr_weights_are_the_papers(tiny_sd1, tiny_sd2, kind):
    schedule = load_pipeline({"sd1": tiny_sd1, "sd2": tiny_sd2}[kind]).scheduler
    assert schedule.config.prediction_type == {"sd1": "epsilon", "sd2": "v_prediction"}[kind]
    timesteps = torch.tensor([0, 10, 100, 400, 999])
    weights = dreambooth.min_snr_weights(schedule, timesteps, 5.0)
    for t, w in zip(timesteps.tolist(), weights.tolist()):
        snr = hand_snr(t)
        expected = min(snr, 5.0) / snr if kind == "sd1" else min(snr, 5.0) / (snr + 1)
        # the schedule's fp32 abar against the float64 product: 1 - abar_0 = 0.00085 keeps only
        # ~1e-4 of fp32's relative precision (as in diffusers' fp32 compute_snr), so 1e-4 relative
        assert w == pytest.approx(expected, rel=1e-4), t
    # t = 0: SNR = (1 - 0.00085) / 0.00085 = 1175.47 > 5, so w = 5 / 1175.47 (eps) or 5 / 1176.47 (v)
    assert weights[0].item() == pytest.approx(5 / 1175.4706 if kind == "sd1" else 5 / 1176.4706, rel=1e-4)
    # t = 999: SNR = 0.0047 < 5, so w = 1 exactly (eps) or SNR / (SNR + 1) = abar_999 (v)
    snr = hand_snr(999)
    assert snr < 5 and weights[-1].item() == (1.0 if kind == "sd1" else pytest.approx(snr / (snr + 1), rel=1e-4))


def loss_inputs(pipeline, seed=0, n=2):
    """Fixed latents, contexts, noise and timesteps for Eq. 2 with n instance and n class rows."""
    g = torch.Generator().manual_seed(seed)
    channels, size = pipeline.unet.config.in_channels, pipeline.unet.config.sample_size
    latents = torch.randn(2 * n, channels, size, size, generator=g)
    with torch.no_grad():
        context = pipeline.text_encoder(pipeline.tokenizer(["a photo of sks square"] * n + ["a photo of square"] * n))
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.tensor([3, 990, 250, 600][:2 * n])  # low-noise and high-noise steps, both sides of gamma
    return latents[:n], context[:n], latents[n:], context[n:], noise, timesteps


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_min_snr_loss_is_the_weighted_mean_of_per_sample_losses(tiny_sd1, tiny_sd2, kind):
    pipeline = load_pipeline({"sd1": tiny_sd1, "sd2": tiny_sd2}[kind])
    instance, instance_context, klass, class_context, noise, timesteps = loss_inputs(pipeline)
    schedule, unet = pipeline.scheduler, pipeline.unet

    def loss(**kw):
        with torch.no_grad():
            return dreambooth.prior_preservation_loss(unet, schedule, instance, instance_context, klass, class_context,
                                                      0.5, noise=noise, timesteps=timesteps, **kw)
    latents = torch.cat([instance, klass])
    with torch.no_grad():
        prediction = unet(schedule.add_noise(latents, noise, timesteps), timesteps,
                          torch.cat([instance_context, class_context]))
    target = schedule.training_target(latents, noise, timesteps)
    per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
    snr = torch.tensor([hand_snr(t) for t in timesteps.tolist()], dtype=torch.float64)
    w = snr.clamp(max=5) / (snr if kind == "sd1" else snr + 1)
    expected_instance, expected_prior = (per_sample.double() * w)[:2].mean(), (per_sample.double() * w)[2:].mean()
    total, instance_loss, prior_loss = loss(snr_gamma=5.0)
    # fp32 weights against float64 ones of the same predictions: 1e-4 relative (the fp32 abar, above)
    assert instance_loss.item() == pytest.approx(expected_instance.item(), rel=1e-4)
    assert prior_loss.item() == pytest.approx(expected_prior.item(), rel=1e-4)
    assert total.item() == pytest.approx(instance_loss.item() + 0.5 * prior_loss.item(), rel=1e-6)

    plain = loss()
    unbounded = loss(snr_gamma=float("inf"))
    if kind == "sd1":  # eps targets: min(SNR, inf) / SNR = 1, the unweighted loss (summation order: 1e-6)
        for a, b in zip(unbounded, plain):
            assert a.item() == pytest.approx(b.item(), rel=1e-6)
    else:  # v targets: the weight SNR / (SNR + 1) = abar_t makes the v loss the eps loss of the same prediction
        alpha_bar = schedule.alphas_cumprod[timesteps].reshape(-1, 1, 1, 1)
        noisy = schedule.add_noise(latents, noise, timesteps)
        eps = alpha_bar.sqrt() * prediction + (1 - alpha_bar).sqrt() * noisy
        eps_loss = ((eps - noise) ** 2).mean(dim=(1, 2, 3))
        assert unbounded[1].item() == pytest.approx(eps_loss[:2].mean().item(), rel=1e-4)
        assert unbounded[2].item() == pytest.approx(eps_loss[2:].mean().item(), rel=1e-4)
        assert abs(unbounded[1].item() - plain[1].item()) > 1e-3 * plain[1].item()


# ----------------------------------------------------------------------------------------------
# Offset noise (Guttenberg, 2023)


def training_data(pipeline, tiny, photos, *extra, batch_size=2, world_size=1, rank=0):
    """train.TrainingData of a run without prior preservation, as process `rank` of `world_size`."""
    import contextlib
    args = train.parse_args(train.build_parser(), argv_for(tiny, "unused", "--batch_size", str(batch_size), *extra,
                                                           instance_dir=photos))
    env = SimpleNamespace(world_size=world_size, rank=rank, device=torch.device("cpu"))
    return train.TrainingData(pipeline, dreambooth.list_images(photos), [], args, env, contextlib.nullcontext)


def test_offset_noise_is_one_offset_per_image_and_channel(tiny_sd1, photos):
    pipeline = load_pipeline(tiny_sd1)
    plain = training_data(pipeline, tiny_sd1, photos).next_batch()
    offset = training_data(pipeline, tiny_sd1, photos, "--offset_noise", "0.5").next_batch()
    # the same photos, latents and timesteps: the offset is drawn after everything else
    assert torch.equal(plain.instance_latents, offset.instance_latents)
    assert torch.equal(plain.timesteps, offset.timesteps) and plain.photos == offset.photos
    shift = (offset.noise - plain.noise) / 0.5  # [B, C, h, w]
    assert shift.shape == plain.noise.shape == (2, 4, 8, 8)
    per_image_channel = shift[:, :, :1, :1]     # [B, C, 1, 1], broadcast over the pixels
    assert torch.allclose(shift, per_image_channel.expand_as(shift), atol=1e-6)
    values = per_image_channel.flatten().tolist()
    assert len(set(values)) == len(values) == 8 and all(v != 0 for v in values)  # one draw per image and channel
    # drawn for the global batch: two processes with batch 1 get the rows of one process with batch 2
    halves = [training_data(pipeline, tiny_sd1, photos, "--offset_noise", "0.5", batch_size=1, world_size=2,
                            rank=r).next_batch() for r in (0, 1)]
    assert torch.equal(torch.cat([h.noise for h in halves]), offset.noise)


def test_offset_noise_zero_is_the_run_without_it(tiny_sd1, photos, tmp_path):
    common = ["--max_steps", "3", "--identifier", "sks", "--flip"]
    without = run(tiny_sd1, tmp_path / "without", *common, instance_dir=photos)
    zero = run(tiny_sd1, tmp_path / "zero", *common, "--offset_noise", "0", instance_dir=photos)
    assert same_weights(unet_weights(without), unet_weights(zero))
    assert (without / "loss.jsonl").read_text() == (zero / "loss.jsonl").read_text()
    assert (without / "run" / "run.json").read_text() == (zero / "run" / "run.json").read_text()
    some = run(tiny_sd1, tmp_path / "some", *common, "--offset_noise", "0.1", instance_dir=photos)
    assert not same_weights(unet_weights(without), unet_weights(some))
    assert json.loads((some / "run" / "run.json").read_text())["offset_noise"] == 0.1


def test_snr_gamma_and_offset_noise_resume_exactly_and_belong_to_the_run(tiny_sd1, photos, tmp_path, capsys):
    common = ["--max_steps", "4", "--checkpoint_every", "2", "--keep_checkpoints", "2", "--identifier", "sks",
              "--snr_gamma", "5", "--offset_noise", "0.1"]
    straight = run(tiny_sd1, tmp_path / "straight", *common, instance_dir=photos)
    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    shutil.copytree(straight / "class_images", resumed / "class_images")
    run(tiny_sd1, resumed, *common, "--resume", "latest", instance_dir=photos)
    assert same_weights(unet_weights(straight), unet_weights(resumed))
    assert (straight / "loss.jsonl").read_text() == (resumed / "loss.jsonl").read_text()
    # the checkpoint holds --snr_gamma 5: continuing it without the weighting would mix two runs
    other = tmp_path / "other"
    shutil.copytree(straight / "checkpoints" / "step-000002", other / "checkpoints" / "step-000002")
    err = fails(argv_for(tiny_sd1, other, *common[:-4], "--offset_noise", "0.1", "--resume", "latest",
                         instance_dir=photos), capsys)
    assert "belongs to another run" in err and "snr_gamma: 5.0 there, None now" in err


@pytest.mark.parametrize("argv,message", [
    (["--snr_gamma", "0"], "--snr_gamma must be positive"),
    (["--offset_noise", "-0.1"], "--offset_noise must be at least 0"),
])
def test_bad_weighting_and_noise_flags(tiny_sd1, photos, tmp_path, capsys, argv, message):
    assert message in fails(argv_for(tiny_sd1, tmp_path / "out", *argv, instance_dir=photos), capsys)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------
# A caption per photo


@pytest.fixture
def captioned(tmp_path):
    """Three photos: 0.png with a caption (spread over lines), 1.png with an empty one, 2.png without."""
    folder = make_photos(tmp_path / "captioned", (220, 30, 30))
    (folder / "0.txt").write_text("a photo of [V] square\n  on the   sofa\n")
    (folder / "1.txt").write_text("  \n")
    return folder


CAPTIONED_PROMPTS = {0: "a photo of sks square on the sofa", 1: "a photo of sks square", 2: "a photo of sks square"}


@pytest.mark.parametrize("text_encoder", ["frozen", "trained"])
def test_each_photo_trains_under_its_caption(tiny_sd1, captioned, tmp_path, monkeypatch, text_encoder):
    batches, contexts, encoded = [], [], {}
    real_next_batch, real_loss, real_encode = train.TrainingData.next_batch, dreambooth.prior_preservation_loss, \
        sample.encode_prompts

    def next_batch(self):
        batches.append(real_next_batch(self))
        return batches[-1]

    def loss(*args, **kwargs):
        contexts.append((args[3].detach().clone(), args[5].detach().clone()))  # instance and class contexts
        return real_loss(*args, **kwargs)

    def encode(pipeline, prompts):
        encoded.setdefault(prompts[0], real_encode(pipeline, prompts))
        return encoded[prompts[0]]
    monkeypatch.setattr(train.TrainingData, "next_batch", next_batch)
    monkeypatch.setattr(dreambooth, "prior_preservation_loss", loss)
    monkeypatch.setattr(sample, "encode_prompts", encode)
    extra = ["--train_text_encoder"] if text_encoder == "trained" else []
    out = run(tiny_sd1, tmp_path / "out", "--identifier", "sks", "--max_steps", "4", "--batch_size", "3", *extra,
              instance_dir=captioned)
    photos_seen = {k for batch in batches for k in batch.photos}
    assert photos_seen == {0, 1, 2}, "the test needs every photo in some batch"
    if text_encoder == "frozen":  # each row's context is the cached context of its photo's prompt
        for batch, (instance_context, class_context) in zip(batches, contexts):
            for row, k in enumerate(batch.photos):
                assert torch.equal(instance_context[row], encoded[CAPTIONED_PROMPTS[k]][0])
                assert torch.equal(class_context[row], encoded["a photo of square"][0])
    else:  # each row's context is the trained text encoder's output for its photo's prompt: record the tokenizer
        pipeline = load_pipeline(tiny_sd1)
        first_batch = batches[0]
        assert 0 in first_batch.photos and {1, 2} & set(first_batch.photos)  # a caption's and the template's prompt
        with torch.no_grad():  # step 1 runs the text encoder as it was loaded
            expected = pipeline.text_encoder(pipeline.tokenizer([CAPTIONED_PROMPTS[k] for k in first_batch.photos]))
        assert torch.allclose(contexts[0][0], expected, atol=1e-5)  # fp32, same weights: rounding only
    info = json.loads((out / "dreambooth.json").read_text())
    assert info["concepts"][0]["captions"] == {"0.png": CAPTIONED_PROMPTS[0]}  # the empty 1.txt is no caption
    assert json.loads((out / "run" / "run.json").read_text())["captions"] == {"0.png": CAPTIONED_PROMPTS[0]}


def test_distinct_prompts_are_encoded_once(tiny_sd1, captioned, tmp_path, monkeypatch):
    import clip_text
    calls = []
    real_forward = clip_text.CLIPTextModel.forward
    monkeypatch.setattr(clip_text.CLIPTextModel, "forward",
                        lambda self, ids: calls.append(ids.shape[0]) or real_forward(self, ids))
    prompts = []
    real_encode = sample.encode_prompts
    monkeypatch.setattr(sample, "encode_prompts", lambda p, texts: prompts.extend(texts) or real_encode(p, texts))
    # no class images to generate (their sampler would encode too): only training encodes
    run(tiny_sd1, tmp_path / "out", "--identifier", "sks", "--max_steps", "4", "--batch_size", "3",
        "--no_prior_preservation", instance_dir=captioned)
    assert sorted(prompts) == sorted({*CAPTIONED_PROMPTS.values(), "a photo of square"})
    assert calls == [1, 1, 1]  # three distinct prompts, each through the text encoder once, for 4 steps


def test_caption_problems(tiny_sd1, tmp_path, capsys):
    folder = make_photos(tmp_path / "photos", (220, 30, 30))
    (folder / "0.txt").write_text("a red square on the sofa")  # no [V]
    run(tiny_sd1, tmp_path / "out", "--max_steps", "1", "--no_prior_preservation", instance_dir=folder)
    assert "the captions of 0.png have no [V]" in capsys.readouterr().err
    (folder / "1.txt").write_bytes(b"a photo of [V] \xff square")
    err = fails(argv_for(tiny_sd1, tmp_path / "out2", "--max_steps", "1", instance_dir=folder), capsys)
    assert "1.txt is not UTF-8 text" in err


# ----------------------------------------------------------------------------------------------
# Several concepts in one run (--concepts FILE.json)


@pytest.fixture(scope="module")
def concepts_root(tmp_path_factory):
    """Two subjects, a red square and a blue circle, and a --concepts file naming them by folder."""
    root = tmp_path_factory.mktemp("concepts")
    make_photos(root / "red_square", (220, 30, 30))
    make_photos(root / "blue_circle", (30, 30, 220), shape="circle", n=2)
    (root / "concepts.json").write_text(json.dumps([
        {"instance_dir": "red_square", "class_noun": "square"},
        {"instance_dir": "blue_circle", "class_noun": "circle", "num_class_images": 2}]))
    return root


CONCEPT_STEPS = ["--max_steps", "4", "--checkpoint_every", "1", "--keep_checkpoints", "4"]


@pytest.fixture(scope="module")
def two_concepts(tiny_sd1, concepts_root):
    out = concepts_root / "out"
    run(tiny_sd1, out, "--concepts", str(concepts_root / "concepts.json"), *CONCEPT_STEPS,
        "--validation_prompt", "a [V:blue_circle] circle", "--validation_every", "4", "--validation_steps", "1")
    return out


def test_two_concepts_train_in_turns_with_their_own_identifiers_and_class_images(two_concepts, tiny_sd1):
    info = json.loads((two_concepts / "dreambooth.json").read_text())
    assert "identifier" not in info  # a bare [V] would not say which concept
    red, blue = info["concepts"]
    assert (red["name"], red["class_noun"], blue["name"], blue["class_noun"]) == \
        ("red_square", "square", "blue_circle", "circle")
    tokenizer = load_pipeline(tiny_sd1).tokenizer
    assert red["identifier"] == dreambooth.choose_identifier(tokenizer, "square", seed=0)  # the one-subject draw
    assert blue["identifier"] != red["identifier"]
    assert blue["identifier"] in dreambooth.rare_token_candidates(tokenizer)
    assert red["instance_prompt"] == f"a photo of {red['identifier']} square"
    assert (red["class_prompt"], blue["class_prompt"]) == ("a photo of square", "a photo of circle")
    # each concept's own class images, in OUTPUT_DIR/class_images/<name>
    assert [p.name for p in sorted((two_concepts / "class_images" / "red_square").iterdir())] == ["class-00000.png"]
    assert len(list((two_concepts / "class_images" / "blue_circle").iterdir())) == 2
    # the concepts take turns, and each step's log holds the losses of the concept it trained
    records = losses(two_concepts)
    assert [list(r["by_concept"]) for r in records] == [["red_square"], ["blue_circle"]] * 2
    for r in records:
        (only,) = r["by_concept"].values()
        assert only["instance_loss"] == pytest.approx(r["instance_loss"], rel=1e-6)
        assert only["prior_loss"] == pytest.approx(r["prior_loss"], rel=1e-6) and only["prior_loss"] > 0
    record = json.loads((two_concepts / "run" / "run.json").read_text())
    assert [c["name"] for c in record["concepts"]] == ["red_square", "blue_circle"]
    assert sorted(record["concepts"][1]["instance_images"]) == ["0.png", "1.png"]
    assert record["concepts"][1]["num_class_images"] == 2
    assert (two_concepts / "validation" / "step-000004.png").is_file()


def test_grad_accum_gives_every_step_each_concept(tiny_sd1, concepts_root, tmp_path):
    out = run(tiny_sd1, tmp_path / "out", "--concepts", str(concepts_root / "concepts.json"), "--max_steps", "2",
              "--grad_accum", "2", "--no_prior_preservation")
    assert [sorted(r["by_concept"]) for r in losses(out)] == [["blue_circle", "red_square"]] * 2
    for r in losses(out):  # the step's instance loss is the mean of its two micro-batches, one per concept
        assert r["instance_loss"] == pytest.approx(sum(c["instance_loss"] for c in r["by_concept"].values()) / 2)


def test_a_two_concept_run_resumes_exactly_in_its_turn(two_concepts, tiny_sd1, concepts_root, tmp_path):
    resumed = tmp_path / "resumed"  # stopped after step 1: step 2 must train the blue circle
    shutil.copytree(two_concepts / "checkpoints" / "step-000001", resumed / "checkpoints" / "step-000001")
    shutil.copytree(two_concepts / "class_images", resumed / "class_images")
    run(tiny_sd1, resumed, "--concepts", str(concepts_root / "concepts.json"), *CONCEPT_STEPS, "--resume", "latest",
        "--validation_prompt", "a [V:blue_circle] circle", "--validation_every", "4", "--validation_steps", "1")
    assert same_weights(unet_weights(two_concepts), unet_weights(resumed))
    assert (two_concepts / "loss.jsonl").read_text() == (resumed / "loss.jsonl").read_text()


def test_sample_and_evaluate_address_a_concept_by_name(two_concepts, concepts_root, tmp_path, capsys):
    blue = json.loads((two_concepts / "dreambooth.json").read_text())["concepts"][1]["identifier"]
    common = ["--model", str(two_concepts), "--steps", "1", "--mixed_precision", "no", "--device", "cpu"]
    assert sample.main([*common, "--prompt", "a [V:blue_circle] circle", "--out_dir", str(tmp_path / "s")]) == 0
    (png,) = (tmp_path / "s").glob("*-seed0.png")
    assert Image.open(png).text["prompt"] == f"a {blue} circle"
    for prompt, message in (("a [V] circle", "has 2 concepts (red_square, blue_circle), so [V] does not say which"),
                            ("a [V:green] circle", "no concept named 'green' (its concepts: red_square, blue_circle)")):
        with pytest.raises(SystemExit) as exit_info:
            sample.main([*common, "--prompt", prompt, "--out_dir", str(tmp_path / "bad")])
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    evaluation = [*common, "--instance_dir", str(concepts_root / "blue_circle"), "--random_encoders",
                  "--max_prompts", "1", "--num_images", "1", "--no_pres", "--out", str(tmp_path / "e.json")]
    for extra, message in (([], "choose the one to evaluate with --concept NAME"),
                           (["--concept", "green"], "--concept green: ")):
        with pytest.raises(SystemExit) as exit_info:
            evaluate.main(evaluation + extra)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert evaluate.main(evaluation + ["--concept", "blue_circle"]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert (result["identifier"], result["class_noun"]) == (blue, "circle")
    assert result["per_prompt"][0]["subject_prompt"].startswith(f"a {blue} circle")


def test_given_identifiers_are_kept_out_of_the_draws(tiny_sd1, concepts_root, tmp_path):
    tokenizer = load_pipeline(tiny_sd1).tokenizer
    drawn = dreambooth.choose_identifier(tokenizer, "square", seed=0)
    path = tmp_path / "concepts.json"
    path.write_text(json.dumps([{"instance_dir": str(concepts_root / "red_square"), "class_noun": "square"},
                                {"instance_dir": str(concepts_root / "blue_circle"), "class_noun": "circle",
                                 "identifier": drawn, "name": "blue"}]))
    args = train.parse_args(train.build_parser(), argv_for(tiny_sd1, tmp_path / "out", "--concepts", str(path)))
    concepts = train.read_concepts(args)
    assert [c.name for c in concepts] == ["red_square", "blue"]
    env = SimpleNamespace(main=False)
    identifiers = train.choose_identifiers(args, tokenizer, env, concepts)
    assert identifiers[1] == drawn and identifiers[0] != drawn and identifiers[0] != "square"


def concepts_file(tmp_path, content, concepts_root):
    """A --concepts file holding `content` (JSON-encoded unless a string), beside the photos."""
    path = concepts_root / f"c-{tmp_path.name}.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


RED = {"instance_dir": "red_square", "class_noun": "square"}
BLUE = {"instance_dir": "blue_circle", "class_noun": "circle"}


@pytest.mark.parametrize("content,extra,message", [
    ("[{not json", [], "is not valid JSON"),
    ({"instance_dir": "red_square"}, [], "must hold a non-empty JSON list of objects"),
    ([], [], "must hold a non-empty JSON list of objects"),
    ([RED, {"instance_dir": "blue_circle"}], [], "entry 2 has no class_noun"),
    ([{**RED, "identifer": "sks"}], [], "unknown field(s) identifer"),
    ([{**RED, "num_class_images": "3"}], [], "num_class_images must be a whole number"),
    ([{**RED, "identifier": "sks"}, {**BLUE, "identifier": "SKS"}], [], "have the same identifier 'SKS'"),
    ([RED, {**BLUE, "instance_dir": "red_square"}], [], "two concepts are named 'red_square'"),
    ([RED, {**BLUE, "name": "a]b"}], [], "cannot stand in a prompt as [V:name]"),
    ([RED, {**BLUE, "class_noun": " "}], [], "entry 2 (blue_circle): class_noun is empty"),
    ([RED, {**BLUE, "instance_template": "a photo of {class_noun}"}], [],
     "instance_template 'a photo of {class_noun}' has no {identifier}"),
    ([{**RED, "class_dir": "shared"}, {**BLUE, "class_dir": "shared"}], [], "share the class_dir"),
    ([RED, BLUE], ["--instance_dir", "red_square"], "--instance_dir cannot be given too"),
    ([RED, BLUE], ["--validation_prompt", "a [V] thing"], "--validation_prompt: this run has 2 concepts"),
    ([RED, BLUE], ["--validation_prompt", "a [V:nope] thing"], "no concept named 'nope'"),
])
def test_bad_concepts_are_refused_before_any_work(tiny_sd1, concepts_root, tmp_path, capsys, monkeypatch,
                                                  content, extra, message):
    generated = []
    monkeypatch.setattr(sample, "generate", lambda *a, **k: generated.append(1) or [])
    path = concepts_file(tmp_path, content, concepts_root)
    err = fails(argv_for(tiny_sd1, tmp_path / "out", "--concepts", str(path), *extra), capsys)
    assert message in err and not generated and not (tmp_path / "out").exists()


def test_a_subject_must_be_named(tiny_sd1, tmp_path, capsys):
    assert "name the subject: --instance_dir PHOTOS --class_noun NOUN" in fails(argv_for(tiny_sd1, tmp_path), capsys)
    missing = tmp_path / "missing.json"
    assert f"--concepts {missing}: cannot read it" in fails(argv_for(tiny_sd1, tmp_path, "--concepts", str(missing)),
                                                            capsys)


# ----------------------------------------------------------------------------------------------
# --push_to_hub, with huggingface_hub's HfApi replaced by a fake (no network)


class FakeHfApi:
    """Records create_repo and upload_folder; upload_folder lists the files the real one would send
    (huggingface_hub.utils.filter_repo_objects, as upload_folder filters) and reads the model card."""
    calls = []
    failures = {}  # method name -> the exception it raises

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        if "create_repo" in self.failures:
            raise self.failures["create_repo"]

    def upload_folder(self, *, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        folder = Path(folder_path)
        present = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
        sent = sorted(huggingface_hub.utils.filter_repo_objects(present, allow_patterns=allow_patterns,
                                                                ignore_patterns=ignore_patterns))
        self.calls.append(("upload_folder", repo_id, {"present": present, "sent": sent,
                                                      "card": (folder / "README.md").read_text()}))
        if "upload_folder" in self.failures:
            raise self.failures["upload_folder"]


@pytest.fixture
def hub(monkeypatch):
    FakeHfApi.calls, FakeHfApi.failures = [], {}
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_token_for_tests")
    return FakeHfApi


def http_error(status):
    """An HfHubHTTPError as huggingface_hub raises it for an HTTP `status` answer."""
    return HfHubHTTPError(f"{status} Client Error: you do not have the rights",
                          response=SimpleNamespace(status_code=status, headers={}, request=None))


HUB_RUN = ["--identifier", "sks", "--max_steps", "2", "--checkpoint_every", "1", "--keep_checkpoints", "2",
           "--validation_prompt", "a [V] square", "--validation_every", "1", "--validation_steps", "1"]


def test_push_to_hub_uploads_the_model_and_its_card_only(tiny_sd1, photos, tmp_path, hub, monkeypatch):
    class_images_at_creation = []
    real_create = FakeHfApi.create_repo
    monkeypatch.setattr(FakeHfApi, "create_repo", lambda self, repo_id, **kw: class_images_at_creation.append(
        (tmp_path / "out" / "class_images").exists()) or real_create(self, repo_id, **kw))
    out = run(tiny_sd1, tmp_path / "out", *HUB_RUN, "--push_to_hub", "me/red-square", "--hub_private",
              instance_dir=photos)
    (create, upload) = hub.calls
    assert create == ("create_repo", "me/red-square", {"private": True, "exist_ok": True})
    assert class_images_at_creation == [False]  # the repo exists before any work
    sent, present = upload[2]["sent"], upload[2]["present"]
    assert {"model_index.json", "dreambooth.json", "loss.jsonl", "loss.png", "README.md", "unet/config.json",
            "unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors",
            "vae/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
            "validation/step-000002.png"} <= set(sent)
    kept = [f for f in present if f.split("/")[0] in ("checkpoints", "class_images", "run") or f.startswith(".")
            or f == "validation/step-000001.png"]
    assert any(f.startswith("checkpoints/") for f in kept) and ".lock" in kept  # there, and not sent
    assert sent == [f for f in present if f not in kept]
    card = upload[2]["card"]
    assert card == (out / "README.md").read_text()
    for expected in ("`sks`", "| square |", "a photo of sks square", f"the local model `{Path(tiny_sd1).name}`",
                     "2 steps",
                     "![validation images after 2 steps](validation/step-000002.png)", "Rows: a sks square.",
                     'StableDiffusionPipeline.from_pretrained("me/red-square")'):
        assert expected in card, expected
    assert "base_model:" not in card and str(Path(tiny_sd1).parent) not in card  # no path of this machine
    # --push_checkpoints sends the checkpoints too, never the class images or the run's record
    args = train.parse_args(train.build_parser(), argv_for(tiny_sd1, out, *HUB_RUN, "--push_to_hub", "me/red-square",
                                                           "--push_checkpoints", instance_dir=photos))
    assert train.push_to_hub(args, out) == "https://huggingface.co/me/red-square"
    sent = hub.calls[-1][2]["sent"]
    assert "checkpoints/step-000002/state.pt" in sent
    assert not any(f.startswith(("class_images/", "run/")) for f in sent)


def test_push_to_hub_without_a_token_stops_before_any_work(tiny_sd1, photos, tmp_path, hub, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    err = fails(argv_for(tiny_sd1, tmp_path / "out", *HUB_RUN, "--push_to_hub", "me/red-square", instance_dir=photos),
                capsys)
    assert "--push_to_hub me/red-square: no Hugging Face token" in err and "hf auth login" in err
    assert not hub.calls and not (tmp_path / "out").exists()


@pytest.mark.parametrize("failure,message", [
    (http_error(403), "creating the repo failed: permission denied (HTTP 403): this token cannot write to "
                      "me/red-square"),
    (http_error(401), "permission denied (HTTP 401)"),
    (ConnectionError("Failed to resolve 'huggingface.co'"), "the Hub cannot be reached (ConnectionError: Failed to "
                                                            "resolve 'huggingface.co'); check the network"),
])
def test_a_refused_or_unreachable_hub_stops_before_training(tiny_sd1, photos, tmp_path, hub, capsys, failure, message):
    hub.failures["create_repo"] = failure
    err = fails(argv_for(tiny_sd1, tmp_path / "out", *HUB_RUN, "--push_to_hub", "me/red-square", instance_dir=photos),
                capsys)
    assert message in err
    assert not (tmp_path / "out" / "class_images").exists() and not (tmp_path / "out" / "unet").exists()


def test_a_failed_upload_says_the_model_is_saved(tiny_sd1, photos, tmp_path, hub, capsys):
    hub.failures["upload_folder"] = http_error(500)
    out = tmp_path / "out"
    err = fails(argv_for(tiny_sd1, out, *HUB_RUN, "--push_to_hub", "me/red-square", instance_dir=photos), capsys)
    assert "the upload failed: the Hub refused (HTTP 500): 500 Client Error" in err
    assert f"The model is saved in {out}" in err and f"hf upload me/red-square {out} ." in err
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.parametrize("argv,message", [
    (["--hub_private"], "--hub_private set(s) up the upload: add --push_to_hub"),
    (["--push_checkpoints"], "--push_checkpoints set(s) up the upload"),
    (["--push_to_hub", "not a/valid repo"], "is not a Hub repo id"),
])
def test_bad_hub_flags(tiny_sd1, photos, tmp_path, hub, capsys, argv, message):
    assert message in fails(argv_for(tiny_sd1, tmp_path / "out", *argv, instance_dir=photos), capsys)


def test_two_concepts_under_two_processes_train_like_one(tiny_sd1, concepts_root, tmp_path):
    """torchrun with 2 processes x batch 1 against 1 process x batch 2: the same turns, and the
    per-concept losses (all-reduced over the processes) agree to 1e-5, as in test_distributed.py."""
    import os
    import subprocess
    import sys
    root = Path(__file__).resolve().parents[1]

    def launch(nproc, out, *extra):
        argv = argv_for(tiny_sd1, out, "--concepts", str(concepts_root / "concepts.json"), "--max_steps", "2",
                        "--adam_epsilon", "1e-3", *extra)
        command = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
                   if nproc > 1 else [sys.executable]) + ["train.py", *argv]
        result = subprocess.run(command, cwd=root, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        return losses(out)
    two = launch(2, tmp_path / "two", "--batch_size", "1")
    one = launch(1, tmp_path / "one", "--batch_size", "2")  # its class images: the same seeds, the same images
    assert [list(r["by_concept"]) for r in two] == [list(r["by_concept"]) for r in one] == [["red_square"],
                                                                                           ["blue_circle"]]
    for a, b in zip(two, one):
        for name, values in a["by_concept"].items():
            for key, value in values.items():
                assert value == pytest.approx(b["by_concept"][name][key], abs=1e-5), (name, key)


def test_model_card_of_a_lora_run_of_two_concepts_on_a_hub_model(tiny_sd1, photos, tmp_path):
    args = train.parse_args(train.build_parser(), argv_for(tiny_sd1, tmp_path, "--lora_rank", "4", "--push_to_hub",
                                                           "me/pets", instance_dir=photos))
    concepts = [{"name": "rex", "identifier": "olis", "class_noun": "dog", "instance_prompt": "a photo of olis dog"},
                {"name": "tom", "identifier": "vay", "class_noun": "cat", "instance_prompt": "a photo of vay cat"}]
    card = train.model_card({"concepts": concepts, "base_model": "org/base-model", "steps": 1200}, args, tmp_path)
    front = card.split("---")[1]
    assert "base_model: org/base-model" in front and "- lora" in front
    assert "instance_prompt" not in front  # two subjects: no one instance prompt
    assert "| rex | `olis` | dog | a photo of olis dog |" in card and "| tom | `vay` | cat | a photo of vay cat |" in card
    assert "DreamBooth-LoRA adapters (rank 4) of `org/base-model`" in card and "1200 steps" in card
    assert 'from_pretrained("org/base-model")\npipe.load_lora_weights("me/pets")' in card
    assert "![" not in card  # no validation grid in this folder
