"""The trainable-parameter table: where an adapter's parameters live, per layer type.

    module (N = any layer index)                 layers  r    trainable
    bert.encoder.layer.N.attention.self.query         6  8       24,576
    classifier (trained in full)                      1  -          770
    trainable params: 49,922 || all params: 22,763,906 || trainable%: 0.2193
"""

from __future__ import annotations

from torch import nn

from .inject import _SAVED_ATTR, lora_layers, trainable_summary
from .targets import shorten_per_layer


def parameter_table(model: nn.Module) -> str:
    rows: dict[str, list] = {}
    for name, layer in lora_layers(model):
        if layer.lora_A is None:  # only inactive adapters target this layer
            continue
        key = shorten_per_layer([name])[0]
        row = rows.setdefault(key, [0, set(), 0])
        row[0] += 1
        row[1].add(layer.r)
        row[2] += layer.lora_A.weight.numel() + layer.lora_B.weight.numel()
    saved = getattr(model, _SAVED_ATTR, {"names": []})["names"]
    for name in saved:
        module = model.get_submodule(name)
        # With several adapters the head is a wrapper: count the copy in use.
        module = module.active_module() if hasattr(module, "active_module") else module
        n = sum(p.numel() for p in module.parameters())
        rows[f"{name} (trained in full)"] = [1, set(), n]
    width = max([len("module (N = any layer index)")] + [len(k) for k in rows])
    lines = [f"{'module (N = any layer index)':<{width}}  {'layers':>6}  {'r':>3}  {'trainable':>11}"]
    for key, (count, ranks, n) in rows.items():
        r = "/".join(str(x) for x in sorted(ranks)) or "-"
        lines.append(f"{key:<{width}}  {count:>6}  {r:>3}  {n:>11,d}")
    lines.append(trainable_summary(model))
    return "\n".join(lines)
