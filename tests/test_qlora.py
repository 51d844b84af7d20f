"""QLoRA: LoRALinear over NF4Linear against peft's lora.bnb.Linear4bit over bitsandbytes' Linear4bit."""

import copy
import warnings

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora.bnb import Linear4bit as PeftLoraLinear4bit
from torch import nn

from minilora.lora.layer import LoRALinear
from minilora.qlora.nf4 import NF4Weight, quantize_nf4
from minilora.qlora.nf4_linear import NF4Linear


def bnb_linear4bit(linear: nn.Linear, double_quant=True, blocksize=64):
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant,
                              quant_type="nf4")  # fmt: skip
    layer.weight = bnb.nn.Params4bit(linear.weight.detach().clone(), requires_grad=False, blocksize=blocksize,
                                     compress_statistics=double_quant, quant_type="nf4", module=layer)  # fmt: skip
    if linear.bias is not None:
        layer.bias = nn.Parameter(linear.bias.detach().clone())
    return layer.to("cpu")  # bitsandbytes quantizes when the weight moves to a device


def bit_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_from_linear_matches_bnb_linear4bit(double_quant, bias):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48, bias=bias)
    theirs = bnb_linear4bit(linear, double_quant).state_dict()
    ours = NF4Linear.from_linear(linear, double_quant=double_quant).state_dict()
    assert list(ours) == list(theirs)
    for key, value in theirs.items():
        assert bit_equal(ours[key], value), key


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_over_nf4_equals_peft_over_bnb(double_quant, rslora):
    torch.manual_seed(0)
    linear = nn.Linear(128, 64)
    base = bnb_linear4bit(linear, double_quant)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=rslora)
    theirs = PeftLoraLinear4bit(base, "default", config=cfg, r=8, lora_alpha=16)
    # Same quantized bytes on both sides: ours is loaded from bitsandbytes' state dict.
    ours = LoRALinear(NF4Linear.from_bnb_state_dict(base.state_dict()), r=8, alpha=16, rslora=rslora)
    assert ours.lora_A.weight.dtype == torch.float32
    with torch.no_grad():
        theirs.lora_B["default"].weight.normal_(0, 0.1)  # B = 0 at init would hide B's part of the math
        ours.lora_A.weight.copy_(theirs.lora_A["default"].weight)
        ours.lora_B.weight.copy_(theirs.lora_B["default"].weight)

    x = torch.randn(3, 5, 128, requires_grad=True)
    x_ours = x.detach().clone().requires_grad_(True)
    grad = torch.randn(3, 5, 64)
    y_theirs, y_ours = theirs(x), ours(x_ours)
    torch.testing.assert_close(y_ours, y_theirs, rtol=1e-5, atol=1e-5)
    (y_theirs * grad).sum().backward()
    (y_ours * grad).sum().backward()
    torch.testing.assert_close(ours.lora_A.weight.grad, theirs.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.lora_B.weight.grad, theirs.lora_B["default"].weight.grad, rtol=1e-5, atol=1e-5)
    # The input gradient flows back through the dequantized base weight as well.
    torch.testing.assert_close(x_ours.grad, x.grad, rtol=1e-5, atol=1e-5)


def test_forward_dtype_and_compute_dtype():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = NF4Linear.from_linear(linear)
    x = torch.randn(4, 64)
    w = layer.dequantize()
    torch.testing.assert_close(layer(x), x @ w.t() + linear.bias.detach(), rtol=1e-6, atol=1e-6)
    assert layer(x.bfloat16()).dtype == torch.bfloat16
    layer_bf16 = NF4Linear.from_linear(linear, compute_dtype=torch.bfloat16)
    y = layer_bf16(x)  # computed in bf16, handed back in the input's dtype like bitsandbytes
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, layer(x), rtol=2e-2, atol=2e-2)
    assert not any(p.requires_grad for p in layer.parameters())


def test_model_state_dict_uses_bnb_keys_and_round_trips():
    torch.manual_seed(0)

    def model():
        return nn.Sequential(NF4Linear(64, 32), nn.ReLU(), NF4Linear(32, 8, bias=False, double_quant=False))

    src = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 8, bias=False))
    quantized = model()
    quantized.load_state_dict(src.state_dict())  # float checkpoints are quantized on load
    sd = quantized.state_dict()
    assert "0.weight.quant_state.bitsandbytes__nf4" in sd and "0.weight.nested_absmax" in sd
    assert "2.weight.absmax" in sd and "2.weight.nested_absmax" not in sd
    fresh = model()
    assert not fresh.load_state_dict(sd).missing_keys
    x = torch.randn(5, 64)
    assert torch.equal(fresh(x), quantized(x))
    # The same bytes bitsandbytes produces for that float checkpoint.
    assert bit_equal(sd["0.weight"], bnb_linear4bit(src[0]).state_dict()["weight"])
    bad = dict(sd)
    del bad["0.weight.absmax"]
    result = model().load_state_dict(bad, strict=False)
    assert "0.weight.absmax" in result.missing_keys
    with pytest.raises(RuntimeError, match="does not match"):
        nn.Sequential(NF4Linear(64, 16)).load_state_dict({k: v for k, v in sd.items() if k.startswith("0.")})


