"""Encoder self-attention with dropout on the probabilities, keeping a byte mask.

Vaswani et al. (2017), eq. 1, with dropout on the attention weights as BERT trains it:

    S = Q K^T / sqrt(d) + M,    P = softmax(S),    O = ((m ⊙ P) / (1 - p)) V

torch's scaled_dot_product_attention has no CPU kernel for dropout_p > 0, so on CPU
it falls back to the textbook graph, and autograd keeps P, the float dropout noise and
the dropped P' (plus a transposed copy of K): 12 bytes per (query, key) pair and head.
For all-MiniLM-L6-v2 at a batch of 32 x 64 tokens that is about 110 MB, the largest
part of the training step's activations.

Here the forward keeps Q, K, V (which the graph keeps anyway), the row log-sum-exp
ℓ = log Σ_j exp(S_ij) and the drop mask as bool; the backward recomputes S and
P = exp(S - ℓ), as FlashAttention does (Dao et al., 2022), and then

    dV = P'^T dO                         P' = (m ⊙ P) / (1 - p)
    dP = (m ⊙ (dO V^T)) / (1 - p)
    dS = P ⊙ (dP - rowsum(dP ⊙ P))       (the softmax's backward)
    dQ = dS K / sqrt(d),   dK = dS^T Q / sqrt(d)

One byte per pair instead of twelve, for one extra Q K^T product in the backward. The
mask is drawn as in `minilora.fast.dropout`. Without dropout, off the CPU, or in 16-bit or
autocast, torch's SDPA runs (its fused kernels keep only ℓ already).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..fast.dropout import dropout_keep_mask, keep_factor, keep_scale
from .unpad import Unpadded


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


def self_attention(h: torch.Tensor, projections, num_heads: int, mask: torch.Tensor | None, dropout_p: float,
                   unpadded: Unpadded | None = None) -> torch.Tensor:
    """Multi-head self-attention of an encoder layer, before its output projection.

    h: (batch, seq, hidden), or (tokens, hidden) with `unpadded`: then the q/k/v
    projections run on the real tokens only and are spread to the padded layout for
    attention alone (models/unpad.py). Returns h's layout."""
    b, s = (unpadded.batch, unpadded.seq) if unpadded is not None else h.shape[:2]
    q, k, v = (proj(h) if unpadded is None else unpadded.spread(proj(h)) for proj in projections)
    # (batch, seq, hidden) -> (batch, heads, seq, head_dim): attention runs over dim -2.
    q, k, v = (t.view(b, s, num_heads, -1).transpose(1, 2) for t in (q, k, v))
    out = attention(q, k, v, mask, dropout_p).transpose(1, 2).reshape(b, s, -1)
    return out if unpadded is None else unpadded.take(out)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
              dropout_p: float) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with dropout_p on the weights; (batch, heads, seq, head_dim).

    `mask` is additive (broadcastable to the scores) or None; pass dropout_p = 0 in eval."""
    if (dropout_p == 0.0 or dropout_p >= 1.0 or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.float64)
            or torch.is_autocast_enabled("cpu") or (mask is not None and mask.requires_grad)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    return _AttentionByteMaskDropout.apply(q, k, v, mask, dropout_p)
