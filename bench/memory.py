"""Memory accounting of a DreamBooth step for a GPU user, and the 16 GB mode's loss curve (issue 6).

    python bench/memory.py                          # accounting table (~15 min on 2 busy cores)
    python bench/memory.py --loss-steps 20          # + same-seed loss curves, default vs --low_memory
    python bench/memory.py --skip-accounting --loss-steps 20

SD 1.5 at 512 px, prior preservation with batch 1 + 1 (the UNet sees batch 2 at 64x64 latents),
bf16 autocast, AdamW. What a GPU has to hold during a step is

    total = trainable weights (fp32) + optimizer state + frozen modules left on the GPU
            + peak of the tensors the step creates (activations saved for backward, autocast's
              bf16 weight copies, temporaries, and the gradients once they exist)

- Weights, gradients, optimizer state and frozen modules: exact arithmetic from the parameter
  counts of the full-size SD 1.5 modules, built on the meta device (no memory, no compute).
- The peak of created tensors: measured by running the step for real on this CPU with
  train_common.LiveTensors, a dispatch mode that records every storage an operation allocates
  and a weak-reference callback that records its release: the exact bytes alive at every moment,
  which is what a CUDA caching allocator must hold for them (less its rounding and
  fragmentation). Gradients are told apart at the end (the storages that became .grad), so the
  table also gives the activations alone. Not counted: the CUDA context (~0.3-0.5 GB), cuDNN /
  cuBLAS workspaces, allocator fragmentation; the 16 GB mode leaves room for them.
The measurement runs ours and diffusers' UNets (the same parameter objects) with and without
gradient checkpointing, diffusers' VAE encoding the two images (its trainer does so every step),
and one full step of train.py's memory mode (optim.AdamW with bf16 moments: its per-parameter
fp32 working copies are counted).

--loss-steps N runs train.py itself twice on the SD 1.5-size random pipeline (same seed, data,
noise and timesteps): `--cache_latents` (default precision of the moments) and `--low_memory`,
and compares the logged losses step by step.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_common  # noqa: E402

DOG = common.ROOT.parent / "shared" / "dreambooth-dataset" / "dog"
CLASS_SOURCE = common.ROOT.parent / "shared" / "dreambooth-dataset" / "dog2"  # stand-ins for class images


def parameter_bytes():
    """Parameter counts of the full-size SD 1.5 modules (built on the meta device)."""
    import torch

    import clip_text
    import unet
    import vae

    with torch.device("meta"):
        modules = {"unet": unet.UNet(unet.PRESETS["sd15"]), "vae": vae.VAE(vae.PRESETS["sd15"]),
                   "text_encoder": clip_text.CLIPTextModel(clip_text.PRESETS["sd15"])}
    return {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}


def measure_unet(unet, side, checkpointing, inputs):
    """Peaks of one bf16-autocast forward+backward (batch 2, gradients start as None)."""
    import torch

    x, t, context = inputs
    if side == "ours":
        unet.gradient_checkpointing = checkpointing
    elif checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    params = list(unet.parameters())
    with train_common.LiveTensors() as meter:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = unet(x, t, context) if side == "ours" else unet(x, t, encoder_hidden_states=context).sample
        out.float().pow(2).mean().backward()
        del out
    grads = meter.uids_of([p.grad for p in params])
    result = dict(peak=meter.peak, activations=meter.peak_without(grads),
                  grads=sum(p.grad.numel() * p.grad.element_size() for p in params))
    for p in params:
        p.grad = None
    return result


def measure_vae_encode(folder):
    """Peak of diffusers' VAE (bf16, as train_dreambooth.py keeps it) encoding two 512-px images."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(folder) / "vae", local_files_only=True).to(torch.bfloat16)
    images = torch.rand(2, 3, 512, 512, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16) * 2 - 1
    with torch.no_grad(), train_common.LiveTensors() as meter:
        vae.encode(images).latent_dist.sample()
    return meter.peak


def measure_low_memory_step(ours, inputs):
    """Peak created during the second step of train.py's memory mode on our UNet: bf16 autocast,
    gradient checkpointing, clip_grad_norm_, optim.AdamW with bf16 moments (state made in step 1)."""
    import torch

    import optim

    x, t, context = inputs
    ours.gradient_checkpointing = True
    optimizer = optim.AdamW([{"params": list(ours.parameters()), "lr": 5e-6}], weight_decay=1e-2,
                            state_dtype=torch.bfloat16)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(x, t, context)
        out.float().pow(2).mean().backward()
        del out
        torch.nn.utils.clip_grad_norm_(ours.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    state = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items() if k != "step")
    with train_common.LiveTensors() as meter:
        step()
    del optimizer
    ours.gradient_checkpointing = False
    return dict(peak=meter.peak, state=state)


