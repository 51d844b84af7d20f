"""RMSNorm as one autograd function in a 16-bit step: five passes over the rows, not a dozen.

RMSNorm (Zhang & Sennrich, 2019, eq. 4) with gain w over a row x of d numbers:

    y = w ⊙ (x r),      r = (mean_i(x_i^2) + eps)^(-1/2)

The plain module (models/rms_norm.py) writes this as six tensor ops and lets autograd
differentiate each of them: about a dozen elementwise passes over the activation in
the backward, in fp32 for a bf16 input (each op's gradient converted on the way).
By hand, with g = dL/dy and u = g ⊙ w:

    dL/dx = r u - x r^3 (u · x) / d
    dL/dw = sum over rows of g ⊙ (x r)            (only when w is trained)

so the backward keeps x and r (one number a row) and computes u, the row dots u · x
(summed in fp32), then r u and the correction in fp32, converting the result once.
The forward is the plain module's op for op, so the two give bit-identical outputs;
the gradients agree to rounding (tests/test_rms_norm.py checks both against float64).

Only a 16-bit input (bf16, fp16) whose gain has its dtype takes this path, the case of a
bf16 step (train/precision.py), where autograd's version converts each op's gradient
between bf16 and fp32. In fp32 the two backwards take the same time within noise
(benchmarks/bench_fast.py, RESULTS.md "Fast pieces"), so fp32, fp64 and a trained fp32
gain on a bf16 activation (mixed dtypes, which rely on the plain module's type
promotion) stay on the plain module.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.rms_norm import RMSNorm
from .swap import swap_class

_FAST_DTYPES = (torch.bfloat16, torch.float16)


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        xf = x.float()
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, r = ctx.saved_tensors
        grad_x = grad_w = None
        # Same-dtype elementwise ops: torch's CPU kernels vectorise those; a bf16 x fp32
        # operand pair runs element by element, several times slower.
        u = grad * weight
        if ctx.needs_input_grad[0]:
            dot = (u * x).sum(-1, keepdim=True, dtype=torch.float32)
            coef = dot.mul_(r.pow(3)).div_(-x.shape[-1])
            xf = x.float()
            grad_x = (u.float() * r).addcmul_(xf, coef).to(x.dtype)
        if ctx.needs_input_grad[1]:
            y = (x.float() * r).to(x.dtype)
            grad_w = (grad * y).reshape(-1, x.shape[-1]).sum(0)
        return grad_x, grad_w, None


class FastRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in _FAST_DTYPES or self.weight.dtype != x.dtype:
            return super().forward(x)
        return _RMSNormFunction.apply(x, self.weight, self.eps)


def install(model: nn.Module) -> int:
    """Every RMSNorm in `model` runs the hand-written backward on 16-bit input."""
    return sum(swap_class(m, RMSNorm, FastRMSNorm) for m in model.modules())
