"""RMSNorm (minilora/models/rms_norm.py) against autograd through the textbook formula in
float64, and its forward against the reference code."""

import pytest
import torch

from minilora.models.rms_norm import RMSNorm

def textbook(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def make(dim, eps):
    return RMSNorm(dim, eps)


@pytest.mark.parametrize("train_weight", [False, True])
def test_forward_and_gradients_match_float64_autograd(train_weight):
    g = torch.Generator().manual_seed(0)
    norm = make(24, 1e-5)
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


def test_forward_is_bit_identical_to_the_reference_code_in_fp32_and_bf16():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        norm = make(64, 1e-6).to(dtype)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(64, generator=g))
        x = torch.randn(2, 7, 64, generator=g).to(dtype)
        # transformers' LlamaRMSNorm.forward, written out.
        xf = x.float()
        want = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
        assert torch.equal(norm(x), want)


def test_bf16_input_gets_a_bf16_gradient_close_to_float64():
    g = torch.Generator().manual_seed(2)
    norm = make(32, 1e-5).to(torch.bfloat16)
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
