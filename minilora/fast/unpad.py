"""Training an encoder on its real tokens only, not on padding.

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
random batches cost about what length-grouped ones do (benchmarks/RESULTS.md).

How it installs: `RealTokenBertModel` (and DistilBERT's) takes the real tokens after
the embeddings' sum and hands the encoder an `Unpadded` where the plain model passes
the additive padding mask. The layers in between pass it on untouched to the attention
module, whose real-token subclass here spreads q, k and v for the attention and takes
the real tokens back. Only in training on a padded batch: in evaluation the padded
layout is kept, so that last_hidden_state's padded positions hold what transformers'
do. The dropouts then draw masks of (tokens, hidden), not (batch, seq, hidden).
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.attention import EncoderSelfAttention
from ..models.bert import (
    BertModel,
    BertSelfAttention,
    EncoderOutput,
    check_one_input,
    padding_mask,
)
from ..models.distilbert import DistilBertModel, MultiHeadSelfAttention
from . import attention
from .attention import ByteMaskBertSelfAttention, ByteMaskMultiHeadSelfAttention
from .swap import swap_class


# The number of rows the layers see is rounded up to a multiple of this, with padded
# positions (see Unpadded).
ROW_BUCKET = 64


class Unpadded:
    """Where a padded batch's real tokens sit: `rows` indexes its (batch * seq) positions.
    `scores_mask` is the additive padding mask the attention adds to its scores.

    The row count is rounded up to a multiple of ROW_BUCKET by taking some padded
    positions too (as far as the batch has them). Without it every batch would hand the
    matmuls a new number of rows, and a bf16 matmul on the CPU (oneDNN) builds and keeps
    a kernel for each new shape: an SST-2 epoch in bf16 peaked at 1.7 GB instead of 0.8.
    The extra rows are padding: attention gives their keys no weight and their outputs
    go back to padded positions, so no real token's value changes."""

    def __init__(self, attention_mask: torch.Tensor):
        self.batch, self.seq = attention_mask.shape
        flat = attention_mask.reshape(-1)
        rows = flat.nonzero().squeeze(1)
        self.n_real = len(rows)  # rows[:n_real] are the real tokens, the rest padding taken along
        wanted = min(-(-len(rows) // ROW_BUCKET) * ROW_BUCKET, flat.numel())
        if wanted > len(rows):
            rows = torch.cat([rows, (flat == 0).nonzero().squeeze(1)[: wanted - len(rows)]])
        self.rows = rows
        self.scores_mask: torch.Tensor | None = None

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, ...) -> (tokens, ...): the real tokens' rows."""
        return x.reshape(self.batch * self.seq, *x.shape[2:])[self.rows]

    def spread(self, x: torch.Tensor, real_only: bool = False) -> torch.Tensor:
        """(tokens, ...) -> (batch, seq, ...), zeros at the padded positions (with
        real_only, also where the padding rows taken along would go)."""
        rows = self.rows[: self.n_real] if real_only else self.rows
        x = x[: self.n_real] if real_only else x
        out = x.new_zeros(self.batch * self.seq, *x.shape[1:])
        return out.index_copy(0, rows, x).view(self.batch, self.seq, *x.shape[1:])

    @classmethod
    def in_training(cls, attention_mask: torch.Tensor | None, training: bool) -> "Unpadded | None":
        """The batch's real tokens when training on a padded batch, else None."""
        if not training or attention_mask is None or bool(attention_mask.all()):
            return None
        return cls(attention_mask)


class RealTokenAttention(EncoderSelfAttention):
    """Self-attention on (tokens, hidden) states when `mask` is an Unpadded: the projections
    run on the real tokens, only the attention on the padded layout."""

    def self_attention(self, h, mask):
        if not isinstance(mask, Unpadded):
            return super().self_attention(h, mask)
        real, b, s = mask, mask.batch, mask.seq
        q, k, v = (real.spread(proj(h)).view(b, s, self.num_heads, -1).transpose(1, 2) for proj in self.projections())
        out = self.attention(q, k, v, real.scores_mask, self.dropout_p if self.training else 0.0)
        return real.take(out.transpose(1, 2).reshape(b, s, -1))


class RealTokenBertSelfAttention(RealTokenAttention, BertSelfAttention):
    pass


class RealTokenByteMaskBertSelfAttention(RealTokenAttention, ByteMaskBertSelfAttention):
    pass


class RealTokenMultiHeadSelfAttention(RealTokenAttention, MultiHeadSelfAttention):
    pass


class RealTokenByteMaskMultiHeadSelfAttention(RealTokenAttention, ByteMaskMultiHeadSelfAttention):
    pass


def _real_token_embeddings(embeddings: nn.Module, real: Unpadded, *args) -> torch.Tensor:
    """The embeddings' forward with the padding taken out after the sum: LayerNorm and
    dropout act on each token alone."""
    return embeddings.dropout(embeddings.LayerNorm(real.take(embeddings.embed(*args))))


class RealTokenBertModel(BertModel):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> EncoderOutput:
        real = Unpadded.in_training(attention_mask, self.training)
        if real is None:
            return super().forward(input_ids, attention_mask, token_type_ids, inputs_embeds)
        check_one_input(input_ids, inputs_embeds)
        h = _real_token_embeddings(self.embeddings, real, input_ids, token_type_ids, inputs_embeds)
        real.scores_mask = padding_mask(attention_mask, h.dtype)
        h = real.spread(self.encoder(h, real), real_only=True)
        return EncoderOutput(last_hidden_state=h, pooler_output=self.pooler(h))


class RealTokenDistilBertModel(DistilBertModel):
    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> EncoderOutput:
        real = Unpadded.in_training(attention_mask, self.training)
        if real is None:
            return super().forward(input_ids, attention_mask, token_type_ids, inputs_embeds)
        check_one_input(input_ids, inputs_embeds)
        h = _real_token_embeddings(self.embeddings, real, input_ids, inputs_embeds)
        real.scores_mask = padding_mask(attention_mask, h.dtype)
        return EncoderOutput(last_hidden_state=real.spread(self.transformer(h, real), real_only=True))


# The class a module has -> its real-token class (the attention modules' with or without
# fast/attention.py's byte mask, so that the two pieces install in either order).
REAL_TOKENS: dict[type, type] = {
    BertModel: RealTokenBertModel,
    DistilBertModel: RealTokenDistilBertModel,
    BertSelfAttention: RealTokenBertSelfAttention,
    ByteMaskBertSelfAttention: RealTokenByteMaskBertSelfAttention,
    MultiHeadSelfAttention: RealTokenMultiHeadSelfAttention,
    ByteMaskMultiHeadSelfAttention: RealTokenByteMaskMultiHeadSelfAttention,
}
attention.BYTE_MASK.update({
    RealTokenBertSelfAttention: RealTokenByteMaskBertSelfAttention,
    RealTokenMultiHeadSelfAttention: RealTokenByteMaskMultiHeadSelfAttention,
})


def install(model: nn.Module) -> int:
    """BERT / DistilBERT encoders in `model` train on their real tokens (their attention
    modules take the real-token layout)."""
    return sum(swap_class(m, cls, REAL_TOKENS[cls]) for m in model.modules() if (cls := type(m)) in REAL_TOKENS)
