"""The injection walker: which layers get an adapter, and the verbs that act on them.

`inject(model, config)` walks `model.named_modules()`, picks the linear layers the
config targets, and replaces each in place with a `LoRALinear` that wraps it. Every
other parameter is frozen; only the adapters (and any `modules_to_save`) train.

Target matching is peft's, so a config means the same thing in both libraries and
adapters move between them:

- a list entry matches a module's full name exactly, or as a dotted suffix
  (`"q_proj"` matches `model.layers.3.self_attn.q_proj`, not `xq_proj`);
- a single string is a regular expression that must match the full name;
- `"all-linear"` takes every linear layer except the output head (`lm_head`,
  or the classifier of a classification model).

`modules_to_save` names whole modules (a new classification head, typically) that
train in full and are saved with the adapter; as in peft, an entry matches any
module whose name ends with it.

The verbs follow minLoRA's small functional API: `inject`, `merge_lora`,
`unmerge_lora`, `remove_lora`, `lora_state_dict`, `count_parameters`.

Named adapters (peft's multi-adapter model): `inject(model, config, name=...)` adds
another adapter to the same frozen base, wrapping any layer it targets that is not
wrapped yet. The first adapter is active; later ones are added inactive and frozen,
as peft's `add_adapter` does. `set_adapter` switches (hot swap: modules are
re-registered, no weight is copied or reloaded), `delete_adapter` drops one,
`disable_adapters` runs the bare base model inside a `with` block, and
`mixed_batch(model, names)` gives each row of a batch its own adapter ("base": none).
Those four verbs live in minilora/named_adapters.py.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from dataclasses import dataclass, field

import torch
from torch import nn

from ..qlora.nf4_linear import NF4Linear
from .layer import LoRALinear, ModulesToSaveWrapper

# Where inject() leaves its bookkeeping on the model (plain attributes, not state):
# {adapter name: resolved LoraConfig}, the active adapter's name, and what
# remove_lora must restore.
_CONFIG_ATTR = "_minilora_lora_config"
_ACTIVE_ATTR = "_minilora_active_adapter"
_SAVED_ATTR = "_minilora_modules_to_save"

# Row name meaning "no adapter" in a mixed batch (peft spells it "__base__").
BASE_NAMES = ("base", "__base__")

# Head names that peft treats as a sequence-classification head (SEQ_CLS_HEAD_NAMES).
SEQ_CLS_HEAD_NAMES = ("score", "classifier")

# peft's defaults when target_modules is not given, by config.model_type.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
}

TASK_TYPES = (None, "CAUSAL_LM", "SEQ_CLS", "FEATURE_EXTRACTION", "TOKEN_CLS", "QUESTION_ANS", "SEQ_2_SEQ_LM")


@dataclass
class LoraConfig:
    """What to adapt and how. Field names are ours; `save_adapter` writes peft's."""

    r: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    target_modules: list[str] | str | None = None
    rslora: bool = False
    modules_to_save: list[str] | None = None
    task_type: str | None = None
    # Per-module overrides, keyed like peft's: a regex matched as a dotted suffix.
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    exclude_modules: list[str] | str | None = None
    # DoRA (Liu et al., 2024): also learn each output row's magnitude; see dora.py.
    use_dora: bool = False

    def __post_init__(self):
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"LoraConfig.r must be a positive integer (typical: 4, 8, 16), got {self.r!r}")
        if not isinstance(self.alpha, (int, float)) or self.alpha <= 0:
            raise ValueError(f"LoraConfig.alpha must be a positive number (typical: r or 2*r), got {self.alpha!r}")
        if not isinstance(self.dropout, (int, float)) or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout!r}")
        if isinstance(self.target_modules, (tuple, set)):
            self.target_modules = sorted(self.target_modules)
        if self.target_modules is not None and not isinstance(self.target_modules, (str, list)):
            raise ValueError(
                "LoraConfig.target_modules must be a list of module names, a regex string, or 'all-linear', "
                f"got {type(self.target_modules).__name__}"
            )
        if isinstance(self.modules_to_save, str):
            self.modules_to_save = [self.modules_to_save]
        if self.task_type not in TASK_TYPES:
            raise ValueError(f"LoraConfig.task_type must be one of {TASK_TYPES}, got {self.task_type!r}")
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig.use_dora must be True or False, got {self.use_dora!r}")
        if self.rslora and (self.rank_pattern or self.alpha_pattern):
            raise ValueError("rslora cannot be combined with rank_pattern or alpha_pattern (peft forbids it too)")

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """r and alpha for one module: the first matching pattern wins, as in peft."""
        r, alpha = self.r, self.alpha
        for key, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                r = value
                break
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", name):
                alpha = value
                break
        return r, alpha


