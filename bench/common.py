"""Shared benchmark harness: an SD 1.5-size random pipeline on disk, timing, peak RSS, tables.

Benchmarks are plain scripts (never run by pytest or CI). diffusers / transformers are the
reference here, as in tests/.

    from common import build_sd15_folder, measure, alternate, run_child, print_table
    folder = build_sd15_folder("/tmp/sd15-random", fp16=True)

The pipeline folder is the Hub's SD 1.5 layout with random weights (fixed seed): diffusers'
UNet2DConditionModel and AutoencoderKL with the SD 1.5 configs, transformers' CLIPTextModel
(768 wide, 12 layers) saved with the Hub's `text_model.` key prefix and float position_ids
buffer, the real CLIP tokenizer files (tests/clip_vocab.py) and SD 1.5's PNDM scheduler config.
It is written once and reused while its marker file is there.
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project (load_weights.py, sample.py, ...)
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

DEFAULT_CACHE = "/tmp/sd15-random"
MARKER = "BENCH_COMPLETE.json"
# The malloc settings ../shared/REFERENCE.md section 5 suggests: freed memory stays in the
# process, so the expensive first-touch page faults of these VMs are paid once.
STABLE_MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000",
                     "MALLOC_TOP_PAD_": "0"}

# The configs of stable-diffusion-v1-5/stable-diffusion-v1-5 (unet/, vae/, text_encoder/).
SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, center_input_sample=False,
    flip_sin_to_cos=True, freq_shift=0,
    down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    block_out_channels=[320, 640, 1280, 1280], layers_per_block=2, downsample_padding=1,
    mid_block_scale_factor=1, act_fn="silu", norm_num_groups=32, norm_eps=1e-5,
    cross_attention_dim=768, attention_head_dim=8, use_linear_projection=False)
SD15_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
    up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[128, 256, 512, 512],
    layers_per_block=2, act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=512,
    scaling_factor=0.18215)
SD15_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
    num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
    projection_dim=768, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                  "trained_betas": None, "clip_sample": False}
MODEL_INDEX = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
               "feature_extractor": [None, None], "safety_checker": [None, None],
               "requires_safety_checker": False, "scheduler": ["diffusers", "PNDMScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "tokenizer": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}


def add_cache_arg(parser):
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help=f"folder of the random SD 1.5-size pipeline, built there on first use "
                             f"(~6.4 GB with the fp16 variant; default {DEFAULT_CACHE})")


# ----------------------------------------------------------------------------------------------
# The pipeline folder


def _save_text_encoder(model, folder, variant):
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    model.config.to_json_file(folder / "config.json")
    half = variant == "fp16"
    # transformers 5 drops the `text_model.` prefix when saving; the Hub files have it, and the
    # SD 1.5 file also holds a float position_ids buffer.
    state = {"text_model." + k: (v.half() if half else v).contiguous()
             for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    state["text_model.embeddings.position_ids"] = torch.arange(
        77, dtype=torch.float16 if half else torch.float32)[None]
    name = f"model.{variant}.safetensors" if variant else "model.safetensors"
    save_file(state, folder / name, metadata={"format": "pt"})


def build_sd15_folder(cache=DEFAULT_CACHE, *, fp16=False, seed=0, quiet=False):
    """The SD 1.5-size random pipeline folder at `cache` (built if absent; the fp16 variant
    files *.fp16.safetensors are added when `fp16` and missing). Returns the folder Path."""
    folder = Path(cache)
    marker = folder / MARKER
    done = json.loads(marker.read_text()) if marker.is_file() else {}
    if done.get("fp32") and (done.get("fp16") or not fp16):
        return folder
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from clip_vocab import write_hub_tokenizer

    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    say(f"building the SD 1.5-size random pipeline in {folder} (seed {seed}) ...")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    say(f"  models built in {time.perf_counter() - t0:.0f} s")
    folder.mkdir(parents=True, exist_ok=True)
    if not done.get("fp32"):
        unet.save_pretrained(folder / "unet", safe_serialization=True)
        vae.save_pretrained(folder / "vae", safe_serialization=True)
        _save_text_encoder(text_encoder, folder / "text_encoder", None)
        (folder / "scheduler").mkdir(exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD15_SCHEDULER, indent=2))
        write_hub_tokenizer(folder / "tokenizer")
        (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=2))
        done["fp32"] = True
        marker.write_text(json.dumps(done))
        say(f"  fp32 written at {time.perf_counter() - t0:.0f} s")
    if fp16 and not done.get("fp16"):
        unet.half().save_pretrained(folder / "unet", safe_serialization=True, variant="fp16")
        vae.half().save_pretrained(folder / "vae", safe_serialization=True, variant="fp16")
        _save_text_encoder(text_encoder, folder / "text_encoder", "fp16")
        done["fp16"] = True
        marker.write_text(json.dumps(done))
        say(f"  fp16 variant written at {time.perf_counter() - t0:.0f} s")
    return folder


def weight_file_bytes(folder, variant=None):
    """Bytes of the three weight files of a variant (what a loader has to bring into memory)."""
    suffix = f".{variant}" if variant else ""
    folder = Path(folder)
    files = [folder / "unet" / f"diffusion_pytorch_model{suffix}.safetensors",
             folder / "vae" / f"diffusion_pytorch_model{suffix}.safetensors",
             folder / "text_encoder" / f"model{suffix}.safetensors"]
    return sum(f.stat().st_size for f in files)


def module_bytes(*modules):
    """Bytes of the parameters and buffers of the modules (each tensor counted once)."""
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# Memory and time


def proc_status():
    """VmRSS, VmHWM, RssAnon, RssFile of this process in bytes (from /proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(value.split()[0]) * 1024
    return out


def cpu_seconds():
    """(user, system) CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def measure(fn):
    """Run fn() once: (result, {"wall": s, "user": s, "sys": s})."""
    u0, s0 = cpu_seconds()
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    u1, s1 = cpu_seconds()
    return result, {"wall": wall, "user": u1 - u0, "sys": s1 - s0}


def alternate(sides, *, rounds, warmup=1, log=True):
    """Time the callables of `sides` ({name: fn}) alternately in this process: `warmup` rounds
    whose timings are dropped, then `rounds` rounds; the order of the sides flips every round so
    that neither always runs right after the other. Returns {name: [timing dicts]}."""
    names = list(sides)
    out = {n: [] for n in names}
    for r in range(warmup + rounds):
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            _, t = measure(sides[n])
            tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            if log:
                print(f"  [{tag}] {n}: wall {t['wall']:.2f} s, user {t['user']:.2f} s, "
                      f"sys {t['sys']:.2f} s", file=sys.stderr, flush=True)
            if r >= warmup:
                out[n].append(t)
    return out


def median(values):
    return statistics.median(values) if values else float("nan")


def summarize(timings, key="wall"):
    """(median, min, max) of one field over a list of timing dicts."""
    values = [t[key] for t in timings]
    return median(values), min(values), max(values)


def run_child(argv, *, env=None):
    """Run `python argv...` in a fresh process whose last stdout line starting with "{" is a
    JSON dict. Returns (that dict, {"maxrss": ru_maxrss bytes, "user": s, "sys": s, "wall": s})
    with the child's own resource usage, read with os.wait4.
    Caveat: Linux keeps in a child's ru_maxrss the RSS of the forked copy of the parent before
    exec, so with a large parent it reads the parent's size: have the child report its own
    VmHWM (proc_status()), which belongs to the exec'd image only, and use that."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    stdout = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed with exit code {proc.returncode}")
    lines = [l for l in stdout.splitlines() if l.startswith("{")]
    return json.loads(lines[-1]), {"maxrss": usage.ru_maxrss * 1024, "user": usage.ru_utime,
                                   "sys": usage.ru_stime, "wall": wall}


# ----------------------------------------------------------------------------------------------
# Reporting


def gib(n):
    return n / 2**30


def machine_line():
    import torch

    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    flags = Path("/proc/cpuinfo").read_text()
    amx = "amx_bf16" in flags
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal"):
            mem = int(line.split()[1]) * 1024
    return (f"{model}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
            f"AMX-BF16 {'yes' if amx else 'no'}, {gib(mem):.1f} GiB RAM, torch {torch.__version__}, "
            f"python {sys.version.split()[0]}")


def load_average():
    return Path("/proc/loadavg").read_text().split()[:3]


def print_table(rows, headers, *, file=None):
    """A markdown table; rows are lists of already formatted cells."""
    file = file or sys.stdout
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(headers), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in rows:
        print(line(r), file=file)


def ratio(ours, ref):
    return f"{ours / ref:.2f}" if ref else "n/a"
