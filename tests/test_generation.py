"""Generation with a KV cache: token-for-token parity with transformers' greedy
generate, cached logits equal to uncached ones, sampling filters, stop strings."""

import pytest
import torch
import transformers

from minilora.io.generation import filter_logits, generate, generate_ids, next_token
from minilora.models.gpt2 import GPT2Config, GPT2LMHeadModel
from minilora.models.kv_cache import KVCache
from minilora.models.llama import LlamaConfig, LlamaForCausalLM

VOCAB = 128
PAD = 0


def hf_config(kind):
    if kind == "llama":
        return transformers.LlamaConfig(
            vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.1,
            bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
        )
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
        bos_token_id=None, eos_token_id=None, pad_token_id=PAD,
    )


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request):
    cfg = hf_config(request.param)
    torch.manual_seed(0)
    if request.param == "llama":
        hf = transformers.LlamaForCausalLM(cfg).eval()
        ours = LlamaForCausalLM(LlamaConfig.from_hf(cfg.to_dict()))
    else:
        hf = transformers.GPT2LMHeadModel(cfg).eval()
        ours = GPT2LMHeadModel(GPT2Config.from_hf(cfg.to_dict()))
    state = {}
    for key, tensor in hf.state_dict().items():
        converted = ours.convert_checkpoint_tensor(key, tensor)
        if converted is not None:
            state[converted[0]] = converted[1]
    ours.load_state_dict(state, strict=True)
    return hf, ours.eval()


def left_padded_prompts():
    g = torch.Generator().manual_seed(5)
    long, short = torch.randint(3, VOCAB, (7,), generator=g), torch.randint(3, VOCAB, (4,), generator=g)
    ids = torch.full((2, 7), PAD)
    mask = torch.zeros(2, 7, dtype=torch.long)
    ids[0], mask[0] = long, 1
    ids[1, 3:], mask[1, 3:] = short, 1
    return ids, mask, short


def hf_greedy(hf, ids, mask, n, eos=None):
    return hf.generate(
        input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
        pad_token_id=PAD, eos_token_id=eos,
    )


def test_greedy_matches_transformers_single_prompt(pair):
    hf, ours = pair
    ids = torch.randint(3, VOCAB, (1, 6), generator=torch.Generator().manual_seed(4))
    ref = hf_greedy(hf, ids, torch.ones_like(ids), 20)
    out = generate_ids(ours, ids, max_new_tokens=20)
    assert out.shape == (1, 26)
    assert out.tolist() == ref.tolist()
    assert generate_ids(ours, ids[0], max_new_tokens=20).tolist() == ref.tolist()  # 1-D prompt


def test_greedy_matches_transformers_left_padded_batch(pair):
    hf, ours = pair
    ids, mask, short = left_padded_prompts()
    ref = hf_greedy(hf, ids, mask, 20)
    out = generate_ids(ours, ids, attention_mask=mask, max_new_tokens=20)
    assert out.tolist() == ref.tolist()
    # Padding must not change what a prompt generates.
    alone = generate_ids(ours, short[None], max_new_tokens=20)
    assert out[1, 7:].tolist() == alone[0, 4:].tolist()


def test_right_padded_prompt_generates_like_unpadded(pair):
    _, ours = pair
    ids, mask, short = left_padded_prompts()
    right = torch.full((1, 7), PAD)
    right[0, :4] = short
    right_mask = (torch.arange(7) < 4).long()[None]
    out = generate_ids(ours, right, attention_mask=right_mask, max_new_tokens=12)
    alone = generate_ids(ours, short[None], max_new_tokens=12)
    assert out[0, 7:].tolist() == alone[0, 4:].tolist()


def test_eos_stops_rows_and_pads_like_transformers(pair):
    hf, ours = pair
    ids, mask, _ = left_padded_prompts()
    free = generate_ids(ours, ids, attention_mask=mask, max_new_tokens=20)
    eos = int(free[1, 7 + 5])  # row 1 hits this token at step 5 (or earlier)
    ref = hf_greedy(hf, ids, mask, 20, eos=eos)
    out = generate_ids(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=PAD)
    assert out.tolist() == ref.tolist()
    both = generate_ids(ours, ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[eos, int(free[0, 8])])
    assert both.shape[1] < free.shape[1]  # every row finished, so generation stopped early


