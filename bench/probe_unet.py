"""Probes behind bench_sample.py's findings: where a bf16 UNet step spends its time.

    python bench/probe_unet.py profile          # torch.profiler: ours vs diffusers, one forward each
    python bench/probe_unet.py bf16-weights     # ours: fp32 weights + autocast vs bf16 weights
    python bench/probe_unet.py autocast-cache   # diffusers: RSS/time of 3 forwards in one autocast
                                                # context, parameters requiring grad or not
    python bench/probe_unet.py loop             # ours vs diffusers as inside a sampling loop: --steps
                                                # forwards in ONE autocast context per side, alternating

The UNet runs at batch 2 (a guided step) on the SD 1.5-size random pipeline (bench/common.py),
under torch.autocast("cpu", bfloat16). Run with the malloc settings of REFERENCE.md section 5:
    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000 MALLOC_TOP_PAD_=0 python bench/probe_unet.py ...
"""
import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def inputs(size):
    import torch

    g = torch.Generator().manual_seed(0)
    latent = size // 8
    return (torch.randn(2, 4, latent, latent, generator=g), torch.tensor(500),
            torch.randn(2, 77, 768, generator=g))


def bf16():
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["profile", "bf16-weights", "autocast-cache", "loop"])
    common.add_cache_arg(p)
    p.add_argument("--size", type=int, default=512, help="image size in pixels (latent = size / 8)")
    p.add_argument("--rounds", type=int, default=2, help="bf16-weights, loop: measured rounds after a warm-up")
    p.add_argument("--steps", type=int, default=3, help="loop: forwards per autocast context")
    args = p.parse_args(argv)

    import torch

    folder = common.build_sd15_folder(args.cache)
    x, t, context = inputs(args.size)
    print(f"machine: {common.machine_line()}; load average {' '.join(common.load_average())}")

    if args.what == "profile":
        from diffusers import UNet2DConditionModel
        from torch.profiler import ProfilerActivity, profile

        from load_weights import load_pipeline

        ours = load_pipeline(folder).unet
        ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()

        def run_ours():
            with torch.inference_mode(), bf16():
                return ours(x, t, context)

        def run_ref():
            with torch.no_grad(), bf16():
                return ref(x, t, encoder_hidden_states=context).sample
        for name, fn in (("ours", run_ours), ("diffusers", run_ref)):
            fn()  # warm-up: first touch of memory, oneDNN primitive creation
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            print(f"===== {name}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12,
                                            max_name_column_width=40))

    elif args.what == "bf16-weights":
        from load_weights import load_pipeline

        unet32 = load_pipeline(folder).unet
        unet16 = load_pipeline(folder, dtype=torch.bfloat16).unet

        def fp32_weights():
            with torch.inference_mode(), bf16():
                return unet32(x, t, context)

        def bf16_weights():
            with torch.inference_mode(), bf16():
                return unet16(x.bfloat16(), t, context.bfloat16())
        res = common.alternate({"fp32 weights + autocast": fp32_weights,
                                "bf16 weights + autocast": bf16_weights}, rounds=args.rounds, warmup=1)
        for name, runs in res.items():
            print(f"{name}: median wall {common.median([r['wall'] for r in runs]):.2f} s, "
                  f"user {common.median([r['user'] for r in runs]):.2f} s")
        diff = (fp32_weights().float() - bf16_weights().float()).abs().max().item()
        print(f"max |difference| of the outputs: {diff}")

    elif args.what == "loop":
        from diffusers import UNet2DConditionModel

        from load_weights import load_pipeline

        ours = load_pipeline(folder).unet
        ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()  # requires_grad True

        def loop(fn):
            times = []
            with bf16():  # one context for all steps, as generate() and the diffusers pipeline do
                for _ in range(args.steps):
                    _, took = common.measure(fn)
                    times.append((took["wall"], took["user"]))
            return times
        sides = {"ours": lambda: loop(lambda: ours(x, t, context)),
                 "diffusers": lambda: loop(lambda: ref(x, t, encoder_hidden_states=context).sample)}
        per_step = {n: [] for n in sides}
        for r in range(1 + args.rounds):
            for name in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
                with (torch.inference_mode() if name == "ours" else torch.no_grad()):
                    times, _ = common.measure(sides[name])
                print(f"  [{'warm-up' if r == 0 else f'round {r}'}] {name}: forwards (wall/user) "
                      f"{', '.join(f'{w:.2f}/{u:.2f}' for w, u in times)} s", flush=True)
                if r:
                    per_step[name] += times
        for name, times in per_step.items():
            first, later = times[::args.steps], [s for i, s in enumerate(times) if i % args.steps]
            print(f"{name}: first forward of a context median wall {common.median([w for w, _ in first]):.2f} s "
                  f"user {common.median([u for _, u in first]):.2f} s; later forwards median wall "
                  f"{common.median([w for w, _ in later]):.2f} s user {common.median([u for _, u in later]):.2f} s")

    else:  # autocast-cache
        from diffusers import UNet2DConditionModel

        ref = UNet2DConditionModel.from_pretrained(folder, subfolder="unet").eval()
        for requires_grad in (False, True):
            ref.requires_grad_(requires_grad)
            with torch.no_grad(), bf16():  # one context, as StableDiffusionPipeline.__call__ under autocast
                for i in range(3):
                    t0 = time.perf_counter()
                    ref(x, t, encoder_hidden_states=context)
                    s = common.proc_status()
                    print(f"requires_grad={requires_grad} forward {i}: {time.perf_counter() - t0:.2f} s, "
                          f"RssAnon {common.gib(s['RssAnon']):.2f} GiB", flush=True)


if __name__ == "__main__":
    sys.exit(main())
