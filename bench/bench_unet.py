"""Benchmark: the SD 1.5 UNet alone, ours vs diffusers' UNet2DConditionModel (issue 6).

    python bench/bench_unet.py                      # every row, 3 rounds
    python bench/bench_unet.py --rows fwd-bf16,train-bf16 --rounds 5

Batch 2 at 64x64 latents (two 512-px images: one DreamBooth step with prior preservation),
text context [2, 77, 768], timesteps (10, 900). Rows:
  fwd-fp32         forward under torch.no_grad(), fp32
  fwd-bf16         forward under torch.no_grad(), bf16 autocast
  train-bf16       forward + backward of mean(prediction^2), bf16 autocast, fp32 weights
  train-bf16-ckpt  the same with gradient checkpointing (both sides: every resnet and
                   transformer block recomputed in backward)
Both UNets hold the same parameter objects (train_common.load_unet_pair; SD 1.5-size random
weights from common.build_sd15_folder). Per row: two untimed passes per side, one counting FLOPs
(torch.utils.flop_counter) and one measuring the exact peak bytes of the tensors the pass creates
(train_common.LiveTensors: activations, temporaries and, in training rows, the gradients), then
a warm-up round and --rounds rounds with the sides alternating (the order flips every round);
medians of wall time, user CPU time, and achieved TFLOP/s next to the bf16 and fp32 matmul
throughput measured in the same run (before every row and at the end; the best counts).
Gradients are dropped (set to None) after every pass.
Re-runs itself with REFERENCE.md's malloc settings unless --malloc default.
"""
import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import train_common  # noqa: E402

ROWS = {
    "fwd-fp32": "forward, no grad, fp32",
    "fwd-bf16": "forward, no grad, bf16 autocast",
    "train-bf16": "forward+backward, bf16 autocast",
    "train-bf16-ckpt": "forward+backward, bf16 autocast, gradient checkpointing",
}
SIDES = ("ours", "diffusers")


def make_calls(unets, row, inputs):
    """{side: a callable doing one pass of `row`}."""
    import torch

    x, t, context = inputs
    bf16 = "bf16" in row
    train = row.startswith("train")
    for side, unet in unets.items():
        if side == "ours":
            unet.gradient_checkpointing = row.endswith("ckpt")
        elif row.endswith("ckpt"):
            unet.enable_gradient_checkpointing()
        else:
            unet.disable_gradient_checkpointing()

    def call(side):
        unet = unets[side]

        def run():
            grad = contextlib.nullcontext() if train else torch.no_grad()
            cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
            with grad, cast:
                out = unet(x, t, context) if side == "ours" else unet(x, t, encoder_hidden_states=context).sample
            if train:
                out.float().pow(2).mean().backward()
                for p in unet.parameters():
                    p.grad = None
            return out.shape
        return run
    return {side: call(side) for side in unets}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_cache_arg(p)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated among {', '.join(ROWS)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=64, help="latent height and width (pixels / 8)")
    p.add_argument("--malloc", choices=["stable", "default"], default="stable")
    train_common.add_threads_arg(p)
    p.add_argument("--json", help="also write the raw numbers to this file")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if any(r not in ROWS for r in rows):
        p.error(f"--rows: choose among {', '.join(ROWS)}")
    train_common.reexec_with_stable_malloc(__file__, argv or sys.argv[1:], args.malloc)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    train_common.set_threads(args.threads)
    import warnings

    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    folder = common.build_sd15_folder(args.cache)
    for line in train_common.header_lines():
        print(line, flush=True)
    unets = dict(zip(SIDES, train_common.load_unet_pair(folder)))
    print(f"max |ours - diffusers| of an fp32 forward (16x16 latents): "
          f"{train_common.check_same_function(unets['ours'], unets['diffusers']):.2e}", flush=True)
    g = torch.Generator().manual_seed(0)
    inputs = (torch.randn(args.batch, 4, args.latent, args.latent, generator=g),
              torch.tensor([10, 900] * (args.batch // 2) + [500] * (args.batch % 2)),
              torch.randn(args.batch, 77, 768, generator=g))

    matmul = train_common.MatmulPeak()
    raw = {"rows": {}}
    for row in rows:
        matmul.measure()  # before every row: the best of these is the machine's throughput
        calls = make_calls(unets, row, inputs)
        info = {}
        for side in SIDES:
            flops, _ = train_common.count_flops(calls[side])
            with train_common.LiveTensors() as meter:  # a pass of its own: the FLOP counter's
                calls[side]()                            # module hooks hold tensors for backward
            info[side] = dict(flops=flops, peak_bytes=meter.peak)
            print(f"[{row}] {side}: {flops / 1e12:.3f} TFLOP counted, peak of created tensors "
                  f"{meter.peak / 1e9:.2f} GB", file=sys.stderr, flush=True)
        timings = common.alternate(calls, rounds=args.rounds, warmup=1)
        raw["rows"][row] = {side: dict(info[side], timings=timings[side]) for side in SIDES}
    matmul.measure()
    raw["matmul_tflops"] = matmul.samples
    print(f"matmul throughput (4096^3): {matmul.line()}")
    peaks = {torch.bfloat16: matmul.best("bf16"), torch.float32: matmul.best("fp32")}
    report(raw, rows, args, peaks)
    print(f"\nload average at end: {' '.join(common.load_average())}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


def report(raw, rows, args, peaks):
    import torch

    m = common.median
    table = []
    for row in rows:
        cells = {}
        for side in SIDES:
            r = raw["rows"][row][side]
            wall = m([t["wall"] for t in r["timings"]])
            user = m([t["user"] for t in r["timings"]])
            peak = peaks[torch.bfloat16 if "bf16" in row else torch.float32]
            cells[side] = dict(wall=wall, user=user, tflops=r["flops"] / wall / 1e12, peak=peak,
                               lo=min(t["wall"] for t in r["timings"]), hi=max(t["wall"] for t in r["timings"]),
                               mem=r["peak_bytes"], flops=r["flops"])
        o, d = cells["ours"], cells["diffusers"]
        table.append([ROWS[row], f"{o['wall']:.2f} ({o['lo']:.2f}-{o['hi']:.2f})",
                      f"{d['wall']:.2f} ({d['lo']:.2f}-{d['hi']:.2f})",
                      common.ratio(o["wall"], d["wall"]), common.ratio(o["user"], d["user"]),
                      f"{o['flops'] / 1e12:.2f}",
                      f"{o['tflops']:.3f} ({100 * o['tflops'] / o['peak']:.0f}%)",
                      f"{d['tflops']:.3f} ({100 * d['tflops'] / d['peak']:.0f}%)",
                      f"{o['mem'] / 1e9:.2f} / {d['mem'] / 1e9:.2f}"])
    print(f"\n### SD 1.5 UNet, batch {args.batch}, {args.latent}x{args.latent} latents "
          f"({args.rounds} rounds, medians; matmul peak this run: bf16 {peaks[torch.bfloat16]:.2f}, "
          f"fp32 {peaks[torch.float32]:.3f} TFLOP/s)\n")
    common.print_table(table, ["row", "ours s (min-max)", "diffusers s (min-max)", "ours/diffusers wall",
                               "ours/diffusers user CPU", "TFLOP per pass",
                               "ours TFLOP/s (% of matmul peak)", "diffusers TFLOP/s (%)",
                               "peak created tensors GB ours / diffusers"])


if __name__ == "__main__":
    sys.exit(main())
