"""Parity of our Llama-family and GPT-2 models with transformers (the test oracle).

Tiny random models are built with transformers under a fixed seed, their weights
copied into ours through `convert_checkpoint_tensor`, and logits and loss compared
in fp32 on right-padded, left-padded and unpadded batches.
"""

import json
import sys

import pytest
import torch
import transformers
from safetensors.torch import load_file

from minilora.models.grad_checkpoint import checkpoint as real_checkpoint
from minilora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minilora.models.llama import LlamaConfig, LlamaForCausalLM, rope_inv_freq

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    initializer_range=0.1,  # wider than 0.02 so logits are not all nearly equal
)
LLAMA3_ROPE = {
    "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
    "high_freq_factor": 4.0, "original_max_position_embeddings": 32,
}
CASES = {
    "llama_gqa": lambda: transformers.LlamaConfig(**COMMON),
    "llama3_rope_tied": lambda: transformers.LlamaConfig(
        **COMMON, tie_word_embeddings=True, rope_parameters=dict(LLAMA3_ROPE)
    ),
    "llama_bias_mha": lambda: transformers.LlamaConfig(
        **{**COMMON, "num_key_value_heads": 4}, attention_bias=True, mlp_bias=True
    ),
    # explicit head_dim != hidden/heads, and a sliding window shorter than the batch
    "mistral": lambda: transformers.MistralConfig(**COMMON, head_dim=32, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=True),
    # QK-norm, explicit head_dim, untied head; and with sliding-window layers (window 4 < 12
    # tokens) after the first, as max_window_layers places them
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=24, tie_word_embeddings=False),
    "qwen3_sliding_tied": lambda: transformers.Qwen3Config(
        **{**COMMON, "num_hidden_layers": 3}, tie_word_embeddings=True, use_sliding_window=True, sliding_window=4,
        max_window_layers=1, attention_bias=True),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None,
    ),
}
HF_CLASSES = {
    "llama": transformers.LlamaForCausalLM, "mistral": transformers.MistralForCausalLM,
    "qwen2": transformers.Qwen2ForCausalLM, "qwen3": transformers.Qwen3ForCausalLM,
    "gpt2": transformers.GPT2LMHeadModel,
}
OUR_CLASSES = {"llama": (LlamaConfig, LlamaForCausalLM), "mistral": (LlamaConfig, LlamaForCausalLM),
               "qwen2": (LlamaConfig, LlamaForCausalLM), "qwen3": (LlamaConfig, LlamaForCausalLM),
               "gpt2": (GPT2Config, GPT2LMHeadModel)}


def convert(model, hf_state_dict):
    out = {}
    for key, tensor in hf_state_dict.items():
        converted = model.convert_checkpoint_tensor(key, tensor)
        if converted is not None:
            out[converted[0]] = converted[1]
    return out


def build_pair(case, layers=None):
    hf_cfg = CASES[case]()
    if layers is not None:
        hf_cfg.num_hidden_layers = layers  # n_layer for GPT-2 (an alias)
    torch.manual_seed(0)
    hf = HF_CLASSES[hf_cfg.model_type](hf_cfg).eval()
    config_cls, model_cls = OUR_CLASSES[hf_cfg.model_type]
    ours = model_cls(config_cls.from_hf(hf_cfg.to_dict())).eval()
    ours.load_state_dict(convert(ours, hf.state_dict()), strict=True)
    return hf, ours


@pytest.fixture(scope="module", params=list(CASES))
def pair(request):
    return build_pair(request.param)


