"""minilora.qlora.nf4 against bitsandbytes (the oracle) on the CPU: bytes, scales, dequantized values.

bitsandbytes 0.50's CPU dequantize_4bit kernel (AVX-512 path, taken when the last
dimension is even and a multiple of 16) assumes every row starts a new block and
returns wrong values when a row's length is not a multiple of the blocksize.
Where that happens the tests compare against bitsandbytes' generic torch
implementation (`_dequantize_4bit_compute`), which is what the CPU kernel claims
to equal and what its odd-shape fallback runs. (The same kernel also hands a 1-D
weight back as shape (1, n), compared after a reshape; and dequantize_4bit
transposes or rejects a weight of at most two values, whose single packed byte it
mistakes for a legacy transposed layout: those use the generic path only.)

Every test runs twice: under the reference codec (minilora.qlora.nf4) and under the
fast CPU codec (minilora.fast.nf4_codec); both must give bitsandbytes' bytes.
"""

import json

import bitsandbytes.functional as bnbF
import numpy as np
import pytest
import torch
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
from bitsandbytes.nn import Linear4bit, Params4bit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minilora.fast import nf4_codec
from minilora.qlora import nf4
from minilora.qlora.nf4 import (
    ALLOWED_BLOCKSIZES,
    NF4Weight,
    _quantize_8bit_dynamic,
    dequantize_nf4,
    dynamic_map_signed,
    nearest_nf4,
    nf4_code,
    nf4_midpoints,
    quantize_nf4,
)

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The generic path without the torch.compile wrapper bitsandbytes puts around it.
_bnb_generic_dequant = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)


@pytest.fixture(autouse=True, params=["reference", "fast"])
def codec(request):
    """Run the test with quantize_nf4 / dequantize_nf4 on this codec."""
    previous = nf4.use_codec(nf4_codec.CODEC if request.param == "fast" else None)
    yield request.param
    nf4.use_codec(previous)


def bnb_quantize(w, blocksize, double_quant):
    return bnbF.quantize_4bit(w, blocksize=blocksize, quant_type="nf4", compress_statistics=double_quant)


def bnb_absmax(state):
    if state.nested:
        return bnbF.dequantize_blockwise(state.absmax, state.state2) + state.offset
    return state.absmax


def bnb_dequantize(packed, state, dtype):
    """bitsandbytes' answer: its public CPU kernel where that kernel is right, else its generic path."""
    ref = _bnb_generic_dequant(packed.view(-1), bnb_absmax(state), state.code, state.blocksize, state.shape, dtype)
    last = state.shape[-1]
    # A single packed byte looks like bitsandbytes' legacy transposed layout to dequantize_4bit.
    if dtype == state.dtype and (last % 2 == 1 or last % state.blocksize == 0) and packed.shape[0] > 1:
        public = bnbF.dequantize_4bit(packed, state)  # returns (1, n) for a 1-D weight of n values
        assert torch.equal(public.reshape(ref.shape), ref), "bitsandbytes' CPU kernel and its generic path disagree"
    return ref


def same_bits(a, b):
    same_type = a.dtype == b.dtype and a.shape == b.shape
    return same_type and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_matches_bnb(w, blocksize, double_quant):
    packed, state = bnb_quantize(w, blocksize, double_quant)
    ours = quantize_nf4(w, blocksize, double_quant)
    assert ours.shape == w.shape and ours.dtype == w.dtype and ours.double_quant == double_quant
    assert same_bits(ours.packed, packed.view(-1)), "packed nibbles differ"
    assert same_bits(ours.absmax, state.absmax), "absmax (or its 8-bit codes) differ"
    if double_quant:
        assert same_bits(ours.nested_absmax, state.state2.absmax), "nested absmax differs"
        assert same_bits(ours.offset, state.offset), "offset differs"
        assert same_bits(ours.nested_code, state.state2.code)
    for dtype in DTYPES:
        want = bnb_dequantize(packed, state, dtype)
        assert same_bits(dequantize_nf4(ours, dtype), want), f"dequantized {dtype} differs"
    return ours


def test_code_tables_match_bnb():
    assert same_bits(nf4_code(), bnbF.get_4bit_type("nf4", device="cpu"))
    assert same_bits(dynamic_map_signed(), bnbF.create_dynamic_map(signed=True))


