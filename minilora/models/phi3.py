"""Phi-3 (Phi-3, Phi-3.5, Phi-4-mini): the Llama block with fused projections.

Phi-3 (Abdin et al., 2024) computes what llama.py computes, with three differences:

- q, k and v come from one matrix, `qkv_proj`, whose output rows are q's, then k's,
  then v's: [q; k; v] = W_qkv x. The MLP's gate and up projections are one matrix too,
  `gate_up_proj`, gate's rows first: [g; u] = W_gu x, MLP(x) = W_down(u * silu(g)).
  LoRA adapts the fused matrices as they are (targets qkv_proj, o_proj, gate_up_proj,
  down_proj), so adapters keep peft's names and shapes for Phi-3.
- RoPE may rotate only part of each head (partial_rotary_factor, 0.75 in Phi-4-mini);
  the other channels pass through unrotated (llama.apply_rope).
- The long-context variants scale RoPE with LongRoPE (Ding et al., 2024): each
  frequency theta_i is divided by its own factor, `short_factor[i]` while the sequence
  fits the pre-training length L and `long_factor[i]` beyond it, and cos and sin are
  multiplied by sqrt(1 + ln(s) / ln(L)), s = max_position_embeddings / L
  (llama.rope_inv_freq, LlamaForCausalLM.rope_cos_sin).

Phi-3 also applies dropout to each sub-layer's output before the residual sum
(resid_pdrop, 0 in the released checkpoints) and, when config.json gives a
sliding_window, restricts every layer to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import nn

from .llama import ACTIVATIONS, LlamaAttention, LlamaConfig, LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP


@dataclass
class Phi3Config(LlamaConfig):
    resid_pdrop: float = 0.0
    model_type: str = "phi3"
    model_types = ("phi3",)

    @classmethod
    def from_hf(cls, d: dict) -> "Phi3Config":
        """Read a Phi-3 config.json (rope settings in rope_scaling or, in transformers 5, rope_parameters)."""
        rope = dict(d.get("rope_parameters") or d.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", d.get("rope_theta", 10000.0)))
        rope_type = rope.pop("rope_type", rope.pop("type", "default"))
        partial = float(rope.pop("partial_rotary_factor", d.get("partial_rotary_factor", 1.0)))
        max_positions = d.get("max_position_embeddings", 4096)
        rope_scaling = None
        if rope_type in ("su", "yarn", "longrope"):  # transformers reads the old names as longrope
            original = rope.get("original_max_position_embeddings", d.get("original_max_position_embeddings", 4096))
            factor = rope.get("factor") or max_positions / original
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            rope_scaling = {"rope_type": "longrope", "long_factor": list(rope["long_factor"]),
                            "short_factor": list(rope["short_factor"]), "original_max_position_embeddings": original,
                            "attention_factor": float(attention_factor)}
        elif rope_type != "default":
            raise ValueError(f"Phi-3 rope type {rope_type!r} is not supported; supported: default, longrope (su)")
        n_layers = d.get("num_hidden_layers", 32)
        sliding_window = d.get("sliding_window")
        known = dict(
            vocab_size=d.get("vocab_size", 32064),
            hidden_size=d.get("hidden_size", 3072),
            intermediate_size=d.get("intermediate_size", 8192),
            num_hidden_layers=n_layers,
            num_attention_heads=d.get("num_attention_heads", 32),
            num_key_value_heads=d.get("num_key_value_heads"),
            head_dim=d.get("head_dim"),
            max_position_embeddings=max_positions,
            rms_norm_eps=d.get("rms_norm_eps", 1e-5),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial,
            hidden_act=d.get("hidden_act", "silu"),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            resid_pdrop=float(d.get("resid_pdrop", 0.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            sliding_window=sliding_window,
            layer_types=None if sliding_window is None else ["sliding_attention"] * n_layers,
            model_type="phi3",
        )
        return cls(**known, extra={k: v for k, v in d.items() if k not in known})


class Phi3Attention(LlamaAttention):
    def __init__(self, config: Phi3Config, layer_idx: int):
        nn.Module.__init__(self)
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = (
            config.num_attention_heads, config.num_key_value_heads, config.head_dim
        )
        self.dropout = config.attention_dropout
        out = (self.n_heads + 2 * self.n_kv_heads) * self.head_dim
        self.qkv_proj = nn.Linear(config.hidden_size, out, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x):
        B, T, _ = x.shape
        q_size, kv_size = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        return (q.view(B, T, self.n_heads, self.head_dim), k.view(B, T, self.n_kv_heads, self.head_dim),
                v.view(B, T, self.n_kv_heads, self.head_dim))


class Phi3MLP(LlamaMLP):
    def __init__(self, config: Phi3Config):
        nn.Module.__init__(self)
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACTIVATIONS[config.hidden_act]

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.act(gate))


class Phi3DecoderLayer(LlamaDecoderLayer):
    attention_class, mlp_class = Phi3Attention, Phi3MLP

    def __init__(self, config: Phi3Config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.resid_pdrop = config.resid_pdrop

    def forward(self, x, cos, sin, mask, kv_cache=None):
        p = self.resid_pdrop if self.training else 0.0
        x = x + F.dropout(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache), p)
        return x + F.dropout(self.mlp(self.post_attention_layernorm(x)), p)


class Phi3ForCausalLM(LlamaForCausalLM):
    layer_class = Phi3DecoderLayer
