"""LoRA math and the injection walker against peft, the oracle.

Each test builds the same tiny transformers model twice, adapts one copy with peft
and one with minilora, gives both the same A and B values, and compares.
"""

import copy

import peft
import pytest
import torch

import minilora
from minilora import LoraConfig, inject
from minilora.lora.inject import lora_layers
from tiny_models import batch, tiny_bert_cls, tiny_llama

TOL = dict(rtol=1e-6, atol=1e-6)


def peft_twin(base, ours_config: LoraConfig, **extra):
    cfg = peft.LoraConfig(
        r=ours_config.r,
        lora_alpha=ours_config.alpha,
        lora_dropout=ours_config.dropout,
        target_modules=ours_config.target_modules,
        use_rslora=ours_config.rslora,
        modules_to_save=ours_config.modules_to_save,
        task_type=ours_config.task_type,
        **extra,
    )
    return peft.get_peft_model(copy.deepcopy(base), cfg)


def randomize_adapters(model, seed=0):
    """Non-zero B (a fresh B is zero, which would hide every mistake in B's path)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=g) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)


def copy_into_peft(ours, peft_model):
    """Give peft's adapter exactly our A, B (and modules_to_save) values."""
    theirs = dict(peft_model.named_parameters())
    with torch.no_grad():
        for key, value in minilora.lora_state_dict(ours).items():
            path, _, leaf = key.rpartition(".")
            if ".lora_A" in key or ".lora_B" in key:
                peft_key = f"base_model.model.{path}.default.{leaf}"
            else:
                mod, _, param = key.rpartition(".")
                peft_key = f"base_model.model.{mod}.modules_to_save.default.{param}"
            theirs[peft_key].copy_(value)


def adapted_twins(base, config: LoraConfig, seed=0):
    """(ours, peft's) copies of `base` adapted by `config`, holding the same non-zero A and B."""
    ours = copy.deepcopy(base)
    inject(ours, config)
    randomize_adapters(ours, seed=seed)
    theirs = peft_twin(base, config)
    copy_into_peft(ours, theirs)
    return ours, theirs


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "targets",
    [["q_proj", "v_proj"], ["k_proj", "o_proj", "gate_proj"], "all-linear", r".*\.mlp\.(up|down)_proj"],
)
def test_trainable_count_matches_peft_on_causal_lm(targets):
    base = tiny_llama()
    config = LoraConfig(r=4, alpha=8, target_modules=targets)
    theirs = peft_twin(base, config)
    ours = copy.deepcopy(base)
    inject(ours, config)
    assert minilora.count_parameters(ours)[0] == trainable(theirs)
    assert sorted(n for n, p in ours.named_parameters() if p.requires_grad) == sorted(
        n.removeprefix("base_model.model.").replace(".default", "")
        for n, p in theirs.named_parameters()
        if p.requires_grad
    )


