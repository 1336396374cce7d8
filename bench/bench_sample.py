"""Benchmark: one 512x512 image, DDIM with classifier-free guidance, ours vs diffusers.

    python bench/bench_sample.py                                 # bf16 autocast, 50 steps, 3 rounds
    python bench/bench_sample.py --precision fp32 --steps 10     # fp32, shorter
    python bench/bench_sample.py --steps 10 --components         # + UNet/VAE alone, alternating

SD 1.5-size random weights (common.build_sd15_folder), guidance 7.5, eta 0, seed 0:
  ours:      sample.generate(pipeline, [prompt], steps=..., mixed_precision="bf16" or "no")
  diffusers: StableDiffusionPipeline.from_pretrained(folder) (safety checker off) with
             DDIMScheduler.from_config(its scheduler config), called under
             torch.autocast("cpu", dtype=torch.bfloat16) for bf16 and plainly for fp32.
Both pipelines are loaded into ONE process as their users load them: ours as sample.py's CLI
does, with the weights in the autocast dtype; diffusers in fp32 (its default). After a warm-up
image per side (--warmup-steps steps) the sides run alternately, the order flipping every
round; medians of wall and user CPU time. A forward hook on each UNet sums the time spent in it,
so the table also gives seconds per denoising step (UNet time / steps; the rest of the image is
the text encoder, the sampler arithmetic and the VAE decode).
Peak RSS comes from one fresh process per side and precision (load + one image with
--rss-steps steps; the peak is reached in the first step and the decode).
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on mars"
SIDES = ("ours", "diffusers")


def load_side(side, folder, precision):
    import torch

    if side == "ours":
        from load_weights import load_pipeline

        return load_pipeline(folder, dtype=torch.bfloat16 if precision == "bf16" else torch.float32)
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                   requires_safety_checker=False, local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def autocast(precision):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def image_fn(side, pipe, precision, steps, args):
    """A callable making one image (a PIL image) on `side`."""
    import torch

    if side == "ours":
        from sample import generate

        mixed = {"bf16": "bf16", "fp32": "no"}[precision]
        return lambda: generate(pipe, [args.prompt], steps=steps, guidance_scale=args.guidance_scale,
                                seed=args.seed, height=args.size, width=args.size,
                                mixed_precision=mixed, progress=False)[0]

    def run():
        with autocast(precision):
            return pipe(args.prompt, num_inference_steps=steps, guidance_scale=args.guidance_scale,
                        eta=0.0, height=args.size, width=args.size,
                        generator=torch.Generator().manual_seed(args.seed)).images[0]
    return run


class UNetClock:
    """Sums the wall time spent inside a module's forward (pre- and post-forward hooks)."""

    def __init__(self, module):
        self.total, self.calls, self._t = 0.0, 0, None
        module.register_forward_pre_hook(self._start)
        module.register_forward_hook(self._stop)

    def _start(self, *_):
        self._t = time.perf_counter()

    def _stop(self, *_):
        self.total += time.perf_counter() - self._t
        self.calls += 1

    def take(self):
        out = {"unet": self.total, "unet_calls": self.calls}
        self.total, self.calls = 0.0, 0
        return out


def child_rss(side, precision, folder, args):
    """Fresh process: load one side, make one image with --rss-steps steps, report peak RSS."""
    pipe, load = common.measure(lambda: load_side(side, folder, precision))
    after_load = common.proc_status()
    _, image = common.measure(image_fn(side, pipe, precision, args.rss_steps, args))
    common.child_report(side=side, precision=precision, load=load, image=image, after_load=after_load)


def peak_rss(folder, precision, args):
    """{side: the child_rss report} of one fresh process per side."""
    out = {}
    for side in SIDES:
        out[side], _ = common.run_child(
            [__file__, "--child-rss", side, precision, "--cache", str(folder), "--rss-steps", str(args.rss_steps),
             "--size", str(args.size), "--malloc", args.malloc, "--threads", str(args.threads),
             "--prompt", args.prompt], env={"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"})
        peak = common.gib(out[side]["status"]["VmHWM"])
        print(f"  [fresh process, {args.rss_steps} steps] {side}: peak RSS {peak:.2f} GiB", file=sys.stderr, flush=True)
    return out


def components(pipes, precision, args):
    """UNet forward (batch 2, as with guidance) and VAE decode alone, sides alternating."""
    import torch

    x, t, context = common.unet_inputs(2, args.size // 8)
    z = torch.randn(1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0))
    # ours samples under inference_mode, diffusers' pipeline under no_grad
    grad = {"ours": torch.inference_mode, "diffusers": torch.no_grad}

    def unet(side):
        def run():
            with grad[side](), autocast(precision):
                common.unet_forward(pipes[side].unet, x, t, context)
        return run

    def decode(side):
        def run():
            with grad[side](), autocast(precision):
                pipes[side].vae.decode(z)
        return run

    return {name: common.alternate({side: make(side) for side in SIDES}, rounds=args.component_rounds)
            for name, make in (("UNet forward, batch 2", unet), ("VAE decode, 1 image", decode))}


