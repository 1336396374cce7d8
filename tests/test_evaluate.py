"""evaluate.py: the paper's prompt lists, each metric against hand-computed values, and the
command line end to end on a tiny random pipeline (random encoders, and tiny saved encoders)."""
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

import evaluate
from test_vision import write_tiny_clip, write_tiny_dino

SHARED = Path(__file__).resolve().parents[2] / "shared" / "dreambooth-dataset" / "prompts_and_classes.txt"


# ----------------------------------------------------------------------------------------------
# Prompts


def shared_prompt_lists():
    """The object and live-subject lists as the dataset's file writes them, parsed independently."""
    text = SHARED.read_text()
    objects, live = text.split("Live Subject Prompts")
    pattern = r"^'(.*)'\.format\(unique_token, class_token\),?$"
    return re.findall(pattern, objects, re.M), re.findall(pattern, live, re.M)


def test_prompt_lists_are_the_papers():
    lists = evaluate.prompt_lists()
    objects, live = shared_prompt_lists()
    assert len(lists["object"]) == len(lists["live"]) == 25
    for ours, theirs in ((lists["object"], objects), (lists["live"], live)):
        assert [t.format(identifier="{0}", class_noun="{1}") for t in ours] == theirs
        assert len(set(ours)) == 25


def test_subjects_and_live_classes():
    lists = evaluate.prompt_lists()
    text = SHARED.read_text()
    rows = dict(line.split(",") for line in text.split("subject_name,class")[1].split("Prompts")[0].strip().splitlines())
    assert lists["subjects"] == rows and len(rows) == 30
    types = [evaluate.subject_type(c, lists) for c in rows.values()]
    assert types.count("live") == 9 and types.count("object") == 21  # section 4.1: 21 objects, 9 live
    assert evaluate.subject_type(" Dog ") == "live" and evaluate.subject_type("stuffed animal") == "object"


def test_make_prompts():
    subject, klass = evaluate.make_prompts(["a {identifier} {class_noun} in the snow",
                                            "a cube shaped {identifier} {class_noun}"], "olis", "teapot")
    assert subject == ["a olis teapot in the snow", "a cube shaped olis teapot"]
    assert klass == ["a teapot in the snow", "a cube shaped teapot"]


# ----------------------------------------------------------------------------------------------
# Metrics on small fixed embeddings, against values worked out by hand

A = torch.tensor([[1.0, 0.0], [0.0, 2.0]])             # unit directions e1, e2 (lengths do not matter)
B = torch.tensor([[3.0, 0.0], [1.0, 1.0]])             # e1 and the diagonal
S2 = 1 / math.sqrt(2)


def test_pairwise_cosine_metrics():
    # cos: (e1,e1)=1, (e1,d)=1/sqrt2, (e2,e1)=0, (e2,d)=1/sqrt2 -> mean (1 + 2/sqrt2) / 4
    expected = (1 + 2 * S2) / 4
    for metric in (evaluate.dino_score, evaluate.clip_i_score, evaluate.pres_score, evaluate.mean_pairwise_cosine):
        assert metric(A, B) == pytest.approx(expected, abs=1e-12)
    assert evaluate.dino_score(B, B[:1]) == pytest.approx((1 + S2) / 2, abs=1e-12)


def test_clip_t_pairs_each_image_with_its_prompt():
    images = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    texts = torch.tensor([[2.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    # cos per row: 1, 0, -1 -> mean 0; with the third text flipped: (1 + 0 + 1) / 3
    assert evaluate.clip_t_score(images, texts) == pytest.approx(0.0, abs=1e-12)
    assert evaluate.clip_t_score(images, texts * torch.tensor([[1.0], [1.0], [-1.0]])) == pytest.approx(2 / 3, abs=1e-12)


def test_mean_cosine_within_ignores_self_pairs():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # distinct pairs: (e1,e2)=0, (e1,d)=1/sqrt2, (e2,d)=1/sqrt2, each counted twice
    assert evaluate.mean_cosine_within(x) == pytest.approx(2 * S2 / 3, abs=1e-12)
    with pytest.raises(ValueError):
        evaluate.mean_cosine_within(x[:1])


def test_div_substitute_averages_over_prompts():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0],    # prompt 0: orthogonal -> 1 - 0 = 1
                      [1.0, 1.0], [2.0, 2.0]])   # prompt 1: identical directions -> 1 - 1 = 0
    assert evaluate.div_substitute(x, [range(0, 2), range(2, 4)]) == pytest.approx(0.5, abs=1e-12)
    # one group of four: pairs (e1,e2)=0, four pairs of an axis with the diagonal = 1/sqrt2, (d,2d)=1
    assert evaluate.div_substitute(x, [range(0, 4)]) == pytest.approx(1 - (4 * S2 + 1) / 6, abs=1e-12)


