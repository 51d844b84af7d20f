"""The Triton NF4 dequantization kernel against the torch reference.

On CPU it runs in the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py).
The interpreter stores fp32 -> bf16 by truncating instead of rounding, so bf16
(and fp16) outputs are checked to within one unit in the last place there; on a
GPU they must match exactly. Every output buffer is poisoned with NaN first so an
element the kernel never writes cannot pass.
"""

import pytest
import torch
import triton

from minilora.kernels.nf4_dequant import _nf4_dequant_kernel, dequantize_nf4_triton
from minilora.qlora.nf4 import dequantize_nf4, dequantize_nf4_torch, quantize_nf4

# (shape, blocksize, double_quant): 20000 values / 64 = 313 blocks -> 2 nested blocks of 256.
CASES = [
    ((64, 96), 64, True),
    ((33, 64), 128, True),  # 2112 values: a partial last block of 64
    ((33, 63), 64, False),  # odd element count: half of the last byte is padding
    ((20000,), 64, True),
    ((5, 7), 32, True),
    ((40, 100), 256, False),
]
BLOCK = 2048  # elements per program: at most 10 interpreted programs per launch


def poisoned(shape, dtype, device="cpu"):
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


def assert_within_one_ulp(got, want):
    assert not torch.isnan(got).any(), "an output element was never written"
    diff = (got.view(torch.int16).int() - want.view(torch.int16).int()).abs()
    assert int(diff.max()) <= 1, f"{int((diff > 1).sum())} elements differ by more than one ulp"


def make(shape, blocksize, double_quant, seed=0):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.03
    w.view(-1)[::97] = 0  # sprinkle exact zeros
    return quantize_nf4(w, blocksize, double_quant)


@pytest.mark.parametrize("shape, blocksize, double_quant", CASES)
def test_fp32_output_is_exact(shape, blocksize, double_quant):
    w = make(shape, blocksize, double_quant)
    out = poisoned(shape, torch.float32)
    got = dequantize_nf4_triton(w, torch.float32, out=out, block=BLOCK)
    assert got is out
    assert torch.equal(got, dequantize_nf4_torch(w, torch.float32))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape, blocksize, double_quant", CASES)
def test_half_outputs_within_one_ulp(shape, blocksize, double_quant, dtype):
    w = make(shape, blocksize, double_quant, seed=1)
    got = dequantize_nf4_triton(w, dtype, out=poisoned(shape, dtype), block=BLOCK)
    assert_within_one_ulp(got, dequantize_nf4_torch(w, dtype))


def test_default_dtype_allocation_and_buffer_reuse():
    w = make((48, 64), 64, True)
    got = dequantize_nf4_triton(w, block=BLOCK)  # allocates, in the weight's own dtype
    assert got.dtype == torch.float32 and got.shape == (48, 64)
    assert torch.equal(got, dequantize_nf4_torch(w))
    buf = poisoned((48 * 64,), torch.float32)  # any contiguous buffer with the right element count
    for seed in (2, 3):
        w = make((48, 64), 64, True, seed)
        assert dequantize_nf4_triton(w, out=buf, block=BLOCK) is buf
        assert torch.equal(buf.view(48, 64), dequantize_nf4_torch(w))


def test_bad_arguments_are_refused():
    w = make((8, 64), 64, True)
    with pytest.raises(ValueError, match="contiguous torch.float32 tensor with 512 elements"):
        dequantize_nf4_triton(w, out=torch.empty(8, 63))
    with pytest.raises(ValueError, match="contiguous"):
        dequantize_nf4_triton(w, out=torch.empty(64, 8).t())
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        dequantize_nf4_triton(w, torch.int32)
    with pytest.raises(ValueError, match="power of two"):
        dequantize_nf4_triton(w, block=1000)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# conftest.py turns the interpreter on for every run; with TRITON_INTERPRET=0 the GPU
# tests below exercise the compiled kernel, which must then be exact in every dtype.
INTERPRETED = not isinstance(_nf4_dequant_kernel, triton.runtime.JITFunction)
GPU_CASES = CASES if INTERPRETED else CASES + [((4096, 4096), 64, True), ((1000, 4099), 4096, True)]


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape, blocksize, double_quant", GPU_CASES)
def test_gpu_kernel_is_exact(shape, blocksize, double_quant, dtype):
    w = make(shape, blocksize, double_quant)
    want = dequantize_nf4_torch(w, dtype)  # CPU reference
    wc = w.to("cuda")
    out = poisoned(shape, dtype, "cuda")
    got = dequantize_nf4(wc, dtype, out=out)  # dispatches to Triton on CUDA
    assert got is out
    for got in (got, dequantize_nf4_triton(wc, dtype, block=256)):  # two tilings
        if INTERPRETED and dtype != torch.float32:
            assert_within_one_ulp(got.cpu(), want)
        else:
            assert torch.equal(got.cpu(), want)
