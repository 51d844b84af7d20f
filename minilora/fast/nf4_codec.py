"""The fast CPU NF4 codec: the reference's bytes and values, computed in fewer passes.

`minilora.qlora.nf4` is the reference: blockwise absmax, the nearest code by binary
search over the 15 float32 midpoints, `code[index] * absmax` to dequantize, each step
over the whole tensor. This codec computes exactly the same packed bytes, absmax and
dequantized values (tests/test_nf4_fast.py holds them equal, tests/test_nf4_bnb.py
holds both equal to bitsandbytes) with three changes:

- Quantize counts instead of searching. With b'_j the next float32 above midpoint
  m_j, s > m_j exactly when s - b'_j >= 0, and the sign of a float32 difference is
  exact in IEEE arithmetic. An arithmetic shift of that difference's bits by 31
  gives 0 or -1, so

      index = 15 + sum_j (bits(s - b'_j) >> 31)

  is three branch-free vector passes per midpoint (subtract, shift, add), where a
  binary search branches once per level for every value.

- Dequantize decodes a byte in one lookup: entry b of a 256-entry table holds the two
  fp32 codes of byte b, bit-cast to one int64, so a 1-D gather of 8-byte words yields
  both values in place (no nibble split, no interleave).

- Both work in chunks of rows sized to stay in a CPU's L2 cache between their passes,
  so their scratch buffers have one size whatever the weight (loading that quantizes
  tensor after tensor then reuses them instead of fragmenting the heap), and a fresh
  large output is advised onto 2 MiB pages (minilora.fast.hugepages) so that its
  first touch costs fewer page faults.

`install(model)` switches this process's NF4 to this codec through
`minilora.qlora.nf4.use_codec` (the switch is process-wide: quantization also runs
at load time, before a model exists); `uninstall()` puts the reference back. What it
wins, measured against the reference in one run: benchmarks/bench_nf4.py (stacks
"minilora-reference" and "minilora-fast"), results in benchmarks/RESULTS.md.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torch import nn

from minilora.qlora import nf4
from minilora.qlora.nf4 import NF4Weight, check_out, nf4_midpoints
from minilora.qlora.nf4_linear import NF4Linear

from .hugepages import empty_huge

# Chunks of this many values stay in a CPU's L2 cache between the passes below.
_CPU_CHUNK = 1 << 18
_CUDA_CHUNK = 1 << 24


def _chunk_rows(t: torch.Tensor, blocksize: int) -> int:
    return max(1, (_CUDA_CHUNK if t.is_cuda else _CPU_CHUNK) // blocksize)


@lru_cache(maxsize=None)
def _bounds_above() -> tuple[float, ...]:
    # s > m  <=>  s >= next float after m, so the sign of (s - b') alone decides.
    return tuple(float(np.nextafter(np.float32(m), np.float32(2))) for m in nf4_midpoints().tolist())


def _nf4_indices(s: torch.Tensor, acc: torch.Tensor, diff: torch.Tensor) -> None:
    """acc[i] = number of NF4 midpoints strictly below s[i], i.e. nearest_nf4(s) (int32).

    Float compares to bool cost more than the sub + shift pair on the CPU; `diff` is
    scratch of s's size, reused for every midpoint.
    """
    bits = diff.view(torch.int32)
    acc.fill_(15)
    for b in _bounds_above():
        torch.sub(s, b, out=diff)
        acc.add_(bits.bitwise_right_shift_(31))


def _pack(idx: torch.Tensor, out: torch.Tensor) -> None:
    torch.bitwise_or(idx[0::2] << 4, idx[1::2], out=out)


def quantize_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """nf4._quantize_4bit, chunk by chunk: (packed bytes, fp32 absmax), the same bits."""
    n, dev = flat.numel(), flat.device
    n_full, rem = divmod(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)
    absmax = torch.empty(n_full + (rem > 0), dtype=torch.float32, device=dev)
    rows = _chunk_rows(flat, blocksize)
    m = min(rows, n_full) * blocksize or 1
    s_buf, diff = torch.empty(m, device=dev), torch.empty(m, device=dev)
    acc, idx = torch.empty(m, dtype=torch.int32, device=dev), torch.empty(m, dtype=torch.uint8, device=dev)
    x2 = flat[: n_full * blocksize].view(n_full, blocksize)
    p2 = packed[: n_full * blocksize // 2].view(n_full, blocksize // 2)
    for r0 in range(0, n_full, rows):
        r1 = min(r0 + rows, n_full)
        xc = x2[r0:r1].float()
        k = xc.numel()
        am = xc.abs().amax(dim=1)
        absmax[r0:r1] = am
        # No clamp to [-1, 1] needed: every midpoint lies inside, so counts are unchanged.
        s = torch.mul(xc, (1.0 / am.clamp(min=1e-38))[:, None], out=s_buf[:k].view(xc.shape))
        _nf4_indices(s.view(-1), acc[:k], diff[:k])
        _pack(idx[:k].copy_(acc[:k]), p2[r0:r1].view(-1))
    if rem:
        tail = flat[n_full * blocksize :].float()
        am = tail.abs().max().clamp(min=1e-38)  # stored clamped, as bitsandbytes does
        absmax[-1] = am
        s = torch.nn.functional.pad(tail / am, (0, rem % 2))  # divides here; odd n pads the value 0.0
        acc = torch.empty(s.numel(), dtype=torch.int32, device=dev)
        _nf4_indices(s, acc, torch.empty_like(s))
        _pack(acc.to(torch.uint8), packed[n_full * blocksize // 2 :])
    if not torch.isfinite(absmax).all():
        raise ValueError("NF4 quantization needs finite weights: found NaN or inf; clean the tensor first")
    return packed, absmax


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    # Entry b holds the two fp32 values packed into byte b, bit-cast to one int64.
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous().view(torch.int64).view(-1)


def dequantize(w: NF4Weight, dtype=None, out=None) -> torch.Tensor:
    """nf4.dequantize_nf4_torch, chunk by chunk through the pair table: the same values."""
    dtype = dtype or w.dtype
    if out is None and w.device.type == "cpu":
        out = empty_huge(w.shape, dtype=dtype)
    out = check_out(out, w, dtype)
    n, bs, dev = w.numel(), w.blocksize, w.device
    flat = out.view(-1)
    scales, table = w.scales(), _pair_table(w.code.to(dev))
    n_full, half = n // bs, bs // 2
    rows = _chunk_rows(w.packed, bs)
    k = min(rows, n_full) * half
    # index_select over the 1-D table runs on one thread. With more, a gather from the
    # table broadcast to one row per block (a stride-0 view) splits the blocks between
    # threads; with one it is the slower of the two (benchmarks/RESULTS.md).
    parallel = not w.packed.is_cuda and torch.get_num_threads() > 1
    idx = torch.empty(k, dtype=torch.int64 if parallel else torch.int32, device=dev)
    table_rows = table.expand(min(rows, n_full), table.numel())
    # fp32 decodes straight into the output when its storage is 8-byte aligned for the int64 view.
    direct = dtype == torch.float32 and flat.storage_offset() % 2 == 0
    buf = None if direct else torch.empty(k, dtype=torch.int64, device=dev)
    for r0 in range(0, n_full, rows):
        r1 = min(r0 + rows, n_full)
        i = idx[: (r1 - r0) * half].copy_(w.packed[r0 * half : r1 * half])
        dst = flat[r0 * bs : r1 * bs].view(r1 - r0, bs)
        # fp16/bf16: the fp32 product in the cache-sized buffer, rounded once by the copy out.
        pairs = dst.view(torch.int64) if buf is None else buf[: i.numel()].view(r1 - r0, half)
        if parallel:
            torch.gather(table_rows[: r1 - r0], 1, i.view(r1 - r0, half), out=pairs)
        else:
            torch.index_select(table, 0, i, out=pairs.view(-1))
        vals = pairs.view(torch.float32)
        vals.mul_(scales[r0:r1, None])
        if buf is not None:
            dst.copy_(vals)  # a converting copy: cheaper than a mixed-dtype torch.mul(..., out=dst)
    if n_full * bs < n:
        vals = table.index_select(0, w.packed[n_full * half :].int()).view(torch.float32)[: n - n_full * bs]
        torch.mul(vals, scales[n_full], out=flat[n_full * bs :])
    return out


class FastCodec:
    """The codec object `minilora.qlora.nf4.use_codec` takes."""

    name = "fast"
    quantize_4bit = staticmethod(quantize_4bit)
    dequantize = staticmethod(dequantize)


CODEC = FastCodec()


def install(model: nn.Module | None = None) -> int:
    """Put this process's NF4 on the fast codec; returns how many NF4Linear layers `model` has.

    Call it without a model before loading with quantize="nf4" to quantize with it too.
    """
    nf4.use_codec(CODEC)
    return 0 if model is None else sum(isinstance(m, NF4Linear) for m in model.modules())


def uninstall() -> None:
    """Back to the reference codec (if this one is installed)."""
    if nf4.current_codec() is CODEC:
        nf4.use_codec(None)


def installed() -> bool:
    return nf4.current_codec() is CODEC
