"""Loss on every assistant turn (minilora.train.chat_labels).

On a template with {% generation %} blocks the labels are transformers'
return_assistant_tokens_mask. On templates without them (SmolLM2's own, and the Llama
3, Gemma 2 and Phi-3 formats of test_chat_templates.py, on SmolLM2's tokenizer with
those families' end-of-turn tokens added as special tokens), the labelled tokens are,
turn by turn, exactly the assistant message's text and its end-of-turn token.
"""

import json

import pytest
from transformers import AutoTokenizer

from helpers_smollm import smollm2_hf_dir
from helpers_templates import tokenizer_folder
from minilora.io.tokenizer import load_tokenizer
from minilora.train.batching import chat_examples
from minilora.train.chat_labels import tokenize_chat
from minilora.train.data import IGNORE_INDEX, read_instructions
from test_chat_templates import CONVERSATIONS, GEMMA2, LLAMA3, PHI3, QWEN3

END_OF_TURN = {"smollm2": "<|im_end|>", "llama3": "<|eot_id|>", "gemma2": "<end_of_turn>", "phi3": "<|end|>"}
TEMPLATES = {"smollm2": None, "llama3": LLAMA3, "gemma2": GEMMA2, "phi3": PHI3}
FOUR_TURNS = CONVERSATIONS["four turns"]
SIX_TURNS = [{"role": "system", "content": "You count."}] + FOUR_TURNS + [
    {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Three, four."}]


def _folder(tmp_path, template, specials=()):
    return tokenizer_folder(tmp_path / "tok", template, specials)


def labelled_runs(tok, ids, labels):
    """The decoded text of each run of consecutive labelled tokens."""
    runs, current = [], []
    for i, label in zip(ids, labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == i
            current.append(i)
    if current:
        runs.append(current)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize("conversation", ["four turns", "six turns"])
def test_every_assistant_turn_and_nothing_else_is_labelled(tmp_path, family, conversation):
    tok = load_tokenizer(_folder(tmp_path, TEMPLATES[family], specials=[END_OF_TURN[family]]))
    messages = FOUR_TURNS if conversation == "four turns" else SIX_TURNS
    if family == "gemma2":
        messages = [m for m in messages if m["role"] != "system"]
    ids, labels = tokenize_chat(tok, messages)
    trims = family in ("llama3", "gemma2")  # their templates write message['content'] | trim
    want = [(m["content"].strip() if trims else m["content"]) + END_OF_TURN[family]
            for m in messages if m["role"] == "assistant"]
    assert labelled_runs(tok, ids, labels) == want
    # The whole conversation is in the ids: the text the template renders, up to the
    # final end-of-turn token (what a template writes after it is not trained on).
    text = tok.apply_chat_template(messages, add_generation_prompt=False)
    rendered = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith(rendered) and rendered.endswith(END_OF_TURN[family])
    # "last" tokenizes everything before the final answer in one piece, "all" the text
    # between answers piece by piece (each prompt as at inference): the same text.
    ids_last, labels_last = tokenize_chat(tok, messages, assistant_turns="last")
    assert tok.decode(ids_last, skip_special_tokens=False) == rendered
    assert labelled_runs(tok, ids_last, labels_last) == want[-1:]


def test_single_turn_labels_are_the_same_in_all_and_last(tmp_path):
    tok = load_tokenizer(smollm2_hf_dir())
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert tokenize_chat(tok, messages) == tokenize_chat(tok, messages, assistant_turns="last")
    ids, labels = tokenize_chat(tok, messages)
    assert labelled_runs(tok, ids, labels) == ["Hello.<|im_end|>"]


@pytest.mark.parametrize("turns", ["all", "last"])
def test_generation_blocks_give_transformers_assistant_mask(tmp_path, turns):
    folder = _folder(tmp_path, QWEN3)
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    messages = SIX_TURNS
    out = hf.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = tokenize_chat(ours, messages, assistant_turns=turns)
    assert ids == out["input_ids"]
    mask = [int(label != IGNORE_INDEX) for label in labels]
    if turns == "all":
        assert mask == out["assistant_masks"]
    else:
        last_start = max(i for i, m in enumerate(out["assistant_masks"]) if m and not out["assistant_masks"][i - 1])
        assert mask == [m if i >= last_start else 0 for i, m in enumerate(out["assistant_masks"])]
    assert sum(mask) > 0 and labelled_runs(ours, ids, labels)[-1] == "Three, four.<|im_end|>"


def test_a_template_that_rewrites_earlier_turns_still_labels_every_answer(tmp_path):
    # Qwen3's way: an assistant turn's reasoning is written only while no user message
    # follows it, so the first answer renders one way alone and another way later on.
    # No prefix of the conversation is a prefix of its text; the placeholders find the turns.
    template = QWEN3.replace("{%- generation %}", "").replace("{%- endgeneration %}", "")
    tok = load_tokenizer(_folder(tmp_path, template))
    messages = [dict(m, reasoning_content=f"thought {i}") if m["role"] == "assistant" else m
                for i, m in enumerate(FOUR_TURNS)]
    ids, labels = tokenize_chat(tok, messages)
    final = "<think>\nthought 3\n</think>\n\nWhy did the\nchicken...<|im_end|>"
    assert labelled_runs(tok, ids, labels) == ["Hello! How can I help?<|im_end|>", final]
    assert tok.apply_chat_template(messages, add_generation_prompt=False).startswith(
        tok.decode(ids, skip_special_tokens=False))
    ids_last, labels_last = tokenize_chat(tok, messages, assistant_turns="last")
    assert labelled_runs(tok, ids_last, labels_last) == [final]  # found prefix by prefix: the same
    assert ids_last == ids


def test_a_template_that_drops_earlier_answers_is_a_clear_error(tmp_path):
    template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                "{% if m.role == 'assistant' and not loop.last %}(answered){% else %}{{ m.content }}{% endif %}"
                "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok = load_tokenizer(_folder(tmp_path, template))
    with pytest.raises(ValueError, match="does not write every trained assistant answer.*assistant_turns = 'last'"):
        tokenize_chat(tok, FOUR_TURNS)
    ids, labels = tokenize_chat(tok, FOUR_TURNS, assistant_turns="last")
    assert labelled_runs(tok, ids, labels) == ["Why did the\nchicken...<|im_end|>"]


def test_truncation_keeps_the_labels_of_a_cut_turn(tmp_path):
    tok = load_tokenizer(smollm2_hf_dir())
    ids, labels = tokenize_chat(tok, FOUR_TURNS)
    first_answer = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    cut_ids, cut_labels = tokenize_chat(tok, FOUR_TURNS, max_length=first_answer + 3)
    assert cut_ids == ids[:first_answer + 3] and cut_labels == labels[:first_answer + 3]
    assert sum(label != IGNORE_INDEX for label in cut_labels) == 3
    examples = chat_examples(tok, [FOUR_TURNS], max_length=first_answer + 3)
    assert examples.examples[0]["labels"] == cut_labels and examples.stats["truncated"] == 1


def test_sharegpt_rows_are_read_as_chats(tmp_path):
    rows = [{"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"},
                               {"from": "gpt", "value": "Hello"}, {"from": "human", "value": "Bye"},
                               {"from": "gpt", "value": "Goodbye"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    convs = read_instructions(path)
    assert convs[0] == [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                        {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                        {"role": "assistant", "content": "Goodbye"}]
    tok = load_tokenizer(smollm2_hf_dir())
    ids, labels = tokenize_chat(tok, convs[0])
    assert labelled_runs(tok, ids, labels) == ["Hello<|im_end|>", "Goodbye<|im_end|>"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"conversations": [{"from": "narrator", "value": "Once"}]}))
    with pytest.raises(ValueError, match=f"{bad}.*unknown ShareGPT speaker 'narrator'.*'gpt'"):
        read_instructions(bad)


def test_config_chooses_the_turns(tmp_path):
    from minilora.train.config import ConfigError, load_config

    cfg = tmp_path / "c.toml"
    cfg.write_text('[model]\npath = "m"\n[data]\ntrain_file = "t.jsonl"\nassistant_turns = "some"\n')
    with pytest.raises(ConfigError, match="assistant_turns.*'all'.*'last'"):
        load_config(cfg)
    cfg.write_text('[model]\npath = "m"\n[data]\ntrain_file = "t.jsonl"\n')
    assert load_config(cfg).data.assistant_turns == "all"
