"""Benchmark: the whole default DreamBooth job (class images, then training), counted in UNet
work and timed, ours vs diffusers' train_dreambooth.py.

    python bench/bench_job.py --threads 1                    # toy runs, SD 1.5 counts, 3 timed SD 1.5 forwards
    python bench/bench_job.py --skip-toy --forwards 0        # the SD 1.5 counts alone (seconds)

The unit of UNet work is one UNet forward of one image (one row of a UNet batch):
  class images  num_class_images x UNet calls per image x 2 when guidance_scale > 1 (classifier-
                free guidance runs the unconditional and the conditional row in one call)
  training      max_steps x batch_size x 2 (prior preservation adds a class image to each subject
                image) x F, where F = FLOPs of one forward+backward / FLOPs of one forward of the
                same UNet (torch.utils.flop_counter on the UNet built on the meta device: no
                weights, no time; the "3 forward-equivalents" of a training row)
Not counted: the VAE (ours encodes the photos and class images once with --cache_latents;
train_dreambooth.py encodes both images every step) and the text encoder, which both sides run
as well, diffusers' side more often; so the ratio is of the UNet's work alone.

diffusers' side: train_dreambooth.py --with_prior_preservation. Its class images come from
`DiffusionPipeline.from_pretrained(model)(prompt)` with the pipeline's defaults: the model's own
scheduler (PNDM for SD 1.5, skip_prk_steps: 51 UNet calls for its 50 steps), num_inference_steps
50, guidance 7.5, --sample_batch_size 4; --num_class_images 100 (its default) or 200 (its README's
prior-preservation example, with --train_batch_size 1 --max_train_steps 800, the training ours
does by default: 800 steps at batch 1). The script's bare defaults (--train_batch_size 4, one
epoch of max(instance, class images) / 4 = 25 steps, 500 warm-up steps) are no DreamBooth recipe;
its README's is the one compared.

Toy (real runs): train.main(["--model", "toy", ...]) in this process, twice: ours (train.TOY_RECIPE,
its class sampler) and the same recipe with the class images made by 50 DDIM steps, standing in
for diffusers' 50 PNDM steps (PNDM is not in this project; its calls cost the same, and it makes
51 of them). UNetMeter wraps unet.UNet.forward and counts the rows of each call, as sampling
(autograd off: the class images) or training (autograd on: x F of the toy UNet); time stamps
give each phase's wall time (first call to last call).

SD 1.5 seconds on this CPU: units x the measured seconds of one unit, from --forwards timed
forwards (after one warm-up) of our SD 1.5 UNet (random weights, built in bf16) at batch 2 (one
guided sampling step), 64x64 latents (512 px), under bf16 autocast, as sample.py runs it; one
unit = half a forward. Training seconds are training units x the same: on a CPU the backward is
slower per FLOP than the forward (bench_unet.py: forward+backward took 4.3 x a forward's time for
3.07 x its FLOPs), so they are a lower bound there; the UNet-work ratio does not depend on it.
"""
import argparse
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# diffusers' train_dreambooth.py: class images from the pipeline's defaults (see the docstring)
DIFFUSERS_CLASS = dict(scheduler="PNDM (skip_prk_steps)", steps=50, calls_per_image=51, guidance_scale=7.5)
DIFFUSERS_NUM_CLASS_IMAGES = (100, 200)  # the script's default; its README's prior-preservation example


# ----------------------------------------------------------------------------------------------
# Counting


def sampler_calls(scheduler, steps):
    """UNet calls of one image with our sampler `scheduler` at `steps` steps (len of its timesteps)."""
    import sample
    import schedulers

    sampler = sample.SCHEDULERS[scheduler](schedulers.PRESETS["sd15"], 0.0)
    sampler.set_timesteps(steps)
    return len(sampler.timesteps)


def pndm_calls(steps):
    """diffusers' PNDMScheduler (SD 1.5's config) UNet calls per image, if diffusers is here."""
    try:
        from diffusers import PNDMScheduler
    except ImportError:
        return DIFFUSERS_CLASS["calls_per_image"]
    scheduler = PNDMScheduler.from_config({k: v for k, v in common.SD15_SCHEDULER.items() if k != "_class_name"})
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps)


def backward_factor(config, latent, context_dim, tokens):
    """F: FLOPs of forward+backward / FLOPs of forward of our UNet with `config`, batch 1, counted
    on the meta device (shapes only)."""
    import torch

    from unet import UNet

    with torch.device("meta"):
        unet = UNet(config)
        x = torch.randn(1, config.in_channels, latent, latent)
        context, t = torch.randn(1, tokens, context_dim), torch.tensor([500])
    forward, _ = common.count_flops(lambda: unet(x, t, context))
    both, _ = common.count_flops(lambda: unet(x, t, context).float().pow(2).mean().backward())
    return both / forward


