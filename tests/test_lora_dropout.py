"""LoRA's dropout branch on the fast path (minilora/fast/lora_dropout.py) against a float64 reference.

The reference is the formula of the module docstring written with plain autograd in
float64, fed the very mask the branch drew (same seed, same draws): outputs and the
gradients of x, A and B must agree. The mask itself is checked for its drop rate,
its independence across layers, and its reproduction under gradient checkpointing.
"""

import copy

import pytest
import torch

import minilora
import minilora.fast
from minilora import LoraConfig, inject
from minilora.fast.dropout import drop_threshold, dropout_keep_mask, keep_scale
from minilora.fast.lora_dropout import lora_dropout_update
from test_models_llama_gpt2 import build_pair, grads_without_and_with_checkpointing, padded_batch


def reference(x, result, a, b, scaling, keep, c):
    x, result, a, b = (t.double() for t in (x, result, a, b))
    return result + (((x * keep) * c) @ a.t() @ b.t()) * scaling


@pytest.mark.parametrize("p", [0.05, 0.5])
@pytest.mark.parametrize("lead", [(7,), (2, 5)])
def test_output_and_gradients_match_float64_reference(p, lead):
    torch.manual_seed(0)
    x = torch.randn(*lead, 12, requires_grad=True)
    result = torch.randn(*lead, 9, requires_grad=True)
    a = torch.randn(4, 12, requires_grad=True)
    b = torch.randn(9, 4, requires_grad=True)
    x64, r64, a64, b64 = (t.detach().double().requires_grad_() for t in (x, result, a, b))
    torch.manual_seed(5)
    # result * 1: a fresh non-leaf, as the frozen layer's output is (it is updated in place).
    out = lora_dropout_update(x, result * 1, a, b, 2.0, p)
    torch.manual_seed(5)
    keep = dropout_keep_mask(x.shape, p, x.device)
    assert out.shape == (*lead, 9)
    want = reference(x64, r64, a64, b64, 2.0, keep, keep_scale(p))
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    g = torch.randn(out.shape)
    out.backward(g)
    want.backward(g.double())
    for got, ref in ((x, x64), (result, r64), (a, a64), (b, b64)):
        torch.testing.assert_close(got.grad.double(), ref.grad, rtol=1e-5, atol=1e-5)
    # Dropped elements of x get only the frozen path's gradient: here none at all.
    assert torch.all(x.grad[~keep] == 0)


def test_mask_drop_rate_and_scale_keep_the_input_unbiased():
    torch.manual_seed(1)
    p = 0.05
    keep = dropout_keep_mask((2000, 500), p, torch.device("cpu"))
    drawn = drop_threshold(p) / 2**16
    assert abs(drawn - p) <= 2**-17  # p rounded to a multiple of 2^-16
    rate = 1 - keep.double().mean().item()
    assert abs(rate - drawn) < 5 * (drawn * (1 - drawn) / keep.numel()) ** 0.5
    assert keep_scale(p) == pytest.approx(1 / (1 - drawn), rel=1e-12)
    # Columns are not correlated with rows: every one of the 500 columns drops some.
    assert bool((~keep).any(0).all())
    # Two draws differ (independent masks for q, k and v reading the same x).
    assert not torch.equal(keep, dropout_keep_mask((2000, 500), p, torch.device("cpu")))


def test_plain_layer_is_pefts_formula_with_torchs_dropout():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    layer = minilora.LoRALinear(linear, r=4, alpha=4, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.train()
    x = torch.randn(5, 16)
    torch.manual_seed(123)
    got = layer(x)
    torch.manual_seed(123)
    want = linear(x) + layer.lora_B(layer.lora_A(torch.nn.functional.dropout(x, 0.5))) * layer.scaling
    assert torch.equal(got, want)


def test_fast_layer_uses_the_branch_in_training_and_plain_path_in_eval():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8)
    layer = minilora.LoRALinear(linear, r=4, alpha=4, dropout=0.5)
    torch.nn.init.normal_(layer.lora_B.weight)
    assert minilora.fast.enable(layer, ["lora_dropout"]) == {"lora_dropout": 1}
    assert minilora.fast.enable(layer, ["lora_dropout"]) == {"lora_dropout": 0}  # installed once
    layer.train()
    x = torch.randn(5, 16)
    torch.manual_seed(123)
    got = layer(x)
    torch.manual_seed(123)
    keep = dropout_keep_mask(x.shape, 0.5, x.device)
    # Dropout acts on the adapter input only: the frozen path sees the clean x.
    want = linear(x) + layer.lora_B(layer.lora_A(x * keep * keep_scale(0.5))) * layer.scaling
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    layer.eval()
    torch.testing.assert_close(layer(x), linear(x) + layer.lora_B(layer.lora_A(x)) * layer.scaling)


