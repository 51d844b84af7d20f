"""Verbs on a model with several named adapters: hot swap, delete, disable, mixed batches.

One frozen base serves many tasks, each with its own small adapter (the LoRA paper,
section 4.2: "each task can have its own LoRA parameters, and during runtime the
application can dynamically load the required LoRA parameters"). `inject(model,
config, name=...)` and `load_adapter(..., name=...)` add adapters; these verbs act
on them:

- `set_adapter(model, name)`: the hot swap. Every LoRALinear re-registers the named
  adapter's A and B as its `lora_A`/`lora_B` (and every ModulesToSaveWrapper its head
  copy); no tensor is copied and the base is never reloaded.
- `delete_adapter(model, name)`: drop an inactive adapter; layers left with none are unwrapped.
- `disable_adapters(model)`: a `with` block in which the model is its bare base.
- `mixed_batch(model, names)`: a `with` block in which row i of the batch goes
  through adapter names[i] ("base" for none), as peft's `adapter_names=` forward.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from .config import BASE_NAMES
from .inject import (
    _ACTIVE_ATTR,
    _CONFIG_ATTR,
    _SAVED_ATTR,
    _activate,
    _adapter_modules,
    _set_module,
    _unknown_adapter,
    adapter_names,
    get_lora_config,
    lora_layers,
    saved_modules,
)


def _refuse_if_merged(model: nn.Module, what: str) -> None:
    if any(layer.merged for _, layer in lora_layers(model)):
        raise ValueError(f"{what}: the active adapter is merged into the base weights; call minilora.unmerge_lora(model) first")


def set_adapter(model: nn.Module, name: str) -> None:
    """Make adapter `name` the active (and only trainable) one: a hot swap. Only
    modules are re-registered; no weight is copied, and the base is never reloaded."""
    if name not in adapter_names(model):
        get_lora_config(model)
        raise _unknown_adapter(name, model)
    _refuse_if_merged(model, f"set_adapter({name!r})")
    _activate(model, name)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; layers and modules left with no adapter are unwrapped."""
    configs = getattr(model, _CONFIG_ATTR, None) or {}
    if name not in configs:
        get_lora_config(model)
        raise _unknown_adapter(name, model)
    if name == getattr(model, _ACTIVE_ATTR):
        others = [n for n in configs if n != name]
        fix = f"call set_adapter(model, {others[0]!r}) first" if others else "use minilora.remove_lora(model) instead"
        raise ValueError(f"adapter {name!r} is the active one; {fix}")
    for layer_name, layer in lora_layers(model):
        if name in layer.adapters:
            layer.delete_adapter(name)
            if not layer.adapters:
                _set_module(model, layer_name, layer.base_layer)
    record = getattr(model, _SAVED_ATTR)
    for module_name, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            wrapper.delete_adapter(name)
            if not len(wrapper.modules_to_save):
                _set_module(model, module_name, wrapper.original_module)
                record["names"].remove(module_name)
    del configs[name]


@contextmanager
def disable_adapters(model: nn.Module) -> Iterator[None]:
    """Inside the block the model is its base: no LoRA update, original modules_to_save."""
    get_lora_config(model)
    _refuse_if_merged(model, "disable_adapters")
    modules = _adapter_modules(model)
    before = [m.disabled for m in modules]
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m, was in zip(modules, before):
            m.disabled = was


@contextmanager
def mixed_batch(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Inside the block, row i of every batch uses adapter names[i] ("base" for none).

    Equal to running each row on its own with its adapter active (and to peft's
    `model(..., adapter_names=names)`). Every adapted layer must see the batch as its
    first dimension, which is how all our models (and transformers') call linear layers.
    """
    get_lora_config(model)
    configs = getattr(model, _CONFIG_ATTR)
    if isinstance(names, str):
        raise ValueError(f"mixed_batch takes one adapter name per row (a list), got the string {names!r}")
    names = ["base" if n in BASE_NAMES else n for n in names]
    unknown = sorted({n for n in names if n != "base" and n not in configs})
    if unknown:
        raise ValueError(f"mixed_batch: no adapter named {unknown}; this model's adapters are {list(configs)}, "
                         "and 'base' means none")  # fmt: skip
    _refuse_if_merged(model, "mixed_batch")
    modules = _adapter_modules(model)
    for m in modules:
        m.row_adapters = names
    try:
        yield
    finally:
        for m in modules:
            m.row_adapters = None