# ----------------------------------------------------------------------------------------------
# End to end on a tiny random pipeline


@pytest.fixture(scope="module")
def model(tiny_sd1, tmp_path_factory):
    """A copy of the tiny SD1 pipeline with the dreambooth.json that train.py writes."""
    folder = tmp_path_factory.mktemp("db") / "model"
    shutil.copytree(tiny_sd1, folder)
    (folder / "dreambooth.json").write_text(json.dumps({
        "identifier": "olis", "class_noun": "dog", "instance_prompt": "a photo of olis dog", "args": {}}))
    return folder


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    for i, background in enumerate([(20, 120, 20), (200, 200, 200), (30, 30, 160)]):
        image = Image.new("RGB", (40, 36), background)
        image.paste((220, 30, 30), (8 + i, 6, 28 + i, 26))
        image.save(folder / f"{i}.png")
    return folder


def run(model, instance_dir, out, *extra):
    argv = ["--model", str(model), "--instance_dir", str(instance_dir), "--max_prompts", "2", "--num_images", "2",
            "--steps", "2", "--mixed_precision", "no", "--device", "cpu", "--out", str(out), *extra]
    assert evaluate.main(argv) == 0
    return json.loads(Path(out).read_text())


def test_end_to_end_random_encoders(model, instance_dir, tmp_path, capsys):
    result = run(model, instance_dir, tmp_path / "a.json", "--random_encoders", "--images_dir", str(tmp_path / "images"))
    printed = capsys.readouterr().out
    assert evaluate.RANDOM_NOTE in printed and "DIV (substitute" in printed
    assert result["encoders"]["random"] and result["note"] == evaluate.RANDOM_NOTE
    assert result["subject_type"] == "live" and result["settings"]["num_prompts"] == 2
    metrics = result["metrics"]
    assert set(metrics) == {"DINO", "CLIP-I", "CLIP-T", "PRES", "DIV_substitute", "DINO_real", "CLIP-I_real"}
    assert all(-1 <= v <= 1 for k, v in metrics.items() if k != "DIV_substitute")
    assert 0 <= metrics["DIV_substitute"] <= 2
    assert "substitute" in result["metric_notes"]["DIV_substitute"]
    assert [r["subject_prompt"] for r in result["per_prompt"]] == ["a olis dog in the jungle", "a olis dog in the snow"]
    assert [r["prompt"] for r in result["per_prompt"]] == ["a dog in the jungle", "a dog in the snow"]
    # the overall DINO is the mean of the per-prompt ones (equal image counts)
    assert metrics["DINO"] == pytest.approx(sum(r["DINO"] for r in result["per_prompt"]) / 2, abs=1e-9)
    saved = sorted(p.name for p in (tmp_path / "images").iterdir())
    assert len(saved) == 8 and saved[0].startswith("class-000-a_dog_in_the_jungle")
    assert Image.open(tmp_path / "images" / saved[-1]).text["prompt"] == "a olis dog in the snow"

    # the same seed gives the same numbers; --no_pres skips the class images
    again = run(model, instance_dir, tmp_path / "b.json", "--random_encoders", "--no_pres")
    assert again["metrics"]["PRES"] is None
    assert again["metrics"]["DINO"] == metrics["DINO"] and again["metrics"]["CLIP-T"] == metrics["CLIP-T"]

    capsys.readouterr()
    assert evaluate.main(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    table = capsys.readouterr().out
    assert evaluate.RANDOM_NOTE in table
    pres_row = next(line for line in table.splitlines() if line.startswith("PRES"))
    assert pres_row.split()[-3:] == [f"{metrics['PRES']:.4f}", "-", "-"]
    dino_row = next(line for line in table.splitlines() if line.startswith("DINO    subject"))
    assert dino_row.split()[-1] == "+0.0000"


def test_end_to_end_with_saved_encoders(model, instance_dir, tmp_path, capsys):
    """Encoders from folders in the Hub layout (what --dino/--clip download) and the CLIP tokenizer."""
    dino, _ = write_tiny_dino(tmp_path / "dino", image_size=64, patch_size=16)
    clip, _ = write_tiny_clip(tmp_path / "clip")
    result = run(model, instance_dir, tmp_path / "e.json", "--dino", str(dino), "--clip", str(clip),
                 "--num_images", "1", "--prompt_type", "object")
    assert not result["encoders"]["random"] and result["note"] is None
    assert result["encoders"]["dino"] == str(dino) and result["subject_type"] == "object"
    assert result["metrics"]["DIV_substitute"] is None  # one image per prompt: no pairs
    assert result["per_prompt"][0]["subject_prompt"] == "a olis dog in the jungle"
    assert evaluate.RANDOM_NOTE not in capsys.readouterr().out


def test_score_uses_each_encoder_as_documented():
    """score() on fixed images with fixed random encoders equals the metric functions applied to
    the embeddings computed separately."""
    encoders = evaluate.load_encoders(random_encoders=True, tokenizer=_tokenizer())
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (90, 90, 90)]
    pictures = [Image.new("RGB", (24, 24), c) for c in colours]
    real, generated = pictures[:2], pictures[1:5]
    metrics, rows = evaluate.score(encoders, real, generated, ["a dog", "a cat"], 2, class_images=pictures[:4])
    dino = evaluate.embed_images(encoders.dino, generated)
    real_dino = evaluate.embed_images(encoders.dino, real)
    clip = evaluate.embed_images(encoders.clip_vision, generated)
    texts = evaluate.embed_texts(encoders.clip_text, encoders.tokenizer, ["a dog", "a dog", "a cat", "a cat"])
    # fp32 embeddings computed here in other batches than inside score(): rounding differs by
    # ~1e-9 on some CPUs; a wrong encoder or pairing would be off by far more than 1e-6
    TOL = 1e-6
    assert metrics["DINO"] == pytest.approx(evaluate.mean_pairwise_cosine(dino, real_dino), abs=TOL)
    assert metrics["CLIP-T"] == pytest.approx(evaluate.clip_t_score(clip, texts), abs=TOL)
    assert metrics["PRES"] == pytest.approx(
        evaluate.mean_pairwise_cosine(evaluate.embed_images(encoders.dino, pictures[:4]), real_dino), abs=TOL)
    assert metrics["DIV_substitute"] == pytest.approx(
        (2 - evaluate.mean_cosine_within(dino[:2]) - evaluate.mean_cosine_within(dino[2:])) / 2, abs=TOL)
    assert rows[1]["CLIP-T"] == pytest.approx(evaluate.clip_t_score(clip[2:], texts[2:]), abs=TOL)


