"""4-bit NormalFloat (NF4) quantization, byte-for-byte compatible with bitsandbytes.

QLoRA (Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs",
section 3) stores a frozen base weight in 4 bits per value and trains LoRA adapters
on top of it. Three ideas make 4 bits enough:

1. NormalFloat codes. Pretrained weights are roughly normal with mean 0, so the
   16 code values are quantiles of N(0, 1): each code then stands for an equal
   share of the weights, which the paper calls information-theoretically optimal
   for normal data. To get an exact zero (padding and zero weights round-trip
   exactly) the quantiles come from two sets, 2^(k-1) = 8 points for the negative
   half and 2^(k-1) + 1 = 9 for the positive half, both containing 0; their union
   with one zero removed has 16 values. The outermost quantiles are taken at
   probability 0.9677 = 1 - (1/32 + 1/30) / 2 rather than at 1 (which is infinite),
   and everything is scaled into [-1, 1]. The float32 values bitsandbytes ships:

       -1.0, -0.696, -0.525, -0.395, -0.284, -0.185, -0.091, 0.0,
        0.080,  0.161,  0.246,  0.338,  0.441,  0.563,  0.723, 1.0

2. Blockwise absmax scaling. The flattened weight is cut into blocks of
   `blocksize` values (64 by default; the last block may be partial). Each block
   is divided by its largest magnitude, so it lands in [-1, 1], and every value is
   replaced by the index of the nearest code (ties go to the lower code). Small
   blocks keep one outlier from crushing the resolution of a whole row. Two
   4-bit indices share a byte: the first element in the high nibble.

3. Double quantization. One fp32 absmax per 64 values costs 32/64 = 0.5 bits per
   parameter (4.5 bits in all). QLoRA quantizes the absmax values themselves:
   subtract their mean (the `offset`), then store them as 8-bit codes of the
   signed "dynamic" map (Dettmers, 2015) in blocks of 256, each block with one
   fp32 scale. That costs 8/64 + 32/(64 * 256) = 0.127 bits: 4.127 bits in all.
   A block's scale is rebuilt as dynamic_map[q] * nested_absmax[i // 256] + offset.

Bit-exactness notes (bitsandbytes' CPU path, which this file matches):
the 4-bit step scales full blocks by multiplying with 1 / absmax but divides the
partial last block by its absmax (whose stored value is clamped to >= 1e-38); the
8-bit step of double quantization does not search the 256 codes but rounds the
scaled value onto a 65536-point grid over [-1, 1] and looks the code up in a
table built from that grid, which is what makes its results differ from a true
nearest-code search near code midpoints.
"""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import torch

from ..fast.hugepages import empty_huge

NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Chunks of this many values stay in a CPU's L2 cache between the passes below.
_CPU_CHUNK = 1 << 18
_CUDA_CHUNK = 1 << 24


def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


@lru_cache(maxsize=None)
def _nf4_bounds() -> tuple[float, ...]:
    # Midpoints rounded to fp32 exactly as bitsandbytes computes them: a value
    # equal to a midpoint counts as below it, so ties pick the lower code.
    code = nf4_code()
    return tuple(((code[:-1] + code[1:]) / 2).tolist())


def dynamic_map_signed(device=None) -> torch.Tensor:
    """The 256-entry signed dynamic map (bitsandbytes' create_dynamic_map(signed=True)).

    Each decade 10^-6 .. 10^0 gets 2^i linearly spaced means of [0.1, 1] (i = 0..6),
    mirrored for negatives, plus 0 and 1: dense near zero, coarse near one.
    """
    parts = []
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (edges[:-1] + edges[1:]) / 2.0
        decade = means * (10 ** (i - 6))  # fp32 product, as bitsandbytes rounds it
        parts += [decade, -decade]
    parts.append(torch.tensor([0.0, 1.0]))
    return torch.cat(parts).sort().values.to(device)


@lru_cache(maxsize=8)
def _grid_lut(device: torch.device) -> torch.Tensor:
    """Code index for each of 65536 grid points over [-1, 1] (8-bit quantizer table)."""
    code = dynamic_map_signed()
    mids = (code[:-1] + code[1:]) * 0.5
    grid = -1.0 + (2.0 * torch.arange(65536, dtype=torch.float32)) / 65535.0
    # Number of midpoints strictly below each grid point = nearest code, ties low.
    return torch.searchsorted(mids, grid, side="left").to(torch.uint8).to(device)


