"""Exercise lora: a LoRA layer (Hu et al. 2021), the building block of DreamBooth-LoRA.

Write the bodies, then grade them:

    python -m assignments.grade lora --file assignments/lora/starter.py
"""
import math  # noqa: F401

import torch  # noqa: F401
import torch.nn as nn
import torch.nn.functional as F  # noqa: F401


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update (LoRA, section 4.1, Eq. 3):

        y = W0 x + b + (alpha / r) B A dropout(x),   A: [r, in], B: [out, r]

    Parts (these names: the project's LoRA files are read by name):
        self.weight, self.bias   the base layer's OWN Parameters (register them, do not copy them)
        self.lora_down           A, an nn.Linear(in, r, bias=False), initialised like nn.Linear
                                 (kaiming-uniform, a = sqrt(5): values in +-1/sqrt(in))
        self.lora_up             B, an nn.Linear(r, out, bias=False), initialised to ZERO, so that the
                                 adapted layer starts as the pretrained one exactly
        self.rank, self.alpha    r, and alpha (default: r, a factor of 1)
    The adapter is float32 whatever the base's dtype; the output has the base output's dtype.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0):
        super().__init__()
        raise NotImplementedError

    def forward(self, x):
        """x: (..., in) -> (..., out). Dropout acts on the adapter's input only (and only in
        training). After merge() the update is inside self.weight: do not add it again."""
        raise NotImplementedError

    @torch.no_grad()
    def merge(self):
        """W0 -> W0 + (alpha / r) B A in place, for sampling at the base layer's cost. A second
        merge() does nothing."""
        raise NotImplementedError

    @torch.no_grad()
    def unmerge(self):
        """Back to W0, bit for bit (subtracting the update again would not give W0 exactly in
        floating point: keep a copy)."""
        raise NotImplementedError
