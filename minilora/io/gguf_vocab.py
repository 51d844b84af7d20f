"""A model folder's tokenizer as GGUF `tokenizer.ggml.*` metadata, for llama.cpp.

llama.cpp re-implements each tokenizer instead of running tokenizer.json, so the GGUF
carries the pieces and a name for the rest:

    tokenizer.ggml.model        "gpt2": byte-level BPE (every byte has a printable stand-in), or
                                "llama": SentencePiece-style (spaces as "▁", unknown text as
                                <0xXX> byte tokens)
    tokenizer.ggml.pre          gpt2 only: which split regex runs before BPE (one per name)
    tokenizer.ggml.tokens       id -> token string, one per row of the embedding
    tokenizer.ggml.token_type   1 normal, 3 control (special), 4 user-defined, 5 unused
    tokenizer.ggml.merges       gpt2: ranked "left right" pairs
    tokenizer.ggml.scores       llama: per token; the highest-scoring adjacent pair merges first
    tokenizer.ggml.add_space_prefix   llama: whether "▁" is put before the text
    tokenizer.ggml.*_token_id   bos, eos, unknown, padding
    tokenizer.ggml.add_bos_token / add_eos_token
    tokenizer.chat_template     the Jinja template, as the model ships it

The pre-tokenizer is the part that must be named: tokenizer.json describes it as a
pipeline (a Split with a regex, Digits, ByteLevel's own GPT-2 regex), llama.cpp selects
a built-in regex by name. `identify_pre` recognises the pipelines of the families
minilora exports; any other one is an error that shows what was found, since a wrong
guess tokenizes digits or spaces differently without any other sign.

SentencePiece-style tokenizers (Llama 2, Mistral 7B) reach HF folders as a BPE model
with byte_fallback, its merges listed by rank. llama.cpp's "llama" tokenizer merges by
score instead, so each token's score is minus the rank of the first merge that makes
it: the pair HF merges first is the pair llama.cpp merges first.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .gguf_arch import ExportError
from .tokenizer import load_tokenizer

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# The split regexes of the Llama 3 and Qwen2 tokenizers: they differ only in how many
# digits make one piece (up to three, or one).
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = _LLAMA3_REGEX.replace(r"\p{N}{1,3}", r"\p{N}")

# llama.cpp's pre-tokenizer names minilora can tell apart, with what each one is.
PRE_TOKENIZERS = {
    "gpt-2": "GPT-2's regex (ByteLevel with use_regex)",
    "smollm": "every digit apart, then GPT-2's regex (SmolLM, SmolLM2)",
    "llama-bpe": "Llama 3's regex (runs of up to 3 digits)",
    "qwen2": "Qwen2/Qwen3's regex (single digits)",
}


def _describe(pre) -> str:
    return json.dumps(pre, separators=(",", ":"))[:300]


def identify_pre(pre_tokenizer: dict | None) -> str:
    """llama.cpp's name for a tokenizer.json `pre_tokenizer`, or ExportError."""
    def is_byte_level(step, regex):
        return step.get("type") == "ByteLevel" and bool(step.get("use_regex", True)) == regex \
            and not step.get("add_prefix_space", False)

    steps = (pre_tokenizer or {}).get("pretokenizers") if (pre_tokenizer or {}).get("type") == "Sequence" \
        else [pre_tokenizer] if pre_tokenizer else []
    if len(steps) == 1 and is_byte_level(steps[0], True):
        return "gpt-2"
    if len(steps) == 2 and steps[0].get("type") == "Digits" and steps[0].get("individual_digits") \
            and is_byte_level(steps[1], True):
        return "smollm"
    if len(steps) == 2 and steps[0].get("type") == "Split" and is_byte_level(steps[1], False) \
            and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert", False):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex == _LLAMA3_REGEX:
            return "llama-bpe"
        if regex == _QWEN2_REGEX:
            return "qwen2"
    names = ", ".join(f"{k} ({v})" for k, v in PRE_TOKENIZERS.items())
    raise ExportError(f"tokenizer.json's pre_tokenizer is not one minilora can name for llama.cpp: found "
                      f"{_describe(pre_tokenizer)}. If you know which llama.cpp pre-tokenizer it is, pass "
                      f"--pre NAME; names minilora recognises: {names}")


@dataclass
class Vocab:
    """What goes under tokenizer.* in the GGUF file."""

    model: str  # "gpt2" or "llama"
    tokens: list[str]
    token_types: list[int]
    pre: str | None = None  # gpt2
    merges: list[str] | None = None  # gpt2
    scores: list[float] | None = None  # llama
    add_space_prefix: bool = False  # llama
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unknown, padding
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None

    def metadata(self) -> list[tuple[str, str, object]]:
        keys = [("tokenizer.ggml.model", "string", self.model)]
        if self.model == "gpt2":
            keys.append(("tokenizer.ggml.pre", "string", self.pre))
        keys += [("tokenizer.ggml.tokens", "string[]", self.tokens),
                 ("tokenizer.ggml.token_type", "int32[]", self.token_types)]
        if self.model == "gpt2":
            keys.append(("tokenizer.ggml.merges", "string[]", self.merges))
        else:
            keys += [("tokenizer.ggml.scores", "float32[]", self.scores),
                     ("tokenizer.ggml.add_space_prefix", "bool", self.add_space_prefix)]
        keys += [(f"tokenizer.ggml.{k}_token_id", "uint32", v) for k, v in self.special_ids.items()]
        keys += [("tokenizer.ggml.add_bos_token", "bool", self.add_bos),
                 ("tokenizer.ggml.add_eos_token", "bool", self.add_eos)]
        if self.chat_template:
            keys.append(("tokenizer.chat_template", "string", self.chat_template))
        return keys


