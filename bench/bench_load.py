"""Benchmark: load an SD 1.5-size pipeline from disk, ours vs diffusers (issue 3).

    python bench/bench_load.py                       # fp32 and fp16, 3 rounds after a warm-up
    python bench/bench_load.py --precision fp16 --rounds 5
    python bench/bench_load.py --accelerate-path /tmp/bench-pydeps   # adds diffusers+accelerate

Cases: fp32 safetensors -> fp32 weights, and the fp16 variant (*.fp16.safetensors) -> fp16.
  ours:      load_weights.load_pipeline(folder, dtype=..., variant=...)
  diffusers: StableDiffusionPipeline.from_pretrained(folder, torch_dtype=..., variant=...)
Every load runs in a fresh Python process (so each has its own peak RSS and a cold start of the
interpreter); the sides alternate, and the first round is a warm-up whose numbers are dropped.
After the warm-up the weight files are in the page cache for both sides: this measures
loading from memory, not from disk.

Each child reports: the load call's wall and CPU time; VmHWM (peak RSS) right after the call;
then it reads one byte of every 4 KiB page of every weight (bringing all of them in, as the
first forward pass would) and reports the time of that first read and the final VmHWM. Memory-mapped weights are not read
by the load itself, so "after load" alone would flatter a lazy loader: the final peak is the
figure compared with the target (peak RSS <= 1.2 x the bytes of the loaded weights).

diffusers needs the `accelerate` package for its low-memory loading (without it, it builds each
model with random weights first and then copies the checkpoint in). It is not installed in this
environment; --accelerate-path DIR puts a private copy (pip install --target DIR --no-deps
accelerate psutil) on the PYTHONPATH of an extra side, "diffusers+accelerate".
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the project root on sys.path)

# case -> (dtype to load as, file variant)
DTYPES = {"fp32": ("float32", None), "fp16": ("float16", "fp16"),
          "fp32-to-fp16": ("float16", None)}  # an extra case: converting while loading
SIDES = ("ours", "ours+dynamo", "diffusers", "diffusers+accelerate")


def child(side, precision, folder):
    """One load in this (fresh) process; prints a JSON line."""
    t0 = time.perf_counter()
    import torch
    if side.startswith("ours"):
        if side == "ours+dynamo":  # diagnostic: what diffusers' imports do anyway (see README)
            import torch._dynamo  # noqa: F401
        from load_weights import load_pipeline
    else:
        from diffusers import StableDiffusionPipeline
    import_s = time.perf_counter() - t0
    before = common.proc_status()
    dtype_name, variant = DTYPES[precision]
    dtype = getattr(torch, dtype_name)

    if side.startswith("ours"):
        load = lambda: load_pipeline(folder, dtype=dtype, variant=variant)
    else:
        load = lambda: StableDiffusionPipeline.from_pretrained(
            folder, torch_dtype=dtype, variant=variant, safety_checker=None,
            requires_safety_checker=False, local_files_only=True)
    pipe, load_t = common.measure(load)
    after_load = common.proc_status()
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)
    dtypes = sorted({str(p.dtype) for m in modules for p in m.parameters()})
    weight_bytes = common.module_bytes(*modules)

    def read_all():  # one byte of every 4 KiB page of every weight: brings all pages in, as
        with torch.no_grad():  # the first forward pass would, with next to no arithmetic
            return sum(int(t.detach().reshape(-1).view(torch.uint8)[::4096].sum())
                       for m in modules for t in list(m.parameters()) + list(m.buffers()))
    checksum, touch_t = common.measure(read_all)
    final = common.proc_status()
    print(json.dumps(dict(side=side, precision=precision, import_s=import_s, load=load_t,
                          touch=touch_t, before=before, after_load=after_load, final=final,
                          weight_bytes=weight_bytes, dtypes=dtypes, checksum=checksum)), flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_cache_arg(p)
    p.add_argument("--precision", default="fp32,fp16",
                   help=f"comma-separated cases among {', '.join(DTYPES)} (fp32-to-fp16: the fp32 "
                        "files loaded as fp16)")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per case (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="rounds dropped at the start (page cache warm-up)")
    p.add_argument("--accelerate-path", help="a folder holding accelerate (pip --target): adds the side "
                                             "'diffusers+accelerate' with it on PYTHONPATH")
    p.add_argument("--sides", default="ours,diffusers",
                   help=f"comma-separated among {', '.join(SIDES)} (ours+dynamo: ours with "
                        "torch._dynamo imported before the timer, as diffusers' imports do)")
    p.add_argument("--json", help="also write the raw child results to this file")
    p.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    p.add_argument("--child-precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child, args.child_precision, args.cache)

    folder = common.build_sd15_folder(args.cache, fp16=True)
    sides = args.sides.split(",")
    precisions = args.precision.split(",")
    for name, allowed in (("side", SIDES), ("precision", DTYPES)):
        bad = [x for x in (sides if name == "side" else precisions) if x not in allowed]
        if bad:
            p.error(f"unknown {name} {bad}; choose among {', '.join(allowed)}")
    if args.accelerate_path and "diffusers+accelerate" not in sides:
        sides.append("diffusers+accelerate")
    env_of = {"ours": {}, "ours+dynamo": {}, "diffusers": {}}
    if "diffusers+accelerate" in sides:
        if not args.accelerate_path:
            p.error("the side diffusers+accelerate needs --accelerate-path")
        env_of["diffusers+accelerate"] = {"PYTHONPATH": os.pathsep.join(
            filter(None, [args.accelerate_path, os.environ.get("PYTHONPATH")]))}
    base_env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
                "DIFFUSERS_VERBOSITY": "error", "TQDM_DISABLE": "1",
                "PYTHONWARNINGS": "ignore::FutureWarning"}

    print(f"machine: {common.machine_line()}")
    print(f"load average at start: {' '.join(common.load_average())}")
    raw = {}
    for precision in precisions:
        print(f"\n{precision}: weight files {common.gib(common.weight_file_bytes(folder, DTYPES[precision][1])):.2f} GiB",
              file=sys.stderr, flush=True)
        results = {s: [] for s in sides}
        for r in range(args.warmup + args.rounds):
            for side in (sides if r % 2 == 0 else sides[::-1]):
                child_side = "diffusers" if side == "diffusers+accelerate" else side
                out, usage = common.run_child(
                    [__file__, "--child", child_side, "--child-precision", precision, "--cache", str(folder)],
                    env={**base_env, **env_of[side]})
                out["rusage"] = usage
                tag = "warm-up" if r < args.warmup else f"round {r - args.warmup + 1}/{args.rounds}"
                print(f"  [{tag}] {side}: load {out['load']['wall']:.2f} s (user {out['load']['user']:.2f}, "
                      f"sys {out['load']['sys']:.2f}), first read {out['touch']['wall']:.2f} s, "
                      f"peak RSS {common.gib(out['final']['VmHWM']):.2f} GiB (ru_maxrss "
                      f"{common.gib(usage['maxrss']):.2f}), dtypes {out['dtypes']}",
                      file=sys.stderr, flush=True)
                if r >= args.warmup:
                    results[side].append(out)
        raw[precision] = results
        report(precision, results, sides)
    print(f"\nload average at end: {' '.join(common.load_average())}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


def report(precision, results, sides):
    m = common.median
    rows, summary = [], {}
    for side in sides:
        rs = results[side]
        wb = rs[0]["weight_bytes"]
        s = dict(
            load=m([r["load"]["wall"] for r in rs]),
            load_min=min(r["load"]["wall"] for r in rs), load_max=max(r["load"]["wall"] for r in rs),
            user=m([r["load"]["user"] for r in rs]), sys=m([r["load"]["sys"] for r in rs]),
            touch=m([r["touch"]["wall"] for r in rs]),
            import_s=m([r["import_s"] for r in rs]),
            base=m([r["before"]["VmRSS"] for r in rs]),
            hwm_load=m([r["after_load"]["VmHWM"] for r in rs]),
            peak=m([r["final"]["VmHWM"] for r in rs]),
            anon=m([r["final"]["RssAnon"] for r in rs]), file=m([r["final"]["RssFile"] for r in rs]),
            wb=wb)
        summary[side] = s
        g = common.gib
        rows.append([side, f"{s['load']:.2f} ({s['load_min']:.2f}-{s['load_max']:.2f})",
                     f"{s['user']:.2f} / {s['sys']:.2f}", f"{s['touch']:.2f}",
                     f"{s['load'] + s['touch']:.2f}", f"{s['import_s']:.2f}",
                     f"{s['import_s'] + s['load']:.2f}",
                     f"{g(s['base']):.2f}", f"{g(s['hwm_load']):.2f}", f"{g(s['peak']):.2f}",
                     f"{g(s['anon']):.2f} / {g(s['file']):.2f}", f"{g(wb):.2f}", f"{s['peak'] / wb:.2f}"])
    print(f"\n### {precision} ({len(results[sides[0]])} rounds, medians)\n")
    common.print_table(rows, ["side", "load s (min-max)", "load CPU user/sys s", "first read s",
                              "load+read s", "imports s", "imports+load s", "RSS before GiB", "peak after load GiB",
                              "peak final GiB", "final anon/file GiB", "weights GiB", "peak/weights"])
    if "ours" in summary:
        for ref in sides:
            if ref == "ours":
                continue
            o, d = summary["ours"], summary[ref]
            print(f"\nours/{ref}: load {common.ratio(o['load'], d['load'])}, load+first read "
                  f"{common.ratio(o['load'] + o['touch'], d['load'] + d['touch'])}, imports+load "
                  f"{common.ratio(o['load'] + o['import_s'], d['load'] + d['import_s'])}, peak RSS "
                  f"{common.ratio(o['peak'], d['peak'])}")


if __name__ == "__main__":
    sys.exit(main())
