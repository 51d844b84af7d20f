"""LoRALinear: a frozen linear layer plus a trainable low-rank update.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3)
keeps the pretrained weight W0 (out x in) frozen and learns the update as a product
of two thin matrices:

    h = W0 x + (alpha / r) * B A x            A: r x in,  B: out x r,  r << min(in, out)

         x ──┬──────────── W0 (frozen) ───────────┐
             │                                     + ──> h
             └── dropout ── A ── B ── * alpha/r ───┘

Only A and B are trained, so a 4096 x 4096 layer at r = 8 trains 65,536 numbers
instead of 16.7 million. B starts at zero, so before the first step the adapter adds
exactly nothing and the model is the pretrained one (section 4.1 of the paper).

rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead of alpha / r, so that
the update's magnitude stays stable as r grows.

Merging folds the update into the base weight, W = W0 + (alpha / r) * B A, so
inference pays nothing for the adapter; unmerging subtracts it again.

The parameter layout and arithmetic follow peft's `lora.Linear` so that weights,
outputs and gradients agree with it: `lora_A` and `lora_B` are bias-free
`nn.Linear` modules (state-dict keys `lora_A.weight`, `lora_B.weight`) and the
wrapped layer is kept, not copied, as `base_layer`.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn


class LoRALinear(nn.Module):
    """Wraps an existing linear layer with a LoRA adapter.

    The wrapped layer (`base_layer`) is kept as is, frozen, and never copied. It may
    be an `nn.Linear` or any module with `in_features`, `out_features` and a
    `weight` that merging knows how to update (see `_add_to_base_weight`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int = 8,
        alpha: float = 8.0,
        dropout: float = 0.0,
        rslora: bool = False,
        adapter_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        self.r = r
        self.alpha = alpha
        self.rslora = rslora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # Dropout acts on the adapter's input only: the frozen path sees the clean x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        base_weight = base_layer.weight
        # Adapters train in fp32 even on a bf16/fp16 (or 4-bit) base: low-precision
        # optimiser updates to tiny A and B values would round away.
        if adapter_dtype is None:
            adapter_dtype = base_weight.dtype if base_weight.dtype in (torch.float32, torch.float64) else torch.float32
        device = base_weight.device if base_weight.device.type != "meta" else None
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.merged = False
        self.disabled = False
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A: Kaiming-uniform with a = sqrt(5), the same init nn.Linear gives its own
        # weight, so A x has a sensible scale from the first step.
        # B: zeros, so B A = 0 and a fresh adapter is an exact no-op (paper, section 4.1).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        result_dtype = result.dtype
        lora_x = self.lora_dropout(x.to(self.lora_A.weight.dtype))
        # Same order of operations as peft, so results agree to the last bit in fp32.
        result = result + self.lora_B(self.lora_A(lora_x)) * self.scaling
        return result.to(result_dtype)

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) * B A, shape (out, in), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def merge(self) -> None:
        """Fold B A into the base weight. Merging an already merged layer does nothing."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; not adding the update twice", stacklevel=2)
            return
        self._add_to_base_weight(self.delta_weight())
        self.merged = True

    def unmerge(self) -> None:
        """Subtract B A from the base weight again. Does nothing when not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing to subtract", stacklevel=2)
            return
        self._add_to_base_weight(-self.delta_weight())
        self.merged = False

    @torch.no_grad()
    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        # A quantized base (NF4Linear) knows how to dequantize, add and requantize.
        if hasattr(base, "add_to_weight"):
            base.add_to_weight(delta)
            return
        weight = base.weight
        # Add in the delta's precision (fp32), round once into the base dtype.
        weight.add_(delta.to(weight.device))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
            f"alpha={self.alpha}, scaling={self.scaling:.4g}, rslora={self.rslora}, merged={self.merged}"
        )
