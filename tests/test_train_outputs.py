"""train.py's output folder: one run per folder, resume only the same run, a lock, extension of a
finished run, leftovers cleaned, checks before the work, clear errors for broken checkpoints."""
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import sample
import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    for i, background in enumerate([(20, 120, 20), (200, 200, 200), (30, 30, 160)]):
        image = Image.new("RGB", (24, 20), background)
        image.paste((220, 30, 30), (4 + i, 4, 16 + i, 16))
        image.save(folder / f"{i}.png")
    return folder


def argv_for(tiny, instance_dir, out, *extra):
    return ["--model", str(tiny), "--instance_dir", str(instance_dir), "--class_noun", "square",
            "--resolution", "16", "--output_dir", str(out), "--num_class_images", "2", "--class_steps", "1",
            "--mixed_precision", "no", "--seed", "0", "--lr", "1e-3", *extra]


def run(tiny, instance_dir, out, *extra):
    assert train.main(argv_for(tiny, instance_dir, out, *extra)) == 0
    return out


def fails(tiny, instance_dir, out, capsys, *extra, code=2):
    """Run train.main expecting an error exit; returns stderr."""
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv_for(tiny, instance_dir, out, *extra))
    assert exit_info.value.code == code
    return capsys.readouterr().err


def losses(folder):
    return [json.loads(line) for line in (Path(folder) / "loss.jsonl").read_text().splitlines()]


@pytest.fixture
def no_sampling(monkeypatch):
    """Record every sample.generate call: checks that must fail before any class image can."""
    calls = []
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or [])
    return calls


def test_a_new_run_into_a_finished_runs_folder_is_refused(tiny_sd1, instance_dir, tmp_path, capsys, monkeypatch):
    out = run(tiny_sd1, instance_dir, tmp_path / "out", "--max_steps", "2", "--checkpoint_every", "2")
    before = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    calls = []
    real_generate = sample.generate
    monkeypatch.setattr(sample, "generate", lambda *a, **k: calls.append(1) or real_generate(*a, **k))
    err = fails(tiny_sd1, instance_dir, out, capsys, "--max_steps", "2", "--identifier", "sks", "--seed", "1")
    assert "holds another run's outputs" in err
    assert "--resume latest" in err and "new --output_dir" in err and "--overwrite" in err
    assert not calls, "class images were generated before the refusal"
    after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    # --overwrite: the old run's outputs and checkpoints go first, and the new run owns the folder
    run(tiny_sd1, instance_dir, out, "--max_steps", "1", "--identifier", "sks", "--overwrite")
    assert "removed the earlier run's" in capsys.readouterr().err
    assert not (out / "checkpoints").exists()
    assert json.loads((out / "dreambooth.json").read_text())["identifier"] == "sks"
    assert [r["step"] for r in losses(out)] == [1]


def test_resume_refuses_another_runs_checkpoint(tiny_sd1, instance_dir, tmp_path, capsys):
    out = run(tiny_sd1, instance_dir, tmp_path / "out", "--max_steps", "2", "--checkpoint_every", "1",
              "--keep_checkpoints", "2")
    err = fails(tiny_sd1, instance_dir, out, capsys, "--max_steps", "3", "--resume", "latest", "--identifier", "sks")
    assert "belongs to another run" in err and "identifier:" in err and "'sks' now" in err
    err = fails(tiny_sd1, instance_dir, out, capsys, "--max_steps", "3", "--resume", "latest", "--resolution", "24")
    assert "resolution: 16 there, 24 now" in err


def test_a_finished_run_extends_exactly(tiny_sd1, instance_dir, tmp_path):
    """--resume latest --max_steps 6 after a 3-step run equals a straight 6-step run, step by step."""
    straight = run(tiny_sd1, instance_dir, tmp_path / "straight", "--max_steps", "6", "--flip")
    extended = run(tiny_sd1, instance_dir, tmp_path / "extended", "--max_steps", "3", "--checkpoint_every", "3",
                   "--flip")
    assert [p.name for p in (extended / "checkpoints").iterdir()] == ["step-000003"]  # the final step
    run(tiny_sd1, instance_dir, extended, "--max_steps", "6", "--checkpoint_every", "3", "--flip", "--resume", "latest")
    assert [r["loss"] for r in losses(extended)] == [r["loss"] for r in losses(straight)]
    a, b = (load_file(f / "unet" / "diffusion_pytorch_model.safetensors") for f in (straight, extended))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [p.name for p in (extended / "checkpoints").iterdir()] == ["step-000006"]  # --keep_checkpoints 1


