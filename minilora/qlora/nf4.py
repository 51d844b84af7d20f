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
   is divided by its largest magnitude, absmax, so it lands in [-1, 1]:
   s = w / absmax. Small blocks keep one outlier from crushing the resolution of
   a whole row.

   Quantizing replaces every s by the index of the nearest code,
   argmin_j |s - code_j|, and two 4-bit indices share a byte (the first element in
   the high nibble). Dequantizing is one product: w' = code[index] * absmax.

3. Double quantization. One fp32 absmax per 64 values costs 32/64 = 0.5 bits per
   parameter (4.5 bits in all). QLoRA quantizes the absmax values themselves:
   subtract their mean (the `offset`), then store them as 8-bit codes of the
   signed "dynamic" map (Dettmers, 2015) in blocks of 256, each block with one
   fp32 scale. That costs 8/64 + 32/(64 * 256) = 0.127 bits: 4.127 bits in all.
   A block's scale is rebuilt as dynamic_map[q] * nested_absmax[i // 256] + offset.

Bit-exactness notes (bitsandbytes' CPU path, which this file matches):
the nearest code is decided against the 15 midpoints between neighbouring codes
rounded to float32, and a value equal to a midpoint takes the lower code (see
`nearest_nf4`); the 4-bit step scales full blocks by multiplying with 1 / absmax
but divides the partial last block by its absmax (whose stored value is clamped to
>= 1e-38); the 8-bit step of double quantization does not search the 256 codes but
rounds the scaled value onto a 65536-point grid over [-1, 1] and looks the code up
in a table built from that grid, which is what makes its results differ from a true
nearest-code search near code midpoints.

This file is the reference: each step written once, over whole tensors.
`minilora.fast.nf4_codec` computes the same bytes faster on the CPU and plugs in
through `use_codec`; nothing here imports it. On CUDA, dequantization runs the
Triton kernel in minilora.kernels.nf4_dequant.
"""

from __future__ import annotations

import json
from functools import lru_cache

import torch
import torch.nn.functional as F

NF4_CODE_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
ALLOWED_BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256
_DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
def nf4_code(device=None) -> torch.Tensor:
    return torch.tensor(NF4_CODE_VALUES, dtype=torch.float32, device=device)


def nf4_midpoints(device=None) -> torch.Tensor:
    """The 15 decision boundaries between neighbouring codes, (code[j] + code[j+1]) / 2,
    rounded to float32 exactly as bitsandbytes computes them."""
    code = nf4_code(device)
    return (code[:-1] + code[1:]) / 2


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


def nearest_nf4(s: torch.Tensor) -> torch.Tensor:
    """The index of the nearest NF4 code to each scaled value s: argmin_j |s - code_j| (uint8).

    The codes are sorted, so code j is nearest exactly when s lies between midpoint j - 1
    and midpoint j: the index is the number of midpoints below s, found by binary search.
    bitsandbytes compares with the float32 midpoints and gives a value equal to one the
    lower code. That is argmin |s - code| with ties going low, except that float32
    rounding moved six midpoints up by half a unit in the last place: a value exactly on
    one of those is nearer the upper code but takes the lower (tests/test_nf4_bnb.py).
    """
    return torch.bucketize(s, nf4_midpoints(s.device), out_int32=True).to(torch.uint8)


def pack_nibbles(idx: torch.Tensor) -> torch.Tensor:
    """Two 4-bit indices per byte (an even count of them), element 2i in the high nibble."""
    return (idx[0::2] << 4) | idx[1::2]


def _quantize_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Blockwise absmax, then the nearest code of every scaled value: (packed bytes, fp32 absmax)."""
    n_full = flat.numel() // blocksize
    blocks, tail = flat[: n_full * blocksize].view(n_full, blocksize), flat[n_full * blocksize :]
    absmax = torch.linalg.vector_norm(blocks, float("inf"), dim=1, dtype=torch.float32)  # max |w| per block
    # Full blocks are multiplied by 1 / absmax, in fp32 (an all-zero block stays 0 through the clamp).
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).view(-1)
    if tail.numel():
        # The partial block's absmax is stored clamped, as bitsandbytes does, and the block divided by it.
        tail_absmax = torch.linalg.vector_norm(tail, float("inf"), dtype=torch.float32).clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax[None]])
        scaled = torch.cat([scaled, tail.float() / tail_absmax])
    if not torch.isfinite(absmax).all():
        raise ValueError("NF4 quantization needs finite weights: found NaN or inf; clean the tensor first")
    if scaled.numel() % 2:
        scaled = F.pad(scaled, (0, 1))  # an odd count pads the value 0.0 (code 7)
    idx = nearest_nf4(scaled)
    del scaled  # free the fp32 copy before packing: loading quantizes tensor after tensor, and its peak RSS counts
    return pack_nibbles(idx), absmax


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
    packed, absmax = _codec.quantize_4bit(w.contiguous().view(-1), blocksize)
    if not double_quant:
        return NF4Weight(packed, absmax, w.shape, w.dtype, blocksize)
    offset = absmax.mean()
    q, nested_absmax = _quantize_8bit_dynamic(absmax - offset)
    return NF4Weight(packed, q, w.shape, w.dtype, blocksize, nested_absmax=nested_absmax,
                     nested_code=dynamic_map_signed(w.device), offset=offset)  # fmt: skip


