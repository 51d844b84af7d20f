"""LoRA's adapter branch with dropout, as one autograd function that keeps a byte mask.

With dropout on the adapter's input (Hu et al., 2021, eq. 3, plus the dropout every
LoRA implementation puts in front of A), a layer computes

    h = W0 x + s * B A x',      x' = (m ⊙ x) / (1 - p),   m_i ~ Bernoulli(1 - p),   s = alpha / r

Through `nn.Dropout` and two `nn.Linear`s, autograd keeps per layer a float mask and
the dropped-out input x' for A's gradient: 8 bytes per input element, and q, k and v
each keep their own although they read the same x. For SmolLM2-135M at 1,024 tokens
that is about 850 MB per step. Here the forward keeps x itself (one reference,
shared by every layer that reads it), the mask as bool (1 byte per element) and
h = c A (m ⊙ x) (r numbers per row, c = 1 / (1 - p)); the backward rebuilds m ⊙ x
(one multiply by the mask's 0/1 bytes, cheaper than keeping m ⊙ x):

    dh = s * dy B                  (rows x r)
    dB = s * dy^T h
    dA = (c dh)^T (m ⊙ x)
    dx = c (dh A) ⊙ m              (added to the frozen path's gradient by autograd)

and the frozen output takes the update in place: W0 x += s h B^T is one addmm_ (W0 x is a
fresh tensor that nothing saved, so no copy of it is made).

The mask is drawn as in `minilora.fast.dropout` (16-bit uniforms; p rounded to a multiple of
2^-16, kept values scaled by the exact 1 / (1 - p_drawn)).

The branch runs with autocast off, in the adapter's dtype, except in a 16-bit step
(train/precision.py), where x arrives in bf16: converting it (and W0 x) to fp32 and
back would cost more than the branch, and keep an fp32 copy of x for the backward, so
the branch multiplies in bf16 as autocast would, with A and B cast (r rows: cheap),
and hands A and B their gradients in fp32.
"""

from __future__ import annotations

import torch

from .dropout import apply_keep, dropout_keep_mask, keep_factor, keep_scale


class _LoRADropoutBranch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, result, lora_a, lora_b, scaling: float, p: float):
        # x: (..., in); result: (..., out), contiguous; both in the compute dtype: the
        # adapters' own, or bf16/fp16 in a 16-bit step (A and B are then cast, r x in).
        with torch.autocast(device_type=x.device.type, enabled=False):
            keep = dropout_keep_mask(x.shape, p, x.device)
            c = keep_scale(p)
            h = torch.mm(apply_keep(x, keep).reshape(-1, x.shape[-1]), lora_a.to(x.dtype).t()).mul_(c)
            # In place: W0 x is a fresh output nobody saved, so it needs no copy.
            result.view(-1, result.shape[-1]).addmm_(h, lora_b.to(x.dtype).t(), alpha=scaling)
        ctx.mark_dirty(result)
        ctx.save_for_backward(x, keep, h, lora_a, lora_b)
        ctx.scaling, ctx.c = scaling, c
        return result

    @staticmethod
    def backward(ctx, grad_out):
        x, keep, h, lora_a, lora_b = ctx.saved_tensors
        need_x, need_result, need_a, need_b = ctx.needs_input_grad[:4]
        s, c = ctx.scaling, ctx.c
        grad_x = grad_a = grad_b = None
        with torch.autocast(device_type=x.device.type, enabled=False):
            a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)
            g = grad_out.to(x.dtype).reshape(-1, grad_out.shape[-1])
            if need_b:
                grad_b = torch.mm(g.t(), h).mul_(s).to(lora_b.dtype)
            if need_x or need_a:
                dh = torch.mm(g, b).mul_(s * c)  # c folded in: both uses need c dh
                # The mask as 0/1 in x's dtype, converted once for both uses (a uint8
                # operand would be converted inside each multiply).
                m = keep_factor(keep).to(x.dtype) if need_a and need_x else keep_factor(keep)
                if need_a:
                    grad_a = torch.mm(dh.t(), (x * m).reshape(-1, x.shape[-1])).to(lora_a.dtype)
                if need_x:
                    grad_x = torch.mm(dh, a).view(x.shape).mul_(m)
        return grad_x, grad_out if need_result else None, grad_a, grad_b, None, None


def lora_dropout_update(x: torch.Tensor, result: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                        scaling: float, p: float) -> torch.Tensor:
    """result + scaling * B A dropout_p(x), in the adapters' dtype (x: (..., in), result: (..., out)).

    `result` is updated in place when it is a contiguous, non-view tensor of the adapters'
    dtype (the frozen layer's fresh output): do not pass a tensor you still need.
    """
    low = x.dtype in (torch.bfloat16, torch.float16) and lora_a.dtype == torch.float32
    dtype = x.dtype if low else lora_a.dtype  # a 16-bit x is a 16-bit step's: stay in it
    result = result.to(dtype)
    if result._is_view() or not result.is_contiguous():
        # An in-place update of a view would rewrite its base's autograd history
        # (a biased nn.Linear on 3-D input returns a view of its 2-D addmm): copy instead.
        result = result.clone(memory_format=torch.contiguous_format)
    return _LoRADropoutBranch.apply(x.to(dtype), result, lora_a, lora_b, scaling, p)
