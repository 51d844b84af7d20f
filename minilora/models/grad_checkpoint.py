"""Gradient checkpointing: keep a block's inputs, drop what it saves for the backward,
and run the block again when the backward first needs it.

Chen et al., "Training Deep Nets with Sublinear Memory Cost" (2016): with one
checkpoint per transformer layer, activation memory falls from O(layers × per-layer)
to O(layers × layer input + one layer's activations), for one more forward per layer.

How: while the block runs forward, a saved-tensors hook (torch.autograd.graph) stores
an index instead of each tensor autograd wants to keep. When the backward unpacks the
first of them, the block runs once more, with the same inputs, the same RNG state
(dropout draws the same masks) and the same autocast settings, and this time the
hook keeps the tensors; the backward then takes them by index. The recomputed
forward is only a source of saved tensors: its graph is thrown away, and the
gradients flow through the original graph. Each recomputed tensor is let go as
soon as the backward has taken it, so the memory of a layer's activations drains
as its backward proceeds; a second backward (retain_graph) recomputes again.

Checkpointing one layer in every N (`enable(model, every=N)`) is the same trade made
coarser: N = 1 keeps only layer inputs, N = 2 keeps every other layer's activations
and runs half the layers again, so the extra forward costs half as much for about half
the memory saving (torchtune's selective activation checkpointing by layer frequency).
The measured trade is in benchmarks/RESULTS.md.

Two questions a block may ask while it runs, for the fast pieces (the plain models ask
neither): `recomputing(block)`, whether it is the block being run again (its output
is then discarded, so fast/rerun.py skips work that only feeds the output), and
`kept_for_rerun(compute, pack, unpack)`, a value the first run keeps for the re-runs
instead of computing it again (fast/dropout.py keeps its masks this way, at one bit
per element).

The mechanism is what torch.utils.checkpoint(use_reentrant=False) does. Ours exists because
that function is wrapped in torch._disable_dynamo, whose first call imports
torch._dynamo and with it Triton: resident memory, in a CPU training run that
compiles nothing, where checkpointing is there to save memory (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import torch

_local = threading.local()
T = TypeVar("T")


def _running() -> list[tuple["_Block", bool]]:
    """The checkpointed blocks running on this thread, innermost last, each with whether
    it is running again for its saved tensors (True) or for the first time (False)."""
    if not hasattr(_local, "running"):
        _local.running = []
    return _local.running


def recomputing(fn: Callable) -> bool:
    """Whether `fn` is the checkpointed function now running again for its saved tensors
    (so its output is unused). False inside anything else, e.g. a layer that is part of
    a larger checkpointed block, whose output that block still needs."""
    running = _running()
    return bool(running) and running[-1][1] and running[-1][0].fn == fn


def kept_for_rerun(compute: Callable[[], T], pack: Callable[[T], Any] = lambda v: v,
                   unpack: Callable[[Any], T] = lambda v: v) -> T:
    """compute(), except inside a checkpointed block: its first run keeps pack(value) and
    its re-runs return unpack(kept) in the same order instead of computing again.

    For values cheaper to keep than to make, e.g. a dropout mask packed to one bit per
    element (fast/dropout.py). The value must be what the re-run would compute: the
    block runs with the same inputs and RNG state, so anything computed from them is."""
    running = _running()
    if not running:
        return compute()
    block, rerun = running[-1]
    if rerun:
        if block.replayed == len(block.kept):
            raise rerun_mismatch(f"asks for more kept values than the first run kept ({len(block.kept)})")
        block.replayed += 1
        return unpack(block.kept[block.replayed - 1])
    value = compute()
    block.kept.append(pack(value))
    return value


def rerun_mismatch(what: str) -> RuntimeError:
    """The error for a re-run that did not repeat its first run: `what` it did instead."""
    return RuntimeError(f"gradient checkpointing: the recomputed forward {what}; the checkpointed function must "
                        "run the same ops given the same inputs")


def _autocast_devices() -> tuple[str, ...]:
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


class _Block:
    """One checkpointed call: what it takes to run it again, and its tensors once it has."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn = fn
        # Same values, same requires_grad (ops decide what to save from it), but not
        # attached to the caller's graph, so the rerun adds nothing to it.
        self.args = tuple(a.detach().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                          for a in args)
        self.cuda_devices = sorted({a.device.index or 0 for a in args if isinstance(a, torch.Tensor) and a.is_cuda})
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = [torch.cuda.get_rng_state(d) for d in self.cuda_devices]
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in _autocast_devices()}
        self.count = 0  # tensors the first run saved
        self.saved: list[torch.Tensor] | None = None
        self.unpacked = 0
        self.kept: list = []  # kept_for_rerun's values, in the order the first run made them
        self.replayed = 0

    def get(self, index: int) -> torch.Tensor:
        if self.saved is None or self.saved[index] is None:  # first use, or a second backward
            self.saved, self.unpacked = self._rerun(), 0
        tensor = self.saved[index]
        # Hand it over: the backward keeps it only while it needs it. Kept here until
        # the block's last unpack, a layer's recomputed activations would pile up over
        # the whole backward (benchmarks/RESULTS.md, "Moved from docstrings").
        self.saved[index] = None
        self.unpacked += 1
        if self.unpacked == self.count:
            self.saved = None
        return tensor

    def _rerun(self) -> list[torch.Tensor]:
        saved: list[torch.Tensor] = []

        def keep(t):
            saved.append(t)
            return None

        with torch.random.fork_rng(devices=self.cuda_devices):
            torch.set_rng_state(self.cpu_rng)
            for d, state in zip(self.cuda_devices, self.cuda_rng):
                torch.cuda.set_rng_state(state, d)
            self.replayed = 0
            with _run(self, rerun=True), torch.enable_grad(), _autocast(self.autocast), \
                    torch.autograd.graph.saved_tensors_hooks(keep, lambda _: None):
                self.fn(*self.args)
        if len(saved) != self.count or self.replayed != len(self.kept):
            raise rerun_mismatch(f"saved {len(saved)} tensors and took back {self.replayed} kept values, the "
                                 f"first one {self.count} and {len(self.kept)}")
        return saved


@contextlib.contextmanager
def _run(block: _Block, rerun: bool):
    _running().append((block, rerun))
    try:
        yield
    finally:
        _running().pop()


class _autocast:
    def __init__(self, settings: dict):
        self.contexts = [torch.autocast(d, dtype=dtype, enabled=on) for d, (on, dtype) in settings.items()]

    def __enter__(self):
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.contexts):
            c.__exit__(*exc)


def enable(model: torch.nn.Module, every: int = 1) -> int:
    """Turn gradient checkpointing on in every submodule of `model` that supports it
    (has a `gradient_checkpointing` flag), checkpointing layers 0, every, 2*every, ...;
    returns how many modules took it."""
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"checkpoint every {every!r} layers: expected an integer >= 1 (1: every layer)")
    found = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.gradient_checkpointing, module.checkpoint_every = True, every
            found += 1
    return found


def checkpoint(fn: Callable, *args):
    """fn(*args), keeping for the backward only what it takes to run fn(*args) again."""
    if not torch.is_grad_enabled():
        return fn(*args)
    block = _Block(fn, args)

    def pack(_tensor) -> int:
        block.count += 1
        return block.count - 1

    with _run(block, rerun=False), torch.autograd.graph.saved_tensors_hooks(pack, block.get):
        return fn(*args)