def test_shared_cpu_workspace_never_leaks_between_layers():
    torch.manual_seed(0)
    layers = [NF4Linear.from_linear(nn.Linear(64, 64)) for _ in range(3)]
    weights = [layer.dequantize() for layer in layers]
    x = torch.randn(3, 64, requires_grad=True)
    x_ref = x.detach().requires_grad_(True)
    h, h_ref = x, x_ref
    for layer, w in zip(layers, weights):
        h, h_ref = torch.tanh(layer(h)), torch.tanh(nn.functional.linear(h_ref, w, layer.bias))
    assert torch.equal(h, h_ref)
    # A second-order gradient keeps the weight alive past later layers' forwards.
    (g,) = torch.autograd.grad((h**2).sum(), x, create_graph=True)
    (g_ref,) = torch.autograd.grad((h_ref**2).sum(), x_ref, create_graph=True)
    layers[0](torch.randn(5, 64))  # reuses the shared buffer
    (g**2).sum().backward()
    (g_ref**2).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-6)


def test_load_onto_a_meta_placeholder():
    src = nn.Linear(64, 32)
    quantized = NF4Linear.from_linear(src)
    for sd in (quantized.state_dict(), src.state_dict()):  # bitsandbytes format, then plain floats
        layer = NF4Linear(64, 32, device="meta")
        assert not layer.load_state_dict(sd, assign=True).missing_keys
        assert layer.weight.device.type == "cpu" and not layer.bias.requires_grad
        assert torch.equal(layer.dequantize(), quantized.dequantize())


def test_merge_requantizes_and_warns_once():
    torch.manual_seed(0)
    layer = LoRALinear(NF4Linear.from_linear(nn.Linear(128, 64)), r=4, alpha=8)
    nn.init.normal_(layer.lora_B.weight, std=0.02)
    w0, delta = layer.base_layer.dequantize(), layer.delta_weight().detach()
    NF4Linear._merge_warned = False
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer.merge()
        # Merged = dequantize, add in fp32, quantize again (same blocksize, double quant).
        assert torch.equal(layer.base_layer.dequantize(), quantize_nf4(w0 + delta).dequantize())
        assert isinstance(layer.base_layer.weight, NF4Weight) and layer.base_layer.weight.double_quant
        layer.unmerge()
        layer.merge()
    assert sum("16-bit" in str(w.message) for w in caught) == 1


def test_module_casts_leave_the_4bit_weight_alone():
    layer = NF4Linear.from_linear(nn.Linear(64, 16))
    w = layer.dequantize()
    layer.half()
    assert layer.bias.dtype == torch.float16 and torch.equal(layer.dequantize(), w)
    layer.to(torch.float32)
    assert layer(torch.randn(2, 64)).dtype == torch.float32
    layer.to("meta")
    assert layer.weight.device.type == "meta" and layer.weight.absmax.device.type == "meta"


def test_tiny_qlora_model_trains():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))
    student_fp = nn.Sequential(nn.Linear(16, 64), nn.Tanh(), nn.Linear(64, 4))  # a different "pretrained" net
    model = nn.Sequential(
        LoRALinear(NF4Linear.from_linear(student_fp[0]), r=8, alpha=16),
        nn.Tanh(),
        LoRALinear(NF4Linear.from_linear(student_fp[2]), r=8, alpha=16),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 4  # only the adapters
    opt = torch.optim.Adam(trainable, lr=3e-2)
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)
    losses = []
    for _ in range(20):
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("double_quant", [True, False])
def test_cuda_quantize_and_forward_match_cpu(double_quant):
    torch.manual_seed(0)
    linear = nn.Linear(256, 96)
    cpu = NF4Linear.from_linear(linear, double_quant=double_quant)
    gpu = NF4Linear.from_linear(copy.deepcopy(linear).cuda(), double_quant=double_quant)
    # The 4-bit step is exact on any device; the mean feeding double quantization may
    # be summed in another order on the GPU, so only the dequantized values are compared there.
    assert torch.equal(gpu.weight.packed.cpu(), cpu.weight.packed)
    torch.testing.assert_close(gpu.dequantize().cpu(), cpu.dequantize(), rtol=1e-6, atol=1e-6)
    moved = NF4Linear.from_linear(linear, double_quant=double_quant).cuda()  # _apply moves the 4-bit state
    assert moved.weight.device.type == "cuda" and moved.bias.device.type == "cuda"
    x = torch.randn(4, 256)
    torch.testing.assert_close(moved(x.cuda()).cpu(), cpu(x), rtol=1e-4, atol=1e-4)


def test_count_parameters_counts_4bit_values_like_peft():
    """peft counts a Params4bit weight as its number of values; so do we."""
    import minilora
    from minilora.qlora.nf4_linear import NF4Linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(NF4Linear.from_linear(torch.nn.Linear(64, 32)), torch.nn.Linear(32, 4))
    minilora.inject(model, minilora.LoraConfig(r=4, target_modules=["0"]))
    trainable, total = minilora.count_parameters(model)
    assert trainable == 4 * 64 + 32 * 4
    assert total == 64 * 32 + 32 + (32 * 4 + 4) + trainable