def run_precision(folder, precision, args):
    """Load both sides, time --rounds images alternately, then peak RSS and components."""
    import numpy as np

    pipes = {side: load_side(side, folder, precision) for side in SIDES}
    clocks = {side: UNetClock(pipes[side].unet) for side in SIDES}
    if args.rounds == 0:
        return dict(components=components(pipes, precision, args))
    for side in SIDES:  # warm-up, shorter than a measured image
        image_fn(side, pipes[side], precision, args.warmup_steps, args)()
        clocks[side].take()
    images = {}

    def one_image(side):
        def run():
            images[side] = np.asarray(image_fn(side, pipes[side], precision, args.steps, args)(), dtype=np.int16)
            return clocks[side].take()
        return run
    runs = common.alternate({side: one_image(side) for side in SIDES}, rounds=args.rounds, warmup=0)
    diff = float(np.abs(images["ours"] - images["diffusers"]).mean())
    rss = peak_rss(folder, precision, args) if args.rss_steps else {}
    comp = components(pipes, precision, args) if args.components else {}
    return dict(runs=runs, rss=rss, components=comp, mean_abs_pixel_diff=diff)


def main(argv=None):
    p = common.parser(__doc__)
    p.add_argument("--precision", default="bf16", help="comma-separated among bf16, fp32")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per image")
    p.add_argument("--rounds", type=int, default=3,
                   help="measured images per side and precision (0: only the components)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up image of each side")
    p.add_argument("--rss-steps", type=int, default=2,
                   help="steps of the image made in the fresh peak-RSS processes (0: skip RSS)")
    p.add_argument("--components", action="store_true",
                   help="also time the UNet forward and the VAE decode alone, alternating")
    p.add_argument("--component-rounds", type=int, default=3, help="timed rounds of each component")
    p.add_argument("--prompt", default=PROMPT, help="the prompt of every image")
    p.add_argument("--guidance-scale", type=float, default=7.5, help="classifier-free guidance weight")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    p.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    p.add_argument("--child-rss", nargs=2, metavar=("SIDE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    precisions = args.precision.split(",")
    if any(x not in ("bf16", "fp32") for x in precisions):
        p.error(f"--precision: choose among bf16, fp32 (got {args.precision})")
    common.start(args, __file__, argv, header=not args.child_rss)
    if args.child_rss:
        return child_rss(*args.child_rss, args.cache, args)
    folder = common.build_sd15_folder(args.cache)
    raw = {}
    for precision in precisions:
        raw[precision] = run_precision(folder, precision, args)  # one precision's pipelines at a time
        report(precision, args, raw[precision])
    common.finish(args, raw)


def report(precision, args, result):
    if "runs" in result:
        runs, rss = result["runs"], result["rss"]
        m = {side: {k: common.median([r[k] for r in rs]) for k in ("wall", "user", "unet")}
             for side, rs in runs.items()}
        for side in SIDES:
            m[side]["rest"] = m[side]["wall"] - m[side]["unet"]
            m[side]["peak"] = rss[side]["status"]["VmHWM"] if side in rss else None
        rows = [[side, common.spread(runs[side], digits=1), f"{m[side]['user']:.1f}",
                 f"{m[side]['unet'] / args.steps:.2f}", f"{m[side]['rest']:.1f}",
                 f"{common.gib(m[side]['peak']):.2f}" if m[side]["peak"] else "-"] for side in SIDES]
        o, d = m["ours"], m["diffusers"]
        rows.append(["ours/diffusers", *(common.ratio(o[k], d[k]) for k in ("wall", "user", "unet", "rest")),
                     common.ratio(o["peak"], d["peak"]) if rss else "-"])
        label = "bf16 autocast" if precision == "bf16" else "fp32"
        print(f"\n### {label}, {args.steps} DDIM steps, {args.size}x{args.size}, guidance "
              f"{args.guidance_scale} ({args.rounds} rounds, medians)\n")
        common.print_table(rows, ["side", "s/image (min-max)", "user CPU s/image", "UNet s/step",
                                  "rest s/image (text, sampler, decode)",
                                  f"peak RSS GiB ({args.rss_steps}-step image, fresh process)"])
        print(f"\nmean |ours - diffusers| over the last images' pixels (0-255): {result['mean_abs_pixel_diff']:.2f}")
    for name, sides in result["components"].items():
        wall = {s: common.median([t["wall"] for t in v]) for s, v in sides.items()}
        user = {s: common.median([t["user"] for t in v]) for s, v in sides.items()}
        print(f"{precision} {name}: ours {wall['ours']:.2f} s (user {user['ours']:.2f}), diffusers "
              f"{wall['diffusers']:.2f} s (user {user['diffusers']:.2f}), "
              f"ratio {common.ratio(wall['ours'], wall['diffusers'])}")


if __name__ == "__main__":
    sys.exit(main())
