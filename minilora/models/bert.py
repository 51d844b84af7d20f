"""BERT: a stack of post-LayerNorm Transformer encoder blocks.

BERT (Devlin et al., 2018) turns token ids into one vector per token. The input
vector of each token is the sum of three learned embeddings, then normalised:

    h0 = LayerNorm(word[id] + position[i] + token_type[segment])

Each of the N encoder blocks then lets every token look at every other token
(self-attention) and transforms each token on its own (a two-layer MLP). BERT is
*post*-LayerNorm: the normalisation comes after each residual sum, not before the
sub-layer as in GPT-2 and Llama:

    a = LayerNorm(h + Dropout(W_o · Attention(h)))          attention.output.*
    h = LayerNorm(a + Dropout(W_2 · GELU(W_1 · a)))         intermediate.* / output.*

Attention, per head of width d = hidden_size / num_heads:

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V

where Q = h W_q, K = h W_k, V = h W_v (attention.self.query/key/value) and M is 0
for real tokens and a huge negative number for padding, so that padded keys get
zero weight. torch's scaled_dot_product_attention computes exactly this, using a
fused kernel where one exists (models/attention.py).

The pooler maps the first token ([CLS]) through a dense layer and tanh; the
sequence classifier puts dropout and one linear layer on top of that.

minilora.fast swaps in subclasses of a few of these modules: dropouts and an
attention dropout that keep their masks as bytes, and a BertModel that trains on the
real tokens of a padded batch only. The layers in between pass `mask` on untouched,
which is what lets fast/unpad.py hand the attention its real-token layout there.

Module names mirror the Hugging Face checkpoints key for key (including the
attribute literally called `self` inside `attention`), so that our state_dict
keys are the checkpoint's keys and every projection is an nn.Linear that a LoRA
wrapper can replace. The helpers shared with DistilBERT (activations, padding
mask, outputs, loss, init) live here too.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .attention import EncoderSelfAttention

# --------------------------------------------------------------------------- shared


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # "gelu_new" is GPT-2's tanh approximation; torch implements the same formula.
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"gelu": F.gelu, "gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "relu": F.relu}


def get_activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(ACTIVATIONS))}")
    return ACTIVATIONS[name]


def padding_mask(attention_mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """(batch, seq) of 1/0 -> additive (batch, 1, 1, seq) mask, or None if nothing is padded.

    Additive rather than boolean: a row whose keys are all padding then gets a
    uniform softmax instead of NaN, as in transformers. Returning None for an
    unpadded batch lets SDPA pick its fastest (mask-free) kernel.
    """
    if attention_mask is None or bool(attention_mask.all()):
        return None
    keep = attention_mask[:, None, None, :].to(torch.bool)
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(~keep, torch.finfo(dtype).min)


@dataclass
class EncoderOutput:
    last_hidden_state: torch.Tensor  # (batch, seq, hidden)
    pooler_output: torch.Tensor | None = None  # (batch, hidden): tanh(dense(h[:, 0]))


@dataclass
class SequenceClassifierOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor  # (batch, num_labels)


def classification_loss(logits, labels, num_labels: int, problem_type: str | None) -> torch.Tensor:
    """The loss transformers picks: MSE for one label (regression), cross-entropy for
    integer labels, binary cross-entropy for float multi-hot labels."""
    if problem_type is None:
        if num_labels == 1:
            problem_type = "regression"
        elif labels.dtype in (torch.long, torch.int):
            problem_type = "single_label_classification"
        else:
            problem_type = "multi_label_classification"
    if problem_type == "regression":
        labels = labels.to(logits.dtype)
        if num_labels == 1:
            return F.mse_loss(logits.squeeze(), labels.squeeze())
        return F.mse_loss(logits, labels)
    if problem_type == "single_label_classification":
        return F.cross_entropy(logits.view(-1, num_labels), labels.view(-1))
    if problem_type == "multi_label_classification":
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))
    raise ValueError(f"unknown problem_type {problem_type!r}")


@torch.no_grad()
def init_weights(module: nn.Module, std: float) -> None:
    """transformers' BERT init: normal(0, std) for linear and embedding weights, zero
    biases, LayerNorm ones/zeros. Constructors apply it so that a model built
    directly starts where transformers' would; the loader gives heads a checkpoint
    lacks the same init. Modules on meta are skipped: the checkpoint overwrites them,
    and a random op on a meta tensor runs through torch._refs, whose first use imports
    torch._dynamo and with it Triton (resident memory a CPU run has no use for)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.is_meta:
        return
    if isinstance(module, nn.Linear):
        module.weight.normal_(0.0, std)
        if module.bias is not None:
            module.bias.zero_()
    elif isinstance(module, nn.Embedding):
        module.weight.normal_(0.0, std)
        if module.padding_idx is not None:
            module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        module.weight.fill_(1.0)
        module.bias.zero_()