def job_units(num_class_images, calls_per_image, guidance_scale, max_steps, batch_size, factor):
    """(class-image units, training units) of one job."""
    rows_per_call = 2 if guidance_scale != 1 else 1
    return num_class_images * calls_per_image * rows_per_call, max_steps * batch_size * 2 * factor


# ----------------------------------------------------------------------------------------------
# The toy: real runs, counted by a hook


class UNetMeter:
    """While active, counts the rows of every unet.UNet call in this process, as "sampling"
    (autograd off) or "training" (autograd on), with the first call's start and the last call's
    end of each. It wraps UNet.forward (one Python call per UNet call: no cost worth counting),
    not every module's call, which would slow the toy's small steps."""

    def __init__(self):
        self.rows = {"sampling": 0, "training": 0}
        self.span = {"sampling": [None, None], "training": [None, None]}

    def __enter__(self):
        import torch

        from unet import UNet

        self._forward = forward = UNet.forward

        def counted(module, latents, *args, **kwargs):
            phase = "training" if torch.is_grad_enabled() and not torch.is_inference_mode_enabled() else "sampling"
            self.rows[phase] += latents.shape[0]
            if self.span[phase][0] is None:
                self.span[phase][0] = time.perf_counter()
            out = forward(module, latents, *args, **kwargs)
            self.span[phase][1] = time.perf_counter()
            return out
        UNet.forward = counted
        return self

    def __exit__(self, *exc):
        from unet import UNet

        UNet.forward = self._forward

    def seconds(self, phase):
        start, end = self.span[phase]
        return end - start if start is not None else 0.0


def toy_run(out, name, flags):
    """One real toy job from scratch (its folder, class images included, removed first):
    train.main with the toy recipe and `flags`; its counts and times."""
    import train
    from toy import world

    subject, folder = "eye_circle", Path(out) / name
    shutil.rmtree(folder, ignore_errors=True)
    argv = ["--model", "toy", "--instance_dir", str(common.ROOT / "toy" / "subjects" / subject),
            "--class_noun", world.SUBJECTS[subject].noun, "--output_dir", str(folder), *flags]
    with UNetMeter() as meter:
        t0 = time.perf_counter()
        if train.main(argv) != 0:
            raise RuntimeError(f"train.py failed: {argv}")
        wall = time.perf_counter() - t0
    args = train.parse_args(train.build_parser(), argv)
    return dict(name=name, argv=argv, wall=wall, sampling_rows=meter.rows["sampling"],
                training_rows=meter.rows["training"], sampling_s=meter.seconds("sampling"),
                training_s=meter.seconds("training"), num_class_images=args.num_class_images,
                class_scheduler=args.class_scheduler, class_steps=args.class_steps, max_steps=args.max_steps)


def toy_part(args):
    import train
    from toy.pretrain import UNET_CONFIG

    factor = backward_factor(UNET_CONFIG, 16, UNET_CONFIG.cross_attention_dim, 16)
    steps = ["--max_steps", str(args.toy_max_steps)] if args.toy_max_steps else []
    stand_in = ["--class_scheduler", "ddim", "--class_steps", "50"]
    runs = [toy_run(args.out, "ours", steps), toy_run(args.out, "diffusers-style", steps + stand_in)]
    rows = []
    for r in runs:
        units = r["sampling_rows"] + r["training_rows"] * factor
        rows.append([r["name"], f"{r['num_class_images']} x {r['class_scheduler']} {r['class_steps']}",
                     f"{r['sampling_rows']:,}", f"{r['training_rows']:,} x {factor:.2f}", f"{units:,.0f}",
                     f"{r['sampling_s']:.1f}", f"{r['training_s']:.1f}", f"{r['wall']:.1f}"])
    ours, ref = runs
    ratio = ((ours["sampling_rows"] + ours["training_rows"] * factor)
             / (ref["sampling_rows"] + ref["training_rows"] * factor))
    rows.append(["ours / diffusers-style", "", common.ratio(ours["sampling_rows"], ref["sampling_rows"]),
                 common.ratio(ours["training_rows"], ref["training_rows"]), f"{ratio:.2f}",
                 common.ratio(ours["sampling_s"], ref["sampling_s"]),
                 common.ratio(ours["training_s"], ref["training_s"]), common.ratio(ours["wall"], ref["wall"])])
    print(f"\nToy job (train.py --model toy: {train.toy_recipe_text()}), real runs; F = {factor:.2f}")
    common.print_table(rows, ["run", "class images", "UNet rows sampled", "training rows x F", "units",
                              "sampling s", "training s", "whole run s"])
    return dict(factor=factor, runs=runs, ratio=ratio)


# ----------------------------------------------------------------------------------------------
# SD 1.5: counts from the defaults, seconds from a one-off forward timing


