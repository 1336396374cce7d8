"""Grader of the attention exercise: the student's attention(attn, x, context) against
unet.Attention.forward, alone and inside a tiny UNet's transformer blocks."""
import contextlib
import math
from types import SimpleNamespace

import torch

import unet
from assignments import tiny
from assignments.checking import Check, compare, expect, load_file, source_notes

FUNCTIONS = ("attention",)
MINUTES = "about 30 min to write; grading takes about 1 s"
DIM, CONTEXT_DIM, L, S = 32, 24, 16, 7  # image tokens: a 4x4 feature map; 7 text tokens


def load(path):
    return load_file(path, FUNCTIONS)


def solution():
    return SimpleNamespace(attention=unet.Attention.forward)


def notes(path):
    return source_notes(path, {"scaled_dot_product_attention": "your file calls F.scaled_dot_product_attention: "
                                                              "the checks pass, but the exercise is to write it"})


def module(num_heads=4, context_dim=CONTEXT_DIM, seed=0):
    torch.manual_seed(seed)
    return unet.Attention(DIM, num_heads, context_dim)


def tokens(batch=2, length=L, width=DIM, seed=1):
    return tiny.randn(batch, length, width, seed=seed) * 2  # larger scores: the softmax is not near uniform


def written_out(attn, x, context, *, scale="d", heads=None, split="transpose", merge="transpose", softmax_dim=-1,
                out=True):
    """Attention as known mistakes compute it (the arguments name the mistake)."""
    heads = heads or attn.num_heads
    q, k, v = attn.to_q(x), attn.to_k(context), attn.to_v(context)
    d = q.shape[-1] // heads

    def split_heads(t):  # (B, L, heads * d) -> (B, heads, L, d)
        if split == "transpose":
            return t.unflatten(-1, (heads, d)).transpose(1, 2)
        return t.reshape(t.shape[0], heads, -1, d)  # the mistake: no transpose
    q, k, v = split_heads(q), split_heads(k), split_heads(v)
    factor = {"d": 1 / math.sqrt(d), "none": 1.0, "width": 1 / math.sqrt(heads * d), "d^2": 1 / d}[scale]
    weights = torch.softmax(q @ k.transpose(-1, -2) * factor, dim=softmax_dim)
    y = weights @ v
    y = y.transpose(1, 2).flatten(2) if merge == "transpose" else y.reshape(x.shape[0], -1, heads * d)
    return attn.to_out[0](y) if out else y


@torch.no_grad()
def known_mistakes(attn, x, context):
    c = x if context is None else context
    mistakes = {"attention without the 1/sqrt(d) scale": written_out(attn, x, c, scale="none"),
                "the scale 1/sqrt(heads * d) of the whole width, not 1/sqrt(d) of one head":
                    written_out(attn, x, c, scale="width"),
                "the scale 1/d instead of 1/sqrt(d)": written_out(attn, x, c, scale="d^2"),
                "the softmax over the queries instead of over the keys": written_out(attn, x, c, softmax_dim=-2),
                "the heads split without the transpose: (B, L, heads*d) viewed as (B, heads, L, d)":
                    written_out(attn, x, c, split="view"),
                "the heads split and merged without the transpose (views, not transposes)":
                    written_out(attn, x, c, split="view", merge="view"),
                "the heads merged without the transpose: (B, heads, L, d) viewed as (B, L, heads*d)":
                    written_out(attn, x, c, merge="view"),
                "one head: the heads are not split (attn.num_heads unused)": written_out(attn, x, c, heads=1),
                "no output projection: to_out[0] is missing": written_out(attn, x, c, out=False)}
    if context is not None and attn.to_k.in_features == x.shape[-1]:
        mistakes["keys and values from x: cross-attention reads them from the context"] = written_out(attn, x, x)
    return mistakes


def compare_attention(student, what, attn, x, context):
    got = student.attention(attn, x, context)
    with torch.no_grad():
        expected = unet.Attention.forward(attn, x, context)
    compare(what, got, expected, atol=1e-5, known=known_mistakes(attn, x, context) if got.shape == expected.shape
            else None)


def check_cross(student):
    compare_attention(student, f"cross-attention output (B=2, {L} image tokens, {S} text tokens)",
                      module(), tokens(), tokens(length=S, width=CONTEXT_DIM, seed=2))


def check_self(student):
    compare_attention(student, "self-attention output (context None)", module(context_dim=None), tokens(), None)


def check_heads(student):
    context = tokens(length=S, width=CONTEXT_DIM, seed=2)
    for heads in (1, 8):
        compare_attention(student, f"cross-attention with {heads} head(s) (d = {DIM // heads})",
                          module(num_heads=heads), tokens(), context)


def check_one_token(student):
    attn, x, context = module(), tokens(), tokens(length=1, width=CONTEXT_DIM, seed=2)
    compare_attention(student, "one text token (every query attends to it alone)", attn, x, context)


def check_gradients(student):
    results = []
    for fn in (student.attention, unet.Attention.forward):
        attn = module()
        x, context = tokens().requires_grad_(), tokens(length=S, width=CONTEXT_DIM, seed=2).requires_grad_()
        (fn(attn, x, context) * tokens(seed=3)).sum().backward()
        results.append({"x": x.grad, "context": context.grad,
                        **{name: p.grad for name, p in attn.named_parameters()}})
    got, expected = results
    for name, grad in expected.items():
        expect(got[name] is not None, f"no gradient reached {name}")
        compare(f"gradient of {name}", got[name], grad, atol=1e-5, rtol=1e-4)


@contextlib.contextmanager
def attention_in_unet(fn):
    """Every unet.Attention computes with fn while inside."""
    original = unet.Attention.forward
    unet.Attention.forward = lambda self, x, context=None: fn(self, x, context)
    try:
        yield
    finally:
        unet.Attention.forward = original


def check_in_unet(student):
    model = tiny.unet()
    latents, context = tiny.randn(2, 4, 8, 8, seed=4), tiny.randn(2, tiny.CONTEXT_LENGTH, 32, seed=5)
    t = torch.tensor([50, 700])
    with torch.no_grad():
        expected = model(latents, t, context)
        with attention_in_unet(student.attention):
            got = model(latents, t, context)
    compare("UNet output with your attention in every transformer block", got, expected, atol=1e-4)


def checks(student):
    return [Check("cross-attention: softmax(Q K^T / sqrt(d)) V per head, then to_out", lambda: check_cross(student)),
            Check("self-attention (context None)", lambda: check_self(student)),
            Check("1 head and 8 heads: the heads reshape", lambda: check_heads(student)),
            Check("one text token", lambda: check_one_token(student)),
            Check("gradients of x, the context and every weight", lambda: check_gradients(student)),
            Check("in a tiny UNet: self- and cross-attention of its transformer blocks", lambda: check_in_unet(student))]
