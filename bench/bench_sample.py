"""Benchmark: one 512x512 image, DDIM with classifier-free guidance, ours vs diffusers (issue 5).

    python bench/bench_sample.py                                 # bf16 autocast, 50 steps, 3 rounds
    python bench/bench_sample.py --precision fp32 --steps 10     # fp32, shorter
    python bench/bench_sample.py --steps 10 --components         # + UNet/VAE alone, alternating

SD 1.5-size random weights (bench/common.py), guidance 7.5, eta 0, seed 0, the same folder:
  ours:      sample.generate(pipeline, [prompt], steps=..., mixed_precision="bf16" or "no")
  diffusers: StableDiffusionPipeline.from_pretrained(folder) (safety checker off) with
             DDIMScheduler.from_config(its scheduler config), called under
             torch.autocast("cpu", dtype=torch.bfloat16) for bf16 and plainly for fp32.
Both pipelines are loaded into ONE process, as their users run them: ours as sample.py's CLI
loads it, with the weights in the autocast dtype (bf16 for bf16: autocast would otherwise cast
every frozen fp32 weight again at every step), diffusers in fp32 (its default; its parameters
require grad, so autocast caches their bf16 copies for the whole call instead). After a warm-up
call per side (with --warmup-steps steps) the sides run alternately, the order flipping every
round; medians of wall time and of user CPU time are reported. A forward hook on each UNet sums the time spent in
the UNet, so the table also gives seconds per denoising step (UNet time / steps; the rest of
the image is the text encoder, the sampler arithmetic and the VAE decode).
Peak RSS comes from one fresh process per side and precision (load + one image with
--rss-steps steps; the peak is reached in the first step and the decode).

By default the script re-executes itself with the malloc settings of ../shared/REFERENCE.md
section 5 (MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=0), which
keep freed memory in the process so that the first-touch page faults of these VMs are paid
once; --malloc default runs with glibc's defaults instead.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the project root on sys.path)

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


def image_fn(side, pipe, precision, steps, args):
    """A callable making one image (a PIL image) on `side`."""
    import contextlib

    import torch

    if side == "ours":
        from sample import generate

        mixed = {"bf16": "bf16", "fp32": "no"}[precision]
        return lambda: generate(pipe, [args.prompt], steps=steps, guidance_scale=args.guidance_scale,
                                seed=args.seed, height=args.size, width=args.size,
                                mixed_precision=mixed, progress=False)[0]

    def run():
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
        with ctx:
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
        out = (self.total, self.calls)
        self.total, self.calls = 0.0, 0
        return out


def child_rss(side, precision, folder, steps, args):
    """Fresh process: load one side, make one image, report peak RSS (VmHWM)."""
    t0 = time.perf_counter()
    pipe = load_side(side, folder, precision)
    load_s = time.perf_counter() - t0
    after_load = common.proc_status()
    _, t = common.measure(image_fn(side, pipe, precision, steps, args))
    print(json.dumps(dict(side=side, precision=precision, steps=steps, load_s=load_s,
                          image=t, after_load=after_load, final=common.proc_status())), flush=True)


def components(pipes, precision, args, rounds):
    """UNet forward (batch 2, as with guidance) and VAE decode alone, sides alternating."""
    import contextlib

    import torch

    size = args.size // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size, size, generator=g)
    context = torch.randn(2, 77, 768, generator=g)
    t = torch.tensor(500)
    z = torch.randn(1, 4, size, size, generator=g)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext

    def ours_unet():
        with torch.inference_mode(), ctx():
            return pipes["ours"].unet(x, t, context)

    def ref_unet():
        with torch.no_grad(), ctx():  # diffusers' pipeline runs under no_grad
            return pipes["diffusers"].unet(x, t, encoder_hidden_states=context).sample

    def ours_vae():
        with torch.inference_mode(), ctx():
            return pipes["ours"].vae.decode(z)

    def ref_vae():
        with torch.no_grad(), ctx():
            return pipes["diffusers"].vae.decode(z).sample

    out = {}
    for name, sides in (("UNet forward, batch 2", {"ours": ours_unet, "diffusers": ref_unet}),
                        ("VAE decode, 1 image", {"ours": ours_vae, "diffusers": ref_vae})):
        print(f"{precision} {name}:", file=sys.stderr, flush=True)
        out[name] = common.alternate(sides, rounds=rounds, warmup=1)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_cache_arg(p)
    p.add_argument("--precision", default="bf16", help="comma-separated among bf16, fp32")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps per image")
    p.add_argument("--rounds", type=int, default=3,
                   help="measured images per side and precision (0: only --components)")
    p.add_argument("--warmup-steps", type=int, default=2, help="steps of the warm-up image of each side")
    p.add_argument("--rss-steps", type=int, default=2,
                   help="steps of the image made in the fresh peak-RSS processes (0: skip RSS)")
    p.add_argument("--components", action="store_true",
                   help="also time the UNet forward and the VAE decode alone, alternating")
    p.add_argument("--component-rounds", type=int, default=3)
    p.add_argument("--malloc", choices=["stable", "default"], default="stable",
                   help="stable: re-run with REFERENCE.md's MALLOC_* settings; default: glibc's")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=512, help="image height and width in pixels")
    p.add_argument("--json", help="also write the raw timings to this file")
    p.add_argument("--child-rss", nargs=2, metavar=("SIDE", "PRECISION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    precisions = args.precision.split(",")
    if any(x not in ("bf16", "fp32") for x in precisions):
        p.error(f"--precision: choose among bf16, fp32 (got {args.precision})")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.malloc == "stable" and any(os.environ.get(k) != v for k, v in common.STABLE_MALLOC_ENV.items()):
        # glibc reads these when the process starts: run again with them set.
        os.execve(sys.executable, [sys.executable, __file__, *(argv or sys.argv[1:])],
                  {**os.environ, **common.STABLE_MALLOC_ENV})
    if args.child_rss:
        side, precision = args.child_rss
        return child_rss(side, precision, args.cache, args.rss_steps, args)

    import warnings

    import numpy as np
    import torch

    warnings.filterwarnings("ignore", category=FutureWarning)
    folder = common.build_sd15_folder(args.cache)
    malloc_env = {k: os.environ.get(k) for k in common.STABLE_MALLOC_ENV}
    print(f"machine: {common.machine_line()}")
    print(f"malloc env: {malloc_env}")
    print(f"load average at start: {' '.join(common.load_average())}")
    if args.rounds:
        print(f"{args.size}x{args.size}, DDIM {args.steps} steps, guidance {args.guidance_scale}, "
              f"{args.rounds} rounds after a {args.warmup_steps}-step warm-up per side")
    else:
        print(f"{args.size}x{args.size}: components only")

    raw = {}
    for precision in precisions:
        pipes = clocks = None  # the previous precision's pipelines go before the next are loaded
        pipes = {side: load_side(side, folder, precision) for side in SIDES}
        clocks = {side: UNetClock(pipes[side].unet) for side in SIDES}
        if args.rounds == 0:  # components only
            comp = components(pipes, precision, args, args.component_rounds)
            raw[precision] = dict(components=comp)
            print(f"\n### {precision}: components alone ({args.component_rounds} rounds, medians)\n")
            report_components(comp)
            continue
        print(f"\n{precision}: warm-up", file=sys.stderr, flush=True)
        images = {}
        for side in SIDES:
            _, t = common.measure(image_fn(side, pipes[side], precision, args.warmup_steps, args))
            clocks[side].take()
            print(f"  [warm-up, {args.warmup_steps} steps] {side}: wall {t['wall']:.1f} s",
                  file=sys.stderr, flush=True)
        runs = {side: [] for side in SIDES}
        for r in range(args.rounds):
            for side in (SIDES if r % 2 == 0 else SIDES[::-1]):
                image, t = common.measure(image_fn(side, pipes[side], precision, args.steps, args))
                t["unet"], t["unet_calls"] = clocks[side].take()
                images[side] = np.asarray(image, dtype=np.int16)
                runs[side].append(t)
                print(f"  [round {r + 1}/{args.rounds}] {side}: wall {t['wall']:.1f} s, user "
                      f"{t['user']:.1f} s, UNet {t['unet']:.1f} s in {t['unet_calls']} calls",
                      file=sys.stderr, flush=True)
        diff = float(np.abs(images["ours"] - images["diffusers"]).mean())
        rss = {}
        if args.rss_steps:
            for side in SIDES:
                out, usage = common.run_child(
                    [__file__, "--child-rss", side, precision, "--cache", str(folder),
                     "--rss-steps", str(args.rss_steps), "--size", str(args.size),
                     "--malloc", args.malloc, "--prompt", args.prompt],
                    env={"TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"})
                rss[side] = dict(out, maxrss=out["final"]["VmHWM"])  # not ru_maxrss: see run_child
                print(f"  [RSS process, {args.rss_steps} steps] {side}: peak {common.gib(rss[side]['maxrss']):.2f} GiB, "
                      f"after load {common.gib(out['after_load']['VmRSS']):.2f} GiB, image {out['image']['wall']:.1f} s",
                      file=sys.stderr, flush=True)
        comp = components(pipes, precision, args, args.component_rounds) if args.components else {}
        raw[precision] = dict(runs=runs, rss=rss, components=comp, mean_abs_pixel_diff=diff)
        report(precision, args, runs, rss, comp, diff)
    print(f"\nload average at end: {' '.join(common.load_average())}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


def report(precision, args, runs, rss, comp, diff):
    m = common.median
    rows, med = [], {}
    for side in SIDES:
        rs = runs[side]
        s = dict(wall=m([r["wall"] for r in rs]), lo=min(r["wall"] for r in rs), hi=max(r["wall"] for r in rs),
                 user=m([r["user"] for r in rs]), unet=m([r["unet"] for r in rs]),
                 rest=m([r["wall"] - r["unet"] for r in rs]), peak=rss.get(side, {}).get("maxrss"))
        med[side] = s
        rows.append([side, f"{s['wall']:.1f} ({s['lo']:.1f}-{s['hi']:.1f})", f"{s['user']:.1f}",
                     f"{s['unet'] / args.steps:.2f}", f"{s['rest']:.1f}",
                     f"{common.gib(s['peak']):.2f}" if s["peak"] else "-"])
    o, d = med["ours"], med["diffusers"]
    rows.append(["ours/diffusers", common.ratio(o["wall"], d["wall"]), common.ratio(o["user"], d["user"]),
                 common.ratio(o["unet"], d["unet"]), common.ratio(o["rest"], d["rest"]),
                 common.ratio(o["peak"], d["peak"]) if o["peak"] and d["peak"] else "-"])
    label = "bf16 autocast" if precision == "bf16" else "fp32"
    print(f"\n### {label}, {args.steps} DDIM steps, {args.size}x{args.size}, guidance "
          f"{args.guidance_scale} ({args.rounds} rounds, medians)\n")
    common.print_table(rows, ["side", "s/image (min-max)", "user CPU s/image", "UNet s/step",
                              "rest s/image (text, sampler, decode)",
                              f"peak RSS GiB ({args.rss_steps}-step image, fresh process)"
                              if args.rss_steps else "peak RSS GiB (not measured)"])
    print(f"\nmean |ours - diffusers| over the last images' pixels (0-255): {diff:.2f}")
    report_components(comp)


def report_components(comp):
    for name, sides in comp.items():
        cells = {s: (common.median([t["wall"] for t in v]), common.median([t["user"] for t in v]))
                 for s, v in sides.items()}
        print(f"{name}: ours {cells['ours'][0]:.2f} s (user {cells['ours'][1]:.2f}), diffusers "
              f"{cells['diffusers'][0]:.2f} s (user {cells['diffusers'][1]:.2f}), ratio "
              f"{common.ratio(cells['ours'][0], cells['diffusers'][0])}")


if __name__ == "__main__":
    sys.exit(main())
