"""Mixed precision: a frozen base in bf16, the trained weights in fp32.

QLoRA's recipe (Dettmers et al., 2023, section 3: "BFloat16 as computation data type")
and every mixed-precision trainer since Micikevicius et al. (2018) split a step by
what each number needs:

    frozen base weights W0          bf16   (never updated: nothing accumulates their rounding)
    matmuls  W0 x, B A x            bf16 operands, fp32 accumulation inside the kernel
    LoRA A, B, DoRA m, heads        fp32   master weights: lr * grad is often below bf16's
                                            resolution of a weight (8 bits of mantissa), so
                                            bf16 weights would round most updates away
    norm statistics, softmax, loss  fp32   (sums of many terms)
    AdamW moments and update        fp32

bf16 has fp32's exponent range, so unlike fp16 it needs no loss scaling. On the CPU it
pays only where the hardware multiplies bf16 natively (AMX-BF16, AVX-512 BF16: several times
the fp32 rate through oneDNN); elsewhere torch emulates it and fp32 is faster, hence
`[train] precision = "auto"`: bf16 on CUDA and on CPUs with those flags, else fp32.

Setting MINILORA_CPU_FLAGS (space-separated) replaces /proc/cpuinfo's flags, to see
what auto picks on another CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
from torch import nn

# The x86 flags under which oneDNN multiplies bf16 in hardware.
BF16_FLAGS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX-512 BF16"}


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    forced = os.environ.get("MINILORA_CPU_FLAGS")
    if forced is not None:
        return frozenset(forced.split())
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()  # not Linux, or no flags line: assume none


@dataclass(frozen=True)
class Precision:
    dtype: torch.dtype  # what the frozen base is held and multiplied in
    reason: str

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")

    def describe(self) -> str:
        return f"precision: {self.name} ({self.reason})"


def choose(setting: str, device: torch.device | str, base_dtype: torch.dtype | None = None) -> Precision:
    """`[train] precision` ("auto", "bf16", "fp32") on `device`, with why.

    `base_dtype`: the dtype the frozen base was loaded in, when known. A base loaded in
    bf16 or fp16 on purpose (`model.dtype`) computes in that dtype: "auto" follows it,
    and "fp32" is refused (an fp32 step cannot run on 16-bit weights without autocast).
    """
    device = torch.device(device)
    low = base_dtype if base_dtype in (torch.bfloat16, torch.float16) else None
    if setting == "fp32":
        if low is not None:
            raise ValueError(f"train.precision = \"fp32\", but the model's frozen weights are {low}; set "
                             "model.dtype = \"auto\" (or \"float32\"), or train.precision = \"auto\"")
        return Precision(torch.float32, "train.precision = \"fp32\"")
    if setting == "bf16":
        if low == torch.float16:
            raise ValueError("train.precision = \"bf16\", but the model's frozen weights are float16; set "
                             "model.dtype = \"auto\" or \"bfloat16\"")
        return Precision(torch.bfloat16, "train.precision = \"bf16\"")
    if setting != "auto":
        raise ValueError(f"train.precision must be \"auto\", \"bf16\" or \"fp32\", got {setting!r}")
    if low is not None:
        by_hardware = choose(setting, device)
        if by_hardware.dtype == low:  # loaded so because of the hardware (train/run.py): say why
            return by_hardware
        return Precision(low, f"auto: the model was loaded in {str(low).removeprefix('torch.')}")
    if device.type == "cuda":
        return Precision(torch.bfloat16, "auto: CUDA")
    if device.type != "cpu":
        return Precision(torch.float32, f"auto: {device.type}")
    found = [label for flag, label in BF16_FLAGS.items() if flag in cpu_flags()]
    if found:
        return Precision(torch.bfloat16, f"auto: this CPU has {' and '.join(found)}")
    return Precision(torch.float32, "auto: this CPU has neither AMX-BF16 nor AVX-512 BF16, so bf16 would be "
                                    "emulated and slower than fp32")


def frozen_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's frozen floating weights (the first one found), or None."""
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            return p.dtype
    return None


def autocast(precision: Precision, device: torch.device):
    """The context a forward runs in: 16-bit autocast, so the fp32 heads and adapters
    multiply in 16 bits too (autocast casts each weight once per forward), or nothing."""
    if precision.dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device.type, dtype=precision.dtype)
    return contextlib.nullcontext()


def trained_in_fp32(model: nn.Module) -> nn.Module:
    """Every trained parameter (LoRA A and B, DoRA magnitudes, modules_to_save copies, new
    heads, soft prompts) in fp32, the master copy the optimizer updates.

    A module whose own weights this moves off the base's 16-bit dtype (a new head, a
    modules_to_save copy) also gets hooks that, outside autocast, run it on its input
    cast to fp32 and hand its output back in the input's dtype: the model stays callable
    as a plain module after training. LoRA's A and B need none (the layer casts).
    """
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad and p.is_floating_point()]
        moved = [p for p in own if p.dtype != torch.float32]
        for p in moved:
            p.data = p.data.float()
        if moved and name.rpartition(".")[2] not in ("lora_A", "lora_B") and not hasattr(module, "_fp32_input_of"):
            module._fp32_input_of = None
            module.register_forward_pre_hook(_to_fp32)
            module.register_forward_hook(_back_to_input_dtype)
    return model


def _to_fp32(module: nn.Module, args: tuple):
    x = args[0] if args else None
    if not torch.is_tensor(x) or x.dtype not in (torch.bfloat16, torch.float16) or torch.is_autocast_enabled(
            x.device.type):
        module._fp32_input_of = None
        return None
    module._fp32_input_of = x.dtype
    return (x.float(), *args[1:])


def _back_to_input_dtype(module: nn.Module, args: tuple, out):
    dtype, module._fp32_input_of = module._fp32_input_of, None
    if dtype is not None and torch.is_tensor(out) and out.is_floating_point():
        return out.to(dtype)
    return None
