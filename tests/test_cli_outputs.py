"""sample.py and evaluate.py check their outputs before the work, never leave a partial file under a
final name, say when the disk is full, and take --prediction_type."""
import errno
import json
import shutil

import pytest
from PIL import Image

import evaluate
import sample


@pytest.fixture
def counted_generate(monkeypatch):
    calls = []
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    return calls


def sample_argv(model, out_dir, *extra):
    return ["--model", str(model), "--prompt", "a red square", "--steps", "1", "--mixed_precision", "no",
            "--out_dir", str(out_dir), *extra]


def exits(main, argv, capsys, code=2):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_sample_out_dir_is_checked_before_sampling(tiny_sd1, tmp_path, capsys, counted_generate):
    (tmp_path / "file").write_text("x")
    err = exits(sample.main, sample_argv(tiny_sd1, tmp_path / "file"), capsys)
    assert f"--out_dir {tmp_path / 'file'} is a file" in err
    err = exits(sample.main, sample_argv(tiny_sd1, tmp_path / "file" / "below"), capsys)
    assert "is not writable" in err
    assert not counted_generate


@pytest.mark.parametrize("scale,ok", [(-3, False), (0, True), (1, True)])
def test_guidance_scale_below_zero_is_refused(tiny_sd1, tmp_path, capsys, scale, ok):
    argv = sample_argv(tiny_sd1, tmp_path / "out", "--guidance_scale", str(scale))
    if ok:  # 1 means no guidance, 0 the unconditional model
        assert sample.main(argv) == 0
    else:
        assert "--guidance_scale must be at least 0" in exits(sample.main, argv, capsys)


def test_a_full_disk_leaves_no_partial_png(tiny_sd1, tmp_path, capsys, monkeypatch):
    real_save = Image.Image.save

    def full_disk(self, fp, *args, **kwargs):
        real_save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:  # half the bytes made it, then the disk filled up
            f.truncate(10)
        raise OSError(errno.ENOSPC, "No space left on device", str(fp))
    monkeypatch.setattr(Image.Image, "save", full_disk)
    out = tmp_path / "out"
    err = exits(sample.main, sample_argv(tiny_sd1, out), capsys, code=1)
    assert "the disk is full: writing" in err and "MiB left on that disk" in err and "same --seed" in err
    assert "Traceback" not in err
    assert list(out.iterdir()) == [], "a partial or temporary image was left behind"


def test_sample_prediction_type_flag(tiny_sd1, tmp_path):
    """--prediction_type changes what the sampler makes of the UNet's output."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert sample.main(sample_argv(tiny_sd1, a, "--steps", "2")) == 0
    assert sample.main(sample_argv(tiny_sd1, b, "--steps", "2", "--prediction_type", "v_prediction")) == 0
    first = [sorted(f.glob("*-seed*.png"))[0] for f in (a, b)]
    assert Image.open(first[0]).tobytes() != Image.open(first[1]).tobytes()


@pytest.fixture(scope="module")
def model(tiny_sd1, tmp_path_factory):
    folder = tmp_path_factory.mktemp("db") / "model"
    shutil.copytree(tiny_sd1, folder)
    (folder / "dreambooth.json").write_text(json.dumps({"identifier": "olis", "class_noun": "dog"}))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    Image.new("RGB", (24, 24), (200, 30, 30)).save(folder / "a.png")
    return folder


@pytest.mark.parametrize("flag", ["--out", "--images_dir"])
def test_evaluate_outputs_are_checked_before_the_work(model, photos, tmp_path, capsys, counted_generate, flag):
    (tmp_path / "file").write_text("x")
    target = tmp_path / "file" / "result.json" if flag == "--out" else tmp_path / "file"
    argv = ["--model", str(model), "--instance_dir", str(photos), "--random_encoders", "--max_prompts", "1",
            "--num_images", "1", "--steps", "1", "--mixed_precision", "no", flag, str(target)]
    err = exits(evaluate.main, argv, capsys)
    assert flag in err and ("is a file" in err or "is not writable" in err)
    assert not counted_generate


def test_evaluate_refuses_negative_guidance(model, photos, capsys):
    argv = ["--model", str(model), "--instance_dir", str(photos), "--random_encoders", "--guidance_scale", "-1"]
    assert "--guidance_scale must be at least 0" in exits(evaluate.main, argv, capsys)