def padded_batch(side: str, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((12, 9, 5)):
        if side == "right":
            mask[row, length:] = 0
        else:
            mask[row, : 12 - length] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask, ids.masked_fill(mask == 0, -100)


def assert_logits_close(ours, theirs, mask=None):
    if mask is not None:
        ours, theirs = ours[mask.bool()], theirs[mask.bool()]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_logits_and_loss_match_transformers(pair, side):
    hf, ours = pair
    ids, mask, labels = padded_batch(side)
    ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out = ours(ids, attention_mask=mask, labels=labels)
    assert out.logits.dtype == torch.float32
    assert_logits_close(out.logits, ref.logits, mask)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_unpadded_batch_matches_transformers(pair):
    hf, ours = pair
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    assert_logits_close(ours(ids).logits, hf(ids).logits)
    torch.testing.assert_close(ours(ids, labels=ids).loss, hf(ids, labels=ids).loss, rtol=1e-5, atol=1e-6)


def test_state_dict_keys_are_checkpoint_keys(pair):
    hf, ours = pair
    assert set(ours.state_dict()) == set(convert(ours, hf.state_dict()))
    assert all(type(m) is torch.nn.Linear for n, m in ours.named_modules() if n.endswith("_proj") or "c_" in n)


def test_tied_weights_share_one_parameter(pair):
    hf, ours = pair
    tied = ours.tied_weights
    assert bool(tied) == ours.config.tie_word_embeddings
    assert ours.get_output_embeddings() is ours.lm_head
    assert isinstance(ours.get_input_embeddings(), torch.nn.Embedding)
    if tied:
        ((dst, src),) = tied.items()
        assert dst == "lm_head.weight"
        assert ours.get_parameter(dst) is ours.get_parameter(src)
        assert ours.lm_head.weight is ours.get_input_embeddings().weight


@pytest.mark.parametrize("case", ["llama3_rope_tied", "qwen2", "gpt2", "mistral"])
def test_from_safetensors_folder(case, tmp_path):
    hf, ref_ours = build_pair(case)
    hf.save_pretrained(tmp_path)
    hf_config = json.loads((tmp_path / "config.json").read_text())
    config_cls, model_cls = OUR_CLASSES[hf_config["model_type"]]
    config = config_cls.from_hf(hf_config)
    # The saved (diff-only) config.json must read back to the same config.
    assert {k: v for k, v in vars(config).items() if k != "extra"} == {
        k: v for k, v in vars(ref_ours.config).items() if k != "extra"
    }
    ours = model_cls(config).eval()
    state = convert(ours, load_file(str(tmp_path / "model.safetensors")))
    result = ours.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert set(result.missing_keys) <= set(ours.tied_weights)
    ids, mask, labels = padded_batch("left")
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels)
        out = ours(ids, attention_mask=mask, labels=labels)
    assert_logits_close(out.logits, ref.logits, mask)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["llama3_rope_tied", "gpt2"])
def test_meta_construction_then_assign(case):
    hf, ref_ours = build_pair(case)
    with torch.device("meta"):
        ours = type(ref_ours)(ref_ours.config)
    assert all(p.is_meta for p in ours.parameters())
    assert all(b.is_meta for b in ours.buffers())
    ours.load_state_dict(convert(ours, hf.state_dict()), assign=True)
    ours.tie_weights()
    ours.init_non_persistent_buffers("cpu")
    ours.eval()
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert_logits_close(ours(ids).logits, hf(ids).logits)


def test_gpt2_converts_original_checkpoint_layout():
    hf, ours = build_pair("gpt2")
    # OpenAI-era files: no "transformer." prefix, plus causal-mask buffers.
    old = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
    old["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    old["h.1.attn.masked_bias"] = torch.tensor(-1e4)
    assert ours.convert_checkpoint_tensor("h.0.attn.bias", old["h.0.attn.bias"]) is None
    key, w = ours.convert_checkpoint_tensor("h.0.attn.c_attn.weight", old["h.0.attn.c_attn.weight"])
    assert key == "transformer.h.0.attn.c_attn.weight" and w.shape == (3 * 64, 64)
    key, b = ours.convert_checkpoint_tensor("h.0.attn.c_attn.bias", old["h.0.attn.c_attn.bias"])
    assert key == "transformer.h.0.attn.c_attn.bias" and b.shape == (3 * 64,)
    fresh = GPT2LMHeadModel(ours.config)
    fresh.load_state_dict(convert(fresh, old), strict=True)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[name], tensor, rtol=0, atol=0)


