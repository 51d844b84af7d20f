"""RMSNorm, plain (minilora/models/rms_norm.py) and with the hand-written backward
(minilora/fast/rms_norm.py), against autograd through the textbook formula in float64,
its forward against the reference code, and the two against each other."""

import pytest
import torch

from minilora.fast import rms_norm as fast_rms_norm
from minilora.fast.rms_norm import AnalyticRMSNorm, rms_norm
from minilora.models.rms_norm import RMSNorm

BOTH = pytest.mark.parametrize("fast", [False, True], ids=["plain", "fast"])


def textbook(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def make(dim, eps, fast):
    norm = RMSNorm(dim, eps)
    if fast:
        assert fast_rms_norm.install(norm) == 1 and type(norm) is AnalyticRMSNorm
    return norm


@BOTH
@pytest.mark.parametrize("train_weight", [False, True])
def test_forward_and_gradients_match_float64_autograd(train_weight, fast):
    g = torch.Generator().manual_seed(0)
    norm = make(24, 1e-5, fast)
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


@BOTH
def test_forward_is_bit_identical_to_the_reference_code_in_fp32_and_bf16(fast):
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        norm = make(64, 1e-6, fast).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=g))
        x = torch.randn(2, 7, 64, generator=g).to(dtype)
        # transformers' LlamaRMSNorm.forward, written out.
        xf = x.float()
        want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        assert torch.equal(norm(x), want)


@BOTH
def test_bf16_input_gets_a_bf16_gradient_close_to_float64(fast):
    g = torch.Generator().manual_seed(2)
    norm = make(32, 1e-5, fast).to(torch.bfloat16)
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
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-5), (x, w))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_fast_equals_plain_forward_bit_for_bit_and_gradients_to_rounding(dtype):
    # Same forward ops, so the same bits; the backward differs in its order of operations
    # only: fp32 gradients agree to 1e-5 relative, bf16 ones to a bf16 rounding step.
    g = torch.Generator().manual_seed(3)
    plain, fast = RMSNorm(48, 1e-6).to(dtype), make(48, 1e-6, True).to(dtype)
    with torch.no_grad():
        plain.weight.copy_(torch.randn(48, generator=g))
        fast.weight.copy_(plain.weight)
    x = (torch.randn(2, 9, 48, generator=g) * 2).to(dtype)
    grad = torch.randn(2, 9, 48, generator=g).to(dtype)
    outs = []
    for norm in (plain, fast):
        xi = x.clone().requires_grad_()
        y = norm(xi)
        y.backward(grad)
        outs.append((y, xi.grad, norm.weight.grad))
    (y0, gx0, gw0), (y1, gx1, gw1) = outs
    assert torch.equal(y1, y0)
    tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 1e-2}[dtype]
    torch.testing.assert_close(gx1, gx0, rtol=tol, atol=tol)
    torch.testing.assert_close(gw1, gw0, rtol=tol, atol=tol * 10)
