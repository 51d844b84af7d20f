"""DistilBERT: BERT distilled to half the depth, with the same post-LayerNorm blocks.

DistilBERT (Sanh et al., 2019) trains a 6-layer student to imitate a 12-layer
BERT. The block is BERT's, under different names:

    a = sa_layer_norm(h + out_lin(Attention(q_lin h, k_lin h, v_lin h)))
    h = output_layer_norm(a + Dropout(ffn.lin2(GELU(ffn.lin1(a)))))

with Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V per head (M masks the
padding; see bert.py). What the distillation removed: token-type (segment)
embeddings and the pooler. The classifier therefore reads the [CLS] token's final
hidden state directly, through its own small MLP:

    logits = classifier(Dropout(ReLU(pre_classifier(h[:, 0]))))

Module names mirror the Hugging Face checkpoint keys (`distilbert.transformer.
layer.N.attention.q_lin`, ...), and every projection is an nn.Linear that LoRA can
wrap. Shared pieces (mask, activations, outputs, loss, init) come from bert.py, the
attention from attention.py; minilora.fast swaps in the same fast modules as for BERT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import EncoderSelfAttention
from .bert import (
    EncoderOutput,
    SequenceClassifierOutput,
    check_one_input,
    classification_loss,
    config_from_dict,
    get_activation,
    init_weights,
    padding_mask,
)

_LAYER_NORM_EPS = 1e-12  # fixed in DistilBERT; not a config field


@dataclass
class DistilBertConfig:
    vocab_size: int = 30522
    max_position_embeddings: int = 512
    sinusoidal_pos_embds: bool = False
    n_layers: int = 6
    n_heads: int = 12
    dim: int = 768
    hidden_dim: int = 3072
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    initializer_range: float = 0.02
    seq_classif_dropout: float = 0.2
    pad_token_id: int = 0
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    problem_type: str | None = None
    model_type: str = "distilbert"

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not a multiple of n_heads {self.n_heads}")
        get_activation(self.activation)

    @classmethod
    def from_hf(cls, d: dict) -> "DistilBertConfig":
        return config_from_dict(cls, d)


def sinusoidal_positions(n_pos: int, dim: int) -> torch.Tensor:
    """The fixed table of "Attention Is All You Need": sin on even, cos on odd columns."""
    pos = torch.arange(n_pos, dtype=torch.float64)[:, None]
    freq = torch.pow(10000.0, -2 * (torch.arange(dim) // 2).double() / dim)
    angles = pos * freq
    out = torch.empty(n_pos, dim, dtype=torch.float64)
    out[:, 0::2], out[:, 1::2] = torch.sin(angles[:, 0::2]), torch.cos(angles[:, 1::2])
    return out.float()


class Embeddings(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.dim, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.dim)
        self.LayerNorm = nn.LayerNorm(config.dim, eps=_LAYER_NORM_EPS)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, input_ids=None, inputs_embeds=None):
        return self.dropout(self.LayerNorm(self.embed(input_ids, inputs_embeds)))

    def embed(self, input_ids=None, inputs_embeds=None) -> torch.Tensor:
        """word[id] + position[i], before the LayerNorm."""
        # inputs_embeds stands in for word[id] (prompt tuning's learned vectors).
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        positions = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        return inputs_embeds + self.position_embeddings(positions)


class MultiHeadSelfAttention(EncoderSelfAttention):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.num_heads = config.n_heads
        self.q_lin = nn.Linear(config.dim, config.dim)
        self.k_lin = nn.Linear(config.dim, config.dim)
        self.v_lin = nn.Linear(config.dim, config.dim)
        self.out_lin = nn.Linear(config.dim, config.dim)
        self.dropout_p = config.attention_dropout

    def projections(self):
        return self.q_lin, self.k_lin, self.v_lin

    def forward(self, h, mask):
        return self.out_lin(self.self_attention(h, mask))


class FFN(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.lin1 = nn.Linear(config.dim, config.hidden_dim)
        self.lin2 = nn.Linear(config.hidden_dim, config.dim)
        self.act = get_activation(config.activation)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.lin2(self.act(self.lin1(x))))


class TransformerBlock(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.attention = MultiHeadSelfAttention(config)
        self.sa_layer_norm = nn.LayerNorm(config.dim, eps=_LAYER_NORM_EPS)
        self.ffn = FFN(config)
        self.output_layer_norm = nn.LayerNorm(config.dim, eps=_LAYER_NORM_EPS)

    def forward(self, h, mask):
        # transformers applies no dropout to the attention output here, unlike BERT.
        a = self.sa_layer_norm(self.attention(h, mask) + h)
        return self.output_layer_norm(self.ffn(a) + a)


class Transformer(nn.Module):
    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.layer = nn.ModuleList(TransformerBlock(config) for _ in range(config.n_layers))

    def forward(self, h, mask):
        for layer in self.layer:
            h = layer(h, mask)
        return h


# Heads of other DistilBERT checkpoints (masked-LM, classifier, QA): ignored by the encoder.
_DISTILBERT_HEADS = (
    "vocab_transform.", "vocab_layer_norm.", "vocab_projector.", "pre_classifier.", "classifier.", "qa_outputs."
)


class DistilBertModel(nn.Module):
    """The plain encoder (task "embedding"): last hidden states; DistilBERT has no pooler."""

    tied_weights: dict[str, str] = {}
    new_head_prefixes: tuple[str, ...] = ()

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.transformer = Transformer(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))
        if config.sinusoidal_pos_embds:
            with torch.no_grad():
                table = sinusoidal_positions(config.max_position_embeddings, config.dim)
                self.embeddings.position_embeddings.weight.copy_(table)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def get_output_embeddings(self):
        return None

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor):
        if key.startswith("distilbert."):  # a task model's checkpoint: its encoder is ours
            key = key[len("distilbert."):]
        if key.endswith("embeddings.position_ids") or key.startswith(_DISTILBERT_HEADS):
            return None
        return key, tensor

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> EncoderOutput:
        # token_type_ids is accepted so one training loop fits every encoder;
        # DistilBERT has no segment embeddings, so it is ignored.
        check_one_input(input_ids, inputs_embeds)
        h = self.embeddings(input_ids, inputs_embeds)
        return EncoderOutput(last_hidden_state=self.transformer(h, padding_mask(attention_mask, h.dtype)))


class DistilBertForSequenceClassification(nn.Module):
    """Encoder + pre_classifier + ReLU + dropout + classifier on [CLS]."""

    tied_weights: dict[str, str] = {}
    new_head_prefixes = ("pre_classifier.", "classifier.")

    def __init__(self, config: DistilBertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.distilbert = DistilBertModel(config)
        self.pre_classifier = nn.Linear(config.dim, config.dim)
        self.classifier = nn.Linear(config.dim, config.num_labels)
        self.dropout = nn.Dropout(config.seq_classif_dropout)
        for head in (self.pre_classifier, self.classifier):
            init_weights(head, config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.distilbert.embeddings.word_embeddings

    def get_output_embeddings(self):
        return None

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor):
        if key.startswith(("pre_classifier.", "classifier.")):
            return key, tensor
        converted = self.distilbert.convert_checkpoint_tensor(key, tensor)
        if converted is None:
            return None
        return "distilbert." + converted[0], converted[1]

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                inputs_embeds=None) -> SequenceClassifierOutput:
        h = self.distilbert(input_ids, attention_mask, inputs_embeds=inputs_embeds).last_hidden_state
        pooled = self.dropout(F.relu(self.pre_classifier(h[:, 0])))
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        return SequenceClassifierOutput(loss=loss, logits=logits)
