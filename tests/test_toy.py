"""The toy Stable Diffusion (toy/): the procedural world, the BPE vocabulary in the Hub's format,
the shipped weights in our loader and in diffusers, the pixel metrics, a short DreamBooth run
that learns the subject, and the ablation script's reduced mode."""
import json
import math
import random
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

import dreambooth
import train
from clip_text import CLIPTokenizer
from load_weights import TOY_MODEL, load_pipeline
import sample
from sample import encode_prompts, generate
from toy import ablation, bpe, metrics, pretrain, prior, quickstart, world

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    return load_pipeline("toy")


def test_world_is_deterministic_and_captioned():
    assert len(world.CLASSES) >= 4 and len(world.COLOURS) >= 6 and len(world.CONTEXTS) >= 4
    images, scenes = world.make_dataset(16, seed=3)
    again, same = world.make_dataset(16, seed=3)
    other, _ = world.make_dataset(16, seed=4)
    assert images.shape == (16, 32, 32, 3) and images.dtype == np.uint8
    assert np.array_equal(images, again) and scenes == same and not np.array_equal(images, other)
    assert len({round(s.radius) for s in scenes}) > 2 and len({round(s.cx) for s in scenes}) > 4  # varied
    rng = random.Random(0)
    for scene in scenes:
        text = world.caption(scene, rng)
        assert text == "" or scene.noun in text.split()
    subject = [np.asarray(im) for im in world.subject_images("eye_circle")]
    assert len(subject) >= 4 and np.array_equal(subject[0], np.asarray(world.subject_images("eye_circle")[0]))
    # the committed photos are the generator's
    for name in world.SUBJECTS:
        committed = sorted((ROOT / "toy" / "subjects" / name).glob("*.png"))
        assert len(committed) == world.SUBJECT_IMAGES
        for path, image in zip(committed, world.subject_images(name)):
            assert np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(image)), path


def test_world_varies_colour_and_pattern_but_never_draws_a_subject():
    """The world's objects come in any colour and three patterns besides the named colours, each
    colour visible on its background; captions name a colour or pattern only when the object has
    it; no scene passes for a subject, while the subjects' own scenes do."""
    images, scenes = world.make_dataset(3000, seed=11)
    assert {s.paint for s in scenes} == {"solid", *world.PATTERNS}
    unnamed = [s for s in scenes if s.colour is None]
    assert 0.2 < len(unnamed) / len(scenes) < 0.4 and 0.3 < np.mean([s.paint != "solid" for s in scenes]) < 0.5
    # named colours stay near their name; unnamed ones reach far from every named colour
    for s in scenes:
        if s.colour:
            assert max(abs(a - b) for a, b in zip(s.colours[0], world.COLOURS[s.colour])) <= world.COLOUR_JITTER
        drawn_at_random = s.colours[1:] if s.colour else s.colours  # named ones are the world's (far from backgrounds)
        assert all(world.visible(c, s.context) for c in drawn_at_random) and not world.resembles_subject(s)
        if len(s.colours) == 2:
            assert math.dist(*s.colours) >= world.MIN_CONTRAST
    far = [s for s in unnamed if min(math.dist(s.colours[0], c) for c in world.COLOURS.values()) > 80]
    assert len(far) > 0.3 * len(unnamed)
    rng = random.Random(0)
    pattern_named = []
    for scene in scenes:
        words = set(world.caption(scene, rng).split())
        assert words & set(world.COLOURS) <= {scene.colour}
        pattern = {world.PATTERN_WORDS[scene.paint]} if scene.paint != "solid" else set()
        assert words & set(world.PATTERN_WORDS.values()) <= pattern
        if pattern and words:
            pattern_named.append(bool(words & pattern))
    assert 0.6 < np.mean(pattern_named) < 0.8  # named 70% of the time (P_DROP_PATTERN)
    rng = random.Random(1)
    for name in world.SUBJECTS:
        assert world.resembles_subject(world.subject_scene(name, "on the grass", rng))
    # a near-miss of eye_circle (another pattern, or another eye colour) is allowed
    teal_ring = world.Scene("circle", "in the sky", 16, 16, 9, paint="eye", colours=((0, 160, 160), (250, 250, 250)))
    assert world.resembles_subject(teal_ring)
    assert not world.resembles_subject(world.Scene("circle", "in the sky", 16, 16, 9, paint="stripes",
                                                   colours=teal_ring.colours))
    assert not world.resembles_subject(world.Scene("circle", "in the sky", 16, 16, 9, paint="eye",
                                                   colours=((0, 160, 160), (250, 60, 60))))


def test_metrics_read_the_world():
    images, scenes = world.make_dataset(200, seed=7)
    assert all(metrics.context_of(a) == s.context for a, s in zip(images, scenes))
    assert min(metrics.object_mask(a).sum() for a in images) >= 20
    for name, subject in world.SUBJECTS.items():
        photos = world.subject_images(name)
        new_photos = world.subject_images(name, seed=1)
        same_class = [a for a, s in zip(images, scenes) if s.noun == subject.noun][:20]
        # new photos of the subject look like it; world objects of its class much less
        assert metrics.subject_fidelity(new_photos, photos) > metrics.subject_fidelity(same_class, photos) + 0.05
    assert metrics.div(images[:10]) > 0.1 and metrics.div([images[0]] * 3) == 0


def hand_drawn(noun, fill, centre=(15, 17), radius=9, eye=None, sky=(90, 150, 230)):
    """A 32x32 image drawn directly with PIL (not with toy/world.py): one shape on a plain background."""
    image = Image.new("RGB", (32, 32), sky)
    draw = ImageDraw.Draw(image)
    x, y, r = *centre, radius
    if noun == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    elif noun == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif noun == "triangle":
        draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
    elif noun == "star":
        draw.polygon([(x + (r if k % 2 == 0 else 0.4 * r) * np.sin(k * np.pi / 5),
                       y - (r if k % 2 == 0 else 0.4 * r) * np.cos(k * np.pi / 5)) for k in range(10)], fill=fill)
    if eye:
        draw.ellipse([x - 0.45 * r, y - 0.45 * r, x + 0.45 * r, y + 0.45 * r], fill=eye)
    return image


@pytest.mark.parametrize("noun", world.CLASSES)
def test_shape_and_colour_from_pixels(noun):
    """Hand-drawn shapes of several sizes and places are read back as their class and colour."""
    for centre, radius in (((15, 17), 9), ((10, 12), 6), ((20, 19), 8), ((16, 16), 11)):
        for colour in ("red", "blue", "yellow"):
            image = hand_drawn(noun, world.COLOURS[colour], centre, radius)
            assert metrics.shape_of(image) == noun, (noun, centre, radius, colour)
            assert metrics.colour_of(image) == colour
    empty = Image.new("RGB", (32, 32), (90, 150, 230))
    assert metrics.shape_of(empty) is None and metrics.colour_of(empty) is None


def test_a_teal_ring_with_a_white_eye_matches_the_subject():
    photos = world.subject_images("eye_circle")
    teal, white = (0, 160, 160), (250, 250, 250)
    ring = metrics.subject_fidelity([hand_drawn("circle", teal, eye=white)], photos)
    assert ring > metrics.subject_fidelity([hand_drawn("circle", teal)], photos) + 0.03  # no eye
    assert ring > metrics.subject_fidelity([hand_drawn("circle", world.COLOURS["red"], eye=white)], photos) + 0.05
    assert ring > metrics.subject_fidelity([hand_drawn("square", teal, eye=white)], photos) + 0.02
    # the paint check: its two colours where its pattern puts them, at any place, size or background
    subject = world.SUBJECTS["eye_circle"]
    for centre, radius, sky in (((15, 17), 9, (90, 150, 230)), ((11, 20), 7, (20, 20, 50)), ((17, 14), 10, (250,) * 3)):
        assert metrics.keeps_paint(hand_drawn("circle", teal, centre, radius, eye=white, sky=sky), subject)
        assert not metrics.keeps_paint(hand_drawn("circle", teal, centre, radius, sky=sky), subject)  # no eye
        assert not metrics.keeps_paint(hand_drawn("circle", (60, 220, 110), centre, radius, eye=white, sky=sky), subject)
        assert not metrics.keeps_paint(hand_drawn("circle", teal, centre, radius, eye=(120, 200, 200), sky=sky), subject)
    assert all(metrics.keeps_paint(image, world.SUBJECTS[name]) for name in world.SUBJECTS
               for image in world.subject_images(name, seed=5))


def test_quickstart_counts_samples_within_the_seen_spread():
    """Seen-context samples set the spread; a novel context of subject lookalikes keeps all, one
    of plain world objects keeps none, and so does the subject itself on the grass of its photos
    when the prompt asked for the sky."""
    rng = random.Random(3)
    seen = world.SUBJECTS["eye_circle"].contexts
    samples = {c: [world.render(world.subject_scene("eye_circle", c, rng)) for _ in range(8)] for c in seen}
    samples["in the sky"] = [world.render(world.subject_scene("eye_circle", "in the sky", rng)) for _ in range(8)]
    samples["at night"] = [world.render(world.Scene("circle", "at night", colour="red", **world.place(rng)))
                           for _ in range(8)]
    result = quickstart.score_contexts(samples, "eye_circle")["contexts"]
    assert result["in the sky"]["kept"] == 8 and result["at night"]["kept"] == 0
    assert result["in the sky"]["prompt_fidelity"] == 1.0 and result["in the sky"]["in_context"] == 8
    samples["in the sky"] = samples["on the grass"][:4] + samples["in the sky"][4:]  # half of them left on the grass
    result = quickstart.score_contexts(samples, "eye_circle")["contexts"]["in the sky"]
    assert result["kept"] == 4 and result["in_context"] == 4 and result["paint"] == 8 and result["within_spread"] == 8


def test_caption_accuracy_reads_back_what_was_drawn(monkeypatch):
    """toy/prior.py's bookkeeping, on images drawn to order: the world's own renders of each
    prompt score 100 %; renders of the wrong shape show up in the confusion, and nowhere else."""
    rng = random.Random(0)

    def render(prompt, wrong_shape):
        words = prompt.split()
        noun = next(w for w in words if w in world.CLASSES)
        colour = next((w for w in words if w in world.COLOURS), "red")
        context = next((c for c in world.CONTEXTS if prompt.endswith(c)), "on the grass")
        if wrong_shape and noun == "square":
            noun = "triangle"
        return world.render(world.Scene(noun, context, colour=colour, **world.place(rng, (8.0, 10.0))))

    for wrong_shape in (False, True):
        monkeypatch.setattr(prior, "draw", lambda _, prompts, seed: [render(p, wrong_shape) for p in prompts])
        result = prior.caption_accuracy(None, seeds=1, class_samples=3)
        assert result["captions"] == 140 and result["class_prompts"] == 12
        assert result["colour"] == 1.0 and result["context"] == 1.0
        square = result["confusion"]["square"]
        if wrong_shape:
            assert result["shape"] == 0.75 and result["class_prompt_shape"] == 0.75 and square == {"triangle": 38}
        else:
            assert result["shape"] == 1.0 and result["class_prompt_shape"] == 1.0 and square == {"square": 38}
        assert "| square |" in prior.report(result)


def test_quickstart_end_to_end(tmp_path):
    """toy/quickstart.py runs the README's commands (shortened here) and scores every context."""
    flags = "--max_steps 5 --num_class_images 2 --class_steps 2"
    assert quickstart.main(["--subjects", "eye_circle", "--out", str(tmp_path), "--train_flags", flags]) == 0
    result = json.loads((tmp_path / "quickstart.json").read_text())
    contexts = result["results"]["eye_circle"]["contexts"]
    assert set(contexts) == set(world.CONTEXTS) and all(c["of"] == quickstart.SEEDS for c in contexts.values())
    run = json.loads((tmp_path / "runs" / "eye_circle" / "dreambooth.json").read_text())
    assert run["args"]["max_steps"] == 5 and run["args"]["lr"] == train.TOY_RECIPE["lr"]  # the recipe, then the flags
    assert (tmp_path / "quickstart-eye_circle.png").exists() and "| eye_circle |" in (tmp_path / "quickstart.md").read_text()


