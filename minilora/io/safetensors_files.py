"""Reading .safetensors files with errors that name the file.

safetensors reports a truncated or corrupt file as `SafetensorError: ... incomplete
metadata` without saying which file: in a folder of shards, or a run folder with an
adapter, a checkpoint and a best/ copy, the user could not tell which one to replace.
"""

from __future__ import annotations

import os

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def _named(path, error: Exception) -> ValueError:
    return ValueError(f"{path} is not a complete safetensors file ({error}); save or download it again")


def open_safetensors(path: str | os.PathLike):
    """`safe_open(path, framework="pt")`, the file named in any error."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as e:
        raise _named(path, e) from None


def load_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of `path` (safetensors.torch.load_file), the file named in any error."""
    try:
        return load_file(str(path))
    except SafetensorError as e:
        raise _named(path, e) from None
