"""Export a model as a Hugging Face folder: what `minilora merge` writes.

After `remove_lora(model, merge=True)` the adapter lives inside the base weights
(W = W0 + (alpha/r)·B·A), so the model is a plain model again and can be written
in the checkpoint layout transformers reads: config.json, model.safetensors (keys as
the original checkpoint names them, tied weights stored once) and the tokenizer
files copied from the base folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..lora.inject import lora_layers
from .atomic import atomic_write, atomic_write_text
from .loading import find_model_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "chat_template.jinja", "generation_config.json")
_ARCHITECTURES = {
    ("bert", "sequence-classification"): "BertForSequenceClassification",
    ("bert", "embedding"): "BertModel",
    ("distilbert", "sequence-classification"): "DistilBertForSequenceClassification",
    ("distilbert", "embedding"): "DistilBertModel",
}


def export_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Our state dict in the checkpoint's own key names and layouts."""
    if lora_layers(model):
        raise ValueError("the model still has LoRA layers; call minilora.remove_lora(model, merge=True) first")
    tied = set(getattr(model, "tied_weights", {}) or {})
    export = getattr(model, "export_checkpoint_tensor", None)
    out = {}
    for key, tensor in model.state_dict().items():
        if key in tied:
            continue  # stored once, under its source's name; transformers re-ties it
        if export is not None:
            key, tensor = export(key, tensor)
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        out[key] = tensor.contiguous()
    return out


def save_pretrained(model: nn.Module, base_dir: str | Path, out_dir: str | Path, task: str,
                    label_names: list[str] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write `model` as an HF folder next to a copy of `base_dir`'s config and tokenizer."""
    base_dir, out_dir = find_model_dir(base_dir), Path(out_dir)
    config = json.loads((base_dir / "config.json").read_text())
    out_dir.mkdir(parents=True, exist_ok=True)
    arch = _ARCHITECTURES.get((config.get("model_type"), task))
    if arch:
        config["architectures"] = [arch]
    head = getattr(model, "classifier", None)
    if task == "sequence-classification" and head is not None:
        n = head.out_features
        names = label_names or [f"LABEL_{i}" for i in range(n)]
        config["id2label"] = {str(i): name for i, name in enumerate(names)}
        config["label2id"] = {name: i for i, name in enumerate(names)}
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    with atomic_write(out_dir / "model.safetensors") as tmp:
        save_file(export_state_dict(model, dtype), str(tmp), metadata={"format": "pt"})
    atomic_write_text(out_dir / "config.json", json.dumps(config, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (base_dir / name).is_file() and base_dir.resolve() != out_dir.resolve():
            shutil.copyfile(base_dir / name, out_dir / name)
    return out_dir
