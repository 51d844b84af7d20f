"""What the training loop snapshots: a LoRA adapter or a soft prompt, by model type.

The loop, checkpoints and the best-model restore only need two things from the
thing being trained: a folder writer in peft's format and a {file key: parameter}
map to copy saved tensors back into. LoRA and prompt tuning each provide both.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .adapters import save_adapter
from .inject import lora_state_dict
from .prompt_tuning import (
    PromptTuningModel,
    prompt_tuning_state_dict,
    save_prompt_tuning,
)


def save_trainable(model: nn.Module, directory: str | os.PathLike, **kwargs) -> Path:
    if isinstance(model, PromptTuningModel):
        return save_prompt_tuning(model, directory, **kwargs)
    return save_adapter(model, directory, **kwargs)


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Saved-file keys (without peft's `base_model.model.` prefix) -> live parameters."""
    if isinstance(model, PromptTuningModel):
        return prompt_tuning_state_dict(model)
    return lora_state_dict(model)
