"""A model's chat template: its own Jinja program, rendered as transformers renders it.

A chat model is trained on conversations written in one exact text format, and the
format ships with the model as a Jinja template (`chat_template` in
tokenizer_config.json, or the file chat_template.jinja). Fine-tuned variants edit it, so
the template is part of the model: `render` runs it rather than re-implementing
each family's format.

Templates come from the Hub and are untrusted code, so they run in jinja2's immutable
sandbox, with the environment transformers gives them (utils/chat_template_utils.py):

- trim_blocks and lstrip_blocks (a block tag's own newline and indentation vanish),
  and the loop-controls extension ({% break %}, {% continue %});
- `tojson` as json.dumps (not Jinja's HTML-escaping one), `raise_exception(message)`,
  `strftime_now(format)`, a `dict` constructor and a `namespace` that refuses
  underscore-prefixed attributes;
- the variables `messages`, `tools`, `documents`, `add_generation_prompt` and the
  tokenizer's named special tokens (`bos_token`, `eos_token`, ...), plus any keyword the
  caller adds (`enable_thinking=False` for Qwen3, say);
- `{% generation %} ... {% endgeneration %}` around the assistant's text, which some
  templates carry: rendering records where each such block lands in the text
  (`render(..., spans=True)`), which is how transformers builds
  `return_assistant_tokens_mask`.

Everything the template sees is rebuilt from plain JSON types first (strings,
numbers, lists, dicts), so no object with methods reaches the sandbox.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """A chat template failed to compile or raised while rendering; names the template's origin."""


_SPANS: ContextVar[tuple[list[str], list[tuple[int, int]]] | None] = ContextVar("minilora_generation_spans",
                                                                               default=None)


class _GenerationSpans(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`: renders its body and, while a render is
    recording (render(..., spans=True)), notes where the body lands in the output."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_record", []), [], [], body).set_lineno(lineno)

    def _record(self, caller) -> str:
        text = caller()
        recording = _SPANS.get()
        if recording is not None:
            blocks, spans = recording
            start = sum(len(b) for b in blocks)
            spans.append((start, start + len(text)))
        return text


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the type object itself."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """Jinja's `namespace`, refusing underscore-prefixed names (a way towards CPython internals)."""

    def __init__(*args, **kwargs):  # noqa: N805  (Jinja's own signature trick: `self` may be a key)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, got {name!r}")


@lru_cache(maxsize=32)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationSpans, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(),
                       namespace=_TemplateNamespace)
    return env.from_string(source)


def plain(value: Any) -> Any:
    """`value` rebuilt from JSON types; anything else becomes a placeholder naming its type."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(plain(v) for v in value)
    if type(value).__module__ == "numpy" and getattr(value, "ndim", None) == 0:
        return plain(value.item())  # a numpy scalar (np.bool_(False) must stay falsy)
    return f"<{type(value).__name__}>"


# The names a message's reasoning comes under; templates read reasoning_content (Qwen3)
# or thinking (gpt-oss), so each message gets both, as transformers fills them.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def _messages(messages) -> list[dict]:
    out = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts like {{'role': 'user', 'content': '...'}}, got {message!r}")
        # As transformers does: a key whose value is None is dropped (an API's content=None).
        message = {k: v for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if k in message), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return plain(out)


# Appended to the message to continue, then cut off with everything the template writes
# after it (the end-of-turn token): transformers' own marker, so both cut at the same place.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _open_final_message(messages: list[dict], field: str, source: str, origin: str) -> str:
    """Tag the final message's `field` (its last text block, for a list of blocks) and
    return the text being continued."""
    last = messages[-1]
    final = last.get(field)
    if final is None:
        raise ChatTemplateError(f'{origin}: continue_final_message is set but the final message has no "{field}" '
                                "to continue")
    # Reasoning is copied under several names (see _messages): tag every copy.
    fields = [f for f in _REASONING_FIELDS if last.get(f) == final] if field in _REASONING_FIELDS else [field]
    if not any(f in source for f in fields):
        raise ChatTemplateError(f'{origin}: continue_final_message is set to "{field}", which the chat template '
                                "never reads")
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if "text" in block:
                final = block["text"]
                block["text"] = final + _CONTINUE_TAG
                return final
        raise ChatTemplateError(f"{origin}: continue_final_message is set but the final message has no text block "
                                "to continue")
    for f in fields:
        last[f] = last[f] + _CONTINUE_TAG
    return final


def _cut_after_final_message(text: str, final: str, origin: str) -> str:
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in text or tag not in text:
        raise ChatTemplateError(f"{origin}: continue_final_message is set but the chat template does not write the "
                                "final message as given (it deletes part of it), so there is nothing to continue")
    at = text.rindex(tag)
    # A template that trims the message also trimmed the tag's trailing space: trim alike.
    return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()


def render(source: str, messages, *, add_generation_prompt: bool = False, tools=None, documents=None,
           variables: dict | None = None, origin: str = "chat template", spans: bool = False,
           continue_final_message: bool | str = False):
    """The text of `messages` in the template `source`: what transformers' apply_chat_template
    (tokenize=False) returns. `variables`: the special tokens and any template keyword.

    With spans=True, returns (text, [(start, end), ...]): the character ranges of the
    template's {% generation %} blocks. continue_final_message (True for "content", or
    the field's name, "reasoning_content" say) ends the text inside the final message,
    for the model to continue it. A template that fails raises ChatTemplateError naming
    `origin` (its file) and Jinja's message."""
    for tool in tools or ():
        if not isinstance(tool, dict):
            raise TypeError(f"tools must be JSON-schema dicts ({{'type': 'function', 'function': {{...}}}}), got "
                            f"{tool!r}; minilora does not turn Python functions into schemas")
    context = dict(plain(variables or {}))
    context.update(messages=_messages(messages), tools=plain(tools), documents=plain(documents),
                   add_generation_prompt=add_generation_prompt)
    if continue_final_message:
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = _open_final_message(context["messages"], field, source, origin)
    try:
        template = _compile(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"{origin}: the chat template does not compile, line {e.lineno}: {e.message}") from e
    try:
        if not spans:
            text = template.render(**context)
            return _cut_after_final_message(text, final, origin) if continue_final_message else text
        with _recording() as (blocks, found):
            for block in template.generate(**context):
                blocks.append(block)
            return "".join(blocks), list(found)
    except jinja2.exceptions.TemplateError as e:
        raise ChatTemplateError(f"{origin}: {e.message or type(e).__name__}") from e
    except (TypeError, ValueError, LookupError, ArithmeticError, AttributeError) as e:
        # Python's own errors inside the template (a tool-use template given no tools
        # iterates None): transformers lets them out as they are; here they name the file.
        raise ChatTemplateError(f"{origin}: {type(e).__name__}: {e}") from e


@contextmanager
def _recording():
    blocks: list[str] = []
    found: list[tuple[int, int]] = []
    token = _SPANS.set((blocks, found))
    try:
        yield blocks, found
    finally:
        _SPANS.reset(token)


def has_generation_blocks(source: str) -> bool:
    """Whether the template marks the assistant's text with {% generation %}."""
    return re.search(r"\{%-?\s*generation\s*-?%\}", source) is not None
