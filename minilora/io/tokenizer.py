"""A small tokenizer wrapper over the `tokenizers` library, for HF model folders.

An HF folder describes its tokenizer in two layers. `tokenizer.json` is the complete
pipeline the Rust `tokenizers` library runs: normalizer (e.g. BERT lower-casing) ->
pre-tokenizer (split into words/digits/bytes) -> model (WordPiece or BPE) ->
post-processor (add [CLS]/[SEP] or BOS) -> decoder. `tokenizer_config.json` (and the
older `special_tokens_map.json`) add what the pipeline does not know: which strings
are bos/eos/pad, which side to pad on, the maximum length, and the chat template.

Two families matter here. BERT's WordPiece splits words into "##"-prefixed pieces
and its post-processor wraps every sequence in [CLS] ... [SEP]. Byte-level BPE
(GPT-2, Llama-3, SmolLM2, Qwen2) maps each UTF-8 byte to a printable character and
merges frequent pairs, so any text round-trips through encode/decode exactly.

Chat templates are Jinja programs that ship with the model (chat_template in
tokenizer_config.json, or chat_template.jinja and additional_chat_templates/, which win;
a model may name several, "default" and "tool_use" say). `apply_chat_template` runs
the model's own template in jinja2's sandbox as transformers does (chat_template.py),
so every family's format, and a fine-tune's edit of it, renders exactly.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from tokenizers import Tokenizer as _Backend
from tokenizers import processors

from .chat_template import has_generation_blocks, render
from .paths import resolve_model_path

SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")
VERY_LARGE_LENGTH = int(1e30)  # transformers' "no limit" model_max_length

# The format for a folder that ships no template: ChatML, transformers' old class default.
CHATML_TEMPLATE = ("{% for message in messages %}"
                   "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
                   "{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def _token_content(value) -> str | None:
    # Configs store special tokens either as a string or as a serialized AddedToken.
    if isinstance(value, dict):
        return value.get("content")
    return value


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


class Tokenizer:
    """Encode/decode/batch/chat-format text for one model folder (see `load_tokenizer`)."""

    def __init__(self, backend: _Backend, config: dict | None = None):
        config = config or {}
        self.backend = backend
        self.config = config
        for key in SPECIAL_TOKEN_KEYS:
            setattr(self, key, _token_content(config.get(key)))
        self.model_max_length = int(config.get("model_max_length") or VERY_LARGE_LENGTH)
        self.truncation_side = config.get("truncation_side", "right")
        self.padding_side = config.get("padding_side", "right")
        # One template (a string) or several by name, as configs store them:
        # [{"name": "default", "template": ...}, {"name": "tool_use", ...}] becomes a dict.
        self.chat_template = config.get("chat_template")
        if isinstance(self.chat_template, (list, tuple)):
            self.chat_template = {t["name"]: t["template"] for t in self.chat_template}
        self._warned_chatml = False
        self.add_bos_token = bool(config.get("add_bos_token", False))
        self.add_eos_token = bool(config.get("add_eos_token", False))
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))

        # tokenizer.json may carry its own fixed padding/truncation (MiniLM's pads every
        # input to 128). Those are per-call choices here, so switch them off once.
        backend.no_padding()
        backend.no_truncation()
        # tokenizer.json's post-processor is the authority on BOS/EOS (transformers v5
        # ignores add_bos_token when a tokenizer.json exists). Only a pipeline with no
        # post-processor at all takes the flags from the config.
        if backend.post_processor is None and (self.add_bos_token or self.add_eos_token):
            self._set_bos_eos_post_processor()

    def _set_bos_eos_post_processor(self) -> None:
        add_bos = self.add_bos_token and self.bos_token_id is not None
        add_eos = self.add_eos_token and self.eos_token_id is not None
        single = " ".join(([f"{self.bos_token}:0"] if add_bos else []) + ["$A:0"]
                          + ([f"{self.eos_token}:0"] if add_eos else []))
        pair = single + " " + single.replace(":0", ":1").replace("$A", "$B")
        specials = ([(self.bos_token, self.bos_token_id)] if add_bos else []) + \
                   ([(self.eos_token, self.eos_token_id)] if add_eos else [])
        self.backend.post_processor = processors.TemplateProcessing(
            single=single, pair=pair, special_tokens=specials)

    # -- ids and sizes -------------------------------------------------------------

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self.token_to_id(self.eos_token)

    @property
    def unk_token_id(self) -> int | None:
        return self.token_to_id(self.unk_token)

    @property
    def cls_token_id(self) -> int | None:
        return self.token_to_id(self.cls_token)

    @property
    def sep_token_id(self) -> int | None:
        return self.token_to_id(self.sep_token)

    @property
    def pad_token_id(self) -> int | None:
        # Decoder-only models often ship without a pad token; padding with eos is the
        # usual choice because the attention mask hides those positions anyway.
        pad = self.token_to_id(self.pad_token)
        return pad if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens), like transformers."""
        return self.backend.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def padding_side(self) -> str:
        return self._padding_side

    @padding_side.setter
    def padding_side(self, side: str) -> None:
        if side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {side!r}")
        self._padding_side = side

    # -- encode / decode -----------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # The cleanup ("word ." -> "word.") repairs WordPiece output but would corrupt
        # byte-level BPE, which already reproduces the original spacing.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                         (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"),
                         (" 're", "'re")):
                text = text.replace(a, b)
        return text

    def batch_decode(self, batch, skip_special_tokens: bool = True) -> list[str]:
        if isinstance(batch, torch.Tensor):
            batch = batch.tolist()
        return [self.decode(ids, skip_special_tokens) for ids in batch]

    def __call__(self, texts: list[str] | str, padding: bool | str = True,
                 truncation: bool = False, max_length: int | None = None,
                 return_tensors: str | None = "pt", add_special_tokens: bool = True) -> dict:
        """Batch-encode: {"input_ids", "attention_mask"}, padded on `padding_side`.

        padding: True/"longest" pads to the longest text, "max_length" to `max_length`,
        False leaves rows ragged (only with return_tensors=None). truncation cuts to
        `max_length` (default model_max_length) keeping special tokens.
        """
        if isinstance(texts, str):
            texts = [texts]
        if truncation:
            limit = max_length if max_length is not None else self.model_max_length
            if limit < VERY_LARGE_LENGTH:
                self.backend.enable_truncation(limit, direction=self.truncation_side)
        try:
            rows = [e.ids for e in self.backend.encode_batch(
                list(texts), add_special_tokens=add_special_tokens)]
        finally:
            self.backend.no_truncation()

        if padding in (True, "longest"):
            width = max((len(r) for r in rows), default=0)
        elif padding == "max_length":
            if max_length is None:
                raise ValueError("padding='max_length' needs max_length=...")
            width = max_length
        elif padding in (False, "do_not_pad", None):
            width = None
        else:
            raise ValueError(f"padding must be True, False, 'longest' or 'max_length', got {padding!r}")

        masks = [[1] * len(r) for r in rows]
        if width is not None:
            pad_id = self.pad_token_id
            if pad_id is None:
                raise ValueError("this tokenizer has neither a pad nor an eos token; "
                                 "set tokenizer.pad_token = '<some token>' before padding")
            for i, r in enumerate(rows):
                n = max(width - len(r), 0)
                if self.padding_side == "left":
                    rows[i], masks[i] = [pad_id] * n + r, [0] * n + masks[i]
                else:
                    rows[i], masks[i] = r + [pad_id] * n, masks[i] + [0] * n

        if return_tensors is None:
            return {"input_ids": rows, "attention_mask": masks}
        if return_tensors != "pt":
            raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if len({len(r) for r in rows}) > 1:
            raise ValueError("rows have different lengths; use padding=True to return tensors")
        return {"input_ids": torch.tensor(rows, dtype=torch.long),
                "attention_mask": torch.tensor(masks, dtype=torch.long)}

    # -- chat formatting -------------------------------------------------------------

    def chat_template_text(self, chat_template: str | None = None, tools=None) -> str | None:
        """The template to render, chosen as transformers' get_chat_template chooses: of a
        model's named templates, `chat_template` if it names one, else "tool_use" when tools
        are given and there is one, else "default"; otherwise `chat_template` itself (a
        template's text) if given, else the model's one template, or None."""
        return self._chosen_template(chat_template, tools)[0]

    def _chosen_template(self, chat_template, tools) -> tuple[str | None, str]:
        """(template text, where it comes from: a file, or the caller)."""
        folder = self.config.get("tokenizer_folder")
        # Templates read from files name their file; the others are tokenizer_config.json's.
        files = self.config.get("chat_template_files", {})
        in_config = str(Path(folder) / "tokenizer_config.json") if folder else "the chat template"
        given = (chat_template, "the chat_template argument")
        t = self.chat_template
        if isinstance(t, dict):
            if chat_template is not None and chat_template in t:
                name = chat_template
            elif chat_template is not None:
                return given
            elif tools is not None and "tool_use" in t:
                name = "tool_use"
            elif "default" in t:
                name = "default"
            else:
                raise ValueError(f"{self.config.get('tokenizer_folder', 'this tokenizer')} has several chat "
                                 f"templates and none is named 'default': pass chat_template= one of {sorted(t)}")
            return t[name], files.get(name, in_config)
        if chat_template is not None:
            return given
        return t, files.get("default", in_config)

    def template_variables(self) -> dict:
        """The named special tokens a template sees (bos_token, eos_token, ...), as transformers passes them."""
        return {key: getattr(self, key) for key in SPECIAL_TOKEN_KEYS if getattr(self, key) is not None}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            tokenize: bool = False, *, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, chat_template: str | None = None,
                            continue_final_message: bool | str = False, generation_spans: bool = False,
                            **template_kwargs):
        """Render `[{"role", "content"}, ...]` with the model's own chat template.

        The text transformers' `apply_chat_template(messages, tokenize=False,
        add_generation_prompt=...)` gives, or its ids with tokenize=True (the template
        writes every special token itself, so none is added). Keywords such as
        `enable_thinking=False` reach the template as variables. `chat_template` names one
        of the model's templates or is a template's text; continue_final_message leaves the
        last message open for the model to continue (a prefilled answer). A folder without
        a template renders ChatML (with a warning), as transformers once did by default.
        With generation_spans=True: (text, [(start, end), ...]), the character ranges of
        the template's {% generation %} blocks (see `marks_generation`).
        """
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation: give at least one message")
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible: continue the "
                             "final message, or open a new assistant turn, not both (pass add_generation_prompt=False)")
        if continue_final_message and generation_spans:
            raise ValueError("continue_final_message is not compatible with generation_spans")
        source, origin = self._chosen_template(chat_template, tools)
        if source is None:
            source, origin = CHATML_TEMPLATE, self._chatml_origin()
        rendered = render(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                          documents=documents, origin=origin, variables={**self.template_variables(), **template_kwargs},
                          spans=generation_spans, continue_final_message=continue_final_message)
        if generation_spans:
            return rendered
        return self.encode(rendered, add_special_tokens=False) if tokenize else rendered

    def marks_generation(self) -> bool:
        """Whether the chat template marks the assistant's text with {% generation %} blocks."""
        return has_generation_blocks(self.chat_template_text() or "")

    def _chatml_origin(self) -> str:
        if not self._warned_chatml:
            self._warned_chatml = True
            warnings.warn(f"{self.config.get('tokenizer_folder', 'this tokenizer')} has no chat template "
                          "(no chat_template in tokenizer_config.json, no chat_template.jinja): rendering ChatML "
                          "(<|im_start|>role ... <|im_end|>); put the model's template in chat_template.jinja "
                          "to use its own format", stacklevel=3)
        return "minilora's ChatML fallback template"


