"""Less work in a checkpointed Llama layer's re-run: skip the down projection's product.

Gradient checkpointing (models/grad_checkpoint.py) runs a layer a second time in the
backward, only for the tensors autograd saves; the re-run's output is thrown away. So
work that only feeds that output can be skipped. In a Llama layer,

    y = h + W_down( silu(W_gate h') * (W_up h') ),      h' = RMSNorm(h)

the last product W_down p feeds y alone. What does autograd save for it? For a frozen
nn.Linear, F.linear saves only the weight (dx = dy W needs W, and nothing of x, as there
is no dW), whatever the number of rows: running it on one row of p saves the same. That
skips W0 p, a quarter of the frozen matmul work of the re-run. A LoRA-wrapped W_down
runs its frozen base on one row and its adapter in full (the adapter saves x, its mask
and x A; it never reads W0 x); DoRA, which does read W0 x, runs in full.

`SkipDownProjLlamaDecoderLayer` asks grad_checkpoint.recomputing(self) whether it is
the block being re-run; inside a larger checkpointed block (a user's function) its
output still feeds the next layer, and it runs in full.
"""

from __future__ import annotations

import torch
from torch import nn

from ..lora.layer import LoRALinear
from ..models.grad_checkpoint import recomputing
from ..models.llama import LlamaDecoderLayer, LlamaMLP
from .swap import swap_class


def frozen_linear(module: nn.Module) -> bool:
    """A plain nn.Linear with no trainable parameter (its F.linear saves only the weight)."""
    return type(module) is nn.Linear and not any(p.requires_grad for p in module.parameters())


def cuttable(x: torch.Tensor) -> bool:
    """Whether F.linear on one_row(x) saves what it saves on x: x contiguous, and not a
    batch of one sequence (torch then saves a tensor of another shape for the re-run's
    product than for the first run's, and the backward fails: "t() expects a tensor with
    <= 2 dimensions")."""
    return x.is_contiguous() and (x.dim() != 3 or x.shape[0] > 1)


def one_row(x: torch.Tensor) -> torch.Tensor:
    """x cut to its first row, contiguous: F.linear then saves what it saves for a contiguous x
    (for a strided 3-D input it would save a batched copy of W instead)."""
    return x[..., :1, :].contiguous()


def lora_forward_for_saved_tensors(layer: LoRALinear, x: torch.Tensor) -> None:
    """layer(x) for what autograd saves only: the frozen base on one row, the adapter added
    to zeros. DoRA (which uses W0 x), merged, disabled and mixed-batch layers, a base
    that is not a frozen nn.Linear, and an x that is not `cuttable` run forward in full."""
    adapter = layer.adapters.get(layer.active_adapter)
    if (layer.merged or layer.disabled or layer.row_adapters is not None or not frozen_linear(layer.base_layer)
            or not cuttable(x) or (adapter is not None and adapter.lora_magnitude_vector is not None)):
        layer(x)
        return
    layer.base_layer(one_row(x))
    if adapter is not None:
        adapter.add_update(x, x.new_zeros(*x.shape[:-1], layer.base_layer.out_features), layer.base_layer)


def run_for_saved_tensors(layer: nn.Module, x: torch.Tensor) -> None:
    """layer(x) where only what autograd saves for the backward is wanted, not the output.

    A frozen nn.Linear runs on one row; a LoRALinear as lora_forward_for_saved_tensors says;
    anything else, or an x that is not `cuttable`, runs in full."""
    if frozen_linear(layer) and cuttable(x):
        layer(one_row(x))
    elif isinstance(layer, LoRALinear):
        lora_forward_for_saved_tensors(layer, x)
    else:
        layer(x)


class SkipDownProjLlamaDecoderLayer(LlamaDecoderLayer):
    def forward(self, x, cos, sin, mask, kv_cache=None):
        if not recomputing(self):
            return super().forward(x, cos, sin, mask, kv_cache)
        # Run again by checkpointing for its saved tensors: the output is discarded,
        # and so is the down projection's product that only feeds it.
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache)
        h, mlp = self.post_attention_layernorm(x), self.mlp
        if type(mlp) is LlamaMLP:
            run_for_saved_tensors(mlp.down_proj, mlp.act(mlp.gate_proj(h)) * mlp.up_proj(h))
        else:
            mlp(h)
        return x


def install(model: nn.Module) -> int:
    """Every Llama decoder layer in `model` skips the down projection's product in its re-runs."""
    return sum(swap_class(m, LlamaDecoderLayer, SkipDownProjLlamaDecoderLayer) for m in list(model.modules()))