def _check_blocksize(blocksize: int) -> None:
    if blocksize not in ALLOWED_BLOCKSIZES:
        raise ValueError(f"NF4 blocksize must be one of {ALLOWED_BLOCKSIZES}, got {blocksize!r}")


@lru_cache(maxsize=None)
def _nf4_bounds_above() -> tuple[float, ...]:
    # s > b  <=>  s >= next float after b, so with these the sign of (s - b') alone decides.
    return tuple(float(np.nextafter(np.float32(b), np.float32(2))) for b in _nf4_bounds())


def _nf4_indices(s: torch.Tensor, acc: torch.Tensor, diff: torch.Tensor) -> None:
    """acc[i] = number of NF4 midpoints strictly below s[i], i.e. the nearest code (int32).

    A binary search (torch.bucketize) costs ~25 ns per value. Counting instead,
    acc = 15 + sum_j signbit(s - b'_j) as 0/-1 from an arithmetic shift, is three
    branch-free vector passes per midpoint over a cache-resident chunk: ~5 ns.
    Float compares to bool are slower than the sub + shift pair on CPU. The sign
    of s - b' is exact in IEEE arithmetic, so this equals the compare.
    """
    bits = diff.view(torch.int32)
    acc.fill_(15)
    for b in _nf4_bounds_above():
        torch.sub(s, b, out=diff)
        acc.add_(bits.bitwise_right_shift_(31))


def _pack(idx: torch.Tensor, out: torch.Tensor) -> None:
    torch.bitwise_or(idx[0::2] << 4, idx[1::2], out=out)


