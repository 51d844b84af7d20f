"""The newer causal-LM families against transformers and peft, on tiny random configs.

For each family (Qwen3, Phi-3, Gemma 2, Gemma 3 text): a folder transformers saved loads in minilora with the same
logits; one LoRA step on all seven projections gives the loss and adapter gradients
peft gives on transformers' model with the same adapter; greedy generation with the KV
cache gives transformers' tokens on a left-padded batch; an NF4 base trains.
"""

import peft
import pytest
import torch
import transformers

import minilora
from minilora import LoraConfig, inject, load_adapter
from minilora.io.generation import generate_ids
from minilora.lora.inject import lora_layers
from minilora.train.loop import make_optimizer

VOCAB = 128
PAD = 0
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.1,
              bos_token_id=None, eos_token_id=None, pad_token_id=PAD)
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PHI3_TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]  # peft's names for Phi-3's fused layers
HEAD = 16  # head_dim of the Phi-3 cases (64 / 4)
ROTATED = 12  # partial_rotary_factor 0.75: 12 of 16 channels rotate, 6 frequencies


def phi3(**extra):
    return lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(**{**COMMON, **extra}))


FAMILIES = {
    # GQA, explicit head_dim, untied head
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**COMMON, head_dim=24)), LLAMA_TARGETS),
    # tied head, biases on attention, sliding-window layers (window 5 < the prompts' length)
    "qwen3_sliding": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        **{**COMMON, "num_hidden_layers": 3}, tie_word_embeddings=True, attention_bias=True,
        use_sliding_window=True, sliding_window=5, max_window_layers=1)), LLAMA_TARGETS),
    # fused qkv and gate_up, a sliding window shorter than the prompts, tied head
    "phi3": (phi3(sliding_window=6, tie_word_embeddings=True), PHI3_TARGETS),
    # Phi-4-mini's partial rotary, and LongRoPE with a pre-training length of 10: the
    # 12-token batches and the generation past 10 tokens use the long factors, shorter
    # calls the short ones
    "phi3_longrope_partial": (phi3(max_position_embeddings=40, original_max_position_embeddings=10, rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "short_factor": [1.0 + 0.1 * i for i in range(ROTATED // 2)],
        "long_factor": [2.0 + 0.5 * i for i in range(ROTATED // 2)],
        "original_max_position_embeddings": 10}), PHI3_TARGETS),
    # Gemma 2: sandwich norms, sqrt(hidden) embeddings, GeGLU, attention and final-logit
    # soft-capping, query_pre_attn_scalar, sliding (layer 0, window 5) and full layers, tied head
    "gemma2": (lambda: transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        **COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=5, attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0)), LLAMA_TARGETS),
    # Gemma 3: q/k norms, its own RoPE base for the sliding layers and linear scaling on
    # the full ones, layer types given, untied head
    "gemma3": (lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        **{**COMMON, "num_hidden_layers": 3}, head_dim=16, query_pre_attn_scalar=16, sliding_window=5,
        tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 100000.0},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1000.0}})), LLAMA_TARGETS),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def case(request, tmp_path_factory):
    torch.manual_seed(0)
    build, targets = FAMILIES[request.param]
    hf = build()
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return path, targets


