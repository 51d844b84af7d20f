"""Encoder attention whose dropout keeps a byte mask: BERT's and DistilBERT's attention modules.

The plain module (models/attention.py) computes, per head,

    S = Q K^T / sqrt(d) + M,    P = softmax(S),    O = ((m ⊙ P) / (1 - p)) V

through torch's scaled_dot_product_attention, which has no CPU kernel for dropout_p > 0:
on CPU it falls back to the textbook graph, and autograd keeps P, the float dropout
noise and the dropped P' (plus a transposed copy of K), 12 bytes per (query, key) pair
and head. For a BERT encoder that is the largest part of a training step's activations.

Here the forward keeps Q, K, V (which the graph keeps anyway), the row log-sum-exp
ℓ = log Σ_j exp(S_ij) and the drop mask as bool; the backward recomputes S and
P = exp(S - ℓ), as FlashAttention does (Dao et al., 2022), and then

    dV = P'^T dO                         P' = (m ⊙ P) / (1 - p)
    dP = (m ⊙ (dO V^T)) / (1 - p)
    dS = P ⊙ (dP - rowsum(dP ⊙ P))       (the softmax's backward)
    dQ = dS K / sqrt(d),   dK = dS^T Q / sqrt(d)

One byte per pair instead of twelve, for one extra Q K^T product in the backward. The
mask is drawn as in fast/dropout.py, so the random stream is not torch's; with the same
mask the two compute the same (tests/test_dropout_byte_mask.py). Without dropout, off
the CPU, or in 16-bit or autocast, torch's SDPA runs (its fused kernels keep only ℓ
already): that is the plain module's computation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..models.attention import EncoderSelfAttention
from ..models.bert import BertSelfAttention
from ..models.distilbert import MultiHeadSelfAttention
from .dropout import dropout_keep_mask, keep_factor, keep_scale
from .swap import swap_class


def _scores(q, k, mask, scale):
    s = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)
    return s if mask is None else s.add_(mask)


class _AttentionByteMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, p: float):
        scale = q.shape[-1] ** -0.5
        s = _scores(q, k, mask, scale)
        lse = torch.logsumexp(s, dim=-1, keepdim=True)
        probs = s.sub_(lse).exp_()
        keep = dropout_keep_mask(probs.shape, p, probs.device)
        c = keep_scale(p)
        # In place on P, which nothing else reads: keep_factor is torch's fast path.
        out = torch.matmul(probs.mul_(keep_factor(keep)), v).mul_(c)
        ctx.save_for_backward(q, k, v, mask, lse, keep)
        ctx.scale, ctx.c = scale, c
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, lse, keep = ctx.saved_tensors
        scale, c = ctx.scale, ctx.c
        probs = _scores(q, k, mask, scale).sub_(lse).exp_()
        keep = keep_factor(keep)
        kept = (probs * keep).mul_(c)  # P'
        grad_v = torch.matmul(kept.transpose(-2, -1), grad_out)
        grad_p = torch.matmul(grad_out, v.transpose(-2, -1)).mul_(keep).mul_(c)
        row = (grad_p * probs).sum(dim=-1, keepdim=True)
        grad_s = grad_p.sub_(row).mul_(probs)
        grad_q = torch.matmul(grad_s, k).mul_(scale)
        grad_k = torch.matmul(grad_s.transpose(-2, -1), q).mul_(scale)
        return grad_q, grad_k, grad_v, None, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout_p on the weights; (batch, heads, seq, head_dim).

    `mask` is additive (broadcastable to the scores) or None; pass dropout_p = 0 in eval."""
    if (dropout_p == 0.0 or dropout_p >= 1.0 or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled("cpu") or (mask is not None and mask.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return _AttentionByteMaskDropout.apply(q, k, v, mask, dropout_p)


class ByteMaskAttention(EncoderSelfAttention):
    """An encoder attention module's `attention`, with the byte-mask dropout."""

    def attention(self, q, k, v, mask, dropout_p):
        return attention(q, k, v, mask, dropout_p)


class ByteMaskBertSelfAttention(ByteMaskAttention, BertSelfAttention):
    pass


class ByteMaskMultiHeadSelfAttention(ByteMaskAttention, MultiHeadSelfAttention):
    pass


# The class a module has -> the class that adds the byte-mask attention to it. fast/unpad.py
# adds its real-token classes, so that the two pieces install in either order.
BYTE_MASK: dict[type, type] = {
    BertSelfAttention: ByteMaskBertSelfAttention,
    MultiHeadSelfAttention: ByteMaskMultiHeadSelfAttention,
}


def install(model: nn.Module) -> int:
    """Every BERT / DistilBERT attention module of `model` gets the byte-mask dropout."""
    return sum(swap_class(m, plain, BYTE_MASK[plain]) for m in model.modules() if (plain := type(m)) in BYTE_MASK)
