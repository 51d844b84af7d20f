"""Datasets and batches: which examples train together, in what order, padded how.

`build_datasets(config, tokenizer)` reads the files of a config's [data] section
(through minilora.train.data), holds out a validation split if there is no validation file,
and tokenizes into `Examples`: lists of {"input_ids", "labels"} dicts with the lengths
the batcher needs and counts of what truncation did.

Dynamic padding. A batch is padded only to its own longest example (`collate`), not to
a global `max_length`: SST-2's dev sentences average 25 tokens (MiniLM's tokenizer), so
padding every row to 256 would spend 90% of the compute on pad tokens that the
attention mask then throws away.

Length grouping. Dynamic padding only helps if the examples of a batch have similar
lengths; a random batch of SST-2 still mixes 5-token and 60-token sentences. Sorting the
whole dataset by length would remove nearly all padding, but then every epoch sees the
same batches in the same short-to-long order, and the loss curve tracks length rather
than learning. `make_batches` takes the middle road used by HF's `group_by_length`:
shuffle, cut the shuffled order into mega-chunks of ~50 batches, sort each mega-chunk by
length and slice it into batches, then shuffle the order of the batches. Batches are
nearly uniform in length, yet their membership and order are random and change per
epoch.

Determinism. The order is a pure function of (lengths, batch_size, seed, epoch): no
sampler state to checkpoint. A trainer resumed at epoch 3, step 120 recomputes epoch 3's
batches and skips the first 120; every rank of a DDP job computes the same global
batches and `shard_batches` hands each rank its contiguous slice of every one of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import Dataset

from .chat_labels import chat_ids
from .data import (
    IGNORE_INDEX,
    ClassificationData,
    _encode_many,
    pack_text,
    read_classification,
    read_instructions,
    read_text,
)

MEGA_CHUNK_BATCHES = 50


def collate(examples: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict:
    """Pad a list of examples to the longest one: {"input_ids", "attention_mask", "labels"}.

    Classification labels (ints) become a LongTensor (B,); LM labels (lists) are padded
    with -100 on the same side as the ids so pad positions carry no loss. Left padding is
    what batched generation and last-token classifiers of decoder models want: the last
    real token then sits in the last column of every row.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if not examples:
        raise ValueError("collate got an empty batch")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None: this tokenizer has no pad token; "
                         "pass the eos id (any id works, the attention mask hides pads)")
    width = max(len(e["input_ids"]) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    lm = "labels" in examples[0] and not isinstance(examples[0]["labels"], (int, np.integer))
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long) if lm else None
    for i, e in enumerate(examples):
        ids = e["input_ids"]
        k = len(ids)
        cols = slice(0, k) if padding_side == "right" else slice(width - k, width)
        input_ids[i, cols] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, cols] = 1
        if lm:
            if len(e["labels"]) != k:
                raise ValueError(f"example {i}: {len(e['labels'])} labels for {k} input_ids; "
                                 "LM labels must align one-to-one with input_ids")
            labels[i, cols] = torch.as_tensor(e["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if lm:
        batch["labels"] = labels
    elif "labels" in examples[0]:
        batch["labels"] = torch.tensor([int(e["labels"]) for e in examples], dtype=torch.long)
    return batch


def _rng(seed: int, epoch: int) -> np.random.Generator:
    # SeedSequence mixes both numbers, so (seed, epoch) streams are independent and no
    # two epochs of two seeds collide the way `seed + epoch` would.
    return np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, int(epoch)])


