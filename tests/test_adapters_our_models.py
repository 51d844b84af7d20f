"""Adapters move between OUR models and peft on transformers' models, both ways.

test_adapters.py wraps transformers' own modules with our LoRA; here the base model
is minilora's own Llama / GPT-2, loaded by minilora.load_model from a folder that
transformers saved. The oracle is peft (on transformers' model from the same
folder): an adapter trained on our model and saved with save_adapter must give the
same logits under peft.PeftModel.from_pretrained, and an adapter peft saved must
give peft's logits once load_adapter puts it on our model.

GPT-2 is the interesting case: transformers' GPT-2 uses Conv1D, which stores W as
(in, out), and peft marks its LoRA there with fan_in_fan_out=True; our GPT-2 uses
nn.Linear with the transposed (out, in) weight. lora_A is (r x in) and lora_B
(out x r) in both, because fan_in_fan_out only changes how peft merges B·A into
W, not the adapter's own matrices, so the files must be interchangeable as they are.
"""

import json

import peft
import pytest
import torch
import transformers
from safetensors.torch import load_file

import minilora
from minilora import LoraConfig, inject, load_adapter, save_adapter
from minilora.lora.inject import lora_layers
from tiny_models import batch

TOL = dict(rtol=1e-5, atol=1e-5)
VOCAB = 128

CASES = {
    # GQA: 4 query heads share 2 key/value heads.
    "llama": dict(
        config=lambda: transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.1,  # wider than 0.02 so logits are not all nearly equal
        ),
        hf_class=transformers.LlamaForCausalLM,
        targets=["q_proj", "v_proj", "down_proj"],
        wrapped_per_layer=3,
    ),
    # "c_proj" names both attn.c_proj and mlp.c_proj, in peft as in minilora.
    "gpt2": dict(
        config=lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None,
        ),
        hf_class=transformers.GPT2LMHeadModel,
        targets=["c_attn", "c_proj", "c_fc"],
        wrapped_per_layer=4,
    ),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, spec, folder) with a tiny random transformers model saved as safetensors."""
    spec = CASES[request.param]
    torch.manual_seed(0)
    hf = spec["hf_class"](spec["config"]())
    folder = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(folder, safe_serialization=True)
    assert (folder / "model.safetensors").is_file()
    return request.param, spec, folder


def hf_model(spec, folder):
    return spec["hf_class"].from_pretrained(folder, dtype=torch.float32).eval()


def our_model(folder):
    return minilora.load_model(folder, task="causal-lm", dtype="float32")


def train_a_little(model, steps: int = 3):
    """A few SGD steps on a random batch: B leaves zero, as in a real fine-tune."""
    inputs = batch(VOCAB, seed=7)
    labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    for _ in range(steps):
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def make_b_nonzero(peft_model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


def assert_adapter_matters(adapted, folder, inputs):
    """The adapter must move the logits well beyond TOL, or the parity proves nothing."""
    plain = logits(our_model(folder), inputs)[inputs["attention_mask"].bool()]
    assert (adapted - plain).abs().max() > 1e-2


def test_our_model_loads_the_folder_with_transformers_logits(case):
    _, spec, folder = case
    inputs = batch(VOCAB)
    real = inputs["attention_mask"].bool()
    # Without this the adapter comparisons below could pass on two wrong bases.
    torch.testing.assert_close(logits(our_model(folder), inputs)[real],
                               logits(hf_model(spec, folder), inputs)[real], **TOL)


def test_adapter_trained_on_our_model_loads_in_peft_with_same_logits(case, tmp_path):
    name, spec, folder = case
    ours = our_model(folder)
    wrapped = inject(ours, LoraConfig(r=4, alpha=8, target_modules=spec["targets"], task_type="CAUSAL_LM"))
    assert len(wrapped) == 2 * spec["wrapped_per_layer"]
    train_a_little(ours)
    assert all(layer.lora_B.weight.abs().sum() > 0 for _, layer in lora_layers(ours))
    save_adapter(ours, tmp_path / "ours")

    theirs = peft.PeftModel.from_pretrained(hf_model(spec, folder), tmp_path / "ours").eval()
    # peft wrapped the same layers, with our A and B as they were saved.
    saved = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    their_state = {k.replace(".default", ""): v for k, v in theirs.state_dict().items() if "lora_" in k}
    assert saved.keys() == their_state.keys()
    for key, value in saved.items():
        assert torch.equal(their_state[key], value), key
    if name == "gpt2":
        # peft turns fan_in_fan_out on for Conv1D by itself (with a warning).
        assert theirs.base_model.model.transformer.h[0].attn.c_attn.fan_in_fan_out

    inputs = batch(VOCAB)
    real = inputs["attention_mask"].bool()
    got = logits(ours, inputs)[real]
    torch.testing.assert_close(got, logits(theirs, inputs)[real], **TOL)
    assert_adapter_matters(got, folder, inputs)


def test_peft_adapter_loads_into_our_model_with_peft_logits(case, tmp_path):
    name, spec, folder = case
    peft_config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=spec["targets"], task_type="CAUSAL_LM",
                                  fan_in_fan_out=name == "gpt2")
    theirs = peft.get_peft_model(hf_model(spec, folder), peft_config)
    make_b_nonzero(theirs)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    if name == "gpt2":
        assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["fan_in_fan_out"] is True

    ours = our_model(folder)
    wrapped = load_adapter(ours, tmp_path / "peft")
    assert len(wrapped) == 2 * spec["wrapped_per_layer"]
    assert minilora.count_parameters(ours)[0] == 0  # frozen, as peft loads it
    inputs = batch(VOCAB)
    real = inputs["attention_mask"].bool()
    got = logits(ours, inputs)[real]
    torch.testing.assert_close(got, logits(theirs, inputs)[real], **TOL)
    assert_adapter_matters(got, folder, inputs)


def test_same_config_saves_the_same_adapter_keys_in_both_libraries(case, tmp_path):
    _, spec, folder = case
    ours = our_model(folder)
    inject(ours, LoraConfig(r=4, alpha=8, target_modules=spec["targets"]))
    save_adapter(ours, tmp_path / "ours")
    theirs = peft.get_peft_model(hf_model(spec, folder), peft.LoraConfig(r=4, lora_alpha=8,
                                                                          target_modules=spec["targets"]))
    theirs.save_pretrained(tmp_path / "peft")
    ours_file = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    peft_file = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert ours_file.keys() == peft_file.keys()
    assert {k: v.shape for k, v in ours_file.items()} == {k: v.shape for k, v in peft_file.items()}
