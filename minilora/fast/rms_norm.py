"""RMSNorm with a hand-written backward.

The plain module (models/rms_norm.py) computes, for a row x of H numbers and gain w,

    y = w ⊙ x r,        r = (mean_i(x_i^2) + eps)^(-1/2)

Differentiating (ĝ = w ⊙ dL/dy; dr/dx_j = -r^3 x_j / H):

    dL/dx = r ĝ - x r^3 mean_i(ĝ_i x_i)
    dL/dw = sum over rows of dL/dy ⊙ x r

Written with torch ops, autograd records the square, the mean, the rsqrt and two
products, and its backward walks back through each, one pass over the (tokens x H)
activations per step. This function keeps x and r (one number a row) and computes
dL/dx in four passes.

The forward is the plain module's arithmetic, op for op, so its output is bit-identical;
the backward works in the statistics' dtype (fp32, or fp64 for fp64 input) and returns
the input's dtype, so the gradients agree with autograd's to rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.rms_norm import RMSNorm, stats_dtype
from .swap import swap_class


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(stats_dtype(x))
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, r)
        return weight * (xf * r).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, r = ctx.saved_tensors
        xf = x.to(stats_dtype(x))
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            g_hat = grad.to(xf.dtype) * weight.to(xf.dtype)
            mean_gx = torch.linalg.vecdot(g_hat, xf, dim=-1).unsqueeze(-1).div_(x.shape[-1])
            grad_x = g_hat.mul_(r).addcmul_(xf, mean_gx.mul_(r.pow(3)), value=-1).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normed = (xf * r).to(x.dtype)
            grad_w = (grad * normed).reshape(-1, x.shape[-1]).sum(0, dtype=xf.dtype).to(weight.dtype)
        return grad_x, grad_w, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm(x) with gain `weight`, through the hand-written backward."""
    return _RMSNormFunction.apply(x, weight, eps)


class AnalyticRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


def install(model: nn.Module) -> int:
    """Every RMSNorm in `model` gets the hand-written backward."""
    return sum(swap_class(m, RMSNorm, AnalyticRMSNorm) for m in list(model.modules()))