SHAPES = [(64, 96), (33, 65), (7,), (1000,), (3, 5, 64), (128, 128), (1, 1), (20000,)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("blocksize", [64, 128])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_bit_identical_to_bnb(shape, blocksize, double_quant, dtype):
    g = torch.Generator().manual_seed(hash((shape, blocksize, double_quant)) % 2**31)
    w = (torch.randn(shape, generator=g) * 0.05).to(dtype)
    assert_matches_bnb(w, blocksize, double_quant)


@pytest.mark.parametrize("blocksize", ALLOWED_BLOCKSIZES)
def test_every_blocksize(blocksize):
    w = torch.randn(9, 700, generator=torch.Generator().manual_seed(blocksize))
    assert_matches_bnb(w, blocksize, double_quant=True)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    shape=st.lists(st.integers(1, 40), min_size=1, max_size=3).filter(lambda s: int(np.prod(s)) <= 6000),
    seed=st.integers(0, 2**31 - 1),
    dtype=st.sampled_from(DTYPES),
    blocksize=st.sampled_from(ALLOWED_BLOCKSIZES),
    double_quant=st.booleans(),
    log_scale=st.floats(-6, 3),
    pattern=st.sampled_from(["normal", "uniform", "sparse", "heavy-tailed"]),
)
def test_bit_identical_random(shape, seed, dtype, blocksize, double_quant, log_scale, pattern):
    g = torch.Generator().manual_seed(seed)
    if pattern == "normal":
        w = torch.randn(shape, generator=g)
    elif pattern == "uniform":
        w = torch.rand(shape, generator=g) * 2 - 1
    elif pattern == "sparse":  # many all-zero blocks
        w = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.02)
    else:
        w = torch.randn(shape, generator=g) ** 3
    assert_matches_bnb((w * 10**log_scale).to(dtype), blocksize, double_quant)


@pytest.mark.parametrize("double_quant", [True, False])
def test_all_zero_blocks(double_quant):
    w = torch.randn(10, 64)
    w[2:5] = 0  # full zero blocks
    assert_matches_bnb(w, 64, double_quant)
    tail = torch.randn(130)
    tail[128:] = 0  # a zero partial last block: its absmax is stored clamped to 1e-38
    ours = assert_matches_bnb(tail, 64, double_quant)
    assert not double_quant or ours.double_quant
    assert_matches_bnb(torch.zeros(5, 64), 64, double_quant)  # every absmax 0: nested block all zero
    assert_matches_bnb(torch.zeros(3), 64, double_quant)


def test_ties_halfway_between_codes_go_to_the_lower_code():
    code = nf4_code()
    mids = (code[:-1] + code[1:]) / 2  # fp32 midpoints, exactly representable
    w = torch.zeros(15, 64)
    w[:, 0] = 1.0  # absmax 1: the scaled value is the value itself
    w[:, 1] = mids
    w[:, 2] = -mids
    ours = assert_matches_bnb(w, 64, double_quant=False)
    first = ours.packed.view(15, 32)[:, 0]
    assert torch.equal((first & 15).long(), torch.arange(15)), "a midpoint must take the lower code"


def test_nearest_code_is_the_argmin_but_at_six_rounded_up_midpoints():
    # QLoRA's rule, argmin_j |s - code_j| (ties to the first, the lower code), against
    # bitsandbytes' float32 midpoints: they disagree only on a midpoint that rounding put
    # above the true one, where bitsandbytes takes the lower code and argmin the upper.
    code, mids = nf4_code(), nf4_midpoints()
    near = torch.cat([torch.nextafter(mids, torch.tensor(d)) for d in (-2.0, 2.0)])
    s = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)) * 2 - 1, code, mids, near])
    argmin = (s[:, None] - code).abs().argmin(dim=1)
    ours = nearest_nf4(s).long()
    differ = ours != argmin
    exact = (code[:-1].double() + code[1:].double()) / 2
    rounded_up = mids[mids.double() > exact]
    assert rounded_up.numel() == 6
    assert torch.equal(s[differ].sort().values, rounded_up) and torch.equal(ours[differ], argmin[differ] - 1)
    w = torch.zeros(64)
    w[0], w[1:7] = 1.0, rounded_up  # absmax 1: each takes the lower code, as bitsandbytes does
    assert_matches_bnb(w, 64, double_quant=False)


def test_plus_minus_absmax_and_exact_codes():
    code = nf4_code()
    w = torch.empty(4, 64)
    for i, a in enumerate([1.0, 0.37, 1e-3, 250.0]):
        w[i] = code.repeat(4) * a
        w[i, 5], w[i, 9] = a, -a
    ours = assert_matches_bnb(w, 64, double_quant=True)
    nibbles = torch.stack([ours.packed >> 4, ours.packed & 15], 1).view(4, 64)
    assert (nibbles[:, 5] == 15).all() and (nibbles[:, 9] == 0).all()  # +absmax -> code 15, -absmax -> code 0
    assert_matches_bnb(w.flip(1), 64, double_quant=False)