def dequantize_nf4_torch(w: NF4Weight, dtype=None, out=None) -> torch.Tensor:
    """Reference dequantization: code[index] * absmax in fp32, rounded once to `dtype`."""
    dtype = dtype or w.dtype
    out = check_out(out, w, dtype)
    n = w.numel()
    idx = torch.stack([w.packed >> 4, w.packed & 15], dim=1).view(-1)[:n]  # high nibble first
    absmax = w.scales().repeat_interleave(w.blocksize)[:n]
    out.view(-1).copy_(w.code.to(w.device)[idx.long()] * absmax)
    return out


def check_out(out, w: NF4Weight, dtype) -> torch.Tensor:
    """`out` if it can hold `w` dequantized to `dtype` (else ValueError); a new tensor if None."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 dequantizes to float32, float16 or bfloat16, not {dtype}")
    if out is None:
        return torch.empty(w.shape, dtype=dtype, device=w.device)
    if out.dtype != dtype or out.numel() != w.numel() or out.device != w.device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor with {w.numel()} elements on {w.device}; "
            f"got {out.dtype}, {out.numel()} elements, {out.device}, contiguous={out.is_contiguous()}"
        )
    return out


def dequantize_nf4(w: NF4Weight, dtype=None, out=None) -> torch.Tensor:
    """Dequantize to `dtype` (default: the weight's original dtype): the Triton kernel
    on CUDA tensors, the installed codec (the reference unless one is installed)
    elsewhere. Pass `out` to reuse a buffer."""
    if w.packed.is_cuda:
        try:
            from minilora.kernels.nf4_dequant import dequantize_nf4_triton
        except ImportError:  # no Triton on this platform: the codec runs on CUDA too
            return _codec.dequantize(w, dtype, out)
        return dequantize_nf4_triton(w, dtype, out)
    return _codec.dequantize(w, dtype, out)


class ReferenceCodec:
    """The codec this file defines. A codec is any object with these two methods;
    minilora.fast.nf4_codec provides a faster one that gives the same bytes."""

    name = "reference"

    @staticmethod
    def quantize_4bit(flat: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
        """1-D float tensor -> (packed uint8 nibbles, fp32 absmax per block)."""
        return _quantize_4bit(flat, blocksize)

    @staticmethod
    def dequantize(w: NF4Weight, dtype=None, out=None) -> torch.Tensor:
        return dequantize_nf4_torch(w, dtype, out)


REFERENCE = ReferenceCodec()
_codec = REFERENCE


def use_codec(codec=None):
    """Make `codec` compute every NF4 quantization and CPU dequantization in this process
    (None: back to the reference). Returns the codec it replaced."""
    global _codec
    previous, _codec = _codec, REFERENCE if codec is None else codec
    return previous


def current_codec():
    return _codec
