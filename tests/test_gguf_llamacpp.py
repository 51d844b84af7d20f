"""GGUF exports run by llama.cpp itself (llama-cpp-python 0.3.36, built from source by
`make test-interop`), against minilora's own forward and greedy decoding.

  * SmolLM2-135M-Instruct with an adapter trained a few steps on Alpaca: as f32, the
    greedy continuations of three chat prompts are the same 32 tokens and the logits
    agree to 1e-4 of their largest value; as f16 and q8_0, the first 16 tokens agree.
  * The same adapter as a llama.cpp LoRA file, applied at scale 1 on the f32 base
    export: the merged model's 32 tokens.
  * Tiny random Llama 3 (with its RoPE scaling), Llama 2 (SentencePiece-style tokenizer),
    Qwen2, Qwen3 and Mistral models: logits to 1e-4.
  * Tokenizers: a mixed text (code, digits, accents, emoji, spaces) gives the same ids
    in llama.cpp as in minilora for each pre-tokenizer name and for a SentencePiece-style
    tokenizer (Llama 2's layout), SmolLM2's real one included.

llama.cpp keeps its KV cache in f16 by default, which alone moves these logits by
~5e-4; the f32 comparisons ask for an f32 cache (type_k = type_v = GGML_TYPE_F32), so
what is compared is the model file, not the cache's rounding.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import minilora
from helpers_gguf import MIXED_TEXT, tiny_folder
from helpers_smollm import smollm2_hf_dir
from minilora import LoraConfig, inject, save_adapter
from minilora.io.generation import generate_ids
from minilora.io.gguf_export import export_gguf, export_lora_gguf

pytestmark = pytest.mark.interop

GGML_F32 = 0
ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_5000.json"
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "List three uses of a paperclip."]
RTOL = 1e-4


def Llama(path, **kwargs):
    """llama_cpp.Llama, imported here so that the default run (which deselects these tests)
    collects this file without llama-cpp-python; under `make test-interop` a missing build fails."""
    import llama_cpp

    return llama_cpp.Llama(str(path), verbose=False, **kwargs)


def llama(path, lora=None):
    kwargs = dict(lora_path=str(lora), lora_scale=1.0) if lora else {}
    return Llama(path, n_ctx=512, logits_all=True, n_threads=2, type_k=GGML_F32, type_v=GGML_F32, **kwargs)


def llama_greedy(llm, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """n greedy tokens after `prompt`, and the logits that chose each one."""
    llm.reset()
    llm.eval(prompt)
    out, logits = [], []
    for _ in range(n):
        row = np.array(llm.scores[llm.n_tokens - 1])
        logits.append(row)
        out.append(int(row.argmax()))
        llm.eval([out[-1]])
    return out, np.stack(logits)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


@pytest.fixture(scope="module")
def smollm():
    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def adapter(smollm, tmp_path_factory):
    """LoRA on every projection, four AdamW steps on Alpaca rows: B moves away from 0."""
    rows = json.loads(ALPACA.read_text())[:16]
    tok = minilora.load_tokenizer(smollm)
    model = minilora.load_model(smollm, task="causal-lm", dtype="float32")
    torch.manual_seed(0)  # A's initial values: the same adapter in every run
    inject(model, LoraConfig(r=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    for step in range(4):
        for row in rows[4 * step:4 * step + 4]:
            text = tok.apply_chat_template([{"role": "user", "content": row["instruction"] + "\n" + row["input"]},
                                            {"role": "assistant", "content": row["output"]}],
                                           add_generation_prompt=False)
            ids = torch.tensor([tok.encode(text)[:96]])
            (model(ids, labels=ids).loss / 4).backward()
        opt.step()
        opt.zero_grad()
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert min(float(p.detach().abs().max()) for p in b) > 0
    return save_adapter(model, tmp_path_factory.mktemp("adapter"))


@pytest.fixture(scope="module")
def merged(smollm, adapter):
    model = minilora.load_model(smollm, task="causal-lm", dtype="float32")
    minilora.load_adapter(model, adapter)
    minilora.remove_lora(model, merge=True)
    return model.eval()


@pytest.fixture(scope="module")
def prompts(smollm):
    tok = minilora.load_tokenizer(smollm)
    return [tok.encode(tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True))
            for p in PROMPTS]


@pytest.fixture(scope="module")
def ours(merged, prompts):
    """minilora's greedy 32 tokens per prompt (KV cache), and the logits of one full forward."""
    result = []
    for ids in prompts:
        seq = generate_ids(merged, torch.tensor([ids]), max_new_tokens=32)[0]
        with torch.no_grad():
            logits = merged(seq[None]).logits[0, len(ids) - 1:-1]
        result.append((seq[len(ids):].tolist(), logits.numpy()))
    return result