def _linear_types() -> tuple[type, ...]:
    """Layer types LoRA can wrap: nn.Linear, the 4-bit NF4Linear, and a LoRALinear
    (which takes one more adapter)."""
    return (nn.Linear, NF4Linear, LoRALinear)


def _matches(name: str, patterns: list[str] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return name in patterns or any(name.endswith("." + p) for p in patterns)


def _entry_matches(entry: str, names: list[str]) -> bool:
    return any(name == entry or name.endswith("." + entry) for name in names)


def _adapter_free_modules(model: nn.Module):
    """named_modules() without the insides of existing LoRA and modules_to_save wrappers."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if isinstance(module, (LoRALinear, ModulesToSaveWrapper)):
            skip.append(name)
        yield name, module


def _output_head_names(model: nn.Module) -> set[str]:
    """The output head that 'all-linear' leaves alone: lm_head or a classifier."""
    heads = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    else:
        for attr in SEQ_CLS_HEAD_NAMES:
            if isinstance(getattr(model, attr, None), nn.Module):
                heads.append(getattr(model, attr))
                break
    return {name for name, m in model.named_modules() if any(m is h for h in heads)}


def shorten_per_layer(names: list[str]) -> list[str]:
    """`model.layers.0.mlp.up_proj`, `model.layers.1.mlp.up_proj` -> `model.layers.N.mlp.up_proj`."""
    seen: dict[str, None] = {}
    for name in names:
        seen.setdefault(re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", name), None)
    return list(seen)


def _no_match_error(asked, linear_names: list[str]) -> ValueError:
    """First line: the problem and the fix (what the CLI prints); then every linear layer."""
    short = shorten_per_layer(linear_names)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in linear_names})
    wanted = [asked] if isinstance(asked, str) else list(asked)
    # Best match first, as difflib ranks them.
    close = list(dict.fromkeys(c for w in wanted for c in difflib.get_close_matches(w, leaves + short, n=3, cutoff=0.5)))
    first = f"target_modules {asked!r}: no linear layer of this model matches"
    if close:
        first += f"; closest: {', '.join(close)}"
    first += f"; valid names: {', '.join(leaves) or '(none: the model has no linear layers)'}, or 'all-linear'"
    lines = [first, "Linear layers (N = any layer index):"]
    lines += [f"  {n}" for n in short[:60]]
    if len(short) > 60:
        lines.append(f"  ... and {len(short) - 60} more")
    return ValueError("\n".join(lines))


def _modules_to_save_entries(model: nn.Module, config: LoraConfig) -> tuple[list[str], list[str]]:
    """(entries the user gave, entries added for a classification head)."""
    given = list(config.modules_to_save or [])
    auto = []
    if config.task_type == "SEQ_CLS":
        # As peft does: a classification adapter always trains and saves its head.
        auto = [h for h in SEQ_CLS_HEAD_NAMES if h not in given and hasattr(model, h)]
    return given, auto


def match_modules_to_save(model: nn.Module, given: list[str], auto: list[str] = ()) -> list[str]:
    """Full names of the modules that the entries `given` (by the user) and `auto` (added
    for the task) name. Like peft, an entry matches any module whose name ends with it
    (so `classifier` also takes `pre_classifier`); the outermost match wins."""
    entries = list(given) + [a for a in auto if a not in given]
    chosen: list[str] = []
    for name, _ in _adapter_free_modules(model):
        if name and any(name.endswith(e) for e in entries) and not any(name.startswith(c + ".") for c in chosen):
            chosen.append(name)
    # peft writes both head names into a classification adapter's config, so a
    # head name that is absent is not an error; any other unmatched entry is.
    missing = [e for e in given if e not in SEQ_CLS_HEAD_NAMES and not any(c.endswith(e) for c in chosen)]
    if missing:
        top = [n for n, _ in model.named_children()]
        raise ValueError(f"modules_to_save entries {missing} match no module; the model's top-level modules are {top}")
    return chosen


def resolve_modules_to_save(model: nn.Module, config: LoraConfig) -> list[str]:
    """Full names of the modules that train in full. Like peft, an entry matches
    any module whose name ends with it (so `classifier` also takes `pre_classifier`)."""
    given, auto = _modules_to_save_entries(model, config)
    chosen = match_modules_to_save(model, given, auto)
    for name in chosen:
        module = model.get_submodule(name)
        if any(isinstance(m, LoRALinear) for m in module.modules()):
            raise ValueError(
                f"modules_to_save entry {name!r} holds LoRA layers of another adapter; a module cannot be both "
                "LoRA-adapted and trained in full: leave it out of modules_to_save or out of the other's targets"
            )
    return chosen


def default_targets(model: nn.Module, linear_names: list[str]) -> list[str]:
    """peft's default targets for the model's type (attention query and value)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in DEFAULT_TARGETS:
        leaves = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear_names}))
        raise ValueError(
            f"LoraConfig.target_modules is not set and there is no default for model type {model_type!r}; "
            f"set it to some of: {leaves}, or to 'all-linear'"
        )
    return DEFAULT_TARGETS[model_type]