@pytest.fixture()
def folder(case):
    return case[0]


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def padded(side="right", seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 9, 6)):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, :12 - length] = 0
    ids = ids.masked_fill(mask == 0, PAD)
    return ids, mask, ids.masked_fill(mask == 0, -100)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_folder_loads_with_transformers_logits(folder, side):
    ids, mask, _ = padded(side)
    ours = minilora.load_model(folder, task="causal-lm", dtype="float32").eval()
    got = ours(ids, attention_mask=mask).logits[mask.bool()]
    want = hf_model(folder)(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_one_lora_step_equals_peft(case, tmp_path):
    folder, targets = case
    theirs = peft.get_peft_model(hf_model(folder), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                   task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = minilora.load_model(folder, task="causal-lm", dtype="float32")
    assert len(load_adapter(ours, tmp_path / "adapter")) == len(targets) * ours.config.num_hidden_layers
    for _, layer in lora_layers(ours):
        layer.lora_A.weight.requires_grad_(True)
        layer.lora_B.weight.requires_grad_(True)
    ids, mask, labels = padded("right")
    theirs.train()
    ours.train()
    want = theirs(input_ids=ids, attention_mask=mask, labels=labels).loss
    got = ours(ids, attention_mask=mask, labels=labels).loss
    want.backward()
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    their_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                   for n, p in theirs.named_parameters() if "lora_" in n}
    our_grads = {n: p.grad for n, p in ours.named_parameters() if "lora_" in n}
    assert our_grads.keys() == their_grads.keys() and our_grads
    for name, grad in our_grads.items():
        torch.testing.assert_close(grad, their_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    assert all(g.abs().max() > 0 for g in our_grads.values())


def test_greedy_generation_with_kv_cache_equals_transformers(folder):
    g = torch.Generator().manual_seed(5)
    ids = torch.full((2, 9), PAD)
    mask = torch.zeros(2, 9, dtype=torch.long)
    ids[0], mask[0] = torch.randint(3, VOCAB, (9,), generator=g), 1
    ids[1, 4:], mask[1, 4:] = torch.randint(3, VOCAB, (5,), generator=g), 1
    want = hf_model(folder).generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                                     pad_token_id=PAD, eos_token_id=None)
    ours = minilora.load_model(folder, task="causal-lm", dtype="float32").eval()
    assert generate_ids(ours, ids, attention_mask=mask, max_new_tokens=12).tolist() == want.tolist()


def test_nf4_base_trains(case):
    folder, targets = case
    ours = minilora.load_model(folder, task="causal-lm", dtype="float32", quantize="nf4", blocksize=64)
    inject(ours, LoraConfig(r=8, alpha=16, target_modules=targets))
    ids, mask, labels = padded("right")
    optimizer = make_optimizer(ours, 5e-3, 0.0, torch.device("cpu"))
    ours.train()
    losses = []
    for _ in range(8):
        loss = ours(ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_adapter_saved_by_minilora_gives_peft_the_same_logits(case, tmp_path):
    folder, targets = case
    ours = minilora.load_model(folder, task="causal-lm", dtype="float32")
    inject(ours, LoraConfig(r=4, alpha=8, target_modules=targets, task_type="CAUSAL_LM"))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in lora_layers(ours):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    minilora.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(hf_model(folder), tmp_path / "ours").eval()
    ids, mask, _ = padded("left")
    with torch.no_grad():
        got = ours.eval()(ids, attention_mask=mask).logits[mask.bool()]
        want = theirs(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        base = hf_model(folder)(input_ids=ids, attention_mask=mask).logits[mask.bool()]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert (want - base).abs().max() > 1e-2  # the adapter changed the logits


def test_info_lists_the_family_target_names(case):
    from minilora.cli.info import describe

    folder, targets = case
    text = describe(folder)
    for name in targets:
        assert f".N.{'self_attn' if name in ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'qkv_proj') else 'mlp'}.{name} " \
            in text, (name, text)


def test_fast_path_equals_plain(case):
    # minilora.fast on the family (the chunked loss where the logits are not capped):
    # the same loss and adapter gradients as the plain path.
    import copy

    import minilora.fast

    folder, targets = case
    plain = minilora.load_model(folder, task="causal-lm", dtype="float32")
    inject(plain, LoraConfig(r=4, alpha=8, target_modules=targets))
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, layer in lora_layers(plain):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    fast = copy.deepcopy(plain)
    assert minilora.fast.enable(fast)["linear_ce"] == 1  # Gemma 2's capped logits take the plain head at run time
    ids, mask, labels = padded("right")
    results = []
    for model in (plain, fast):
        model.train()
        out = model(ids, attention_mask=mask, labels=labels, return_logits=False)
        out.loss.backward()
        results.append((out.loss, {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-4, atol=1e-6, msg=name)
