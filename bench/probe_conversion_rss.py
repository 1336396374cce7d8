"""Probe: the peak RSS of converting an fp32 safetensors file to fp16, by reading method.

    python bench/probe_conversion_rss.py                 # the UNet file of the bench pipeline
    python bench/probe_conversion_rss.py --method pread

Why: loading the fp32 files as fp16 (bench_load.py case fp32-to-fp16) peaks at ~2.7 x the fp16
weights, for us and for diffusers. Each method runs in a fresh process and reports its peak RSS
above the process's baseline:
  mmap-all     safe_open + get_tensor for every key, then .to(float16) (what load_weights does)
  mmap-stream  get_tensor, cast and drop one tensor at a time, inside one safe_open
  pread        no memory map: each tensor's bytes read with ordinary file reads into a
               transient buffer, then cast (the fp32 data lives in the page cache, which is
               not part of the process's RSS)
"""
import argparse
import json
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

METHODS = ("mmap-all", "mmap-stream", "pread")


def convert(path, method):
    import torch
    from safetensors import safe_open

    out = {}
    if method == "mmap-all":
        with safe_open(path, "pt") as f:
            sources = {k: f.get_tensor(k) for k in f.keys()}
        out = {k: v.to(torch.float16) for k, v in sources.items()}
        del sources
    elif method == "mmap-stream":
        with safe_open(path, "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).to(torch.float16)
    else:
        dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
        with open(path, "rb") as fh:
            n = struct.unpack("<Q", fh.read(8))[0]
            header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for k, info in header.items():
                start, stop = info["data_offsets"]
                buf = torch.empty(stop - start, dtype=torch.uint8)
                fh.seek(8 + n + start)
                fh.readinto(buf.numpy())
                out[k] = buf.view(dtypes[info["dtype"]]).reshape(info["shape"]).to(torch.float16)
    return out


def child(path, method):
    import safetensors.torch  # noqa: F401  (imports before the baseline)
    import torch  # noqa: F401

    base = common.proc_status()["VmRSS"]
    out = convert(path, method)
    s = common.proc_status()
    weights = sum(t.numel() * t.element_size() for t in out.values())
    print(json.dumps(dict(method=method, weights=weights, above=s["VmHWM"] - base,
                          anon=s["RssAnon"], file=s["RssFile"])))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_cache_arg(p)
    p.add_argument("--file", help="an fp32 .safetensors file (default: the bench pipeline's UNet)")
    p.add_argument("--method", choices=METHODS, action="append", help="repeatable; default: all")
    p.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    path = args.file or str(Path(args.cache) / "unet" / "diffusion_pytorch_model.safetensors")
    if args.child:
        return child(path, args.child)
    if not args.file:
        common.build_sd15_folder(args.cache)
    rows = []
    for method in args.method or METHODS:
        r, _ = common.run_child([__file__, "--child", method, "--file", path])
        g = common.gib
        rows.append([method, f"{g(r['weights']):.2f}", f"{g(r['above']):.2f}",
                     f"{r['above'] / r['weights']:.2f}", f"{g(r['anon']):.2f} / {g(r['file']):.2f}"])
    print(f"fp32 -> fp16 of {path}\n")
    common.print_table(rows, ["method", "fp16 weights GiB", "peak RSS above baseline GiB",
                              "x fp16 weights", "after: anon / file GiB"])


if __name__ == "__main__":
    sys.exit(main())
