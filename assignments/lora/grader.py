"""Grader of the lora exercise: the student's LoRALinear against lora.LoRALinear, on a seeded
nn.Linear(16, 24) with the same A and B copied into both."""
import math
from types import SimpleNamespace

import torch
import torch.nn as nn

import lora
from assignments import tiny
from assignments.checking import Check, compare, expect, load_file, source_notes

FUNCTIONS = ("LoRALinear",)
MINUTES = "about 40 min to write; grading takes under 1 s"
IN, OUT, RANK, ALPHA = 16, 24, 4, 8.0  # factor alpha / r = 2


def load(path):
    return load_file(path, FUNCTIONS)


def solution():
    return SimpleNamespace(LoRALinear=lora.LoRALinear)


def notes(path):
    return source_notes(path, {"lora.LoRALinear": "your file uses the project's own LoRALinear: write it yourself"})


def base(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(IN, OUT).to(dtype)


def adapted(cls, *, alpha=ALPHA, dropout=0.0, dtype=torch.float32, trained=True):
    """cls(base, RANK, alpha, dropout) with A and B set to the same seeded values for every class
    (trained=False keeps the layer's own initialisation)."""
    layer = cls(base(dtype), RANK, alpha, dropout)
    if trained:
        with torch.no_grad():
            layer.lora_down.weight.copy_(tiny.randn(RANK, IN, seed=1) / math.sqrt(IN))
            layer.lora_up.weight.copy_(tiny.randn(OUT, RANK, seed=2))
    return layer


def inputs(dtype=torch.float32):
    return tiny.randn(3, 5, IN, seed=3).to(dtype)  # (batch, tokens, in): LoRA layers see token sequences


@torch.no_grad()
def known_mistakes(alpha=ALPHA):
    layer, x = adapted(lora.LoRALinear, alpha=alpha), inputs()
    y0, update = layer.base_forward(x), layer.lora_up(layer.lora_down(x))
    alpha = RANK if alpha is None else alpha
    return {"W0 x + b + B A x: the update is not scaled by alpha / r": y0 + update,
            "the update scaled by r / alpha instead of alpha / r": y0 + update * RANK / alpha,
            "the update scaled by alpha, without the / r": y0 + update * alpha,
            "the update alone: the base layer's W0 x + b is missing": update * alpha / RANK}


def check_parts(student):
    b = base()
    layer = student.LoRALinear(b, RANK, ALPHA)
    expect(layer.weight is b.weight and layer.bias is b.bias,
           "self.weight and self.bias must be the base layer's own Parameters (the same tensors, not copies)")
    for name, shape in (("lora_down", (RANK, IN)), ("lora_up", (OUT, RANK))):
        part = getattr(layer, name, None)
        expect(isinstance(part, nn.Linear), f"{name} should be an nn.Linear, got {type(part).__name__}")
        expect(tuple(part.weight.shape) == shape, f"{name}.weight: expected shape {shape}, got {tuple(part.weight.shape)}")
        expect(part.bias is None, f"{name} has a bias: the adapter is B A x, no bias")
    keys = set(layer.state_dict())
    expected = {"weight", "bias", "lora_down.weight", "lora_up.weight"}
    expect(keys == expected, f"state dict keys {sorted(keys)}, expected {sorted(expected)} (LoRA files are read by name)")
    expect(layer.rank == RANK and layer.alpha == ALPHA, f"rank, alpha: expected {RANK}, {ALPHA}, got {layer.rank}, {layer.alpha}")


def check_start(student):
    layer = adapted(student.LoRALinear, trained=False)
    down, up = layer.lora_down.weight, layer.lora_up.weight
    expect(not up.any(), "lora_up (B) must start at zero, so that the adapted layer starts as the pretrained one")
    bound = 1 / math.sqrt(IN)
    expect(down.abs().max() <= bound + 1e-6 and down.std() > bound / 4,
           f"lora_down (A) should start like nn.Linear's weight, uniform in +-1/sqrt(in) = +-{bound:.3f}; got values in "
           f"[{down.min().item():.3f}, {down.max().item():.3f}]")
    x = inputs()
    compare("output at initialisation", layer(x), base()(x), atol=1e-6)


def compare_forward(student, what, *, alpha=ALPHA, dropout=0.0, train=False, expected_fn=None):
    layer, reference, x = adapted(student.LoRALinear, alpha=alpha, dropout=dropout), \
        adapted(lora.LoRALinear, alpha=alpha, dropout=dropout), inputs()
    layer.train(train)
    reference.train(train)
    with torch.no_grad():
        expected = expected_fn(reference, x) if expected_fn else reference(x)
    compare(what, layer(x), expected, atol=1e-5, known=known_mistakes(alpha))


def check_forward(student):
    compare_forward(student, f"output with rank {RANK}, alpha {ALPHA:g}")


def check_default_alpha(student):
    compare_forward(student, "output with alpha None (alpha = rank)", alpha=None)


def check_gradients(student):
    grads = []
    for cls in (student.LoRALinear, lora.LoRALinear):
        layer, x = adapted(cls), inputs().requires_grad_()
        (layer(x) * tiny.randn(3, 5, OUT, seed=4)).sum().backward()
        grads.append({"lora_down (A)": layer.lora_down.weight.grad, "lora_up (B)": layer.lora_up.weight.grad,
                      "the input x": x.grad})
    for name, expected in grads[1].items():
        expect(grads[0][name] is not None, f"no gradient reached {name}")
        compare(f"gradient of {name}", grads[0][name], expected, atol=1e-5)


def check_dropout(student):
    compare_forward(student, "training with dropout=1.0 (the update dropped, the base output kept)",
                    dropout=1.0, train=True, expected_fn=lambda reference, x: reference.base_forward(x))
    compare_forward(student, "eval mode with dropout=1.0 (no dropout outside training)", dropout=1.0)


def check_merge(student):
    layer, reference, x = adapted(student.LoRALinear), adapted(lora.LoRALinear), inputs()
    with torch.no_grad():
        before = reference(x)
        reference.merge()
    layer.merge()
    compare("weight after merge()", layer.weight, reference.weight, atol=1e-6)
    with torch.no_grad():
        twice = 2 * before - adapted(lora.LoRALinear).base_forward(x)  # W0 x + b + 2 x the update
    compare("output after merge()", layer(x), before, atol=1e-5,
            known={"the update added twice: after merge() it is inside the weight": twice})
    layer.merge()
    compare("weight after a second merge() (it should do nothing)", layer.weight, reference.weight, atol=1e-6)


def check_unmerge(student):
    layer, x = adapted(student.LoRALinear), inputs()
    original = layer.weight.detach().clone()
    with torch.no_grad():
        before = layer(x)
    layer.merge()
    layer.unmerge()
    expect(torch.equal(layer.weight.detach(), original),
           "unmerge() does not give W0 back bit for bit: (W0 + D) - D != W0 in floating point; keep a copy of W0")
    compare("output after merge(), unmerge()", layer(x), before, atol=1e-6)


def check_half_base(student):
    layer = adapted(student.LoRALinear, dtype=torch.bfloat16)
    reference = adapted(lora.LoRALinear, dtype=torch.bfloat16)
    expect(layer.lora_down.weight.dtype == torch.float32 and layer.lora_up.weight.dtype == torch.float32,
           f"a bfloat16 base: the adapter should stay float32 (trainable weights), got {layer.lora_down.weight.dtype}")
    x = inputs(torch.bfloat16)
    with torch.no_grad():
        compare("output of a bfloat16 base", layer(x), reference(x), atol=3e-2, rtol=2e-2)


def checks(student):
    return [Check("the parts: W0 and b shared with the base, A [r, in], B [out, r], the state-dict names",
                  lambda: check_parts(student)),
            Check("starts as the pretrained layer: B = 0, A like nn.Linear", lambda: check_start(student)),
            Check("forward: W0 x + b + (alpha / r) B A x", lambda: check_forward(student)),
            Check("alpha defaults to the rank", lambda: check_default_alpha(student)),
            Check("gradients of A, B and the input", lambda: check_gradients(student)),
            Check("dropout on the adapter's input, in training only", lambda: check_dropout(student)),
            Check("merge(): W0 + (alpha / r) B A, the same output, a second merge does nothing",
                  lambda: check_merge(student)),
            Check("unmerge(): W0 back bit for bit", lambda: check_unmerge(student)),
            Check("a bfloat16 base: float32 adapter, bfloat16 output", lambda: check_half_base(student))]
