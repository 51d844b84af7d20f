"""RMSNorm (minilora/models/rms_norm.py) and its fast piece (minilora/fast/rms_norm.py, a
hand-written backward) against autograd through the textbook formula in float64, and
their forward against the reference code."""

import pytest
import torch

from minilora.fast.rms_norm import FastRMSNorm, install
from minilora.models.rms_norm import RMSNorm

KINDS = {"plain": RMSNorm, "fast": FastRMSNorm}


def textbook(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def make(dim, eps, kind="plain"):
    return KINDS[kind](dim, eps)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("train_weight", [False, True])
def test_forward_and_gradients_match_float64_autograd(train_weight, kind):
    g = torch.Generator().manual_seed(0)
    norm = make(24, 1e-5, kind)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(24, generator=g))
    norm.weight.requires_grad_(train_weight)
    x = (torch.randn(3, 5, 24, generator=g) * 3).requires_grad_()
    y = norm(x)
    grad = torch.randn(y.shape, generator=g)
    y.backward(grad)

    x64 = x.detach().double().requires_grad_()
    w64 = norm.weight.detach().double().requires_grad_()
    want = textbook(x64, w64, 1e-5)
    want.backward(grad.double())
    torch.testing.assert_close(y.double(), want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    if train_weight:
        torch.testing.assert_close(norm.weight.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
    else:
        assert norm.weight.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_forward_is_bit_identical_to_the_reference_code_in_fp32_and_bf16(kind):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        norm = make(64, 1e-6, kind).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=g))
        x = torch.randn(2, 7, 64, generator=g).to(dtype)
        # transformers' LlamaRMSNorm.forward, written out.
        xf = x.float()
        want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        assert torch.equal(norm(x), want)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_input_gets_a_bf16_gradient_close_to_float64(kind):
    g = torch.Generator().manual_seed(2)
    norm = make(32, 1e-5, kind).to(torch.bfloat16)
    x = torch.randn(4, 32, generator=g).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(4, 32, generator=g).to(torch.bfloat16)
    norm(x).backward(grad)
    assert x.grad.dtype == torch.bfloat16
    x64 = x.detach().double().requires_grad_()
    textbook(x64, norm.weight.detach().double(), 1e-5).backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=2e-2, atol=2e-2)


def test_gradcheck_on_input_and_gain():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    norm = RMSNorm(6, 1e-5).double()

    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(norm, {"weight": w}, (x,)), (x, w))


def test_fast_function_gradients_match_float64_in_fp32():
    # The hand-written backward's math, checked tightly where rounding is small (the module
    # sends fp32 to the plain ops, but the function computes any float dtype).
    from minilora.fast.rms_norm import _RMSNormFunction

    g = torch.Generator().manual_seed(5)
    w = (torch.rand(48, generator=g) + 0.5).requires_grad_()
    x = (torch.randn(3, 7, 48, generator=g) * 3).requires_grad_()
    grad = torch.randn(3, 7, 48, generator=g)
    _RMSNormFunction.apply(x, w, 1e-5).backward(grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    textbook(x64, w64, 1e-5).backward(grad.double())
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fast_backward_is_as_accurate_as_autograd_through_the_plain_ops(dtype):
    # Both against float64 on a row as wide as SmolLM2's: the hand-written backward may
    # round differently, not worse (its error at most 1.5x the plain one's, or 1 ulp).
    g = torch.Generator().manual_seed(3)
    w = (torch.rand(576, generator=g) + 0.5).to(dtype)
    x = (torch.randn(4, 16, 576, generator=g) * 3).to(dtype)
    grad = torch.randn(4, 16, 576, generator=g).to(dtype)
    x64 = x.double().requires_grad_()
    w64 = w.double().requires_grad_()
    textbook(x64, w64, 1e-5).backward(grad.double())
    errors = {}
    for kind, cls in KINDS.items():
        norm = cls(576, 1e-5).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(w)
        xi = x.clone().requires_grad_()
        y = norm(xi)
        assert (y.grad_fn.name() == "_RMSNormFunctionBackward") == (kind == "fast")
        y.backward(grad)
        assert xi.grad.dtype == dtype and norm.weight.grad.dtype == dtype
        errors[kind] = ((xi.grad.double() - x64.grad).abs().max().item(),
                        (norm.weight.grad.double() - w64.grad).abs().max().item())
    ulp = torch.finfo(dtype).eps * x64.grad.abs().max().item()
    assert errors["fast"][0] <= max(1.5 * errors["plain"][0], ulp), errors
    wulp = torch.finfo(dtype).eps * w64.grad.abs().max().item()
    assert errors["fast"][1] <= max(1.5 * errors["plain"][1], wulp), errors


def test_fast_norm_leaves_fp32_mixed_dtypes_and_fp64_to_the_plain_ops():
    # fp32 takes the plain ops (where the hand-written backward does not win).
    x = torch.randn(2, 5, 8, requires_grad=True)
    assert FastRMSNorm(8, 1e-5)(x).grad_fn.name() != "_RMSNormFunctionBackward"
    # A trained fp32 gain on a bf16 activation promotes to fp32 in the plain module; the
    # fast one must give the same thing, not a bf16 result.
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 8, generator=g).to(torch.bfloat16)
    plain, fast = RMSNorm(8, 1e-5), FastRMSNorm(8, 1e-5)
    for norm in (plain, fast):
        with torch.no_grad():
            norm.weight.copy_(torch.arange(1.0, 9.0))
    assert torch.equal(fast(x), plain(x)) and fast(x).dtype == torch.float32
    x64 = torch.randn(2, 8, dtype=torch.float64, generator=g)
    assert torch.equal(fast.double()(x64), plain.double()(x64))


def test_install_swaps_every_rms_norm_and_keeps_the_state_dict():
    model = torch.nn.Sequential(RMSNorm(4, 1e-5), torch.nn.Linear(4, 4), RMSNorm(4, 1e-6))
    keys = list(model.state_dict())
    assert install(model) == 2 and install(model) == 0
    assert [type(m) for m in model] == [FastRMSNorm, torch.nn.Linear, FastRMSNorm]
    assert list(model.state_dict()) == keys and model[2].eps == 1e-6
