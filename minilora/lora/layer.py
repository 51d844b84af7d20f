"""LoRALinear: a frozen linear layer plus trainable low-rank updates, one per named adapter.

LoRA (Hu et al., 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3)
keeps the pretrained weight W0 (out x in) frozen and learns the update as a product
of two thin matrices:

    h = W0 x + (alpha / r) * B A x            A: r x in,  B: out x r,  r << min(in, out)

         x ──┬──────────── W0 (frozen) ───────────┐
             │                                     + ──> h
             └── dropout ── A ── B ── * alpha/r ───┘

Only A and B are trained, so a 4096 x 4096 layer at r = 8 trains 65,536 numbers
instead of 16.7 million. B starts at zero, so before the first step the adapter adds
exactly nothing and the model is the pretrained one (section 4.1 of the paper).

rsLoRA (Kalajdzievski, 2023) scales by alpha / sqrt(r) instead of alpha / r, so that
the update's magnitude stays stable as r grows. DoRA (`use_dora`, see dora.py) also
learns a per-row magnitude.

Merging folds the update into the base weight, W = W0 + (alpha / r) * B A, so
inference pays nothing for the adapter; unmerging subtracts it again.

Several adapters can share one frozen W0 (section 4.2 of the paper: "we can build
many small LoRA modules for different tasks" and switch by swapping A and B). Each
named adapter is a `LoRAAdapter`. The active one is *mounted*: its modules are the
layer's own `lora_A`, `lora_B`, `lora_dropout` (and `lora_magnitude_vector`), so a
single-adapter model has exactly the parameter names it always had. The others are
*parked* in `parked_adapters.<name>`. Switching adapters re-registers a few modules
per layer: no tensor is copied, and W0 is never touched.

The parameter layout and arithmetic follow peft's `lora.Linear` so that weights,
outputs and gradients agree with it: `lora_A` and `lora_B` are bias-free
`nn.Linear` modules and the wrapped layer is kept, not copied, as `base_layer`.

The forward is the paper's line and nothing else: `base(x) + B(A(dropout(x))) * scaling`.
`minilora.fast` can swap in a branch that keeps a byte mask instead of x' for the
backward (fast/lora_layer.py); it computes the same thing.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from .dora import DoRAMagnitude, dora_merge, dora_unmerge
from .mixed_batch import mixed_batch_forward

# The modules of the active adapter that sit directly on the layer.
_MOUNTED = ("lora_A", "lora_B", "lora_dropout", "lora_magnitude_vector")


class LoRAAdapter(nn.Module):
    """One named adapter of one layer: A, B, its dropout, DoRA's magnitude, and its scale."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, rslora: bool,
                 use_dora: bool, adapter_dtype: torch.dtype | None):  # fmt: skip
        super().__init__()
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"LoRA rank r must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout!r}")
        self.r, self.alpha, self.rslora, self.use_dora = r, alpha, rslora, use_dora
        self.scaling = alpha / math.sqrt(r) if rslora else alpha / r
        # Dropout acts on the adapter's input only: the frozen path sees the clean x.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        weight = base_layer.weight
        # Adapters train in fp32 even on a bf16/fp16 (or 4-bit) base: low-precision
        # optimiser updates to tiny A and B values would round away.
        if adapter_dtype is None:
            adapter_dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        device = weight.device if weight.device.type != "meta" else None
        self.lora_A = nn.Linear(base_layer.in_features, r, bias=False, device=device, dtype=adapter_dtype)
        self.lora_B = nn.Linear(r, base_layer.out_features, bias=False, device=device, dtype=adapter_dtype)
        self.reset_parameters()
        # After A and B: m = ||W0 + s B A|| needs them (and is ||W0|| since B = 0).
        self.lora_magnitude_vector = DoRAMagnitude(base_layer, self.lora_A, self.lora_B, self.scaling) if use_dora else None

    def reset_parameters(self) -> None:
        # A: Kaiming-uniform with a = sqrt(5), the same init nn.Linear gives its own
        # weight, so A x has a sensible scale from the first step.
        # B: zeros, so B A = 0 and a fresh adapter is an exact no-op (paper, section 4.1).
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """The update (alpha / r) * B A, shape (out, in), in the adapter's dtype."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def add_update(self, x: torch.Tensor, result: torch.Tensor, base_layer: nn.Module) -> torch.Tensor:
        """`result` (the frozen layer's output W0 x) plus this adapter's update."""
        result_dtype = result.dtype
        x = x.to(self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is None:
            # h = W0 x + (alpha / r) B A x', in peft's order of operations (equal to the last bit).
            result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
            return result.to(result_dtype)
        # DoRA reuses the frozen output W0 x unless dropout changes the adapter's input.
        base_result = None
        if isinstance(self.lora_dropout, nn.Identity) or not self.lora_dropout.training:
            base_result = result
        else:
            x = self.lora_dropout(x)
        result = result + self.lora_magnitude_vector(x, self.lora_A, self.lora_B, self.scaling, base_layer, base_result)
        return result.to(result_dtype)


class LoRALinear(nn.Module):
    """Wraps an existing linear layer with one or more named LoRA adapters.

    The wrapped layer (`base_layer`) is kept as is, frozen, and never copied. It may
    be an `nn.Linear` or any module with `in_features`, `out_features` and a
    `weight` that merging knows how to update (see `_add_to_base_weight`).
    `lora_A`, `lora_B`, `r`, `alpha`, `scaling` are the active adapter's (None when
    this layer has no adapter of that name: it then acts as the base layer).
    """

    def __init__(self, base_layer: nn.Module, r: int = 8, alpha: float = 8.0, dropout: float = 0.0,
                 rslora: bool = False, adapter_dtype: torch.dtype | None = None, use_dora: bool = False,
                 adapter_name: str = "default"):  # fmt: skip
        super().__init__()
        self.base_layer = base_layer
        self.in_features = base_layer.in_features
        self.out_features = base_layer.out_features
        for name in _MOUNTED:
            self.register_module(name, None)
        self.parked_adapters = nn.ModuleDict()
        # Every adapter by name, the mounted one included (a plain dict: the modules are
        # registered once, either mounted on the layer or in parked_adapters).
        self.adapters: dict[str, LoRAAdapter] = {}
        self.active_adapter: str | None = None
        self.merged = False
        self.disabled = False
        self.row_adapters: list[str] | None = None  # set by named_adapters.mixed_batch
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.add_adapter(adapter_name, r=r, alpha=alpha, dropout=dropout, rslora=rslora, use_dora=use_dora,
                         adapter_dtype=adapter_dtype)  # fmt: skip
        self.set_adapter(adapter_name)

    # -- the active adapter's hyper-parameters, as single-adapter code reads them (None without one)
    r = property(lambda self: getattr(self._active(), "r", None))
    alpha = property(lambda self: getattr(self._active(), "alpha", None))
    scaling = property(lambda self: getattr(self._active(), "scaling", None))
    rslora = property(lambda self: getattr(self._active(), "rslora", None))
    use_dora = property(lambda self: getattr(self._active(), "use_dora", None))

    def _active(self) -> LoRAAdapter | None:
        return self.adapters.get(self.active_adapter)

    # -- named adapters
    def add_adapter(self, name: str, r: int = 8, alpha: float = 8.0, dropout: float = 0.0, rslora: bool = False,
                    use_dora: bool = False, adapter_dtype: torch.dtype | None = None) -> None:  # fmt: skip
        """Add a new, parked (inactive, frozen) adapter."""
        if name in self.adapters:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        adapter = LoRAAdapter(self.base_layer, r, alpha, dropout, rslora, use_dora, adapter_dtype)
        adapter.requires_grad_(False)
        adapter.train(self.training)
        self.adapters[name] = adapter
        self.parked_adapters[name] = adapter

    def set_adapter(self, name: str) -> None:
        """Mount adapter `name` (trainable) and park the current one (frozen). A name this
        layer does not have leaves nothing mounted: the layer then acts as its base."""
        if self.merged:
            raise ValueError(f"cannot switch to adapter {name!r} while {self.active_adapter!r} is merged; unmerge first")
        current = self._active()
        if current is not None:
            current.requires_grad_(False)
            self.parked_adapters[self.active_adapter] = current
        new = self.adapters.get(name)
        if new is not None:
            del self.parked_adapters[name]
            new.requires_grad_(True)
        for part in _MOUNTED:
            self.register_module(part, getattr(new, part) if new is not None else None)
        self.active_adapter = name if new is not None else None

    def delete_adapter(self, name: str) -> None:
        if name == self.active_adapter:
            raise ValueError(f"cannot delete the active adapter {name!r}; switch to another one first")
        del self.parked_adapters[name]
        del self.adapters[name]

    def reset_parameters(self) -> None:
        self._active().reset_parameters()

    # -- forward: h = W0 x + (alpha / r) B A x
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged or self.disabled:
            return result
        if self.row_adapters is not None:
            return mixed_batch_forward(self, x, result)
        adapter = self._active()
        if adapter is None:
            return result
        return adapter.add_update(x, result, self.base_layer)

    # -- merging: W = W0 + (alpha / r) B A, so inference pays nothing for the adapter
    def delta_weight(self) -> torch.Tensor:
        """The active adapter's update (alpha / r) * B A, shape (out, in), in the adapter's dtype."""
        return self._active().delta_weight()

    def merge(self) -> None:
        """Fold the active adapter into the base weight. Merging an already merged layer does nothing."""
        if self.merged:
            warnings.warn("LoRALinear.merge(): already merged; not adding the update twice", stacklevel=2)
            return
        adapter = self._active()
        if adapter is None:
            return  # this layer has no adapter of the active name: nothing to fold in
        if adapter.lora_magnitude_vector is None:
            self._add_to_base_weight(adapter.delta_weight())
        else:
            dora_merge(self, adapter)
        self.merged = True

    def unmerge(self) -> None:
        """Take the merged adapter out of the base weight again. Does nothing when not merged."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge(): not merged; nothing to subtract", stacklevel=2)
            return
        adapter = self._active()
        if adapter.lora_magnitude_vector is None:
            self._add_to_base_weight(-adapter.delta_weight())
        else:
            dora_unmerge(self, adapter)
        self.merged = False

    @torch.no_grad()
    def _add_to_base_weight(self, delta: torch.Tensor) -> None:
        base = self.base_layer
        # A quantized base (NF4Linear) knows how to dequantize, add and requantize.
        if hasattr(base, "add_to_weight"):
            base.add_to_weight(delta)
            return
        weight = base.weight
        # Add in the delta's precision (fp32), round once into the base dtype.
        weight.add_(delta.to(weight.device))

    def extra_repr(self) -> str:
        scaling = self.scaling if self.scaling is None else round(self.scaling, 4)
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, "
                f"alpha={self.alpha}, scaling={scaling}, rslora={self.rslora}, use_dora={self.use_dora}, "
                f"active_adapter={self.active_adapter!r}, merged={self.merged}")