def make_batches(lengths: Sequence[int], batch_size: int, seed: int = 0, epoch: int = 0,
                 shuffle: bool = True, group_by_length: bool = True,
                 drop_last: bool = False) -> list[list[int]]:
    """One epoch's batches as lists of example indexes; every index appears once.

    Pure: the same arguments give the same batches (see the module docstring). With
    shuffle=False (evaluation) the order is the file order, or, with group_by_length,
    the file order sorted by length within each mega-chunk, with no random step.
    drop_last drops the one batch smaller than batch_size, if any.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    rng = _rng(seed, epoch)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if not group_by_length:
        batches = [order[i:i + batch_size].tolist() for i in range(0, n, batch_size)]
    else:
        chunk = MEGA_CHUNK_BATCHES * batch_size
        batches = []
        for start in range(0, n, chunk):
            part = order[start:start + chunk]
            # Stable sort, longest first: ties keep the shuffled order.
            part = part[np.argsort(-lengths[part], kind="stable")]
            batches += [part[i:i + batch_size].tolist() for i in range(0, len(part), batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()  # only the very last slice can be short (chunks are whole batches)
    if shuffle and len(batches) > 1:
        perm = rng.permutation(len(batches))
        batches = [batches[i] for i in perm]
        if group_by_length:
            # Put the batch holding the longest example first, as HF does: if the
            # largest batch runs out of memory it does so at step 1, not hours in.
            top = max(range(len(batches)), key=lambda b: lengths[batches[b]].max())
            batches.insert(0, batches.pop(top))
    return batches


def shard_batches(batches: Sequence[Sequence[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's part of every global batch, under DDP or FSDP: contiguous, equal slices.

    `train.batch_size` is per process (as in transformers and torchtune): the loop builds
    global batches of batch_size x world_size examples with make_batches and gives each
    rank its slice. All ranks call this with the same `batches` (same seed and epoch),
    so step k of every rank belongs to the same global batch k and the gradient
    all-reduce averages exactly that batch. A short final batch is trimmed to the
    largest multiple of world_size (dropped if smaller than world_size): every rank must
    run the same number of steps with a non-empty batch, or the all-reduce would wait
    forever.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    if not batches:
        return []
    full = max(len(b) for b in batches)
    if full % world_size:
        raise ValueError(f"a global batch of {full} examples is not divisible by the {world_size} processes; "
                         f"build global batches of train.batch_size x {world_size} (train.batch_size is "
                         f"per process)")
    out = []
    for b in batches:
        per = len(b) // world_size
        if per == 0:
            continue
        out.append(list(b[rank * per:(rank + 1) * per]))
    return out


def padding_fraction(lengths: Sequence[int], batches: Sequence[Sequence[int]]) -> float:
    """Share of the padded (batch x longest) grid that is padding: 0.0 is none."""
    lengths = np.asarray(lengths)
    real = padded = 0
    for b in batches:
        ls = lengths[list(b)]
        real += int(ls.sum())
        padded += int(ls.max()) * len(ls)
    return 1.0 - real / padded if padded else 0.0


def train_val_split(n: int, fraction: float, seed: int = 0) -> tuple[list[int], list[int]]:
    """Deterministic, disjoint (train_idx, val_idx) over range(n), each sorted.

    Used when no validation file is given: `fraction` of the examples (at least one when
    fraction > 0) are held out, chosen by a seeded permutation so reruns hold out the
    same rows and evaluation numbers stay comparable.
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = 0 if fraction == 0 or n < 2 else min(n - 1, max(1, round(n * fraction)))
    perm = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0x5B1]).permutation(n)
    return sorted(perm[n_val:].tolist()), sorted(perm[:n_val].tolist())


# -- examples --------------------------------------------------------------------------

class Examples(Dataset):
    """Tokenized examples (dicts of "input_ids" and "labels") plus what happened to them.

    stats["truncated"]: examples cut to max_length; stats["no_target"]: LM examples
    dropped because truncation left no trained token. The caller logs them.
    """

    def __init__(self, examples: list[dict], stats: dict | None = None):
        self.examples = examples
        self.stats = {"truncated": 0, **(stats or {})}

    def __len__(self):
        return len(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    @property
    def lengths(self) -> list[int]:
        return [len(e["input_ids"]) for e in self.examples]


def _special_affixes(tokenizer) -> tuple[int, int]:
    """How many special tokens encode() puts before and after the text ([CLS] .. [SEP])."""
    plain = list(tokenizer.encode("a", add_special_tokens=False))
    full = list(tokenizer.encode("a", add_special_tokens=True))
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return i, len(full) - i - len(plain)
    return 0, 0


def classification_examples(tokenizer, data: ClassificationData, max_length: int) -> Examples:
    """Encode texts with the model's special tokens; too-long texts keep [CLS] and [SEP]."""
    head, tail = _special_affixes(tokenizer)
    if max_length <= head + tail:
        raise ValueError(f"max_length {max_length} leaves no room for text next to {head + tail} special tokens")
    examples, truncated = [], 0
    for ids, label in zip(_encode_many(tokenizer, data.texts, True), data.labels):
        if len(ids) > max_length:
            truncated += 1
            # Cut the text, not the special tokens: BERT pools [CLS] and was trained
            # with [SEP] closing every sequence.
            ids = ids[:max_length - tail] + (ids[len(ids) - tail:] if tail else [])
        examples.append({"input_ids": ids, "labels": int(label)})
    return Examples(examples, {"truncated": truncated})


def chat_examples(tokenizer, conversations: list[list[dict]], max_length: int,
                  assistant_turns: str = "all") -> Examples:
    """tokenize_chat over many conversations, counting truncations and useless examples."""
    examples, truncated, no_target = [], 0, 0
    for msgs in conversations:
        ids, labels = chat_ids(tokenizer, msgs, assistant_turns)
        if len(ids) > max_length:
            truncated += 1
            ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE_INDEX for x in labels):
                no_target += 1  # the prompt alone fills max_length: nothing to learn
                continue
        examples.append({"input_ids": ids, "labels": labels})
    return Examples(examples, {"truncated": truncated, "no_target": no_target})