def check_one_input(input_ids, inputs_embeds) -> None:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("Pass exactly one of input_ids or inputs_embeds.")


def config_from_dict(cls, d: dict):
    """Build dataclass `cls` from a config.json dict, ignoring keys it does not know."""
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in d.items() if k in names}
    if "id2label" in d and d["id2label"]:
        # JSON keys are strings; the label count is what sizes the classifier.
        kwargs["id2label"] = {int(k): v for k, v in d["id2label"].items()}
        kwargs["num_labels"] = len(kwargs["id2label"])
    return cls(**kwargs)


# --------------------------------------------------------------------------- config


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None
    num_labels: int = 2
    id2label: dict[int, str] | None = None
    problem_type: str | None = None
    model_type: str = "bert"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if self.position_embedding_type != "absolute":
            raise ValueError(
                f"position_embedding_type {self.position_embedding_type!r} is not supported; only 'absolute'"
            )
        get_activation(self.hidden_act)  # fail at config time, not mid-forward

    @classmethod
    def from_hf(cls, d: dict) -> "BertConfig":
        if d.get("is_decoder") or d.get("add_cross_attention"):
            raise ValueError("BERT as a decoder / with cross-attention is not supported; only the encoder")
        return config_from_dict(cls, d)


# --------------------------------------------------------------------------- modules


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids=None, token_type_ids=None, inputs_embeds=None):
        return self.dropout(self.LayerNorm(self.embed(input_ids, token_type_ids, inputs_embeds)))

    def embed(self, input_ids=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        """word[id] + token_type[segment] + position[i], before the LayerNorm."""
        # inputs_embeds stands in for word[id]: prompt tuning prepends learned vectors
        # that have no token id, and they still get positions and segment 0 added.
        if inputs_embeds is None:
            inputs_embeds = self.word_embeddings(input_ids)
        batch, seq = inputs_embeds.shape[:2]
        # Positions are computed, not stored: no buffer to materialise after a meta build.
        positions = torch.arange(seq, device=inputs_embeds.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros(batch, seq, dtype=torch.long, device=inputs_embeds.device)
        h = inputs_embeds + self.token_type_embeddings(token_type_ids)
        return h + self.position_embeddings(positions)


class BertSelfAttention(EncoderSelfAttention):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(config.hidden_size, config.hidden_size)
        self.value = nn.Linear(config.hidden_size, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob

    def projections(self):
        return self.query, self.key, self.value

    def forward(self, h, mask):
        return self.self_attention(h, mask)


class BertSelfOutput(nn.Module):
    """dense -> dropout -> add the residual -> LayerNorm: how both BERT sub-layers end."""

    def __init__(self, config: BertConfig, in_features: int | None = None):
        super().__init__()
        self.dense = nn.Linear(in_features or config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertSelfOutput(config)

    def forward(self, h, mask):
        return self.output(self.self(h, mask), h)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = get_activation(config.hidden_act)

    def forward(self, x):
        return self.act(self.dense(x))


class BertOutput(BertSelfOutput):
    """The MLP's second projection (intermediate_size -> hidden) and its residual exit."""

    def __init__(self, config: BertConfig):
        super().__init__(config, in_features=config.intermediate_size)


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, h, mask):
        a = self.attention(h, mask)
        return self.output(self.intermediate(a), a)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, h, mask):
        for layer in self.layer:
            h = layer(h, mask)
        return h


class BertPooler(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, h):
        return torch.tanh(self.dense(h[:, 0]))


# --------------------------------------------------------------------------- models

# Task heads of other BERT checkpoints (pretraining, masked-LM, QA, classifier):
# ignored when they are not part of the model being loaded.
_BERT_HEADS = ("cls.", "classifier.", "qa_outputs.")


class BertModel(nn.Module):
    """The plain encoder (task "embedding"): last hidden states plus the pooler output."""

    tied_weights: dict[str, str] = {}
    # May be absent from a checkpoint (e.g. a masked-LM one); the loader then
    # initialises it and reports it as new.
    new_head_prefixes = ("pooler.",)

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)
        self.apply(lambda m: init_weights(m, config.initializer_range))

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embeddings.word_embeddings

    def get_output_embeddings(self):
        return None

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor):
        # Old Google checkpoints name LayerNorm parameters gamma/beta.
        if key.endswith(".gamma") and "LayerNorm" in key:
            key = key[: -len("gamma")] + "weight"
        elif key.endswith(".beta") and "LayerNorm" in key:
            key = key[: -len("beta")] + "bias"
        if key.startswith("bert."):  # a task model's checkpoint: its encoder is ours
            key = key[len("bert."):]
        # position_ids / token_type_ids were int64 buffers in old checkpoints; we compute them.
        if key.endswith(("embeddings.position_ids", "embeddings.token_type_ids")) or key.startswith(_BERT_HEADS):
            return None
        return key, tensor

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> EncoderOutput:
        h = self.encode(input_ids, attention_mask, token_type_ids, inputs_embeds)
        return EncoderOutput(last_hidden_state=h, pooler_output=None if self.pooler is None else self.pooler(h))

    def encode(self, input_ids=None, attention_mask=None, token_type_ids=None, inputs_embeds=None) -> torch.Tensor:
        """The last hidden states, (batch, seq, hidden)."""
        check_one_input(input_ids, inputs_embeds)
        h = self.embeddings(input_ids, token_type_ids, inputs_embeds)
        return self.encoder(h, padding_mask(attention_mask, h.dtype))


