"""The causal-LM head and its loss, shared by our Llama-family and GPT-2 models.

Position t predicts token t + 1, so the loss is next-token cross-entropy,

    L = sum_t -log softmax(W h_t)[y_{t+1}]    over t whose next label is not -100,

averaged over those targets in `loss` (as transformers does) and kept as a sum in
`loss_sum` (the trainer divides by the global target count itself, so gradient
accumulation weights every token alike).

The models take `return_logits=False` with labels (their `fused_lm_loss` flag says
so): the caller wants the loss only. Here the logits are built for the loss anyway and
returned; minilora.fast swaps in a head that never builds them (fast/linear_ce.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor | None  # None when the model was asked for the loss only
    kv_cache: object | None = None
    loss_sum: torch.Tensor | None = None


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """labels shifted left by one (the target of position t), -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def causal_lm_head(lm_head: nn.Module, hidden: torch.Tensor, labels: torch.Tensor | None,
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(logits, mean loss or None, summed loss or None) for final hidden states (batch, seq, hidden).

    The loss is computed in fp32 (a bf16 log-softmax over a 128k vocabulary loses digits).
    """
    logits = lm_head(hidden)
    if labels is None:
        return logits, None, None
    targets = next_token_labels(labels.to(hidden.device))
    count = (targets != IGNORE_INDEX).sum()
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
    return logits, loss_sum / count, loss_sum
