"""RMSNorm: Llama's normalisation, a LayerNorm without the mean and the bias.

RMSNorm (Zhang & Sennrich, 2019, eq. 4) rescales a row x of H numbers by its root
mean square, with a learned gain w:

    y = w ⊙ x r,        r = (mean_i(x_i^2) + eps)^(-1/2)

The arithmetic is the reference implementation's, op for op: the statistics in fp32
(a bf16 mean of squares loses digits), the gain applied in the input's dtype. So fp32
and bf16 outputs are bit-identical to transformers' LlamaRMSNorm. (fp64 input keeps
fp64 throughout, where the reference would round it to fp32.)

"""

from __future__ import annotations

import torch
from torch import nn


def stats_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the statistics are computed in: fp32, or fp64 for fp64 input."""
    return torch.promote_types(x.dtype, torch.float32)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(stats_dtype(x))
        r = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * (xf * r).to(x.dtype)
