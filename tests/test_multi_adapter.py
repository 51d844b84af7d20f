"""Named adapters on one base, against peft's multi-adapter model (the oracle).

Each test builds the same tiny transformers model twice: ours with
`inject(..., name=...)` per adapter, peft's with `get_peft_model` + `add_adapter`,
gives every adapter the same non-zero values in both, and compares outputs after
`set_adapter`, in mixed batches (peft's `adapter_names=`), with adapters disabled,
and after save/load in both directions.
"""

import copy

import peft
import pytest
import torch
from safetensors.torch import load_file

import minilora
from minilora import LoraConfig, delete_adapter, disable_adapters, inject, mixed_batch, set_adapter
from minilora.lora.inject import active_adapter, adapter_names, lora_layers, saved_modules
from minilora.lora.layer import LoRALinear
from minilora.lora.modules_to_save import ModulesToSaveWrapper
from tiny_models import batch, tiny_bert_cls, tiny_llama

TOL = dict(rtol=1e-5, atol=1e-5)


def peft_config(config: LoraConfig) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
        use_rslora=config.rslora, modules_to_save=config.modules_to_save, task_type=config.task_type,
        use_dora=config.use_dora,
    )


def randomize(model, name, seed):
    """Non-zero A, B (and DoRA magnitude, and head copies) for adapter `name`."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, p in minilora.lora_state_dict(model, name).items():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            if key.endswith("lora_magnitude_vector"):
                p.mul_(1 + 0.1 * noise)  # near ||W0||, as a trained magnitude is
            else:
                p.copy_(noise * 0.1)


def copy_adapter_into_peft(ours, theirs, name):
    """Give peft's adapter `name` exactly our values."""
    params = dict(theirs.named_parameters())
    saved = {n for n, _ in saved_modules(ours)}
    with torch.no_grad():
        for key, value in minilora.lora_state_dict(ours, name).items():
            path, _, leaf = key.rpartition(".")
            if leaf == "lora_magnitude_vector":
                peft_key = f"{path}.lora_magnitude_vector.{name}.weight"
            elif path.endswith((".lora_A", ".lora_B")):
                peft_key = f"{path}.{name}.{leaf}"
            else:
                module = next(s for s in saved if key.startswith(s + "."))
                peft_key = f"{module}.modules_to_save.{name}.{key[len(module) + 1:]}"
            params["base_model.model." + peft_key].copy_(value)


def named_twins(base, configs: dict[str, LoraConfig], seed=0):
    """(ours, peft's) copies of `base` with the same named adapters, same values."""
    ours = copy.deepcopy(base)
    theirs = None
    for i, (name, config) in enumerate(configs.items()):
        inject(ours, config, name=name)
        randomize(ours, name, seed + i)
        if theirs is None:
            theirs = peft.get_peft_model(copy.deepcopy(base), peft_config(config), adapter_name=name)
        else:
            theirs.add_adapter(name, peft_config(config))
        copy_adapter_into_peft(ours, theirs, name)
    return ours.eval(), theirs.eval()


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


