"""The benchmarks' one harness: an SD 1.5-size random pipeline on disk, script set-up, timing,
peak memory, throughput, the UNet pair, tables.

Benchmarks are plain scripts (never run by pytest or CI); diffusers / transformers are the
reference here, as in tests/. Every script starts and ends the same way:

    p = common.parser(__doc__)          # --cache, --threads, --malloc, --json
    args = p.parse_args(argv)
    common.start(args, __file__, argv)  # stable malloc, Hub offline, threads, machine header
    folder = common.build_sd15_folder(args.cache)
    ...
    common.finish(args, raw)            # load average at the end, raw numbers to --json

The pipeline folder is the Hub's SD 1.5 layout with random weights (seed 0): diffusers'
UNet2DConditionModel and AutoencoderKL with the SD 1.5 configs, transformers' CLIPTextModel
(768 wide, 12 layers) saved with the Hub's `text_model.` key prefix and float position_ids
buffer, the real CLIP tokenizer files (tests/clip_vocab.py) and SD 1.5's PNDM scheduler config.
It is written once and reused while its marker file is there.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import warnings
import weakref
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the project (load_weights.py, sample.py, ...)
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

DEFAULT_CACHE = "/tmp/sd15-random"
MARKER = "BENCH_COMPLETE.json"
# glibc malloc settings that keep freed memory in the process. These VMs make first-touch page
# faults very expensive (0.2-0.4 GB/s): without them a step whose large buffers go back to the
# OS and come back is slow and noisy. glibc reads them at start, hence the re-execution.
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


def build_sd15_folder(cache=DEFAULT_CACHE, *, fp16=False, seed=0):
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

    print(f"building the SD 1.5-size random pipeline in {folder} (seed {seed}) ...", file=sys.stderr)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**SD15_UNET)
    vae = AutoencoderKL(**SD15_VAE)
    text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
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
    if fp16 and not done.get("fp16"):
        unet.half().save_pretrained(folder / "unet", safe_serialization=True, variant="fp16")
        vae.half().save_pretrained(folder / "vae", safe_serialization=True, variant="fp16")
        _save_text_encoder(text_encoder, folder / "text_encoder", "fp16")
        done["fp16"] = True
        marker.write_text(json.dumps(done))
    return folder


# ----------------------------------------------------------------------------------------------
# Script set-up


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The script's docstring as written, and every flag's default in --help (none for a
    required flag)."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)


def add_cache_arg(parser):
    parser.add_argument("--cache", default=DEFAULT_CACHE,
                        help="folder of the random SD 1.5-size pipeline, built there on first use "
                             "(4.3 GB; 6.4 GB with the fp16 variant)")


def add_threads_arg(parser):
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). Where another job keeps a core "
                             "busy, 1 avoids two threads waiting for each other on one core")


def parser(doc, *, in_process=True):
    """The flags every benchmark has: --cache and --json; and, for one that measures in its own
    process (`in_process`), --threads and --malloc."""
    p = argparse.ArgumentParser(description=doc, formatter_class=HelpFormatter)
    add_cache_arg(p)
    if in_process:
        add_threads_arg(p)
        p.add_argument("--malloc", choices=["stable", "default"], default="stable",
                       help="stable: re-run with MALLOC_* settings that keep freed memory in the "
                            "process; default: glibc's")
    p.add_argument("--json", help="also write the raw numbers to this file")
    return p


def reexec_with_stable_malloc(script, argv, malloc="stable"):
    """Run `script` again with STABLE_MALLOC_ENV set, unless it already is (or malloc="default")."""
    if malloc == "stable" and any(os.environ.get(k) != v for k, v in STABLE_MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, script, *argv], {**os.environ, **STABLE_MALLOC_ENV})


def set_threads(n):
    import torch

    if n:
        torch.set_num_threads(n)


def start(args, script, argv=None, *, header=True):
    """A benchmark's first steps: re-execute with the stable malloc settings (if args.malloc
    asks for them), keep the Hub offline, set the torch threads, silence diffusers'
    FutureWarnings, and print the machine header (unless `header` is False: a child process)."""
    reexec_with_stable_malloc(script, sys.argv[1:] if argv is None else argv, getattr(args, "malloc", "default"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", category=FutureWarning)
    set_threads(getattr(args, "threads", 0))
    if header:
        for line in header_lines():
            print(line, flush=True)


def finish(args, raw):
    """A benchmark's last steps: the load average (how disturbed the run was), and --json."""
    print(f"\nload average at end: {' '.join(load_average())}")
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1, default=str))


# ----------------------------------------------------------------------------------------------
# Time


def measure(fn):
    """Run fn() once: (result, {"wall": s, "user": s, "sys": s}), CPU seconds over all threads."""
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    result = fn()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    return result, {"wall": wall, "user": r1.ru_utime - r0.ru_utime, "sys": r1.ru_stime - r0.ru_stime}