def text_examples(blocks: torch.Tensor) -> Examples:
    """Packed blocks as LM examples (labels = input_ids)."""
    rows = blocks.tolist()
    return Examples([{"input_ids": r, "labels": list(r)} for r in rows])


@dataclass
class Datasets:
    train: Examples
    val: Examples
    label_names: list[str] | None = None      # classification only: id -> name
    notes: list[str] = field(default_factory=list)  # one line each, for the run log


def _cap(indices: list[int], limit: int | None, seed: int) -> list[int]:
    # A seeded random subset, not the first rows: files are often sorted (by label,
    # by source), and the first 1,000 rows of such a file are one class.
    if limit is None or len(indices) <= limit:
        return indices
    pick = np.random.default_rng([int(seed) & 0xFFFFFFFFFFFFFFFF, 0xCA9]).permutation(len(indices))[:limit]
    return [indices[i] for i in sorted(pick.tolist())]


def build_datasets(cfg, tokenizer) -> Datasets:
    """Train and validation Examples for a Config (uses cfg.data, cfg.train.seed, cfg.model).

    Without data.validation_file, data.validation_fraction of the training file is held
    out (train_val_split, seeded by train.seed). max_train_examples / max_eval_examples
    keep a seeded random subset. Classification labels of the validation file are
    mapped with the training file's names, so ids agree even if a class is absent.
    """
    d, seed, notes = cfg.data, cfg.train.seed, []
    val_file = d.validation_file

    def split(n):
        if val_file:
            return list(range(n)), None
        tr, va = train_val_split(n, d.validation_fraction, seed)
        notes.append(f"validation: {len(va)} of {n} examples held out of {d.train_file} "
                     f"(data.validation_fraction = {d.validation_fraction})")
        return tr, va

    label_names = None
    if d.kind == "classification":
        raw = read_classification(d.train_file, d.text_column, d.label_column, d.format)
        label_names = raw.label_names
        vraw = (read_classification(val_file, d.text_column, d.label_column, d.format, label_names)
                if val_file else None)
        for r, f in ((raw, d.train_file), (vraw, val_file)):
            if r is not None:
                notes += r.notes + ([f"skipped {r.skipped_empty} rows with empty text in {f}"]
                                    if r.skipped_empty else [])
        tr, va = split(len(raw.texts))
        vraw, va = (vraw, list(range(len(vraw.texts)))) if val_file else (raw, va)
        tr, va = _cap(tr, d.max_train_examples, seed), _cap(va, d.max_eval_examples, seed)

        def subset(r, idx):
            return ClassificationData([r.texts[i] for i in idx], [r.labels[i] for i in idx], r.label_names)
        num_labels = cfg.model.num_labels
        if num_labels is not None and num_labels < len(label_names):
            raise ValueError(f"the data has {len(label_names)} labels {label_names} but model.num_labels = "
                             f"{num_labels}; raise model.num_labels or leave it unset")
        train = classification_examples(tokenizer, subset(raw, tr), d.max_length)
        val = classification_examples(tokenizer, subset(vraw, va), d.max_length)
    elif d.kind == "instructions":
        convs = read_instructions(d.train_file, d.format)
        vconvs = read_instructions(val_file, d.format) if val_file else convs
        tr, va = split(len(convs))
        va = list(range(len(vconvs))) if val_file else va
        tr, va = _cap(tr, d.max_train_examples, seed), _cap(va, d.max_eval_examples, seed)
        train = chat_examples(tokenizer, [convs[i] for i in tr], d.max_length, d.assistant_turns)
        val = chat_examples(tokenizer, [vconvs[i] for i in va], d.max_length, d.assistant_turns)
    elif d.kind == "text":
        blocks = pack_text(tokenizer, read_text(d.train_file, d.format, d.text_column), d.block_size)
        vblocks = (pack_text(tokenizer, read_text(val_file, d.format, d.text_column), d.block_size)
                   if val_file else blocks)
        tr, va = split(len(blocks))
        va = list(range(len(vblocks))) if val_file else va
        tr, va = _cap(tr, d.max_train_examples, seed), _cap(va, d.max_eval_examples, seed)
        train, val = text_examples(blocks[tr]), text_examples(vblocks[va])
    else:
        raise ValueError(f"unknown data.kind {d.kind!r}; use classification, instructions or text")
    for name, ex in (("training", train), ("validation", val)):
        if ex.stats["truncated"]:
            notes.append(f"truncated {ex.stats['truncated']} of {len(ex) + ex.stats.get('no_target', 0)} "
                         f"{name} examples to data.max_length = {d.max_length}")
        if ex.stats.get("no_target"):
            notes.append(f"dropped {ex.stats['no_target']} {name} examples whose prompt alone fills "
                         f"data.max_length = {d.max_length} (no answer token left to train on)")
    if len(train) == 0:
        raise ValueError(f"no training examples left from {d.train_file}")
    return Datasets(train, val, label_names, notes)