def test_nested_8bit_quantizer_matches_bnb_on_a_dense_grid():
    # Probe every part of [-1, 1], including values that round onto the 65536-point
    # grid's cell edges: blocks of 256 whose first value fixes absmax = 1.
    vals = torch.cat([torch.linspace(-1, 1, 120001), torch.linspace(-1e-3, 1e-3, 60001)])
    nb = -(-vals.numel() // 255)
    body = torch.nn.functional.pad(vals, (0, nb * 255 - vals.numel())).view(nb, 255)
    x = torch.cat([torch.ones(nb, 1), body], 1).view(-1)
    q, state = bnbF.quantize_blockwise(x, blocksize=256)
    ours_q, ours_absmax = _quantize_8bit_dynamic(x)
    assert torch.equal(ours_q, q) and torch.equal(ours_absmax, state.absmax)


@pytest.mark.parametrize("threads", [1, 2])
def test_one_thread_and_several_decode_the_same_bits(threads):
    # The fast codec: one thread gathers from the 1-D table; more split the blocks between threads.
    # 700 x 1000 values: two 262,144-value chunks, a shorter third and a partial block.
    w = torch.randn(700, 1001, generator=torch.Generator().manual_seed(3))
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_bnb(w, 64, True)
        ours = quantize_nf4(w)
        for dtype in DTYPES:
            out = torch.full(w.shape, float("nan"), dtype=dtype)
            assert same_bits(ours.dequantize(dtype, out=out), ours.dequantize(dtype))
    finally:
        torch.set_num_threads(saved)


def test_dequantize_into_a_reused_buffer_and_bit_budget():
    w = quantize_nf4(torch.randn(256, 512) * 0.02)
    want = w.dequantize(torch.float32)
    storage = torch.full((256 * 512 + 1,), float("nan"))
    for out in (storage[:-1], storage[1:]):  # 8-byte aligned and not: both must work
        assert w.dequantize(torch.float32, out=out) is out and torch.equal(out.view(256, 512), want)
    half = torch.full((256, 512), float("nan"), dtype=torch.bfloat16)
    assert torch.equal(w.dequantize(torch.bfloat16, out=half), want.bfloat16())
    with pytest.raises(ValueError, match="contiguous torch.float16 tensor"):
        w.dequantize(torch.float16, out=half)
    # QLoRA's budget: 4 + 32/64 bits per value, or 4 + 8/64 + 32/(64*256) with double quantization.
    assert abs(w.bits_per_param - 4.127) < 1e-3
    assert abs(quantize_nf4(torch.randn(256, 512), double_quant=False).bits_per_param - 4.5) < 1e-6


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"blocksize must be one of \(32, 64"):
        quantize_nf4(torch.randn(64), blocksize=48)
    with pytest.raises(TypeError, match="float32/float16/bfloat16"):
        quantize_nf4(torch.arange(64))
    with pytest.raises(ValueError, match="finite"):
        quantize_nf4(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="empty"):
        quantize_nf4(torch.zeros(0))
    sd = quantize_nf4(torch.randn(8, 64)).to_bnb_state_dict()
    del sd["weight.nested_absmax"]
    with pytest.raises(KeyError, match="weight.nested_absmax"):
        NF4Weight.from_bnb_state_dict(sd)


def bnb_linear4bit(w, bias, double_quant, blocksize=64):
    layer = Linear4bit(w.shape[1], w.shape[0], bias=bias is not None, compress_statistics=double_quant,
                       quant_type="nf4", compute_dtype=torch.float32)  # fmt: skip
    layer.weight = Params4bit(w.clone(), requires_grad=False, blocksize=blocksize, compress_statistics=double_quant,
                              quant_type="nf4", module=layer)  # fmt: skip
    if bias is not None:
        layer.bias = torch.nn.Parameter(bias.clone())
    return layer.to("cpu")  # quantization happens on the move


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_dict_equals_bnb_linear4bit(double_quant, dtype):
    w = (torch.randn(48, 128) * 0.02).to(dtype)
    theirs = bnb_linear4bit(w, None, double_quant).state_dict()
    ours = quantize_nf4(w, 64, double_quant).to_bnb_state_dict("weight")
    assert list(ours) == list(theirs)
    for key in theirs:
        if key.endswith("bitsandbytes__nf4"):
            assert json.loads(bytes(ours[key].tolist())) == json.loads(bytes(theirs[key].tolist()))
        assert same_bits(ours[key], theirs[key]), key


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape", [(48, 128), (33, 65)])
def test_round_trip_through_bnb_serialization(double_quant, shape):
    w = torch.randn(shape) * 0.02
    packed, state = bnb_quantize(w, 64, double_quant)
    sd = {"w": packed, **{f"w.{k}": v for k, v in state.as_dict(packed=True).items()}}
    ours = NF4Weight.from_bnb_state_dict(sd, prefix="w")
    for dtype in DTYPES:
        assert same_bits(ours.dequantize(dtype), bnb_dequantize(packed, state, dtype))
    # ...and the other way: bitsandbytes reads what we write.
    back = quantize_nf4(w, 64, double_quant).to_bnb_state_dict("w")
    qs = bnbF.QuantState.from_dict({k[2:]: v for k, v in back.items() if k != "w"}, device=torch.device("cpu"))
    assert same_bits(bnb_dequantize(back["w"], qs, torch.float32), ours.dequantize(torch.float32))
