"""The injection walker: which layers get an adapter, and the verbs that act on them.

`inject(model, config)` walks `model.named_modules()`, picks the linear layers the
config targets, and replaces each in place with a `LoRALinear` that wraps it. Every
other parameter is frozen; only the adapters (and any `modules_to_save`) train.

Target matching is peft's (targets.py), so a config means the same thing in both
libraries and adapters move between them. `modules_to_save` names whole modules (a
new classification head, typically) that train in full and are saved with the adapter.

The verbs follow minLoRA's small functional API: `inject`, `merge_lora`,
`unmerge_lora`, `remove_lora`, `lora_state_dict`, `count_parameters`.

Named adapters (peft's multi-adapter model): `inject(model, config, name=...)` adds
another adapter to the same frozen base, wrapping any layer it targets that is not
wrapped yet. The first adapter is active; later ones are added inactive and frozen,
as peft's `add_adapter` does. `set_adapter` switches (hot swap: modules are
re-registered, no weight is copied or reloaded), `delete_adapter` drops one,
`disable_adapters` runs the bare base model inside a `with` block, and
`mixed_batch(model, names)` gives each row of a batch its own adapter ("base": none).
Those four verbs live in named_adapters.py.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn

from .config import BASE_NAMES, LoraConfig
from .layer import LoRALinear
from .modules_to_save import ModulesToSaveWrapper
from .targets import _modules_to_save_entries, resolve_modules_to_save, resolve_targets

# Where inject() leaves its bookkeeping on the model (plain attributes, not state):
# {adapter name: resolved LoraConfig}, the active adapter's name, and what
# remove_lora must restore.
_CONFIG_ATTR = "_minilora_lora_config"
_ACTIVE_ATTR = "_minilora_active_adapter"
_SAVED_ATTR = "_minilora_modules_to_save"

def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def saved_modules(model: nn.Module) -> list[tuple[str, ModulesToSaveWrapper]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]


def adapter_names(model: nn.Module) -> list[str]:
    """The model's adapters, in the order they were added."""
    return list(getattr(model, _CONFIG_ATTR, None) or {})


def active_adapter(model: nn.Module) -> str:
    get_lora_config(model)  # a clear error when there is no adapter at all
    return getattr(model, _ACTIVE_ATTR)


def _unknown_adapter(name: str, model: nn.Module) -> ValueError:
    return ValueError(f"no adapter named {name!r}; this model's adapters are {adapter_names(model)}")


def get_lora_config(model: nn.Module, name: str | None = None) -> LoraConfig:
    """The config of adapter `name` (default: the active one)."""
    configs = getattr(model, _CONFIG_ATTR, None)
    if not configs:
        raise ValueError("this model has no LoRA adapter; call minilora.lora.inject(model, LoraConfig(...)) first")
    name = getattr(model, _ACTIVE_ATTR) if name is None else name
    if name not in configs:
        raise _unknown_adapter(name, model)
    return configs[name]


def _check_new_name(model: nn.Module, name: str) -> None:
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_\-]+", name) or hasattr(nn.ModuleDict, name):
        raise ValueError(
            f"adapter name {name!r} is not usable: use letters, digits, '_' or '-' (no dots), "
            "and not a ModuleDict method name such as 'keys' or 'update'"
        )
    if name in BASE_NAMES:
        raise ValueError(f"adapter name {name!r} is reserved: in a mixed batch it means the base model")
    if name in adapter_names(model):
        raise ValueError(
            f"this model already has an adapter named {name!r} (adapters: {adapter_names(model)}); "
            f"pick another name, or call minilora.delete_adapter(model, {name!r}) first"
        )


def inject(model: nn.Module, config: LoraConfig, name: str = "default") -> list[str]:
    """Add adapter `name`: wrap the targeted linear layers in place with LoRALinear (or
    add `name` to layers already wrapped); return the targeted layers' names.

    The first adapter is active and trainable, and every other parameter is frozen.
    A later adapter is added inactive and frozen until `set_adapter(model, name)`.
    """
    _check_new_name(model, name)
    configs = getattr(model, _CONFIG_ATTR, None) or {}
    if not configs and lora_layers(model):
        raise ValueError("this model has LoRA layers that inject() did not add; call minilora.remove_lora(model) first")
    chosen, targets = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config)
    given, auto = _modules_to_save_entries(model, config)

    if not configs:
        # Remember what remove_lora must restore: trainability (by parameter name).
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
        for p in model.parameters():
            p.requires_grad_(False)
        object.__setattr__(model, _SAVED_ATTR, {"names": [], "requires_grad": requires_grad})
        object.__setattr__(model, _ACTIVE_ATTR, name)
    for target in chosen:
        r, alpha = config.rank_and_alpha(target)
        options = dict(r=r, alpha=alpha, dropout=config.dropout, rslora=config.rslora, use_dora=config.use_dora)
        module = model.get_submodule(target)
        if isinstance(module, LoRALinear):
            module.add_adapter(name, **options)
        else:
            _set_module(model, target, LoRALinear(module, adapter_name=name, **options))
    record = getattr(model, _SAVED_ATTR)
    for target in saved:
        module = model.get_submodule(target)
        if isinstance(module, ModulesToSaveWrapper):
            module.add_adapter(name)
        else:
            _set_module(model, target, ModulesToSaveWrapper(module, name))
            record["names"].append(target)

    # What save_adapter writes: the effective targets and heads, as peft records them.
    configs[name] = dataclasses.replace(config, target_modules=targets, modules_to_save=(given + auto) or None)
    object.__setattr__(model, _CONFIG_ATTR, configs)
    _activate(model, getattr(model, _ACTIVE_ATTR))
    return chosen