LLAMA_ADAPTERS = {
    "default": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]),
    "second": LoraConfig(r=2, alpha=6, target_modules=["v_proj", "down_proj"], rslora=True),
    "third": LoraConfig(r=8, alpha=4, target_modules=["k_proj", "o_proj"]),
}
CLS_ADAPTERS = {
    "sentiment": LoraConfig(r=4, alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS"),
    "topic": LoraConfig(r=2, alpha=4, target_modules=["key", "dense"], task_type="SEQ_CLS"),
}


def test_set_adapter_gives_peft_outputs_for_every_adapter():
    ours, theirs = named_twins(tiny_llama(), LLAMA_ADAPTERS)
    inputs = batch()
    seen = []
    for name in ["second", "default", "third", "second"]:
        set_adapter(ours, name)
        theirs.set_adapter(name)
        got = ours(**inputs).logits
        torch.testing.assert_close(got, theirs(**inputs).logits, **TOL)
        assert minilora.count_parameters(ours)[0] == trainable(theirs)
        seen.append(got)
    assert not torch.allclose(seen[0], seen[1]) and not torch.allclose(seen[1], seen[2])
    torch.testing.assert_close(seen[0], seen[3], rtol=0, atol=0)


def test_first_adapter_is_active_later_ones_inactive_and_frozen_as_in_peft():
    ours, theirs = named_twins(tiny_llama(), LLAMA_ADAPTERS)
    torch.testing.assert_close(ours(**batch()).logits, theirs(**batch()).logits, **TOL)
    q = ours.model.layers[0].self_attn.q_proj
    assert q.active_adapter == "default" and q.lora_A is q.adapters["default"].lora_A
    # Only the active adapter trains: the same count as peft, and the names it always had.
    assert minilora.count_parameters(ours)[0] == trainable(theirs)
    names = {n for n, p in ours.named_parameters() if p.requires_grad}
    assert names == set(minilora.lora_state_dict(ours)) | set()  # plain-LoRA keys are the parameter names
    assert all(".parked_adapters." not in n for n in names)
    # A layer the active adapter does not target acts as its base layer.
    down = ours.model.layers[0].mlp.down_proj
    assert down.lora_A is None and down.r is None
    x = torch.randn(2, down.in_features)
    torch.testing.assert_close(down(x), down.base_layer(x), rtol=0, atol=0)


def test_hot_swap_copies_no_weight_and_reuses_the_same_parameters():
    ours, _ = named_twins(tiny_llama(), LLAMA_ADAPTERS)
    base = {n: (p, p.data_ptr()) for n, p in ours.named_parameters() if "base_layer" in n or "lora_" not in n}
    adapters = {name: {k: v for k, v in minilora.lora_state_dict(ours, name).items()} for name in LLAMA_ADAPTERS}
    for _ in range(5):
        for name in LLAMA_ADAPTERS:
            set_adapter(ours, name)
    for n, p in ours.named_parameters():
        if n in base:
            assert p is base[n][0] and p.data_ptr() == base[n][1]
    for name, state in adapters.items():
        now = minilora.lora_state_dict(ours, name)
        assert now.keys() == state.keys() and all(now[k] is v for k, v in state.items())


@pytest.mark.parametrize("rows", [["default", "base", "second", "third"], ["third", "third", "__base__", "default"]])
def test_mixed_batch_equals_peft_and_row_by_row_causal_lm(rows):
    ours, theirs = named_twins(tiny_llama(), LLAMA_ADAPTERS)
    inputs = batch(rows=4)
    with mixed_batch(ours, rows):
        got = ours(**inputs).logits
    peft_rows = ["__base__" if r in ("base", "__base__") else r for r in rows]
    torch.testing.assert_close(got, theirs(**inputs, adapter_names=peft_rows).logits, **TOL)
    for i, name in enumerate(rows):
        one = {k: v[i : i + 1] for k, v in inputs.items()}
        if name in ("base", "__base__"):
            with disable_adapters(ours):
                want = ours(**one).logits
        else:
            set_adapter(ours, name)
            want = ours(**one).logits
        torch.testing.assert_close(got[i : i + 1], want, **TOL)
    # Outside the block the model is back to one adapter for all rows.
    assert all(layer.row_adapters is None for _, layer in lora_layers(ours))


def test_modules_to_save_are_per_adapter_and_switch_with_set_adapter():
    base = tiny_bert_cls()
    ours, theirs = named_twins(base, CLS_ADAPTERS)
    inputs = batch()
    assert isinstance(ours.classifier, ModulesToSaveWrapper)
    heads = {}
    for name in ["topic", "sentiment", "topic"]:
        set_adapter(ours, name)
        theirs.set_adapter(name)
        torch.testing.assert_close(ours(**inputs).logits, theirs(**inputs).logits, **TOL)
        # The head in use is the active adapter's own, and only it trains.
        assert ours.classifier.weight is ours.classifier.modules_to_save[name].weight
        assert ours.classifier.weight.requires_grad
        other = next(n for n in CLS_ADAPTERS if n != name)
        assert not ours.classifier.modules_to_save[other].weight.requires_grad
        assert minilora.count_parameters(ours)[0] == trainable(theirs)
        heads[name] = ours.classifier.weight.detach().clone()
    assert not torch.equal(heads["topic"], heads["sentiment"])
    # The original head is kept untouched for the base model.
    torch.testing.assert_close(ours.classifier.original_module.weight, base.classifier.weight, rtol=0, atol=0)


def test_mixed_batch_with_heads_equals_peft():
    ours, theirs = named_twins(tiny_bert_cls(), CLS_ADAPTERS)
    inputs = batch(rows=4)
    rows = ["topic", "base", "sentiment", "topic"]
    with mixed_batch(ours, rows):
        got = ours(**inputs).logits
    want = theirs(**inputs, adapter_names=["topic", "__base__", "sentiment", "topic"]).logits
    torch.testing.assert_close(got, want, **TOL)


def test_gradients_reach_only_the_active_adapter_and_match_peft():
    ours, theirs = named_twins(tiny_bert_cls(), CLS_ADAPTERS)
    set_adapter(ours, "topic")
    theirs.set_adapter("topic")
    inputs, labels = batch(), torch.tensor([0, 1, 1])
    ours(**inputs, labels=labels).loss.backward()
    theirs(**inputs, labels=labels).loss.backward()
    params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours):
        if "topic" in layer.adapters:
            other = params[f"base_model.model.{name}.lora_B.topic.weight"]
            torch.testing.assert_close(layer.lora_B.weight.grad, other.grad, **TOL)
        if "sentiment" in layer.adapters:
            assert layer.adapters["sentiment"].lora_B.weight.grad is None
    torch.testing.assert_close(
        ours.classifier.weight.grad, params["base_model.model.classifier.modules_to_save.topic.weight"].grad, **TOL
    )


