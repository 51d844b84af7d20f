"""Reading and tokenizing training data: classification, instructions, raw text.

Three kinds of data, three ways to turn text into (input_ids, labels):

Classification (TSV/CSV/JSONL rows of text + label). One label per example; the model
reads the whole text and a head predicts the class. Labels become ids 0..K-1 and the
names are kept so predictions can be printed as "positive", not "1".

Instructions (Alpaca rows or chat `messages`). The model is a causal LM, but we train it
on the *response only*: prompt tokens get label -100, so the loss ignores them. Why:
the prompt is given at inference time, never generated, so fitting it spends capacity
on predicting the user's words (and the chat template's boilerplate, which repeats in
every example and would dominate the loss of short answers). The end-of-turn token
after the response *is* trained: it is how the model learns to stop. Which tokens of a
rendered conversation are the assistant's is `minilora.train.chat_labels`' job.

Raw text (continued pre-training). Every token is a target. Documents are tokenized,
joined with eos between them, and cut into fixed blocks of `block_size` ("packing"):
no padding at all, every position of every block trains, and the eos tells the model
where one document ends and an unrelated one starts. labels = input_ids; the model
shifts them by one internally.

This module reads files and tokenizes; `minilora.train.batching` wraps the results as
datasets (`build_datasets` does it all from a config) and turns them into padded
batches in the order the trainer wants.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..io.text_files import utf8_errors_named

IGNORE_INDEX = -100  # labels with this value carry no loss (torch's cross_entropy default)
FORMATS = ("tsv", "csv", "jsonl", "json", "text")


def detect_format(path, format: str = "auto") -> str:
    """The file format: `format` itself unless "auto", else from the extension."""
    if format != "auto":
        if format not in FORMATS:
            raise ValueError(f"unknown format {format!r}; use one of {', '.join(FORMATS)} or 'auto'")
        return format
    suffix = Path(path).suffix.lower()
    ext = {".tsv": "tsv", ".csv": "csv", ".jsonl": "jsonl", ".json": "json", ".txt": "text",
           ".text": "text", ".md": "text"}.get(suffix)
    if ext is None:
        raise ValueError(f"{path}: cannot tell the format from the extension {suffix!r}; "
                         f"set data.format to one of {', '.join(FORMATS)}")
    return ext


def _check_file(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}"
                                + (" (it is a folder)" if path.is_dir() else ""))
    return path


def _json_records(path: Path, fmt: str):
    """Yield (where, record) from a JSON list or a JSONL file; `where` names the row."""
    if fmt == "json":
        try:
            with utf8_errors_named(path):
                data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]  # {"data": [...]} wrappers, as HF's json loader accepts
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of objects; for one object "
                             f"per line use a .jsonl file")
        for i, rec in enumerate(data):
            yield f"{path}: item {i}", rec
        return
    with utf8_errors_named(path), path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({e.msg}); "
                                 f"each line of a .jsonl file must be one JSON object") from None


def _delimited_rows(path: Path, fmt: str):
    """Yield (line_number, fields) for a TSV or CSV file, blank lines skipped."""
    with utf8_errors_named(path), path.open(encoding="utf-8", newline="") as f:
        if fmt == "tsv":
            # TSV has no quoting convention: GLUE's SST-2 has sentences that begin with
            # a '"' and the csv module would swallow the following lines into them.
            for lineno, line in enumerate(f, 1):
                line = line.rstrip("\r\n")
                if line.strip():
                    yield lineno, line.split("\t")
        else:
            reader = csv.reader(f)
            start = 1
            try:
                for fields in reader:
                    if any(x.strip() for x in fields):
                        yield start, fields
                    start = reader.line_num + 1  # quoted fields may span lines
            except csv.Error as e:
                raise ValueError(f"{path}:{reader.line_num}: malformed CSV row ({e})") from None


@dataclass
class ClassificationData:
    texts: list[str]
    labels: list[int]
    label_names: list[str]
    skipped_empty: int = 0           # rows whose text was empty, not in texts/labels
    notes: list[str] = field(default_factory=list)  # things the caller should log


def _is_int(x) -> bool:
    if isinstance(x, bool):
        return False
    if isinstance(x, int):
        return True
    return isinstance(x, str) and x.strip().lstrip("-").isdigit()


def map_labels(raw: list, label_names: list[str] | None = None,
               where: list[str] | None = None) -> tuple[list[int], list[str]]:
    """Raw labels (ints or strings) -> (ids, names).

    Integers that are exactly 0..K-1 keep their ids; other integers are numbered in
    numeric order, strings in sorted order. With `label_names` (e.g. the training file's,
    when reading a validation file that may lack some classes) a label maps to the index
    of its name, or, if it is an integer below len(label_names), to itself.
    """
    keys = [str(int(x)) if _is_int(x) else str(x).strip() for x in raw]
    if label_names is not None:
        names = [str(n) for n in label_names]
        index = {n: i for i, n in enumerate(names)}
        ids = []
        for i, k in enumerate(keys):
            if k in index:
                ids.append(index[k])
            elif _is_int(k) and 0 <= int(k) < len(names):
                ids.append(int(k))
            else:
                at = f"{where[i]}: " if where else ""
                raise ValueError(f"{at}label {k!r} is not one of the known labels {names}")
        return ids, names
    distinct = set(keys)
    if distinct and all(_is_int(k) for k in distinct):
        values = sorted(int(k) for k in distinct)
        if values == list(range(len(values))):
            return [int(k) for k in keys], [str(v) for v in values]
        names = [str(v) for v in values]
    else:
        names = sorted(distinct)
    index = {n: i for i, n in enumerate(names)}
    return [index[k] for k in keys], names


def read_classification(path, text_column: str | int = "sentence", label_column: str | int = "label",
                        format: str = "auto", label_names: list[str] | None = None) -> ClassificationData:
    """Read (text, label) rows from a .tsv, .csv, .jsonl or .json file.

    Columns are named (the first TSV/CSV row is the header when it contains a requested
    name) or, for files without a header, given as integer indexes (text_column=1,
    label_column=0). When the named text column is missing from a two-column file, the
    column that is not the label is used and a note says so. Empty texts are skipped
    and counted; `label_names` fixes the id mapping (see map_labels).
    """
    path = _check_file(path)
    fmt = detect_format(path, format)
    texts, raw, where, skipped, notes = [], [], [], 0, []
    if fmt in ("jsonl", "json"):
        for at, rec in _json_records(path, fmt):
            if not isinstance(rec, dict):
                raise ValueError(f"{at}: expected a JSON object, got {type(rec).__name__}")
            for col in (text_column, label_column):
                if col not in rec:
                    raise ValueError(f"{at}: no column {col!r}; this row has columns {sorted(rec)}; "
                                     f"set data.text_column / data.label_column")
            text, label = rec[text_column], rec[label_column]
            if text is None or not str(text).strip():
                skipped += 1
                continue
            texts.append(str(text).strip())
            raw.append(label)
            where.append(at)
    elif fmt in ("tsv", "csv"):
        rows = list(_delimited_rows(path, fmt))
        if not rows:
            raise ValueError(f"{path} is empty")
        n_cols = len(rows[0][1])
        (ti, li), has_header = _columns(path, rows, text_column, label_column, notes)
        for lineno, fields in rows[1:] if has_header else rows:
            if len(fields) != n_cols:
                raise ValueError(f"{path}:{lineno}: malformed row: {len(fields)} fields, the first row has "
                                 f"{n_cols} (a stray tab/comma, or an unquoted line break?)")
            text, label = fields[ti].strip(), fields[li].strip()
            if not text:
                skipped += 1
                continue
            if not label:
                raise ValueError(f"{path}:{lineno}: empty label")
            texts.append(text)
            raw.append(label)
            where.append(f"{path}:{lineno}")
    else:
        raise ValueError(f"{path}: format {fmt!r} cannot hold classification rows; use tsv, csv, jsonl or json")
    if not texts:
        raise ValueError(f"{path}: no rows with text (skipped {skipped} empty)")
    labels, names = map_labels(raw, label_names, where)
    return ClassificationData(texts, labels, names, skipped, notes)


def _columns(path, rows: list, text_column, label_column, notes) -> tuple[list[int], bool]:
    """Column indexes of (text, label) and whether the first row is a header."""
    header = [h.strip() for h in rows[0][1]]
    named = [c for c in (text_column, label_column) if isinstance(c, str)]
    if not named:
        bad = [c for c in (text_column, label_column) if not 0 <= c < len(header)]
        if bad:
            raise ValueError(f"{path}: column index {bad[0]} out of range: the first row has "
                             f"{len(header)} columns (0..{len(header) - 1})")
        # Indexes only: the first row is a header if its label cell is not a number and
        # never recurs below (a real label, even a string one, recurs).
        cell = header[label_column]
        recurs = any(len(f) > label_column and f[label_column].strip() == cell for _, f in rows[1:])
        return [text_column, label_column], not _is_int(cell) and not recurs
    if not any(c in header for c in named):
        raise ValueError(f"{path} has no header row naming {' or '.join(map(repr, named))} (first row: "
                         f"{header[:4]}); give the columns as integer indexes instead, e.g. "
                         f"text_column = 1, label_column = 0 in [data]")
    cols = []
    for c in (text_column, label_column):
        if isinstance(c, int) or c in header:
            cols.append(c if isinstance(c, int) else header.index(c))
        elif c == text_column and len(header) == 2 and label_column in header:
            # SST-2's dev/test files call the text "content", train "sentence": with
            # only two columns the other one is unambiguous.
            other = 1 - header.index(label_column)
            notes.append(f"{path}: no column {c!r}; using the only other column {header[other]!r}")
            cols.append(other)
        else:
            raise ValueError(f"{path}: no column {c!r}; the file has columns {header}; "
                             f"set data.text_column / data.label_column to one of them")
    return cols, True


# -- instructions ----------------------------------------------------------------------

# ShareGPT's speaker names -> chat roles.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "model": "assistant", "system": "system", "tool": "tool", "function_response": "tool"}


def _sharegpt_messages(turns, at: str) -> list[dict]:
    if not isinstance(turns, list) or not all(isinstance(t, dict) and "from" in t and "value" in t for t in turns):
        raise ValueError(f"{at}: 'conversations' (ShareGPT) must be a list of {{'from': ..., 'value': ...}} objects")
    out = []
    for t in turns:
        role = SHAREGPT_ROLES.get(str(t["from"]).lower())
        if role is None:
            raise ValueError(f"{at}: unknown ShareGPT speaker {t['from']!r}; use one of {sorted(SHAREGPT_ROLES)}")
        out.append({"role": role, "content": t["value"]})
    return out


def read_instructions(path, format: str = "auto") -> list[list[dict]]:
    """Read Alpaca rows ({instruction, input, output}), chat rows ({messages: [...]}) or
    ShareGPT rows ({conversations: [{from, value}, ...]}, from human/gpt/system).

    Each example becomes a list of {"role", "content"} messages ending with the
    assistant's answer; Alpaca's input is appended to the instruction after a blank line.
    """
    path = _check_file(path)
    fmt = detect_format(path, format)
    if fmt not in ("json", "jsonl"):
        raise ValueError(f"{path}: instruction data must be .json or .jsonl, not {fmt}")
    out = []
    for at, rec in _json_records(path, fmt):
        if not isinstance(rec, dict):
            raise ValueError(f"{at}: expected a JSON object, got {type(rec).__name__}")
        if "conversations" in rec and "messages" not in rec:
            rec = {"messages": _sharegpt_messages(rec["conversations"], at)}
        if "messages" in rec:
            msgs = rec["messages"]
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str) for m in msgs):
                raise ValueError(f"{at}: 'messages' must be a non-empty list of "
                                 f"{{'role': str, 'content': str}} objects")
            if msgs[-1]["role"] != "assistant":
                raise ValueError(f"{at}: the last message must be the assistant's answer "
                                 f"(role 'assistant'), got role {msgs[-1]['role']!r}")
            out.append([{"role": m["role"], "content": m["content"]} for m in msgs])
        elif "instruction" in rec and "output" in rec:
            prompt = str(rec["instruction"])
            if rec.get("input"):
                prompt += "\n\n" + str(rec["input"])
            out.append([{"role": "user", "content": prompt},
                        {"role": "assistant", "content": str(rec["output"])}])
        else:
            raise ValueError(f"{at}: expected Alpaca fields 'instruction' and 'output' (and optional "
                             f"'input'), a chat 'messages' list or a ShareGPT 'conversations' list; this row "
                             f"has keys {sorted(rec)}")
    if not out:
        raise ValueError(f"{path}: no examples")
    return out


# -- raw text --------------------------------------------------------------------------

def read_text(path, format: str = "auto", text_column: str = "text") -> list[str]:
    """Documents for pack_text: a .txt file is one document; .jsonl/.json rows give one each."""
    path = _check_file(path)
    fmt = detect_format(path, format)
    if fmt == "text":
        with utf8_errors_named(path):
            return [path.read_text(encoding="utf-8")]
    if fmt in ("json", "jsonl"):
        docs = []
        for at, rec in _json_records(path, fmt):
            if isinstance(rec, str):
                docs.append(rec)
            elif isinstance(rec, dict) and text_column in rec:
                docs.append(str(rec[text_column]))
            else:
                raise ValueError(f"{at}: expected a string or an object with a {text_column!r} field")
        return [d for d in docs if d.strip()]
    raise ValueError(f"{path}: raw text must be .txt, .jsonl or .json, not {fmt}")


def _line_chunks(text: str, lines_per_chunk: int):
    # Cut only between a non-blank line and a line that starts with a non-space
    # character: whitespace runs ("\n\n", indentation) then never straddle a cut, so a
    # byte-level BPE gives the same ids as tokenizing the whole text at once.
    chunk, n = [], 0
    for line in text.splitlines(keepends=True):
        if n >= lines_per_chunk and line[:1].strip() and chunk[-1].strip():
            yield "".join(chunk)
            chunk, n = [], 0
        chunk.append(line)
        n += 1
    if chunk:
        yield "".join(chunk)


def _encode_many(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    # minilora's Tokenizer exposes its `tokenizers` backend: encode_batch runs in Rust
    # on all cores, much faster than a Python loop over encode().
    backend = getattr(tokenizer, "backend", None)
    if backend is not None and hasattr(backend, "encode_batch"):
        return [e.ids for e in backend.encode_batch(texts, add_special_tokens=add_special_tokens)]
    return [list(tokenizer.encode(t, add_special_tokens=add_special_tokens)) for t in texts]


def _separator_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is not None:
        return eos
    # Encoder tokenizers (BERT) have no eos; [SEP] plays the same role.
    sep = getattr(tokenizer, "sep_token", None)
    if sep is not None and hasattr(tokenizer, "token_to_id") and tokenizer.token_to_id(sep) is not None:
        return tokenizer.token_to_id(sep)
    raise ValueError("the tokenizer has no eos (or sep) token to put between documents; "
                     "set eos_token in tokenizer_config.json")


def pack_text(tokenizer, text: str | list[str], block_size: int, lines_per_chunk: int = 1000) -> torch.Tensor:
    """Tokenize documents, join them with eos, cut into (n_blocks, block_size) ids.

    `text` is one document or a list of them; eos follows every document. The tail
    shorter than a block is dropped. Train with labels = input_ids.
    """
    if block_size < 2:
        raise ValueError(f"block_size must be >= 2, got {block_size}")
    docs = [text] if isinstance(text, str) else list(text)
    sep = _separator_id(tokenizer)
    stream: list[int] = []
    for doc in docs:
        for ids in _encode_many(tokenizer, list(_line_chunks(doc, lines_per_chunk)), False):
            stream += ids
        stream.append(sep)
    n_blocks = len(stream) // block_size
    if n_blocks == 0:
        raise ValueError(f"the text has {len(stream)} tokens, fewer than one block of {block_size}; "
                         f"lower data.block_size or add text")
    return torch.tensor(stream[:n_blocks * block_size], dtype=torch.long).view(n_blocks, block_size)