def accounting(args):
    import torch

    counts = parameter_bytes()
    n_unet = counts["unet"]
    frozen_bf16 = 2 * (counts["vae"] + counts["text_encoder"])
    print(f"parameters (meta device): UNet {n_unet:,}, VAE {counts['vae']:,}, text encoder "
          f"{counts['text_encoder']:,}", flush=True)

    folder = common.build_sd15_folder(args.cache)
    ours, ref = train_common.load_unet_pair(folder)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(2, 4, 64, 64, generator=g), torch.tensor([10, 900]), torch.randn(2, 77, 768, generator=g))
    measured = {}
    for side, unet in (("ours", ours), ("diffusers", ref)):
        for ckpt in (False, True):
            key = f"{side}{'-ckpt' if ckpt else ''}"
            measured[key] = measure_unet(unet, side, ckpt, inputs)
            print(f"  {key}: peak created {measured[key]['peak'] / 1e9:.2f} GB, activations alone "
                  f"{measured[key]['activations'] / 1e9:.2f} GB, gradients {measured[key]['grads'] / 1e9:.2f} GB",
                  file=sys.stderr, flush=True)
    del ref
    measured["vae-encode"] = measure_vae_encode(folder)
    print(f"  diffusers VAE encode of 2 images: peak {measured['vae-encode'] / 1e9:.2f} GB", file=sys.stderr,
          flush=True)
    measured["low-memory-step"] = measure_low_memory_step(ours, inputs)
    print(f"  memory-mode step: peak created {measured['low-memory-step']['peak'] / 1e9:.2f} GB", file=sys.stderr,
          flush=True)

    weights, grads = 4 * n_unet, 4 * n_unet
    adam32, adam16 = 8 * n_unet, measured["low-memory-step"]["state"]
    m = measured
    # (name, flags, weights, grads kept between steps, optimizer state, frozen on GPU, peak created, note)
    modes = [
        ("diffusers train_dreambooth.py", "--mixed_precision bf16 (defaults)", weights, grads, adam32, frozen_bf16,
         max(m["diffusers"]["activations"], m["vae-encode"]),
         "VAE + text encoder on the GPU in bf16; grads kept (zero_grad(set_to_none=False))"),
        ("diffusers + checkpointing", "--gradient_checkpointing", weights, grads, adam32, frozen_bf16,
         max(m["diffusers-ckpt"]["activations"], m["vae-encode"]), "as above"),
        ("ours, default + cache", "--cache_latents", weights, 0, adam32, 0, m["ours"]["peak"],
         "frozen modules leave the GPU after caching; grads set to None between steps"),
        ("ours + checkpointing", "--cache_latents --gradient_checkpointing", weights, 0, adam32, 0,
         m["ours-ckpt"]["peak"], "as above"),
        ("ours, 16 GB mode", "--low_memory", weights, 0, adam16, 0, m["low-memory-step"]["peak"],
         "= --cache_latents --gradient_checkpointing --optimizer_state bf16 (optim.py)"),
    ]
    rows = []
    for name, flags, w, gk, s, f, peak, note in modes:
        total = w + gk + s + f + peak
        rows.append([name, f"`{flags}`", train_common.fmt_gb(w), train_common.fmt_gb(gk), train_common.fmt_gb(s),
                     train_common.fmt_gb(f), train_common.fmt_gb(peak), f"**{train_common.fmt_gb(total)}**", note])
    print("\n### Memory of one step, SD 1.5, 512 px, prior preservation (batch 1+1), bf16 autocast, AdamW "
          "(GB = 1e9 bytes)\n")
    common.print_table(rows, ["mode", "flags", "trainable weights fp32", "grads kept between steps",
                              "optimizer state", "frozen modules on GPU",
                              "peak created in a step (activations + grads + temporaries)", "total", "notes"])
    print("\nmeasured peaks of created tensors (GB): " + ", ".join(
        f"{k} {v['peak'] / 1e9:.2f} (activations alone {v['activations'] / 1e9:.2f})"
        for k, v in m.items() if isinstance(v, dict) and "activations" in v)
        + f"; diffusers VAE encode {m['vae-encode'] / 1e9:.2f}; memory-mode step "
        f"{m['low-memory-step']['peak'] / 1e9:.2f}")
    return dict(parameters=counts, measured=measured, rows=rows)