def test_disable_adapters_runs_the_base_model_like_peft():
    base = tiny_bert_cls()
    ours, theirs = named_twins(base, CLS_ADAPTERS)
    inputs = batch()
    adapted = ours(**inputs).logits
    with disable_adapters(ours):
        got = ours(**inputs).logits
    torch.testing.assert_close(got, base(**inputs).logits, rtol=0, atol=0)
    with theirs.disable_adapter():
        torch.testing.assert_close(got, theirs(**inputs).logits, **TOL)
    torch.testing.assert_close(ours(**inputs).logits, adapted, rtol=0, atol=0)


def test_save_named_adapter_in_peft_format_and_load_both_ways(tmp_path):
    base = tiny_bert_cls()
    ours, theirs = named_twins(base, CLS_ADAPTERS)
    inputs = batch()
    minilora.save_adapter(ours, tmp_path / "topic", name="topic")
    keys = load_file(tmp_path / "topic" / "adapter_model.safetensors").keys()
    assert "base_model.model.bert.encoder.layer.0.attention.self.key.lora_A.weight" in keys
    assert "base_model.model.classifier.weight" in keys and not any("topic" in k for k in keys)

    # ours -> peft
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "topic").eval()
    theirs.set_adapter("topic")
    torch.testing.assert_close(loaded(**inputs).logits, theirs(**inputs).logits, **TOL)

    # peft -> ours, next to an adapter already there
    theirs.save_pretrained(tmp_path / "peft", selected_adapters=["sentiment"])
    fresh = copy.deepcopy(base)
    minilora.load_adapter(fresh, tmp_path / "topic", name="topic")
    minilora.load_adapter(fresh, tmp_path / "peft" / "sentiment", name="sentiment")
    assert active_adapter(fresh) == "topic"
    torch.testing.assert_close(fresh(**inputs).logits, theirs(**inputs).logits, **TOL)
    set_adapter(fresh, "sentiment")
    theirs.set_adapter("sentiment")
    torch.testing.assert_close(fresh(**inputs).logits, theirs(**inputs).logits, **TOL)


def test_delete_adapter_unwraps_layers_left_without_one():
    base = tiny_llama()
    ours, theirs = named_twins(base, LLAMA_ADAPTERS)
    set_adapter(ours, "second")
    theirs.set_adapter("second")
    with pytest.raises(ValueError, match="'second' is the active one; call set_adapter"):
        delete_adapter(ours, "second")
    delete_adapter(ours, "third")
    theirs.delete_adapter("third")
    # k_proj and o_proj were adapted by "third" alone: plain linear layers again.
    assert type(ours.model.layers[0].self_attn.k_proj) is torch.nn.Linear
    assert isinstance(ours.model.layers[0].self_attn.v_proj, LoRALinear)
    assert adapter_names(ours) == ["default", "second"]
    torch.testing.assert_close(ours(**batch()).logits, theirs(**batch()).logits, **TOL)
    with pytest.raises(ValueError, match=r"no adapter named 'third'; this model's adapters are \['default', 'second'\]"):
        set_adapter(ours, "third")