def test_llama_drops_rotary_inv_freq():
    _, ours = build_pair("llama_gqa")
    assert ours.convert_checkpoint_tensor("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)) is None
    w = torch.ones(2)
    assert ours.convert_checkpoint_tensor("model.norm.weight", w) == ("model.norm.weight", w)


def test_config_reads_old_and_new_rope_layouts():
    base = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
            "max_position_embeddings": 256}
    new = LlamaConfig.from_hf({**base, "rope_parameters": dict(LLAMA3_ROPE)})
    old_scaling = {k: v for k, v in LLAMA3_ROPE.items() if k not in ("rope_type", "rope_theta")}
    old = LlamaConfig.from_hf({**base, "rope_theta": 500000.0, "rope_scaling": {"type": "llama3", **old_scaling}})
    assert new.rope_theta == old.rope_theta == 500000.0
    assert new.rope_scaling == old.rope_scaling
    assert new.head_dim == 16 and new.num_key_value_heads == 4
    # The scaling really changes the low frequencies and keeps the high ones.
    plain, scaled = rope_inv_freq(LlamaConfig.from_hf({**base, "rope_theta": 500000.0})), rope_inv_freq(new)
    assert scaled[0] == plain[0] and torch.allclose(scaled[-1], plain[-1] / 8)


def test_qwen2_and_mistral_switches():
    qwen = LlamaConfig.from_hf({"model_type": "qwen2", "vocab_size": VOCAB, "hidden_size": 64,
                                "num_attention_heads": 4, "num_hidden_layers": 2,
                                "use_sliding_window": False, "sliding_window": 32768})
    assert (qwen.qkv_bias, qwen.o_bias, qwen.sliding_window) == (True, False, None)
    model = LlamaForCausalLM(qwen)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.o_proj.bias is None
    mistral = LlamaConfig.from_hf({"model_type": "mistral", "hidden_size": 64, "num_attention_heads": 4,
                                   "num_hidden_layers": 2})
    assert mistral.sliding_window == 4096 and mistral.layer_types == ["sliding_attention"] * 2


def test_unsupported_configs_name_the_problem():
    with pytest.raises(ValueError, match=r"'qwen2_moe'.*llama, mistral, qwen2, qwen3"):
        LlamaConfig.from_hf({"model_type": "qwen2_moe"})
    with pytest.raises(ValueError, match=r"'yarn'.*default, linear, llama3, longrope"):
        LlamaConfig.from_hf({"model_type": "llama", "rope_scaling": {"type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="cross-attention"):
        GPT2Config.from_hf({"model_type": "gpt2", "add_cross_attention": True})
    with pytest.raises(ValueError, match="only 'gpt2'"):
        GPT2Config.from_hf({"model_type": "llama"})


def grads_without_and_with_checkpointing(model, ids, mask, labels, seed=None, every=1):
    """The parameters' gradients of one batch, gradient checkpointing off and then on
    (one layer in `every`); `seed` reseeds before each forward (for dropout)."""
    grads = []
    for flag in (False, True):
        model.gradient_checkpointing, model.checkpoint_every = flag, every
        model.zero_grad()
        if seed is not None:
            torch.manual_seed(seed)
        model(ids, attention_mask=mask, labels=labels).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    return grads


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("case", ["llama_gqa", "gpt2"])
def test_gradient_checkpointing_gives_same_gradients(case, every, monkeypatch):
    _, ours = build_pair(case, layers=3)
    if case == "gpt2":  # dropout would make the two runs differ
        for m in ours.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        for block in ours.transformer.h:
            block.attn.attn_pdrop = 0.0
    ours.train()
    ids, mask, labels = padded_batch("right")
    # Count the layers run under checkpoint(): 0, every, 2*every, ... of them.
    module = sys.modules[type(ours).__module__]
    calls = []
    monkeypatch.setattr(module, "checkpoint", lambda fn, *a: calls.append(fn) or real_checkpoint(fn, *a))
    grads = grads_without_and_with_checkpointing(ours, ids, mask, labels, every=every)
    layers = list(ours.model.layers if case == "llama_gqa" else ours.transformer.h)
    assert calls == layers[::every] and len(layers) == 3
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="use_cache=False"):
        ours(ids, use_cache=True)