@pytest.mark.parametrize("fast", [False, True])
def test_bf16_base_keeps_fp32_adapter_gradients(fast):
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 8).to(torch.bfloat16)
    layer = minilora.LoRALinear(linear, r=4, alpha=8, dropout=0.1)
    if fast:
        minilora.fast.enable(layer, ["lora_dropout"])
    torch.nn.init.normal_(layer.lora_B.weight)
    layer.train()
    x = torch.randn(3, 16, dtype=torch.bfloat16, requires_grad=True)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert layer.lora_A.weight.grad.dtype == torch.float32 and layer.lora_B.weight.grad.dtype == torch.float32
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad).all()


def tiny_llama_with_dropout_lora(targets="all-linear"):
    """The tiny GQA Llama with dropout-0.3 adapters whose B is not zero, in train mode."""
    _, ours = build_pair("llama_gqa")
    inject(ours, LoraConfig(r=4, alpha=8, dropout=0.3, target_modules=targets))
    minilora.fast.enable(ours)
    for name, p in ours.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    return ours.train()


@pytest.mark.parametrize("targets", ["all-linear", ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"]])
def test_gradient_checkpointing_redraws_the_same_masks(targets):
    ours = tiny_llama_with_dropout_lora(targets)
    ids, mask, labels = padded_batch("right")
    # The re-run skips the down projection's frozen product (its output is discarded):
    # the frozen nn.Linear, LoRA-wrapped or not, sees one row then, all rows otherwise.
    rows = []
    for layer in ours.model.layers:
        down = layer.mlp.down_proj
        base = down.base_layer if isinstance(down, minilora.LoRALinear) else down
        assert type(base) is torch.nn.Linear
        base.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[-2]))
    grads = grads_without_and_with_checkpointing(ours, ids, mask, labels, seed=9)
    n = len(ours.model.layers)
    assert rows == [ids.shape[1]] * n * 2 + [1] * n  # off: forward; on: forward, then each re-run
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    # And the masks do matter: another seed gives other gradients.
    ours.zero_grad()
    torch.manual_seed(10)
    ours(ids, attention_mask=mask, labels=labels).loss.backward()
    name = next(n for n in grads[0] if "lora_A" in n)
    assert not torch.allclose(dict(ours.named_parameters())[name].grad, grads[0][name])


@pytest.mark.parametrize("bias", [False, True])
def test_in_place_update_of_the_frozen_output_keeps_gradients_right(bias):
    # A biased nn.Linear on 3-D input returns a view; without bias a plain tensor. Both
    # must give the frozen path's input gradient plus the adapter's, as plain autograd does.
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 23, bias=bias)
    a, b = torch.randn(4, 16, requires_grad=True), torch.randn(23, 4, requires_grad=True)
    x = torch.randn(2, 5, 16, requires_grad=True)
    torch.manual_seed(3)
    out = lora_dropout_update(x, linear(x), a, b, 2.0, 0.2)
    out.backward(torch.ones_like(out))
    torch.manual_seed(3)
    keep = dropout_keep_mask(x.shape, 0.2, x.device)
    x2 = x.detach().clone().requires_grad_()
    want = linear(x2) + ((x2 * keep * keep_scale(0.2)) @ a.detach().t() @ b.detach().t()) * 2.0
    want.backward(torch.ones_like(want))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)


def test_layers_inside_a_larger_checkpointed_block_run_in_full():
    # Only the block being re-run may skip work for its discarded output; layers inside a
    # user's checkpointed function feed the next layer there, so they must run in full.
    from minilora.models.grad_checkpoint import checkpoint

    ours = tiny_llama_with_dropout_lora()
    ids, mask, labels = padded_batch("right")
    grads = []
    for wrap in (False, True):
        ours.zero_grad()
        torch.manual_seed(9)
        run = lambda i: ours(i, attention_mask=mask, labels=labels).loss  # noqa: E731
        (checkpoint(run, ids) if wrap else run(ids)).backward()
        grads.append({n: p.grad.clone() for n, p in ours.named_parameters() if p.grad is not None})
    assert len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