def _merges(model: dict) -> list[tuple[str, str]]:
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]


def _prepends_space(spec: dict) -> bool:
    """Whether the pipeline puts "▁" before the text (a Prepend normalizer, or a Metaspace
    pre-tokenizer whose prepend_scheme is not "never")."""
    def steps(part, key):
        if not part:
            return []
        return part.get(key, []) if part.get("type") == "Sequence" else [part]

    if any(n.get("type") == "Prepend" and n.get("prepend") == "\u2581"
           for n in steps(spec.get("normalizer"), "normalizers")):
        return True
    return any(p.get("type") == "Metaspace" and p.get("prepend_scheme", "always") != "never"
               for p in steps(spec.get("pre_tokenizer"), "pretokenizers"))


def _spm_scores_and_types(model: dict, by_id: dict[int, str], added: dict, n_vocab: int):
    rank = {}
    for r, (left, right) in enumerate(_merges(model)):
        rank.setdefault(left + right, r)
    unk = model.get("unk_token")
    scores, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        scores.append(-float(rank.get(token, 0)) if token is not None else 0.0)
        if token is None:
            types.append(TOKEN_UNUSED)
        elif token == unk:  # listed among the added special tokens too, but llama.cpp types it apart
            types.append(TOKEN_UNKNOWN)
        elif i in added:
            types.append(TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED)
        elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            types.append(TOKEN_BYTE)
        else:
            types.append(TOKEN_NORMAL)
    return scores, types


def read_vocab(model_dir: Path, n_vocab: int, pre: str | None = None) -> Vocab:
    """The GGUF vocabulary of `model_dir`'s tokenizer, padded to the embedding's `n_vocab` rows."""
    tok_file = Path(model_dir) / "tokenizer.json"
    if not tok_file.is_file():
        raise FileNotFoundError(f"{tok_file} not found: GGUF export needs the model's tokenizer.json")
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ExportError(f"{tok_file}: a {model.get('type')} tokenizer; GGUF export writes BPE tokenizers, "
                          f"byte-level (GPT-2, Llama 3, Qwen2/3, SmolLM2) or SentencePiece-style (Llama 2, Mistral)")
    spm = bool(model.get("byte_fallback"))
    if spm and pre is not None:
        raise ExportError("--pre names a byte-level BPE pre-tokenizer; this tokenizer is SentencePiece-style "
                          "(byte_fallback), which llama.cpp tokenizes without one: leave out --pre")
    if not spm and pre is None:
        pre = identify_pre(spec.get("pre_tokenizer"))
    elif not spm and (not pre or any(c.isspace() for c in pre)):
        raise ExportError(f"--pre {pre!r} is not a pre-tokenizer name; llama.cpp's names look like "
                          f"{', '.join(PRE_TOKENIZERS)}")

    tokenizer = load_tokenizer(model_dir)
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    by_id: dict[int, str] = {i: t for t, i in model.get("vocab", {}).items()}
    by_id.update({i: t["content"] for i, t in added.items()})
    if by_id and max(by_id) >= n_vocab:
        raise ExportError(f"{tok_file}: token id {max(by_id)} does not fit the model's {n_vocab} embedding rows")
    # Rows past the tokenizer (an embedding padded to a round size) are unused.
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    special = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id,
               "unknown": tokenizer.unk_token_id, "padding": tokenizer.pad_token_id}
    probe = tokenizer.encode("a")  # the post-processor, not a config flag, decides what encode() adds
    bos, eos = special["bos"], special["eos"]
    common = dict(tokens=tokens, special_ids={k: v for k, v in special.items() if v is not None},
                  add_bos=bos is not None and len(probe) > 1 and probe[0] == bos,
                  add_eos=eos is not None and len(probe) > 1 and probe[-1] == eos,
                  chat_template=tokenizer.chat_template_text())
    if spm:
        scores, types = _spm_scores_and_types(model, by_id, added, n_vocab)
        return Vocab(model="llama", token_types=types, scores=scores, add_space_prefix=_prepends_space(spec),
                     **common)
    types = [TOKEN_UNUSED if i not in by_id else
             (TOKEN_CONTROL if added[i].get("special") else TOKEN_USER_DEFINED) if i in added else TOKEN_NORMAL
             for i in range(n_vocab)]
    return Vocab(model="gpt2", pre=pre, token_types=types, merges=[" ".join(m) for m in _merges(model)], **common)
