"""`minilora info DIR`: what a user needs to choose LoRA targets, without loading weights.

The model is built on the meta device (shapes only, no memory), so this is instant
even for a 70B folder; the dtype comes from the safetensors header.
"""

from __future__ import annotations

import json
from collections import Counter

import torch
from torch import nn

from ..io.loading import checkpoint_shards, find_model_dir
from ..io.safetensors_files import open_safetensors
from ..lora.targets import _linear_types, shorten_per_layer
from ..models import get_config_class, get_model_class, supported_tasks


def describe(path) -> str:
    model_dir = find_model_dir(path)
    hf = json.loads((model_dir / "config.json").read_text())
    model_type = hf.get("model_type")
    tasks = supported_tasks(model_type)
    task = "causal-lm" if "causal-lm" in tasks else tasks[0]
    with torch.device("meta"):
        model = get_model_class(model_type, task)(get_config_class(model_type).from_hf(hf))
    n_params = sum(p.numel() for p in model.parameters())  # shared (tied) parameters once
    shards = checkpoint_shards(model_dir)
    dtypes: Counter = Counter()
    for file, keys in shards:
        with open_safetensors(file) as f:
            for key in keys:
                dtypes[str(f.get_slice(key).get_dtype())] += 1
    linear = [n for n, m in model.named_modules() if isinstance(m, _linear_types())]
    counts = Counter(shorten_per_layer([n])[0] for n in linear)
    lines = [
        f"folder:        {model_dir}",
        f"architecture:  {model_type} ({type(model).__name__}), tasks: {', '.join(tasks)}",
        f"parameters:    {n_params:,d}",
        f"dtype:         {', '.join(f'{d} ({c} tensors)' for d, c in dtypes.most_common())}",
        f"linear layers (N = any layer index; LoRA target names are the last part):",
    ]
    for name, count in counts.items():
        module = model.get_submodule(name.replace(".N.", ".0."))
        shape = f"{module.in_features} -> {module.out_features}" if isinstance(module, nn.Linear) else ""
        lines.append(f"  {name:<50} x{count:<3} {shape}")
    return "\n".join(lines)
