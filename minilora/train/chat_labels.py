"""Which tokens of a chat the model learns from: every assistant turn, and nothing else.

A chat example is rendered with the model's own template (minilora.io.chat_template)
and trained with the loss on the assistant's tokens only:

    L = -(1/|A|) Σ_{t ∈ A} log p_θ(x_t | x_<t),   A = the tokens of each assistant answer
                                                     and the end-of-turn token after it

labels[t] = input_ids[t] for t in A and -100 (no loss) elsewhere: system and user
turns, the template's headers and generation prompt, and what it writes after an
end-of-turn token. The end-of-turn token (<|im_end|>, <|eot_id|>, <end_of_turn>, ...)
is in A because emitting it is how the model learns to stop.

The template is a program, so where each answer lands in its text is found, not
assumed. Three ways, the first that works:

1. The template marks the assistant's text with {% generation %} blocks: A is the tokens
   that overlap them, as transformers' return_assistant_tokens_mask.
2. Prefix by prefix: turn i starts where the conversation before it plus the generation
   prompt ends (the text the model is given at inference), and ends where the
   conversation cut after it parts from the whole one. This holds for a template that
   renders the start of a conversation the same whatever follows (ChatML, Llama 3,
   Gemma, Phi-3).
3. With placeholders: some templates render a turn differently once later turns
   exist (Qwen3 gives only answers after the last user message a <think> block; Mistral
   writes the system prompt into the last user message). The conversation is rendered
   again with each trained answer replaced by a placeholder; the template's own text
   is then the pieces between placeholders, and each answer is what lies between two
   pieces in the real rendering. The turn starts after the generation prompt, where
   the template writes it, as in 2.

A template that defeats all three (one that drops earlier answers, say) is an error
that says so and offers assistant_turns="last".
"""

from __future__ import annotations

import os
import re

from ..io.chat_template import ChatTemplateError
from .data import IGNORE_INDEX

ASSISTANT_TURNS = ("all", "last")


def _encode(tokenizer, text: str) -> list[int]:
    # Rendered chat text already holds every special token the template wants (bos
    # included, if any), so the tokenizer must not add its own: as transformers'
    # apply_chat_template(tokenize=True) does.
    return list(tokenizer.encode(text, add_special_tokens=False))


def _special_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special added tokens (<|im_end|>, <|eot_id|>, <end_of_turn>, ...)."""
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "get_added_tokens_decoder"):
        return {i for i, token in backend.get_added_tokens_decoder().items() if token.special}
    eos = getattr(tokenizer, "eos_token_id", None)
    return set() if eos is None else {eos}


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)


def _turn_end(tokenizer, text: str, content: str, special: set[int]) -> tuple[list[int], int | None]:
    """The ids of one assistant turn's rendered text, and how many of them to train on:
    through the first special token after the message's content (its end-of-turn token),
    or None when no special token follows it."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:  # a tokenizer without offsets: search from the turn's start
        ids = _encode(tokenizer, text)
        return ids, next((j + 1 for j, t in enumerate(ids) if t in special), None)
    enc = backend.encode(text, add_special_tokens=False)
    # Where the content ends in the turn's text: templates may trim it or add to it.
    body = content.strip()
    found = text.rfind(body) if body else -1
    after = found + len(body) if found >= 0 else 0
    end = next((j + 1 for j, (t, (start, _)) in enumerate(zip(enc.ids, enc.offsets))
                if t in special and start >= after), None)
    return list(enc.ids), end


def _marked_turns(tokenizer, messages: list[dict], assistant_turns: str) -> tuple[list[int], list[int]] | None:
    """Labels from the template's own {% generation %} blocks, if it has them: every token
    that overlaps a block (the last block only for "last"), as transformers'
    return_assistant_tokens_mask marks them; None for a template without blocks."""
    if not getattr(tokenizer, "marks_generation", lambda: False)():
        return None
    text, spans = tokenizer.apply_chat_template(messages, add_generation_prompt=False, generation_spans=True)
    if assistant_turns == "last":
        spans = spans[-1:]
    enc = tokenizer.backend.encode(text, add_special_tokens=False)
    labels = [t if any(start < stop_s and end > start_s for start_s, stop_s in spans) else IGNORE_INDEX
              for t, (start, end) in zip(enc.ids, enc.offsets)]
    return list(enc.ids), labels


def _prefix_spans(tokenizer, messages: list[dict], full: str, turns: list[int]) -> list[tuple[int, int]] | None:
    """Way 2: each trained turn as a character span of `full`, found prefix by prefix; None
    when a shorter conversation's text is not the start of the longer one's."""
    spans = []
    for i in turns:
        try:
            prompt = _render(tokenizer, messages[:i], True) if i else ""
            through = full if i == len(messages) - 1 else _render(tokenizer, messages[:i + 1], False)
        except ChatTemplateError:  # a template may refuse a conversation cut short
            return None
        # Where the conversation that stops after this turn parts from the full one: a
        # template may close a conversation differently from a turn (Phi-3 writes eos there).
        stop = len(os.path.commonprefix([through, full]))
        body = messages[i]["content"].strip()
        if not (through.startswith(prompt) and full.startswith(prompt) and body in full[len(prompt):stop]):
            return None
        spans.append((len(prompt), stop))
    return spans


def _placeholder(k: int) -> str:
    # Letters of both cases, digits and no spaces: survives trim, and a template that
    # changes case or strips characters shows up as a placeholder not found.
    return f"Minilora{k}AnswerPlaceholder9q"