def _tokenizer():
    from clip_text import CLIPTokenizer
    from clip_vocab import clip_merges, clip_vocab
    return CLIPTokenizer(clip_vocab(), [tuple(m.split()) for m in clip_merges()])


# ----------------------------------------------------------------------------------------------
# Bad input: a message and exit status 2


def fails(argv, capsys, message):
    with pytest.raises(SystemExit) as e:
        evaluate.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input(model, instance_dir, tiny_sd1, tmp_path, capsys):
    base = ["--instance_dir", str(instance_dir), "--random_encoders"]
    fails(["--model", str(tiny_sd1), *base], capsys, "dreambooth.json is missing")
    fails(["--instance_dir", str(instance_dir)], capsys, "--model and --instance_dir are required")
    (tmp_path / "empty").mkdir()
    fails(["--model", str(model), "--instance_dir", str(tmp_path / "empty")], capsys, "holds no images")
    fails(["--model", str(model), *base, "--max_prompts", "0"], capsys, "--max_prompts must be between 1 and 25")
    fails(["--model", str(model), *base, "--num_images", "0"], capsys, "--num_images must be at least 1")
    fails(["--model", str(model), "--instance_dir", str(instance_dir), "--dino", str(tmp_path / "nowhere")],
          capsys, "does not exist")
    # conftest sets HF_HUB_OFFLINE=1: the default Hub encoders are not cached here
    fails(["--model", str(model), "--instance_dir", str(instance_dir)], capsys, "use --random_encoders")
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    (broken / "dreambooth.json").write_text(json.dumps({"identifier": "olis"}))
    fails(["--model", str(broken), *base], capsys, "class_noun")
    fails(["--compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")], capsys, "cannot read")
    (tmp_path / "other.json").write_text(json.dumps({"model": "x"}))
    fails(["--compare", str(tmp_path / "other.json"), str(tmp_path / "other.json")], capsys, "not an evaluation JSON")