def test_a_second_run_in_the_same_folder_is_locked_out(tiny_sd1, instance_dir, tmp_path, capsys, no_sampling):
    out = tmp_path / "out"
    out.mkdir()
    lock = {"pid": os.getpid(), "host": __import__("socket").gethostname(), "started": "now"}
    (out / ".lock").write_text(json.dumps(lock))  # a live process (this one) holds it
    err = fails(tiny_sd1, instance_dir, out, capsys, "--max_steps", "1")
    assert f"another training run (process {os.getpid()}" in err and "wait for it" in err
    assert not no_sampling
    assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()  # the refused run left it alone


def test_a_stale_lock_is_taken_over_and_released(tiny_sd1, instance_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (out / ".lock").write_text(json.dumps({"pid": dead.pid, "host": __import__("socket").gethostname()}))
    run(tiny_sd1, instance_dir, out, "--max_steps", "1", "--no_prior_preservation")
    assert f"stale lock of process {dead.pid}" in capsys.readouterr().err
    assert not (out / ".lock").exists()


def test_leftovers_of_an_interrupted_run_are_removed(tiny_sd1, instance_dir, tmp_path):
    out = tmp_path / "out"
    run(tiny_sd1, instance_dir, out, "--max_steps", "1", "--checkpoint_every", "1")
    leftovers = [out / "checkpoints" / ".step-000002.x1y2", out / ".saving-abc", out / "class_images" / ".class-00003.png.tmp",
                 out / ".dreambooth.json.tmp"]
    for path in leftovers:
        path.mkdir() if path.suffix != ".tmp" else path.write_bytes(b"half")
    run(tiny_sd1, instance_dir, out, "--max_steps", "2", "--checkpoint_every", "1", "--resume", "latest")
    assert not [p for p in leftovers if p.exists()]


@pytest.mark.parametrize("extra,message", [
    (["--resume", "latest"], "no checkpoint in"),
    (["--instance_template", "a photo of {identifier} {noun}"], "unknown placeholder(s) noun"),
    (["--instance_template", "a photo of {class_noun}"], "has no {identifier}"),
    (["--class_template", "a {class_noun"], "--class_template"),
    (["--class_guidance_scale", "-3"], "at least 0"),
])
def test_checked_before_the_work(tiny_sd1, instance_dir, tmp_path, capsys, no_sampling, extra, message):
    err = fails(tiny_sd1, instance_dir, tmp_path / "out", capsys, "--max_steps", "1", *extra)
    assert message in err
    assert not no_sampling


def test_files_where_folders_belong(tiny_sd1, instance_dir, tmp_path, capsys, no_sampling):
    (tmp_path / "file").write_text("x")
    assert f"--output_dir {tmp_path / 'file'} is a file" in fails(tiny_sd1, instance_dir, tmp_path / "file", capsys)
    err = fails(tiny_sd1, instance_dir, tmp_path / "out", capsys, "--class_dir", str(tmp_path / "file"))
    assert f"--class_dir {tmp_path / 'file'} is a file" in err
    err = fails(tiny_sd1, tmp_path / "file", tmp_path / "out2", capsys)
    assert "is a file: give the folder that holds the photos" in err
    assert not no_sampling


@pytest.fixture(scope="module")
def checkpointed(tiny_sd1, instance_dir, tmp_path_factory):
    """A finished 1-step run with its final checkpoint."""
    out = tmp_path_factory.mktemp("ckpt") / "out"
    assert train.main(argv_for(tiny_sd1, instance_dir, out, "--max_steps", "1", "--checkpoint_every", "1",
                               "--no_prior_preservation")) == 0
    return out


def broken_copy(checkpointed, tmp_path, damage):
    out = shutil.copytree(checkpointed, tmp_path / "out")
    damage(out / "checkpoints" / "step-000001")
    return out


class NotData:  # a pickled object: refused by weights_only loading
    pass


@pytest.mark.parametrize("damage,message", [
    (lambda c: (c / "state.pt").write_bytes((c / "state.pt").read_bytes()[:300]), "is not a readable PyTorch checkpoint (truncated or corrupt?)"),
    (lambda c: (c / "state.pt").write_bytes(os.urandom(4096)), "is not a readable PyTorch checkpoint (truncated or corrupt?)"),
    (lambda c: torch.save({"step": 1, "thing": NotData()}, c / "state.pt"), "could run code from the file, so it is refused"),
    (lambda c: torch.save({"weights": torch.zeros(2)}, c / "state.pt"), "is not a checkpoint of train.py"),
    (lambda c: (c / "unet.safetensors").write_bytes((c / "unet.safetensors").read_bytes()[:1000]),
     "cannot be read (truncated or corrupt?)"),
])
def test_broken_checkpoints_get_clear_errors(tiny_sd1, instance_dir, checkpointed, tmp_path, capsys, damage, message):
    out = broken_copy(checkpointed, tmp_path, damage)
    err = fails(tiny_sd1, instance_dir, out, capsys, "--max_steps", "2", "--checkpoint_every", "1",
                "--no_prior_preservation", "--resume", "latest")
    assert message in err and "Traceback" not in err
    assert "weights_only=False" not in err


def test_a_checkpoint_of_another_model(tiny_sd1, tiny_sd2, instance_dir, checkpointed, tmp_path, capsys):
    err = fails(tiny_sd2, instance_dir, checkpointed, capsys, "--max_steps", "2", "--no_prior_preservation",
                "--resume", "latest")
    assert "belongs to another run (model:" in err
    # without its run record (an older checkpoint), the weights' shapes still tell
    def forget_run(c):
        state = torch.load(c / "state.pt", weights_only=True)
        del state["run"]
        torch.save(state, c / "state.pt")
    out = broken_copy(checkpointed, tmp_path, forget_run)
    err = fails(tiny_sd2, instance_dir, out, capsys, "--max_steps", "2", "--no_prior_preservation", "--resume", "latest")
    assert "does not fit this model (a checkpoint of another model?)" in err


def test_disk_full_while_checkpointing(tiny_sd1, instance_dir, tmp_path, capsys, monkeypatch):
    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:778] . unexpected pos 1536 vs 1488")
    monkeypatch.setattr(torch, "save", full)
    out = tmp_path / "out"
    err = fails(tiny_sd1, instance_dir, out, capsys, "--max_steps", "2", "--checkpoint_every", "1",
                "--no_prior_preservation", code=1)
    assert "the disk is full: writing" in err and "MiB left" in err and "Traceback" not in err
    assert not list((out / "checkpoints").glob(".step-*")), "a partial checkpoint was left behind"


def test_disk_full_anywhere_else(tiny_sd1, instance_dir, tmp_path, capsys, monkeypatch):
    """An ENOSPC outside the checkpoint writer (here, saving the final model) gets the same message."""
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "out" / "unet"))
    monkeypatch.setattr(train, "save_final_model", full)
    err = fails(tiny_sd1, instance_dir, tmp_path / "out", capsys, "--max_steps", "1", "--no_prior_preservation", code=1)
    assert "the disk is full: writing" in err and "MiB left on that disk" in err and "--resume latest" in err
    assert "Traceback" not in err


def test_ctrl_c_before_any_checkpoint_says_nothing_can_be_resumed(tiny_sd1, instance_dir, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "train_step", interrupted)
    assert train.main(argv_for(tiny_sd1, instance_dir, tmp_path / "out", "--no_prior_preservation")) == 130
    err = capsys.readouterr().err
    assert "nothing can be resumed" in err and "--checkpoint_every" in err and "--resume latest" not in err
    assert not (tmp_path / "out" / ".lock").exists()


def test_a_failed_extension_leaves_the_finished_model_and_its_log(tiny_sd1, instance_dir, tmp_path, capsys, monkeypatch):
    import dreambooth
    out = run(tiny_sd1, instance_dir, tmp_path / "out", "--max_steps", "2", "--checkpoint_every", "2",
              "--no_prior_preservation")
    log, weights = (out / "loss.jsonl").read_text(), load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    real_loss = dreambooth.prior_preservation_loss
    monkeypatch.setattr(dreambooth, "prior_preservation_loss",
                        lambda *a, **k: tuple(x * float("nan") for x in real_loss(*a, **k)))
    err = fails(tiny_sd1, instance_dir, out, capsys, "--max_steps", "10", "--checkpoint_every", "2",
                "--no_prior_preservation", "--max_nonfinite_steps", "2", "--resume", "latest", code=1)
    assert "not finite for 2 steps in a row" in err
    assert (out / "loss.jsonl").read_text() == log
    after = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(weights[k], after[k]) for k in weights)


