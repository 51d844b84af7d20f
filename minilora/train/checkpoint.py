"""Training checkpoints: everything a killed run needs to go on exactly where it stopped.

    <run>/checkpoints/step-000120/
        adapter_config.json, adapter_model.safetensors   the adapter, in peft's format
        trainer_state.safetensors                        optimizer moments, RNG states
        trainer_state.json                               step, data position, best metric, ...

No pickle anywhere: tensors go to safetensors, everything else to JSON, so loading a
checkpoint can never run code. A checkpoint is written into a temporary folder and
renamed into place as the last act, so a crash mid-write leaves the previous
checkpoint as it was and at worst a `.tmp-*` folder that the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import give_default_mode
from ..io.safetensors_files import load_safetensors
from ..lora.trainable import save_trainable, trainable_state_dict

STATE_TENSORS = "trainer_state.safetensors"
STATE_JSON = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def _optimizer_to_flat(optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{pid}.{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars[f"{pid}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, pid, key = name.split(".", 2)
            state.setdefault(int(pid), {})[key] = value
    for name, value in meta["scalars"].items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _rng_tensors() -> dict[str, torch.Tensor]:
    rng = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            rng[f"rng.cuda.{i}"] = s
    return rng


def _restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda.")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = Path(run_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (meaning its latest checkpoint)."""
    path = Path(path)
    if (path / STATE_JSON).is_file():
        return path
    found = list_checkpoints(path)
    if found:
        return found[-1]
    raise FileNotFoundError(f"no checkpoint at {path}: expected a checkpoints/step-N folder or a run folder holding one")


def save_checkpoint(
    run_dir: str | os.PathLike,
    model: nn.Module,
    optimizer,
    state: dict,
    keep_last: int | None = None,
) -> Path:
    """Write checkpoint `step-<state['step']>` atomically; return its folder."""
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob(".tmp-*"):  # left behind by a crash during an earlier save
        shutil.rmtree(stale, ignore_errors=True)
    final = folder / f"step-{state['step']:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=folder))
    give_default_mode(tmp)
    try:
        save_trainable(model, tmp)
        tensors, meta = _optimizer_to_flat(optimizer)
        tensors.update(_rng_tensors())
        save_file(tensors, str(tmp / STATE_TENSORS))
        (tmp / STATE_JSON).write_text(json.dumps({**state, "optimizer": meta}, indent=1))
        for f in tmp.iterdir():
            give_default_mode(f)  # safetensors creates its files 0600
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():  # the same step saved again: swap, then drop the old one
            old = final.with_name(f".tmp-old-{final.name}")
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep_last:
        for old in list_checkpoints(run_dir)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer) -> dict:
    """Fill the adapter and optimizer from a checkpoint, restore RNG; return its state."""
    path = resolve_checkpoint(path)
    tensors = load_safetensors(path / STATE_TENSORS)
    state = json.loads((path / STATE_JSON).read_text())
    adapter = load_safetensors(path / "adapter_model.safetensors")
    params = trainable_state_dict(model)
    with torch.no_grad():
        for key, value in adapter.items():
            name = key.removeprefix("base_model.model.")
            if name not in params:
                raise ValueError(f"checkpoint {path} holds {name!r}, which this model's adapter lacks; "
                                 "resume with the same model and LoRA settings")
            params[name].copy_(value)
    if optimizer is not None:
        optimizer.load_state_dict(_optimizer_from_flat(tensors, state.pop("optimizer")))
    else:
        state.pop("optimizer")
    _restore_rng(tensors)
    state["checkpoint"] = str(path)
    return state
