"""`modules_to_save`: a module trained in full next to the adapters, one copy per adapter.

A classification head (or any module listed in `LoraConfig.modules_to_save`) is new
or task-specific, so it is trained entirely rather than through a low-rank update.
peft wraps it in `ModulesToSaveWrapper`; so do we, with the same key names
(`<name>.modules_to_save.<adapter>.weight`, `<name>.original_module.weight`).
"""

from __future__ import annotations

import copy

from torch import nn

from .mixed_batch import rows_of


class ModulesToSaveWrapper(nn.Module):
    """A module trained in full (`modules_to_save`), one copy per adapter, as peft does it.

    `original_module` is kept frozen and untouched: it serves "base" rows of a mixed
    batch, `disable_adapters`, and `remove_lora`. Each adapter trains its own copy in
    `modules_to_save.<name>`; the active adapter's copy computes the output, so
    switching adapters switches the head. Attributes the wrapper does not have
    (`weight`, `bias`, ...) are read from the module that is in use.
    """

    def __init__(self, original_module: nn.Module, adapter_name: str):
        super().__init__()
        self.original_module = original_module
        self.original_module.requires_grad_(False)
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disabled = False
        self.row_adapters: list[str] | None = None
        self.add_adapter(adapter_name)
        self.set_adapter(adapter_name)

    def add_adapter(self, name: str) -> None:
        if name in self.modules_to_save:
            raise ValueError(f"this module already has a copy for adapter {name!r}")
        # Each adapter starts from the pretrained module, not from another adapter's copy.
        module = copy.deepcopy(self.original_module)
        module.requires_grad_(False)
        self.modules_to_save[name] = module

    def set_adapter(self, name: str) -> None:
        for key, module in self.modules_to_save.items():
            module.requires_grad_(key == name)
        self.active_adapter = name if name in self.modules_to_save else None

    def delete_adapter(self, name: str) -> None:
        if name == self.active_adapter:
            raise ValueError(f"cannot delete the active adapter {name!r}; switch to another one first")
        del self.modules_to_save[name]

    def active_module(self) -> nn.Module:
        if self.disabled or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, x, *args, **kwargs):
        if self.row_adapters is None or self.disabled:
            return self.active_module()(x, *args, **kwargs)
        out = None
        for name, rows in rows_of(self.row_adapters, x.shape[0], x.device).items():
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            part = module(x[rows], *args, **kwargs)
            if out is None:
                out = part.new_empty((x.shape[0],) + tuple(part.shape[1:]))
            out[rows] = part
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Not during construction or unpickling (nothing to forward to yet).
            if name.startswith("__") or "active_adapter" not in self.__dict__:
                raise
            return getattr(self.active_module(), name)
