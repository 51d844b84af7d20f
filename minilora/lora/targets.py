"""Which layers get an adapter: peft's target rules, and errors that name the real layers.

- a list entry matches a module's full name exactly, or as a dotted suffix
  (`"q_proj"` matches `model.layers.3.self_attn.q_proj`, not `xq_proj`);
- a single string is a regular expression that must match the full name;
- `"all-linear"` takes every linear layer except the output head;
- `modules_to_save` entries match any module whose name ends with them.
"""

from __future__ import annotations

import difflib
import re

from torch import nn

from ..qlora.nf4_linear import NF4Linear
from .config import DEFAULT_TARGETS, SEQ_CLS_HEAD_NAMES, LoraConfig
from .layer import LoRALinear
from .modules_to_save import ModulesToSaveWrapper


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
