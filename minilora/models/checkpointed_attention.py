"""Scaled dot-product attention whose output a gradient-checkpoint re-run takes back.

Attention (Vaswani et al., 2017, eq. 1), O = softmax(Q K^T / sqrt(d) + M) V, in the
fused form of FlashAttention (Dao et al., 2022): the forward keeps Q, K, V, O and the
row log-sum-exp ℓ = log Σ_j exp(S_ij), and the backward recomputes P = exp(S - ℓ) from
them. So the backward needs O and ℓ, and a checkpointed layer's re-run computes the
whole attention again only to get those two.

Inside a checkpointed block on CPU, this runs torch's own CPU flash kernels
(`_scaled_dot_product_flash_attention_for_cpu` and its backward, the ones
F.scaled_dot_product_attention picks there) and keeps O and ℓ from the first run
(grad_checkpoint.kept_for_rerun), so the re-run skips the attention product. What it
costs: O and ℓ per checkpointed layer, (heads × head_dim + heads) numbers a token;
for SmolLM2-135M at 1,024 tokens 2.4 MB a layer, against 4 ms of attention forward a
layer saved in the re-run (benchmarks/RESULTS.md).

Everywhere else (not checkpointing, dropout, other devices, autocast) it is
F.scaled_dot_product_attention itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..grad_checkpoint import in_checkpointed_block, kept_for_rerun

_FLASH_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def _attend_cpu(q, k, v, mask, is_causal: bool, scale: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, ℓ) from torch's CPU flash attention kernel."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, is_causal, attn_mask=mask,
                                                                      scale=scale)


class _KeptFlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal: bool, scale: float | None):
        # Kept as fresh aliases: the tensor returned here gets this node as its grad_fn,
        # and a re-run's node must not be given to the first run's tensor.
        out, lse = kept_for_rerun(lambda: _attend_cpu(q, k, v, mask, is_causal, scale), pack=lambda r: (r[0].detach(), r[1]),
                                  unpack=lambda r: (r[0].detach(), r[1]))
        ctx.save_for_backward(q, k, v, mask, out, lse)
        ctx.is_causal, ctx.scale = is_causal, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, mask, out, lse = ctx.saved_tensors
        grads = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, ctx.is_causal, attn_mask=mask, scale=ctx.scale)
        return *grads, None, None, None


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                                 is_causal: bool, dropout_p: float = 0.0, scale: float | None = None,
                                 enable_gqa: bool = False) -> torch.Tensor:
    """F.scaled_dot_product_attention (q: (batch, heads, seq, head_dim); k, v may have
    fewer heads with enable_gqa), with the output kept for a checkpoint's re-run where
    that is possible (see the module docstring)."""
    if (in_checkpointed_block() and torch.is_grad_enabled() and dropout_p == 0.0 and q.device.type == "cpu"
            and q.dtype in _FLASH_DTYPES and q.dtype == k.dtype == v.dtype and not torch.is_autocast_enabled("cpu")
            and (attn_mask is None or not attn_mask.requires_grad)):
        if attn_mask is not None and attn_mask.dtype == torch.bool:
            # The kernel takes an additive mask of q's dtype; F.scaled_dot_product_attention
            # converts a boolean one the same way (a row with nothing to attend gives zeros).
            attn_mask = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(
                ~attn_mask, float("-inf"))
        return _KeptFlashAttention.apply(q, k, v, attn_mask, is_causal, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)
