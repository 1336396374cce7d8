"""Benchmark: the SD 1.5 UNet alone, ours vs diffusers' UNet2DConditionModel.

    python bench/bench_unet.py                      # every row, 3 rounds
    python bench/bench_unet.py --rows fwd-bf16,train-bf16 --rounds 5

Batch 2 at 64x64 latents (two 512-px images: one DreamBooth step with prior preservation),
text context [2, 77, 768], timesteps (10, 900). Rows:
  fwd-fp32         forward under torch.no_grad(), fp32
  fwd-bf16         forward under torch.no_grad(), bf16 autocast
  train-bf16       forward + backward of mean(prediction^2), bf16 autocast, fp32 weights
  train-bf16-ckpt  the same with gradient checkpointing (both sides: every resnet and
                   transformer block recomputed in backward)
Both UNets hold the same parameter objects (common.load_unet_pair). Per row: two untimed
passes per side, one counting FLOPs (torch.utils.flop_counter) and one measuring the exact peak
bytes of the tensors the pass creates (common.LiveTensors), then a warm-up round and --rounds
rounds with the sides alternating; medians of wall and user CPU time, and the achieved TFLOP/s
next to the bf16 / fp32 matmul throughput measured in the same run (before every row and at the
end; the best counts). Gradients are dropped (set to None) after every pass.
"""
import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROWS = {
    "fwd-fp32": "forward, no grad, fp32",
    "fwd-bf16": "forward, no grad, bf16 autocast",
    "train-bf16": "forward+backward, bf16 autocast",
    "train-bf16-ckpt": "forward+backward, bf16 autocast, gradient checkpointing",
}


def one_pass(unet, row, inputs):
    """A callable doing one pass of `row` on `unet`."""
    import torch

    train = row.startswith("train")
    common.set_gradient_checkpointing(unet, row.endswith("ckpt"))

    def run():
        grad = contextlib.nullcontext() if train else torch.no_grad()
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if "bf16" in row else contextlib.nullcontext()
        with grad, cast:
            out = common.unet_forward(unet, *inputs)
        if train:
            out.float().pow(2).mean().backward()
            for p in unet.parameters():
                p.grad = None
    return run


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated among {', '.join(ROWS)}")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per row, after one warm-up round")
    p.add_argument("--batch", type=int, default=2, help="latents per UNet call")
    p.add_argument("--latent", type=int, default=64, help="latent height and width (pixels / 8)")
    args = p.parse_args(argv)
    rows = args.rows.split(",")
    if any(r not in ROWS for r in rows):
        p.error(f"--rows: choose among {', '.join(ROWS)}, got {args.rows}")
    common.start(args, __file__, argv)
    folder = common.build_sd15_folder(args.cache)
    unets = dict(zip(("ours", "diffusers"), common.load_unet_pair(folder)))
    print(f"max |ours - diffusers| of an fp32 forward (16x16 latents): "
          f"{common.check_same_function(*unets.values()):.2e}", flush=True)
    inputs = common.unet_inputs(args.batch, args.latent)
    matmul = common.MatmulPeak()
    raw = {"rows": {}}
    for row in rows:
        matmul.measure()  # before every row: the best of these is the machine's throughput
        calls = {side: one_pass(unet, row, inputs) for side, unet in unets.items()}
        raw["rows"][row] = {}
        for side, call in calls.items():
            flops, _ = common.count_flops(call)
            with common.LiveTensors() as meter:  # a pass of its own: the FLOP counter's
                call()                           # module hooks hold tensors for backward
            raw["rows"][row][side] = dict(flops=flops, peak_bytes=meter.peak)
        for side, timings in common.alternate(calls, rounds=args.rounds).items():
            raw["rows"][row][side]["timings"] = timings
    matmul.measure()
    raw["matmul_tflops"] = matmul.samples
    print(f"matmul throughput (4096^3): {matmul.line()}")
    report(raw, args, matmul)
    common.finish(args, raw)


def report(raw, args, matmul):
    table = []
    for row, sides in raw["rows"].items():
        peak = matmul.best("bf16" if "bf16" in row else "fp32")
        wall = {s: common.median([t["wall"] for t in r["timings"]]) for s, r in sides.items()}
        user = {s: common.median([t["user"] for t in r["timings"]]) for s, r in sides.items()}
        tflops = {s: r["flops"] / wall[s] / 1e12 for s, r in sides.items()}
        o, d = sides["ours"], sides["diffusers"]
        table.append([ROWS[row], common.spread(o["timings"]), common.spread(d["timings"]),
                      common.ratio(wall["ours"], wall["diffusers"]), common.ratio(user["ours"], user["diffusers"]),
                      f"{o['flops'] / 1e12:.2f}",
                      *(f"{tflops[s]:.3f} ({100 * tflops[s] / peak:.0f}%)" for s in ("ours", "diffusers")),
                      f"{common.gb(o['peak_bytes'])} / {common.gb(d['peak_bytes'])}"])
    print(f"\n### SD 1.5 UNet, batch {args.batch}, {args.latent}x{args.latent} latents ({args.rounds} rounds, "
          f"medians; matmul peak this run: bf16 {matmul.best('bf16'):.2f}, fp32 {matmul.best('fp32'):.3f} TFLOP/s)\n")
    common.print_table(table, ["row", "ours s (min-max)", "diffusers s (min-max)", "ours/diffusers wall",
                               "ours/diffusers user CPU", "TFLOP per pass", "ours TFLOP/s (% of matmul peak)",
                               "diffusers TFLOP/s (%)", "peak created tensors GB ours / diffusers"])


if __name__ == "__main__":
    sys.exit(main())
