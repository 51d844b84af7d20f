"""Tiny random transformers models used as oracles (test-only; never imported by minilora)."""

import torch
import transformers


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
