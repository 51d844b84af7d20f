"""Running an encoder on its real tokens only, not on padding.

A batch of sentences of different lengths is padded to its longest: for SST-2's
random batches of 32 that is about two thirds padding. In an encoder layer only
attention mixes tokens; every other step (the q/k/v and output projections, the MLP,
LayerNorm, dropout, residual sums) acts on each token alone. So the layer can keep
its hidden states as (tokens, hidden), the N real tokens of the batch stacked, and
spread them into the padded (batch, seq, hidden) layout only for attention:

    x_real = x_padded[rows],   rows = the flat indexes where attention_mask = 1
    x_padded = 0 everywhere, x_padded[rows] = x_real

The padded positions take no part in any result (attention's mask gives their keys
no weight; their queries' outputs are dropped again), so the real tokens' values are
the same as the padded computation's, for a fraction of the matmul work. This is the
"unpadding" of FlashAttention's BERT and of NVIDIA's BERT training code; with it,
random batches cost about what length-grouped ones do (benchmarks/RESULTS.md). Our
BERT and DistilBERT use it in training; attention.self_attention does the spreading.
"""

from __future__ import annotations

import torch


class Unpadded:
    """Where a padded batch's real tokens sit: `rows` indexes its (batch * seq) positions."""

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.seq = attention_mask.shape
        self.rows = attention_mask.reshape(-1).nonzero().squeeze(1)

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (tokens, ...): the real tokens' rows."""
        return x.reshape(self.batch * self.seq, *x.shape[2:])[self.rows]

    def spread(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, ...) -> (batch, seq, ...), zeros at the padded positions."""
        out = x.new_zeros(self.batch * self.seq, *x.shape[1:])
        return out.index_copy(0, self.rows, x).view(self.batch, self.seq, *x.shape[1:])

    @classmethod
    def in_training(cls, attention_mask: torch.Tensor | None, training: bool) -> "Unpadded | None":
        """The batch's real tokens when training on a padded batch, else None. In evaluation
        the padded layout is kept, so that last_hidden_state's padded positions hold what
        transformers' do."""
        if not training or attention_mask is None or bool(attention_mask.all()):
            return None
        return cls(attention_mask)