def test_user_errors_name_the_problem_and_the_fix():
    ours, _ = named_twins(tiny_llama(), LLAMA_ADAPTERS)
    with pytest.raises(ValueError, match=r"no adapter named 'nope'; this model's adapters are \['default', 'second', 'third'\]"):
        set_adapter(ours, "nope")
    with pytest.raises(ValueError, match=r"mixed_batch: no adapter named \['nope'\]"):
        with mixed_batch(ours, ["default", "nope", "base"]):
            pass
    with pytest.raises(ValueError, match="3 adapter names for a batch of 4 rows"):
        with mixed_batch(ours, ["default", "base", "second"]):
            ours(**batch(rows=4))
    with pytest.raises(ValueError, match="already has an adapter named 'second'"):
        inject(ours, LoraConfig(target_modules=["q_proj"]), name="second")
    with pytest.raises(ValueError, match="reserved"):
        inject(ours, LoraConfig(target_modules=["q_proj"]), name="base")
    with pytest.raises(ValueError, match="not usable"):
        inject(ours, LoraConfig(target_modules=["q_proj"]), name="a.b")
    minilora.merge_lora(ours)
    with pytest.raises(ValueError, match="merged into the base weights; call minilora.unmerge_lora"):
        set_adapter(ours, "second")
    with pytest.raises(ValueError, match="merged"):
        with mixed_batch(ours, ["default"] * 3):
            pass


def test_merge_and_remove_keep_the_active_adapter_like_peft_merge_and_unload():
    ours, theirs = named_twins(tiny_bert_cls(), CLS_ADAPTERS)
    set_adapter(ours, "topic")
    theirs.set_adapter("topic")
    inputs = batch()
    merged_theirs = theirs.merge_and_unload()
    merged_ours = minilora.remove_lora(ours, merge=True)
    assert not lora_layers(merged_ours) and type(merged_ours.classifier) is torch.nn.Linear
    torch.testing.assert_close(merged_ours(**inputs).logits, merged_theirs(**inputs).logits, **TOL)


def test_remove_lora_after_several_adapters_restores_the_base_exactly():
    base = tiny_bert_cls()
    ours, _ = named_twins(base, CLS_ADAPTERS)
    minilora.remove_lora(ours)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), base.named_parameters()):
        assert n1 == n2 and p1.requires_grad == p2.requires_grad
        torch.testing.assert_close(p1, p2, rtol=0, atol=0)


def test_generate_with_adapter_names_equals_each_row_alone():
    from minilora.io.generation import generate_ids
    from minilora.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig.from_hf(dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   initializer_range=0.2))  # fmt: skip
    model = LlamaForCausalLM(cfg).eval()
    for i, (name, targets) in enumerate([("a", ["q_proj", "v_proj"]), ("b", ["o_proj", "up_proj"])]):
        inject(model, LoraConfig(r=4, alpha=16, target_modules=targets), name=name)
        randomize(model, name, seed=10 + i)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 64, (3, 6), generator=g)
    mask = torch.ones_like(ids)
    ids[1, :2], mask[1, :2] = 0, 0  # one left-padded prompt
    rows = ["b", "a", "base"]
    got = generate_ids(model, ids, mask, max_new_tokens=8, adapter_names=rows)
    alone = []
    for i, name in enumerate(rows):
        one = (ids[i : i + 1, mask[i].bool()],)
        if name == "base":
            with disable_adapters(model):
                alone.append(generate_ids(model, *one, max_new_tokens=8)[0, -8:])
        else:
            set_adapter(model, name)
            alone.append(generate_ids(model, *one, max_new_tokens=8)[0, -8:])
    assert torch.equal(got[:, -8:], torch.stack(alone))
    assert not torch.equal(alone[0], alone[1])  # the adapters do differ