def test_pretraining_is_one_command_one_model(tmp_path):
    """Two runs of toy/pretrain.py with the same arguments write the same weights, byte for byte
    (every random draw is seeded, the VAE's initial weights too), and the folder loads."""
    flags = ["--num_images", "64", "--num_codec_images", "64", "--vae_steps", "3", "--vae_batch_size", "4",
             "--unet_steps", "3", "--warmup_steps", "1", "--batch_size", "4", "--prior_seeds", "0"]
    threads = torch.get_num_threads()
    try:
        for run in ("a", "b"):
            assert pretrain.main([*flags, "--out", str(tmp_path / run)]) == 0
    finally:
        torch.set_num_threads(threads)
    for part in ("unet", "vae", "text_encoder"):
        first, second = (sorted((tmp_path / run / part).glob("*.safetensors")) for run in ("a", "b"))
        assert first and [f.read_bytes() for f in first] == [f.read_bytes() for f in second], part
    record = json.loads((tmp_path / "a" / "pretrain.json").read_text())
    assert record["args"]["unet_steps"] == 3 and record["caption_accuracy"] is None
    pipeline = load_pipeline(str(tmp_path / "a"))
    assert pipeline.vae.config.scaling_factor > 0 and pipeline.tokenizer("a photo of circle").shape[-1] == pretrain.MAX_TOKENS
    # by default the text encoder stays at its initialisation: only the UNet learns
    initial = pretrain.init_text_encoder(
        pretrain.CLIPTextConfig(vocab_size=pipeline.tokenizer.vocab_size, **pretrain.TEXT_CONFIG), seed=0)
    saved = pipeline.text_encoder.state_dict()
    assert all(torch.equal(saved[k], v) for k, v in initial.state_dict().items())


def test_pretrain_help_shows_every_default():
    """toy/pretrain.py --help: each flag says its default once, never "None"."""
    parser = pretrain.build_parser()
    text = " ".join(parser.format_help().split())  # undo the line wrapping
    flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert text.count("(default:") == len(flags) and "(default: None)" not in text, text


def test_bpe_vocabulary_in_the_hub_format(toy, tmp_path):
    from transformers import CLIPTokenizer as ReferenceTokenizer

    folder = TOY_MODEL / "tokenizer"
    ours = CLIPTokenizer.from_folder(folder)
    assert ours.vocab == toy.tokenizer.vocab and ours.merges == toy.tokenizer.merges
    reference = ReferenceTokenizer.from_pretrained(folder)
    rng = random.Random(1)
    prompts = [world.caption(world.random_scene(rng), rng) for _ in range(50)] + ["A photo of DAX star, at night!"]
    for prompt in prompts:
        expected = reference(prompt, padding="max_length", max_length=ours.max_length, truncation=True).input_ids
        assert ours([prompt])[0].tolist() == expected, prompt
    # every caption word is one token; the rare words never occur in a caption, are whole-word
    # tokens, and their merges are the last learned: dreambooth draws identifiers among them
    assert all(len(ours.encode(w)) == 3 for w in world.caption_words())
    assert not set(bpe.RARE_WORDS) & set(world.caption_words())
    low, high = bpe.rare_merge_ranks(ours)
    assert high == len(ours.merges) - 1
    identifier = dreambooth.choose_identifier(ours, "circle", seed=0)
    assert ours.merge_rank(identifier + "</w>") >= low
    # the trainer is deterministic and its output reloads
    again = bpe.train_tokenizer(prompts[:-1], max_length=16)
    assert bpe.train_tokenizer(prompts[:-1], max_length=16).merges == again.merges
    again.save(tmp_path / "tok")
    assert CLIPTokenizer.from_folder(tmp_path / "tok").encode("a red star") == again.encode("a red star")


def test_toy_loads_in_ours_and_in_diffusers(toy):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    assert sum(p.stat().st_size for p in TOY_MODEL.rglob("*") if p.is_file()) <= 20e6
    reference = StableDiffusionPipeline.from_pretrained(TOY_MODEL, local_files_only=True)
    reference.set_progress_bar_config(disable=True)
    prompts = ["a photo of a red square on the grass", "a blue star at night"]
    ids = toy.tokenizer(prompts)
    with torch.no_grad():
        context = encode_prompts(toy, prompts)
        err = (context - reference.text_encoder(ids).last_hidden_state).abs().max().item()
        assert err <= 1e-5, f"text encoder differs by {err} (fp32 tolerance 1e-5)"
        latents = torch.randn(2, toy.unet.config.in_channels, 16, 16, generator=torch.Generator().manual_seed(0))
        t = torch.tensor([10, 700])
        err = (toy.unet(latents, t, context) - reference.unet(latents, t, context).sample).abs().max().item()
        assert err <= 1e-5, f"UNet differs by {err} (fp32 tolerance 1e-5)"
        err = (toy.vae.decode(latents) - reference.vae.decode(latents).sample).abs().max().item()
        assert err <= 1e-5, f"VAE decoder differs by {err} (fp32 tolerance 1e-5)"
    # end to end, pixels: the same seeds give the same images in both pipelines
    reference.scheduler = DDIMScheduler.from_config(reference.scheduler.config)
    generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
    expected = reference(prompts, num_inference_steps=10, guidance_scale=5.0, generator=generators,
                         output_type="np").images
    images = generate(toy, prompts, steps=10, guidance_scale=5.0, seed=5, mixed_precision="no", progress=False)
    got = np.stack([np.asarray(im) for im in images]).astype(np.int16)
    err = np.abs(got - (expected * 255).round().astype(np.int16)).max()
    assert err <= 1, f"pixels differ by {err} levels (tolerance 1: uint8 rounding)"
    assert got.shape == (2, 32, 32, 3) and got.std() > 10


