"""Same seed, same machine, same bits: resolve MKL's math kernels before they race.

On CPU, torch computes exp, log, tanh, erf, sqrt and the other float unary functions
of a contiguous tensor through MKL's VML, each intra-op thread calling it on its own
chunk. oneMKL 2024.2 (the MKL inside torch's x86 wheels) picks each function's
kernel lazily, on its first call; when that first call runs on several threads at
once, one thread can run a lower-accuracy kernel for its whole chunk of that one
call (pytorch/pytorch#188792; oneMKL 2025 no longer does). Every later call is right,
so it shows as a rare, one-off difference: a fresh process's first attention softmax
(its exp) or first GELU (its erf) differs in the last bits from the next process's,
and so does everything trained from it. Measured here before this module: the first
`tanh` of a process differed between processes 13 times in 30, and two identical
SST-2 runs in twelve ended with different adapters.

The cure is what torch's own fix does: call each function once on a tiny tensor,
which torch runs on the calling thread alone, so MKL settles every choice before any
two threads can meet there. `import minilora` does this once per process; code that
computes with torch before importing minilora can call `warm_up_vml()` itself first.
"""

from __future__ import annotations

import torch

# The functions torch sends to VML for float32 and float64 (aten/src/ATen/cpu/vml.h),
# plus their neighbours in UnaryOpsKernel.cpp, so a torch that routes more of them
# there is covered too. Every input below lies in each function's domain.
_FUNCTIONS = ("abs", "acos", "asin", "atan", "ceil", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1",
              "floor", "lgamma", "log", "log10", "log1p", "log2", "neg", "reciprocal", "round", "rsqrt",
              "sigmoid", "sin", "sinh", "sqrt", "tan", "tanh", "trunc")

_done = False


def warm_up_vml() -> None:
    """Call every VML-backed unary function once, single-threaded (idempotent, ~1 ms)."""
    global _done
    if _done:
        return
    for dtype in (torch.float32, torch.float64):
        # 8 elements: far below the grain size at which torch splits work across threads.
        x = torch.linspace(0.125, 0.875, 8, dtype=dtype)
        for name in _FUNCTIONS:
            getattr(torch, name)(x)
    _done = True
