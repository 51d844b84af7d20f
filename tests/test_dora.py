"""DoRA (LoraConfig(use_dora=True)) against peft's DoraLinearLayer, the oracle:
init, outputs and gradients, dropout, save/load both ways, merge, mixed batches."""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import minilora
from minilora import LoraConfig, disable_adapters, inject, mixed_batch, set_adapter
from minilora.lora.inject import get_lora_config, lora_layers
from minilora.qlora.nf4_linear import NF4Linear
from test_multi_adapter import copy_adapter_into_peft, named_twins, peft_config, randomize
from tiny_models import batch, tiny_bert_cls, tiny_llama

TOL = dict(rtol=1e-5, atol=1e-5)
TARGETS = ["q_proj", "v_proj", "down_proj"]


def test_fresh_dora_adapter_is_a_noop_and_its_magnitude_is_peft_init():
    base = tiny_llama()
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True)
    ours = copy.deepcopy(base)
    inject(ours, config)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config))
    params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours):
        m = layer.lora_magnitude_vector.weight
        assert m.requires_grad
        torch.testing.assert_close(m, layer.base_layer.weight.norm(dim=1), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(m, params[f"base_model.model.{name}.lora_magnitude_vector.default.weight"],
                                   rtol=0, atol=0)  # fmt: skip
    inputs = batch()
    torch.testing.assert_close(ours(**inputs).logits, base(**inputs).logits, **TOL)


@pytest.mark.parametrize("r,rslora", [(1, False), (4, True), (8, False)])
def test_dora_forward_and_gradients_match_peft(r, rslora):
    config = LoraConfig(r=r, alpha=16, target_modules=TARGETS, use_dora=True, rslora=rslora)
    ours, theirs = named_twins(tiny_llama(), {"default": config}, seed=r)
    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out_ours, out_theirs = ours(**inputs, labels=labels), theirs(**inputs, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, **TOL)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours):
        prefix = f"base_model.model.{name}"
        for mine, key in [(layer.lora_A.weight, "lora_A.default.weight"), (layer.lora_B.weight, "lora_B.default.weight"),
                          (layer.lora_magnitude_vector.weight, "lora_magnitude_vector.default.weight")]:  # fmt: skip
            assert mine.grad is not None
            torch.testing.assert_close(mine.grad, params[f"{prefix}.{key}"].grad, **TOL)


def test_dora_with_dropout_in_training_matches_peft():
    # With dropout peft recomputes W0 x' on the dropped-out input; same seed, same masks.
    config = LoraConfig(r=4, alpha=8, dropout=0.3, target_modules=TARGETS, use_dora=True)
    ours, theirs = named_twins(tiny_llama(), {"default": config})
    ours.train()
    theirs.train()
    inputs = batch()
    torch.manual_seed(11)
    got = ours(**inputs).logits
    torch.manual_seed(11)
    want = theirs(**inputs).logits
    torch.testing.assert_close(got, want, **TOL)
    got.sum().backward()
    want.sum().backward()
    params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours):
        other = params[f"base_model.model.{name}.lora_magnitude_vector.default.weight"]
        torch.testing.assert_close(layer.lora_magnitude_vector.weight.grad, other.grad, **TOL)


def test_dora_on_bf16_base_matches_peft():
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True)
    ours, theirs = named_twins(tiny_llama().to(torch.bfloat16), {"default": config})
    inputs = batch()
    got = ours(**inputs).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, theirs(**inputs).logits, rtol=1e-2, atol=1e-2)


def test_dora_adapter_saved_by_us_loads_in_peft(tmp_path):
    base = tiny_bert_cls()
    config = LoraConfig(r=4, alpha=8, target_modules=["query", "value"], use_dora=True, task_type="SEQ_CLS")
    ours, _ = named_twins(base, {"default": config})
    minilora.save_adapter(ours, tmp_path / "dora")
    keys = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    key = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_magnitude_vector"
    assert keys[key].shape == (64,)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "dora").eval()
    assert loaded.peft_config["default"].use_dora
    inputs = batch()
    torch.testing.assert_close(loaded(**inputs).logits, ours(**inputs).logits, **TOL)


def test_dora_adapter_saved_by_peft_loads_in_ours(tmp_path):
    base = tiny_llama()
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True)
    _, theirs = named_twins(base, {"default": config}, seed=3)
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    minilora.load_adapter(ours, tmp_path / "peft")
    assert get_lora_config(ours).use_dora
    inputs = batch()
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, **TOL)


def test_dora_merge_equals_peft_merge_and_unload_and_unmerge_restores():
    base = tiny_llama()
    config = LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True)
    ours, theirs = named_twins(base, {"default": config})
    inputs = batch()
    unmerged = ours(**inputs).logits
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}
    minilora.merge_lora(ours)
    torch.testing.assert_close(ours(**inputs).logits, unmerged, **TOL)
    minilora.unmerge_lora(ours)
    for n, p in ours.named_parameters():
        if n in before:
            torch.testing.assert_close(p, before[n], **TOL)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = minilora.remove_lora(ours, merge=True)
    for (n1, p1), (n2, p2) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, **TOL)


def test_mixed_batch_with_dora_and_plain_adapters_equals_row_by_row():
    # peft refuses adapter_names with DoRA; the row-by-row forward is the oracle here.
    adapters = {
        "dora": LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True),
        "plain": LoraConfig(r=2, alpha=4, target_modules=["q_proj", "k_proj"]),
    }
    ours, theirs = named_twins(tiny_llama(), adapters)
    inputs = batch(rows=4)
    rows = ["dora", "plain", "base", "dora"]
    with mixed_batch(ours, rows):
        got = ours(**inputs).logits
    for i, name in enumerate(rows):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        if name == "base":
            with disable_adapters(ours):
                want = ours(**one).logits
        else:
            set_adapter(ours, name)
            theirs.set_adapter(name)
            want = theirs(**one).logits
        torch.testing.assert_close(got[i : i + 1], want, **TOL)


def test_dora_on_nf4_base_equals_dora_on_its_dequantized_weight():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    nf4 = NF4Linear.from_linear(linear)
    dense = torch.nn.Linear(64, 32)
    with torch.no_grad():
        dense.weight.copy_(nf4.dequantize())
        dense.bias.copy_(linear.bias)
    ours_nf4 = minilora.LoRALinear(nf4, r=4, alpha=8, use_dora=True)
    ours_dense = minilora.LoRALinear(dense, r=4, alpha=8, use_dora=True)
    with torch.no_grad():
        ours_nf4.lora_B.weight.normal_()
        ours_dense.lora_A.weight.copy_(ours_nf4.lora_A.weight)
        ours_dense.lora_B.weight.copy_(ours_nf4.lora_B.weight)
    torch.testing.assert_close(ours_nf4.lora_magnitude_vector.weight, ours_dense.lora_magnitude_vector.weight)
    x = torch.randn(5, 64)
    torch.testing.assert_close(ours_nf4(x), ours_dense(x), **TOL)
    with pytest.raises(NotImplementedError, match="DoRA adapter into a 4-bit"):
        ours_nf4.merge()
