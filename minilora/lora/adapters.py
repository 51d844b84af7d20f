"""Adapters on disk, in peft's format, so peft loads ours and we load theirs.

An adapter folder holds two files:

    adapter_config.json          {"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                  "target_modules": [...], ...}
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight  (r x in)
                                 base_model.model.<module path>.lora_B.weight  (out x r)
                                 base_model.model.<module path>.lora_magnitude_vector  (out; DoRA only)
                                 base_model.model.<module path>.<param>        (modules_to_save)

`base_model.model.` is the prefix peft's wrapper classes put in front of the
wrapped model's own names; the adapter name is left out of saved keys, as peft
does: one folder holds one adapter, and `name=` says which one to save or what to
call the one loaded. Both files are written atomically. Loading checks every key and
shape against the model before touching it, so a bad file changes nothing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import atomic_write, atomic_write_text
from ..io.safetensors_files import open_safetensors
from ..io.text_files import utf8_errors_named
from .config import LoraConfig
from .inject import adapter_names, get_lora_config, inject, lora_state_dict
from .modules_to_save import ModulesToSaveWrapper
from .targets import resolve_modules_to_save, resolve_targets

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# peft options that change the math and that minilora does not implement (yet):
# loading an adapter that uses one is an error, never a silent difference.
_UNSUPPORTED = {
    "bias": ("none", None),
    "layers_to_transform": (None,),
    "layers_pattern": (None,),
    "lora_bias": (False, None),
    "target_parameters": (None, []),
    "trainable_token_indices": (None,),
    "use_qalora": (False, None),
    "alora_invocation_tokens": (None,),
}


def write_adapter_files(directory: Path, tensors: dict, peft_config: dict) -> Path:
    """peft's two files, each written atomically: weights first, then the config, so a
    folder with a config always has its weights."""
    directory.mkdir(parents=True, exist_ok=True)
    with atomic_write(directory / WEIGHTS_NAME) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt"})
    atomic_write_text(directory / CONFIG_NAME, json.dumps(peft_config, indent=2, sort_keys=True) + "\n")
    return directory


@torch.no_grad()
def fill_adapter(params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], is_trainable: bool) -> None:
    """Copy checked saved tensors into the adapter's parameters; freeze them unless training on."""
    for key, value in tensors.items():
        params[key].copy_(value)
    if not is_trainable:
        for p in params.values():
            p.requires_grad_(False)


def save_adapter(model: nn.Module, directory: str | os.PathLike, base_model_name_or_path: str | None = None,
                 *, name: str | None = None) -> Path:  # fmt: skip
    """Write adapter `name` (default: the active one) to `directory` in peft's format;
    return the folder."""
    config = get_lora_config(model, name)
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"save_adapter: {directory} exists and is not a folder")
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or getattr(
            getattr(model, "config", None), "_name_or_path", None
        )
    tensors = {PREFIX + k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model, name).items()}
    peft_config = {
        "peft_type": "LORA",
        "task_type": config.task_type,
        "base_model_name_or_path": base_model_name_or_path or None,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": config.target_modules,
        "exclude_modules": config.exclude_modules,
        "use_rslora": config.rslora,
        "modules_to_save": config.modules_to_save,
        "rank_pattern": config.rank_pattern,
        "alpha_pattern": config.alpha_pattern,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_dora": config.use_dora,
        "inference_mode": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    return write_adapter_files(directory, tensors, peft_config)


def read_raw_config(directory: str | os.PathLike) -> dict:
    """A peft adapter folder's adapter_config.json as a dict, with errors naming the path."""
    directory = Path(directory)
    path = directory / CONFIG_NAME
    if not directory.is_dir():
        raise FileNotFoundError(f"adapter folder not found: {directory}")
    if not path.is_file():
        raise FileNotFoundError(f"adapter config not found: {path} (an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    try:
        with utf8_errors_named(path):
            raw = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} holds a JSON {type(raw).__name__}, not the object of keys an adapter config is")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise ValueError(f"{path}: {key} must be an object of {{module pattern: value}}, "
                             f"got a {type(raw[key]).__name__}")
    return raw