def load_tokenizer(path) -> Tokenizer:
    """Load the tokenizer of an HF model folder (or of its tokenizer.json file, or `pkg:NAME`)."""
    path = resolve_model_path(path)
    folder = path.parent if path.name == "tokenizer.json" else path
    if not folder.exists():
        raise FileNotFoundError(f"tokenizer folder not found: {folder}")
    tok_file = folder / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(
            f"{tok_file} not found: minilora needs a 'fast' tokenizer.json (a folder with only "
            f"vocab.txt or tokenizer.model can be converted once with transformers' "
            f"AutoTokenizer.from_pretrained(...).save_pretrained(...))")
    config = _read_json(folder / "special_tokens_map.json")
    config.update(_read_json(folder / "tokenizer_config.json"))  # the newer file wins
    config["tokenizer_folder"] = str(folder)
    config.update(_chat_template_files(folder))
    return Tokenizer(_Backend.from_file(str(tok_file)), config)


def _chat_template_files(folder: Path) -> dict:
    """The folder's chat template files and the file each comes from, as transformers reads
    them: chat_template.jinja (the default) and additional_chat_templates/NAME.jinja, when
    any exist, replace what tokenizer_config.json holds."""
    found = {}
    if (folder / "chat_template.jinja").is_file():
        found["default"] = folder / "chat_template.jinja"
    extra = folder / "additional_chat_templates"
    if extra.is_dir():
        found.update({p.name.removesuffix(".jinja"): p for p in sorted(extra.glob("*.jinja"))})
    if not found:
        return {}
    texts = {name: path.read_text(encoding="utf-8") for name, path in found.items()}
    return {"chat_template": texts["default"] if list(texts) == ["default"] else texts,
            "chat_template_files": {name: str(path) for name, path in found.items()}}
