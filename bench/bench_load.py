"""Benchmark: load an SD 1.5-size pipeline from disk, ours vs diffusers.

    python bench/bench_load.py                       # fp32 and fp16, 3 rounds after a warm-up
    python bench/bench_load.py --precision fp16 --rounds 5
    python bench/bench_load.py --accelerate-path /tmp/bench-pydeps   # adds diffusers+accelerate

Cases: fp32 safetensors -> fp32 weights, the fp16 variant (*.fp16.safetensors) -> fp16, and
(fp32-to-fp16) the fp32 files loaded as fp16.
  ours:      load_weights.load_pipeline(folder, dtype=..., variant=...)
  diffusers: StableDiffusionPipeline.from_pretrained(folder, torch_dtype=..., variant=...)
Every load runs in a fresh Python process (its own peak RSS, a cold interpreter) with glibc's
default malloc; the sides alternate, and the first round is a warm-up whose numbers are dropped.
After the warm-up the weight files are in the page cache for both sides: this measures loading
from memory, not from disk.

Each child reports the load call's wall and CPU time and its imports' time; then it reads one
byte of every 4 KiB page of every weight (what the first forward pass would fault in) and
reports the final VmHWM. Memory-mapped weights are not read by the load itself, so the peak
right after the call would flatter a lazy loader: the final peak is the figure compared with
the bytes of the loaded weights.

diffusers needs the `accelerate` package for its low-memory loading (without it, it builds each
model with random weights first and then copies the checkpoint in). --accelerate-path DIR puts
a private copy (pip install --target DIR --no-deps accelerate psutil) on the PYTHONPATH of an
extra side, "diffusers+accelerate".
"""
import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

# case -> (dtype to load as, file variant)
CASES = {"fp32": ("float32", None), "fp16": ("float16", "fp16"), "fp32-to-fp16": ("float16", None)}
SIDES = ("ours", "diffusers", "diffusers+accelerate")


def module_bytes(modules):
    """Bytes of the parameters and buffers of the modules (each tensor counted once)."""
    tensors = {t.data_ptr(): t for m in modules for t in [*m.parameters(), *m.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def child(side, case, folder):
    """One load in this (fresh) process, reported as a JSON line."""
    t0 = time.perf_counter()
    import torch
    if side == "ours":
        from load_weights import load_pipeline
    else:
        from diffusers import StableDiffusionPipeline
    import_s = time.perf_counter() - t0
    dtype_name, variant = CASES[case]
    dtype = getattr(torch, dtype_name)
    if side == "ours":
        load = lambda: load_pipeline(folder, dtype=dtype, variant=variant)  # noqa: E731
    else:
        load = lambda: StableDiffusionPipeline.from_pretrained(  # noqa: E731
            folder, torch_dtype=dtype, variant=variant, safety_checker=None,
            requires_safety_checker=False, local_files_only=True)
    pipe, load_t = common.measure(load)
    modules = (pipe.unet, pipe.vae, pipe.text_encoder)

    def read_all():  # one byte of every 4 KiB page of every weight: brings all pages in, as
        with torch.no_grad():  # the first forward pass would, with next to no arithmetic
            return sum(int(t.detach().reshape(-1).view(torch.uint8)[::4096].sum())
                       for m in modules for t in [*m.parameters(), *m.buffers()])
    _, touch_t = common.measure(read_all)
    common.child_report(side=side, case=case, import_s=import_s, load=load_t, touch=touch_t,
                        weight_bytes=module_bytes(modules))


def main(argv=None):
    p = common.parser(__doc__, in_process=False)
    p.add_argument("--precision", default="fp32,fp16", help=f"comma-separated cases among {', '.join(CASES)}")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds per case (after --warmup)")
    p.add_argument("--warmup", type=int, default=1, help="rounds dropped at the start (page cache warm-up)")
    p.add_argument("--accelerate-path", help="a folder holding accelerate (pip --target): adds the side "
                                             "'diffusers+accelerate' with it on PYTHONPATH")
    p.add_argument("--sides", default="ours,diffusers", help=f"comma-separated among {', '.join(SIDES)}")
    p.add_argument("--child", choices=SIDES[:2], help=argparse.SUPPRESS)
    p.add_argument("--child-precision", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # before anything is imported: the child times its own imports
        return child(args.child, args.child_precision, args.cache)
    sides, cases = args.sides.split(","), args.precision.split(",")
    for name, given, allowed in (("side", sides, SIDES), ("case", cases, CASES)):
        if any(x not in allowed for x in given):
            p.error(f"unknown {name} in {','.join(given)}; choose among {', '.join(allowed)}")
    if args.accelerate_path and "diffusers+accelerate" not in sides:
        sides.append("diffusers+accelerate")
    if "diffusers+accelerate" in sides and not args.accelerate_path:
        p.error("the side diffusers+accelerate needs --accelerate-path")
    common.start(args, __file__, argv)
    folder = common.build_sd15_folder(args.cache, fp16=True)
    env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "DIFFUSERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1", "PYTHONWARNINGS": "ignore::FutureWarning"}
    env_of = {"ours": env, "diffusers": env, "diffusers+accelerate": {**env, "PYTHONPATH": os.pathsep.join(
        filter(None, [args.accelerate_path, os.environ.get("PYTHONPATH")]))}}

    def load(side, case):
        argv = [__file__, "--child", side.split("+")[0], "--child-precision", case, "--cache", str(folder)]
        return lambda: common.run_child(argv, env=env_of[side])[0]
    raw = {}
    for case in cases:
        # each timing holds the child's report (alternate merges a returned dict in)
        raw[case] = common.alternate({side: load(side, case) for side in sides}, rounds=args.rounds,
                                     warmup=args.warmup, log=False)
        report(case, raw[case])
    common.finish(args, raw)


def report(case, results):
    rows, summary = [], {}
    for side, rs in results.items():
        m = lambda f: common.median([f(r) for r in rs])  # noqa: E731
        s = summary[side] = dict(load=m(lambda r: r["load"]["wall"]), import_s=m(lambda r: r["import_s"]),
                                 peak=m(lambda r: r["status"]["VmHWM"]), wb=rs[0]["weight_bytes"])
        rows.append([side, common.spread([r["load"] for r in rs]),
                     f"{m(lambda r: r['load']['user']):.2f} / {m(lambda r: r['load']['sys']):.2f}",
                     f"{m(lambda r: r['touch']['wall']):.2f}", f"{s['import_s']:.2f}",
                     f"{s['import_s'] + s['load']:.2f}", f"{common.gib(s['peak']):.2f}",
                     f"{common.gib(m(lambda r: r['status']['RssAnon'])):.2f} / "
                     f"{common.gib(m(lambda r: r['status']['RssFile'])):.2f}",
                     f"{common.gib(s['wb']):.2f}", f"{s['peak'] / s['wb']:.2f}"])
    print(f"\n### {case} ({len(next(iter(results.values())))} rounds, medians)\n")
    common.print_table(rows, ["side", "load s (min-max)", "load CPU user/sys s", "first read s", "imports s",
                              "imports + load s", "peak RSS GiB", "anon / file GiB", "weights GiB", "peak / weights"])
    o = summary.get("ours")
    for ref, d in summary.items():
        if o and ref != "ours":
            print(f"\nours/{ref}: load {common.ratio(o['load'], d['load'])}, imports + load "
                  f"{common.ratio(o['load'] + o['import_s'], d['load'] + d['import_s'])}, peak RSS "
                  f"{common.ratio(o['peak'], d['peak'])}")


if __name__ == "__main__":
    sys.exit(main())