def _quantize_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    n, dev = flat.numel(), flat.device
    n_full, rem = divmod(n, blocksize)
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8, device=dev)
    absmax = torch.empty(n_full + (rem > 0), dtype=torch.float32, device=dev)
    rows = max(1, (_CUDA_CHUNK if flat.is_cuda else _CPU_CHUNK) // blocksize)
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
        s = torch.nn.functional.pad(tail / am, (0, rem % 2))  # divides here; odd n pads a 0.0 nibble
        acc = torch.empty(s.numel(), dtype=torch.int32, device=dev)
        _nf4_indices(s, acc, torch.empty_like(s))
        _pack(acc.to(torch.uint8), packed[n_full * blocksize // 2 :])
    if not torch.isfinite(absmax).all():
        raise ValueError("NF4 quantization needs finite weights: found NaN or inf; clean the tensor first")
    return packed, absmax


def _quantize_8bit_dynamic(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise (256) 8-bit quantization against the dynamic map, bitsandbytes-CPU exact."""
    n = x.numel()
    nb = -(-n // NESTED_BLOCKSIZE)
    x2 = torch.nn.functional.pad(x, (0, nb * NESTED_BLOCKSIZE - n)).view(nb, NESTED_BLOCKSIZE)
    am = x2.abs().amax(dim=1)
    inv = torch.where(am > 0, 1.0 / am, torch.zeros_like(am))
    v = (x2 * inv[:, None]).clamp_(-1, 1)
    # The same fp32 rounding steps as the C++ table lookup: ((v + 1) * 0.5) * 65535 + 0.5, truncated.
    grid_idx = (((v + 1.0) * 0.5) * 65535.0 + 0.5).to(torch.int64)
    q = _grid_lut(x.device)[grid_idx]
    q = torch.where(am[:, None] > 0, q, torch.zeros_like(q))  # all-zero block -> code 0
    return q.view(-1)[:n].contiguous(), am


class MissingStateKeyError(KeyError):
    def __init__(self, key: str):
        super().__init__(f"bitsandbytes NF4 state dict is missing {key!r}; was it saved from a 4-bit layer?")
        self.key = key


class NF4Weight:
    """A weight quantized to NF4: packed nibbles plus everything needed to undo it.

    `absmax` is fp32 per block, or (double quantization) uint8 codes into
    `nested_code` with `nested_absmax` per 256 blocks and a scalar `offset`.
    `dtype` is the logical dtype: what `dequantize()` returns by default.
    """

    def __init__(self, packed, absmax, shape, dtype, blocksize, code=None,
                 nested_absmax=None, nested_code=None, offset=None):  # fmt: skip
        self.packed = packed.reshape(-1)
        self.absmax = absmax
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self.blocksize = blocksize
        self.code = nf4_code(packed.device) if code is None else code
        self.nested_absmax = nested_absmax
        self.nested_code = nested_code
        self.offset = offset

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        tensors = (self.packed, self.absmax, self.nested_absmax, self.offset)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    @property
    def bits_per_param(self) -> float:
        return 8 * self.nbytes / max(1, self.numel())

    def scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (undoing double quantization if used)."""
        if not self.double_quant:
            return self.absmax
        nb = self.absmax.numel()
        outer = self.nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[:nb]
        # Multiply, round, then add the offset: two roundings, as bitsandbytes does.
        return self.nested_code[self.absmax.long()] * outer + self.offset

    def dequantize(self, dtype=None, out=None) -> torch.Tensor:
        return dequantize_nf4(self, dtype, out)

    def to(self, device) -> NF4Weight:
        def move(t):
            return None if t is None else t.to(device)

        return NF4Weight(move(self.packed), move(self.absmax), self.shape, self.dtype, self.blocksize, move(self.code),
                         move(self.nested_absmax), move(self.nested_code), move(self.offset))  # fmt: skip

    @classmethod
    def empty(cls, shape, dtype=torch.float32, blocksize=64, double_quant=True, device=None) -> NF4Weight:
        """A zero-filled placeholder of the right shape (for modules about to load a state dict)."""
        _check_blocksize(blocksize)
        n = torch.Size(shape).numel()
        nb = -(-n // blocksize)
        packed = torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device)
        if not double_quant:
            return cls(packed, torch.zeros(nb, device=device), shape, dtype, blocksize)
        return cls(packed, torch.zeros(nb, dtype=torch.uint8, device=device), shape, dtype, blocksize,
                   nested_absmax=torch.zeros(-(-nb // NESTED_BLOCKSIZE), device=device),
                   nested_code=dynamic_map_signed(device), offset=torch.zeros((), device=device))  # fmt: skip

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        """Tensors in bitsandbytes' Linear4bit layout (QuantState.as_dict(packed=True))."""
        sd = {prefix: self.packed.view(-1, 1), f"{prefix}.absmax": self.absmax, f"{prefix}.quant_map": self.code}
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": str(self.dtype).removeprefix("torch."),
                "shape": list(self.shape)}  # fmt: skip
        if self.double_quant:
            sd[f"{prefix}.nested_absmax"] = self.nested_absmax
            sd[f"{prefix}.nested_quant_map"] = self.nested_code
            meta.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=self.offset.item())
        blob = json.dumps(meta).encode("utf-8")
        sd[f"{prefix}.quant_state.bitsandbytes__nf4"] = torch.tensor(list(blob), dtype=torch.uint8)
        return sd

    @classmethod
    def from_bnb_state_dict(cls, sd: dict, prefix: str = "weight") -> NF4Weight:
        """Rebuild from bitsandbytes' serialized Linear4bit weight (the inverse of to_bnb_state_dict)."""

        def need(key):
            if key not in sd:
                raise MissingStateKeyError(key)
            return sd[key]

        if f"{prefix}.quant_state.bitsandbytes__fp4" in sd:
            raise ValueError(f"{prefix!r} is FP4-quantized; minilora reads NF4 only (quant_type='nf4')")
        meta = json.loads(bytes(need(f"{prefix}.quant_state.bitsandbytes__nf4").cpu().tolist()).decode("utf-8"))
        if meta.get("quant_type") != "nf4":
            raise ValueError(f"{prefix!r} has quant_type {meta.get('quant_type')!r}; minilora reads 'nf4' only")
        if meta["dtype"] not in _DTYPE_NAMES:
            raise ValueError(f"{prefix!r} has dtype {meta['dtype']!r}; expected one of {sorted(_DTYPE_NAMES)}")
        _check_blocksize(meta["blocksize"])
        packed = need(prefix).contiguous()
        packed = packed.view(torch.uint8).reshape(-1)  # quant_storage may be another dtype holding the same bytes
        absmax, device = need(f"{prefix}.absmax"), packed.device
        nested = {}
        if "nested_offset" in meta:
            if meta.get("nested_blocksize") != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {meta.get('nested_blocksize')!r}")
            nested = dict(nested_absmax=need(f"{prefix}.nested_absmax").float().to(device),
                          nested_code=need(f"{prefix}.nested_quant_map").float().to(device),
                          offset=torch.tensor(float(meta["nested_offset"]), device=device))  # fmt: skip
        else:
            absmax = absmax.float()
        w = cls(packed, absmax.to(device), meta["shape"], _DTYPE_NAMES[meta["dtype"]], meta["blocksize"],
                need(f"{prefix}.quant_map").float().to(device), **nested)  # fmt: skip
        if w.packed.numel() != (w.numel() + 1) // 2:
            need_bytes = (w.numel() + 1) // 2
            raise ValueError(f"{prefix!r} holds {w.packed.numel()} bytes but shape {list(w.shape)} needs {need_bytes}")
        return w

    def __repr__(self) -> str:
        dq = "double-quant" if self.double_quant else "fp32 absmax"
        return (
            f"NF4Weight(shape={list(self.shape)}, dtype={self.dtype}, blocksize={self.blocksize}, {dq}, "
            f"device={self.device})"
        )


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Quantize a float tensor to NF4 exactly as bitsandbytes.functional.quantize_4bit(
    w, blocksize, quant_type="nf4", compress_statistics=double_quant) does on the CPU."""
    _check_blocksize(blocksize)
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        got = w.dtype if isinstance(w, torch.Tensor) else type(w).__name__
        raise TypeError(f"quantize_nf4 needs a float32/float16/bfloat16 tensor, got {got}; cast it with .float()")
    if w.numel() == 0:
        raise ValueError("quantize_nf4 got an empty tensor; there is nothing to quantize")
    w = w.detach()
    packed, absmax = _quantize_4bit(w.contiguous().view(-1), blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    q, nested_absmax = _quantize_8bit_dynamic(absmax - offset)
    return NF4Weight(packed, q, w.shape, w.dtype, blocksize, nested_absmax=nested_absmax,
                     nested_code=dynamic_map_signed(w.device), offset=offset)  # fmt: skip


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    # Entry b holds the two fp32 values packed into byte b, bit-cast to one int64, so
    # decoding is a 1-D gather of 8-byte words: ~4x faster than gathering rows of two.
    b = torch.arange(256, device=code.device)
    return torch.stack([code[b >> 4], code[b & 15]], dim=1).contiguous().view(torch.int64).view(-1)


def dequantize_nf4_torch(w: NF4Weight, dtype=None, out=None) -> torch.Tensor:
    """Reference dequantization in plain torch: fp32 code * fp32 absmax, rounded once to dtype."""
    dtype = dtype or w.dtype
    n, bs, dev = w.numel(), w.blocksize, w.device
    out = _check_out(out, w, dtype)
    flat = out.view(-1)
    scales, table = w.scales(), _pair_table(w.code.to(dev))
    n_full, half = n // bs, bs // 2
    rows = max(1, (_CUDA_CHUNK if w.packed.is_cuda else _CPU_CHUNK) // bs)
    k = min(rows, n_full) * half
    # index_select over the 1-D table runs on one thread. With more, a gather from the
    # table broadcast to one row per block (a stride-0 view) splits the blocks between
    # threads: 1.2-1.6x faster at 2 threads, a little slower at 1 (benchmarks/RESULTS.md).
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
            dst.copy_(vals)  # measured ~7% faster than a mixed-dtype torch.mul(..., out=dst)
    if n_full * bs < n:
        vals = table.index_select(0, w.packed[n_full * half :].int()).view(torch.float32)[: n - n_full * bs]
        torch.mul(vals, scales[n_full], out=flat[n_full * bs :])
    return out


def _check_out(out, w: NF4Weight, dtype) -> torch.Tensor:
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 dequantizes to float32, float16 or bfloat16, not {dtype}")
    if out is None:
        # Page faults on a fresh 4 KiB-paged tensor cost more than the decoding itself.
        return empty_huge(w.shape, dtype=dtype, device=w.device)
    if out.dtype != dtype or out.numel() != w.numel() or out.device != w.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor with {w.numel()} elements on {w.device}; "
            f"got {out.dtype}, {out.numel()} elements, {out.device}, contiguous={out.is_contiguous()}"
        )
    return out


def dequantize_nf4(w: NF4Weight, dtype=None, out=None) -> torch.Tensor:
    """Dequantize to `dtype` (default: the weight's original dtype): the Triton kernel
    on CUDA tensors, the torch reference elsewhere. Pass `out` to reuse a buffer."""
    if w.packed.is_cuda:
        try:
            from minilora.kernels.nf4_dequant import dequantize_nf4_triton
        except ImportError:  # no Triton on this platform: the torch path runs on CUDA too
            return dequantize_nf4_torch(w, dtype, out)
        return dequantize_nf4_triton(w, dtype, out)
    return dequantize_nf4_torch(w, dtype, out)
