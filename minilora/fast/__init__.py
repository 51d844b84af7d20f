"""Opt-in speed and memory work, kept apart from the teaching code.

The code in `lora/`, `qlora/` and `models/` is the plain computation, written to be
read next to the papers; nothing there imports this package. Each piece here is a
drop-in for one plain piece: it computes the same thing (bit for bit where its test
says so, else to the tolerance its test states) and is faster or leaner on the CPU.
A piece installs itself onto a model by giving a module a subclass of its own class
(`module.__class__ = FastX`): parameters, buffers, state-dict keys and hooks stay as
they were, and only the forward (or backward) changes. One piece is process-wide
instead: `nf4_codec` switches qlora/nf4.py's codec (the same bytes, faster), since
quantization also runs while a checkpoint is read, before there is a model.

    model = minilora.load_model(...)
    minilora.inject(model, config)      # plain LoRA: the paper's forward
    minilora.fast.enable(model)         # the same model, on the fast paths

`minilora train`, `minilora demo` and `minilora.train.loop.train` enable it
(`[train] fast = false` turns it off); a model of your own gets the plain path unless
you call `enable`. What each piece wins, measured plain against fast in one run, is in
benchmarks/RESULTS.md ("fast pieces").
"""

from __future__ import annotations

from torch import nn

from . import (
    attention,
    dropout,
    linear_ce,
    lora_layer,
    nf4_codec,
    rerun,
    rms_norm,
    unpad,
)
from .swap import swap_class

# Each piece: a module with `install(model) -> int`, the number of modules it changed.
PIECES = {
    "lora_dropout": lora_layer,   # LoRA's dropout branch keeps a byte mask, not x'
    "dropout": dropout,           # the encoders' dropout keeps a byte mask, drawn from SFC64 words
    "attention": attention,       # the encoders' attention dropout keeps a byte mask
    "unpad": unpad,               # the encoders train on their real tokens only, not the padding
    "linear_ce": linear_ce,       # LM-head cross-entropy in chunks, the logits never whole
    "rerun": rerun,               # a checkpoint re-run skips the down projection's frozen product
    "rms_norm": rms_norm,         # RMSNorm with a hand-written backward (a dozen passes fewer)
    "nf4_codec": nf4_codec,       # NF4 quantize/dequantize tuned for the CPU (process-wide, see below)
}


def enable(model: nn.Module, pieces: list[str] | None = None) -> dict[str, int]:
    """Put `model` on the fast paths; returns how many modules each piece changed.

    Run it after `inject` (and after loading adapters): layers added later are plain
    until `enable` runs again, which is safe to do (installed pieces are skipped).
    """
    names = list(PIECES) if pieces is None else pieces
    unknown = sorted(set(names) - set(PIECES))
    if unknown:
        raise ValueError(f"unknown fast pieces {unknown}; choose from {sorted(PIECES)}")
    return {name: PIECES[name].install(model) for name in names}


__all__ = ["PIECES", "enable", "swap_class"]
