"""GPT-2 (Radford et al., 2019), the model nanoGPT reproduces.

A pre-norm transformer with learned absolute position embeddings:

    x_0 = wte[token] + wpe[position]
    h   = x + Attention(LayerNorm(x))
    y   = h + MLP(LayerNorm(h)),         MLP(x) = W_proj gelu(W_fc x),  W_fc: 4C x C
    logits = LayerNorm(x_L) wte^T        (the output head is tied to the input embedding)

LayerNorm (Ba et al., 2016), unlike RMSNorm, centres and has a bias:
    LayerNorm(x) = (x - mean(x)) / sqrt(var(x) + eps) * g + b

Attention is plain multi-head causal attention, softmax(q k^T / sqrt(d)) v, with
q, k and v produced by one fused projection `c_attn` (C -> 3C) and split.
GELU here is the tanh approximation OpenAI used ("gelu_new"):
    gelu(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))

Checkpoint layout. OpenAI's TF code, and hence Hugging Face's `Conv1D`, store the
projection weights as (in, out) and compute x @ W. We use plain nn.Linear, which
stores (out, in) and computes x @ W^T, so that LoRA can wrap every projection the
same way; `convert_checkpoint_tensor` therefore transposes c_attn, c_proj and c_fc
weights on load. Module names mirror the checkpoint keys otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .grad_checkpoint import checkpoint
from .kv_cache import KVCache, build_attention_mask, start_forward
from .lm_head import CausalLMOutput, causal_lm_head

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}
# Checkpoint weights stored (in, out) by HF Conv1D; nn.Linear wants (out, in).
_CONV1D_MODULES = ("c_attn", "c_proj", "c_fc")


@dataclass
class GPT2Config:
    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None  # None: 4 * n_embd
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    resid_pdrop: float = 0.1
    embd_pdrop: float = 0.1
    attn_pdrop: float = 0.1
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02  # std for weights a checkpoint lacks
    model_type: str = "gpt2"
    extra: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.model_type != "gpt2":
            raise ValueError(f"GPT2Config got model_type {self.model_type!r}; only 'gpt2' is supported.")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head}).")
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"Unsupported activation_function {self.activation_function!r}; "
                f"supported: {', '.join(ACTIVATIONS)}."
            )
        if self.n_inner is None:
            self.n_inner = 4 * self.n_embd

    # Names the rest of the code base uses for every model.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @classmethod
    def from_hf(cls, d: dict) -> "GPT2Config":
        """Read a Hugging Face GPT-2 config.json dict; missing keys take GPT2Config defaults."""
        model_type = d.get("model_type", "gpt2")
        if model_type != "gpt2":
            raise ValueError(f"model_type {model_type!r} is not GPT-2; GPT2LMHeadModel supports only 'gpt2'.")
        if d.get("add_cross_attention", False):
            raise ValueError("GPT-2 with cross-attention (add_cross_attention=True) is not supported.")
        names = [f for f in cls.__dataclass_fields__ if f not in ("extra", "model_type")]
        known = {k: d[k] for k in names if k in d}
        return cls(**known, model_type=model_type, extra={k: v for k, v in d.items() if k not in known})


class GPT2Attention(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_embd = config.n_head, config.n_embd
        self.head_dim = config.n_embd // config.n_head
        self.scale = self.head_dim**-0.5 if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:  # a GPT-2-medium-era stabiliser
            self.scale /= float(layer_idx + 1)
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.attn_pdrop = config.attn_pdrop
        self.resid_dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x, mask, kv_cache: KVCache | None):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))
        if kv_cache is not None:
            k, v = kv_cache.update(self.layer_idx, k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=self.scale,
            dropout_p=self.attn_pdrop if self.training else 0.0,
        )
        return self.resid_dropout(self.c_proj(y.transpose(1, 2).reshape(B, T, C)))


class GPT2MLP(nn.Module):
    def __init__(self, config: GPT2Config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, config.n_inner)
        self.c_proj = nn.Linear(config.n_inner, config.n_embd)
        self.act = ACTIVATIONS[config.activation_function]
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x):
        return self.dropout(self.c_proj(self.act(self.c_fc(x))))


class GPT2Block(nn.Module):
    def __init__(self, config: GPT2Config, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = GPT2Attention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = GPT2MLP(config)

    def forward(self, x, mask, kv_cache=None):
        x = x + self.attn(self.ln_1(x), mask, kv_cache)
        return x + self.mlp(self.ln_2(x))


class GPT2LMHeadModel(nn.Module):
    # Takes labels= and return_logits=False: the caller needs the loss only (lm_head.py).
    fused_lm_loss = True

    def __init__(self, config: GPT2Config):
        super().__init__()
        self.config = config
        # `transformer` as a ModuleDict gives the checkpoint's "transformer." prefix.
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList(GPT2Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.gradient_checkpointing = False
        self.checkpoint_every = 1  # with checkpointing on: layers 0, N, 2N, ... (grad_checkpoint.enable)

    @property
    def tied_weights(self) -> dict[str, str]:
        return {"lm_head.weight": "transformer.wte.weight"} if self.config.tie_word_embeddings else {}

    def tie_weights(self) -> None:
        """Make lm_head share the embedding Parameter (call again after load_state_dict(assign=True))."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def init_non_persistent_buffers(self, device: torch.device | str) -> None:
        """GPT-2 has no computed buffers (the causal mask is built per forward)."""

    def convert_checkpoint_tensor(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor] | None:
        """Map one Hugging Face / OpenAI GPT-2 checkpoint entry to our (key, tensor), or None to drop it."""
        parts = key.split(".")
        # attn.bias / attn.masked_bias are old precomputed causal-mask buffers, not weights.
        if len(parts) >= 2 and parts[-2] == "attn" and parts[-1] in ("bias", "masked_bias"):
            return None
        if not key.startswith(("transformer.", "lm_head.")):
            key = "transformer." + key  # original GPT-2 files were saved from the bare GPT2Model
            parts = key.split(".")
        if parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in _CONV1D_MODULES and tensor.ndim == 2:
            tensor = tensor.t().contiguous()  # Conv1D (in, out) -> nn.Linear (out, in)
        return key, tensor

    def export_checkpoint_tensor(self, key: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        """The inverse of convert_checkpoint_tensor: our (key, tensor) as transformers stores it."""
        parts = key.split(".")
        if parts[-1] == "weight" and len(parts) >= 2 and parts[-2] in _CONV1D_MODULES and tensor.ndim == 2:
            tensor = tensor.t().contiguous()  # nn.Linear (out, in) -> Conv1D (in, out)
        return key, tensor

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        use_cache: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> CausalLMOutput:
        kv_cache, past, checkpointing = start_forward(self, input_ids, inputs_embeds, kv_cache, use_cache)
        tok = self.transformer.wte(input_ids) if inputs_embeds is None else inputs_embeds
        T = tok.shape[1]
        if position_ids is None:
            if past + T > self.config.n_positions:
                raise ValueError(
                    f"Sequence of {past + T} tokens exceeds GPT-2's {self.config.n_positions} learned "
                    "positions (n_positions); truncate the input."
                )
            position_ids = torch.arange(past, past + T, device=tok.device)[None]
        x = self.transformer.drop(tok + self.transformer.wpe(position_ids.to(tok.device)))
        mask = build_attention_mask(attention_mask, T, past, x.device)

        for i, block in enumerate(self.transformer.h):
            if checkpointing and i % self.checkpoint_every == 0:
                x = checkpoint(block, x, mask)
            else:
                x = block(x, mask, kv_cache)
        logits, loss, loss_sum = self.head(self.transformer.ln_f(x), labels, return_logits)
        return CausalLMOutput(loss=loss, logits=logits, kv_cache=kv_cache, loss_sum=loss_sum)

    def head(self, hidden: torch.Tensor, labels: torch.Tensor | None, return_logits: bool = True):
        """(logits, mean loss, summed loss) of the final hidden states; the logits are
        built for the loss anyway, so they are returned whatever return_logits says."""
        return causal_lm_head(self.lm_head, hidden, labels)
