"""SmolLM2-135M (real weights) fine-tuned on multi-turn chats: the loss on every assistant
turn teaches the earlier turns, which training on the last turn only does not.

Each conversation has three exchanges with three different tasks: write a word in
capitals, write it backwards, count its letters. Only the third is ever the last turn,
so `assistant_turns = "last"` trains counting alone; "all" trains all three. The
held-out measure is the loss on the first two answers of conversations with unseen
words. Slow: two short LoRA runs (about a minute each on 2 CPU cores).
"""

import random

import pytest
import torch

import minilora
from helpers_smollm import smollm2_hf_dir
from minilora import LoraConfig, inject
from minilora.io.tokenizer import load_tokenizer
from minilora.train.batching import collate
from minilora.train.chat_labels import tokenize_chat
from minilora.train.data import IGNORE_INDEX
from minilora.train.loop import make_optimizer

WORDS = ("apple river stone cloud tiger lemon piano garden rocket winter candle silver forest dragon pencil "
         "bottle window castle mirror orange planet shadow butter engine violet meadow harbor jacket "
         "summer copper marble thunder kitten basket ladder saddle needle pepper cotton").split()


def conversation(words):
    a, b, c = words
    return [{"role": "user", "content": f"Write in capitals: {a}"}, {"role": "assistant", "content": a.upper()},
            {"role": "user", "content": f"Write backwards: {b}"}, {"role": "assistant", "content": b[::-1]},
            {"role": "user", "content": f"How many letters in: {c}"}, {"role": "assistant", "content": str(len(c))}]


def earlier_turns_only(labels):
    """labels with the final answer's run masked: what the first two answers score."""
    labels = list(labels)
    end = max(i for i, x in enumerate(labels) if x != IGNORE_INDEX)
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    labels[start:end + 1] = [IGNORE_INDEX] * (end + 1 - start)
    return labels


def heldout_loss(model, tok, convs):
    rows = []
    for conv in convs:
        ids, labels = tokenize_chat(tok, conv)
        rows.append({"input_ids": ids, "labels": earlier_turns_only(labels)})
    batch = collate(rows, tok.pad_token_id, "right")
    model.eval()
    with torch.no_grad():
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    model.train()
    return loss.item()


def train(tok, convs, turns, steps=30):
    torch.manual_seed(0)
    model = minilora.load_model(smollm2_hf_dir(), task="causal-lm", dtype="float32")
    inject(model, LoraConfig(r=8, alpha=16, target_modules="all-linear"))
    rows = [dict(zip(("input_ids", "labels"), tokenize_chat(tok, c, assistant_turns=turns))) for c in convs]
    optimizer = make_optimizer(model, 2e-3, 0.0, torch.device("cpu"))
    model.train()
    rng = random.Random(0)
    for _ in range(steps):
        batch = collate(rng.sample(rows, 8), tok.pad_token_id, "right")
        loss = model(batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model


@pytest.mark.slow
def test_all_turns_teach_the_earlier_answers_that_last_turn_training_does_not():
    tok = load_tokenizer(smollm2_hf_dir())
    rng = random.Random(1)
    train_words, test_words = WORDS[:30], WORDS[30:]
    convs = [conversation(rng.sample(train_words, 3)) for _ in range(64)]
    heldout = [conversation(rng.sample(test_words, 3)) for _ in range(12)]
    base = minilora.load_model(smollm2_hf_dir(), task="causal-lm", dtype="float32")
    before = heldout_loss(base, tok, heldout)
    after_all = heldout_loss(train(tok, convs, "all"), tok, heldout)
    after_last = heldout_loss(train(tok, convs, "last"), tok, heldout)
    assert after_all < 0.5 * before, (before, after_all, after_last)
    assert after_all < 0.6 * after_last, (before, after_all, after_last)
