"""Shared pieces of the training benchmarks (issue 6), on top of common.py.

    from train_common import load_unet_pair, matmul_tflops, count_flops, LiveTensors

- load_unet_pair: diffusers' UNet2DConditionModel loaded from the SD 1.5-size random folder
  (common.build_sd15_folder: random weights, seed 0) and our UNet holding THE SAME parameter
  objects (load_state_dict(strict=True, assign=True) of diffusers' state dict with keep_vars):
  the two sides compute with identical weights, and the process holds one copy (3.4 GB) instead
  of two; gradients and AdamW state can be shared too (see bench_train_step.py).
- matmul_tflops / MatmulPeak: the machine's bf16 and fp32 matmul throughput (4096^3), measured
  in the same run as the benchmark, several times (these VMs are shared: a number from another
  time, or taken while another job runs, means little); the best is the reference.
- count_flops: FLOPs of a call counted by torch.utils.flop_counter (matmuls, convolutions and
  attention, forward and backward), with formulas added for CPU flash attention, which
  flop_counter does not know.
- LiveTensors: exact bytes of the tensors created inside a region that are alive at once, and
  their peak, split into gradients and the rest (activations saved for backward, temporaries).
  This is what a CUDA allocator would have to hold for them, measured on CPU without one.
"""
import os
import statistics
import sys
import time
import weakref
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (also puts the project root on sys.path)


def reexec_with_stable_malloc(script, argv, malloc="stable"):
    """Run `script` again with REFERENCE.md's MALLOC_* settings (glibc reads them at start)."""
    if malloc == "stable" and any(os.environ.get(k) != v for k, v in common.STABLE_MALLOC_ENV.items()):
        os.execve(sys.executable, [sys.executable, script, *argv], {**os.environ, **common.STABLE_MALLOC_ENV})


def add_threads_arg(parser):
    parser.add_argument("--threads", type=int, default=0,
                        help="torch threads (0: torch's default). On a shared VM where another job keeps a "
                             "core busy, 1 avoids two threads waiting for each other on one core")


def set_threads(n):
    import torch

    if n:
        torch.set_num_threads(n)


def header_lines():
    malloc = {k: os.environ.get(k) for k in common.STABLE_MALLOC_ENV}
    return [f"machine: {common.machine_line()}", f"malloc env: {malloc}",
            f"load average at start: {' '.join(common.load_average())}"]


# ----------------------------------------------------------------------------------------------
# Models


def load_unet_pair(folder):
    """(ours, diffusers') SD 1.5-size UNets in train mode sharing their parameter objects."""
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


def check_same_function(ours, ref, size=16):
    """Max |ours - diffusers| of one fp32 forward on a small input (the sides must agree)."""
    import torch

    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(1, 4, size, size, generator=g), torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        return (ours(x, torch.tensor([500]), context) - ref(x, torch.tensor([500]), context).sample).abs().max().item()


# ----------------------------------------------------------------------------------------------
# Throughput and FLOPs


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
    (these VMs are shared: a measurement taken while another job runs is low); best() is the
    highest seen in this run, the figure benchmarks are compared against."""

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


_REGISTERED = False


def _register_cpu_flash_attention():
    """flop_counter counts CUDA flash/efficient attention but not the CPU kernel PyTorch uses
    for scaled_dot_product_attention on CPU: count it with the same formulas."""
    global _REGISTERED
    if _REGISTERED:
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
    _REGISTERED = True


def count_flops(fn):
    """(FLOPs counted by torch.utils.flop_counter during fn(), fn's result)."""
    from torch.utils.flop_counter import FlopCounterMode

    _register_cpu_flash_attention()
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return counter.get_total_flops(), result


# ----------------------------------------------------------------------------------------------
# Exact memory of the tensors a region creates


class LiveTensors:
    """Context manager: every storage an operation allocates inside it is recorded (views and
    in-place results, which share an input's storage, add nothing), and a weak reference's callback subtracts the
    storage when it is freed. `peak` is the most bytes alive at once; `peak_without(storages)`
    the same with the given storages left out (e.g. gradients, known only at the end).
    Tensors that existed before (weights, inputs, optimizer state) are not counted.

    Seen: activations saved for backward (including autocast's bf16 copies of the weights),
    temporaries, gradients, and what checkpointing recomputes. Not seen: scratch memory that
    kernels allocate internally (oneDNN here, cuDNN/cuBLAS workspaces on a GPU)."""

    def __init__(self):
        self.events = []  # (uid, +bytes) on creation, (uid, -bytes) on release, in order
        self._uid_by_ptr, self._refs = {}, {}

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        import torch

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

    @property
    def alive(self):
        return sum(delta for _, delta in self.events)


def fmt_gb(n):
    return f"{n / 1e9:.2f}"