def test_trainable_count_matches_peft_on_classifier_with_new_head():
    base = tiny_bert_cls()
    config = LoraConfig(r=8, alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    theirs = peft_twin(base, config)
    ours = copy.deepcopy(base)
    inject(ours, config)
    # peft adds the classifier head to modules_to_save for SEQ_CLS; so do we.
    assert minilora.count_parameters(ours)[0] == trainable(theirs)
    assert ours.classifier.weight.requires_grad and ours.classifier.bias.requires_grad


def test_total_count_matches_peft_with_tied_embeddings():
    # SmolLM2 ties lm_head to the embeddings: one tensor, counted once (as peft does).
    base = tiny_llama(tie_word_embeddings=True)
    config = LoraConfig(r=4, alpha=8, target_modules="all-linear")
    theirs = peft_twin(base, config)
    ours = copy.deepcopy(base)
    inject(ours, config)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert minilora.count_parameters(ours) == tuple(theirs.get_nb_trainable_parameters())


@pytest.mark.parametrize("r", [1, 4, 8])
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_and_gradients_match_peft_causal_lm(r, rslora):
    base = tiny_llama()
    config = LoraConfig(r=r, alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"], rslora=rslora)
    ours, theirs = adapted_twins(base, config, seed=r)

    inputs = batch()
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    out_ours = ours(**inputs, labels=labels)
    out_theirs = theirs(**inputs, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, **TOL)

    # One optimiser step on the same batch: same gradients, same updated weights.
    opt_ours = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.1)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    peft_params = dict(theirs.named_parameters())
    for name, layer in lora_layers(ours):
        for ab in ("lora_A", "lora_B"):
            mine = getattr(layer, ab).weight
            other = peft_params[f"base_model.model.{name}.{ab}.default.weight"]
            torch.testing.assert_close(mine.grad, other.grad, **TOL)
    opt_ours.step()
    opt_theirs.step()
    for name, layer in lora_layers(ours):
        other = peft_params[f"base_model.model.{name}.lora_B.default.weight"]
        torch.testing.assert_close(layer.lora_B.weight, other, **TOL)


@pytest.mark.parametrize("r", [1, 4, 8])
def test_forward_and_gradients_match_peft_classifier(r):
    base = tiny_bert_cls()
    config = LoraConfig(r=r, alpha=2 * r, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    ours, theirs = adapted_twins(base, config, seed=r)

    inputs = batch()
    labels = torch.tensor([0, 1, 1])
    out_ours, out_theirs = ours(**inputs, labels=labels), theirs(**inputs, labels=labels)
    torch.testing.assert_close(out_ours.logits, out_theirs.logits, **TOL)
    out_ours.loss.backward()
    out_theirs.loss.backward()
    peft_params = dict(theirs.named_parameters())
    torch.testing.assert_close(
        ours.classifier.weight.grad,
        peft_params["base_model.model.classifier.modules_to_save.default.weight"].grad,
        **TOL,
    )
    for name, layer in lora_layers(ours):
        other = peft_params[f"base_model.model.{name}.lora_A.default.weight"]
        torch.testing.assert_close(layer.lora_A.weight.grad, other.grad, **TOL)


def test_fp32_adapter_on_bf16_base_matches_peft():
    base = tiny_llama().to(torch.bfloat16)
    config = LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    # peft's default autocast_adapter_dtype also keeps adapters in fp32.
    ours, theirs = adapted_twins(base, config)
    layer = ours.model.layers[0].self_attn.q_proj
    assert layer.lora_A.weight.dtype == torch.float32 and layer.base_layer.weight.dtype == torch.bfloat16
    inputs = batch()
    logits = ours(**inputs).logits
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits, theirs(**inputs).logits, rtol=0, atol=0)


def test_fresh_adapter_is_exact_noop():
    base = tiny_llama()
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    inputs = batch()
    torch.testing.assert_close(ours(**inputs).logits, base(**inputs).logits, rtol=0, atol=0)


def test_init_matches_peft_distribution_and_scaling():
    torch.manual_seed(0)
    layer = minilora.LoRALinear(torch.nn.Linear(32, 16), r=4, alpha=8, rslora=False)
    assert layer.lora_A.weight.shape == (4, 32) and layer.lora_B.weight.shape == (16, 4)
    assert torch.count_nonzero(layer.lora_B.weight) == 0
    # Kaiming-uniform with a=sqrt(5) bounds |A| by 1/sqrt(in_features), as nn.Linear does.
    assert layer.lora_A.weight.abs().max() <= 1 / 32**0.5
    assert layer.scaling == 2.0
    assert minilora.LoRALinear(torch.nn.Linear(32, 16), r=4, alpha=8, rslora=True).scaling == 4.0
    # peft draws the same A from the same seed.
    torch.manual_seed(7)
    ours = minilora.LoRALinear(torch.nn.Linear(32, 16), r=4, alpha=8)
    torch.manual_seed(7)
    theirs = peft.tuners.lora.Linear(torch.nn.Linear(32, 16), "default", peft.LoraConfig(r=4, lora_alpha=8), r=4, lora_alpha=8)
    torch.testing.assert_close(ours.lora_A.weight, theirs.lora_A["default"].weight, rtol=0, atol=0)


def test_base_layer_is_kept_not_copied_and_frozen():
    base = tiny_llama()
    q = base.model.layers[0].self_attn.q_proj
    inject(base, LoraConfig(target_modules=["q_proj"]))
    assert base.model.layers[0].self_attn.q_proj.base_layer is q
    assert not q.weight.requires_grad
    assert all(not p.requires_grad for n, p in base.named_parameters() if "lora_" not in n)