def _generation_prompt(tokenizer, messages: list[dict]) -> str:
    """What add_generation_prompt appends to `messages` ("<|im_start|>assistant\\n"), or ""."""
    closed, open_ = _render(tokenizer, messages, False), _render(tokenizer, messages, True)
    return open_[len(closed):] if open_.startswith(closed) else ""


def _placeholder_spans(tokenizer, messages: list[dict], full: str, turns: list[int]) -> list[tuple[int, int]] | None:
    """Way 3: the trained turns located through a rendering with placeholder answers;
    None when the placeholders do not come out once each, in order, or the real text does
    not fit around the template's pieces."""
    stand_in = list(messages)
    for k, i in enumerate(turns):
        stand_in[i] = {**messages[i], "content": _placeholder(k)}
    try:
        text = _render(tokenizer, stand_in, False)
    except ChatTemplateError:
        return None
    pieces, at = [], 0
    for k in range(len(turns)):
        mark = _placeholder(k)
        where = text.find(mark, at)
        if where < 0 or text.count(mark) != 1:
            return None
        pieces.append(text[at:where])
        at = where + len(mark)
    pieces.append(text[at:])
    # The answers are the shortest texts that make the pieces add up to the real text.
    match = re.fullmatch("(.*?)".join(re.escape(p) for p in pieces), full, flags=re.DOTALL)
    if match is None:
        return None
    starts = []
    for k, i in enumerate(turns):
        start, end = match.span(k + 1)
        if messages[i]["content"].strip() not in full[start:end]:
            return None
        # Start after the generation prompt, as way 2 does, when the template writes it
        # right before the answer: what it writes between them (Qwen3's empty <think>
        # block) is then the model's to produce, as at inference.
        prompt = _generation_prompt(tokenizer, messages[:i]) if i else ""
        before = full[match.end(k) if k else 0:start]  # the template's text before this answer
        cut = before.rfind(prompt) if prompt else -1
        starts.append(start - (len(before) - cut - len(prompt)) if cut >= 0 else start)
    return list(zip(starts, starts[1:] + [len(full)]))


def chat_ids(tokenizer, messages: list[dict], assistant_turns: str = "all") -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one conversation, untruncated; see `tokenize_chat`."""
    if assistant_turns not in ASSISTANT_TURNS:
        raise ValueError(f"assistant_turns must be one of {ASSISTANT_TURNS}, got {assistant_turns!r}")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError("the last message must be the assistant's answer (role 'assistant')")
    turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    if assistant_turns == "last":
        turns = turns[-1:]
    marked = _marked_turns(tokenizer, messages, assistant_turns)
    if marked is not None:
        return marked
    full = _render(tokenizer, messages, False)
    spans = _prefix_spans(tokenizer, messages, full, turns) or _placeholder_spans(tokenizer, messages, full, turns)
    if spans is None:
        raise ValueError(
            "the chat template does not write every trained assistant answer into the conversation's text "
            "as given (it drops or rewrites some), so those turns cannot be located"
            + ("; set data.assistant_turns = 'last' to train on the final answer only"
               if assistant_turns == "all" and len(turns) > 1 else "; format such data yourself as plain text"))
    special = _special_ids(tokenizer)
    eos = getattr(tokenizer, "eos_token_id", None)
    ids: list[int] = []
    labels: list[int] = []
    at = 0
    for k, ((start, stop), i) in enumerate(zip(spans, turns)):
        # Tokenized piece by piece, as at inference, where the model continues from the
        # prompt's ids exactly: BPE can merge across the prompt/answer boundary ("Assistant: "
        # + "Hi" is " Hi" in the joined text), so an answer is tokenized alone.
        head = _encode(tokenizer, full[at:start])
        ids += head
        labels += [IGNORE_INDEX] * len(head)
        answer, end = _turn_end(tokenizer, full[start:stop], messages[i]["content"], special)
        last = k == len(spans) - 1
        if end is None:
            # No end-of-turn token after the answer: the final answer gets eos appended, so
            # the model still learns where an answer ends; an earlier one is trained as is.
            tail = answer + ([eos] if last and eos is not None else [])
            ids += tail
            labels += tail
        elif last:
            # Through the end-of-turn token; what follows it (ChatML's "\n") is dropped:
            # the model stops at that token and never needs to predict the rest.
            ids += answer[:end]
            labels += answer[:end]
        else:
            ids += answer
            labels += answer[:end] + [IGNORE_INDEX] * (len(answer) - end)
        at = stop
    return ids, labels


def tokenize_chat(tokenizer, messages: list[dict], max_length: int | None = None,
                  assistant_turns: str = "all") -> tuple[list[int], list[int]]:
    """Tokenize one conversation with the tokenizer's chat template; loss on the assistant's turns.

    labels[i] equals input_ids[i] for the tokens of every assistant message (only the
    final one with assistant_turns="last") and the end-of-turn token after it, and is
    -100 for everything else: system and user turns, each turn's header or generation
    prompt (e.g. "<|im_start|>assistant\\n"), and what the template writes after an
    end-of-turn token. Labels are not shifted; the model shifts. Truncation (max_length)
    keeps the start and cuts the end; a turn it cuts keeps the labels of its first part.
    """
    ids, labels = chat_ids(tokenizer, messages, assistant_turns)
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels
