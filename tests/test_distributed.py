"""Multi-process training with torchrun (gloo on CPU, 2 processes), as a user launches it."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def instance_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subject")
    for i, background in enumerate([(20, 120, 20), (200, 200, 200), (30, 30, 160)]):
        image = Image.new("RGB", (20, 18), background)
        image.paste((220, 30, 30), (4 + i, 3, 14 + i, 13))
        image.save(folder / f"{i}.png")
    return folder


def train_args(tiny, instance_dir, out, *extra):
    return ["--model", str(tiny), "--instance_dir", str(instance_dir), "--class_noun", "square",
            "--resolution", "16", "--output_dir", str(out), "--num_class_images", "3", "--class_steps", "2",
            "--mixed_precision", "no", "--lr", "1e-3", "--identifier", "sks", "--flip", *extra]


def torchrun(nproc, argv):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "train.py", *argv] if nproc > 1 else [sys.executable, "train.py", *argv]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def unet(folder):
    return load_file(Path(folder) / "unet" / "diffusion_pytorch_model.safetensors")


def test_two_ranks_train_like_one_process_with_the_global_batch(tiny_sd1, instance_dir, tmp_path):
    """2 processes x batch 1 == 1 process x batch 2: same data order, same noise, gradients
    averaged by DDP instead of by the batch mean. Adam's first steps move every weight by about
    lr * sign(grad), which turns fp32 rounding in near-zero gradients into lr-sized differences;
    with a larger Adam epsilon the update is smooth in the gradient, and the runs agree to 1e-6."""
    two = tmp_path / "two"
    common = ["--max_steps", "3", "--grad_accum", "2", "--adam_epsilon", "1e-3"]
    result = torchrun(2, train_args(tiny_sd1, instance_dir, two, "--batch_size", "1", *common))
    assert "1 per process x 2 processes x 2 accumulation = 4 instance images" in result.stderr
    one = tmp_path / "one"
    torchrun(1, train_args(tiny_sd1, instance_dir, one, "--batch_size", "2", *common,
                           "--class_dir", str(two / "class_images")))
    a, b = unet(two), unet(one)
    start = unet(tiny_sd1)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 1e-4  # it did train
    logs = [[json.loads(line) for line in (f / "loss.jsonl").read_text().splitlines()] for f in (two, one)]
    assert [r["step"] for r in logs[0]] == [1, 2, 3]
    for r2, r1 in zip(*logs):
        assert abs(r2["loss"] - r1["loss"]) <= 1e-5
    # only rank 0 wrote: one log, one model, and the class images of both ranks
    assert sorted(p.name for p in (two / "class_images").iterdir()) == [f"class-0000{i}.png" for i in range(3)]
    assert json.loads((two / "dreambooth.json").read_text())["world_size"] == 2


def test_resume_under_two_ranks(tiny_sd1, instance_dir, tmp_path):
    common = ["--batch_size", "1", "--max_steps", "4", "--checkpoint_every", "2", "--keep_checkpoints", "2", "--cache_latents"]
    straight = tmp_path / "a"
    torchrun(2, train_args(tiny_sd1, instance_dir, straight, *common))
    resumed = tmp_path / "b"
    (resumed / "checkpoints").mkdir(parents=True)
    os.rename(straight / "checkpoints" / "step-000002", resumed / "checkpoints" / "step-000002")
    result = torchrun(2, train_args(tiny_sd1, instance_dir, resumed, *common, "--resume", "latest",
                                    "--class_dir", str(straight / "class_images")))
    assert "resumed from" in result.stderr
    a, b = unet(straight), unet(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # a different global batch cannot continue the same run: say why
    bad = subprocess.run([sys.executable, "train.py", *train_args(tiny_sd1, instance_dir, resumed, *common,
                          "--resume", str(resumed / "checkpoints" / "step-000002"),
                          "--class_dir", str(straight / "class_images"))],
                         cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert bad.returncode != 0
    assert "was made with 2 process(es) x batch 1 = 2 images per step, but this run has 1 x 1 = 1" in bad.stderr


# ---- class images: 2 ranks share the shortfall --------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _class_image_worker(rank, port, model, class_dir, log_dir):
    import dreambooth
    import sample
    from load_weights import load_pipeline
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    generated = []
    real_generate = sample.generate

    def recording_generate(pipeline, prompts, **kwargs):
        generated.extend(range(kwargs["seed"], kwargs["seed"] + len(prompts)))
        return real_generate(pipeline, prompts, **kwargs)
    sample.generate = recording_generate
    paths = dreambooth.ensure_class_images(
        load_pipeline(model), class_dir, "a photo of dog", 7, seed=0, batch_size=2, steps=1, height=16,
        width=16, mixed_precision="no", rank=rank, world_size=2, barrier=dist.barrier)
    Path(log_dir, f"rank{rank}.json").write_text(json.dumps({"generated": generated, "paths": [p.name for p in paths]}))
    dist.destroy_process_group()


def test_class_images_are_sharded(tiny_sd1, tmp_path):
    class_dir = tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (16, 16)).save(class_dir / "class-00002.png")  # one already there
    mp.spawn(_class_image_worker, args=(_free_port(), str(tiny_sd1), str(class_dir), str(tmp_path)), nprocs=2)
    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    a, b = logs[0]["generated"], logs[1]["generated"]
    assert not set(a) & set(b), "two ranks generated the same image"
    assert sorted(a + b) == [0, 1, 3, 4, 5, 6]  # exactly the shortfall, no gaps
    assert a and b  # both ranks worked
    expected = [f"class-{i:05d}.png" for i in range(7)]
    assert logs[0]["paths"] == logs[1]["paths"] == expected


def _failing_worker(rank, port, argv):
    import dreambooth
    import train
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    if rank == 1:
        def broken(*args, **kwargs):
            raise OSError("disk full")
        dreambooth.ensure_class_images = broken
    train.main(argv)


def test_a_failing_rank_stops_the_others(tiny_sd1, instance_dir, tmp_path, capfd):
    """Rank 1 fails while rank 0 waits for it at a barrier: the launcher ends both (no hang), and
    the failing rank says who it is."""
    import time
    start = time.monotonic()
    # The launcher raises the error of whichever process exits first: rank 1's own, or rank 0's
    # lost connection at the barrier (a race; gloo words it "Connection closed" or "Connection
    # reset by peer"). Either way both end, and rank 1 named itself.
    with pytest.raises(mp.ProcessRaisedException, match="disk full|Connection closed|Connection reset by peer"):
        mp.spawn(_failing_worker, args=(_free_port(), train_args(tiny_sd1, instance_dir, tmp_path / "out",
                                                                 "--max_steps", "2")), nprocs=2)
    assert time.monotonic() - start < 120
    assert "error: rank 1 of 2 failed" in capfd.readouterr().err
