"""The causal-LM head and its loss, shared by our Llama-family and GPT-2 models.

Position t predicts token t + 1, so the loss is next-token cross-entropy,

    L = sum_t -log softmax(W h_t)[y_{t+1}]    over t whose next label is not -100,

averaged over those targets in `loss` (as transformers does) and kept as a sum in
`loss_sum` (the trainer divides by the global target count itself, so gradient
accumulation weights every token alike).

With `return_logits=False` and a plain `nn.Linear` head, the loss goes through
`linear_cross_entropy`, which never builds the (tokens x vocab) logits and skips
the head's matmul for rows without a target (prompt and padding): for SmolLM2 at
1,024 tokens that is 201 MB of logits plus as much again for the log-softmax and
its gradient. A head that is itself adapted (LoRA on lm_head, a trainable copy in
modules_to_save) takes the plain path.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from ..fast.linear_ce import linear_cross_entropy

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
                   return_logits: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """(logits or None, mean loss or None, summed loss or None) for final hidden states (batch, seq, hidden).

    The loss is computed in fp32 (a bf16 log-softmax over a 128k vocabulary loses digits).
    """
    if labels is None:
        return lm_head(hidden), None, None
    targets = next_token_labels(labels.to(hidden.device))
    count = (targets != IGNORE_INDEX).sum()
    if not return_logits and type(lm_head) is nn.Linear:
        loss_sum = linear_cross_entropy(hidden, lm_head.weight, targets, bias=lm_head.bias, ignore_index=IGNORE_INDEX)
        return None, loss_sum / count, loss_sum
    logits = lm_head(hidden)
    loss_sum = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                               ignore_index=IGNORE_INDEX, reduction="sum")  # fmt: skip
    return logits, loss_sum / count, loss_sum
