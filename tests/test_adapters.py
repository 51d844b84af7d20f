"""Adapter files in peft's format, merging, removal and errors; peft is the oracle."""

import copy
import json

import peft
import pytest
import torch
from safetensors.torch import load_file, save_file

import minilora
from minilora import LoraConfig, inject, load_adapter, save_adapter
from minilora.lora.inject import lora_layers
from test_lora_peft import adapted_twins, randomize_adapters
from tiny_models import batch, tiny_bert_cls, tiny_llama

TOL = dict(rtol=1e-6, atol=1e-6)


def test_minilora_adapter_loads_in_peft_with_same_logits(tmp_path):
    base = tiny_llama()
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], task_type="CAUSAL_LM"))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "ad", base_model_name_or_path="tiny-llama")

    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    keys = load_file(tmp_path / "ad" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ad")
    inputs = batch()
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, **TOL)


def test_peft_adapter_loads_in_minilora_with_same_logits(tmp_path):
    base = tiny_llama()
    theirs = peft.get_peft_model(
        copy.deepcopy(base), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", use_rslora=True)
    )
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "peft")

    ours = copy.deepcopy(base)
    wrapped = load_adapter(ours, tmp_path / "peft")
    assert len(wrapped) == 2 * 7  # every linear of 2 layers, not lm_head
    inputs = batch()
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, **TOL)
    assert minilora.count_parameters(ours)[0] == 0  # frozen unless is_trainable, as peft does


def test_classifier_adapter_round_trips_both_ways(tmp_path):
    base = tiny_bert_cls()
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS"))
    randomize_adapters(ours)
    torch.nn.init.normal_(ours.classifier.weight)
    save_adapter(ours, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors").keys()
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(keys)

    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    inputs = batch()
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, **TOL)

    # And back: peft's save of the same adapter loads in minilora.
    theirs.save_pretrained(tmp_path / "theirs")
    again = copy.deepcopy(base)
    load_adapter(again, tmp_path / "theirs", is_trainable=True)
    torch.testing.assert_close(again(**inputs).logits, ours(**inputs).logits, **TOL)
    assert minilora.count_parameters(again)[0] == minilora.count_parameters(ours)[0]


def test_rank_pattern_from_peft_is_honoured(tmp_path):
    base = tiny_llama()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"v_proj": 2},
                          alpha_pattern={r"layers\.1\.self_attn\.q_proj": 32})
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    theirs.save_pretrained(tmp_path / "p")
    ours = copy.deepcopy(base)
    load_adapter(ours, tmp_path / "p")
    assert ours.model.layers[0].self_attn.v_proj.r == 2
    assert ours.model.layers[1].self_attn.q_proj.scaling == 8.0
    inputs = batch()
    torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, **TOL)


def test_merge_unmerge_restores_base_and_merged_equals_unmerged():
    base = tiny_llama()
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    randomize_adapters(ours)
    inputs = batch()
    unmerged = ours(**inputs).logits
    before = {n: p.clone() for n, p in ours.named_parameters() if "base_layer" in n}

    minilora.merge_lora(ours)
    with pytest.warns(UserWarning, match="already merged"):
        ours.model.layers[0].self_attn.q_proj.merge()  # a second merge must not add twice
    torch.testing.assert_close(ours(**inputs).logits, unmerged, rtol=1e-5, atol=1e-5)
    delta = ours.model.layers[0].mlp.up_proj
    torch.testing.assert_close(
        delta.base_layer.weight, before["model.layers.0.mlp.up_proj.base_layer.weight"] + delta.delta_weight(), **TOL
    )

    minilora.unmerge_lora(ours)
    for n, p in ours.named_parameters():
        if "base_layer" in n:
            torch.testing.assert_close(p, before[n], **TOL)
    torch.testing.assert_close(ours(**inputs).logits, unmerged, **TOL)


def test_merged_weights_equal_peft_merge_and_unload():
    base = tiny_llama()
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "o_proj"])
    ours, theirs = adapted_twins(base, config)
    merged_theirs = theirs.merge_and_unload()
    merged_ours = minilora.remove_lora(ours, merge=True)
    assert not lora_layers(merged_ours)
    for (n1, p1), (n2, p2) in zip(merged_ours.state_dict().items(), merged_theirs.state_dict().items()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, **TOL)


