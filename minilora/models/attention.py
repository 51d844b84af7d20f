"""Encoder self-attention, shared by BERT and DistilBERT.

Vaswani et al. (2017), eq. 1, per head of width d, with dropout on the attention
weights as BERT trains it:

    S = Q K^T / sqrt(d) + M,    P = softmax(S),    O = Dropout(P) V

Q, K and V are the layer's input through three projections (BERT's query/key/value,
DistilBERT's q_lin/k_lin/v_lin), split into heads; M is the additive padding mask
(bert.padding_mask): 0 for real keys, a huge negative number for padding.
torch's scaled_dot_product_attention computes exactly this.

Each model's attention module subclasses `EncoderSelfAttention`, which does the
splitting into heads and calls `attention` for the formula above. minilora.fast
gives the module a subclass that overrides one of the two methods: `attention`
(fast/attention.py: a dropout that keeps its mask as bytes) or `self_attention`
(fast/unpad.py: the projections on the real tokens only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EncoderSelfAttention(nn.Module):
    """Multi-head self-attention of an encoder layer, before its output projection.

    A subclass creates the q/k/v projections, returns them from `projections()` and sets
    `num_heads` and `dropout_p` (the attention weights' dropout in training)."""

    num_heads: int
    dropout_p: float

    def projections(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        raise NotImplementedError

    def self_attention(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """(batch, seq, hidden) -> (batch, seq, hidden): every head's output, concatenated."""
        b, s = h.shape[:2]
        # (batch, seq, hidden) -> (batch, heads, seq, head_dim): attention runs over dim -2.
        q, k, v = (proj(h).view(b, s, self.num_heads, -1).transpose(1, 2) for proj in self.projections())
        out = self.attention(q, k, v, mask, self.dropout_p if self.training else 0.0)
        return out.transpose(1, 2).reshape(b, s, -1)

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                  dropout_p: float) -> torch.Tensor:  # fmt: skip
        """softmax(q k^T / sqrt(d) + mask) v with dropout_p on the weights; (batch, heads, seq, head_dim).

        `mask` is additive (broadcastable to the scores) or None."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
