"""Fused, chunked linear + cross-entropy for the language-model head.

A causal LM's loss is cross-entropy over logits z = W h (+ b), with W the lm_head
weight (V x H). Written the obvious way, `F.cross_entropy(lm_head(h).float(), y)`
materialises every logit: for SmolLM2, 1024 tokens x 49152 vocab x 4 bytes = 201 MB,
then as much again for the log-softmax autograd saves, and again for the logits'
gradient. This module computes the same loss and gradients without ever holding more
than `chunk_size` rows of logits.

For a row h_i with target y_i:

    z_i        = W h_i (+ b)                                 V logits
    loss_i     = logsumexp(z_i) - z_i[y_i]                   = -log softmax(z_i)[y_i]
    dL/dz_i    = softmax(z_i) - onehot(y_i)                  call it g_i (V numbers)
    dL/dh_i    = W^T g_i                                     H numbers
    dL/dW      = sum_i g_i h_i^T                             V x H
    dL/db      = sum_i g_i

and the loss is L = sum_i loss_i over the rows that have a target.

Chunking caps memory. Each row's terms need only that row's logits, so rows are
taken `chunk_size` at a time: compute the chunk's logits, their log-softmax, its loss,
turn the log-softmax in place into g, and reduce g at once to dL/dh (chunk x H) and the
running sums for dL/dW and dL/db. The chunk's logits are then dropped, so the peak
is two chunk_size x V blocks (logits and log-softmax, for a moment) instead of N x V.

Computing the gradient in the forward is exact, not an approximation. L is a scalar
sum, so whatever comes after it, the chain rule only multiplies dL/dh, dL/dW and
dL/db by one number, grad_output = d(final)/dL. Backward is therefore that multiply
and a scatter of dL/dh back to the full set of rows; no logits are saved or rebuilt.
The price is that the gradients are computed even if backward never runs, so the
forward skips them when nothing asks for a gradient (torch.no_grad(), evaluation).

Rows labelled `ignore_index` are dropped before the lm_head matmul, so padding and
prompt tokens cost no lm-head FLOPs at all; their gradient is zero.

As a fast piece, `install` gives our causal LMs a `head` that takes this path when the
caller asks for the loss only (`labels=..., return_logits=False`, as the trainer does)
and the head is a plain nn.Linear. An adapted head (LoRA on lm_head, a trainable copy in
modules_to_save) and every other call take the plain head (models/lm_head.py).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..models.gemma import GemmaForCausalLM
from ..models.gpt2 import GPT2LMHeadModel
from ..models.llama import LlamaForCausalLM
from ..models.phi3 import Phi3ForCausalLM
from ..models.lm_head import IGNORE_INDEX, next_token_labels
from .swap import swap_class

# Logits per chunk when the caller gives no chunk_size: 2^25 fp32 numbers, 128 MB (682
# rows of SmolLM2's or GPT-2's vocabulary, 261 of Llama 3's). Each chunk streams the
# whole head weight through the cache twice (logits, then dL/dh), so fewer, larger
# chunks are faster (benchmarks/RESULTS.md).
CHUNK_LOGITS = 1 << 25


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                         ignore_index: int = -100, chunk_size: int | None = None) -> Tensor:  # fmt: skip
    """Sum over targeted rows of -log softmax(hidden @ weight.T + bias)[label], in float32.

    hidden: (..., H); weight: (V, H) as nn.Linear stores it; labels: (...) integer ids
    in [0, V), or `ignore_index` where a row has no target. Equal to
    `F.cross_entropy(F.linear(hidden, weight, bias).float().flatten(0, -2), labels.flatten(),
    ignore_index=ignore_index, reduction="sum")`, with gradients for hidden, weight
    and bias, but never more than `chunk_size` rows of logits in memory (None: as many
    rows as keep a chunk within CHUNK_LOGITS numbers, split evenly). Divide by the
    number of targets for the mean. With no targets at all the result is a zero that
    still backpropagates (zero gradients).
    """
    if chunk_size is None:
        chunk_size = max(1, CHUNK_LOGITS // weight.shape[0])
    _check_inputs(hidden, weight, labels, bias, ignore_index, chunk_size)
    # Inside Function.forward grad mode is always off, so whether the caller wants
    # gradients has to be read here.
    return _LinearCrossEntropy.apply(hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels.reshape(-1).long(),
                                     ignore_index, chunk_size, torch.is_grad_enabled())  # fmt: skip


def _check_inputs(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Tensor | None, ignore_index: int,
                  chunk_size: int) -> None:  # fmt: skip
    if weight.dim() != 2:
        raise ValueError(f"weight must be (vocab, hidden) as nn.Linear stores it, got shape {tuple(weight.shape)}")
    vocab, width = weight.shape
    if hidden.dim() == 0 or hidden.shape[-1] != width:
        raise ValueError(f"hidden has shape {tuple(hidden.shape)}: its last dimension must be {width}, "
                         f"the hidden size of weight {tuple(weight.shape)} (vocab x hidden)")  # fmt: skip
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels have shape {tuple(labels.shape)} but hidden {tuple(hidden.shape)} needs one label "
                         f"per row, shape {tuple(hidden.shape[:-1])}")  # fmt: skip
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integer token ids, got dtype {labels.dtype}")
    if bias is not None and bias.shape != (vocab,):
        raise ValueError(f"bias has shape {tuple(bias.shape)} but weight {tuple(weight.shape)} needs a bias of "
                         f"shape ({vocab},)")  # fmt: skip
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (rows of logits per step), got {chunk_size!r}")
    # Under autocast F.linear picks the matmul dtype itself (an fp32 lm_head on bf16
    # hidden states is the usual case); without it mixed dtypes would fail inside the
    # matmul with a less helpful message.
    dtypes = {hidden.dtype, weight.dtype} | ({bias.dtype} if bias is not None else set())
    if len(dtypes) > 1 and not torch.is_autocast_enabled(hidden.device.type):
        raise ValueError(f"hidden ({hidden.dtype}), weight ({weight.dtype})"
                         + (f" and bias ({bias.dtype})" if bias is not None else "")
                         + " must share a dtype outside autocast; cast one of them")  # fmt: skip
    targeted = labels != ignore_index
    bad = labels[targeted & ((labels < 0) | (labels >= vocab))]
    if bad.numel():
        raise ValueError(f"label {bad[0].item()} is outside [0, {vocab}), the vocabulary of weight "
                         f"{tuple(weight.shape)}; mark rows without a target with ignore_index={ignore_index}")  # fmt: skip


def _add_matmul(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out += a @ b, with `out` an fp32 accumulation buffer."""
    if a.dtype == b.dtype == out.dtype:
        out.addmm_(a, b)  # no V x H temporary
    else:
        # bf16 matmuls already accumulate in fp32 internally; the fp32 buffer keeps
        # the sum over chunks from losing bits to bf16 rounding.
        out += a @ b


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                chunk_size: int, grad_enabled: bool) -> Tensor:  # fmt: skip
        rows = (labels != ignore_index).nonzero().squeeze(1)
        targets = labels.index_select(0, rows)
        picked = hidden.index_select(0, rows)
        want_hidden, want_weight, want_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])

        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_picked = torch.empty_like(picked) if want_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_bias else None

        # Equal chunks: 759 rows at 682 a chunk run as 380 + 379, not 682 + 77.
        n_chunks = max(1, -(-len(rows) // chunk_size))
        chunk_size = -(-len(rows) // n_chunks) if len(rows) else chunk_size
        for start in range(0, len(rows), chunk_size):
            h = picked[start : start + chunk_size]
            y = targets[start : start + chunk_size]
            # Logits in the matmul's dtype, log-softmax in fp32: what
            # F.cross_entropy(logits.float(), ...) would see. torch's fused log_softmax
            # is one kernel; logsumexp, then z - lse, is five passes over the chunk.
            log_p = torch.log_softmax(F.linear(h, weight, bias).float(), dim=1)
            loss -= log_p.gather(1, y[:, None]).sum()
            if not (want_hidden or want_weight or want_bias):
                continue
            # softmax(z) - onehot(y), built over log_p in place so that one chunk x V
            # block is all this loop holds between chunks.
            g = log_p.exp_()
            g[torch.arange(len(y), device=g.device), y] -= 1
            if want_bias:
                grad_bias += g.sum(0)
            g = g.to(h.dtype)
            if want_hidden:
                grad_picked[start : start + len(y)] = g @ weight
            if want_weight:
                _add_matmul(grad_weight, g.t(), h)

        ctx.n_rows = hidden.shape[0]
        ctx.save_for_backward(rows, grad_picked, None if grad_weight is None else grad_weight.to(weight.dtype),
                              None if grad_bias is None else grad_bias.to(bias.dtype))  # fmt: skip
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        rows, grad_picked, grad_weight, grad_bias = ctx.saved_tensors
        # The loss is a plain sum, so its gradients were final up to this one factor.
        grad_hidden = None
        if grad_picked is not None:
            grad_hidden = grad_picked.new_zeros(ctx.n_rows, grad_picked.shape[1])
            grad_hidden.index_copy_(0, rows, grad_picked * grad_loss)
        if grad_weight is not None:
            grad_weight = grad_weight * grad_loss
        if grad_bias is not None:
            grad_bias = grad_bias * grad_loss
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


class FusedLossHead:
    """A causal LM's `head` that computes the loss without the logits when it may."""

    lm_head: nn.Module

    def head(self, hidden: Tensor, labels: Tensor | None, return_logits: bool = True):
        # Gemma 2's logits are soft-capped (c tanh(z / c)), which this loss does not compute.
        capped = getattr(self.config, "final_logit_softcapping", None) is not None
        if labels is None or return_logits or type(self.lm_head) is not nn.Linear or capped:
            return super().head(hidden, labels, return_logits)
        targets = next_token_labels(labels.to(hidden.device))
        count = (targets != IGNORE_INDEX).sum()
        loss_sum = linear_cross_entropy(hidden, self.lm_head.weight, targets, bias=self.lm_head.bias,
                                        ignore_index=IGNORE_INDEX)  # fmt: skip
        return None, loss_sum / count, loss_sum


class FusedLossLlamaForCausalLM(FusedLossHead, LlamaForCausalLM):
    pass


class FusedLossGPT2LMHeadModel(FusedLossHead, GPT2LMHeadModel):
    pass


class FusedLossPhi3ForCausalLM(FusedLossHead, Phi3ForCausalLM):
    pass


class FusedLossGemmaForCausalLM(FusedLossHead, GemmaForCausalLM):
    pass


_FUSED = {LlamaForCausalLM: FusedLossLlamaForCausalLM, GPT2LMHeadModel: FusedLossGPT2LMHeadModel,
          Phi3ForCausalLM: FusedLossPhi3ForCausalLM, GemmaForCausalLM: FusedLossGemmaForCausalLM}


def install(model: nn.Module) -> int:
    """Our causal LMs in `model` compute a loss-only forward without the logits."""
    return sum(swap_class(m, cls, _FUSED[cls]) for m in model.modules() if (cls := type(m)) in _FUSED)