@torch.no_grad()
def test_cached_decoding_equals_full_forward(pair):
    _, ours = pair
    ids, mask, _ = left_padded_prompts()
    seq = torch.cat([ids, torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(6))], dim=1)
    full_mask = torch.cat([mask, torch.ones(2, 6, dtype=torch.long)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    full = ours(seq, attention_mask=full_mask, position_ids=positions).logits

    cache = KVCache()
    # Prefill the prompt, then a 2-token chunk (several queries against a cache),
    # then one token at a time.
    chunks = [(0, 7), (7, 9)] + [(i, i + 1) for i in range(9, 13)]
    for start, end in chunks:
        out = ours(seq[:, start:end], attention_mask=full_mask[:, :end], position_ids=positions[:, start:end],
                   kv_cache=cache, use_cache=True)
        assert out.kv_cache is cache and cache.seq_length == end
        real = full_mask[:, start:end].bool()
        torch.testing.assert_close(out.logits[real], full[:, start:end][real], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_cache_with_default_positions_matches_unpadded_forward(pair):
    _, ours = pair
    seq = torch.randint(3, VOCAB, (1, 10), generator=torch.Generator().manual_seed(7))
    full = ours(seq).logits
    out = ours(seq[:, :6], use_cache=True)
    cache = out.kv_cache
    for i in range(6, 10):
        step = ours(seq[:, i : i + 1], kv_cache=cache)
        torch.testing.assert_close(step.logits[:, 0], full[:, i], rtol=1e-4, atol=1e-5)


def test_filter_logits_top_k_and_top_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])
    logits = probs.log()
    kept = lambda f: (f > float("-inf")).squeeze(0).tolist()  # noqa: E731
    assert kept(filter_logits(logits, top_k=2)) == [False, True, False, True]
    assert kept(filter_logits(logits, top_p=0.7)) == [False, True, False, True]  # 0.5 + 0.3 reaches 0.7
    assert kept(filter_logits(logits, top_p=0.85)) == [False, True, True, True]
    assert kept(filter_logits(logits, top_p=0.01)) == [False, True, False, False]  # the top token always stays
    assert kept(filter_logits(logits, top_k=3, top_p=0.7)) == [False, True, False, True]
    assert kept(filter_logits(logits)) == [True] * 4


def test_sampling_respects_filters_and_generator():
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(8))
    top3 = logits.topk(3).indices
    for seed in range(20):
        tok = next_token(logits, temperature=1.0, top_k=3, generator=torch.Generator().manual_seed(seed))
        assert (top3 == tok[:, None]).any(-1).all()
    a = next_token(logits, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = next_token(logits, temperature=0.7, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert a.tolist() == b.tolist()
    with pytest.raises(ValueError, match="temperature"):
        next_token(logits, temperature=-1.0)


def test_sampled_generation_top_k_1_is_greedy_and_mode_restored(pair):
    _, ours = pair
    ids, mask, _ = left_padded_prompts()
    ours.train()
    greedy = generate_ids(ours, ids, attention_mask=mask, max_new_tokens=8)
    sampled = generate_ids(ours, ids, attention_mask=mask, max_new_tokens=8, temperature=0.8, top_k=1,
                           generator=torch.Generator().manual_seed(0))
    assert ours.training  # generation runs in eval mode and restores the caller's mode
    ours.eval()
    assert sampled.tolist() == greedy.tolist()


class CharTokenizer:
    """Stand-in for minilora's tokenizer: one id per ASCII character."""

    def __init__(self, eos_token_id=None):
        self.eos_token_id = eos_token_id
        self.pad_token_id = PAD

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids if i != self.eos_token_id)


def test_generate_text_eos_and_stop_strings(pair):
    _, ours = pair
    prompt = "Hello there"
    tok = CharTokenizer()
    prompt_ids = torch.tensor([tok.encode(prompt)])
    new = generate_ids(ours, prompt_ids, max_new_tokens=20)[0, len(prompt):].tolist()
    full = generate(ours, tok, prompt, max_new_tokens=20)
    assert full == tok.decode(new) and len(full) == 20

    # eos ends generation and is not part of the text
    eos = new[6]
    first = new.index(eos)
    assert generate(ours, CharTokenizer(eos_token_id=eos), prompt, max_new_tokens=20) == tok.decode(new[:first])

    # stop strings cut the text and end generation early
    stop = full[8:10]
    calls = []
    handle = ours.register_forward_hook(lambda *args: calls.append(1))
    try:
        text = generate(ours, tok, prompt, max_new_tokens=20, stop=["\x00never", stop])
    finally:
        handle.remove()
    assert text == full[: full.find(stop)]
    assert len(calls) <= 10  # prefill + at most 9 steps, not 20
