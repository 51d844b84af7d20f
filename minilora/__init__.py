"""minilora: LoRA and QLoRA fine-tuning from scratch in plain PyTorch.

The public API is small and stable; everything not re-exported here may change.
"""

# First, before any computation: settle MKL's kernel choices while one thread runs
# (models/vml_warmup.py), so that two runs with one seed give the same bits.
from .models.vml_warmup import warm_up_vml

warm_up_vml()

from .io.generation import generate
from .io.loading import load_model
from .io.tokenizer import load_tokenizer
from .lora.adapters import load_adapter, save_adapter
from .lora.config import LoraConfig
from .lora.inject import (
    count_parameters,
    inject,
    lora_state_dict,
    merge_lora,
    print_trainable_parameters,
    remove_lora,
    unmerge_lora,
)
from .lora.layer import LoRALinear
from .lora.named_adapters import (
    delete_adapter,
    disable_adapters,
    mixed_batch,
    set_adapter,
)
from .lora.prompt_tuning import (
    PromptTuningConfig,
    add_prompt_tuning,
    load_prompt_tuning,
    save_prompt_tuning,
)
from .qlora.nf4 import NF4Weight, quantize_nf4
from .qlora.nf4_linear import NF4Linear
from .qlora.quantize_folder import quantize_folder

__version__ = "0.1.0"

__all__ = [
    "LoRALinear",
    "LoraConfig",
    "inject",
    "merge_lora",
    "unmerge_lora",
    "remove_lora",
    "lora_state_dict",
    "count_parameters",
    "print_trainable_parameters",
    "save_adapter",
    "load_adapter",
    "set_adapter",
    "delete_adapter",
    "disable_adapters",
    "mixed_batch",
    "PromptTuningConfig",
    "add_prompt_tuning",
    "save_prompt_tuning",
    "load_prompt_tuning",
    "load_model",
    "load_tokenizer",
    "generate",
    "quantize_nf4",
    "NF4Weight",
    "NF4Linear",
    "quantize_folder",
]