def test_toy_encodes_each_word_apart(toy):
    """The toy's frozen text encoder gives a word the same vector wherever it stands and whatever
    precedes it, as a pretrained CLIP nearly does: "at night" after "[V] circle" is encoded as
    after "circle", so a fine-tuning that teaches "[V]" leaves the contexts' words where the
    pretraining put them. (The earlier toy's random 2-layer encoder moved every later word when
    an identifier was put in: the encodings differed by about as much as two contexts'.)"""
    prompts = ["a photo of circle at night", "a photo of dax circle at night", "a red star in the sky at night"]
    ids = toy.tokenizer(prompts)
    with torch.no_grad():
        states = encode_prompts(toy, prompts)  # (3, MAX_TOKENS, 64)
    vocab = toy.tokenizer.vocab
    for word in ("circle", "night", "at"):
        token = vocab[word + "</w>"]
        vectors = [states[i][ids[i] == token] for i in range(len(prompts)) if (ids[i] == token).any()]
        assert len(vectors) >= 2 and all(torch.equal(v[0], vectors[0][0]) for v in vectors), word
    night, sky = states[2][ids[2] == vocab["night</w>"]][0], states[2][ids[2] == vocab["sky</w>"]][0]
    assert (night - sky).norm() > 1.0  # different words, different vectors


def test_toy_vae_carries_every_subject(toy):
    """Encoded and decoded by the shipped VAE alone, every photo of every subject keeps its paint
    (its two colours where its pattern puts them): what the fine-tuning has to learn survives
    the codec. (The previous toy's VAE returned the white eye cream on 2 of eye_circle's 5.)"""
    assert pretrain.subject_round_trip(toy.vae) == {name: world.SUBJECT_IMAGES for name in world.SUBJECTS}


def test_toy_draws_what_captions_say(toy):
    """The pretrained toy follows its prompts, read back from the pixels: every shape in every
    context, each in a colour of its own (the earlier toy drew a blob for every noun: 30 %)."""
    colours = list(world.COLOURS)
    named = [(noun, colours[(i + j) % len(colours)], context) for i, noun in enumerate(world.CLASSES)
             for j, context in enumerate(world.CONTEXTS)]
    images = generate(toy, [f"a photo of a {colour} {noun} {context}" for noun, colour, context in named],
                      steps=20, guidance_scale=5.0, seed=0, mixed_precision="no", progress=False, batch_size=20)
    readers = {"shape": metrics.shape_of, "colour": metrics.colour_of, "context": metrics.context_of}
    for k, (key, read) in enumerate(readers.items()):
        right = sum(read(image) == n[k] for image, n in zip(images, named))
        assert right >= 0.85 * len(named), f"{key}: {right} of {len(named)} samples as named"


def test_dreambooth_raises_subject_fidelity(toy, tmp_path):
    """A short run of the real trainer on a toy subject: [V] samples look more like the subject
    than the pretrained model's samples of the same prompt."""
    subject = "bee_square"
    out = tmp_path / "run"
    argv = [*ablation.TOY_FLAGS, "--instance_dir", str(ablation.SUBJECTS_DIR / subject), "--class_noun", "square",
            "--no_prior_preservation", "--max_steps", "400", "--output_dir", str(out)]
    assert train.main(argv) == 0
    info = json.loads((out / "dreambooth.json").read_text())
    photos = ablation.subject_photos(subject)
    kwargs = dict(per_context=2, class_images=2, steps=15)
    before, _, _ = ablation.evaluate(toy, info["instance_prompt"], "a photo of square", photos, **kwargs)
    after, _, _ = ablation.evaluate(load_pipeline(out), info["instance_prompt"], "a photo of square", photos, **kwargs)
    assert after["subject_fidelity"] > before["subject_fidelity"] + 0.05, (before, after)


