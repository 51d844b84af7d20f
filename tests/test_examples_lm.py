"""The language-model examples: examples/alpaca_sft.py and examples/continued_pretraining.py.

Default run: each script's data preparation on a small slice of the real data, with
the real SmolLM2 tokenizer. The oracles are the plain tokenizer and the text itself:
in an SFT example the labelled tokens decode to exactly the reference answer plus
<|im_end|> and everything before them (the rendered prompt) is -100; packed blocks
are exactly the whole-text token stream, cut into equal rows, with nothing dropped
but the final partial block. The slow tests run each script for a few steps and
check what issue 5 asks of them: the held-out loss falls.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import minilora
import minilora.train.batching
from helpers_smollm import smollm2_hf_dir
from minilora.train.data import IGNORE_INDEX, read_instructions

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
ALPACA = DATA / "alpaca" / "alpaca_5000.json"
SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def need(path: Path) -> Path:
    assert path.is_file(), f"shared data not found: {path} (the repo expects ../shared/data beside it)"
    return path


@pytest.fixture(scope="module")
def tokenizer():
    return minilora.load_tokenizer(smollm2_hf_dir())


# -- alpaca_sft ---------------------------------------------------------------------------

def test_alpaca_split_is_disjoint_seeded_and_heldout_independent_of_train_size():
    sft = load_example("alpaca_sft")
    train, held = sft.split_rows(500, 20, 100, seed=0)
    assert len(train) == 100 and len(held) == 20 and not set(train) & set(held)
    assert sft.split_rows(500, 20, 100, seed=0) == (train, held)
    train2, held2 = sft.split_rows(500, 20, 300, seed=0)
    assert held2 == held and train2[:100] == train  # more training rows: same held-out rows
    assert sft.split_rows(500, 20, 100, seed=1)[1] != held
    with pytest.raises(SystemExit, match="file has 500"):
        sft.split_rows(500, 20, 481, seed=0)


def test_alpaca_labels_only_the_answer_and_its_end_token(tokenizer):
    sft = load_example("alpaca_sft")
    convs = read_instructions(need(ALPACA))[:40]
    train_set, held_set, held_convs = sft.prepare(tokenizer, convs, heldout=8, n_train=24, max_length=256, seed=0)
    assert len(train_set) == 24 and len(held_set) == 8
    train_rows, held_rows = sft.split_rows(40, 8, 24, seed=0)
    assert held_convs == [convs[i] for i in held_rows]
    checked = 0
    for example, conv in zip(train_set.examples + held_set.examples,
                             [convs[i] for i in train_rows] + held_convs):
        ids, labels = example["input_ids"], example["labels"]
        assert len(ids) == len(labels) <= 256
        prompt = tokenizer.apply_chat_template(conv[:-1], add_generation_prompt=True)
        assert prompt.endswith("<|im_start|>assistant\n") and conv[-1]["content"] not in prompt
        n_prompt = len(tokenizer.encode(prompt, add_special_tokens=False))
        # Every prompt position (system + user turns + generation prompt) is masked ...
        assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
        assert tokenizer.decode(ids[:n_prompt], skip_special_tokens=False) == prompt
        # ... and every answer position is labelled with its own token.
        assert labels[n_prompt:] == ids[n_prompt:] and len(labels) > n_prompt
        if len(ids) < 256:  # not truncated: the answer is all there, closed by <|im_end|>
            answer = tokenizer.decode(labels[n_prompt:], skip_special_tokens=False)
            assert answer == conv[-1]["content"] + "<|im_end|>"
            checked += 1
    assert checked >= 30


def test_alpaca_missing_data_names_the_path(tmp_path):
    sft = load_example("alpaca_sft")
    missing = tmp_path / "nowhere" / "alpaca_5000.json"
    with pytest.raises(SystemExit, match=re.escape(str(missing))):
        sft.main(["--data", str(missing)])
    assert sft.DATA == ALPACA  # the default is the shared folder next to the repository


# -- continued_pretraining ----------------------------------------------------------------

def test_shakespeare_split_cuts_at_a_blank_line_and_loses_nothing():
    cpt = load_example("continued_pretraining")
    text = need(SHAKESPEARE).read_text(encoding="utf-8")[:20_000]
    head, tail = cpt.split_text(text, 0.25)
    assert head + tail == text
    assert head.endswith("\n\n") and tail[:1].strip()  # the tail starts at a speaker's name
    assert len(text) * 0.75 <= len(head) < len(text) * 0.75 + 2_000


def test_shakespeare_blocks_are_the_text_stream_cut_into_equal_rows(tokenizer):
    cpt = load_example("continued_pretraining")
    text = need(SHAKESPEARE).read_text(encoding="utf-8")[:60_000]  # > 1,000 lines: pack_text encodes it in chunks
    block = 64
    train, held = cpt.prepare(tokenizer, text, block, 0.25, n_train=20, n_heldout=5, seed=0)
    head, tail = cpt.split_text(text, 0.25)
    eos = tokenizer.eos_token_id
    for part in (head, tail):
        # The oracle: the part tokenized in one call, then the eos that ends a document.
        stream = tokenizer.encode(part, add_special_tokens=False) + [eos]
        blocks = minilora.train.data.pack_text(tokenizer, part, block)
        assert blocks.shape == (len(stream) // block, block)  # only the last partial block is dropped
        assert blocks.flatten().tolist() == stream[:blocks.numel()]
    head_blocks = minilora.train.data.pack_text(tokenizer, head, block).tolist()
    tail_blocks = minilora.train.data.pack_text(tokenizer, tail, block).tolist()
    assert train.shape == (20, block) and held.shape == (5, block)
    rows = train.tolist()
    assert all(r in head_blocks for r in rows) and len({tuple(r) for r in rows}) == 20
    assert held.tolist() == tail_blocks[:5]
    assert rows != head_blocks[:20]  # a random subset of the plays, not the first scenes
    examples = minilora.train.batching.text_examples(train).examples
    assert all(e["labels"] == e["input_ids"] and len(e["input_ids"]) == block for e in examples)


def test_shakespeare_missing_data_names_the_path(tmp_path):
    cpt = load_example("continued_pretraining")
    missing = tmp_path / "input.txt"
    with pytest.raises(SystemExit, match=re.escape(str(missing))):
        cpt.main(["--data", str(missing)])
    assert cpt.DATA == SHAKESPEARE


# -- the examples, run for a few steps ----------------------------------------------------

def run_example(name: str, out: Path, *args: str) -> dict:
    proc = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--out", str(out), *args,
                           "--model", str(smollm2_hf_dir())],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "held-out loss" in proc.stdout
    return json.loads((out / "results.json").read_text())


@pytest.mark.slow
def test_alpaca_sft_few_steps_lowers_heldout_loss(tmp_path):
    need(ALPACA)
    result = run_example("alpaca_sft", tmp_path, "--steps", "8", "--heldout", "16", "--samples", "1",
                         "--max-new-tokens", "8")
    before, after = result["heldout_before"], result["heldout_after"]
    assert result["steps"] == 8 and result["heldout_rows"] == 16
    assert after["loss"] < before["loss"] - 0.02, (before, after)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_continued_pretraining_few_steps_lowers_heldout_loss(tmp_path):
    need(SHAKESPEARE)
    result = run_example("continued_pretraining", tmp_path, "--steps", "6", "--heldout-blocks", "8",
                         "--max-new-tokens", "8")
    before, after = result["heldout_before"], result["heldout_after"]
    assert result["steps"] == 6 and result["heldout_blocks"] == 8
    assert after["loss"] < before["loss"] - 0.02, (before, after)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