@pytest.fixture(scope="module")
def exports(smollm, adapter, tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    files = {t: export_gguf(smollm, d / f"smol-{t}.gguf", adapter=adapter, out_type=t)
             for t in ("f32", "f16", "q8_0")}
    files["base"] = export_gguf(smollm, d / "base-f32.gguf", out_type="f32")
    files["lora"] = export_lora_gguf(smollm, adapter, d / "adapter.gguf")
    return files


def test_f32_merged_export_generates_minilora_tokens_and_logits(exports, prompts, ours):
    llm = llama(exports["f32"])
    for ids, (tokens, logits) in zip(prompts, ours):
        got, got_logits = llama_greedy(llm, ids, 32)
        assert got == tokens
        assert rel_err(got_logits, logits) < RTOL


def greedy_agrees_but_at_near_ties(llm, ids, tokens, logits, n=16) -> float:
    """llama.cpp's first n greedy tokens equal minilora's `tokens`, or part from them only at
    a step where minilora's top two logits are closer than twice the export's error at that
    step (llama.cpp's logits there, fed the same prefix, against minilora's): there the
    greedy choice is the rounding's, not the model's. Returns the export's error over all
    32 steps, teacher-forced on minilora's tokens, as a fraction of the largest logit."""
    llm.reset()
    llm.eval(ids + tokens)
    forced = np.array(llm.scores[len(ids) - 1:len(ids) + len(tokens) - 1])
    got = llama_greedy(llm, ids, n)[0]
    same = next((i for i, (a, b) in enumerate(zip(got, tokens)) if a != b), n)
    if same < n:
        top2 = np.sort(logits[same])[-2:]
        margin, error = float(top2[1] - top2[0]), float(np.abs(forced[same] - logits[same]).max())
        assert margin < 2 * error, f"parted at token {same}, where minilora's top two logits are {margin:.3f} " \
                                   f"apart and the export moved the logits by {error:.3f}"
    return rel_err(forced, logits)


def test_f16_export_agrees_on_16_tokens(exports, prompts, ours):
    llm = Llama(exports["f16"], n_ctx=512, logits_all=True, n_threads=2)
    for ids, (tokens, logits) in zip(prompts, ours):
        assert greedy_agrees_but_at_near_ties(llm, ids, tokens, logits) < 1e-2


def test_q8_0_export_agrees_on_16_tokens(exports, prompts, ours):
    """Q8_0 moves SmolLM2's logits by ~3% of their largest value (its weights, and llama.cpp's
    8-bit activations), ~0.5 to 1 logit: fed minilora's tokens, llama.cpp's Q8_0 logits stay
    within 5% of the f32 ones, and the first 16 greedy tokens agree but where a step's top
    two logits were closer than that (README)."""
    llm = Llama(exports["q8_0"], n_ctx=512, logits_all=True, n_threads=2)
    for ids, (tokens, logits) in zip(prompts, ours):
        assert greedy_agrees_but_at_near_ties(llm, ids, tokens, logits) < 0.05


def test_lora_only_adapter_on_the_base_gives_the_merged_tokens(exports, prompts, ours):
    llm = llama(exports["base"], lora=exports["lora"])
    for ids, (tokens, logits) in zip(prompts, ours):
        got, got_logits = llama_greedy(llm, ids, 32)
        assert got == tokens
        assert rel_err(got_logits, logits) < RTOL
    base = llama(exports["base"])  # and without the adapter the file is the base: the tokens differ
    assert [llama_greedy(base, ids, 32)[0] for ids in prompts] != [t for t, _ in ours]


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 32}
TINY = {
    "llama3": ("llama", "llama-bpe", dict(head_dim=32, rope_scaling=LLAMA3_ROPE), True),
    "llama_linear_tied": ("llama", "gpt-2", dict(tie_word_embeddings=True, num_key_value_heads=4,
                                                 rope_scaling={"rope_type": "linear", "factor": 2.0}), False),
    "llama_biases": ("llama", "gpt-2", dict(attention_bias=True, mlp_bias=True), False),
    # Llama 2's layout: a SentencePiece-style tokenizer that puts <s> first
    "llama2_spm": ("llama", "spm", dict(bos_token_id=1, eos_token_id=2, pad_token_id=None), False),
    "mistral": ("mistral", "smollm", dict(sliding_window=4096, attention_bias=True), False),  # a key Mistral ignores
    "qwen2": ("qwen2", "qwen2", dict(tie_word_embeddings=True), False),
    "qwen3": ("qwen3", "qwen2", dict(head_dim=24, num_hidden_layers=3, rope_theta=1e6), False),
    # Phi-4-mini's partial rotary, fused qkv and gate_up, tied head
    "phi3_partial_tied": ("phi3", "spm_phi3", dict(bos_token_id=1, eos_token_id=2, pad_token_id=None,
                                                   partial_rotary_factor=0.75, tie_word_embeddings=True), False),
    # LongRoPE with a pre-training length of 16: the mixed text is longer, so both sides use
    # the long factors (llama.cpp picks them by its context size, transformers by the length)
    "phi3_longrope": ("phi3", "spm_phi3", dict(
        bos_token_id=1, eos_token_id=2, pad_token_id=None, original_max_position_embeddings=16,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
                         "short_factor": [1.0 + 0.1 * i for i in range(6)],
                         "long_factor": [2.0 + 0.5 * i for i in range(6)], "original_max_position_embeddings": 16}),
        True),
}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_models_give_llama_cpp_minilora_logits(name, tmp_path):
    family, pre, overrides, add_bos = TINY[name]
    folder = tiny_folder(tmp_path / name, family, pre, add_bos=add_bos, **overrides)
    out = export_gguf(folder, tmp_path / f"{name}.gguf", out_type="f32")
    tok = minilora.load_tokenizer(folder)
    ids = tok.encode(MIXED_TEXT)
    llm = llama(out)
    assert llm.tokenize(MIXED_TEXT.encode(), add_bos=True, special=True) == ids  # BOS as the tokenizer adds it
    llm.eval(ids)
    model = minilora.load_model(folder, task="causal-lm", dtype="float32").eval()
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert rel_err(np.array(llm.scores[:len(ids)]), ref) < RTOL


@pytest.mark.parametrize("pre", ["gpt-2", "smollm", "llama-bpe", "qwen2", "spm"])
def test_tokenizers_give_the_same_ids(pre, tmp_path):
    folder = tiny_folder(tmp_path / pre, "llama", pre)
    out = export_gguf(folder, tmp_path / "m.gguf", out_type="f32")
    llm = Llama(out, vocab_only=True)
    tok = minilora.load_tokenizer(folder)
    for text in (MIXED_TEXT, " leading space", "x\n\n\ny", "1234567 89", "To be, or not to be: that is the question."):
        # add_bos=True adds a BOS where the file says the tokenizer adds one (spm's <s>)
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok.encode(text), text


def test_smollm2_tokenizer_and_chat_template(exports, smollm):
    llm = Llama(exports["base"], vocab_only=True)
    tok = minilora.load_tokenizer(smollm)
    chat = tok.apply_chat_template([{"role": "user", "content": MIXED_TEXT}], add_generation_prompt=True)
    assert llm.tokenize(chat.encode(), add_bos=False, special=True) == tok.encode(chat)
    assert llm.metadata["tokenizer.chat_template"] == tok.chat_template_text()