def alternate(sides, *, rounds, warmup=1, log=True):
    """Time the callables of `sides` ({name: fn}) alternately in this process: `warmup` rounds
    whose timings are dropped, then `rounds` rounds; the order of the sides flips every round so
    that neither always runs right after the other. A dict that fn returns joins its timing
    (e.g. the seconds spent inside the UNet). Returns {name: [timing dicts]}."""
    names = list(sides)
    out = {n: [] for n in names}
    for r in range(warmup + rounds):
        for n in (names if r % 2 == 0 else names[::-1]):
            result, t = measure(sides[n])
            if isinstance(result, dict):
                t.update(result)
            tag = "warm-up" if r < warmup else f"round {r - warmup + 1}/{rounds}"
            if log:
                print(f"  [{tag}] {n}: " + ", ".join(f"{k} {v:.2f}" for k, v in t.items()
                                                      if isinstance(v, float)), file=sys.stderr, flush=True)
            if r >= warmup:
                out[n].append(t)
    return out


def median(values):
    return statistics.median(values) if values else float("nan")


def spread(timings, key="wall", digits=2):
    """'median (min-max)' of one field over a list of timing dicts."""
    v = [t[key] for t in timings]
    return f"{median(v):.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f})"


# ----------------------------------------------------------------------------------------------
# Memory


def proc_status():
    """VmRSS, VmHWM (peak RSS), RssAnon, RssFile of this process in bytes (/proc/self/status)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def child_report(**fields):
    """The last line of a child process for run_child: `fields` and its proc_status() as JSON."""
    print(json.dumps(dict(fields, status=proc_status())), flush=True)


def run_child(argv, *, env=None):
    """Run `python argv...` in a fresh process whose last stdout line starting with "{" is a
    JSON dict (child_report). Returns (that dict, {"wall": s, "user": s, "sys": s} of the child).
    Peak RSS is the child's own VmHWM (in the dict), never its ru_maxrss: Linux carries the
    forked parent's RSS into a child's ru_maxrss, so a large parent makes every child look large."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, *argv], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    stdout = proc.stdout.read()
    proc.stdout.close()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait
    if proc.returncode != 0:
        raise RuntimeError(f"child {argv} failed with exit code {proc.returncode}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    return json.loads(lines[-1]), {"wall": time.perf_counter() - t0, "user": usage.ru_utime,
                                   "sys": usage.ru_stime}


class LiveTensors:
    """Context manager: every storage an operation allocates inside it is recorded (views and
    in-place results, which share an input's storage, add nothing), and a weak reference's
    callback subtracts the storage when it is freed. `peak` is the most bytes alive at once;
    `peak_without(uids)` the same with some storages left out (e.g. gradients, known only at the
    end). Tensors that existed before (weights, inputs, optimizer state) are not counted.

    Seen: activations saved for backward (including autocast's bf16 copies of the weights),
    temporaries, gradients, and what checkpointing recomputes: what a CUDA caching allocator
    must hold for them, less its rounding. Not seen: scratch memory that kernels allocate
    internally (oneDNN here, cuDNN/cuBLAS workspaces on a GPU)."""

    def __init__(self):
        self.events = []  # (uid, +bytes) on creation, (uid, -bytes) on release, in order
        self._uid_by_ptr, self._refs = {}, {}

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                # views and in-place results share an input's storage: not an allocation
                inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                          if isinstance(t, torch.Tensor)}
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                        meter._track(t)
                return out

        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)

    def _track(self, tensor):
        storage = tensor.untyped_storage()
        ptr, nbytes = storage.data_ptr(), storage.nbytes()
        if nbytes == 0 or ptr in self._uid_by_ptr:
            return
        uid = len(self._refs)
        self._uid_by_ptr[ptr] = uid
        self.events.append((uid, nbytes))

        def released(_, uid=uid, ptr=ptr, nbytes=nbytes):
            self.events.append((uid, -nbytes))
            if self._uid_by_ptr.get(ptr) == uid:
                del self._uid_by_ptr[ptr]
        self._refs[uid] = weakref.ref(storage, released)

    def uids_of(self, tensors):
        """The recorded storages of tensors alive now (e.g. the parameters' .grad)."""
        return {self._uid_by_ptr[t.untyped_storage().data_ptr()] for t in tensors
                if t is not None and t.untyped_storage().data_ptr() in self._uid_by_ptr}

    def peak_without(self, excluded=()):
        current = peak = 0
        for uid, delta in self.events:
            if uid not in excluded:
                current += delta
                peak = max(peak, current)
        return peak

    @property
    def peak(self):
        return self.peak_without()


# ----------------------------------------------------------------------------------------------
# Throughput


def matmul_tflops(dtype, size=4096, repeats=7):
    """Median TFLOP/s of a size x size matmul in `dtype` on all threads (2 size^3 FLOPs each)."""
    import torch

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t0)
    return 2 * size ** 3 / statistics.median(times) / 1e12


