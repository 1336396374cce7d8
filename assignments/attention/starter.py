"""Exercise attention: multi-head (cross-)attention of the UNet's transformer blocks.

Write the body of attention, then grade it:

    python -m assignments.grade attention --file assignments/attention/starter.py
"""
import math  # noqa: F401

import torch  # noqa: F401


def attention(attn, x, context=None):
    """What unet.Attention.forward computes, written out: softmax(Q K^T / sqrt(d)) V per head.

    attn: a unet.Attention module. Its parts: attn.to_q, attn.to_k, attn.to_v (nn.Linear, no
        bias), attn.to_out[0] (nn.Linear) and attn.num_heads.
    x: (B, L, dim), the image tokens (one per pixel of the feature map: L = H * W).
    context: (B, S, context_dim), the text tokens for cross-attention (S = 77 for SD), or None
        for self-attention (then the keys and values come from x).

    q = to_q(x), k = to_k(context), v = to_v(context), each (B, ., heads * d); split the last
    axis into heads: (B, L, heads * d) -> (B, heads, L, d); attention weights softmax over the
    keys of q k^T / sqrt(d), d the size of ONE head; merge the heads back
    (B, heads, L, d) -> (B, L, heads * d); then to_out[0]. Returns (B, L, dim).
    Write the softmax yourself (not F.scaled_dot_product_attention).
    """
    raise NotImplementedError