class BertForSequenceClassification(nn.Module):
    """Encoder + pooler + dropout + linear classifier (task "sequence-classification")."""

    tied_weights: dict[str, str] = {}
    new_head_prefixes = ("bert.pooler.", "classifier.")

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.num_labels = config.num_labels
        self.bert = BertModel(config)
        p = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = nn.Dropout(p)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        init_weights(self.classifier, config.initializer_range)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.bert.embeddings.word_embeddings

    def get_output_embeddings(self):
        return None

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor):
        if key.startswith("classifier."):
            return key, tensor
        # Encoder-only checkpoints (all-MiniLM-L6-v2) carry no "bert." prefix; the
        # encoder's own rules normalise both kinds, then we add it back.
        converted = self.bert.convert_checkpoint_tensor(key, tensor)
        if converted is None:
            return None
        return "bert." + converted[0], converted[1]

    def forward(self, input_ids=None, attention_mask=None, token_type_ids=None, labels=None,
                inputs_embeds=None) -> SequenceClassifierOutput:
        pooled = self.bert(input_ids, attention_mask, token_type_ids, inputs_embeds).pooler_output
        logits = self.classifier(self.dropout(pooled))
        loss = None
        if labels is not None:
            loss = classification_loss(logits, labels, self.num_labels, self.config.problem_type)
        return SequenceClassifierOutput(loss=loss, logits=logits)