# ----------------------------------------------------------------------------------------------
# Same-seed loss curves of train.py: default vs --low_memory


def loss_curves(args):
    folder = common.build_sd15_folder(args.cache)
    work = Path(tempfile.mkdtemp(prefix="memory-loss-", dir=args.workdir))
    class_dir = work / "class_images"
    class_dir.mkdir()
    for i, path in enumerate(sorted(CLASS_SOURCE.iterdir())[:args.class_images]):
        shutil.copy(path, class_dir / f"class-{i:05d}{path.suffix}")
    curves = {}
    for name, flags in (("default", ["--cache_latents"]), ("low_memory", ["--low_memory"])):
        out = work / name
        argv = [str(common.ROOT / "train.py"), "--model", str(folder), "--instance_dir", str(DOG),
                "--class_noun", "dog", "--identifier", "sks", "--class_dir", str(class_dir),
                "--num_class_images", str(args.class_images),
                "--resolution", str(args.loss_resolution), "--max_steps", str(args.loss_steps), "--lr", str(args.lr),
                "--mixed_precision", "bf16", "--seed", "0", "--output_dir", str(out), *flags]
        print(f"running: python {' '.join(argv)}", file=sys.stderr, flush=True)
        threads = {"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}
        subprocess.run([sys.executable, *argv], check=True, env={**os.environ, "TQDM_DISABLE": "1", **threads})
        curves[name] = [json.loads(line) for line in (out / "loss.jsonl").read_text().splitlines()]
        shutil.rmtree(out / "unet", ignore_errors=True)  # 3.4 GB each; the log is what we compare
        shutil.rmtree(out / "vae", ignore_errors=True)
        shutil.rmtree(out / "text_encoder", ignore_errors=True)
    a, b = curves["default"], curves["low_memory"]
    rows = [[r["step"], f"{r['loss']:.5f}", f"{s['loss']:.5f}", f"{s['loss'] - r['loss']:+.2e}"] for r, s in zip(a, b)]
    print(f"\n### Same-seed loss, train.py --cache_latents vs --low_memory ({args.loss_resolution} px, lr {args.lr:g}, "
          f"SD 1.5-size random weights, {args.loss_steps} steps)\n")
    common.print_table(rows, ["step", "default", "--low_memory", "difference"])
    diffs = [abs(s["loss"] - r["loss"]) for r, s in zip(a, b)]
    rel = [d / abs(r["loss"]) for d, r in zip(diffs, a)]
    print(f"\nmax |difference| {max(diffs):.2e} (relative {max(rel):.2e}); mean |difference| "
          f"{sum(diffs) / len(diffs):.2e}; mean loss over the run: default "
          f"{sum(r['loss'] for r in a) / len(a):.5f}, --low_memory {sum(r['loss'] for r in b) / len(b):.5f}")
    shutil.rmtree(work, ignore_errors=True)
    return dict(default=a, low_memory=b, max_abs_diff=max(diffs), max_rel_diff=max(rel))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_cache_arg(p)
    p.add_argument("--skip-accounting", action="store_true")
    p.add_argument("--loss-steps", type=int, default=0, help="steps of each same-seed train.py run (0: skip)")
    p.add_argument("--loss-resolution", type=int, default=512)
    p.add_argument("--lr", type=float, default=5e-6, help="train.py's default")
    p.add_argument("--class-images", type=int, default=2)
    p.add_argument("--workdir", default=None, help="where the train.py runs write (default: the system temp dir)")
    p.add_argument("--malloc", choices=["stable", "default"], default="stable")
    train_common.add_threads_arg(p)
    p.add_argument("--json", help="also write the raw numbers to this file")
    args = p.parse_args(argv)
    train_common.reexec_with_stable_malloc(__file__, argv or sys.argv[1:], args.malloc)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train_common.set_threads(args.threads)
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    for line in train_common.header_lines():
        print(line, flush=True)
    raw = {}
    if args.loss_steps:  # first: with the malloc settings this process never gives memory back
        raw["loss_curves"] = loss_curves(args)
    if not args.skip_accounting:
        raw["accounting"] = accounting(args)
    print(f"\nload average at end: {' '.join(common.load_average())}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    sys.exit(main())
