"""LoRA layers on the fast path: the dropout branch keeps a byte mask, not x'.

The plain adapter (lora/layer.py) computes W0 x + s B A dropout(x) through nn.Dropout
and two nn.Linear, and autograd keeps a float mask and the dropped-out input x' per
layer. `FastLoRAAdapter` runs the same branch as one autograd function
(lora_dropout.py) whenever dropout is active; without dropout, in eval mode, and for
DoRA it is the plain adapter. In a 16-bit step it keeps the activation in bf16 (see
lora_dropout.py). The mask is drawn by fast/dropout.py's generator, so the
random stream differs from nn.Dropout's; with the same mask the two agree
(tests/test_lora_dropout.py).
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora.layer import LoRAAdapter, LoRALinear
from .lora_dropout import lora_dropout_update
from .swap import swap_class


class FastLoRAAdapter(LoRAAdapter):
    def add_update(self, x, result, base_layer):
        if self.lora_magnitude_vector is not None:
            return super().add_update(x, result, base_layer)
        # In a 16-bit step (autocast on, x in bf16) the plain adapter's x.to(fp32) is undone
        # by autocast at A: two conversions of the whole activation for nothing.
        low = x.dtype in (torch.bfloat16, torch.float16) and torch.is_autocast_enabled(x.device.type)
        dropout = self.lora_dropout
        if isinstance(dropout, nn.Dropout) and dropout.training:
            x = x if low else x.to(self.lora_A.weight.dtype)
            out = lora_dropout_update(x, result, self.lora_A.weight, self.lora_B.weight, self.scaling, dropout.p)
            return out.to(result.dtype)
        if low:
            return result + self.lora_B(self.lora_A(x)) * self.scaling
        return super().add_update(x, result, base_layer)


def install(model: nn.Module) -> int:
    """Every adapter of every LoRALinear in `model` (parked ones too) gets the fast branch."""
    n = 0
    for layer in model.modules():
        if isinstance(layer, LoRALinear):
            n += sum(swap_class(adapter, LoRAAdapter, FastLoRAAdapter) for adapter in layer.adapters.values())
    return n