def test_remove_lora_restores_the_original_model():
    base = tiny_bert_cls()
    model = copy.deepcopy(base)
    original_query = model.bert.encoder.layer[0].attention.self.query
    inject(model, LoraConfig(r=4, target_modules=["query"], task_type="SEQ_CLS"))
    randomize_adapters(model)
    with torch.no_grad():
        model.classifier.weight.add_(1.0)
    minilora.remove_lora(model)
    assert model.bert.encoder.layer[0].attention.self.query is original_query
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), base.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_no_matching_target_lists_real_names_and_closest():
    model = tiny_llama()
    with pytest.raises(ValueError) as err:
        inject(model, LoraConfig(target_modules=["q_prj"]))
    msg = str(err.value)
    assert "q_prj" in msg and "closest: q_proj" in msg.splitlines()[0]
    assert "model.layers.N.self_attn.q_proj" in msg and "model.layers.N.mlp.down_proj" in msg
    assert not lora_layers(model)


def test_one_unmatched_target_among_valid_ones_is_an_error():
    with pytest.raises(ValueError, match="vproj"):
        inject(tiny_llama(), LoraConfig(target_modules=["q_proj", "vproj"]))


def test_non_linear_target_is_an_error():
    with pytest.raises(ValueError, match="LlamaMLP; LoRA wraps linear layers only"):
        inject(tiny_llama(), LoraConfig(target_modules=["mlp"]))


def test_wrong_shape_adapter_is_a_clear_error_and_changes_nothing(tmp_path):
    big = tiny_llama(hidden_size=96, num_attention_heads=4, num_key_value_heads=2)
    inject(big, LoraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(big, tmp_path / "big")
    model = tiny_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight has shape \(4, 96\) but this model needs \(4, 64\)"):
        load_adapter(model, tmp_path / "big")
    assert not lora_layers(model)
    assert model.state_dict().keys() == state.keys()


def test_missing_adapter_key_names_it(tmp_path):
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "ad")
    path = tmp_path / "ad" / "adapter_model.safetensors"
    tensors = load_file(path)
    del tensors["base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight"]
    save_file(tensors, path)
    with pytest.raises(ValueError, match=r"missing 1 tensor.*: base_model\.model\.model\.layers\.1\.self_attn\.q_proj\.lora_B\.weight"):
        load_adapter(tiny_llama(), tmp_path / "ad")


def test_missing_adapter_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter folder not found"):
        load_adapter(tiny_llama(), tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/adapter_config\.json"):
        load_adapter(tiny_llama(), tmp_path / "empty")
    model = tiny_llama()
    inject(model, LoraConfig(target_modules=["q_proj"]))
    save_adapter(model, tmp_path / "ad")
    (tmp_path / "ad" / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"ad/adapter_model\.safetensors"):
        load_adapter(tiny_llama(), tmp_path / "ad")


def test_pickled_adapter_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "target_modules": ["q_proj"]}))
    (tmp_path / "adapter_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="never unpickles"):
        load_adapter(tiny_llama(), tmp_path)


def test_unsupported_peft_option_is_refused(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias=True is not supported"):
        load_adapter(tiny_llama(), tmp_path)


def test_save_is_atomic_a_failed_write_keeps_the_old_adapter(tmp_path, monkeypatch):
    model = tiny_llama()
    inject(model, LoraConfig(r=4, target_modules=["q_proj"]))
    randomize_adapters(model, seed=1)
    save_adapter(model, tmp_path / "ad")
    good = load_file(tmp_path / "ad" / "adapter_model.safetensors")

    import minilora.lora.adapters as adapters

    def crash(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapters, "save_file", crash)
    randomize_adapters(model, seed=2)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, tmp_path / "ad")
    after = load_file(tmp_path / "ad" / "adapter_model.safetensors")
    assert after.keys() == good.keys() and all(torch.equal(after[k], good[k]) for k in good)
    assert not any(p.name.endswith(".tmp") for p in (tmp_path / "ad").iterdir())


def test_config_validation_errors():
    with pytest.raises(ValueError, match="positive integer"):
        LoraConfig(r=0)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        LoraConfig(dropout=1.5)
    with pytest.raises(ValueError, match="modules_to_save entries \\['score_head'\\] match no module"):
        inject(tiny_llama(), LoraConfig(target_modules=["q_proj"], modules_to_save=["score_head"]))


def test_summary_line_matches_peft_format(capsys):
    base = tiny_llama()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, target_modules=["q_proj"]))
    minilora.print_trainable_parameters(ours)
    mine = capsys.readouterr().out
    theirs.print_trainable_parameters()
    assert mine == capsys.readouterr().out
