"""The fast CPU NF4 codec (minilora.fast.nf4_codec) against the reference (minilora.qlora.nf4).

Quantizing must give the same bytes (packed nibbles, absmax or its 8-bit codes, nested
absmax, offset) and dequantizing the same values, bit for bit, in every dtype. Both are
held to bitsandbytes' bytes in tests/test_nf4_bnb.py, which runs under each codec.
"""

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from minilora.fast import nf4_codec
from minilora.qlora import nf4
from minilora.qlora.nf4 import dequantize_nf4, nf4_code, nf4_midpoints, quantize_nf4
from minilora.qlora.nf4_linear import NF4Linear

ROOT = Path(__file__).resolve().parents[1]
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Rows shorter than a block, odd element counts, a partial last block, one value, 3-D,
# and (700 x 1001) several cache-sized chunks with a shorter last one and a partial block.
SHAPES = [(64, 96), (33, 65), (3, 31), (7,), (1, 1), (2,), (5, 7), (3, 5, 64), (20000,), (700, 1001)]
BLOCKSIZES = (32, 64, 256, 4096)


@contextmanager
def codec(which):
    previous = nf4.use_codec(which)
    try:
        yield
    finally:
        nf4.use_codec(previous)


def same_bits(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    same_type = a.dtype == b.dtype and a.shape == b.shape
    return same_type and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def both(w, blocksize, double_quant):
    with codec(nf4.REFERENCE):
        ref = quantize_nf4(w, blocksize, double_quant)
    with codec(nf4_codec.CODEC):
        fast = quantize_nf4(w, blocksize, double_quant)
    return ref, fast


def assert_same_quantization(ref, fast):
    assert (fast.shape, fast.dtype, fast.blocksize) == (ref.shape, ref.dtype, ref.blocksize)
    assert same_bits(fast.packed, ref.packed), "packed nibbles differ"
    assert same_bits(fast.absmax, ref.absmax), "absmax (or its 8-bit codes) differ"
    assert same_bits(fast.nested_absmax, ref.nested_absmax), "nested absmax differs"
    assert same_bits(fast.offset, ref.offset), "offset differs"
    assert same_bits(fast.nested_code, ref.nested_code)


def assert_same_dequantization(q):
    for dtype in DTYPES:
        want = nf4.dequantize_nf4_torch(q, dtype)
        assert same_bits(nf4_codec.dequantize(q, dtype), want), f"fresh {dtype} output differs"
        out = torch.full(q.shape, float("nan"), dtype=dtype)
        assert nf4_codec.dequantize(q, dtype, out=out) is out and same_bits(out, want), f"{dtype} into out= differs"


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("blocksize", BLOCKSIZES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fast_codec_gives_the_reference_bytes_and_values(shape, dtype, blocksize, double_quant):
    g = torch.Generator().manual_seed(hash((shape, blocksize)) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    ref, fast = both(w, blocksize, double_quant)
    assert_same_quantization(ref, fast)
    if blocksize in (64, 4096) or w.numel() < 10_000:  # the decode does not depend on how bytes were made
        assert_same_dequantization(ref)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_thread_and_several(threads):
    # One thread gathers from the 1-D pair table; more split the blocks between threads.
    w = torch.randn(700, 1001, generator=torch.Generator().manual_seed(3)).bfloat16()
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref, fast = both(w, 64, True)
        assert_same_quantization(ref, fast)
        assert_same_dequantization(ref)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("double_quant", [True, False])
def test_edge_values(double_quant):
    code, mids = nf4_code(), nf4_midpoints()
    up = torch.nextafter(mids, torch.tensor(2.0))
    down = torch.nextafter(mids, torch.tensor(-2.0))
    row = torch.cat([torch.tensor([1.0, -1.0]), code, mids, up, down, -mids])  # absmax 1: s is the value itself
    w = torch.zeros(8, 128)
    w[0, : row.numel()] = row
    w[1, 3] = -7.5  # a block whose absmax is a negative value
    w[3, :64] = 1e-30  # tiny scale; w[2] and w[3, 64:] all zero
    w[4] = torch.randn(128) * 1e4
    w[5, 64:] = code.repeat(4) * 0.37  # exactly on scaled codes
    ref, fast = both(w, 64, double_quant)
    assert_same_quantization(ref, fast)
    assert_same_dequantization(ref)
    # a zero partial last block, and every absmax zero
    for t in (torch.cat([torch.randn(128), torch.zeros(3)]), torch.zeros(5, 64), torch.zeros(3)):
        ref, fast = both(t, 64, double_quant)
        assert_same_quantization(ref, fast)
        assert_same_dequantization(ref)


def test_misaligned_and_unaligned_outputs():
    q = quantize_nf4(torch.randn(256, 512) * 0.02)
    want = nf4.dequantize_nf4_torch(q, torch.float32)
    storage = torch.full((256 * 512 + 1,), float("nan"))
    for out in (storage[:-1], storage[1:]):  # 8-byte aligned for the int64 view, and not
        assert nf4_codec.dequantize(q, torch.float32, out=out) is out and torch.equal(out.view(256, 512), want)
    with pytest.raises(ValueError, match="contiguous torch.float16 tensor"):
        nf4_codec.dequantize(q, torch.float16, out=torch.empty(256, 512, dtype=torch.bfloat16))


def test_both_codecs_refuse_non_finite_weights():
    w = torch.tensor([1.0, float("nan")])
    for which in (nf4.REFERENCE, nf4_codec.CODEC):
        with codec(which), pytest.raises(ValueError, match="finite"):
            quantize_nf4(w)


def test_install_switches_the_process_and_counts_nf4_layers():
    model = nn.Sequential(NF4Linear(64, 32), nn.ReLU(), NF4Linear(32, 64), nn.Linear(64, 2))
    q = quantize_nf4(torch.randn(64, 64))
    x = torch.randn(4, 64)
    with codec(nf4.REFERENCE):  # whatever an earlier test in this process enabled
        y_plain = model(x)
        try:
            assert nf4_codec.install(model) == 2 and nf4_codec.installed()
            assert nf4.current_codec() is nf4_codec.CODEC
            assert nf4_codec.install(nn.Linear(3, 3)) == 0  # no NF4 layers: fine, still installed
            assert nf4_codec.install() == 0  # before loading, when there is no model yet
            assert torch.equal(dequantize_nf4(q), nf4.dequantize_nf4_torch(q))
            assert torch.equal(model(x), y_plain)
        finally:
            nf4_codec.uninstall()
        assert nf4.current_codec() is nf4.REFERENCE and not nf4_codec.installed()
        nf4_codec.uninstall()  # a second uninstall changes nothing
        assert nf4.current_codec() is nf4.REFERENCE


def test_uninstall_leaves_another_codec_alone():
    other = nf4.ReferenceCodec()
    with codec(other):
        nf4_codec.uninstall()
        assert nf4.current_codec() is other


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("double_quant", [True, False])
def test_both_codecs_agree_on_cuda(double_quant):
    w = torch.randn(1000, 333, generator=torch.Generator().manual_seed(5)).bfloat16().cuda()
    ref, fast = both(w, 64, double_quant)
    assert fast.device.type == "cuda"
    assert_same_quantization(ref, fast)
    for dtype in DTYPES:  # the codecs' decoders, not the Triton kernel dequantize_nf4 picks on CUDA
        assert same_bits(nf4_codec.dequantize(ref, dtype), nf4.dequantize_nf4_torch(ref, dtype))
    # the CPU's bytes too (the nested offset is a mean: its rounding may differ between devices)
    cpu = quantize_nf4(w.cpu(), 64, double_quant)
    assert same_bits(fast.packed.cpu(), cpu.packed)
    assert double_quant or same_bits(fast.absmax.cpu(), cpu.absmax)
