"""DoRA: weight-decomposed low-rank adaptation (Liu et al., 2024, arXiv:2402.09353).

DoRA splits a weight into a magnitude and a direction (eq. 2 of the paper),

    W = m * V / ||V||_c            m: one length per output row, V / ||V||_c: unit rows

and fine-tunes them separately: the magnitude m directly, the direction with LoRA
(eq. 5):

    W' = m * (W0 + s B A) / ||W0 + s B A||_c           s = alpha / r

||.||_c is the L2 norm of each output row (the paper calls it column-wise because it
writes W as in x out). m starts as ||W0||_c, and B starts at zero, so a fresh DoRA
adapter is an exact no-op, as LoRA is. Only m, A and B train.

Section 4.3: treating the norm ||W0 + s B A||_c as a constant (detached from the
graph) saves a lot of memory and costs no accuracy; peft does so, and so do we.

We compute the output the way peft's `DoraLinearLayer` does, without forming W':
with g = m / ||W0 + s B A||_c (detached norm) and x' the adapter's (dropped-out) input,

    h = W0 x + b  +  (g - 1) * W0 x'  +  g * s * B A x'

When there is no dropout (x' = x) the frozen layer's own output W0 x (bias removed)
is reused, otherwise W0 x' is computed again. Without dropout this is exactly
g * (W0 + s B A) x + b.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def base_weight(base_layer: nn.Module) -> torch.Tensor:
    """W0 as a float tensor: a 4-bit base (NF4Linear) is dequantized."""
    dequantize = getattr(base_layer, "dequantize", None)
    return dequantize() if callable(dequantize) else base_layer.weight


def weight_norm(weight: torch.Tensor, lora_weight: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W0 + s B A||_c, one L2 norm per output row; `lora_weight` is B A (out x in)."""
    weight = weight + scaling * lora_weight
    return torch.linalg.norm(weight, dim=1).to(weight.dtype)


class DoRAMagnitude(nn.Module):
    """The trainable magnitude vector m of one DoRA adapter, shape (out_features,).

    Saved as `<layer>.lora_magnitude_vector` (peft's key) next to lora_A and lora_B.
    """

    def __init__(self, base_layer: nn.Module, lora_A: nn.Linear, lora_B: nn.Linear, scaling: float):
        super().__init__()
        with torch.no_grad():
            lora_weight = lora_B.weight @ lora_A.weight
            w0 = base_weight(base_layer).to(lora_A.weight.device)
            norm = weight_norm(w0, lora_weight, scaling)
        # m = ||W0 + s B A||_c makes the adapter a no-op at init (B = 0: m = ||W0||_c).
        self.weight = nn.Parameter(norm.to(lora_A.weight.dtype))

    def forward(
        self,
        x: torch.Tensor,
        lora_A: nn.Linear,
        lora_B: nn.Linear,
        scaling: float,
        base_layer: nn.Module,
        base_result: torch.Tensor | None,
    ) -> torch.Tensor:
        """What DoRA adds to the frozen layer's output. `base_result` is that output
        (W0 x + b) when `x` is the layer's own input, None when `x` was dropped out."""
        lora_weight = (lora_B.weight @ lora_A.weight).to(x.dtype)
        weight = base_weight(base_layer).to(x.dtype)
        # Section 4.3: the norm is a constant for backprop; gradients reach m, A, B only.
        norm = weight_norm(weight, lora_weight.detach(), scaling).detach()
        g = (self.weight / norm).view(1, -1)
        lora_result = lora_B(lora_A(x))
        if base_result is None:
            base_result = F.linear(x, weight)
        elif base_layer.bias is not None:
            base_result = base_result - base_layer.bias
        return (g - 1) * base_result + g * lora_result * scaling

    @torch.no_grad()
    def merged_weight(self, weight: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(W' = g * (W0 + s B A), g) for merging; `delta` is s B A. Unmerging divides by g."""
        g = (self.weight / weight_norm(weight, delta, 1.0)).view(-1, 1)
        return g * (weight + delta), g


# -- merging a DoRA adapter into its layer's weight, and taking it out again


def _dora_base_weight(layer: nn.Module) -> torch.Tensor:
    if hasattr(layer.base_layer, "add_to_weight"):
        raise NotImplementedError(
            "merging a DoRA adapter into a 4-bit (NF4) base is not supported: DoRA rescales every row of W0, "
            "which would re-quantize it; dequantize the base first, or keep the adapter unmerged"
        )
    return layer.base_layer.weight


@torch.no_grad()
def dora_merge(layer: nn.Module, adapter: nn.Module) -> None:
    """W0 <- g * (W0 + s B A) for a LoRALinear's DoRA `adapter`."""
    weight = _dora_base_weight(layer)
    merged, g = adapter.lora_magnitude_vector.merged_weight(weight, adapter.delta_weight())
    # g must be the one from W0, not recomputed from the merged weight, to unmerge.
    layer._dora_factor = g
    weight.copy_(merged.to(weight.dtype))


@torch.no_grad()
def dora_unmerge(layer: nn.Module, adapter: nn.Module) -> None:
    weight = _dora_base_weight(layer)
    weight.copy_((weight / layer._dora_factor - adapter.delta_weight()).to(weight.dtype))
    del layer._dora_factor