def read_adapter_config(directory: str | os.PathLike) -> LoraConfig:
    """Parse a peft adapter_config.json into a LoraConfig, refusing what we cannot honour."""
    path = Path(directory) / CONFIG_NAME
    raw = read_raw_config(directory)
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{path}: peft_type is {raw['peft_type']!r}; minilora loads LoRA adapters only")
    for key, allowed in _UNSUPPORTED.items():
        if key in raw and raw[key] not in allowed:
            raise ValueError(f"{path}: {key}={raw[key]!r} is not supported by minilora; re-train without it")
    return LoraConfig(
        r=raw.get("r", 8),
        alpha=raw.get("lora_alpha", 8),
        dropout=raw.get("lora_dropout", 0.0),
        target_modules=raw.get("target_modules"),
        rslora=bool(raw.get("use_rslora", False)),
        modules_to_save=raw.get("modules_to_save"),
        task_type=raw.get("task_type"),
        rank_pattern=raw.get("rank_pattern") or {},
        alpha_pattern=raw.get("alpha_pattern") or {},
        exclude_modules=raw.get("exclude_modules"),
        use_dora=bool(raw.get("use_dora") or False),
    )


def _read_weights(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / WEIGHTS_NAME
    if not path.is_file():
        if (directory / "adapter_model.bin").is_file():
            raise ValueError(
                f"{directory} holds only adapter_model.bin, a pickle; minilora never unpickles. Convert it once with "
                "peft: PeftModel.from_pretrained(base, DIR).save_pretrained(DIR, safe_serialization=True)"
            )
        raise FileNotFoundError(f"adapter weights not found: {path}")
    tensors = {}
    with open_safetensors(path) as f:
        for key in f.keys():
            if not key.startswith(PREFIX):
                raise ValueError(f"{path}: key {key!r} does not start with {PREFIX!r}; not a peft LoRA adapter file")
            tensors[key[len(PREFIX):]] = f.get_tensor(key)
    return tensors


def _expected_shapes(model: nn.Module, config: LoraConfig, targets: list[str], saved: list[str]) -> dict:
    shapes = {}
    for name in targets:
        layer = model.get_submodule(name)
        r, _ = config.rank_and_alpha(name)
        shapes[f"{name}.lora_A.weight"] = (r, layer.in_features)
        shapes[f"{name}.lora_B.weight"] = (layer.out_features, r)
        if config.use_dora:
            shapes[f"{name}.lora_magnitude_vector"] = (layer.out_features,)
    for name in saved:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):  # another adapter already trains it
            module = module.original_module
        for key, value in module.state_dict().items():
            shapes[f"{name}.{key}"] = tuple(value.shape)
    return shapes


def _first(keys: list[str], n: int = 5) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def load_adapter(model: nn.Module, directory: str | os.PathLike, is_trainable: bool = False,
                 *, name: str = "default") -> list[str]:  # fmt: skip
    """Inject and fill the adapter saved in `directory` (by minilora or peft) as `name`.

    Every key and shape is checked before the model is touched. As with peft's
    `PeftModel.from_pretrained`, the adapter is frozen unless `is_trainable=True`;
    as with peft's `load_adapter`, a second adapter is added inactive (switch with
    `set_adapter`). Returns the names of the targeted layers.
    """
    directory = Path(directory)
    if name in adapter_names(model):
        raise ValueError(
            f"this model already has an adapter named {name!r} (adapters: {adapter_names(model)}); "
            f"load it under another name (load_adapter(model, dir, name=...)) or delete_adapter(model, {name!r}) first"
        )
    config = read_adapter_config(directory)
    tensors = _read_weights(directory)

    targets, _ = resolve_targets(model, config)
    saved = resolve_modules_to_save(model, config)
    expected = _expected_shapes(model, config, targets, saved)
    where = directory / WEIGHTS_NAME
    missing = [PREFIX + k for k in expected if k not in tensors]
    if missing:
        raise ValueError(f"{where}: missing {len(missing)} tensor(s) the config implies: {_first(missing)}")
    unexpected = [PREFIX + k for k in tensors if k not in expected]
    if unexpected:
        raise ValueError(
            f"{where}: {len(unexpected)} tensor(s) with no place in this model: {_first(unexpected)}; "
            "is this adapter for another model?"
        )
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(
                f"{where}: {PREFIX}{key} has shape {tuple(tensors[key].shape)} but this model needs {shape}; "
                "the adapter was trained on a model of another size"
            )

    wrapped = inject(model, config, name=name)
    fill_adapter(lora_state_dict(model, name), tensors, is_trainable)
    return wrapped
