"""One batch, several adapters: row i of the batch goes through adapter names[i].

peft's `adapter_names=` does the same. "base", or a name a layer has no adapter for,
adds nothing to that row. The result equals running each row through its own
adapter on its own: the frozen output W0 x is shared, and each adapter adds its
update to its own rows.
"""

from __future__ import annotations

import torch


def rows_of(names: list[str], batch_rows: int, device) -> dict[str, torch.Tensor]:
    """{name: the row indices that use it}, in the order the names first appear."""
    if len(names) != batch_rows:
        raise ValueError(f"mixed batch: {len(names)} adapter names for a batch of {batch_rows} rows; "
                         "pass one name per row")
    return {name: torch.tensor([i for i, n in enumerate(names) if n == name], device=device)
            for name in dict.fromkeys(names)}


def mixed_batch_forward(layer, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """A LoRALinear's output for a batch whose rows use the adapters `layer.row_adapters`."""
    result = result.clone()
    for name, rows in rows_of(layer.row_adapters, x.shape[0], x.device).items():
        adapter = layer.adapters.get(name)
        if adapter is not None:
            result[rows] = adapter.add_update(x[rows], result[rows], layer.base_layer)
    return result
