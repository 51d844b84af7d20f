"""RoBERTa: BERT's encoder, trained differently, with two changes that show in the code.

RoBERTa (Liu et al., 2019) keeps BERT's post-LayerNorm blocks unchanged (bert.py) and
changes what goes in and what comes out:

- Positions count the real tokens only, starting past the padding index p (1 in the
  released checkpoints), so a padded position has position id p, whose embedding is
  the padding row:

      position_i = p + (number of non-padding tokens in 0..i)   for a real token
      position_i = p                                             for a padding token

  With left padding the first real token is therefore still position p + 1, not the
  index of its column. A batch given as embeddings (no ids to count) takes p + 1 + i.
- The sequence classifier has no pooler; its head reads the first token (<s>):

      logits = W_out tanh(W_dense dropout(h_0) + b_dense) + b_out,   dropout between them too

  stored as classifier.dense and classifier.out_proj.

There is one segment (type_vocab_size 1) and the checkpoints' prefix is "roberta.".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .bert import (
    BertConfig,
    BertEmbeddings,
    BertModel,
    SequenceClassifierOutput,
    classification_loss,
    config_from_dict,
    init_weights,
)


@dataclass
class RobertaConfig(BertConfig):
    vocab_size: int = 50265
    max_position_embeddings: int = 514
    type_vocab_size: int = 1
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    model_type: str = "roberta"

    @classmethod
    def from_hf(cls, d: dict) -> "RobertaConfig":
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("RoBERTa as a decoder / with cross-attention is not supported; only the encoder")
        return config_from_dict(cls, d)


def position_ids(input_ids: torch.Tensor, padding_idx: int) -> torch.Tensor:
    """padding_idx + the running count of real tokens, and padding_idx at padding."""
    real = input_ids.ne(padding_idx).int()
    return (torch.cumsum(real, dim=1).type_as(real) * real).long() + padding_idx


class RobertaEmbeddings(BertEmbeddings):
    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.padding_idx = config.pad_token_id
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size,
                                                padding_idx=config.pad_token_id)

    def embed(self, input_ids=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        if inputs_embeds is None:
            positions = position_ids(input_ids, self.padding_idx)
            inputs_embeds = self.word_embeddings(input_ids)
        else:
            seq = inputs_embeds.shape[1]
            positions = torch.arange(self.padding_idx + 1, seq + self.padding_idx + 1,
                                     device=inputs_embeds.device)[None].expand(inputs_embeds.shape[0], -1)
        batch, seq = inputs_embeds.shape[:2]
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, seq, dtype=torch.long, device=inputs_embeds.device)
        return inputs_embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)


class RobertaModel(BertModel):
    """The plain encoder (task "embedding"); the pooler when the checkpoint has one."""

    def __init__(self, config: RobertaConfig):
        super().__init__(config)
        self.embeddings = RobertaEmbeddings(config)
        self.embeddings.apply(lambda m: init_weights(m, config.initializer_range))

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor):
        if key.startswith("roberta."):
            key = key[len("roberta."):]
        if key.startswith(("lm_head.", "classifier.")):
            return None
        return super().convert_checkpoint_tensor(key, tensor)


class RobertaClassificationHead(nn.Module):
    def __init__(self, config: RobertaConfig):
        super().__init__()
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(p)
        self.out_proj = nn.Linear(config.hidden_size, config.num_labels)

    def forward(self, h):
        x = self.dropout(h[:, 0])
        x = self.dropout(torch.tanh(self.dense(x)))
        return self.out_proj(x)


class RobertaForSequenceClassification(nn.Module):
    """Encoder (no pooler) + the <s> token's classification head (task "sequence-classification")."""

    tied_weights: dict[str, str] = {}
    new_head_prefixes = ("classifier.",)

    def __init__(self, config: RobertaConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.roberta = RobertaModel(config)
        self.roberta.pooler = None  # transformers builds this model without one
        self.classifier = RobertaClassificationHead(config)
        self.classifier.apply(lambda m: init_weights(m, config.initializer_range))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.roberta.embeddings.word_embeddings

    def get_output_embeddings(self):
        return None

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor):
        if key.startswith("classifier."):
            return key, tensor
        converted = self.roberta.convert_checkpoint_tensor(key, tensor)
        if converted is None or converted[0].startswith("pooler."):
            return None
        return "roberta." + converted[0], converted[1]

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                inputs_embeds=None) -> SequenceClassifierOutput:
        h = self.roberta.encode(input_ids, attention_mask, token_type_ids, inputs_embeds)
        logits = self.classifier(h)
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        return SequenceClassifierOutput(loss=loss, logits=logits)