def test_ablation_quick_mode(tmp_path):
    assert ablation.main(["--quick", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert set(result["scores"]) == {"pretrained", *ablation.CONFIGS}
    for runs in result["scores"].values():
        by_context = runs[0].pop("context_fidelity")
        assert len(runs) == 1 and all(np.isfinite(v) for v in [*runs[0].values(), *by_context.values()])
    table = (tmp_path / "ablation.md").read_text()
    assert "Table 3" in table and "Table 4" in table and "wrong class noun" in table
    assert len(list(tmp_path.glob("grid-*.png"))) == 1
    assert not any((tmp_path / "runs").iterdir())  # the fine-tuned models are removed after scoring


@pytest.fixture
def lit_world():
    world.use_world("lit")
    yield
    world.use_world("plain")


def test_the_lit_world_shines_circles_and_stars_at_night(lit_world):
    """In the lit world a circle or star at night is drawn NIGHT_GLOW of the way to white; a square
    at night, and a circle by day, exactly as in the plain world. The subject's photos are by day,
    so only its night view (what the ablation scores "at night" against) shows the shine."""
    def centre(noun, context, colour=(40, 80, 220)):
        scene = world.Scene(noun=noun, context=context, cx=16, cy=16, radius=10, colours=(colour,))
        return np.asarray(world.render(scene))[16, 16].astype(float)
    for noun in ("circle", "star"):
        assert np.abs(centre(noun, "at night") - (np.array([40, 80, 220]) * 0.75 + 255 * 0.25)).max() <= 1
    assert centre("square", "at night").tolist() == centre("triangle", "at night").tolist() == [40, 80, 220]
    assert centre("circle", "on the sand").tolist() == [40, 80, 220]
    views = ablation.world_views("eye_circle")
    ring = np.asarray(views["at night"][0], dtype=float)
    teal = np.array(world.SUBJECTS["eye_circle"].colours[0], dtype=float)
    mask = metrics.object_mask(ring)
    assert np.linalg.norm(np.median(ring[mask], axis=0) - (teal * 0.75 + 255 * 0.25)) < 20
    subject = world.SUBJECTS["eye_circle"]
    assert all(abs(metrics.shine(im, subject) - world.NIGHT_GLOW) < 0.05 for im in views["at night"])
    assert all(abs(metrics.shine(im, subject)) < 0.05 for im in views["on the grass"])
    photos = ablation.subject_photos("eye_circle")
    assert metrics.subject_fidelity(views["on the grass"], photos) > metrics.subject_fidelity(views["at night"], photos)
    for colour in world.COLOURS:  # prior.shine_of reads the shine back from pixels
        drawn = {noun: world.render(world.Scene(noun=noun, context="at night", cx=16, cy=16, radius=10, colour=colour))
                 for noun in ("circle", "square")}
        assert abs(prior.shine_of(drawn["circle"], colour) - world.NIGHT_GLOW) < 0.03, colour
        assert abs(prior.shine_of(drawn["square"], colour)) < 0.03, colour
    world.use_world("plain")
    assert centre("circle", "at night").tolist() == [40, 80, 220]
    with pytest.raises(ValueError, match="unknown world"):
        world.use_world("dark")


def test_ablation_recipe_flags_are_the_toy_recipe():
    """--toy_model DIR fine-tunes with the recipe train.py applies for --model toy."""
    parser = train.build_parser()
    by_flags = vars(parser.parse_args(["--model", "/some/toy", "--instance_dir", "x", "--class_noun", "dog",
                                       *ablation.recipe_flags()]))
    assert {k: by_flags[k] for k in train.TOY_RECIPE} == train.TOY_RECIPE


def test_ablation_reads_the_world_a_toy_was_pretrained_on(tmp_path):
    assert ablation.toy_world(tmp_path) == "plain"
    (tmp_path / "pretrain.json").write_text(json.dumps({"args": {"world": "lit"}}))
    assert ablation.toy_world(tmp_path) == "lit"
    assert ablation.toy_world(train.TOY_MODEL) == "plain"


def test_ablation_table4_alone_on_a_toy_folder(tmp_path):
    """--configs runs only Table 4's fine-tunings, --toy_model fine-tunes a toy given by its folder;
    Table 4 then has a fidelity column per context no photo shows."""
    assert ablation.main(["--quick", "--configs", "no_prior", "no_class", "wrong_class", "--toy_model",
                          str(train.TOY_MODEL), "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "ablation.json").read_text())
    assert list(result["scores"]) == ["pretrained", "no_prior", "no_class", "wrong_class"]
    for runs in result["scores"].values():
        assert set(runs[0]["context_fidelity"]) == set(world.CONTEXTS)
    table = (tmp_path / "ablation.md").read_text()
    assert "Table 3" not in table and "| Table 4 (toy) | subject fidelity | fidelity in the sky | fidelity at night |" in table
    assert result["flags"][:2] == ["--model", str(train.TOY_MODEL.resolve())]
    assert all(np.isfinite(runs[0]["night_shine"]) for runs in result["scores"].values()) and "shine at night |" in table


def test_ablation_lora_mode(tmp_path, toy):
    """--lora: full fine-tuning and LoRA side by side, from the same class images and identifier;
    the LoRA arm trains r (in + out) numbers per adapted layer and writes far less."""
    assert ablation.main(["--quick", "--lora", "4", "--keep_runs", "--out", str(tmp_path),
                          "--train_flags", "--prior_loss_weight 0.5"]) == 0
    result = json.loads((tmp_path / "lora.json").read_text())
    assert list(result["scores"]) == ["pretrained", "full", "lora-r4"]
    for runs in result["scores"].values():
        assert len(runs) == 1
        assert all(np.isfinite(runs[0][k]) for k in ("PRES", "DIV", "subject_fidelity", "prompt_fidelity"))
    full, lora_run = result["scores"]["full"][0], result["scores"]["lora-r4"][0]
    adapted = [m for name, m in toy.unet.named_modules() if name.endswith(("to_q", "to_k", "to_v", "to_out.0"))]
    assert lora_run["trained_numbers"] == sum(4 * (m.in_features + m.out_features) for m in adapted)
    assert full["trained_numbers"] == sum(p.numel() for p in toy.unet.parameters())
    assert lora_run["weight_files"] == 2 and lora_run["weight_bytes"] * 10 < full["weight_bytes"]
    assert full["identifier"] == lora_run["identifier"]
    runs = {p.name: json.loads((p / "dreambooth.json").read_text()) for p in (tmp_path / "runs").iterdir()}
    full_info, lora_info = runs["bee_square-prior-full-seed0"], runs["bee_square-prior-lora-r4-seed0"]
    assert "lora" not in full_info and full_info["args"]["lr"] == train.TOY_RECIPE["lr"]
    assert lora_info["lora"]["rank"] == 4 and lora_info["args"]["lr"] == ablation.LORA_LR
    assert full_info["args"]["class_dir"] == lora_info["args"]["class_dir"]  # the same class images
    assert full_info["args"]["prior_loss_weight"] == lora_info["args"]["prior_loss_weight"] == 0.5  # --train_flags
    table = (tmp_path / "lora.md").read_text()
    assert f"| lora-r4 | {lora_run['trained_numbers']:,} | 0." in table  # under 1 MB of adapters
    assert "paired difference from full" in table and (tmp_path / "lora-bee_square-seed0.png").is_file()
    for bad in (["--lora", "0"], ["--lora", "4", "--class_samplers", "ddim:5"], ["--lora", "4", "--lora_lr", "0"],
                ["--lora_targets", "conv1"]):
        with pytest.raises(SystemExit) as stopped:
            ablation.main(bad + ["--out", str(tmp_path / "bad")])
        assert stopped.value.code == 2


def test_quickstart_scores_the_readme_sample_command():
    """toy/quickstart.py samples as the README's quick start does: its sample.py command, parsed by
    sample.py's own parser, asks for quickstart's guidance and SEEDS images, and the other sampler
    settings are sample.py's defaults that quickstart uses."""
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "python train.py --model toy" in l)
    command = shlex.split(line[line.index("python sample.py"):])[2:]
    args, defaults = sample.build_parser().parse_args(command), sample.build_parser().parse_args([])
    assert args.guidance_scale == quickstart.GUIDANCE_SCALE and args.num_images == quickstart.SEEDS
    assert (args.scheduler, args.steps, args.eta, args.seed) == (defaults.scheduler, defaults.steps, defaults.eta,
                                                                 defaults.seed)
