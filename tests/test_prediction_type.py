"""What an SD 2.x single file predicts (noise or velocity): the file does not say, so the loader
decides from its name and says so; --prediction_type decides instead; dreambooth.json records it."""
import json
import shutil
from pathlib import Path

import pytest

import load_weights
import train
from load_weights import export_single_file, load_pipeline, sd2_prediction_type


@pytest.mark.parametrize("name,expected", [
    ("768-v-ema.ckpt", "v_prediction"),                       # Stability's SD 2.0 768 px file
    ("v2-1_768-v-ema-pruned.safetensors", "v_prediction"),
    ("mymodel-vpred.safetensors", "v_prediction"),
    ("512-base-ema.ckpt", "epsilon"),                         # Stability's SD 2.0 base file
    ("v2-1_512-ema-pruned.safetensors", "epsilon"),           # Stability's SD 2.1 base file
    ("sd21-base-finetune.safetensors", "epsilon"),
    ("v2-1_768-ema-pruned.safetensors", "v_prediction"),      # SD 2.1 768 px: the name's 768 and the default
    ("something.safetensors", "v_prediction"),                # nothing said: diffusers' assumption
])
def test_the_file_name_decides(name, expected):
    assert sd2_prediction_type(name)[0] == expected


class FakeHub:
    """snapshot_download replaced: returns a copy of a local folder, and records the repo ids."""

    def __init__(self, folder):
        self.folder, self.repo_ids = Path(folder), []

    def __call__(self, repo_id, **kwargs):
        self.repo_ids.append(repo_id)
        return str(self.folder)


@pytest.mark.parametrize("name,expected,repo", [
    ("v2-1_512-ema-pruned.safetensors", "epsilon", load_weights.SD2_BASE_MODEL),
    ("768-v-ema.safetensors", "v_prediction", load_weights.SD2_MODEL),
])
def test_an_sd2_single_file_says_what_it_chose(tiny_sd2, tmp_path, capsys, monkeypatch, name, expected, repo):
    path = export_single_file(load_pipeline(tiny_sd2), tmp_path / name)
    hub = FakeHub(tiny_sd2)
    monkeypatch.setattr(load_weights, "snapshot_download", hub)
    pipeline = load_pipeline(path)
    assert pipeline.scheduler.config.prediction_type == expected
    assert hub.repo_ids == [repo]  # the matching architecture: 512 px base or 768 px v model
    err = capsys.readouterr().err
    assert f"using {expected}" in err and "--prediction_type" in err
    # the flag decides, silently
    pipeline = load_pipeline(path, prediction_type="epsilon" if expected == "v_prediction" else "v_prediction")
    assert pipeline.scheduler.config.prediction_type != expected
    assert "using" not in capsys.readouterr().err


def test_the_flag_reaches_training_and_is_recorded(tiny_sd1, tmp_path):
    """tiny_sd1 predicts noise; --prediction_type v_prediction trains the v target and says so in
    dreambooth.json and the saved scheduler config, so sampling the result needs no flag."""
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 30, 30)).save(photos / "a.png")
    out = tmp_path / "out"
    assert train.main(["--model", str(tiny_sd1), "--instance_dir", str(photos), "--class_noun", "square",
                       "--resolution", "16", "--output_dir", str(out), "--max_steps", "1", "--no_prior_preservation",
                       "--mixed_precision", "no", "--prediction_type", "v_prediction"]) == 0
    assert json.loads((out / "dreambooth.json").read_text())["prediction_type"] == "v_prediction"
    assert load_pipeline(out).scheduler.config.prediction_type == "v_prediction"
    assert load_pipeline(tiny_sd1).scheduler.config.prediction_type == "epsilon"
    shutil.rmtree(out)
