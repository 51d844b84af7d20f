"""NF4 dequantization in one Triton kernel.

Each program decodes BLOCK consecutive elements of the flattened weight:

    byte   = packed[i // 2]                       two 4-bit codes per byte
    nibble = byte >> 4 if i is even else byte & 15 first element in the high nibble
    scale  = absmax[i // blocksize]               plain fp32 absmax, or with double
           = code2[q[i // blocksize]] * absmax2[i // (256 * blocksize)] + offset
    out[i] = nf4_code[nibble] * scale             fp32 math, one rounding at the store

With double quantization the 8-bit absmax codes are decoded inside the same
launch, so there is no intermediate fp32 absmax buffer and no second kernel.
Every block re-reads its scale from L1/L2, which is far cheaper than the global
round trip a separate absmax pass would cost.

The arithmetic matches bitsandbytes' CPU path (and minilora.nf4's torch
reference) bit for bit in fp32: multiply, round, then add the offset. The launch
therefore disables FMA contraction (enable_fp_fusion=False), which would fuse
`code2 * absmax2 + offset` into one rounding and change the last bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NESTED_BLOCKSIZE = 256
DEFAULT_BLOCK = 1024  # elements per program: 4 warps x 32 lanes x 8 values each


@triton.jit
def _nf4_dequant_kernel(
    packed_ptr,  # uint8 [(n + 1) // 2]
    absmax_ptr,  # fp32 [n_blocks], or uint8 codes when DOUBLE_QUANT
    code_ptr,  # fp32 [16] NF4 code values
    nested_absmax_ptr,  # fp32 [ceil(n_blocks / 256)] (DOUBLE_QUANT only)
    nested_code_ptr,  # fp32 [256] dynamic map (DOUBLE_QUANT only)
    offset_ptr,  # fp32 [1] mean absmax (DOUBLE_QUANT only)
    out_ptr,  # fp32 / fp16 / bf16 [n]
    n_elements,
    BLOCKSIZE: tl.constexpr,
    NESTED: tl.constexpr,
    DOUBLE_QUANT: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    byte = tl.load(packed_ptr + offs // 2, mask=mask, other=0).to(tl.int32)
    shift = ((offs & 1) ^ 1).to(tl.int32) * 4  # even element -> high nibble
    nibble = (byte >> shift) & 15
    value = tl.load(code_ptr + nibble)  # masked lanes read code[0]: harmless, never stored
    block = offs // BLOCKSIZE
    if DOUBLE_QUANT:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        outer = tl.load(nested_absmax_ptr + block // NESTED, mask=mask, other=0.0)
        scale = tl.load(nested_code_ptr + q) * outer
        scale = scale + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    tl.store(out_ptr + offs, (value * scale).to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_nf4_triton(weight, dtype: torch.dtype | None = None, out: torch.Tensor | None = None,
                          *, block: int = DEFAULT_BLOCK) -> torch.Tensor:  # fmt: skip
    """Dequantize an `NF4Weight` with the Triton kernel (CUDA, or CPU under TRITON_INTERPRET=1).

    `out`, if given, must be a contiguous tensor of `dtype` with the weight's element
    count on the weight's device; reusing one avoids an allocation per call.
    """
    dtype = dtype or weight.dtype
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"NF4 dequantizes to float32, float16 or bfloat16, not {dtype}")
    if block < 16 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 16, got {block}")
    n, device = weight.numel(), weight.packed.device
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=device)
    elif out.dtype != dtype or out.numel() != n or out.device != device or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous {dtype} tensor with {n} elements on {device}; "
            f"got {out.dtype}, {out.numel()} elements, {out.device}, contiguous={out.is_contiguous()}"
        )
    if weight.double_quant:
        nested = (weight.nested_absmax, weight.nested_code, weight.offset.reshape(1))
    else:
        nested = (weight.absmax, weight.code, weight.code)  # never read: DOUBLE_QUANT is compiled out
    grid = (triton.cdiv(n, block),)
    _nf4_dequant_kernel[grid](
        weight.packed, weight.absmax, weight.code, *nested, out, n,
        BLOCKSIZE=weight.blocksize, NESTED=NESTED_BLOCKSIZE, DOUBLE_QUANT=weight.double_quant, BLOCK=block,
        enable_fp_fusion=False,
    )  # fmt: skip
    return out
