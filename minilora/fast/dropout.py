"""Dropout that keeps one byte per element for the backward pass, not four.

Dropout (Srivastava et al., 2014) with inverted scaling, as torch and transformers do it:

    y = (m ⊙ x) / (1 - p),    m_i ~ Bernoulli(1 - p),    dL/dx = (m ⊙ dL/dy) / (1 - p)

On CPU, torch's `F.dropout` multiplies by a float noise tensor and autograd keeps that
tensor: 4 bytes per element until the backward. A BERT layer has two such dropouts
on its hidden states and one on its attention probabilities (fast/attention.py). Here
the mask is kept as bool, one byte per element.

Applying the mask: torch's CPU kernels read a bool tensor element by element (for
`x.masked_fill(~keep, 0)`, `torch.where` and `x * keep`), while the same bytes read as
uint8 (`keep.view(torch.uint8)`, no copy) go through the vectorised arithmetic path.
`apply_keep` does that.

Drawing the mask: torch's `bernoulli_` spends one 32-bit draw per element on a single
thread. We draw 64-bit words and read each as four 16-bit uniforms, so the drop
probability is p rounded to a multiple of 2^-16 (0.1 becomes 0.0999908) and the
kept values are scaled by the exact 1 / (1 - p_drawn), which keeps y unbiased.

Where the words come from: on CPU numpy's SFC64 (Doty-Humphrey's Small Fast Chaotic
generator, which passes TestU01's BigCrush and PractRand) makes them faster than
torch's mt19937, so each CPU mask is drawn by an SFC64 seeded with one 63-bit draw from
torch's default generator. `torch.manual_seed` still reproduces every mask, but the
masks are not the ones torch's dropout draws. The comparison with the threshold runs in
numpy too (see dropout_keep_mask). Other devices draw the words with torch's generator
for that device.

Under gradient checkpointing a CPU mask is not drawn twice: the block's first run keeps
it packed to one bit per element (grad_checkpoint.kept_for_rerun; 1/8 of the bool
mask) and the re-run unpacks it, which is cheaper than drawing it again. The re-run
still takes the seed from torch's generator, so any other random op in the block
draws what it drew the first time.

On CUDA, torch's dropout is already one fused kernel with a bool mask, and
`Dropout` leaves it to torch. The timings behind these choices are in
benchmarks/RESULTS.md.

As a fast piece, `install` gives the hidden-state dropouts of our BERT and DistilBERT
(embeddings, sub-layer exits, classifier heads) this class; GPT-2's dropouts and LoRA's
stay as they are (fast/lora_layer.py has LoRA's own).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..models.bert import BertEmbeddings, BertForSequenceClassification, BertSelfOutput
from ..models.distilbert import FFN, DistilBertForSequenceClassification, Embeddings
from ..models.grad_checkpoint import kept_for_rerun, rerun_mismatch
from .swap import swap_class

_LEVELS = 1 << 16


def drop_threshold(p: float) -> int:
    """How many of the 2^16 equally likely 16-bit draws drop an element."""
    return round(p * _LEVELS)


def sfc64_words(seed: int, n: int) -> torch.Tensor:
    """n uniformly random int64 words from numpy's SFC64 seeded with `seed` (CPU)."""
    return torch.from_numpy(np.random.SFC64(seed).random_raw(n).view(np.int64))


def dropout_keep_mask(shape: torch.Size | tuple[int, ...], p: float, device: torch.device) -> torch.Tensor:
    """A bool mask, True where the element is kept, with P(drop) = drop_threshold(p) / 2^16,
    determined by torch's RNG state for `device`."""
    n = 1
    for size in shape:
        n *= size
    words = (n + 3) // 4  # four uniform 16-bit integers a word
    threshold = -(2**15) + drop_threshold(p)
    if torch.device(device).type != "cpu":
        draws = torch.empty(words, dtype=torch.int64, device=device).random_(-(2**63), None)
        return (draws.view(torch.int16)[:n] >= threshold).view(shape)
    # One draw from torch's CPU generator seeds the words; it is drawn on a checkpoint's
    # re-run too, so the generator moves on there as it did the first time.
    seed = int(torch.empty((), dtype=torch.int64).random_())

    def draw() -> torch.Tensor:
        draws = sfc64_words(seed, words).view(torch.int16)[:n]
        # numpy's comparison is vectorised; torch's CPU kernel writes bool one element at a
        # time. Both views share memory.
        return torch.from_numpy(draws.numpy() >= threshold).view(shape)

    # A checkpointed block's re-run takes the mask back from its first run, kept at one
    # bit per element (1/8 of the bool mask), rather than drawing it again.
    return kept_for_rerun(draw, pack=_pack_bits, unpack=lambda bits: _unpack_bits(bits, shape, n))


def _pack_bits(keep: torch.Tensor) -> tuple[np.ndarray, tuple[int, ...]]:
    return np.packbits(keep.numpy().reshape(-1), bitorder="little"), tuple(keep.shape)


def _unpack_bits(packed: tuple[np.ndarray, tuple[int, ...]], shape, n: int) -> torch.Tensor:
    bits, kept_shape = packed
    if kept_shape != tuple(shape):
        # np.unpackbits would pad a short mask with zeros: a wrong mask, silently.
        raise rerun_mismatch(f"asks for a {tuple(shape)} dropout mask where the first run drew {kept_shape}")
    return torch.from_numpy(np.unpackbits(bits, count=n, bitorder="little").view(np.bool_)).view(shape)


def keep_factor(keep: torch.Tensor) -> torch.Tensor:
    """The bool mask as a 0/1 multiplier: its bytes read as uint8 (no copy), which torch's
    vectorised arithmetic multiplies by, where a bool operand is read element by element."""
    return keep.view(torch.uint8)


def apply_keep(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x with the elements where `keep` is False set to zero (a new tensor).

    Multiplies by keep_factor(keep), torch's fast path (see the module docstring); a NaN
    or inf that is dropped stays NaN, as in torch's own dropout."""
    return x * keep_factor(keep)


def keep_scale(p: float) -> float:
    """1 / (1 - p_drawn): the factor that keeps the dropped-out values unbiased."""
    return _LEVELS / (_LEVELS - drop_threshold(p))


class _ByteMaskDropout(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, p: float):
        keep = dropout_keep_mask(x.shape, p, x.device)
        ctx.save_for_backward(keep)
        ctx.c = keep_scale(p)
        return apply_keep(x, keep).mul_(ctx.c)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        return apply_keep(grad, keep).mul_(ctx.c), None


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """F.dropout, keeping a bool mask on CPU."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu" or p >= 1.0:
        return nn.functional.dropout(x, p, training=True)
    return _ByteMaskDropout.apply(x, p)


class Dropout(nn.Dropout):
    """nn.Dropout (same `p`, same state dict: none) that keeps a bool mask on CPU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)


# The modules whose `dropout` child is swapped (BertOutput is a BertSelfOutput).
_OWNERS = (BertEmbeddings, BertSelfOutput, BertForSequenceClassification, Embeddings, FFN,
           DistilBertForSequenceClassification)


def install(model: nn.Module) -> int:
    """The nn.Dropout modules of every BERT / DistilBERT in `model` keep a bool mask."""
    return sum(swap_class(m.dropout, nn.Dropout, Dropout) for m in model.modules() if isinstance(m, _OWNERS))