def time_sd15_forward(forwards):
    """Median seconds of one batch-2 bf16 forward of our SD 1.5 UNet at 64x64 latents (and all
    timings), after one warm-up forward."""
    import torch

    from unet import PRESETS, UNet

    torch.set_default_dtype(torch.bfloat16)  # build the 860 M weights in bf16, as sample.py holds them
    try:
        unet = UNet(PRESETS["sd15"]).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    x, t, context = common.unet_inputs(2, 64)
    t = torch.tensor(500)

    def forward():
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            unet(x.to(torch.bfloat16), t, context.to(torch.bfloat16))
    forward()
    walls = []
    for i in range(forwards):
        _, timing = common.measure(forward)
        walls.append(timing["wall"])
        print(f"  SD 1.5 UNet forward, batch 2, bf16: {timing['wall']:.2f} s", file=sys.stderr, flush=True)
    return common.median(walls), walls


def sd15_part(args):
    import train
    from unet import PRESETS

    defaults = train.parse_args(train.build_parser(), ["--instance_dir", "photos", "--class_noun", "dog"])
    factor = backward_factor(PRESETS["sd15"], 64, 768, 77)
    training = dict(max_steps=defaults.max_steps, batch_size=defaults.batch_size, factor=factor)
    jobs = [(f"ours: train.py defaults ({defaults.class_scheduler} {defaults.class_steps})",
             defaults.num_class_images, sampler_calls(defaults.class_scheduler, defaults.class_steps),
             defaults.class_guidance_scale),
            ("ours with ddim 50 (the earlier default)", defaults.num_class_images, sampler_calls("ddim", 50),
             defaults.class_guidance_scale)]
    pndm = pndm_calls(DIFFUSERS_CLASS["steps"])
    jobs += [(f"diffusers: {n} class images, PNDM 50", n, pndm, DIFFUSERS_CLASS["guidance_scale"])
             for n in DIFFUSERS_NUM_CLASS_IMAGES]
    units = {name: job_units(n, calls, g, **training) for name, n, calls, g in jobs}
    unit_s, walls = (None, [])
    if args.forwards:
        forward_s, walls = time_sd15_forward(args.forwards)
        unit_s = forward_s / 2
    references = [name for name, *_ in jobs[2:]]
    rows = []
    for name, n, calls, _ in jobs:
        c, t = units[name]
        seconds = f"{c * unit_s / 3600:.2f} + {t * unit_s / 3600:.2f}" if unit_s else "-"
        rows.append([name, f"{n} x {calls} calls x 2", f"{c:,.0f}", f"{t:,.0f}", f"{c + t:,.0f}",
                     *(f"{(c + t) / sum(units[r]):.3f}" for r in references), seconds])
    print(f"\nSD 1.5 job: {defaults.max_steps} steps x batch {defaults.batch_size} x 2 rows (prior preservation) "
          f"x F = {factor:.2f} forward-equivalents per training row; class images with guidance "
          f"{defaults.class_guidance_scale} (2 rows per call)")
    if unit_s:
        print(f"one unit on this CPU: {unit_s:.2f} s (half a batch-2 bf16 forward, median of "
              f"{', '.join(f'{w:.2f}' for w in walls)} s)")
    common.print_table(rows, ["job", "class images", "class units", "training units", "total units",
                              *(f"/ {r.split(': ')[1].split(',')[0]}" for r in references),
                              "hours on this CPU (class + training)"])
    ours = sum(units[jobs[0][0]])
    verdict = {r: ours / sum(units[r]) for r in references}
    for r, v in verdict.items():
        print(f"target ours <= 0.5 x {r}: {v:.3f} -> {'met' if v <= 0.5 else 'not met'}")
    return dict(factor=factor, units=units, unit_s=unit_s, forward_walls=walls, verdict=verdict,
                defaults=dict(num_class_images=defaults.num_class_images, class_scheduler=defaults.class_scheduler,
                              class_steps=defaults.class_steps, max_steps=defaults.max_steps))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=common.HelpFormatter)
    common.add_threads_arg(p)
    p.add_argument("--malloc", choices=["stable", "default"], default="stable",
                   help="stable: re-run with MALLOC_* settings that keep freed memory in the process; default: glibc's")
    p.add_argument("--json", help="also write the raw numbers to this file")
    p.add_argument("--out", default="/tmp/bench-job", help="folder for the toy runs' outputs (each run's is replaced)")
    p.add_argument("--skip-toy", action="store_true", help="leave out the two real toy runs")
    p.add_argument("--toy-max-steps", type=int, default=0,
                   help="training steps of the toy runs (0: the toy recipe's); fewer only to check the script")
    p.add_argument("--forwards", type=int, default=3,
                   help="timed SD 1.5 UNet forwards (batch 2, bf16) for the seconds; 0: units only")
    args = p.parse_args(argv)
    common.start(args, __file__, argv)
    raw = {}
    if not args.skip_toy:
        raw["toy"] = toy_part(args)
    raw["sd15"] = sd15_part(args)
    common.finish(args, raw)
    return 0


if __name__ == "__main__":
    sys.exit(main())