# ----------------------------------------------------------------------------------------------
# The final save as one unit: a failure injected at every rename of load_weights.save_pipeline


def identifier_and_weight(folder):
    from load_weights import load_pipeline
    pipeline = load_pipeline(folder)
    return (json.loads((Path(folder) / "dreambooth.json").read_text())["identifier"],
            pipeline.unet.conv_in.weight.detach().clone())


def test_the_final_save_is_atomic_as_a_whole(tiny_sd1, tmp_path, monkeypatch):
    import load_weights
    from load_weights import LoadError, finish_interrupted_save, load_pipeline, save_pipeline
    old_folder = tmp_path / "old"
    pipeline = load_pipeline(tiny_sd1)
    save_pipeline(pipeline, old_folder, extra_files={"dreambooth.json": b'{"identifier": "old"}'})
    old = identifier_and_weight(old_folder)
    with torch.no_grad():
        pipeline.unet.conv_in.weight.add_(1.0)
    new_weight = pipeline.unet.conv_in.weight.detach().clone()

    real_rename = Path.rename
    calls = []

    def counting_rename(self, target):
        calls.append(self)
        if len(calls) == fail_at:
            raise KeyboardInterrupt  # Ctrl-C at this rename
        return real_rename(self, target)
    monkeypatch.setattr(Path, "rename", counting_rename)
    outcomes = set()
    for fail_at in range(1, 100):
        folder = shutil.copytree(old_folder, tmp_path / f"try-{fail_at}")
        calls.clear()
        try:
            save_pipeline(pipeline, folder, extra_files={"dreambooth.json": b'{"identifier": "new"}'})
        except KeyboardInterrupt:
            pass
        else:
            assert identifier_and_weight(folder)[0] == "new"
            break  # fail_at is past the last rename: the save completed
        if (folder / load_weights.SAVE_JOURNAL).exists():
            with pytest.raises(LoadError, match="holds an interrupted save"):
                load_pipeline(folder)
            monkeypatch.setattr(Path, "rename", real_rename)
            assert finish_interrupted_save(folder)
            monkeypatch.setattr(Path, "rename", counting_rename)
            identifier, weight = identifier_and_weight(folder)
            assert identifier == "new" and torch.equal(weight, new_weight), fail_at
            outcomes.add("new")
        else:
            identifier, weight = identifier_and_weight(folder)
            assert identifier == "old" and torch.equal(weight, old[1]), fail_at
            assert not list(folder.glob(".saving-*")), "a staging folder was left behind"
            outcomes.add("old")
        assert not list(folder.glob(".saving-*")) and not (folder / load_weights.SAVE_JOURNAL).exists()
    else:
        raise AssertionError("save_pipeline never completed")
    assert outcomes == {"old", "new"} and fail_at > 8  # both sides of the journal were hit


def test_sample_py_names_an_interrupted_save(tiny_sd1, tmp_path):
    from load_weights import SAVE_JOURNAL, load_pipeline, save_pipeline
    folder = tmp_path / "model"
    save_pipeline(load_pipeline(tiny_sd1), folder, extra_files={"dreambooth.json": b'{"identifier": "sks"}'})
    (folder / SAVE_JOURNAL).write_text(json.dumps({"staging": ".saving-gone", "entries": ["unet"]}))
    result = subprocess.run([sys.executable, "sample.py", "--model", str(folder), "--prompt", "a [V] dog",
                             "--steps", "1", "--out_dir", str(tmp_path / "samples")],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 2 and "holds an interrupted save" in result.stderr and "Traceback" not in result.stderr
    assert "--finish_save" in result.stderr


def test_bad_photos_create_no_output_folder(tiny_sd1, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    err = fails(tiny_sd1, tmp_path / "empty", tmp_path / "out", capsys)
    assert "holds no images" in err and not (tmp_path / "out").exists()
