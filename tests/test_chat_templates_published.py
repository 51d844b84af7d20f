"""Published chat templates rendered by minilora against transformers' apply_chat_template.

The templates are the models' own, as llama.cpp keeps them and llama-cpp-python's
pinned source package ships them (tests/helpers_templates.py; nothing of them is
committed). Each family's is rendered on SmolLM2's tokenizer with that family's special
tokens and bos/eos: four conversations, with and without the generation prompt, give
the same text and ids as transformers, and the same error where transformers raises.
Every other template the package ships is held to the same text, tools, tool calls
content given as a list of parts and a prefilled answer (continue_final_message)
included. And on three families' templates, none with {% generation %} blocks, the
labels of a multi-turn chat are every assistant answer with its end-of-turn token and
nothing else.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass

import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers
from transformers import AutoTokenizer

from helpers_templates import published_templates, tokenizer_folder
from minilora.io.chat_template import ChatTemplateError
from minilora.io.tokenizer import load_tokenizer
from minilora.train.chat_labels import tokenize_chat
from test_chat_templates import CONVERSATIONS
from test_chat_turns import labelled_runs


@dataclass(frozen=True)
class Family:
    bos: str | None
    eos: str
    end_of_turn: str
    specials: tuple[str, ...]
    trims: bool = False  # the template writes message['content'] | trim


LLAMA3 = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")
QWEN = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
THINK = ("<think>", "</think>")
MISTRAL = ("[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]",
           "[/TOOL_RESULTS]")
FAMILIES = {
    "meta-llama-Llama-3.1-8B-Instruct": Family("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", LLAMA3, trims=True),
    "meta-llama-Llama-3.2-3B-Instruct": Family("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", LLAMA3, trims=True),
    "meta-llama-Llama-3.3-70B-Instruct": Family("<|begin_of_text|>", "<|eot_id|>", "<|eot_id|>", LLAMA3, trims=True),
    "Qwen-Qwen2.5-7B-Instruct": Family(None, "<|im_end|>", "<|im_end|>", QWEN),
    "Qwen-Qwen3-0.6B": Family(None, "<|im_end|>", "<|im_end|>", QWEN + THINK),
    "google-gemma-2-2b-it": Family("<bos>", "<eos>", "<end_of_turn>", ("<start_of_turn>", "<end_of_turn>"),
                                   trims=True),
    "microsoft-Phi-3.5-mini-instruct": Family("<s>", "<|endoftext|>", "<|end|>",
                                              ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")),
    "mistralai-Mistral-Nemo-Instruct-2407": Family("<s>", "</s>", "</s>", MISTRAL),
    "Mistral-Small-3.2-24B-Instruct-2506": Family("<s>", "</s>", "</s>",
                                                  MISTRAL + ("[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]")),
    "HuggingFaceTB-SmolLM3-3B": Family(None, "<|im_end|>", "<|im_end|>", THINK),
}


def _family_folder(tmp_path, name):
    family = FAMILIES[name]
    return tokenizer_folder(tmp_path / name, published_templates()[name], family.specials, family.bos, family.eos)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_pair(request, tmp_path_factory):
    folder = _family_folder(tmp_path_factory.mktemp("families"), request.param)
    return request.param, load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def _compare(ours, hf, messages, generation_prompt, ids=True, **kwargs):
    """Ours equals transformers: the text, the ids, or the error (with the template's origin)."""
    try:
        want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt, **kwargs)
    except Exception as e:
        with pytest.raises(ChatTemplateError) as got:
            ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
        assert str(e) in str(got.value) and "tokenizer_config.json" in str(got.value)
        return None
    got = ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
    assert got == want
    if ids:
        want_ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt,
                                          return_dict=False, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        **kwargs) == want_ids
    return got


def test_the_families_templates_are_all_there():
    assert set(FAMILIES) <= set(published_templates())


@pytest.mark.parametrize("generation_prompt", [False, True])
@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
def test_family_template_gives_transformers_text_ids_and_errors(family_pair, conversation, generation_prompt):
    name, ours, hf = family_pair
    _compare(ours, hf, CONVERSATIONS[conversation], generation_prompt)


