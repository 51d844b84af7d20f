"""Gemma 2 and Gemma 3 (text): the Llama block with Gemma's norms, scales and caps.

Gemma 2 (Gemma Team, 2024) and Gemma 3 (2025) are pre-norm decoders like Llama
(llama.py), and differ in these places:

- RMSNorm multiplies by (1 + w), with w stored as an offset from one (initialised to
  zero), and applies the gain in fp32 before casting back:

      GemmaRMSNorm(x) = (x r) * (1 + w),   r = (mean_i(x_i^2) + eps)^(-1/2)

- The embeddings are scaled by sqrt(hidden_size), rounded to the weights' dtype.
- The MLP is GeGLU: W_down(gelu_tanh(W_gate x) * (W_up x)).
- Each sub-layer is wrapped in two norms ("sandwich" norms):

      h = x + N_post_attn(Attention(N_in(x)))
      y = h + N_post_ffw(MLP(N_pre_ffw(h)))

- Attention scores are q.k / sqrt(query_pre_attn_scalar) (not sqrt(head_dim)).
- Layers alternate between a sliding window and full attention: one in two in Gemma 2
  (layer 0 slides), five of every six in Gemma 3 (layer_types in config.json).
- Gemma 2 soft-caps the attention scores and the final logits,
  s -> c tanh(s / c) (50 and 30 in its checkpoints), which keeps them in (-c, c).
- Gemma 3 normalises each head's q and k (GemmaRMSNorm over head_dim, as Qwen3 does
  with its own RMSNorm) and gives the sliding layers their own RoPE base
  (rope_local_base_freq, 10,000) while the full layers use rope_theta (1,000,000)
  and any rope scaling.

Module names follow the checkpoints (model.layers.N.pre_feedforward_layernorm, ...), so
peft adapters (targets q_proj, v_proj, ...) load as they are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .grad_checkpoint import checkpoint
from .kv_cache import build_attention_mask, start_forward
from .lm_head import CausalLMOutput, causal_lm_head
from .llama import (
    LlamaAttention,
    LlamaConfig,
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    rope_cos_sin,
    rope_inv_freq,
)

GEMMA_MODEL_TYPES = ("gemma2", "gemma3_text")


class GemmaRMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


@dataclass
class GemmaConfig(LlamaConfig):
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base
    model_type: str = "gemma2"
    model_types = GEMMA_MODEL_TYPES

    @classmethod
    def from_hf(cls, d: dict) -> "GemmaConfig":
        model_type = d.get("model_type", "gemma2")
        if model_type not in GEMMA_MODEL_TYPES:
            raise ValueError(f"model_type {model_type!r} is not Gemma 2 or 3 text; supported: {GEMMA_MODEL_TYPES}")
        gemma3 = model_type == "gemma3_text"
        n_layers = d.get("num_hidden_layers", 26)
        pattern = d.get("sliding_window_pattern", 6 if gemma3 else 2)
        layer_types = d.get("layer_types") or [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
        # RoPE: transformers 5 keeps one set per layer type in rope_parameters; older
        # files have rope_theta (+ rope_scaling) and, for Gemma 3, rope_local_base_freq.
        params = d.get("rope_parameters") or {}
        full = dict(params.get("full_attention", params) or {})
        local = dict(params.get("sliding_attention") or {})
        if not full and d.get("rope_scaling"):
            full = dict(d["rope_scaling"])
        rope_theta = float(full.pop("rope_theta", d.get("rope_theta", 1_000_000.0 if gemma3 else 10_000.0)))
        rope_type = full.pop("rope_type", full.pop("type", "default"))
        rope_scaling = None if rope_type == "default" else {"rope_type": rope_type, **full}
        local_theta = None
        if gemma3:
            local_theta = float(local.get("rope_theta", d.get("rope_local_base_freq", 10_000.0)))
        known = dict(
            vocab_size=d.get("vocab_size", 262_208 if gemma3 else 256_000),
            hidden_size=d.get("hidden_size", 2304),
            intermediate_size=d.get("intermediate_size", 9216),
            num_hidden_layers=n_layers,
            num_attention_heads=d.get("num_attention_heads", 8),
            num_key_value_heads=d.get("num_key_value_heads", 4),
            head_dim=d.get("head_dim", 256),
            max_position_embeddings=d.get("max_position_embeddings", 8192),
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            hidden_act=d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(d.get("tie_word_embeddings", True)),
            qkv_bias=bool(d.get("attention_bias", False)),
            o_bias=bool(d.get("attention_bias", False)),
            qk_norm=gemma3,
            attention_dropout=float(d.get("attention_dropout", 0.0)),
            initializer_range=float(d.get("initializer_range", 0.02)),
            sliding_window=d.get("sliding_window", 4096),
            layer_types=layer_types,
            query_pre_attn_scalar=float(d.get("query_pre_attn_scalar", 256)),
            attn_logit_softcapping=d.get("attn_logit_softcapping", None if gemma3 else 50.0),
            final_logit_softcapping=d.get("final_logit_softcapping", None if gemma3 else 30.0),
            rope_local_theta=local_theta,
            model_type=model_type,
        )
        return cls(**known, extra={k: v for k, v in d.items() if k not in known})


class GemmaAttention(LlamaAttention):
    norm_class = GemmaRMSNorm  # Gemma 3's q/k norms

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.scale = config.query_pre_attn_scalar ** -0.5
        self.softcap = config.attn_logit_softcapping

    def attend(self, q, k, v, mask):
        groups = self.n_heads // self.n_kv_heads
        p = self.dropout if self.training else 0.0
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.shape[2] > 1,
                                                  dropout_p=p, scale=self.scale, enable_gqa=groups > 1)
        return self._softcapped(q, k, v, mask, p, groups)

    def _softcapped(self, q, k, v, mask, p, groups):
        # SDPA has no hook between the scores and the softmax, so Gemma 2 attends by hand:
        # s = c tanh(q.k scale / c), then the mask, then softmax in fp32.
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) * self.scale
        scores = torch.tanh(scores / self.softcap) * self.softcap
        if mask is None:
            t, s = scores.shape[-2:]
            mask = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(s - t)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = F.dropout(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), p)
        return torch.matmul(probs, v)


class GemmaMLP(LlamaMLP):
    pass


class GemmaDecoderLayer(LlamaDecoderLayer):
    attention_class, mlp_class, norm_class = GemmaAttention, GemmaMLP, GemmaRMSNorm

    def __init__(self, config: GemmaConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        h, eps = config.hidden_size, config.rms_norm_eps
        self.pre_feedforward_layernorm = GemmaRMSNorm(h, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(h, eps)

    def forward(self, x, cos, sin, mask, kv_cache=None):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, kv_cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class GemmaForCausalLM(LlamaForCausalLM):
    layer_class, norm_class = GemmaDecoderLayer, GemmaRMSNorm

    def __init__(self, config: GemmaConfig):
        super().__init__(config)
        self._local_config = None
        if config.rope_local_theta is not None:
            self._local_config = dataclasses.replace(config, rope_theta=config.rope_local_theta, rope_scaling=None)

    def _local_cos_sin(self, position_ids: torch.Tensor, dtype: torch.dtype):
        key = (position_ids.device, "local")
        if key not in self._inv_freq:
            self._inv_freq[key] = rope_inv_freq(self._local_config).to(position_ids.device)
        return rope_cos_sin(position_ids, self._inv_freq[key], dtype)

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, labels=None, kv_cache=None,
                use_cache=False, inputs_embeds=None, return_logits=True) -> CausalLMOutput:
        kv_cache, past, checkpointing = start_forward(self, input_ids, inputs_embeds, kv_cache, use_cache)
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        x = x * torch.tensor(math.sqrt(self.config.hidden_size), dtype=x.dtype)
        T = x.shape[1]
        if position_ids is None:
            position_ids = torch.arange(past, past + T, device=x.device)[None]
        position_ids = position_ids.to(x.device)
        rope = {"full_attention": self.rope_cos_sin(position_ids, x.dtype)}
        rope["sliding_attention"] = (self._local_cos_sin(position_ids, x.dtype) if self._local_config is not None
                                     else rope["full_attention"])
        masks = {"full_attention": build_attention_mask(attention_mask, T, past, x.device),
                 "sliding_attention": build_attention_mask(attention_mask, T, past, x.device,
                                                           self.config.sliding_window)}
        for i, layer in enumerate(self.model.layers):
            kind = self.config.layer_types[i]
            cos, sin = rope[kind]
            if checkpointing and i % self.checkpoint_every == 0:
                x = checkpoint(layer, x, cos, sin, masks[kind])
            else:
                x = layer(x, cos, sin, masks[kind], kv_cache)
        logits, loss, loss_sum = self.head(self.model.norm(x), labels, return_logits)
        return CausalLMOutput(loss=loss, logits=logits, kv_cache=kv_cache, loss_sum=loss_sum)

    def head(self, hidden, labels, return_logits=True):
        cap = self.config.final_logit_softcapping
        if cap is None:
            return causal_lm_head(self.lm_head, hidden, labels)
        return causal_lm_head(lambda h: torch.tanh(self.lm_head(h) / cap) * cap, hidden, labels)