def resolve_targets(model: nn.Module, config: LoraConfig) -> tuple[list[str], list[str] | str]:
    """(full names of the layers `inject` would wrap, the target_modules that select
    them as peft would save it), without changing the model."""
    linear_types = _linear_types()
    saved = resolve_modules_to_save(model, config)
    modules = [(n, m) for n, m in _adapter_free_modules(model) if n]
    # Adapters never go inside a module that trains in full (peft's rule too).
    modules = [(n, m) for n, m in modules if not any(n == s or n.startswith(s + ".") for s in saved)]
    linear_names = [n for n, m in modules if isinstance(m, linear_types)]

    targets = config.target_modules
    if targets is None:
        targets = default_targets(model, linear_names)
    if isinstance(targets, str) and targets.lower() == "all-linear":
        heads = _output_head_names(model)
        chosen = [n for n in linear_names if n not in heads]
        if not chosen:
            raise _no_match_error(targets, linear_names)
        return chosen, _portable_targets(chosen)

    chosen = []
    for name, module in modules:
        if not _matches(name, targets):
            continue
        if config.exclude_modules and _matches(name, config.exclude_modules):
            continue
        if not isinstance(module, linear_types):
            raise ValueError(
                f"target module {name!r} is a {type(module).__name__}; LoRA wraps linear layers only "
                f"({', '.join(t.__name__ for t in linear_types)}). Name its linear sub-layers instead."
            )
        chosen.append(name)
    if not chosen:
        raise _no_match_error(targets, linear_names)
    if isinstance(targets, list):
        unmatched = [t for t in targets if not _entry_matches(t, chosen)]
        if unmatched:
            raise _no_match_error(unmatched, linear_names)
    return chosen, targets


def _portable_targets(chosen: list[str]) -> list[str]:
    """What 'all-linear' selected, written as an explicit list (peft saves it so too):
    the leaf names when they select exactly the same layers, else the full names."""
    leaves = sorted({n.rsplit(".", 1)[-1] for n in chosen})
    return leaves if len(leaves) == len(set(chosen)) else list(chosen)


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