def _adapter_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LoRALinear, ModulesToSaveWrapper))]


def _activate(model: nn.Module, name: str) -> None:
    for module in _adapter_modules(model):
        module.set_adapter(name)
    object.__setattr__(model, _ACTIVE_ATTR, name)


def merge_lora(model: nn.Module) -> None:
    """Fold the active adapter into the base weights (W0 + s*BA); forward then skips it."""
    for _, layer in lora_layers(model):
        if not layer.merged:
            layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Undo merge_lora: take the merged adapter out of the base weights again."""
    for _, layer in lora_layers(model):
        if layer.merged:
            layer.unmerge()


def remove_lora(model: nn.Module, merge: bool = False) -> nn.Module:
    """Take every adapter out, putting the original layers back.

    merge=False restores the base model exactly as it was (modules in
    `modules_to_save` are the untouched originals again). merge=True keeps what the
    active adapter learned: it is merged into the base weights, its trained copies of
    `modules_to_save` replace the originals, and the other adapters are dropped.
    """
    for name, layer in lora_layers(model):
        if merge and not layer.merged:
            layer.merge()
        elif not merge and layer.merged:
            layer.unmerge()
        _set_module(model, name, layer.base_layer)
    for name, wrapper in saved_modules(model):
        _set_module(model, name, wrapper.active_module() if merge else wrapper.original_module)
    saved = getattr(model, _SAVED_ATTR, None)
    if saved is not None:
        for n, p in model.named_parameters():
            p.requires_grad_(saved["requires_grad"].get(n, p.requires_grad))
        object.__delattr__(model, _SAVED_ATTR)
    for attr in (_CONFIG_ATTR, _ACTIVE_ATTR):
        if hasattr(model, attr):
            object.__delattr__(model, attr)
    return model


def lora_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """What adapter `name` (default: the active one) consists of: every lora_A / lora_B
    weight (and DoRA magnitude), plus the full state of its copy of each module in
    `modules_to_save`. Keys are the model's own module names with peft's file suffixes
    (`<layer>.lora_A.weight`, `<layer>.lora_magnitude_vector`, `<head>.weight`)."""
    if not getattr(model, _CONFIG_ATTR, None):
        return {}
    name = active_adapter(model) if name is None else name
    if name not in adapter_names(model):
        raise _unknown_adapter(name, model)
    state: dict[str, torch.Tensor] = {}
    for layer_name, layer in lora_layers(model):
        adapter = layer.adapters.get(name)
        if adapter is None:
            continue
        state[f"{layer_name}.lora_A.weight"] = adapter.lora_A.weight
        state[f"{layer_name}.lora_B.weight"] = adapter.lora_B.weight
        if adapter.lora_magnitude_vector is not None:
            state[f"{layer_name}.lora_magnitude_vector"] = adapter.lora_magnitude_vector.weight
    for module_name, wrapper in saved_modules(model):
        if name in wrapper.modules_to_save:
            for key, value in wrapper.modules_to_save[name].state_dict(keep_vars=True).items():
                state[f"{module_name}.{key}"] = value
    return state


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts: the base model and every adapter. The frozen
    original of a module in `modules_to_save` (kept only to restore it) is not counted,
    its trained copies are. A 4-bit weight counts as its number of values, not bytes."""
    skip = {id(m) for _, w in saved_modules(model) for m in w.original_module.modules()}
    trainable = total = 0
    seen = set()  # a tied weight (embeddings = lm_head) is one tensor, counted once
    for module in model.modules():
        if id(module) in skip:
            continue
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        total += getattr(module, "num_quantized_values", lambda: 0)()
    return trainable, total


def trainable_summary(model: nn.Module) -> str:
    """peft's one-line summary: trainable params: … || all params: … || trainable%: …"""
    trainable, total = count_parameters(model)
    pct = 100 * trainable / total if total else 0.0
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {pct:.4f}"


def print_trainable_parameters(model: nn.Module) -> None:
    print(trainable_summary(model))
