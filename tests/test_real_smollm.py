"""The real SmolLM2-135M-Instruct, imported by our GGUF converter: forward, loss and
greedy decoding against transformers loading the very same folder (the oracle).

Tiny random models (test_models_llama_gpt2.py) cover the maths; this file shows the
whole "own model" path holds on a real checkpoint: GGUF import -> HF folder ->
minilora.load_model -> logits, loss and the tokens a chat prompt generates.
Both models are loaded once per module, in fp32, so the whole file stays well
under a minute on two CPU cores. The last test loads ours once more, on the fast path
(minilora.fast.enable), and holds it to the plain one.
"""

import pytest
import torch
import transformers

import minilora
import minilora.fast
from helpers_smollm import smollm2_hf_dir
from minilora.io.generation import generate_ids

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Name three primary colours and explain how they mix into other colours."}],
]
RTOL = 1e-4  # of the largest |logit|: both fp32, summation orders may differ


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def folder():
    return smollm2_hf_dir()


@pytest.fixture(scope="module")
def tokenizer(folder):
    return minilora.load_tokenizer(folder)


@pytest.fixture(scope="module")
def ours(folder):
    return minilora.load_model(folder, task="causal-lm", dtype="float32")


@pytest.fixture(scope="module")
def hf(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def chat_batch(tokenizer, side: str) -> dict:
    texts = [tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in CHATS]
    before, tokenizer.padding_side = tokenizer.padding_side, side
    try:
        enc = tokenizer(texts, padding=True)
    finally:
        tokenizer.padding_side = before  # the fixture is shared by the whole module
    mask = enc["attention_mask"]
    # The two prompts differ in length, so one row really is padded.
    assert (mask == 0).any() and (mask.sum(1) > 10).all()
    return enc


def test_imported_checkpoint_is_the_model_transformers_sees(ours, hf):
    ours_params = {n: p for n, p in ours.named_parameters()}
    hf_params = {n: p for n, p in hf.named_parameters()}
    # Tied head: both count the 49152 x 576 embedding once.
    assert ours_params.keys() == hf_params.keys()
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    for name, p in hf_params.items():
        assert ours_params[name].dtype == torch.float32
        assert torch.equal(ours_params[name], p), name


@pytest.mark.parametrize("side", ["right", "left"])
@torch.no_grad()
def test_logits_and_loss_match_transformers_on_padded_chat_batch(ours, hf, tokenizer, side):
    enc = chat_batch(tokenizer, side)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    # Positions count real tokens only (what generate does with left padding); both
    # models get the same explicit ids so the comparison does not rest on defaults.
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    labels = ids.masked_fill(mask == 0, -100)

    got = ours(ids, attention_mask=mask, position_ids=position_ids, labels=labels)
    want = hf(input_ids=ids, attention_mask=mask, position_ids=position_ids, labels=labels)

    real = mask.bool()
    assert rel_err(got.logits[real], want.logits[real]) < RTOL
    if side == "left":
        # And with each library's default positions (0..T-1 whatever the padding),
        # which differ from the ones above only when the pads come first.
        plain_got = ours(ids, attention_mask=mask).logits
        plain_want = hf(input_ids=ids, attention_mask=mask).logits
        assert rel_err(plain_got[real], plain_want[real]) < RTOL
    # Pad positions are never compared: what a model writes there is arbitrary.
    assert torch.isfinite(got.logits[real]).all()
    assert abs(got.loss.item() - want.loss.item()) / want.loss.item() < RTOL
    assert 0.1 < got.loss.item() < 10  # a real model on real text, not a random one


@torch.no_grad()
def test_greedy_chat_answer_matches_transformers_and_says_paris(ours, hf, tokenizer):
    prompt = tokenizer.apply_chat_template(CHATS[0], add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = torch.tensor([tokenizer.encode(prompt)])

    # No eos on either side: both must produce exactly 20 new tokens to compare.
    want = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=20, eos_token_id=None, pad_token_id=tokenizer.pad_token_id)
    got = generate_ids(ours, ids, max_new_tokens=20)
    assert got.shape == (1, ids.shape[1] + 20)
    assert got[0, ids.shape[1]:].tolist() == want[0, ids.shape[1]:].tolist()

    # The text API stops at <|im_end|>; up to there it is the same greedy answer.
    text = minilora.generate(ours, tokenizer, prompt, max_new_tokens=20)
    assert "Paris" in text
    assert tokenizer.decode(got[0, ids.shape[1]:], skip_special_tokens=False).startswith(text + "<|im_end|>")


def test_fast_path_gives_the_same_logits_and_loss(folder, ours, tokenizer):
    # Evaluation logits bit for bit (the fast pieces' forwards are the plain ops); the
    # loss-only forward, which never builds the logits, to fp32 rounding.
    fast = minilora.load_model(folder, task="causal-lm", dtype="float32")
    assert sum(minilora.fast.enable(fast).values()) > 0
    enc = chat_batch(tokenizer, "right")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    labels = ids.masked_fill(mask == 0, -100)
    with torch.no_grad():
        want = ours(ids, attention_mask=mask, labels=labels)
        got = fast(ids, attention_mask=mask, labels=labels)
        loss_only = fast(ids, attention_mask=mask, labels=labels, return_logits=False)
    assert torch.equal(got.logits, want.logits) and torch.equal(got.loss, want.loss)
    assert loss_only.logits is None
    assert abs(loss_only.loss.item() - want.loss.item()) < 1e-5 * want.loss.item()