class MatmulPeak:
    """The machine's bf16 and fp32 matmul throughput, measured again at every call of measure()
    (on a shared VM a measurement taken while another job runs is low); best() is the highest
    seen in this run, the figure a benchmark's TFLOP/s are compared with."""

    def __init__(self):
        self.samples = {"bf16": [], "fp32": []}

    def measure(self):
        import torch

        for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            self.samples[name].append(matmul_tflops(dtype))
        return self

    def best(self, name):
        return max(self.samples[name])

    def line(self):
        return (f"bf16 {self.best('bf16'):.2f} TFLOP/s, fp32 {self.best('fp32'):.3f} TFLOP/s (best of "
                f"{len(self.samples['bf16'])} measurements in this run: bf16 "
                f"{', '.join(f'{v:.2f}' for v in self.samples['bf16'])})")


_CPU_FLASH_REGISTERED = False


def _register_cpu_flash_attention():
    """flop_counter counts CUDA flash/efficient attention but not the CPU kernel PyTorch uses
    for scaled_dot_product_attention on CPU: count it with the same formulas."""
    global _CPU_FLASH_REGISTERED
    if _CPU_FLASH_REGISTERED:
        return
    import torch
    from torch.utils import flop_counter

    aten = torch.ops.aten

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def forward(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)
    _CPU_FLASH_REGISTERED = True


def count_flops(fn):
    """(FLOPs counted by torch.utils.flop_counter during fn(), fn's result): matmuls,
    convolutions and attention, forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_flash_attention()
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


# ----------------------------------------------------------------------------------------------
# The UNet pair: ours and diffusers' on the same weights


def load_unet_pair(folder):
    """(ours, diffusers') SD 1.5-size UNets in train mode holding THE SAME parameter objects
    (load_state_dict(assign=True) of diffusers' state dict with keep_vars): the two sides compute
    with identical weights, and the process holds one copy (3.4 GB) instead of two."""
    import torch
    from diffusers import UNet2DConditionModel

    from unet import UNet, UNetConfig

    ref = UNet2DConditionModel.from_pretrained(Path(folder) / "unet", local_files_only=True).train()
    with torch.device("meta"):
        ours = UNet(UNetConfig.from_json(Path(folder) / "unet" / "config.json"))
    ours.load_state_dict(ref.state_dict(keep_vars=True), strict=True, assign=True)
    ours.train()
    theirs = dict(ref.named_parameters())
    assert all(p is theirs[name] for name, p in ours.named_parameters()), "parameters are not shared"
    return ours, ref


def unet_forward(unet, x, t, context):
    """The noise prediction of either side's UNet (diffusers' returns it in `.sample`)."""
    from unet import UNet

    return unet(x, t, context) if isinstance(unet, UNet) else unet(x, t, encoder_hidden_states=context).sample


def set_gradient_checkpointing(unet, enabled):
    from unet import UNet

    if isinstance(unet, UNet):
        unet.gradient_checkpointing = enabled
    elif enabled:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()


def unet_inputs(batch=2, latent=64, seed=0):
    """(x, t, context) of one DreamBooth step's UNet call: `batch` latents latent x latent (the
    default: one instance + one class image at 512 px), timesteps 10 and 900 in turn, a random
    [batch, 77, 768] text context."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, latent, latent, generator=g),
            torch.tensor([10, 900] * (batch // 2) + [500] * (batch % 2)),
            torch.randn(batch, 77, 768, generator=g))


def check_same_function(ours, ref, size=16):
    """Max |ours - diffusers| of one fp32 forward on a small input (the sides must agree)."""
    import torch

    x, t, context = unet_inputs(1, size)
    with torch.no_grad():
        return (unet_forward(ours, x, t, context) - unet_forward(ref, x, t, context)).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Reporting


def gib(n):
    return n / 2**30


def gb(n):
    """Bytes as GB (1e9), the unit of GPU memory cards."""
    return f"{n / 1e9:.2f}"


def ratio(ours, ref):
    return f"{ours / ref:.2f}" if ref else "n/a"


def machine_line():
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), "unknown CPU")
    mem = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
               if line.startswith("MemTotal"))
    return (f"{model}, {os.cpu_count()} cores (torch threads {torch.get_num_threads()}), "
            f"AMX-BF16 {'yes' if 'amx_bf16' in cpuinfo else 'no'}, {gib(mem):.1f} GiB RAM, "
            f"torch {torch.__version__}, python {sys.version.split()[0]}")


def load_average():
    return Path("/proc/loadavg").read_text().split()[:3]


def header_lines():
    malloc = {k: os.environ.get(k) for k in STABLE_MALLOC_ENV}
    return [f"machine: {machine_line()}", f"malloc env: {malloc}",
            f"load average at start: {' '.join(load_average())}"]


def print_table(rows, headers, *, file=None):
    """A markdown table; rows are lists of already formatted cells."""
    file = file or sys.stdout
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    print(line(headers), file=file)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=file)
    for r in rows:
        print(line(r), file=file)