def test_the_families_raise_where_their_templates_say(tmp_path):
    # Among the cases above, named: Gemma refuses a system turn; Mistral and Gemma
    # refuse roles that do not alternate.
    gemma = load_tokenizer(_family_folder(tmp_path, "google-gemma-2-2b-it"))
    with pytest.raises(ChatTemplateError, match="System role not supported"):
        gemma.apply_chat_template(CONVERSATIONS["system and turns"])
    mistral = load_tokenizer(_family_folder(tmp_path, "mistralai-Mistral-Nemo-Instruct-2407"))
    for tok in (mistral, gemma):
        with pytest.raises(ChatTemplateError, match="alternate"):
            tok.apply_chat_template(CONVERSATIONS["roles do not alternate"])


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city, °C",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}]
TOOL_CHAT = [
    {"role": "system", "content": "Be helpful."},
    {"role": "user", "content": "Weather in Tartu?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Tartu"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "name": "get_weather", "content": "3"},
    {"role": "assistant", "content": "3 °C.", "reasoning_content": "The tool said 3."}]


@pytest.fixture(scope="module")
def small_tokenizer_json(tmp_path_factory):
    # Only the text is compared here, so a word-level vocabulary of a few tokens does: it
    # loads in milliseconds, where SmolLM2's takes a third of a second per library.
    backend = Backend(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("small") / "tokenizer.json"
    backend.save(str(path))
    return path


@pytest.mark.parametrize("name", sorted(published_templates()))
def test_every_published_template_renders_as_transformers_does(tmp_path, small_tokenizer_json, name):
    folder = tmp_path / "tok"
    folder.mkdir()
    shutil.copy(small_tokenizer_json, folder / "tokenizer.json")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "chat_template": published_templates()[name]}))
    ours, hf = load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)
    for conversation in CONVERSATIONS.values():
        for generation_prompt in (False, True):
            _compare(ours, hf, conversation, generation_prompt, ids=False)
    for messages, kwargs in ((TOOL_CHAT, {"tools": TOOLS}), (TOOL_CHAT[:2], {"tools": TOOLS}), (TOOL_CHAT, {}),
                             (TOOL_CHAT[:4], {"tools": TOOLS, "enable_thinking": False})):
        for generation_prompt in (False, True):
            _compare(ours, hf, messages, generation_prompt, ids=False, **kwargs)
    # Content as a list of typed parts, as multimodal chats send it: some templates read
    # the text parts, others fail on a list; either way as in transformers.
    parts = [{"role": "user", "content": [{"type": "text", "text": "Describe"}, {"type": "text", "text": "this."}]},
             {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]}]
    for generation_prompt in (False, True):
        _compare(ours, hf, parts, generation_prompt, ids=False)
    prefilled = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "The answer is"}]
    _compare(ours, hf, prefilled, False, ids=False, continue_final_message=True)


CHAT = [{"role": "system", "content": "You count."},
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": " Hello! How can I help? "},
        {"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the\nchicken..."},
        {"role": "user", "content": "And then?"}, {"role": "assistant", "content": "Three, four."}]


@pytest.mark.parametrize("turns", ["all", "last"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_labels_are_every_assistant_answer_and_nothing_else(tmp_path, name, turns):
    family = FAMILIES[name]
    tok = load_tokenizer(_family_folder(tmp_path, name))
    messages = CHAT[1:] if "gemma" in name else CHAT  # Gemma has no system role
    ids, labels = tokenize_chat(tok, messages, assistant_turns=turns)
    want = [(m["content"].strip() if family.trims else m["content"]) + family.end_of_turn
            for m in messages if m["role"] == "assistant"]
    if name == "Qwen-Qwen3-0.6B":
        # Qwen3 writes an empty reasoning block before an answer that follows the last user
        # message: the model writes it at inference (no thinking), so it is trained.
        want[-1] = "<think>\n\n</think>\n\n" + want[-1]
    assert labelled_runs(tok, ids, labels) == (want if turns == "all" else want[-1:])
    # The ids are the rendered conversation, through the final end-of-turn token.
    rendered = tok.decode(ids, skip_special_tokens=False)
    assert tok.apply_chat_template(messages, add_generation_prompt=False).startswith(rendered)
    assert rendered.endswith(family.end_of_turn)
