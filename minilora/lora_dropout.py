"""LoRA's adapter branch with dropout, as one autograd function that keeps a byte mask.

With dropout on the adapter's input (Hu et al., 2021, eq. 3, plus the dropout every
LoRA implementation puts in front of A), a layer computes

    h = W0 x + s * B A x',      x' = (m ⊙ x) / (1 - p),   m_i ~ Bernoulli(1 - p),   s = alpha / r

Through `nn.Dropout` and two `nn.Linear`s, autograd keeps per layer a float mask and
the dropped-out input x' for A's gradient: 8 bytes per input element, and q, k and v
each keep their own although they read the same x. For SmolLM2-135M at 1,024 tokens
that is about 850 MB per step. Here the forward keeps x itself (one reference,
shared by every layer that reads it), the mask as bool (1 byte per element) and
h = c A (m ⊙ x) (r numbers per row, c = 1 / (1 - p)); the backward rebuilds m ⊙ x:

    dh = s * dy B                  (rows x r)
    dB = s * dy^T h
    dA = (c dh)^T (m ⊙ x)
    dx = c (dh A) ⊙ m              (added to the frozen path's gradient by autograd)

and the frozen output passes through: out = W0 x + s h B^T is one addmm.

Drawing the mask: torch's `bernoulli_` spends one 32-bit draw per element on a single
thread (3 ms for a 1,024 x 576 input on the 2-core machine; 210 such inputs per
SmolLM2 step). We draw 64-bit words and read each as four 16-bit uniforms, so the
drop probability is p rounded to a multiple of 2^-16 (0.05 becomes 0.0500031) and
the kept values are scaled by the exact 1 / (1 - p_drawn), which keeps x' unbiased.
The draw uses the device's default generator, so `torch.manual_seed` reproduces it
and gradient checkpointing (which restores RNG state) recomputes the same mask.

The branch runs in the adapter's dtype with autocast off: it is r columns wide, so
fp32 costs little, and A and B get fp32 gradients whatever the base computes in.
"""

from __future__ import annotations

import torch

_LEVELS = 1 << 16


def drop_threshold(p: float) -> int:
    """How many of the 2^16 equally likely 16-bit draws drop an element."""
    return round(p * _LEVELS)


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True where the element is kept, with P(drop) = drop_threshold(p) / 2^16."""
    n = 1
    for size in shape:
        n *= size
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device).random_(-(2**63), None)
    draws = words.view(torch.int16)[:n]  # four uniform 16-bit integers per 64-bit word
    return (draws >= -(2**15) + drop_threshold(p)).view(shape)


def keep_scale(p: float) -> float:
    """1 / (1 - p_drawn): the factor that keeps the dropped-out input unbiased."""
    return _LEVELS / (_LEVELS - drop_threshold(p))


class _LoRADropoutBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, result, lora_a, lora_b, scaling: float, p: float):
        with torch.autocast(device_type=x.device.type, enabled=False):
            mask = dropout_keep_mask(x.shape, p, x.device)
            c = keep_scale(p)
            h = torch.mm(x * mask, lora_a.t()).mul_(c)
            out = torch.addmm(result, h, lora_b.t(), alpha=scaling)
        ctx.save_for_backward(x, mask, h, lora_a, lora_b)
        ctx.scaling, ctx.c = scaling, c
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, mask, h, lora_a, lora_b = ctx.saved_tensors
        need_x, need_result, need_a, need_b = ctx.needs_input_grad[:4]
        s, c = ctx.scaling, ctx.c
        grad_x = grad_a = grad_b = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            grad_out = grad_out.to(lora_b.dtype)
            if need_b:
                grad_b = torch.mm(grad_out.t(), h).mul_(s)
            if need_x or need_a:
                dh = torch.mm(grad_out, lora_b).mul_(s * c)  # c folded in: both uses need c dh
                if need_a:
                    grad_a = torch.mm(dh.t(), x * mask)
                if need_x:
                    grad_x = torch.mm(dh, lora_a).mul_(mask)
        return grad_x, grad_out if need_result else None, grad_a, grad_b, None, None


def lora_dropout_update(x: torch.Tensor, result: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        scaling: float, p: float) -> torch.Tensor:
    """result + scaling * B A dropout_p(x), in the adapters' dtype (x: (..., in), result: (..., out))."""
    dtype = lora_a.dtype
    lead = x.shape[:-1]
    x2 = x.to(dtype).reshape(-1, x.shape[-1])
    r2 = result.to(dtype).reshape(-1, result.shape[-1])
    out = _LoRADropoutBranch.apply(x2, r2, lora_a, lora_b, scaling, p)
    return out.view(*lead, out.shape[-1])
